//! The load generator: `concurrency` tasks issue calls over a few HTTP/2 connections for
//! a fixed time (or number of calls), closed-loop at full speed or paced at a fixed total
//! rate, and record each call's latency in an HDR histogram.
//!
//! Paced runs are open-loop: a pacer thread releases evenly spaced slots (`1 / rate`
//! apart) and the first free task takes the next one, and a call is timed from its slot,
//! not from when a task got round to it, so a stalled server or client cannot hide its
//! stall (no coordinated omission). The pacer is an OS thread sleeping to each slot rather
//! than Tokio timers: those tick in whole milliseconds, so at tens of thousands of calls a
//! second every task due in one millisecond would fire at once, a burst the server never
//! sees from real traffic and whose queue would be charged as latency.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Semaphore;

use super::cpu;

#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub concurrency: usize,
    pub duration: Duration,
    /// Stop after this many calls in total, if sooner.
    pub max_requests: Option<u64>,
    /// Total calls per second across all tasks; `None` runs at full speed.
    pub rate: Option<f64>,
    /// The server process whose CPU time the run reports beside its own; `None` for a
    /// server the benchmark did not start (`--target`).
    pub server_pid: Option<u32>,
}

impl LoadSpec {
    /// This load paced at half of what `peak` reached: the "half of peak load" at which
    /// the latency targets are read.
    pub fn half_of(&self, peak: &LoadResult) -> LoadSpec {
        LoadSpec {
            rate: Some(peak.throughput / 2.0),
            ..self.clone()
        }
    }
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
    /// Paced runs only: how late the pacer thread woke for its slots, p99. It does no work
    /// but sleep and wake, so this is what the machine's scheduler alone adds to a wake-up
    /// at this load: a floor under every call's tail, which crosses several wake-ups.
    pub pacer_wake_p99_us: Option<u64>,
    /// The server's CPU time over the run divided by the run's time: how many cores it
    /// kept busy on average (Linux only; `None` without a server process of our own).
    pub server_cores: Option<f64>,
    /// The same for this process, the client (its callers, connections and pacer).
    pub client_cores: Option<f64>,
    /// The latencies themselves, so that slices of one workload add up ([`interleaved`]).
    #[serde(skip)]
    pub measured: Option<Measured>,
}

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
    measure(spec, call).await.result()
}

/// Runs two workloads at full speed in turn, `slices` times round, each slice a
/// `slices`-th of `spec.duration` (and of `spec.max_requests`), and returns each one's
/// slices added up. A ratio of the two is then taken over the same stretch of time: a
/// machine that slows down for a few seconds slows both alike, where back-to-back runs
/// would charge it to whichever ran then. `first` and `second` run one slice each call
/// (with [`run`]).
pub async fn interleaved<A, AF, B, BF>(
    spec: &LoadSpec,
    slices: u32,
    mut first: A,
    mut second: B,
) -> (LoadResult, LoadResult)
where
    A: FnMut(LoadSpec) -> AF,
    AF: Future<Output = LoadResult>,
    B: FnMut(LoadSpec) -> BF,
    BF: Future<Output = LoadResult>,
{
    let slices = slices.max(1);
    let slice = LoadSpec {
        duration: spec.duration / slices,
        max_requests: spec
            .max_requests
            .map(|max| (max / u64::from(slices)).max(1)),
        rate: None,
        ..spec.clone()
    };
    let (mut a, mut b) = (Measured::default(), Measured::default());
    for _ in 0..slices {
        a.add(first(slice.clone()).await);
        b.add(second(slice.clone()).await);
    }
    (a.result(), b.result())
}

/// The raw outcome of one or more load runs, before percentiles are read off it.
#[derive(Clone, Debug)]
pub struct Measured {
    hist: Histogram<u64>,
    errors: u64,
    seconds: f64,
    pacer_wake_p99_us: Option<u64>,
    /// CPU seconds the server and the client used during the run.
    server_cpu_seconds: Option<f64>,
    client_cpu_seconds: Option<f64>,
}

impl Default for Measured {
    fn default() -> Self {
        Measured {
            hist: new_histogram(),
            errors: 0,
            seconds: 0.0,
            pacer_wake_p99_us: None,
            server_cpu_seconds: None,
            client_cpu_seconds: None,
        }
    }
}

