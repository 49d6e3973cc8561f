//! The row types the shared SQL decodes into, their conversions to domain records, and
//! the column encodings (space-separated sets, JSON maps, signed budgets) both backends
//! store alike.
//!
//! Rows are plain `#[derive(sqlx::FromRow)]` structs of `i64`, `String`, `Vec<u8>` and
//! their `Option`s, the column types both databases decode the same way, so one struct
//! serves both backends; everything richer (enums, sets, JSON) is parsed here, and a row
//! that does not parse is [`StoreError::Corrupt`], never a panic.

use std::collections::BTreeMap;

use crate::domain::budget::BudgetPeriod;
use crate::domain::event::{EventKind, KeyEvent, split_hashes};
use crate::domain::key::{KeyRecord, KeyStatus, Owner, OwnerKind};
use crate::domain::key_format::{Environment, KeyHash};
use crate::domain::limits::{self, RateLimit};
use crate::domain::pools::{Pool, PoolBudget, StoredSpend};

use crate::store::{AuditOutcome, AuditRecord, FoundSecret, StoreError};

macro_rules! key_columns {
    () => {
        "key_id, workspace_id, name, environment, display, scopes, owner_kind, owner_id, \
         created_by, metadata, created_at, updated_at, expires_at, revoked_at, revoke_reason, \
         rotated_at, deleted_at, rate_limits, max_budget_micros, spent_micros, last_used_at, \
         resource_mode, resource_targets, allowed_cidrs, resource_groups, team_id, \
         budget_period, budget_reset_at, spend_epoch"
    };
}
pub(crate) use key_columns;

