//! WatchRevocations against real servers and real tonic clients: what each mutation
//! emits, replicas invalidating each other's caches through the log, resume without gap
//! or duplicate (after a disconnect, a restart, a cut-off for falling behind), lost
//! notifications, concurrent writers on two replicas, seq order = commit order,
//! retention and RESET, grace-period ends, the workspace filter, and validation.
//!
//! Nothing here sleeps to assert: every wait is a bounded poll or a bounded read.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use keywarden::api::convert::timestamp;
use keywarden::config::Settings;
use keywarden::domain::key_format::KeyHash;
use keywarden::proto::watch_revocations_response::Message;
use keywarden::proto::{self, KeyEventKind, VerifyCode, WatchRevocationsRequest};
use keywarden::server::RunningServer;
use keywarden::store::AuditContext;
use prost_types::FieldMask;
use sqlx::Connection;
use tokio::time::{Instant, timeout};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

/// How long any one wait may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);

type Watch = Streaming<proto::WatchRevocationsResponse>;

// ---------------------------------------------------------------------------------------
// Streams

async fn watch(mut edge: EdgeClient, after_seq: i64, workspace_id: &str) -> Watch {
    edge.watch_revocations(WatchRevocationsRequest {
        after_seq,
        workspace_id: workspace_id.to_owned(),
    })
    .await
    .expect("WatchRevocations")
    .into_inner()
}

/// The next message, or the status the stream ended with. A clean end or silence past
/// the deadline fails the test.
async fn next_message(stream: &mut Watch) -> Result<Message, Status> {
    match timeout(DEADLINE, stream.message()).await {
        Err(_) => panic!("no message within {DEADLINE:?}"),
        Ok(Ok(Some(response))) => Ok(response.message.expect("a response carries a message")),
        Ok(Ok(None)) => panic!("the stream ended without a status"),
        Ok(Err(status)) => Err(status),
    }
}

/// The first message of a stream opened with `after_seq = 0` must be a heartbeat: its
/// head is where the stream starts.
async fn first_heartbeat(stream: &mut Watch) -> i64 {
    match next_message(stream).await {
        Ok(Message::Heartbeat(h)) => {
            assert!(h.sent_at.is_some());
            h.head_seq
        }
        other => panic!("expected a heartbeat first, got {other:?}"),
    }
}

/// The next event, skipping heartbeats.
async fn next_event(stream: &mut Watch) -> proto::KeyEvent {
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < deadline, "no event within {DEADLINE:?}");
        match next_message(stream).await {
            Ok(Message::Event(e)) => return e,
            Ok(Message::Heartbeat(_)) => {}
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

async fn next_events(stream: &mut Watch, n: usize) -> Vec<proto::KeyEvent> {
    let mut events = Vec::with_capacity(n);
    while events.len() < n {
        events.push(next_event(stream).await);
    }
    events
}

/// Every event until a heartbeat whose head is at least `head`: the stream then claims
/// the subscriber has seen everything up to it, so whatever it sent is all it will send
/// up to there (extras and duplicates show up here).
async fn events_through(stream: &mut Watch, head: i64) -> Vec<proto::KeyEvent> {
    let deadline = Instant::now() + DEADLINE;
    let mut events = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "no heartbeat at {head} within {DEADLINE:?}; events so far: {:?}",
            seqs(&events)
        );
        match next_message(stream).await {
            Ok(Message::Event(e)) => events.push(e),
            Ok(Message::Heartbeat(h)) if h.head_seq >= head => return events,
            Ok(Message::Heartbeat(_)) => {}
            other => panic!("expected events and heartbeats, got {other:?}"),
        }
    }
}

/// Every event until the stream ends with a status. Heartbeats are skipped and are no
/// progress: a stream that only beats for [`DEADLINE`] fails the test.
async fn events_until_error(stream: &mut Watch) -> (Vec<proto::KeyEvent>, Status) {
    let mut events = Vec::new();
    let mut progress = Instant::now();
    loop {
        match next_message(stream).await {
            Ok(Message::Event(e)) => {
                events.push(e);
                progress = Instant::now();
            }
            Ok(Message::Heartbeat(h)) => assert!(
                progress.elapsed() < DEADLINE,
                "the stream did not end: only heartbeats (at {}) for {DEADLINE:?} after {} events",
                h.head_seq,
                events.len()
            ),
            Ok(Message::Reset(r)) => panic!("unexpected reset: {r:?}"),
            Err(status) => return (events, status),
        }
    }
}

fn seqs(events: &[proto::KeyEvent]) -> Vec<i64> {
    events.iter().map(|e| e.seq).collect()
}

fn key_ids(events: &[proto::KeyEvent]) -> Vec<String> {
    events.iter().map(|e| e.key_id.clone()).collect()
}

/// `events` are exactly `after + 1, after + 2, ...`: in order, no gap, no duplicate.
#[track_caller]
fn assert_follows(events: &[proto::KeyEvent], after: i64) {
    let expected: Vec<i64> = (1..=events.len() as i64).map(|i| after + i).collect();
    assert_eq!(seqs(events), expected, "events after seq {after}");
}

