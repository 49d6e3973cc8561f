//! `exactness`: rate limits held by two replicas (leasing from one Redis) and two edge
//! Verifiers in this process (one following each replica, leasing from it) together,
//! every holder asking far above the limit for the whole run.
//!
//! The run is shorter than the limits' minute, so every window of a minute that overlaps
//! it holds all of a key's admitted calls: the largest `admitted / limit` over the keys is
//! the most admitted in any window (target: at most 1.00), and the smallest is the least
//! admitted under saturation (target: at least 0.90; what quota parked in idle holders
//! costs). The run lasts at least [`MIN_RUN`], several lease lives, so parked quota has
//! gone back and been granted again.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::BoxError;
use super::server::{ServerProcess, Tokens};
use crate::proto;

/// Requests per minute of each key.
pub const LIMIT: u64 = 600;
/// Keys, each its own limit.
const KEYS: usize = 4;
/// Callers per holder.
const CALLERS: usize = 4;
/// The shortest run: three default lease lives.
pub const MIN_RUN: Duration = Duration::from_secs(6);

#[derive(Clone, Debug, Default, Serialize)]
pub struct ExactnessReport {
    pub keys: usize,
    pub limit: u64,
    pub seconds: f64,
    /// Calls admitted per key, over every holder.
    pub admitted: Vec<u64>,
    /// Calls made in all (admitted or refused).
    pub calls: u64,
    /// Calls that failed (neither VALID nor RATE_LIMITED).
    pub errors: u64,
    /// The most admitted for one key, over its limit.
    pub max_ratio: f64,
    /// The least admitted for one key, over its limit.
    pub min_ratio: f64,
}

/// `a` and `b`: replicas sharing one database and one Redis (prefix included).
pub async fn run(
    a: &ServerProcess,
    b: &ServerProcess,
    tokens: &Tokens,
    duration: Duration,
) -> Result<ExactnessReport, BoxError> {
    let duration = duration.max(MIN_RUN);
    let clients_a = super::connect(a, tokens, 1).await?;
    let clients_b = super::connect(b, tokens, 1).await?;
    let mut admin = clients_a.admins.first().ok_or("no admin client")?.clone();
    let mut keys = Vec::new();
    for n in 0..KEYS {
        let mut request = super::issue_request(1_000_000 + n as u64);
        request.rate_limits = vec![proto::RateLimit {
            unit: proto::RateLimitUnit::Requests as i32,
            window: proto::RateLimitWindow::Minute as i32,
            limit: LIMIT,
        }];
        keys.push(admin.issue_key(request).await?.into_inner().key);
    }
    let keys = Arc::new(keys);

    let edges = [
        super::edge_verify::connect_edge(a, tokens).await?,
        super::edge_verify::connect_edge(b, tokens).await?,
    ];

    let tally = Tally {
        admitted: Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect()),
        calls: Arc::default(),
        errors: Arc::default(),
    };
    let started = Instant::now();
    let until = started + duration;
    let mut tasks = Vec::new();
    for task in 0..CALLERS {
        for clients in [&clients_a, &clients_b] {
            let verifier = clients.verifiers.first().ok_or("no client")?.clone();
            tasks.push(tally.spawn_caller(keys.clone(), task, until, move |key| {
                let mut verifier = verifier.clone();
                async move {
                    let request = proto::VerifyKeyRequest {
                        key,
                        ..Default::default()
                    };
                    let r = verifier.verify_key(request).await.ok()?.into_inner();
                    Some((r.valid, r.code))
                }
            }));
        }
        for edge in &edges {
            let edge = edge.clone();
            tasks.push(tally.spawn_caller(keys.clone(), task, until, move |key| {
                let edge = edge.clone();
                async move {
                    let answer = edge.verify(&key, &[]).await;
                    // Cached refusals take no time: let the other callers run.
                    tokio::task::yield_now().await;
                    answer.ok().map(|r| (r.valid, r.code))
                }
            }));
        }
    }
    for t in tasks {
        t.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    for edge in edges {
        edge.shutdown().await;
    }
    let admitted: Vec<u64> = tally
        .admitted
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .collect();
    let ratio = |n: u64| n as f64 / LIMIT as f64;
    Ok(ExactnessReport {
        keys: KEYS,
        limit: LIMIT,
        seconds,
        max_ratio: ratio(admitted.iter().copied().max().unwrap_or(0)),
        min_ratio: ratio(admitted.iter().copied().min().unwrap_or(0)),
        admitted,
        calls: tally.calls.load(Ordering::Relaxed),
        errors: tally.errors.load(Ordering::Relaxed),
    })
}

/// What every caller counts into: admitted calls per key, calls, and errors.
#[derive(Clone)]
struct Tally {
    admitted: Arc<Vec<AtomicU64>>,
    calls: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
}

impl Tally {
    /// A caller verifying `keys` in turn (from the `task`-th) with `verify` until
    /// `until`. `verify` answers `(valid, code)`, or `None` for a failed call.
    fn spawn_caller<F, Fut>(
        &self,
        keys: Arc<Vec<String>>,
        task: usize,
        until: Instant,
        verify: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn(String) -> Fut + Send + 'static,
        Fut: Future<Output = Option<(bool, i32)>> + Send,
    {
        let tally = self.clone();
        tokio::spawn(async move {
            let mut n = task;
            while Instant::now() < until {
                n += 1;
                let i = n % keys.len();
                let answer = verify(keys[i].clone()).await;
                tally.count(answer, i);
            }
        })
    }

    /// VALID counts as admitted for key `i`, RATE_LIMITED as a refusal, anything else
    /// (or no answer) as an error.
    fn count(&self, answer: Option<(bool, i32)>, i: usize) {
        match answer {
            Some((true, _)) => {
                self.admitted[i].fetch_add(1, Ordering::Relaxed);
            }
            Some((false, code)) if code == proto::VerifyCode::RateLimited as i32 => {}
            _ => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}
