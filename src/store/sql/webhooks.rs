//! Webhook endpoints, their outbox, and the expiry and budget notices.
//!
//! The outbox is a log per workspace: a mutation that announces an event (issue,
//! revoke, rotate, delete, a leak; see `domain::webhook::EventType::for_audit_action`)
//! appends it through [`Mutation::announce`], inside the mutation's own transaction,
//! taking its seq from the workspace's `webhook_heads` row. That row's lock is held until
//! commit, so within a workspace seq order is commit order: an endpoint's cursor
//! (`delivered_seq`) never passes an event that commits later. A workspace with no
//! endpoint writes nothing (one indexed read), and workspaces never wait on each other.
//!
//! [`Mutation::announce`]: super::Mutation

use crate::domain::Micros;
use crate::domain::key::KeyRecord;
use crate::domain::webhook::{
    self, BudgetThresholdData, EventType, ExpiringData, KeyEventData, KeySummary,
};
use crate::store::sql::rows::{KeyRow, key_columns};
use crate::store::sql::{Backend, Bind, Column, Mutation, SqlStore};
use sqlx::SqlSafeStr;

use crate::store::{
    AuditContext, AuditOutcome, DeliveryFailure, OutboxEvent, StoreError, WebhookRecord,
    WebhookStore,
};

macro_rules! webhook_columns {
    () => {
        "webhook_id, workspace_id, url, event_types, kek_version, wrapped_dek, ciphertext, \
         created_at, updated_at, delivered_seq, failing_since, failures, next_attempt_at, \
         last_error, disabled_at"
    };
}

#[derive(sqlx::FromRow)]
struct WebhookRow {
    webhook_id: String,
    workspace_id: String,
    url: String,
    event_types: String,
    kek_version: i64,
    wrapped_dek: Vec<u8>,
    ciphertext: Vec<u8>,
    created_at: i64,
    updated_at: i64,
    delivered_seq: i64,
    failing_since: Option<i64>,
    failures: i64,
    next_attempt_at: i64,
    last_error: String,
    disabled_at: Option<i64>,
}

impl TryFrom<WebhookRow> for WebhookRecord {
    type Error = StoreError;

    fn try_from(r: WebhookRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("webhook {}: {what}", r.webhook_id));
        Ok(WebhookRecord {
            event_types: webhook::split_event_types(&r.event_types)
                .ok_or_else(|| corrupt("event_types"))?,
            kek_version: u32::try_from(r.kek_version).map_err(|_| corrupt("kek_version"))?,
            failures: u32::try_from(r.failures).unwrap_or(u32::MAX),
            webhook_id: r.webhook_id,
            workspace_id: r.workspace_id,
            url: r.url,
            wrapped_dek: r.wrapped_dek,
            ciphertext: r.ciphertext,
            created_at: r.created_at,
            updated_at: r.updated_at,
            delivered_seq: r.delivered_seq,
            failing_since: r.failing_since,
            next_attempt_at: r.next_attempt_at,
            last_error: r.last_error,
            disabled_at: r.disabled_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct OutboxRow {
    workspace_id: String,
    seq: i64,
    event_type: String,
    key_id: String,
    data: String,
    occurred_at: i64,
}

impl TryFrom<OutboxRow> for OutboxEvent {
    type Error = StoreError;

    fn try_from(r: OutboxRow) -> Result<Self, StoreError> {
        Ok(OutboxEvent {
            event_type: EventType::parse(&r.event_type).ok_or_else(|| {
                StoreError::Corrupt(format!("outbox {}:{}: event_type", r.workspace_id, r.seq))
            })?,
            workspace_id: r.workspace_id,
            seq: r.seq,
            key_id: r.key_id,
            data: r.data,
            occurred_at: r.occurred_at,
        })
    }
}

fn json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(format!("payload: {e}")))
}

/// The workspaces with an enabled endpoint whose event types match the pattern bound
/// as parameter `n` (`%key.expiring%`), as a subquery.
fn subscribed(n: u8) -> String {
    format!(
        "SELECT workspace_id FROM webhook_endpoints \
         WHERE disabled_at IS NULL AND event_types LIKE ${n}"
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
    /// Appends the events a successful `action` on `key` announces to its workspace's
    /// outbox, if the workspace has an enabled endpoint (any: endpoints filter by type
    /// when they deliver, so one cursor covers every subscription).
    pub(super) async fn announce(
        &mut self,
        key: &KeyRecord,
        action: &str,
        now: Micros,
    ) -> Result<(), StoreError> {
        let types = EventType::for_audit_action(action);
        if types.is_empty() || !self.has_endpoints(&key.workspace_id).await? {
            return Ok(());
        }
        let data = json(&KeyEventData {
            key: KeySummary::of(key),
        })?;
        for t in types {
            self.append_outbox(&key.workspace_id, *t, &key.key_id, &data, now)
                .await?;
        }
        Ok(())
    }

    async fn has_endpoints(&mut self, workspace_id: &str) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT CAST(1 AS BIGINT) FROM webhook_endpoints \
             WHERE workspace_id = $1 AND disabled_at IS NULL LIMIT 1",
        )
        .bind(workspace_id)
        .fetch_optional(self.conn())
        .await?;
        Ok(found.is_some())
    }