/// A sum of figures that may be unknown: unknown only if every part is.
fn add_known(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

impl Measured {
    fn add(&mut self, result: LoadResult) {
        let Some(other) = result.measured else {
            return;
        };
        // Same bounds on both sides: adding cannot fail.
        let _ = self.hist.add(&other.hist);
        self.errors += other.errors;
        self.seconds += other.seconds;
        self.pacer_wake_p99_us = self.pacer_wake_p99_us.max(other.pacer_wake_p99_us);
        self.server_cpu_seconds = add_known(self.server_cpu_seconds, other.server_cpu_seconds);
        self.client_cpu_seconds = add_known(self.client_cpu_seconds, other.client_cpu_seconds);
    }

    fn result(self) -> LoadResult {
        let hist = &self.hist;
        let requests = hist.len();
        let seconds = self.seconds.max(f64::EPSILON);
        let mut result = LoadResult {
            requests,
            errors: self.errors,
            seconds: self.seconds,
            throughput: requests as f64 / seconds,
            mean_us: hist.mean(),
            p50_us: hist.value_at_quantile(0.50),
            p90_us: hist.value_at_quantile(0.90),
            p99_us: hist.value_at_quantile(0.99),
            p999_us: hist.value_at_quantile(0.999),
            max_us: hist.max(),
            pacer_wake_p99_us: self.pacer_wake_p99_us,
            server_cores: self.server_cpu_seconds.map(|cpu| cpu / seconds),
            client_cores: self.client_cpu_seconds.map(|cpu| cpu / seconds),
            measured: None,
        };
        result.measured = Some(self);
        result
    }
}

async fn measure<F, Fut>(spec: &LoadSpec, call: F) -> Measured
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let issued = Arc::new(AtomicU64::new(0));
    let server_cpu = spec
        .server_pid
        .and_then(|pid| cpu::process_seconds(Some(pid)));
    let client_cpu = cpu::process_seconds(None);
    let start = Instant::now();
    let deadline = start + spec.duration;
    let pacer = spec
        .rate
        .filter(|r| *r > 0.0)
        .map(|rate| Pacer::start(rate, start, deadline));
    let mut tasks = Vec::with_capacity(spec.concurrency);
    for task in 0..spec.concurrency {
        let call = call.clone();
        let issued = issued.clone();
        let max = spec.max_requests;
        let slots = pacer.as_ref().map(|p| p.slots.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = new_histogram();
            let mut errors = 0u64;
            let mut n = 0u64;
            loop {
                let began = match &slots {
                    Some(slots) => match slots.next().await {
                        Some(at) => at,
                        None => break,
                    },
                    None => Instant::now(),
                };
                if Instant::now() >= deadline {
                    break;
                }
                if let Some(max) = max
                    && issued.fetch_add(1, Ordering::Relaxed) >= max
                {
                    break;
                }
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
    let since = |before: Option<f64>, pid| Some(cpu::process_seconds(pid)? - before?);
    let server_cpu_seconds = spec.server_pid.and_then(|pid| since(server_cpu, Some(pid)));
    let client_cpu_seconds = since(client_cpu, None);
    let pacer_wake_p99_us = pacer
        .and_then(Pacer::stop)
        .map(|late| late.value_at_quantile(0.99));
    Measured {
        hist,
        errors,
        seconds,
        pacer_wake_p99_us,
        server_cpu_seconds,
        client_cpu_seconds,
    }
}

/// The slots of a paced run, shared by its tasks: each permit of `released` is one slot
/// that has come due, and `taken` numbers them in order.
struct Slots {
    released: Semaphore,
    taken: AtomicU64,
    start: Instant,
    rate: f64,
}

impl Slots {
    /// Waits for the next due slot and returns the instant it was due at; `None` once
    /// the run is over.
    async fn next(&self) -> Option<Instant> {
        self.released.acquire().await.ok()?.forget();
        let slot = self.taken.fetch_add(1, Ordering::Relaxed);
        Some(self.start + Duration::from_secs_f64(slot as f64 / self.rate))
    }
}

/// The thread that releases slots as they come due.
struct Pacer {
    slots: Arc<Slots>,
    /// Ends with how late the thread woke for each slot, in µs.
    thread: Option<std::thread::JoinHandle<Histogram<u64>>>,
}

impl Pacer {
    fn start(rate: f64, start: Instant, deadline: Instant) -> Pacer {
        let slots = Arc::new(Slots {
            released: Semaphore::new(0),
            taken: AtomicU64::new(0),
            start,
            rate,
        });
        let thread = {
            let slots = slots.clone();
            std::thread::spawn(move || {
                let mut released = 0u64;
                let mut late = new_histogram();
                loop {
                    let now = Instant::now();
                    if now >= deadline || slots.released.is_closed() {
                        break;
                    }
                    // Every slot due by now, at once if this thread woke late.
                    let due = ((now - start).as_secs_f64() * rate) as u64 + 1;
                    if due > released {
                        let more = usize::try_from(due - released).unwrap_or(usize::MAX);
                        slots
                            .released
                            .add_permits(more.min(Semaphore::MAX_PERMITS / 2));
                        released = due;
                    }
                    let next = start + Duration::from_secs_f64(released as f64 / rate);
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    let woke = Instant::now().saturating_duration_since(next);
                    late.saturating_record(u64::try_from(woke.as_micros()).unwrap_or(u64::MAX));
                }
                slots.released.close();
                late
            })
        };
        Pacer {
            slots,
            thread: Some(thread),
        }
    }

    /// Stops releasing slots; returns the wake-up lateness it saw.
    fn stop(mut self) -> Option<Histogram<u64>> {
        self.slots.released.close();
        self.thread.take()?.join().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paced(concurrency: usize, rate: f64, millis: u64) -> LoadSpec {
        LoadSpec {
            concurrency,
            duration: Duration::from_millis(millis),
            max_requests: None,
            rate: Some(rate),
            server_pid: None,
        }
    }

    /// One caller at full speed until `max_requests` calls.
    fn capped(max_requests: u64) -> LoadSpec {
        LoadSpec {
            concurrency: 1,
            duration: Duration::from_secs(30),
            max_requests: Some(max_requests),
            rate: None,
            server_pid: None,
        }
    }

    /// One caller, a slot every 5 ms, calls that take 20 ms: the calls fall further and
    /// further behind their slots, and that wait is charged. Timed from when each call
    /// actually started, every latency would be about 20 ms.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paced_call_is_timed_from_its_slot_not_its_start() {
        let r = run(&paced(1, 200.0, 400), |_, _| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(())
        })
        .await;
        assert!(r.requests >= 5, "{r:?}");
        assert!(r.max_us > 80_000, "the backlog was not charged: {r:?}");
    }

    /// Slots come due at the rate, not as fast as callers are free: ten idle callers at
    /// 10 calls a second for 300 ms make at most the four slots due by then (at 0, 100,
    /// 200 ms, and one more if the pacer wakes at 300), and the run ends at its deadline
    /// although callers are still waiting for slots.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paced_run_offers_only_the_slots_due() {
        let r = run(&paced(10, 10.0, 300), |_, _| async { Ok(()) }).await;
        assert!((1..=4).contains(&r.requests), "{r:?}");
        assert_eq!(r.errors, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn errors_are_counted_and_still_timed() {
        let r = run(&capped(50), |_, n| async move {
            if n % 2 == 0 {
                Err("refused".into())
            } else {
                Ok(())
            }
        })
        .await;
        assert_eq!(r.requests, 50);
        assert_eq!(r.errors, 25);
    }

    /// Interleaved workloads take turns, slice by slice, and each result adds up its own
    /// slices: three turns of at most 10 calls each give 30 calls and their errors.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn interleaved_workloads_take_turns_and_add_up_their_slices() {
        let spec = capped(30);
        let turns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (a, b) = interleaved(
            &spec,
            3,
            |slice| {
                turns.lock().unwrap().push('a');
                async move { run(&slice, |_, _| async { Ok(()) }).await }
            },
            |slice| {
                turns.lock().unwrap().push('b');
                async move { run(&slice, |_, _| async { Err("refused".into()) }).await }
            },
        )
        .await;
        assert_eq!(*turns.lock().unwrap(), ['a', 'b', 'a', 'b', 'a', 'b']);
        assert_eq!((a.requests, a.errors), (30, 0));
        assert_eq!((b.requests, b.errors), (30, 30));
        assert!(a.seconds > 0.0 && a.throughput > 0.0 && b.p99_us >= b.p50_us);
    }
}
