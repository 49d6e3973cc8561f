//! The embedded store (bundled SQLite): WAL mode for concurrent readers, and every write
//! transaction begins `IMMEDIATE`, so writers queue on SQLite's lock (with a busy timeout)
//! instead of failing when a read transaction tries to upgrade.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::StoreError;
use super::sql::impl_store;

pub struct SqliteStore {
    pool: SqlitePool,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

impl SqliteStore {
    /// Opens (creating it if missing) the database file and runs the migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(StoreError::Internal)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(5))
            // A file in this process has no far end to lose; sqlx's default ping before
            // every acquire would only be a round trip to the connection's worker thread.
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(SqliteStore { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }
}

impl_store!(
    SqliteStore,
    sqlx::Sqlite,
    "",
    "",
    "",
    concat!(
        "UPDATE api_keys SET spent_micros = ",
        crate::store::sql::saturated_spend!("api_keys"),
        ", last_used_at = CASE WHEN d.has_use = 1 AND (api_keys.last_used_at IS NULL \
         OR api_keys.last_used_at < d.used) THEN d.used ELSE api_keys.last_used_at END \
         FROM (SELECT json_extract(value, '$[0]') AS key_id, json_extract(value, '$[1]') AS spend, \
         json_extract(value, '$[2]') AS used, json_extract(value, '$[3]') AS has_use \
         FROM json_each($1)) AS d \
         WHERE api_keys.key_id = d.key_id RETURNING api_keys.key_id, api_keys.spent_micros"
    )
);
