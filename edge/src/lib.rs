//! The edge client library: [`Verifier`] answers VerifyKey from a local cache that the
//! revocation stream keeps coherent.
//!
//! An edge node (a gateway, a sidecar) verifies every request it serves. Asking Keywarden
//! each time costs a round trip; caching the answers is only safe if every revoke,
//! rotation, update and deletion reaches the cache at once. [`Verifier::connect`] starts
//! a background task that follows `RevocationService.WatchRevocations` and drops what
//! each event makes stale; [`Verifier::verify`] wraps `VerifyService.VerifyKey` with the
//! cache.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use keywarden_edge::{EdgeConfig, Verifier};
//!
//! let config = EdgeConfig::new("kwt_verifier...", "kwt_edge...");
//! let verifier = Verifier::connect_to("http://127.0.0.1:50051", config)?;
//! let answer = verifier.verify("kw_live_...", &["read".to_owned()]).await?;
//! if answer.valid { /* serve the request */ }
//! println!("{:?}", verifier.lag());
//! verifier.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # What is cached, and for how long
//!
//! - The cache key is the SHA-256 of the presented key ([`KeyHash::of`]) plus what else
//!   the answer depends on: the sorted, deduplicated required scopes, the resource and
//!   the client address ([`Verifier::verify_request`]). The plaintext key is never
//!   stored, logged or printed. A request the server would refuse (the same checks as
//!   VerifyKey's) bypasses the cache, so the caller gets the server's `INVALID_ARGUMENT`.
//! - Answers about a key that exists (`VALID`, `REVOKED`, `EXPIRED`,
//!   `INSUFFICIENT_SCOPE`, `RESOURCE_FORBIDDEN`, `IP_FORBIDDEN`) are cached until an event about the key drops them, for at
//!   most [`EdgeConfig::cache_ttl`] (a backstop), and never past the key's `expires_at`:
//!   an answer about a key that expires within [`EXPIRY_SLACK`] is not served from the
//!   cache, whatever its code (so a modest clock skew between the edge and the server
//!   cannot keep an expired key valid).
//! - `NOT_FOUND` and `MALFORMED` are cached by key hash for
//!   [`EdgeConfig::negative_ttl`] (default 5 s; zero disables), in a separate bounded
//!   map so a flood of invented keys cannot evict real answers. No event ever concerns
//!   them, but neither can ever change in practice: a new secret is 190 random bits, so
//!   a hash that matched nothing (or a deleted key, or a rotated-out secret) stays
//!   unmatched; `MALFORMED` depends only on the key's text and the server's brand.
//! - Errors (`INVALID_ARGUMENT`, `UNAVAILABLE`, ...) are never cached.
//! - A `VALID` answer that carries a rate-limit decision is cached, but served only from
//!   a quota lease for the key (below), which counts each call against the key's limits
//!   as the server would.
//! - A `VALID` answer that carries a budget (spend is reported after the call, and judged
//!   on the server), or a token window (counted when usage is reported, which a lease
//!   cannot foresee), or that is marked `rate_limit_unknown` (passed while the server's
//!   counters were unreachable), is never cached: each call must be judged on the server.
//!   A pool's request window (an owner's, a team's or a workspace's limit) is leased
//!   with the key's own: the server grants what every counter has room for.
//!   `RATE_LIMITED` and `BUDGET_EXCEEDED` are not cached either.
//! - A rotated-out secret's grace period ends on the server's clock; the edge learns of
//!   it from the event the server's grace sweeper sends (`events.grace_sweep_interval_ms`,
//!   1 s by default), so it may accept the old secret that much longer.
//! - With [`EdgeConfig::workspace`] set, the stream carries only that workspace's
//!   events, so only answers about that workspace's keys are cached; other keys are
//!   verified by the server every time.
//!
//! # Quota leases
//!
//! With [`EdgeConfig::leases`] (the default), the edge answers rate-limited keys with no
//! round trip: it leases quota from the server (`VerifyService.LeaseQuota`) and admits
//! calls from it, as a replica does from Redis (see [`keywarden_domain::lease`]).
//!
//! - The first call of a key goes to VerifyKey as always; when its answer is `VALID` with
//!   a decision and is cached, a background task asks for a lease for the key (by key id
//!   and key hash; several keys' asks and settlements go in one call). Later calls with a
//!   cached answer are admitted from the lease while it has room for their cost: the
//!   answer is the cached one with the lease's figures (the grant's, with what is left
//!   of the lease given back to `remaining`, so `X-RateLimit-Remaining` counts down, and
//!   is exact while the edge is the key's only user).
//! - A lease is used for at most its life (the server's `rate_limits.edge_lease_ms`, 2 s
//!   by default), timed on the monotonic clock from when the edge *sent* the ask: the
//!   server counted it until then or later, so every call admitted from it is counted
//!   in every window it falls in. A refill is asked ahead while the key is in use (when
//!   what is left covers less than half a life at the rate seen, or a third of the life
//!   is left); its size follows the key's demand, capped at half the tightest limit.
//! - A call that finds no room while a grant is on its way waits for it (at most
//!   500 ms); otherwise (no lease, or refused until the call could pass) it goes to
//!   VerifyKey, which counts it exactly. Nothing is ever admitted that no one counted.
//! - What a lease did not use is given back (settled) in the next LeaseQuota call: when
//!   it expires, when a refill replaces it, and when it is dropped. Leases are dropped
//!   on any event about the key, on a flush or reset, when the stream is lost (every
//!   call then goes to the server, as for any answer), and at shutdown. A grant that
//!   raced any of those is given back unused (the fills' generation guard). A settlement
//!   lost to a failed call leaves the lease counted until it leaves its window: quota
//!   parked, never over-admitted.
//! - A server with leases off (`QUOTA_LEASES_DISABLED`), or one that does not know
//!   LeaseQuota, sends every rate-limited call to VerifyKey; the edge asks again a
//!   minute later.
//!
//! # Only while the stream is healthy
//!
//! The cache is served only while the stream is subscribed **and caught up**: after the
//! first heartbeat (or reset) of the current stream, which says every event up to the
//! log's head has been applied. While connecting, replaying, or disconnected, every
//! call goes to the server (correctness over speed), and nothing is cached; the cached
//! answers are kept (not served) so that a resume that replays the missed events can
//! bring them back into use. A stream that went silent for [`EdgeConfig::idle_timeout`]
//! (the server heartbeats every 10 s by default) counts as dead, which bounds how long a
//! half-open connection could keep stale answers in use.
//!
//! # The background task
//!
//! For each event it drops the answers for `key_hash`, for each of `stale_key_hashes`,
//! and for every hash it has cached under the event's `key_id` (an index kept at fill
//! time); a `reset` flushes everything. It records the last seq (from events and from
//! heartbeats' `head_seq`) and, when a stream ends for any reason, reconnects with
//! exponential backoff and jitter ([`EdgeConfig::backoff_min`] doubling up to
//! [`EdgeConfig::backoff_max`]) and resumes with `after_seq` = that seq, so no event is
//! lost. When it cannot prove the gap is covered — the server answers `reset`, or it
//! has no seq to resume from and must start "from now" — it flushes the cache before
//! serving it again.
//!
//! A verify that misses takes a fill ticket (a generation) before calling the server,
//! and its answer is cached only if no event, flush or disconnection happened in the
//! meantime (the same guard as the server's own cache, [`crate::cache`]): an answer
//! fetched before a revoke can never be written back after the revoke dropped it. The
//! generation is one for the whole cache (an event names a key id and hashes, while a
//! fill only learns its key id from the answer), so any event makes every fill then in
//! flight lose: a few extra server calls, as events are rare next to verifies.
//!
//! # Replicas
//!
//! The stream and the VerifyKey calls share the [`Channel`], so with one endpoint (or
//! an L4 load balancer) they reach the same replica, whose own cache is invalidated
//! before it forwards an event. Behind a per-request (L7) balancer a verify may reach a
//! replica that has not yet applied an event the edge already has; the answer would then
//! be cached stale until the TTL. Point edge nodes at one connection, or keep the TTL
//! short.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quick_cache::sync::Cache;
use quick_cache::{UnitWeighter, Weighter};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use fill::{FillGuard, FillTicket};
use front::Fronts;
use keywarden_domain::key;
use keywarden_domain::key_format::KeyHash;
use keywarden_domain::validate::Violations;
use keywarden_proto as proto;
use keywarden_proto::Bearer;
use keywarden_proto::revocation_service_client::RevocationServiceClient;
use keywarden_proto::verify_service_client::VerifyServiceClient;
use keywarden_proto::watch_revocations_response::Message;
use maps::Hasher;

pub mod fill;
mod front;
mod leases;
pub mod maps;
pub use leases::RateLimitFigures;
use leases::{Admit, Figures, LeaseBook, LeaseCell, Reserve, lease_cap};

/// An answer as [`Verifier::check`] gives it.
#[derive(Clone, Debug)]
pub struct Checked {
    /// The answer, shared with the cache when it came from there. Its `rate_limit` is
    /// the decision it was cached with: read this call's in [`Checked::rate_limit`].
    pub response: Arc<proto::VerifyKeyResponse>,
    /// This call's rate-limit figures (the tightest window), for `X-RateLimit-Limit`,
    /// `-Remaining` and `-Reset`; `None` for a key without limits (or one whose decision
    /// is unknown: see `rate_limit_unknown`).
    pub rate_limit: Option<RateLimitFigures>,
}

