//! Prometheus metrics: what a replica counts, and the `/metrics` endpoint on a separate
//! admin HTTP port.
//!
//! Each server owns its recorder (none is installed process-wide), so several servers in
//! one process (tests, benchmarks) keep their own figures. Every handle the hot path
//! touches is registered once at start and kept here: recording is an atomic add (a
//! counter) or a lock-free push (a histogram), with no lookup by name per call. Figures
//! that are state rather than events (cache size, subscribers, pool connections) are read
//! when a scrape comes in. The exporter keeps each histogram's raw samples until upkeep
//! folds them into buckets, so [`Metrics::keep_up`] runs it every few seconds: without
//! it, a replica nobody scrapes would grow with every call (and measurably slow down).
//!
//! **No label ever carries a secret or a key id**: labels are the VerifyKey code, the
//! gRPC method path (from the server's own routes; any other path is counted as `other`),
//! a decision outcome, or a pool state.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `keywarden_verify_total` | counter | `code` (valid, not_found, malformed, revoked, ...) |
//! | `keywarden_rpc_duration_seconds` | histogram | `method` (`/keywarden.v1.VerifyService/VerifyKey`, ...) |
//! | `keywarden_verify_cache_lookups_total` | counter | `result` (hit, miss, negative_hit) |
//! | `keywarden_verify_cache_entries` | gauge | |
//! | `keywarden_ratelimit_decisions_total` | counter | `outcome` (allowed, limited, unknown: let through without a decision, the counters unreachable) |
//! | `keywarden_ratelimit_backend_failures_total` | counter | |
//! | `keywarden_ratelimit_circuit_open` | gauge | (1 while calls skip Redis) |
//! | `keywarden_ratelimit_circuit_transitions_total` | counter | `to` (open, closed) |
//! | `keywarden_stream_subscribers` | gauge | |
//! | `keywarden_events_published_total` | counter | |
//! | `keywarden_event_lag_seconds` | histogram | (commit of an event to its fan-out here) |
//! | `keywarden_event_log_head` | gauge | (the last seq applied) |
//! | `keywarden_db_pool_connections` | gauge | `state` (idle, in_use, max) |
//! | `keywarden_usage_write_failures_total` | counter | (keys a usage flush kept unwritten) |
//! | `keywarden_secret_scanning_tokens_total` | counter | `label` (true_positive, false_positive) |
//! | `keywarden_secret_scanning_refused_total` | counter | `reason` (unknown_key_id, bad_signature, too_large, malformed, rate_limited) |
//! | `keywarden_webhook_deliveries_total` | counter | `outcome` (delivered, failed, disabled: the failure that gave an endpoint up) |
//! | `keywarden_webhook_oldest_undelivered_seconds` | gauge | (age of the oldest event an enabled endpoint waits for; 0: none) |

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::domain::key::VerifyCode;

/// Every VerifyKey code, in the order of [`code_index`].
const CODES: [VerifyCode; 11] = [
    VerifyCode::Valid,
    VerifyCode::NotFound,
    VerifyCode::Malformed,
    VerifyCode::Revoked,
    VerifyCode::Expired,
    VerifyCode::InsufficientScope,
    VerifyCode::RateLimited,
    VerifyCode::BudgetExceeded,
    VerifyCode::ResourceForbidden,
    VerifyCode::IpForbidden,
    VerifyCode::PlanForbidsKeys,
];

fn code_index(code: VerifyCode) -> usize {
    match code {
        VerifyCode::Valid => 0,
        VerifyCode::NotFound => 1,
        VerifyCode::Malformed => 2,
        VerifyCode::Revoked => 3,
        VerifyCode::Expired => 4,
        VerifyCode::InsufficientScope => 5,
        VerifyCode::RateLimited => 6,
        VerifyCode::BudgetExceeded => 7,
        VerifyCode::ResourceForbidden => 8,
        VerifyCode::IpForbidden => 9,
        VerifyCode::PlanForbidsKeys => 10,
    }
}

fn code_label(code: VerifyCode) -> &'static str {
    match code {
        VerifyCode::Valid => "valid",
        VerifyCode::NotFound => "not_found",
        VerifyCode::Malformed => "malformed",
        VerifyCode::Revoked => "revoked",
        VerifyCode::Expired => "expired",
        VerifyCode::InsufficientScope => "insufficient_scope",
        VerifyCode::RateLimited => "rate_limited",
        VerifyCode::BudgetExceeded => "budget_exceeded",
        VerifyCode::ResourceForbidden => "resource_forbidden",
        VerifyCode::IpForbidden => "ip_forbidden",
        VerifyCode::PlanForbidsKeys => "plan_forbids_keys",
    }
}

/// Latency buckets, in seconds: 50 µs to 5 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

