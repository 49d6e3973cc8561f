//! The key lifecycle: issue, get, list, update, rotate, revoke, delete, and the audit log.
//!
//! Takes inputs the API layer has already validated, applies the policy that needs more
//! than one field (the RBAC ceiling), writes through the [`Store`] (mutation and audit in
//! one transaction), and then invalidates the VerifyKey cache for every secret hash the
//! mutation made stale. Invalidation happens after the commit, so a fill that read the old
//! row before the commit is refused by the cache's generation check.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cache::VerifyCache;
use crate::clock::Clock;
use crate::domain::Micros;
use crate::domain::access::{self, AccessMode, NetworkAllowlist, ResourceAccess};
use crate::domain::actor::Actor;
use crate::domain::budget::BudgetPeriod;
use crate::domain::ids;
use crate::domain::key::{KeyRecord, KeyStatus, Owner, VerifiableKey, VerifyCode};
use crate::domain::key_format::{self, ApiKey, Brand, Environment, KeyHash};
use crate::domain::leak::LeakFinding;
use crate::domain::limits::RateLimit;
use crate::domain::refusal::{Reason, Refusal};
use crate::domain::scopes::ScopeImplications;
use crate::domain::team::{SelfServiceKey, SelfServiceRefusal, Team, check_self_service_change};
use crate::domain::workspace::Plans;
use crate::events::{EventHub, invalidate_committed};
use crate::store::{
    Acting, AuditFilter, AuditRecord, Changed, DeniedAudit, KeyCursor, KeyFilter, KeyPatch,
    KeySelection, Store, StoreError, split_page,
};

#[derive(Clone, Debug)]
pub struct IssueInput {
    pub workspace_id: String,
    pub name: String,
    pub environment: Environment,
    pub scopes: Vec<String>,
    pub expires_at: Option<Micros>,
    /// `None`: the actor itself, which only a self-service member may leave implied.
    pub owner: Option<Owner>,
    pub metadata: BTreeMap<String, String>,
    pub rate_limits: Vec<RateLimit>,
    pub max_budget_micros: Option<u64>,
    pub budget_period: BudgetPeriod,
    pub resource_access: ResourceAccess,
    pub network: NetworkAllowlist,
    pub team_id: Option<String>,
}

/// Which keys a listing shows.
#[derive(Clone, Debug)]
pub struct KeyQuery {
    pub workspace_id: String,
    pub owner: Option<Owner>,
    pub status: Option<KeyStatus>,
    pub unused_since: Option<Micros>,
    pub name_prefix: Option<String>,
    pub metadata: Option<(String, String)>,
    pub team_id: Option<String>,
}

/// Keys revoked per transaction by [`KeyLifecycle::revoke_many`]: each chunk commits with
/// its events and audit rows, so a workspace of any size is revoked without one huge
/// transaction, and a call interrupted half way revokes the rest when repeated.
pub const REVOKE_CHUNK: u32 = 500;

/// A new key and its plaintext, to be shown once.
#[derive(Debug)]
pub struct Issued {
    pub plaintext: ApiKey,
    pub key: KeyRecord,
}

#[derive(Debug)]
pub struct RotatedKey {
    pub plaintext: ApiKey,
    pub key: KeyRecord,
    pub old_secret_valid_until: Micros,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Refused, with the reason that decides the status code (the RBAC ceiling and
    /// self-service are PERMISSION_DENIED, a plan, a team's policy or the key's state
    /// FAILED_PRECONDITION: see `api::error`).
    #[error("{0}")]
    Refused(Refusal),
    #[error("key not found")]
    NotFound,
    #[error("workspace {0} does not exist")]
    WorkspaceNotFound(String),
    #[error("team {0} does not exist in this workspace")]
    TeamNotFound(String),
    #[error(transparent)]
    Store(StoreError),
    #[error("the operating system's random source failed")]
    Randomness,
}

impl From<StoreError> for KeyError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => KeyError::NotFound,
            StoreError::Precondition(refusal) => KeyError::Refused(refusal),
            other => KeyError::Store(other),
        }
    }
}

/// The revocation reason of a key reported leaked.
pub const LEAKED: &str = "leaked";

pub struct KeyLifecycle {
    store: Arc<dyn Store>,
    cache: Arc<VerifyCache>,
    events: Arc<EventHub>,
    clock: Clock,
    policy: KeyPolicy,
}

