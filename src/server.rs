//! Start-up and shutdown: builds the services over a store, binds the listener, serves
//! health and reflection next to Keywarden's own services, and returns a handle with the
//! bound address (so tests and benchmarks run the real server on port 0).
//!
//! [`start`] opens the store first and fails when it cannot (tests, benchmarks);
//! `keywarden serve` binds first and waits for the store (`crate::startup`), then hands
//! the same socket to [`serve_on`].

use std::net::SocketAddr;
use std::sync::Arc;

use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::{ServerTlsConfig, TcpIncoming};
use tonic::transport::{Certificate, Identity};

use crate::access_groups::AccessGroups;
use crate::api::access_groups::AccessGroupApi;
use crate::api::auth::Authenticate;
use crate::api::auth::{RequireRole, Role};
use crate::api::connect::{ConnectLayer, Rpcs};
use crate::api::ext_authz::ExtAuthzApi;
use crate::api::keys::KeyApi;
use crate::api::provider_keys::ProviderKeyApi;
use crate::api::revocations::RevocationApi;
use crate::api::teams::TeamApi;
use crate::api::usage::UsageApi;
use crate::api::verify::VerifyApi;
use crate::api::webhooks::WebhookApi;
use crate::api::workspaces::WorkspaceApi;
use crate::cache::VerifyCache;
use crate::clock::Clock;
use crate::config::{LimiterSettings, Settings};
use crate::crypto::KekRing;
use crate::events::EventHub;
use crate::keys::{KeyLifecycle, KeyPolicy};
use crate::ledger::Ledger;
use crate::metrics::{self, Metrics, Refresh, RpcLayer};
use crate::proto::access_group_service_server::AccessGroupServiceServer;
use crate::proto::key_service_server::KeyServiceServer;
use crate::proto::provider_key_service_server::ProviderKeyServiceServer;
use crate::proto::revocation_service_server::RevocationServiceServer;
use crate::proto::team_service_server::TeamServiceServer;
use crate::proto::usage_service_server::UsageServiceServer;
use crate::proto::verify_service_server::VerifyServiceServer;
use crate::proto::webhook_service_server::WebhookServiceServer;
use crate::proto::workspace_service_server::WorkspaceServiceServer;
use crate::provider_keys::{ProviderKeys, check_keks};
use crate::ratelimit::RateLimiter;
use crate::ratelimit::leased::{LeasedLimiter, Leases, QuotaAuthority};
use crate::ratelimit::memory::MemoryLimiter;
use crate::ratelimit::redis::RedisLimiter;
use crate::store::{self, Store};
use crate::teams::Teams;
use crate::usage::UsageBook;
use crate::usage_history::HistorySettings;
use crate::usage_reports::UsageReports;
use crate::verify::{EdgeLeasing, Verifier, VerifyPolicy};
use crate::webhooks::{Dispatcher, Webhooks};
use crate::workspaces::Workspaces;
use envoy_types::ext_authz::v3::pb::AuthorizationServer;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the database: {0}")]
    Store(#[from] store::OpenError),
    #[error("cannot listen: {0}")]
    Listen(#[from] std::io::Error),
    #[error("cannot read the event log: {0}")]
    Events(#[from] store::StoreError),
    #[error("cannot build reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("rate limits: {0}")]
    Limiter(#[from] crate::ratelimit::LimiterError),
    #[error("key-encryption keys: {0}")]
    Kek(String),
    #[error("webhooks: {0}")]
    Webhooks(String),
    #[error("tls: {0}")]
    Tls(tonic::transport::Error),
    /// The compiled descriptor set does not decode: a build defect.
    #[error("the compiled descriptors: {0}")]
    Descriptors(String),
    /// A service added to the router without a health status, or the reverse: a
    /// programming error, refused at start rather than answered NOT_FOUND to a probe.
    #[error("health reports {reported:?} but the router serves {serving:?}")]
    Services {
        reported: Vec<&'static str>,
        serving: Vec<&'static str>,
    },
}

/// The KEK ring from the configured versions (Argon2id runs here for passphrase KEKs, off
/// the async threads); `None` when none is configured.
pub async fn build_ring(settings: &Settings) -> Result<Option<Arc<KekRing>>, StartError> {
    if settings.keks.is_empty() {
        return Ok(None);
    }
    let keks = settings.keks.clone();
    let ring = tokio::task::spawn_blocking(move || {
        let mut derived = Vec::with_capacity(keks.len());
        for (version, material) in &keks {
            derived.push((*version, material.key()?));
        }
        KekRing::new(derived)
    })
    .await
    .map_err(|e| StartError::Kek(e.to_string()))?
    .map_err(|e| StartError::Kek(e.to_string()))?;
    Ok(Some(Arc::new(ring)))
}

/// Every gRPC method the server routes (Keywarden's own, read from its descriptors, and
/// the standard services next to them): each gets its own latency histogram.
fn grpc_methods() -> Vec<String> {
    use prost::Message;
    let mut methods: Vec<String> = [
        "/envoy.service.auth.v3.Authorization/Check",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
    ]
    .map(str::to_owned)
    .to_vec();
    // The descriptor set is compiled in; failing to decode it would be a build defect,
    // and costs only the per-method split (those calls count as `other`).
    if let Ok(set) = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET) {
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    methods.push(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    methods
}

/// Reads the figures that are state, not events, into their gauges before a scrape.
fn refresh_gauges(
    cache: Arc<VerifyCache>,
    hub: Arc<EventHub>,
    store: Arc<dyn Store>,
    limiter: Arc<dyn RateLimiter>,
) -> Refresh {
    Arc::new(move |m: &Metrics| {
        m.cache_entries.set(cache.len() as f64);
        m.subscribers.set(hub.subscribers() as f64);
        m.event_log_head.set(hub.published() as f64);
        let pool = store.pool_stats();
        m.pool_idle.set(f64::from(pool.idle));
        m.pool_in_use
            .set(f64::from(pool.open.saturating_sub(pool.idle)));
        m.pool_max.set(f64::from(pool.max));
        let backend = limiter.backend_stats();
        m.limiter_failures.absolute(backend.failures);
        m.circuit_open
            .set(f64::from(u8::from(backend.circuit.open)));
        m.circuit_opened.absolute(backend.circuit.opened);
        m.circuit_closed.absolute(backend.circuit.closed);
    })
}

/// Writes the usage book every interval, and its usage history every history interval
/// (pruning the history at most hourly), until shutdown.
#[derive(Clone)]
struct UsageFlusher {
    usage: Arc<UsageBook>,
    store: Arc<dyn Store>,
    clock: Clock,
    metrics: Arc<Metrics>,
    history: HistorySettings,
}

impl UsageFlusher {
    async fn run(self, every: std::time::Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut history = tokio::time::interval(self.history.interval);
        history.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pruned_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => self.flush(false).await,
                _ = history.tick() => {
                    self.flush_history().await;
                    if pruned_at.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(3_600)) {
                        self.prune_history().await;
                        pruned_at = Some(tokio::time::Instant::now());
                    }
                }
                _ = stop.changed() => return,
            }
        }
    }

    async fn flush_history(&self) {
        if let Err(e) = self.usage.flush_history(self.store.as_ref()).await {
            tracing::warn!(error = %e, "writing the usage history failed; kept for the next write");
        }
    }

    async fn prune_history(&self) {
        let now = self.clock.now();
        let before = |keep| now.saturating_sub(crate::domain::micros_in(keep));
        let pruned = self
            .store
            .prune_rollups(
                before(self.history.hour_retention),
                before(self.history.day_retention),
            )
            .await;
        match pruned {
            Ok(0) => {}
            Ok(rows) => tracing::info!(rows, "pruned the usage history"),
            Err(e) => tracing::warn!(error = %e, "pruning the usage history failed"),
        }
    }

    /// `all`: every last use too, however recent the one written, and the usage history
    /// (shutdown, tests).
    async fn flush(&self, all: bool) {
        if all {
            self.flush_history().await;
        }
        let flushed = self
            .usage
            .flush(self.store.as_ref(), self.clock.now(), all)
            .await;
        if let Some(e) = flushed.error {
            self.metrics.usage_keys_kept.increment(flushed.kept as u64);
            tracing::warn!(
                error = %e,
                written = flushed.written,
                kept = flushed.kept,
                failed_writes = flushed.failures,
                "writing usage failed for some keys; kept for the next flush"
            );
        }
    }
}

/// Envoy's ext_authz service, as health names it.
const EXT_AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";

async fn follow_freshness(
    reporter: &tonic_health::server::HealthReporter,
    services: &[&str],
    vouching: bool,
) {
    let status = if vouching {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    for service in services {
        reporter.set_service_status(service, status).await;
    }
}

/// Keeps the vouching services' health in step with [`crate::events::Freshness`].
async fn report_freshness(
    reporter: tonic_health::server::HealthReporter,
    services: Vec<&'static str>,
    hub: Arc<EventHub>,
) {
    let mut changes = hub.freshness().watch();
    let mut stop = hub.stopping();
    loop {
        let vouching = *changes.borrow_and_update();
        follow_freshness(&reporter, &services, vouching).await;
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}

/// A server that is serving. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    cache: Arc<VerifyCache>,
    hub: Arc<EventHub>,
    flusher: UsageFlusher,
    dispatcher: Arc<Dispatcher>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `GET /metrics` is served, when metrics are on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Where the `[http]` listener (secret scanning) is, when configured.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    pub fn cache(&self) -> &VerifyCache {
        &self.cache
    }

    pub fn events(&self) -> &EventHub {
        &self.hub
    }

    /// Writes the usage book now: spend and every last use (as shutdown does).
    pub async fn flush_usage(&self) {
        self.flusher.flush(true).await;
    }

    /// Runs one webhook poll now (notices due at the clock's time, then deliveries), after
    /// any poll under way: what a test calls after moving its manual clock.
    pub async fn poll_webhooks(&self) {
        self.dispatcher.poll().await;
    }

    /// Stops accepting, lets in-flight calls finish, and returns when the server is down.
    pub async fn shutdown(mut self) -> Result<(), tonic::transport::Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.join().await
    }

    /// Waits until the server stops (after [`RunningServer::shutdown`] or a fatal error).
    pub async fn join(self) -> Result<(), tonic::transport::Error> {
        match self.task.await {
            Ok(result) => result,
            Err(join) => {
                tracing::error!(error = %join, "server task failed");
                Ok(())
            }
        }
    }

    /// Splits off the stop signal, for a caller that waits for SIGTERM elsewhere.
    pub fn stop_handle(&mut self) -> Option<oneshot::Sender<()>> {
        self.stop.take()
    }
}

/// Opens the configured database (running its migrations) and starts serving; a database
/// that cannot be reached is an error at once.
pub async fn start(settings: &Settings, clock: Clock) -> Result<RunningServer, StartError> {
    let store = store::open(
        settings.database_url.expose_secret(),
        settings.database_max_connections,
    )
    .await?;
    start_with_store(settings, store, clock).await
}

pub async fn start_with_store(
    settings: &Settings,
    store: Arc<dyn Store>,
    clock: Clock,
) -> Result<RunningServer, StartError> {
    let listener = TcpListener::bind(settings.listen).await?;
    serve_on(settings, store, clock, listener).await
}

/// The services health reports by name besides the server as a whole (`""`): SERVING
/// once the server runs, NOT_SERVING while `serve` still waits for its database. The
/// router serves exactly these ([`Served`] records what it adds; `serve_on` refuses to
/// start if the two lists differ).
pub fn reported_services(settings: &Settings) -> Vec<&'static str> {
    use tonic::server::NamedService;
    let mut names = vec![
        <KeyServiceServer<KeyApi> as NamedService>::NAME,
        <TeamServiceServer<TeamApi> as NamedService>::NAME,
        <AccessGroupServiceServer<AccessGroupApi> as NamedService>::NAME,
        <WorkspaceServiceServer<WorkspaceApi> as NamedService>::NAME,
        <ProviderKeyServiceServer<ProviderKeyApi> as NamedService>::NAME,
        <UsageServiceServer<UsageApi> as NamedService>::NAME,
        <WebhookServiceServer<WebhookApi> as NamedService>::NAME,
    ];
    names.extend(vouching_services(settings));
    names
}

