//! Quota leases through real servers: two replicas lease one key's limit from real Redis
//! and decide locally, together admitting at most the limit in a window and, under
//! saturation, at least 90% of it; so do two replicas and two edge Verifiers leasing from
//! them (LeaseQuota) together; a lowered limit is judged at once on the next call; a
//! revoke mid-run ends every holder's lease; budgets and token windows hold across
//! replicas, decided from allowances of spend and tokens.
//!
//! The windows are the test's manual clock (standing still, then moved past a whole
//! window); the leases' lives are real time, as they are in production. Demand runs for
//! a bounded real time per window; nothing is asserted about time, only counts.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use keywarden::config::{LimiterSettings, Settings};
use keywarden::edge::{EdgeConfig, Verifier};
use keywarden::proto::{self, VerifyCode};
use keywarden::ratelimit::FailureMode;
use keywarden::ratelimit::leased::LeaseSettings;
use keywarden::server::RunningServer;
use prost_types::FieldMask;
use secrecy::SecretString;
use tokio::time::Instant;
use tonic::transport::Channel;

const LIFE: Duration = Duration::from_millis(500);

fn leasing_from_redis(s: &mut Settings, prefix: &str) {
    s.limiter = LimiterSettings::Redis {
        url: SecretString::from(
            std::env::var("KEYWARDEN_TEST_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
        ),
        prefix: prefix.to_owned(),
        failure: FailureMode::Closed,
        circuit: Default::default(),
        lease: Some(LeaseSettings {
            life: LIFE,
            max_keys: 10_000,
        }),
        clock_skew: Duration::from_millis(100),
    };
    s.edge_lease = Some(LIFE);
}

fn prefix() -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).unwrap();
    format!("kwtest_{}", hex::encode(b))
}

fn rpm(n: u64) -> proto::RateLimit {
    proto::RateLimit {
        unit: proto::RateLimitUnit::Requests as i32,
        window: proto::RateLimitWindow::Minute as i32,
        limit: n,
    }
}

fn verifier(channel: &Channel) -> VerifierClient {
    proto::verify_service_client::VerifyServiceClient::with_interceptor(
        channel.clone(),
        bearer(VERIFIER_TOKEN),
    )
}

