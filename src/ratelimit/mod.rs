//! Rate-limit counters behind one trait, so a decision reads the same whichever backend
//! holds them:
//!
//! - [`memory::MemoryLimiter`] (default): this replica's own counters. No IO and no
//!   global lock: one small mutex per key, held for the arithmetic only. With several
//!   replicas each admits up to the limit on its own.
//! - [`redis::RedisLimiter`]: counters shared by every replica in Redis, one atomic Lua
//!   script per decision (one round trip), so replicas together admit at most the limit.
//!   Behind a [`breaker::CircuitBreaker`]: a Redis that hangs costs a few calls their
//!   response timeout, not every call.
//!
//! The algorithm (bucketed sliding windows) and its accuracy are in
//! [`crate::domain::limits`]; backends only store buckets and apply it.

pub mod breaker;
pub mod leased;
pub mod memory;
pub mod redis;

use async_trait::async_trait;

use crate::domain::Micros;
use crate::domain::limits::{LimitDecision, RateLimit};
use breaker::CircuitStats;

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

/// A remote backend's health as this replica sees it, read at each metrics scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Calls to the backend that failed (the breaker's probes are not counted).
    pub failures: u64,
    pub circuit: CircuitStats,
}

#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    /// Decides a call of `cost` requests for `key_id` against `limits`, consuming the cost
    /// from every request window when it passes. A refused call consumes nothing.
    /// `Ok(None)`: the counters could not be reached and the limiter fails open, so the
    /// call passes without a decision (and counts nowhere).
    async fn check(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        cost: u64,
        now: Micros,
    ) -> Result<Option<LimitDecision>, LimiterError>;

    /// Failures and circuit state of a remote backend (zeros for the memory backend).
    fn backend_stats(&self) -> BackendStats {
        BackendStats::default()
    }

    /// Counts `tokens` reported for `key_id` in every token window.
    async fn record_tokens(
        &self,
        key_id: &str,
        tokens: u64,
        now: Micros,
    ) -> Result<(), LimiterError>;
}