/// A replica's metric handles (no-ops when metrics are off).
pub struct Metrics {
    handle: Option<PrometheusHandle>,
    verify_codes: [Counter; 11],
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_negative_hits: Counter,
    pub limit_allowed: Counter,
    pub limit_refused: Counter,
    /// Calls let through without a decision (the counters unreachable, failing open).
    pub limit_unknown: Counter,
    pub limiter_failures: Counter,
    pub circuit_open: Gauge,
    pub circuit_opened: Counter,
    pub circuit_closed: Counter,
    pub events_published: Counter,
    pub event_lag: Histogram,
    pub cache_entries: Gauge,
    pub subscribers: Gauge,
    pub event_log_head: Gauge,
    pub pool_idle: Gauge,
    pub pool_in_use: Gauge,
    pub pool_max: Gauge,
    /// Keys whose usage a flush could not write (kept for the next one), per flush.
    pub usage_keys_kept: Counter,
    /// Tokens secret scanners reported, by label.
    pub leaks_true_positive: Counter,
    pub leaks_false_positive: Counter,
    /// Scanners' reports refused whole, by why (see [`ScanRefusal`]).
    scan_refused: [Counter; 5],
    pub webhook_delivered: Counter,
    pub webhook_failed: Counter,
    pub webhook_disabled: Counter,
    pub webhook_oldest_undelivered: Gauge,
    rpc: HashMap<String, Histogram>,
    rpc_other: Histogram,
    /// VerifyKey's histogram, found without hashing its path (the call that dominates).
    rpc_verify_key: Histogram,
}

/// The hot path's gRPC method.
const VERIFY_KEY_PATH: &str = "/keywarden.v1.VerifyService/VerifyKey";

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("enabled", &self.handle.is_some())
            .finish()
    }
}

const METADATA: Metadata<'static> = Metadata::new("keywarden", Level::INFO, None);

impl Metrics {
    /// Handles that record nothing.
    pub fn disabled() -> Self {
        Metrics {
            handle: None,
            verify_codes: std::array::from_fn(|_| Counter::noop()),
            cache_hits: Counter::noop(),
            cache_misses: Counter::noop(),
            cache_negative_hits: Counter::noop(),
            limit_allowed: Counter::noop(),
            limit_refused: Counter::noop(),
            limit_unknown: Counter::noop(),
            limiter_failures: Counter::noop(),
            circuit_open: Gauge::noop(),
            circuit_opened: Counter::noop(),
            circuit_closed: Counter::noop(),
            events_published: Counter::noop(),
            event_lag: Histogram::noop(),
            cache_entries: Gauge::noop(),
            subscribers: Gauge::noop(),
            event_log_head: Gauge::noop(),
            pool_idle: Gauge::noop(),
            pool_in_use: Gauge::noop(),
            pool_max: Gauge::noop(),
            usage_keys_kept: Counter::noop(),
            leaks_true_positive: Counter::noop(),
            leaks_false_positive: Counter::noop(),
            scan_refused: std::array::from_fn(|_| Counter::noop()),
            webhook_delivered: Counter::noop(),
            webhook_failed: Counter::noop(),
            webhook_disabled: Counter::noop(),
            webhook_oldest_undelivered: Gauge::noop(),
            rpc: HashMap::new(),
            rpc_other: Histogram::noop(),
            rpc_verify_key: Histogram::noop(),
        }
    }