/// The deployment's rules the lifecycle applies.
pub struct KeyPolicy {
    pub brand: Brand,
    pub implications: Arc<ScopeImplications>,
    pub plans: Arc<Plans>,
    /// Limits for keys that name none (a team's rate-limit ceilings judge these too).
    pub default_limits: Arc<Vec<RateLimit>>,
}

impl KeyLifecycle {
    pub fn new(
        store: Arc<dyn Store>,
        cache: Arc<VerifyCache>,
        events: Arc<EventHub>,
        clock: Clock,
        policy: KeyPolicy,
    ) -> Self {
        KeyLifecycle {
            store,
            cache,
            events,
            clock,
            policy,
        }
    }

    pub fn now(&self) -> Micros {
        self.clock.now()
    }

    pub async fn issue(&self, acting: &Acting, input: IssueInput) -> Result<Issued, KeyError> {
        let now = self.clock.now();
        // The workspace must exist, and its plan allow keys (a refusal is audited).
        let workspace = self
            .store
            .get_workspace(&input.workspace_id)
            .await?
            .ok_or_else(|| KeyError::WorkspaceNotFound(input.workspace_id.clone()))?;
        if !self.policy.plans.policy(workspace.plan).api_keys {
            let why = format!(
                "the {} plan of workspace {} does not allow API keys",
                workspace.plan.display(),
                workspace.workspace_id
            );
            let refusal = Refusal::new(Reason::PlanForbidsApiKeys, why)
                .with("workspace_id", &workspace.workspace_id)
                .with("plan", workspace.plan.display());
            return Err(self
                .deny(
                    acting,
                    &workspace.workspace_id,
                    None,
                    "key.issue",
                    refusal,
                    now,
                )
                .await);
        }
        self.check_ceiling(
            acting,
            &input.workspace_id,
            None,
            "key.issue",
            &input.scopes,
            now,
        )
        .await?;
        let mut input = input;
        // A self-service member's key is its own: naming no owner means the member, and
        // naming someone else is refused (audited), never quietly changed.
        if acting.actor.is_self_service() {
            let own = acting.actor.as_owner();
            if let Some(named) = input.owner.as_ref().filter(|named| **named != own) {
                let refusal = acting.actor.owner_not_actor(
                    named,
                    "a self-service member's key is its own (leave owner unset, or name yourself)",
                );
                return Err(self
                    .deny(acting, &input.workspace_id, None, "key.issue", refusal, now)
                    .await);
            }
            input.owner = Some(own);
        }
        let Some(owner) = input.owner.clone() else {
            return Err(KeyError::Refused(
                Refusal::new(Reason::InvalidRequest, "owner is required").with("field", "owner"),
            ));
        };
        if let Some(team_id) = &input.team_id {
            let team = self
                .store
                .get_team(&input.workspace_id, team_id)
                .await?
                .ok_or_else(|| KeyError::TeamNotFound(team_id.clone()))?;
            self.check_reach_within_team(
                acting,
                None,
                "key.issue",
                &team,
                &input.resource_access,
                now,
            )
            .await?;
        }
        let key_id = ids::new_key_id(&mut getrandom::SysRng).map_err(|_| KeyError::Randomness)?;
        let plaintext = ApiKey::generate(
            &mut getrandom::SysRng,
            &self.policy.brand,
            input.environment,
        )
        .map_err(|_| KeyError::Randomness)?;
        let key = KeyRecord {
            display: key_format::display(
                &self.policy.brand,
                input.environment,
                plaintext.last_four(),
            ),
            name: input.name,
            scopes: input.scopes,
            metadata: input.metadata,
            expires_at: input.expires_at,
            rate_limits: input.rate_limits,
            max_budget_micros: input.max_budget_micros,
            budget_period: input.budget_period,
            resource_access: input.resource_access,
            network: input.network,
            team_id: input.team_id,
            ..KeyRecord::issued(
                key_id,
                input.workspace_id,
                input.environment,
                owner,
                acting.actor.id.clone(),
                now,
            )
        };
        let audit = acting.audit("key.issue", format!("scopes: {}", key.scopes.join(" ")));
        // A self-service member's team key keeps to the team's policy, judged by the
        // store inside the insert's transaction on the team as locked there and the keys
        // the member holds then (`domain::team::check_team_issue`); a refusal is audited
        // in that transaction.
        let member =
            (acting.actor.is_self_service() && key.team_id.is_some()).then(|| SelfServiceKey {
                max_budget_micros: key.max_budget_micros,
                expires_at: key.expires_at,
                effective_limits: self.effective_limits(&key.rate_limits),
            });
        self.store
            .insert_key(&key, &plaintext.hash(), member.as_ref(), &audit)
            .await?;
        tracing::info!(key_id = %key.key_id, workspace_id = %key.workspace_id, "key issued");
        Ok(Issued { plaintext, key })
    }

