//! The replica's tally of usage history: per key and hour, what VerifyKey admitted and
//! refused (by reason) and what ReportUsage reported, written in batches (every
//! `usage.history_interval_ms`, and at shutdown) to the key's hour row and day row (see
//! [`crate::domain::rollup`]); never a write per call.
//!
//! The tally holds only the keys used since the last write, so its memory follows the
//! traffic of one interval, not the number of keys in use. A write that fails is kept
//! for the next (at most [`MAX_KEPT`] rows; past that the oldest are dropped, logged and
//! counted: history is worth less than the database's health).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::domain::Micros;
use crate::domain::key::VerifyCode;
use crate::domain::rollup::{Granularity, Tally};
use crate::store::{Rollup, StoreError, USAGE_CHUNK, UsageStore};

const SHARDS: usize = 16;
/// Rows kept from failed writes, at most.
pub const MAX_KEPT: usize = 200_000;

/// How the history is written and how long it is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistorySettings {
    /// How often the tally is written.
    pub interval: Duration,
    /// How long hour rows are kept (at least the 31 days a query may read).
    pub hour_retention: Duration,
    /// How long day rows are kept.
    pub day_retention: Duration,
}

impl Default for HistorySettings {
    fn default() -> Self {
        const DAY: u64 = 86_400;
        HistorySettings {
            interval: Duration::from_secs(60),
            hour_retention: Duration::from_secs(35 * DAY),
            day_retention: Duration::from_secs(400 * DAY),
        }
    }
}

/// Per key, its tallies by hour (one, unless an hour turned since the last write).
type Tallies = HashMap<String, Vec<(Micros, Tally)>, foldhash::quality::RandomState>;

#[derive(Default)]
pub struct UsageHistory {
    shards: [Mutex<Tallies>; SHARDS],
    /// Rows of writes that failed, written first next time.
    kept: Mutex<Vec<Rollup>>,
    /// Rows dropped because `kept` was full.
    dropped: std::sync::atomic::AtomicU64,
}

