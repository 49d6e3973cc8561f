//! Pools: rate limits shared by every key of a team, an owner or a workspace, through
//! real servers on both stores, with counters in memory and in Redis. A call counts
//! against its key and every pool it belongs to, is refused by the first that is spent
//! (named in the answer), and a refused call is not counted in the key. A pool set on one
//! replica binds on another at its next call.
//!
//! Time is the test's manual clock: windows pass by advancing it, never by sleeping.

mod common;

use std::time::Duration;

use common::*;
use keywarden::proto::team_service_client::TeamServiceClient;
use keywarden::proto::workspace_service_client::WorkspaceServiceClient;
use keywarden::proto::{self, LimitScope, VerifyCode};
use prost_types::FieldMask;
use tokio::time::Instant;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Teams = TeamServiceClient<InterceptedService<Channel, Bearer>>;
type Workspaces = WorkspaceServiceClient<InterceptedService<Channel, Bearer>>;

fn teams(channel: &Channel) -> Teams {
    TeamServiceClient::with_interceptor(channel.clone(), bearer(ADMIN_TOKEN))
}

fn workspaces(channel: &Channel) -> Workspaces {
    WorkspaceServiceClient::with_interceptor(channel.clone(), bearer(ADMIN_TOKEN))
}

fn rpm(n: u64) -> proto::RateLimit {
    proto::RateLimit {
        unit: proto::RateLimitUnit::Requests as i32,
        window: proto::RateLimitWindow::Minute as i32,
        limit: n,
    }
}

async fn spawn(backend: Backend, counters: Counters) -> TestApp {
    let prefix = redis_prefix();
    TestApp::spawn_with(backend, |s| use_counters(s, counters, &prefix)).await
}

async fn create_team(app: &TestApp, team_id: &str) {
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
}

fn team_pool(team_id: &str, limits: Vec<proto::RateLimit>) -> proto::UpdateTeamRequest {
    proto::UpdateTeamRequest {
        workspace_id: "ws_test".into(),
        team_id: team_id.into(),
        actor: Some(actor()),
        rate_limits: limits,
        update_mask: Some(FieldMask {
            paths: vec!["rate_limits".into()],
        }),
        ..Default::default()
    }
}

async fn set_team_pool(channel: &Channel, team_id: &str, limits: Vec<proto::RateLimit>) {
    let team = teams(channel)
        .update_team(team_pool(team_id, limits.clone()))
        .await
        .unwrap()
        .into_inner()
        .team
        .unwrap();
    assert_eq!(team.rate_limits, limits);
}

fn owner_pool(owner: &str, limits: Vec<proto::RateLimit>) -> proto::SetOwnerLimitsRequest {
    proto::SetOwnerLimitsRequest {
        workspace_id: "ws_test".into(),
        owner: Some(user(owner)),
        rate_limits: limits,
        actor: Some(actor()),
        budget: None,
    }
}

fn scopes(r: &proto::VerifyKeyResponse) -> Vec<LimitScope> {
    r.rate_limit
        .as_ref()
        .map(|d| d.windows.iter().map(|w| w.scope()).collect())
        .unwrap_or_default()
}

