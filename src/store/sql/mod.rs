//! The SQL both stores share: one [`SqlStore`] generic over the sqlx database, with one
//! file per aggregate (keys, teams and service accounts, access groups, provider keys,
//! workspaces, the event log, usage, audit) and the row types in `rows.rs`.
//!
//! The statements are identical for Postgres and SQLite (both take `$N` parameters, and
//! both have `RETURNING` and row values), so each is written once, as a plain function of
//! `B: Backend`; the compiler checks it for both databases and go-to-definition lands on
//! it. What does differ between the two is small and lives in [`Backend`]: how a write
//! transaction begins, the row lock suffixes, the statement that wakes listeners, the
//! usage batch statement (JSON is unpacked differently), and how many rows a statement
//! changed.
//!
//! Every mutation has one skeleton, [`Mutation`]: begin a write transaction, lock and
//! load, change, append the key's event, write the audit row, commit. Dropping a
//! `Mutation` before its commit rolls everything back, audit row included.
//!
//! Rust does not imply where-clauses on types other than `Self`, so every generic impl
//! block below repeats the same bound list (what sqlx needs to run a statement on `B` and
//! decode our column types); [`Column`] and [`Bind`] bundle the per-type bounds to keep
//! that list short.

mod audit;
mod events;
mod groups;
mod keys;
mod provider_keys;
mod rollups;
mod rows;
mod teams;
mod usage;
mod webhooks;
mod workspaces;

pub use audit::list_audit_sql;
pub(crate) use keys::FIND_SECRET;
pub use rollups::usage_query_sql;
pub(crate) use usage::{epoch_spend, saturated_spend};

use sqlx::decode::Decode;
use sqlx::encode::Encode;
use sqlx::{Database, Pool, SqlStr, Transaction, Type};

use crate::domain::Micros;
use crate::domain::event::EventKind;
use crate::domain::key::KeyRecord;
use crate::domain::key_format::KeyHash;
use crate::store::{AuditContext, AuditOutcome, Changed, HealthStore, PoolStats, StoreError};

/// The type of a column [`Backend::json_rows`] unpacks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum JsonColumn {
    Text,
    BigInt,
}

/// What differs between the two databases; everything else is one text of SQL.
pub trait Backend: Database<Arguments: sqlx::IntoArguments<Self>> {
    /// The statement that begins a write transaction; `None` for the driver's `BEGIN`.
    /// SQLite's is `BEGIN IMMEDIATE`: writers queue on the database lock from the start
    /// instead of failing when a read transaction tries to upgrade.
    const BEGIN_WRITE: Option<&'static str>;

    /// Run in every transaction that appends an event (Postgres: `pg_notify`, delivered at
    /// commit, so listening replicas read the log); `None` where events fan out in
    /// process.
    const NOTIFY: Option<&'static str>;

    /// The SQL function giving the 1-based position of `$2` in `$1`, 0 when absent
    /// (case-sensitive): `strpos` on Postgres, `instr` on SQLite.
    const POSITION_FN: &'static str;

    /// Writes a usage batch: the JSON of `usage::usage_json` as `$1`, the spend ceiling
    /// as `$2`, the new spend and epoch set by [`epoch_spend!`], returning
    /// `(key_id, spent_micros, spend_epoch)` per key found.
    const RECORD_USAGE: &'static str;

    /// A subquery unpacking the JSON array of arrays bound as `$1` into one row per
    /// element, its columns named by `columns` in order, each text or a BIGINT.
    fn json_rows(columns: &[(&str, JsonColumn)]) -> String;