impl Checked {
    pub fn valid(&self) -> bool {
        self.response.valid
    }
}

/// One look at the cache ([`Verifier::try_cached`]).
enum Lookup<T> {
    /// The cached answer, and what the call's admission from a lease made of its figures.
    Served(Arc<proto::VerifyKeyResponse>, Option<T>),
    /// The key's lease is spent and a grant is on its way: worth waiting for.
    Wait,
    /// Nothing the cache may answer: the server's turn.
    Miss,
}

/// An answer about a key that expires within this much is not served from the cache.
pub const EXPIRY_SLACK: Duration = Duration::from_secs(1);

/// The most asks one LeaseQuota call carries (the server's bound).
const MAX_LEASE_ASKS: usize = 1000;

/// How long a call that found its key's lease spent waits for the grant on its way
/// before it goes to the server instead.
const LEASE_WAIT: Duration = Duration::from_millis(500);

/// A LeaseQuota call that has not answered by then is abandoned (nothing installed; the
/// server counts what it granted until it leaves its window).
const LEASE_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// How often expired leases are looked for (and settled).
const LEASE_SWEEP: Duration = Duration::from_millis(100);

/// After a server said it leases nothing (`QUOTA_LEASES_DISABLED`, or a server that does
/// not know LeaseQuota), no ask for this long.
const LEASES_OFF_FOR: Duration = Duration::from_secs(60);

/// Distinct answer keys (scope set, resource, client address) cached per key hash; more
/// start the key's set afresh.
const MAX_SCOPE_SETS_PER_KEY: usize = 32;

/// How an edge node reaches Keywarden and sizes its cache.
#[derive(Clone)]
pub struct EdgeConfig {
    /// A caller token with the `verifier` role (VerifyService).
    pub verifier_token: SecretString,
    /// A caller token with the `edge` role (RevocationService).
    pub edge_token: SecretString,
    /// Answers about existing keys kept at most (one per key hash and scope set).
    pub cache_capacity: u64,
    /// The longest an answer about an existing key is kept; a backstop, as events drop
    /// answers as soon as they go stale.
    pub cache_ttl: Duration,
    /// How long `NOT_FOUND` and `MALFORMED` answers are kept; zero caches none.
    pub negative_ttl: Duration,
    /// The first reconnection delay; doubles up to `backoff_max` (with jitter: each
    /// delay is drawn between half and all of the current step).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// A stream silent for this long is dropped and resumed. Must exceed the server's
    /// heartbeat interval (`events.heartbeat_seconds`, 10 s by default).
    pub idle_timeout: Duration,
    /// Follow only this workspace's events (and cache only its keys' answers).
    pub workspace: Option<String>,
    /// Lease quota (LeaseQuota) so that VALID answers of rate-limited keys are served
    /// from the cache; off: every such call goes to the server.
    pub leases: bool,
}

impl EdgeConfig {
    /// The defaults: 100 000 answers for at most 5 minutes, negative answers for 5 s,
    /// reconnecting after 100 ms doubling up to 10 s, a stream silent for 30 s is dead.
    pub fn new(verifier_token: impl Into<String>, edge_token: impl Into<String>) -> Self {
        EdgeConfig {
            verifier_token: SecretString::from(verifier_token.into()),
            edge_token: SecretString::from(edge_token.into()),
            cache_capacity: 100_000,
            cache_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            workspace: None,
            leases: true,
        }
    }

    fn check(&self) -> Result<(), EdgeError> {
        if self.backoff_min.is_zero() || self.backoff_min > self.backoff_max {
            return Err(EdgeError::Config(
                "backoff_min must be non-zero and at most backoff_max".into(),
            ));
        }
        if self.idle_timeout.is_zero() {
            return Err(EdgeError::Config("idle_timeout must be non-zero".into()));
        }
        if let Some(workspace) = &self.workspace {
            let mut v = Violations::default();
            v.workspace_id("workspace", workspace);
            if let Some(violation) = v.0.first() {
                return Err(EdgeError::Config(format!(
                    "workspace {}",
                    violation.description
                )));
            }
        }
        Ok(())
    }
}

impl fmt::Debug for EdgeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EdgeConfig")
            .field("verifier_token", &"[redacted]")
            .field("edge_token", &"[redacted]")
            .field("cache_capacity", &self.cache_capacity)
            .field("cache_ttl", &self.cache_ttl)
            .field("negative_ttl", &self.negative_ttl)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("idle_timeout", &self.idle_timeout)
            .field("workspace", &self.workspace)
            .field("leases", &self.leases)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("invalid edge configuration: {0}")]
    Config(String),
    #[error("invalid endpoint: {0}")]
    Endpoint(#[from] tonic::transport::Error),
    #[error("the edge Verifier must be started from within a Tokio runtime")]
    NoRuntime,
}

/// How far behind the revocation stream the edge is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgeLag {
    /// The last seq applied (from events, heartbeats and resets).
    pub last_seq: i64,
    /// The log's head as last reported by the server (never below `last_seq`).
    pub head_seq: i64,
    /// Since the last message of any kind (or since the start, before the first).
    pub since_last_message: Duration,
    /// Subscribed and caught up: the cache is in use.
    pub connected: bool,
}

/// Counters since [`Verifier::connect`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdgeStats {
    /// Verifies answered from the cache.
    pub hits: u64,
    /// Verifies not answered from the cache (each is a server call).
    pub misses: u64,
    /// VerifyKey calls made to the server.
    pub server_calls: u64,
    /// Answers written to the cache.
    pub fills: u64,
    /// Events applied.
    pub events: u64,
    /// Whole-cache flushes (resets, and streams started "from now").
    pub flushes: u64,
    /// `reset` messages received.
    pub resets: u64,
    /// Streams opened (the first one and every reconnection).
    pub streams: u64,
    /// Hits of rate-limited keys admitted from a quota lease (counted in `hits` too).
    pub leased: u64,
    /// LeaseQuota calls made (asks and settlements, batched).
    pub lease_calls: u64,
}

/// `authorization: Bearer <token>`, marked sensitive so that it is never logged or
/// indexed by HPACK.
fn bearer(token: &SecretString, which: &str) -> Result<Bearer, EdgeError> {
    Bearer::sensitive(token.expose_secret())
        .map_err(|_| EdgeError::Config(format!("{which} is not a valid header value")))
}

type VerifyClient = VerifyServiceClient<InterceptedService<Channel, Bearer>>;
type WatchClient = RevocationServiceClient<InterceptedService<Channel, Bearer>>;

/// A verifier for edge nodes: VerifyKey with a cache kept coherent by the revocation
/// stream. See the [module documentation](self) for what is cached and when.
///
/// Dropping it stops the background task; [`Verifier::shutdown`] also waits for it.
pub struct Verifier {
    shared: Arc<Shared>,
    client: VerifyClient,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
    /// The lease task stops after the stream's, so that it settles what the stream's
    /// end dropped.
    lease_stop: watch::Sender<bool>,
    lease_task: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("lag", &self.lag())
            .field("stats", &self.stats())
            .finish()
    }
}