impl UsageHistory {
    fn shard(&self, key_id: &str) -> MutexGuard<'_, Tallies> {
        self.shards[crate::usage::shard_of(key_id, SHARDS)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn with_tally(&self, key_id: &str, now: Micros, f: impl FnOnce(&mut Tally)) {
        let hour = Granularity::Hour.bucket(now);
        let mut shard = self.shard(key_id);
        let hours = match shard.get_mut(key_id) {
            Some(hours) => hours,
            None => shard.entry(key_id.to_owned()).or_default(),
        };
        match hours.iter_mut().find(|(h, _)| *h == hour) {
            Some((_, tally)) => f(tally),
            None => {
                let mut tally = Tally::default();
                f(&mut tally);
                hours.push((hour, tally));
            }
        }
    }

    /// Counts a verification of a known key.
    pub fn count(&self, key_id: &str, code: VerifyCode, now: Micros) {
        self.with_tally(key_id, now, |t| t.count(code));
    }

    /// Counts `n` calls admitted elsewhere (by an edge node, from a quota lease).
    pub fn admitted(&self, key_id: &str, n: u64, now: Micros) {
        if n > 0 {
            self.with_tally(key_id, now, |t| t.admitted = t.admitted.saturating_add(n));
        }
    }

    /// Counts usage reported after a call.
    pub fn report(&self, key_id: &str, tokens: u64, spend_micros: u64, now: Micros) {
        self.with_tally(key_id, now, |t| {
            t.tokens = t.tokens.saturating_add(tokens);
            t.spend_micros = t.spend_micros.saturating_add(spend_micros);
        });
    }

    /// Rows dropped so far because failed writes filled what is kept.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes the tally and writes it (with what earlier failed writes kept), in
    /// statements of at most [`USAGE_CHUNK`] rows: each key's hour rows and, summed, its
    /// day rows. Returns the rows written; a failure keeps the rest for the next write.
    pub async fn flush(&self, store: &dyn UsageStore) -> Result<usize, StoreError> {
        let mut rows = std::mem::take(&mut *self.kept());
        for shard in &self.shards {
            let taken = std::mem::take(&mut *shard.lock().unwrap_or_else(PoisonError::into_inner));
            rows.extend(rollups(taken));
        }
        let mut written = 0;
        let mut chunks = rows.chunks(USAGE_CHUNK);
        while let Some(chunk) = chunks.next() {
            if let Err(e) = store.record_rollups(chunk).await {
                let rest: Vec<Rollup> = chunk.iter().chain(chunks.flatten()).cloned().collect();
                self.keep(rest);
                return Err(e);
            }
            written += chunk.len();
        }
        Ok(written)
    }

    fn kept(&self) -> MutexGuard<'_, Vec<Rollup>> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps rows for the next write, merged with what is kept already (so a long outage
    /// keeps one row per key and bucket), dropping the oldest past [`MAX_KEPT`].
    fn keep(&self, rows: Vec<Rollup>) {
        let mut kept = self.kept();
        let mut merged: HashMap<(String, Granularity, Micros), Tally> = HashMap::new();
        for r in kept.drain(..).chain(rows) {
            merged
                .entry((r.key_id, r.granularity, r.bucket_start))
                .or_default()
                .add(&r.tally);
        }
        let mut all: Vec<Rollup> = merged
            .into_iter()
            .map(|((key_id, granularity, bucket_start), tally)| Rollup {
                key_id,
                granularity,
                bucket_start,
                tally,
            })
            .collect();
        if all.len() > MAX_KEPT {
            all.sort_by_key(|r| std::cmp::Reverse(r.bucket_start));
            let dropped = all.len() - MAX_KEPT;
            all.truncate(MAX_KEPT);
            self.dropped
                .fetch_add(dropped as u64, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                dropped,
                "usage history kept too long; the oldest rows dropped"
            );
        }
        *kept = all;
    }
}

/// Each key's hour rows, and its day rows summed from them.
fn rollups(tallies: Tallies) -> Vec<Rollup> {
    let mut rows = Vec::new();
    for (key_id, hours) in tallies {
        let mut days: Vec<(Micros, Tally)> = Vec::new();
        for (hour, tally) in &hours {
            let day = Granularity::Day.bucket(*hour);
            match days.iter_mut().find(|(d, _)| *d == day) {
                Some((_, sum)) => sum.add(tally),
                None => days.push((day, *tally)),
            }
            rows.push(Rollup {
                key_id: key_id.clone(),
                granularity: Granularity::Hour,
                bucket_start: *hour,
                tally: *tally,
            });
        }
        for (day, tally) in days {
            rows.push(Rollup {
                key_id: key_id.clone(),
                granularity: Granularity::Day,
                bucket_start: day,
                tally,
            });
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Micros = 3_600_000_000;

    #[test]
    fn hours_of_one_day_sum_into_its_day_row() {
        let h = UsageHistory::default();
        let t0 = 1_796_464_800_000_000; // 2026-12-05 10:00 UTC
        h.count("key_a", VerifyCode::Valid, t0);
        h.count("key_a", VerifyCode::RateLimited, t0 + 5);
        h.count("key_a", VerifyCode::Valid, t0 + HOUR);
        h.report("key_a", 10, 250, t0 + HOUR + 1);
        let taken = std::mem::take(&mut *h.shard("key_a"));
        let mut rows = rollups(taken);
        rows.sort_by_key(|r| (r.granularity.as_str(), r.bucket_start));
        assert_eq!(rows.len(), 3);
        let day = &rows[0];
        assert_eq!(day.granularity, Granularity::Day);
        assert_eq!((day.tally.admitted, day.tally.refused_total()), (2, 1));
        assert_eq!((day.tally.tokens, day.tally.spend_micros), (10, 250));
        assert_eq!(rows[1].tally.admitted, 1);
        assert_eq!(rows[2].bucket_start, t0 + HOUR);
    }

    #[test]
    fn kept_rows_merge_per_key_and_bucket() {
        let h = UsageHistory::default();
        let row = |n| Rollup {
            key_id: "key_a".into(),
            granularity: Granularity::Hour,
            bucket_start: 0,
            tally: Tally {
                admitted: n,
                ..Tally::default()
            },
        };
        h.keep(vec![row(1)]);
        h.keep(vec![row(2)]);
        let kept = h.kept();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].tally.admitted, 3);
    }
}
