//! The SQL both stores share, and the row types it decodes into.
//!
//! The statements are identical for Postgres and SQLite (both take `$N` parameters, and
//! both have `RETURNING` and row values), so [`impl_store!`] writes the [`Store`]
//! implementation once and each backend instantiates it with its own database type, its
//! own way to begin a write transaction, and its own row lock suffix.
//!
//! [`Store`]: super::Store

use std::collections::BTreeMap;

use crate::domain::event::{EventKind, KeyEvent, split_hashes};
use crate::domain::key::{KeyRecord, KeyStatus, Owner, OwnerKind};
use crate::domain::key_format::{Environment, KeyHash};
use crate::domain::limits;

use super::{AuditOutcome, AuditRecord, FoundSecret, StoreError};

macro_rules! key_columns {
    () => {
        "key_id, workspace_id, name, environment, display, scopes, owner_kind, owner_id, \
         created_by, metadata, created_at, updated_at, expires_at, revoked_at, revoke_reason, \
         rotated_at, deleted_at, rate_limits, max_budget_micros, spent_micros, last_used_at, \
         resource_mode, resource_targets, allowed_cidrs, resource_groups, team_id"
    };
}
pub(crate) use key_columns;

/// A key by a secret's hash: one round trip, two primary-key lookups (the secret by hash,
/// its key by id; the derived table keeps key_secrets' other columns out of the select
/// list). The cache-miss benchmark's floor issues the same statement.
pub(crate) const FIND_SECRET: &str = concat!(
    "SELECT ",
    key_columns!(),
    ", secret_valid_until FROM api_keys JOIN \
     (SELECT key_id, valid_until AS secret_valid_until FROM key_secrets \
      WHERE secret_hash = $1) AS secret USING (key_id)"
);

#[derive(sqlx::FromRow)]
pub(crate) struct KeyRow {
    key_id: String,
    workspace_id: String,
    name: String,
    environment: String,
    display: String,
    scopes: String,
    owner_kind: String,
    owner_id: String,
    created_by: String,
    metadata: String,
    created_at: i64,
    updated_at: i64,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
    revoke_reason: Option<String>,
    rotated_at: Option<i64>,
    deleted_at: Option<i64>,
    rate_limits: String,
    max_budget_micros: Option<i64>,
    spent_micros: i64,
    last_used_at: Option<i64>,
    resource_mode: String,
    resource_targets: String,
    allowed_cidrs: String,
    resource_groups: String,
    team_id: Option<String>,
}

impl TryFrom<KeyRow> for KeyRecord {
    type Error = StoreError;

    fn try_from(r: KeyRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("key {}: {what}", r.key_id));
        let environment =
            Environment::parse(&r.environment).ok_or_else(|| corrupt("environment"))?;
        let owner_kind = OwnerKind::parse(&r.owner_kind).ok_or_else(|| corrupt("owner_kind"))?;
        let metadata: BTreeMap<String, String> =
            serde_json::from_str(&r.metadata).map_err(|_| corrupt("metadata"))?;
        let rate_limits = limits::split(&r.rate_limits).ok_or_else(|| corrupt("rate_limits"))?;
        let max_budget_micros = r
            .max_budget_micros
            .map(u64::try_from)
            .transpose()
            .map_err(|_| corrupt("max_budget_micros"))?;
        let spent_micros = u64::try_from(r.spent_micros).map_err(|_| corrupt("spent_micros"))?;
        let resource_access = crate::domain::access::ResourceAccess {
            mode: crate::domain::access::AccessMode::parse(&r.resource_mode)
                .ok_or_else(|| corrupt("resource_mode"))?,
            targets: r
                .resource_targets
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            groups: r
                .resource_groups
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            group_targets: Default::default(),
        };
        let network = crate::domain::access::NetworkAllowlist::split(&r.allowed_cidrs)
            .ok_or_else(|| corrupt("allowed_cidrs"))?;
        Ok(KeyRecord {
            team_id: r.team_id,
            team_access: Default::default(),
            resource_access,
            network,
            rate_limits,
            max_budget_micros,
            spent_micros,
            last_used_at: r.last_used_at,
            scopes: split_scopes(&r.scopes),
            owner: Owner {
                kind: owner_kind,
                id: r.owner_id,
            },
            environment,
            metadata,
            key_id: r.key_id,
            workspace_id: r.workspace_id,
            name: r.name,
            display: r.display,
            created_by: r.created_by,
            created_at: r.created_at,
            updated_at: r.updated_at,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
            revoke_reason: r.revoke_reason,
            rotated_at: r.rotated_at,
            deleted_at: r.deleted_at,
        })
    }
}

pub(crate) fn join_scopes(scopes: &[String]) -> String {
    scopes.join(" ")
}

