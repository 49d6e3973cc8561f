//! Teams and their self-service policy through real servers: one test per rule, each
//! asserting the status code and the reason; the owner of a self-service key is forced
//! to the actor; an admin actor is not bound by the policy; refusals write nothing but
//! their audit row.

mod common;

use common::*;
use keywarden::proto::team_service_client::TeamServiceClient;
use keywarden::proto::{self, RateLimitUnit, RateLimitWindow};
use prost_types::FieldMask;
use tonic::Code;

const DAY: i64 = 86_400;

fn policy() -> proto::TeamPolicy {
    proto::TeamPolicy {
        self_service_enabled: true,
        max_keys_per_user: 2,
        max_budget_micros: Some(10_000),
        require_expiry: true,
        max_expiry_days: 30,
        rate_limit_ceilings: vec![proto::RateLimit {
            unit: RateLimitUnit::Requests as i32,
            window: RateLimitWindow::Minute as i32,
            limit: 60,
        }],
    }
}

async fn create_team(app: &TestApp, policy: proto::TeamPolicy) {
    TeamServiceClient::with_interceptor(app.channel.clone(), bearer(ADMIN_TOKEN))
        .create_team(proto::CreateTeamRequest {
            workspace_id: "ws_test".into(),
            team_id: "team_ml".into(),
            name: "ML".into(),
            policy: Some(policy),
            actor: Some(actor()),
        })
        .await
        .unwrap();
}

fn member(id: &str) -> proto::Actor {
    proto::Actor {
        id: id.into(),
        permissions: vec!["read".into()],
    }
}

/// A self-service request within the policy above.
fn request(app: &TestApp, member_id: &str) -> proto::IssueKeyRequest {
    let mut r = issue_request("ws_test");
    r.team_id = "team_ml".into();
    r.actor = Some(member(member_id));
    r.owner = Some(user("someone_else"));
    r.expires_at = Some(ts_in(&app.clock, 7 * DAY));
    r.max_budget_micros = Some(5_000);
    r.rate_limits = vec![proto::RateLimit {
        unit: RateLimitUnit::Requests as i32,
        window: RateLimitWindow::Minute as i32,
        limit: 60,
    }];
    r
}

async fn refused(app: &TestApp, r: proto::IssueKeyRequest) -> tonic::Status {
    let before = app.db.count("SELECT count(*) FROM api_keys").await;
    let status = app.admin().issue_key(r).await.unwrap_err();
    assert_eq!(app.db.count("SELECT count(*) FROM api_keys").await, before);
    status
}

async fn a_member_gets_a_key_it_owns_within_the_policy(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    create_team(&app, policy()).await;
    let info = app
        .admin()
        .issue_key(request(&app, "user_ann"))
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap();
    assert_eq!(info.team_id, "team_ml");
    let owner = info.owner.unwrap();
    assert_eq!(
        (owner.kind(), owner.id.as_str()),
        (proto::OwnerKind::User, "user_ann"),
        "the owner is forced to the actor"
    );
}

async fn self_service_off_is_permission_denied(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    create_team(
        &app,
        proto::TeamPolicy {
            self_service_enabled: false,
            ..policy()
        },
    )
    .await;
    let status = refused(&app, request(&app, "user_ann")).await;
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("self-service key creation is off"),
        "{status:?}"
    );
}

async fn the_maximum_of_keys_per_user_is_permission_denied(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    create_team(&app, policy()).await;
    for _ in 0..2 {
        app.admin()
            .issue_key(request(&app, "user_ann"))
            .await
            .unwrap();
    }
    let status = refused(&app, request(&app, "user_ann")).await;
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("maximum of 2 keys"), "{status:?}");
    // Another member is not affected.
    app.admin()
        .issue_key(request(&app, "user_bob"))
        .await
        .unwrap();
}

async fn a_budget_above_the_team_ceiling_is_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    create_team(&app, policy()).await;
    for budget in [Some(10_001), None] {
        let mut r = request(&app, "user_ann");
        r.max_budget_micros = budget;
        let status = refused(&app, r).await;
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("max_budget"), "{status:?}");
    }
}

async fn a_missing_expiry_is_refused_when_required(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    create_team(
        &app,
        proto::TeamPolicy {
            max_expiry_days: 0,
            ..policy()
        },
    )
    .await;
    let mut r = request(&app, "user_ann");
    r.expires_at = None;
    let status = refused(&app, r).await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("requires an expiry"),
        "{status:?}"
    );
}

async fn an_expiry_too_far_is_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    create_team(&app, policy()).await;
    let mut r = request(&app, "user_ann");
    r.expires_at = Some(ts_in(&app.clock, 31 * DAY));
    let status = refused(&app, r).await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("within 30 days"), "{status:?}");
}

async fn a_rate_limit_above_the_team_ceiling_is_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    create_team(&app, policy()).await;
    let mut r = request(&app, "user_ann");
    r.rate_limits[0].limit = 61;
    let status = refused(&app, r).await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status
            .message()
            .contains("requests/minute limit must be set and at most 60"),
        "{status:?}"
    );
    // No own limit: the deployment default (generous in tests) applies, and exceeds too.
    let mut r = request(&app, "user_ann");
    r.rate_limits.clear();
    assert_eq!(refused(&app, r).await.code(), Code::FailedPrecondition);
}