/// The router as it is built, and the name of every service of Keywarden's added to it:
/// what health must report on.
struct Served<L> {
    router: tonic::transport::server::Router<L>,
    names: Vec<&'static str>,
}

impl<L> Served<L> {
    fn new(router: tonic::transport::server::Router<L>) -> Self {
        Served {
            router,
            names: Vec::new(),
        }
    }

    fn add<S>(mut self, service: S) -> Self
    where
        S: tower::Service<http::Request<tonic::body::Body>, Error = std::convert::Infallible>
            + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.router = self.router.add_service(service);
        self
    }
}

/// The services that vouch for keys: VerifyService, RevocationService and Envoy's
/// ext_authz API (on the same verifier as VerifyKey and for the same role). Their health
/// follows [`crate::events::Freshness`].
pub fn vouching_services(settings: &Settings) -> Vec<&'static str> {
    use tonic::server::NamedService;
    let mut names = vec![
        <VerifyServiceServer<VerifyApi> as NamedService>::NAME,
        <RevocationServiceServer<RevocationApi> as NamedService>::NAME,
    ];
    if settings.ext_authz.enabled {
        names.push(EXT_AUTHZ_SERVICE);
    }
    names
}

/// The gRPC transport as configured: `[transport]` limits and keep-alives, `[tls]`.
pub fn transport(settings: &Settings) -> Result<tonic::transport::Server, StartError> {
    let transport = &settings.transport;
    let mut builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(transport.max_concurrent_streams)
        .http2_keepalive_interval(transport.http2_keepalive_interval)
        .http2_keepalive_timeout(transport.http2_keepalive_timeout);
    if let Some(timeout) = transport.request_timeout {
        builder = builder.timeout(timeout);
    }
    if let Some(tls) = &settings.tls {
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&tls.cert_pem, tls.key_pem.as_slice()));
        if let Some(ca) = &tls.client_ca_pem {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(config).map_err(StartError::Tls)?;
    }
    Ok(builder)
}