    /// A recorder of this server's own, with a latency histogram for each of `methods`
    /// (gRPC paths such as `/keywarden.v1.VerifyService/VerifyKey`).
    pub fn new(methods: &[String]) -> Self {
        // A suffix matcher with valid, non-empty buckets cannot be refused; if it ever
        // were, the figures would still be kept, as summaries.
        let recorder = match PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
        {
            Ok(builder) => builder.build_recorder(),
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let counter = |name: &'static str, labels: Vec<Label>| {
            recorder.register_counter(&Key::from_parts(name, labels), &METADATA)
        };
        let gauge = |name: &'static str, labels: Vec<Label>| {
            recorder.register_gauge(&Key::from_parts(name, labels), &METADATA)
        };
        let histogram = |name: &'static str, labels: Vec<Label>| {
            recorder.register_histogram(&Key::from_parts(name, labels), &METADATA)
        };
        describe(&recorder);
        let verify_codes = CODES.map(|code| {
            counter(
                "keywarden_verify_total",
                vec![Label::new("code", code_label(code))],
            )
        });
        let lookups = |result: &'static str| {
            counter(
                "keywarden_verify_cache_lookups_total",
                vec![Label::new("result", result)],
            )
        };
        let decisions = |outcome: &'static str| {
            counter(
                "keywarden_ratelimit_decisions_total",
                vec![Label::new("outcome", outcome)],
            )
        };
        let transitions = |to: &'static str| {
            counter(
                "keywarden_ratelimit_circuit_transitions_total",
                vec![Label::new("to", to)],
            )
        };
        let pool = |state: &'static str| {
            gauge(
                "keywarden_db_pool_connections",
                vec![Label::new("state", state)],
            )
        };
        let deliveries = |outcome: &'static str| {
            counter(
                "keywarden_webhook_deliveries_total",
                vec![Label::new("outcome", outcome)],
            )
        };
        let rpc: HashMap<String, Histogram> = methods
            .iter()
            .map(|m| {
                (
                    m.clone(),
                    histogram(
                        "keywarden_rpc_duration_seconds",
                        vec![Label::new("method", m.clone())],
                    ),
                )
            })
            .collect();
        let rpc_verify_key = rpc
            .get(VERIFY_KEY_PATH)
            .cloned()
            .unwrap_or_else(Histogram::noop);
        Metrics {
            handle: Some(recorder.handle()),
            rpc_verify_key,
            verify_codes,
            cache_hits: lookups("hit"),
            cache_misses: lookups("miss"),
            cache_negative_hits: lookups("negative_hit"),
            limit_allowed: decisions("allowed"),
            limit_refused: decisions("limited"),
            limit_unknown: decisions("unknown"),
            limiter_failures: counter("keywarden_ratelimit_backend_failures_total", vec![]),
            circuit_open: gauge("keywarden_ratelimit_circuit_open", vec![]),
            circuit_opened: transitions("open"),
            circuit_closed: transitions("closed"),
            events_published: counter("keywarden_events_published_total", vec![]),
            event_lag: histogram("keywarden_event_lag_seconds", vec![]),
            cache_entries: gauge("keywarden_verify_cache_entries", vec![]),
            subscribers: gauge("keywarden_stream_subscribers", vec![]),
            event_log_head: gauge("keywarden_event_log_head", vec![]),
            pool_idle: pool("idle"),
            pool_in_use: pool("in_use"),
            pool_max: pool("max"),
            usage_keys_kept: counter("keywarden_usage_write_failures_total", vec![]),
            leaks_true_positive: counter(
                "keywarden_secret_scanning_tokens_total",
                vec![Label::new("label", "true_positive")],
            ),
            leaks_false_positive: counter(
                "keywarden_secret_scanning_tokens_total",
                vec![Label::new("label", "false_positive")],
            ),
            scan_refused: ScanRefusal::ALL.map(|r| {
                counter(
                    "keywarden_secret_scanning_refused_total",
                    vec![Label::new("reason", r.label())],
                )
            }),
            webhook_delivered: deliveries("delivered"),
            webhook_failed: deliveries("failed"),
            webhook_disabled: deliveries("disabled"),
            webhook_oldest_undelivered: gauge(
                "keywarden_webhook_oldest_undelivered_seconds",
                vec![],
            ),
            rpc,
            rpc_other: histogram(
                "keywarden_rpc_duration_seconds",
                vec![Label::new("method", "other")],
            ),
        }
    }

    pub fn verified(&self, code: VerifyCode) {
        self.verify_codes[code_index(code)].increment(1);
    }

    /// The latency histogram of a gRPC path (`other` for a path the server has no route
    /// for, so a caller cannot mint label values).
    fn rpc_histogram(&self, path: &str) -> &Histogram {
        if path == VERIFY_KEY_PATH {
            return &self.rpc_verify_key;
        }
        self.rpc.get(path).unwrap_or(&self.rpc_other)
    }

    /// Folds the histograms' recorded samples into their buckets. Samples are kept until
    /// this runs, so it must run periodically whether or not anyone scrapes.
    pub fn upkeep(&self) {
        if let Some(handle) = &self.handle {
            handle.run_upkeep();
        }
    }

    /// The exposition text; `None` when metrics are off.
    pub fn render(&self) -> Option<String> {
        let handle = self.handle.as_ref()?;
        handle.run_upkeep();
        Some(handle.render())
    }

    /// Runs [`Metrics::upkeep`] every `every` until `stop` changes.
    pub async fn keep_up(
        self: Arc<Self>,
        every: std::time::Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.upkeep(),
                _ = stop.changed() => return,
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.handle.is_some()
    }
}

