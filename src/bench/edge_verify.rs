//! `edge-verify`: the edge `Verifier` (`crate::edge`) in this process, in front of a
//! server whose keys carry a rate limit no run reaches, so that every VALID answer needs
//! a quota lease to be served from the edge's cache. Measures how many calls after the
//! warm-up made no round trip, and the calls per second of cached verifies against a
//! plain hash lookup of the key's SHA-256 (the floor any in-process cache sits on), by
//! the same callers over the same seconds.
//!
//! Calls here take about a microsecond, so `load::run`'s per-call timing and histogram
//! would weigh as much as the call itself: this scenario only counts calls.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::BoxError;
use super::server::{ServerProcess, Tokens};
use crate::domain::key_format::KeyHash;
use crate::edge::{EdgeConfig, EdgeStats, Verifier};

/// What the scenario measured. Edge counters are the deltas over the measured calls only.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EdgeVerifyReport {
    /// Distinct keys verified, each cached with its own lease.
    pub keys: usize,
    /// Unmeasured calls made until every key's lease was held.
    pub warm_up_calls: u64,
    /// Whether every key was served from its lease by the end of the warm-up.
    pub warmed: bool,
    pub calls: u64,
    /// Calls that failed or were not VALID.
    pub errors: u64,
    pub seconds: f64,
    pub throughput: f64,
    /// Calls answered from the cache (`EdgeStats::hits`), and of those admitted from a
    /// quota lease (`EdgeStats::leased`).
    pub hits: u64,
    pub leased: u64,
    /// VerifyKey calls the edge made to the server.
    pub server_calls: u64,
    /// LeaseQuota calls (asks and settlements, batched over keys).
    pub lease_calls: u64,
    /// (calls − server_calls − lease_calls) / calls: every RPC charged to one call, a
    /// lease call included although it is batched and usually made ahead of need.
    pub without_round_trip: f64,
    /// The same callers doing `KeyHash::of` and a `HashMap` get, in alternate slices.
    pub hash_lookup_calls: u64,
    pub hash_lookup_seconds: f64,
    pub hash_lookup_throughput: f64,
    /// throughput / hash_lookup_throughput.
    pub over_hash_lookup: f64,
}

/// Slices of each workload, alternating, so that their ratio shares the same seconds.
const SLICES: u32 = 5;

/// Calls a task makes between looks at the clock and yields to the runtime: the clock
/// costs about as much as a lookup, and a task that never yields would keep its worker
/// thread from every other task until the deadline.
const BATCH: u64 = 64;

/// Warm-up rounds (each key verified once a round) at most, and the pause between them
/// in which the edge's lease task asks for the leases the round wanted.
const WARM_UP_ROUNDS: usize = 50;
const WARM_UP_PAUSE: Duration = Duration::from_millis(50);

pub async fn run(
    server: &ServerProcess,
    tokens: &Tokens,
    keys: &[String],
    concurrency: usize,
    duration: Duration,
    max_requests: Option<u64>,
) -> Result<EdgeVerifyReport, BoxError> {
    let keys: Arc<Vec<String>> = Arc::new(keys.to_vec());
    if keys.is_empty() {
        return Err("edge-verify: no keys".into());
    }
    let edge = connect_edge(server, tokens).await?;

    // Until a whole round is admitted from leases: the first call of each key goes to
    // the server and fills the cache, and its lease is asked for in the background.
    let mut warm_up_calls = 0u64;
    let mut warmed = false;
    for _ in 0..WARM_UP_ROUNDS {
        let before = edge.stats().leased;
        for key in keys.iter() {
            edge.verify(key, &[]).await?;
            warm_up_calls += 1;
        }
        if edge.stats().leased - before == keys.len() as u64 {
            warmed = true;
            break;
        }
        tokio::time::sleep(WARM_UP_PAUSE).await;
    }

    let edge_caller = Arc::new(EdgeCaller {
        edge: edge.clone(),
        keys: keys.clone(),
    });
    let hash_caller = Arc::new(HashCaller {
        map: keys
            .iter()
            .enumerate()
            .map(|(i, k)| (KeyHash::of(k), i))
            .collect(),
        keys: keys.clone(),
    });
    let concurrency = concurrency.max(1);
    let slice = duration / SLICES;
    let slice_max = max_requests.map(|m| (m / u64::from(SLICES)).max(1));
    let before = edge.stats();
    let (mut edge_count, mut hash_count) = (Count::default(), Count::default());
    for _ in 0..SLICES {
        edge_count.add(count(concurrency, slice, slice_max, edge_caller.clone()).await);
        hash_count.add(count(concurrency, slice, slice_max, hash_caller.clone()).await);
    }
    let after = edge.stats();
    edge.shutdown().await;
    Ok(report(
        keys.len(),
        warm_up_calls,
        warmed,
        &before,
        &after,
        edge_count,
        hash_count,
    ))
}

