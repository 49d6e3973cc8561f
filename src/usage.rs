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
//! saturated at [`MAX_SPEND_MICROS`], as the stored total is.
//!
//! Both figures belong to one **spend epoch** (see [`crate::domain::budget`]): the period
//! of the key's budget, or since its last reset. A call that finds a newer epoch than the
//! account's starts the account again from zero, dropping what the old epoch had not
//! written (spend of an epoch that has ended decides nothing any more), and every write
//! names its epoch, so the store ignores a late write of an ended epoch.
//!
//! Persisted figures include every replica's writes up to when they were read and spend
//! only grows, so the largest is the freshest; unwritten spend is this replica's alone. A
//! write removes exactly what it wrote from "unwritten", after its commit, so spend is
//! never lost and never counted twice once the write has returned (between the commit and
//! that moment a reader may count it twice, which only errs toward refusing). With several
//! replicas, another replica's spend is seen once it has written it (every
//! `usage.flush_interval`) and this replica has read it (a write returns the key's total).
//!
//! A pool with a budget has an account too, under its counter name
//! ([`crate::domain::pools`]): the spend every key of the pool reports here, written to
//! the pool's row ([`UsageStore::record_pool_usage`]) like a key's.
//!
//! Writes happen every flush interval and at shutdown, in statements of at most
//! [`USAGE_CHUNK`] keys, each settled on its own as it commits: a flush writes each key's
//! figures once, whichever of its statements fail. A statement that fails keeps its
//! figures for the next flush; one the database refuses (rather than one it cannot
//! answer) is halved and retried until the keys it refuses are isolated, so one key the
//! database will not update holds back no other key.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::domain::Micros;
use crate::domain::budget::SpendEpoch;
use crate::domain::limits::MAX_SPEND_MICROS;
use crate::domain::packed_id::IdRef;
use crate::domain::pools::is_pool_counter;
use crate::ledger::Ledger;
use crate::store::{StoreError, USAGE_CHUNK, UsageDelta, UsageStore};
use crate::usage_history::UsageHistory;

/// Failed writes one flush may spend halving pieces to find the keys the database
/// refuses. Isolating one such key in a chunk of [`USAGE_CHUNK`] takes about a dozen
/// (one per halving); a database that refuses every write costs this many statements per
/// flush, plus one per chunk, rather than one per key.
const MAX_FAILED_WRITES: usize = 64;

/// How far a key's last use must have moved before the periodic write records it again:
/// a key in steady use costs one row write a minute, not one per flush. (The first use
/// is written at the next flush; a final flush at shutdown writes everything.)
pub const LAST_USE_RESOLUTION: Micros = 60 * crate::domain::MICROS_PER_SECOND;

/// One key's usage not yet written, in the key's record of the [`Ledger`] (beside its
/// rate-limit counters). Uses are `NEVER` for none rather than `Option`s (a word each
/// instead of two, in an account every verified key has), which the code below needs no
/// case for: uses only ever merge by `max`. The spend figures are boxed, and absent while
/// they are what a key that reported no spend has (nothing persisted, the lifetime
/// epoch): most keys' accounts are then four words.
#[derive(Debug)]
pub(crate) struct Account {
    spend: Option<Box<SpendAccount>>,
    /// The latest use not yet written, or `NEVER`.
    unwritten_use: Micros,
    /// The last use written, or `NEVER`.
    written_use: Micros,
    /// Calls admitted in hour `admitted_hour` (hours since 1970) not yet in the usage
    /// history: counted here, under the lock `mark_used` takes anyway, rather than in a
    /// map of the history's own (a second lock and about 200 bytes a key per interval).
    admitted_hour: u32,
    admitted: u32,
}

/// A key's spend, in one epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SpendAccount {
    /// The start and end of the spend epoch both spend figures belong to.
    epoch: Micros,
    epoch_ends: Micros,
    unwritten_spend: u64,
    /// The largest persisted spend seen (records read, writes returned).
    persisted: u64,
    /// When reported spend last changed the account (a use counts as a touch by itself).
    touched_at: Micros,
}