/// The issue's own example: two keys of one team share its 10-a-minute pool, so 10 calls
/// pass between them and the 11th is refused naming the team; the refused call is not
/// counted in the key's own window; the next minute admits again.
async fn two_keys_of_a_team_share_its_pool(backend: Backend, counters: Counters) {
    let app = spawn(backend, counters).await;
    create_team(&app, "team_ml").await;
    set_team_pool(&app.channel, "team_ml", vec![rpm(10)]).await;
    let issue = |_| {
        app.issue_with(|r| {
            r.team_id = "team_ml".into();
            r.rate_limits = vec![rpm(100)];
        })
    };
    let keys = [issue(0).await.key, issue(1).await.key];
    let verifier = app.verifier();
    for i in 0..10 {
        let r = verify_with(&verifier, &keys[i % 2], 1).await;
        assert!(r.valid, "call {i}: {r:?}");
        assert_eq!(scopes(&r), [LimitScope::Key, LimitScope::Team]);
        let d = r.rate_limit.unwrap();
        assert_eq!(d.scope(), LimitScope::Team, "the team's pool binds first");
        assert_eq!((d.limit, d.remaining), (10, 9 - i as u64));
    }
    let refused = verify_with(&verifier, &keys[0], 1).await;
    assert_eq!(code(&refused), VerifyCode::RateLimited);
    let d = refused.rate_limit.unwrap();
    assert_eq!(d.scope(), LimitScope::Team);
    assert_eq!((d.limit, d.remaining), (10, 0));
    assert!(d.retry_after.is_some());
    let own = &d.windows[0];
    assert_eq!(own.scope(), LimitScope::Key);
    assert_eq!(own.used, 5, "the refused call is not counted in the key");
    assert_eq!(
        code(&verify_with(&verifier, &keys[1], 1).await),
        VerifyCode::RateLimited
    );

    app.clock.advance(Duration::from_secs(62));
    let r = verify_with(&verifier, &keys[1], 1).await;
    assert!(r.valid, "{r:?}");
    assert_eq!(r.rate_limit.unwrap().remaining, 9);
}

/// A team's token window counts the tokens reported for every key of the team: once
/// their sum spends it, the next call of any team key is refused naming the team.
async fn a_team_token_window_counts_every_keys_tokens(backend: Backend, counters: Counters) {
    let app = spawn(backend, counters).await;
    create_team(&app, "team_ml").await;
    let tpm = proto::RateLimit {
        unit: proto::RateLimitUnit::Tokens as i32,
        window: proto::RateLimitWindow::Minute as i32,
        limit: 100,
    };
    set_team_pool(&app.channel, "team_ml", vec![rpm(1_000), tpm]).await;
    let issue = || app.issue_with(|r| r.team_id = "team_ml".into());
    let (a, b) = (issue().await, issue().await);
    let verifier = app.verifier();
    for (key, tokens) in [(&a, 60), (&b, 50)] {
        assert!(verify_with(&verifier, &key.key, 1).await.valid);
        verifier
            .clone()
            .report_usage(proto::ReportUsageRequest {
                key_id: key.key_info.as_ref().unwrap().key_id.clone(),
                tokens,
                spend_micros: 0,
            })
            .await
            .unwrap();
    }
    for key in [&a, &b] {
        let refused = verify_with(&verifier, &key.key, 1).await;
        assert_eq!(code(&refused), VerifyCode::RateLimited, "{refused:?}");
        let d = refused.rate_limit.unwrap();
        assert_eq!((d.scope(), d.limit), (LimitScope::Team, 100));
    }
}

