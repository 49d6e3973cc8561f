//! A circuit breaker in front of a remote backend (today: Redis, for the shared rate-limit
//! counters).
//!
//! Why: a backend that hangs instead of refusing (a stopped process, a network path that
//! drops packets) makes every call wait out the whole response timeout before the failure
//! mode can answer, and with a limit on every key by default that is every verification.
//! After [`CircuitSettings::failures`] consecutive failed calls the circuit opens: callers
//! skip the backend and answer at once under their failure mode, and one background task
//! probes the backend every [`CircuitSettings::probe_interval`] until a probe succeeds,
//! which closes the circuit. No live call is ever the probe, so while the backend is down
//! no caller waits on it; the probe's own timeout is the backend client's.
//!
//! States: closed (calls go to the backend; failures counted, any success resets the
//! count) → open (calls skip it) → half-open (a probe is in flight; calls still skip it)
//! → closed on the probe's success, or open again on its failure. A call that started
//! before the circuit opened and succeeds closes it too: the backend answered.
//!
//! Written here rather than taken from a crate: `failsafe` and `recloser` half-open by
//! letting the next live call through after a back-off, which makes that call pay the
//! timeout whenever the backend is still down, and tower has no breaker of its own. What
//! is needed here is small: the transitions are a pure state machine ([`State`],
//! unit-tested without a clock), and the probe loop is one step ([`CircuitBreaker::probe_step`],
//! driven directly by the tests) repeated after a sleep.
//!
//! The hot path reads one atomic ([`CircuitBreaker::is_open`]) and, after a success
//! while nothing was failing, takes no lock.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

/// When the circuit opens and how often the backend is probed while it is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CircuitSettings {
    /// Consecutive failed calls that open the circuit (at least 1).
    pub failures: u32,
    /// The wait before each probe while the circuit is open.
    pub probe_interval: Duration,
}

impl Default for CircuitSettings {
    fn default() -> Self {
        CircuitSettings {
            failures: 3,
            probe_interval: Duration::from_secs(1),
        }
    }
}

/// Asks the backend whether it answers; `true` closes the circuit.
pub type Probe = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Circuit {
    /// Calls go to the backend.
    Closed,
    /// Calls skip the backend; the prober waits for its next probe.
    Open,
    /// Calls skip the backend; a probe is in flight.
    HalfOpen,
}

/// The breaker's figures, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CircuitStats {
    /// Open or half-open now.
    pub open: bool,
    /// Times the circuit opened since start.
    pub opened: u64,
    /// Times it closed again.
    pub closed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transition {
    Stay,
    /// Closed → open. `start_prober`: no prober is running, the caller starts one.
    Opened {
        start_prober: bool,
    },
    /// Open or half-open → closed.
    Closed,
}

/// The pure state machine: no clock, no IO.
#[derive(Debug)]
struct State {
    circuit: Circuit,
    /// Consecutive failures while closed.
    failures: u32,
    /// A prober task is running (it ends when it finds the circuit closed).
    prober: bool,
}

impl State {
    fn new() -> Self {
        State {
            circuit: Circuit::Closed,
            failures: 0,
            prober: false,
        }
    }

    fn failed(&mut self, threshold: u32) -> Transition {
        match self.circuit {
            Circuit::Closed => {
                self.failures = self.failures.saturating_add(1);
                if self.failures < threshold.max(1) {
                    return Transition::Stay;
                }
                self.circuit = Circuit::Open;
                let start_prober = !self.prober;
                self.prober = true;
                Transition::Opened { start_prober }
            }
            // A call that started before the circuit opened says nothing new.
            Circuit::Open | Circuit::HalfOpen => Transition::Stay,
        }
    }

    fn succeeded(&mut self) -> Transition {
        self.failures = 0;
        match self.circuit {
            Circuit::Closed => Transition::Stay,
            Circuit::Open | Circuit::HalfOpen => {
                self.circuit = Circuit::Closed;
                Transition::Closed
            }
        }
    }

    /// The prober's turn: `true` → probe now (half-open); `false` → the circuit closed
    /// meanwhile and the prober ends.
    fn probe_due(&mut self) -> bool {
        match self.circuit {
            Circuit::Closed => {
                self.prober = false;
                false
            }
            Circuit::Open | Circuit::HalfOpen => {
                self.circuit = Circuit::HalfOpen;
                true
            }
        }
    }

    fn probed(&mut self, answered: bool) -> Transition {
        if answered {
            return self.succeeded();
        }
        if self.circuit == Circuit::HalfOpen {
            self.circuit = Circuit::Open;
        }
        Transition::Stay
    }

