//! A replica cut off from Postgres stops vouching for its cache.
//!
//! Two replicas share one real Postgres database; replica B reaches it through a TCP
//! proxy of this test's that can blackhole the connection (every byte held, nothing
//! forwarded, new connections accepted and left hanging: what a partition looks like
//! from B). Keys are revoked, rotated and narrowed on replica A during the partition.
//! B, and an edge Verifier following B, may answer from their caches for at most the
//! freshness bound; then B answers UNAVAILABLE (EVENT_LOG_STALE), ends its streams,
//! refuses new ones and reports NOT_SERVING; once the partition heals, B catches up and
//! refuses what was revoked.
//!
//! Loopback only, and bounded: the partition lasts a few seconds.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use keywarden::edge::{EdgeConfig, Verifier as EdgeVerifier};
use keywarden::proto::{self, VerifyCode};
use keywarden::server::RunningServer;
use prost_types::FieldMask;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

/// B's freshness bound in this test.
const BOUND: Duration = Duration::from_secs(1);
/// What the bound may be exceeded by: the watchdog's tick (100 ms) and a loaded
/// machine's scheduling. Generous on purpose; the default bound is 3 s.
const SLACK: Duration = Duration::from_secs(1);

/// A TCP proxy that forwards to `upstream` until cut, then holds every byte (in both
/// directions, and of connections opened meanwhile) until healed.
struct Blackhole {
    addr: SocketAddr,
    open: watch::Sender<bool>,
}

impl Blackhole {
    async fn start(upstream: SocketAddr) -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, _) = watch::channel(true);
        let gate = open.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let gate = gate.subscribe();
                tokio::spawn(async move {
                    let mut wait = gate.clone();
                    if wait.wait_for(|open| *open).await.is_err() {
                        return;
                    }
                    let Ok(outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::spawn(pipe(ri, wo, gate.clone()));
                    tokio::spawn(pipe(ro, wi, gate));
                });
            }
        });
        Blackhole { addr, open }
    }

    fn cut(&self) {
        self.open.send_replace(false);
    }

    fn heal(&self) {
        self.open.send_replace(true);
    }
}

/// Copies `from` to `to`, holding what it read while the gate is shut.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if gate.wait_for(|open| *open).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if gate.wait_for(|open| *open).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// `url` with its host and port replaced by `addr`.
fn through(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (user, rest) = rest.split_once('@').unwrap();
    let (_, path) = rest.split_once('/').unwrap();
    format!("{scheme}://{user}@{addr}/{path}")
}

fn upstream_of(url: &str) -> SocketAddr {
    let rest = url.split_once('@').unwrap().1;
    let host_port = rest.split_once('/').unwrap().0;
    std::net::ToSocketAddrs::to_socket_addrs(host_port)
        .unwrap()
        .next()
        .unwrap()
}

