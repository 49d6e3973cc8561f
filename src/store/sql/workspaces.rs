//! Workspaces: the tenant row every other record belongs to (its name and plan).
//! Creating one is refused when the id is taken; an update locks the row and applies its
//! patch to the row as locked.

use crate::domain::Micros;
use crate::domain::key::Owner;
use crate::domain::key_format::KeyHash;
use crate::domain::limits;
use crate::domain::limits::RateLimit;
use crate::domain::pools::PoolBudget;
use crate::domain::workspace::Workspace;
use crate::store::sql::keys::Covered;
use crate::store::sql::rows::{WorkspaceRow, pool_budget, pool_limits, stored_spend};
use crate::store::sql::{Backend, Bind, Column, SqlStore};
use crate::store::{AuditContext, OwnerPool, StoreError, WorkspacePatch, WorkspaceStore};

/// One workspace by id, every column (`WorkspaceRow`).
const WORKSPACE_BY_ID: &str = concat!(
    "SELECT ",
    workspace_columns!(),
    " FROM workspaces WHERE workspace_id = $1"
);

/// Every column of `workspaces`, as [`WorkspaceRow`] reads them.
macro_rules! workspace_columns {
    () => {
        "workspace_id, name, plan, rate_limits, created_at, updated_at, budget, spent_micros, \
         spend_epoch"
    };
}
use workspace_columns;

/// An owner's pool: its limits and budget as text and its spend, or no row.
const OWNER_LIMITS: &str = "SELECT rate_limits, budget, spent_micros, spend_epoch \
     FROM owner_limits WHERE workspace_id = $1 AND owner_kind = $2 AND owner_id = $3";

type OwnerRow = (String, String, i64, i64);

fn owner_pool(row: Option<OwnerRow>, workspace_id: &str) -> Result<OwnerPool, StoreError> {
    let Some((limits, budget, spent, epoch)) = row else {
        return Ok(OwnerPool::default());
    };
    Ok(OwnerPool {
        rate_limits: pool_limits(&limits, "owner limits in", workspace_id)?,
        budget: pool_budget(&budget, "owner limits in", workspace_id)?,
        spend: stored_spend(spent, epoch),
    })
}