/// The spend figures of an account that has none of its own.
const NO_SPEND: SpendAccount = SpendAccount {
    epoch: 0,
    epoch_ends: Micros::MAX,
    unwritten_spend: 0,
    persisted: 0,
    touched_at: NEVER,
};

const NEVER: Micros = Micros::MIN;

impl Default for Account {
    fn default() -> Self {
        Account {
            spend: None,
            unwritten_use: NEVER,
            written_use: NEVER,
            admitted_hour: 0,
            admitted: 0,
        }
    }
}

impl Account {
    /// Whether the book has an account for the key (a record may hold only counters).
    fn present(&self) -> bool {
        self.spend.is_some()
            || self.unwritten_use != NEVER
            || self.written_use != NEVER
            || self.admitted > 0
    }

    fn spend(&self) -> &SpendAccount {
        self.spend.as_deref().unwrap_or(&NO_SPEND)
    }

    fn spend_mut(&mut self) -> &mut SpendAccount {
        self.spend.get_or_insert_with(|| Box::new(NO_SPEND))
    }

    /// When the account last changed: idle accounts are forgotten.
    fn touched_at(&self) -> Micros {
        self.unwritten_use
            .max(self.written_use)
            .max(self.spend().touched_at)
    }

    fn note_persisted(&mut self, persisted: u64) {
        if persisted > self.spend().persisted {
            self.spend_mut().persisted = persisted;
        }
    }
}

type KeyIds = HashSet<String, foldhash::quality::RandomState>;

/// A key's spend as one replica sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spend {
    /// The largest persisted figure seen plus what this replica has not written.
    pub total: u64,
    /// The largest persisted figure seen (what seeds spend shared by replicas).
    pub persisted: u64,
}

pub struct UsageBook {
    /// The accounts, in each key's record (hashed with foldhash, seeded per process:
    /// VerifyKey looks a key up here twice per call).
    ledger: Arc<Ledger>,
    /// How long an idle account with nothing unwritten is kept: longer than any cached key
    /// record can live, so a record read before this replica's last write is never the
    /// only figure left.
    keep_idle: Micros,
    /// Keys per write ([`USAGE_CHUNK`]; smaller in tests).
    chunk: usize,
    /// [`MAX_FAILED_WRITES`] (smaller in tests).
    max_failures: usize,
    /// Keys whose last write failed on their own (the database refused them): written
    /// apart from the other keys until a write succeeds. Normally none, so kept here
    /// rather than as a flag that would grow every account.
    failing: Mutex<KeyIds>,
    /// The usage history's tally, written on its own cadence by the same flusher.
    history: UsageHistory,
}

impl UsageBook {
    /// `record_ttl`: the longest a key record stays in the VerifyKey cache.
    pub fn new(record_ttl: Duration, flush_interval: Duration) -> Self {
        UsageBook::with_ledger(Arc::default(), record_ttl, flush_interval)
    }

    /// A book keeping its accounts in `ledger`'s records (shared with the memory
    /// limiter's counters, in a server counting in memory).
    pub fn with_ledger(
        ledger: Arc<Ledger>,
        record_ttl: Duration,
        flush_interval: Duration,
    ) -> Self {
        let keep = record_ttl + 2 * flush_interval + Duration::from_secs(1);
        UsageBook {
            ledger,
            keep_idle: crate::domain::micros_in(keep),
            chunk: USAGE_CHUNK,
            max_failures: MAX_FAILED_WRITES,
            failing: Mutex::default(),
            history: UsageHistory::default(),
        }
    }

    /// The usage history's tally (admitted, refused by reason, tokens, spend per key and
    /// hour).
    pub fn history(&self) -> &UsageHistory {
        &self.history
    }

