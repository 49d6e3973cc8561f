//! The usage book: each replica's record of spend and last use, written to storage in
//! batches (never a database write per VerifyKey), and its view of each key's spend for
//! budget decisions.
//!
//! Per key it keeps what has not been written yet (spend, the last use) and the freshest
//! persisted spend it has seen (from key records read by VerifyKey, and from what each
//! write returns). A key's spend, as this replica sees it, is
//!
//! `max(every persisted figure seen) + unwritten`
//!
//! Persisted figures include every replica's writes up to when they were read and spend
//! only grows, so the largest is the freshest; unwritten spend is this replica's alone. A write removes exactly
//! what it wrote from "unwritten", after its commit, so spend is never lost and never
//! counted twice once the write has returned (between the commit and that moment a
//! reader may count it twice, which only errs toward refusing). With several replicas,
//! another replica's spend is seen once it has written it (every `usage.flush_interval`)
//! and this replica has read it (a write returns the key's total).
//!
//! Writes happen every flush interval and at shutdown; a write that fails keeps its
//! figures for the next one.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::domain::Micros;
use crate::store::{Store, StoreError, UsageDelta};

const SHARDS: usize = 32;

/// How far a key's last use must have moved before the periodic write records it again:
/// a key in steady use costs one row write a minute, not one per flush. (The first use
/// is written at the next flush; a final flush at shutdown writes everything.)
pub const LAST_USE_RESOLUTION: Micros = 60 * crate::domain::MICROS_PER_SECOND;

#[derive(Clone, Copy, Debug, Default)]
struct Account {
    unwritten_spend: u64,
    /// The largest persisted spend seen (records read, writes returned).
    persisted: u64,
    /// The latest use not yet written.
    unwritten_use: Option<Micros>,
    /// The last use written.
    written_use: Option<Micros>,
    /// When the account last changed: idle accounts are forgotten.
    touched_at: Micros,
}

/// Accounts by key id, hashed with foldhash (seeded per process) rather than SipHash:
/// VerifyKey looks a key up here twice per call.
type Accounts = HashMap<String, Account, foldhash::quality::RandomState>;

pub struct UsageBook {
    shards: Box<[Mutex<Accounts>]>,
    /// How long an idle account with nothing unwritten is kept: longer than any cached key
    /// record can live, so a record read before this replica's last write is never the
    /// only figure left.
    keep_idle: Micros,
}

