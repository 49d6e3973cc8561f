//! Counters shared by every replica, in Redis. One Lua script (GRANT) reads every window
//! of the key, decides, and (only when it passes) counts what it grants, atomically:
//! there is no read-modify-write race between replicas. A single call is a grant of its
//! own cost counted now (one round trip per call); a quota lease is a grant counted at the
//! lease's end (one round trip per lease, see [`super::leased`]), given back by SETTLE.
//!
//! Each window is a hash `<prefix>:rl:{<key_id>}:<unit>:<window>` of bucket number →
//! amount, expiring once it could no longer count anything. The braces are a Redis Cluster
//! hash tag, so a key's windows live on one node and the script may touch them all. The
//! bucket numbers are computed here, not in Lua, so Redis's floating-point numbers never
//! place a call in the wrong bucket; and the clock is the replica's, like everything else
//! in a decision.
//!
//! When Redis cannot be reached, the configured [`FailureMode`] decides: `open` lets the
//! call through with no decision (`Ok(None)`), `closed` refuses it with UNAVAILABLE.
//! Either way the failure is logged (at most once a second) and counted. A Redis that
//! hangs rather than refuses would make every call wait the 500 ms response timeout
//! first, so the calls go through a [`CircuitBreaker`]: after a few consecutive failures
//! they skip Redis and answer under the failure mode at once, while a background PING
//! every probe interval finds out when Redis answers again.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::breaker::{CircuitBreaker, CircuitSettings, Probe};
use super::leased::{LeaseRecord, QuotaAuthority};
use super::{BackendStats, FailureMode, LimiterError, RateLimiter};
use crate::domain::lease::{self, Grant, MAX_LEASE};
use crate::domain::limits::{
    self, BUCKETS, LimitDecision, LimitUnit, LimitWindow, MAX_BUCKET_COUNT, RateLimit, WindowUsage,
};
use crate::domain::{MICROS_PER_SECOND, Micros};

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

