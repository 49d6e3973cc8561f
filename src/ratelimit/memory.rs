//! This replica's own counters: per key, the buckets of each (unit, window) in use, kept
//! in the key's record of the [`Ledger`] beside its usage account (one entry, one copy of
//! its id and one lock for both). A window that counts nothing any more drops its buckets
//! when the key is next counted, and the usage book's flush drops those of idle keys: a
//! key idle for a whole window holds no counter state. Nothing is evicted while it still
//! counts, so no count is lost to a bound.
//!
//! Most keys have one limit and call now and then, so between calls their state is one
//! window counting in one bucket: kept as [`KeyCounters::One`], three words inside the
//! record; anything more (several windows, several buckets, leases granted) is boxed.
//!
//! It is also a [`QuotaAuthority`]: edge nodes lease quota from a replica with this
//! backend, the grants counted in the same buckets as the replica's own decisions (with
//! [`crate::domain::lease`]'s arithmetic, no clock skew: one clock), so one replica and
//! its edges together stay within each limit.

use std::sync::Arc;

use async_trait::async_trait;

use super::leased::{LeaseRecord, QuotaAuthority, new_grant_id};
use super::{Counter, LimiterError, RateLimiter, Reported};
use crate::domain::Micros;
use crate::domain::lease::{self, Amounts, Grant};
use crate::domain::limits::{
    self, BUCKETS, LimitDecision, LimitUnit, LimitWindow, RateLimit, WindowUsage,
};
use crate::domain::pools;
use crate::ledger::Ledger;

/// A (unit, window) pair: which of a key's six possible windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    RequestsMinute,
    RequestsHour,
    RequestsDay,
    TokensMinute,
    TokensHour,
    TokensDay,
}

fn slot(unit: LimitUnit, window: LimitWindow) -> Slot {
    match (unit, window) {
        (LimitUnit::Requests, LimitWindow::Minute) => Slot::RequestsMinute,
        (LimitUnit::Requests, LimitWindow::Hour) => Slot::RequestsHour,
        (LimitUnit::Requests, LimitWindow::Day) => Slot::RequestsDay,
        (LimitUnit::Tokens, LimitWindow::Minute) => Slot::TokensMinute,
        (LimitUnit::Tokens, LimitWindow::Hour) => Slot::TokensHour,
        (LimitUnit::Tokens, LimitWindow::Day) => Slot::TokensDay,
    }
}

impl Slot {
    fn window(self) -> LimitWindow {
        match self {
            Slot::RequestsMinute | Slot::TokensMinute => LimitWindow::Minute,
            Slot::RequestsHour | Slot::TokensHour => LimitWindow::Hour,
            Slot::RequestsDay | Slot::TokensDay => LimitWindow::Day,
        }
    }
}

/// One key's counters: only the windows that count something, and the grants made to
/// edge nodes, if any.
#[derive(Debug, Default)]
pub(crate) enum KeyCounters {
    /// Counting nothing.
    #[default]
    Idle,
    /// One window counting in one bucket, its newest (see [`WindowUsage::single`]).
    One { slot: Slot, bucket: i64, count: u64 },
    /// Anything else.
    Many(Box<Windows>),
}

#[derive(Debug, Default)]
pub(crate) struct Windows {
    windows: Vec<(Slot, WindowUsage)>,
    /// Leases granted to edge nodes and not settled yet: a settlement gives back only a
    /// grant listed here, once, by what is listed.
    grants: Vec<Registered>,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Registered {
    id: u64,
    amount: Amounts,
    counted_at: Micros,
}

impl KeyCounters {
    /// Takes the window of `slot` out (empty if it counts nothing yet).
    fn take(&mut self, slot: Slot) -> WindowUsage {
        match self {
            KeyCounters::One {
                slot: s,
                bucket,
                count,
            } if *s == slot => {
                let usage = WindowUsage::of_single(*bucket, *count);
                *self = KeyCounters::Idle;
                usage
            }
            KeyCounters::Many(w) => match w.windows.iter().position(|(s, _)| *s == slot) {
                Some(i) => w.windows.swap_remove(i).1,
                None => WindowUsage::default(),
            },
            _ => WindowUsage::default(),
        }
    }

