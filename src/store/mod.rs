//! Storage: one trait per aggregate ([`KeyStore`], [`TeamStore`], [`AccessGroupStore`],
//! [`ProviderKeyStore`], [`WorkspaceStore`], [`EventStore`], [`UsageStore`],
//! [`AuditStore`], [`WebhookStore`], [`HealthStore`]), together [`Store`], and two implementations through
//! sqlx.
//!
//! - [`postgres::PgStore`]: the production store; any number of replicas share one.
//! - [`sqlite::SqliteStore`]: the embedded default (bundled SQLite), for a one-command
//!   local run and single-node use.
//!
//! Both are one generic `SqlStore` running the same SQL (see `sql/`), differ only in how
//! a write transaction starts and locks (`sql::Backend`), and pass one conformance suite
//! (`tests/store_conformance.rs`).
//!
//! **Architecture Invariant:** every mutation and its audit event commit in one
//! transaction; a mutation that fails leaves nothing behind, audit row included. Storage
//! holds SHA-256 hashes of keys, never a plaintext.

mod sql;
pub(crate) use sql::FIND_SECRET;
/// The statement ListAuditEvents runs for a filter (public so that a test can ask each
/// database for its plan).
pub use sql::{list_audit_sql, usage_query_sql};

pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use base64::Engine;

use crate::domain::Micros;
use crate::domain::access::{AccessGroup, NetworkAllowlist, ResourceAccess};
use crate::domain::budget::BudgetPeriod;
use crate::domain::event::{EventBounds, KeyEvent};
use crate::domain::key::{KeyRecord, KeyStatus, Owner};
use crate::domain::key_format::KeyHash;
use crate::domain::limits::RateLimit;
use crate::domain::pools::{Pool, PoolBudget, StoredSpend};
use crate::domain::provider_key::{Provider, ProviderKeyRecord};
use crate::domain::rollup::{Granularity, GroupBy, Tally};
use crate::domain::team::{SelfServiceKey, ServiceAccount, Team, TeamPolicy};
use crate::domain::webhook::EventType;
use crate::domain::workspace::{Plan, Workspace};

/// Which keys a bulk revocation takes: the workspace's keys neither revoked nor deleted
/// that match every criterion set (none set: all of them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySelection {
    pub workspace_id: String,
    pub owner: Option<Owner>,
    pub team_id: Option<String>,
    pub created_by: Option<String>,
}

/// Which audit events a listing selects: a workspace's, narrowed by each filter set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub workspace_id: String,
    pub key_id: Option<String>,
    pub actor_id: Option<String>,
    pub action: Option<String>,
    /// At or after.
    pub since: Option<Micros>,
    /// Before.
    pub until: Option<Micros>,
}

/// A connection pool's figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    pub open: u32,
    pub idle: u32,
    pub max: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// The mutation is not allowed in the current state (a revoked key, a group in use...),
    /// with the reason the client sees.
    #[error("{0}")]
    Precondition(crate::domain::refusal::Refusal),
    /// What the mutation would create exists already.
    #[error("already exists")]
    AlreadyExists,
    /// The database cannot be reached or did not answer in time.
    #[error("storage unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("storage error: {0}")]
    Internal(#[source] sqlx::Error),
    /// A stored row that does not decode: a bug or a hand-edited database.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            e if is_unavailable(&e) => StoreError::Unavailable(e),
            other => StoreError::Internal(other),
        }
    }
}

/// The database could not be reached or did not answer in time: trying again later can
/// succeed with nothing changed.
fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => is_unavailable_code(db.code().as_deref()),
        _ => false,
    }
}

/// Postgres: admin shutdown / cannot connect now; SQLite: busy / locked.
fn is_unavailable_code(code: Option<&str>) -> bool {
    matches!(code, Some("57P01" | "57P02" | "57P03" | "5" | "6" | "517"))
}

/// What the caller of a mutation tells the audit log; the store adds the workspace, the
/// key id, the time and the outcome from the transaction itself.
#[derive(Clone, Debug)]
pub struct AuditContext {
    pub actor_id: String,
    /// The name of the caller token.
    pub caller: String,
    pub action: &'static str,
    pub detail: String,
}

/// Who is asking: the caller token's name and the acting principal. What the audit log
/// records of them comes from here ([`Acting::audit`]).
#[derive(Clone, Debug)]
pub struct Acting {
    pub caller: std::sync::Arc<str>,
    pub actor: crate::domain::actor::Actor,
}