/// The connections `listener` accepts, with the configured TCP options.
pub fn incoming(listener: TcpListener, settings: &Settings) -> TcpIncoming {
    // The builder's `tcp_nodelay` applies only to listeners it binds itself: set it on
    // this one, or Nagle holds a stream's event back behind a unary reply on the same
    // connection until the client's delayed ACK (~40 ms).
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(settings.transport.tcp_keepalive)
}

/// Builds every service over `store` and serves them on `listener`, bound already.
pub async fn serve_on(
    settings: &Settings,
    store: Arc<dyn Store>,
    clock: Clock,
    listener: TcpListener,
) -> Result<RunningServer, StartError> {
    let metrics = Arc::new(if settings.metrics_listen.is_some() {
        Metrics::new(&grpc_methods())
    } else {
        Metrics::disabled()
    });
    let cache = Arc::new(if settings.cache_enabled {
        VerifyCache::new(settings.cache)
    } else {
        VerifyCache::disabled()
    });
    let hub = EventHub::start(
        store.clone(),
        cache.clone(),
        clock.clone(),
        settings.events.clone(),
        metrics.clone(),
    )
    .await?;
    let services = Services::build(settings, &store, &clock, &cache, &hub, &metrics).await?;
    let flushing = tokio::spawn(
        services
            .flusher
            .clone()
            .run(settings.usage_flush_interval, hub.stopping()),
    );
    let flusher = services.flusher.clone();
    let limiter = services.limiter.clone();
    // Webhook delivery: off every RPC's path, its own task.
    let dispatcher = services.dispatcher.clone();
    tokio::spawn(dispatcher.clone().run(hub.stopping()));
    // The descriptors Connect calls are read with, decoded once for both listeners.
    let rpcs = Arc::new(Rpcs::compiled().map_err(|e| StartError::Descriptors(e.to_string()))?);
    let http_addr = match settings.http.listen {
        Some(at) => {
            let scanning = Arc::new(crate::http::secret_scanning::SecretScanning::new(
                &settings.http.scanners,
                services.lifecycle.clone(),
                metrics.clone(),
                clock.clone(),
            ));
            // The JSON surface's OpenAPI document is served here too (beside the calls it
            // describes on the gRPC port), for tools that read it from the HTTP side.
            let openapi = rpcs.openapi_json();
            let app = scanning.router().route(
                "/openapi.json",
                axum::routing::get(move || {
                    let body = openapi.clone();
                    async move { ([(http::header::CONTENT_TYPE, "application/json")], body) }
                }),
            );
            Some(crate::http::serve(at, app, settings, &hub).await?)
        }
        None => None,
    };
    let router = router(settings, services, rpcs, &hub, &metrics).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let stopping = hub.clone();
    let incoming = incoming(listener, settings);
    let serving = router.serve_with_incoming_shutdown(incoming, async move {
        let _ = stopped.await;
        // Streams never end on their own: end them so the graceful shutdown can finish.
        stopping.shutdown();
    });
    let metrics_addr = match settings.metrics_listen {
        Some(at) => {
            let refresh = refresh_gauges(cache.clone(), hub.clone(), store.clone(), limiter);
            Some(serve_metrics(at, metrics, refresh, &hub).await?)
        }
        None => None,
    };
    let final_flush = flusher.clone();
    let task = tokio::spawn(async move {
        let served = serving.await;
        // In-flight calls have finished: write what they reported, so no spend is lost.
        let _ = flushing.await;
        final_flush.flush(true).await;
        served
    });
    tracing::info!(%addr, "keywarden serving");
    Ok(RunningServer {
        addr,
        metrics_addr,
        http_addr,
        cache,
        hub,
        flusher,
        dispatcher,
        stop: Some(stop),
        task,
    })
}

