//! Pool budgets: a spend ceiling shared by every key of a workspace, a team or an owner,
//! through real servers on both stores, with counters in memory and in Redis. The spend
//! every key of the pool reports counts against it; once it is reached each of them is
//! refused BUDGET_EXCEEDED naming the pool; a monthly budget admits again at the month's
//! turn (the test clock's); the pool's spend is written to its row and shown on reads.
//!
//! Time is the test's manual clock: periods pass by advancing it, never by sleeping.

mod common;

use std::time::Duration;

use common::*;
use keywarden::domain::budget::{self, BudgetPeriod};
use keywarden::proto::team_service_client::TeamServiceClient;
use keywarden::proto::workspace_service_client::WorkspaceServiceClient;
use keywarden::proto::{self, LimitScope, VerifyCode};
use prost_types::FieldMask;
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

async fn spawn(backend: Backend, counters: Counters) -> TestApp {
    let prefix = redis_prefix();
    TestApp::spawn_with(backend, |s| use_counters(s, counters, &prefix)).await
}

fn monthly(max: u64) -> proto::PoolBudget {
    proto::PoolBudget {
        max_budget_micros: max,
        budget_period: proto::BudgetPeriod::Monthly as i32,
        ..Default::default()
    }
}

fn workspace_budget(budget: Option<proto::PoolBudget>) -> proto::UpdateWorkspaceRequest {
    proto::UpdateWorkspaceRequest {
        workspace_id: "ws_test".into(),
        actor: Some(actor()),
        budget,
        update_mask: Some(FieldMask {
            paths: vec!["budget".into()],
        }),
        ..Default::default()
    }
}