    /// A key as `actor` may see it (`None`: the admin backend's own view). A self-service
    /// actor sees only keys it owns; any other is NOT_FOUND, as if it did not exist.
    pub async fn get(&self, actor: Option<&Actor>, key_id: &str) -> Result<KeyRecord, KeyError> {
        let key = self
            .store
            .get_key(key_id)
            .await?
            .ok_or(KeyError::NotFound)?;
        if actor.is_some_and(|a| a.is_self_service() && !a.owns(&key)) {
            return Err(KeyError::NotFound);
        }
        Ok(key)
    }

    /// One page of keys and the cursor of the next page, if any. A self-service actor
    /// lists only its own keys.
    pub async fn list(
        &self,
        actor: Option<&Actor>,
        query: KeyQuery,
        page_size: u32,
        after: Option<KeyCursor>,
    ) -> Result<(Vec<KeyRecord>, Option<KeyCursor>), KeyError> {
        let mut query = query;
        if let Some(actor) = actor.filter(|a| a.is_self_service()) {
            let own = actor.as_owner();
            if query.owner.as_ref().is_some_and(|o| *o != own) {
                return Ok((Vec::new(), None));
            }
            query.owner = Some(own);
        }
        let filter = KeyFilter {
            workspace_id: query.workspace_id,
            owner: query.owner,
            status: query.status,
            unused_since: query.unused_since,
            name_prefix: query.name_prefix,
            metadata: query.metadata,
            team_id: query.team_id,
            now: self.clock.now(),
        };
        // One row more than asked tells whether there is a next page.
        let keys = self
            .store
            .list_keys(&filter, page_size + 1, after.as_ref())
            .await?;
        if keys.is_empty() && !self.store.workspace_exists(&filter.workspace_id).await? {
            return Err(KeyError::WorkspaceNotFound(filter.workspace_id));
        }
        Ok(split_page(keys, page_size, |k| KeyCursor {
            created_at: k.created_at,
            key_id: k.key_id.clone(),
        }))
    }

    pub async fn update(
        &self,
        acting: &Acting,
        key_id: &str,
        patch: KeyPatch,
    ) -> Result<KeyRecord, KeyError> {
        let now = self.clock.now();
        // Ownership, workspace and team never change, so reading them before the locked
        // update is safe.
        let key = self.get(Some(&acting.actor), key_id).await?;
        if let Some(scopes) = &patch.scopes {
            self.check_ceiling(
                acting,
                &key.workspace_id,
                Some(key_id),
                "key.update",
                scopes,
                now,
            )
            .await?;
        }
        // A team key's new reach stays within its team's.
        if let (Some(team_id), Some(reach)) = (&key.team_id, &patch.resource_access) {
            let team = self
                .store
                .get_team(&key.workspace_id, team_id)
                .await?
                .ok_or_else(|| KeyError::TeamNotFound(team_id.clone()))?;
            self.check_reach_within_team(acting, Some(key_id), "key.update", &team, reach, now)
                .await?;
        }
        // A member's team key stays within the team's policy as the update leaves it.
        if acting.actor.is_self_service()
            && let Some(team_id) = &key.team_id
        {
            let rate_limits = patch.rate_limits.as_ref().unwrap_or(&key.rate_limits);
            let after = SelfServiceKey {
                max_budget_micros: patch.max_budget_micros.unwrap_or(key.max_budget_micros),
                expires_at: patch.expires_at.unwrap_or(key.expires_at),
                effective_limits: self.effective_limits(rate_limits),
            };
            self.check_team_change(acting, &key, team_id, &after, "key.update", now)
                .await?;
        }
        let fields: Vec<&str> = [
            patch.name.as_ref().map(|_| "name"),
            patch.scopes.as_ref().map(|_| "scopes"),
            patch.expires_at.as_ref().map(|_| "expires_at"),
            patch.metadata.as_ref().map(|_| "metadata"),
            patch.rate_limits.as_ref().map(|_| "rate_limits"),
            patch
                .max_budget_micros
                .as_ref()
                .map(|_| "max_budget_micros"),
            patch.budget_period.as_ref().map(|_| "budget_period"),
            patch.resource_access.as_ref().map(|_| "resource_access"),
            patch.network.as_ref().map(|_| "allowed_cidrs"),
        ]
        .into_iter()
        .flatten()
        .collect();
        let audit = acting.audit("key.update", format!("fields: {}", fields.join(" ")));
        let changed = self.store.update_key(key_id, &patch, now, &audit).await?;
        Ok(self.invalidated(changed))
    }