/// An owner's pool binds before the workspace's, and each refusal names its own: the
/// owner's two keys stop at 3, another owner's key at what the workspace has left.
async fn owner_and_workspace_pools_bind_in_order_and_name_themselves(
    backend: Backend,
    counters: Counters,
) {
    let app = spawn(backend, counters).await;
    let set = workspaces(&app.channel)
        .set_owner_limits(owner_pool("user_1", vec![rpm(3)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.rate_limits, [rpm(3)]);
    let workspace = workspaces(&app.channel)
        .update_workspace(proto::UpdateWorkspaceRequest {
            workspace_id: "ws_test".into(),
            actor: Some(actor()),
            rate_limits: vec![rpm(5)],
            update_mask: Some(FieldMask {
                paths: vec!["rate_limits".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    assert_eq!(workspace.rate_limits, [rpm(5)]);
    let got = workspaces(&app.channel)
        .get_owner_limits(proto::GetOwnerLimitsRequest {
            workspace_id: "ws_test".into(),
            owner: Some(user("user_1")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.rate_limits, [rpm(3)]);

    let mine = [app.issue().await.key, app.issue().await.key];
    let theirs = app.issue_with(|r| r.owner = Some(user("user_2"))).await.key;
    let verifier = app.verifier();
    for i in 0..3 {
        let r = verify_with(&verifier, &mine[i % 2], 1).await;
        assert!(r.valid, "{r:?}");
        assert_eq!(
            scopes(&r)[1..],
            [LimitScope::Owner, LimitScope::Workspace],
            "the key's own default first, then owner, then workspace"
        );
    }
    let refused = verify_with(&verifier, &mine[1], 1).await;
    assert_eq!(code(&refused), VerifyCode::RateLimited);
    assert_eq!(refused.rate_limit.unwrap().scope(), LimitScope::Owner);
    for _ in 0..2 {
        assert!(verify_with(&verifier, &theirs, 1).await.valid);
    }
    let refused = verify_with(&verifier, &theirs, 1).await;
    assert_eq!(code(&refused), VerifyCode::RateLimited);
    let d = refused.rate_limit.unwrap();
    assert_eq!((d.scope(), d.limit), (LimitScope::Workspace, 5));

    // Removing the owner's pool frees the owner's keys from it at once; the workspace's
    // still binds (it is spent).
    workspaces(&app.channel)
        .set_owner_limits(owner_pool("user_1", Vec::new()))
        .await
        .unwrap();
    let r = verify_with(&verifier, &mine[0], 1).await;
    assert_eq!(code(&r), VerifyCode::RateLimited);
    assert_eq!(
        scopes(&r)[1..],
        [LimitScope::Workspace],
        "the owner's pool is gone"
    );
}

/// A team pool set through replica A binds at replica B's next call, and with counters
/// in Redis the two replicas together never admit more than it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pool_set_on_one_replica_binds_on_another_and_both_share_it() {
    let prefix = redis_prefix();
    let app = TestApp::spawn_with(Backend::Postgres, |s| {
        use_counters(s, Counters::Redis, &prefix)
    })
    .await;
    let b = Replica::start(&app, |s| use_counters(s, Counters::Redis, &prefix)).await;
    create_team(&app, "team_ml").await;
    let key = app.issue_with(|r| r.team_id = "team_ml".into()).await.key;
    let (on_a, on_b) = (app.verifier(), b.verifier());
    assert_eq!(
        scopes(&verify_with(&on_b, &key, 1).await),
        [LimitScope::Key]
    );
    set_team_pool(&app.channel, "team_ml", vec![rpm(4)]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut admitted = 0;
    loop {
        let r = verify_with(&on_b, &key, 1).await;
        if scopes(&r).contains(&LimitScope::Team) {
            admitted += usize::from(r.valid);
            break;
        }
        assert!(Instant::now() < deadline, "B never applied the team's pool");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..12 {
        let r = verify_with(if i % 2 == 0 { &on_a } else { &on_b }, &key, 1).await;
        match code(&r) {
            VerifyCode::Valid => admitted += 1,
            VerifyCode::RateLimited => {
                assert_eq!(r.rate_limit.unwrap().scope(), LimitScope::Team)
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        (1..=4).contains(&admitted),
        "two replicas admitted {admitted} against a pool of 4"
    );
}

/// With Redis deciding per call, a pooled call registers a grant per counter (so a
/// pool's refusal can give the key's back); every registration is closed, so no
/// registry grows by a field per call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_calls_decided_per_call_in_redis_leave_no_registration_behind() {
    let prefix = redis_prefix();
    let app = TestApp::spawn_with(Backend::Postgres, |s| {
        use_counters(s, Counters::Redis, &prefix)
    })
    .await;
    create_team(&app, "team_ml").await;
    set_team_pool(&app.channel, "team_ml", vec![rpm(3)]).await;
    let key = app
        .issue_with(|r| {
            r.team_id = "team_ml".into();
            r.rate_limits = vec![rpm(100)];
        })
        .await;
    let verifier = app.verifier();
    let codes: Vec<VerifyCode> = {
        let mut codes = Vec::new();
        for _ in 0..5 {
            codes.push(code(&verify_with(&verifier, &key.key, 1).await));
        }
        codes
    };
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
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let registries: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:rl:*:grants2"))
        .query_async(&mut redis)
        .await
        .unwrap();
    for registry in registries {
        let fields: i64 = redis::cmd("HLEN")
            .arg(&registry)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(fields, 0, "{registry} keeps {fields} registrations");
    }
}

/// Replicas deciding from quota leases in Redis (the default with `backend = "redis"`)
/// share a team's pool like the per-call path: never more than it between two keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_pool_holds_with_leases_in_redis() {
    let prefix = redis_prefix();
    let app = TestApp::spawn_with(Backend::Postgres, |s| {
        use_counters(s, Counters::Redis, &prefix);
        if let keywarden::config::LimiterSettings::Redis { lease, .. } = &mut s.limiter {
            *lease = Some(keywarden::ratelimit::leased::LeaseSettings::default());
        }
    })
    .await;
    create_team(&app, "team_ml").await;
    set_team_pool(&app.channel, "team_ml", vec![rpm(10)]).await;
    let issue = || {
        app.issue_with(|r| {
            r.team_id = "team_ml".into();
            r.rate_limits = vec![rpm(100)];
        })
    };
    let keys = [issue().await.key, issue().await.key];
    let verifier = app.verifier();
    let mut admitted = 0;
    for i in 0..30 {
        let r = verify_with(&verifier, &keys[i % 2], 1).await;
        match code(&r) {
            VerifyCode::Valid => admitted += 1,
            VerifyCode::RateLimited => {
                assert_eq!(r.rate_limit.unwrap().scope(), LimitScope::Team)
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        (1..=10).contains(&admitted),
        "{admitted} admitted against a team pool of 10"
    );
}

/// Bad pools are refused naming the field, and change nothing.
async fn pools_are_validated_and_a_refused_change_writes_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    create_team(&app, "team_ml").await;
    let unspecified = proto::RateLimit { unit: 0, ..rpm(1) };
    let status = teams(&app.channel)
        .update_team(team_pool("team_ml", vec![unspecified]))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["rate_limits[0].unit"]);
    let status = teams(&app.channel)
        .update_team(team_pool("team_ml", vec![rpm(1), rpm(2)]))
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        ["rate_limits[1]"],
        "one limit per unit and window"
    );
    let status = workspaces(&app.channel)
        .set_owner_limits(proto::SetOwnerLimitsRequest {
            owner: None,
            ..owner_pool("user_1", vec![rpm(0)])
        })
        .await
        .unwrap_err();
    let fields = violated_fields(&status);
    assert!(fields.contains(&"owner".to_owned()), "{fields:?}");
    let status = workspaces(&app.channel)
        .set_owner_limits(proto::SetOwnerLimitsRequest {
            workspace_id: "ws_missing".into(),
            ..owner_pool("user_1", vec![rpm(3)])
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = workspaces(&app.channel)
        .get_owner_limits(proto::GetOwnerLimitsRequest {
            workspace_id: "ws_missing".into(),
            owner: Some(user("user_1")),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let team = teams(&app.channel)
        .get_team(proto::GetTeamRequest {
            workspace_id: "ws_test".into(),
            team_id: "team_ml".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .team
        .unwrap();
    assert!(team.rate_limits.is_empty());
    assert_eq!(app.db.count("SELECT count(*) FROM owner_limits").await, 0);
    // A pool that is set is audited.
    workspaces(&app.channel)
        .set_owner_limits(owner_pool("user_1", vec![rpm(3)]))
        .await
        .unwrap();
    assert_eq!(
        app.db
            .count("SELECT count(*) FROM audit_events WHERE action = 'owner.limits'")
            .await,
        1
    );
}

each_store_and_counter!(
    two_keys_of_a_team_share_its_pool,
    a_team_token_window_counts_every_keys_tokens,
    owner_and_workspace_pools_bind_in_order_and_name_themselves,
);

both_backends!(pools_are_validated_and_a_refused_change_writes_nothing);
