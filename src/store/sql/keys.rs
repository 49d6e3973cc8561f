//! Keys and their secrets: issue, read, list, the verification lookup, and the mutations
//! (update, rotate, revoke, delete), each a [`Mutation`] that locks the key row, changes
//! it, appends the key's event and audit row, and commits.
//!
//! [`FIND_SECRET`] stays a `&'static str` (no lock suffix, no allocation): it is
//! VerifyKey's cache-miss path, and the benchmark's database floor runs the same text.

use sqlx::{AssertSqlSafe, SqlSafeStr};

use crate::domain::Micros;
use crate::domain::access::AccessGroup;
use crate::domain::event::EventKind;
use crate::domain::key::{KeyRecord, OwnerKind};
use crate::domain::key_format::KeyHash;
use crate::domain::pools::{self, Pool};
use crate::domain::team::{SelfServiceKey, Team, TeamIssue, check_team_issue};
use crate::store::sql::groups::WORKSPACE_GROUPS;
use crate::store::sql::rows::{
    FoundRow, GroupRow, KeyRow, SecretRow, TeamRow, budget_column, hashes, join_scopes, join_set,
    join_targets, key_columns, metadata_json, status_code,
};
use crate::store::sql::teams::{MEMBER_KEYS, TEAM_BY_ID};
use crate::store::sql::{Backend, Bind, Column, Mutation, SqlStore};
use crate::store::{
    AuditContext, AuditOutcome, Changed, FoundSecret, KeyCursor, KeyFilter, KeyPatch, KeySelection,
    KeyStore, Rotated, StoreError,
};

/// A key by a secret's hash: one round trip, four primary-key lookups (the secret by
/// hash, its key by id, its workspace's plan and pool, its owner's pool). The joined
/// tables are read through derived tables that rename their columns, so the key's own
/// (unqualified) columns stay unambiguous; both databases flatten them into plain joins.
/// The cache-miss benchmark's floor issues the same statement.
pub(crate) const FIND_SECRET: &str = concat!(
    "SELECT ",
    key_columns!(),
    ", secret_valid_until, workspace_plan, workspace_limits, workspace_budget, \
     workspace_spent, workspace_epoch, owner_limits, owner_budget, owner_spent, owner_epoch \
     FROM api_keys JOIN \
     (SELECT key_id, valid_until AS secret_valid_until FROM key_secrets \
      WHERE secret_hash = $1) AS secret USING (key_id) \
     LEFT JOIN (SELECT workspace_id AS w_id, plan AS workspace_plan, \
      rate_limits AS workspace_limits, budget AS workspace_budget, \
      spent_micros AS workspace_spent, spend_epoch AS workspace_epoch FROM workspaces) AS w \
      ON w.w_id = api_keys.workspace_id \
     LEFT JOIN (SELECT workspace_id AS o_ws, owner_kind AS o_kind, owner_id AS o_id, \
      rate_limits AS owner_limits, budget AS owner_budget, spent_micros AS owner_spent, \
      spend_epoch AS owner_epoch FROM owner_limits) AS o \
      ON o.o_ws = api_keys.workspace_id AND o.o_kind = api_keys.owner_kind \
      AND o.o_id = api_keys.owner_id"
);

/// The text the stored metadata JSON of a key holding the entry `key: value` contains,
/// and no other key's does: the entry as `metadata_json` (serde_json, compact) writes it.
/// A quote inside a string is escaped there, so the entry's own quotes cannot be found
/// inside another value.
fn metadata_entry(key: &str, value: &str) -> String {
    format!(
        "{}:{}",
        serde_json::Value::from(key),
        serde_json::Value::from(value)
    )
}

