//! The usage history: tallies added to per-key rows of an hour or a day, queries grouped
//! by key, owner, team or workspace, and pruning by age (see
//! [`crate::domain::rollup`]).
//!
//! A batch travels as one JSON parameter that each backend unpacks its own way
//! ([`Backend::json_rows`]); the key's workspace, owner and team are copied from its row
//! at the first write of a bucket, so every query reads `usage_rollups` alone, through
//! `usage_rollups_by_workspace` or, for one owner, `usage_rollups_by_owner`. Query texts
//! are assembled from fixed pieces: every value is bound.

use crate::domain::limits::MAX_SPEND_MICROS;
use crate::domain::rollup::{GroupBy, REFUSALS, Tally};
use crate::store::sql::rows::budget_column;
use crate::store::sql::{Backend, JsonColumn};
use crate::store::{Rollup, UsageQuery, UsageRow};

/// The refusal columns, in [`REFUSALS`] order.
fn refused_columns() -> Vec<String> {
    REFUSALS
        .iter()
        .map(|(_, name)| format!("refused_{name}"))
        .collect()
}

/// Every counted column, in [`Tally`] order: admitted, the refusals, tokens, spend.
fn counted_columns() -> Vec<String> {
    std::iter::once("admitted".to_owned())
        .chain(refused_columns())
        .chain(["tokens".to_owned(), "spend_micros".to_owned()])
        .collect()
}

/// The statement adding a batch, for backend `B`. Counts add up; tokens and spend add up
/// saturating at [`MAX_SPEND_MICROS`] (bound as `$2`), with no sum that can overflow.
pub(super) fn record_sql<B: Backend>() -> String {
    let counted = counted_columns();
    let mut unpack: Vec<(&str, JsonColumn)> = vec![
        ("key_id", JsonColumn::Text),
        ("granularity", JsonColumn::Text),
        ("bucket_start", JsonColumn::BigInt),
    ];
    unpack.extend(counted.iter().map(|c| (c.as_str(), JsonColumn::BigInt)));
    let updates: Vec<String> = counted
        .iter()
        .map(|c| {
            if c == "tokens" || c == "spend_micros" {
                format!(
                    "{c} = CASE WHEN usage_rollups.{c} >= $2 - excluded.{c} THEN $2 \
                     ELSE usage_rollups.{c} + excluded.{c} END"
                )
            } else {
                format!("{c} = usage_rollups.{c} + excluded.{c}")
            }
        })
        .collect();
    let d_counted: Vec<String> = counted.iter().map(|c| format!("d.{c}")).collect();
    format!(
        "INSERT INTO usage_rollups (key_id, granularity, bucket_start, workspace_id, \
         owner_kind, owner_id, team_id, {counted}) \
         SELECT d.key_id, d.granularity, d.bucket_start, k.workspace_id, k.owner_kind, \
         k.owner_id, COALESCE(k.team_id, ''), {d_counted} \
         FROM ({unpack}) AS d JOIN api_keys AS k ON k.key_id = d.key_id WHERE true \
         ON CONFLICT (key_id, granularity, bucket_start) DO UPDATE SET {updates}",
        counted = counted.join(", "),
        d_counted = d_counted.join(", "),
        unpack = B::json_rows(&unpack),
        updates = updates.join(", "),
    )
}

/// The ceiling `record_sql` binds as `$2`.
pub(super) fn ceiling() -> i64 {
    budget_column(Some(MAX_SPEND_MICROS)).unwrap_or(i64::MAX)
}