    pub async fn rotate(
        &self,
        acting: &Acting,
        key_id: &str,
        grace: Micros,
    ) -> Result<RotatedKey, KeyError> {
        // Ownership, environment and team never change, so reading them before the
        // locked rotation is safe.
        let key = self.get(Some(&acting.actor), key_id).await?;
        let environment = key.environment;
        let now = self.clock.now();
        // A member rotates its team key only while self-service is on and the key is
        // within the team's policy (a tightened policy is applied at the rotation).
        if acting.actor.is_self_service()
            && let Some(team_id) = &key.team_id
        {
            let current = SelfServiceKey {
                max_budget_micros: key.max_budget_micros,
                expires_at: key.expires_at,
                effective_limits: self.effective_limits(&key.rate_limits),
            };
            self.check_team_change(acting, &key, team_id, &current, "key.rotate", now)
                .await?;
        }
        let plaintext = ApiKey::generate(&mut getrandom::SysRng, &self.policy.brand, environment)
            .map_err(|_| KeyError::Randomness)?;
        let display = key_format::display(&self.policy.brand, environment, plaintext.last_four());
        let audit = acting.audit(
            "key.rotate",
            format!("grace_seconds: {}", grace / 1_000_000),
        );
        let rotated = self
            .store
            .rotate_key(key_id, &plaintext.hash(), &display, grace, now, &audit)
            .await?;
        self.invalidate_all(&rotated.stale_hashes);
        tracing::info!(key_id, "key rotated");
        Ok(RotatedKey {
            plaintext,
            key: rotated.key,
            old_secret_valid_until: rotated.old_secret_valid_until,
        })
    }

    pub async fn revoke(
        &self,
        acting: &Acting,
        key_id: &str,
        reason: &str,
    ) -> Result<KeyRecord, KeyError> {
        self.get(Some(&acting.actor), key_id).await?;
        let audit = acting.audit("key.revoke", format!("reason: {reason}"));
        let changed = self
            .store
            .revoke_key(key_id, reason, self.clock.now(), &audit)
            .await?;
        tracing::info!(key_id, "key revoked");
        Ok(self.invalidated(changed))
    }

    /// A key found in a public place: `presented` is the text found, `found_at` where.
    /// Its checksum is checked first (an invented token reads no storage); a live key is
    /// revoked at once with reason `leaked`, audited as `key.leaked` by `acting` (the
    /// scanner, or the person who reported it) and streamed as any revocation. Repeating
    /// a report finds the key dead and changes nothing.
    pub async fn report_leak(
        &self,
        acting: &Acting,
        presented: &str,
        found_at: &str,
    ) -> Result<LeakFinding, KeyError> {
        if key_format::parse(&self.policy.brand, presented).is_err() {
            return Ok(LeakFinding::NotAKey);
        }
        let Some(found) = self.store.find_secret(&KeyHash::of(presented)).await? else {
            return Ok(LeakFinding::Unknown);
        };
        let now = self.clock.now();
        let key_id = found.key.key_id.clone();
        // Usable is what VerifyKey's own state checks say: not deleted, revoked, expired,
        // nor a replaced secret past its grace.
        let key = VerifiableKey::from(found.key);
        if crate::domain::key::status(&key, found.valid_until, now) != VerifyCode::Valid {
            return Ok(LeakFinding::AlreadyDead { key_id });
        }
        let audit = acting.audit(
            "key.leaked",
            format!("reason: leaked, found at: {found_at}"),
        );
        let changed = self.store.revoke_key(&key_id, LEAKED, now, &audit).await?;
        tracing::warn!(key_id, "leaked key revoked");
        self.invalidated(changed);
        Ok(LeakFinding::Revoked { key_id })
    }