impl<B: Backend> Mutation<B>
where
    for<'c> &'c mut B::Connection: sqlx::Executor<'c, Database = B>,
    for<'r> &'r str: sqlx::ColumnIndex<B::Row>,
    usize: sqlx::ColumnIndex<B::Row>,
    i64: Column<B>,
    String: Column<B>,
    Vec<u8>: Column<B>,
    Option<i64>: Column<B>,
    Option<String>: Column<B>,
    for<'a> &'a str: Bind<B>,
    for<'a> &'a [u8]: Bind<B>,
{
    /// The key row, locked until commit; deleted keys are not found.
    pub(super) async fn locked_key(&mut self, key_id: &str) -> Result<KeyRecord, StoreError> {
        let row: Option<KeyRow> = sqlx::query_as(B::for_update(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE key_id = $1 AND deleted_at IS NULL"
        )))
        .bind(key_id)
        .fetch_optional(self.conn())
        .await?;
        row.ok_or(StoreError::NotFound)?.try_into()
    }

    /// The hashes of every secret of the key (current and replaced ones).
    pub(super) async fn secret_hashes(&mut self, key_id: &str) -> Result<Vec<KeyHash>, StoreError> {
        let rows: Vec<SecretRow> =
            sqlx::query_as("SELECT secret_hash FROM key_secrets WHERE key_id = $1")
                .bind(key_id)
                .fetch_all(self.conn())
                .await?;
        hashes(rows)
    }

    /// The hash of the key's current secret (the one without an end).
    pub(super) async fn current_hash(&mut self, key_id: &str) -> Result<KeyHash, StoreError> {
        let row: SecretRow = sqlx::query_as(
            "SELECT secret_hash FROM key_secrets WHERE key_id = $1 AND valid_until IS NULL",
        )
        .bind(key_id)
        .fetch_one(self.conn())
        .await?;
        hashes(vec![row])?
            .pop()
            .ok_or_else(|| StoreError::Corrupt("no current secret".into()))
    }

    /// Revokes a key locked in this transaction (not revoked yet) at `now`; returns the
    /// `revoked` event to record for it.
    pub(super) async fn revoke_locked(
        &mut self,
        key: &mut KeyRecord,
        reason: &str,
        now: Micros,
    ) -> Result<(EventKind, KeyHash), StoreError> {
        let current = self.current_hash(&key.key_id).await?;
        sqlx::query(
            "UPDATE api_keys SET revoked_at = $2, revoke_reason = $3, updated_at = $2 \
             WHERE key_id = $1",
        )
        .bind(&key.key_id)
        .bind(now)
        .bind(reason)
        .execute(self.conn())
        .await?;
        key.revoked_at = Some(now);
        key.revoke_reason = Some(reason.to_owned());
        key.updated_at = now;
        Ok((EventKind::Revoked, current))
    }

    /// Appends an `updated` event for each key (their reach changed without the rows
    /// changing), so every replica reloads them; returns their secret hashes.
    pub(super) async fn reload_keys(
        &mut self,
        rows: Vec<KeyRow>,
        now: Micros,
    ) -> Result<Vec<KeyHash>, StoreError> {
        let mut stale = Vec::new();
        for row in rows {
            let key: KeyRecord = row.try_into()?;
            stale.extend(self.reload_key(&key, now).await?);
        }
        Ok(stale)
    }

    /// Appends an `updated` event for one key, so every replica reloads it; returns its
    /// secret hashes.
    pub(super) async fn reload_key(
        &mut self,
        key: &KeyRecord,
        now: Micros,
    ) -> Result<Vec<KeyHash>, StoreError> {
        let hashes = self.secret_hashes(&key.key_id).await?;
        let current = self.current_hash(&key.key_id).await?;
        self.append_event(EventKind::Updated, key, &current, &hashes, now)
            .await?;
        Ok(hashes)
    }

    /// Locks and reloads ([`Mutation::reload_keys`]) every key of `covered` not deleted:
    /// what a change of a plan, a reach or a pool does to the keys it covers.
    pub(super) async fn reload_covered(
        &mut self,
        covered: Covered<'_>,
        now: Micros,
    ) -> Result<Vec<KeyHash>, StoreError> {
        const BY_WORKSPACE: &str = concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE workspace_id = $1 AND deleted_at IS NULL ORDER BY key_id"
        );
        const BY_TEAM: &str = concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE workspace_id = $1 AND team_id = $2 \
             AND deleted_at IS NULL ORDER BY key_id"
        );
        const BY_OWNER: &str = concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE workspace_id = $1 AND owner_kind = $2 AND owner_id = $3 \
             AND deleted_at IS NULL ORDER BY key_id"
        );
        let rows: Vec<KeyRow> = match covered {
            Covered::Workspace(workspace_id) => {
                sqlx::query_as(B::for_update(BY_WORKSPACE))
                    .bind(workspace_id)
                    .fetch_all(self.conn())
                    .await?
            }
            Covered::Team(workspace_id, team_id) => {
                sqlx::query_as(B::for_update(BY_TEAM))
                    .bind(workspace_id)
                    .bind(team_id)
                    .fetch_all(self.conn())
                    .await?
            }
            Covered::Owner(workspace_id, owner) => {
                sqlx::query_as(B::for_update(BY_OWNER))
                    .bind(workspace_id)
                    .bind(owner.kind.as_str())
                    .bind(owner.id.as_str())
                    .fetch_all(self.conn())
                    .await?
            }
        };
        self.reload_keys(rows, now).await
    }
}