impl Acting {
    /// What the audit log records of this principal doing `action`.
    pub fn audit(&self, action: &'static str, detail: String) -> AuditContext {
        AuditContext {
            actor_id: self.actor.id.clone(),
            caller: self.caller.to_string(),
            action,
            detail,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditOutcome {
    Success,
    Denied,
}

impl AuditOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Success => "success",
            AuditOutcome::Denied => "denied",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    pub id: i64,
    pub workspace_id: String,
    pub actor_id: String,
    pub caller: String,
    pub action: String,
    pub key_id: Option<String>,
    pub outcome: AuditOutcome,
    pub detail: String,
    pub occurred_at: Micros,
}

/// A refusal to record on its own (nothing else changed).
#[derive(Clone, Debug)]
pub struct DeniedAudit {
    pub workspace_id: String,
    pub key_id: Option<String>,
    pub context: AuditContext,
    pub occurred_at: Micros,
}

#[derive(Clone, Debug)]
pub struct KeyFilter {
    pub workspace_id: String,
    pub owner: Option<Owner>,
    pub name_prefix: Option<String>,
    /// A metadata entry the key must hold.
    pub metadata: Option<(String, String)>,
    pub team_id: Option<String>,
    pub status: Option<KeyStatus>,
    /// The time against which "expired" is judged.
    pub now: Micros,
    /// Only keys not used since this time (never-used keys included).
    pub unused_since: Option<Micros>,
}

/// Where a key listing resumes: after this (created_at, key_id), newest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyCursor {
    pub created_at: Micros,
    pub key_id: String,
}

/// A secret that matched a presented key's hash, with its key.
#[derive(Clone, Debug)]
pub struct FoundSecret {
    pub key: KeyRecord,
    /// `None` for the current secret; the end of the grace period for a replaced one.
    pub valid_until: Option<Micros>,
    /// The plan of the key's workspace now (`None`: no workspace row, which migration
    /// 0004 made impossible for keys it found).
    pub plan: Option<Plan>,
    /// The pools the key counts against besides its own limits, in the order they are
    /// judged (only those that limit something).
    pub pools: Vec<Pool>,
}

/// The fields a team update changes; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct TeamPatch {
    pub name: Option<String>,
    pub policy: Option<TeamPolicy>,
    /// The team's pool.
    pub rate_limits: Option<Vec<RateLimit>>,
    /// The team pool's budget (`Some(None)` removes it); its anchor is set by the store.
    pub budget: Option<Option<PoolBudget>>,
}

/// The fields an update changes; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    /// `Some(None)` removes the expiry.
    pub expires_at: Option<Option<Micros>>,
    pub metadata: Option<BTreeMap<String, String>>,
    /// `Some(vec![])` goes back to the deployment's default.
    pub rate_limits: Option<Vec<RateLimit>>,
    /// `Some(None)` removes the budget.
    pub max_budget_micros: Option<Option<u64>>,
    pub budget_period: Option<BudgetPeriod>,
    pub resource_access: Option<ResourceAccess>,
    pub network: Option<NetworkAllowlist>,
}

/// The fields a workspace update changes; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct WorkspacePatch {
    pub name: Option<String>,
    pub plan: Option<Plan>,
    /// The workspace's pool.
    pub rate_limits: Option<Vec<RateLimit>>,
    /// The workspace pool's budget (`Some(None)` removes it); its anchor is set by the
    /// store.
    pub budget: Option<Option<PoolBudget>>,
}

/// An owner's pool as stored: none is all empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnerPool {
    pub rate_limits: Vec<RateLimit>,
    pub budget: Option<PoolBudget>,
    pub spend: StoredSpend,
}

/// The most keys the usage book gives [`UsageStore::record_usage`] at once, so that the rows
/// one statement locks and the JSON it parses stay bounded however many keys are in use.
pub const USAGE_CHUNK: usize = 1000;

/// What one replica's usage book writes for a key in one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageDelta {
    pub key_id: String,
    /// The start of the spend epoch `spend_micros` belongs to: added to the stored spend
    /// of that epoch, replacing an older epoch's, ignored if the row is in a newer one.
    pub epoch: Micros,
    /// Added to the key's persisted spend.
    pub spend_micros: u64,
    /// Moves the key's `last_used_at` forward (never back).
    pub last_used_at: Option<Micros>,
}

/// One key's usage in one bucket of time, as a batch of the usage history carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rollup {
    pub key_id: String,
    pub granularity: Granularity,
    pub bucket_start: Micros,
    pub tally: Tally,
}

/// What a usage-history query reads: a workspace's rows of one granularity in
/// `[since, until)` (the domain bounds the span), optionally one owner's alone.
#[derive(Clone, Debug)]
pub struct UsageQuery {
    pub workspace_id: String,
    pub group_by: GroupBy,
    pub granularity: Granularity,
    pub since: Micros,
    pub until: Micros,
    pub owner: Option<Owner>,
    /// The last (bucket, group) of the previous page.
    pub after: Option<(Micros, String)>,
    pub limit: u32,
}

