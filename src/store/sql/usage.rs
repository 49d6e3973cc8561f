//! Usage: what the usage book persists of keys' spend and last use, a batch at a time.
//! Usage is telemetry, not a principal's mutation: no audit row, no event, no
//! [`Mutation`]. The batch travels as one JSON parameter that each backend unpacks its
//! own way ([`Backend::RECORD_USAGE`]); the saturating arithmetic is one text for both.
//!
//! [`Mutation`]: super::Mutation

use sqlx::{AssertSqlSafe, SqlSafeStr};

use crate::domain::Micros;
use crate::domain::pools::PoolOf;
use crate::store::sql::rollups;
use crate::store::sql::rows::budget_column;
use crate::store::sql::{Backend, Bind, Column, SqlStore};
use crate::store::{Rollup, StoreError, UsageDelta, UsageQuery, UsageRow, UsageStore};

/// The new spend of key row `$row` (`k` on Postgres, `api_keys` on SQLite) in the usage
/// statements, which bind [`MAX_SPEND_MICROS`] as `$2`: the old total plus the delta
/// `d.spend`, saturated at the ceiling. No operation in it can overflow BIGINT (the sum is
/// taken only when it stays under the ceiling, and the delta is at most the ceiling), so
/// no replica's figures can make the statement fail. A total already above the ceiling
/// (stored before there was one) is kept: spend never goes down. The cast matters on
/// SQLite only, whose overflowing sums (before the ceiling) were stored as REAL: it turns
/// such a total back into the largest integer, which the statement's RETURNING (and every
/// read of the key) can decode; a decoding error there would come after the statement
/// committed, and have the usage book write the whole batch again.
///
/// [`MAX_SPEND_MICROS`]: crate::domain::limits::MAX_SPEND_MICROS
macro_rules! saturated_spend {
    ($row:literal) => {
        concat!(
            "CASE WHEN ",
            $row,
            ".spent_micros >= $2 THEN CAST(",
            $row,
            ".spent_micros AS BIGINT) WHEN d.spend > $2 - ",
            $row,
            ".spent_micros THEN $2 ELSE ",
            $row,
            ".spent_micros + d.spend END"
        )
    };
}
pub(crate) use saturated_spend;

/// The usage statements' `SET` of spend and its epoch for row `$row`, given the delta's
/// spend `d.spend` of epoch `d.epoch`: added ([`saturated_spend!`]) within the row's
/// epoch, replacing the row's spend when the delta's epoch is newer, ignored when older
/// (a late write of an ended epoch). See `domain::budget`.
macro_rules! epoch_spend {
    ($row:literal) => {
        concat!(
            "spent_micros = CASE WHEN d.epoch > ",
            $row,
            ".spend_epoch THEN d.spend WHEN d.epoch < ",
            $row,
            ".spend_epoch THEN ",
            $row,
            ".spent_micros ELSE ",
            $crate::store::sql::saturated_spend!($row),
            " END, spend_epoch = CASE WHEN d.epoch > ",
            $row,
            ".spend_epoch THEN d.epoch ELSE ",
            $row,
            ".spend_epoch END"
        )
    };
}
pub(crate) use epoch_spend;

/// A pool's spend statement: the delta (`$3` spend, `$4` epoch) added to the row of
/// `$table` the rest of `$filter` names (`$1` its workspace, then `$5`, `$6`), `$2` the
/// ceiling as for keys.
macro_rules! pool_spend {
    ($table:literal, $filter:literal) => {
        concat!(
            "UPDATE ",
            $table,
            " SET ",
            epoch_spend!($table),
            " FROM (SELECT CAST($3 AS BIGINT) AS spend, CAST($4 AS BIGINT) AS epoch) AS d \
             WHERE ",
            $table,
            ".workspace_id = $1",
            $filter,
            " RETURNING ",
            $table,
            ".spent_micros, ",
            $table,
            ".spend_epoch"
        )
    };
}

const WORKSPACE_SPEND: &str = pool_spend!("workspaces", "");
const TEAM_SPEND: &str = pool_spend!("teams", " AND teams.team_id = $5");
const OWNER_SPEND: &str = pool_spend!(
    "owner_limits",
    " AND owner_limits.owner_kind = $5 AND owner_limits.owner_id = $6"
);

/// The ceiling the usage statements bind as `$2`.
fn spend_ceiling() -> i64 {
    budget_column(Some(crate::domain::limits::MAX_SPEND_MICROS)).unwrap_or(i64::MAX)
}

