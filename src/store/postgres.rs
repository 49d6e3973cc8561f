//! The production store: [`SqlStore`] over Postgres. Row locks (`SELECT ... FOR UPDATE`)
//! serialize mutations of one key; different keys change in parallel. What is
//! Postgres's own is here: connecting, and its [`Backend`] members (lock suffixes, the
//! NOTIFY that wakes listening replicas, the usage statement over `jsonb`).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Pool, Postgres, SqlSafeStr, SqlStr};

use super::StoreError;
use super::sql::{Backend, JsonColumn, SqlStore, epoch_spend};

/// How long a pooled connection may have been idle and still be handed out unpinged.
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

pub type PgStore = SqlStore<Postgres>;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl PgStore {
    /// Connects and runs the migrations. A database that cannot be reached fails within the
    /// pool's acquire timeout (3 s) as [`StoreError::Unavailable`]; `keywarden serve` then
    /// tries again with backoff (`startup`), `keywarden migrate` reports it. Once open, a
    /// connection lost later is replaced on use.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.parse().map_err(StoreError::Internal)?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(3))
            // sqlx pings every idle connection before handing it out by default: a
            // round trip before every query, doubling a cache miss's. A connection that
            // answered within the last second is alive for all a ping could tell; one
            // idle for longer (a restarted server, a proxy's idle cut-off) is still pinged
            // and, if dead, replaced before use.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_WHEN_IDLE_FOR {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(PgStore::new(pool))
    }
}

/// The channel every replica LISTENs on; a notification means "read the log".
pub const EVENTS_CHANNEL: &str = "keywarden_key_events";

impl Backend for Postgres {
    const BEGIN_WRITE: Option<&'static str> = None;

    /// The channel is [`EVENTS_CHANNEL`].
    const NOTIFY: Option<&'static str> = Some("SELECT pg_notify('keywarden_key_events', '')");

    const POSITION_FN: &'static str = "strpos";

    const RECORD_USAGE: &'static str = concat!(
        "UPDATE api_keys AS k SET ",
        epoch_spend!("k"),
        ", last_used_at = CASE WHEN d.has_use = 1 AND (k.last_used_at IS NULL OR k.last_used_at < d.used) \
         THEN d.used ELSE k.last_used_at END \
         FROM (SELECT e->>0 AS key_id, (e->>1)::bigint AS spend, (e->>2)::bigint AS used, \
         (e->>3)::int AS has_use, (e->>4)::bigint AS epoch \
         FROM jsonb_array_elements($1::text::jsonb) AS e) AS d \
         WHERE k.key_id = d.key_id RETURNING k.key_id, k.spent_micros, k.spend_epoch"
    );

    fn json_rows(columns: &[(&str, JsonColumn)]) -> String {
        let list: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, (name, ty))| match ty {
                JsonColumn::Text => format!("e->>{i} AS {name}"),
                JsonColumn::BigInt => format!("(e->>{i})::bigint AS {name}"),
            })
            .collect();
        format!(
            "SELECT {} FROM jsonb_array_elements($1::text::jsonb) AS e",
            list.join(", ")
        )
    }

    fn for_update(sql: &'static str) -> SqlStr {
        AssertSqlSafe(format!("{sql} FOR UPDATE")).into_sql_str()
    }

    fn for_share(sql: &'static str) -> SqlStr {
        AssertSqlSafe(format!("{sql} FOR SHARE")).into_sql_str()
    }

    fn rows_affected(result: &Self::QueryResult) -> u64 {
        result.rows_affected()
    }

    fn postgres_pool(pool: &Pool<Self>) -> Option<&PgPool> {
        Some(pool)
    }
}
