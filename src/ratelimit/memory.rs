//! This replica's own counters: per key, the buckets of each (unit, window) in use,
//! behind a mutex of that key's own, in a cache bounded in number of keys (quick_cache:
//! see [`crate::cache`] for why not moka). A window that counts nothing any more drops
//! its buckets when the key is next counted; a key idle long enough to count nothing is
//! among the first evicted when the bound is reached.
//!
//! It is also a [`QuotaAuthority`]: edge nodes lease quota from a replica with this
//! backend, the grants counted in the same buckets as the replica's own decisions (with
//! [`crate::domain::lease`]'s arithmetic, no clock skew: one clock), so one replica and
//! its edges together stay within each limit.

use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use quick_cache::UnitWeighter;
use quick_cache::sync::Cache;

use super::leased::{LeaseRecord, QuotaAuthority, new_grant_id};
use super::{Counter, LimiterError, RateLimiter, Reported};
use crate::domain::Micros;
use crate::domain::lease::{self, Amounts, Grant};
use crate::domain::limits::{self, LimitDecision, LimitUnit, LimitWindow, RateLimit, WindowUsage};
use crate::domain::pools;

/// A (unit, window) pair as a small index.
fn slot(unit: LimitUnit, window: LimitWindow) -> u8 {
    let u = match unit {
        LimitUnit::Requests => 0,
        LimitUnit::Tokens => 3,
    };
    u + match window {
        LimitWindow::Minute => 0,
        LimitWindow::Hour => 1,
        LimitWindow::Day => 2,
    }
}

/// One key's counters: only the windows that count something (most keys have one limit,
/// and no window at all while idle), and the grants made to edge nodes, if any.
#[derive(Default)]
struct KeyCounters {
    windows: Vec<(u8, WindowUsage)>,
    /// Leases granted to edge nodes and not settled yet, by id: a settlement gives back
    /// only a grant listed here, once, by what is listed. Boxed: few keys have any, and
    /// the rest then pay one word for it instead of a `Vec`'s three.
    #[allow(clippy::box_collection)]
    grants: Option<Box<Vec<Registered>>>,
}

impl KeyCounters {
    /// Takes the window of `slot` out (empty if it counts nothing yet).
    fn take(&mut self, slot: u8) -> WindowUsage {
        match self.windows.iter().position(|(s, _)| *s == slot) {
            Some(i) => self.windows.swap_remove(i).1,
            None => WindowUsage::default(),
        }
    }

    /// Puts a window back, unless it counts nothing any more.
    fn put(&mut self, slot: u8, usage: WindowUsage) {
        if !usage.is_empty() {
            self.windows.push((slot, usage));
        }
    }
}

#[derive(Clone, Copy)]
struct Registered {
    id: u64,
    amount: Amounts,
    counted_at: Micros,
}

type Counters = Arc<Mutex<KeyCounters>>;

pub struct MemoryLimiter {
    keys: Cache<String, Counters, UnitWeighter, crate::cache::Hasher>,
}

impl MemoryLimiter {
    pub fn new(max_keys: u64) -> Self {
        MemoryLimiter {
            keys: crate::cache::bounded(max_keys, UnitWeighter),
        }
    }

    fn counters(&self, key_id: &str) -> Counters {
        crate::cache::get_or_default(&self.keys, key_id)
    }

    /// Runs `f` on the windows `limits` name, taken out of the key's counters and put
    /// back after, under the key's lock.
    fn with_usage<T>(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        f: impl FnOnce(&mut [WindowUsage], &mut Option<Box<Vec<Registered>>>) -> T,
    ) -> T {
        let counters = self.counters(key_id);
        let mut counters = counters.lock().unwrap_or_else(PoisonError::into_inner);
        let mut usage: Vec<WindowUsage> = limits
            .iter()
            .map(|l| counters.take(slot(l.unit, l.window)))
            .collect();
        let out = f(&mut usage, &mut counters.grants);
        for (l, u) in limits.iter().zip(usage) {
            counters.put(slot(l.unit, l.window), u);
        }
        if counters.windows.capacity() > counters.windows.len().max(1) {
            counters.windows.shrink_to_fit();
        }
        out
    }
}

impl MemoryLimiter {
    /// A call judged by several counters at once: all of them locked, in the order given
    /// (a key's before its pools, pools in scope order, so two calls never wait on each
    /// other in a circle), so a refusal by one gives back exactly what the ones before it
    /// took: a refused call consumes nothing anywhere.
    fn check_all(&self, counters: &[Counter<'_>], cost: u64, now: Micros) -> LimitDecision {
        let held: Vec<Counters> = counters.iter().map(|c| self.counters(c.id)).collect();
        let mut locked: Vec<_> = held
            .iter()
            .map(|c| c.lock().unwrap_or_else(PoisonError::into_inner))
            .collect();
        let mut usages: Vec<Vec<WindowUsage>> = counters
            .iter()
            .zip(locked.iter_mut())
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
        for ((c, k), usage) in counters.iter().zip(locked.iter_mut()).zip(usages) {
            for (l, u) in c.limits.iter().zip(usage) {
                k.put(slot(l.unit, l.window), u);
            }
        }
        pools::combine(parts)
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
        let counters = self.counters(key_id);
        let mut counters = counters.lock().unwrap_or_else(PoisonError::into_inner);
        for window in LimitWindow::ALL {
            let slot = slot(LimitUnit::Tokens, window);
            let mut usage = counters.take(slot);
            usage.add(window, now, tokens);
            counters.put(slot, usage);
        }
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
        Ok(Some(self.with_usage(key_id, limits, |usage, grants| {
            let mut grant = lease::grant(limits, usage, now, want, min, life, 0);
            // A grant that left every window is settled by time itself.
            let day = LimitWindow::Day.length();
            if let Some(list) = grants.as_mut() {
                list.retain(|g| g.counted_at > now.saturating_sub(day));
            }
            if grant.granted() {
                grant.id = new_grant_id();
                grants.get_or_insert_default().push(Registered {
                    id: grant.id,
                    amount: Amounts {
                        requests: grant.amount,
                        tokens: grant.tokens,
                    },
                    counted_at: grant.counted_at,
                });
            }
            if grants.as_ref().is_some_and(|list| list.is_empty()) {
                *grants = None;
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
        self.with_usage(key_id, limits, |usage, grants| {
            // Only a listed grant, once, by what was listed.
            let Some(list) = grants.as_mut() else {
                return;
            };
            if let Some(i) = list.iter().position(|g| g.id == record.id && g.id != 0) {
                let g = list.swap_remove(i);
                lease::settle(limits, usage, g.counted_at, g.amount, used, now);
            }
            if list.is_empty() {
                *grants = None;
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
        let m = MemoryLimiter::new(100);
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

    /// The replica's own calls and the leases it grants share the same counters: what a
    /// lease holds is not admitted again, and what it gives back is.
    #[tokio::test]
    async fn leases_and_direct_decisions_share_the_counters() {
        let m = MemoryLimiter::new(100);
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
