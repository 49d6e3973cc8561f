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

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::breaker::{CircuitBreaker, CircuitSettings, Probe};
use super::leased::{GrantAsk, LeaseRecord, QuotaAuthority, Settle, SpendGrant, new_grant_id};
use super::{
    BackendStats, Budget, BudgetCheck, Counter, FailureMode, LimiterError, RateLimiter, Reported,
};
use crate::domain::lease::{self, Amounts, Grant, MAX_LEASE};
use crate::domain::limits::{
    self, BUCKETS, LimitDecision, LimitUnit, LimitWindow, MAX_BUCKET_COUNT, MAX_BUDGET_MICROS,
    MAX_SPEND_MICROS, RateLimit, WindowUsage,
};
use crate::domain::pools;
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
-- KEYS[1] = the key's grant registry; KEYS[2..] = its windows.
-- ARGV[1] = want, ARGV[2] = min, ARGV[3] = the grant's id ('' for a single call, which is
-- used at once and never settled), ARGV[4] = how long the registry is kept (ms), ARGV[5]
-- = tokens wanted (0: none; token windows are then only judged); for window i,
-- ARGV[5 + 5(i-2) + 1 ..+5] = unit (0 requests, 1 tokens), the bucket the grant is counted
-- in, first bucket still counted, limit, ttl in ms. Grants min(want, what every request
-- window has left), or 0 when that is below min, a token window is spent, or the grant
-- was cancelled before it arrived; with it min(tokens wanted, what every token window
-- has left) tokens. Counts both in the grant's bucket and registers the grant (amounts
-- and buckets) under its id, which a settle or a cancel names. Numbers are written with
-- string.format: tostring would write a large one as 1e+12.
-- Returns { amount, tokens }, then each window's live buckets as they were before.
local id = ARGV[3]
local out = { {} }
if id ~= '' and redis.call('HEXISTS', KEYS[1], 'x' .. id) == 1 then
  out[1] = { 0, 0 }
  return out
end
local amount = tonumber(ARGV[1])
local min = tonumber(ARGV[2])
local tokens = tonumber(ARGV[5])
local has_tokens = false
local ok = true
for i = 2, #KEYS do
  local base = 5 + (i - 2) * 5
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
  else
    has_tokens = true
    if used >= limit then ok = false end
    if limit - used < tokens then tokens = limit - used end
  end
end
if not has_tokens then tokens = 0 end
if not ok or amount < min then amount = 0 end
if amount > 0 then
  local record = string.format('%.0f|%.0f', amount, tokens)
  for i = 2, #KEYS do
    local base = 5 + (i - 2) * 5
    local n = amount
    if tonumber(ARGV[base + 1]) == 1 then n = tokens end
    if n > 0 then
      redis.call('HINCRBY', KEYS[i], ARGV[base + 2], string.format('%.0f', n))
      redis.call('PEXPIRE', KEYS[i], ARGV[base + 5])
    end
    record = record .. '|' .. ARGV[base + 2]
  end
  if id ~= '' then
    redis.call('HSET', KEYS[1], id, record)
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
  end
else
  tokens = 0
end
out[1] = { amount, tokens }
return out
"#;