    /// Starts the key's budget again from now (an admin's act: a self-service member may
    /// not reset its own budget, and the refusal is audited).
    pub async fn reset_budget(&self, acting: &Acting, key_id: &str) -> Result<KeyRecord, KeyError> {
        let key = self.get(Some(&acting.actor), key_id).await?;
        let now = self.clock.now();
        if acting.actor.is_self_service() {
            let refusal = Refusal::new(
                Reason::BudgetResetNeedsAdmin,
                "only an admin may reset a key's budget",
            )
            .with("actor_id", &acting.actor.id);
            return Err(self
                .deny(
                    acting,
                    &key.workspace_id,
                    Some(key_id),
                    "key.reset_budget",
                    refusal,
                    now,
                )
                .await);
        }
        let audit = acting.audit(
            "key.reset_budget",
            format!("spent before: {}", key.spent_at(now)),
        );
        let changed = self.store.reset_budget(key_id, now, &audit).await?;
        tracing::info!(key_id, "budget reset");
        Ok(self.invalidated(changed))
    }

    /// Revokes every key of `selection` that is neither revoked nor deleted, chunk by
    /// chunk, each key audited and streamed as by [`KeyLifecycle::revoke`]; returns how
    /// many. A self-service member revokes only its own keys: its selection is narrowed to
    /// them, and naming another owner is refused.
    pub async fn revoke_many(
        &self,
        acting: &Acting,
        selection: KeySelection,
        reason: &str,
    ) -> Result<u64, KeyError> {
        let mut selection = selection;
        if !self.store.workspace_exists(&selection.workspace_id).await? {
            return Err(KeyError::WorkspaceNotFound(selection.workspace_id));
        }
        if acting.actor.is_self_service() {
            let own = acting.actor.as_owner();
            if let Some(named) = selection.owner.as_ref().filter(|o| **o != own) {
                let refusal = acting
                    .actor
                    .owner_not_actor(named, "a self-service member revokes only its own keys");
                let now = self.clock.now();
                return Err(self
                    .deny(
                        acting,
                        &selection.workspace_id,
                        None,
                        "key.revoke",
                        refusal,
                        now,
                    )
                    .await);
            }
            selection.owner = Some(own);
        }
        let audit = acting.audit("key.revoke", format!("bulk; reason: {reason}"));
        let mut total = 0;
        loop {
            let (revoked, stale) = self
                .store
                .revoke_keys(&selection, reason, REVOKE_CHUNK, self.clock.now(), &audit)
                .await?;
            self.invalidate_all(&stale);
            total += revoked;
            if revoked < u64::from(REVOKE_CHUNK) {
                break;
            }
        }
        tracing::info!(workspace_id = %selection.workspace_id, revoked = total, "keys revoked in bulk");
        Ok(total)
    }

    pub async fn delete(&self, acting: &Acting, key_id: &str) -> Result<(), KeyError> {
        self.get(Some(&acting.actor), key_id).await?;
        let audit = acting.audit("key.delete", String::new());
        let changed = self
            .store
            .delete_key(key_id, self.clock.now(), &audit)
            .await?;
        tracing::info!(key_id, "key deleted");
        self.invalidated(changed);
        Ok(())
    }

    pub async fn audit_log(
        &self,
        filter: &AuditFilter,
        page_size: u32,
        before_id: Option<i64>,
    ) -> Result<(Vec<AuditRecord>, Option<i64>), KeyError> {
        let events = self
            .store
            .list_audit(filter, page_size + 1, before_id)
            .await?;
        if events.is_empty() && !self.store.workspace_exists(&filter.workspace_id).await? {
            return Err(KeyError::WorkspaceNotFound(filter.workspace_id.clone()));
        }
        Ok(split_page(events, page_size, |e| e.id))
    }

    /// A member's change or rotation of its team key: self-service must be on and the key,
    /// as the change leaves it, within the team's policy (a refusal is audited).
    async fn check_team_change(
        &self,
        acting: &Acting,
        key: &KeyRecord,
        team_id: &str,
        after: &SelfServiceKey<'_>,
        action: &'static str,
        now: Micros,
    ) -> Result<(), KeyError> {
        let team = self
            .store
            .get_team(&key.workspace_id, team_id)
            .await?
            .ok_or_else(|| KeyError::TeamNotFound(team_id.to_owned()))?;
        match check_self_service_change(&team.policy, after, now) {
            Ok(()) => Ok(()),
            Err(refusal) => Err(self
                .refuse_self_service(
                    acting,
                    &key.workspace_id,
                    Some(&key.key_id),
                    action,
                    team_id,
                    &refusal,
                    now,
                )
                .await),
        }
    }

