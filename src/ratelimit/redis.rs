//! Counters shared by every replica, in Redis. One Lua script per decision reads every
//! window of the key, decides, and (only when the call passes) adds its cost, atomically:
//! there is no read-modify-write race between replicas, and one round trip per call.
//!
//! Each window is a hash `<prefix>:rl:{<key_id>}:<unit>:<window>` of bucket number →
//! amount, expiring once it could no longer count anything. The braces are a Redis Cluster
//! hash tag, so a key's windows live on one node and the script may touch them all. The
//! bucket numbers are computed here, not in Lua, so Redis's floating-point numbers never
//! place a call in the wrong bucket; and the clock is the replica's, like everything else
//! in a decision.
//!
//! When Redis cannot be reached, the configured [`FailureMode`] decides: `open` lets the
//! call through without a limit, `closed` refuses it with UNAVAILABLE. Either way the
//! failure is logged (at most once a second) and counted.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{FailureMode, LimiterError, RateLimiter};
use crate::domain::limits::{
    self, BUCKETS, LimitDecision, LimitUnit, LimitWindow, MAX_BUCKET_COUNT, RateLimit, WindowUsage,
};
use crate::domain::{MICROS_PER_SECOND, Micros};

const DECIDE: &str = r#"
-- ARGV[1] = cost; for window i, ARGV[1 + 5(i-1) + 1 ..+5] = unit (0 requests, 1 tokens),
-- current bucket, first bucket still counted, limit, ttl in ms.
local cost = tonumber(ARGV[1])
local allowed = 1
local live = {}
for i = 1, #KEYS do
  local base = 1 + (i - 1) * 5
  local unit = tonumber(ARGV[base + 1])
  local first = tonumber(ARGV[base + 3])
  local limit = tonumber(ARGV[base + 4])
  local flat = redis.call('HGETALL', KEYS[i])
  local used = 0
  local buckets = {}
  for j = 1, #flat, 2 do
    local b = tonumber(flat[j])
    if b < first then
      redis.call('HDEL', KEYS[i], flat[j])
    else
      local c = tonumber(flat[j + 1])
      used = used + c
      buckets[#buckets + 1] = b
      buckets[#buckets + 1] = c
    end
  end
  live[i] = buckets
  if unit == 0 then
    if used + cost > limit then allowed = 0 end
  elseif used >= limit then
    allowed = 0
  end
end
local out = { { allowed } }
for i = 1, #KEYS do
  local base = 1 + (i - 1) * 5
  if allowed == 1 and cost > 0 and tonumber(ARGV[base + 1]) == 0 then
    local cur = tonumber(ARGV[base + 2])
    redis.call('HINCRBY', KEYS[i], ARGV[base + 2], cost)
    redis.call('PEXPIRE', KEYS[i], ARGV[base + 5])
    local found = false
    for j = 1, #live[i], 2 do
      if live[i][j] == cur then
        live[i][j + 1] = live[i][j + 1] + cost
        found = true
      end
    end
    if not found then
      live[i][#live[i] + 1] = cur
      live[i][#live[i] + 1] = cost
    end
  end
  out[#out + 1] = live[i]
end
return out
"#;

const RECORD: &str = r#"
-- ARGV[1] = amount, ARGV[2] = the most a bucket counts; for key i:
-- ARGV[2 + 2(i-1) + 1] = bucket, + 2 = ttl in ms.
-- A bucket saturates at the ceiling rather than overflow HINCRBY's 64-bit integer (an
-- error that would fail every later report); one above it (from before) stays as it is.
-- Both figures are below 2^53, so Lua's doubles hold them and their sum exactly.
local amount = tonumber(ARGV[1])
local most = tonumber(ARGV[2])
for i = 1, #KEYS do
  local base = 2 + (i - 1) * 2
  local counted = tonumber(redis.call('HGET', KEYS[i], ARGV[base + 1])) or 0
  if counted + amount <= most then
    redis.call('HINCRBY', KEYS[i], ARGV[base + 1], ARGV[1])
  elseif counted < most then
    redis.call('HSET', KEYS[i], ARGV[base + 1], ARGV[2])
  end
  redis.call('PEXPIRE', KEYS[i], ARGV[base + 2])
end
return 1
"#;

pub struct RedisLimiter {
    connection: ConnectionManager,
    prefix: String,
    failure: FailureMode,
    decide: Script,
    record: Script,
    failures: AtomicU64,
    last_logged: AtomicI64,
}

impl RedisLimiter {
    /// Connects lazily (a Redis that is down at start-up is retried on use).
    pub fn new(url: &str, prefix: &str, failure: FailureMode) -> Result<Self, LimiterError> {
        let client =
            redis::Client::open(url).map_err(|e| LimiterError::Unavailable(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let connection = client
            .get_connection_manager_lazy(config)
            .map_err(|e| LimiterError::Unavailable(e.to_string()))?;
        Ok(RedisLimiter {
            connection,
            prefix: prefix.to_owned(),
            failure,
            decide: Script::new(DECIDE),
            record: Script::new(RECORD),
            failures: AtomicU64::new(0),
            last_logged: AtomicI64::new(0),
        })
    }

    /// Decisions made without Redis since start.
    fn window_key(&self, key_id: &str, unit: LimitUnit, window: LimitWindow) -> String {
        format!(
            "{}:rl:{{{key_id}}}:{}:{}",
            self.prefix,
            unit.as_str(),
            window.as_str()
        )
    }

    fn failed(&self, e: &redis::RedisError, now: Micros) -> Result<(), LimiterError> {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let last = self.last_logged.load(Ordering::Relaxed);
        if now - last >= MICROS_PER_SECOND
            && self
                .last_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(error = %e, failures = n, mode = ?self.failure, "rate-limit backend (Redis) unreachable");
        }
        match self.failure {
            FailureMode::Open => Ok(()),
            FailureMode::Closed => Err(LimiterError::Unavailable(e.to_string())),
        }
    }
}

/// A window's current bucket, its first counted bucket, and how long its hash must live.
fn bucket_args(window: LimitWindow, now: Micros) -> (i64, i64, i64) {
    let current = now.div_euclid(window.bucket());
    let ttl_ms = (window.length() + 2 * window.bucket()) / 1000;
    (current, current - BUCKETS, ttl_ms)
}

#[async_trait]
impl RateLimiter for RedisLimiter {
    fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    async fn check(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        cost: u64,
        now: Micros,
    ) -> Result<LimitDecision, LimiterError> {
        if limits.is_empty() {
            return Ok(limits::decide(limits, &mut [], now, cost));
        }
        let mut invocation = self.decide.prepare_invoke();
        invocation.arg(cost);
        for l in limits {
            let (current, first, ttl_ms) = bucket_args(l.window, now);
            invocation
                .key(self.window_key(key_id, l.unit, l.window))
                .arg(match l.unit {
                    LimitUnit::Requests => 0,
                    LimitUnit::Tokens => 1,
                })
                .arg(current)
                .arg(first)
                .arg(l.limit)
                .arg(ttl_ms);
        }
        let mut connection = self.connection.clone();
        let reply: Result<Vec<Vec<i64>>, _> = invocation.invoke_async(&mut connection).await;
        match reply {
            Ok(reply) => {
                let allowed = reply.first().and_then(|a| a.first()) == Some(&1);
                let usage: Vec<WindowUsage> = reply
                    .iter()
                    .skip(1)
                    .map(|flat| {
                        WindowUsage::from_buckets(
                            flat.chunks_exact(2)
                                .map(|p| (p[0], u64::try_from(p[1]).unwrap_or(0)))
                                .collect(),
                        )
                    })
                    .collect();
                Ok(limits::describe(limits, &usage, now, cost, allowed))
            }
            Err(e) => {
                self.failed(&e, now)?;
                Ok(limits::decide(&[], &mut [], now, cost))
            }
        }
    }

    async fn record_tokens(
        &self,
        key_id: &str,
        tokens: u64,
        now: Micros,
    ) -> Result<(), LimiterError> {
        if tokens == 0 {
            return Ok(());
        }
        let mut invocation = self.record.prepare_invoke();
        invocation
            .arg(tokens.min(MAX_BUCKET_COUNT))
            .arg(MAX_BUCKET_COUNT);
        for window in LimitWindow::ALL {
            let (current, _, ttl_ms) = bucket_args(window, now);
            invocation
                .key(self.window_key(key_id, LimitUnit::Tokens, window))
                .arg(current)
                .arg(ttl_ms);
        }
        let mut connection = self.connection.clone();
        let reply: Result<i64, _> = invocation.invoke_async(&mut connection).await;
        match reply {
            Ok(_) => Ok(()),
            Err(e) => self.failed(&e, now),
        }
    }
}
