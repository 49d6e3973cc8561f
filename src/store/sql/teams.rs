//! Teams and their service accounts: a team is a policy (its reach, its members' key
//! cap) over the keys that name it; a service account is a team's non-human key owner.
//!
//! A team update locks the team row first (the lock `insert_key` takes to count a
//! member's keys) and applies its patch to the row as locked, so concurrent updates of
//! different fields both stick. Deleting a service account deletes first and looks for
//! its keys after, so a concurrent issue that share-locked the account is seen.

use crate::domain::Micros;
use crate::domain::key_format::KeyHash;
use crate::domain::limits;
use crate::domain::pools::PoolBudget;
use crate::domain::refusal::{Reason, Refusal};
use crate::domain::team::{ServiceAccount, Team};
use crate::store::sql::keys::Covered;
use crate::store::sql::rows::{ServiceAccountRow, TeamRow, policy_json, team_columns};
use crate::store::sql::{Backend, Bind, Column, SqlStore};
use crate::store::{AuditContext, StoreError, TeamPatch, TeamStore};

/// One team by id, every column (`TeamRow`).
pub(super) const TEAM_BY_ID: &str = concat!(
    "SELECT ",
    team_columns!(),
    " FROM teams WHERE workspace_id = $1 AND team_id = $2"
);

/// The live keys (neither revoked, deleted nor expired at `$4`) of owner `$3` in team `$2`
/// of workspace `$1`: what a team's `max_keys_per_user` caps.
pub(super) const MEMBER_KEYS: &str = "SELECT count(*) FROM api_keys WHERE workspace_id = $1 \
     AND team_id = $2 AND owner_id = $3 AND deleted_at IS NULL AND revoked_at IS NULL \
     AND (expires_at IS NULL OR expires_at > $4)";

