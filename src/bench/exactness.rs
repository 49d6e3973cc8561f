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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::BoxError;
use super::server::{ServerProcess, Tokens};
use crate::edge::{EdgeConfig, Verifier};
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

    let mut edges = Vec::new();
    for server in [a, b] {
        let config = EdgeConfig::new(tokens.verifier.clone(), tokens.edge.clone());
        let edge = Arc::new(Verifier::connect_to(
            &format!("http://{}", server.addr),
            config,
        )?);
        if !edge.wait_connected(Duration::from_secs(10)).await {
            edge.shutdown().await;
            return Err("exactness: an edge did not catch up with its revocation stream".into());
        }
        edges.push(edge);
    }

    let admitted: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
    let (calls, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let started = Instant::now();
    let until = started + duration;
    let mut tasks = Vec::new();
    for task in 0..CALLERS {
        for clients in [&clients_a, &clients_b] {
            let mut verifier = clients.verifiers.first().ok_or("no client")?.clone();
            let (keys, admitted, calls, errors) = (
                keys.clone(),
                admitted.clone(),
                calls.clone(),
                errors.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut n = task;
                while Instant::now() < until {
                    n += 1;
                    let i = n % keys.len();
                    let request = proto::VerifyKeyRequest {
                        key: keys[i].clone(),
                        ..Default::default()
                    };
                    let answer = verifier.verify_key(request).await.map(|r| r.into_inner());
                    tally(
                        answer.ok().map(|r| (r.valid, r.code)),
                        i,
                        &admitted,
                        &errors,
                    );
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for edge in &edges {
            let (edge, keys, admitted, calls, errors) = (
                edge.clone(),
                keys.clone(),
                admitted.clone(),
                calls.clone(),
                errors.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut n = task;
                while Instant::now() < until {
                    n += 1;
                    let i = n % keys.len();
                    let answer = edge.verify(&keys[i], &[]).await;
                    tally(
                        answer.ok().map(|r| (r.valid, r.code)),
                        i,
                        &admitted,
                        &errors,
                    );
                    calls.fetch_add(1, Ordering::Relaxed);
                    // Cached refusals take no time: let the other callers run.
                    tokio::task::yield_now().await;
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
    let admitted: Vec<u64> = admitted.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    let ratio = |n: u64| n as f64 / LIMIT as f64;
    Ok(ExactnessReport {
        keys: KEYS,
        limit: LIMIT,
        seconds,
        max_ratio: ratio(admitted.iter().copied().max().unwrap_or(0)),
        min_ratio: ratio(admitted.iter().copied().min().unwrap_or(0)),
        admitted,
        calls: calls.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
    })
}

/// Counts an answer: VALID as admitted for key `i`, RATE_LIMITED as a refusal, anything
/// else (or no answer) as an error.
fn tally(answer: Option<(bool, i32)>, i: usize, admitted: &[AtomicU64], errors: &AtomicU64) {
    match answer {
        Some((true, _)) => {
            admitted[i].fetch_add(1, Ordering::Relaxed);
        }
        Some((false, code)) if code == proto::VerifyCode::RateLimited as i32 => {}
        _ => {
            errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}