    /// Notes that VerifyKey accepted the key at `now`; `persisted` is the spend its record
    /// holds in `epoch`, the key's spend epoch now.
    pub fn mark_used<'a>(
        &self,
        key_id: impl Into<IdRef<'a>>,
        persisted: u64,
        epoch: SpendEpoch,
        now: Micros,
    ) {
        let key_id = key_id.into();
        self.ledger.entry(key_id, |record| {
            // A key the book has no account for starts from the empty one, whose epoch
            // the call's replaces.
            let a = &mut record.account;
            a.enter(epoch);
            a.unwritten_use = a.unwritten_use.max(now);
            a.note_persisted(persisted);
            self.count_admitted(key_id, a, now);
        });
    }

    /// Counts an admitted call in the account's hour for the usage history; an hour that
    /// ended goes to the history's own tally first (once an hour a key, at most).
    fn count_admitted(&self, key_id: IdRef<'_>, a: &mut Account, now: Micros) {
        let hour = hour_number(now);
        if a.admitted_hour != hour {
            self.hand_over_admitted(&key_id.text(), a);
            a.admitted_hour = hour;
        }
        a.admitted = a.admitted.saturating_add(1);
    }

    fn hand_over_admitted(&self, key_id: &str, a: &mut Account) {
        if a.admitted > 0 {
            self.history.admitted(
                key_id,
                u64::from(a.admitted),
                i64::from(a.admitted_hour) * HOUR,
            );
            a.admitted = 0;
        }
    }

    /// Writes the usage history: the admitted calls counted in the accounts, then the
    /// history's tally ([`UsageHistory::flush`]).
    pub async fn flush_history(&self, store: &dyn UsageStore) -> Result<usize, StoreError> {
        self.ledger.retain(|record| {
            if record.account.admitted > 0 {
                self.hand_over_admitted(&record.id(), &mut record.account);
            }
            true
        });
        self.history.flush(store).await
    }

    /// Adds reported spend; `read`: the record's spend in its epoch now, when the caller
    /// read it (see [`UsageBook::knows`]). Returns the key's spend as this replica now
    /// sees it.
    pub fn add_spend(
        &self,
        key_id: &str,
        spend: u64,
        read: Option<(u64, SpendEpoch)>,
        now: Micros,
    ) -> u64 {
        self.ledger.entry(key_id, |record| {
            let a = &mut record.account;
            if let Some((persisted, epoch)) = read {
                a.enter(epoch);
                a.note_persisted(persisted);
            }
            let s = a.spend_mut();
            s.unwritten_spend = s
                .unwritten_spend
                .saturating_add(spend)
                .min(MAX_SPEND_MICROS);
            s.touched_at = now;
            total(s.persisted, s.unwritten_spend)
        })
    }

    /// Whether this replica knows the key (it verified or reported it recently) and its
    /// spend epoch at `now`: otherwise a report must read the key's record first.
    /// Forgets which spend epoch the key is in (its record changed: a reset starts a new
    /// one), so that the next report reads the record. What is unwritten stays, to be
    /// written in the epoch it was counted in.
    pub fn forget_epoch(&self, key_id: &str) {
        self.ledger.get(key_id, |record| {
            if record.account.present() {
                record.account.spend_mut().epoch_ends = Micros::MIN;
            }
        });
    }

    pub fn knows(&self, key_id: &str, now: Micros) -> bool {
        self.ledger
            .get(key_id, |r| {
                r.account.present() && now < r.account.spend().epoch_ends
            })
            .unwrap_or(false)
    }

    /// The largest persisted spend seen for the key in its account's epoch, and that
    /// epoch's start (zeros for a key it does not know).
    pub fn persisted(&self, key_id: &str) -> (u64, Micros) {
        self.ledger
            .get(key_id, |r| {
                let s = r.account.spend();
                (s.persisted, s.epoch)
            })
            .unwrap_or((0, 0))
    }

    /// The key's spend in `epoch` as this replica sees it, given the persisted spend of
    /// its record in that epoch: one lookup for both figures a budget decision needs.
    pub fn spend<'a>(
        &self,
        key_id: impl Into<IdRef<'a>>,
        persisted: u64,
        epoch: &SpendEpoch,
    ) -> Spend {
        let fresh = Spend {
            total: persisted,
            persisted,
        };
        self.ledger
            .get(key_id, |r| {
                let a = r.account.spend();
                if !r.account.present() || a.epoch < epoch.start {
                    // No account, or one of an ended epoch: none of it counts now.
                    return fresh;
                }
                let persisted = a.persisted.max(persisted);
                Spend {
                    total: total(persisted, a.unwritten_spend),
                    persisted,
                }
            })
            .unwrap_or(fresh)
    }

    /// Writes unwritten spend and the last uses that moved by [`LAST_USE_RESOLUTION`]
    /// (every last use with `all`), and forgets idle accounts.
    ///
    /// Each write is one statement of at most [`USAGE_CHUNK`] keys that commits whole or
    /// not at all, and each key's figures are settled right after its write commits: a
    /// failure later in the flush cannot make a committed write count again. A write that
    /// fails for a reason other than an unreachable database is halved and each half
    /// retried, down to single keys, so that one key the database refuses (a row it cannot
    /// update) is isolated, logged by key id and kept, while every other key is written.
    /// An isolated key is written on its own at later flushes until a write succeeds. An
    /// unreachable database ends the flush: the rest is kept for the next one.
    pub async fn flush(&self, store: &dyn UsageStore, now: Micros, all: bool) -> Flushed {
        let use_due = |a: &Account| {
            a.unwritten_use != NEVER
                && (all || a.unwritten_use.saturating_sub(a.written_use) >= LAST_USE_RESOLUTION)
        };
        // Keys whose write failed at an earlier flush are written apart from the others,
        // so a key the database keeps refusing fails no other key's write first.
        let failing_keys = self.failing_keys().clone();
        let (mut batch, mut failing, mut pools) = (Vec::new(), Vec::new(), Vec::new());
        self.ledger.retain(|record| {
            let a = &mut record.account;
            let idle = a.present()
                && a.spend().unwritten_spend == 0
                && a.admitted == 0
                && a.unwritten_use == NEVER
                && now.saturating_sub(a.touched_at()) >= self.keep_idle;
            if idle {
                *a = Account::default();
            }
            // The record's counters, dropped once they count nothing (a key idle for a
            // whole window); the record goes once both are empty.
            let counting = record.counters.prune(now);
            let a = &record.account;
            if !a.present() {
                return counting;
            }
            if a.spend().unwritten_spend > 0 || use_due(a) {
                let delta = UsageDelta {
                    key_id: record.id(),
                    epoch: a.spend().epoch,
                    spend_micros: a.spend().unwritten_spend,
                    last_used_at: use_due(a).then_some(a.unwritten_use),
                };
                let apart = !failing_keys.is_empty() && failing_keys.contains(&delta.key_id);
                if is_pool_counter(&delta.key_id) {
                    pools.push(delta);
                } else if apart {
                    failing.push(delta);
                } else {
                    batch.push(delta);
                }
            }
            true
        });
        let chunk = self.chunk.max(1);
        // Pools' spend goes to their own rows, in pieces of their own.
        let mut pending: VecDeque<&[UsageDelta]> = batch
            .chunks(chunk)
            .chain(failing.chunks(chunk))
            .chain(pools.chunks(chunk))
            .collect();
        let mut flushed = Flushed::default();
        while let Some(piece) = pending.pop_front() {
            let written = if piece.first().is_some_and(|d| is_pool_counter(&d.key_id)) {
                store.record_pool_usage(piece).await
            } else {
                store.record_usage(piece).await
            };
            let e = match written {
                Ok(totals) => {
                    self.settle(piece, totals);
                    flushed.written += piece.len();
                    continue;
                }
                Err(e) => e,
            };
            flushed.failures += 1;
            if matches!(e, StoreError::Unavailable(_)) {
                // Every other write would fail alike (or wait for the pool's timeout).
                flushed.kept += piece.len() + pending.iter().map(|p| p.len()).sum::<usize>();
                flushed.error = Some(e);
                break;
            }
            if let [delta] = piece {
                self.isolate(&delta.key_id, &e);
                flushed.kept += 1;
            } else if flushed.failures < self.max_failures {
                let (first, second) = piece.split_at(piece.len() / 2);
                pending.push_front(second);
                pending.push_front(first);
            } else {
                // A database that refuses everything must not cost a statement per key
                // at every flush: the remaining pieces are tried once each, whole.
                flushed.kept += piece.len();
            }
            flushed.error = Some(e);
        }
        flushed
    }

    /// Takes what a committed write wrote out of the unwritten figures (what was added
    /// since the batch was taken stays), and notes the totals it returned.
    fn settle(&self, written: &[UsageDelta], totals: Vec<(String, u64, Micros)>) {
        {
            let mut failing = self.failing_keys();
            if !failing.is_empty() {
                for w in written {
                    failing.remove(&w.key_id);
                }
            }
        }
        let totals: HashMap<String, (u64, Micros)> = totals
            .into_iter()
            .map(|(key_id, total, epoch)| (key_id, (total, epoch)))
            .collect();
        for written in written {
            self.ledger.get(&written.key_id, |record| {
                let a = &mut record.account;
                if !a.present() {
                    return;
                }
                // An account that moved to a newer epoch since the batch was taken dropped
                // what it wrote already.
                if a.spend().epoch == written.epoch && written.spend_micros > 0 {
                    let s = a.spend_mut();
                    s.unwritten_spend = s.unwritten_spend.saturating_sub(written.spend_micros);
                }
                if let Some(used) = written.last_used_at {
                    a.written_use = a.written_use.max(used);
                    if a.unwritten_use == used {
                        a.unwritten_use = NEVER;
                    }
                }
                match totals.get(&written.key_id) {
                    Some((total, epoch)) => {
                        if *epoch == a.spend().epoch {
                            a.note_persisted(*total);
                        }
                    }
                    // The key is gone: nothing to keep for it (its record goes at the
                    // next flush, once its counters count nothing either).
                    None => *a = Account::default(),
                }
            });
        }
    }

    /// A key whose write failed on its own: kept, and written apart from now on.
    fn isolate(&self, key_id: &str, e: &StoreError) {
        if self.failing_keys().insert(key_id.to_owned()) {
            tracing::warn!(
                key_id,
                error = %e,
                "writing one key's usage failed; kept for the next flush (the other keys were written)"
            );
        } else {
            tracing::debug!(key_id, error = %e, "writing one key's usage failed again; kept");
        }
    }

    fn failing_keys(&self) -> MutexGuard<'_, KeyIds> {
        self.failing.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Which of `shards` shards a key's figures live in (the book's and the history's):