/// A batch as the JSON `record_sql` unpacks: `[[key_id, granularity, bucket, counts...]]`,
/// each figure capped at the ceiling.
pub(super) fn batch_json(batch: &[Rollup]) -> String {
    let cap = |n: u64| n.min(MAX_SPEND_MICROS);
    let rows: Vec<serde_json::Value> = batch
        .iter()
        .map(|r| {
            let mut row = vec![
                serde_json::json!(r.key_id),
                serde_json::json!(r.granularity.as_str()),
                serde_json::json!(r.bucket_start),
                serde_json::json!(cap(r.tally.admitted)),
            ];
            row.extend(r.tally.refused.iter().map(|n| serde_json::json!(cap(*n))));
            row.push(serde_json::json!(cap(r.tally.tokens)));
            row.push(serde_json::json!(cap(r.tally.spend_micros)));
            serde_json::Value::Array(row)
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
}

/// The group a row of the answer is for.
fn group_expr(group_by: GroupBy) -> &'static str {
    match group_by {
        GroupBy::Key => "key_id",
        GroupBy::Owner => "owner_kind || ':' || owner_id",
        GroupBy::Team => "team_id",
        GroupBy::Workspace => "workspace_id",
    }
}

/// The query of one page. Parameters in order: workspace, granularity, since, until,
/// then the owner's kind and id (when set), then the cursor's bucket and group (when
/// set), then the limit.
pub fn usage_query_sql(q: &UsageQuery) -> String {
    let group = group_expr(q.group_by);
    let sums: Vec<String> = counted_columns()
        .iter()
        .map(|c| format!("CAST(SUM({c}) AS BIGINT) AS {c}"))
        .collect();
    let mut sql = format!(
        "SELECT {group} AS grp, bucket_start, {sums} FROM usage_rollups \
         WHERE workspace_id = $1 AND granularity = $2 AND bucket_start >= $3 \
         AND bucket_start < $4",
        sums = sums.join(", "),
    );
    let mut n = 4;
    if q.owner.is_some() {
        sql.push_str(" AND owner_kind = $5 AND owner_id = $6");
        n = 6;
    }
    if q.after.is_some() {
        sql.push_str(&format!(
            " AND (bucket_start > ${a} OR (bucket_start = ${a} AND {group} > ${b}))",
            a = n + 1,
            b = n + 2
        ));
        n += 2;
    }
    sql.push_str(&format!(
        " GROUP BY bucket_start, grp ORDER BY bucket_start, grp LIMIT ${}",
        n + 1
    ));
    sql
}

/// A row of the query as sqlx reads it.
#[derive(sqlx::FromRow)]
pub(super) struct UsageSqlRow {
    grp: String,
    bucket_start: i64,
    admitted: i64,
    refused_rate_limited: i64,
    refused_budget_exceeded: i64,
    refused_insufficient_scope: i64,
    refused_resource_forbidden: i64,
    refused_ip_forbidden: i64,
    refused_revoked: i64,
    refused_expired: i64,
    refused_plan_forbids_keys: i64,
    tokens: i64,
    spend_micros: i64,
}

impl From<UsageSqlRow> for UsageRow {
    fn from(r: UsageSqlRow) -> Self {
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        UsageRow {
            group: r.grp,
            bucket_start: r.bucket_start,
            tally: Tally {
                admitted: n(r.admitted),
                // In REFUSALS order.
                refused: [
                    n(r.refused_rate_limited),
                    n(r.refused_budget_exceeded),
                    n(r.refused_insufficient_scope),
                    n(r.refused_resource_forbidden),
                    n(r.refused_ip_forbidden),
                    n(r.refused_revoked),
                    n(r.refused_expired),
                    n(r.refused_plan_forbids_keys),
                ],
                tokens: n(r.tokens),
                spend_micros: n(r.spend_micros),
            },
        }
    }
}

/// The cutoffs of pruning, as bound.
pub(super) const PRUNE: &str = "DELETE FROM usage_rollups WHERE (granularity = 'hour' \
     AND bucket_start < $1) OR (granularity = 'day' AND bucket_start < $2)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_row_reads_refusals_in_the_order_the_columns_are_named() {
        let names = refused_columns();
        assert_eq!(
            names,
            [
                "refused_rate_limited",
                "refused_budget_exceeded",
                "refused_insufficient_scope",
                "refused_resource_forbidden",
                "refused_ip_forbidden",
                "refused_revoked",
                "refused_expired",
                "refused_plan_forbids_keys",
            ]
        );
    }
}