/// A usage batch as the JSON array the usage statements unpack:
/// `[[key_id, spend, last_used_at, 0|1, epoch], ...]` (spend capped at the ceiling: more could
/// not be stored anyway).
fn usage_json(batch: &[UsageDelta]) -> String {
    let rows: Vec<serde_json::Value> = batch
        .iter()
        .map(|d| {
            serde_json::json!([
                d.key_id,
                budget_column(Some(d.spend_micros)).map_or(0, |s| s.min(spend_ceiling())),
                d.last_used_at.unwrap_or(0),
                i64::from(d.last_used_at.is_some()),
                d.epoch,
            ])
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
}

#[async_trait::async_trait]
impl<B: Backend> UsageStore for SqlStore<B>
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
    async fn record_usage(
        &self,
        batch: &[UsageDelta],
    ) -> Result<Vec<(String, u64, Micros)>, StoreError> {
        // Usage is telemetry, not a principal's mutation: no audit row, no event.
        // One statement, whatever the number of keys (the batch is a JSON array of
        // [key_id, spend, last use, has a last use]), so it commits whole or not at
        // all: the usage book settles what it wrote only when this returns.
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(B::RECORD_USAGE)
            .bind(usage_json(batch))
            .bind(spend_ceiling())
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(key_id, spent, epoch)| (key_id, u64::try_from(spent).unwrap_or(0), epoch))
            .collect())
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn record_pool_usage(
        &self,
        batch: &[UsageDelta],
    ) -> Result<Vec<(String, u64, Micros)>, StoreError> {
        // A statement per pool (a batch holds few: pools are per workspace, team and
        // owner), one transaction for the batch.
        let mut tx = self.pool.begin().await?;
        let mut totals = Vec::with_capacity(batch.len());
        for d in batch {
            // A name that is no pool's names no row: nothing to write, no total.
            let Some(of) = PoolOf::of_counter(&d.key_id) else {
                continue;
            };
            let spend = budget_column(Some(d.spend_micros)).map_or(0, |s| s.min(spend_ceiling()));
            let (sql, workspace_id) = match &of {
                PoolOf::Workspace(ws) => (WORKSPACE_SPEND, ws),
                PoolOf::Team { workspace_id, .. } => (TEAM_SPEND, workspace_id),
                PoolOf::Owner { workspace_id, .. } => (OWNER_SPEND, workspace_id),
            };
            let mut query = sqlx::query_as::<B, (i64, i64)>(sql)
                .bind(workspace_id.as_str())
                .bind(spend_ceiling())
                .bind(spend)
                .bind(d.epoch);
            match &of {
                PoolOf::Workspace(_) => {}
                PoolOf::Team { team_id, .. } => query = query.bind(team_id.as_str()),
                PoolOf::Owner { owner, .. } => {
                    query = query.bind(owner.kind.as_str()).bind(owner.id.as_str());
                }
            }
            if let Some((spent, epoch)) = query.fetch_optional(&mut *tx).await? {
                totals.push((d.key_id.clone(), u64::try_from(spent).unwrap_or(0), epoch));
            }
        }
        tx.commit().await?;
        Ok(totals)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn record_rollups(&self, batch: &[Rollup]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        sqlx::query(AssertSqlSafe(rollups::record_sql::<B>()).into_sql_str())
            .bind(rollups::batch_json(batch))
            .bind(rollups::ceiling())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn query_usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        let sql = AssertSqlSafe(rollups::usage_query_sql(q)).into_sql_str();
        let mut query = sqlx::query_as::<B, rollups::UsageSqlRow>(sql)
            .bind(q.workspace_id.as_str())
            .bind(q.granularity.as_str())
            .bind(q.since)
            .bind(q.until);
        if let Some(owner) = &q.owner {
            query = query.bind(owner.kind.as_str()).bind(owner.id.as_str());
        }
        if let Some((bucket, group)) = &q.after {
            query = query.bind(*bucket).bind(group.as_str());
        }
        let rows = query.bind(i64::from(q.limit)).fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn prune_rollups(
        &self,
        hours_before: Micros,
        days_before: Micros,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(rollups::PRUNE)
            .bind(hours_before)
            .bind(days_before)
            .execute(&self.pool)
            .await?;
        Ok(B::rows_affected(&done))
    }
}
