//! The audit log's own entries and its listing. Mutations write their audit row through
//! [`Mutation::audit`] in their own transaction; what is here records an event that
//! changes nothing else (a refusal, a resolve), still in a write transaction of its own
//! so it is durable when the call returns.
//!
//! [`Mutation::audit`]: super::Mutation

use crate::store::sql::rows::AuditRow;
use crate::store::sql::{Backend, Bind, Column, SqlStore};
use crate::store::{AuditFilter, AuditOutcome, AuditRecord, AuditStore, DeniedAudit, StoreError};
use sqlx::{AssertSqlSafe, SqlSafeStr};

/// The listing's statement: only the conditions of the filters set, so each filter is a
/// plain equality or range the planner can serve from its index (migration 0011) rather
/// than an `OR` a prepared statement's generic plan cannot. Parameters in order:
/// workspace, before id, then key, actor, action, since, until (those set), then limit.
/// Nothing of the request is written into the text: every value is bound.
pub fn list_audit_sql(filter: &AuditFilter) -> String {
    let mut sql = String::from(
        "SELECT id, workspace_id, actor_id, caller, action, key_id, outcome, detail, \
         occurred_at FROM audit_events WHERE workspace_id = $1 AND id < $2",
    );
    let mut n = 2;
    let conditions = [
        (filter.key_id.is_some(), "key_id ="),
        (filter.actor_id.is_some(), "actor_id ="),
        (filter.action.is_some(), "action ="),
        (filter.since.is_some(), "occurred_at >="),
        (filter.until.is_some(), "occurred_at <"),
    ];
    for (set, condition) in conditions {
        if set {
            n += 1;
            sql.push_str(&format!(" AND {condition} ${n}"));
        }
    }
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", n + 1));
    sql
}

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
        filter: &AuditFilter,
        limit: u32,
        before_id: Option<i64>,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let sql = list_audit_sql(filter);
        let mut query = sqlx::query_as::<B, AuditRow>(AssertSqlSafe(sql).into_sql_str())
            .bind(filter.workspace_id.as_str())
            .bind(before_id.unwrap_or(i64::MAX));
        for text in [&filter.key_id, &filter.actor_id, &filter.action]
            .into_iter()
            .flatten()
        {
            query = query.bind(text.as_str());
        }
        for at in [filter.since, filter.until].into_iter().flatten() {
            query = query.bind(at);
        }
        let rows: Vec<AuditRow> = query.bind(i64::from(limit)).fetch_all(&self.pool).await?;
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