/// An edge `Verifier` in this process following `server`, caught up with its stream.
pub(super) async fn connect_edge(
    server: &ServerProcess,
    tokens: &Tokens,
) -> Result<Arc<Verifier>, BoxError> {
    let config = EdgeConfig::new(tokens.verifier.clone(), tokens.edge.clone());
    let edge = Arc::new(Verifier::connect_to(
        &format!("http://{}", server.addr),
        config,
    )?);
    if !edge.wait_connected(Duration::from_secs(10)).await {
        edge.shutdown().await;
        return Err(format!(
            "the edge following {} did not catch up with its revocation stream",
            server.addr
        )
        .into());
    }
    Ok(edge)
}

fn report(
    keys: usize,
    warm_up_calls: u64,
    warmed: bool,
    before: &EdgeStats,
    after: &EdgeStats,
    edge: Count,
    hash: Count,
) -> EdgeVerifyReport {
    let server_calls = after.server_calls - before.server_calls;
    let lease_calls = after.lease_calls - before.lease_calls;
    let rate = |c: &Count| c.calls as f64 / c.seconds.max(f64::EPSILON);
    let (throughput, hash_lookup_throughput) = (rate(&edge), rate(&hash));
    EdgeVerifyReport {
        keys,
        warm_up_calls,
        warmed,
        calls: edge.calls,
        errors: edge.errors,
        seconds: edge.seconds,
        throughput,
        hits: after.hits - before.hits,
        leased: after.leased - before.leased,
        server_calls,
        lease_calls,
        without_round_trip: edge.calls.saturating_sub(server_calls + lease_calls) as f64
            / (edge.calls.max(1)) as f64,
        hash_lookup_calls: hash.calls,
        hash_lookup_seconds: hash.seconds,
        hash_lookup_throughput,
        over_hash_lookup: throughput / hash_lookup_throughput.max(f64::EPSILON),
    }
}

/// The key a task's `n`-th call presents: spread over all keys, as `KeyPools::pick`.
fn pick(task: usize, n: u64, len: usize) -> usize {
    (n as usize).wrapping_mul(31).wrapping_add(task) % len
}

#[derive(Clone, Copy, Debug, Default)]
struct Count {
    calls: u64,
    errors: u64,
    seconds: f64,
}

impl Count {
    fn add(&mut self, other: Count) {
        self.calls += other.calls;
        self.errors += other.errors;
        self.seconds += other.seconds;
    }
}

/// One workload's call: the `n`-th of task `task`. Each task holds the caller and
/// borrows it per call, so that no reference count shared by every task is bumped per
/// call (that alone cost the hash lookup more than half its time).
trait Caller: Send + Sync + 'static {
    /// Whether the call succeeded.
    fn call(&self, task: usize, n: u64) -> impl Future<Output = bool> + Send + '_;
}

struct EdgeCaller {
    edge: Arc<Verifier>,
    keys: Arc<Vec<String>>,
}

impl Caller for EdgeCaller {
    async fn call(&self, task: usize, n: u64) -> bool {
        let key = &self.keys[pick(task, n, self.keys.len())];
        matches!(self.edge.check(key, &[]).await, Ok(r) if r.valid())
    }
}

struct HashCaller {
    map: HashMap<KeyHash, usize>,
    keys: Arc<Vec<String>>,
}

impl Caller for HashCaller {
    async fn call(&self, task: usize, n: u64) -> bool {
        let key = &self.keys[pick(task, n, self.keys.len())];
        std::hint::black_box(self.map.get(&KeyHash::of(key))).is_some()
    }
}

/// `caller`'s calls from `concurrency` tasks until `duration` has passed (checked every
/// [`BATCH`] calls) or `max_calls` were made in all; a call returning `false` is an error.
async fn count<C: Caller>(
    concurrency: usize,
    duration: Duration,
    max_calls: Option<u64>,
    caller: Arc<C>,
) -> Count {
    let start = Instant::now();
    let deadline = start + duration;
    // Each task's share of the cap, so that the tasks need not share a counter.
    let budget = max_calls.map_or(u64::MAX, |m| m.div_ceil(concurrency as u64).max(1));
    let mut tasks = Vec::with_capacity(concurrency);
    for task in 0..concurrency {
        let caller = caller.clone();
        tasks.push(tokio::spawn(async move {
            let (mut n, mut errors) = (0u64, 0u64);
            while n < budget && Instant::now() < deadline {
                for _ in 0..BATCH.min(budget - n) {
                    if !caller.call(task, n).await {
                        errors += 1;
                    }
                    n += 1;
                }
                tokio::task::yield_now().await;
            }
            (n, errors)
        }));
    }
    let mut total = Count::default();
    for t in tasks {
        if let Ok((n, e)) = t.await {
            total.calls += n;
            total.errors += e;
        }
    }
    total.seconds = start.elapsed().as_secs_f64();
    total
}
