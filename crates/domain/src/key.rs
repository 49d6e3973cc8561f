//! What a key is once issued, and how a verification is decided.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Micros;
use super::access::{self, NetworkAllowlist, ResourceAccess};
use super::budget::{self, BudgetPeriod, SpendEpoch};
use super::key_format::Environment;
use super::limits::RateLimit;
use super::packed_id::PackedId;
use super::pools::Pool;
use super::refusal::{Reason, Refusal};
use super::scopes::EffectiveScopes;
use super::validate::{MAX_COST, Violations};

/// The longest grace period a rotation may give the old secret.
pub const MAX_ROTATION_GRACE: Micros = 7 * 24 * 3600 * super::MICROS_PER_SECOND;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OwnerKind {
    User,
    ServiceAccount,
}

impl OwnerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OwnerKind::User => "user",
            OwnerKind::ServiceAccount => "service_account",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(OwnerKind::User),
            "service_account" => Some(OwnerKind::ServiceAccount),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    pub kind: OwnerKind,
    pub id: String,
}

impl std::fmt::Display for Owner {
    /// `user:ID` or `service_account:ID`, as the CLI takes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.id)
    }
}

/// A key as stored: never its secret, never its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: String,
    pub workspace_id: String,
    pub name: String,
    pub environment: Environment,
    pub display: String,
    pub scopes: Vec<String>,
    pub owner: Owner,
    pub created_by: String,
    pub metadata: BTreeMap<String, String>,
    pub created_at: Micros,
    pub updated_at: Micros,
    pub expires_at: Option<Micros>,
    pub revoked_at: Option<Micros>,
    pub revoke_reason: Option<String>,
    pub rotated_at: Option<Micros>,
    pub deleted_at: Option<Micros>,
    /// The key's own limits; empty: the deployment's default.
    pub rate_limits: Vec<RateLimit>,
    pub max_budget_micros: Option<u64>,
    /// How often the budget starts again (see [`crate::budget`]).
    pub budget_period: BudgetPeriod,
    /// The last manual reset of the budget (0: never).
    pub budget_reset_at: Micros,
    /// Persisted spend when the record was read, in the epoch `spend_epoch`.
    pub spent_micros: u64,
    /// The start of the spend epoch `spent_micros` belongs to.
    pub spend_epoch: Micros,
    pub last_used_at: Option<Micros>,
    pub resource_access: ResourceAccess,
    pub network: NetworkAllowlist,
    /// The team the key belongs to, if any.
    pub team_id: Option<String>,
    /// The team's reach (its policy's resource access, groups resolved) as last loaded;
    /// never stored with the key. `All` for a key without a team.
    pub team_access: ResourceAccess,
}

/// What VerifyKey needs of a key: what it decides on and what it answers with. The
/// verify cache holds one per cached key, so it carries nothing else of the record (no
/// name, display, creator, timestamps or revoke reason): about a quarter less heap than
/// the whole record per cached key (`tests/memory.rs` counts it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiableKey {
    /// Packed: most ids take 18 bytes in place instead of an allocation (see
    /// [`crate::packed_id`]).
    pub key_id: PackedId,
    /// The workspace, scopes and owner are shared: most keys have one of a handful of
    /// each, and the verify cache hands a filled key the copies its other keys already
    /// hold (`src/cache.rs`), so a cached key pays a pointer for each, not an allocation.
    pub workspace_id: Arc<str>,
    pub environment: Environment,
    pub scopes: Arc<[String]>,
    pub owner: Arc<Owner>,
    /// `Micros::MAX` when the key never expires (one word instead of an `Option`'s two;
    /// read it with [`VerifiableKey::expires_at`]).
    expires_at: Micros,
    /// Whether the key was revoked, or deleted (when is the record's: a cached key
    /// needs only whether).
    pub revoked: bool,
    pub deleted: bool,
    /// Whether the workspace's plan forbids API keys, as the workspace stood when the key
    /// was read (a plan change reloads the workspace's keys).
    pub plan_forbids_keys: bool,
    /// `u64::MAX` when the key has no budget (budgets are far below it); read it with
    /// [`VerifiableKey::max_budget_micros`].
    max_budget_micros: u64,
    /// Persisted spend when the record was read.
    pub spent_micros: u64,
    /// `None` when the key has none of them (most keys): one pointer instead of the
    /// two hundred bytes their empty forms take.
    extras: Option<Box<KeyExtras>>,
}