    /// No runtime to probe from: a circuit nobody probes must not stay open.
    fn abandon_prober(&mut self) {
        self.prober = false;
        self.circuit = Circuit::Closed;
        self.failures = 0;
    }

    /// The hot path's summary of the state.
    fn quick(&self) -> u8 {
        match self.circuit {
            Circuit::Closed if self.failures == 0 => CLEAN,
            Circuit::Closed => FAILING,
            Circuit::Open | Circuit::HalfOpen => OPEN,
        }
    }
}

const CLEAN: u8 = 0;
const FAILING: u8 = 1;
const OPEN: u8 = 2;

pub struct CircuitBreaker {
    /// The backend's name, for logs.
    name: &'static str,
    settings: CircuitSettings,
    probe: Probe,
    /// [`State::quick`], updated under the lock.
    quick: AtomicU8,
    state: Mutex<State>,
    opened: AtomicU64,
    closed: AtomicU64,
}

impl CircuitBreaker {
    pub fn new(name: &'static str, settings: CircuitSettings, probe: Probe) -> Arc<Self> {
        Arc::new(CircuitBreaker {
            name,
            settings,
            probe,
            quick: AtomicU8::new(CLEAN),
            state: Mutex::new(State::new()),
            opened: AtomicU64::new(0),
            closed: AtomicU64::new(0),
        })
    }

    /// Whether calls must skip the backend and answer under their failure mode.
    pub fn is_open(&self) -> bool {
        self.quick.load(Ordering::Relaxed) == OPEN
    }

    pub fn circuit(&self) -> Circuit {
        self.update(|s| s.circuit)
    }

    /// A call through the backend succeeded.
    pub fn succeeded(&self) {
        if self.quick.load(Ordering::Relaxed) == CLEAN {
            return;
        }
        let t = self.update(State::succeeded);
        self.note(t);
    }