#[async_trait::async_trait]
impl<B: Backend> WorkspaceStore for SqlStore<B>
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
    async fn insert_workspace(
        &self,
        workspace: &Workspace,
        audit: &AuditContext,
    ) -> Result<(), StoreError> {
        let mut m = self.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO workspaces (workspace_id, name, plan, rate_limits, created_at, \
             updated_at) VALUES ($1, $2, $3, $5, $4, $4) ON CONFLICT (workspace_id) DO NOTHING",
        )
        .bind(&workspace.workspace_id)
        .bind(&workspace.name)
        .bind(workspace.plan.as_str())
        .bind(workspace.created_at)
        .bind(limits::join(&workspace.rate_limits))
        .execute(m.conn())
        .await?;
        if B::rows_affected(&inserted) == 0 {
            return Err(StoreError::AlreadyExists);
        }
        m.commit_with_audit(&workspace.workspace_id, audit, workspace.created_at)
            .await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_workspace(&self, workspace_id: &str) -> Result<Option<Workspace>, StoreError> {
        let row: Option<WorkspaceRow> = sqlx::query_as(WORKSPACE_BY_ID)
            .bind(workspace_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(TryInto::try_into).transpose()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_workspaces(
        &self,
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<Workspace>, StoreError> {
        // Ids are never empty, so "after the empty string" is from the first.
        let rows: Vec<WorkspaceRow> = sqlx::query_as(concat!(
            "SELECT ",
            workspace_columns!(),
            " FROM workspaces WHERE workspace_id > $1 ORDER BY workspace_id LIMIT $2"
        ))
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn update_workspace(
        &self,
        workspace_id: &str,
        patch: &WorkspacePatch,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(Workspace, Vec<KeyHash>), StoreError> {
        let mut m = self.begin().await?;
        let row: Option<WorkspaceRow> = sqlx::query_as(B::for_update(WORKSPACE_BY_ID))
            .bind(workspace_id)
            .fetch_optional(m.conn())
            .await?;
        let mut workspace: Workspace = row.ok_or(StoreError::NotFound)?.try_into()?;
        let before = workspace.clone();
        if let Some(name) = &patch.name {
            workspace.name = name.clone();
        }
        if let Some(plan) = patch.plan {
            workspace.plan = plan;
        }
        if let Some(rate_limits) = &patch.rate_limits {
            workspace.rate_limits.clone_from(rate_limits);
        }
        if let Some(budget) = patch.budget {
            workspace.budget = PoolBudget::anchored(budget, before.budget.as_ref(), now);
        }
        workspace.updated_at = now;
        sqlx::query(
            "UPDATE workspaces SET name = $2, plan = $3, updated_at = $4, rate_limits = $5, \
             budget = $6 WHERE workspace_id = $1",
        )
        .bind(workspace_id)
        .bind(&workspace.name)
        .bind(workspace.plan.as_str())
        .bind(now)
        .bind(limits::join(&workspace.rate_limits))
        .bind(PoolBudget::to_text(workspace.budget.as_ref()))
        .execute(m.conn())
        .await?;
        // What a plan allows is the deployment's configuration, not the store's: any
        // change of plan reloads the workspace's keys, which a cache then reads with the
        // new plan; so does a change of the workspace's pool. Rare, and one event per key.
        let stale = if workspace.plan == before.plan
            && workspace.rate_limits == before.rate_limits
            && workspace.budget == before.budget
        {
            Vec::new()
        } else {
            m.reload_covered(Covered::Workspace(workspace_id), now)
                .await?
        };
        m.commit_with_audit(workspace_id, audit, now).await?;
        Ok((workspace, stale))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn owner_limits(
        &self,
        workspace_id: &str,
        owner: &Owner,
    ) -> Result<OwnerPool, StoreError> {
        let row: Option<OwnerRow> = sqlx::query_as(OWNER_LIMITS)
            .bind(workspace_id)
            .bind(owner.kind.as_str())
            .bind(&owner.id)
            .fetch_optional(&self.pool)
            .await?;
        owner_pool(row, workspace_id)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn set_owner_limits(
        &self,
        workspace_id: &str,
        owner: &Owner,
        rate_limits: &[RateLimit],
        budget: Option<PoolBudget>,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(OwnerPool, Vec<KeyHash>), StoreError> {
        let mut m = self.begin().await?;
        let exists: Option<String> = sqlx::query_scalar(B::for_share(
            "SELECT workspace_id FROM workspaces WHERE workspace_id = $1",
        ))
        .bind(workspace_id)
        .fetch_optional(m.conn())
        .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound);
        }
        let before: Option<OwnerRow> = sqlx::query_as(B::for_update(OWNER_LIMITS))
            .bind(workspace_id)
            .bind(owner.kind.as_str())
            .bind(&owner.id)
            .fetch_optional(m.conn())
            .await?;
        let before = owner_pool(before, workspace_id)?;
        let after = OwnerPool {
            rate_limits: rate_limits.to_vec(),
            budget: PoolBudget::anchored(budget, before.budget.as_ref(), now),
            // The spend stays with the row while it lives; a removed pool's goes with it.
            spend: before.spend,
        };
        if after.rate_limits.is_empty() && after.budget.is_none() {
            sqlx::query(
                "DELETE FROM owner_limits WHERE workspace_id = $1 AND owner_kind = $2 \
                 AND owner_id = $3",
            )
            .bind(workspace_id)
            .bind(owner.kind.as_str())
            .bind(&owner.id)
            .execute(m.conn())
            .await?;
        } else {
            sqlx::query(
                "INSERT INTO owner_limits (workspace_id, owner_kind, owner_id, rate_limits, \
                 budget, updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (workspace_id, owner_kind, owner_id) \
                 DO UPDATE SET rate_limits = excluded.rate_limits, budget = excluded.budget, \
                 updated_at = excluded.updated_at",
            )
            .bind(workspace_id)
            .bind(owner.kind.as_str())
            .bind(&owner.id)
            .bind(limits::join(rate_limits))
            .bind(PoolBudget::to_text(after.budget.as_ref()))
            .bind(now)
            .execute(m.conn())
            .await?;
        }
        let stale = if before.rate_limits == after.rate_limits && before.budget == after.budget {
            Vec::new()
        } else {
            m.reload_covered(Covered::Owner(workspace_id, owner), now)
                .await?
        };
        m.commit_with_audit(workspace_id, audit, now).await?;
        Ok((after, stale))
    }
}