impl Verifier {
    /// Starts following the revocation stream over `channel` (in the background: this
    /// returns at once, and verifies go to the server until the stream has caught up).
    /// Must be called from within a Tokio runtime.
    pub fn connect(channel: Channel, config: EdgeConfig) -> Result<Verifier, EdgeError> {
        config.check()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| EdgeError::NoRuntime)?;
        let verify_auth = bearer(&config.verifier_token, "verifier_token")?;
        let edge_auth = bearer(&config.edge_token, "edge_token")?;
        let shared = Arc::new(Shared::new(&config));
        let (stop, stopped) = watch::channel(false);
        let task = runtime.spawn(follow(
            shared.clone(),
            RevocationServiceClient::with_interceptor(channel.clone(), edge_auth),
            stopped,
        ));
        let client = VerifyServiceClient::with_interceptor(channel, verify_auth);
        let (lease_stop, lease_stopped) = watch::channel(false);
        let lease_task = config
            .leases
            .then(|| runtime.spawn(lease(shared.clone(), client.clone(), lease_stopped)));
        Ok(Verifier {
            shared,
            client,
            stop,
            task: Mutex::new(Some(task)),
            lease_stop,
            lease_task: Mutex::new(lease_task),
        })
    }

    /// [`Verifier::connect`] over a channel to `url` (e.g. `http://127.0.0.1:50051`),
    /// connected lazily: the edge starts even while the server is down.
    pub fn connect_to(url: &str, config: EdgeConfig) -> Result<Verifier, EdgeError> {
        tokio::runtime::Handle::try_current().map_err(|_| EdgeError::NoRuntime)?;
        let channel = Endpoint::from_shared(url.to_owned())?.connect_lazy();
        Verifier::connect(channel, config)
    }

    /// Verifies `key` for a request needing `required_scopes`: from the cache when the
    /// stream is healthy and the answer is there, from the server otherwise. Errors are
    /// the server's (never cached).
    pub async fn verify(
        &self,
        key: &str,
        required_scopes: &[String],
    ) -> Result<proto::VerifyKeyResponse, Status> {
        self.verify_request(proto::VerifyKeyRequest {
            key: key.to_owned(),
            required_scopes: required_scopes.to_vec(),
            ..Default::default()
        })
        .await
    }

    /// [`Verifier::verify`] with the whole of VerifyKey's request: the resource (a model)
    /// and the client address the key's access policy judges, and the cost a rate-limit
    /// decision counts (from the key's quota lease when its answer is cached, else on
    /// the server).
    pub async fn verify_request(
        &self,
        request: proto::VerifyKeyRequest,
    ) -> Result<proto::VerifyKeyResponse, Status> {
        let hash = KeyHash::of(&request.key);
        // A request the server would refuse (INVALID_ARGUMENT) bypasses the cache, so
        // that the caller gets the server's error rather than a cached answer.
        let checked = answer_key(&request);
        if let Some((scopes, cost)) = &checked
            && let Some((response, decision)) = self
                .cached_answer(&hash, scopes, *cost, |f| f.decision())
                .await
        {
            let mut response = Arc::unwrap_or_clone(response);
            if let Some(decision) = decision {
                response.rate_limit = Some(decision);
            }
            return Ok(response);
        }
        Box::pin(self.fetch(request, hash, checked.map(|(scopes, _)| scopes))).await
    }

    /// [`Verifier::verify`] for a gateway that reads the answer rather than owning a copy
    /// of it: a cached answer comes shared with the cache (nothing of it is copied), and
    /// the rate-limit decision of this call as the figures its `X-RateLimit-*` headers
    /// carry. The same answers as `verify`, decided the same way; a call the cache
    /// cannot answer goes to the server.
    pub async fn check(&self, key: &str, required_scopes: &[String]) -> Result<Checked, Status> {
        let hash = KeyHash::of(key);
        // The usual call names no scope: nothing to parse.
        let scopes = if required_scopes.is_empty() {
            Some(AnswerKey::default())
        } else {
            scopes_key(required_scopes)
        };
        if let Some(scopes) = &scopes
            && let Some((response, admitted)) =
                self.cached_answer(&hash, scopes, 1, |f| f.figures()).await
        {
            let rate_limit = admitted.or_else(|| response.rate_limit.as_ref().map(figures_of));
            return Ok(Checked {
                response,
                rate_limit,
            });
        }
        let request = proto::VerifyKeyRequest {
            key: key.to_owned(),
            required_scopes: required_scopes.to_vec(),
            ..Default::default()
        };
        // Boxed: the server call's state would otherwise make every call's future (the
        // cached ones too) as large as its own, and copying that costs a hit its time.
        let response = Box::pin(self.fetch(request, hash, scopes)).await?;
        Ok(Checked {
            rate_limit: response.rate_limit.as_ref().map(figures_of),
            response: Arc::new(response),
        })
    }

    /// A call the cache did not answer: to the server, and its answer into the cache
    /// (when `scopes`, the request's answer key, allows it).
    async fn fetch(
        &self,
        request: proto::VerifyKeyRequest,
        hash: KeyHash,
        scopes: Option<AnswerKey>,
    ) -> Result<proto::VerifyKeyResponse, Status> {
        let shared = &self.shared;
        shared.stats.misses.fetch_add(1, Ordering::Relaxed);
        let ticket = scopes
            .is_some()
            .then(|| shared.cache.begin_fill())
            .flatten();
        shared.stats.server_calls.fetch_add(1, Ordering::Relaxed);
        let response = self.client.clone().verify_key(request).await?.into_inner();
        let filled = match (ticket, scopes) {
            (Some(ticket), Some(scopes)) => {
                shared.cache.complete_fill(ticket, hash, scopes, &response)
            }
            _ => false,
        };
        if filled {
            shared.stats.fills.fetch_add(1, Ordering::Relaxed);
            // A VALID answer with a decision is cached, but served only from a lease:
            // make sure one is on its way.
            if let Some(cap) = response.rate_limit.as_ref().and_then(lease_cap) {
                shared.cache.want_lease(&response.key_id, hash, cap);
            }
        }
        Ok(response)
    }

    /// The cached answer, if any may be served: an answer that needs a lease is served
    /// only when the key's lease admits `cost` (with what `answer` makes of the lease's
    /// figures). A call that finds the lease spent while a grant is on its way waits for
    /// it (at most [`LEASE_WAIT`]), as that costs no more than the server call it would
    /// make.
    async fn cached_answer<T>(
        &self,
        hash: &KeyHash,
        scopes: &AnswerKey,
        cost: u64,
        answer: impl Fn(Figures<'_>) -> T,
    ) -> Option<(Arc<proto::VerifyKeyResponse>, Option<T>)> {
        match self.try_cached(hash, scopes, cost, true, &answer) {
            Lookup::Served(response, admitted) => Some((response, admitted)),
            Lookup::Miss => None,
            // Boxed, like the server call: only a call that waits pays for its state.
            Lookup::Wait => Box::pin(self.wait_cached(hash, scopes, cost, &answer)).await,
        }
    }

    /// One look at the cache, with no wait: `first`, the call's first turn (its demand
    /// is counted once, and the lease's cell may admit it with no lock).
    fn try_cached<T>(
        &self,
        hash: &KeyHash,
        scopes: &AnswerKey,
        cost: u64,
        first: bool,
        answer: &impl Fn(Figures<'_>) -> T,
    ) -> Lookup<T> {
        let cache = &self.shared.cache;
        // One clock read per look, for the answer's freshness and the lease's life alike.
        let now = Instant::now();
        // Read before anything is looked at (see `front`).
        let generation = cache.fronts.generation();
        // The usual call (no scope, resource or address named) is answered from this
        // thread's front when it can be.
        let usual = first && scopes.is_usual();
        if usual
            && let Some(served) = cache.fronts.with(generation, |front| {
                self.front_answer(front.get_mut(hash)?, cost, now, answer)
            })
        {
            return served;
        }
        let Some(hit) = cache.lookup(hash, scopes, now) else {
            return Lookup::Miss;
        };
        if usual && let Some(found) = &hit.found {
            cache.fronts.with(generation, |front| {
                // Copied in when the front has no copy, or one of an entry since replaced
                // (a refill after the TTL, a lease slot made afresh for an idle key): a
                // copy of the entry in place is kept, and its reserve with it.
                if front
                    .get_mut(hash)
                    .is_none_or(|f| !Arc::ptr_eq(&f.entry, &found.entry))
                {
                    front.insert(
                        *hash,
                        FrontAnswer {
                            // This thread's own copy: see `front`.
                            response: Arc::new(proto::VerifyKeyResponse::clone(&hit.response)),
                            fresh_until: found.fresh_until,
                            leased: found.leased,
                            lease: found.entry.lease.clone(),
                            entry: found.entry.clone(),
                            reserve: None,
                        },
                    );
                }
            });
        }
        let Some(entry) = hit.found.filter(|f| f.leased).map(|f| f.entry) else {
            self.shared.stats.hits.add(1);
            return Lookup::Served(hit.response, None);
        };
        // The lease's count, with no lock; the book's way when it has no room.
        if first
            && let Some((admitted, ask)) = entry
                .lease
                .as_ref()
                .and_then(|l| l.admit_with(cost, now, answer))
        {
            if ask {
                cache.ask_ahead(&entry.key_id, now);
            }
            self.shared.stats.leased.add(1);
            return Lookup::Served(hit.response, Some(admitted));
        }
        match cache.admit(&entry.key_id, cost, first, now) {
            Admit::Served(admitted) => {
                self.shared.stats.leased.add(1);
                Lookup::Served(hit.response, Some(answer(admitted.figures_of())))
            }
            Admit::Wait => Lookup::Wait,
            Admit::NotLeased => Lookup::Miss,
        }
    }

    /// The answer of this thread's front, if it may be served with no lock: a lease that
    /// has no room for the call sends it the shared way.
    fn front_answer<T>(
        &self,
        front: &mut FrontAnswer,
        cost: u64,
        now: Instant,
        answer: &impl Fn(Figures<'_>) -> T,
    ) -> Option<Lookup<T>> {
        if now >= front.fresh_until {
            return None;
        }
        if !front.leased {
            self.shared.stats.hits.add(1);
            return Some(Lookup::Served(front.response.clone(), None));
        }
        let (admitted, ask) =
            front
                .lease
                .as_ref()?
                .admit_reserved(&mut front.reserve, cost, now, answer)?;
        if ask {
            self.shared.cache.ask_ahead(&front.entry.key_id, now);
        }
        self.shared.stats.leased.add(1);
        Some(Lookup::Served(front.response.clone(), Some(admitted)))
    }

    /// A call whose first look found its key's lease spent with a grant on its way: it
    /// looks again as each batch of grants lands, until [`LEASE_WAIT`] has passed.
    async fn wait_cached<T>(
        &self,
        hash: &KeyHash,
        scopes: &AnswerKey,
        cost: u64,
        answer: &impl Fn(Figures<'_>) -> T,
    ) -> Option<(Arc<proto::VerifyKeyResponse>, Option<T>)> {
        // Watched from before the next look, so that a grant installed in between is
        // not missed.
        let mut grants = self.shared.cache.batches.subscribe();
        let until = tokio::time::Instant::from_std(Instant::now() + LEASE_WAIT);
        loop {
            // Looked up again: an event meanwhile may have dropped it.
            match self.try_cached(hash, scopes, cost, false, answer) {
                Lookup::Served(response, admitted) => return Some((response, admitted)),
                Lookup::Miss => return None,
                Lookup::Wait => {}
            }
            if tokio::time::timeout_at(until, grants.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Where the stream stands.
    pub fn lag(&self) -> EdgeLag {
        let shared = &self.shared;
        let last_seq = shared.last_seq.load(Ordering::SeqCst);
        EdgeLag {
            last_seq,
            head_seq: shared.head_seq.load(Ordering::SeqCst).max(last_seq),
            since_last_message: lock(&shared.last_message).elapsed(),
            connected: shared.cache.serving(),
        }
    }

    pub fn stats(&self) -> EdgeStats {
        let s = &self.shared.stats;
        EdgeStats {
            hits: s.hits.sum() + s.leased.sum(),
            misses: s.misses.load(Ordering::Relaxed),
            server_calls: s.server_calls.load(Ordering::Relaxed),
            fills: s.fills.load(Ordering::Relaxed),
            events: s.events.load(Ordering::Relaxed),
            flushes: s.flushes.load(Ordering::Relaxed),
            resets: s.resets.load(Ordering::Relaxed),
            streams: s.streams.load(Ordering::Relaxed),
            leased: s.leased.sum(),
            lease_calls: s.lease_calls.load(Ordering::Relaxed),
        }
    }

    /// Waits until the stream is subscribed and caught up (the cache in use), for at
    /// most `timeout`. Returns whether it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut serving = self.shared.cache.serving_tx.subscribe();
        matches!(
            tokio::time::timeout(timeout, serving.wait_for(|s| *s)).await,
            Ok(Ok(_))
        )
    }

    /// Stops the background tasks and waits for them, giving back what the quota leases
    /// held did not use. Verifies still work afterwards, but every one goes to the
    /// server.
    pub async fn shutdown(&self) {
        self.stop.send_replace(true);
        let task = lock(&self.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        self.shared.cache.set_serving(false);
        self.lease_stop.send_replace(true);
        let task = lock(&self.lease_task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// What an answer depends on besides the key (the cache key's second half): the
/// sorted, deduplicated required scopes, the resource and the client address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct AnswerKey {
    scopes: Box<[String]>,
    resource: Box<str>,
    client_ip: Option<IpAddr>,
}

impl AnswerKey {
    /// The usual call's: no scope, resource or address named.
    fn is_usual(&self) -> bool {
        self.scopes.is_empty() && self.resource.is_empty() && self.client_ip.is_none()
    }

    /// What the checked request's answer depends on: its scopes sorted and deduplicated.
    fn of(request: &key::Request<'_>) -> Self {
        let mut scopes = request.required_scopes.to_vec();
        scopes.sort_unstable();
        scopes.dedup();
        AnswerKey {
            scopes: scopes.into_boxed_slice(),
            resource: request.resource.unwrap_or_default().into(),
            client_ip: request.client_ip,
        }
    }
}

/// The request's [`AnswerKey`] and cost, or `None` when the server would refuse the
/// request: VerifyKey's own checks ([`key::Request::parse`]).
fn answer_key(request: &proto::VerifyKeyRequest) -> Option<(AnswerKey, u64)> {
    let (parsed, cost) = key::Request::parse(
        &request.required_scopes,
        &request.resource,
        &request.client_ip,
        request.cost,
    )
    .ok()?;
    Some((AnswerKey::of(&parsed), cost))
}

/// The [`AnswerKey`] of a request naming only `required` scopes, or `None` when the
/// server would refuse them.
fn scopes_key(required: &[String]) -> Option<AnswerKey> {
    let (parsed, _) = key::Request::parse(required, "", "", 1).ok()?;
    Some(AnswerKey::of(&parsed))
}

/// The tightest window's figures of a decision, as the server chose it.
fn figures_of(d: &proto::RateLimitDecision) -> RateLimitFigures {
    RateLimitFigures {
        limit: d.limit,
        remaining: d.remaining,
        reset_at: d.reset_at,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it; what it
    // guards is always consistent here.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Default)]
struct Counters {
    /// Bumped by every cached answer not admitted from a lease (those bump `leased`
    /// alone: one count per call): striped, like `leased`.
    hits: Striped,
    misses: AtomicU64,
    server_calls: AtomicU64,
    fills: AtomicU64,
    events: AtomicU64,
    flushes: AtomicU64,
    resets: AtomicU64,
    streams: AtomicU64,
    leased: Striped,
    lease_calls: AtomicU64,
}

/// A counter bumped on the hot path from every thread: one cache line per stripe and
/// each thread on its own stripe, so that two cores counting calls do not pass one line
/// back and forth (a shared `AtomicU64` cost a cached answer about a tenth of its time).
#[derive(Default)]
struct Striped([Stripe; STRIPES]);

const STRIPES: usize = 16;

#[derive(Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

impl Striped {
    fn add(&self, n: u64) {
        thread_local! {
            static STRIPE: usize = {
                static NEXT: AtomicUsize = AtomicUsize::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES
            };
        }
        let stripe = STRIPE.with(|s| *s);
        self.0[stripe].0.fetch_add(n, Ordering::Relaxed);
    }

    fn sum(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

/// What the verifier and the background task share.
struct Shared {
    cache: EdgeCache,
    stats: Counters,
    last_seq: AtomicI64,
    head_seq: AtomicI64,
    last_message: Mutex<Instant>,
    workspace: Option<String>,
    backoff_min: Duration,
    backoff_max: Duration,
    idle_timeout: Duration,
}

impl Shared {
    fn new(config: &EdgeConfig) -> Self {
        Shared {
            cache: EdgeCache::new(config),
            stats: Counters::default(),
            last_seq: AtomicI64::new(0),
            head_seq: AtomicI64::new(0),
            last_message: Mutex::new(Instant::now()),
            workspace: config.workspace.clone(),
            backoff_min: config.backoff_min,
            backoff_max: config.backoff_max,
            idle_timeout: config.idle_timeout,
        }
    }

    fn flush(&self) {
        self.cache.flush();
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
    }

    fn apply_event(&self, event: &proto::KeyEvent) {
        let mut hashes = Vec::with_capacity(1 + event.stale_key_hashes.len());
        for hex_hash in std::iter::once(&event.key_hash).chain(&event.stale_key_hashes) {
            if hex_hash.is_empty() {
                continue;
            }
            match hex::decode(hex_hash)
                .ok()
                .and_then(|b| KeyHash::from_slice(&b))
            {
                Some(hash) => hashes.push(hash),
                None => {
                    // Cannot tell what to drop: drop everything.
                    tracing::warn!(
                        seq = event.seq,
                        "event with an unreadable key hash; flushing the edge cache"
                    );
                    self.flush();
                }
            }
        }
        self.cache.invalidate(&hashes, &event.key_id);
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        self.last_seq.fetch_max(event.seq, Ordering::SeqCst);
        self.head_seq.fetch_max(event.seq, Ordering::SeqCst);
    }
}

/// Why a stream ended.
enum StreamEnd {
    /// The call was refused, or the stream ended with a status.
    Status(Status),
    /// The server closed the stream without a status.
    Closed,
    /// Nothing arrived for `idle_timeout`.
    Silent,
    /// The verifier is stopping.
    Stopping,
}

/// The background task: follow the stream, and when it ends, back off and resume.
async fn follow(shared: Arc<Shared>, mut client: WatchClient, mut stop: watch::Receiver<bool>) {
    let mut step = shared.backoff_min;
    loop {
        if *stop.borrow() {
            break;
        }
        let (end, caught_up) = tokio::select! {
            outcome = subscribe(&shared, &mut client) => outcome,
            _ = stop.changed() => (StreamEnd::Stopping, false),
        };
        shared.cache.set_serving(false);
        match &end {
            StreamEnd::Stopping => break,
            StreamEnd::Status(status) => tracing::warn!(
                code = ?status.code(),
                message = status.message(),
                last_seq = shared.last_seq.load(Ordering::SeqCst),
                "revocation stream ended; the edge cache is bypassed until it resumes"
            ),
            StreamEnd::Closed => tracing::warn!(
                last_seq = shared.last_seq.load(Ordering::SeqCst),
                "revocation stream closed by the server; resuming"
            ),
            StreamEnd::Silent => tracing::warn!(
                last_seq = shared.last_seq.load(Ordering::SeqCst),
                idle_timeout = ?shared.idle_timeout,
                "revocation stream silent for too long; resuming"
            ),
        }
        if caught_up {
            // The stream worked: start the backoff over.
            step = shared.backoff_min;
        }
        let delay = jittered(step);
        step = step.saturating_mul(2).min(shared.backoff_max);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => break,
        }
    }
    shared.cache.set_serving(false);
}

/// The lease task: sends the queued asks and settlements as one LeaseQuota call when
/// woken (a call queued one, or an event dropped a lease), sweeps expired leases on a
/// short tick, and on stop sends what is left to settle.
async fn lease(shared: Arc<Shared>, mut client: VerifyClient, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(LEASE_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = shared.cache.lease_wake.notified() => false,
            _ = tick.tick() => false,
            _ = stop.changed() => true,
        };
        send_leases(&shared, &mut client).await;
        if stopping {
            break;
        }
    }
}

/// One round of LeaseQuota calls (more than one only past [`MAX_LEASE_ASKS`]).
async fn send_leases(shared: &Shared, client: &mut VerifyClient) {
    loop {
        // Taken before the asks: a grant that raced an event, a flush or a disconnection
        // is given back instead of installed.
        let ticket = shared.cache.begin_fill();
        let asks = shared.cache.take_lease_batch(ticket.is_some());
        if asks.is_empty() {
            return;
        }
        let full = asks.len() >= MAX_LEASE_ASKS;
        // Each lease is timed from here: the server starts its life no earlier.
        let asked_at = Instant::now();
        shared.stats.lease_calls.fetch_add(1, Ordering::Relaxed);
        let request = proto::LeaseQuotaRequest { asks: asks.clone() };
        match tokio::time::timeout(LEASE_CALL_TIMEOUT, client.lease_quota(request)).await {
            Ok(Ok(response)) => {
                shared
                    .cache
                    .install_leases(ticket, asked_at, &asks, &response.into_inner().grants);
            }
            Ok(Err(status)) => {
                let off = matches!(
                    status.code(),
                    tonic::Code::Unimplemented | tonic::Code::FailedPrecondition
                );
                tracing::warn!(
                    code = ?status.code(),
                    message = status.message(),
                    "LeaseQuota failed; rate-limited calls go to the server"
                );
                shared
                    .cache
                    .leases_failed(&asks, off.then_some(LEASES_OFF_FOR));
            }
            Err(_) => {
                tracing::warn!("LeaseQuota timed out; rate-limited calls go to the server");
                shared.cache.leases_failed(&asks, None);
            }
        }
        shared.cache.batches.send_modify(|n| *n = n.wrapping_add(1));
        if !full {
            return;
        }
    }
}

/// Half of `step` plus a random part of the other half.
fn jittered(step: Duration) -> Duration {
    let half = step / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    let random = getrandom::u64().unwrap_or(0);
    half + Duration::from_nanos(random.checked_rem(nanos.saturating_add(1)).unwrap_or(0))
}

/// One stream, from subscribing to its end. Returns why it ended and whether it had
/// caught up.
async fn subscribe(shared: &Shared, client: &mut WatchClient) -> (StreamEnd, bool) {
    let after_seq = shared.last_seq.load(Ordering::SeqCst);
    shared.stats.streams.fetch_add(1, Ordering::Relaxed);
    let request = proto::WatchRevocationsRequest {
        after_seq,
        workspace_id: shared.workspace.clone().unwrap_or_default(),
    };
    let mut stream =
        match tokio::time::timeout(shared.idle_timeout, client.watch_revocations(request)).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return (StreamEnd::Status(status), false),
            Err(_) => return (StreamEnd::Silent, false),
        };
    let mut caught_up = false;
    loop {
        let message = match tokio::time::timeout(shared.idle_timeout, stream.message()).await {
            Ok(Ok(Some(response))) => response.message,
            Ok(Ok(None)) => return (StreamEnd::Closed, caught_up),
            Ok(Err(status)) => return (StreamEnd::Status(status), caught_up),
            Err(_) => return (StreamEnd::Silent, caught_up),
        };
        *lock(&shared.last_message) = Instant::now();
        match message {
            Some(Message::Event(event)) => shared.apply_event(&event),
            Some(Message::Heartbeat(heartbeat)) => {
                shared
                    .head_seq
                    .fetch_max(heartbeat.head_seq, Ordering::SeqCst);
                shared
                    .last_seq
                    .fetch_max(heartbeat.head_seq, Ordering::SeqCst);
                if !caught_up {
                    if after_seq == 0 {
                        // Started "from now": whatever happened before is not covered.
                        shared.flush();
                    }
                    caught_up = true;
                    shared.cache.set_serving(true);
                    tracing::info!(
                        after_seq,
                        head_seq = heartbeat.head_seq,
                        "revocation stream caught up; the edge cache is in use"
                    );
                }
            }
            Some(Message::Reset(reset)) => {
                // The cursor is beyond the log's retention (or from another log): the
                // gap cannot be replayed. Flush, and continue from the server's seq.
                shared.flush();
                shared.stats.resets.fetch_add(1, Ordering::Relaxed);
                shared.last_seq.store(reset.seq, Ordering::SeqCst);
                shared.head_seq.store(reset.seq, Ordering::SeqCst);
                tracing::warn!(
                    after_seq,
                    seq = reset.seq,
                    "revocation stream reset; flushed the edge cache"
                );
                if !caught_up {
                    caught_up = true;
                    shared.cache.set_serving(true);
                }
            }
            // A message kind this client does not know: nothing to do.
            None => {}
        }
    }
}

/// One key hash's cached answers, by answer key. Replaced whole (copy on write).
struct HashAnswers {
    key_id: String,
    /// The answer first cached for this hash, inline: most keys are verified under one
    /// answer key (no scope named, as a gateway usually asks), so a hit reads it here
    /// without hashing the answer key or following another pointer.
    first: (AnswerKey, CachedAnswer),
    /// The answers under other answer keys.
    more: HashMap<AnswerKey, CachedAnswer, Hasher>,
    /// The key's quota lease, when an answer needs one: spent here with no lock.
    lease: Option<Arc<LeaseCell>>,
}

impl HashAnswers {
    fn get(&self, scopes: &AnswerKey) -> Option<&CachedAnswer> {
        if self.first.0 == *scopes {
            Some(&self.first.1)
        } else {
            self.more.get(scopes)
        }
    }

    fn len(&self) -> usize {
        1 + self.more.len()
    }
}

/// The lease book in shards by key id: a call locks only its key's shard, so that calls
/// for different keys on two cores neither wait for one lock nor pass its cache line back
/// and forth (one book behind one mutex cost a cached answer about a tenth of its time).
/// Each shard learns the server's lease life from its own grants.
struct LeaseBooks {
    shards: Box<[Mutex<LeaseBook>]>,
    hasher: Hasher,
    /// The shard a batch starts at, turned each batch, so that a full batch does not
    /// always leave the same shards' asks waiting.
    next: AtomicUsize,
}

const LEASE_SHARDS: usize = 16;

impl LeaseBooks {
    fn new() -> Self {
        LeaseBooks {
            shards: (0..LEASE_SHARDS)
                .map(|_| Mutex::new(LeaseBook::default()))
                .collect(),
            hasher: Hasher::default(),
            next: AtomicUsize::new(0),
        }
    }

    fn index(&self, key_id: &str) -> usize {
        (self.hasher.hash_one(key_id) as usize) % LEASE_SHARDS
    }

    /// The shard holding `key_id`'s lease.
    fn of(&self, key_id: &str) -> MutexGuard<'_, LeaseBook> {
        lock(&self.shards[self.index(key_id)])
    }

    /// [`LeaseBook::take_batch`] over the shards, `max` asks in all.
    fn take_batch(&self, grants: bool, max: usize, now: Instant) -> Vec<proto::LeaseAsk> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut asks = Vec::new();
        for i in 0..LEASE_SHARDS {
            let shard = &self.shards[(start + i) % LEASE_SHARDS];
            asks.extend(lock(shard).take_batch(grants, max - asks.len(), now));
        }
        asks
    }

    /// [`LeaseBook::install`], each ask (and the grant at its position) at its key's
    /// shard. Returns whether leases wait to be settled.
    fn install(
        &self,
        valid: bool,
        asked_at: Instant,
        asks: &[proto::LeaseAsk],
        grants: &[proto::LeaseGrant],
    ) -> bool {
        let mut settle = false;
        for (index, (asks, grants)) in self.split(asks, grants).into_iter().enumerate() {
            let mut book = lock(&self.shards[index]);
            if !asks.is_empty() {
                book.install(valid, asked_at, &asks, &grants);
            }
            settle |= book.has_settlements();
        }
        settle
    }

    /// [`LeaseBook::failed`] at each ask's shard; `off` holds for every shard.
    fn failed(&self, asks: &[proto::LeaseAsk], off: Option<Duration>, now: Instant) {
        for (index, (asks, _)) in self.split(asks, &[]).into_iter().enumerate() {
            lock(&self.shards[index]).failed(&asks, off, now);
        }
    }

    /// Drops every lease. Returns whether leases wait to be settled.
    fn drop_all(&self) -> bool {
        let mut settle = false;
        for shard in self.shards.iter() {
            let mut book = lock(shard);
            book.drop_all();
            settle |= book.has_settlements();
        }
        settle
    }

    /// `asks` and the grants at their positions, by shard. Grants are matched to asks
    /// by position, and only a tail can be missing, so each shard's lists stay aligned.
    #[allow(clippy::type_complexity)]
    fn split(
        &self,
        asks: &[proto::LeaseAsk],
        grants: &[proto::LeaseGrant],
    ) -> Vec<(Vec<proto::LeaseAsk>, Vec<proto::LeaseGrant>)> {
        let mut shards = vec![(Vec::new(), Vec::new()); LEASE_SHARDS];
        for (i, ask) in asks.iter().enumerate() {
            let (asks, shard_grants) = &mut shards[self.index(&ask.key_id)];
            if let Some(grant) = grants.get(i)
                && shard_grants.len() == asks.len()
            {
                shard_grants.push(grant.clone());
            }
            asks.push(ask.clone());
        }
        shards
    }
}

/// A cached refusal of an unknown or malformed key, with when it was cached.
type Refusal = (Arc<proto::VerifyKeyResponse>, Instant);

/// A hash's weight in the cache's capacity: one per answer it holds.
#[derive(Clone)]
struct AnswersWeigher;

impl Weighter<KeyHash, Arc<HashAnswers>> for AnswersWeigher {
    fn weight(&self, _: &KeyHash, value: &Arc<HashAnswers>) -> u64 {
        value.len() as u64
    }
}

#[derive(Clone)]
struct CachedAnswer {
    response: Arc<proto::VerifyKeyResponse>,
    /// VALID with a rate-limit decision: served only from the key's quota lease.
    leased: bool,
    /// Not served from then on: the cache's TTL after the fill, or `EXPIRY_SLACK`
    /// before the key's expiry if that is sooner. The expiry (wall-clock time) is turned
    /// into the monotonic clock once, at the fill, so that a hit reads no wall clock; a
    /// step of the wall clock after the fill is not followed, and the TTL bounds what
    /// that can cost.
    fresh_until: Instant,
}

impl CachedAnswer {
    fn new(response: &proto::VerifyKeyResponse, leased: bool, ttl: Duration) -> Self {
        let now = Instant::now();
        // An absurd TTL serves nothing rather than overflow.
        let mut fresh_until = now.checked_add(ttl).unwrap_or(now);
        if let Some(t) = &response.expires_at {
            let serve_until = t
                .seconds
                .saturating_mul(1_000_000)
                .saturating_add(i64::from(t.nanos / 1000))
                .saturating_sub(keywarden_domain::micros_in(EXPIRY_SLACK));
            let left = u64::try_from(serve_until.saturating_sub(now_micros())).unwrap_or(0);
            fresh_until =
                fresh_until.min(now.checked_add(Duration::from_micros(left)).unwrap_or(now));
        }
        CachedAnswer {
            response: Arc::new(response.clone()),
            leased,
            fresh_until,
        }
    }
}

/// The edge's cache. Reads go straight to quick_cache. Fills check the generation and insert
/// under the fill guard's read lock ([`fill::FillGuard`], one shard, whose state is
/// whether the stream is caught up); invalidations, flushes and losing the stream bump it
/// under the write lock, so a check-and-insert and a bump-and-remove never interleave.
struct EdgeCache {
    found: Cache<KeyHash, Arc<HashAnswers>, AnswersWeigher, Hasher>,
    /// Each thread's copies of the usual answers it served from `found` (`front`).
    fronts: Fronts<FrontAnswer>,
    /// Quota leases by key id. Dropped under the guard's write lock (events, flushes,
    /// losing the stream), installed under its read lock with a fill's generation check.
    leases: LeaseBooks,
    /// Whether answers needing a lease are cached at all ([`EdgeConfig::leases`]).
    leasing: bool,
    /// Wakes the lease task: an ask or a settlement is waiting.
    lease_wake: Notify,
    /// Counts the lease task's rounds: calls waiting for a grant watch it.
    batches: watch::Sender<u64>,
    /// Refusals for unknown and malformed keys, each with when it was cached (its TTL
    /// is judged on reading: the cache itself has none).
    missing: Option<Cache<KeyHash, Refusal, UnitWeighter, Hasher>>,
    negative_ttl: Duration,
    /// key_id → the hashes cached for it, to drop them all on an event about the key.
    by_key_id: Mutex<KeyIndex>,
    /// One shard for the whole cache (an event names a key id and hashes, while a fill
    /// knows only its hash); its state: serving (the stream caught up).
    guard: FillGuard<bool>,
    /// The guard's serving state, readable without a lock on the hot path.
    serving: AtomicBool,
    serving_tx: watch::Sender<bool>,
    ttl: Duration,
    capacity: u64,
    workspace: Option<String>,
}

#[derive(Default)]
struct KeyIndex {
    hashes: HashMap<String, HashSet<KeyHash>>,
    /// Prune entries whose hashes left the cache when the index grows past this.
    prune_at: usize,
}

enum Kind {
    Found { leased: bool },
    Missing,
    Uncacheable,
}

/// A cached answer that may be served.
struct Hit {
    response: Arc<proto::VerifyKeyResponse>,
    /// For an answer about a key that exists (not a refusal of an unknown key).
    found: Option<FoundHit>,
}

/// What a hit on a key that exists adds: its entry, and its answer's deadline and whether
/// it needs a quota lease.
struct FoundHit {
    entry: Arc<HashAnswers>,
    fresh_until: Instant,
    leased: bool,
}

/// An answer in a thread's front (`front`).
struct FrontAnswer {
    /// The thread's own copy, so that handing it out bumps a count no other core reads.
    response: Arc<proto::VerifyKeyResponse>,
    fresh_until: Instant,
    leased: bool,
    /// The shared entry (its key id), and its lease cell copied out of it: a call the
    /// reserve admits then reads nothing of the shared entry (that read was a cache miss
    /// per call, by profile, across 1 000 keys).
    entry: Arc<HashAnswers>,
    lease: Option<Arc<LeaseCell>>,
    /// What this thread took of the key's lease ahead of its calls.
    reserve: Option<Reserve>,
}

impl EdgeCache {
    fn new(config: &EdgeConfig) -> Self {
        let missing = (!config.negative_ttl.is_zero())
            .then(|| maps::bounded(config.cache_capacity, UnitWeighter));
        EdgeCache {
            leases: LeaseBooks::new(),
            leasing: config.leases,
            lease_wake: Notify::new(),
            batches: watch::channel(0).0,
            found: maps::bounded(config.cache_capacity, AnswersWeigher),
            fronts: Fronts::new(),
            missing,
            negative_ttl: config.negative_ttl,
            by_key_id: Mutex::new(KeyIndex {
                hashes: HashMap::new(),
                prune_at: 1024,
            }),
            guard: FillGuard::new(1, || false),
            serving: AtomicBool::new(false),
            serving_tx: watch::channel(false).0,
            ttl: config.cache_ttl,
            capacity: config.cache_capacity,
            workspace: config.workspace.clone(),
        }
    }

    fn serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }

    /// The answer cached for `hash` and `scopes`, while the cache is in use.
    fn lookup(&self, hash: &KeyHash, scopes: &AnswerKey, now: Instant) -> Option<Hit> {
        if !self.serving() {
            return None;
        }
        if let Some(entry) = self.found.get(hash) {
            let answer = entry.get(scopes)?;
            let fresh_until = answer.fresh_until;
            let leased = answer.leased;
            let response = answer.response.clone();
            return (now < fresh_until).then(|| Hit {
                response,
                found: Some(FoundHit {
                    entry,
                    fresh_until,
                    leased,
                }),
            });
        }
        self.missing
            .as_ref()
            .and_then(|m| m.get(hash))
            .filter(|(_, cached_at)| now.saturating_duration_since(*cached_at) < self.negative_ttl)
            .map(|(response, _)| Hit {
                response,
                found: None,
            })
    }

    /// [`EdgeCache::lookup`]'s answer, whether or not it needs a lease (tests).
    #[cfg(test)]
    fn get(&self, hash: &KeyHash, scopes: &AnswerKey) -> Option<proto::VerifyKeyResponse> {
        self.lookup(hash, scopes, Instant::now())
            .map(|hit| Arc::unwrap_or_clone(hit.response))
    }

    /// A call of `cost` at the key's lease (see [`LeaseBook::admit`]).
    fn admit(&self, key_id: &str, cost: u64, first: bool, now: Instant) -> Admit {
        let (admit, queued) = self.leases.of(key_id).admit(key_id, cost, first, now);
        if queued {
            self.lease_wake.notify_one();
        }
        admit
    }

    /// A call admitted by the key's lease cell found it running low.
    fn ask_ahead(&self, key_id: &str, now: Instant) {
        if self.leases.of(key_id).ask_ahead(key_id, now) {
            self.lease_wake.notify_one();
        }
    }

    /// The server answered VALID with a decision for `key_id`, and it was cached.
    fn want_lease(&self, key_id: &str, hash: KeyHash, cap: u64) {
        if self
            .leases
            .of(key_id)
            .want(key_id, hash, cap, Instant::now())
        {
            self.lease_wake.notify_one();
        }
    }

    fn take_lease_batch(&self, grants: bool) -> Vec<proto::LeaseAsk> {
        self.leases
            .take_batch(grants, MAX_LEASE_ASKS, Instant::now())
    }

    /// Installs grants unless anything was invalidated (or the stream lost) since
    /// `ticket` was taken; a grant not installed is settled unused.
    fn install_leases(
        &self,
        ticket: Option<FillTicket>,
        asked_at: Instant,
        asks: &[proto::LeaseAsk],
        grants: &[proto::LeaseGrant],
    ) {
        let installed = ticket.and_then(|ticket| {
            self.guard.complete(
                ticket,
                |serving| *serving,
                || self.leases.install(true, asked_at, asks, grants),
            )
        });
        // Raced an event, a flush or a disconnection: every grant is given back.
        let settle =
            installed.unwrap_or_else(|| self.leases.install(false, asked_at, asks, grants));
        if settle {
            self.lease_wake.notify_one();
        }
    }

    fn leases_failed(&self, asks: &[proto::LeaseAsk], off: Option<Duration>) {
        self.leases.failed(asks, off, Instant::now());
    }

    /// Call before asking the server; `None` while the cache is not in use.
    fn begin_fill(&self) -> Option<FillTicket> {
        self.guard.begin_if(0, |serving| *serving)
    }

    /// Caches the server's answer unless the stream lost health or anything was
    /// invalidated since the ticket was taken. Returns whether it was cached.
    fn complete_fill(
        &self,
        ticket: FillTicket,
        hash: KeyHash,
        scopes: AnswerKey,
        response: &proto::VerifyKeyResponse,
    ) -> bool {
        let kind = self.kind(response);
        if matches!(kind, Kind::Uncacheable) {
            return false;
        }
        self.guard
            .complete(
                ticket,
                |serving| *serving,
                || self.insert(kind, hash, scopes, response),
            )
            .unwrap_or(false)
    }

    /// Puts an answer in the cache (under the fill guard's read lock).
    fn insert(
        &self,
        kind: Kind,
        hash: KeyHash,
        scopes: AnswerKey,
        response: &proto::VerifyKeyResponse,
    ) -> bool {
        match kind {
            Kind::Uncacheable => false,
            Kind::Missing => match &self.missing {
                Some(missing) => {
                    missing.insert(hash, (Arc::new(response.clone()), Instant::now()));
                    true
                }
                None => false,
            },
            Kind::Found { leased } => {
                let answer = CachedAnswer::new(response, leased, self.ttl);
                let key_id = response.key_id.clone();
                // The key's lease cell, shared by its answers (the slot made if none).
                let lease = response
                    .rate_limit
                    .as_ref()
                    .filter(|_| leased)
                    .and_then(lease_cap)
                    .map(|cap| {
                        self.leases
                            .of(&key_id)
                            .cell(&key_id, hash, cap, Instant::now())
                    });
                // Not atomic with a concurrent fill of the same hash (one of the two
                // answers may be lost, to be fetched again), and never with an
                // invalidation: that holds the guard's write lock.
                let entry = match self.found.get(&hash) {
                    Some(e) if e.key_id == key_id && e.len() < MAX_SCOPE_SETS_PER_KEY => {
                        let (mut first, mut more) = (e.first.clone(), e.more.clone());
                        if first.0 == scopes {
                            first.1 = answer;
                        } else {
                            more.insert(scopes, answer);
                        }
                        HashAnswers {
                            key_id: key_id.clone(),
                            first,
                            more,
                            lease: lease.or_else(|| e.lease.clone()),
                        }
                    }
                    _ => HashAnswers {
                        key_id: key_id.clone(),
                        first: (scopes, answer),
                        more: HashMap::default(),
                        lease,
                    },
                };
                self.found.insert(hash, Arc::new(entry));
                self.index(key_id, hash);
                true
            }
        }
    }

    fn kind(&self, response: &proto::VerifyKeyResponse) -> Kind {
        use proto::VerifyCode as C;
        // A budget is judged per call on the server (spend is reported after the call):
        // such an answer is never reused. Neither is one that passed without the
        // decision it should have had (the server's counters unreachable): the next call
        // must be counted. A rate-limit decision is reused only with a quota lease to
        // count each call, and only for request windows (token windows are counted when
        // usage is reported, which a lease cannot foresee).
        let per_call = response.rate_limit_unknown
            || response.max_budget_micros.is_some()
            || response
                .rate_limit
                .as_ref()
                .is_some_and(|d| !self.leasing || lease_cap(d).is_none());
        let leased = response.rate_limit.is_some();
        match C::try_from(response.code) {
            Ok(C::Valid) if per_call => Kind::Uncacheable,
            Ok(
                C::Valid
                | C::Revoked
                | C::Expired
                | C::InsufficientScope
                | C::ResourceForbidden
                | C::IpForbidden
                | C::PlanForbidsKeys,
            ) if !response.key_id.is_empty()
                && self
                    .workspace
                    .as_deref()
                    .is_none_or(|w| w == response.workspace_id) =>
            {
                Kind::Found {
                    leased: leased && response.code == C::Valid as i32,
                }
            }
            Ok(C::NotFound | C::Malformed) => Kind::Missing,
            _ => Kind::Uncacheable,
        }
    }

    fn index(&self, key_id: String, hash: KeyHash) {
        let mut index = lock(&self.by_key_id);
        index.hashes.entry(key_id).or_default().insert(hash);
        if index.hashes.len() > index.prune_at {
            let found = &self.found;
            index.hashes.retain(|_, hashes| {
                hashes.retain(|h| found.contains_key(h));
                !hashes.is_empty()
            });
            let floor = usize::try_from(self.capacity)
                .unwrap_or(usize::MAX)
                .min(1024);
            index.prune_at = index.hashes.len().saturating_mul(2).max(floor);
        }
    }

    /// Drops every answer for `hashes` and for the hashes indexed under `key_id`, and
    /// makes every fill that started before lose.
    fn invalidate(&self, hashes: &[KeyHash], key_id: &str) {
        self.guard.invalidate(0, |_| {
            let indexed = lock(&self.by_key_id).hashes.remove(key_id);
            for hash in hashes.iter().chain(indexed.iter().flatten()) {
                self.found.remove(hash);
                if let Some(missing) = &self.missing {
                    missing.remove(hash);
                }
            }
            self.drop_leases(Some(key_id));
        });
        self.fronts.invalidate();
    }

    /// Drops the key's lease, or every lease, and wakes the lease task to settle them.
    /// Called under the guard's write lock, so no grant asked before is installed after.
    fn drop_leases(&self, key_id: Option<&str>) {
        let settle = match key_id {
            Some(key_id) => {
                let mut book = self.leases.of(key_id);
                book.drop_key(key_id);
                book.has_settlements()
            }
            None => self.leases.drop_all(),
        };
        if settle {
            self.lease_wake.notify_one();
        }
    }

    fn flush(&self) {
        self.guard.invalidate(0, |_| {
            self.found.clear();
            if let Some(missing) = &self.missing {
                missing.clear();
            }
            lock(&self.by_key_id).hashes.clear();
            self.drop_leases(None);
        });
        self.fronts.invalidate();
    }

    /// In use (caught up) or not (connecting, replaying, disconnected). Losing health
    /// makes every fill in flight lose.
    /// (Becoming serving bumps the generation too: no fill began while it was not.)
    fn set_serving(&self, serving: bool) {
        self.guard.invalidate(0, |state| {
            if !serving {
                // Served only while caught up: no call is admitted from a lease
                // meanwhile, and what the leases did not use goes back.
                self.drop_leases(None);
            }
            *state = serving;
            self.serving.store(serving, Ordering::SeqCst);
        });
        self.fronts.invalidate();
        self.serving_tx.send_replace(serving);
    }
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(keywarden_domain::micros_in)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> EdgeConfig {
        EdgeConfig::new("verifier-secret", "edge-secret")
    }

    fn serving_cache() -> EdgeCache {
        let cache = EdgeCache::new(&config());
        cache.set_serving(true);
        cache
    }

    fn found(key_id: &str, code: proto::VerifyCode) -> proto::VerifyKeyResponse {
        proto::VerifyKeyResponse {
            valid: code == proto::VerifyCode::Valid,
            code: code as i32,
            key_id: key_id.to_owned(),
            workspace_id: "ws".to_owned(),
            ..Default::default()
        }
    }

    fn request(scopes: &[&str], resource: &str, client_ip: &str) -> proto::VerifyKeyRequest {
        proto::VerifyKeyRequest {
            key: "k".to_owned(),
            required_scopes: scopes.iter().map(|s| s.to_string()).collect(),
            resource: resource.to_owned(),
            client_ip: client_ip.to_owned(),
            cost: 0,
        }
    }

    fn scopes(s: &[&str]) -> AnswerKey {
        answer_key(&request(s, "", "")).unwrap().0
    }

    #[allow(dead_code)]
    fn the_verifier_can_be_shared_across_tasks(v: std::sync::Arc<Verifier>) {
        fn send_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: T) {}
        send_sync(&v);
        send(async move { v.verify("k", &[]).await });
    }

    #[test]
    fn debug_redacts_the_tokens() {
        let printed = format!("{:?}", config());
        assert!(!printed.contains("verifier-secret"), "{printed}");
        assert!(!printed.contains("edge-secret"), "{printed}");
        assert!(printed.contains("[redacted]"));
    }

    #[test]
    fn the_answer_key_ignores_scope_order_and_duplicates() {
        assert_eq!(
            scopes(&["write", "read", "read"]),
            scopes(&["read", "write"])
        );
        // What the server refuses is never looked up.
        assert_eq!(answer_key(&request(&["Not A Scope"], "", "")), None);
        assert_eq!(answer_key(&request(&["read"; 1000], "", "")), None);
        assert_eq!(answer_key(&request(&[], "two words", "")), None);
        assert_eq!(answer_key(&request(&[], "", "10.0.0.1/8")), None);
        // A cost the server refuses: never answered from the cache (the edge once
        // checked every field but this one).
        let costly = proto::VerifyKeyRequest {
            cost: keywarden_domain::validate::MAX_COST + 1,
            ..request(&[], "", "")
        };
        assert_eq!(answer_key(&costly), None);
        assert_eq!(
            answer_key(&request(&[], "", "")).map(|(_, cost)| cost),
            Some(1)
        );
    }

    #[test]
    fn the_answer_key_tells_resources_and_addresses_apart() {
        let base = answer_key(&request(&["read"], "gpt-4o", "10.0.0.1"))
            .unwrap()
            .0;
        for other in [
            request(&["read"], "o3", "10.0.0.1"),
            request(&["read"], "", "10.0.0.1"),
            request(&["read"], "gpt-4o", "10.0.0.2"),
            request(&["read"], "gpt-4o", ""),
        ] {
            assert_ne!(answer_key(&other).unwrap().0, base, "{other:?}");
        }
        // The same address written differently is the same address.
        assert_eq!(
            answer_key(&request(&["read"], "gpt-4o", " 10.0.0.1 "))
                .unwrap()
                .0,
            base
        );
    }

    #[test]
    fn a_fill_hits_for_the_same_scopes_only() {
        let cache = serving_cache();
        let h = KeyHash::of("k");
        let t = cache.begin_fill().unwrap();
        let answer = found("key_1", proto::VerifyCode::Valid);
        assert!(cache.complete_fill(t, h, scopes(&["read"]), &answer));
        assert_eq!(cache.get(&h, &scopes(&["read"])), Some(answer));
        assert_eq!(cache.get(&h, &scopes(&["write"])), None);
    }

    #[test]
    fn an_answer_that_passed_without_its_rate_limit_decision_is_not_cached() {
        let cache = serving_cache();
        let h = KeyHash::of("k");
        let t = cache.begin_fill().unwrap();
        let answer = proto::VerifyKeyResponse {
            rate_limit_unknown: true,
            ..found("key_1", proto::VerifyCode::Valid)
        };
        assert!(!cache.complete_fill(t, h, scopes(&["read"]), &answer));
        assert_eq!(cache.get(&h, &scopes(&["read"])), None);
    }

    #[test]
    fn a_fill_that_raced_an_invalidation_loses() {
        let cache = serving_cache();
        let h = KeyHash::of("k");
        let t = cache.begin_fill().unwrap();
        cache.invalidate(&[h], "key_1");
        let stale = found("key_1", proto::VerifyCode::Valid);
        assert!(!cache.complete_fill(t, h, scopes(&[]), &stale));
        assert_eq!(cache.get(&h, &scopes(&[])), None);
    }

    #[test]
    fn a_fill_across_a_disconnection_loses_and_nothing_is_served_meanwhile() {
        let cache = serving_cache();
        let h = KeyHash::of("k");
        let t = cache.begin_fill().unwrap();
        let answer = found("key_1", proto::VerifyCode::Valid);
        assert!(cache.complete_fill(t, h, scopes(&[]), &answer));
        let t = cache.begin_fill().unwrap();
        cache.set_serving(false);
        assert_eq!(cache.get(&h, &scopes(&[])), None);
        assert!(cache.begin_fill().is_none());
        cache.set_serving(true);
        assert!(!cache.complete_fill(t, KeyHash::of("other"), scopes(&[]), &answer));
        // Kept while disconnected, served again once caught up.
        assert_eq!(cache.get(&h, &scopes(&[])), Some(answer));
    }

    #[test]
    fn an_event_drops_by_key_id_too() {
        let cache = serving_cache();
        let (a, b) = (KeyHash::of("a"), KeyHash::of("b"));
        for h in [a, b] {
            let t = cache.begin_fill().unwrap();
            assert!(cache.complete_fill(
                t,
                h,
                scopes(&[]),
                &found("key_1", proto::VerifyCode::Valid)
            ));
        }
        cache.invalidate(&[], "key_1");
        assert_eq!(cache.get(&a, &scopes(&[])), None);
        assert_eq!(cache.get(&b, &scopes(&[])), None);
    }

    #[test]
    fn an_expired_answer_is_not_served() {
        let cache = serving_cache();
        let h = KeyHash::of("k");
        let mut answer = found("key_1", proto::VerifyCode::Valid);
        answer.expires_at = Some(prost_types::Timestamp {
            seconds: now_micros() / 1_000_000 - 1,
            nanos: 0,
        });
        let t = cache.begin_fill().unwrap();
        assert!(cache.complete_fill(t, h, scopes(&[]), &answer));
        assert_eq!(cache.get(&h, &scopes(&[])), None);
        answer.expires_at = Some(prost_types::Timestamp {
            seconds: now_micros() / 1_000_000 + 3600,
            nanos: 0,
        });
        let t = cache.begin_fill().unwrap();
        assert!(cache.complete_fill(t, h, scopes(&[]), &answer));
        assert_eq!(cache.get(&h, &scopes(&[])), Some(answer));
    }

    #[test]
    fn negative_answers_are_cached_by_hash_and_errors_not_at_all() {
        let cache = serving_cache();
        let h = KeyHash::of("nope");
        let missing = proto::VerifyKeyResponse {
            code: proto::VerifyCode::NotFound as i32,
            ..Default::default()
        };
        let t = cache.begin_fill().unwrap();
        assert!(cache.complete_fill(t, h, scopes(&["read"]), &missing));
        assert_eq!(cache.get(&h, &scopes(&["write"])), Some(missing));
        let unspecified = proto::VerifyKeyResponse::default();
        let t = cache.begin_fill().unwrap();
        assert!(!cache.complete_fill(t, KeyHash::of("x"), scopes(&[]), &unspecified));
    }

    #[test]
    fn with_a_workspace_filter_other_workspaces_are_not_cached() {
        let mut c = config();
        c.workspace = Some("ws_other".into());
        let cache = EdgeCache::new(&c);
        cache.set_serving(true);
        let t = cache.begin_fill().unwrap();
        assert!(!cache.complete_fill(
            t,
            KeyHash::of("k"),
            scopes(&[]),
            &found("key_1", proto::VerifyCode::Valid)
        ));
    }

    #[test]
    fn a_flush_drops_everything() {
        let cache = serving_cache();
        let h = KeyHash::of("k");
        let t = cache.begin_fill().unwrap();
        assert!(cache.complete_fill(
            t,
            h,
            scopes(&[]),
            &found("key_1", proto::VerifyCode::Revoked)
        ));
        cache.flush();
        assert_eq!(cache.get(&h, &scopes(&[])), None);
    }

    #[test]
    fn the_lease_shards_keep_each_grant_beside_its_ask() {
        let books = LeaseBooks::new();
        let ask = |key_id: &str| proto::LeaseAsk {
            key_id: key_id.to_owned(),
            want: 1,
            ..Default::default()
        };
        let grant = |key_id: &str| proto::LeaseGrant {
            key_id: key_id.to_owned(),
            ..Default::default()
        };
        let key_ids: Vec<String> = (0..200).map(|i| format!("key_{i}")).collect();
        let asks: Vec<_> = key_ids.iter().map(|k| ask(k)).collect();
        // The server answered the first 150 asks only (a truncated batch).
        let grants: Vec<_> = key_ids[..150].iter().map(|k| grant(k)).collect();
        let shards = books.split(&asks, &grants);
        let (mut asked, mut granted) = (0, 0);
        for (index, (asks, grants)) in shards.iter().enumerate() {
            assert!(grants.len() <= asks.len());
            for (a, g) in asks.iter().zip(grants) {
                assert_eq!(a.key_id, g.key_id, "shard {index}");
            }
            for a in asks {
                assert_eq!(books.index(&a.key_id), index);
            }
            asked += asks.len();
            granted += grants.len();
        }
        assert_eq!((asked, granted), (200, 150));
        // Two hundred keys spread over more than one shard.
        assert!(shards.iter().filter(|(a, _)| !a.is_empty()).count() > 1);
    }

    #[test]
    fn a_batch_over_the_lease_shards_holds_at_most_max_asks() {
        let books = LeaseBooks::new();
        let now = Instant::now();
        for i in 0..100 {
            let key_id = format!("key_{i}");
            assert!(
                books
                    .of(&key_id)
                    .want(&key_id, KeyHash::of(&key_id), 50, now)
            );
        }
        let first = books.take_batch(true, 60, now);
        assert_eq!(first.len(), 60);
        // The rest stay queued for the next batch, none asked twice.
        let second = books.take_batch(true, 60, now);
        assert_eq!(second.len(), 40);
        let mut all: Vec<_> = first.iter().chain(&second).map(|a| &a.key_id).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 100);
    }

    #[test]
    fn jitter_stays_within_half_and_all_of_the_step() {
        for _ in 0..100 {
            let d = jittered(Duration::from_millis(200));
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(200));
        }
    }
}