    /// A call through the backend failed. The failure that opens the circuit starts the
    /// background prober (on the current Tokio runtime).
    pub fn failed(self: &Arc<Self>) {
        let t = self.update(|s| s.failed(self.settings.failures));
        self.note(t);
        if t == (Transition::Opened { start_prober: true }) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(Self::probe_while_open(Arc::downgrade(self)));
                }
                Err(_) => {
                    tracing::error!(
                        backend = self.name,
                        "no runtime to probe from: the circuit stays closed"
                    );
                    self.update(State::abandon_prober);
                }
            }
        }
    }

    pub fn stats(&self) -> CircuitStats {
        CircuitStats {
            open: self.is_open(),
            opened: self.opened.load(Ordering::Relaxed),
            closed: self.closed.load(Ordering::Relaxed),
        }
    }

    /// One turn of the prober: probes when the circuit is still open and records the
    /// answer. `false`: the circuit was found closed, the prober ends.
    pub async fn probe_step(&self) -> bool {
        if !self.update(State::probe_due) {
            return false;
        }
        let answered = (self.probe)().await;
        let t = self.update(|s| s.probed(answered));
        self.note(t);
        true
    }

    /// Sleeps, probes, and again, until the circuit is closed or the breaker is gone.
    async fn probe_while_open(breaker: Weak<Self>) {
        loop {
            let Some(interval) = breaker.upgrade().map(|b| b.settings.probe_interval) else {
                return;
            };
            tokio::time::sleep(interval).await;
            let Some(b) = breaker.upgrade() else {
                return;
            };
            if !b.probe_step().await {
                return;
            }
        }
    }

    fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let out = f(&mut state);
        self.quick.store(state.quick(), Ordering::Relaxed);
        out
    }

    fn note(&self, t: Transition) {
        match t {
            Transition::Stay => {}
            Transition::Opened { .. } => {
                self.opened.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    backend = self.name,
                    failures = self.settings.failures,
                    probe_interval_ms = self.settings.probe_interval.as_millis() as u64,
                    "circuit opened: calls skip the backend until a probe succeeds"
                );
            }
            Transition::Closed => {
                self.closed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(backend = self.name, "circuit closed: the backend answers");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU32};

    use super::*;

    #[test]
    fn the_threshold_of_consecutive_failures_opens_and_a_success_resets_the_count() {
        let mut s = State::new();
        assert_eq!(s.failed(3), Transition::Stay);
        assert_eq!(s.failed(3), Transition::Stay);
        assert_eq!(s.succeeded(), Transition::Stay);
        assert_eq!(s.failed(3), Transition::Stay);
        assert_eq!(s.failed(3), Transition::Stay);
        assert_eq!(s.circuit, Circuit::Closed);
        assert_eq!(s.failed(3), Transition::Opened { start_prober: true });
        assert_eq!(s.circuit, Circuit::Open);
        // Late failures of calls already in flight change nothing.
        assert_eq!(s.failed(3), Transition::Stay);
        // A threshold of 0 means 1.
        let mut s = State::new();
        assert_eq!(s.failed(0), Transition::Opened { start_prober: true });
    }

    #[test]
    fn a_probe_half_opens_then_closes_on_an_answer_or_opens_again() {
        let mut s = State::new();
        s.failed(1);
        assert!(s.probe_due());
        assert_eq!(s.circuit, Circuit::HalfOpen);
        assert_eq!(
            s.quick(),
            OPEN,
            "calls still skip the backend while probing"
        );
        assert_eq!(s.probed(false), Transition::Stay);
        assert_eq!(s.circuit, Circuit::Open);
        assert!(s.probe_due());
        assert_eq!(s.probed(true), Transition::Closed);
        assert_eq!((s.circuit, s.quick()), (Circuit::Closed, CLEAN));
        // The prober's next turn finds it closed and ends.
        assert!(s.prober);
        assert!(!s.probe_due());
        assert!(!s.prober);
    }

    #[test]
    fn a_reopened_circuit_keeps_the_one_prober_still_running() {
        let mut s = State::new();
        assert_eq!(s.failed(1), Transition::Opened { start_prober: true });
        // A call in flight when it opened succeeds: closed, the prober not yet ended.
        assert_eq!(s.succeeded(), Transition::Closed);
        assert_eq!(
            s.failed(1),
            Transition::Opened {
                start_prober: false
            }
        );
        // That prober's turn probes the reopened circuit.
        assert!(s.probe_due());
    }

    #[test]
    fn the_summary_tells_clean_failing_and_open_apart() {
        let mut s = State::new();
        assert_eq!(s.quick(), CLEAN);
        s.failed(2);
        assert_eq!(s.quick(), FAILING);
        s.failed(2);
        assert_eq!(s.quick(), OPEN);
        s.abandon_prober();
        assert_eq!((s.quick(), s.prober), (CLEAN, false));
    }

    /// A probe that answers as `healthy` says and counts its calls.
    fn probe(healthy: &Arc<AtomicBool>, calls: &Arc<AtomicU32>) -> Probe {
        let (healthy, calls) = (healthy.clone(), calls.clone());
        Arc::new(move || {
            calls.fetch_add(1, Ordering::SeqCst);
            let answer = healthy.load(Ordering::SeqCst);
            Box::pin(async move { answer })
        })
    }

    #[tokio::test]
    async fn while_open_calls_skip_the_backend_and_the_first_answering_probe_closes_it() {
        let healthy = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicU32::new(0));
        // The background prober sleeps for an hour: the test takes its turns itself.
        let settings = CircuitSettings {
            failures: 2,
            probe_interval: Duration::from_secs(3600),
        };
        let breaker = CircuitBreaker::new("test", settings, probe(&healthy, &calls));
        breaker.failed();
        assert!(!breaker.is_open());
        breaker.failed();
        assert!(breaker.is_open());
        assert_eq!(
            breaker.stats(),
            CircuitStats {
                open: true,
                opened: 1,
                closed: 0
            }
        );
        assert!(breaker.probe_step().await);
        assert!(breaker.probe_step().await);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(breaker.circuit(), Circuit::Open);
        healthy.store(true, Ordering::SeqCst);
        assert!(breaker.probe_step().await);
        assert!(!breaker.is_open());
        assert_eq!(
            breaker.stats(),
            CircuitStats {
                open: false,
                opened: 1,
                closed: 1
            }
        );
        // The next turn ends the prober without probing.
        assert!(!breaker.probe_step().await);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    /// The spawned prober itself, on a short interval (bounded wait, no latency asserted).
    #[tokio::test]
    async fn the_background_prober_closes_the_circuit_once_the_backend_answers() {
        let healthy = Arc::new(AtomicBool::new(true));
        let calls = Arc::new(AtomicU32::new(0));
        let settings = CircuitSettings {
            failures: 1,
            probe_interval: Duration::from_millis(5),
        };
        let breaker = CircuitBreaker::new("test", settings, probe(&healthy, &calls));
        breaker.failed();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while breaker.is_open() {
            assert!(tokio::time::Instant::now() < deadline, "never closed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(breaker.stats().closed, 1);
        assert!(calls.load(Ordering::SeqCst) >= 1);
    }
}
