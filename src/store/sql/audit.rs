//! The audit log's own entries and its listing. Mutations write their audit row through
//! [`Mutation::audit`] in their own transaction; what is here records an event that
//! changes nothing else (a refusal, a resolve), still in a write transaction of its own
//! so it is durable when the call returns.
//!
//! [`Mutation::audit`]: super::Mutation

use crate::store::sql::rows::AuditRow;
use crate::store::sql::{Backend, Bind, Column, SqlStore};
use crate::store::{AuditOutcome, AuditRecord, AuditStore, DeniedAudit, StoreError};

#[async_trait::async_trait]
impl<B: Backend> AuditStore for SqlStore<B>
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
    async fn record_denied(&self, denied: &DeniedAudit) -> Result<(), StoreError> {
        let mut m = self.begin().await?;
        m.audit(
            &denied.workspace_id,
            denied.key_id.as_deref(),
            AuditOutcome::Denied,
            &denied.context,
            denied.occurred_at,
        )
        .await?;
        m.commit().await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_audit(
        &self,
        workspace_id: &str,
        limit: u32,
        before_id: Option<i64>,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows: Vec<AuditRow> = sqlx::query_as(
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
    async fn record_audit(
        &self,
        entry: &DeniedAudit,
        outcome: AuditOutcome,
    ) -> Result<(), StoreError> {
        let mut m = self.begin().await?;
        m.audit(
            &entry.workspace_id,
            entry.key_id.as_deref(),
            outcome,
            &entry.context,
            entry.occurred_at,
        )
        .await?;
        m.commit().await
    }
}