const SETTLE: &str = r#"
-- KEYS[1] = the key's grant registry; KEYS[2..] = its windows, in the grant's order.
-- ARGV[1] = the grant's id, ARGV[2] = requests used, ARGV[3] = '' for a settle, or for a
-- cancel (a grant whose answer never came back) how long the registry keeps the id
-- marked cancelled (ms), so that a grant still on its way grants nothing; ARGV[4] =
-- tokens reported, ARGV[5] = the most a bucket counts; for window i, ARGV[5 + 2(i-2) + 1]
-- = its unit, + 2 = the bucket of now. Takes the registered grant back from the buckets
-- it was counted in and counts what was used no later than those: requests up to the
-- grant, tokens all of them (calls in flight ran past the allowance). What the grant was,
-- and where, is the registry's word, not the caller's. A grant settles once: an unknown
-- id (settled, cancelled, expired, or never granted) changes nothing.
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'x' .. ARGV[1], 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local fields = {}
for f in string.gmatch(record, '[^|]+') do fields[#fields + 1] = tonumber(f) end
local amount = fields[1]
local tokens = fields[2]
local used = math.min(tonumber(ARGV[2]), amount)
local used_tokens = tonumber(ARGV[4])
local most = tonumber(ARGV[5])
for i = 2, #KEYS do
  local b = fields[i + 1]
  if b then
    local base = 5 + (i - 2) * 2
    local granted, n = amount, used
    if tonumber(ARGV[base + 1]) == 1 then granted, n = tokens, used_tokens end
    if granted > 0 then
      local left = redis.call('HINCRBY', KEYS[i], b, string.format('%.0f', -granted))
      if left <= 0 then redis.call('HDEL', KEYS[i], b) end
    end
    if n > 0 then
      local at = math.min(tonumber(ARGV[base + 2]), b)
      local counted = tonumber(redis.call('HGET', KEYS[i], at)) or 0
      if counted + n <= most then
        redis.call('HINCRBY', KEYS[i], at, string.format('%.0f', n))
      elseif counted < most then
        redis.call('HSET', KEYS[i], at, ARGV[5])
      end
    end
  end
end
return 1
"#;

const SPEND: &str = r#"
-- KEYS[1] = the key's spend: 'spent', the spend every holder has counted (seeded with the
-- stored total when Redis does not know the key), and per outstanding allowance a field
-- 'g<id>' = '<amount>|<when it stops counting, ms>'.
-- ARGV[1] = 'grant' (ARGV[4] = want; 0 only asks whether room is left), 'settle'
-- (ARGV[4] = spend reported against the allowance ARGV[5]) or 'record' (ARGV[4] = spend
-- reported with no allowance; counted only where the key's spend is kept already);
-- ARGV[2] = the budget, ARGV[3] = the seed, ARGV[5] = the allowance's id, ARGV[6] = now
-- (ms), ARGV[7] = how long an allowance counts unsettled (ms), ARGV[8] = how long the
-- hash is kept (ms), ARGV[9] = the most 'spent' reaches.
-- A grant is at most half of what is left (the budget less 'spent' and what is
-- outstanding), so idle holders never park it all; a settle applies once (it removes
-- the allowance), and counts all that was reported, also past the allowance.
-- Returns { amount granted, 1 when room was left }.
local op = ARGV[1]
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent'))
if not spent then
  if op ~= 'grant' then return { 0, 0 } end
  spent = tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], 'spent', ARGV[3])
end
local function count(n)
  local most = tonumber(ARGV[9])
  if spent + tonumber(n) <= most then
    redis.call('HINCRBY', KEYS[1], 'spent', n)
  else
    redis.call('HSET', KEYS[1], 'spent', ARGV[9])
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[8])
if op == 'record' then
  count(ARGV[4])
  return { 0, 0 }
end
if op == 'settle' then
  if redis.call('HDEL', KEYS[1], 'g' .. ARGV[5]) == 1 then count(ARGV[4]) end
  return { 0, 0 }
end
local now = tonumber(ARGV[6])
local out = 0
local flat = redis.call('HGETALL', KEYS[1])
for j = 1, #flat, 2 do
  if string.sub(flat[j], 1, 1) == 'g' then
    local sep = string.find(flat[j + 1], '|', 1, true)
    if tonumber(string.sub(flat[j + 1], sep + 1)) <= now then
      redis.call('HDEL', KEYS[1], flat[j])
    else
      out = out + tonumber(string.sub(flat[j + 1], 1, sep - 1))
    end
  end