/// One row of a usage-history answer: a group's usage in one bucket. The group is the
/// key id, `kind:id` of the owner, the team id (empty: keys of no team) or the
/// workspace id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRow {
    pub group: String,
    pub bucket_start: Micros,
    pub tally: Tally,
}

/// The outcome of a mutation: the key as it now is, and every secret hash whose cached
/// verification must be dropped.
#[derive(Clone, Debug)]
pub struct Changed {
    pub key: KeyRecord,
    pub stale_hashes: Vec<KeyHash>,
}

#[derive(Clone, Debug)]
pub struct Rotated {
    pub key: KeyRecord,
    pub old_secret_valid_until: Micros,
    pub stale_hashes: Vec<KeyHash>,
}

/// Keys and their secrets: issue, read, list, the verification lookup, and the key mutations.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Stores a new key with its secret's hash, and its audit event. Refused
    /// ([`StoreError::Precondition`]) when its reach names a group the workspace lacks,
    /// or, for a team key, by [`crate::domain::team::check_team_issue`]: a service
    /// account owner not of the team, or a self-service `member`'s key outside the team's
    /// policy with the keys the owner holds in the team. The team row is locked first and
    /// the owner's keys counted under that lock, so concurrent issues cannot all pass one
    /// count. Everything is checked in the insert's transaction, and a team's refusal is
    /// audited (`denied`) in it.
    async fn insert_key(
        &self,
        key: &KeyRecord,
        secret: &KeyHash,
        member: Option<&SelfServiceKey<'_>>,
        audit: &AuditContext,
    ) -> Result<(), StoreError>;

    /// A key by id; deleted keys are not found.
    async fn get_key(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError>;

    /// Up to `limit` keys matching `filter`, newest first, after `after`.
    async fn list_keys(
        &self,
        filter: &KeyFilter,
        limit: u32,
        after: Option<&KeyCursor>,
    ) -> Result<Vec<KeyRecord>, StoreError>;

    /// The secret with this hash and its key (deleted keys included: the caller decides),
    /// with the key's reach resolved as it stands now: its team's reach
    /// (`KeyRecord::team_access`) and the targets of the access groups the key and its
    /// team name. A change of either appends an event for the key, so a cache fill that
    /// read them before the change loses to the fill guard.
    async fn find_secret(&self, hash: &KeyHash) -> Result<Option<FoundSecret>, StoreError>;

    async fn update_key(
        &self,
        key_id: &str,
        patch: &KeyPatch,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<Changed, StoreError>;

    /// Starts again, with an UPDATED event and an audit row each (actor `keywarden`), the
    /// budgets of up to `limit` keys whose period turned by `now`; returns how many.
    /// Spend is judged per epoch whether or not this ran (see `domain::budget`): this
    /// puts each period's turn on the event log and the stored spend at zero.
    async fn reset_due_budgets(&self, now: Micros, limit: u32) -> Result<usize, StoreError>;

    /// Starts the key's budget again at `now`: a new spend epoch, with an event (every
    /// replica reloads the key and stops counting earlier spend) and the audit row.
    async fn reset_budget(
        &self,
        key_id: &str,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<Changed, StoreError>;

    /// Gives the key `new_secret`; older secrets stop at `now + grace`, capped by expiry.
    async fn rotate_key(
        &self,
        key_id: &str,
        new_secret: &KeyHash,
        new_display: &str,
        grace: Micros,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<Rotated, StoreError>;

    /// Revokes at `now`; revoking a revoked key changes nothing and succeeds.
    async fn revoke_key(
        &self,
        key_id: &str,
        reason: &str,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<Changed, StoreError>;

    /// Revokes up to `chunk` keys of `selection` (by key id), each with its event and
    /// audit row as [`KeyStore::revoke_key`] writes them, in one transaction; returns how
    /// many and their secret hashes. A caller revokes them all by calling again until a
    /// call revokes fewer than `chunk`.
    async fn revoke_keys(
        &self,
        selection: &KeySelection,
        reason: &str,
        chunk: u32,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(u64, Vec<KeyHash>), StoreError>;

    async fn delete_key(
        &self,
        key_id: &str,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<Changed, StoreError>;
}

/// What the usage book persists of keys' spend and last use.
#[async_trait]
pub trait UsageStore: Send + Sync + 'static {
    /// Adds each delta's spend and moves its `last_used_at`, in one statement that writes
    /// the whole batch or nothing (an error means nothing was written); returns the
    /// persisted spend of every key that exists (deleted ones too), after the batch, with
    /// the epoch it belongs to. Callers keep batches to [`USAGE_CHUNK`] keys.
    async fn record_usage(
        &self,
        batch: &[UsageDelta],
    ) -> Result<Vec<(String, u64, Micros)>, StoreError>;

    /// [`UsageStore::record_usage`] for pools: each delta's `key_id` is a pool's counter
    /// name ([`crate::domain::pools::PoolOf::of_counter`]), its spend added to the pool's
    /// row (the workspace, the team, the owner's limits) in one transaction that writes
    /// the whole batch or nothing. Returns the spend of every pool row that exists.
    async fn record_pool_usage(
        &self,
        batch: &[UsageDelta],
    ) -> Result<Vec<(String, u64, Micros)>, StoreError>;

    /// Adds each tally to its key's row of its granularity and bucket (created at zero),
    /// in one statement that writes the whole batch or nothing. Rows of keys that do not
    /// exist are skipped. A batch names each (key, granularity, bucket) once.
    async fn record_rollups(&self, batch: &[Rollup]) -> Result<(), StoreError>;

    /// One page of a workspace's usage history, grouped as asked, ordered by bucket then
    /// group, after the cursor.
    async fn query_usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, StoreError>;

    /// Deletes hour rows older than `hours_before` and day rows older than `days_before`;
    /// returns how many.
    async fn prune_rollups(
        &self,
        hours_before: Micros,
        days_before: Micros,
    ) -> Result<u64, StoreError>;
}

/// The key event log replicas follow to drop cached verifications.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Up to `limit` events with seq above `after_seq`, in seq (= commit) order.
    async fn read_events(&self, after_seq: i64, limit: u32) -> Result<Vec<KeyEvent>, StoreError>;

    async fn event_bounds(&self) -> Result<EventBounds, StoreError>;

    /// Removes the events older than `older_than` (and only those); returns how many.
    async fn prune_events(&self, older_than: Micros) -> Result<u64, StoreError>;

    /// Appends a `Rotated` event for each replaced secret whose grace period ended by
    /// `now` and was not announced yet (at most `limit`); returns how many.
    async fn announce_grace_ends(&self, now: Micros, limit: u32) -> Result<usize, StoreError>;
}

/// The audit log's own entries (a mutation writes its audit row itself) and its listing.
#[async_trait]
pub trait AuditStore: Send + Sync + 'static {
    async fn record_denied(&self, denied: &DeniedAudit) -> Result<(), StoreError>;

    /// Records an audit event of its own (nothing else changes), e.g. a resolve.
    async fn record_audit(
        &self,
        entry: &DeniedAudit,
        outcome: AuditOutcome,
    ) -> Result<(), StoreError>;

    /// Up to `limit` audit events that `filter` selects, newest first, with ids below
    /// `before_id`.
    async fn list_audit(
        &self,
        filter: &AuditFilter,
        limit: u32,
        before_id: Option<i64>,
    ) -> Result<Vec<AuditRecord>, StoreError>;
}

/// Workspaces.
#[async_trait]
pub trait WorkspaceStore: Send + Sync + 'static {
    /// Stores a new workspace and its audit event; [`StoreError::AlreadyExists`] when the
    /// id is taken (nothing written).
    async fn insert_workspace(
        &self,
        workspace: &Workspace,
        audit: &AuditContext,
    ) -> Result<(), StoreError>;

    async fn get_workspace(&self, workspace_id: &str) -> Result<Option<Workspace>, StoreError>;

    /// Up to `limit` workspaces by id, those after `after` when given.
    async fn list_workspaces(
        &self,
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<Workspace>, StoreError>;

    /// Whether the workspace exists: asked by a workspace-scoped read that found nothing,
    /// so that a mistyped workspace id answers NOT_FOUND instead of an empty list.
    async fn workspace_exists(&self, workspace_id: &str) -> Result<bool, StoreError> {
        Ok(self.get_workspace(workspace_id).await?.is_some())
    }

    /// Applies the patch to the row as locked. A change of plan changes whether the
    /// workspace's keys verify, and of its pool what they count against: an event is
    /// appended for each of them (deleted ones aside), and their secret hashes returned
    /// for this replica's cache.
    async fn update_workspace(
        &self,
        workspace_id: &str,
        patch: &WorkspacePatch,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(Workspace, Vec<KeyHash>), StoreError>;

    /// The pool `owner`'s keys in the workspace share (all empty: none).
    async fn owner_limits(
        &self,
        workspace_id: &str,
        owner: &Owner,
    ) -> Result<OwnerPool, StoreError>;

    /// Sets the owner's pool (no limits and no budget removes it) under the workspace
    /// row's share lock, [`StoreError::NotFound`] without the workspace. A change reloads
    /// the owner's keys (an event each); returns the pool as stored and their secret
    /// hashes.
    async fn set_owner_limits(
        &self,
        workspace_id: &str,
        owner: &Owner,
        limits: &[RateLimit],
        budget: Option<PoolBudget>,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(OwnerPool, Vec<KeyHash>), StoreError>;
}

/// Teams and their service accounts.
#[async_trait]
pub trait TeamStore: Send + Sync + 'static {
    /// [`StoreError::AlreadyExists`] when the team id is taken in the workspace.
    async fn insert_team(&self, team: &Team, audit: &AuditContext) -> Result<(), StoreError>;

    async fn get_team(&self, workspace_id: &str, team_id: &str)
    -> Result<Option<Team>, StoreError>;

    async fn list_teams(&self, workspace_id: &str) -> Result<Vec<Team>, StoreError>;

    /// Applies `patch` to the team as it stands when its row is locked, so that two
    /// updates of different fields both take effect (neither writes back a stale copy of
    /// the other's field), and sets `updated_at` to `now`, with its audit event. When the
    /// team's reach changed, appends an `updated` event for each of its keys (same
    /// transaction). Returns the team as written and every secret hash a cache must drop;
    /// [`StoreError::NotFound`] when there is no such team.
    async fn update_team(
        &self,
        workspace_id: &str,
        team_id: &str,
        patch: &TeamPatch,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(Team, Vec<KeyHash>), StoreError>;

    /// [`StoreError::AlreadyExists`] when the id is taken in the workspace.
    async fn insert_service_account(
        &self,
        account: &ServiceAccount,
        audit: &AuditContext,
    ) -> Result<(), StoreError>;

    async fn get_service_account(
        &self,
        workspace_id: &str,
        service_account_id: &str,
    ) -> Result<Option<ServiceAccount>, StoreError>;

    async fn list_service_accounts(
        &self,
        workspace_id: &str,
        team_id: &str,
    ) -> Result<Vec<ServiceAccount>, StoreError>;

    /// Deletes the team and its service accounts; [`StoreError::NotFound`] when there is
    /// no such team, refused ([`StoreError::Precondition`], `TEAM_IN_USE`) while it has
    /// keys neither revoked nor deleted (an expired key can be renewed).
    async fn delete_team(
        &self,
        workspace_id: &str,
        team_id: &str,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(), StoreError>;

    /// Refused ([`StoreError::Precondition`]) while the account owns live keys.
    async fn delete_service_account(
        &self,
        workspace_id: &str,
        service_account_id: &str,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(), StoreError>;
}

/// Access groups, the named target sets keys and teams' reach refer to.
#[async_trait]
pub trait AccessGroupStore: Send + Sync + 'static {
    /// [`StoreError::AlreadyExists`] when the name is taken in the workspace.
    async fn insert_group(
        &self,
        group: &AccessGroup,
        audit: &AuditContext,
    ) -> Result<(), StoreError>;

    async fn list_groups(&self, workspace_id: &str) -> Result<Vec<AccessGroup>, StoreError>;

    /// Sets a group's targets and appends an `updated` event for every key that names it
    /// or whose team's reach names it (one transaction); returns the group and every
    /// secret hash a cache must drop.
    async fn update_group(
        &self,
        workspace_id: &str,
        name: &str,
        targets: &std::collections::BTreeSet<String>,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(AccessGroup, Vec<KeyHash>), StoreError>;

    /// Refused ([`StoreError::Precondition`]) while keys or a team's reach name the group.
    async fn delete_group(
        &self,
        workspace_id: &str,
        name: &str,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(), StoreError>;
}

/// Workspaces' provider keys, and the KEK bookkeeping (rewrap, check values).
#[async_trait]
pub trait ProviderKeyStore: Send + Sync + 'static {
    /// Stores the workspace's key for the record's provider, replacing any (the original
    /// `created_at` is kept), with its audit event. Returns the record as stored.
    async fn put_provider_key(
        &self,
        record: &ProviderKeyRecord,
        audit: &AuditContext,
    ) -> Result<ProviderKeyRecord, StoreError>;

    async fn get_provider_key(
        &self,
        workspace_id: &str,
        provider: Provider,
    ) -> Result<Option<ProviderKeyRecord>, StoreError>;

    async fn list_provider_keys(
        &self,
        workspace_id: &str,
    ) -> Result<Vec<ProviderKeyRecord>, StoreError>;

    /// [`StoreError::NotFound`] when there is none (nothing written).
    async fn delete_provider_key(
        &self,
        workspace_id: &str,
        provider: Provider,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(), StoreError>;

    /// Up to `limit` records whose data key is wrapped by another KEK version than
    /// `current`.
    async fn provider_keys_to_rewrap(
        &self,
        current: u32,
        limit: u32,
    ) -> Result<Vec<ProviderKeyRecord>, StoreError>;

    /// Replaces a record's wrapped data key if it is still `expected` (a concurrent put
    /// wins); returns whether it did.
    async fn swap_wrapped_dek(
        &self,
        record_id: &str,
        expected: &[u8],
        kek_version: u32,
        wrapped_dek: &[u8],
    ) -> Result<bool, StoreError>;

    /// The KEK versions stored records are wrapped by.
    async fn kek_versions_in_use(&self) -> Result<Vec<u32>, StoreError>;

    /// The stored check value of KEK `version`, storing `value` first if there is none.
    async fn kek_check(
        &self,
        version: u32,
        value: &[u8],
        now: Micros,
    ) -> Result<Vec<u8>, StoreError>;
}

/// A webhook endpoint as stored. Its signing secret is sealed (see `crypto.rs`), bound
/// to the webhook id; Debug shows neither the sealed secret nor its data key.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookRecord {
    pub webhook_id: String,
    pub workspace_id: String,
    pub url: String,
    pub event_types: Vec<EventType>,
    pub kek_version: u32,
    pub wrapped_dek: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub created_at: Micros,
    pub updated_at: Micros,
    /// The endpoint's cursor in its workspace's outbox: every event at or below it is
    /// done with.
    pub delivered_seq: i64,
    /// The first failure of the current run of failures.
    pub failing_since: Option<Micros>,
    pub failures: u32,
    pub next_attempt_at: Micros,
    /// Why the last delivery failed (no secret: a status code or a connection error).
    pub last_error: String,
    pub disabled_at: Option<Micros>,
}

impl std::fmt::Debug for WebhookRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookRecord")
            .field("webhook_id", &self.webhook_id)
            .field("workspace_id", &self.workspace_id)
            .field("url", &self.url)
            .field("event_types", &self.event_types)
            .field("kek_version", &self.kek_version)
            .field("secret", &"<sealed>")
            .field("delivered_seq", &self.delivered_seq)
            .field("failures", &self.failures)
            .field("disabled_at", &self.disabled_at)
            .finish_non_exhaustive()
    }
}

/// One event of a workspace's webhook outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEvent {
    pub workspace_id: String,
    /// Commit-ordered within the workspace.
    pub seq: i64,
    pub event_type: EventType,
    pub key_id: String,
    /// The payload's `data`, as JSON.
    pub data: String,
    pub occurred_at: Micros,
}

/// A failed delivery to record: when, when to try again, why; `disable` when the
/// endpoint is given up on (its audit row is written with it).
#[derive(Clone, Debug)]
pub struct DeliveryFailure {
    pub at: Micros,
    pub next_attempt_at: Micros,
    pub error: String,
    pub disable: Option<AuditContext>,
}

/// Webhook endpoints, the outbox they are delivered from, and the notices of expiry and
/// budget thresholds. The outbox is written by the key mutations themselves (in their
/// transaction, see `sql::webhooks`), for workspaces that have an endpoint.
#[async_trait]
pub trait WebhookStore: Send + Sync + 'static {
    /// Stores a new endpoint, its cursor at the workspace's outbox head (it receives the
    /// events committed after it), with its audit row. Returns it as stored. Refused
    /// ([`StoreError::Precondition`], `WEBHOOK_LIMIT_REACHED`) when the workspace has
    /// `domain::webhook::MAX_WEBHOOKS_PER_WORKSPACE` endpoints, counted under the lock of
    /// its outbox head; the refusal is audited (`denied`) in the same transaction.
    async fn insert_webhook(
        &self,
        record: &WebhookRecord,
        audit: &AuditContext,
    ) -> Result<WebhookRecord, StoreError>;

    async fn get_webhook(
        &self,
        workspace_id: &str,
        webhook_id: &str,
    ) -> Result<Option<WebhookRecord>, StoreError>;

    /// The workspace's endpoints, oldest first.
    async fn list_webhooks(&self, workspace_id: &str) -> Result<Vec<WebhookRecord>, StoreError>;

    /// [`StoreError::NotFound`] when there is none (nothing written).
    async fn delete_webhook(
        &self,
        workspace_id: &str,
        webhook_id: &str,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(), StoreError>;

    /// Replaces the sealed signing secret; [`StoreError::NotFound`] when there is none.
    async fn replace_webhook_secret(
        &self,
        workspace_id: &str,
        webhook_id: &str,
        sealed: (u32, &[u8], &[u8]),
        now: Micros,
        audit: &AuditContext,
    ) -> Result<WebhookRecord, StoreError>;

    /// Up to `limit` enabled endpoints with an event after their cursor and no retry
    /// pending after `now`.
    async fn due_webhooks(&self, now: Micros, limit: u32)
    -> Result<Vec<WebhookRecord>, StoreError>;

    /// Up to `limit` events of the workspace's outbox after `after_seq`, in seq order.
    async fn read_outbox(
        &self,
        workspace_id: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<OutboxEvent>, StoreError>;

    /// Moves the endpoint's cursor forward to `through_seq` (never back) and clears its
    /// failures.
    async fn webhook_delivered(&self, webhook_id: &str, through_seq: i64)
    -> Result<(), StoreError>;

    /// Records a failed delivery (and, when `failure.disable` is set, disables the
    /// endpoint with its audit row, in one transaction).
    async fn webhook_failed(
        &self,
        webhook_id: &str,
        failure: &DeliveryFailure,
    ) -> Result<(), StoreError>;

    /// Announces `key.expiring` for up to `limit` keys whose notice for one of `leads`
    /// is due at `now` (see `domain::webhook::due_expiry_leads`), in workspaces with an
    /// endpoint for it; each lead is marked sent in the same transaction. Returns how
    /// many were announced.
    async fn announce_expiring(
        &self,
        now: Micros,
        leads: &[Micros],
        limit: u32,
    ) -> Result<usize, StoreError>;

    /// Announces `key.budget_threshold` for up to `limit` keys whose stored spend in the
    /// current period reached a threshold not yet announced in that period.
    async fn announce_budget_thresholds(
        &self,
        now: Micros,
        limit: u32,
    ) -> Result<usize, StoreError>;

    /// Deletes outbox events older than `older_than` that every endpoint of their
    /// workspace is past (all of them, where it has none left).
    async fn prune_outbox(&self, older_than: Micros) -> Result<u64, StoreError>;

    /// Deletes notice marks sent before `older_than` that can no longer matter: those of
    /// a key deleted or gone, and budget marks of a period other than the one the key's
    /// stored spend counts in.
    async fn prune_notices(&self, older_than: Micros) -> Result<u64, StoreError>;

    /// When the oldest event an enabled endpoint still waits for occurred.
    async fn oldest_undelivered(&self) -> Result<Option<Micros>, StoreError>;

    /// Up to `limit` endpoints whose signing secret's data key is wrapped by another KEK
    /// version than `current`.
    async fn webhooks_to_rewrap(
        &self,
        current: u32,
        limit: u32,
    ) -> Result<Vec<WebhookRecord>, StoreError>;

    /// Replaces an endpoint's wrapped data key if it is still `expected` (a concurrent
    /// rotation of its secret wins); returns whether it did.
    async fn swap_webhook_dek(
        &self,
        webhook_id: &str,
        expected: &[u8],
        kek_version: u32,
        wrapped_dek: &[u8],
    ) -> Result<bool, StoreError>;
}

/// The database's health, for readiness and metrics, and the Postgres pool for LISTEN.
#[async_trait]
pub trait HealthStore: Send + Sync + 'static {
    /// Answers when the database does.
    async fn ping(&self) -> Result<(), StoreError>;

    /// The connection pool's figures, for metrics.
    fn pool_stats(&self) -> PoolStats;

    /// The Postgres pool, for LISTEN; `None` for stores that fan out in process.
    fn postgres_pool(&self) -> Option<&sqlx::PgPool> {
        None
    }
}

/// Everything a store does, as one trait object: `Arc<dyn Store>` is what the services
/// hold, and every aggregate's methods are callable on it. Implemented for any type that
/// implements every aggregate's trait; a module that uses one aggregate only may hold
/// that trait instead (`Arc<dyn Store>` upcasts to it).
pub trait Store:
    KeyStore
    + UsageStore
    + EventStore
    + AuditStore
    + WorkspaceStore
    + TeamStore
    + AccessGroupStore
    + ProviderKeyStore
    + WebhookStore
    + HealthStore
{
}

impl<T> Store for T where
    T: KeyStore
        + UsageStore
        + EventStore
        + AuditStore
        + WorkspaceStore
        + TeamStore
        + AccessGroupStore
        + ProviderKeyStore
        + WebhookStore
        + HealthStore
{
}

/// Opens the store a database URL names (`postgres://...` or `sqlite:...`) and runs its
/// migrations.
pub async fn open(url: &str, max_connections: u32) -> Result<std::sync::Arc<dyn Store>, OpenError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(
            postgres::PgStore::connect(url, max_connections).await?,
        ))
    } else if url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(
            sqlite::SqliteStore::connect(url, max_connections).await?,
        ))
    } else {
        Err(OpenError::UnknownScheme)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("database URL must start with postgres://, postgresql:// or sqlite:")]
    UnknownScheme,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl OpenError {
    /// Whether opening again later can succeed with nothing changed: the database was
    /// unreachable, refused the connection, was starting up or shutting down (also while
    /// the migrations ran). A bad URL, a refused password, a missing database or a
    /// migration the database rejects are not: waiting changes nothing.
    pub fn is_transient(&self) -> bool {
        use sqlx::migrate::MigrateError;
        match self {
            OpenError::Store(StoreError::Unavailable(_)) => true,
            OpenError::Store(StoreError::Migrate(
                MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _),
            )) => is_unavailable(e),
            _ => false,
        }
    }
}

