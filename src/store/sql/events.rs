//! The key event log that replicas follow to drop cached verifications: reading it in
//! seq order, its bounds, pruning, and announcing replaced secrets whose grace ended.
//!
//! Events are appended only by [`Mutation::append_event`], which takes each seq from the
//! `event_log` counter row inside the mutation's transaction (seq order is commit order);
//! pruning and announcing go through the same row.
//!
//! [`Mutation::append_event`]: super::Mutation

use crate::domain::Micros;
use crate::domain::event::{EventBounds, EventKind, KeyEvent};
use crate::domain::key::KeyRecord;
use crate::store::sql::rows::{EventRow, KeyRow, SecretRow, hashes, key_columns};
use crate::store::sql::{Backend, Bind, Column, SqlStore};
use crate::store::{EventStore, StoreError};

#[async_trait::async_trait]
impl<B: Backend> EventStore for SqlStore<B>
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
    async fn read_events(&self, after_seq: i64, limit: u32) -> Result<Vec<KeyEvent>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(
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
    async fn event_bounds(&self) -> Result<EventBounds, StoreError> {
        let (head, pruned_through): (i64, i64) =
            sqlx::query_as("SELECT head, pruned_through FROM event_log WHERE id = 1")
                .fetch_one(&self.pool)
                .await?;
        Ok(EventBounds {
            head,
            pruned_through,
        })
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn prune_events(&self, older_than: Micros) -> Result<u64, StoreError> {
        let mut m = self.begin().await?;
        // Everything below the first event inside the window, and nothing else:
        // an event newer than the window survives even if an older clock wrote it.
        let (head,): (i64,) =
            sqlx::query_as(B::for_update("SELECT head FROM event_log WHERE id = 1"))
                .fetch_one(m.conn())
                .await?;
        let first_kept: Option<i64> =
            sqlx::query_scalar("SELECT MIN(seq) FROM key_events WHERE occurred_at >= $1")
                .bind(older_than)
                .fetch_one(m.conn())
                .await?;
        let through = first_kept.map_or(head, |s| s - 1);
        let deleted = sqlx::query("DELETE FROM key_events WHERE seq <= $1")
            .bind(through)
            .execute(m.conn())
            .await?;
        sqlx::query(
            "UPDATE event_log SET pruned_through = $1 WHERE id = 1 AND pruned_through < $1",
        )
        .bind(through)
        .execute(m.conn())
        .await?;
        m.commit().await?;
        Ok(B::rows_affected(&deleted))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn announce_grace_ends(&self, now: Micros, limit: u32) -> Result<usize, StoreError> {
        let mut m = self.begin().await?;
        let ended: Vec<(Vec<u8>, String)> = sqlx::query_as(
            "SELECT secret_hash, key_id FROM key_secrets WHERE valid_until IS NOT NULL \
             AND valid_until <= $1 AND end_announced = 0 ORDER BY valid_until LIMIT $2",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(m.conn())
        .await?;
        let mut announced = 0;
        for (hash, key_id) in ended {
            // Another replica may have announced it since the read: claim it first.
            let claimed = sqlx::query(
                "UPDATE key_secrets SET end_announced = 1 \
                 WHERE secret_hash = $1 AND end_announced = 0",
            )
            .bind(&hash)
            .execute(m.conn())
            .await?;
            let claimed = B::rows_affected(&claimed);
            let row: Option<KeyRow> = sqlx::query_as(concat!(
                "SELECT ",
                key_columns!(),
                " FROM api_keys WHERE key_id = $1"
            ))
            .bind(&key_id)
            .fetch_optional(m.conn())
            .await?;
            let (Some(row), 1) = (row, claimed) else {
                continue;
            };
            let key: KeyRecord = row.try_into()?;
            let hash = hashes(vec![SecretRow { secret_hash: hash }])?;
            m.append_event(EventKind::Rotated, &key, &hash[0], &hash, now)
                .await?;
            announced += 1;
        }
        m.commit().await?;
        Ok(announced)
    }
}
