//! `keywarden serve` before its database is open.
//!
//! Why: a replica started while Postgres is down (a cluster restart, a failover, a deploy
//! that starts both at once) should wait for it, not exit. Orchestrators restart an exited
//! container with growing delays and count it as a crash; a container whose health answers
//! NOT_SERVING is kept out of the load balancer until it is ready, and restarted only if
//! its start-up probe gives up.
//!
//! So the port is bound first and a stand-in server answers on it: `grpc.health.v1`
//! NOT_SERVING for the server as a whole (`""`) and for each service the full server
//! reports, every other call UNAVAILABLE (`STORAGE_UNAVAILABLE`, retry in 1 s). Meanwhile
//! [`open_store`] tries to open the store (connect and migrate), again and again with
//! capped exponential backoff, logging each failure. Once the store is open,
//! [`Starting::serve`] builds the full server and starts it on the same socket (a
//! duplicate of the listening descriptor, so no connection is refused in between), then
//! the stand-in stops accepting and closes its connections gracefully (GOAWAY; its health
//! Watch streams end, so watchers ask again and reach the full server).
//!
//! Only failures that waiting can fix are retried ([`store::OpenError::is_transient`]); a bad
//! URL, a refused password or a rejected migration end the process at once.
//! `database_wait_at_start = false` makes the first failure final too, and `keywarden
//! migrate` never waits.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::api::error::refused;
use crate::clock::Clock;
use crate::config::Settings;
use crate::domain::refusal::{Reason, Refusal};
use crate::server::{self, RunningServer, StartError};
use crate::store::{self, Store};

/// The wait after the first failed attempt; each later wait doubles, up to
/// [`LONGEST_WAIT`]. An attempt on an unreachable Postgres itself lasts up to the pool's
/// acquire timeout (3 s), retrying connections within it.
const FIRST_WAIT: Duration = Duration::from_millis(100);
const LONGEST_WAIT: Duration = Duration::from_secs(5);

/// How long the stand-in's connections get to close once the full server accepts.
const STAND_IN_DRAIN: Duration = Duration::from_secs(5);

/// The port bound and answered by the stand-in, the store not open yet.
pub struct Starting {
    addr: SocketAddr,
    /// The handle the full server accepts on (the stand-in has a duplicate).
    listener: TcpListener,
    stand_in: StandIn,
}