impl UsageBook {
    /// `record_ttl`: the longest a key record stays in the VerifyKey cache.
    pub fn new(record_ttl: Duration, flush_interval: Duration) -> Self {
        let keep = record_ttl + 2 * flush_interval + Duration::from_secs(1);
        UsageBook {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Accounts::default()))
                .collect(),
            keep_idle: i64::try_from(keep.as_micros()).unwrap_or(i64::MAX),
        }
    }

    fn shard(&self, key_id: &str) -> MutexGuard<'_, Accounts> {
        // FNV-1a: cheap, and key ids are random already.
        let h = key_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        self.shards[(h % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes that VerifyKey accepted the key at `now`; `persisted` is the spend its record
    /// holds.
    pub fn mark_used(&self, key_id: &str, persisted: u64, now: Micros) {
        let mut shard = self.shard(key_id);
        if let Some(a) = shard.get_mut(key_id) {
            a.unwritten_use = Some(a.unwritten_use.map_or(now, |u| u.max(now)));
            a.persisted = a.persisted.max(persisted);
            a.touched_at = now;
        } else {
            shard.insert(
                key_id.to_owned(),
                Account {
                    unwritten_use: Some(now),
                    persisted,
                    touched_at: now,
                    ..Account::default()
                },
            );
        }
    }

    /// Adds reported spend (`persisted`: the record's figure, when the caller read it);
    /// returns the key's spend as this replica now sees it.
    pub fn add_spend(&self, key_id: &str, spend: u64, persisted: Option<u64>, now: Micros) -> u64 {
        let mut shard = self.shard(key_id);
        let a = shard.entry(key_id.to_owned()).or_default();
        a.unwritten_spend = a.unwritten_spend.saturating_add(spend);
        a.persisted = a.persisted.max(persisted.unwrap_or(0));
        a.touched_at = now;
        a.persisted.saturating_add(a.unwritten_spend)
    }

    /// Whether this replica knows the key (it verified or reported it recently).
    pub fn knows(&self, key_id: &str) -> bool {
        self.shard(key_id).contains_key(key_id)
    }

    /// The key's spend as this replica sees it, given the persisted spend of its record.
    pub fn spent(&self, key_id: &str, persisted: u64) -> u64 {
        self.shard(key_id).get(key_id).map_or(persisted, |a| {
            a.persisted.max(persisted).saturating_add(a.unwritten_spend)
        })
    }

    /// Writes unwritten spend and the last uses that moved by [`LAST_USE_RESOLUTION`]
    /// (every last use with `all`) in one batch, and forgets idle accounts.
    pub async fn flush(
        &self,
        store: &dyn Store,
        now: Micros,
        all: bool,
    ) -> Result<usize, StoreError> {
        let use_due = |a: &Account| {
            a.unwritten_use.is_some_and(|u| {
                all || a
                    .written_use
                    .is_none_or(|w| u.saturating_sub(w) >= LAST_USE_RESOLUTION)
            })
        };
        let mut batch = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard.retain(|_, a| {
                a.unwritten_spend > 0
                    || a.unwritten_use.is_some()
                    || now.saturating_sub(a.touched_at) < self.keep_idle
            });
            batch.extend(
                shard
                    .iter()
                    .filter(|(_, a)| a.unwritten_spend > 0 || use_due(a))
                    .map(|(key_id, a)| UsageDelta {
                        key_id: key_id.clone(),
                        spend_micros: a.unwritten_spend,
                        last_used_at: a.unwritten_use.filter(|_| use_due(a)),
                    }),
            );
        }
        if batch.is_empty() {
            return Ok(0);
        }
        let totals: HashMap<String, u64> = store.record_usage(&batch).await?.into_iter().collect();
        for written in &batch {
            let mut shard = self.shard(&written.key_id);
            let Some(a) = shard.get_mut(&written.key_id) else {
                continue;
            };
            a.unwritten_spend = a.unwritten_spend.saturating_sub(written.spend_micros);
            if let Some(used) = written.last_used_at {
                a.written_use = Some(a.written_use.map_or(used, |w| w.max(used)));
                if a.unwritten_use == Some(used) {
                    a.unwritten_use = None;
                }
            }
            match totals.get(&written.key_id) {
                Some(total) => a.persisted = a.persisted.max(*total),
                // The key is gone: nothing to keep for it.
                None => {
                    shard.remove(&written.key_id);
                }
            }
        }
        Ok(batch.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Micros = crate::domain::MICROS_PER_SECOND;

    /// Against a real (SQLite) store: a key in steady use is written once a minute, its
    /// spend at every flush, and everything at a final flush.
    #[tokio::test]
    async fn steady_use_is_written_once_a_minute_and_spend_every_time() {
        use crate::domain::key::KeyRecord;
        use crate::domain::key_format::KeyHash;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("usage.db").display());
        let store = crate::store::open(&url, 1).await.unwrap();
        let key_id = crate::domain::ids::new_key_id().unwrap();
        let key = KeyRecord {
            scopes: vec![],
            ..KeyRecord::sample(&key_id)
        };
        let audit = crate::store::AuditContext {
            actor_id: "u".into(),
            caller: "t".into(),
            action: "key.issue",
            detail: String::new(),
        };
        store
            .insert_key(&key, &KeyHash::of("k"), None, &audit)
            .await
            .unwrap();
        let book = UsageBook::new(Duration::from_secs(300), Duration::from_secs(1));
        let last_used = async || store.get_key(&key_id).await.unwrap().unwrap().last_used_at;

        let t0 = 1_000_000 * S;
        book.mark_used(&key_id, 0, t0);
        assert_eq!(book.flush(store.as_ref(), t0, false).await.unwrap(), 1);
        assert_eq!(last_used().await, Some(t0));
        book.mark_used(&key_id, 0, t0 + 10 * S);
        assert_eq!(
            book.flush(store.as_ref(), t0 + 10 * S, false)
                .await
                .unwrap(),
            0
        );
        book.add_spend(&key_id, 5, None, t0 + 11 * S);
        assert_eq!(
            book.flush(store.as_ref(), t0 + 11 * S, false)
                .await
                .unwrap(),
            1
        );
        assert_eq!(last_used().await, Some(t0), "the use is not due yet");
        book.mark_used(&key_id, 0, t0 + 61 * S);
        assert_eq!(
            book.flush(store.as_ref(), t0 + 61 * S, false)
                .await
                .unwrap(),
            1
        );
        assert_eq!(last_used().await, Some(t0 + 61 * S));
        book.mark_used(&key_id, 0, t0 + 70 * S);
        assert_eq!(
            book.flush(store.as_ref(), t0 + 70 * S, true).await.unwrap(),
            1
        );
        assert_eq!(last_used().await, Some(t0 + 70 * S));
        assert_eq!(book.spent(&key_id, 0), 5);
        assert_eq!(
            book.flush(store.as_ref(), t0 + 71 * S, true).await.unwrap(),
            0
        );
    }

    #[test]
    fn spend_adds_to_the_fresher_persisted_figure() {
        let book = UsageBook::new(Duration::from_secs(300), Duration::from_secs(1));
        assert_eq!(book.spent("key_a", 40), 40);
        assert_eq!(book.add_spend("key_a", 10, Some(40), 0), 50);
        assert_eq!(book.spent("key_a", 40), 50);
        // A stale record does not lower it; a fresher one (another replica wrote 100
        // more) raises it.
        assert_eq!(book.spent("key_a", 0), 50);
        assert_eq!(book.spent("key_a", 140), 150);
        assert!(!book.knows("key_b"));
        book.mark_used("key_b", 7, 5);
        assert!(book.knows("key_b"));
        assert_eq!(book.add_spend("key_b", 1, None, 6), 8);
    }
}