/// Every column of `teams`, as [`TeamRow`] reads them.
macro_rules! team_columns {
    () => {
        "workspace_id, team_id, name, policy, rate_limits, created_at, updated_at, budget, \
         spent_micros, spend_epoch"
    };
}
pub(crate) use team_columns;

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
    budget_period: String,
    budget_reset_at: i64,
    spend_epoch: i64,
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
        let budget_period =
            BudgetPeriod::parse(&r.budget_period).ok_or_else(|| corrupt("budget_period"))?;
        Ok(KeyRecord {
            budget_period,
            budget_reset_at: r.budget_reset_at,
            spend_epoch: r.spend_epoch,
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
    rate_limits: String,
    created_at: i64,
    updated_at: i64,
    budget: String,
    spent_micros: i64,
    spend_epoch: i64,
}

impl TryFrom<TeamRow> for crate::domain::team::Team {
    type Error = StoreError;

    fn try_from(r: TeamRow) -> Result<Self, StoreError> {
        Ok(crate::domain::team::Team {
            policy: serde_json::from_str(&r.policy)
                .map_err(|_| StoreError::Corrupt(format!("team {}: policy", r.team_id)))?,
            rate_limits: pool_limits(&r.rate_limits, "team", &r.team_id)?,
            budget: pool_budget(&r.budget, "team", &r.team_id)?,
            spend: stored_spend(r.spent_micros, r.spend_epoch),
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

/// What [`FIND_SECRET`](super::keys::FIND_SECRET) reads: decoded by position (see its
/// `FromRow`), the one row type on the hot path.
pub(crate) struct FoundRow {
    key: KeyRow,
    secret_valid_until: Option<i64>,
    workspace_plan: Option<String>,
    workspace_limits: Option<String>,
    workspace_budget: Option<String>,
    workspace_spent: Option<i64>,
    workspace_epoch: Option<i64>,
    owner_limits: Option<String>,
    owner_budget: Option<String>,
    owner_spent: Option<i64>,
    owner_epoch: Option<i64>,
}

/// How many columns a [`FoundRow`] is read from.
const FOUND_COLUMNS: usize = 39;

/// By position, not by name: the derived `FromRow` finds each of the 39 columns by name
/// (a hash of the name and a comparison each), which took about a twelfth of a cache
/// miss's server time. Each field names its column beside its position: in debug builds,
/// where every test runs, a column of another name at that position is refused as a
/// column not found, and in every build so is a row of another number of columns, so a
/// statement edited out of step fails every test that verifies a key, never decodes one
/// column as another.
impl<'r, R> sqlx::FromRow<'r, R> for FoundRow
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn from_row(row: &'r R) -> Result<Self, sqlx::Error> {
        use sqlx::Column;
        let columns = row.columns();
        if columns.len() != FOUND_COLUMNS {
            return Err(sqlx::Error::ColumnNotFound(format!(
                "{} columns where {FOUND_COLUMNS} were expected",
                columns.len()
            )));
        }
        let mut next = 0usize;
        // The next position, whose column is `name`.
        let mut at = |name: &str| {
            let i = next;
            next += 1;
            match columns.get(i).map(|c| c.name()) {
                None => Err(sqlx::Error::ColumnNotFound(name.to_owned())),
                Some(found) if cfg!(debug_assertions) && found != name => {
                    Err(sqlx::Error::ColumnNotFound(found.to_owned()))
                }
                Some(_) => Ok(i),
            }
        };
        let found = FoundRow {
            key: KeyRow {
                key_id: row.try_get(at("key_id")?)?,
                workspace_id: row.try_get(at("workspace_id")?)?,
                name: row.try_get(at("name")?)?,
                environment: row.try_get(at("environment")?)?,
                display: row.try_get(at("display")?)?,
                scopes: row.try_get(at("scopes")?)?,
                owner_kind: row.try_get(at("owner_kind")?)?,
                owner_id: row.try_get(at("owner_id")?)?,
                created_by: row.try_get(at("created_by")?)?,
                metadata: row.try_get(at("metadata")?)?,
                created_at: row.try_get(at("created_at")?)?,
                updated_at: row.try_get(at("updated_at")?)?,
                expires_at: row.try_get(at("expires_at")?)?,
                revoked_at: row.try_get(at("revoked_at")?)?,
                revoke_reason: row.try_get(at("revoke_reason")?)?,
                rotated_at: row.try_get(at("rotated_at")?)?,
                deleted_at: row.try_get(at("deleted_at")?)?,
                rate_limits: row.try_get(at("rate_limits")?)?,
                max_budget_micros: row.try_get(at("max_budget_micros")?)?,
                spent_micros: row.try_get(at("spent_micros")?)?,
                last_used_at: row.try_get(at("last_used_at")?)?,
                resource_mode: row.try_get(at("resource_mode")?)?,
                resource_targets: row.try_get(at("resource_targets")?)?,
                allowed_cidrs: row.try_get(at("allowed_cidrs")?)?,
                resource_groups: row.try_get(at("resource_groups")?)?,
                team_id: row.try_get(at("team_id")?)?,
                budget_period: row.try_get(at("budget_period")?)?,
                budget_reset_at: row.try_get(at("budget_reset_at")?)?,
                spend_epoch: row.try_get(at("spend_epoch")?)?,
            },
            secret_valid_until: row.try_get(at("secret_valid_until")?)?,
            workspace_plan: row.try_get(at("workspace_plan")?)?,
            workspace_limits: row.try_get(at("workspace_limits")?)?,
            workspace_budget: row.try_get(at("workspace_budget")?)?,
            workspace_spent: row.try_get(at("workspace_spent")?)?,
            workspace_epoch: row.try_get(at("workspace_epoch")?)?,
            owner_limits: row.try_get(at("owner_limits")?)?,
            owner_budget: row.try_get(at("owner_budget")?)?,
            owner_spent: row.try_get(at("owner_spent")?)?,
            owner_epoch: row.try_get(at("owner_epoch")?)?,
        };
        debug_assert_eq!(next, FOUND_COLUMNS, "FOUND_COLUMNS counts the fields read");
        Ok(found)
    }
}

impl TryFrom<FoundRow> for FoundSecret {
    type Error = StoreError;

    fn try_from(r: FoundRow) -> Result<Self, StoreError> {
        let plan = match r.workspace_plan {
            Some(plan) => Some(crate::domain::workspace::Plan::parse(&plan).ok_or_else(|| {
                StoreError::Corrupt(format!("workspace {}: plan", r.key.workspace_id))
            })?),
            None => None,
        };
        let key: KeyRecord = r.key.try_into()?;
        let limits_of = |text: Option<String>, what| {
            pool_limits(text.as_deref().unwrap_or(""), what, &key.workspace_id)
        };
        let budget_of = |text: Option<String>, what| {
            pool_budget(text.as_deref().unwrap_or(""), what, &key.workspace_id)
        };
        let spend_of = |micros: Option<i64>, epoch: Option<i64>| {
            stored_spend(micros.unwrap_or(0), epoch.unwrap_or(0))
        };
        // The team's pool is read with the team, after this row.
        let pools = vec![
            Pool::workspace(
                &key.workspace_id,
                limits_of(r.workspace_limits, "workspace")?,
            )
            .with_budget(
                budget_of(r.workspace_budget, "workspace")?,
                spend_of(r.workspace_spent, r.workspace_epoch),
            ),
            Pool::owner(
                &key.workspace_id,
                &key.owner,
                limits_of(r.owner_limits, "owner limits in workspace")?,
            )
            .with_budget(
                budget_of(r.owner_budget, "owner limits in workspace")?,
                spend_of(r.owner_spent, r.owner_epoch),
            ),
        ];
        Ok(FoundSecret {
            key,
            valid_until: r.secret_valid_until,
            plan,
            pools,
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
    rate_limits: String,
    created_at: i64,
    updated_at: i64,
    budget: String,
    spent_micros: i64,
    spend_epoch: i64,
}

impl TryFrom<WorkspaceRow> for crate::domain::workspace::Workspace {
    type Error = StoreError;

    fn try_from(r: WorkspaceRow) -> Result<Self, StoreError> {
        Ok(crate::domain::workspace::Workspace {
            plan: crate::domain::workspace::Plan::parse(&r.plan).ok_or_else(|| {
                StoreError::Corrupt(format!("workspace {}: plan", r.workspace_id))
            })?,
            rate_limits: pool_limits(&r.rate_limits, "workspace", &r.workspace_id)?,
            budget: pool_budget(&r.budget, "workspace", &r.workspace_id)?,
            spend: stored_spend(r.spent_micros, r.spend_epoch),
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

/// A pool's stored limits (`what` and `id` name the row in the error).
pub(crate) fn pool_limits(text: &str, what: &str, id: &str) -> Result<Vec<RateLimit>, StoreError> {
    crate::domain::limits::split(text)
        .ok_or_else(|| StoreError::Corrupt(format!("{what} {id}: rate_limits")))
}

/// A pool's stored budget (`what` and `id` name the row in the error).
pub(crate) fn pool_budget(
    text: &str,
    what: &str,
    id: &str,
) -> Result<Option<PoolBudget>, StoreError> {
    PoolBudget::from_text(text).map_err(|()| StoreError::Corrupt(format!("{what} {id}: budget")))
}

/// A pool's stored spend: a total the usage statement keeps within `MAX_SPEND_MICROS`, so
/// never negative.
pub(crate) fn stored_spend(micros: i64, epoch: i64) -> StoredSpend {
    StoredSpend {
        micros: u64::try_from(micros).unwrap_or(0),
        epoch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SELECT '…' AS <name>, …` over `names`: a row of text columns so named.
    fn select(names: &[&str]) -> String {
        let columns: Vec<String> = names.iter().map(|n| format!("'x' AS {n}")).collect();
        format!("SELECT {}", columns.join(", "))
    }

    /// The columns the miss's statement selects, in its order.
    fn found_columns() -> Vec<&'static str> {
        let select = crate::store::FIND_SECRET
            .strip_prefix("SELECT ")
            .and_then(|s| s.split(" FROM ").next())
            .unwrap();
        select.split(',').map(str::trim).collect()
    }

    async fn decode(names: &[&str]) -> Result<FoundRow, sqlx::Error> {
        let pool = sqlx::SqlitePool::connect("sqlite::memory:").await?;
        // Built from the constant column names above, no input.
        sqlx::query_as::<_, FoundRow>(sqlx::AssertSqlSafe(select(names)))
            .fetch_one(&pool)
            .await
    }

    #[tokio::test]
    async fn a_row_of_other_columns_is_refused_not_decoded_by_position() {
        let columns = found_columns();
        assert_eq!(columns.len(), 39, "{columns:?}");
        let short = decode(&columns[..38]).await;
        assert!(matches!(short, Err(sqlx::Error::ColumnNotFound(_))));
        let mut swapped = columns;
        swapped.swap(1, 2);
        match decode(&swapped).await {
            Err(sqlx::Error::ColumnNotFound(name)) => assert_eq!(name, "name"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("decoded a row whose columns are out of order"),
        }
    }
}