/// The `after_seq=N` a stream-ending status names.
#[track_caller]
fn resume_seq(status: &Status) -> i64 {
    let message = status.message();
    let at = message
        .find("after_seq=")
        .unwrap_or_else(|| panic!("the status names no cursor: {status:?}"))
        + "after_seq=".len();
    let digits: String = message[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap()
}

/// A channel whose streams accept only 1 KiB until read: a subscriber that does not read
/// stops the server's sends almost at once, as a stalled edge node would.
async fn stalled_channel(server: &RunningServer) -> Channel {
    Endpoint::from_shared(format!("http://{}", server.addr()))
        .unwrap()
        .initial_stream_window_size(Some(1024))
        .connect()
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Keys

fn key_id_of(issued: &proto::IssueKeyResponse) -> String {
    issued.key_info.as_ref().unwrap().key_id.clone()
}

fn hash_hex(key: &str) -> String {
    KeyHash::of(key).to_hex()
}

async fn issue_in(admin: &AdminClient, workspace_id: &str) -> proto::IssueKeyResponse {
    admin
        .clone()
        .issue_key(issue_request(workspace_id))
        .await
        .unwrap()
        .into_inner()
}

/// `n` keys in `ws_test`, issued from a few tasks at once. Their ids.
async fn issue_many(admin: &AdminClient, n: usize) -> Vec<String> {
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let admin = admin.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for _ in (t..n).step_by(8) {
                    ids.push(key_id_of(&issue_in(&admin, "ws_test").await));
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    ids
}

async fn revoke(admin: &AdminClient, key_id: &str) -> proto::KeyInfo {
    admin
        .clone()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: key_id.to_owned(),
            actor: Some(actor()),
            reason: "compromised".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap()
}

async fn rotate(admin: &AdminClient, key_id: &str, grace_seconds: i64) -> proto::RotateKeyResponse {
    admin
        .clone()
        .rotate_key(proto::RotateKeyRequest {
            key_id: key_id.to_owned(),
            actor: Some(actor()),
            grace_period: Some(prost_types::Duration {
                seconds: grace_seconds,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn set_scopes(admin: &AdminClient, key_id: &str, scopes: &[&str]) {
    admin
        .clone()
        .update_key(proto::UpdateKeyRequest {
            key_id: key_id.to_owned(),
            actor: Some(actor()),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            update_mask: Some(FieldMask {
                paths: vec!["scopes".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn delete(admin: &AdminClient, key_id: &str) {
    admin
        .clone()
        .delete_key(proto::DeleteKeyRequest {
            key_id: key_id.to_owned(),
            actor: Some(actor()),
        })
        .await
        .unwrap();
}

async fn verify_code(verifier: &VerifierClient, key: &str, scopes: &[&str]) -> VerifyCode {
    let resp = verifier
        .clone()
        .verify_key(proto::VerifyKeyRequest {
            key: key.to_owned(),
            required_scopes: scopes.iter().map(|s| s.to_string()).collect(),
            cost: 0,
            resource: String::new(),
            client_ip: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    code(&resp)
}

async fn log_head(db: &TestDb) -> i64 {
    db.count("SELECT head FROM event_log WHERE id = 1").await
}

fn audit_context() -> AuditContext {
    AuditContext {
        actor_id: "user_admin".into(),
        caller: "test".into(),
        action: "key.revoke",
        detail: String::new(),
    }
}

// ---------------------------------------------------------------------------------------
// Replicas

/// Another server over the same database, sharing the test's manual clock.
struct Replica {
    server: RunningServer,
    channel: Channel,
}

impl Replica {
    async fn start(app: &TestApp, adjust: impl FnOnce(&mut Settings)) -> Replica {
        let mut settings = test_settings(&app.db);
        adjust(&mut settings);
        let server = keywarden::server::start(&settings, app.clock.clone())
            .await
            .unwrap();
        let channel = channel_to(&server).await;
        Replica { server, channel }
    }

    fn admin(&self) -> AdminClient {
        proto::key_service_client::KeyServiceClient::with_interceptor(
            self.channel.clone(),
            bearer(ADMIN_TOKEN),
        )
    }

    fn verifier(&self) -> VerifierClient {
        proto::verify_service_client::VerifyServiceClient::with_interceptor(
            self.channel.clone(),
            bearer(VERIFIER_TOKEN),
        )
    }

    fn edge(&self) -> EdgeClient {
        edge_client(self.channel.clone(), EDGE_TOKEN)
    }
}

// ---------------------------------------------------------------------------------------
// 1. What each mutation emits

async fn each_mutation_emits_one_event_and_issue_none(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let admin = app.admin();
    // One event before anybody listens, so that the head is not 0.
    let before = app.issue().await;
    revoke(&admin, &key_id_of(&before)).await;
    wait_published(app.server(), 1).await;

    let mut stream = watch(app.edge(), 0, "").await;
    let head = first_heartbeat(&mut stream).await;
    assert_eq!(head, 1, "the first heartbeat carries the head");
    assert_eq!(head, log_head(&app.db).await);

    let issued = app.issue().await;
    let key_id = key_id_of(&issued);
    assert_eq!(log_head(&app.db).await, head, "IssueKey appends no event");

    app.clock.advance(Duration::from_secs(1));
    revoke(&admin, &key_id).await;
    let e = next_event(&mut stream).await;
    assert_eq!(e.seq, head + 1);
    assert_eq!(e.kind(), KeyEventKind::Revoked);
    assert_eq!(e.key_id, key_id);
    assert_eq!(e.workspace_id, "ws_test");
    assert_eq!(e.key_hash, hash_hex(&issued.key));
    assert_eq!(e.occurred_at, Some(timestamp(app.clock.now())));
    assert_eq!(e.stale_key_hashes, [hash_hex(&issued.key)]);

    // Revoking a revoked key changes nothing: no event (the next one is head + 2).
    app.clock.advance(Duration::from_secs(1));
    revoke(&admin, &key_id).await;

    let old = app.issue_with(|r| r.workspace_id = "ws_other".into()).await;
    let other_id = key_id_of(&old);
    app.clock.advance(Duration::from_secs(1));
    let rotated = rotate(&admin, &other_id, 3600).await;
    let e = next_event(&mut stream).await;
    assert_eq!(e.seq, head + 2, "the second revoke emitted nothing");
    assert_eq!(e.kind(), KeyEventKind::Rotated);
    assert_eq!(e.key_id, other_id);
    assert_eq!(e.workspace_id, "ws_other");
    assert_eq!(
        e.key_hash,
        hash_hex(&old.key),
        "a rotation names the old secret"
    );
    assert_eq!(e.occurred_at, Some(timestamp(app.clock.now())));
    assert!(e.stale_key_hashes.contains(&hash_hex(&old.key)));

    app.clock.advance(Duration::from_secs(1));
    set_scopes(&admin, &other_id, &[]).await;
    let e = next_event(&mut stream).await;
    assert_eq!(e.seq, head + 3);
    assert_eq!(e.kind(), KeyEventKind::Updated);
    assert_eq!(e.key_id, other_id);
    assert_eq!(e.workspace_id, "ws_other");
    assert_eq!(e.key_hash, hash_hex(&rotated.key));
    assert_eq!(e.occurred_at, Some(timestamp(app.clock.now())));
    assert!(e.stale_key_hashes.contains(&hash_hex(&old.key)));
    assert!(e.stale_key_hashes.contains(&hash_hex(&rotated.key)));

    app.clock.advance(Duration::from_secs(1));
    delete(&admin, &other_id).await;
    let e = next_event(&mut stream).await;
    assert_eq!(e.seq, head + 4);
    assert_eq!(e.kind(), KeyEventKind::Deleted);
    assert_eq!(e.key_id, other_id);
    assert_eq!(e.workspace_id, "ws_other");
    assert_eq!(e.key_hash, hash_hex(&rotated.key));
    assert_eq!(e.occurred_at, Some(timestamp(app.clock.now())));

    // Nothing else was emitted: the next heartbeat finds nothing more.
    assert_eq!(
        seqs(&events_through(&mut stream, head + 4).await),
        [0i64; 0]
    );
    assert_eq!(log_head(&app.db).await, head + 4);
}

// ---------------------------------------------------------------------------------------
// 2. Replicas follow each other through the log

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutation_on_one_replica_reaches_the_other_replicas_cache_and_subscribers() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let a = app.admin();
    let b = Replica::start(&app, |_| {}).await;
    let mut stream = watch(b.edge(), 0, "").await;
    let head = first_heartbeat(&mut stream).await;

    // Revoke.
    let issued = app.issue().await;
    assert_eq!(
        verify_code(&b.verifier(), &issued.key, &[]).await,
        VerifyCode::Valid
    );
    assert!(
        matches!(
            b.server.cache().get(&KeyHash::of(&issued.key)),
            keywarden::cache::Lookup::Hit(_)
        ),
        "B serves the key from its cache"
    );
    revoke(&a, &key_id_of(&issued)).await;
    eventually("B to refuse the revoked key", async || {
        verify_code(&b.verifier(), &issued.key, &[]).await == VerifyCode::Revoked
    })
    .await;
    let e = next_event(&mut stream).await;
    assert_eq!(e.seq, head + 1);
    assert_eq!(e.kind(), KeyEventKind::Revoked);
    assert_eq!(e.key_id, key_id_of(&issued));
    assert_eq!(e.key_hash, hash_hex(&issued.key));

    // Rotate without grace: the old secret stops at once.
    let issued = app.issue().await;
    assert_eq!(
        verify_code(&b.verifier(), &issued.key, &[]).await,
        VerifyCode::Valid
    );
    let rotated = rotate(&a, &key_id_of(&issued), 0).await;
    eventually("B to refuse the rotated-away secret", async || {
        verify_code(&b.verifier(), &issued.key, &[]).await == VerifyCode::Revoked
    })
    .await;
    assert_eq!(
        verify_code(&b.verifier(), &rotated.key, &[]).await,
        VerifyCode::Valid
    );
    // The rotation, then (the grace period being 0) the announcement of its end.
    let events = next_events(&mut stream, 2).await;
    assert_follows(&events, head + 1);
    for e in &events {
        assert_eq!(e.kind(), KeyEventKind::Rotated);
        assert_eq!(e.key_id, key_id_of(&issued));
        assert_eq!(e.key_hash, hash_hex(&issued.key));
    }

    // A scope removed.
    let issued = app.issue().await;
    assert_eq!(
        verify_code(&b.verifier(), &issued.key, &["read"]).await,
        VerifyCode::Valid
    );
    set_scopes(&a, &key_id_of(&issued), &[]).await;
    eventually("B to see the scope removed", async || {
        verify_code(&b.verifier(), &issued.key, &["read"]).await == VerifyCode::InsufficientScope
    })
    .await;
    let e = next_event(&mut stream).await;
    assert_eq!(e.seq, head + 4);
    assert_eq!(e.kind(), KeyEventKind::Updated);
    assert_eq!(e.key_id, key_id_of(&issued));
    assert_eq!(e.key_hash, hash_hex(&issued.key));
}

// ---------------------------------------------------------------------------------------
// 3. Resume after a disconnect

async fn a_resumed_subscriber_gets_exactly_what_it_missed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let admin = app.admin();
    let keys = issue_many(&admin, 10).await;
    let mut stream = watch(app.edge(), 0, "").await;
    let head = first_heartbeat(&mut stream).await;
    for k in &keys[..3] {
        revoke(&admin, k).await;
    }
    let seen = next_events(&mut stream, 3).await;
    assert_follows(&seen, head);
    assert_eq!(key_ids(&seen), keys[..3]);
    let last = seen.last().unwrap().seq;
    drop(stream);
    eventually("the server to notice the disconnect", async || {
        app.server().events().subscribers() == 0
    })
    .await;

    for k in &keys[3..7] {
        revoke(&admin, k).await;
    }
    let mut resumed = watch(app.edge(), last, "").await;
    let missed = events_through(&mut resumed, last + 4).await;
    assert_follows(&missed, last);
    assert_eq!(
        key_ids(&missed),
        keys[3..7],
        "the missed events, in order, once"
    );

    for k in &keys[7..] {
        revoke(&admin, k).await;
    }
    let live = events_through(&mut resumed, last + 7).await;
    assert_follows(&live, last + 4);
    assert_eq!(key_ids(&live), keys[7..], "then the live ones");
}

// ---------------------------------------------------------------------------------------
// 4. Server restart mid-stream

async fn a_subscriber_resumes_across_a_server_restart(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let keys = issue_many(&app.admin(), 6).await;
    // Postgres: another replica keeps writing while the subscriber's server is down.
    // SQLite (single node): the store is written directly while the server is down.
    let other = match backend {
        Backend::Postgres => Some(Replica::start(&app, |_| {}).await),
        Backend::Sqlite => None,
    };

    let mut stream = watch(app.edge(), 0, "").await;
    let head = first_heartbeat(&mut stream).await;
    for k in &keys[..2] {
        revoke(&app.admin(), k).await;
    }
    let seen = next_events(&mut stream, 2).await;
    assert_follows(&seen, head);
    let last = seen.last().unwrap().seq;

    let server = app.server.take().unwrap();
    timeout(DEADLINE, server.shutdown())
        .await
        .expect("the server shuts down with a subscriber connected")
        .unwrap();
    let (more, status) = events_until_error(&mut stream).await;
    assert!(more.is_empty(), "{more:?}");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(resume_seq(&status), last, "{status:?}");

    match &other {
        Some(b) => {
            for k in &keys[2..5] {
                revoke(&b.admin(), k).await;
            }
        }
        None => {
            let store = keywarden::store::open(&app.db.url, 2).await.unwrap();
            for k in &keys[2..5] {
                store
                    .revoke_key(k, "compromised", app.clock.now(), &audit_context())
                    .await
                    .unwrap();
            }
        }
    }

    let restarted = keywarden::server::start(&test_settings(&app.db), app.clock.clone())
        .await
        .unwrap();
    let channel = channel_to(&restarted).await;
    let mut resumed = watch(edge_client(channel.clone(), EDGE_TOKEN), last, "").await;
    let missed = events_through(&mut resumed, last + 3).await;
    assert_follows(&missed, last);
    assert_eq!(
        key_ids(&missed),
        keys[2..5],
        "none lost while the server was down"
    );

    let admin =
        proto::key_service_client::KeyServiceClient::with_interceptor(channel, bearer(ADMIN_TOKEN));
    revoke(&admin, &keys[5]).await;
    let live = events_through(&mut resumed, last + 4).await;
    assert_follows(&live, last + 3);
    assert_eq!(live[0].key_id, keys[5]);
}

/// A subscriber still replaying the log when the server shuts down (here: one that is
/// not reading, so the replay waits for room) must neither hold the shutdown up forever
/// nor miss the shutdown: once it reads, it gets what was queued, then UNAVAILABLE naming
/// its cursor, and resumes from there on the next server.
async fn shutdown_ends_a_stream_that_is_still_replaying(backend: Backend) {
    const N: i64 = 5000;
    let mut app = TestApp::spawn(backend).await;
    let head = log_head(&app.db).await;
    let now = app.clock.now();
    // The log, written in bulk behind the server's back.
    let bulk = match backend {
        Backend::Postgres => format!(
            "INSERT INTO key_events (seq, kind, key_id, workspace_id, key_hash, stale_hashes, \
             occurred_at) SELECT s, 'revoked', 'key_bulk_' || s, 'ws_bulk', \
             sha256(s::text::bytea), '', {now} FROM generate_series({}, {}) AS s",
            head + 1,
            head + N
        ),
        Backend::Sqlite => format!(
            "WITH RECURSIVE s(x) AS (SELECT {} UNION ALL SELECT x + 1 FROM s WHERE x < {}) \
             INSERT INTO key_events (seq, kind, key_id, workspace_id, key_hash, stale_hashes, \
             occurred_at) SELECT x, 'revoked', 'key_bulk_' || x, 'ws_bulk', randomblob(32), '', \
             {now} FROM s",
            head + 1,
            head + N
        ),
    };
    app.db.execute(&bulk).await;
    app.db
        .execute(&format!(
            "UPDATE event_log SET head = {} WHERE id = 1",
            head + N
        ))
        .await;
    wait_published(app.server(), head + N).await;

    // Resume from the first bulk event (0 would mean "from now").
    let from = head + 1;
    let stalled = stalled_channel(app.server()).await;
    let mut stream = watch(edge_client(stalled, EDGE_TOKEN), from, "").await;
    eventually("the subscription to start", async || {
        app.server().events().subscribers() == 1
    })
    .await;

    let mut stopped = app.server().events().stopping();
    let server = app.server.take().unwrap();
    let shutdown = tokio::spawn(server.shutdown());
    timeout(DEADLINE, stopped.wait_for(|s| *s))
        .await
        .expect("the server to begin shutting down")
        .unwrap();

    let (events, status) = events_until_error(&mut stream).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_follows(&events, from);
    let cursor = resume_seq(&status);
    assert_eq!(cursor, events.last().map_or(from, |e| e.seq), "{status:?}");
    assert!(
        cursor < head + N,
        "the replay was still going when the server stopped"
    );
    timeout(DEADLINE, shutdown)
        .await
        .expect("the shutdown completes")
        .unwrap()
        .unwrap();

    let restarted = keywarden::server::start(&test_settings(&app.db), app.clock.clone())
        .await
        .unwrap();
    let mut resumed = watch(
        edge_client(channel_to(&restarted).await, EDGE_TOKEN),
        cursor,
        "",
    )
    .await;
    let rest = events_through(&mut resumed, head + N).await;
    assert_follows(&rest, cursor);
    assert_eq!(rest.last().unwrap().seq, head + N);
}

// ---------------------------------------------------------------------------------------
// 5. A slow subscriber is cut off; nobody else waits for it

async fn a_slow_subscriber_is_cut_off_and_catches_up_from_the_log(backend: Backend) {
    const N: usize = 500;
    let app = TestApp::spawn_with(backend, |s| s.events.subscriber_lag = 16).await;
    let admin = app.admin();
    let keys = issue_many(&admin, N).await;
    let control = app.issue().await;
    let revoked_key = app.issue().await;
    revoke(&admin, &key_id_of(&revoked_key)).await;
    wait_published(app.server(), log_head(&app.db).await).await;

    let mut fast = watch(app.edge(), 0, "").await;
    let head = first_heartbeat(&mut fast).await;
    let mut slow = watch(
        edge_client(stalled_channel(app.server()).await, EDGE_TOKEN),
        0,
        "",
    )
    .await;
    assert_eq!(first_heartbeat(&mut slow).await, head);

    // The fast subscriber reads as the events come.
    let reader = tokio::spawn(async move {
        let mut events = Vec::new();
        while events.len() < N {
            match timeout(DEADLINE, fast.message()).await {
                Ok(Ok(Some(r))) => {
                    if let Some(Message::Event(e)) = r.message {
                        events.push(e);
                    }
                }
                other => panic!("the fast subscriber's stream failed: {other:?}"),
            }
        }
        events
    });

    let verifier = app.verifier();
    for (i, k) in keys.iter().enumerate() {
        revoke(&admin, k).await;
        if i % 50 == 0 {
            assert_eq!(
                verify_code(&verifier, &control.key, &[]).await,
                VerifyCode::Valid
            );
            assert_eq!(
                verify_code(&verifier, &revoked_key.key, &[]).await,
                VerifyCode::Revoked
            );
        }
    }
    let fast_events = timeout(DEADLINE, reader).await.unwrap().unwrap();
    assert_follows(&fast_events, head);
    assert_eq!(
        key_ids(&fast_events),
        keys,
        "the fast subscriber got everything"
    );

    let (got, status) = events_until_error(&mut slow).await;
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    use tonic_types::StatusExt;
    assert_eq!(
        status.get_details_error_info().map(|i| i.reason),
        Some("STREAM_SUBSCRIBER_TOO_SLOW".to_owned())
    );
    assert!(got.len() < N, "the slow subscriber was cut off");
    assert_follows(&got, head);
    let cursor = resume_seq(&status);
    assert_eq!(
        cursor,
        got.last().map_or(head, |e| e.seq),
        "ABORTED names the last seq delivered: {status:?}"
    );

    let mut resumed = watch(app.edge(), cursor, "").await;
    let rest = events_through(&mut resumed, head + N as i64).await;
    assert_follows(&rest, cursor);
    let all: Vec<String> = key_ids(&got).into_iter().chain(key_ids(&rest)).collect();
    assert_eq!(all, keys, "nothing missed, nothing twice");
}

// ---------------------------------------------------------------------------------------
// Heartbeats

/// A heartbeat tells the subscriber it has seen everything up to `head_seq`: no event at
/// or below it may come after it. With heartbeats every millisecond, a heartbeat that
/// reports what the replica published rather than what this stream delivered shows up.
async fn a_heartbeat_never_claims_an_event_not_yet_delivered(backend: Backend) {
    const N: usize = 200;
    let app = TestApp::spawn_with(backend, |s| {
        s.events.heartbeat_interval = Duration::from_millis(1);
    })
    .await;
    let admin = app.admin();
    let keys = issue_many(&admin, N).await;
    let mut stream = watch(app.edge(), 0, "").await;
    let head = first_heartbeat(&mut stream).await;
    let reader = tokio::spawn(async move {
        let mut events: Vec<proto::KeyEvent> = Vec::new();
        let mut heartbeat = head;
        while events.len() < N {
            match next_message(&mut stream).await {
                Ok(Message::Event(e)) => {
                    assert!(
                        e.seq > heartbeat,
                        "event {} came after a heartbeat at {heartbeat}",
                        e.seq
                    );
                    events.push(e);
                }
                Ok(Message::Heartbeat(h)) => {
                    assert!(h.head_seq >= heartbeat, "heartbeats never go back");
                    heartbeat = h.head_seq;
                }
                other => panic!("{other:?}"),
            }
        }
        events
    });
    for k in &keys {
        revoke(&admin, k).await;
    }
    let events = timeout(DEADLINE, reader).await.unwrap().unwrap();
    assert_follows(&events, head);
}

// ---------------------------------------------------------------------------------------
// 6. Lost notifications

async fn kill_listeners(db: &TestDb) -> i64 {
    db.count(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .await
}

async fn listeners(db: &TestDb) -> i64 {
    db.count(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_a_replica_whose_listener_was_killed() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let b = Replica::start(&app, |_| {}).await;
    eventually("both replicas to LISTEN", async || {
        listeners(&app.db).await == 2
    })
    .await;
    let mut stream = watch(b.edge(), 0, "").await;
    let head = first_heartbeat(&mut stream).await;
    let issued = app.issue().await;

    assert_eq!(kill_listeners(&app.db).await, 2);
    revoke(&app.admin(), &key_id_of(&issued)).await;
    let e = next_event(&mut stream).await;
    assert_eq!(e.seq, head + 1);
    assert_eq!(e.key_id, key_id_of(&issued));
    assert_eq!(
        verify_code(&b.verifier(), &issued.key, &[]).await,
        VerifyCode::Revoked
    );
}

/// Without the poll (an hour apart here), only the listener can wake replica B: it must
/// reconnect after its connection is killed, catch up on what it missed meanwhile, and
/// hear the notifications after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_listens_again_after_its_listener_was_killed() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let b = Replica::start(&app, |s| {
        s.events.poll_interval = Duration::from_secs(3600);
        // The freshness bound's own reads would wake B too (tests/partition.rs covers it).
        s.events.max_staleness = None;
    })
    .await;
    eventually("both replicas to LISTEN", async || {
        listeners(&app.db).await == 2
    })
    .await;
    let mut stream = watch(b.edge(), 0, "").await;
    let head = first_heartbeat(&mut stream).await;
    let first = app.issue().await;
    let second = app.issue().await;

    assert_eq!(kill_listeners(&app.db).await, 2);
    // Probably before B listens again: reaches B when it reconnects.
    revoke(&app.admin(), &key_id_of(&first)).await;
    let e = next_event(&mut stream).await;
    assert_eq!(
        (e.seq, e.key_id.as_str()),
        (head + 1, key_id_of(&first).as_str())
    );

    eventually("both replicas to LISTEN again", async || {
        listeners(&app.db).await == 2
    })
    .await;
    revoke(&app.admin(), &key_id_of(&second)).await;
    let e = next_event(&mut stream).await;
    assert_eq!(
        (e.seq, e.key_id.as_str()),
        (head + 2, key_id_of(&second).as_str())
    );
}

/// Notifications never arrive at replica B (it does not LISTEN at all, as behind a
/// transaction-pooling proxy): its poll alone delivers every event, in order, once, and
/// invalidates its cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poll_alone_delivers_every_event_when_notifications_are_lost() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let b = Replica::start(&app, |s| {
        s.events.listen = false;
        s.events.poll_interval = Duration::from_millis(50);
    })
    .await;
    eventually("replica A to LISTEN", async || {
        listeners(&app.db).await == 1
    })
    .await;
    let mut stream = watch(b.edge(), 0, "").await;
    let head = first_heartbeat(&mut stream).await;
    let issued: Vec<_> = issue_one_by_one(&app, 20).await;
    for key in &issued {
        assert_eq!(
            verify_code(&b.verifier(), &key.key, &[]).await,
            VerifyCode::Valid
        );
    }
    let ids: Vec<String> = issued.iter().map(key_id_of).collect();
    for id in &ids {
        revoke(&app.admin(), id).await;
    }
    let events = next_events(&mut stream, ids.len()).await;
    assert_follows(&events, head);
    assert_eq!(key_ids(&events), ids);
    // Only A ever listened: nothing but the poll can have woken B.
    assert_eq!(listeners(&app.db).await, 1);
    for key in &issued {
        assert_eq!(
            verify_code(&b.verifier(), &key.key, &[]).await,
            VerifyCode::Revoked
        );
    }
}

async fn issue_one_by_one(app: &TestApp, n: usize) -> Vec<proto::IssueKeyResponse> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(app.issue().await);
    }
    out
}

// ---------------------------------------------------------------------------------------
// 6b. Postgres restarted under two replicas

/// Postgres stops and starts again while two replicas run (on a server of this test's
/// own). Meanwhile cached VerifyKey answers keep coming, and mutations fail with
/// UNAVAILABLE leaving nothing behind; afterwards LISTEN reconnects (the poll is an hour
/// apart, so only a notification can wake B) and the next event reaches B's subscriber
/// with no seq lost or invented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_loses_no_event_and_half_writes_nothing() {
    let pg = pg_cluster::PgCluster::start();
    let db = TestDb::existing_postgres(pg.url());
    let replica = async || {
        let mut settings = test_settings(&db);
        settings.events.poll_interval = Duration::from_secs(3600);
        // The freshness bound's own reads would wake B too, and would end the cached
        // answers below after it (tests/partition.rs covers the bound).
        settings.events.max_staleness = None;
        let server = keywarden::server::start(&settings, keywarden::clock::Clock::System)
            .await
            .unwrap();
        let channel = channel_to(&server).await;
        Replica { server, channel }
    };
    let a = replica().await;
    db.create_workspaces(TEST_WORKSPACES, "pro").await;
    let b = replica().await;
    eventually("both replicas to LISTEN", async || {
        listeners(&db).await == 2
    })
    .await;
    let admin = a.admin();
    let kept = issue_in(&admin, "ws_test").await;
    let doomed = issue_in(&admin, "ws_test").await;
    for r in [&a, &b] {
        for key in [&kept, &doomed] {
            assert_eq!(
                verify_code(&r.verifier(), &key.key, &[]).await,
                VerifyCode::Valid
            );
        }
    }
    let mut stream = watch(b.edge(), 0, "").await;
    let head = first_heartbeat(&mut stream).await;

    pg.stop();
    for _ in 0..20 {
        for r in [&a, &b] {
            assert_eq!(
                verify_code(&r.verifier(), &kept.key, &[]).await,
                VerifyCode::Valid
            );
        }
    }
    let refused = admin
        .clone()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: key_id_of(&doomed),
            actor: Some(actor()),
            reason: "during the outage".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let refused = admin
        .clone()
        .issue_key(issue_request("ws_test"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    pg.start_again();

    // Nothing of the refused mutations was written.
    assert_eq!(db.count("SELECT count(*) FROM api_keys").await, 2);
    assert_eq!(
        db.count("SELECT count(*) FROM api_keys WHERE revoked_at IS NOT NULL")
            .await,
        0
    );
    assert_eq!(
        db.count("SELECT count(*) FROM audit_events WHERE action <> 'key.issue'")
            .await,
        0
    );
    assert_eq!(log_head(&db).await, head);

    eventually("both replicas to LISTEN again", async || {
        listeners(&db).await == 2
    })
    .await;
    // The pool may hand out one connection the restart killed before noticing: a client
    // retries an UNAVAILABLE mutation, as the status tells it to.
    let mut revoked = None;
    for _ in 0..5 {
        match admin
            .clone()
            .revoke_key(proto::RevokeKeyRequest {
                key_id: key_id_of(&doomed),
                actor: Some(actor()),
                reason: "after the outage".into(),
            })
            .await
        {
            Ok(r) => {
                revoked = Some(r);
                break;
            }
            Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
        }
    }
    assert!(revoked.is_some(), "the revoke never went through");
    let e = next_event(&mut stream).await;
    assert_eq!((e.seq, e.key_id.clone()), (head + 1, key_id_of(&doomed)));
    eventually("B to refuse the revoked key", async || {
        verify_code(&b.verifier(), &doomed.key, &[]).await == VerifyCode::Revoked
    })
    .await;
    assert_eq!(
        verify_code(&b.verifier(), &kept.key, &[]).await,
        VerifyCode::Valid
    );
    a.server.shutdown().await.unwrap();
    b.server.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 7. Concurrent writers on two replicas

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_revokes_on_two_replicas_reach_every_subscriber_once_in_order() {
    const KEYS: usize = 50;
    const TASKS: usize = 10;
    let app = TestApp::spawn(Backend::Postgres).await;
    let b = Replica::start(&app, |_| {}).await;
    let keys = issue_many(&app.admin(), KEYS).await;
    let mut on_a = watch(app.edge(), 0, "").await;
    let mut on_b = watch(b.edge(), 0, "").await;
    let head = first_heartbeat(&mut on_a).await;
    let head_b = first_heartbeat(&mut on_b).await;
    assert_eq!(head, head_b);

    let admins = [app.admin(), b.admin()];
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let admin = admins[t % 2].clone();
            let mine: Vec<String> = keys.iter().skip(t).step_by(TASKS).cloned().collect();
            tokio::spawn(async move {
                for k in mine {
                    revoke(&admin, &k).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let expected: BTreeSet<&String> = keys.iter().collect();
    for (name, stream) in [("A", &mut on_a), ("B", &mut on_b)] {
        let events = events_through(stream, head + KEYS as i64).await;
        assert_follows(&events, head);
        let ids = key_ids(&events);
        let seen: BTreeSet<&String> = ids.iter().collect();
        assert_eq!(seen, expected, "subscriber on {name}");
    }
}

// ---------------------------------------------------------------------------------------
// 8. Seq order is commit order

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoever_takes_a_seq_first_commits_first() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let side_key = app.issue().await;
    let revoked = app.issue().await;
    let mut stream = watch(app.edge(), 0, "").await;
    let head = first_heartbeat(&mut stream).await;

    // A writer behind the server's back takes the next seq and holds it.
    let mut conn = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let seq: i64 =
        sqlx::query_scalar("UPDATE event_log SET head = head + 1 WHERE id = 1 RETURNING head")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert_eq!(seq, head + 1);
    let hash = KeyHash::of(&side_key.key);
    sqlx::query(
        "INSERT INTO key_events (seq, kind, key_id, workspace_id, key_hash, stale_hashes, \
         occurred_at) VALUES ($1, 'updated', $2, 'ws_test', $3, $4, $5)",
    )
    .bind(seq)
    .bind(key_id_of(&side_key))
    .bind(&hash.as_bytes()[..])
    .bind(hash.to_hex())
    .bind(app.clock.now())
    .execute(&mut *tx)
    .await
    .unwrap();

    // The revoke waits for the event_log row.
    let admin = app.admin();
    let revoked_id = key_id_of(&revoked);
    let revoke_task = tokio::spawn(async move { revoke(&admin, &revoked_id).await });
    eventually("RevokeKey to wait for the event_log row", async || {
        app.db
            .count(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query ILIKE 'UPDATE event_log%'",
            )
            .await
            == 1
    })
    .await;
    assert!(!revoke_task.is_finished());

    tx.commit().await.unwrap();
    let info = timeout(DEADLINE, revoke_task).await.unwrap().unwrap();
    assert!(info.revoked_at.is_some());

    let events = next_events(&mut stream, 2).await;
    assert_follows(&events, head);
    assert_eq!(events[0].key_id, key_id_of(&side_key));
    assert_eq!(events[0].kind(), KeyEventKind::Updated);
    assert_eq!(events[0].key_hash, hash.to_hex());
    assert_eq!(events[1].key_id, key_id_of(&revoked));
    assert_eq!(events[1].kind(), KeyEventKind::Revoked);
}

// ---------------------------------------------------------------------------------------
// 9. Retention and RESET

async fn cursors_outside_the_retained_log_are_reset(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let admin = app.admin();
    let store = keywarden::store::open(&app.db.url, 2).await.unwrap();
    let keys = issue_many(&admin, 7).await;
    let t0 = app.clock.now();
    for k in &keys[..3] {
        revoke(&admin, k).await;
    }
    app.clock.advance(Duration::from_secs(3600));
    let t1 = app.clock.now();
    for k in &keys[3..5] {
        revoke(&admin, k).await;
    }

    let cutoff = t0 + 1_800_000_000;
    assert_eq!(store.prune_events(cutoff).await.unwrap(), 3);
    let bounds = store.event_bounds().await.unwrap();
    assert_eq!((bounds.head, bounds.pruned_through), (5, 3));
    let kept = store.read_events(0, 100).await.unwrap();
    assert_eq!(kept.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
    assert!(kept.iter().all(|e| e.occurred_at == t1));
    // An event exactly at the cutoff is inside the window.
    assert_eq!(store.prune_events(t1).await.unwrap(), 0);
    wait_published(app.server(), 5).await;

    // Below the retained log: reset to the current seq, then live events.
    let mut stream = watch(app.edge(), 1, "").await;
    match next_message(&mut stream).await {
        Ok(Message::Reset(r)) => assert_eq!(r.seq, 5),
        other => panic!("expected a reset, got {other:?}"),
    }
    revoke(&admin, &keys[5]).await;
    let e = next_event(&mut stream).await;
    assert_eq!((e.seq, e.key_id.as_str()), (6, keys[5].as_str()));
    wait_published(app.server(), 6).await;

    // At the pruned boundary: everything after it is still there.
    let mut stream = watch(app.edge(), 3, "").await;
    let events = events_through(&mut stream, 6).await;
    assert_follows(&events, 3);

    // Beyond the head: a cursor from another log.
    let mut stream = watch(app.edge(), 1000, "").await;
    match next_message(&mut stream).await {
        Ok(Message::Reset(r)) => assert_eq!(r.seq, 6),
        other => panic!("expected a reset, got {other:?}"),
    }
    revoke(&admin, &keys[6]).await;
    let e = next_event(&mut stream).await;
    assert_eq!((e.seq, e.key_id.as_str()), (7, keys[6].as_str()));
}

/// Through the store, with events written at out-of-order times (replicas' clocks
/// differ): pruning removes only a prefix of the log, and never an event inside the
/// window.
async fn pruning_never_removes_an_event_inside_the_window(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let store = keywarden::store::open(&app.db.url, 2).await.unwrap();
    let keys = issue_many(&app.admin(), 5).await;
    let hour = 3_600_000_000;
    let t = app.clock.now();
    let times = [t, t + 10 * hour, t, t + 10 * hour, t + 2 * hour];
    for (k, at) in keys.iter().zip(times) {
        store
            .revoke_key(k, "compromised", at, &audit_context())
            .await
            .unwrap();
    }
    // (Written behind the server's back: its poll reads them.)
    wait_published(app.server(), 5).await;
    let cutoff = t + 5 * hour;
    assert_eq!(store.prune_events(cutoff).await.unwrap(), 1);
    let kept = store.read_events(0, 100).await.unwrap();
    assert_eq!(kept.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3, 4, 5]);
    for (seq, at) in (1..).zip(times) {
        if at >= cutoff {
            assert!(
                kept.iter().any(|e| e.seq == seq),
                "event {seq} is inside the window"
            );
        }
    }
    let bounds = store.event_bounds().await.unwrap();
    assert_eq!((bounds.head, bounds.pruned_through), (5, 1));

    // Pruning with an older cutoff never moves the bound back.
    assert_eq!(store.prune_events(t - hour).await.unwrap(), 0);
    assert_eq!(store.event_bounds().await.unwrap().pruned_through, 1);

    // Everything older than the cutoff: the whole log, and the head is still resumable.
    assert_eq!(store.prune_events(t + 11 * hour).await.unwrap(), 4);
    let bounds = store.event_bounds().await.unwrap();
    assert_eq!((bounds.head, bounds.pruned_through), (5, 5));
    assert!(store.read_events(0, 100).await.unwrap().is_empty());
    let mut stream = watch(app.edge(), 5, "").await;
    assert_eq!(seqs(&events_through(&mut stream, 5).await), [0i64; 0]);
}

// ---------------------------------------------------------------------------------------
// 10. Grace ends, and the workspace filter

async fn the_end_of_a_grace_period_is_announced(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let admin = app.admin();
    let issued = app.issue().await;
    let key_id = key_id_of(&issued);
    let mut stream = watch(app.edge(), 0, "").await;
    let head = first_heartbeat(&mut stream).await;

    let rotated = rotate(&admin, &key_id, 60).await;
    let e = next_event(&mut stream).await;
    assert_eq!(e.seq, head + 1);
    assert_eq!(e.kind(), KeyEventKind::Rotated);
    assert_eq!(e.key_hash, hash_hex(&issued.key));
    assert_eq!(
        verify_code(&app.verifier(), &issued.key, &[]).await,
        VerifyCode::Valid
    );

    app.clock.advance(Duration::from_secs(61));
    let ended_at = app.clock.now();
    let e = next_event(&mut stream).await;
    assert_eq!(e.seq, head + 2);
    assert_eq!(e.kind(), KeyEventKind::Rotated);
    assert_eq!(e.key_id, key_id);
    assert_eq!(e.workspace_id, "ws_test");
    assert_eq!(e.key_hash, hash_hex(&issued.key), "the old secret's hash");
    assert_eq!(e.stale_key_hashes, [hash_hex(&issued.key)]);
    assert_eq!(e.occurred_at, Some(timestamp(ended_at)));
    assert_eq!(
        verify_code(&app.verifier(), &issued.key, &[]).await,
        VerifyCode::Revoked
    );
    assert_eq!(
        verify_code(&app.verifier(), &rotated.key, &[]).await,
        VerifyCode::Valid
    );

    // Announced once, though the sweeper runs every 100 ms.
    assert_eq!(
        seqs(&events_through(&mut stream, head + 2).await),
        [0i64; 0]
    );
    assert_eq!(log_head(&app.db).await, head + 2);
}

async fn a_workspace_filter_delivers_that_workspace_only(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let admin = app.admin();
    let a0 = key_id_of(&issue_in(&admin, "ws_a").await);
    let b0 = key_id_of(&issue_in(&admin, "ws_b").await);
    let a1 = key_id_of(&issue_in(&admin, "ws_a").await);
    let b1 = key_id_of(&issue_in(&admin, "ws_b").await);
    let mut only_a = watch(app.edge(), 0, "ws_a").await;
    let head = first_heartbeat(&mut only_a).await;
    let mut all = watch(app.edge(), 0, "").await;
    assert_eq!(first_heartbeat(&mut all).await, head);

    for k in [&a0, &b0, &a1, &b1] {
        revoke(&admin, k).await;
    }
    let everything = events_through(&mut all, head + 4).await;
    assert_follows(&everything, head);
    // The filtered stream's heartbeat passes the last event (of ws_b) all the same.
    let filtered = events_through(&mut only_a, head + 4).await;
    assert_eq!(seqs(&filtered), [head + 1, head + 3]);
    assert_eq!(key_ids(&filtered), [a0.clone(), a1.clone()]);
    assert!(filtered.iter().all(|e| e.workspace_id == "ws_a"));

    // The replay filters too (from the first event on: 0 would mean "from now").
    let mut replayed = watch(app.edge(), head + 1, "ws_b").await;
    let events = events_through(&mut replayed, head + 4).await;
    assert_eq!(key_ids(&events), [b0, b1]);
}

// ---------------------------------------------------------------------------------------
// 11. Validation and caller roles

async fn requests_are_validated_and_callers_checked(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let request = |after_seq: i64, workspace_id: &str| WatchRevocationsRequest {
        after_seq,
        workspace_id: workspace_id.to_owned(),
    };

    let err = app
        .edge()
        .watch_revocations(request(-1, ""))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["after_seq"]);

    let too_long = "w".repeat(65);
    for bad in ["ws test", "ws/../x", too_long.as_str()] {
        let err = app
            .edge()
            .watch_revocations(request(0, bad))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&err), ["workspace_id"], "{bad:?}");
    }

    for token in [VERIFIER_TOKEN, ADMIN_TOKEN] {
        let err = app
            .edge_with(token)
            .watch_revocations(request(0, ""))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    }
    let err = app
        .edge_with("not-a-token")
        .watch_revocations(request(0, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = proto::revocation_service_client::RevocationServiceClient::new(app.channel.clone())
        .watch_revocations(request(0, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // Control: the edge token with a valid request is served.
    let mut stream = watch(app.edge(), 0, "ws_ok").await;
    first_heartbeat(&mut stream).await;
}

/// RevokeKeys for an owner revokes exactly that owner's live keys, each audited and on
/// the stream as a single revoke is, answers the count, and revokes none when repeated;
/// a filter is required and only one; a member revokes only its own keys; team and
/// ListKeys' filters select what they say.
async fn revoke_keys_revokes_exactly_the_selection_each_on_the_stream(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut stream = watch(app.edge(), 0, "").await;
    let head = first_heartbeat(&mut stream).await;
    let ann: Vec<proto::IssueKeyResponse> = {
        let mut keys = Vec::new();
        for i in 0..3 {
            keys.push(
                app.issue_with(|r| {
                    r.owner = Some(user("user_ann"));
                    r.name = format!("ann-{i}");
                })
                .await,
            );
        }
        keys
    };
    let bob = app.issue_with(|r| r.owner = Some(user("user_bob"))).await;
    let id = |k: &proto::IssueKeyResponse| k.key_info.as_ref().unwrap().key_id.clone();
    app.admin()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: id(&ann[2]),
            actor: Some(actor()),
            reason: "earlier".into(),
        })
        .await
        .unwrap();
    let earlier = next_event(&mut stream).await;
    assert!(earlier.seq > head);

    let request = proto::RevokeKeysRequest {
        workspace_id: "ws_test".into(),
        owner: Some(user("user_ann")),
        reason: "offboarded".into(),
        actor: Some(actor()),
        ..Default::default()
    };
    let answer = app
        .admin()
        .revoke_keys(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.revoked, 2);
    let events = next_events(&mut stream, 2).await;
    let streamed: BTreeSet<String> = events
        .iter()
        .inspect(|e| assert_eq!(e.kind, KeyEventKind::Revoked as i32))
        .map(|e| e.key_id.clone())
        .collect();
    assert_eq!(streamed, BTreeSet::from([id(&ann[0]), id(&ann[1])]));
    for key in &ann {
        assert_eq!(code(&app.verify(&key.key, &[]).await), VerifyCode::Revoked);
    }
    assert_eq!(code(&app.verify(&bob.key, &[]).await), VerifyCode::Valid);
    let audited = app
        .audit("ws_test")
        .await
        .into_iter()
        .filter(|e| e.action == "key.revoke" && e.detail.contains("offboarded"))
        .count();
    assert_eq!(audited, 2);
    // Idempotent.
    let again = app.admin().revoke_keys(request).await.unwrap().into_inner();
    assert_eq!(again.revoked, 0);

    // One filter, exactly.
    for (r, field) in [
        (
            proto::RevokeKeysRequest {
                workspace_id: "ws_test".into(),
                actor: Some(actor()),
                ..Default::default()
            },
            "all",
        ),
        (
            proto::RevokeKeysRequest {
                workspace_id: "ws_test".into(),
                owner: Some(user("user_bob")),
                all: true,
                actor: Some(actor()),
                ..Default::default()
            },
            "all",
        ),
    ] {
        let status = app.admin().revoke_keys(r).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(violated_fields(&status), [field]);
    }
    let status = app
        .admin()
        .revoke_keys(proto::RevokeKeysRequest {
            workspace_id: "ws_nope".into(),
            all: true,
            actor: Some(actor()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // A member revokes only its own: naming bob is refused, "all" is narrowed to itself.
    let member = proto::Actor {
        id: "user_bob".into(),
        permissions: vec!["read".into()],
    };
    let mine = app.issue_with(|r| r.owner = Some(user("user_carl"))).await;
    let status = app
        .admin()
        .revoke_keys(proto::RevokeKeysRequest {
            workspace_id: "ws_test".into(),
            owner: Some(user("user_carl")),
            actor: Some(member.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let answer = app
        .admin()
        .revoke_keys(proto::RevokeKeysRequest {
            workspace_id: "ws_test".into(),
            all: true,
            actor: Some(member),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.revoked, 1, "bob's own key only");
    assert_eq!(code(&app.verify(&mine.key, &[]).await), VerifyCode::Valid);

    // ListKeys' new filters, through the API.
    let listed = |r: proto::ListKeysRequest| {
        let mut admin = app.admin();
        async move {
            let keys = admin
                .list_keys(proto::ListKeysRequest {
                    workspace_id: "ws_test".into(),
                    ..r
                })
                .await
                .unwrap()
                .into_inner()
                .keys;
            keys.into_iter().map(|k| k.name).collect::<BTreeSet<_>>()
        }
    };
    assert_eq!(
        listed(proto::ListKeysRequest {
            name_prefix: "ann-".into(),
            ..Default::default()
        })
        .await,
        BTreeSet::from(["ann-0".to_owned(), "ann-1".to_owned(), "ann-2".to_owned()])
    );
    let tagged = app
        .issue_with(|r| {
            r.name = "tagged".into();
            r.metadata = [("env".to_owned(), "prod".to_owned())].into();
        })
        .await;
    assert!(tagged.key_info.is_some());
    assert_eq!(
        listed(proto::ListKeysRequest {
            metadata_key: "env".into(),
            metadata_value: "prod".into(),
            ..Default::default()
        })
        .await,
        BTreeSet::from(["tagged".to_owned()])
    );
    let status = app
        .admin()
        .list_keys(proto::ListKeysRequest {
            workspace_id: "ws_test".into(),
            metadata_value: "prod".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["metadata_key"]);
}

both_backends!(
    revoke_keys_revokes_exactly_the_selection_each_on_the_stream,
    each_mutation_emits_one_event_and_issue_none,
    a_resumed_subscriber_gets_exactly_what_it_missed,
    a_subscriber_resumes_across_a_server_restart,
    shutdown_ends_a_stream_that_is_still_replaying,
    a_slow_subscriber_is_cut_off_and_catches_up_from_the_log,
    a_heartbeat_never_claims_an_event_not_yet_delivered,
    cursors_outside_the_retained_log_are_reset,
    pruning_never_removes_an_event_inside_the_window,
    the_end_of_a_grace_period_is_announced,
    a_workspace_filter_delivers_that_workspace_only,
    requests_are_validated_and_callers_checked,
);