/// The keys a change covers (see [`Mutation::reload_covered`]).
pub(super) enum Covered<'a> {
    Workspace(&'a str),
    Team(&'a str, &'a str),
    Owner(&'a str, &'a crate::domain::key::Owner),
}

#[async_trait::async_trait]
impl<B: Backend> KeyStore for SqlStore<B>
where
    for<'c> &'c mut B::Connection: sqlx::Executor<'c, Database = B>,
    for<'r> &'r str: sqlx::ColumnIndex<B::Row>,
    usize: sqlx::ColumnIndex<B::Row>,
    i64: Column<B>,
    String: Column<B>,
    Vec<u8>: Column<B>,
    Option<i64>: Column<B>,
    Option<String>: Column<B>,
    for<'a> &'a str: Bind<B>,
    for<'a> &'a [u8]: Bind<B>,
{
    #[tracing::instrument(level = "debug", skip_all)]
    async fn insert_key(
        &self,
        key: &KeyRecord,
        secret: &KeyHash,
        member: Option<&SelfServiceKey<'_>>,
        audit: &AuditContext,
    ) -> Result<(), StoreError> {
        let mut m = self.begin().await?;
        if let Some(team_id) = &key.team_id {
            // The team row's lock (the first lock taken, as `update_team` takes it)
            // serializes a team's member issues: the count below sees every key a
            // concurrent issue committed before it, and the policy judged is the one in
            // force when the key is written.
            let team: Option<TeamRow> = sqlx::query_as(B::for_update(TEAM_BY_ID))
                .bind(&key.workspace_id)
                .bind(team_id)
                .fetch_optional(m.conn())
                .await?;
            let team: Team = team.ok_or(StoreError::NotFound)?.try_into()?;
            let held: i64 = match member {
                Some(_) => {
                    sqlx::query_scalar(MEMBER_KEYS)
                        .bind(&key.workspace_id)
                        .bind(team_id)
                        .bind(&key.owner.id)
                        .bind(key.created_at)
                        .fetch_one(m.conn())
                        .await?
                }
                None => 0,
            };
            // A key owned by a service account: the account's team. The account's row
            // stays share-locked until commit, so it cannot be deleted in between
            // (`delete_service_account` deletes, then looks for keys the account owns).
            let account_team: Option<String> = if key.owner.kind == OwnerKind::ServiceAccount {
                sqlx::query_scalar(B::for_share(
                    "SELECT team_id FROM service_accounts \
                     WHERE workspace_id = $1 AND service_account_id = $2",
                ))
                .bind(&key.workspace_id)
                .bind(&key.owner.id)
                .fetch_optional(m.conn())
                .await?
            } else {
                None
            };
            let issue = TeamIssue {
                team_id,
                policy: &team.policy,
                held: u64::try_from(held).unwrap_or(0),
                service_account_team: account_team.as_deref(),
            };
            if let Err(refusal) = check_team_issue(&issue, &key.owner, member, key.created_at) {
                // Refused: nothing of the key is written, only its `denied` audit row,
                // in this same transaction.
                let denied = AuditContext {
                    detail: refusal.message.clone(),
                    ..audit.clone()
                };
                m.audit(
                    &key.workspace_id,
                    None,
                    AuditOutcome::Denied,
                    &denied,
                    key.created_at,
                )
                .await?;
                m.commit().await?;
                return Err(StoreError::Precondition(refusal));
            }
        }
        m.lock_groups(&key.workspace_id, &key.resource_access.groups)
            .await?;
        sqlx::query(concat!(
            "INSERT INTO api_keys (",
            key_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
             $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29)"
        ))
        .bind(&key.key_id)
        .bind(&key.workspace_id)
        .bind(&key.name)
        .bind(key.environment.as_str())
        .bind(&key.display)
        .bind(join_scopes(&key.scopes))
        .bind(key.owner.kind.as_str())
        .bind(&key.owner.id)
        .bind(&key.created_by)
        .bind(metadata_json(&key.metadata))
        .bind(key.created_at)
        .bind(key.updated_at)
        .bind(key.expires_at)
        .bind(key.revoked_at)
        .bind(&key.revoke_reason)
        .bind(key.rotated_at)
        .bind(key.deleted_at)
        .bind(crate::domain::limits::join(&key.rate_limits))
        .bind(budget_column(key.max_budget_micros))
        .bind(budget_column(Some(key.spent_micros)).unwrap_or(0))
        .bind(key.last_used_at)
        .bind(key.resource_access.mode.as_str())
        .bind(join_targets(&key.resource_access))
        .bind(key.network.join())
        .bind(join_set(&key.resource_access.groups))
        .bind(&key.team_id)
        .bind(key.budget_period.as_text())
        .bind(key.budget_reset_at)
        .bind(key.spend_epoch)
        .execute(m.conn())
        .await?;
        if let Some(at) = key.next_budget_reset(key.created_at) {
            sqlx::query("UPDATE api_keys SET budget_resets_at = $2 WHERE key_id = $1")
                .bind(&key.key_id)
                .bind(at)
                .execute(m.conn())
                .await?;
        }
        sqlx::query(
            "INSERT INTO key_secrets (secret_hash, key_id, created_at, valid_until) \
             VALUES ($1, $2, $3, NULL)",
        )
        .bind(&secret.as_bytes()[..])
        .bind(&key.key_id)
        .bind(key.created_at)
        .execute(m.conn())
        .await?;
        m.audit(
            &key.workspace_id,
            Some(&key.key_id),
            AuditOutcome::Success,
            audit,
            key.created_at,
        )
        .await?;
        m.announce(key, audit.action, key.created_at).await?;
        m.commit().await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_key(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row: Option<KeyRow> = sqlx::query_as(concat!(
            "SELECT ",
            key_columns!(),
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
        filter: &KeyFilter,
        limit: u32,
        after: Option<&KeyCursor>,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        // The metadata entry is found in the stored JSON as `metadata_json` writes it
        // (a case-sensitive position, never LIKE, which SQLite folds for ASCII case).
        let sql = format!(
            concat!(
                "SELECT ",
                key_columns!(),
                " FROM api_keys WHERE workspace_id = $1 AND deleted_at IS NULL \
                 AND ($2 = '' OR (owner_kind = $2 AND owner_id = $3)) \
                 AND ($4 = 0 \
                      OR ($4 = 1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $5)) \
                      OR ($4 = 2 AND revoked_at IS NOT NULL) \
                      OR ($4 = 3 AND revoked_at IS NULL AND expires_at <= $5)) \
                 AND ($6 = 0 OR created_at < $7 OR (created_at = $7 AND key_id < $8)) \
                 AND ($10 = 0 OR last_used_at IS NULL OR last_used_at < $11) \
                 AND ($12 = '' OR substr(name, 1, length($12)) = $12) \
                 AND ($13 = '' OR team_id = $13) \
                 AND ($14 = '' OR {position}(metadata, $14) > 0) \
                 ORDER BY created_at DESC, key_id DESC LIMIT $9"
            ),
            position = B::POSITION_FN
        );
        let rows: Vec<KeyRow> = sqlx::query_as(AssertSqlSafe(sql).into_sql_str())
            .bind(&filter.workspace_id)
            .bind(filter.owner.as_ref().map_or("", |o| o.kind.as_str()))
            .bind(filter.owner.as_ref().map_or("", |o| o.id.as_str()))
            .bind(status_code(filter.status))
            .bind(filter.now)
            .bind(i64::from(after.is_some()))
            .bind(after.map_or(0, |c| c.created_at))
            .bind(after.map_or("", |c| c.key_id.as_str()))
            .bind(i64::from(limit))
            .bind(i64::from(filter.unused_since.is_some()))
            .bind(filter.unused_since.unwrap_or(0))
            .bind(filter.name_prefix.as_deref().unwrap_or(""))
            .bind(filter.team_id.as_deref().unwrap_or(""))
            .bind(
                filter
                    .metadata
                    .as_ref()
                    .map_or_else(String::new, |(k, v)| metadata_entry(k, v)),
            )
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn find_secret(&self, hash: &KeyHash) -> Result<Option<FoundSecret>, StoreError> {
        // The key and what its reach depends on, over one connection: a key of no team
        // naming no group (most keys) costs the one statement.
        let mut conn = self.pool.acquire().await?;
        let row: Option<FoundRow> = sqlx::query_as(FIND_SECRET)
            .bind(&hash.as_bytes()[..])
            .fetch_optional(&mut *conn)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut found: FoundSecret = row.try_into()?;
        let key = &mut found.key;
        let mut team_pool = None;
        if let Some(team_id) = &key.team_id {
            let team: Option<TeamRow> = sqlx::query_as(TEAM_BY_ID)
                .bind(&key.workspace_id)
                .bind(team_id)
                .fetch_optional(&mut *conn)
                .await?;
            if let Some(row) = team {
                let team = Team::try_from(row)?;
                key.team_access = team.policy.resource_access;
                team_pool = Some(
                    Pool::team(&team.workspace_id, &team.team_id, team.rate_limits)
                        .with_budget(team.budget, team.spend),
                );
            }
        }
        if key.resource_access.names_groups() || key.team_access.names_groups() {
            let rows: Vec<GroupRow> = sqlx::query_as(WORKSPACE_GROUPS)
                .bind(&key.workspace_id)
                .fetch_all(&mut *conn)
                .await?;
            let groups: Vec<AccessGroup> = rows.into_iter().map(Into::into).collect();
            key.resource_access.resolve_groups(&groups);
            key.team_access.resolve_groups(&groups);
        }
        found.pools = pools::in_order(
            std::mem::take(&mut found.pools)
                .into_iter()
                .chain(team_pool),
        );
        Ok(Some(found))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn update_key(
        &self,
        key_id: &str,
        patch: &KeyPatch,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<Changed, StoreError> {
        let mut m = self.begin().await?;
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
                    .fetch_optional(m.conn())
                    .await?;
            if let Some(workspace_id) = workspace_id {
                m.lock_groups(&workspace_id, &access.groups).await?;
            }
        }
        let mut key = m.locked_key(key_id).await?;
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
        if let Some(period) = patch.budget_period {
            key.budget_period = period;
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
             resource_targets = $10, allowed_cidrs = $11, resource_groups = $12, \
             budget_period = $13, budget_resets_at = $14 WHERE key_id = $1",
        )
        .bind(key_id)
        .bind(&key.name)
        .bind(join_scopes(&key.scopes))
        .bind(key.expires_at)
        .bind(metadata_json(&key.metadata))
        .bind(now)
        .bind(crate::domain::limits::join(&key.rate_limits))
        .bind(budget_column(key.max_budget_micros))
        .bind(key.resource_access.mode.as_str())
        .bind(join_targets(&key.resource_access))
        .bind(key.network.join())
        .bind(join_set(&key.resource_access.groups))
        .bind(key.budget_period.as_text())
        .bind(key.next_budget_reset(now))
        .execute(m.conn())
        .await?;
        let current = m.current_hash(key_id).await?;
        m.finish(key, audit, now, Some((EventKind::Updated, current)))
            .await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn reset_due_budgets(&self, now: Micros, limit: u32) -> Result<usize, StoreError> {
        let mut m = self.begin().await?;
        let due: Vec<KeyRow> = sqlx::query_as(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE budget_resets_at IS NOT NULL AND budget_resets_at <= $1 \
             AND deleted_at IS NULL ORDER BY budget_resets_at LIMIT $2"
        ))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(m.conn())
        .await?;
        let mut reset = 0;
        for row in due {
            let mut key: KeyRecord = row.try_into()?;
            let epoch = key.spend_epoch_at(now);
            // Claimed on the row as read: a replica sweeping at the same time, or a
            // manual reset, that moved it first leaves nothing to do here.
            let claimed = sqlx::query(
                "UPDATE api_keys SET spend_epoch = $2, spent_micros = 0, budget_resets_at = $3 \
                 WHERE key_id = $1 AND budget_resets_at IS NOT NULL AND budget_resets_at <= $4",
            )
            .bind(&key.key_id)
            .bind(epoch.start)
            .bind(key.next_budget_reset(now))
            .bind(now)
            .execute(m.conn())
            .await?;
            if B::rows_affected(&claimed) != 1 {
                continue;
            }
            key.spend_epoch = epoch.start;
            key.spent_micros = 0;
            m.reload_key(&key, now).await?;
            let audit = AuditContext {
                actor_id: "keywarden".to_owned(),
                caller: "budget-period".to_owned(),
                action: "key.budget_period_reset",
                detail: format!("period: {}", key.budget_period.as_text()),
            };
            m.audit(
                &key.workspace_id,
                Some(&key.key_id),
                AuditOutcome::Success,
                &audit,
                now,
            )
            .await?;
            reset += 1;
        }
        m.commit().await?;
        Ok(reset)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn reset_budget(
        &self,
        key_id: &str,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<Changed, StoreError> {
        let mut m = self.begin().await?;
        let mut key = m.locked_key(key_id).await?;
        // A new epoch from now: spend of earlier epochs, stored or still in a replica's
        // usage book, no longer counts (see `domain::budget`).
        key.budget_reset_at = now;
        key.spend_epoch = key.spend_epoch_at(now).start;
        key.spent_micros = 0;
        key.updated_at = now;
        sqlx::query(
            "UPDATE api_keys SET budget_reset_at = $2, spend_epoch = $3, spent_micros = 0, \
             updated_at = $2, budget_resets_at = $4 WHERE key_id = $1",
        )
        .bind(key_id)
        .bind(now)
        .bind(key.spend_epoch)
        .bind(key.next_budget_reset(now))
        .execute(m.conn())
        .await?;
        let current = m.current_hash(key_id).await?;
        m.finish(key, audit, now, Some((EventKind::Updated, current)))
            .await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn rotate_key(
        &self,
        key_id: &str,
        new_secret: &KeyHash,
        new_display: &str,
        grace: Micros,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<Rotated, StoreError> {
        let mut m = self.begin().await?;
        let mut key = m.locked_key(key_id).await?;
        // Decided on the locked row: a concurrent revoke either committed before (and is
        // seen here) or waits for this rotation.
        key.check_rotatable(now).map_err(StoreError::Precondition)?;
        let old = m.current_hash(key_id).await?;
        let until = crate::domain::key::rotated_secret_valid_until(now, grace, key.expires_at);
        // Every older secret stops at `until` at the latest; one already ending
        // sooner (an earlier rotation's grace) keeps its earlier end.
        sqlx::query(
            "UPDATE key_secrets SET valid_until = $2 WHERE key_id = $1 \
             AND (valid_until IS NULL OR valid_until > $2)",
        )
        .bind(key_id)
        .bind(until)
        .execute(m.conn())
        .await?;
        sqlx::query(
            "INSERT INTO key_secrets (secret_hash, key_id, created_at, valid_until) \
             VALUES ($1, $2, $3, NULL)",
        )
        .bind(&new_secret.as_bytes()[..])
        .bind(key_id)
        .bind(now)
        .execute(m.conn())
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
        .execute(m.conn())
        .await?;
        let changed = m
            .finish(key, audit, now, Some((EventKind::Rotated, old)))
            .await?;
        Ok(Rotated {
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
        now: Micros,
        audit: &AuditContext,
    ) -> Result<Changed, StoreError> {
        let mut m = self.begin().await?;
        let mut key = m.locked_key(key_id).await?;
        let mut event = None;
        if key.revoked_at.is_none() {
            event = Some(m.revoke_locked(&mut key, reason, now).await?);
        }
        m.finish(key, audit, now, event).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn revoke_keys(
        &self,
        selection: &KeySelection,
        reason: &str,
        chunk: u32,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(u64, Vec<KeyHash>), StoreError> {
        let mut m = self.begin().await?;
        let rows: Vec<KeyRow> = sqlx::query_as(B::for_update(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE workspace_id = $1 AND revoked_at IS NULL \
             AND deleted_at IS NULL \
             AND ($2 = '' OR (owner_kind = $2 AND owner_id = $3)) \
             AND ($4 = '' OR team_id = $4) \
             AND ($5 = '' OR created_by = $5) \
             ORDER BY key_id LIMIT $6"
        )))
        .bind(&selection.workspace_id)
        .bind(selection.owner.as_ref().map_or("", |o| o.kind.as_str()))
        .bind(selection.owner.as_ref().map_or("", |o| o.id.as_str()))
        .bind(selection.team_id.as_deref().unwrap_or(""))
        .bind(selection.created_by.as_deref().unwrap_or(""))
        .bind(i64::from(chunk))
        .fetch_all(m.conn())
        .await?;
        let mut stale = Vec::new();
        let revoked = rows.len() as u64;
        for row in rows {
            let mut key: KeyRecord = row.try_into()?;
            let event = m.revoke_locked(&mut key, reason, now).await?;
            stale.extend(m.record(&key, audit, now, Some(event)).await?);
        }
        m.commit().await?;
        Ok((revoked, stale))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn delete_key(
        &self,
        key_id: &str,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<Changed, StoreError> {
        let mut m = self.begin().await?;
        let mut key = m.locked_key(key_id).await?;
        key.deleted_at = Some(now);
        key.updated_at = now;
        sqlx::query("UPDATE api_keys SET deleted_at = $2, updated_at = $2 WHERE key_id = $1")
            .bind(key_id)
            .bind(now)
            .execute(m.conn())
            .await?;
        let current = m.current_hash(key_id).await?;
        m.finish(key, audit, now, Some((EventKind::Deleted, current)))
            .await
    }
}