end
local left = tonumber(ARGV[2]) - spent - out
if left <= 0 then return { 0, 0 } end
local amount = math.min(tonumber(ARGV[4]), math.ceil(left / 2))
if amount > 0 then
  redis.call('HSET', KEYS[1], 'g' .. ARGV[5],
    string.format('%.0f|%.0f', amount, now + tonumber(ARGV[7])))
end
return { amount, 1 }
"#;

/// How long Redis keeps a key's spend after its last use. A key idle longer has all of
/// its spend in storage, which seeds it again.
const SPEND_TTL_MS: i64 = 7 * 24 * 3600 * 1000;

/// How long a key's grant registry is kept after its last grant: longer than a lease
/// lives and its settle is retried.
const REGISTRY_TTL_MS: i64 = 10 * 60 * 1000;

pub struct RedisLimiter {
    connection: ConnectionManager,
    prefix: String,
    failure: FailureMode,
    record: Script,
    grant: Script,
    settle: Script,
    spend: Script,
    /// Grants whose answer never came back, to be cancelled (shared with the task that
    /// retries them).
    cancels: Arc<Mutex<Vec<PendingCancel>>>,
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
        let cancels = Arc::new(Mutex::new(Vec::new()));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(cancel_lost_grants(
                Arc::downgrade(&cancels),
                connection.clone(),
                prefix.to_owned(),
            ));
        }
        Ok(RedisLimiter {
            cancels,
            breaker: CircuitBreaker::new("redis", circuit, probe),
            connection,
            prefix: prefix.to_owned(),
            failure,
            record: Script::new(RECORD),
            grant: Script::new(GRANT),
            settle: Script::new(SETTLE),
            spend: Script::new(SPEND),
            skew: crate::domain::micros_in(skew),
            failures: AtomicU64::new(0),
            last_logged: AtomicI64::new(0),
        })
    }

    fn window_key(&self, key_id: &str, unit: LimitUnit, window: LimitWindow) -> String {
        window_key(&self.prefix, key_id, unit, window)
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

/// A window's hash: bucket number → amount.
fn window_key(prefix: &str, key_id: &str, unit: LimitUnit, window: LimitWindow) -> String {
    format!(
        "{prefix}:rl:{{{key_id}}}:{}:{}",
        unit.as_str(),
        window.as_str()
    )
}

/// A key's spend in one spend epoch and its outstanding allowances, under the key's hash
/// tag. A new epoch (a budget period's turn, a reset) is a new hash, starting from zero;
/// an ended one's expires when idle. Epoch 0 (a lifetime budget never reset) keeps the
/// name it had before there were epochs.
fn spend_key(prefix: &str, key_id: &str, epoch: Micros) -> String {
    if epoch == 0 {
        format!("{prefix}:rl:{{{key_id}}}:spend")
    } else {
        format!("{prefix}:rl:{{{key_id}}}:spend:{epoch}")
    }
}

/// Which SPEND operation, and its amount.
#[derive(Clone, Copy)]
enum SpendOp {
    Grant { want: u64, id: u64 },
    Settle { used: u64, id: u64 },
    Record { spend: u64 },
}

/// Where a key's grants are registered, by id (requests, tokens and buckets): beside its
/// windows, under the same hash tag. Named for its format: grants registered by a
/// replica of an older format (`grants`, without tokens) are never read as this one's;
/// during a rolling upgrade each replica settles its own, and the others' stay counted
/// until they leave their window (never an over-admission).
fn registry_key(prefix: &str, key_id: &str) -> String {
    format!("{prefix}:rl:{{{key_id}}}:grants2")
}

/// A window's unit as the scripts take it.
fn unit_arg(unit: LimitUnit) -> u8 {
    match unit {
        LimitUnit::Requests => 0,
        LimitUnit::Tokens => 1,
    }
}

/// What one GRANT script call asks for: up to `want` (at least `min`) counted in the
/// bucket of `counted_at`, registered under `id` (`None`: a single call, used at once).
struct Ask {
    want: u64,
    /// Tokens wanted with it (0: token windows are only judged).
    tokens: u64,
    min: u64,
    counted_at: Micros,
    id: Option<u64>,
}

/// A grant whose answer never came back.
struct PendingCancel {
    key_id: String,
    windows: Vec<RateLimit>,
    id: u64,
    since: tokio::time::Instant,
}

/// Cancels lost grants every second until Redis takes the cancel (for as long as the
/// registry would remember them); ends when the limiter is dropped.
async fn cancel_lost_grants(
    pending: std::sync::Weak<Mutex<Vec<PendingCancel>>>,
    mut connection: ConnectionManager,
    prefix: String,
) {
    let script = Script::new(SETTLE);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pending) = pending.upgrade() else {
            return;
        };
        let due = std::mem::take(&mut *pending.lock().unwrap_or_else(PoisonError::into_inner));
        let mut left = Vec::new();
        for c in due {
            let mut invocation = script.prepare_invoke();
            invocation
                .key(registry_key(&prefix, &c.key_id))
                .arg(format!("{:x}", c.id))
                .arg(0)
                .arg(REGISTRY_TTL_MS)
                .arg(0)
                .arg(MAX_BUCKET_COUNT);
            // A cancel is a settle of nothing used that also marks the id cancelled.
            for l in &c.windows {
                invocation
                    .key(window_key(&prefix, &c.key_id, l.unit, l.window))
                    .arg(unit_arg(l.unit))
                    .arg(0);
            }
            let done: Result<i64, _> = invocation.invoke_async(&mut connection).await;
            if done.is_err()
                && c.since.elapsed() < Duration::from_millis(REGISTRY_TTL_MS.unsigned_abs() / 2)
            {
                left.push(c);
            }
        }
        pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(left);
    }
}