    /// Refuses (audited) a team key whose own reach names targets or access groups its
    /// team cannot reach (`domain::access::beyond_team`), whoever the actor: it would be
    /// cut at verify time, and the person asking would never learn why the key answers
    /// RESOURCE_FORBIDDEN. Checked before the write, on the team as read then; verify
    /// time cuts a reach to the team's in any case.
    async fn check_reach_within_team(
        &self,
        acting: &Acting,
        key_id: Option<&str>,
        action: &'static str,
        team: &Team,
        reach: &ResourceAccess,
        now: Micros,
    ) -> Result<(), KeyError> {
        let mut team_reach = team.policy.resource_access.clone();
        if reach.mode == AccessMode::Include && team_reach.names_groups() {
            let groups = self.store.list_groups(&team.workspace_id).await?;
            team_reach.resolve_groups(&groups);
        }
        let beyond = access::beyond_team(&team_reach, reach);
        if beyond.is_empty() {
            return Ok(());
        }
        let refusal = access::reach_beyond_team(&team.team_id, &beyond);
        Err(self
            .deny(acting, &team.workspace_id, key_id, action, refusal, now)
            .await)
    }

    /// Audits a self-service refusal and words its error: PERMISSION_DENIED when the
    /// member may not act at all, FAILED_PRECONDITION when the key asked for is outside
    /// the policy.
    #[allow(clippy::too_many_arguments)]
    async fn refuse_self_service(
        &self,
        acting: &Acting,
        workspace_id: &str,
        key_id: Option<&str>,
        action: &'static str,
        team_id: &str,
        refusal: &SelfServiceRefusal,
        now: Micros,
    ) -> KeyError {
        self.deny(
            acting,
            workspace_id,
            key_id,
            action,
            refusal.refusal(team_id),
            now,
        )
        .await
    }

    /// A policy refusal, audited as denied: the refused error, or the audit's own failure.
    async fn deny(
        &self,
        acting: &Acting,
        workspace_id: &str,
        key_id: Option<&str>,
        action: &'static str,
        refusal: Refusal,
        now: Micros,
    ) -> KeyError {
        let recorded = self
            .store
            .record_denied(&DeniedAudit {
                workspace_id: workspace_id.to_owned(),
                key_id: key_id.map(str::to_owned),
                context: acting.audit(action, refusal.message.clone()),
                occurred_at: now,
            })
            .await;
        match recorded {
            Ok(()) => KeyError::Refused(refusal),
            Err(e) => e.into(),
        }
    }

    /// The limits that apply to a key with these of its own (none: the default).
    fn effective_limits<'a>(&'a self, own: &'a [RateLimit]) -> &'a [RateLimit] {
        if own.is_empty() {
            self.policy.default_limits.as_slice()
        } else {
            own
        }
    }

    /// The RBAC ceiling: a key never holds a scope its creator does not (implications
    /// count on both sides). A refusal is audited.
    async fn check_ceiling(
        &self,
        acting: &Acting,
        workspace_id: &str,
        key_id: Option<&str>,
        action: &'static str,
        scopes: &[String],
        now: Micros,
    ) -> Result<(), KeyError> {
        let missing = self
            .policy
            .implications
            .missing(&acting.actor.permissions, scopes);
        if missing.is_empty() {
            return Ok(());
        }
        let why = format!(
            "actor {} may not grant scopes it does not hold: {}",
            acting.actor.id,
            missing.join(", ")
        );
        let refusal = Refusal::new(Reason::ScopeCeilingExceeded, why)
            .with("actor_id", &acting.actor.id)
            .with("missing_scopes", missing.join(","));
        Err(self
            .deny(acting, workspace_id, key_id, action, refusal, now)
            .await)
    }

    fn invalidated(&self, changed: Changed) -> KeyRecord {
        self.invalidate_all(&changed.stale_hashes);
        changed.key
    }

    fn invalidate_all(&self, hashes: &[KeyHash]) {
        invalidate_committed(&self.cache, &self.events, hashes);
    }
}