async fn verify(
    channel: &Channel,
    key: &str,
    scopes: &[&str],
) -> Result<VerifyCode, tonic::Status> {
    let resp = verifier_on(channel)
        .verify_key(proto::VerifyKeyRequest {
            key: key.to_owned(),
            required_scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(code(&resp))
}

fn verifier_on(channel: &Channel) -> VerifierClient {
    keywarden::proto::verify_service_client::VerifyServiceClient::with_interceptor(
        channel.clone(),
        bearer(VERIFIER_TOKEN),
    )
}

async fn health(channel: &Channel, service: &str) -> ServingStatus {
    let resp = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(resp.status).unwrap()
}

fn assert_stale(status: &tonic::Status) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "EVENT_LOG_STALE");
    assert!(
        status.get_details_retry_info().is_some(),
        "a stale replica suggests a retry"
    );
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Doomed {
    revoked: String,
    rotated_away: String,
    narrowed: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_postgres_stops_vouching_within_the_bound_and_catches_up_after() {
    // No default limits: a VALID answer without a rate-limit decision is one the edge
    // library caches, so the edge's own cache is put to the test too.
    let app = TestApp::spawn_with(Backend::Postgres, |s| {
        s.default_limits = std::sync::Arc::new(Vec::new());
    })
    .await;
    let proxy = Blackhole::start(upstream_of(&app.db.url)).await;
    let mut settings = test_settings(&app.db);
    settings.default_limits = std::sync::Arc::new(Vec::new());
    settings.database_url = secrecy::SecretString::from(through(&app.db.url, proxy.addr));
    settings.events.max_staleness = Some(BOUND);
    let b: RunningServer = keywarden::server::start(&settings, app.clock.clone())
        .await
        .unwrap();
    let b_channel = channel_to(&b).await;
    let a = app.admin();

    let mut keys = Vec::new();
    for _ in 0..3 {
        keys.push(app.issue().await);
    }
    let key_id = |i: usize| keys[i].key_info.as_ref().unwrap().key_id.clone();
    let doomed = Doomed {
        revoked: keys[0].key.clone(),
        rotated_away: keys[1].key.clone(),
        narrowed: keys[2].key.clone(),
    };
    let all = [
        (&doomed.revoked, VerifyCode::Revoked),
        (&doomed.rotated_away, VerifyCode::Revoked),
        (&doomed.narrowed, VerifyCode::InsufficientScope),
    ];
    // B caches every key, and an edge node following B caches B's answers.
    for (key, _) in &all {
        assert_eq!(
            verify(&b_channel, key, &["read"]).await.unwrap(),
            VerifyCode::Valid
        );
    }
    let mut edge_config = EdgeConfig::new(VERIFIER_TOKEN, EDGE_TOKEN);
    edge_config.backoff_min = Duration::from_millis(50);
    edge_config.backoff_max = Duration::from_millis(200);
    let edge = EdgeVerifier::connect(b_channel.clone(), edge_config).unwrap();
    assert!(edge.wait_connected(Duration::from_secs(10)).await);
    let read = ["read".to_owned()];
    for (key, _) in &all {
        assert!(edge.verify(key, &read).await.unwrap().valid);
        assert!(edge.verify(key, &read).await.unwrap().valid);
    }
    assert!(
        edge.stats().hits >= 3,
        "the edge serves B's answers from its cache"
    );
    let mut stream = edge_client(b_channel.clone(), EDGE_TOKEN)
        .watch_revocations(proto::WatchRevocationsRequest {
            after_seq: 0,
            workspace_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        stream.message().await.unwrap().is_some(),
        "a first heartbeat"
    );

    // The partition; then the revoke, the rotation and the narrowing, on A.
    proxy.cut();
    let cut_at = Instant::now();
    a.clone()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: key_id(0),
            actor: Some(actor()),
            reason: "compromised".into(),
        })
        .await
        .unwrap();
    a.clone()
        .rotate_key(proto::RotateKeyRequest {
            key_id: key_id(1),
            actor: Some(actor()),
            grace_period: None,
        })
        .await
        .unwrap();
    a.clone()
        .update_key(proto::UpdateKeyRequest {
            key_id: key_id(2),
            actor: Some(actor()),
            scopes: Vec::new(),
            update_mask: Some(FieldMask {
                paths: vec!["scopes".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();

    // B and the edge: VALID from their caches for at most the bound, then UNAVAILABLE.
    let mut last_valid = None;
    let mut edge_last_valid = None;
    let watch_until = cut_at + BOUND + SLACK + Duration::from_secs(1);
    while Instant::now() < watch_until {
        for (key, _) in &all {
            // Timed from when the call was sent: the answer was decided after it, and a
            // slow reply on a loaded machine must not count as late vouching.
            let sent = Instant::now();
            match verify(&b_channel, key, &["read"]).await {
                Ok(VerifyCode::Valid) => last_valid = Some(sent),
                Ok(other) => panic!("B cannot know {other:?} during the partition"),
                Err(status) => assert_stale(&status),
            }
            let sent = Instant::now();
            match edge.verify(key, &read).await {
                Ok(answer) if answer.valid => edge_last_valid = Some(sent),
                Ok(answer) => panic!("the edge cannot know {:?} yet", answer.code()),
                Err(status) => assert_stale(&status),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let last_valid = last_valid.expect("B answered from its cache at first");
    assert!(
        last_valid.duration_since(cut_at) <= BOUND + SLACK,
        "B vouched {:?} into the partition (bound {BOUND:?})",
        last_valid.duration_since(cut_at)
    );
    if let Some(at) = edge_last_valid {
        assert!(
            at.duration_since(cut_at) <= BOUND + SLACK,
            "the edge vouched {:?} into the partition",
            at.duration_since(cut_at)
        );
    }
    // Now, and for as long as the partition lasts: every well-formed key is refused
    // with a retry, health says B cannot vouch, its streams ended, new ones are refused.
    for (key, _) in &all {
        assert_stale(&verify(&b_channel, key, &["read"]).await.unwrap_err());
        assert_stale(&edge.verify(key, &read).await.unwrap_err());
    }
    assert_eq!(
        verify(&b_channel, "kw_live_not-a-key", &[]).await.unwrap(),
        VerifyCode::Malformed,
        "a malformed key needs no log"
    );
    for service in [
        "keywarden.v1.VerifyService",
        "keywarden.v1.RevocationService",
    ] {
        assert_eq!(health(&b_channel, service).await, ServingStatus::NotServing);
    }
    assert_eq!(
        health(&b_channel, "").await,
        ServingStatus::Serving,
        "liveness: a replica waiting for its database is not one to restart"
    );
    let ended = loop {
        match stream.message().await {
            Ok(Some(_heartbeat_or_event)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_stale(&ended);
    let info = ended.get_details_error_info().unwrap();
    assert!(info.metadata.contains_key("after_seq"), "{info:?}");
    let refused = edge_client(b_channel.clone(), EDGE_TOKEN)
        .watch_revocations(proto::WatchRevocationsRequest {
            after_seq: 0,
            workspace_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_stale(&refused);
    assert!(!edge.lag().connected, "the edge knows it is not caught up");

    // The partition heals: B catches up, then vouches again with what it missed.
    proxy.heal();
    for (key, want) in &all {
        eventually(&format!("B to answer {want:?}"), async || {
            verify(&b_channel, key, &["read"]).await.ok() == Some(*want)
        })
        .await;
    }
    for service in [
        "keywarden.v1.VerifyService",
        "keywarden.v1.RevocationService",
    ] {
        eventually(&format!("{service} SERVING again"), async || {
            health(&b_channel, service).await == ServingStatus::Serving
        })
        .await;
    }
    for (key, want) in &all {
        eventually(
            &format!("the edge to answer {want:?}"),
            async || matches!(edge.verify(key, &read).await, Ok(a) if a.code() == *want),
        )
        .await;
    }
    assert!(edge.wait_connected(Duration::from_secs(10)).await);
    edge.shutdown().await;
    b.shutdown().await.unwrap();
}