fn split_scopes(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

pub(crate) fn metadata_json(m: &BTreeMap<String, String>) -> String {
    // A map of strings always serializes.
    serde_json::to_string(m).unwrap_or_else(|_| "{}".to_owned())
}

pub(crate) fn join_targets(access: &crate::domain::access::ResourceAccess) -> String {
    join_set(&access.targets)
}

pub(crate) fn join_set(set: &std::collections::BTreeSet<String>) -> String {
    set.iter().map(String::as_str).collect::<Vec<_>>().join(" ")
}

#[derive(sqlx::FromRow)]
pub(crate) struct TeamRow {
    workspace_id: String,
    team_id: String,
    name: String,
    policy: String,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<TeamRow> for crate::domain::team::Team {
    type Error = StoreError;

    fn try_from(r: TeamRow) -> Result<Self, StoreError> {
        Ok(crate::domain::team::Team {
            policy: serde_json::from_str(&r.policy)
                .map_err(|_| StoreError::Corrupt(format!("team {}: policy", r.team_id)))?,
            workspace_id: r.workspace_id,
            team_id: r.team_id,
            name: r.name,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct ServiceAccountRow {
    workspace_id: String,
    service_account_id: String,
    team_id: String,
    name: String,
    created_at: i64,
}

impl From<ServiceAccountRow> for crate::domain::team::ServiceAccount {
    fn from(r: ServiceAccountRow) -> Self {
        crate::domain::team::ServiceAccount {
            workspace_id: r.workspace_id,
            service_account_id: r.service_account_id,
            team_id: r.team_id,
            name: r.name,
            created_at: r.created_at,
        }
    }
}

pub(crate) fn policy_json(policy: &crate::domain::team::TeamPolicy) -> String {
    // Plain data always serializes.
    serde_json::to_string(policy).unwrap_or_else(|_| "{}".to_owned())
}

#[derive(sqlx::FromRow)]
pub(crate) struct GroupRow {
    workspace_id: String,
    name: String,
    targets: String,
    created_at: i64,
    updated_at: i64,
}

impl From<GroupRow> for crate::domain::access::AccessGroup {
    fn from(r: GroupRow) -> Self {
        crate::domain::access::AccessGroup {
            targets: r.targets.split_whitespace().map(str::to_owned).collect(),
            workspace_id: r.workspace_id,
            name: r.name,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// The live keys (neither revoked, deleted nor expired at `$4`) of owner `$3` in team `$2`
/// of workspace `$1`: what a team's `max_keys_per_user` caps.
pub(crate) const MEMBER_KEYS: &str = "SELECT count(*) FROM api_keys WHERE workspace_id = $1 \
     AND team_id = $2 AND owner_id = $3 AND deleted_at IS NULL AND revoked_at IS NULL \
     AND (expires_at IS NULL OR expires_at > $4)";

/// The new spend of key row `$row` (`k` on Postgres, `api_keys` on SQLite) in the usage
/// statements, which bind [`MAX_SPEND_MICROS`] as `$2`: the old total plus the delta
/// `d.spend`, saturated at the ceiling. No operation in it can overflow BIGINT (the sum is
/// taken only when it stays under the ceiling, and the delta is at most the ceiling), so
/// no replica's figures can make the statement fail. A total already above the ceiling
/// (stored before there was one) is kept: spend never goes down. The cast matters on
/// SQLite only, whose overflowing sums (before the ceiling) were stored as REAL: it turns
/// such a total back into the largest integer, which the statement's RETURNING (and every
/// read of the key) can decode; a decoding error there would come after the statement
/// committed, and have the usage book write the whole batch again.
///
/// [`MAX_SPEND_MICROS`]: crate::domain::limits::MAX_SPEND_MICROS
macro_rules! saturated_spend {
    ($row:literal) => {
        concat!(
            "CASE WHEN ",
            $row,
            ".spent_micros >= $2 THEN CAST(",
            $row,
            ".spent_micros AS BIGINT) WHEN d.spend > $2 - ",
            $row,
            ".spent_micros THEN $2 ELSE ",
            $row,
            ".spent_micros + d.spend END"
        )
    };
}
pub(crate) use saturated_spend;

/// The ceiling the usage statements bind as `$2`.
pub(crate) fn spend_ceiling() -> i64 {
    budget_column(Some(crate::domain::limits::MAX_SPEND_MICROS)).unwrap_or(i64::MAX)
}

/// A usage batch as the JSON array the usage statements unpack:
/// `[[key_id, spend, last_used_at, 0|1], ...]` (spend capped at the ceiling: more could
/// not be stored anyway).
pub(crate) fn usage_json(batch: &[super::UsageDelta]) -> String {
    let rows: Vec<serde_json::Value> = batch
        .iter()
        .map(|d| {
            serde_json::json!([
                d.key_id,
                budget_column(Some(d.spend_micros)).map_or(0, |s| s.min(spend_ceiling())),
                d.last_used_at.unwrap_or(0),
                i64::from(d.last_used_at.is_some()),
            ])
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
}

/// A budget or spend as the signed BIGINT both stores hold (validated to fit).
pub(crate) fn budget_column(v: Option<u64>) -> Option<i64> {
    v.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// The status filter as the integer the list query switches on.
pub(crate) fn status_code(status: Option<KeyStatus>) -> i64 {
    match status {
        None => 0,
        Some(KeyStatus::Active) => 1,
        Some(KeyStatus::Revoked) => 2,
        Some(KeyStatus::Expired) => 3,
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct FoundRow {
    #[sqlx(flatten)]
    key: KeyRow,
    secret_valid_until: Option<i64>,
}

impl TryFrom<FoundRow> for FoundSecret {
    type Error = StoreError;

    fn try_from(r: FoundRow) -> Result<Self, StoreError> {
        Ok(FoundSecret {
            key: r.key.try_into()?,
            valid_until: r.secret_valid_until,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct SecretRow {
    pub secret_hash: Vec<u8>,
}

pub(crate) fn hashes(rows: Vec<SecretRow>) -> Result<Vec<KeyHash>, StoreError> {
    rows.into_iter()
        .map(|r| {
            KeyHash::from_slice(&r.secret_hash)
                .ok_or_else(|| StoreError::Corrupt("secret hash is not 32 bytes".to_owned()))
        })
        .collect()
}

#[derive(sqlx::FromRow)]
pub(crate) struct EventRow {
    seq: i64,
    kind: String,
    key_id: String,
    workspace_id: String,
    key_hash: Vec<u8>,
    stale_hashes: String,
    occurred_at: i64,
}

impl TryFrom<EventRow> for KeyEvent {
    type Error = StoreError;

    fn try_from(r: EventRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("event {}: {what}", r.seq));
        Ok(KeyEvent {
            kind: EventKind::parse(&r.kind).ok_or_else(|| corrupt("kind"))?,
            key_hash: KeyHash::from_slice(&r.key_hash).ok_or_else(|| corrupt("key_hash"))?,
            stale_hashes: split_hashes(&r.stale_hashes).ok_or_else(|| corrupt("stale_hashes"))?,
            seq: r.seq,
            key_id: r.key_id,
            workspace_id: r.workspace_id,
            occurred_at: r.occurred_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct ProviderKeyRow {
    record_id: String,
    workspace_id: String,
    provider: String,
    last_four: String,
    kek_version: i64,
    wrapped_dek: Vec<u8>,
    ciphertext: Vec<u8>,
    created_at: i64,
    updated_at: i64,
}

macro_rules! provider_key_columns {
    () => {
        "record_id, workspace_id, provider, last_four, kek_version, wrapped_dek, ciphertext, \
         created_at, updated_at"
    };
}
pub(crate) use provider_key_columns;

impl TryFrom<ProviderKeyRow> for crate::domain::provider_key::ProviderKeyRecord {
    type Error = StoreError;

    fn try_from(r: ProviderKeyRow) -> Result<Self, StoreError> {
        let corrupt =
            |what: &str| StoreError::Corrupt(format!("provider key {}: {what}", r.record_id));
        Ok(crate::domain::provider_key::ProviderKeyRecord {
            provider: crate::domain::provider_key::Provider::parse(&r.provider)
                .ok_or_else(|| corrupt("provider"))?,
            kek_version: u32::try_from(r.kek_version).map_err(|_| corrupt("kek_version"))?,
            record_id: r.record_id,
            workspace_id: r.workspace_id,
            last_four: r.last_four,
            wrapped_dek: r.wrapped_dek,
            ciphertext: r.ciphertext,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct WorkspaceRow {
    workspace_id: String,
    name: String,
    plan: String,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<WorkspaceRow> for crate::domain::workspace::Workspace {
    type Error = StoreError;

    fn try_from(r: WorkspaceRow) -> Result<Self, StoreError> {
        Ok(crate::domain::workspace::Workspace {
            plan: crate::domain::workspace::Plan::parse(&r.plan).ok_or_else(|| {
                StoreError::Corrupt(format!("workspace {}: plan", r.workspace_id))
            })?,
            workspace_id: r.workspace_id,
            name: r.name,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct AuditRow {
    id: i64,
    workspace_id: String,
    actor_id: String,
    caller: String,
    action: String,
    key_id: Option<String>,
    outcome: String,
    detail: String,
    occurred_at: i64,
}

impl TryFrom<AuditRow> for AuditRecord {
    type Error = StoreError;

    fn try_from(r: AuditRow) -> Result<Self, StoreError> {
        let outcome = match r.outcome.as_str() {
            "success" => AuditOutcome::Success,
            "denied" => AuditOutcome::Denied,
            _ => {
                return Err(StoreError::Corrupt(format!(
                    "audit event {}: outcome",
                    r.id
                )));
            }
        };
        Ok(AuditRecord {
            id: r.id,
            workspace_id: r.workspace_id,
            actor_id: r.actor_id,
            caller: r.caller,
            action: r.action,
            key_id: r.key_id,
            outcome,
            detail: r.detail,
            occurred_at: r.occurred_at,
        })
    }
}

/// Implements [`super::Store`] for `$store`, which must have a `pool: sqlx::Pool<$db>`
/// field and an `async fn begin_write(&self) -> Result<sqlx::Transaction<'static, $db>,
/// sqlx::Error>` method. `$usage_sql` writes a usage batch (the JSON of [`usage_json`] as
/// `$1`, the spend ceiling as `$2`, the new spend computed by [`saturated_spend!`])
/// returning `(key_id, spent_micros)` per key found. `$lock` is appended to the statement that reads the key row
/// a mutation changes (`" FOR UPDATE"` on Postgres; SQLite's write transactions are
/// exclusive already), `$share` to the one that reads the access groups a mutation
/// names (`" FOR SHARE"` on Postgres: they must not be deleted before it commits).
/// `$notify` is a statement run in every transaction that appends an
/// event (Postgres: `pg_notify`, delivered at commit), or `""` for none.
macro_rules! impl_store {
    ($store:ty, $db:ty, $lock:literal, $share:literal, $notify:literal, $usage_sql:expr $(, $extra:item)*) => {
        impl $store {
            async fn locked_key(
                tx: &mut sqlx::Transaction<'static, $db>,
                key_id: &str,
            ) -> Result<crate::domain::key::KeyRecord, crate::store::StoreError> {
                let row: Option<crate::store::sql::KeyRow> = sqlx::query_as(concat!(
                    "SELECT ",
                    crate::store::sql::key_columns!(),
                    " FROM api_keys WHERE key_id = $1 AND deleted_at IS NULL",
                    $lock
                ))
                .bind(key_id)
                .fetch_optional(&mut **tx)
                .await?;
                row.ok_or(crate::store::StoreError::NotFound)?.try_into()
            }

            async fn secret_hashes(
                tx: &mut sqlx::Transaction<'static, $db>,
                key_id: &str,
            ) -> Result<Vec<crate::domain::key_format::KeyHash>, crate::store::StoreError> {
                let rows: Vec<crate::store::sql::SecretRow> = sqlx::query_as(
                    "SELECT secret_hash FROM key_secrets WHERE key_id = $1",
                )
                .bind(key_id)
                .fetch_all(&mut **tx)
                .await?;
                crate::store::sql::hashes(rows)
            }

            async fn write_audit(
                tx: &mut sqlx::Transaction<'static, $db>,
                workspace_id: &str,
                key_id: Option<&str>,
                outcome: crate::store::AuditOutcome,
                ctx: &crate::store::AuditContext,
                at: i64,
            ) -> Result<(), crate::store::StoreError> {
                sqlx::query(
                    "INSERT INTO audit_events (workspace_id, actor_id, caller, action, key_id, \
                     outcome, detail, occurred_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(workspace_id)
                .bind(&ctx.actor_id)
                .bind(&ctx.caller)
                .bind(ctx.action)
                .bind(key_id)
                .bind(outcome.as_str())
                .bind(&ctx.detail)
                .bind(at)
                .execute(&mut **tx)
                .await?;
                Ok(())
            }

            /// The hash of the key's current secret (the one without an end).
            async fn current_hash(
                tx: &mut sqlx::Transaction<'static, $db>,
                key_id: &str,
            ) -> Result<crate::domain::key_format::KeyHash, crate::store::StoreError> {
                let row: crate::store::sql::SecretRow = sqlx::query_as(
                    "SELECT secret_hash FROM key_secrets WHERE key_id = $1 AND valid_until IS NULL",
                )
                .bind(key_id)
                .fetch_one(&mut **tx)
                .await?;
                crate::store::sql::hashes(vec![row])?
                    .pop()
                    .ok_or_else(|| crate::store::StoreError::Corrupt("no current secret".into()))
            }

            /// Appends an `updated` event for each key (their reach changed without the
            /// rows changing), so every replica reloads them; returns their secret hashes.
            async fn reload_keys(
                tx: &mut sqlx::Transaction<'static, $db>,
                rows: Vec<crate::store::sql::KeyRow>,
                now: i64,
            ) -> Result<Vec<crate::domain::key_format::KeyHash>, crate::store::StoreError> {
                let mut stale = Vec::new();
                for row in rows {
                    let key: crate::domain::key::KeyRecord = row.try_into()?;
                    let hashes = Self::secret_hashes(tx, &key.key_id).await?;
                    let current = Self::current_hash(tx, &key.key_id).await?;
                    Self::append_event(
                        tx,
                        crate::domain::event::EventKind::Updated,
                        &key,
                        &current,
                        &hashes,
                        now,
                    )
                    .await?;
                    stale.extend(hashes);
                }
                Ok(stale)
            }

            /// Every access group `groups` names must exist in the workspace, checked in the
            /// mutation's own transaction. On Postgres each group row stays share-locked until
            /// commit, so a concurrent `delete_group` either waits for this transaction (and
            /// then sees the key or team naming the group) or this one waits for the delete
            /// (and then finds the group gone): never a reach naming a deleted group.
            async fn lock_groups(
                tx: &mut sqlx::Transaction<'static, $db>,
                workspace_id: &str,
                groups: &std::collections::BTreeSet<String>,
            ) -> Result<(), crate::store::StoreError> {
                let mut missing = Vec::new();
                for name in groups {
                    let found: Option<String> = sqlx::query_scalar(concat!(
                        "SELECT name FROM access_groups WHERE workspace_id = $1 AND name = $2",
                        $share
                    ))
                    .bind(workspace_id)
                    .bind(name)
                    .fetch_optional(&mut **tx)
                    .await?;
                    if found.is_none() {
                        missing.push(name.as_str());
                    }
                }
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(crate::store::StoreError::Precondition(
                        crate::domain::access::groups_missing(workspace_id, &missing),
                    ))
                }
            }

            /// The teams of a workspace whose reach names access group `name`.
            async fn teams_naming_group(
                tx: &mut sqlx::Transaction<'static, $db>,
                workspace_id: &str,
                name: &str,
            ) -> Result<Vec<String>, crate::store::StoreError> {
                let rows: Vec<crate::store::sql::TeamRow> = sqlx::query_as(
                    "SELECT workspace_id, team_id, name, policy, created_at, updated_at FROM teams \
                     WHERE workspace_id = $1 ORDER BY team_id",
                )
                .bind(workspace_id)
                .fetch_all(&mut **tx)
                .await?;
                let mut named = Vec::new();
                for row in rows {
                    let team: crate::domain::team::Team = row.try_into()?;
                    if team.policy.resource_access.groups.contains(name) {
                        named.push(team.team_id);
                    }
                }
                Ok(named)
            }

            /// Appends an event to the log, taking the next seq from the `event_log` row:
            /// its lock is held until commit, so seq order is commit order.
            async fn append_event(
                tx: &mut sqlx::Transaction<'static, $db>,
                kind: crate::domain::event::EventKind,
                key: &crate::domain::key::KeyRecord,
                key_hash: &crate::domain::key_format::KeyHash,
                stale: &[crate::domain::key_format::KeyHash],
                now: i64,
            ) -> Result<i64, crate::store::StoreError> {
                let seq: i64 = sqlx::query_scalar(
                    "UPDATE event_log SET head = head + 1 WHERE id = 1 RETURNING head",
                )
                .fetch_one(&mut **tx)
                .await?;
                sqlx::query(
                    "INSERT INTO key_events (seq, kind, key_id, workspace_id, key_hash, \
                     stale_hashes, occurred_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(seq)
                .bind(kind.as_str())
                .bind(&key.key_id)
                .bind(&key.workspace_id)
                .bind(&key_hash.as_bytes()[..])
                .bind(crate::domain::event::join_hashes(stale))
                .bind(now)
                .execute(&mut **tx)
                .await?;
                if !$notify.is_empty() {
                    sqlx::query($notify).execute(&mut **tx).await?;
                }
                Ok(seq)
            }

            /// Records a successful mutation's event (if any) and audit row, and commits,
            /// returning what changed.
            async fn finish(
                mut tx: sqlx::Transaction<'static, $db>,
                key: crate::domain::key::KeyRecord,
                ctx: &crate::store::AuditContext,
                now: i64,
                event: Option<(crate::domain::event::EventKind, crate::domain::key_format::KeyHash)>,
            ) -> Result<crate::store::Changed, crate::store::StoreError> {
                let stale_hashes = Self::secret_hashes(&mut tx, &key.key_id).await?;
                if let Some((kind, hash)) = event {
                    Self::append_event(&mut tx, kind, &key, &hash, &stale_hashes, now).await?;
                }
                Self::write_audit(
                    &mut tx,
                    &key.workspace_id,
                    Some(&key.key_id),
                    crate::store::AuditOutcome::Success,
                    ctx,
                    now,
                )
                .await?;
                tx.commit().await?;
                Ok(crate::store::Changed { key, stale_hashes })
            }
        }

        #[async_trait::async_trait]
        impl crate::store::Store for $store {
            fn pool_stats(&self) -> crate::store::PoolStats {
                crate::store::PoolStats {
                    open: self.pool.size(),
                    idle: u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
                    max: self.pool.options().get_max_connections(),
                }
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn insert_key(
                &self,
                key: &crate::domain::key::KeyRecord,
                secret: &crate::domain::key_format::KeyHash,
                member: Option<&crate::domain::team::SelfServiceKey<'_>>,
                audit: &crate::store::AuditContext,
            ) -> Result<(), crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                if let Some(team_id) = &key.team_id {
                    // The team row's lock (the first lock taken, as `update_team` takes it)
                    // serializes a team's member issues: the count below sees every key a
                    // concurrent issue committed before it, and the policy is the one in
                    // force when the key is written.
                    let team: Option<crate::store::sql::TeamRow> = sqlx::query_as(concat!(
                        "SELECT workspace_id, team_id, name, policy, created_at, updated_at \
                         FROM teams WHERE workspace_id = $1 AND team_id = $2",
                        $lock
                    ))
                    .bind(&key.workspace_id)
                    .bind(team_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let team: crate::domain::team::Team =
                        team.ok_or(crate::store::StoreError::NotFound)?.try_into()?;
                    let held: i64 = match member {
                        Some(_) => {
                            sqlx::query_scalar(crate::store::sql::MEMBER_KEYS)
                                .bind(&key.workspace_id)
                                .bind(team_id)
                                .bind(&key.owner.id)
                                .bind(key.created_at)
                                .fetch_one(&mut *tx)
                                .await?
                        }
                        None => 0,
                    };
                    // A key owned by a service account: the account's team. Its row stays
                    // share-locked until commit, so it cannot be deleted in between
                    // (`delete_service_account` deletes, then looks for keys the account
                    // owns).
                    let account_team: Option<String> =
                        if key.owner.kind == crate::domain::key::OwnerKind::ServiceAccount {
                            sqlx::query_scalar(concat!(
                                "SELECT team_id FROM service_accounts \
                                 WHERE workspace_id = $1 AND service_account_id = $2",
                                $share
                            ))
                            .bind(&key.workspace_id)
                            .bind(&key.owner.id)
                            .fetch_optional(&mut *tx)
                            .await?
                        } else {
                            None
                        };
                    let issue = crate::domain::team::TeamIssue {
                        team_id,
                        policy: &team.policy,
                        held: u64::try_from(held).unwrap_or(0),
                        service_account_team: account_team.as_deref(),
                    };
                    if let Err(refusal) = crate::domain::team::check_team_issue(
                        &issue,
                        &key.owner,
                        member,
                        key.created_at,
                    ) {
                        let denied = crate::store::AuditContext {
                            detail: refusal.message.clone(),
                            ..audit.clone()
                        };
                        Self::write_audit(
                            &mut tx,
                            &key.workspace_id,
                            None,
                            crate::store::AuditOutcome::Denied,
                            &denied,
                            key.created_at,
                        )
                        .await?;
                        tx.commit().await?;
                        return Err(crate::store::StoreError::Precondition(refusal));
                    }
                }
                Self::lock_groups(&mut tx, &key.workspace_id, &key.resource_access.groups).await?;
                sqlx::query(concat!(
                    "INSERT INTO api_keys (",
                    crate::store::sql::key_columns!(),
                    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
                     $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26)"
                ))
                .bind(&key.key_id)
                .bind(&key.workspace_id)
                .bind(&key.name)
                .bind(key.environment.as_str())
                .bind(&key.display)
                .bind(crate::store::sql::join_scopes(&key.scopes))
                .bind(key.owner.kind.as_str())
                .bind(&key.owner.id)
                .bind(&key.created_by)
                .bind(crate::store::sql::metadata_json(&key.metadata))
                .bind(key.created_at)
                .bind(key.updated_at)
                .bind(key.expires_at)
                .bind(key.revoked_at)
                .bind(&key.revoke_reason)
                .bind(key.rotated_at)
                .bind(key.deleted_at)
                .bind(crate::domain::limits::join(&key.rate_limits))
                .bind(crate::store::sql::budget_column(key.max_budget_micros))
                .bind(crate::store::sql::budget_column(Some(key.spent_micros)).unwrap_or(0))
                .bind(key.last_used_at)
                .bind(key.resource_access.mode.as_str())
                .bind(crate::store::sql::join_targets(&key.resource_access))
                .bind(key.network.join())
                .bind(crate::store::sql::join_set(&key.resource_access.groups))
                .bind(&key.team_id)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO key_secrets (secret_hash, key_id, created_at, valid_until) \
                     VALUES ($1, $2, $3, NULL)",
                )
                .bind(&secret.as_bytes()[..])
                .bind(&key.key_id)
                .bind(key.created_at)
                .execute(&mut *tx)
                .await?;
                Self::write_audit(
                    &mut tx,
                    &key.workspace_id,
                    Some(&key.key_id),
                    crate::store::AuditOutcome::Success,
                    audit,
                    key.created_at,
                )
                .await?;
                tx.commit().await?;
                Ok(())
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn get_key(
                &self,
                key_id: &str,
            ) -> Result<Option<crate::domain::key::KeyRecord>, crate::store::StoreError> {
                let row: Option<crate::store::sql::KeyRow> = sqlx::query_as(concat!(
                    "SELECT ",
                    crate::store::sql::key_columns!(),
                    " FROM api_keys WHERE key_id = $1 AND deleted_at IS NULL"
                ))
                .bind(key_id)
                .fetch_optional(&self.pool)
                .await?;
                row.map(TryInto::try_into).transpose()
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn list_keys(
                &self,
                filter: &crate::store::KeyFilter,
                limit: u32,
                after: Option<&crate::store::KeyCursor>,
            ) -> Result<Vec<crate::domain::key::KeyRecord>, crate::store::StoreError> {
                let rows: Vec<crate::store::sql::KeyRow> = sqlx::query_as(concat!(
                    "SELECT ",
                    crate::store::sql::key_columns!(),
                    " FROM api_keys WHERE workspace_id = $1 AND deleted_at IS NULL \
                     AND ($2 = '' OR (owner_kind = $2 AND owner_id = $3)) \
                     AND ($4 = 0 \
                          OR ($4 = 1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $5)) \
                          OR ($4 = 2 AND revoked_at IS NOT NULL) \
                          OR ($4 = 3 AND revoked_at IS NULL AND expires_at <= $5)) \
                     AND ($6 = 0 OR created_at < $7 OR (created_at = $7 AND key_id < $8)) \
                     AND ($10 = 0 OR last_used_at IS NULL OR last_used_at < $11) \
                     ORDER BY created_at DESC, key_id DESC LIMIT $9"
                ))
                .bind(&filter.workspace_id)
                .bind(filter.owner.as_ref().map_or("", |o| o.kind.as_str()))
                .bind(filter.owner.as_ref().map_or("", |o| o.id.as_str()))
                .bind(crate::store::sql::status_code(filter.status))
                .bind(filter.now)
                .bind(i64::from(after.is_some()))
                .bind(after.map_or(0, |c| c.created_at))
                .bind(after.map_or("", |c| c.key_id.as_str()))
                .bind(i64::from(limit))
                .bind(i64::from(filter.unused_since.is_some()))
                .bind(filter.unused_since.unwrap_or(0))
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn find_secret(
                &self,
                hash: &crate::domain::key_format::KeyHash,
            ) -> Result<Option<crate::store::FoundSecret>, crate::store::StoreError> {
                let row: Option<crate::store::sql::FoundRow> =
                    sqlx::query_as(crate::store::sql::FIND_SECRET)
                .bind(&hash.as_bytes()[..])
                .fetch_optional(&self.pool)
                .await?;
                row.map(TryInto::try_into).transpose()
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn update_key(
                &self,
                key_id: &str,
                patch: &crate::store::KeyPatch,
                now: i64,
                audit: &crate::store::AuditContext,
            ) -> Result<crate::store::Changed, crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                // The groups before the key row, the order `update_group` takes them in (its
                // group, then the keys naming it): the other order deadlocks against it. A
                // key's workspace never changes, so reading it unlocked is safe. A reach that
                // names no group has nothing to lock, and no reason for the read.
                if let Some(access) = patch
                    .resource_access
                    .as_ref()
                    .filter(|a| !a.groups.is_empty())
                {
                    let workspace_id: Option<String> =
                        sqlx::query_scalar("SELECT workspace_id FROM api_keys WHERE key_id = $1")
                            .bind(key_id)
                            .fetch_optional(&mut *tx)
                            .await?;
                    if let Some(workspace_id) = workspace_id {
                        Self::lock_groups(&mut tx, &workspace_id, &access.groups).await?;
                    }
                }
                let mut key = Self::locked_key(&mut tx, key_id).await?;
                if let Some(name) = &patch.name {
                    key.name = name.clone();
                }
                if let Some(scopes) = &patch.scopes {
                    key.scopes = scopes.clone();
                }
                if let Some(expires_at) = patch.expires_at {
                    key.expires_at = expires_at;
                }
                if let Some(metadata) = &patch.metadata {
                    key.metadata = metadata.clone();
                }
                if let Some(rate_limits) = &patch.rate_limits {
                    key.rate_limits = rate_limits.clone();
                }
                if let Some(budget) = patch.max_budget_micros {
                    key.max_budget_micros = budget;
                }
                if let Some(access) = &patch.resource_access {
                    key.resource_access = access.clone();
                }
                if let Some(network) = &patch.network {
                    key.network = network.clone();
                }
                key.updated_at = now;
                sqlx::query(
                    "UPDATE api_keys SET name = $2, scopes = $3, expires_at = $4, metadata = $5, \
                     updated_at = $6, rate_limits = $7, max_budget_micros = $8, resource_mode = $9, \
                     resource_targets = $10, allowed_cidrs = $11, resource_groups = $12 \
                     WHERE key_id = $1",
                )
                .bind(key_id)
                .bind(&key.name)
                .bind(crate::store::sql::join_scopes(&key.scopes))
                .bind(key.expires_at)
                .bind(crate::store::sql::metadata_json(&key.metadata))
                .bind(now)
                .bind(crate::domain::limits::join(&key.rate_limits))
                .bind(crate::store::sql::budget_column(key.max_budget_micros))
                .bind(key.resource_access.mode.as_str())
                .bind(crate::store::sql::join_targets(&key.resource_access))
                .bind(key.network.join())
                .bind(crate::store::sql::join_set(&key.resource_access.groups))
                .execute(&mut *tx)
                .await?;
                let current = Self::current_hash(&mut tx, key_id).await?;
                let event = Some((crate::domain::event::EventKind::Updated, current));
                Self::finish(tx, key, audit, now, event).await
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn rotate_key(
                &self,
                key_id: &str,
                new_secret: &crate::domain::key_format::KeyHash,
                new_display: &str,
                grace: i64,
                now: i64,
                audit: &crate::store::AuditContext,
            ) -> Result<crate::store::Rotated, crate::store::StoreError> {
                use crate::domain::key::KeyStatus;
                let mut tx = self.begin_write().await?;
                let mut key = Self::locked_key(&mut tx, key_id).await?;
                match key.status(now) {
                    KeyStatus::Revoked => {
                        return Err(crate::store::StoreError::Precondition(
                            crate::domain::refusal::Refusal::new(
                                crate::domain::refusal::Reason::KeyRevoked,
                                "key is revoked",
                            )
                            .with("key_id", key_id),
                        ));
                    }
                    KeyStatus::Expired => {
                        return Err(crate::store::StoreError::Precondition(
                            crate::domain::refusal::Refusal::new(
                                crate::domain::refusal::Reason::KeyExpired,
                                "key has expired",
                            )
                            .with("key_id", key_id),
                        ));
                    }
                    KeyStatus::Active => {}
                }
                let old = Self::current_hash(&mut tx, key_id).await?;
                let until =
                    crate::domain::key::rotated_secret_valid_until(now, grace, key.expires_at);
                // Every older secret stops at `until` at the latest; one already ending
                // sooner (an earlier rotation's grace) keeps its earlier end.
                sqlx::query(
                    "UPDATE key_secrets SET valid_until = $2 WHERE key_id = $1 \
                     AND (valid_until IS NULL OR valid_until > $2)",
                )
                .bind(key_id)
                .bind(until)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO key_secrets (secret_hash, key_id, created_at, valid_until) \
                     VALUES ($1, $2, $3, NULL)",
                )
                .bind(&new_secret.as_bytes()[..])
                .bind(key_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                key.rotated_at = Some(now);
                key.updated_at = now;
                key.display = new_display.to_owned();
                sqlx::query(
                    "UPDATE api_keys SET rotated_at = $2, updated_at = $2, display = $3 \
                     WHERE key_id = $1",
                )
                .bind(key_id)
                .bind(now)
                .bind(&key.display)
                .execute(&mut *tx)
                .await?;
                let event = Some((crate::domain::event::EventKind::Rotated, old));
                let changed = Self::finish(tx, key, audit, now, event).await?;
                Ok(crate::store::Rotated {
                    key: changed.key,
                    old_secret_valid_until: until,
                    stale_hashes: changed
                        .stale_hashes
                        .into_iter()
                        .filter(|h| h != new_secret)
                        .collect(),
                })
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn revoke_key(
                &self,
                key_id: &str,
                reason: &str,
                now: i64,
                audit: &crate::store::AuditContext,
            ) -> Result<crate::store::Changed, crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                let mut key = Self::locked_key(&mut tx, key_id).await?;
                let mut event = None;
                if key.revoked_at.is_none() {
                    let current = Self::current_hash(&mut tx, key_id).await?;
                    event = Some((crate::domain::event::EventKind::Revoked, current));
                    key.revoked_at = Some(now);
                    key.revoke_reason = Some(reason.to_owned());
                    key.updated_at = now;
                    sqlx::query(
                        "UPDATE api_keys SET revoked_at = $2, revoke_reason = $3, updated_at = $2 \
                         WHERE key_id = $1",
                    )
                    .bind(key_id)
                    .bind(now)
                    .bind(reason)
                    .execute(&mut *tx)
                    .await?;
                }
                Self::finish(tx, key, audit, now, event).await
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn delete_key(
                &self,
                key_id: &str,
                now: i64,
                audit: &crate::store::AuditContext,
            ) -> Result<crate::store::Changed, crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                let mut key = Self::locked_key(&mut tx, key_id).await?;
                key.deleted_at = Some(now);
                key.updated_at = now;
                sqlx::query("UPDATE api_keys SET deleted_at = $2, updated_at = $2 WHERE key_id = $1")
                    .bind(key_id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                let current = Self::current_hash(&mut tx, key_id).await?;
                let event = Some((crate::domain::event::EventKind::Deleted, current));
                Self::finish(tx, key, audit, now, event).await
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn record_denied(
                &self,
                denied: &crate::store::DeniedAudit,
            ) -> Result<(), crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                Self::write_audit(
                    &mut tx,
                    &denied.workspace_id,
                    denied.key_id.as_deref(),
                    crate::store::AuditOutcome::Denied,
                    &denied.context,
                    denied.occurred_at,
                )
                .await?;
                tx.commit().await?;
                Ok(())
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn list_audit(
                &self,
                workspace_id: &str,
                limit: u32,
                before_id: Option<i64>,
            ) -> Result<Vec<crate::store::AuditRecord>, crate::store::StoreError> {
                let rows: Vec<crate::store::sql::AuditRow> = sqlx::query_as(
                    "SELECT id, workspace_id, actor_id, caller, action, key_id, outcome, detail, \
                     occurred_at FROM audit_events WHERE workspace_id = $1 AND id < $2 \
                     ORDER BY id DESC LIMIT $3",
                )
                .bind(workspace_id)
                .bind(before_id.unwrap_or(i64::MAX))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn read_events(
                &self,
                after_seq: i64,
                limit: u32,
            ) -> Result<Vec<crate::domain::event::KeyEvent>, crate::store::StoreError> {
                let rows: Vec<crate::store::sql::EventRow> = sqlx::query_as(
                    "SELECT seq, kind, key_id, workspace_id, key_hash, stale_hashes, occurred_at \
                     FROM key_events WHERE seq > $1 ORDER BY seq LIMIT $2",
                )
                .bind(after_seq)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn event_bounds(
                &self,
            ) -> Result<crate::domain::event::EventBounds, crate::store::StoreError> {
                let (head, pruned_through): (i64, i64) =
                    sqlx::query_as("SELECT head, pruned_through FROM event_log WHERE id = 1")
                        .fetch_one(&self.pool)
                        .await?;
                Ok(crate::domain::event::EventBounds {
                    head,
                    pruned_through,
                })
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn prune_events(&self, older_than: i64) -> Result<u64, crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                // Everything below the first event inside the window, and nothing else:
                // an event newer than the window survives even if an older clock wrote it.
                let (head,): (i64,) =
                    sqlx::query_as(concat!("SELECT head FROM event_log WHERE id = 1", $lock))
                        .fetch_one(&mut *tx)
                        .await?;
                let first_kept: Option<i64> =
                    sqlx::query_scalar("SELECT MIN(seq) FROM key_events WHERE occurred_at >= $1")
                        .bind(older_than)
                        .fetch_one(&mut *tx)
                        .await?;
                let through = first_kept.map_or(head, |s| s - 1);
                let deleted = sqlx::query("DELETE FROM key_events WHERE seq <= $1")
                    .bind(through)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                sqlx::query(
                    "UPDATE event_log SET pruned_through = $1 WHERE id = 1 AND pruned_through < $1",
                )
                .bind(through)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(deleted)
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn announce_grace_ends(
                &self,
                now: i64,
                limit: u32,
            ) -> Result<usize, crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                let ended: Vec<(Vec<u8>, String)> = sqlx::query_as(
                    "SELECT secret_hash, key_id FROM key_secrets WHERE valid_until IS NOT NULL \
                     AND valid_until <= $1 AND end_announced = 0 ORDER BY valid_until LIMIT $2",
                )
                .bind(now)
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?;
                let mut announced = 0;
                for (hash, key_id) in ended {
                    // Another replica may have announced it since the read: claim it first.
                    let claimed = sqlx::query(
                        "UPDATE key_secrets SET end_announced = 1 \
                         WHERE secret_hash = $1 AND end_announced = 0",
                    )
                    .bind(&hash)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    let row: Option<crate::store::sql::KeyRow> = sqlx::query_as(concat!(
                        "SELECT ",
                        crate::store::sql::key_columns!(),
                        " FROM api_keys WHERE key_id = $1"
                    ))
                    .bind(&key_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let (Some(row), 1) = (row, claimed) else { continue };
                    let key: crate::domain::key::KeyRecord = row.try_into()?;
                    let hash = crate::store::sql::hashes(vec![crate::store::sql::SecretRow {
                        secret_hash: hash,
                    }])?;
                    let kind = crate::domain::event::EventKind::Rotated;
                    Self::append_event(&mut tx, kind, &key, &hash[0], &hash, now).await?;
                    announced += 1;
                }
                tx.commit().await?;
                Ok(announced)
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn record_usage(
                &self,
                batch: &[crate::store::UsageDelta],
            ) -> Result<Vec<(String, u64)>, crate::store::StoreError> {
                // Usage is telemetry, not a principal's mutation: no audit row, no event.
                // One statement, whatever the number of keys (the batch is a JSON array of
                // [key_id, spend, last use, has a last use]), so it commits whole or not at
                // all: the usage book settles what it wrote only when this returns.
                if batch.is_empty() {
                    return Ok(Vec::new());
                }
                let rows: Vec<(String, i64)> = sqlx::query_as($usage_sql)
                    .bind(crate::store::sql::usage_json(batch))
                    .bind(crate::store::sql::spend_ceiling())
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows
                    .into_iter()
                    .map(|(key_id, spent)| (key_id, u64::try_from(spent).unwrap_or(0)))
                    .collect())
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn insert_workspace(
                &self,
                workspace: &crate::domain::workspace::Workspace,
                audit: &crate::store::AuditContext,
            ) -> Result<(), crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                let inserted = sqlx::query(
                    "INSERT INTO workspaces (workspace_id, name, plan, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $4) ON CONFLICT (workspace_id) DO NOTHING",
                )
                .bind(&workspace.workspace_id)
                .bind(&workspace.name)
                .bind(workspace.plan.as_str())
                .bind(workspace.created_at)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 0 {
                    return Err(crate::store::StoreError::AlreadyExists);
                }
                Self::write_audit(
                    &mut tx,
                    &workspace.workspace_id,
                    None,
                    crate::store::AuditOutcome::Success,
                    audit,
                    workspace.created_at,
                )
                .await?;
                tx.commit().await?;
                Ok(())
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn get_workspace(
                &self,
                workspace_id: &str,
            ) -> Result<Option<crate::domain::workspace::Workspace>, crate::store::StoreError> {
                let row: Option<crate::store::sql::WorkspaceRow> = sqlx::query_as(
                    "SELECT workspace_id, name, plan, created_at, updated_at FROM workspaces \
                     WHERE workspace_id = $1",
                )
                .bind(workspace_id)
                .fetch_optional(&self.pool)
                .await?;
                row.map(TryInto::try_into).transpose()
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn update_workspace(
                &self,
                workspace_id: &str,
                patch: &crate::store::WorkspacePatch,
                now: i64,
                audit: &crate::store::AuditContext,
            ) -> Result<crate::domain::workspace::Workspace, crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                let row: Option<crate::store::sql::WorkspaceRow> = sqlx::query_as(concat!(
                    "SELECT workspace_id, name, plan, created_at, updated_at FROM workspaces \
                     WHERE workspace_id = $1",
                    $lock
                ))
                .bind(workspace_id)
                .fetch_optional(&mut *tx)
                .await?;
                let mut workspace: crate::domain::workspace::Workspace =
                    row.ok_or(crate::store::StoreError::NotFound)?.try_into()?;
                if let Some(name) = &patch.name {
                    workspace.name = name.clone();
                }
                if let Some(plan) = patch.plan {
                    workspace.plan = plan;
                }
                workspace.updated_at = now;
                sqlx::query(
                    "UPDATE workspaces SET name = $2, plan = $3, updated_at = $4 \
                     WHERE workspace_id = $1",
                )
                .bind(workspace_id)
                .bind(&workspace.name)
                .bind(workspace.plan.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await?;
                Self::write_audit(
                    &mut tx,
                    workspace_id,
                    None,
                    crate::store::AuditOutcome::Success,
                    audit,
                    now,
                )
                .await?;
                tx.commit().await?;
                Ok(workspace)
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn record_audit(
                &self,
                entry: &crate::store::DeniedAudit,
                outcome: crate::store::AuditOutcome,
            ) -> Result<(), crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                Self::write_audit(
                    &mut tx,
                    &entry.workspace_id,
                    entry.key_id.as_deref(),
                    outcome,
                    &entry.context,
                    entry.occurred_at,
                )
                .await?;
                tx.commit().await?;
                Ok(())
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn put_provider_key(
                &self,
                record: &crate::domain::provider_key::ProviderKeyRecord,
                audit: &crate::store::AuditContext,
            ) -> Result<crate::domain::provider_key::ProviderKeyRecord, crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                let row: crate::store::sql::ProviderKeyRow = sqlx::query_as(concat!(
                    "INSERT INTO provider_keys (",
                    crate::store::sql::provider_key_columns!(),
                    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) \
                     ON CONFLICT (workspace_id, provider) DO UPDATE SET \
                     record_id = excluded.record_id, last_four = excluded.last_four, \
                     kek_version = excluded.kek_version, wrapped_dek = excluded.wrapped_dek, \
                     ciphertext = excluded.ciphertext, updated_at = excluded.updated_at \
                     RETURNING ",
                    crate::store::sql::provider_key_columns!()
                ))
                .bind(&record.record_id)
                .bind(&record.workspace_id)
                .bind(record.provider.as_str())
                .bind(&record.last_four)
                .bind(i64::from(record.kek_version))
                .bind(&record.wrapped_dek)
                .bind(&record.ciphertext)
                .bind(record.updated_at)
                .fetch_one(&mut *tx)
                .await?;
                Self::write_audit(
                    &mut tx,
                    &record.workspace_id,
                    None,
                    crate::store::AuditOutcome::Success,
                    audit,
                    record.updated_at,
                )
                .await?;
                tx.commit().await?;
                row.try_into()
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn get_provider_key(
                &self,
                workspace_id: &str,
                provider: crate::domain::provider_key::Provider,
            ) -> Result<Option<crate::domain::provider_key::ProviderKeyRecord>, crate::store::StoreError> {
                let row: Option<crate::store::sql::ProviderKeyRow> = sqlx::query_as(concat!(
                    "SELECT ",
                    crate::store::sql::provider_key_columns!(),
                    " FROM provider_keys WHERE workspace_id = $1 AND provider = $2"
                ))
                .bind(workspace_id)
                .bind(provider.as_str())
                .fetch_optional(&self.pool)
                .await?;
                row.map(TryInto::try_into).transpose()
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn list_provider_keys(
                &self,
                workspace_id: &str,
            ) -> Result<Vec<crate::domain::provider_key::ProviderKeyRecord>, crate::store::StoreError> {
                let rows: Vec<crate::store::sql::ProviderKeyRow> = sqlx::query_as(concat!(
                    "SELECT ",
                    crate::store::sql::provider_key_columns!(),
                    " FROM provider_keys WHERE workspace_id = $1 ORDER BY provider"
                ))
                .bind(workspace_id)
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn delete_provider_key(
                &self,
                workspace_id: &str,
                provider: crate::domain::provider_key::Provider,
                now: i64,
                audit: &crate::store::AuditContext,
            ) -> Result<(), crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                let deleted = sqlx::query(
                    "DELETE FROM provider_keys WHERE workspace_id = $1 AND provider = $2",
                )
                .bind(workspace_id)
                .bind(provider.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if deleted == 0 {
                    return Err(crate::store::StoreError::NotFound);
                }
                Self::write_audit(
                    &mut tx,
                    workspace_id,
                    None,
                    crate::store::AuditOutcome::Success,
                    audit,
                    now,
                )
                .await?;
                tx.commit().await?;
                Ok(())
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn provider_keys_to_rewrap(
                &self,
                current: u32,
                limit: u32,
            ) -> Result<Vec<crate::domain::provider_key::ProviderKeyRecord>, crate::store::StoreError> {
                let rows: Vec<crate::store::sql::ProviderKeyRow> = sqlx::query_as(concat!(
                    "SELECT ",
                    crate::store::sql::provider_key_columns!(),
                    " FROM provider_keys WHERE kek_version <> $1 ORDER BY record_id LIMIT $2"
                ))
                .bind(i64::from(current))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn swap_wrapped_dek(
                &self,
                record_id: &str,
                expected: &[u8],
                kek_version: u32,
                wrapped_dek: &[u8],
            ) -> Result<bool, crate::store::StoreError> {
                let swapped = sqlx::query(
                    "UPDATE provider_keys SET kek_version = $3, wrapped_dek = $4 \
                     WHERE record_id = $1 AND wrapped_dek = $2",
                )
                .bind(record_id)
                .bind(expected)
                .bind(i64::from(kek_version))
                .bind(wrapped_dek)
                .execute(&self.pool)
                .await?
                .rows_affected();
                Ok(swapped == 1)
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn kek_versions_in_use(&self) -> Result<Vec<u32>, crate::store::StoreError> {
                let versions: Vec<i64> = sqlx::query_scalar(
                    "SELECT DISTINCT kek_version FROM provider_keys ORDER BY kek_version",
                )
                .fetch_all(&self.pool)
                .await?;
                versions
                    .into_iter()
                    .map(|v| {
                        u32::try_from(v).map_err(|_| {
                            crate::store::StoreError::Corrupt(format!("kek_version {v}"))
                        })
                    })
                    .collect()
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn kek_check(
                &self,
                version: u32,
                value: &[u8],
                now: i64,
            ) -> Result<Vec<u8>, crate::store::StoreError> {
                sqlx::query(
                    "INSERT INTO kek_checks (version, check_value, created_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (version) DO NOTHING",
                )
                .bind(i64::from(version))
                .bind(value)
                .bind(now)
                .execute(&self.pool)
                .await?;
                let stored: Vec<u8> =
                    sqlx::query_scalar("SELECT check_value FROM kek_checks WHERE version = $1")
                        .bind(i64::from(version))
                        .fetch_one(&self.pool)
                        .await?;
                Ok(stored)
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn insert_group(
                &self,
                group: &crate::domain::access::AccessGroup,
                audit: &crate::store::AuditContext,
            ) -> Result<(), crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                let inserted = sqlx::query(
                    "INSERT INTO access_groups (workspace_id, name, targets, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $4) ON CONFLICT (workspace_id, name) DO NOTHING",
                )
                .bind(&group.workspace_id)
                .bind(&group.name)
                .bind(crate::store::sql::join_set(&group.targets))
                .bind(group.created_at)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 0 {
                    return Err(crate::store::StoreError::AlreadyExists);
                }
                Self::write_audit(
                    &mut tx,
                    &group.workspace_id,
                    None,
                    crate::store::AuditOutcome::Success,
                    audit,
                    group.created_at,
                )
                .await?;
                tx.commit().await?;
                Ok(())
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn list_groups(
                &self,
                workspace_id: &str,
            ) -> Result<Vec<crate::domain::access::AccessGroup>, crate::store::StoreError> {
                let rows: Vec<crate::store::sql::GroupRow> = sqlx::query_as(
                    "SELECT workspace_id, name, targets, created_at, updated_at FROM access_groups \
                     WHERE workspace_id = $1 ORDER BY name",
                )
                .bind(workspace_id)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn update_group(
                &self,
                workspace_id: &str,
                name: &str,
                targets: &std::collections::BTreeSet<String>,
                now: i64,
                audit: &crate::store::AuditContext,
            ) -> Result<(crate::domain::access::AccessGroup, Vec<crate::domain::key_format::KeyHash>), crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                let row: Option<crate::store::sql::GroupRow> = sqlx::query_as(concat!(
                    "SELECT workspace_id, name, targets, created_at, updated_at FROM access_groups \
                     WHERE workspace_id = $1 AND name = $2",
                    $lock
                ))
                .bind(workspace_id)
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
                let mut group: crate::domain::access::AccessGroup =
                    row.ok_or(crate::store::StoreError::NotFound)?.into();
                group.targets = targets.clone();
                group.updated_at = now;
                sqlx::query(
                    "UPDATE access_groups SET targets = $3, updated_at = $4 \
                     WHERE workspace_id = $1 AND name = $2",
                )
                .bind(workspace_id)
                .bind(name)
                .bind(crate::store::sql::join_set(targets))
                .bind(now)
                .execute(&mut *tx)
                .await?;
                // Every key that names the group, or whose team's reach names it, is
                // reloaded by every replica.
                let mut rows: Vec<crate::store::sql::KeyRow> = sqlx::query_as(concat!(
                    "SELECT ",
                    crate::store::sql::key_columns!(),
                    " FROM api_keys WHERE workspace_id = $1 AND deleted_at IS NULL \
                     AND (' ' || resource_groups || ' ') LIKE ('% ' || $2 || ' %') ORDER BY key_id",
                    $lock
                ))
                .bind(workspace_id)
                .bind(name)
                .fetch_all(&mut *tx)
                .await?;
                for team_id in Self::teams_naming_group(&mut tx, workspace_id, name).await? {
                    let team_rows: Vec<crate::store::sql::KeyRow> = sqlx::query_as(concat!(
                        "SELECT ",
                        crate::store::sql::key_columns!(),
                        " FROM api_keys WHERE workspace_id = $1 AND team_id = $2 \
                         AND deleted_at IS NULL \
                         AND NOT ((' ' || resource_groups || ' ') LIKE ('% ' || $3 || ' %')) \
                         ORDER BY key_id",
                        $lock
                    ))
                    .bind(workspace_id)
                    .bind(&team_id)
                    .bind(name)
                    .fetch_all(&mut *tx)
                    .await?;
                    rows.extend(team_rows);
                }
                let stale = Self::reload_keys(&mut tx, rows, now).await?;
                Self::write_audit(
                    &mut tx,
                    workspace_id,
                    None,
                    crate::store::AuditOutcome::Success,
                    audit,
                    now,
                )
                .await?;
                tx.commit().await?;
                Ok((group, stale))
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn delete_group(
                &self,
                workspace_id: &str,
                name: &str,
                now: i64,
                audit: &crate::store::AuditContext,
            ) -> Result<(), crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                // Delete first, then look for users: the delete waits for any transaction
                // that has share-locked the group to name it (see `lock_groups`), and the
                // look that follows, a statement of its own, sees what that one committed.
                // Found users roll the delete back.
                let deleted = sqlx::query(
                    "DELETE FROM access_groups WHERE workspace_id = $1 AND name = $2",
                )
                .bind(workspace_id)
                .bind(name)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if deleted == 0 {
                    return Err(crate::store::StoreError::NotFound);
                }
                let users: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM api_keys WHERE workspace_id = $1 AND deleted_at IS NULL \
                     AND (' ' || resource_groups || ' ') LIKE ('% ' || $2 || ' %')",
                )
                .bind(workspace_id)
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
                if users > 0 {
                    return Err(crate::store::StoreError::Precondition(
                        crate::domain::refusal::Refusal::new(
                            crate::domain::refusal::Reason::AccessGroupInUse,
                            "the access group is referenced by keys: change them first",
                        )
                        .with("access_group", name),
                    ));
                }
                if !Self::teams_naming_group(&mut tx, workspace_id, name).await?.is_empty() {
                    return Err(crate::store::StoreError::Precondition(
                        crate::domain::refusal::Refusal::new(
                            crate::domain::refusal::Reason::AccessGroupInUse,
                            "the access group is referenced by a team's reach: change it first",
                        )
                        .with("access_group", name),
                    ));
                }
                Self::write_audit(
                    &mut tx,
                    workspace_id,
                    None,
                    crate::store::AuditOutcome::Success,
                    audit,
                    now,
                )
                .await?;
                tx.commit().await?;
                Ok(())
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn insert_team(
                &self,
                team: &crate::domain::team::Team,
                audit: &crate::store::AuditContext,
            ) -> Result<(), crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                Self::lock_groups(&mut tx, &team.workspace_id, &team.policy.resource_access.groups)
                    .await?;
                let inserted = sqlx::query(
                    "INSERT INTO teams (workspace_id, team_id, name, policy, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (workspace_id, team_id) DO NOTHING",
                )
                .bind(&team.workspace_id)
                .bind(&team.team_id)
                .bind(&team.name)
                .bind(crate::store::sql::policy_json(&team.policy))
                .bind(team.created_at)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 0 {
                    return Err(crate::store::StoreError::AlreadyExists);
                }
                Self::write_audit(&mut tx, &team.workspace_id, None, crate::store::AuditOutcome::Success, audit, team.created_at).await?;
                tx.commit().await?;
                Ok(())
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn get_team(
                &self,
                workspace_id: &str,
                team_id: &str,
            ) -> Result<Option<crate::domain::team::Team>, crate::store::StoreError> {
                let row: Option<crate::store::sql::TeamRow> = sqlx::query_as(
                    "SELECT workspace_id, team_id, name, policy, created_at, updated_at FROM teams \
                     WHERE workspace_id = $1 AND team_id = $2",
                )
                .bind(workspace_id)
                .bind(team_id)
                .fetch_optional(&self.pool)
                .await?;
                row.map(TryInto::try_into).transpose()
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn list_teams(
                &self,
                workspace_id: &str,
            ) -> Result<Vec<crate::domain::team::Team>, crate::store::StoreError> {
                let rows: Vec<crate::store::sql::TeamRow> = sqlx::query_as(
                    "SELECT workspace_id, team_id, name, policy, created_at, updated_at FROM teams \
                     WHERE workspace_id = $1 ORDER BY team_id",
                )
                .bind(workspace_id)
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn update_team(
                &self,
                workspace_id: &str,
                team_id: &str,
                patch: &crate::store::TeamPatch,
                now: crate::domain::Micros,
                audit: &crate::store::AuditContext,
            ) -> Result<
                (crate::domain::team::Team, Vec<crate::domain::key_format::KeyHash>),
                crate::store::StoreError,
            > {
                let mut tx = self.begin_write().await?;
                let before: Option<crate::store::sql::TeamRow> = sqlx::query_as(concat!(
                    "SELECT workspace_id, team_id, name, policy, created_at, updated_at FROM teams \
                     WHERE workspace_id = $1 AND team_id = $2",
                    $lock
                ))
                .bind(workspace_id)
                .bind(team_id)
                .fetch_optional(&mut *tx)
                .await?;
                let before: crate::domain::team::Team =
                    before.ok_or(crate::store::StoreError::NotFound)?.try_into()?;
                let mut team = before.clone();
                if let Some(name) = &patch.name {
                    team.name.clone_from(name);
                }
                if let Some(policy) = &patch.policy {
                    Self::lock_groups(&mut tx, workspace_id, &policy.resource_access.groups).await?;
                    team.policy = policy.clone();
                }
                team.updated_at = now;
                sqlx::query(
                    "UPDATE teams SET name = $3, policy = $4, updated_at = $5 \
                     WHERE workspace_id = $1 AND team_id = $2",
                )
                .bind(&team.workspace_id)
                .bind(&team.team_id)
                .bind(&team.name)
                .bind(crate::store::sql::policy_json(&team.policy))
                .bind(team.updated_at)
                .execute(&mut *tx)
                .await?;
                // A change of the team's reach changes what its keys reach: every replica
                // reloads them.
                let stale = if before.policy.resource_access == team.policy.resource_access {
                    Vec::new()
                } else {
                    let rows: Vec<crate::store::sql::KeyRow> = sqlx::query_as(concat!(
                        "SELECT ",
                        crate::store::sql::key_columns!(),
                        " FROM api_keys WHERE workspace_id = $1 AND team_id = $2 \
                         AND deleted_at IS NULL ORDER BY key_id",
                        $lock
                    ))
                    .bind(&team.workspace_id)
                    .bind(&team.team_id)
                    .fetch_all(&mut *tx)
                    .await?;
                    Self::reload_keys(&mut tx, rows, team.updated_at).await?
                };
                Self::write_audit(&mut tx, &team.workspace_id, None, crate::store::AuditOutcome::Success, audit, team.updated_at).await?;
                tx.commit().await?;
                Ok((team, stale))
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn insert_service_account(
                &self,
                account: &crate::domain::team::ServiceAccount,
                audit: &crate::store::AuditContext,
            ) -> Result<(), crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                let inserted = sqlx::query(
                    "INSERT INTO service_accounts (workspace_id, service_account_id, team_id, name, \
                     created_at) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (workspace_id, service_account_id) DO NOTHING",
                )
                .bind(&account.workspace_id)
                .bind(&account.service_account_id)
                .bind(&account.team_id)
                .bind(&account.name)
                .bind(account.created_at)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 0 {
                    return Err(crate::store::StoreError::AlreadyExists);
                }
                Self::write_audit(&mut tx, &account.workspace_id, None, crate::store::AuditOutcome::Success, audit, account.created_at).await?;
                tx.commit().await?;
                Ok(())
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn get_service_account(
                &self,
                workspace_id: &str,
                service_account_id: &str,
            ) -> Result<Option<crate::domain::team::ServiceAccount>, crate::store::StoreError> {
                let row: Option<crate::store::sql::ServiceAccountRow> = sqlx::query_as(
                    "SELECT workspace_id, service_account_id, team_id, name, created_at \
                     FROM service_accounts WHERE workspace_id = $1 AND service_account_id = $2",
                )
                .bind(workspace_id)
                .bind(service_account_id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(Into::into))
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn list_service_accounts(
                &self,
                workspace_id: &str,
                team_id: &str,
            ) -> Result<Vec<crate::domain::team::ServiceAccount>, crate::store::StoreError> {
                let rows: Vec<crate::store::sql::ServiceAccountRow> = sqlx::query_as(
                    "SELECT workspace_id, service_account_id, team_id, name, created_at \
                     FROM service_accounts WHERE workspace_id = $1 AND team_id = $2 \
                     ORDER BY service_account_id",
                )
                .bind(workspace_id)
                .bind(team_id)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn delete_service_account(
                &self,
                workspace_id: &str,
                service_account_id: &str,
                now: i64,
                audit: &crate::store::AuditContext,
            ) -> Result<(), crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                // Delete first, then look for keys: the delete waits for an issue that has
                // share-locked the account to own a key, and the look, a statement of its
                // own, sees that key once committed. Found keys roll the delete back.
                let deleted = sqlx::query(
                    "DELETE FROM service_accounts WHERE workspace_id = $1 AND service_account_id = $2",
                )
                .bind(workspace_id)
                .bind(service_account_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if deleted == 0 {
                    return Err(crate::store::StoreError::NotFound);
                }
                let owned: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM api_keys WHERE workspace_id = $1 \
                     AND owner_kind = 'service_account' AND owner_id = $2 \
                     AND deleted_at IS NULL AND revoked_at IS NULL",
                )
                .bind(workspace_id)
                .bind(service_account_id)
                .fetch_one(&mut *tx)
                .await?;
                if owned > 0 {
                    return Err(crate::store::StoreError::Precondition(
                        crate::domain::refusal::Refusal::new(
                            crate::domain::refusal::Reason::ServiceAccountOwnsKeys,
                            "the service account owns keys that are not revoked: revoke or delete them first",
                        )
                        .with("service_account_id", service_account_id),
                    ));
                }
                Self::write_audit(&mut tx, workspace_id, None, crate::store::AuditOutcome::Success, audit, now).await?;
                tx.commit().await?;
                Ok(())
            }

            #[tracing::instrument(level = "debug", skip_all)]
            async fn ping(&self) -> Result<(), crate::store::StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            $($extra)*
        }
    };
}
pub(crate) use impl_store;