fn describe(recorder: &PrometheusRecorder) {
    let d = |name: &'static str, unit: Option<Unit>, text: &'static str, kind: u8| match kind {
        0 => recorder.describe_counter(name.into(), unit, text.into()),
        1 => recorder.describe_gauge(name.into(), unit, text.into()),
        _ => recorder.describe_histogram(name.into(), unit, text.into()),
    };
    d(
        "keywarden_verify_total",
        None,
        "VerifyKey answers by code.",
        0,
    );
    d(
        "keywarden_rpc_duration_seconds",
        Some(Unit::Seconds),
        "Time to the response headers of each RPC, by gRPC method.",
        2,
    );
    d(
        "keywarden_verify_cache_lookups_total",
        None,
        "VerifyKey cache lookups by result.",
        0,
    );
    d(
        "keywarden_verify_cache_entries",
        None,
        "Keys in the VerifyKey cache.",
        1,
    );
    d(
        "keywarden_ratelimit_decisions_total",
        None,
        "Rate-limit decisions by outcome (unknown: let through without one, the backend unreachable).",
        0,
    );
    d(
        "keywarden_ratelimit_backend_failures_total",
        None,
        "Calls to the rate-limit backend (Redis) that failed (probes not counted).",
        0,
    );
    d(
        "keywarden_ratelimit_circuit_open",
        None,
        "1 while the circuit to the rate-limit backend is open: calls skip it and answer under redis_failure.",
        1,
    );
    d(
        "keywarden_ratelimit_circuit_transitions_total",
        None,
        "Times the circuit to the rate-limit backend opened or closed.",
        0,
    );
    d(
        "keywarden_stream_subscribers",
        None,
        "Open WatchRevocations streams on this replica.",
        1,
    );
    d(
        "keywarden_events_published_total",
        None,
        "Key events this replica read from the log and fanned out.",
        0,
    );
    d(
        "keywarden_event_lag_seconds",
        Some(Unit::Seconds),
        "From an event's commit to its fan-out on this replica.",
        2,
    );
    d(
        "keywarden_event_log_head",
        None,
        "The last event-log seq this replica applied.",
        1,
    );
    d(
        "keywarden_db_pool_connections",
        None,
        "Database pool connections by state.",
        1,
    );
    d(
        "keywarden_secret_scanning_tokens_total",
        None,
        "Tokens secret scanners reported, by the label answered.",
        0,
    );
    d(
        "keywarden_secret_scanning_refused_total",
        None,
        "Secret-scanning reports refused whole (nothing read or changed), by why.",
        0,
    );
    d(
        "keywarden_webhook_deliveries_total",
        None,
        "Webhook delivery attempts by outcome (disabled: the failure that gave an endpoint up).",
        0,
    );
    d(
        "keywarden_webhook_oldest_undelivered_seconds",
        Some(Unit::Seconds),
        "Age of the oldest outbox event an enabled webhook endpoint still waits for.",
        1,
    );
    d(
        "keywarden_usage_write_failures_total",
        None,
        "Keys whose spend or last use a usage flush could not write (kept for the next \
         flush), counted at every flush that kept them.",
        0,
    );
}

/// Why a secret scanner's report was refused whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanRefusal {
    UnknownKeyId,
    BadSignature,
    TooLarge,
    Malformed,
    RateLimited,
}

impl ScanRefusal {
    const ALL: [ScanRefusal; 5] = [
        ScanRefusal::UnknownKeyId,
        ScanRefusal::BadSignature,
        ScanRefusal::TooLarge,
        ScanRefusal::Malformed,
        ScanRefusal::RateLimited,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ScanRefusal::UnknownKeyId => "unknown_key_id",
            ScanRefusal::BadSignature => "bad_signature",
            ScanRefusal::TooLarge => "too_large",
            ScanRefusal::Malformed => "malformed",
            ScanRefusal::RateLimited => "rate_limited",
        }
    }
}

impl Metrics {
    pub fn scan_refused(&self, why: ScanRefusal) {
        self.scan_refused[why as usize].increment(1);
    }
}

/// A tower layer that times every RPC into its method's histogram and runs it inside a
/// `rpc` tracing span (debug level; what the span records is the method path only).
#[derive(Clone)]
pub struct RpcLayer {
    metrics: Arc<Metrics>,
}

impl RpcLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        RpcLayer { metrics }
    }
}

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> tower::Service<http::Request<B>> for RpcService<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let histogram = self.metrics.rpc_histogram(request.uri().path()).clone();
        let span = tracing::debug_span!("rpc", method = %request.uri().path());
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(
            async move {
                let response = response.await;
                histogram.record(started.elapsed().as_secs_f64());
                response
            }
            .instrument(span),
        )
    }
}

/// Reads the state figures into their gauges just before a scrape.
pub type Refresh = Arc<dyn Fn(&Metrics) + Send + Sync>;

/// Serves `GET /metrics` on `listener` until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    refresh: Refresh,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            let refresh = refresh.clone();
            async move {
                refresh(&metrics);
                match metrics.render() {
                    Some(text) => (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        text,
                    )
                        .into_response(),
                    None => StatusCode::NOT_FOUND.into_response(),
                }
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
}