    /// Puts a window back, unless it counts nothing any more.
    fn put(&mut self, slot: Slot, usage: WindowUsage) {
        if usage.is_empty() {
            return;
        }
        match self {
            KeyCounters::Idle => match usage.single() {
                Some((bucket, count)) => {
                    *self = KeyCounters::One {
                        slot,
                        bucket,
                        count,
                    }
                }
                None => self.boxed(|w| w.windows.push((slot, usage))),
            },
            _ => self.boxed(|w| w.windows.push((slot, usage))),
        }
    }

    /// Runs `f` on the boxed form, made from whatever is held.
    fn boxed(&mut self, f: impl FnOnce(&mut Windows)) {
        let mut w = match std::mem::take(self) {
            KeyCounters::Many(w) => w,
            KeyCounters::Idle => Box::default(),
            KeyCounters::One {
                slot,
                bucket,
                count,
            } => Box::new(Windows {
                windows: vec![(slot, WindowUsage::of_single(bucket, count))],
                grants: Vec::new(),
            }),
        };
        f(&mut w);
        *self = KeyCounters::Many(w);
    }

    /// Back to the smallest form that holds the same.
    fn compact(&mut self) {
        let KeyCounters::Many(w) = self else {
            return;
        };
        if w.grants.is_empty() {
            match w.windows.as_slice() {
                [] => {
                    *self = KeyCounters::Idle;
                    return;
                }
                [(slot, usage)] => {
                    if let Some((bucket, count)) = usage.single() {
                        *self = KeyCounters::One {
                            slot: *slot,
                            bucket,
                            count,
                        };
                        return;
                    }
                }
                _ => {}
            }
        }
        if w.windows.capacity() > w.windows.len().max(1) {
            w.windows.shrink_to_fit();
        }
        if w.grants.capacity() > w.grants.len().max(1) {
            w.grants.shrink_to_fit();
        }
    }

    /// Forgets what no window counts at `now` any more (and grants that left every
    /// window, settled by time itself); returns whether anything is left.
    pub(crate) fn prune(&mut self, now: Micros) -> bool {
        match self {
            KeyCounters::Idle => {}
            KeyCounters::One { slot, bucket, .. } => {
                let window = slot.window();
                if *bucket < now.div_euclid(window.bucket()) - BUCKETS {
                    *self = KeyCounters::Idle;
                }
            }
            KeyCounters::Many(w) => {
                for (slot, usage) in &mut w.windows {
                    usage.prune(slot.window(), now);
                }
                w.windows.retain(|(_, usage)| !usage.is_empty());
                let day = LimitWindow::Day.length();
                w.grants.retain(|g| g.counted_at > now.saturating_sub(day));
                self.compact();
            }
        }
        !matches!(self, KeyCounters::Idle)
    }
}

pub struct MemoryLimiter {
    ledger: Arc<Ledger>,
}

impl MemoryLimiter {
    /// Counters kept in `ledger`'s records (the usage book's, in a server).
    pub fn new(ledger: Arc<Ledger>) -> Self {
        MemoryLimiter { ledger }
    }