/// What most keys do not have: metadata, rules of reach, a network allowlist, and a
/// team's reach.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct KeyExtras {
    metadata: BTreeMap<String, String>,
    resource_access: ResourceAccess,
    network: NetworkAllowlist,
    /// The team's reach as loaded with the record (see [`KeyRecord::team_access`]).
    team_access: ResourceAccess,
    /// The pools the key's calls count against besides its own limits, in the order they
    /// are judged (see [`crate::pools`]).
    pools: Vec<Pool>,
    /// What the spend epoch depends on beyond a lifetime budget never reset.
    budget: BudgetTerms,
}

/// A budget's period and what its epochs count from (all zero for a lifetime budget
/// never reset, whose one epoch is [`SpendEpoch::LIFETIME`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct BudgetTerms {
    period: BudgetPeriod,
    /// Only for a rolling period: its anchor before any reset.
    created_at: Micros,
    reset_at: Micros,
    /// The epoch of the record's `spent_micros`.
    spend_epoch: Micros,
}

/// A key without extras reads these.
static NO_EXTRAS: KeyExtras = KeyExtras {
    metadata: BTreeMap::new(),
    resource_access: ResourceAccess::ALL,
    network: NetworkAllowlist { nets: Vec::new() },
    team_access: ResourceAccess::ALL,
    pools: Vec::new(),
    budget: BudgetTerms {
        period: BudgetPeriod::Lifetime,
        created_at: 0,
        reset_at: 0,
        spend_epoch: 0,
    },
};

impl VerifiableKey {
    pub fn expires_at(&self) -> Option<Micros> {
        (self.expires_at != Micros::MAX).then_some(self.expires_at)
    }

    pub fn max_budget_micros(&self) -> Option<u64> {
        (self.max_budget_micros != u64::MAX).then_some(self.max_budget_micros)
    }

    fn extras(&self) -> &KeyExtras {
        self.extras.as_deref().unwrap_or(&NO_EXTRAS)
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.extras().metadata
    }

    pub fn resource_access(&self) -> &ResourceAccess {
        &self.extras().resource_access
    }

    pub fn network(&self) -> &NetworkAllowlist {
        &self.extras().network
    }

    /// The team's reach as loaded with the record (see [`KeyRecord::team_access`]).
    pub fn team_access(&self) -> &ResourceAccess {
        &self.extras().team_access
    }

    /// The spend epoch at `now`.
    pub fn spend_epoch(&self, now: Micros) -> SpendEpoch {
        let b = &self.extras().budget;
        budget::epoch(b.period, b.created_at, b.reset_at, now)
    }

    /// The record's spend as it counts in `epoch`.
    pub fn spent_in(&self, epoch: &SpendEpoch) -> u64 {
        epoch.count(self.spent_micros, self.extras().budget.spend_epoch)
    }

    /// The pools the key's calls count against besides its own limits, owner, team then
    /// workspace (empty for most keys).
    pub fn pools(&self) -> &[Pool] {
        &self.extras().pools
    }

    /// Sets the pools, as [`crate::pools::in_order`] returns them.
    pub fn set_pools(&mut self, pools: Vec<Pool>) {
        if pools.is_empty() && self.extras.is_none() {
            return;
        }
        let extras = self.extras.get_or_insert_with(Box::default);
        extras.pools = pools;
        if **extras == NO_EXTRAS {
            self.extras = None;
        }
    }
}