    /// The next seq of the workspace's outbox, from its head row (locked until commit).
    async fn append_outbox(
        &mut self,
        workspace_id: &str,
        event_type: EventType,
        key_id: &str,
        data: &str,
        now: Micros,
    ) -> Result<i64, StoreError> {
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO webhook_heads (workspace_id, head) VALUES ($1, 1) \
             ON CONFLICT (workspace_id) DO UPDATE SET head = webhook_heads.head + 1 \
             RETURNING head",
        )
        .bind(workspace_id)
        .fetch_one(self.conn())
        .await?;
        sqlx::query(
            "INSERT INTO webhook_events (workspace_id, seq, event_type, key_id, data, \
             occurred_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(workspace_id)
        .bind(seq)
        .bind(event_type.as_str())
        .bind(key_id)
        .bind(data)
        .bind(now)
        .execute(self.conn())
        .await?;
        Ok(seq)
    }

    /// Marks `notice` sent for the key; false when it was already.
    async fn claim_notice(
        &mut self,
        key_id: &str,
        notice: &str,
        now: Micros,
    ) -> Result<bool, StoreError> {
        let claimed = sqlx::query(
            "INSERT INTO webhook_notices (key_id, notice, sent_at) VALUES ($1, $2, $3) \
             ON CONFLICT (key_id, notice) DO NOTHING",
        )
        .bind(key_id)
        .bind(notice)
        .bind(now)
        .execute(self.conn())
        .await?;
        Ok(B::rows_affected(&claimed) == 1)
    }
}