/// One page of a listing asked for one row more than `page_size` (that row tells there is
/// a next page): the page, and the cursor of its last row when there is a next one.
pub fn split_page<T, C>(
    mut rows: Vec<T>,
    page_size: u32,
    cursor: impl FnOnce(&T) -> C,
) -> (Vec<T>, Option<C>) {
    if rows.len() > page_size as usize {
        rows.truncate(page_size as usize);
        let next = rows.last().map(cursor);
        (rows, next)
    } else {
        (rows, None)
    }
}

/// Opaque page tokens: URL-safe base64 of a versioned cursor, so clients cannot depend on
/// their content and a tampered token is refused, not misread.
pub mod page_token {
    use super::*;

    const ENGINE: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

    pub fn encode_key_cursor(c: &KeyCursor) -> String {
        ENGINE.encode(format!("k1:{}:{}", c.created_at, c.key_id))
    }

    pub fn decode_key_cursor(token: &str) -> Option<KeyCursor> {
        let raw = String::from_utf8(ENGINE.decode(token).ok()?).ok()?;
        let rest = raw.strip_prefix("k1:")?;
        let (created_at, key_id) = rest.split_once(':')?;
        let key_id = key_id.to_owned();
        crate::domain::ids::is_key_id(&key_id).then_some(())?;
        Some(KeyCursor {
            created_at: created_at.parse().ok()?,
            key_id,
        })
    }