#[async_trait::async_trait]
impl<B: Backend> TeamStore for SqlStore<B>
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
    async fn insert_team(&self, team: &Team, audit: &AuditContext) -> Result<(), StoreError> {
        let mut m = self.begin().await?;
        m.lock_groups(&team.workspace_id, &team.policy.resource_access.groups)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO teams (workspace_id, team_id, name, policy, rate_limits, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, $6, $5, $5) \
             ON CONFLICT (workspace_id, team_id) DO NOTHING",
        )
        .bind(&team.workspace_id)
        .bind(&team.team_id)
        .bind(&team.name)
        .bind(policy_json(&team.policy))
        .bind(team.created_at)
        .bind(limits::join(&team.rate_limits))
        .execute(m.conn())
        .await?;
        if B::rows_affected(&inserted) == 0 {
            return Err(StoreError::AlreadyExists);
        }
        m.commit_with_audit(&team.workspace_id, audit, team.created_at)
            .await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_team(
        &self,
        workspace_id: &str,
        team_id: &str,
    ) -> Result<Option<Team>, StoreError> {
        let row: Option<TeamRow> = sqlx::query_as(TEAM_BY_ID)
            .bind(workspace_id)
            .bind(team_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(TryInto::try_into).transpose()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_teams(&self, workspace_id: &str) -> Result<Vec<Team>, StoreError> {
        let rows: Vec<TeamRow> = sqlx::query_as(concat!(
            "SELECT ",
            team_columns!(),
            " FROM teams WHERE workspace_id = $1 ORDER BY team_id"
        ))
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
        patch: &TeamPatch,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(Team, Vec<KeyHash>), StoreError> {
        let mut m = self.begin().await?;
        let before: Option<TeamRow> = sqlx::query_as(B::for_update(TEAM_BY_ID))
            .bind(workspace_id)
            .bind(team_id)
            .fetch_optional(m.conn())
            .await?;
        let before: Team = before.ok_or(StoreError::NotFound)?.try_into()?;
        let mut team = before.clone();
        if let Some(name) = &patch.name {
            team.name.clone_from(name);
        }
        if let Some(policy) = &patch.policy {
            m.lock_groups(workspace_id, &policy.resource_access.groups)
                .await?;
            team.policy = policy.clone();
        }
        if let Some(rate_limits) = &patch.rate_limits {
            team.rate_limits.clone_from(rate_limits);
        }
        if let Some(budget) = patch.budget {
            team.budget = PoolBudget::anchored(budget, before.budget.as_ref(), now);
        }
        team.updated_at = now;
        sqlx::query(
            "UPDATE teams SET name = $3, policy = $4, updated_at = $5, rate_limits = $6, \
             budget = $7 WHERE workspace_id = $1 AND team_id = $2",
        )
        .bind(&team.workspace_id)
        .bind(&team.team_id)
        .bind(&team.name)
        .bind(policy_json(&team.policy))
        .bind(team.updated_at)
        .bind(limits::join(&team.rate_limits))
        .bind(PoolBudget::to_text(team.budget.as_ref()))
        .execute(m.conn())
        .await?;
        // A change of the team's reach changes what its keys reach, and of its pool what
        // they count against: every replica reloads them.
        let stale = if before.policy.resource_access == team.policy.resource_access
            && before.rate_limits == team.rate_limits
            && before.budget == team.budget
        {
            Vec::new()
        } else {
            m.reload_covered(
                Covered::Team(&team.workspace_id, &team.team_id),
                team.updated_at,
            )
            .await?
        };
        m.commit_with_audit(&team.workspace_id, audit, team.updated_at)
            .await?;
        Ok((team, stale))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn insert_service_account(
        &self,
        account: &ServiceAccount,
        audit: &AuditContext,
    ) -> Result<(), StoreError> {
        let mut m = self.begin().await?;
        // The team is share-locked while the account is added, so a concurrent DeleteTeam
        // either waits for it (and deletes it with the team) or has deleted the team.
        let team: Option<String> = sqlx::query_scalar(B::for_share(
            "SELECT team_id FROM teams WHERE workspace_id = $1 AND team_id = $2",
        ))
        .bind(&account.workspace_id)
        .bind(&account.team_id)
        .fetch_optional(m.conn())
        .await?;
        if team.is_none() {
            return Err(StoreError::NotFound);
        }
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
        .execute(m.conn())
        .await?;
        if B::rows_affected(&inserted) == 0 {
            return Err(StoreError::AlreadyExists);
        }
        m.commit_with_audit(&account.workspace_id, audit, account.created_at)
            .await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn delete_team(
        &self,
        workspace_id: &str,
        team_id: &str,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(), StoreError> {
        let mut m = self.begin().await?;
        // Delete first, then look for keys: the delete waits for a transaction that has
        // locked the team row to issue a key in it (`insert_key`) or add an account, and
        // the look that follows, a statement of its own, sees what that one committed.
        // Keys found roll the delete back.
        let deleted = sqlx::query("DELETE FROM teams WHERE workspace_id = $1 AND team_id = $2")
            .bind(workspace_id)
            .bind(team_id)
            .execute(m.conn())
            .await?;
        if B::rows_affected(&deleted) == 0 {
            return Err(StoreError::NotFound);
        }
        let keys: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM api_keys WHERE workspace_id = $1 AND team_id = $2 \
             AND deleted_at IS NULL AND revoked_at IS NULL",
        )
        .bind(workspace_id)
        .bind(team_id)
        .fetch_one(m.conn())
        .await?;
        if keys > 0 {
            return Err(StoreError::Precondition(
                Refusal::new(
                    Reason::TeamInUse,
                    format!(
                        "team {team_id} has {keys} key(s) neither revoked nor deleted: revoke or delete them first"
                    ),
                )
                .with("workspace_id", workspace_id)
                .with("team_id", team_id),
            ));
        }
        sqlx::query("DELETE FROM service_accounts WHERE workspace_id = $1 AND team_id = $2")
            .bind(workspace_id)
            .bind(team_id)
            .execute(m.conn())
            .await?;
        m.commit_with_audit(workspace_id, audit, now).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_service_account(
        &self,
        workspace_id: &str,
        service_account_id: &str,
    ) -> Result<Option<ServiceAccount>, StoreError> {
        let row: Option<ServiceAccountRow> = sqlx::query_as(
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
    ) -> Result<Vec<ServiceAccount>, StoreError> {
        let rows: Vec<ServiceAccountRow> = sqlx::query_as(
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
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(), StoreError> {
        let mut m = self.begin().await?;
        // Delete first, then look for keys: the delete waits for an issue that has
        // share-locked the account to own a key, and the look, a statement of its
        // own, sees that key once committed. Found keys roll the delete back.
        let deleted = sqlx::query(
            "DELETE FROM service_accounts WHERE workspace_id = $1 AND service_account_id = $2",
        )
        .bind(workspace_id)
        .bind(service_account_id)
        .execute(m.conn())
        .await?;
        if B::rows_affected(&deleted) == 0 {
            return Err(StoreError::NotFound);
        }
        let owned: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM api_keys WHERE workspace_id = $1 \
             AND owner_kind = 'service_account' AND owner_id = $2 \
             AND deleted_at IS NULL AND revoked_at IS NULL",
        )
        .bind(workspace_id)
        .bind(service_account_id)
        .fetch_one(m.conn())
        .await?;
        if owned > 0 {
            return Err(StoreError::Precondition(
                Refusal::new(
                    Reason::ServiceAccountOwnsKeys,
                    "the service account owns keys that are not revoked: revoke or delete them first",
                )
                .with("service_account_id", service_account_id),
            ));
        }
        m.commit_with_audit(workspace_id, audit, now).await
    }
}