async fn an_admin_is_not_bound_by_the_policy_and_unknown_teams_are_not_found(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    create_team(
        &app,
        proto::TeamPolicy {
            self_service_enabled: false,
            ..policy()
        },
    )
    .await;
    let mut r = request(&app, "user_root");
    r.actor = Some(actor());
    r.expires_at = None;
    r.max_budget_micros = None;
    let info = app
        .admin()
        .issue_key(r)
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap();
    assert_eq!(info.owner.unwrap().id, "someone_else");
    let mut r = request(&app, "user_ann");
    r.team_id = "team_nope".into();
    let status = refused(&app, r).await;
    assert_eq!(status.code(), Code::NotFound);
}

async fn teams_are_created_listed_updated_and_validated(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    create_team(&app, policy()).await;
    let mut client = TeamServiceClient::with_interceptor(app.channel.clone(), bearer(ADMIN_TOKEN));
    let updated = client
        .update_team(proto::UpdateTeamRequest {
            workspace_id: "ws_test".into(),
            team_id: "team_ml".into(),
            actor: Some(actor()),
            policy: Some(proto::TeamPolicy {
                max_keys_per_user: 5,
                ..policy()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["policy".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .team
        .unwrap();
    assert_eq!(updated.policy.unwrap().max_keys_per_user, 5);
    assert_eq!(updated.name, "ML");
    let listed = client
        .list_teams(proto::ListTeamsRequest {
            workspace_id: "ws_test".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .teams;
    assert_eq!(listed.len(), 1);
    let status = client
        .create_team(proto::CreateTeamRequest {
            workspace_id: "ws_test".into(),
            team_id: "bad team".into(),
            name: "".into(),
            policy: Some(proto::TeamPolicy {
                max_budget_micros: Some(0),
                ..policy()
            }),
            actor: Some(actor()),
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        ["team_id", "name", "policy.max_budget_micros"]
    );
}

/// Service accounts: created in a team, own that team's keys (and no other team's), and
/// cannot be deleted while they own live keys.
async fn service_accounts_own_their_teams_keys(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    create_team(&app, policy()).await;
    let mut client = TeamServiceClient::with_interceptor(app.channel.clone(), bearer(ADMIN_TOKEN));
    let account = client
        .create_service_account(proto::CreateServiceAccountRequest {
            workspace_id: "ws_test".into(),
            team_id: "team_ml".into(),
            service_account_id: "sa_batch".into(),
            name: "Nightly batch".into(),
            actor: Some(actor()),
        })
        .await
        .unwrap()
        .into_inner()
        .service_account
        .unwrap();
    assert_eq!(account.team_id, "team_ml");
    let sa_owner = |id: &str| proto::Owner {
        kind: proto::OwnerKind::ServiceAccount as i32,
        id: id.into(),
    };
    let mut r = issue_request("ws_test");
    r.team_id = "team_ml".into();
    r.owner = Some(sa_owner("sa_batch"));
    let issued = app.admin().issue_key(r.clone()).await.unwrap().into_inner();
    assert_eq!(
        issued.key_info.as_ref().unwrap().owner.as_ref().unwrap().id,
        "sa_batch"
    );
    r.owner = Some(sa_owner("sa_unknown"));
    let status = refused(&app, r).await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("not in team team_ml"),
        "{status:?}"
    );

    let listed = client
        .list_service_accounts(proto::ListServiceAccountsRequest {
            workspace_id: "ws_test".into(),
            team_id: "team_ml".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .service_accounts;
    assert_eq!(listed.len(), 1);
    let delete = proto::DeleteServiceAccountRequest {
        workspace_id: "ws_test".into(),
        service_account_id: "sa_batch".into(),
        actor: Some(actor()),
    };
    let status = client
        .delete_service_account(delete.clone())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    app.admin()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: issued.key_info.unwrap().key_id,
            actor: Some(actor()),
            reason: "retired".into(),
        })
        .await
        .unwrap();
    client.delete_service_account(delete).await.unwrap();
    assert!(
        client
            .list_service_accounts(proto::ListServiceAccountsRequest {
                workspace_id: "ws_test".into(),
                team_id: "team_ml".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .service_accounts
            .is_empty()
    );
}

both_backends!(
    service_accounts_own_their_teams_keys,
    a_member_gets_a_key_it_owns_within_the_policy,
    self_service_off_is_permission_denied,
    the_maximum_of_keys_per_user_is_permission_denied,
    a_budget_above_the_team_ceiling_is_refused,
    a_missing_expiry_is_refused_when_required,
    an_expiry_too_far_is_refused,
    a_rate_limit_above_the_team_ceiling_is_refused,
    an_admin_is_not_bound_by_the_policy_and_unknown_teams_are_not_found,
    teams_are_created_listed_updated_and_validated,
);
