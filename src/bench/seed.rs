//! Bulk seeding of keys straight into Postgres, for the cache-miss and memory benchmarks
//! (one million keys through IssueKey would take longer than the benchmark itself).
//! Writes the same rows IssueKey writes (see `migrations/postgres`), by COPY in batches,
//! settles the tables as a long-lived database's would be (for the miss benchmark), and
//! hands back the plaintexts so the load generator can present them.

use sqlx::PgPool;

use crate::domain::ids;
use crate::domain::key_format::{self, ApiKey, Brand, Environment};

/// Rows per COPY (each batch one transaction: the key rows, then their secrets).
const BATCH: usize = 50_000;

/// How the tables are left after a seeding.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Settled as a long-lived table is (the miss benchmark's lookups need it).
    Settle,
    /// As loaded (the memory scenario measures the server, not the database).
    Leave,
}

/// Seeds `count` keys into the database at `url`, says how long it took, and hands back
/// their plaintexts.
pub async fn seed_keys(
    url: &str,
    count: usize,
    then: Then,
) -> Result<Vec<String>, Box<dyn std::error::Error + Send + Sync>> {
    let pool = PgPool::connect(url).await?;
    let started = std::time::Instant::now();
    let plaintexts = insert_keys(&pool, count, crate::clock::Clock::System.now()).await?;
    if then == Then::Settle {
        settle(&pool).await?;
    }
    pool.close().await;
    println!(
        "seeded {} keys in {:.1} s",
        plaintexts.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(plaintexts)
}

/// Writes `count` keys (workspace `ws_bench`, scope `read`, no limits of their own) by
/// COPY, in batches of [`BATCH`], and returns their plaintexts. A million take about a
/// minute here (the earlier `INSERT ... UNNEST` of 5 000 rows a statement took about
/// twice that).
async fn insert_keys(
    pool: &PgPool,
    count: usize,
    now: i64,
) -> Result<Vec<String>, Box<dyn std::error::Error + Send + Sync>> {
    use std::fmt::Write as _;
    let brand = Brand::default();
    let mut plaintexts = Vec::with_capacity(count);
    let mut done = 0;
    while done < count {
        let n = BATCH.min(count - done);
        // COPY's text format: tab-separated, one row a line; a bytea as `\\x` and hex
        // (the backslash escaped). None of the values holds a tab, a newline or a
        // backslash.
        let (mut keys, mut secrets) = (String::new(), String::new());
        for _ in 0..n {
            let key = ApiKey::generate(&mut getrandom::SysRng, &brand, Environment::Live)?;
            let key_id = ids::new_key_id(&mut getrandom::SysRng)?;
            let display = key_format::display(&brand, Environment::Live, key.last_four());
            writeln!(
                keys,
                "{key_id}\tws_bench\tbench\tlive\t{display}\tread\tuser\tbench\tbench\t{{}}\t{now}\t{now}"
            )?;
            writeln!(
                secrets,
                "\\\\x{}\t{key_id}\t{now}",
                hex::encode(key.hash().as_bytes())
            )?;
            plaintexts.push(key.expose().to_owned());
        }
        let mut tx = pool.begin().await?;
        let mut copy = tx
            .copy_in_raw(
                "COPY api_keys (key_id, workspace_id, name, environment, display, scopes, \
                 owner_kind, owner_id, created_by, metadata, created_at, updated_at) FROM STDIN",
            )
            .await?;
        copy.send(keys.into_bytes()).await?;
        copy.finish().await?;
        let mut copy = tx
            .copy_in_raw("COPY key_secrets (secret_hash, key_id, created_at) FROM STDIN")
            .await?;
        copy.send(secrets.into_bytes()).await?;
        copy.finish().await?;
        tx.commit().await?;
        done += n;
    }
    Ok(plaintexts)
}

/// Brings freshly loaded tables to the state a long-lived table is in, as pgbench does
/// after its load: without this, the first read of each new row writes its hint bits
/// (dirtying the page, so reads cause writes) and the load's WAL is checkpointed while
/// the benchmark runs, none of which a key table in steady use does.
async fn settle(pool: &PgPool) -> Result<(), sqlx::Error> {
    for table in ["api_keys", "key_secrets"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "VACUUM (FREEZE, ANALYZE) {table}"
        )))
        .execute(pool)
        .await?;
    }
    checkpoint(pool).await;
    Ok(())
}

/// Writes out every dirty page now, so that the checkpointer does not write them in the
/// middle of the measurement. Needs superuser or pg_checkpoint; without it the run still
/// counts, only noisier.
pub async fn checkpoint<'c>(executor: impl sqlx::PgExecutor<'c>) {
    if let Err(e) = sqlx::query("CHECKPOINT").execute(executor).await {
        println!("CHECKPOINT failed ({e}); measuring anyway");
    }
}
