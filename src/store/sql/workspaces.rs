//! Workspaces: the tenant row every other record belongs to (its name and plan).
//! Creating one is refused when the id is taken; an update locks the row and applies its
//! patch to the row as locked.

use crate::domain::Micros;
use crate::domain::workspace::Workspace;
use crate::store::sql::rows::WorkspaceRow;
use crate::store::sql::{Backend, Bind, Column, SqlStore};
use crate::store::{AuditContext, StoreError, WorkspacePatch, WorkspaceStore};

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
            "INSERT INTO workspaces (workspace_id, name, plan, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $4) ON CONFLICT (workspace_id) DO NOTHING",
        )
        .bind(&workspace.workspace_id)
        .bind(&workspace.name)
        .bind(workspace.plan.as_str())
        .bind(workspace.created_at)
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
        let row: Option<WorkspaceRow> = sqlx::query_as(
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
        patch: &WorkspacePatch,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<Workspace, StoreError> {
        let mut m = self.begin().await?;
        let row: Option<WorkspaceRow> = sqlx::query_as(B::for_update(
            "SELECT workspace_id, name, plan, created_at, updated_at FROM workspaces \
             WHERE workspace_id = $1",
        ))
        .bind(workspace_id)
        .fetch_optional(m.conn())
        .await?;
        let mut workspace: Workspace = row.ok_or(StoreError::NotFound)?.try_into()?;
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
        .execute(m.conn())
        .await?;
        m.commit_with_audit(workspace_id, audit, now).await?;
        Ok(workspace)
    }
}