async fn code_of(channel: &Channel, key: &str) -> VerifyCode {
    let r = verifier(channel)
        .verify_key(proto::VerifyKeyRequest {
            key: key.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    code(&r)
}

/// Four callers per replica verify `key` until `demand` has passed (real time); returns
/// the calls admitted.
async fn hammer(channels: &[Channel], key: &str, demand: Duration) -> u64 {
    let admitted = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + demand;
    let mut tasks = Vec::new();
    for channel in channels {
        for _ in 0..4 {
            let (channel, key, admitted) = (channel.clone(), key.to_owned(), admitted.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    match code_of(&channel, &key).await {
                        VerifyCode::Valid => {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                        VerifyCode::RateLimited => {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    admitted.load(Ordering::Relaxed)
}

/// An edge Verifier following the replica behind `channel`, caught up.
async fn edge_on(channel: &Channel) -> Arc<Verifier> {
    let mut config = EdgeConfig::new(VERIFIER_TOKEN, EDGE_TOKEN);
    config.idle_timeout = Duration::from_secs(5);
    let edge = Verifier::connect(channel.clone(), config).unwrap();
    assert!(
        edge.wait_connected(Duration::from_secs(10)).await,
        "the edge never caught up"
    );
    Arc::new(edge)
}

/// [`hammer`] with four more callers per edge Verifier; returns the calls admitted by
/// all of them together.
async fn hammer_with_edges(
    channels: &[Channel],
    edges: &[Arc<Verifier>],
    key: &str,
    demand: Duration,
) -> u64 {
    let admitted = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + demand;
    let mut tasks = Vec::new();
    for edge in edges {
        for _ in 0..4 {
            let (edge, key, admitted) = (edge.clone(), key.to_owned(), admitted.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    let answer = edge.verify(&key, &[]).await.unwrap();
                    match code(&answer) {
                        VerifyCode::Valid => {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                        VerifyCode::RateLimited => {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }));
        }
    }
    let direct = hammer(channels, key, demand).await;
    for t in tasks {
        t.await.unwrap();
    }
    direct + admitted.load(Ordering::Relaxed)
}

async fn second_replica(app: &TestApp, prefix: &str) -> (RunningServer, Channel) {
    let mut settings = test_settings(&app.db);
    leasing_from_redis(&mut settings, prefix);
    let server = keywarden::server::start(&settings, app.clock.clone())
        .await
        .unwrap();
    let channel = channel_to(&server).await;
    (server, channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_leasing_from_redis_admit_at_most_the_limit_and_nearly_all_of_it() {
    const L: u64 = 60;
    let prefix = prefix();
    let app = TestApp::spawn_with(Backend::Postgres, |s| leasing_from_redis(s, &prefix)).await;
    let (b, b_channel) = second_replica(&app, &prefix).await;
    let issued = app.issue_with(|r| r.rate_limits = vec![rpm(L)]).await;
    let replicas = [app.channel.clone(), b_channel.clone()];

    // One window (the clock stands still): demand far above the limit, for several
    // lease lives, so that leases parked at one replica expire and go back.
    let first = hammer(&replicas, &issued.key, LIFE * 6).await;
    assert!(first <= L, "{first} admitted in one window, limit {L}");
    assert!(
        first * 10 >= L * 9,
        "only {first} admitted under saturation, limit {L}"
    );

    // The next window: everything counted (leases included) has left it.
    app.clock.advance(Duration::from_secs(65));
    let second = hammer(&replicas, &issued.key, LIFE * 6).await;
    assert!(
        second <= L,
        "{second} admitted in the next window, limit {L}"
    );
    assert!(
        second * 10 >= L * 9,
        "only {second} admitted in the next window"
    );
    b.shutdown().await.unwrap();
}

/// Edge leases are counted at the authority like every holder's: two replicas (leasing
/// from Redis) and two edge Verifiers (one following each, leasing from it, so from the
/// same Redis counters), all far above the limit for several lease lives, together admit
/// at most the limit in a window, and at least 90% of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_and_two_edges_leasing_admit_at_most_the_limit_and_nearly_all_of_it() {
    const L: u64 = 60;
    let prefix = prefix();
    let app = TestApp::spawn_with(Backend::Postgres, |s| leasing_from_redis(s, &prefix)).await;
    let (b, b_channel) = second_replica(&app, &prefix).await;
    let issued = app.issue_with(|r| r.rate_limits = vec![rpm(L)]).await;
    let replicas = [app.channel.clone(), b_channel.clone()];
    let edges = [edge_on(&app.channel).await, edge_on(&b_channel).await];

    // Each edge verifies the key a few times first: the first call goes to VerifyKey,
    // the next ones wait for and use the edge's lease (quota is free yet), so both edges
    // hold leases when the demand starts.
    let mut warm = 0;
    for edge in &edges {
        for _ in 0..3 {
            assert_eq!(
                code(&edge.verify(&issued.key, &[]).await.unwrap()),
                VerifyCode::Valid
            );
            warm += 1;
        }
        assert!(edge.stats().leased >= 1, "{:?}", edge.stats());
    }
    let first = warm + hammer_with_edges(&replicas, &edges, &issued.key, LIFE * 6).await;
    let leased: u64 = edges.iter().map(|e| e.stats().leased).sum();
    eprintln!("first window: {first} admitted, {leased} of them from edge leases");
    assert!(first <= L, "{first} admitted in one window, limit {L}");
    assert!(
        first * 10 >= L * 9,
        "only {first} admitted under saturation, limit {L}"
    );

    // Every lease of the first window ends (real time) before the clock jumps a window:
    // in production a lease's life passes on both clocks alike.
    tokio::time::sleep(LIFE * 2).await;
    app.clock.advance(Duration::from_secs(65));
    let second = hammer_with_edges(&replicas, &edges, &issued.key, LIFE * 6).await;
    eprintln!("second window: {second} admitted");
    assert!(
        second <= L,
        "{second} admitted in the next window, limit {L}"
    );
    assert!(
        second * 10 >= L * 9,
        "only {second} admitted in the next window"
    );
    for edge in &edges {
        edge.shutdown().await;
    }
    b.shutdown().await.unwrap();
}

fn teams(channel: &Channel) -> TeamClient {
    proto::team_service_client::TeamServiceClient::with_interceptor(
        channel.clone(),
        bearer(ADMIN_TOKEN),
    )
}

type TeamClient = proto::team_service_client::TeamServiceClient<
    tonic::service::interceptor::InterceptedService<Channel, Bearer>,
>;

/// A team `team_id` in the test's workspace, whose keys share `limits`.
async fn team_with_pool(app: &TestApp, team_id: &str, limits: Vec<proto::RateLimit>) {
    teams(&app.channel)
        .create_team(proto::CreateTeamRequest {
            workspace_id: "ws_test".into(),
            team_id: team_id.into(),
            name: team_id.into(),
            policy: None,
            actor: Some(actor()),
        })
        .await
        .unwrap();
    set_team_pool(app, team_id, limits).await;
}

async fn set_team_pool(app: &TestApp, team_id: &str, limits: Vec<proto::RateLimit>) {
    teams(&app.channel)
        .update_team(proto::UpdateTeamRequest {
            workspace_id: "ws_test".into(),
            team_id: team_id.into(),
            actor: Some(actor()),
            rate_limits: limits,
            update_mask: Some(FieldMask {
                paths: vec!["rate_limits".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// A team's pool is leased to edges too, jointly with each key's own limit: two edges
/// verifying one key of the team and two replicas verifying another, all far above the
/// team's limit, together admit at most that limit in a window and at least 90% of it,
/// and the edges answer from their leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_pool_leased_to_two_replicas_and_two_edges_holds_across_all_of_them() {
    const L: u64 = 60;
    let prefix = prefix();
    let app = TestApp::spawn_with(Backend::Postgres, |s| leasing_from_redis(s, &prefix)).await;
    let (b, b_channel) = second_replica(&app, &prefix).await;
    team_with_pool(&app, "team_ml", vec![rpm(L)]).await;
    let in_team = |r: &mut proto::IssueKeyRequest| {
        r.team_id = "team_ml".into();
        r.rate_limits = vec![rpm(1_000_000)];
    };
    let at_edges = app.issue_with(in_team).await;
    let at_replicas = app.issue_with(in_team).await;
    let replicas = [app.channel.clone(), b_channel.clone()];
    let edges = [edge_on(&app.channel).await, edge_on(&b_channel).await];

    let mut warm = 0;
    for edge in &edges {
        for _ in 0..3 {
            let answer = edge.verify(&at_edges.key, &[]).await.unwrap();
            assert_eq!(code(&answer), VerifyCode::Valid);
            warm += 1;
        }
        assert!(
            edge.stats().leased >= 1,
            "the edge never served the pooled key from a lease: {:?}",
            edge.stats()
        );
    }
    let (with_edges, direct) = tokio::join!(
        hammer_with_edges(&[], &edges, &at_edges.key, LIFE * 6),
        hammer(&replicas, &at_replicas.key, LIFE * 6)
    );
    let first = warm + with_edges + direct;
    let leased: u64 = edges.iter().map(|e| e.stats().leased).sum();
    eprintln!("team pool: {first} admitted in one window, {leased} from edge leases");
    assert!(first <= L, "{first} admitted in one window, team limit {L}");
    assert!(
        first * 10 >= L * 9,
        "only {first} admitted under saturation, team limit {L}"
    );
    // The edge's answers name the team's window beside the key's own.
    let answer = edges[0].verify(&at_edges.key, &[]).await.unwrap();
    let scopes: Vec<_> = answer
        .rate_limit
        .as_ref()
        .map(|d| d.windows.iter().map(|w| w.scope()).collect())
        .unwrap_or_default();
    assert!(scopes.contains(&proto::LimitScope::Team), "{scopes:?}");
    for edge in &edges {
        edge.shutdown().await;
    }
    b.shutdown().await.unwrap();
}

/// A team's lowered limit ends the edge's lease of the pool at once: the team's update
/// reloads each key of it (an event per key), the edge drops the key's answer and lease,
/// and the next call is judged under the new limit, though the old lease had room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_team_limit_ends_the_edges_lease_of_the_pool() {
    let prefix = prefix();
    let app = TestApp::spawn_with(Backend::Postgres, |s| leasing_from_redis(s, &prefix)).await;
    team_with_pool(&app, "team_ml", vec![rpm(1_000)]).await;
    let issued = app
        .issue_with(|r| {
            r.team_id = "team_ml".into();
            r.rate_limits = vec![rpm(1_000_000)];
        })
        .await;
    let edge = edge_on(&app.channel).await;
    for _ in 0..5 {
        let answer = edge.verify(&issued.key, &[]).await.unwrap();
        assert_eq!(code(&answer), VerifyCode::Valid);
    }
    assert!(edge.stats().leased >= 1, "{:?}", edge.stats());
    let events = edge.stats().events;
    // 5 admitted; the team may now make 2 a minute.
    set_team_pool(&app, "team_ml", vec![rpm(2)]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while edge.stats().events <= events {
        assert!(Instant::now() < deadline, "the edge never got the update");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let answer = edge.verify(&issued.key, &[]).await.unwrap();
    assert_eq!(code(&answer), VerifyCode::RateLimited);
    let window = answer
        .rate_limit
        .as_ref()
        .and_then(|d| {
            d.windows
                .iter()
                .find(|w| w.scope() == proto::LimitScope::Team)
        })
        .copied()
        .unwrap();
    assert_eq!(window.limit.unwrap().limit, 2, "judged under the new limit");
    edge.shutdown().await;
}

/// A revoke in the middle of the demand ends every holder's lease, though each still had
/// room: the replica that revoked refuses its next call; the other replica refuses once
/// its log reader has the event, and never admits after that; each edge refuses its next
/// call once the event has reached it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_mid_run_ends_the_lease_of_every_holder() {
    let prefix = prefix();
    let app = TestApp::spawn_with(Backend::Postgres, |s| leasing_from_redis(s, &prefix)).await;
    let (b, b_channel) = second_replica(&app, &prefix).await;
    let issued = app
        .issue_with(|r| r.rate_limits = vec![rpm(1_000_000)])
        .await;
    let key_id = issued.key_info.as_ref().unwrap().key_id.clone();
    let edges = [edge_on(&app.channel).await, edge_on(&b_channel).await];
    for channel in [&app.channel, &b_channel] {
        for _ in 0..5 {
            assert_eq!(code_of(channel, &issued.key).await, VerifyCode::Valid);
        }
    }
    for edge in &edges {
        for _ in 0..5 {
            assert_eq!(
                code(&edge.verify(&issued.key, &[]).await.unwrap()),
                VerifyCode::Valid
            );
        }
        assert!(edge.stats().leased >= 1, "{:?}", edge.stats());
    }
    let events: Vec<u64> = edges.iter().map(|e| e.stats().events).collect();
    app.admin()
        .revoke_key(proto::RevokeKeyRequest {
            key_id,
            actor: Some(actor()),
            reason: "leaked".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        code_of(&app.channel, &issued.key).await,
        VerifyCode::Revoked
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match code_of(&b_channel, &issued.key).await {
            VerifyCode::Revoked => break,
            VerifyCode::Valid => assert!(
                Instant::now() < deadline,
                "the other replica still admits 10 s after the revoke"
            ),
            other => panic!("unexpected {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..20 {
        assert_eq!(code_of(&b_channel, &issued.key).await, VerifyCode::Revoked);
    }
    for (edge, before) in edges.iter().zip(events) {
        while edge.stats().events <= before {
            assert!(Instant::now() < deadline, "an edge never got the revoke");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            code(&edge.verify(&issued.key, &[]).await.unwrap()),
            VerifyCode::Revoked
        );
    }
    for edge in &edges {
        edge.shutdown().await;
    }
    b.shutdown().await.unwrap();
}

/// Verifies `key` at `channel` and, when admitted, reports `usage` for the call there,
/// one call at a time, until the replica has refused (with `refusal`) for `quiet` (real
/// time) on end; returns the calls admitted.
async fn use_until_refused(
    channel: Channel,
    key: String,
    usage: proto::ReportUsageRequest,
    refusal: VerifyCode,
    quiet: Duration,
) -> u64 {
    let mut admitted = 0;
    let mut refused_since: Option<Instant> = None;
    loop {
        match code_of(&channel, &key).await {
            VerifyCode::Valid => {
                admitted += 1;
                refused_since = None;
                verifier(&channel)
                    .report_usage(usage.clone())
                    .await
                    .unwrap();
            }
            code if code == refusal => {
                let since = *refused_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= quiet {
                    return admitted;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// One caller per replica in `channels`, each as `use_until_refused` (quiet for three
/// lease lives), at once; returns the calls admitted by all of them.
async fn use_at_each_until_refused(
    channels: [Channel; 2],
    key: &str,
    usage: proto::ReportUsageRequest,
    refusal: VerifyCode,
) -> u64 {
    let tasks: Vec<_> = channels
        .into_iter()
        .map(|channel| {
            tokio::spawn(use_until_refused(
                channel,
                key.to_owned(),
                usage.clone(),
                refusal,
                LIFE * 3,
            ))
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    admitted
}

/// A budget holds across replicas: each judges it from an allowance of spend leased
/// from Redis, never from its own spend alone. Two replicas that never see each other's
/// spend in storage (their usage is written once an hour) together admit calls worth at
/// most the budget plus the calls in flight when it ran out (one per caller here), and
/// at least the budget: allowances parked at one replica go back when they end. Without
/// leases (a Redis call per decision) the spend is shared the same way. So is a
/// workspace's budget (a pool's), by the same allowances under the pool's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_is_shared_by_replicas_and_overrun_only_by_the_calls_in_flight() {
    for leasing in [true, false] {
        for pool in [false, true] {
            a_budget_is_shared_by_replicas(leasing, pool).await;
        }
    }
}

async fn a_budget_is_shared_by_replicas(leasing: bool, pool: bool) {
    const BUDGET: u64 = 1_000;
    const SPEND: u64 = 10;
    let prefix = prefix();
    let configure = |s: &mut Settings| {
        leasing_from_redis(s, &prefix);
        if !leasing && let LimiterSettings::Redis { lease, .. } = &mut s.limiter {
            *lease = None;
        }
    };
    let app = TestApp::spawn_with(Backend::Postgres, configure).await;
    let mut settings = test_settings(&app.db);
    configure(&mut settings);
    let b = keywarden::server::start(&settings, app.clock.clone())
        .await
        .unwrap();
    let b_channel = channel_to(&b).await;
    if pool {
        keywarden::proto::workspace_service_client::WorkspaceServiceClient::with_interceptor(
            app.channel.clone(),
            bearer(ADMIN_TOKEN),
        )
        .update_workspace(proto::UpdateWorkspaceRequest {
            workspace_id: "ws_test".into(),
            actor: Some(actor()),
            budget: Some(proto::PoolBudget {
                max_budget_micros: BUDGET,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["budget".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let issued = app
        .issue_with(|r| {
            r.rate_limits = vec![rpm(1_000_000)];
            r.max_budget_micros = (!pool).then_some(BUDGET);
        })
        .await;
    let usage = proto::ReportUsageRequest {
        key_id: issued.key_info.as_ref().unwrap().key_id.clone(),
        spend_micros: SPEND,
        ..Default::default()
    };
    let admitted = use_at_each_until_refused(
        [app.channel.clone(), b_channel.clone()],
        &issued.key,
        usage,
        VerifyCode::BudgetExceeded,
    )
    .await;
    let callers = 2;
    assert!(
        admitted * SPEND <= BUDGET + callers * SPEND,
        "{admitted} calls of {SPEND} admitted against a budget of {BUDGET} (leasing: {leasing}, pool: {pool})"
    );
    assert!(
        admitted * SPEND >= BUDGET,
        "only {admitted} calls of {SPEND} admitted before the budget of {BUDGET} was refused \
         (leasing: {leasing}, pool: {pool})"
    );
    b.shutdown().await.unwrap();
}

/// Token windows go the same way: each replica admits from an allowance of tokens leased
/// with its requests, while less than it has been reported there. Two replicas together
/// admit calls worth at most the token limit plus the calls in flight when an allowance
/// ran out (one per caller), and at least the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_window_is_shared_by_replicas_and_overrun_only_by_the_calls_in_flight() {
    const TPM: u64 = 1_000;
    const TOKENS: u64 = 10;
    let prefix = prefix();
    let app = TestApp::spawn_with(Backend::Postgres, |s| leasing_from_redis(s, &prefix)).await;
    let (b, b_channel) = second_replica(&app, &prefix).await;
    let issued = app
        .issue_with(|r| {
            r.rate_limits = vec![
                rpm(1_000_000),
                proto::RateLimit {
                    unit: proto::RateLimitUnit::Tokens as i32,
                    window: proto::RateLimitWindow::Minute as i32,
                    limit: TPM,
                },
            ];
        })
        .await;
    let usage = proto::ReportUsageRequest {
        key_id: issued.key_info.as_ref().unwrap().key_id.clone(),
        tokens: TOKENS,
        ..Default::default()
    };
    let admitted = use_at_each_until_refused(
        [app.channel.clone(), b_channel.clone()],
        &issued.key,
        usage,
        VerifyCode::RateLimited,
    )
    .await;
    let callers = 2;
    assert!(
        admitted * TOKENS <= TPM + callers * TOKENS,
        "{admitted} calls of {TOKENS} tokens admitted in one minute limited to {TPM}"
    );
    assert!(
        admitted * TOKENS >= TPM,
        "only {admitted} calls of {TOKENS} tokens admitted before {TPM} a minute was refused"
    );
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_limit_is_judged_on_the_next_call_with_the_calls_already_admitted() {
    let prefix = prefix();
    let app = TestApp::spawn_with(Backend::Postgres, |s| leasing_from_redis(s, &prefix)).await;
    let (b, b_channel) = second_replica(&app, &prefix).await;
    let issued = app.issue_with(|r| r.rate_limits = vec![rpm(100)]).await;
    let key_id = issued.key_info.as_ref().unwrap().key_id.clone();
    for channel in [&app.channel, &b_channel] {
        for _ in 0..3 {
            assert_eq!(code_of(channel, &issued.key).await, VerifyCode::Valid);
        }
    }
    let seen_by_b = b.events().published();
    // 6 admitted; the limit drops to 8: two more calls in this window, whichever
    // replica they reach, although each replica may still hold a lease of the old.
    app.admin()
        .update_key(proto::UpdateKeyRequest {
            key_id,
            actor: Some(actor()),
            rate_limits: vec![rpm(8)],
            update_mask: Some(FieldMask {
                paths: vec!["rate_limits".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    // B learns of the change through the log (its cache entry is dropped on the event).
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.events().published() <= seen_by_b {
        assert!(Instant::now() < deadline, "B never saw the update");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut admitted = 0;
    for channel in [&app.channel, &b_channel, &app.channel, &b_channel] {
        if code_of(channel, &issued.key).await == VerifyCode::Valid {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 2, "8 - 6 calls left under the lowered limit");
    b.shutdown().await.unwrap();
}

// LeaseQuota itself, on one replica with the memory backend (the default): the edge's
// grants and settlements against the counters VerifyKey decides from.

fn hash_of(key: &str) -> String {
    keywarden::domain::key_format::KeyHash::of(key).to_hex()
}

fn ask(issued: &proto::IssueKeyResponse, want: u64) -> proto::LeaseAsk {
    proto::LeaseAsk {
        key_id: issued.key_info.as_ref().unwrap().key_id.clone(),
        key_hash: hash_of(&issued.key),
        want,
        min: 1,
        settle: None,
    }
}

async fn lease(app: &TestApp, asks: Vec<proto::LeaseAsk>) -> Vec<proto::LeaseGrant> {
    app.verifier()
        .lease_quota(proto::LeaseQuotaRequest { asks })
        .await
        .unwrap()
        .into_inner()
        .grants
}

/// A grant is counted by the replica's own counters: what it holds VerifyKey no longer
/// admits, and what a settlement gives back it admits again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_and_its_settlement_count_where_verify_key_counts() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let issued = app.issue_with(|r| r.rate_limits = vec![rpm(10)]).await;
    let grants = lease(&app, vec![ask(&issued, 6)]).await;
    assert_eq!(grants.len(), 1);
    let g = &grants[0];
    assert_eq!(g.code, VerifyCode::Valid as i32);
    assert_eq!(g.amount, 6);
    assert!(g.counted_at_micros > app.clock.now());
    assert_eq!(
        g.life,
        Some(prost_types::Duration {
            seconds: 2,
            nanos: 0
        })
    );
    let figures = g.rate_limit.as_ref().unwrap();
    assert_eq!((figures.limit, figures.remaining), (10, 4));
    assert!(!g.rate_limit_unknown);
    let valid = |app: &TestApp| {
        let key = issued.key.clone();
        let channel = app.channel.clone();
        async move {
            let mut n = 0;
            for _ in 0..10 {
                if code_of(&channel, &key).await == VerifyCode::Valid {
                    n += 1;
                }
            }
            n
        }
    };
    assert_eq!(valid(&app).await, 4, "10 - the 6 leased");
    // The holder used 2 of 6: 4 go back.
    let settle = proto::LeaseSettlement {
        granted: g.amount,
        counted_at_micros: g.counted_at_micros,
        used: 2,
        limits: vec![rpm(10)],
        lease_id: g.lease_id,
        pools: Vec::new(),
    };
    let grants = lease(
        &app,
        vec![proto::LeaseAsk {
            want: 0,
            settle: Some(settle),
            ..ask(&issued, 0)
        }],
    )
    .await;
    assert_eq!(
        (grants[0].amount, grants[0].code),
        (0, VerifyCode::Valid as i32)
    );
    assert_eq!(valid(&app).await, 4, "the 4 the lease did not use");
    // Nothing left: a refusal, with when to retry.
    let refused = &lease(&app, vec![ask(&issued, 1)]).await[0];
    assert_eq!(refused.amount, 0);
    assert_eq!(refused.code, VerifyCode::RateLimited as i32);
    let figures = refused.rate_limit.as_ref().unwrap();
    assert!(!figures.allowed && figures.retry_after.is_some());
    // The usage history counts the calls the holder admitted from its lease (2) with
    // the 8 VerifyKey admitted and the 12 it refused.
    app.server().flush_usage().await;
    let records = proto::usage_service_client::UsageServiceClient::with_interceptor(
        app.channel.clone(),
        bearer(ADMIN_TOKEN),
    )
    .query_usage(proto::QueryUsageRequest {
        workspace_id: "ws_test".into(),
        group_by: proto::UsageGroupBy::Key as i32,
        granularity: proto::UsageGranularity::Day as i32,
        since: Some(ts_in(&app.clock, -3_600)),
        actor: Some(actor()),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .records;
    let admitted: u64 = records.iter().map(|r| r.admitted).sum();
    let refused: u64 = records.iter().map(|r| r.refused).sum();
    assert_eq!((admitted, refused), (10, 12));
}

/// A key in a team's pool is leased from its own counter and the team's together: the
/// grant is what both have room for, names the team's part for the settlement, and the
/// settlement gives back to both what the lease did not use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_grant_is_what_every_counter_has_room_for_and_its_settlement_frees_each() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    team_with_pool(&app, "team_ml", vec![rpm(10)]).await;
    let in_team = |r: &mut proto::IssueKeyRequest| {
        r.team_id = "team_ml".into();
        r.rate_limits = vec![rpm(100)];
    };
    let leased = app.issue_with(in_team).await;
    let other = app.issue_with(in_team).await;
    let g = lease(&app, vec![ask(&leased, 50)]).await.remove(0);
    assert_eq!(g.code, VerifyCode::Valid as i32);
    assert_eq!(g.amount, 10, "the team has room for 10");
    assert_eq!(g.pools.len(), 1);
    let team = &g.pools[0];
    assert_eq!(team.counter, "team ws_test team_ml");
    assert_eq!((team.granted, team.limits.clone()), (10, vec![rpm(10)]));
    let figures = g.rate_limit.as_ref().unwrap();
    assert_eq!(
        (figures.limit, figures.remaining),
        (10, 0),
        "the team binds"
    );
    let scopes: Vec<_> = figures.windows.iter().map(|w| w.scope()).collect();
    assert_eq!(
        scopes,
        vec![proto::LimitScope::Key, proto::LimitScope::Team]
    );
    // The lease holds the whole team's room: the team's other key is refused.
    assert_eq!(
        code_of(&app.channel, &other.key).await,
        VerifyCode::RateLimited
    );
    // 3 used: 7 go back to the team (and 47 to the key's own counter).
    let settle = proto::LeaseSettlement {
        granted: g.amount,
        counted_at_micros: g.counted_at_micros,
        used: 3,
        limits: vec![rpm(100)],
        lease_id: g.lease_id,
        pools: g.pools.clone(),
    };
    let settled = lease(
        &app,
        vec![proto::LeaseAsk {
            want: 0,
            settle: Some(settle.clone()),
            ..ask(&leased, 0)
        }],
    )
    .await;
    assert_eq!(settled[0].code, VerifyCode::Valid as i32);
    let mut admitted = 0;
    for _ in 0..10 {
        if code_of(&app.channel, &other.key).await == VerifyCode::Valid {
            admitted += 1;
        }
    }
    assert_eq!(
        admitted, 7,
        "the 7 the lease did not use, shared by the team"
    );
    // A settlement repeated (an answer lost) gives back nothing more.
    lease(
        &app,
        vec![proto::LeaseAsk {
            want: 0,
            settle: Some(settle),
            ..ask(&leased, 0)
        }],
    )
    .await;
    assert_eq!(
        code_of(&app.channel, &other.key).await,
        VerifyCode::RateLimited
    );
    // The team full, nothing is granted and the key's own counter keeps nothing of it:
    // a refusal naming the team.
    let refused = lease(&app, vec![ask(&leased, 5)]).await.remove(0);
    assert_eq!(
        (refused.amount, refused.code),
        (0, VerifyCode::RateLimited as i32)
    );
    assert!(refused.pools.is_empty());
    let figures = refused.rate_limit.as_ref().unwrap();
    assert!(!figures.allowed);
    assert_eq!(figures.windows[0].scope(), proto::LimitScope::Team);
}

/// A pool with a budget is judged on the server call by call (spend is reported after
/// the call, which a lease of requests cannot foresee): no lease for its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_a_pool_with_a_budget_gets_no_lease() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    proto::workspace_service_client::WorkspaceServiceClient::with_interceptor(
        app.channel.clone(),
        bearer(ADMIN_TOKEN),
    )
    .update_workspace(proto::UpdateWorkspaceRequest {
        workspace_id: "ws_test".into(),
        actor: Some(actor()),
        budget: Some(proto::PoolBudget {
            max_budget_micros: 1_000,
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: vec!["budget".into()],
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let issued = app.issue_with(|r| r.rate_limits = vec![rpm(100)]).await;
    let g = lease(&app, vec![ask(&issued, 5)]).await.remove(0);
    assert_eq!(g.amount, 0);
    assert!(g.rate_limit_unknown, "judged call by call: {g:?}");
}

/// Only the key's own state is judged, and a hash must belong to the key id named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_refused_for_a_revoked_key_or_a_hash_of_another_key() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let revoked = app.issue_with(|r| r.rate_limits = vec![rpm(10)]).await;
    let other = app.issue().await;
    app.admin()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: revoked.key_info.as_ref().unwrap().key_id.clone(),
            actor: Some(actor()),
            reason: "leaked".into(),
        })
        .await
        .unwrap();
    let mismatched = proto::LeaseAsk {
        key_hash: hash_of(&other.key),
        ..ask(&revoked, 5)
    };
    let unknown = proto::LeaseAsk {
        key_hash: hash_of("kw_live_nothing"),
        ..ask(&other, 5)
    };
    let grants = lease(&app, vec![ask(&revoked, 5), mismatched, unknown]).await;
    let codes: Vec<(u64, i32)> = grants.iter().map(|g| (g.amount, g.code)).collect();
    assert_eq!(
        codes,
        vec![
            (0, VerifyCode::Revoked as i32),
            (0, VerifyCode::NotFound as i32),
            (0, VerifyCode::NotFound as i32),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_quota_names_every_invalid_field() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let empty = app
        .verifier()
        .lease_quota(proto::LeaseQuotaRequest { asks: vec![] })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&empty), vec!["asks"]);
    let bad = proto::LeaseAsk {
        key_id: "not a key id".into(),
        key_hash: "ABC".into(),
        want: keywarden::domain::lease::MAX_LEASE + 1,
        min: 0,
        settle: Some(proto::LeaseSettlement {
            granted: 3,
            counted_at_micros: 0,
            used: 4,
            limits: vec![proto::RateLimit { unit: 0, ..rpm(10) }],
            lease_id: 0,
            pools: Vec::new(),
        }),
    };
    let issued = app.issue().await;
    let zero = proto::LeaseAsk {
        want: 0,
        min: 0,
        ..ask(&issued, 0)
    };
    let min_above_want = proto::LeaseAsk {
        want: 2,
        min: 3,
        ..zero.clone()
    };
    let team = proto::PoolLease {
        counter: "team ws_test team_ml".into(),
        granted: 3,
        counted_at_micros: 1,
        lease_id: 1,
        limits: vec![rpm(10)],
    };
    let bad_pools = proto::LeaseAsk {
        settle: Some(proto::LeaseSettlement {
            granted: 3,
            counted_at_micros: 1,
            used: 2,
            limits: vec![],
            lease_id: 1,
            pools: vec![
                proto::PoolLease {
                    counter: "ws_test".into(),
                    granted: 1,
                    limits: vec![proto::RateLimit { unit: 0, ..rpm(10) }],
                    ..team.clone()
                },
                team.clone(),
                team.clone(),
                team,
            ],
        }),
        ..zero.clone()
    };
    let status = app
        .verifier()
        .lease_quota(proto::LeaseQuotaRequest {
            asks: vec![bad, zero, min_above_want, bad_pools],
        })
        .await
        .unwrap_err();
    let mut fields = violated_fields(&status);
    fields.sort();
    assert_eq!(
        fields,
        vec![
            "asks[0].key_hash",
            "asks[0].key_id",
            "asks[0].settle.counted_at_micros",
            "asks[0].settle.limits[0].unit",
            "asks[0].settle.used",
            "asks[0].want",
            "asks[1].want",
            "asks[2].min",
            "asks[3].settle.pools",
            "asks[3].settle.pools[0].counter",
            "asks[3].settle.pools[0].granted",
            "asks[3].settle.pools[0].limits[0].unit",
        ]
    );
    let too_many = app
        .verifier()
        .lease_quota(proto::LeaseQuotaRequest {
            asks: vec![
                proto::LeaseAsk {
                    want: 1,
                    ..Default::default()
                };
                1001
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&too_many), vec!["asks"]);
}

/// With `rate_limits.edge_lease_ms = 0` the replica leases nothing
/// (QUOTA_LEASES_DISABLED), and an edge Verifier then sends every rate-limited call to
/// VerifyKey, answered as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_edge_leases_off_the_edge_verifies_every_limited_call() {
    use tonic_types::StatusExt;
    let app = TestApp::spawn_with(Backend::Sqlite, |s| s.edge_lease = None).await;
    let issued = app.issue_with(|r| r.rate_limits = vec![rpm(3)]).await;
    let refused = app
        .verifier()
        .lease_quota(proto::LeaseQuotaRequest {
            asks: vec![ask(&issued, 1)],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        refused.get_details_error_info().unwrap().reason,
        "QUOTA_LEASES_DISABLED"
    );
    let edge = edge_on(&app.channel).await;
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(code(&edge.verify(&issued.key, &[]).await.unwrap()));
    }
    assert_eq!(
        codes,
        [
            VerifyCode::Valid,
            VerifyCode::Valid,
            VerifyCode::Valid,
            VerifyCode::RateLimited,
            VerifyCode::RateLimited
        ]
    );
    let stats = edge.stats();
    assert_eq!((stats.server_calls, stats.leased), (5, 0), "{stats:?}");
    edge.shutdown().await;
}

/// A grant is registered under its id, in memory and in Redis: a settlement repeated (an
/// answer lost and the call made again) or naming a grant never made gives nothing back,
/// and what was registered, not what the caller says, is what a settlement takes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_is_settled_once_and_only_as_registered() {
    for on_redis in [false, true] {
        a_grant_is_settled_once_and_only_as_registered_on(on_redis).await;
    }
}

async fn a_grant_is_settled_once_and_only_as_registered_on(on_redis: bool) {
    let prefix = prefix();
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        if on_redis {
            leasing_from_redis(s, &prefix);
            // The replica decides its own calls one by one here, so that VerifyKey shows
            // exactly what the counters hold.
            if let LimiterSettings::Redis { lease, .. } = &mut s.limiter {
                *lease = None;
            }
        }
    })
    .await;
    let issued = app.issue_with(|r| r.rate_limits = vec![rpm(10)]).await;
    let g = lease(&app, vec![ask(&issued, 6)]).await.remove(0);
    assert_eq!(g.amount, 6);
    assert_ne!(g.lease_id, 0, "the counters name their grants");
    let settle = |used: u64, lease_id: u64, granted: u64| proto::LeaseAsk {
        want: 0,
        settle: Some(proto::LeaseSettlement {
            granted,
            counted_at_micros: g.counted_at_micros,
            used,
            limits: vec![rpm(10)],
            lease_id,
            pools: Vec::new(),
        }),
        ..ask(&issued, 0)
    };
    // A grant never made, and one claiming more than was granted: nothing, and only
    // the registered 6, are given back.
    lease(&app, vec![settle(0, g.lease_id ^ 1, 6)]).await;
    lease(&app, vec![settle(2, g.lease_id, 1_000)]).await;
    // Repeated: nothing more.
    lease(&app, vec![settle(0, g.lease_id, 6)]).await;
    let mut valid = 0;
    for _ in 0..12 {
        if code_of(&app.channel, &issued.key).await == VerifyCode::Valid {
            valid += 1;
        }
    }
    assert_eq!(
        valid, 8,
        "10 - the 2 the holder used (on Redis: {on_redis})"
    );
}

/// Asks ahead are sent together, and replaced leases settled together, one round trip
/// for each batch: each grant and each settlement applies as if sent alone (two asks
/// for one key share its room; a settlement applies once, by what was registered, so a
/// repeat in the same batch gives back nothing more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_and_settlements_sent_together_each_apply_as_if_alone() {
    use keywarden::domain::lease::Amounts;
    use keywarden::domain::limits::{LimitUnit, LimitWindow, RateLimit};
    use keywarden::ratelimit::leased::{GrantAsk, LeaseRecord, QuotaAuthority, Settle};
    use keywarden::ratelimit::redis::RedisLimiter;

    let url = std::env::var("KEYWARDEN_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let redis = RedisLimiter::new(
        &url,
        &prefix(),
        FailureMode::Closed,
        Default::default(),
        Duration::from_millis(100),
    )
    .unwrap();
    let limits = vec![RateLimit {
        unit: LimitUnit::Requests,
        window: LimitWindow::Minute,
        limit: 10,
    }];
    let now = 1_800_000_000_000_000;
    let life = 2_000_000;
    let ask = |key_id: &str, want: u64, limits: &[RateLimit]| GrantAsk {
        key_id: key_id.into(),
        limits: limits.to_vec(),
        want: Amounts::requests(want),
        min: 1,
        life,
        now,
    };
    let grants: Vec<_> = redis
        .grant_many(&[
            ask("key_a", 6, &limits),
            ask("key_b", 4, &limits),
            ask("key_c", 6, &limits),
            ask("key_c", 6, &limits),
            ask("key_unlimited", 7, &[]),
        ])
        .await
        .into_iter()
        .map(|g| g.unwrap().unwrap())
        .collect();
    let amounts: Vec<u64> = grants.iter().map(|g| g.amount).collect();
    assert_eq!(
        amounts,
        vec![6, 4, 6, 4, 7],
        "key_c's two asks share its 10"
    );
    let mut batch = Vec::new();
    for (g, (key_id, used)) in grants.iter().zip([("key_a", 2), ("key_b", 1)]) {
        assert_ne!(g.id, 0);
        batch.push(Settle {
            key_id: key_id.into(),
            limits: limits.clone(),
            record: LeaseRecord {
                granted: g.amount,
                tokens: 0,
                counted_at: g.counted_at,
                id: g.id,
            },
            used: Amounts::requests(used),
            now,
        });
    }
    let repeated = batch[0].clone();
    batch.push(repeated);
    redis.settle_many(&batch).await.unwrap();
    let c = redis
        .grant("key_c", &limits, Amounts::requests(1), 1, life, now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.amount, 0, "key_c's room is all leased");
    for (key_id, left) in [("key_a", 8), ("key_b", 9)] {
        let g = redis
            .grant(key_id, &limits, Amounts::requests(10), 1, life, now)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(g.amount, left, "{key_id}: 10 less what its lease used");
    }
}
