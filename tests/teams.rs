//! Teams and their self-service policy through real servers: one test per rule, each
//! asserting the status code and the reason; a self-service key is owned by its member
//! (an unset owner means the member, another owner is refused);
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
        resource_access: None,
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
    r.owner = None;
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
        "an unset owner is the actor"
    );
    // Naming oneself is the same; naming anyone else is refused, audited, and writes no
    // key: the owner is never quietly changed.
    let mut r = request(&app, "user_ann");
    r.owner = Some(user("user_ann"));
    app.admin().issue_key(r).await.unwrap();
    let mut r = request(&app, "user_bob");
    r.owner = Some(user("someone_else"));
    let status = refused(&app, r).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains("owner user:someone_else is not the actor user_bob"),
        "{status:?}"
    );
    let denied = app
        .audit("ws_test")
        .await
        .into_iter()
        .filter(|e| e.outcome == proto::AuditOutcome::Denied as i32 && e.actor_id == "user_bob")
        .count();
    assert_eq!(denied, 1);
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
            .contains("self-service is off in team team_ml"),
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

/// Issues racing each other are held to the maximum too: the count that decides is made
/// in the insert's transaction under the team's lock, not only before it.
async fn concurrent_issues_of_a_member_never_pass_the_maximum(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    create_team(&app, policy()).await;
    let calls = (0..8).map(|_| {
        let (mut admin, r) = (app.admin(), request(&app, "user_ann"));
        tokio::spawn(async move { admin.issue_key(r).await })
    });
    let mut refusals = 0;
    for call in calls.collect::<Vec<_>>() {
        if let Err(status) = call.await.unwrap() {
            assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
            assert!(status.message().contains("maximum of 2 keys"), "{status:?}");
            refusals += 1;
        }
    }
    assert_eq!(refusals, 6);
    assert_eq!(
        app.db
            .count("SELECT count(*) FROM api_keys WHERE owner_id = 'user_ann'")
            .await,
        2
    );
    let denied = app
        .audit("ws_test")
        .await
        .into_iter()
        .filter(|e| e.action == "key.issue" && e.outcome == proto::AuditOutcome::Denied as i32)
        .count();
    assert_eq!(denied, 6, "every refusal is audited");
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
    r.owner = Some(user("someone_else"));
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
    // A rename applies to the team as stored: the policy just written stays.
    let rename = |team_id: &str, name: &str| proto::UpdateTeamRequest {
        workspace_id: "ws_test".into(),
        team_id: team_id.into(),
        actor: Some(actor()),
        name: name.into(),
        update_mask: Some(FieldMask {
            paths: vec!["name".into()],
        }),
        ..Default::default()
    };
    let renamed = client
        .update_team(rename("team_ml", "Machine learning"))
        .await
        .unwrap()
        .into_inner()
        .team
        .unwrap();
    assert_eq!(renamed.name, "Machine learning");
    assert_eq!(renamed.policy.unwrap().max_keys_per_user, 5);
    let unknown = client
        .update_team(rename("team_nope", "Nobody"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
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

/// Service accounts: created in a team, own that team's keys (and no other team's: a
/// refusal audited as denied), and cannot be deleted while they own live keys.
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
    // The refusal is audited as denied, like every policy refusal of an issue.
    let denied: Vec<_> = app
        .audit("ws_test")
        .await
        .into_iter()
        .filter(|e| e.action == "key.issue" && e.outcome == proto::AuditOutcome::Denied as i32)
        .collect();
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert!(denied[0].detail.contains("sa_unknown"), "{denied:?}");

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

fn key_id(issued: &proto::IssueKeyResponse) -> String {
    issued.key_info.as_ref().unwrap().key_id.clone()
}

async fn listed_ids(
    app: &TestApp,
    actor: Option<proto::Actor>,
    owner: Option<proto::Owner>,
) -> Vec<String> {
    app.listed_key_ids(proto::ListKeysRequest {
        workspace_id: "ws_test".into(),
        owner,
        actor,
        ..Default::default()
    })
    .await
}

/// User A cannot see, change, rotate, revoke or delete user B's key: every attempt is
/// NOT_FOUND, as if the key did not exist, and B's key is untouched; A manages its own.
async fn members_see_and_manage_only_their_own_keys(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    create_team(&app, policy()).await;
    let ann = app
        .admin()
        .issue_key(request(&app, "user_ann"))
        .await
        .unwrap()
        .into_inner();
    let bob = app
        .admin()
        .issue_key(request(&app, "user_bob"))
        .await
        .unwrap()
        .into_inner();
    // A key outside any team, owned by someone else.
    let other = app.issue().await;
    let bob_before = bob.key_info.clone().unwrap();

    let mut all = vec![key_id(&ann), key_id(&bob), key_id(&other)];
    all.sort();
    assert_eq!(
        listed_ids(&app, None, None).await,
        all,
        "the backend's own view"
    );
    assert_eq!(
        listed_ids(&app, Some(actor()), None).await,
        all,
        "an admin actor"
    );
    assert_eq!(
        listed_ids(&app, Some(member("user_ann")), None).await,
        [key_id(&ann)]
    );
    assert!(
        listed_ids(&app, Some(member("user_ann")), Some(user("user_bob")))
            .await
            .is_empty(),
        "naming another owner lists nothing"
    );

    for victim in [key_id(&bob), key_id(&other)] {
        let get = app
            .admin()
            .get_key(proto::GetKeyRequest {
                key_id: victim.clone(),
                actor: Some(member("user_ann")),
            })
            .await
            .unwrap_err();
        assert_eq!(get.code(), Code::NotFound, "get");
        let update = app
            .admin()
            .update_key(proto::UpdateKeyRequest {
                key_id: victim.clone(),
                actor: Some(member("user_ann")),
                name: "mine now".into(),
                update_mask: Some(FieldMask {
                    paths: vec!["name".into()],
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(update.code(), Code::NotFound, "update");
        let rotate = app
            .admin()
            .rotate_key(proto::RotateKeyRequest {
                key_id: victim.clone(),
                actor: Some(member("user_ann")),
                grace_period: None,
            })
            .await
            .unwrap_err();
        assert_eq!(rotate.code(), Code::NotFound, "rotate");
        let revoke = app
            .admin()
            .revoke_key(proto::RevokeKeyRequest {
                key_id: victim.clone(),
                actor: Some(member("user_ann")),
                reason: "mischief".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(revoke.code(), Code::NotFound, "revoke");
        let delete = app
            .admin()
            .delete_key(proto::DeleteKeyRequest {
                key_id: victim.clone(),
                actor: Some(member("user_ann")),
            })
            .await
            .unwrap_err();
        assert_eq!(delete.code(), Code::NotFound, "delete");
    }
    // Bob's key is as it was, and still works.
    let bob_after = app
        .admin()
        .get_key(proto::GetKeyRequest {
            key_id: key_id(&bob),
            actor: Some(member("user_bob")),
        })
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap();
    assert_eq!(bob_after, bob_before);
    assert!(app.verify(&bob.key, &["read"]).await.valid);
    assert!(app.verify(&other.key, &["read"]).await.valid);

    // Ann manages her own key.
    let rotated = app
        .admin()
        .rotate_key(proto::RotateKeyRequest {
            key_id: key_id(&ann),
            actor: Some(member("user_ann")),
            grace_period: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(app.verify(&rotated.key, &["read"]).await.valid);
    app.admin()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: key_id(&ann),
            actor: Some(member("user_ann")),
            reason: "done".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        code(&app.verify(&rotated.key, &["read"]).await),
        proto::VerifyCode::Revoked
    );
}

async fn update_own(
    app: &TestApp,
    key_id: &str,
    paths: &[&str],
    adjust: impl FnOnce(&mut proto::UpdateKeyRequest),
) -> Result<proto::KeyInfo, tonic::Status> {
    let mut r = proto::UpdateKeyRequest {
        key_id: key_id.to_owned(),
        actor: Some(member("user_ann")),
        update_mask: Some(FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
        ..Default::default()
    };
    adjust(&mut r);
    app.admin()
        .update_key(r)
        .await
        .map(|r| r.into_inner().key_info.unwrap())
}

/// A member's UpdateKey is held to the team's policy as the update would leave the key:
/// one refusal per rule, each with its reason, changing nothing and audited; within the
/// policy the update goes through; an admin is not bound.
async fn a_members_update_stays_within_the_policy(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    create_team(&app, policy()).await;
    let ann = app
        .admin()
        .issue_key(request(&app, "user_ann"))
        .await
        .unwrap()
        .into_inner();
    let id = key_id(&ann);
    let before = ann.key_info.clone().unwrap();
    let rpm = |limit| proto::RateLimit {
        unit: RateLimitUnit::Requests as i32,
        window: RateLimitWindow::Minute as i32,
        limit,
    };
    let far = ts_in(&app.clock, 31 * DAY);
    type Adjust = Box<dyn FnOnce(&mut proto::UpdateKeyRequest)>;
    let cases: Vec<(&str, Vec<&str>, Adjust, &str)> = vec![
        (
            "budget",
            vec!["max_budget_micros"],
            Box::new(|r| r.max_budget_micros = Some(10_001)),
            "max_budget_micros must be set and at most 10000",
        ),
        (
            "no budget",
            vec!["max_budget_micros"],
            Box::new(|r| r.max_budget_micros = None),
            "max_budget_micros must be set and at most 10000",
        ),
        (
            "no expiry",
            vec!["expires_at"],
            Box::new(|r| r.expires_at = None),
            "requires an expiry",
        ),
        (
            "expiry too far",
            vec!["expires_at"],
            Box::new(move |r| r.expires_at = Some(far)),
            "within 30 days",
        ),
        (
            "rate limit",
            vec!["rate_limits"],
            Box::new(move |r| r.rate_limits = vec![rpm(61)]),
            "at most 60",
        ),
    ];
    for (case, paths, adjust, reason) in cases {
        let status = update_own(&app, &id, &paths, adjust).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{case}");
        assert!(status.message().contains(reason), "{case}: {status:?}");
    }
    let unchanged = app
        .admin()
        .get_key(proto::GetKeyRequest {
            key_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap();
    assert_eq!(unchanged, before);
    let denied: Vec<_> = app
        .audit("ws_test")
        .await
        .into_iter()
        .filter(|e| e.action == "key.update")
        .collect();
    assert_eq!(denied.len(), 5);
    assert!(
        denied
            .iter()
            .all(|e| e.outcome == proto::AuditOutcome::Denied as i32 && e.key_id == id)
    );

    // Within the policy.
    let updated = update_own(&app, &id, &["max_budget_micros", "rate_limits"], |r| {
        r.max_budget_micros = Some(10_000);
        r.rate_limits = vec![rpm(30)];
    })
    .await
    .unwrap();
    assert_eq!(updated.max_budget_micros, Some(10_000));
    // An admin is not bound by the policy.
    let lifted = app
        .admin()
        .update_key(proto::UpdateKeyRequest {
            key_id: id.clone(),
            actor: Some(actor()),
            max_budget_micros: Some(1_000_000),
            update_mask: Some(FieldMask {
                paths: vec!["max_budget_micros".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap();
    assert_eq!(lifted.max_budget_micros, Some(1_000_000));
}

/// A member rotates its team key only while self-service is on and the key is within
/// the team's current policy (a tightened policy applies at the rotation); revoking is
/// always allowed.
async fn a_members_rotation_follows_the_current_policy(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    create_team(&app, policy()).await;
    let ann = app
        .admin()
        .issue_key(request(&app, "user_ann"))
        .await
        .unwrap()
        .into_inner();
    let rotate = || proto::RotateKeyRequest {
        key_id: key_id(&ann),
        actor: Some(member("user_ann")),
        grace_period: None,
    };
    let first = app.admin().rotate_key(rotate()).await.unwrap().into_inner();

    let set_policy = |p: proto::TeamPolicy| {
        let channel = app.channel.clone();
        async move {
            TeamServiceClient::with_interceptor(channel, bearer(ADMIN_TOKEN))
                .update_team(proto::UpdateTeamRequest {
                    workspace_id: "ws_test".into(),
                    team_id: "team_ml".into(),
                    actor: Some(actor()),
                    policy: Some(p),
                    update_mask: Some(FieldMask {
                        paths: vec!["policy".into()],
                    }),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    };
    set_policy(proto::TeamPolicy {
        self_service_enabled: false,
        ..policy()
    })
    .await;
    let status = app.admin().rotate_key(rotate()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("self-service is off in team team_ml"),
        "{status:?}"
    );

    set_policy(proto::TeamPolicy {
        max_budget_micros: Some(1_000),
        ..policy()
    })
    .await;
    let status = app.admin().rotate_key(rotate()).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("at most 1000"), "{status:?}");
    // Nothing rotated: the secret from the first rotation still works.
    assert!(app.verify(&first.key, &["read"]).await.valid);
    let rotations: Vec<_> = app
        .audit("ws_test")
        .await
        .into_iter()
        .filter(|e| e.action == "key.rotate")
        .map(|e| e.outcome)
        .collect();
    assert_eq!(
        rotations,
        [
            proto::AuditOutcome::Denied as i32,
            proto::AuditOutcome::Denied as i32,
            proto::AuditOutcome::Success as i32
        ]
    );
    app.admin()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: key_id(&ann),
            actor: Some(member("user_ann")),
            reason: "out of policy".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        code(&app.verify(&first.key, &["read"]).await),
        proto::VerifyCode::Revoked
    );
}

/// DeleteTeam is refused while the team has a key neither revoked nor deleted, and names
/// the team; once its keys are revoked it goes, its service accounts with it, audited.
/// A concurrent issue in the team either lands before the delete (which is then
/// refused) or after it (and is refused itself): never a key of a team that is gone.
async fn a_team_is_deleted_only_without_live_keys(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    create_team(&app, policy()).await;
    let mut client = TeamServiceClient::with_interceptor(app.channel.clone(), bearer(ADMIN_TOKEN));
    client
        .create_service_account(proto::CreateServiceAccountRequest {
            workspace_id: "ws_test".into(),
            team_id: "team_ml".into(),
            service_account_id: "sa_batch".into(),
            name: "Nightly batch".into(),
            actor: Some(actor()),
        })
        .await
        .unwrap();
    let mut r = issue_request("ws_test");
    r.team_id = "team_ml".into();
    let issued = app.admin().issue_key(r.clone()).await.unwrap().into_inner();
    let delete = proto::DeleteTeamRequest {
        workspace_id: "ws_test".into(),
        team_id: "team_ml".into(),
        actor: Some(actor()),
    };
    let status = client.delete_team(delete.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("team team_ml has 1 key"),
        "{status:?}"
    );
    assert_eq!(app.db.count("SELECT count(*) FROM teams").await, 1);
    assert_eq!(
        app.db.count("SELECT count(*) FROM service_accounts").await,
        1
    );

    app.admin()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: key_id(&issued),
            actor: Some(actor()),
            reason: "retired".into(),
        })
        .await
        .unwrap();
    client.delete_team(delete.clone()).await.unwrap();
    assert_eq!(app.db.count("SELECT count(*) FROM teams").await, 0);
    assert_eq!(
        app.db.count("SELECT count(*) FROM service_accounts").await,
        0
    );
    let status = client
        .get_team(proto::GetTeamRequest {
            workspace_id: "ws_test".into(),
            team_id: "team_ml".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client.delete_team(delete.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    // Issuing into the deleted team is refused.
    let status = refused(&app, r).await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let deletes: Vec<_> = app
        .audit("ws_test")
        .await
        .into_iter()
        .filter(|e| e.action == "team.delete")
        .collect();
    assert_eq!(
        deletes.len(),
        1,
        "only the delete that happened: {deletes:?}"
    );
    assert_eq!(deletes[0].outcome, proto::AuditOutcome::Success as i32);

    // Validation names the field.
    let status = client
        .delete_team(proto::DeleteTeamRequest {
            team_id: String::new(),
            ..delete
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["team_id"]);

    // Racing issues and a delete: whatever the interleaving, no live key is left in a
    // team that does not exist.
    create_team(&app, policy()).await;
    let issues = (0..8).map(|_| {
        let admin = app.admin();
        let mut r = issue_request("ws_test");
        r.team_id = "team_ml".into();
        async move { admin.clone().issue_key(r).await }
    });
    let mut client2 = client.clone();
    let (_, _) = tokio::join!(
        futures::future::join_all(issues),
        client2.delete_team(proto::DeleteTeamRequest {
            workspace_id: "ws_test".into(),
            team_id: "team_ml".into(),
            actor: Some(actor()),
        })
    );
    let orphans = app
        .db
        .count(
            "SELECT count(*) FROM api_keys k WHERE k.team_id = 'team_ml' \
             AND k.revoked_at IS NULL AND k.deleted_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM teams t WHERE t.workspace_id = k.workspace_id \
             AND t.team_id = k.team_id)",
        )
        .await;
    assert_eq!(orphans, 0);
}

both_backends!(
    a_team_is_deleted_only_without_live_keys,
    service_accounts_own_their_teams_keys,
    a_member_gets_a_key_it_owns_within_the_policy,
    self_service_off_is_permission_denied,
    the_maximum_of_keys_per_user_is_permission_denied,
    concurrent_issues_of_a_member_never_pass_the_maximum,
    a_budget_above_the_team_ceiling_is_refused,
    a_missing_expiry_is_refused_when_required,
    an_expiry_too_far_is_refused,
    a_rate_limit_above_the_team_ceiling_is_refused,
    an_admin_is_not_bound_by_the_policy_and_unknown_teams_are_not_found,
    teams_are_created_listed_updated_and_validated,
    members_see_and_manage_only_their_own_keys,
    a_members_update_stays_within_the_policy,
    a_members_rotation_follows_the_current_policy,
);