struct StandIn {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Starting {
    /// Binds `settings.listen` and starts the stand-in on it.
    pub async fn bind(settings: &Settings) -> Result<Starting, StartError> {
        let listener = TcpListener::bind(settings.listen).await?;
        let addr = listener.local_addr()?;
        // Two descriptors of one listening socket: connections wait in its backlog for
        // whichever accepts, and the socket stays open while either does.
        let socket = listener.into_std()?;
        let for_stand_in = TcpListener::from_std(socket.try_clone()?)?;
        let listener = TcpListener::from_std(socket)?;

        let (stop, stopped) = watch::channel(false);
        let health = HealthServer::new(NotServing {
            services: server::reported_services(settings),
            stopped: stopped.clone(),
        });
        let router = server::transport(settings)?
            .layer(UnavailableLayer)
            .add_service(health);
        let mut stopping = stopped;
        let task = tokio::spawn(router.serve_with_incoming_shutdown(
            server::incoming(for_stand_in, settings),
            async move {
                let _ = stopping.wait_for(|stop| *stop).await;
            },
        ));
        tracing::info!(%addr, "listening; health answers NOT_SERVING until the database is open");
        Ok(Starting {
            addr,
            listener,
            stand_in: StandIn { stop, task },
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Builds the full server over `store` and starts it on the bound port, then ends the
    /// stand-in (also when the full server fails to start).
    pub async fn serve(
        self,
        settings: &Settings,
        store: Arc<dyn Store>,
        clock: Clock,
    ) -> Result<RunningServer, StartError> {
        let running = server::serve_on(settings, store, clock, self.listener).await;
        self.stand_in.end().await;
        running
    }

    /// Ends the stand-in without starting the full server (shutdown while waiting).
    pub async fn shutdown(self) {
        self.stand_in.end().await;
    }
}

impl StandIn {
    async fn end(self) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        match tokio::time::timeout(STAND_IN_DRAIN, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the start-up stand-in server failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "the start-up stand-in server task failed"),
            Err(_) => {
                tracing::warn!(
                    "connections to the start-up stand-in still open after {STAND_IN_DRAIN:?}; left to close"
                );
                task.abort();
            }
        }
    }
}

/// Opens the configured store, running its migrations. With `database_wait_at_start`
/// (the default), a failure that waiting can fix is logged and retried after a wait that
/// doubles from 100 ms to 5 s, for as long as it takes (the caller stops waiting on
/// shutdown by dropping the future); any other failure is returned.
pub async fn open_store(settings: &Settings) -> Result<Arc<dyn Store>, StartError> {
    let mut wait = FIRST_WAIT;
    let mut attempt: u32 = 1;
    loop {
        match store::open(
            settings.database_url.expose_secret(),
            settings.database_max_connections,
        )
        .await
        {
            Ok(store) => {
                if attempt > 1 {
                    tracing::info!(attempt, "the database is open");
                }
                return Ok(store);
            }
            Err(e) if settings.database_wait_at_start && e.is_transient() => {
                tracing::warn!(
                    error = %e,
                    attempt,
                    retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    "the database is not available yet; trying again"
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(LONGEST_WAIT);
                attempt = attempt.saturating_add(1);
            }
            Err(e) => return Err(StartError::from(e)),
        }
    }
}

/// The stand-in's health service: NOT_SERVING for the server and each service the full
/// server reports (NOT_FOUND for any other name, as the full server answers); a Watch
/// stream sends NOT_SERVING and ends when the stand-in stops.
struct NotServing {
    services: Vec<&'static str>,
    stopped: watch::Receiver<bool>,
}

impl NotServing {
    fn known(&self, service: &str) -> Result<(), Status> {
        if service.is_empty() || self.services.contains(&service) {
            Ok(())
        } else {
            Err(Status::not_found("service not registered"))
        }
    }
}

fn not_serving() -> HealthCheckResponse {
    HealthCheckResponse {
        status: ServingStatus::NotServing as i32,
    }
}

type WatchStream =
    Pin<Box<dyn futures::Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Health for NotServing {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.known(&request.get_ref().service)?;
        Ok(Response::new(not_serving()))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        self.known(&request.get_ref().service)?;
        let mut stopped = self.stopped.clone();
        let until_stopped = futures::stream::once(async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        })
        .filter_map(|()| std::future::ready(None));
        let stream =
            futures::stream::once(std::future::ready(Ok(not_serving()))).chain(until_stopped);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Answers every call but health's UNAVAILABLE, without looking further into it.
#[derive(Clone, Copy)]
struct UnavailableLayer;

impl<S> tower::Layer<S> for UnavailableLayer {
    type Service = Unavailable<S>;

    fn layer(&self, inner: S) -> Unavailable<S> {
        Unavailable { inner }
    }
}

#[derive(Clone)]
struct Unavailable<S> {
    inner: S,
}

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

impl<S, B, R> tower::Service<http::Request<B>> for Unavailable<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path().starts_with(HEALTH_PREFIX) {
            return Box::pin(self.inner.call(request));
        }
        let status = refused(Refusal::new(
            Reason::StorageUnavailable,
            "this replica is starting and its database is not available yet; retry later",
        ));
        Box::pin(std::future::ready(Ok(status.into_http())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OpenError;

    fn transient(e: sqlx::Error) -> bool {
        OpenError::Store(store::StoreError::from(e)).is_transient()
    }

    #[test]
    fn only_failures_that_waiting_can_fix_are_waited_for() {
        let refused = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(transient(sqlx::Error::Io(refused())));
        assert!(transient(sqlx::Error::PoolTimedOut));
        assert!(
            OpenError::Store(store::StoreError::Migrate(
                sqlx::migrate::MigrateError::Execute(sqlx::Error::Io(refused()))
            ))
            .is_transient()
        );
        assert!(!OpenError::UnknownScheme.is_transient());
        assert!(!transient(sqlx::Error::Configuration("bad url".into())));
        assert!(
            !OpenError::Store(store::StoreError::Migrate(
                sqlx::migrate::MigrateError::VersionMismatch(3)
            ))
            .is_transient()
        );
    }
}