    pub fn encode_audit_cursor(before_id: i64) -> String {
        ENGINE.encode(format!("a1:{before_id}"))
    }

    pub fn decode_audit_cursor(token: &str) -> Option<i64> {
        let raw = String::from_utf8(ENGINE.decode(token).ok()?).ok()?;
        raw.strip_prefix("a1:")?
            .parse()
            .ok()
            .filter(|id: &i64| *id > 0)
    }

    pub fn encode_workspace_cursor(after: &str) -> String {
        ENGINE.encode(format!("w1:{after}"))
    }

    pub fn decode_workspace_cursor(token: &str) -> Option<String> {
        let raw = String::from_utf8(ENGINE.decode(token).ok()?).ok()?;
        let after = raw.strip_prefix("w1:")?;
        (!after.is_empty() && after.len() <= 128).then(|| after.to_owned())
    }

    /// A usage-history page's last (bucket, group).
    pub fn encode_usage_cursor(bucket: Micros, group: &str) -> String {
        ENGINE.encode(format!("u1:{bucket}:{group}"))
    }

    pub fn decode_usage_cursor(token: &str) -> Option<(Micros, String)> {
        let raw = String::from_utf8(ENGINE.decode(token).ok()?).ok()?;
        let (bucket, group) = raw.strip_prefix("u1:")?.split_once(':')?;
        (group.len() <= 300).then(|| Some((bucket.parse().ok()?, group.to_owned())))?
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn cursors_round_trip_and_garbage_is_refused() {
            let c = KeyCursor {
                created_at: 42,
                key_id: crate::domain::ids::new_key_id(&mut getrandom::SysRng).unwrap(),
            };
            assert_eq!(decode_key_cursor(&encode_key_cursor(&c)), Some(c));
            assert_eq!(decode_audit_cursor(&encode_audit_cursor(7)), Some(7));
            for bad in ["", "!!", "azE6eDp5", &encode_audit_cursor(7)] {
                assert_eq!(decode_key_cursor(bad), None, "{bad}");
            }
            assert_eq!(decode_audit_cursor(&encode_audit_cursor(-1)), None);
            assert_eq!(
                decode_workspace_cursor(&encode_workspace_cursor("ws_a")).as_deref(),
                Some("ws_a")
            );
            for bad in [
                "",
                "!!",
                &encode_workspace_cursor(""),
                &encode_audit_cursor(7),
            ] {
                assert_eq!(decode_workspace_cursor(bad), None, "{bad}");
            }
        }
    }
}