async fn get_workspace(channel: &Channel) -> proto::Workspace {
    workspaces(channel)
        .get_workspace(proto::GetWorkspaceRequest {
            workspace_id: "ws_test".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap()
}

/// The README's example: a monthly workspace budget counts what every key of the
/// workspace reports; once reached, each key is refused naming the workspace, until the
/// month's turn. The workspace shows its spend and when it resets.
async fn a_monthly_workspace_budget_binds_every_key_until_the_months_turn(
    backend: Backend,
    counters: Counters,
) {
    let app = spawn(backend, counters).await;
    let w = workspaces(&app.channel)
        .update_workspace(workspace_budget(Some(monthly(1_000))))
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    let b = w.budget.unwrap();
    assert_eq!(b.max_budget_micros, 1_000);
    assert_eq!(b.budget_period(), proto::BudgetPeriod::Monthly);
    let this_month = budget::epoch(BudgetPeriod::Month, 0, 0, app.clock.now());
    assert_eq!(
        b.budget_resets_at.map(|t| t.seconds * 1_000_000),
        Some(this_month.ends)
    );
    let mine = app.issue_with(|r| r.owner = Some(user("user_1"))).await;
    let theirs = app.issue_with(|r| r.owner = Some(user("user_2"))).await;
    let id = |i: &proto::IssueKeyResponse| i.key_info.as_ref().unwrap().key_id.clone();
    let verifier = app.verifier();

    assert!(verify_with(&verifier, &mine.key, 1).await.valid);
    report_with(&verifier, &id(&mine), 0, 600).await.unwrap();
    let r = verify_with(&verifier, &theirs.key, 1).await;
    assert!(r.valid, "600 of 1000 spent: {r:?}");
    assert_eq!(r.budget_scope(), LimitScope::Unspecified);
    report_with(&verifier, &id(&theirs), 0, 400).await.unwrap();
    for key in [&mine.key, &theirs.key] {
        let r = verify_with(&verifier, key, 1).await;
        assert_eq!(code(&r), VerifyCode::BudgetExceeded, "{r:?}");
        assert_eq!(r.budget_scope(), LimitScope::Workspace);
        assert!(r.spent_micros < 1_000, "the key's own spend is its own");
    }
    // The pool's spend is written to the workspace's row, with this month's epoch.
    app.server().flush_usage().await;
    let spent = get_workspace(&app.channel)
        .await
        .budget
        .unwrap()
        .spent_micros;
    assert_eq!(spent, 1_000);

    let to_end = Duration::from_micros((this_month.ends - app.clock.now()) as u64);
    app.clock.advance(to_end - Duration::from_secs(1));
    assert_eq!(
        code(&verify_with(&verifier, &mine.key, 1).await),
        VerifyCode::BudgetExceeded
    );
    app.clock.advance(Duration::from_secs(3_601));
    for key in [&mine.key, &theirs.key] {
        let r = verify_with(&verifier, key, 1).await;
        assert!(r.valid, "a new month admits again: {r:?}");
    }
    let b = get_workspace(&app.channel).await.budget.unwrap();
    assert_eq!(
        b.spent_micros, 0,
        "last month's stored spend counts nothing"
    );
    assert_eq!(
        b.budget_period_start.map(|t| t.seconds * 1_000_000),
        Some(this_month.ends)
    );
    // Spend of the new month is written over last month's.
    report_with(&verifier, &id(&mine), 0, 5).await.unwrap();
    app.server().flush_usage().await;
    assert_eq!(
        get_workspace(&app.channel)
            .await
            .budget
            .unwrap()
            .spent_micros,
        5
    );
}

/// A team's budget binds its keys and no other; an owner's binds the owner's keys and no
/// other; removing a budget admits at once.
async fn team_and_owner_budgets_bind_only_their_own_keys(backend: Backend, counters: Counters) {
    let app = spawn(backend, counters).await;
    teams(&app.channel)
        .create_team(proto::CreateTeamRequest {
            workspace_id: "ws_test".into(),
            team_id: "team_ml".into(),
            name: "ML".into(),
            policy: None,
            actor: Some(actor()),
        })
        .await
        .unwrap();
    let team = teams(&app.channel)
        .update_team(proto::UpdateTeamRequest {
            workspace_id: "ws_test".into(),
            team_id: "team_ml".into(),
            actor: Some(actor()),
            budget: Some(proto::PoolBudget {
                max_budget_micros: 100,
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["budget".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .team
        .unwrap();
    let b = team.budget.unwrap();
    assert_eq!(b.budget_period(), proto::BudgetPeriod::Unspecified);
    assert_eq!(b.budget_resets_at, None, "a lifetime budget never resets");
    let owner = workspaces(&app.channel)
        .set_owner_limits(proto::SetOwnerLimitsRequest {
            workspace_id: "ws_test".into(),
            owner: Some(user("user_9")),
            rate_limits: Vec::new(),
            actor: Some(actor()),
            budget: Some(proto::PoolBudget {
                max_budget_micros: 50,
                budget_period: proto::BudgetPeriod::RollingDays as i32,
                budget_period_days: 30,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let b = owner.budget.unwrap();
    assert_eq!(b.budget_period_days, 30);
    assert_eq!(
        b.budget_period_start.map(|t| t.seconds),
        Some(app.clock.now() / 1_000_000),
        "a rolling period counts from when it was set"
    );

    let in_team = app.issue_with(|r| r.team_id = "team_ml".into()).await;
    let outside = app.issue().await;
    let owned = app.issue_with(|r| r.owner = Some(user("user_9"))).await;
    let id = |i: &proto::IssueKeyResponse| i.key_info.as_ref().unwrap().key_id.clone();
    let verifier = app.verifier();
    for issued in [&in_team, &outside, &owned] {
        assert!(verify_with(&verifier, &issued.key, 1).await.valid);
    }
    report_with(&verifier, &id(&in_team), 0, 100).await.unwrap();
    report_with(&verifier, &id(&owned), 0, 50).await.unwrap();
    let r = verify_with(&verifier, &in_team.key, 1).await;
    assert_eq!(code(&r), VerifyCode::BudgetExceeded);
    assert_eq!(r.budget_scope(), LimitScope::Team);
    let r = verify_with(&verifier, &owned.key, 1).await;
    assert_eq!(code(&r), VerifyCode::BudgetExceeded);
    assert_eq!(r.budget_scope(), LimitScope::Owner);
    assert!(verify_with(&verifier, &outside.key, 1).await.valid);

    // Removed: the team's keys are admitted at their next call.
    teams(&app.channel)
        .update_team(proto::UpdateTeamRequest {
            workspace_id: "ws_test".into(),
            team_id: "team_ml".into(),
            actor: Some(actor()),
            update_mask: Some(FieldMask {
                paths: vec!["budget".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(verify_with(&verifier, &in_team.key, 1).await.valid);
}

each_store_and_counter!(
    a_monthly_workspace_budget_binds_every_key_until_the_months_turn,
    team_and_owner_budgets_bind_only_their_own_keys,
);

/// A bad budget is refused naming its field, and changes nothing.
async fn pool_budgets_are_validated_and_a_refused_change_writes_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let cases = [
        (
            proto::PoolBudget {
                max_budget_micros: 0,
                ..Default::default()
            },
            "budget.max_budget_micros",
        ),
        (
            proto::PoolBudget {
                max_budget_micros: u64::MAX,
                ..Default::default()
            },
            "budget.max_budget_micros",
        ),
        (
            proto::PoolBudget {
                max_budget_micros: 10,
                budget_period: proto::BudgetPeriod::RollingDays as i32,
                budget_period_days: 0,
                ..Default::default()
            },
            "budget.budget_period_days",
        ),
        (
            proto::PoolBudget {
                max_budget_micros: 10,
                budget_period: 42,
                ..Default::default()
            },
            "budget.budget_period",
        ),
    ];
    for (budget, field) in cases {
        let e = workspaces(&app.channel)
            .update_workspace(workspace_budget(Some(budget)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{budget:?}");
        assert_eq!(violated_fields(&e), [field], "{budget:?}");
        let e = workspaces(&app.channel)
            .set_owner_limits(proto::SetOwnerLimitsRequest {
                workspace_id: "ws_test".into(),
                owner: Some(user("user_1")),
                rate_limits: Vec::new(),
                actor: Some(actor()),
                budget: Some(budget),
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&e), [field], "{budget:?}");
    }
    assert_eq!(get_workspace(&app.channel).await.budget, None);
    // A budget in the request without `budget` in the mask changes nothing either.
    let mut no_mask = workspace_budget(Some(monthly(5)));
    no_mask.update_mask = Some(FieldMask {
        paths: vec!["name".into()],
    });
    no_mask.name = "renamed".into();
    workspaces(&app.channel)
        .update_workspace(no_mask)
        .await
        .unwrap();
    assert_eq!(get_workspace(&app.channel).await.budget, None);
}

both_backends!(pool_budgets_are_validated_and_a_refused_change_writes_nothing);
