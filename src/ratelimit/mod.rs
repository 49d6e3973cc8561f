//! Rate-limit counters behind one trait, so a decision reads the same whichever backend
//! holds them:
//!
//! - [`memory::MemoryLimiter`] (default): this replica's own counters. No IO and no
//!   global lock: one small mutex per key, held for the arithmetic only. With several
//!   replicas each admits up to the limit on its own.
//! - [`redis::RedisLimiter`]: counters shared by every replica in Redis, so replicas
//!   together admit at most the limit: one atomic Lua script per lease through
//!   [`leased::LeasedLimiter`] (the default), or per decision with leases off. Behind a
//!   [`breaker::CircuitBreaker`]: a Redis that hangs costs a few calls their response
//!   timeout, not every call.
//!
//! Budgets are judged first by the replica's usage book; with Redis, also by the spend
//! every replica shares there ([`RateLimiter::check_budget`]), leased as allowances of
//! spend like quota (see [`leased`]).
//!
//! The algorithm (bucketed sliding windows) and its accuracy are in
//! [`crate::domain::limits`]; backends only store buckets and apply it.

pub mod breaker;
pub mod leased;
pub mod memory;
pub mod redis;

use async_trait::async_trait;

use crate::domain::Micros;
use crate::domain::limits::{LimitDecision, LimitScope, RateLimit};
use breaker::CircuitStats;

/// One counter a call is judged by: its key's own limits, or a pool's (see
/// [`crate::domain::pools`]).
#[derive(Clone, Copy, Debug)]
pub struct Counter<'a> {
    /// The key id, or the pool's counter name.
    pub id: &'a str,
    pub scope: LimitScope,
    pub limits: &'a [RateLimit],
}

#[derive(Debug, thiserror::Error)]
pub enum LimiterError {
    #[error("rate-limit backend unavailable: {0}")]
    Unavailable(String),
}

/// What to do when the shared counters cannot be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Let the call through uncounted, with no rate-limit decision (VerifyKey marks it
    /// `rate_limit_unknown`), and log and count it: an outage of the counters does not
    /// become an outage of every service that verifies keys.
    Open,
    /// Refuse with UNAVAILABLE: no call passes without a decision.
    Closed,
}

/// A key's spend ceiling, as a decision needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// The key's `max_budget_micros`.
    pub max_micros: u64,
    /// The largest stored total this replica has seen for the key (what seeds shared
    /// counters that do not know the key yet).
    pub persisted_micros: u64,
    /// The start of the spend epoch the budget is judged over (see
    /// [`crate::domain::budget`]): shared spend is counted per epoch.
    pub epoch: Micros,
}

/// Usage reported after a call (ReportUsage), as the counters take it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reported {
    pub tokens: u64,
    pub spend_micros: u64,
    /// The largest stored spend this replica has seen for the key.
    pub persisted_micros: u64,
    /// The spend epoch the spend counts in.
    pub epoch: Micros,
}

/// A shared judgement of a key's budget, beside the replica's own usage book.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetCheck {
    /// Room is left (or no shared counter judges budgets here: the usage book alone
    /// decides, as it does on a single replica).
    Room,
    /// Every replica's spend and outstanding allowances together reach the budget.
    Exceeded,
}

/// A remote backend's health as this replica sees it, read at each metrics scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Calls to the backend that failed (the breaker's probes are not counted).
    pub failures: u64,
    pub circuit: CircuitStats,
}

#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    /// Decides a call of `cost` requests against `counters` in order (the key's own, then
    /// its pools), consuming the cost from every request window of each when it passes
    /// them all; the first counter that refuses ends the judgement, and the answer's
    /// windows are those judged, each marked with its counter's scope. A refused call
    /// consumes nothing, or (where a backend cannot take back what an earlier counter
    /// took: see each) the cost in the counters before the one that refused: never more
    /// than a limit, at worst a refusal early. `Ok(None)`: some counter could not be
    /// reached and the limiter fails open, so the call passes without a decision.
    async fn check(
        &self,
        counters: &[Counter<'_>],
        cost: u64,
        now: Micros,
    ) -> Result<Option<LimitDecision>, LimiterError>;

    /// Failures and circuit state of a remote backend (zeros for the memory backend).
    fn backend_stats(&self) -> BackendStats {
        BackendStats::default()
    }

    /// Counts usage reported after a call: its tokens in every token window, and its
    /// spend where a budget shared by replicas is judged (memory keeps no such spend:
    /// the replica's usage book is its judge).
    async fn record_usage(
        &self,
        key_id: &str,
        usage: Reported,
        now: Micros,
    ) -> Result<(), LimiterError>;

    /// Judges `budget` for a call against spend shared with other replicas and their
    /// outstanding allowances. Backends that share none (memory) answer
    /// [`BudgetCheck::Room`]: the replica's usage book, checked before, is then the whole
    /// judgement.
    async fn check_budget(
        &self,
        _key_id: &str,
        _budget: Budget,
        _now: Micros,
    ) -> Result<BudgetCheck, LimiterError> {
        Ok(BudgetCheck::Room)
    }
}