    /// Runs `f` on the windows `limits` name, taken out of the key's counters and put
    /// back after, under the lock of the key's record, with the counters themselves (for
    /// the grants).
    fn with_usage<T>(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        f: impl FnOnce(&mut [WindowUsage], &mut KeyCounters) -> T,
    ) -> T {
        self.ledger.entry(key_id, |record| {
            let counters = &mut record.counters;
            let mut usage: Vec<WindowUsage> = limits
                .iter()
                .map(|l| counters.take(slot(l.unit, l.window)))
                .collect();
            let out = f(&mut usage, counters);
            for (l, u) in limits.iter().zip(usage) {
                counters.put(slot(l.unit, l.window), u);
            }
            counters.compact();
            out
        })
    }
}

impl MemoryLimiter {
    /// A call judged by several counters at once: all of them locked together (see
    /// [`Ledger::with_counters`]), so a refusal by one gives back exactly what the ones
    /// before it took: a refused call consumes nothing anywhere.
    fn check_all(&self, counters: &[Counter<'_>], cost: u64, now: Micros) -> LimitDecision {
        let ids: Vec<&str> = counters.iter().map(|c| c.id).collect();
        self.ledger.with_counters(&ids, |held| {
            let mut usages: Vec<Vec<WindowUsage>> = counters
                .iter()
                .zip(held.iter_mut())
                .map(|(c, k)| {
                    c.limits
                        .iter()
                        .map(|l| k.take(slot(l.unit, l.window)))
                        .collect()
                })
                .collect();
            let mut parts: Vec<LimitDecision> = Vec::with_capacity(counters.len());
            for (c, usage) in counters.iter().zip(usages.iter_mut()) {
                let d = limits::decide(c.limits, usage, now, cost).scoped(c.scope);
                let refused = !d.allowed;
                parts.push(d);
                if refused {
                    let before = parts.len() - 1;
                    for (i, part) in parts.iter_mut().enumerate().take(before) {
                        for (l, u) in counters[i].limits.iter().zip(usages[i].iter_mut()) {
                            if l.unit == LimitUnit::Requests {
                                u.remove_at(l.window, now, cost);
                            }
                        }
                        *part = std::mem::take(part).uncounted(cost);
                    }
                    break;
                }
            }
            for ((c, k), usage) in counters.iter().zip(held.iter_mut()).zip(usages) {
                for (l, u) in c.limits.iter().zip(usage) {
                    k.put(slot(l.unit, l.window), u);
                }
                k.compact();
            }
            pools::combine(parts)
        })
    }
}

#[async_trait]
impl RateLimiter for MemoryLimiter {
    async fn check(
        &self,
        counters: &[Counter<'_>],
        cost: u64,
        now: Micros,
    ) -> Result<Option<LimitDecision>, LimiterError> {
        if let [one] = counters {
            let decision = self.with_usage(one.id, one.limits, |usage, _| {
                limits::decide(one.limits, usage, now, cost).scoped(one.scope)
            });
            return Ok(Some(decision));
        }
        Ok(Some(self.check_all(counters, cost, now)))
    }

    async fn record_usage(
        &self,
        key_id: &str,
        usage: Reported,
        now: Micros,
    ) -> Result<(), LimiterError> {
        let tokens = usage.tokens;
        if tokens == 0 {
            return Ok(());
        }
        self.ledger.entry(key_id, |record| {
            let counters = &mut record.counters;
            for window in LimitWindow::ALL {
                let slot = slot(LimitUnit::Tokens, window);
                let mut usage = counters.take(slot);
                usage.add(window, now, tokens);
                counters.put(slot, usage);
            }
            counters.compact();
        });
        Ok(())
    }
}

#[async_trait]
impl QuotaAuthority for MemoryLimiter {
    async fn grant(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        want: Amounts,
        min: u64,
        life: Micros,
        now: Micros,
    ) -> Result<Option<Grant>, LimiterError> {
        Ok(Some(self.with_usage(key_id, limits, |usage, counters| {
            let mut grant = lease::grant(limits, usage, now, want, min, life, 0);
            // A grant that left every window is settled by time itself.
            let day = LimitWindow::Day.length();
            if let KeyCounters::Many(w) = counters {
                w.grants.retain(|g| g.counted_at > now.saturating_sub(day));
            }
            if grant.granted() {
                grant.id = new_grant_id();
                let registered = Registered {
                    id: grant.id,
                    amount: Amounts {
                        requests: grant.amount,
                        tokens: grant.tokens,
                    },
                    counted_at: grant.counted_at,
                };
                counters.boxed(|w| w.grants.push(registered));
            }
            grant
        })))
    }

    async fn settle(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        record: LeaseRecord,
        used: Amounts,
        now: Micros,
    ) -> Result<(), LimiterError> {
        self.with_usage(key_id, limits, |usage, counters| {
            // Only a listed grant, once, by what was listed.
            let KeyCounters::Many(w) = counters else {
                return;
            };
            if let Some(i) = w.grants.iter().position(|g| g.id == record.id && g.id != 0) {
                let g = w.grants.swap_remove(i);
                lease::settle(limits, usage, g.counted_at, g.amount, used, now);
            }
        });
        Ok(())
    }