impl RedisLimiter {
    /// A lease's ask: counted at the end of its life (and the clock skew allowed), under
    /// a new grant id.
    fn lease_ask(&self, want: Amounts, min: u64, life: Micros, now: Micros) -> Ask {
        Ask {
            want: want.requests,
            tokens: want.tokens,
            min,
            counted_at: now.saturating_add(life.max(0)).saturating_add(self.skew),
            id: Some(new_grant_id()),
        }
    }

    /// The SETTLE call for one lease, or `None` when there is nothing to give back (no
    /// grant id to name, or no limits).
    fn settle_invocation(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        lease: LeaseRecord,
        used: Amounts,
        now: Micros,
    ) -> Option<redis::ScriptInvocation<'_>> {
        if lease.id == 0 || limits.is_empty() {
            return None;
        }
        let mut invocation = self.settle.prepare_invoke();
        invocation
            .key(registry_key(&self.prefix, key_id))
            .arg(format!("{:x}", lease.id))
            .arg(used.requests.min(lease.granted))
            .arg("")
            .arg(used.tokens.min(MAX_BUCKET_COUNT))
            .arg(MAX_BUCKET_COUNT);
        for l in limits {
            invocation
                .key(self.window_key(key_id, l.unit, l.window))
                .arg(unit_arg(l.unit))
                .arg(now.div_euclid(l.window.bucket()));
        }
        Some(invocation)
    }

    /// A settlement's reply: a failure is told to the breaker (the caller keeps the
    /// settlement to try again).
    fn settled(&self, reply: Result<(), redis::RedisError>) -> Result<(), LimiterError> {
        match reply {
            Ok(()) => {
                self.breaker.succeeded();
                Ok(())
            }
            Err(e) => {
                self.breaker.failed();
                Err(LimiterError::Unavailable(e.to_string()))
            }
        }
    }
}