#[async_trait::async_trait]
impl<B: Backend> WebhookStore for SqlStore<B>
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
    async fn insert_webhook(
        &self,
        record: &WebhookRecord,
        audit: &AuditContext,
    ) -> Result<WebhookRecord, StoreError> {
        let mut m = self.begin().await?;
        // The head as it stands, its row locked like an event writer's: the endpoint
        // starts after every event committed before it.
        let head: i64 = sqlx::query_scalar(
            "INSERT INTO webhook_heads (workspace_id, head) VALUES ($1, 0) \
             ON CONFLICT (workspace_id) DO UPDATE SET head = webhook_heads.head \
             RETURNING head",
        )
        .bind(&record.workspace_id)
        .fetch_one(m.conn())
        .await?;
        // Counted under the head row's lock: concurrent creations cannot all pass.
        let endpoints: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM webhook_endpoints WHERE workspace_id = $1")
                .bind(&record.workspace_id)
                .fetch_one(m.conn())
                .await?;
        if endpoints >= i64::from(webhook::MAX_WEBHOOKS_PER_WORKSPACE) {
            // Refused by policy: nothing written but its `denied` audit row.
            let refusal = webhook::limit_reached(&record.workspace_id);
            let denied = AuditContext {
                detail: refusal.message.clone(),
                ..audit.clone()
            };
            m.audit(
                &record.workspace_id,
                None,
                AuditOutcome::Denied,
                &denied,
                record.created_at,
            )
            .await?;
            m.commit().await?;
            return Err(StoreError::Precondition(refusal));
        }
        let row: WebhookRow = sqlx::query_as(concat!(
            "INSERT INTO webhook_endpoints (",
            webhook_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, NULL, 0, 0, '', NULL) \
             RETURNING ",
            webhook_columns!()
        ))
        .bind(&record.webhook_id)
        .bind(&record.workspace_id)
        .bind(&record.url)
        .bind(webhook::join_event_types(&record.event_types))
        .bind(i64::from(record.kek_version))
        .bind(&record.wrapped_dek[..])
        .bind(&record.ciphertext[..])
        .bind(record.created_at)
        .bind(head)
        .fetch_one(m.conn())
        .await?;
        m.commit_with_audit(&record.workspace_id, audit, record.created_at)
            .await?;
        row.try_into()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_webhook(
        &self,
        workspace_id: &str,
        webhook_id: &str,
    ) -> Result<Option<WebhookRecord>, StoreError> {
        let row: Option<WebhookRow> = sqlx::query_as(concat!(
            "SELECT ",
            webhook_columns!(),
            " FROM webhook_endpoints WHERE workspace_id = $1 AND webhook_id = $2"
        ))
        .bind(workspace_id)
        .bind(webhook_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(TryInto::try_into).transpose()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_webhooks(&self, workspace_id: &str) -> Result<Vec<WebhookRecord>, StoreError> {
        let rows: Vec<WebhookRow> = sqlx::query_as(concat!(
            "SELECT ",
            webhook_columns!(),
            " FROM webhook_endpoints WHERE workspace_id = $1 ORDER BY created_at, webhook_id"
        ))
        .bind(workspace_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn delete_webhook(
        &self,
        workspace_id: &str,
        webhook_id: &str,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(), StoreError> {
        let mut m = self.begin().await?;
        let deleted = sqlx::query(
            "DELETE FROM webhook_endpoints WHERE workspace_id = $1 AND webhook_id = $2",
        )
        .bind(workspace_id)
        .bind(webhook_id)
        .execute(m.conn())
        .await?;
        if B::rows_affected(&deleted) == 0 {
            return Err(StoreError::NotFound);
        }
        m.commit_with_audit(workspace_id, audit, now).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn replace_webhook_secret(
        &self,
        workspace_id: &str,
        webhook_id: &str,
        (kek_version, wrapped_dek, ciphertext): (u32, &[u8], &[u8]),
        now: Micros,
        audit: &AuditContext,
    ) -> Result<WebhookRecord, StoreError> {
        let mut m = self.begin().await?;
        let row: Option<WebhookRow> = sqlx::query_as(concat!(
            "UPDATE webhook_endpoints SET kek_version = $3, wrapped_dek = $4, ciphertext = $5, \
             updated_at = $6 WHERE workspace_id = $1 AND webhook_id = $2 RETURNING ",
            webhook_columns!()
        ))
        .bind(workspace_id)
        .bind(webhook_id)
        .bind(i64::from(kek_version))
        .bind(wrapped_dek)
        .bind(ciphertext)
        .bind(now)
        .fetch_optional(m.conn())
        .await?;
        let row = row.ok_or(StoreError::NotFound)?;
        m.commit_with_audit(workspace_id, audit, now).await?;
        row.try_into()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn due_webhooks(
        &self,
        now: Micros,
        limit: u32,
    ) -> Result<Vec<WebhookRecord>, StoreError> {
        let rows: Vec<WebhookRow> = sqlx::query_as(concat!(
            "SELECT ",
            webhook_columns!(),
            " FROM webhook_endpoints e WHERE disabled_at IS NULL AND next_attempt_at <= $1 \
             AND EXISTS (SELECT 1 FROM webhook_events ev \
              WHERE ev.workspace_id = e.workspace_id AND ev.seq > e.delivered_seq) \
             ORDER BY next_attempt_at, webhook_id LIMIT $2"
        ))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn read_outbox(
        &self,
        workspace_id: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT workspace_id, seq, event_type, key_id, data, occurred_at \
             FROM webhook_events WHERE workspace_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(workspace_id)
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn webhook_delivered(
        &self,
        webhook_id: &str,
        through_seq: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE webhook_endpoints SET \
             delivered_seq = CASE WHEN delivered_seq < $2 THEN $2 ELSE delivered_seq END, \
             failing_since = NULL, failures = 0, next_attempt_at = 0, last_error = '' \
             WHERE webhook_id = $1",
        )
        .bind(webhook_id)
        .bind(through_seq)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn webhook_failed(
        &self,
        webhook_id: &str,
        failure: &DeliveryFailure,
    ) -> Result<(), StoreError> {
        let mut m = self.begin().await?;
        let workspace: Option<String> = sqlx::query_scalar(
            "UPDATE webhook_endpoints SET failing_since = COALESCE(failing_since, $2), \
             failures = failures + 1, next_attempt_at = $3, last_error = $4, disabled_at = $5 \
             WHERE webhook_id = $1 AND disabled_at IS NULL RETURNING workspace_id",
        )
        .bind(webhook_id)
        .bind(failure.at)
        .bind(failure.next_attempt_at)
        .bind(failure.error.as_str())
        .bind(failure.disable.as_ref().map(|_| failure.at))
        .fetch_optional(m.conn())
        .await?;
        match (workspace, &failure.disable) {
            (Some(workspace), Some(audit)) => {
                m.commit_with_audit(&workspace, audit, failure.at).await
            }
            _ => m.commit().await,
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn announce_expiring(
        &self,
        now: Micros,
        leads: &[Micros],
        limit: u32,
    ) -> Result<usize, StoreError> {
        let mut sorted: Vec<Micros> = leads.iter().copied().filter(|l| *l > 0).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut m = self.begin().await?;
        let mut announced = 0;
        // Shortest lead first: a key due several notices at once gets the nearest, and
        // the longer ones are marked with it so that they are not sent late.
        for lead in &sorted {
            let rows: Vec<KeyRow> = sqlx::query_as(
                sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM api_keys WHERE expires_at IS NOT NULL AND expires_at > $1 \
                     AND expires_at <= $2 AND created_at <= expires_at - $6 \
                     AND revoked_at IS NULL AND deleted_at IS NULL \
                     AND NOT EXISTS (SELECT 1 FROM webhook_notices n \
                      WHERE n.key_id = api_keys.key_id AND n.notice = $3) \
                     AND workspace_id IN ({}) ORDER BY expires_at LIMIT $5",
                    key_columns!(),
                    subscribed(4)
                ))
                .into_sql_str(),
            )
            .bind(now)
            .bind(now.saturating_add(*lead))
            .bind(webhook::expiry_mark(*lead))
            .bind(format!("%{}%", EventType::KeyExpiring.as_str()))
            .bind(i64::from(limit))
            .bind(*lead)
            .fetch_all(m.conn())
            .await?;
            for row in rows {
                let key: KeyRecord = row.try_into()?;
                let Some(expires_at) = key.expires_at else {
                    continue;
                };
                let due = webhook::due_expiry_leads(key.created_at, expires_at, now, &sorted);
                let Some(nearest) = webhook::announced_lead(&due) else {
                    continue;
                };
                let mut claimed_nearest = false;
                for l in &due {
                    let claimed = m
                        .claim_notice(&key.key_id, &webhook::expiry_mark(*l), now)
                        .await?;
                    claimed_nearest |= claimed && *l == nearest;
                }
                if !claimed_nearest {
                    continue;
                }
                let data = json(&ExpiringData {
                    key: KeySummary::of(&key),
                    expires_at: expires_at.div_euclid(crate::domain::MICROS_PER_SECOND),
                    lead_seconds: nearest / crate::domain::MICROS_PER_SECOND,
                })?;
                m.append_outbox(
                    &key.workspace_id,
                    EventType::KeyExpiring,
                    &key.key_id,
                    &data,
                    now,
                )
                .await?;
                announced += 1;
            }
        }
        m.commit().await?;
        Ok(announced)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn announce_budget_thresholds(
        &self,
        now: Micros,
        limit: u32,
    ) -> Result<usize, StoreError> {
        let mut m = self.begin().await?;
        let mut announced = 0;
        for pct in webhook::BUDGET_THRESHOLDS {
            // A superset of the keys at the threshold (integer division rounds the bar
            // down); the exact test is the domain's.
            let rows: Vec<KeyRow> = sqlx::query_as(
                sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM api_keys WHERE max_budget_micros IS NOT NULL \
                     AND max_budget_micros > 0 AND revoked_at IS NULL AND deleted_at IS NULL \
                     AND spent_micros >= max_budget_micros / 100 * $1 \
                     AND NOT EXISTS (SELECT 1 FROM webhook_notices n \
                      WHERE n.key_id = api_keys.key_id AND n.notice = $2 || spend_epoch) \
                     AND workspace_id IN ({}) ORDER BY key_id LIMIT $4",
                    key_columns!(),
                    subscribed(3)
                ))
                .into_sql_str(),
            )
            .bind(i64::from(*pct))
            .bind(format!("budget:{pct}:"))
            .bind(format!("%{}%", EventType::KeyBudgetThreshold.as_str()))
            .bind(i64::from(limit))
            .fetch_all(m.conn())
            .await?;
            for row in rows {
                let key: KeyRecord = row.try_into()?;
                let Some(max) = key.max_budget_micros else {
                    continue;
                };
                let spent = key.spent_at(now);
                if !webhook::reached_thresholds(spent, max).contains(pct) {
                    continue;
                }
                let period_start = key.spend_epoch_at(now).start;
                if !m
                    .claim_notice(&key.key_id, &webhook::budget_mark(*pct, period_start), now)
                    .await?
                {
                    continue;
                }
                let data = json(&BudgetThresholdData {
                    key: KeySummary::of(&key),
                    threshold_percent: *pct,
                    spent_micros: spent,
                    max_budget_micros: max,
                    period_start: period_start.div_euclid(crate::domain::MICROS_PER_SECOND),
                })?;
                m.append_outbox(
                    &key.workspace_id,
                    EventType::KeyBudgetThreshold,
                    &key.key_id,
                    &data,
                    now,
                )
                .await?;
                announced += 1;
            }
        }
        m.commit().await?;
        Ok(announced)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn prune_outbox(&self, older_than: Micros) -> Result<u64, StoreError> {
        let deleted = sqlx::query(
            "DELETE FROM webhook_events WHERE occurred_at < $1 AND seq <= COALESCE(\
             (SELECT MIN(e.delivered_seq) FROM webhook_endpoints e \
              WHERE e.workspace_id = webhook_events.workspace_id AND e.disabled_at IS NULL), \
             seq)",
        )
        .bind(older_than)
        .execute(&self.pool)
        .await?;
        Ok(B::rows_affected(&deleted))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn prune_notices(&self, older_than: Micros) -> Result<u64, StoreError> {
        // A budget mark is `budget:<percent>:<period start>`: one of another period than
        // the stored spend's is over (the period turned and `reset_due_budgets` moved the
        // epoch on, or the budget was reset), and its period cannot come back.
        let deleted = sqlx::query(
            "DELETE FROM webhook_notices WHERE sent_at < $1 AND (\
             NOT EXISTS (SELECT 1 FROM api_keys k \
              WHERE k.key_id = webhook_notices.key_id AND k.deleted_at IS NULL) \
             OR (notice LIKE 'budget:%' AND NOT EXISTS (SELECT 1 FROM api_keys k \
              WHERE k.key_id = webhook_notices.key_id \
              AND webhook_notices.notice LIKE '%:' || k.spend_epoch)))",
        )
        .bind(older_than)
        .execute(&self.pool)
        .await?;
        Ok(B::rows_affected(&deleted))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn oldest_undelivered(&self) -> Result<Option<Micros>, StoreError> {
        let oldest: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(ev.occurred_at) FROM webhook_events ev JOIN webhook_endpoints e \
             ON e.workspace_id = ev.workspace_id \
             WHERE e.disabled_at IS NULL AND ev.seq > e.delivered_seq",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(oldest)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn webhooks_to_rewrap(
        &self,
        current: u32,
        limit: u32,
    ) -> Result<Vec<WebhookRecord>, StoreError> {
        let rows: Vec<WebhookRow> = sqlx::query_as(concat!(
            "SELECT ",
            webhook_columns!(),
            " FROM webhook_endpoints WHERE kek_version <> $1 ORDER BY webhook_id LIMIT $2"
        ))
        .bind(i64::from(current))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn swap_webhook_dek(
        &self,
        webhook_id: &str,
        expected: &[u8],
        kek_version: u32,
        wrapped_dek: &[u8],
    ) -> Result<bool, StoreError> {
        let swapped = sqlx::query(
            "UPDATE webhook_endpoints SET kek_version = $3, wrapped_dek = $4 \
             WHERE webhook_id = $1 AND wrapped_dek = $2",
        )
        .bind(webhook_id)
        .bind(expected)
        .bind(i64::from(kek_version))
        .bind(wrapped_dek)
        .execute(&self.pool)
        .await?;
        Ok(B::rows_affected(&swapped) == 1)
    }
}