    /// `sql` locking the rows it reads until commit (Postgres `FOR UPDATE`; SQLite's
    /// write transactions are exclusive already, so the statement as it is). Mutations
    /// only: no read path takes row locks.
    fn for_update(sql: &'static str) -> SqlStr;

    /// `sql` share-locking the rows it reads until commit (Postgres `FOR SHARE`: e.g. an
    /// access group a mutation names must not be deleted before it commits).
    fn for_share(sql: &'static str) -> SqlStr;

    /// How many rows a statement changed (an inherent method of each driver's result).
    fn rows_affected(result: &Self::QueryResult) -> u64;

    /// The Postgres pool, for LISTEN; `None` for stores that fan out in process.
    fn postgres_pool(pool: &Pool<Self>) -> Option<&sqlx::PgPool>;
}

/// A column type both ways: bound as a parameter and decoded from a row. A bound
/// `i64: Column<B>` gives the compiler its `Encode`, `Decode` and `Type` bounds (a
/// predicate's supertraits are implied).
pub trait Column<B: Database>: for<'a> Encode<'a, B> + for<'r> Decode<'r, B> + Type<B> {}

impl<B: Database, T> Column<B> for T where T: for<'a> Encode<'a, B> + for<'r> Decode<'r, B> + Type<B>
{}

/// A type bound as a parameter only (`&str`, `&[u8]`: decoding borrows from the row).
pub trait Bind<B: Database>: for<'a> Encode<'a, B> + Type<B> {}

impl<B: Database, T> Bind<B> for T where T: for<'a> Encode<'a, B> + Type<B> {}

/// A store over one sqlx pool; [`super::postgres::PgStore`] and
/// [`super::sqlite::SqliteStore`] are its two instances.
pub struct SqlStore<B: Backend> {
    pool: Pool<B>,
}

impl<B: Backend> SqlStore<B> {
    pub(super) fn new(pool: Pool<B>) -> Self {
        SqlStore { pool }
    }

    pub fn pool(&self) -> &Pool<B> {
        &self.pool
    }

    /// Begins a mutation: a write transaction as the backend begins one.
    async fn begin(&self) -> Result<Mutation<B>, StoreError> {
        let tx = match B::BEGIN_WRITE {
            None => self.pool.begin().await?,
            Some(statement) => self.pool.begin_with(statement).await?,
        };
        Ok(Mutation { tx })
    }
}

/// A mutation's transaction, and the one skeleton every mutation follows: lock and load
/// (through [`Mutation::conn`] and the helpers of each aggregate), change, then
/// [`Mutation::finish`] (a key's event, audit row and commit) or
/// [`Mutation::commit_with_audit`] (audit row and commit). Dropped before its commit, it
/// rolls back: a mutation that fails leaves nothing behind, audit row included.
pub(crate) struct Mutation<B: Backend> {
    tx: Transaction<'static, B>,
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
    /// The transaction's connection, to run a statement in it.
    fn conn(&mut self) -> &mut B::Connection {
        &mut self.tx
    }

    /// Appends an event to the log, taking the next seq from the `event_log` row: its
    /// lock is held until commit, so seq order is commit order.
    async fn append_event(
        &mut self,
        kind: EventKind,
        key: &KeyRecord,
        key_hash: &KeyHash,
        stale: &[KeyHash],
        now: Micros,
    ) -> Result<i64, StoreError> {
        let seq: i64 =
            sqlx::query_scalar("UPDATE event_log SET head = head + 1 WHERE id = 1 RETURNING head")
                .fetch_one(self.conn())
                .await?;
        sqlx::query(
            "INSERT INTO key_events (seq, kind, key_id, workspace_id, key_hash, \
             stale_hashes, occurred_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(seq)
        .bind(kind.as_str())
        .bind(&key.key_id)
        .bind(&key.workspace_id)
        .bind(&key_hash.as_bytes()[..])
        .bind(crate::domain::event::join_hashes(stale))
        .bind(now)
        .execute(self.conn())
        .await?;
        if let Some(notify) = B::NOTIFY {
            sqlx::query(notify).execute(self.conn()).await?;
        }
        Ok(seq)
    }

    /// Writes an audit row in the transaction (it commits with the change it records).
    async fn audit(
        &mut self,
        workspace_id: &str,
        key_id: Option<&str>,
        outcome: AuditOutcome,
        ctx: &AuditContext,
        at: Micros,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit_events (workspace_id, actor_id, caller, action, key_id, \
             outcome, detail, occurred_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(workspace_id)
        .bind(&ctx.actor_id)
        .bind(&ctx.caller)
        .bind(ctx.action)
        // Owned: sqlx encodes `Option<T>` per driver, so a generic bound on `&str` does
        // not reach `Option<&str>`.
        .bind(key_id.map(str::to_owned))
        .bind(outcome.as_str())
        .bind(&ctx.detail)
        .bind(at)
        .execute(self.conn())
        .await?;
        Ok(())
    }

    async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }

    /// Records a successful mutation of a workspace's records (no key of its own) and
    /// commits.
    async fn commit_with_audit(
        mut self,
        workspace_id: &str,
        ctx: &AuditContext,
        at: Micros,
    ) -> Result<(), StoreError> {
        self.audit(workspace_id, None, AuditOutcome::Success, ctx, at)
            .await?;
        self.commit().await
    }

    /// Records a successful mutation of `key`: its event (if any), its audit row, and
    /// commits, returning what changed (the key and every secret hash a cache must drop).
    async fn finish(
        mut self,
        key: KeyRecord,
        ctx: &AuditContext,
        now: Micros,
        event: Option<(EventKind, KeyHash)>,
    ) -> Result<Changed, StoreError> {
        let stale_hashes = self.record(&key, ctx, now, event).await?;
        self.commit().await?;
        Ok(Changed { key, stale_hashes })
    }

    /// [`Mutation::finish`] without the commit, for a mutation of several keys: the
    /// key's event (if any) and audit row; returns its secret hashes.
    async fn record(
        &mut self,
        key: &KeyRecord,
        ctx: &AuditContext,
        now: Micros,
        event: Option<(EventKind, KeyHash)>,
    ) -> Result<Vec<KeyHash>, StoreError> {
        let stale_hashes = self.secret_hashes(&key.key_id).await?;
        if let Some((kind, hash)) = event {
            self.append_event(kind, key, &hash, &stale_hashes, now)
                .await?;
            // A mutation that changed nothing (revoking a revoked key) announces nothing.
            self.announce(key, ctx.action, now).await?;
        }
        self.audit(
            &key.workspace_id,
            Some(&key.key_id),
            AuditOutcome::Success,
            ctx,
            now,
        )
        .await?;
        Ok(stale_hashes)
    }
}

#[async_trait::async_trait]
impl<B: Backend> HealthStore for SqlStore<B>
where
    for<'c> &'c mut B::Connection: sqlx::Executor<'c, Database = B>,
{
    #[tracing::instrument(level = "debug", skip_all)]
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn pool_stats(&self) -> PoolStats {
        PoolStats {
            open: self.pool.size(),
            idle: u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
            max: self.pool.options().get_max_connections(),
        }
    }

    fn postgres_pool(&self) -> Option<&sqlx::PgPool> {
        B::postgres_pool(&self.pool)
    }
}