impl RedisLimiter {
    /// Grants up to `want` (at least `min`) of `limits`, counted in the bucket of
    /// `counted_at`: one GRANT script call, for a lease and for a single call alike.
    async fn grant_at(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        ask: Ask,
        now: Micros,
    ) -> Result<Option<Grant>, LimiterError> {
        if limits.is_empty() {
            return Ok(Some(no_limits_grant(&ask, now)));
        }
        if self.breaker.is_open() {
            self.skipped()?;
            return Ok(None);
        }
        let invocation = self.grant_invocation(key_id, limits, &ask, now);
        let mut connection = self.connection.clone();
        let reply: Result<Vec<Vec<i64>>, _> = invocation.invoke_async(&mut connection).await;
        match reply {
            Ok(reply) => {
                self.breaker.succeeded();
                Ok(Some(grant_of(limits, &ask, &reply, now)))
            }
            Err(e) => {
                self.lost(key_id, limits, &ask);
                self.failed(&e, now)?;
                Ok(None)
            }
        }
    }

    /// The GRANT call for `ask`.
    fn grant_invocation(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        ask: &Ask,
        now: Micros,
    ) -> redis::ScriptInvocation<'_> {
        let min = ask.min.max(1);
        let want = ask.want.clamp(min, MAX_LEASE.max(min));
        let mut invocation = self.grant.prepare_invoke();
        invocation
            .key(registry_key(&self.prefix, key_id))
            .arg(want)
            .arg(min)
            .arg(ask.id.map(|id| format!("{id:x}")).unwrap_or_default())
            .arg(REGISTRY_TTL_MS)
            .arg(ask.tokens.min(limits::MAX_LIMIT));
        for l in limits {
            let (_, first, ttl_ms) = bucket_args(l.window, now);
            let ahead_ms = (ask.counted_at - now) / 1000;
            invocation
                .key(self.window_key(key_id, l.unit, l.window))
                .arg(unit_arg(l.unit))
                .arg(ask.counted_at.div_euclid(l.window.bucket()))
                .arg(first)
                .arg(l.limit)
                .arg(ttl_ms + ahead_ms);
        }
        invocation
    }

    /// A grant whose answer never came back: the script may still run (a Redis that
    /// hung runs what it was sent when it resumes), so it is cancelled, and its quota
    /// is not parked.
    fn lost(&self, key_id: &str, limits: &[RateLimit], ask: &Ask) {
        if let Some(id) = ask.id {
            self.cancels
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(PendingCancel {
                    key_id: key_id.to_owned(),
                    windows: limits.to_vec(),
                    id,
                    since: tokio::time::Instant::now(),
                });
        }
    }
}

/// What `ask` comes to for a key without limits: everything wanted, nothing counted.
fn no_limits_grant(ask: &Ask, now: Micros) -> Grant {
    let min = ask.min.max(1);
    let want = ask.want.clamp(min, MAX_LEASE.max(min));
    let mut usage = Vec::new();
    lease::grant(
        &[],
        &mut usage,
        now,
        Amounts::requests(want),
        min,
        ask.counted_at - now,
        0,
    )
}

/// The grant a GRANT script's `reply` makes of `ask`, with the figures of `limits` after
/// it.
fn grant_of(limits: &[RateLimit], ask: &Ask, reply: &[Vec<i64>], now: Micros) -> Grant {
    let head = reply.first();
    let figure = |i: usize| {
        head.and_then(|a| a.get(i))
            .map_or(0, |a| u64::try_from(*a).unwrap_or(0))
    };
    let (amount, tokens) = (figure(0), figure(1));
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
            let n = match l.unit {
                LimitUnit::Requests => amount,
                LimitUnit::Tokens => tokens,
            };
            u.add_at(l.window, now, ask.counted_at, n);
        }
    }
    let cost = if granted { amount } else { ask.min.max(1) };
    Grant {
        amount,
        tokens,
        counted_at: ask.counted_at,
        id: ask.id.unwrap_or(0),
        decision: limits::describe(limits, &usage, now, cost, granted),
    }
}