/// FNV-1a, cheap, and key ids are random already.
pub(crate) fn shard_of(key_id: &str, shards: usize) -> usize {
    let h = key_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (h % shards as u64) as usize
}

const HOUR: Micros = 3_600 * crate::domain::MICROS_PER_SECOND;

/// Hours since 1970 (u32 reaches the year 2459).
fn hour_number(at: Micros) -> u32 {
    u32::try_from(at.div_euclid(HOUR)).unwrap_or(0)
}

impl Account {
    /// Moves the account to `epoch` if it is newer: both spend figures start again from
    /// zero (an ended epoch's unwritten spend decides nothing any more).
    fn enter(&mut self, epoch: SpendEpoch) {
        let s = self.spend();
        if epoch.start < s.epoch || (epoch.start == s.epoch && epoch.ends == s.epoch_ends) {
            return;
        }
        let s = self.spend_mut();
        if epoch.start > s.epoch {
            s.epoch = epoch.start;
            s.unwritten_spend = 0;
            s.persisted = 0;
        }
        s.epoch_ends = epoch.ends;
    }
}

/// A persisted total plus unwritten spend as the store will hold it once written: the
/// sum, saturated at [`MAX_SPEND_MICROS`] (a total already above it, stored before there
/// was a ceiling, stays as it is), like the stores' usage statement.
fn total(persisted: u64, unwritten: u64) -> u64 {
    persisted.max(persisted.saturating_add(unwritten).min(MAX_SPEND_MICROS))
}