    async fn record_usage(
        &self,
        key_id: &str,
        usage: Reported,
        now: Micros,
    ) -> Result<(), LimiterError> {
        RateLimiter::record_usage(self, key_id, usage, now).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MICROS_PER_SECOND as S;
    use crate::domain::limits::LimitScope;

    fn rpm(limit: u64) -> RateLimit {
        RateLimit {
            unit: LimitUnit::Requests,
            window: LimitWindow::Minute,
            limit,
        }
    }

    fn key<'a>(id: &'a str, limits: &'a [RateLimit]) -> Counter<'a> {
        Counter {
            id,
            scope: LimitScope::Key,
            limits,
        }
    }

    /// A call the team's pool refuses is not counted in the key: after the pool frees up,
    /// the key still has all of its own limit.
    #[tokio::test]
    async fn a_call_a_pool_refuses_is_taken_back_out_of_the_key() {
        let m = MemoryLimiter::new(Arc::default());
        let (own, pool) = ([rpm(3)], [rpm(2)]);
        let now = 1_800_000_000 * S;
        let team = Counter {
            id: "team ws t",
            scope: LimitScope::Team,
            limits: &pool,
        };
        let judge = |at| {
            let m = &m;
            async move {
                m.check(&[key("k", &own), team], 1, at)
                    .await
                    .unwrap()
                    .unwrap()
            }
        };
        assert!(judge(now).await.allowed);
        assert!(judge(now).await.allowed);
        let refused = judge(now).await;
        assert!(!refused.allowed);
        assert_eq!(refused.tightest().unwrap().scope, LimitScope::Team);
        assert_eq!(
            refused.windows[0].used, 2,
            "the key's window without the refused call"
        );
        // The key's own window holds the two admitted calls only: one more fits.
        let alone = m.check(&[key("k", &own)], 1, now).await.unwrap().unwrap();
        assert!(alone.allowed);
        assert_eq!(alone.windows[0].remaining, 0);
    }

    /// Most keys' counters (one window, one bucket) stay inside the record, and a key
    /// idle for a whole window holds no counter state; anything more is boxed, and comes
    /// back to the small form once it counts one bucket again.
    #[tokio::test]
    async fn counters_take_the_smallest_form_that_holds_them() {
        assert!(std::mem::size_of::<KeyCounters>() <= 24);
        let ledger = Arc::new(Ledger::new());
        let m = MemoryLimiter::new(ledger.clone());
        let limits = [rpm(10)];
        let now = 1_800_000_000 * S;
        let form = |ledger: &Ledger| {
            ledger
                .get("k", |r| match &r.counters {
                    KeyCounters::Idle => "idle",
                    KeyCounters::One { count, .. } if *count == 2 => "one bucket of 2",
                    KeyCounters::One { .. } => "one bucket",
                    KeyCounters::Many(_) => "many",
                })
                .unwrap()
        };
        let counter = [key("k", &limits)];
        let check = |at| m.check(&counter, 1, at);
        assert!(check(now).await.unwrap().unwrap().allowed);
        assert!(check(now + 1).await.unwrap().unwrap().allowed);
        assert_eq!(form(&ledger), "one bucket of 2");
        assert!(check(now + 2 * S).await.unwrap().unwrap().allowed);
        assert_eq!(form(&ledger), "many");
        // Both buckets still count: 3 of 10 used.
        let d = check(now + 3 * S).await.unwrap().unwrap();
        assert_eq!(d.windows[0].remaining, 6);
        // A minute on, only the last call's bucket counts; then nothing.
        assert!(check(now + 62 * S).await.unwrap().unwrap().allowed);
        assert_eq!(form(&ledger), "many");
        ledger.get("k", |r| r.counters.prune(now + 64 * S));
        assert_eq!(form(&ledger), "one bucket");
        assert!(
            !ledger
                .get("k", |r| r.counters.prune(now + 200 * S))
                .unwrap()
        );
        assert_eq!(form(&ledger), "idle");
    }

    /// The replica's own calls and the leases it grants share the same counters: what a
    /// lease holds is not admitted again, and what it gives back is.
    #[tokio::test]
    async fn leases_and_direct_decisions_share_the_counters() {
        let m = MemoryLimiter::new(Arc::default());
        let limits = [rpm(10)];
        let now = 1_800_000_000 * S;
        let g = QuotaAuthority::grant(&m, "k", &limits, Amounts::requests(8), 1, 2 * S, now)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(g.amount, 8);
        for allowed in [true, true, false] {
            let d = m
                .check(&[key("k", &limits)], 1, now)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(d.allowed, allowed);
        }
        let record = LeaseRecord {
            granted: g.amount,
            tokens: g.tokens,
            counted_at: g.counted_at,
            id: g.id,
        };
        QuotaAuthority::settle(&m, "k", &limits, record, Amounts::requests(3), now + S)
            .await
            .unwrap();
        let g = QuotaAuthority::grant(&m, "k", &limits, Amounts::requests(10), 1, 2 * S, now + S)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(g.amount, 5, "10 - 2 direct - 3 used from the lease");
    }
}