/// The services a replica runs, over one store, cache and event hub.
struct Services {
    lifecycle: Arc<KeyLifecycle>,
    teams: Arc<Teams>,
    access_groups: Arc<AccessGroups>,
    provider_keys: Arc<ProviderKeys>,
    workspaces: Arc<Workspaces>,
    usage_reports: Arc<UsageReports>,
    webhooks: Arc<Webhooks>,
    dispatcher: Arc<Dispatcher>,
    clock: Clock,
    verifier: Arc<Verifier>,
    /// The limiter the verifier decides with (its failures are a gauge).
    limiter: Arc<dyn RateLimiter>,
    flusher: UsageFlusher,
}

impl Services {
    async fn build(
        settings: &Settings,
        store: &Arc<dyn Store>,
        clock: &Clock,
        cache: &Arc<VerifyCache>,
        hub: &Arc<EventHub>,
        metrics: &Arc<Metrics>,
    ) -> Result<Services, StartError> {
        let lifecycle = Arc::new(KeyLifecycle::new(
            store.clone(),
            cache.clone(),
            hub.clone(),
            clock.clone(),
            KeyPolicy {
                brand: settings.brand.clone(),
                implications: settings.implications.clone(),
                plans: settings.plans.clone(),
                default_limits: settings.default_limits.clone(),
            },
        ));
        let teams = Arc::new(Teams::new(
            store.clone(),
            cache.clone(),
            hub.clone(),
            clock.clone(),
        ));
        let access_groups = Arc::new(AccessGroups::new(
            store.clone(),
            cache.clone(),
            hub.clone(),
            clock.clone(),
        ));
        let ring = build_ring(settings).await?;
        check_keks(store.as_ref(), ring.as_deref(), clock.now())
            .await
            .map_err(StartError::Kek)?;
        let provider_keys = Arc::new(ProviderKeys::new(
            store.clone(),
            clock.clone(),
            settings.plans.clone(),
            ring.clone(),
        ));
        let webhooks = Arc::new(Webhooks::new(
            store.clone(),
            clock.clone(),
            ring.clone(),
            settings.webhooks.allow_private,
        ));
        let dispatcher = Arc::new(
            Dispatcher::new(
                store.clone(),
                clock.clone(),
                ring,
                settings.webhooks.clone(),
                metrics.clone(),
            )
            .map_err(StartError::Webhooks)?,
        );
        let workspaces = Arc::new(Workspaces::new(
            store.clone(),
            cache.clone(),
            hub.clone(),
            clock.clone(),
            settings.plans.clone(),
        ));
        // One record per key holds its usage account and, counting in memory, its
        // rate-limit counters (see `ledger`).
        let ledger = Arc::new(Ledger::new());
        let (limiter, authority) = limiters(settings, clock, &ledger)?;
        let usage = Arc::new(UsageBook::with_ledger(
            ledger,
            settings.cache.ttl,
            settings.usage_flush_interval,
        ));
        let verifier = Verifier::new(
            hub.clone(),
            cache.clone(),
            limiter.clone(),
            usage.clone(),
            clock.clone(),
            VerifyPolicy {
                brand: settings.brand.clone(),
                implications: settings.implications.clone(),
                default_limits: settings.default_limits.clone(),
                plans: settings.plans.clone(),
            },
            metrics.clone(),
        );
        let verifier = Arc::new(match settings.edge_lease {
            Some(life) => verifier.with_edge_leasing(EdgeLeasing { authority, life }),
            None => verifier,
        });
        let flusher = UsageFlusher {
            usage,
            store: store.clone(),
            clock: clock.clone(),
            metrics: metrics.clone(),
            history: settings.usage_history,
        };
        Ok(Services {
            lifecycle,
            teams,
            access_groups,
            provider_keys,
            workspaces,
            usage_reports: Arc::new(UsageReports::new(store.clone())),
            webhooks,
            dispatcher,
            clock: clock.clone(),
            verifier,
            limiter,
            flusher,
        })
    }
}