/// What one [`UsageBook::flush`] did.
#[derive(Debug, Default)]
pub struct Flushed {
    /// Keys whose figures were written.
    pub written: usize,
    /// Keys whose figures could not be written: kept for the next flush.
    pub kept: usize,
    /// Writes (statements) that failed.
    pub failures: usize,
    /// The last failure, when a write failed.
    pub error: Option<StoreError>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

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
        let key_id = crate::domain::ids::new_key_id(&mut getrandom::SysRng).unwrap();
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
        book.mark_used(&key_id, 0, SpendEpoch::LIFETIME, t0);
        assert_eq!(book.flush(store.as_ref(), t0, false).await.written, 1);
        assert_eq!(last_used().await, Some(t0));
        book.mark_used(&key_id, 0, SpendEpoch::LIFETIME, t0 + 10 * S);
        assert_eq!(
            book.flush(store.as_ref(), t0 + 10 * S, false).await.written,
            0
        );
        book.add_spend(&key_id, 5, None, t0 + 11 * S);
        assert_eq!(
            book.flush(store.as_ref(), t0 + 11 * S, false).await.written,
            1
        );
        assert_eq!(last_used().await, Some(t0), "the use is not due yet");
        book.mark_used(&key_id, 0, SpendEpoch::LIFETIME, t0 + 61 * S);
        assert_eq!(
            book.flush(store.as_ref(), t0 + 61 * S, false).await.written,
            1
        );
        assert_eq!(last_used().await, Some(t0 + 61 * S));
        book.mark_used(&key_id, 0, SpendEpoch::LIFETIME, t0 + 70 * S);
        assert_eq!(
            book.flush(store.as_ref(), t0 + 70 * S, true).await.written,
            1
        );
        assert_eq!(last_used().await, Some(t0 + 70 * S));
        assert_eq!(book.spend(&key_id, 0, &SpendEpoch::LIFETIME).total, 5);
        assert_eq!(
            book.flush(store.as_ref(), t0 + 71 * S, true).await.written,
            0
        );
    }

    /// A fresh SQLite store holding `n` keys (its directory, URL, store and key ids).
    async fn store_with_keys(
        n: usize,
    ) -> (
        tempfile::TempDir,
        String,
        std::sync::Arc<dyn Store>,
        Vec<String>,
    ) {
        use crate::domain::key::KeyRecord;
        use crate::domain::key_format::KeyHash;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("usage.db").display());
        let store = crate::store::open(&url, 1).await.unwrap();
        let audit = crate::store::AuditContext {
            actor_id: "u".into(),
            caller: "t".into(),
            action: "key.issue",
            detail: String::new(),
        };
        let mut ids = Vec::new();
        for _ in 0..n {
            let key_id = crate::domain::ids::new_key_id(&mut getrandom::SysRng).unwrap();
            store
                .insert_key(
                    &KeyRecord::sample(&key_id),
                    &KeyHash::of(&key_id),
                    None,
                    &audit,
                )
                .await
                .unwrap();
            ids.push(key_id);
        }
        (dir, url, store, ids)
    }

    /// Runs one statement on the database behind the store's back.
    async fn execute(url: &str, sql: &str) {
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut c)
            .await
            .unwrap();
    }

    async fn persisted(store: &dyn Store, ids: &[String]) -> Vec<u64> {
        let mut spent = Vec::new();
        for id in ids {
            spent.push(store.get_key(id).await.unwrap().unwrap().spent_micros);
        }
        spent
    }

    /// One key the database refuses (a trigger raises on its row) fails every write that
    /// holds it. The keys written before and after it are taken out of the book once,
    /// when their write commits, and are not written again at later flushes; the refused
    /// key is isolated and its spend kept, and written once the database takes it.
    #[tokio::test]
    async fn a_failed_write_takes_out_only_what_committed_and_keeps_the_refused_key() {
        let (_dir, url, store, ids) = store_with_keys(7).await;
        let mut book = UsageBook::new(Duration::from_secs(300), Duration::from_secs(1));
        book.chunk = 2;
        let refused = ids[3].clone();
        let others: Vec<String> = ids.iter().filter(|id| **id != refused).cloned().collect();
        execute(
            &url,
            &format!(
                "CREATE TRIGGER refuse BEFORE UPDATE ON api_keys WHEN NEW.key_id = '{refused}' \
                 BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            ),
        )
        .await;
        for id in &ids {
            book.add_spend(id, 10, Some((0, SpendEpoch::LIFETIME)), 1);
        }

        let flushed = book.flush(store.as_ref(), 2, true).await;
        assert_eq!((flushed.written, flushed.kept), (6, 1));
        assert!(flushed.error.is_some());
        assert_eq!(persisted(store.as_ref(), &others).await, [10; 6]);
        assert_eq!(
            persisted(store.as_ref(), std::slice::from_ref(&refused)).await,
            [0]
        );
        // Written once: nothing of theirs is left to write again.
        assert_eq!(book.spend(&others[0], 10, &SpendEpoch::LIFETIME).total, 10);
        assert_eq!(
            book.spend(&refused, 0, &SpendEpoch::LIFETIME).total,
            10,
            "the refused key's spend is kept"
        );
        for now in [3, 4] {
            let flushed = book.flush(store.as_ref(), now, true).await;
            assert_eq!((flushed.written, flushed.kept), (0, 1));
        }
        assert_eq!(persisted(store.as_ref(), &others).await, [10; 6]);

        for id in &ids {
            book.add_spend(id, 1, None, 5);
        }
        let flushed = book.flush(store.as_ref(), 6, true).await;
        assert_eq!((flushed.written, flushed.kept), (6, 1));
        assert_eq!(persisted(store.as_ref(), &others).await, [11; 6]);

        execute(&url, "DROP TRIGGER refuse").await;
        let flushed = book.flush(store.as_ref(), 7, true).await;
        assert_eq!((flushed.written, flushed.kept), (1, 0));
        assert!(flushed.error.is_none());
        assert_eq!(persisted(store.as_ref(), &ids).await, [11; 7]);
        assert_eq!(book.spend(&refused, 11, &SpendEpoch::LIFETIME).total, 11);
        assert_eq!(book.flush(store.as_ref(), 8, true).await.written, 0);
    }

    /// A database that refuses every write (its table is gone) costs a flush at most one
    /// failed write per chunk plus the halving allowance, not one per key; everything is
    /// kept and written once the table is back.
    #[tokio::test]
    async fn a_database_refusing_every_write_costs_bounded_writes_and_loses_nothing() {
        let (_dir, url, store, ids) = store_with_keys(40).await;
        let mut book = UsageBook::new(Duration::from_secs(300), Duration::from_secs(1));
        (book.chunk, book.max_failures) = (2, 4);
        for id in &ids {
            book.add_spend(id, 3, Some((0, SpendEpoch::LIFETIME)), 1);
        }
        execute(&url, "ALTER TABLE api_keys RENAME TO api_keys_hidden").await;
        let flushed = book.flush(store.as_ref(), 2, true).await;
        assert_eq!((flushed.written, flushed.kept), (0, 40));
        assert!(
            flushed.failures <= 20 + 4,
            "{} failed writes",
            flushed.failures
        );
        execute(&url, "ALTER TABLE api_keys_hidden RENAME TO api_keys").await;
        let flushed = book.flush(store.as_ref(), 3, true).await;
        assert_eq!(
            (flushed.written, flushed.kept, flushed.failures),
            (40, 0, 0)
        );
        assert_eq!(persisted(store.as_ref(), &ids).await, [3; 40]);
    }

    #[test]
    fn spend_saturates_at_the_ceiling() {
        let book = UsageBook::new(Duration::from_secs(300), Duration::from_secs(1));
        let near = MAX_SPEND_MICROS - 10;
        assert_eq!(
            book.add_spend("key_a", 5, Some((near, SpendEpoch::LIFETIME)), 0),
            near + 5
        );
        assert_eq!(book.add_spend("key_a", 1_000, None, 0), MAX_SPEND_MICROS);
        assert_eq!(book.add_spend("key_a", u64::MAX, None, 0), MAX_SPEND_MICROS);
        assert_eq!(
            book.spend("key_a", 0, &SpendEpoch::LIFETIME).total,
            MAX_SPEND_MICROS
        );
        // A total stored above the ceiling (before there was one) is not lowered.
        assert_eq!(
            book.spend("key_a", u64::MAX, &SpendEpoch::LIFETIME).total,
            u64::MAX
        );
    }

    #[test]
    fn spend_adds_to_the_fresher_persisted_figure() {
        let book = UsageBook::new(Duration::from_secs(300), Duration::from_secs(1));
        assert_eq!(book.spend("key_a", 40, &SpendEpoch::LIFETIME).total, 40);
        assert_eq!(
            book.add_spend("key_a", 10, Some((40, SpendEpoch::LIFETIME)), 0),
            50
        );
        assert_eq!(book.spend("key_a", 40, &SpendEpoch::LIFETIME).total, 50);
        // A stale record does not lower it; a fresher one (another replica wrote 100
        // more) raises it.
        assert_eq!(book.spend("key_a", 0, &SpendEpoch::LIFETIME).total, 50);
        assert_eq!(book.spend("key_a", 140, &SpendEpoch::LIFETIME).total, 150);
        assert!(!book.knows("key_b", 5));
        book.mark_used("key_b", 7, SpendEpoch::LIFETIME, 5);
        assert!(book.knows("key_b", 5));
        assert_eq!(book.add_spend("key_b", 1, None, 6), 8);
    }

    /// A new spend epoch (a period's turn, a reset) starts the account from zero; a
    /// report after the epoch ended needs the record again; a write taken before the
    /// turn does not take the new epoch's spend away when it settles.
    #[tokio::test]
    async fn a_new_epoch_starts_from_zero_and_an_old_write_settles_nothing_in_it() {
        let (_dir, _url, store, ids) = store_with_keys(1).await;
        let book = UsageBook::new(Duration::from_secs(300), Duration::from_secs(1));
        let january = SpendEpoch {
            start: 1_000,
            ends: 2_000,
        };
        let february = SpendEpoch {
            start: 2_000,
            ends: 3_000,
        };
        let key = &ids[0];
        book.mark_used(key, 0, january, 1_500);
        assert_eq!(book.add_spend(key, 70, None, 1_600), 70);
        assert!(book.knows(key, 1_999));
        assert!(
            !book.knows(key, 2_000),
            "January has ended: read the record"
        );
        assert_eq!(
            book.spend(key, 0, &february).total,
            0,
            "January counts nothing"
        );
        // February begins; January's unwritten spend decides nothing any more.
        assert_eq!(book.add_spend(key, 5, Some((0, february)), 2_100), 5);
        assert_eq!(book.spend(key, 0, &february).total, 5);
        book.flush(store.as_ref(), 2_200, true).await;
        assert_eq!(persisted(store.as_ref(), &ids).await, [5]);
        assert_eq!(
            book.spend(key, 0, &february).total,
            5,
            "written once, counted once"
        );
        // A late write of January's spend changes nothing in February's.
        let late = UsageDelta {
            key_id: key.clone(),
            epoch: january.start,
            spend_micros: 999,
            last_used_at: None,
        };
        let totals = store.record_usage(&[late]).await.unwrap();
        assert_eq!(totals, [(key.clone(), 5, february.start)]);
    }

    /// Admitted calls are counted in the account, per hour, and written to the usage
    /// history with what the history tallied itself (a refusal here).
    #[tokio::test]
    async fn admitted_calls_reach_the_history_per_hour() {
        use crate::domain::key::VerifyCode;
        use crate::domain::rollup::{Granularity, GroupBy};
        let (_dir, _url, store, ids) = store_with_keys(1).await;
        let book = UsageBook::new(Duration::from_secs(300), Duration::from_secs(1));
        let key = &ids[0];
        let t0 = 1_796_464_800_000_000; // 10:00 UTC
        for at in [t0, t0 + 1, t0 + 2, t0 + HOUR, t0 + HOUR + 1] {
            book.mark_used(key, 0, SpendEpoch::LIFETIME, at);
        }
        book.history().count(key, VerifyCode::Revoked, t0 + 5);
        assert_eq!(book.flush_history(store.as_ref()).await.unwrap(), 3);
        let rows = store
            .query_usage(&crate::store::UsageQuery {
                workspace_id: "ws".into(),
                group_by: GroupBy::Key,
                granularity: Granularity::Hour,
                since: t0,
                until: t0 + 2 * HOUR,
                owner: None,
                after: None,
                limit: 10,
            })
            .await
            .unwrap();
        let counts: Vec<_> = rows
            .iter()
            .map(|r| (r.bucket_start, r.tally.admitted, r.tally.refused_total()))
            .collect();
        assert_eq!(counts, [(t0, 3, 1), (t0 + HOUR, 2, 0)]);
        // Written once: a second write adds nothing.
        assert_eq!(book.flush_history(store.as_ref()).await.unwrap(), 0);
    }
}
