//! The edge client library, `keywarden::edge::Verifier`, against real servers: answers
//! come from its cache (proved by its server-call counter), every revoke / rotation /
//! scope change reaches it within a bounded wait, a RESET flushes it, and a server
//! restart is survived by resuming from the last seq without losing the event that
//! happened meanwhile. Rate-limited keys are answered from quota leases, never past the
//! limit.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use keywarden::edge::{EdgeConfig, Verifier};
use keywarden::proto::key_service_client::KeyServiceClient;
use keywarden::proto::{self, VerifyCode};
use keywarden::server::RunningServer;
use prost_types::FieldMask;
use tonic::transport::Channel;

/// How long anything asynchronous may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);

/// Polls `$cond` (which may `.await`) until it holds; fails after [`DEADLINE`].
macro_rules! eventually {
    ($what:expr, $cond:expr) => {{
        let deadline = Instant::now() + DEADLINE;
        loop {
            if $cond {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "still not true after {DEADLINE:?}: {}",
                $what
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }};
}

fn edge_config() -> EdgeConfig {
    let mut config = EdgeConfig::new(VERIFIER_TOKEN, EDGE_TOKEN);
    config.backoff_min = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(400);
    // The test servers heartbeat every second.
    config.idle_timeout = Duration::from_secs(5);
    config
}

/// An edge verifier over the app's channel, subscribed and caught up.
async fn edge(app: &TestApp) -> Verifier {
    let edge = Verifier::connect(app.channel.clone(), edge_config()).unwrap();
    assert!(
        edge.wait_connected(DEADLINE).await,
        "the edge never caught up"
    );
    edge
}

async fn verify(edge: &Verifier, key: &str, scopes: &[&str]) -> proto::VerifyKeyResponse {
    let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
    edge.verify(key, &scopes).await.unwrap()
}

async fn edge_code(edge: &Verifier, key: &str, scopes: &[&str]) -> VerifyCode {
    code(&verify(edge, key, scopes).await)
}

/// The log's head, read from the database.
async fn head(app: &TestApp) -> i64 {
    app.db
        .count("SELECT head FROM event_log WHERE id = 1")
        .await
}

async fn revoke(admin: &mut AdminClient, key_id: &str) {
    admin
        .revoke_key(proto::RevokeKeyRequest {
            key_id: key_id.to_owned(),
            actor: Some(actor()),
            reason: "leaked".into(),
        })
        .await
        .unwrap();
}

fn key_id(issued: &proto::IssueKeyResponse) -> String {
    issued.key_info.as_ref().unwrap().key_id.clone()
}

/// Waits until the edge has applied everything up to the log's head (as of now).
async fn wait_caught_up(app: &TestApp, edge: &Verifier) {
    let head = head(app).await;
    eventually!(format!("the edge reaches seq {head}"), {
        let lag = edge.lag();
        lag.connected && lag.last_seq >= head
    });
}

/// A server whose keys have no rate limits (no deployment default): only then are valid
/// answers reusable at the edge.
async fn spawn_unlimited(backend: Backend) -> TestApp {
    TestApp::spawn_with(backend, |s| s.default_limits = Arc::new(Vec::new())).await
}

/// Shuts the app's server down and waits until the edge noticed; returns its address.
async fn stop_server(app: &mut TestApp, edge: &Verifier) -> SocketAddr {
    let server = app.server.take().unwrap();
    let addr = server.addr();
    server.shutdown().await.unwrap();
    eventually!("the edge notices the server is gone", !edge.lag().connected);
    addr
}

/// Another server on the app's database, at `listen` (port 0: anywhere).
async fn start_server(app: &TestApp, listen: SocketAddr) -> RunningServer {
    let mut settings = test_settings(&app.db);
    settings.listen = listen;
    settings.default_limits = Arc::new(Vec::new());
    let deadline = Instant::now() + DEADLINE;
    loop {
        match keywarden::server::start(&settings, app.clock.clone()).await {
            Ok(server) => return server,
            // The old listener's port may take a moment to be free again.
            Err(e) if Instant::now() < deadline => {
                eprintln!("start at {listen} failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot start a server at {listen}: {e}"),
        }
    }
}

async fn admin_of(server: &RunningServer) -> AdminClient {
    let channel = Channel::from_shared(format!("http://{}", server.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    KeyServiceClient::with_interceptor(channel, bearer(ADMIN_TOKEN))
}

async fn served_from_the_edge_cache_the_second_time(backend: Backend) {
    let app = spawn_unlimited(backend).await;
    let issued = app.issue().await;
    let edge = edge(&app).await;

    let first = verify(&edge, &issued.key, &["read"]).await;
    assert_eq!(code(&first), VerifyCode::Valid);
    assert_eq!(edge.stats().server_calls, 1);
    assert_eq!(edge.stats().fills, 1);

    // Same key, same scopes (duplicates aside): the server is not asked again.
    let second = verify(&edge, &issued.key, &["read"]).await;
    assert_eq!(second, first);
    let third = verify(&edge, &issued.key, &["read", "read"]).await;
    assert_eq!(third, first);
    let stats = edge.stats();
    assert_eq!(stats.server_calls, 1, "{stats:?}");
    assert_eq!(stats.hits, 2, "{stats:?}");

    // A scope list the server refuses is the server's error, every time.
    for _ in 0..2 {
        let refused = edge
            .verify(&issued.key, &["Not A Scope".to_owned()])
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    }
    assert_eq!(edge.stats().server_calls, 3);

    // Another scope set is another answer: one server call, then cached too, whatever
    // the order of the scopes.
    assert_eq!(
        edge_code(&edge, &issued.key, &["write", "read"]).await,
        VerifyCode::InsufficientScope
    );
    assert_eq!(
        edge_code(&edge, &issued.key, &["read", "write"]).await,
        VerifyCode::InsufficientScope
    );
    assert_eq!(edge.stats().server_calls, 4);

    // NOT_FOUND (here: a deleted key) and MALFORMED are cached briefly, by hash,
    // whatever the scopes.
    let deleted = app.issue().await;
    app.admin()
        .delete_key(proto::DeleteKeyRequest {
            key_id: key_id(&deleted),
            actor: Some(actor()),
        })
        .await
        .unwrap();
    wait_caught_up(&app, &edge).await;
    for (key, expected) in [
        (deleted.key.as_str(), VerifyCode::NotFound),
        ("not a key at all", VerifyCode::Malformed),
    ] {
        let before = edge.stats().server_calls;
        let a = verify(&edge, key, &["read"]).await;
        assert_eq!(code(&a), expected);
        assert_eq!(verify(&edge, key, &["write"]).await, a);
        assert_eq!(edge.stats().server_calls, before + 1);
    }
    edge.shutdown().await;
}

fn requests_per_minute(limit: u64) -> proto::RateLimit {
    proto::RateLimit {
        unit: proto::RateLimitUnit::Requests as i32,
        window: proto::RateLimitWindow::Minute as i32,
        limit,
    }
}

/// Without quota leases (the edge's `leases` off), every valid call of a key with limits
/// (here its own: 2 requests a minute) must count on the server: none is answered from
/// the edge cache, and the third is refused there. Budgets are never reused either way.
async fn without_leases_answers_under_rate_limits_or_budgets_are_never_reused(backend: Backend) {
    let app = spawn_unlimited(backend).await;
    let limited = app
        .issue_with(|r| r.rate_limits = vec![requests_per_minute(2)])
        .await;
    let budgeted = app.issue_with(|r| r.max_budget_micros = Some(1_000)).await;
    let mut config = edge_config();
    config.leases = false;
    let edge = Verifier::connect(app.channel.clone(), config).unwrap();
    assert!(edge.wait_connected(DEADLINE).await);
    assert_eq!(edge_code(&edge, &limited.key, &[]).await, VerifyCode::Valid);
    assert_eq!(edge_code(&edge, &limited.key, &[]).await, VerifyCode::Valid);
    assert_eq!(
        edge_code(&edge, &limited.key, &[]).await,
        VerifyCode::RateLimited
    );
    assert_eq!(edge.stats().server_calls, 3);
    for _ in 0..2 {
        assert_eq!(
            edge_code(&edge, &budgeted.key, &[]).await,
            VerifyCode::Valid
        );
    }
    let stats = edge.stats();
    assert_eq!((stats.server_calls, stats.hits), (5, 0), "{stats:?}");
    assert_eq!(stats.lease_calls, 0, "{stats:?}");
    edge.shutdown().await;
}

/// With leases, a budget (spend is judged on the server, reported after each call) and a
/// token window (counted when usage is reported) still send every call to the server.
async fn answers_under_budgets_or_token_limits_are_never_reused(backend: Backend) {
    let app = spawn_unlimited(backend).await;
    let budgeted = app
        .issue_with(|r| {
            r.max_budget_micros = Some(1_000);
            r.rate_limits = vec![requests_per_minute(100)];
        })
        .await;
    let tokens = app
        .issue_with(|r| {
            r.rate_limits = vec![
                requests_per_minute(100),
                proto::RateLimit {
                    unit: proto::RateLimitUnit::Tokens as i32,
                    window: proto::RateLimitWindow::Minute as i32,
                    limit: 10_000,
                },
            ]
        })
        .await;
    let edge = edge(&app).await;
    for key in [&budgeted.key, &tokens.key] {
        for _ in 0..3 {
            assert_eq!(edge_code(&edge, key, &[]).await, VerifyCode::Valid);
        }
    }
    let stats = edge.stats();
    assert_eq!((stats.server_calls, stats.hits), (6, 0), "{stats:?}");
    assert_eq!(stats.lease_calls, 0, "{stats:?}");
    edge.shutdown().await;
}

/// A rate-limited key, once verified by the server, is answered from the edge's quota
/// lease: no VerifyKey call for 300 more calls (`verify`, then `check`), and `remaining`
/// counts down by one per call, as the server would have counted (this edge is the key's
/// only user).
async fn a_rate_limited_key_is_answered_from_its_lease_without_server_calls(backend: Backend) {
    const L: u64 = 1000;
    let app = spawn_unlimited(backend).await;
    let issued = app
        .issue_with(|r| r.rate_limits = vec![requests_per_minute(L)])
        .await;
    let edge = edge(&app).await;
    let first = verify(&edge, &issued.key, &["read"]).await;
    assert_eq!(code(&first), VerifyCode::Valid);
    assert_eq!(first.rate_limit.as_ref().unwrap().remaining, L - 1);
    let warm = edge.stats();
    assert_eq!(warm.server_calls, 1, "{warm:?}");
    for k in 2..=201 {
        let answer = verify(&edge, &issued.key, &["read"]).await;
        assert_eq!(code(&answer), VerifyCode::Valid);
        let figures = answer.rate_limit.as_ref().unwrap();
        assert!(figures.allowed);
        assert_eq!(figures.limit, L);
        assert_eq!(figures.remaining, L - k, "call {k}");
        assert_eq!(answer.key_id, first.key_id);
    }
    // `check` gives the same decisions, sharing the cached answer instead of copying it,
    // with this call's figures beside it.
    let mut shared = None;
    for k in 202..=301 {
        let checked = edge.check(&issued.key, &["read".to_owned()]).await.unwrap();
        assert!(checked.valid());
        let figures = checked.rate_limit.unwrap();
        assert_eq!((figures.limit, figures.remaining), (L, L - k), "call {k}");
        let previous = shared.replace(checked.response.clone());
        if let Some(previous) = previous {
            assert!(std::sync::Arc::ptr_eq(&previous, &checked.response));
        }
    }
    let stats = edge.stats();
    assert_eq!(stats.server_calls, 1, "{stats:?}");
    assert_eq!(stats.hits - warm.hits, 300, "{stats:?}");
    assert_eq!(stats.leased - warm.leased, 300, "{stats:?}");
    assert!(stats.lease_calls >= 1, "{stats:?}");
    edge.shutdown().await;
}

/// The usual call (no scope named) is served from the calling thread's own copy of the
/// answer and a reserve it took of the lease: the figures still count down by one per
/// call, and a revoke still ends it at the next call once the event has arrived.
async fn the_usual_call_is_served_from_the_threads_copy_and_counts_down(backend: Backend) {
    const L: u64 = 1000;
    let app = spawn_unlimited(backend).await;
    let issued = app
        .issue_with(|r| r.rate_limits = vec![requests_per_minute(L)])
        .await;
    let edge = edge(&app).await;
    for k in 1..=300 {
        let checked = edge.check(&issued.key, &[]).await.unwrap();
        assert!(checked.valid(), "call {k}");
        let figures = checked.rate_limit.unwrap();
        assert_eq!((figures.limit, figures.remaining), (L, L - k), "call {k}");
    }
    let stats = edge.stats();
    assert_eq!(stats.server_calls, 1, "{stats:?}");
    assert!(stats.leased >= 290, "{stats:?}");
    // A key without limits needs no lease: only the event can end its copies.
    let unlimited = app.issue().await;
    for _ in 0..3 {
        assert!(edge.check(&unlimited.key, &[]).await.unwrap().valid());
    }
    assert_eq!(edge.stats().server_calls, 2, "{:?}", edge.stats());
    for issued in [&issued, &unlimited] {
        let events = edge.stats().events;
        revoke(&mut app.admin(), &key_id(issued)).await;
        eventually!("the edge applies the revoke", edge.stats().events > events);
        let checked = edge.check(&issued.key, &[]).await.unwrap();
        assert_eq!(checked.response.code, VerifyCode::Revoked as i32);
        assert_eq!(
            edge_code(&edge, &issued.key, &[]).await,
            VerifyCode::Revoked
        );
    }
    edge.shutdown().await;
}

/// The edge's leases and the server's own decisions count against the same limit: of 3N
/// calls in one window (the test's clock stands still) exactly N are valid, whichever of
/// them the edge admitted itself, and the rest are RATE_LIMITED.
async fn an_edge_never_admits_more_than_the_limit(backend: Backend) {
    const N: u64 = 20;
    let app = spawn_unlimited(backend).await;
    let issued = app
        .issue_with(|r| r.rate_limits = vec![requests_per_minute(N)])
        .await;
    let edge = edge(&app).await;
    let mut valid = 0;
    for _ in 0..3 * N {
        match edge_code(&edge, &issued.key, &[]).await {
            VerifyCode::Valid => valid += 1,
            VerifyCode::RateLimited => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let stats = edge.stats();
    assert_eq!(valid, N, "{stats:?}");
    assert!(
        stats.leased > 0,
        "some were admitted at the edge: {stats:?}"
    );
    // Neither is the server left any room by the edge.
    assert_eq!(
        code(&app.verify(&issued.key, &[]).await),
        VerifyCode::RateLimited
    );
    edge.shutdown().await;
}

/// A revoke drops the key's lease with its cached answer: once the event has reached the
/// edge, the next call is REVOKED, though the lease had room left.
async fn a_revoke_drops_the_lease(backend: Backend) {
    let app = spawn_unlimited(backend).await;
    let issued = app
        .issue_with(|r| r.rate_limits = vec![requests_per_minute(1000)])
        .await;
    let edge = edge(&app).await;
    for _ in 0..5 {
        assert_eq!(edge_code(&edge, &issued.key, &[]).await, VerifyCode::Valid);
    }
    assert!(edge.stats().leased >= 1, "{:?}", edge.stats());
    let events = edge.stats().events;
    revoke(&mut app.admin(), &key_id(&issued)).await;
    eventually!("the edge applies the revoke", edge.stats().events > events);
    assert_eq!(
        edge_code(&edge, &issued.key, &[]).await,
        VerifyCode::Revoked
    );
    edge.shutdown().await;
}

async fn an_answer_is_never_served_past_the_keys_expiry(backend: Backend) {
    let app = spawn_unlimited(backend).await;
    // Expires in half a second: inside the edge's expiry slack, so never served from
    // the cache, although it is valid now.
    let soon = app.clock.now() + 500_000;
    let expiring = app
        .issue_with(|r| {
            r.expires_at = Some(prost_types::Timestamp {
                seconds: soon / 1_000_000,
                nanos: ((soon % 1_000_000) * 1000) as i32,
            })
        })
        .await;
    let lasting = app
        .issue_with(|r| r.expires_at = Some(ts_in(&app.clock, 3600)))
        .await;
    let edge = edge(&app).await;

    for _ in 0..2 {
        assert_eq!(
            edge_code(&edge, &lasting.key, &["read"]).await,
            VerifyCode::Valid
        );
    }
    assert_eq!(edge.stats().server_calls, 1);
    for _ in 0..2 {
        // The server's (manual) clock has not reached the expiry: still valid there.
        assert_eq!(
            edge_code(&edge, &expiring.key, &["read"]).await,
            VerifyCode::Valid
        );
    }
    assert_eq!(edge.stats().server_calls, 3, "{:?}", edge.stats());
    edge.shutdown().await;
}

async fn a_revoke_reaches_the_edge(backend: Backend) {
    let app = spawn_unlimited(backend).await;
    let issued = app.issue().await;
    let edge = edge(&app).await;
    for _ in 0..2 {
        assert_eq!(
            edge_code(&edge, &issued.key, &["read"]).await,
            VerifyCode::Valid
        );
    }
    assert_eq!(edge.stats().hits, 1);

    revoke(&mut app.admin(), &key_id(&issued)).await;
    // While the cached VALID is there, the edge answers VALID; only the event drops it.
    eventually!(
        "the edge refuses the revoked key",
        edge_code(&edge, &issued.key, &["read"]).await == VerifyCode::Revoked
    );
    wait_caught_up(&app, &edge).await;
    assert!(edge.stats().events >= 1);

    // The REVOKED answer is an answer about an existing key: cached in turn.
    let calls = edge.stats().server_calls;
    assert_eq!(
        edge_code(&edge, &issued.key, &["read"]).await,
        VerifyCode::Revoked
    );
    assert_eq!(edge.stats().server_calls, calls);
    edge.shutdown().await;
}

async fn a_rotation_reaches_the_edge(backend: Backend) {
    let app = spawn_unlimited(backend).await;
    let immediate = app.issue().await;
    let graceful = app.issue().await;
    let edge = edge(&app).await;
    for key in [&immediate.key, &graceful.key] {
        for _ in 0..2 {
            assert_eq!(edge_code(&edge, key, &["read"]).await, VerifyCode::Valid);
        }
    }
    assert_eq!(edge.stats().server_calls, 2);

    // Without a grace period the old secret stops at once.
    let rotated = app
        .admin()
        .rotate_key(proto::RotateKeyRequest {
            key_id: key_id(&immediate),
            actor: Some(actor()),
            grace_period: None,
        })
        .await
        .unwrap()
        .into_inner();
    eventually!(
        "the edge refuses the rotated-out secret",
        edge_code(&edge, &immediate.key, &["read"]).await != VerifyCode::Valid
    );
    assert_eq!(
        edge_code(&edge, &rotated.key, &["read"]).await,
        VerifyCode::Valid
    );

    // With one, the old secret works until the grace period ends (announced by an event).
    app.admin()
        .rotate_key(proto::RotateKeyRequest {
            key_id: key_id(&graceful),
            actor: Some(actor()),
            grace_period: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        })
        .await
        .unwrap();
    wait_caught_up(&app, &edge).await;
    for _ in 0..2 {
        assert_eq!(
            edge_code(&edge, &graceful.key, &["read"]).await,
            VerifyCode::Valid
        );
    }
    app.clock.advance(Duration::from_secs(61));
    eventually!(
        "the edge refuses the old secret after its grace period",
        edge_code(&edge, &graceful.key, &["read"]).await == VerifyCode::Revoked
    );
    edge.shutdown().await;
}

async fn a_scope_change_reaches_the_edge(backend: Backend) {
    let app = spawn_unlimited(backend).await;
    let issued = app
        .issue_with(|r| r.scopes = vec!["write".to_owned()])
        .await;
    let edge = edge(&app).await;
    for _ in 0..2 {
        assert_eq!(
            edge_code(&edge, &issued.key, &["write"]).await,
            VerifyCode::Valid
        );
        assert_eq!(
            edge_code(&edge, &issued.key, &["admin"]).await,
            VerifyCode::InsufficientScope
        );
    }
    assert_eq!(edge.stats().server_calls, 2);

    let update = |scope: &str| proto::UpdateKeyRequest {
        key_id: key_id(&issued),
        actor: Some(actor()),
        scopes: vec![scope.to_owned()],
        update_mask: Some(FieldMask {
            paths: vec!["scopes".into()],
        }),
        ..Default::default()
    };
    app.admin().update_key(update("read")).await.unwrap();
    eventually!(
        "the edge refuses a scope the key lost",
        edge_code(&edge, &issued.key, &["write"]).await == VerifyCode::InsufficientScope
    );
    app.admin().update_key(update("admin")).await.unwrap();
    eventually!(
        "the edge grants a scope the key gained",
        edge_code(&edge, &issued.key, &["admin"]).await == VerifyCode::Valid
    );
    edge.shutdown().await;
}

async fn a_restart_is_resumed_without_losing_an_event(backend: Backend) {
    let mut app = spawn_unlimited(backend).await;
    let (a, b, c) = (app.issue().await, app.issue().await, app.issue().await);
    let edge = edge(&app).await;
    for key in [&a.key, &b.key] {
        for _ in 0..2 {
            assert_eq!(edge_code(&edge, key, &["read"]).await, VerifyCode::Valid);
        }
    }
    // An event, so that the edge has a seq of its own to resume from.
    revoke(&mut app.admin(), &key_id(&c)).await;
    wait_caught_up(&app, &edge).await;
    assert!(edge.lag().last_seq >= 1);

    let addr = stop_server(&mut app, &edge).await;
    // Disconnected, the cache is not used: B (cached VALID) goes to the server, and
    // there is none.
    let calls = edge.stats().server_calls;
    assert!(
        edge.verify(&b.key, &["read".to_owned()]).await.is_err(),
        "answered while no server was up"
    );
    assert_eq!(edge.stats().server_calls, calls + 1);

    // Meanwhile another replica revokes A.
    let other = start_server(&app, "127.0.0.1:0".parse().unwrap()).await;
    revoke(&mut admin_of(&other).await, &key_id(&a)).await;
    other.shutdown().await.unwrap();

    // The server comes back at the same address; the edge reconnects and resumes.
    app.server = Some(start_server(&app, addr).await);
    assert!(
        edge.wait_connected(DEADLINE).await,
        "the edge never came back"
    );
    assert_eq!(edge.lag().last_seq, head(&app).await);
    let stats = edge.stats();
    assert!(stats.streams >= 2, "{stats:?}");
    assert_eq!(stats.resets, 0, "{stats:?}");

    // The replayed event dropped A's cached VALID ...
    assert_eq!(
        edge_code(&edge, &a.key, &["read"]).await,
        VerifyCode::Revoked
    );
    // ... and nothing else: B is still served from the cache (no flush happened).
    let calls = edge.stats().server_calls;
    assert_eq!(edge_code(&edge, &b.key, &["read"]).await, VerifyCode::Valid);
    assert_eq!(edge.stats().server_calls, calls, "{:?}", edge.stats());
    edge.shutdown().await;
}

async fn a_reset_flushes_the_edge_cache(backend: Backend) {
    let mut app = spawn_unlimited(backend).await;
    let (a, b, c) = (app.issue().await, app.issue().await, app.issue().await);
    let edge = edge(&app).await;
    for key in [&a.key, &b.key] {
        for _ in 0..2 {
            assert_eq!(edge_code(&edge, key, &["read"]).await, VerifyCode::Valid);
        }
    }
    revoke(&mut app.admin(), &key_id(&c)).await;
    wait_caught_up(&app, &edge).await;
    let seen = edge.lag().last_seq;

    let addr = stop_server(&mut app, &edge).await;
    let other = start_server(&app, "127.0.0.1:0".parse().unwrap()).await;
    revoke(&mut admin_of(&other).await, &key_id(&b)).await;
    other.shutdown().await.unwrap();
    // Pruning took everything up to the head: the edge's cursor cannot be resumed.
    app.db
        .execute("UPDATE event_log SET pruned_through = head WHERE id = 1")
        .await;
    assert!(head(&app).await > seen);

    app.server = Some(start_server(&app, addr).await);
    assert!(
        edge.wait_connected(DEADLINE).await,
        "the edge never came back"
    );
    let stats = edge.stats();
    assert_eq!(stats.resets, 1, "{stats:?}");
    assert_eq!(edge.lag().last_seq, head(&app).await);

    // A had no event, yet its answer is gone from the cache: flushed.
    let calls = edge.stats().server_calls;
    assert_eq!(edge_code(&edge, &a.key, &["read"]).await, VerifyCode::Valid);
    assert_eq!(edge.stats().server_calls, calls + 1);
    assert_eq!(
        edge_code(&edge, &b.key, &["read"]).await,
        VerifyCode::Revoked
    );
    edge.shutdown().await;
}

async fn lag_follows_the_stream(backend: Backend) {
    let mut app = spawn_unlimited(backend).await;
    let issued = app.issue().await;
    let edge = edge(&app).await;
    let lag = edge.lag();
    assert!(lag.connected);
    assert_eq!(lag.last_seq, head(&app).await);
    assert!(lag.head_seq >= lag.last_seq);

    let mut admin = app.admin();
    for _ in 0..3 {
        admin
            .update_key(proto::UpdateKeyRequest {
                key_id: key_id(&issued),
                actor: Some(actor()),
                name: "renamed".into(),
                update_mask: Some(FieldMask {
                    paths: vec!["name".into()],
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert_eq!(head(&app).await, 3);
    wait_caught_up(&app, &edge).await;
    let lag = edge.lag();
    assert_eq!((lag.last_seq, lag.head_seq), (3, 3));
    assert!(edge.stats().events >= 3);

    stop_server(&mut app, &edge).await;
    let lag = edge.lag();
    assert!(!lag.connected);
    assert_eq!(lag.last_seq, 3);

    // Neither the key nor a token is ever printed.
    let debug = format!("{edge:?}");
    assert!(
        !debug.contains(&issued.key) && !debug.contains(EDGE_TOKEN),
        "{debug}"
    );
    edge.shutdown().await;
    assert!(!edge.lag().connected);
}

async fn verify_at(edge: &Verifier, key: &str, resource: &str, client_ip: &str) -> VerifyCode {
    code(
        &edge
            .verify_request(proto::VerifyKeyRequest {
                key: key.to_owned(),
                resource: resource.to_owned(),
                client_ip: client_ip.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap(),
    )
}

/// The edge passes the resource and the client address to the server, and caches each
/// answer under them: an answer for one model or address is never served for another,
/// and a change of the key's reach reaches the edge.
async fn resources_and_addresses_are_part_of_the_edge_answer(backend: Backend) {
    let app = spawn_unlimited(backend).await;
    let issued = app
        .issue_with(|r| {
            r.resource_access = Some(proto::ResourceAccess {
                mode: proto::ResourceAccessMode::Include as i32,
                targets: vec!["gpt-4o".into()],
                access_groups: vec![],
            });
            r.allowed_cidrs = vec!["10.0.0.0/8".into()];
        })
        .await;
    let edge = edge(&app).await;
    let cases = [
        ("gpt-4o", "10.1.2.3", VerifyCode::Valid),
        ("o3", "10.1.2.3", VerifyCode::ResourceForbidden),
        ("gpt-4o", "192.168.0.1", VerifyCode::IpForbidden),
        ("gpt-4o", "", VerifyCode::IpForbidden),
        ("", "10.1.2.3", VerifyCode::ResourceForbidden),
    ];
    for (resource, ip, want) in cases {
        assert_eq!(
            verify_at(&edge, &issued.key, resource, ip).await,
            want,
            "{resource} {ip}"
        );
    }
    assert_eq!(edge.stats().server_calls, 5);
    // The second round comes from the cache, each answer under its own request.
    for (resource, ip, want) in cases {
        assert_eq!(
            verify_at(&edge, &issued.key, resource, ip).await,
            want,
            "{resource} {ip}"
        );
    }
    assert_eq!(edge.stats().server_calls, 5);
    // A malformed address is the server's error, never a cached answer.
    let refused = edge
        .verify_request(proto::VerifyKeyRequest {
            key: issued.key.clone(),
            client_ip: "10.0.0.1/8".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // The key now reaches o3 too: the edge drops its answers at the event.
    app.admin()
        .update_key(proto::UpdateKeyRequest {
            key_id: key_id(&issued),
            actor: Some(actor()),
            resource_access: Some(proto::ResourceAccess {
                mode: proto::ResourceAccessMode::Include as i32,
                targets: vec!["gpt-4o".into(), "o3".into()],
                access_groups: vec![],
            }),
            update_mask: Some(FieldMask {
                paths: vec!["resource_access".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    eventually!(
        "the edge sees o3 allowed",
        verify_at(&edge, &issued.key, "o3", "10.1.2.3").await == VerifyCode::Valid
    );
    edge.shutdown().await;
}

both_backends!(
    resources_and_addresses_are_part_of_the_edge_answer,
    served_from_the_edge_cache_the_second_time,
    an_answer_is_never_served_past_the_keys_expiry,
    without_leases_answers_under_rate_limits_or_budgets_are_never_reused,
    answers_under_budgets_or_token_limits_are_never_reused,
    a_rate_limited_key_is_answered_from_its_lease_without_server_calls,
    the_usual_call_is_served_from_the_threads_copy_and_counts_down,
    an_edge_never_admits_more_than_the_limit,
    a_revoke_drops_the_lease,
    a_revoke_reaches_the_edge,
    a_rotation_reaches_the_edge,
    a_scope_change_reaches_the_edge,
    a_restart_is_resumed_without_losing_an_event,
    a_reset_flushes_the_edge_cache,
    lag_follows_the_stream,
);