impl RedisLimiter {
    /// One SPEND script call: `(amount granted, room left)`, or `None` when Redis could
    /// not be reached and the failure mode lets the call through.
    async fn spend_op(
        &self,
        key_id: &str,
        op: SpendOp,
        budget: Budget,
        now: Micros,
    ) -> Result<Option<(u64, bool)>, LimiterError> {
        if self.breaker.is_open() {
            self.skipped()?;
            return Ok(None);
        }
        let (name, amount, id) = match op {
            SpendOp::Grant { want, id } => ("grant", want, id),
            SpendOp::Settle { used, id } => ("settle", used, id),
            SpendOp::Record { spend } => ("record", spend, 0),
        };
        let mut invocation = self.spend.prepare_invoke();
        invocation
            .key(spend_key(&self.prefix, key_id, budget.epoch))
            .arg(name)
            .arg(budget.max_micros.min(MAX_BUDGET_MICROS))
            .arg(budget.persisted_micros.min(MAX_SPEND_MICROS))
            .arg(amount.min(MAX_SPEND_MICROS))
            .arg(format!("{id:x}"))
            .arg(now.div_euclid(1000))
            .arg(REGISTRY_TTL_MS)
            .arg(SPEND_TTL_MS)
            .arg(MAX_SPEND_MICROS);
        let mut connection = self.connection.clone();
        let reply: Result<(i64, i64), _> = invocation.invoke_async(&mut connection).await;
        match reply {
            Ok((amount, room)) => {
                self.breaker.succeeded();
                Ok(Some((u64::try_from(amount).unwrap_or(0), room == 1)))
            }
            Err(e) => {
                self.failed(&e, now)?;
                Ok(None)
            }
        }
    }

    /// Closes the registered grant of one call judged by several counters: `used` 0
    /// gives it back (a later counter refused the call), `granted` keeps it counted. A
    /// failure leaves it counted and registered until the registry expires: never an
    /// over-admission.
    async fn close_call(&self, c: &Counter<'_>, record: LeaseRecord, used: u64, now: Micros) {
        let closed =
            QuotaAuthority::settle(self, c.id, c.limits, record, Amounts::requests(used), now)
                .await;
        if let Err(e) = closed {
            tracing::debug!(error = %e, "closing a pooled call's grant failed");
        }
    }

