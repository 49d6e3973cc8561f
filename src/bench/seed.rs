//! Bulk seeding of keys straight into Postgres, for the cache-miss benchmark (one million
//! keys through IssueKey would take longer than the benchmark itself). Writes the same
//! rows IssueKey writes (see `migrations/postgres`), in batches, settles the tables as a
//! long-lived database's would be, and hands back the plaintexts so the load generator
//! can present them.

use sqlx::PgPool;

use crate::domain::ids;
use crate::domain::key_format::{self, ApiKey, Brand, Environment};

const BATCH: usize = 5_000;

pub async fn seed_keys(
    pool: &PgPool,
    count: usize,
    now: i64,
) -> Result<Vec<String>, Box<dyn std::error::Error + Send + Sync>> {
    let brand = Brand::default();
    let mut plaintexts = Vec::with_capacity(count);
    let mut done = 0;
    while done < count {
        let n = BATCH.min(count - done);
        let mut key_ids = Vec::with_capacity(n);
        let mut displays = Vec::with_capacity(n);
        let mut hashes = Vec::with_capacity(n);
        for _ in 0..n {
            let key = ApiKey::generate(&mut getrandom::SysRng, &brand, Environment::Live)?;
            key_ids.push(ids::new_key_id(&mut getrandom::SysRng)?);
            displays.push(key_format::display(
                &brand,
                Environment::Live,
                key.last_four(),
            ));
            hashes.push(key.hash().as_bytes().to_vec());
            plaintexts.push(key.expose().to_owned());
        }
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO api_keys (key_id, workspace_id, name, environment, display, scopes, \
             owner_kind, owner_id, created_by, metadata, created_at, updated_at) \
             SELECT k, 'ws_bench', 'bench', 'live', d, 'read', 'user', 'bench', 'bench', '{}', $3, $3 \
             FROM UNNEST($1::text[], $2::text[]) AS t(k, d)",
        )
        .bind(&key_ids)
        .bind(&displays)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO key_secrets (secret_hash, key_id, created_at) \
             SELECT h, k, $3 FROM UNNEST($1::bytea[], $2::text[]) AS t(h, k)",
        )
        .bind(&hashes)
        .bind(&key_ids)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        done += n;
    }
    settle(pool).await?;
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