type Limiters = (Arc<dyn RateLimiter>, Arc<dyn QuotaAuthority>);

/// The limiter that decides this replica's own calls, and the authority under it that
/// edge nodes lease from (never a lease holder such as `Leases`: a grant to an edge must
/// be counted where every holder's is).
fn limiters(
    settings: &Settings,
    clock: &Clock,
    ledger: &Arc<Ledger>,
) -> Result<Limiters, StartError> {
    Ok(match &settings.limiter {
        // The counters are kept while they count anything, in the ledger (no bound of
        // their own: a record per key in use, dropped once idle).
        LimiterSettings::Memory => {
            let memory = Arc::new(MemoryLimiter::new(ledger.clone()));
            (memory.clone(), memory)
        }
        LimiterSettings::Redis {
            url,
            prefix,
            failure,
            circuit,
            lease,
            clock_skew,
        } => {
            let redis = Arc::new(RedisLimiter::new(
                url.expose_secret(),
                prefix,
                *failure,
                *circuit,
                *clock_skew,
            )?);
            match lease {
                Some(lease) => (
                    Arc::new(Leases(LeasedLimiter::new(
                        redis.clone(),
                        *lease,
                        clock.clone(),
                    ))),
                    redis,
                ),
                None => (redis.clone(), redis),
            }
        }
    })
}