    /// Counts reported spend where the key's spend is kept (keys with a budget).
    async fn record_spend(
        &self,
        key_id: &str,
        usage: Reported,
        now: Micros,
    ) -> Result<(), LimiterError> {
        if usage.spend_micros == 0 {
            return Ok(());
        }
        let budget = Budget {
            max_micros: 0,
            persisted_micros: usage.persisted_micros,
            epoch: usage.epoch,
        };
        let op = SpendOp::Record {
            spend: usage.spend_micros,
        };
        self.spend_op(key_id, op, budget, now).await.map(|_| ())
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

    /// One script per counter. With pools, each call is a registered grant, so a pool's
    /// refusal can give back what the counters before it took (a settle of nothing used);
    /// a give-back that fails leaves the call counted there until it leaves the window.
    async fn check(
        &self,
        counters: &[Counter<'_>],
        cost: u64,
        now: Micros,
    ) -> Result<Option<LimitDecision>, LimiterError> {
        // A call is a grant of its own cost, counted now and used at once.
        let ask = |id| Ask {
            want: cost,
            tokens: 0,
            min: cost,
            counted_at: now,
            id,
        };
        if let [one] = counters {
            return Ok(self
                .grant_at(one.id, one.limits, ask(None), now)
                .await?
                .map(|grant| grant.decision.scoped(one.scope)));
        }
        let mut parts: Vec<(LimitDecision, LeaseRecord)> = Vec::with_capacity(counters.len());
        for (i, c) in counters.iter().enumerate() {
            let Some(grant) = self
                .grant_at(c.id, c.limits, ask(Some(new_grant_id())), now)
                .await?
            else {
                return Ok(None);
            };
            let record = LeaseRecord {
                granted: grant.amount,
                tokens: 0,
                counted_at: grant.counted_at,
                id: grant.id,
            };
            let refused = !grant.granted();
            parts.push((grant.decision.scoped(c.scope), record));
            if refused {
                for (earlier, (d, record)) in counters.iter().zip(parts.iter_mut()).take(i) {
                    self.close_call(earlier, *record, 0, now).await;
                    *d = std::mem::take(d).uncounted(cost);
                }
                break;
            }
        }
        // Admitted by every counter: each registration is closed with the call used, so
        // the registries do not grow by a field per call.
        if parts.iter().all(|(d, _)| d.allowed) {
            for (c, (_, record)) in counters.iter().zip(&parts) {
                self.close_call(c, *record, record.granted, now).await;
            }
        }
        Ok(Some(pools::combine(
            parts.into_iter().map(|(d, _)| d).collect(),
        )))
    }

    async fn check_budget(
        &self,
        key_id: &str,
        budget: Budget,
        now: Micros,
    ) -> Result<BudgetCheck, LimiterError> {
        let op = SpendOp::Grant { want: 0, id: 0 };
        Ok(match self.spend_op(key_id, op, budget, now).await? {
            Some((_, false)) => BudgetCheck::Exceeded,
            Some((_, true)) | None => BudgetCheck::Room,
        })
    }

    async fn record_usage(
        &self,
        key_id: &str,
        usage: Reported,
        now: Micros,
    ) -> Result<(), LimiterError> {
        self.record_spend(key_id, usage, now).await?;
        let tokens = usage.tokens;
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
        want: Amounts,
        min: u64,
        life: Micros,
        now: Micros,
    ) -> Result<Option<Grant>, LimiterError> {
        let ask = self.lease_ask(want, min, life, now);
        self.grant_at(key_id, limits, ask, now).await
    }

    /// One pipeline for the whole batch: one round trip, whatever its size. Redis runs
    /// each GRANT on its own, atomically, as if sent alone.
    async fn grant_many(&self, asks: &[GrantAsk]) -> Vec<Result<Option<Grant>, LimiterError>> {
        let leases: Vec<Ask> = asks
            .iter()
            .map(|a| self.lease_ask(a.want, a.min, a.life, a.now))
            .collect();
        if self.breaker.is_open() {
            return asks.iter().map(|_| self.skipped().map(|()| None)).collect();
        }
        let mut pipe = redis::pipe();
        // EVALSHA needs the script loaded (a restarted Redis has forgotten it).
        pipe.load_script(&self.grant).ignore();
        let mut sent = 0;
        for (a, ask) in asks.iter().zip(&leases) {
            if !a.limits.is_empty() {
                pipe.invoke_script(&self.grant_invocation(&a.key_id, &a.limits, ask, a.now));
                sent += 1;
            }
        }
        let reply: Result<Vec<Vec<Vec<i64>>>, _> = if sent == 0 {
            Ok(Vec::new())
        } else {
            let mut connection = self.connection.clone();
            pipe.query_async(&mut connection).await
        };
        match reply {
            Ok(replies) => {
                if sent > 0 {
                    self.breaker.succeeded();
                }
                let mut replies = replies.into_iter();
                asks.iter()
                    .zip(&leases)
                    .map(|(a, ask)| {
                        if a.limits.is_empty() {
                            return Ok(Some(no_limits_grant(ask, a.now)));
                        }
                        let reply = replies.next().unwrap_or_default();
                        Ok(Some(grant_of(&a.limits, ask, &reply, a.now)))
                    })
                    .collect()
            }
            Err(e) => {
                // One failure, told once (to the breaker and the log), whatever the size.
                let now = asks.iter().map(|a| a.now).max().unwrap_or_default();
                let outcome = self.failed(&e, now);
                asks.iter()
                    .zip(&leases)
                    .map(|(a, ask)| {
                        if a.limits.is_empty() {
                            return Ok(Some(no_limits_grant(ask, a.now)));
                        }
                        self.lost(&a.key_id, &a.limits, ask);
                        match &outcome {
                            Ok(()) => Ok(None),
                            Err(LimiterError::Unavailable(why)) => {
                                Err(LimiterError::Unavailable(why.clone()))
                            }
                        }
                    })
                    .collect()
            }
        }
    }

    async fn settle(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        lease: LeaseRecord,
        used: Amounts,
        now: Micros,
    ) -> Result<(), LimiterError> {
        // Only a registered grant can be given back: without its id there is nothing
        // to name (it then stays counted until it leaves its window).
        if lease.id == 0 {
            tracing::debug!(key_id, "a lease without a grant id cannot be settled");
            return Ok(());
        }
        let Some(invocation) = self.settle_invocation(key_id, limits, lease, used, now) else {
            return Ok(());
        };
        if self.breaker.is_open() {
            return Err(LimiterError::Unavailable("circuit open".into()));
        }
        let mut connection = self.connection.clone();
        let reply: Result<i64, _> = invocation.invoke_async(&mut connection).await;
        self.settled(reply.map(|_| ()))
    }

    /// One pipeline for the whole batch: one round trip, whatever its size. Redis runs
    /// each SETTLE on its own, atomically, as if sent alone.
    async fn settle_many(&self, batch: &[Settle]) -> Result<(), LimiterError> {
        let invocations: Vec<_> = batch
            .iter()
            .filter_map(|s| self.settle_invocation(&s.key_id, &s.limits, s.record, s.used, s.now))
            .collect();
        if invocations.is_empty() {
            return Ok(());
        }
        if self.breaker.is_open() {
            return Err(LimiterError::Unavailable("circuit open".into()));
        }
        let mut pipe = redis::pipe();
        // EVALSHA needs the script loaded (a restarted Redis has forgotten it); loading
        // it again is a hash of its text.
        pipe.load_script(&self.settle).ignore();
        for invocation in &invocations {
            pipe.invoke_script(invocation).ignore();
        }
        let mut connection = self.connection.clone();
        let reply: Result<(), _> = pipe.query_async(&mut connection).await;
        self.settled(reply)
    }

    async fn record_usage(
        &self,
        key_id: &str,
        usage: Reported,
        now: Micros,
    ) -> Result<(), LimiterError> {
        RateLimiter::record_usage(self, key_id, usage, now).await
    }

    async fn grant_spend(
        &self,
        key_id: &str,
        budget: Budget,
        want: u64,
        now: Micros,
    ) -> Result<Option<SpendGrant>, LimiterError> {
        let id = new_grant_id();
        let op = SpendOp::Grant {
            want: want.max(1),
            id,
        };
        Ok(self
            .spend_op(key_id, op, budget, now)
            .await?
            .map(|(amount, _)| SpendGrant {
                amount,
                epoch: budget.epoch,
                id,
            }))
    }

    async fn settle_spend(
        &self,
        key_id: &str,
        grant: SpendGrant,
        used: u64,
    ) -> Result<(), LimiterError> {
        if grant.id == 0 || grant.amount == 0 {
            return Ok(());
        }
        if self.breaker.is_open() {
            return Err(LimiterError::Unavailable("circuit open".into()));
        }
        let op = SpendOp::Settle { used, id: grant.id };
        let budget = Budget {
            max_micros: 0,
            persisted_micros: 0,
            epoch: grant.epoch,
        };
        // A settlement is retried, never let through: a failure is an error whatever
        // the failure mode.
        match self.spend_op(key_id, op, budget, 0).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(LimiterError::Unavailable("Redis unreachable".into())),
            Err(e) => Err(e),
        }
    }

    fn backend_stats(&self) -> BackendStats {
        RateLimiter::backend_stats(self)
    }
}