const GRANT: &str = r#"
-- ARGV[1] = want, ARGV[2] = min; for window i, ARGV[2 + 5(i-1) + 1 ..+5] = unit (0
-- requests, 1 tokens), the bucket the grant is counted in, first bucket still counted,
-- limit, ttl in ms. Grants min(want, what every request window has left), or 0 when that
-- is below min or a token window is spent; counts the grant in its bucket. Returns the
-- amount, then each window's live buckets as they were before the grant.
local amount = tonumber(ARGV[1])
local min = tonumber(ARGV[2])
local ok = true
local out = { {} }
for i = 1, #KEYS do
  local base = 2 + (i - 1) * 5
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
  out[#out + 1] = buckets
  if unit == 0 then
    if limit - used < amount then amount = limit - used end
  elseif used >= limit then
    ok = false
  end
end
if not ok or amount < min then amount = 0 end
if amount > 0 then
  for i = 1, #KEYS do
    local base = 2 + (i - 1) * 5
    if tonumber(ARGV[base + 1]) == 0 then
      redis.call('HINCRBY', KEYS[i], ARGV[base + 2], amount)
      redis.call('PEXPIRE', KEYS[i], ARGV[base + 5])
    end
  end
end
out[1] = { amount }
return out
"#;

const SETTLE: &str = r#"
-- KEYS[1] = the key's settled-lease marks, ARGV[1] = this lease's mark, ARGV[2] = how
-- long marks are kept (ms). A lease settles once: a settle retried after a reply was lost
-- finds its mark and changes nothing (taking a grant back twice would take other
-- holders' counts). For request window i (KEYS[i + 1]): ARGV[2 + 4(i-1) + 1 ..+4] = the
-- grant's bucket, the amount granted, the bucket of now, the amount used. Takes the grant
-- back and counts what was used.
if ARGV[1] ~= '' then
  if redis.call('HSETNX', KEYS[1], ARGV[1], 1) == 0 then return 0 end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
for i = 1, #KEYS - 1 do
  local w = KEYS[i + 1]
  local base = 2 + (i - 1) * 4
  local left = redis.call('HINCRBY', w, ARGV[base + 1], -tonumber(ARGV[base + 2]))
  if left <= 0 then redis.call('HDEL', w, ARGV[base + 1]) end
  if tonumber(ARGV[base + 4]) > 0 then
    redis.call('HINCRBY', w, ARGV[base + 3], ARGV[base + 4])
  end
end
return 1
"#;

/// How long a settled lease's mark is kept: longer than a holder retries a settle.
const SETTLED_MARK_TTL_MS: i64 = 10 * 60 * 1000;

pub struct RedisLimiter {
    connection: ConnectionManager,
    prefix: String,
    failure: FailureMode,
    record: Script,
    grant: Script,
    settle: Script,
    /// How far replicas' clocks may disagree: a lease is counted this much past its end.
    skew: Micros,
    breaker: Arc<CircuitBreaker>,
    failures: AtomicU64,
    last_logged: AtomicI64,
}

impl RedisLimiter {
    /// Connects lazily (a Redis that is down at start-up is retried on use).
    pub fn new(
        url: &str,
        prefix: &str,
        failure: FailureMode,
        circuit: CircuitSettings,
        skew: Duration,
    ) -> Result<Self, LimiterError> {
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
        let probing = connection.clone();
        let probe: Probe = Arc::new(move || {
            let mut connection = probing.clone();
            Box::pin(async move {
                redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok()
            })
        });
        Ok(RedisLimiter {
            breaker: CircuitBreaker::new("redis", circuit, probe),
            connection,
            prefix: prefix.to_owned(),
            failure,
            record: Script::new(RECORD),
            grant: Script::new(GRANT),
            settle: Script::new(SETTLE),
            skew: micros_of(skew),
            failures: AtomicU64::new(0),
            last_logged: AtomicI64::new(0),
        })
    }

    fn window_key(&self, key_id: &str, unit: LimitUnit, window: LimitWindow) -> String {
        format!(
            "{}:rl:{{{key_id}}}:{}:{}",
            self.prefix,
            unit.as_str(),
            window.as_str()
        )
    }

    /// A call to Redis failed: counted, logged, told to the breaker, answered under the
    /// failure mode.
    fn failed(&self, e: &redis::RedisError, now: Micros) -> Result<(), LimiterError> {
        self.breaker.failed();
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

    /// The circuit is open: the failure mode answers without a call to Redis.
    fn skipped(&self) -> Result<(), LimiterError> {
        match self.failure {
            FailureMode::Open => Ok(()),
            FailureMode::Closed => Err(LimiterError::Unavailable(
                "circuit open after consecutive failures; Redis is probed in the background".into(),
            )),
        }
    }
}

/// A name for a grant, unique among a key's grants in practice (64 random bits); never 0.
fn grant_id() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // Without randomness the grant settles without the once-only check.
        return 0;
    }
    u64::from_le_bytes(b).max(1)
}

fn micros_of(d: Duration) -> Micros {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl RedisLimiter {
    /// Grants up to `want` (at least `min`) of `limits`, counted in the bucket of
    /// `counted_at`: one GRANT script call, for a lease and for a single call alike.
    async fn grant_at(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        want: u64,
        min: u64,
        counted_at: Micros,
        now: Micros,
    ) -> Result<Option<Grant>, LimiterError> {
        let min = min.max(1);
        let want = want.clamp(min, MAX_LEASE.max(min));
        if limits.is_empty() {
            let mut usage = Vec::new();
            return Ok(Some(lease::grant(
                limits,
                &mut usage,
                now,
                want,
                min,
                counted_at - now,
                0,
            )));
        }
        if self.breaker.is_open() {
            self.skipped()?;
            return Ok(None);
        }
        let mut invocation = self.grant.prepare_invoke();
        invocation.arg(want).arg(min);
        for l in limits {
            let (_, first, ttl_ms) = bucket_args(l.window, now);
            let ahead_ms = (counted_at - now) / 1000;
            invocation
                .key(self.window_key(key_id, l.unit, l.window))
                .arg(match l.unit {
                    LimitUnit::Requests => 0,
                    LimitUnit::Tokens => 1,
                })
                .arg(counted_at.div_euclid(l.window.bucket()))
                .arg(first)
                .arg(l.limit)
                .arg(ttl_ms + ahead_ms);
        }
        let mut connection = self.connection.clone();
        let reply: Result<Vec<Vec<i64>>, _> = invocation.invoke_async(&mut connection).await;
        match reply {
            Ok(reply) => {
                self.breaker.succeeded();
                let amount = reply
                    .first()
                    .and_then(|a| a.first())
                    .map_or(0, |a| u64::try_from(*a).unwrap_or(0));
                let mut usage: Vec<WindowUsage> = reply
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
                let granted = amount > 0;
                if granted {
                    for (l, u) in limits.iter().zip(usage.iter_mut()) {
                        if l.unit == LimitUnit::Requests {
                            u.add_at(l.window, now, counted_at, amount);
                        }
                    }
                }
                let cost = if granted { amount } else { min };
                Ok(Some(Grant {
                    amount,
                    counted_at,
                    id: 0,
                    decision: limits::describe(limits, &usage, now, cost, granted),
                }))
            }
            Err(e) => {
                self.failed(&e, now)?;
                Ok(None)
            }
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
    fn backend_stats(&self) -> BackendStats {
        BackendStats {
            failures: self.failures.load(Ordering::Relaxed),
            circuit: self.breaker.stats(),
        }
    }

    async fn check(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        cost: u64,
        now: Micros,
    ) -> Result<Option<LimitDecision>, LimiterError> {
        // A call is a grant of its own cost, counted now and used at once.
        Ok(self
            .grant_at(key_id, limits, cost, cost, now, now)
            .await?
            .map(|grant| grant.decision))
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
        if self.breaker.is_open() {
            return self.skipped();
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
            Ok(_) => {
                self.breaker.succeeded();
                Ok(())
            }
            Err(e) => self.failed(&e, now),
        }
    }
}

#[async_trait]
impl QuotaAuthority for RedisLimiter {
    async fn grant(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        want: u64,
        min: u64,
        life: Micros,
        now: Micros,
    ) -> Result<Option<Grant>, LimiterError> {
        let counted_at = now.saturating_add(life.max(0)).saturating_add(self.skew);
        Ok(self
            .grant_at(key_id, limits, want, min, counted_at, now)
            .await?
            .map(|grant| Grant {
                id: grant_id(),
                ..grant
            }))
    }

    async fn settle(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        lease: LeaseRecord,
        used: u64,
        now: Micros,
    ) -> Result<(), LimiterError> {
        let used = used.min(lease.granted);
        if self.breaker.is_open() {
            return Err(LimiterError::Unavailable("circuit open".into()));
        }
        let mut invocation = self.settle.prepare_invoke();
        invocation
            .key(format!("{}:rl:{{{key_id}}}:settled", self.prefix))
            .arg(if lease.id == 0 {
                String::new()
            } else {
                format!("{:x}", lease.id)
            })
            .arg(SETTLED_MARK_TTL_MS);
        let mut any = false;
        for l in limits.iter().filter(|l| l.unit == LimitUnit::Requests) {
            any = true;
            invocation
                .key(self.window_key(key_id, l.unit, l.window))
                .arg(lease.counted_at.div_euclid(l.window.bucket()))
                .arg(lease.granted)
                .arg(now.min(lease.counted_at).div_euclid(l.window.bucket()))
                .arg(used);
        }
        if !any || lease.granted == used && lease.counted_at <= now {
            return Ok(());
        }
        let mut connection = self.connection.clone();
        let reply: Result<i64, _> = invocation.invoke_async(&mut connection).await;
        match reply {
            Ok(_) => {
                self.breaker.succeeded();
                Ok(())
            }
            Err(e) => {
                self.breaker.failed();
                Err(LimiterError::Unavailable(e.to_string()))
            }
        }
    }

    async fn record_tokens(
        &self,
        key_id: &str,
        tokens: u64,
        now: Micros,
    ) -> Result<(), LimiterError> {
        RateLimiter::record_tokens(self, key_id, tokens, now).await
    }

    fn backend_stats(&self) -> BackendStats {
        RateLimiter::backend_stats(self)
    }
}
