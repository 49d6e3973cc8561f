//! Whether this replica may vouch for what its cache holds.
//!
//! A cached answer is only as fresh as the replica's last read of the event log: a
//! revoke committed on another replica reaches this one's cache through that log. A
//! replica whose database connection hangs keeps its cache and its timers, so without a
//! check it would answer VALID for a revoked key until the entry's TTL ran out, and keep
//! heartbeating edge nodes as if it were caught up.
//!
//! [`Freshness`] records when the last *successful* read of the log began (its start,
//! not its end: a read sees what committed before it began, so that instant is what the
//! replica has seen up to). While that instant is within `max_staleness` of now, the
//! replica vouches: VerifyKey answers from its cache, streams heartbeat, health says
//! SERVING. Past it, VerifyKey answers UNAVAILABLE, streams end with UNAVAILABLE naming
//! their cursor, new streams are refused, and health reports NOT_SERVING for the services
//! that vouch (VerifyService, RevocationService, Envoy's Authorization). The tailer
//! flips it back only after a read that caught up with the log's head, so a replica
//! applies every invalidation it missed before it vouches again.
//!
//! The hot path reads one atomic flag. The flag is cleared by a watchdog task ticking a
//! tenth of the bound (at most 100 ms), so a revoked key is refused everywhere within
//! `max_staleness` plus one tick of the revoke, or the replica answers UNAVAILABLE.
//!
//! Time here is tokio's monotonic clock, not [`crate::clock::Clock`]: the bound is about
//! how long the replica has been blind, not about the keys' own times.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// The longest the watchdog waits between two checks.
const MAX_TICK: Duration = Duration::from_millis(100);

pub struct Freshness {
    /// `None`: the replica always vouches (tests of the listener alone; never the default).
    max_staleness: Option<Duration>,
    base: Instant,
    /// Micros after `base` at which the last successful read of the log began.
    last_read: AtomicU64,
    vouching: AtomicBool,
    changes: watch::Sender<bool>,
}

impl Freshness {
    /// A replica that has just read the log (at start-up).
    pub fn new(max_staleness: Option<Duration>) -> Self {
        let (changes, _) = watch::channel(true);
        Freshness {
            max_staleness,
            base: Instant::now(),
            last_read: AtomicU64::new(0),
            vouching: AtomicBool::new(true),
            changes,
        }
    }

    pub fn max_staleness(&self) -> Option<Duration> {
        self.max_staleness
    }

    /// Whether the replica has read the log recently enough to answer from its cache.
    /// Acquire: a caller that sees `true` after a catch-up also sees that catch-up's
    /// invalidations.
    pub fn vouching(&self) -> bool {
        self.vouching.load(Ordering::Acquire)
    }

    /// Follows every change of [`Freshness::vouching`].
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.changes.subscribe()
    }

    /// A read of the log that began at `started` reached the head and was applied (by
    /// `now`).
    pub fn read_succeeded(&self, started: Instant, now: Instant) {
        let at = self.micros_since_base(started);
        self.last_read.fetch_max(at, Ordering::AcqRel);
        if self.is_fresh(now) {
            self.set(true);
        }
    }

    /// The watchdog's check: stops vouching once the last successful read is too old.
    pub fn check(&self, now: Instant) {
        if !self.is_fresh(now) {
            self.set(false);
        }
    }

    /// How often the watchdog checks, and how often the tailer must read the log at the
    /// least (a third of the bound, so one slow read does not end vouching).
    pub fn watchdog_tick(&self) -> Option<Duration> {
        self.max_staleness
            .map(|b| (b / 10).clamp(Duration::from_millis(1), MAX_TICK))
    }

    pub fn read_at_least_every(&self) -> Option<Duration> {
        self.max_staleness
            .map(|b| (b / 3).max(Duration::from_millis(1)))
    }

    fn is_fresh(&self, now: Instant) -> bool {
        let Some(bound) = self.max_staleness else {
            return true;
        };
        let last = self.last_read.load(Ordering::Acquire);
        let elapsed = self.micros_since_base(now).saturating_sub(last);
        u128::from(elapsed) <= bound.as_micros()
    }

    fn micros_since_base(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_micros()).unwrap_or(u64::MAX)
    }

    fn set(&self, vouching: bool) {
        if self.vouching.swap(vouching, Ordering::AcqRel) != vouching {
            if vouching {
                tracing::info!("the event log is readable again and caught up; vouching again");
            } else {
                tracing::warn!(
                    max_staleness_ms = self.max_staleness.map_or(0, |b| b.as_millis() as u64),
                    "no successful read of the event log within the bound; cached answers are \
                     no longer served (VerifyKey: UNAVAILABLE, streams ended, health NOT_SERVING)"
                );
            }
            self.changes.send_replace(vouching);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test]
    async fn stops_vouching_past_the_bound_and_again_after_a_read() {
        let f = Freshness::new(Some(Duration::from_secs(3)));
        let t0 = f.base;
        assert!(f.vouching());
        f.check(t0 + ms(2900));
        assert!(f.vouching(), "within the bound");
        f.check(t0 + ms(3100));
        assert!(!f.vouching(), "3.1 s since the last successful read");
        // A read that began within the bound of now vouches again.
        f.read_succeeded(t0 + ms(2900), t0 + ms(3200));
        assert!(f.vouching());
        let mut changes = f.watch();
        f.check(t0 + ms(5900));
        assert!(f.vouching(), "3 s after the read began: not yet");
        f.check(t0 + ms(5901));
        assert!(!f.vouching());
        assert!(changes.has_changed().unwrap());
        assert!(!*changes.borrow_and_update());
    }

    #[tokio::test]
    async fn a_read_that_began_too_long_ago_does_not_vouch() {
        let f = Freshness::new(Some(Duration::from_secs(3)));
        let t0 = f.base;
        f.check(t0 + ms(10_000));
        assert!(!f.vouching());
        // The read hung for 10 s and then returned: it says nothing of those 10 s.
        f.read_succeeded(t0, t0 + ms(10_000));
        assert!(!f.vouching());
        f.read_succeeded(t0 + ms(9_990), t0 + ms(10_000));
        assert!(f.vouching());
    }

    #[tokio::test]
    async fn without_a_bound_it_always_vouches() {
        let f = Freshness::new(None);
        f.check(f.base + Duration::from_secs(3600));
        assert!(f.vouching());
        assert_eq!(f.watchdog_tick(), None);
    }
}