/// Envoy's `envoy.service.auth.v3.Authorization` and what it imports (see build.rs).
const ENVOY_EXT_AUTHZ_DESCRIPTORS: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_ext_authz.bin"));

/// Server reflection over what this replica serves: Keywarden's protos, health, the
/// error details its refusals carry (`google.rpc.ErrorInfo`, `BadRequest`, ...: so
/// grpcurl prints them instead of "not recognized"), and Envoy's ext_authz when enabled.
fn reflection(settings: &Settings) -> tonic_reflection::server::Builder<'static> {
    let builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET);
    if settings.ext_authz.enabled {
        builder.register_encoded_file_descriptor_set(ENVOY_EXT_AUTHZ_DESCRIPTORS)
    } else {
        builder
    }
}

/// CORS for browser consoles calling by the Connect protocol, when origins are
/// configured: the methods and headers Connect's clients send (and `authorization`), the
/// gRPC status headers they may read.
fn cors(settings: &crate::config::ConnectSettings) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins = settings.cors.as_ref()?;
    let allow = match origins {
        crate::config::CorsOrigins::Any => AllowOrigin::any(),
        crate::config::CorsOrigins::List(list) => AllowOrigin::list(
            list.iter()
                .filter_map(|o| http::HeaderValue::from_str(o).ok()),
        ),
    };
    let header = http::HeaderName::from_static;
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([http::Method::POST, http::Method::GET])
            .allow_headers([
                http::header::CONTENT_TYPE,
                http::header::AUTHORIZATION,
                header("connect-protocol-version"),
                header("connect-timeout-ms"),
                header("x-user-agent"),
            ])
            .expose_headers([
                header("grpc-status"),
                header("grpc-message"),
                header("grpc-status-details-bin"),
            ])
            .max_age(settings.cors_max_age),
    )
}

/// The gRPC router: health and reflection, then every service behind its caller check.
/// Health reports on exactly the services added ([`Served`]).
async fn router(
    settings: &Settings,
    services: Services,
    rpcs: Arc<Rpcs>,
    hub: &Arc<EventHub>,
    metrics: &Arc<Metrics>,
) -> Result<
    tonic::transport::server::Router<
        tower::layer::util::Stack<
            RpcLayer,
            tower::layer::util::Stack<
                ConnectLayer,
                tower::layer::util::Stack<
                    tower::util::Either<tower_http::cors::CorsLayer, tower::layer::util::Identity>,
                    tower::layer::util::Identity,
                >,
            >,
        >,
    >,
    StartError,
> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    // The services that vouch for keys are SERVING only while the replica reads the
    // event log (see `vouching_services`); the others, and "" (liveness), stay SERVING:
    // a replica that cannot reach its database is not one to restart.
    let vouching = vouching_services(settings);
    for name in reported_services(settings) {
        if !vouching.contains(&name) {
            health_reporter
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
    }
    let reflection_v1 = reflection(settings).build_v1()?;
    // grpcurl and Python's grpcio reflection client speak only v1alpha.
    let reflection_v1alpha = reflection(settings).build_v1alpha()?;
    follow_freshness(&health_reporter, &vouching, hub.freshness().vouching()).await;
    tokio::spawn(report_freshness(
        health_reporter.clone(),
        vouching,
        hub.clone(),
    ));
    let max = settings.transport.max_message_bytes;
    let tokens = &settings.tokens;
    let role = |role| RequireRole::new(tokens.clone(), role);
    let ext_authz = settings.ext_authz.enabled.then(|| {
        InterceptedService::new(
            AuthorizationServer::new(ExtAuthzApi::new(
                services.verifier.clone(),
                settings.ext_authz.clone(),
            ))
            .max_decoding_message_size(max),
            role(Role::Verifier),
        )
    });
    // Connect calls (JSON or binary over HTTP/1.1 or 2) become the gRPC calls they stand
    // for before anything else sees them, so the same metrics, spans and services serve
    // both.
    let router = transport(settings)?
        .accept_http1(true)
        .layer(tower::util::option_layer(cors(&settings.connect)))
        .layer(ConnectLayer::new(
            rpcs,
            max,
            settings.connect.enabled,
            settings.transport.request_timeout,
        ))
        .layer(RpcLayer::new(metrics.clone()))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let served = Served::new(router)
        .add(InterceptedService::new(
            KeyServiceServer::new(KeyApi::new(services.lifecycle)).max_decoding_message_size(max),
            role(Role::Admin),
        ))
        .add(InterceptedService::new(
            TeamServiceServer::new(TeamApi::new(services.teams)).max_decoding_message_size(max),
            role(Role::Admin),
        ))
        .add(InterceptedService::new(
            AccessGroupServiceServer::new(AccessGroupApi::new(services.access_groups))
                .max_decoding_message_size(max),
            role(Role::Admin),
        ))
        .add(InterceptedService::new(
            ProviderKeyServiceServer::new(ProviderKeyApi::new(services.provider_keys))
                .max_decoding_message_size(max),
            Authenticate::new(tokens.clone()),
        ))
        .add(InterceptedService::new(
            WorkspaceServiceServer::new(WorkspaceApi::new(services.workspaces))
                .max_decoding_message_size(max),
            role(Role::Admin),
        ))
        .add(InterceptedService::new(
            UsageServiceServer::new(UsageApi::new(services.usage_reports, services.clock))
                .max_decoding_message_size(max),
            role(Role::Admin),
        ))
        .add(InterceptedService::new(
            WebhookServiceServer::new(WebhookApi::new(services.webhooks))
                .max_decoding_message_size(max),
            // Each method checks the admin role itself (`auth::require`).
            Authenticate::new(tokens.clone()),
        ))
        .add(InterceptedService::new(
            VerifyServiceServer::new(VerifyApi::new(services.verifier))
                .max_decoding_message_size(max),
            role(Role::Verifier),
        ))
        .add(InterceptedService::new(
            RevocationServiceServer::new(RevocationApi::new(hub.clone()))
                .max_decoding_message_size(max),
            role(Role::Edge),
        ));
    let served = match ext_authz {
        Some(ext_authz) => served.add(ext_authz),
        None => served,
    };
    let mut reported = reported_services(settings);
    let mut serving = served.names.clone();
    reported.sort_unstable();
    serving.sort_unstable();
    if reported != serving {
        return Err(StartError::Services { reported, serving });
    }
    Ok(served.router)
}

/// `/metrics` on `at`, until the hub stops; returns the address bound.
async fn serve_metrics(
    at: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    refresh: Refresh,
    hub: &Arc<EventHub>,
) -> Result<std::net::SocketAddr, StartError> {
    let listener = TcpListener::bind(at).await?;
    let bound = listener.local_addr()?;
    // Histogram samples are held until folded: fold them every few seconds, so memory
    // stays flat whether or not anyone scrapes.
    tokio::spawn(
        metrics
            .clone()
            .keep_up(std::time::Duration::from_secs(5), hub.stopping()),
    );
    let mut stop = hub.stopping();
    tokio::spawn(async move {
        let stopped = async move {
            let _ = stop.changed().await;
        };
        if let Err(e) = metrics::serve(listener, metrics, refresh, stopped).await {
            tracing::error!(error = %e, "the metrics endpoint failed");
        }
    });
    tracing::info!(addr = %bound, "metrics on http://{bound}/metrics");
    Ok(bound)
}
