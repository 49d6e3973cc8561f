//! This replica's own counters: per key, the buckets of each (unit, window) in use,
//! behind a mutex of that key's own. Idle keys are forgotten once their longest window
//! could no longer count anything (a day and a bucket), bounded in number.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use moka::sync::Cache;

use super::{LimiterError, RateLimiter};
use crate::domain::Micros;
use crate::domain::limits::{self, LimitDecision, LimitUnit, LimitWindow, RateLimit, WindowUsage};

/// The (unit, window) pairs a key can have, as indices.
const SLOTS: usize = 6;

fn slot(unit: LimitUnit, window: LimitWindow) -> usize {
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

#[derive(Default)]
struct KeyCounters {
    slots: [WindowUsage; SLOTS],
}

pub struct MemoryLimiter {
    keys: Cache<String, Arc<Mutex<KeyCounters>>>,
}

impl MemoryLimiter {
    pub fn new(max_keys: u64) -> Self {
        let idle = LimitWindow::Day.length() + LimitWindow::Day.bucket();
        MemoryLimiter {
            keys: Cache::builder()
                .max_capacity(max_keys)
                .time_to_idle(Duration::from_micros(idle.unsigned_abs()))
                .build(),
        }
    }

    fn counters(&self, key_id: &str) -> Arc<Mutex<KeyCounters>> {
        if let Some(c) = self.keys.get(key_id) {
            return c;
        }
        self.keys.get_with(key_id.to_owned(), Default::default)
    }
}

#[async_trait]
impl RateLimiter for MemoryLimiter {
    async fn check(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        cost: u64,
        now: Micros,
    ) -> Result<Option<LimitDecision>, LimiterError> {
        let counters = self.counters(key_id);
        let mut counters = counters.lock().unwrap_or_else(PoisonError::into_inner);
        // Take the windows this key's limits name, decide, and put them back.
        let mut usage: Vec<WindowUsage> = limits
            .iter()
            .map(|l| std::mem::take(&mut counters.slots[slot(l.unit, l.window)]))
            .collect();
        let decision = limits::decide(limits, &mut usage, now, cost);
        for (l, u) in limits.iter().zip(usage) {
            counters.slots[slot(l.unit, l.window)] = u;
        }
        Ok(Some(decision))
    }

    async fn record_tokens(
        &self,
        key_id: &str,
        tokens: u64,
        now: Micros,
    ) -> Result<(), LimiterError> {
        let counters = self.counters(key_id);
        let mut counters = counters.lock().unwrap_or_else(PoisonError::into_inner);
        for window in LimitWindow::ALL {
            counters.slots[slot(LimitUnit::Tokens, window)].add(window, now, tokens);
        }
        Ok(())
    }
}
