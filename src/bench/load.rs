//! The load generator: `concurrency` tasks issue calls over a few HTTP/2 connections for
//! a fixed time (or number of calls), closed-loop at full speed or paced at a fixed total
//! rate, and record each call's latency in an HDR histogram.
//!
//! Paced runs measure latency from when a call *should* have started, not when it did,
//! so a stalled server cannot hide its stall (no coordinated omission). The one exception
//! is the timer's own resolution (1 ms): a call that starts within [`TIMER_SLACK`] of its
//! slot is timed from its actual start.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub concurrency: usize,
    pub duration: Duration,
    /// Stop after this many calls in total, if sooner.
    pub max_requests: Option<u64>,
    /// Total calls per second across all tasks; `None` runs at full speed.
    pub rate: Option<f64>,
}

/// What one load run measured. Latencies in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadResult {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub throughput: f64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// How late a paced call may start before the wait counts as the server's.
const TIMER_SLACK: Duration = Duration::from_millis(2);

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant figures: constant bounds that are valid.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid constant histogram bounds")
}

/// Runs `call(task, n)` from `spec.concurrency` tasks. A call's `Err` counts as an error
/// (and its latency is still recorded).
pub async fn run<F, Fut>(spec: &LoadSpec, call: F) -> LoadResult
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + spec.duration;
    let mut tasks = Vec::with_capacity(spec.concurrency);
    for task in 0..spec.concurrency {
        let call = call.clone();
        let issued = issued.clone();
        let max = spec.max_requests;
        let concurrency = spec.concurrency as f64;
        let interval = spec
            .rate
            .filter(|r| *r > 0.0)
            .map(|r| Duration::from_secs_f64(spec.concurrency as f64 / r));
        tasks.push(tokio::spawn(async move {
            let mut hist = new_histogram();
            let mut errors = 0u64;
            let mut n = 0u64;
            // Spread the paced tasks' first calls over one interval.
            let mut next = interval.map(|i| start + i.mul_f64(task as f64 / concurrency));
            loop {
                if Instant::now() >= deadline {
                    break;
                }
                if let Some(max) = max
                    && issued.fetch_add(1, Ordering::Relaxed) >= max
                {
                    break;
                }
                let began = match (next, interval) {
                    (Some(at), Some(i)) => {
                        tokio::time::sleep_until(at.into()).await;
                        next = Some(at + i);
                        // Tokio's timer ticks in whole milliseconds: a call woken within
                        // that slack of its slot is timed from when it actually started
                        // (the lateness is the generator's); a later one from its slot,
                        // so a stalled server is still charged for the wait.
                        let woke = Instant::now();
                        if woke.saturating_duration_since(at) <= TIMER_SLACK {
                            woke
                        } else {
                            at
                        }
                    }
                    _ => Instant::now(),
                };
                if call(task, n).await.is_err() {
                    errors += 1;
                }
                n += 1;
                let micros = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
                hist.saturating_record(micros.max(1));
            }
            (hist, errors)
        }));
    }
    let mut hist = new_histogram();
    let mut errors = 0;
    for t in tasks {
        if let Ok((h, e)) = t.await {
            let _ = hist.add(&h);
            errors += e;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let requests = hist.len();
    LoadResult {
        requests,
        errors,
        seconds,
        throughput: requests as f64 / seconds.max(f64::EPSILON),
        mean_us: hist.mean(),
        p50_us: hist.value_at_quantile(0.50),
        p90_us: hist.value_at_quantile(0.90),
        p99_us: hist.value_at_quantile(0.99),
        p999_us: hist.value_at_quantile(0.999),
        max_us: hist.max(),
    }
}