impl From<KeyRecord> for VerifiableKey {
    fn from(r: KeyRecord) -> Self {
        let extras = KeyExtras {
            metadata: r.metadata,
            resource_access: r.resource_access,
            network: r.network,
            team_access: r.team_access,
            pools: Vec::new(),
            budget: BudgetTerms {
                period: r.budget_period,
                created_at: match r.budget_period {
                    BudgetPeriod::Days(_) => r.created_at,
                    _ => 0,
                },
                reset_at: r.budget_reset_at,
                spend_epoch: r.spend_epoch,
            },
        };
        VerifiableKey {
            key_id: r.key_id.into(),
            workspace_id: r.workspace_id.into(),
            environment: r.environment,
            scopes: r.scopes.into(),
            owner: Arc::new(r.owner),
            expires_at: r.expires_at.unwrap_or(Micros::MAX),
            revoked: r.revoked_at.is_some(),
            deleted: r.deleted_at.is_some(),
            plan_forbids_keys: false,
            max_budget_micros: r.max_budget_micros.unwrap_or(u64::MAX),
            spent_micros: r.spent_micros,
            extras: (extras != NO_EXTRAS).then(|| Box::new(extras)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Revoked,
    Expired,
}

impl KeyRecord {
    /// The spend epoch at `now` (see [`crate::budget`]).
    pub fn spend_epoch_at(&self, now: Micros) -> SpendEpoch {
        budget::epoch(
            self.budget_period,
            self.created_at,
            self.budget_reset_at,
            now,
        )
    }

    /// When the budget next starts again by itself, seen at `now` (`None`: a lifetime
    /// budget).
    pub fn next_budget_reset(&self, now: Micros) -> Option<Micros> {
        let ends = self.spend_epoch_at(now).ends;
        (ends != Micros::MAX).then_some(ends)
    }

    /// The stored spend as it counts at `now`: 0 once its epoch has ended.
    pub fn spent_at(&self, now: Micros) -> u64 {
        self.spend_epoch_at(now)
            .count(self.spent_micros, self.spend_epoch)
    }

    /// A key as issued at `now`: active, never used, nothing spent, no limits, budget,
    /// expiry, scopes or metadata of its own, reaching everything from anywhere. The
    /// issuer sets what it decides with struct update syntax
    /// (`KeyRecord { scopes, ..KeyRecord::issued(..) }`), so the lifecycle's fields are
    /// spelled out in one place.
    pub fn issued(
        key_id: String,
        workspace_id: String,
        environment: Environment,
        owner: Owner,
        created_by: String,
        now: Micros,
    ) -> KeyRecord {
        KeyRecord {
            key_id,
            workspace_id,
            name: String::new(),
            environment,
            display: String::new(),
            scopes: Vec::new(),
            owner,
            created_by,
            metadata: BTreeMap::new(),
            created_at: now,
            updated_at: now,
            expires_at: None,
            revoked_at: None,
            revoke_reason: None,
            rotated_at: None,
            deleted_at: None,
            rate_limits: Vec::new(),
            max_budget_micros: None,
            budget_period: BudgetPeriod::Lifetime,
            budget_reset_at: 0,
            spent_micros: 0,
            spend_epoch: 0,
            last_used_at: None,
            resource_access: ResourceAccess::default(),
            network: NetworkAllowlist::default(),
            team_id: None,
            team_access: ResourceAccess::default(),
        }
    }

    /// A plain active key of `ws` owned by user `u`, with the `read` scope (tests only:
    /// the `testing` feature, which only dev-dependencies turn on).
    #[cfg(any(test, feature = "testing"))]
    pub fn sample(key_id: &str) -> KeyRecord {
        KeyRecord {
            name: "n".into(),
            display: "kw_live_...abcd".into(),
            scopes: vec!["read".into()],
            ..KeyRecord::issued(
                key_id.into(),
                "ws".into(),
                Environment::Live,
                Owner {
                    kind: OwnerKind::User,
                    id: "u".into(),
                },
                "u".into(),
                0,
            )
        }
    }
}

impl KeyRecord {
    /// Revocation wins over expiry: a revoked key stays revoked after it would have expired.
    pub fn status(&self, now: Micros) -> KeyStatus {
        if self.revoked_at.is_some() {
            KeyStatus::Revoked
        } else if self.expires_at.is_some_and(|e| now >= e) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }

    /// Whether the key may be given a new secret at `now`: only an active one. A revoked
    /// key stays revoked (revocation wins over expiry, as in [`KeyRecord::status`]), and
    /// an expired one would hand out a secret that cannot verify.
    pub fn check_rotatable(&self, now: Micros) -> Result<(), Refusal> {
        match self.status(now) {
            KeyStatus::Active => Ok(()),
            KeyStatus::Revoked => {
                Err(Refusal::new(Reason::KeyRevoked, "key is revoked").with("key_id", &self.key_id))
            }
            KeyStatus::Expired => {
                Err(Refusal::new(Reason::KeyExpired, "key has expired")
                    .with("key_id", &self.key_id))
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyCode {
    Valid,
    NotFound,
    Malformed,
    Revoked,
    Expired,
    InsufficientScope,
    RateLimited,
    BudgetExceeded,
    ResourceForbidden,
    IpForbidden,
    /// The workspace's plan does not allow API keys (now): a state of the workspace, not
    /// of the key, which works again when the plan allows keys.
    PlanForbidsKeys,
}

/// What a request asks of a key besides its secret.
#[derive(Clone, Copy, Debug, Default)]
pub struct Request<'a> {
    pub required_scopes: &'a [String],
    /// The resource (model) the call is for, if the caller names one.
    pub resource: Option<&'a str>,
    /// The end client's address, if the caller names one.
    pub client_ip: Option<std::net::IpAddr>,
}

impl<'a> Request<'a> {
    /// VerifyKey's request fields besides the key, checked: the one check both the server
    /// and the edge make (the edge sends what this refuses to the server, uncached, so
    /// its caller gets the server's INVALID_ARGUMENT). Returns the request and the cost
    /// the call counts for (at least 1), or every violation, each naming its field.
    pub fn parse(
        required_scopes: &'a [String],
        resource: &'a str,
        client_ip: &str,
        cost: u64,
    ) -> Result<(Request<'a>, u64), Violations> {
        let mut request = Request {
            required_scopes,
            resource: (!resource.is_empty()).then_some(resource),
            client_ip: None,
        };
        // The usual call names nothing else: no checks to run.
        if required_scopes.is_empty()
            && resource.is_empty()
            && client_ip.is_empty()
            && cost <= MAX_COST
        {
            return Ok((request, cost.max(1)));
        }
        let mut v = Violations::default();
        v.scopes("required_scopes", required_scopes);
        if cost > MAX_COST {
            v.add("cost", format!("must be at most {MAX_COST}"));
        }
        if !resource.is_empty() && !access::is_target(resource) {
            v.add(
                "resource",
                "must be 1 to 128 printable ASCII characters without spaces",
            );
        }
        if !client_ip.is_empty() {
            request.client_ip = client_ip.trim().parse::<std::net::IpAddr>().ok();
            if request.client_ip.is_none() {
                v.add("client_ip", "is not an IPv4 or IPv6 address");
            }
        }
        if v.is_empty() {
            Ok((request, cost.max(1)))
        } else {
            Err(v)
        }
    }
}

/// Decides a verification of a key whose secret matched a stored one.
///
/// `secret_valid_until` is `None` for the key's current secret and the end of the grace
/// period for a secret that a rotation replaced.
pub fn decide(
    key: &VerifiableKey,
    secret_valid_until: Option<Micros>,
    effective_scopes: &EffectiveScopes,
    request: &Request<'_>,
    now: Micros,
) -> VerifyCode {
    let status = status(key, secret_valid_until, now);
    if status != VerifyCode::Valid {
        status
    } else if !key.network().allows(request.client_ip) {
        VerifyCode::IpForbidden
    } else if !effective_scopes.covers(&key.scopes, request.required_scopes) {
        VerifyCode::InsufficientScope
    } else if !key.resource_access().allows(request.resource)
        || !key.team_access().allows(request.resource)
    {
        VerifyCode::ResourceForbidden
    } else {
        VerifyCode::Valid
    }
}

/// The key's own state, whatever the request: deleted → NOT_FOUND, revoked or a
/// rotated-away secret past its grace → REVOKED, expired → EXPIRED, a workspace whose plan
/// forbids keys → PLAN_FORBIDS_KEYS, else VALID. The first
/// checks of [`decide`]; a quota lease is judged by these alone (the holder's cached
/// answers judge the rest).
pub fn status(key: &VerifiableKey, secret_valid_until: Option<Micros>, now: Micros) -> VerifyCode {
    if key.deleted {
        VerifyCode::NotFound
    } else if key.revoked || secret_valid_until.is_some_and(|until| now >= until) {
        VerifyCode::Revoked
    } else if key.expires_at().is_some_and(|e| now >= e) {
        VerifyCode::Expired
    } else if key.plan_forbids_keys {
        VerifyCode::PlanForbidsKeys
    } else {
        VerifyCode::Valid
    }
}

/// When the old secret of a key rotated at `now` with `grace` stops working: at the end of
/// the grace period, never past the key's own expiry, never before `now`.
pub fn rotated_secret_valid_until(
    now: Micros,
    grace: Micros,
    expires_at: Option<Micros>,
) -> Micros {
    let end = now.saturating_add(grace.clamp(0, MAX_ROTATION_GRACE));
    expires_at.map_or(end, |e| end.min(e)).max(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scopes::ScopeImplications;

    const S: Micros = crate::MICROS_PER_SECOND;

    fn record() -> KeyRecord {
        KeyRecord::sample("key_1")
    }

    #[test]
    fn only_an_active_key_can_be_rotated_and_revocation_wins_over_expiry() {
        let active = record();
        assert_eq!(active.check_rotatable(10), Ok(()));
        let expired = KeyRecord {
            expires_at: Some(10),
            ..record()
        };
        assert_eq!(expired.check_rotatable(9), Ok(()));
        let refusal = expired.check_rotatable(10).unwrap_err();
        assert_eq!(refusal.reason, Reason::KeyExpired);
        assert_eq!(refusal.message, "key has expired");
        assert_eq!(refusal.metadata, vec![("key_id", "key_1".to_owned())]);
        let revoked = KeyRecord {
            revoked_at: Some(5),
            ..expired
        };
        for now in [6, 10, 20] {
            let refusal = revoked.check_rotatable(now).unwrap_err();
            assert_eq!(refusal.reason, Reason::KeyRevoked);
            assert_eq!(refusal.message, "key is revoked");
            assert_eq!(refusal.metadata, vec![("key_id", "key_1".to_owned())]);
        }
    }

    #[test]
    fn a_request_is_parsed_once_for_server_and_edge_naming_each_bad_field() {
        let (plain, cost) = Request::parse(&[], "", "", 0).unwrap();
        assert_eq!((plain.resource, plain.client_ip, cost), (None, None, 1));
        let scopes = ["read".to_owned()];
        let (r, cost) = Request::parse(&scopes, "gpt-4o", " 10.0.0.1 ", 7).unwrap();
        assert_eq!(r.resource, Some("gpt-4o"));
        assert_eq!(r.client_ip, Some([10, 0, 0, 1].into()));
        assert_eq!(cost, 7);
        let bad = ["Not A Scope".to_owned()];
        let v = Request::parse(&bad, "two words", "10.0.0.0/8", MAX_COST + 1).unwrap_err();
        let fields: Vec<&str> = v.0.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            fields,
            ["required_scopes[0]", "cost", "resource", "client_ip"]
        );
        // A cost alone, with nothing else named, is checked too.
        let v = Request::parse(&[], "", "", MAX_COST + 1).unwrap_err();
        assert_eq!(v.0[0].field, "cost");
    }

    fn req(scopes: &[String]) -> Request<'_> {
        Request {
            required_scopes: scopes,
            ..Request::default()
        }
    }

    fn check(
        r: &KeyRecord,
        secret_valid_until: Option<Micros>,
        request: &Request<'_>,
        now: Micros,
    ) -> VerifyCode {
        decide(
            &r.clone().into(),
            secret_valid_until,
            &scopes(r),
            request,
            now,
        )
    }

    fn scopes(r: &KeyRecord) -> EffectiveScopes {
        EffectiveScopes::new(&ScopeImplications::default(), &r.scopes)
    }

    #[test]
    fn an_active_key_with_its_scopes_is_valid() {
        let r = record();
        assert_eq!(
            check(&r, None, &req(&["read".into()]), 10),
            VerifyCode::Valid
        );
        assert_eq!(
            check(&r, None, &req(&["write".into()]), 10),
            VerifyCode::InsufficientScope
        );
    }

    /// A plan that forbids keys refuses a key otherwise valid, after the key's own state
    /// (a revoked or expired key says so), before the request's checks.
    #[test]
    fn a_plan_forbidding_keys_refuses_after_the_key_s_own_state() {
        let r = record();
        let mut key = VerifiableKey::from(r.clone());
        key.plan_forbids_keys = true;
        let fx = scopes(&r);
        let write = ["write".to_owned()];
        let wrong_scope = req(&write);
        assert_eq!(
            decide(&key, None, &fx, &wrong_scope, 10),
            VerifyCode::PlanForbidsKeys
        );
        assert_eq!(status(&key, None, 10), VerifyCode::PlanForbidsKeys);
        key.revoked = true;
        assert_eq!(status(&key, None, 10), VerifyCode::Revoked);
        key.revoked = false;
        key.plan_forbids_keys = false;
        assert_eq!(status(&key, None, 10), VerifyCode::Valid);
    }

    #[test]
    fn expiry_is_exclusive_of_the_instant() {
        let mut r = record();
        r.expires_at = Some(100 * S);
        assert_eq!(
            check(&r, None, &Request::default(), 100 * S - 1),
            VerifyCode::Valid
        );
        assert_eq!(
            check(&r, None, &Request::default(), 100 * S),
            VerifyCode::Expired
        );
        assert_eq!(r.status(100 * S), KeyStatus::Expired);
    }

    #[test]
    fn revocation_wins_over_expiry_and_deletion_wins_over_all() {
        let mut r = record();
        r.expires_at = Some(S);
        r.revoked_at = Some(0);
        assert_eq!(
            check(&r, None, &Request::default(), 2 * S),
            VerifyCode::Revoked
        );
        assert_eq!(r.status(2 * S), KeyStatus::Revoked);
        r.deleted_at = Some(3 * S);
        assert_eq!(
            check(&r, None, &Request::default(), 4 * S),
            VerifyCode::NotFound
        );
    }

    #[test]
    fn a_rotated_secret_works_until_its_grace_ends() {
        let r = record();
        assert_eq!(
            check(&r, Some(50 * S), &Request::default(), 49 * S),
            VerifyCode::Valid
        );
        assert_eq!(
            check(&r, Some(50 * S), &Request::default(), 50 * S),
            VerifyCode::Revoked
        );
    }

    #[test]
    fn grace_is_capped_by_expiry_and_by_seven_days() {
        assert_eq!(rotated_secret_valid_until(10, 0, None), 10);
        assert_eq!(rotated_secret_valid_until(10, 5, Some(12)), 12);
        assert_eq!(rotated_secret_valid_until(10, 5, None), 15);
        assert_eq!(
            rotated_secret_valid_until(0, MAX_ROTATION_GRACE * 2, None),
            MAX_ROTATION_GRACE
        );
        assert_eq!(rotated_secret_valid_until(10, 5, Some(3)), 10);
    }
}
