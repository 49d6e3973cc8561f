//! The google.rpc details of errors, through real servers and real tonic clients: one
//! refusal of each family carries an ErrorInfo (domain `keywarden.dev`, the documented
//! reason, useful metadata), INVALID_ARGUMENT also a BadRequest, and only the faults a
//! retry can fix (storage and the rate-limit backend unavailable, a replica shutting
//! down) a RetryInfo. docs/errors.md lists the reasons; a unit test in `api::error`
//! checks that table against the code.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use keywarden::config::LimiterSettings;
use keywarden::domain::workspace::PlanPolicy;
use keywarden::proto::access_group_service_client::AccessGroupServiceClient;
use keywarden::proto::key_service_client::KeyServiceClient;
use keywarden::proto::provider_key_service_client::ProviderKeyServiceClient;
use keywarden::proto::team_service_client::TeamServiceClient;
use keywarden::proto::watch_revocations_response::Message;
use keywarden::proto::workspace_service_client::WorkspaceServiceClient;
use keywarden::proto::{self, RateLimitUnit, RateLimitWindow, ResourceAccessMode};
use keywarden::ratelimit::FailureMode;
use secrecy::SecretString;
use sqlx::Connection;
use tokio::time::{Instant, timeout};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

const DAY: i64 = 86_400;
const DEADLINE: Duration = Duration::from_secs(30);

/// The ErrorInfo of a refusal that no retry can fix: its code, domain and reason, and no
/// RetryInfo. Returns the metadata.
#[track_caller]
fn refusal(status: &Status, code: Code, reason: &str) -> HashMap<String, String> {
    assert_eq!(status.code(), code, "{status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "keywarden.dev", "{status:?}");
    assert_eq!(info.reason, reason, "{status:?}");
    assert!(
        status.get_details_retry_info().is_none(),
        "a refusal suggests no retry: {status:?}"
    );
    info.metadata
}

/// A fault a retry can fix: its code and reason, and the RetryInfo's delay.
#[track_caller]
fn retryable(status: &Status, code: Code, reason: &str) -> Duration {
    assert_eq!(status.code(), code, "{status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(
        (info.domain.as_str(), info.reason.as_str()),
        ("keywarden.dev", reason),
        "{status:?}"
    );
    status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .unwrap_or_else(|| panic!("no RetryInfo delay in {status:?}"))
}

fn meta<'a>(metadata: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    metadata.get(key).map(String::as_str)
}

type Teams = TeamServiceClient<InterceptedService<Channel, Bearer>>;
type Groups = AccessGroupServiceClient<InterceptedService<Channel, Bearer>>;
type ProviderKeys = ProviderKeyServiceClient<InterceptedService<Channel, Bearer>>;
type Workspaces = WorkspaceServiceClient<InterceptedService<Channel, Bearer>>;

fn teams(app: &TestApp) -> Teams {
    TeamServiceClient::with_interceptor(app.channel.clone(), bearer(ADMIN_TOKEN))
}

fn groups(app: &TestApp) -> Groups {
    AccessGroupServiceClient::with_interceptor(app.channel.clone(), bearer(ADMIN_TOKEN))
}

fn provider_keys(app: &TestApp, token: &str) -> ProviderKeys {
    ProviderKeyServiceClient::with_interceptor(app.channel.clone(), bearer(token))
}

fn workspaces(app: &TestApp) -> Workspaces {
    WorkspaceServiceClient::with_interceptor(app.channel.clone(), bearer(ADMIN_TOKEN))
}

fn rpm(limit: u64) -> proto::RateLimit {
    proto::RateLimit {
        unit: RateLimitUnit::Requests as i32,
        window: RateLimitWindow::Minute as i32,
        limit,
    }
}

fn create_team_request(team_id: &str, policy: proto::TeamPolicy) -> proto::CreateTeamRequest {
    proto::CreateTeamRequest {
        workspace_id: "ws_test".into(),
        team_id: team_id.into(),
        name: team_id.into(),
        policy: Some(policy),
        actor: Some(actor()),
    }
}

/// A team whose members may hold one key, with every other rule set.
fn strict_policy() -> proto::TeamPolicy {
    proto::TeamPolicy {
        self_service_enabled: true,
        max_keys_per_user: 1,
        max_budget_micros: Some(10_000),
        require_expiry: true,
        max_expiry_days: 30,
        rate_limit_ceilings: vec![rpm(60)],
        resource_access: None,
    }
}

/// A member's key within [`strict_policy`] (no owner: a member's key is its own).
fn member_request(app: &TestApp, team_id: &str, member_id: &str) -> proto::IssueKeyRequest {
    let mut r = issue_request("ws_test");
    r.owner = None;
    r.team_id = team_id.into();
    r.actor = Some(proto::Actor {
        id: member_id.into(),
        permissions: vec!["read".into()],
    });
    r.expires_at = Some(ts_in(&app.clock, 7 * DAY));
    r.max_budget_micros = Some(5_000);
    r.rate_limits = vec![rpm(60)];
    r
}

async fn issue_err(app: &TestApp, r: proto::IssueKeyRequest) -> Status {
    app.admin().issue_key(r).await.unwrap_err()
}

// ---------------------------------------------------------------------------------------

async fn caller_refusals_name_the_missing_token_the_unknown_token_and_the_role(backend: Backend) {
    let app = TestApp::spawn(backend).await;

    let anonymous = KeyServiceClient::new(app.channel.clone())
        .issue_key(issue_request("ws_test"))
        .await
        .unwrap_err();
    refusal(&anonymous, Code::Unauthenticated, "CALLER_TOKEN_MISSING");

    // An API key presented as a caller token is just an unknown token, and is never
    // echoed back, in the message or the details.
    let issued = app.issue().await;
    let unknown = app
        .admin_with(&issued.key)
        .issue_key(issue_request("ws_test"))
        .await
        .unwrap_err();
    let metadata = refusal(&unknown, Code::Unauthenticated, "CALLER_TOKEN_UNKNOWN");
    assert!(metadata.is_empty(), "{metadata:?}");
    let secret = issued.key.as_bytes();
    assert!(
        !unknown.message().contains(&issued.key)
            && !unknown.details().windows(secret.len()).any(|w| w == secret),
        "the presented token never comes back: {unknown:?}"
    );

    // The verifier may not issue keys; the admin may not resolve provider keys.
    let wrong_role = app
        .admin_with(VERIFIER_TOKEN)
        .issue_key(issue_request("ws_test"))
        .await
        .unwrap_err();
    let metadata = refusal(&wrong_role, Code::PermissionDenied, "CALLER_ROLE_MISSING");
    assert_eq!(meta(&metadata, "role"), Some("admin"));
    let resolve = provider_keys(&app, ADMIN_TOKEN)
        .resolve_provider_key(proto::ResolveProviderKeyRequest {
            workspace_id: "ws_test".into(),
            provider: proto::Provider::Openai as i32,
        })
        .await
        .unwrap_err();
    let metadata = refusal(&resolve, Code::PermissionDenied, "CALLER_ROLE_MISSING");
    assert_eq!(meta(&metadata, "role"), Some("provider-resolver"));
}

async fn the_scope_ceiling_names_the_scopes_the_actor_lacks(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut r = issue_request("ws_test");
    r.actor = Some(proto::Actor {
        id: "user_reader".into(),
        permissions: vec!["read".into()],
    });
    r.scopes = vec!["read".into(), "write".into()];
    let status = issue_err(&app, r).await;
    let metadata = refusal(&status, Code::PermissionDenied, "SCOPE_CEILING_EXCEEDED");
    assert_eq!(meta(&metadata, "missing_scopes"), Some("write"));
    assert_eq!(meta(&metadata, "actor_id"), Some("user_reader"));
}

async fn each_team_policy_rule_has_its_reason(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = teams(&app);
    client
        .create_team(create_team_request("team_ml", strict_policy()))
        .await
        .unwrap();
    client
        .create_team(create_team_request(
            "team_off",
            proto::TeamPolicy {
                self_service_enabled: false,
                ..strict_policy()
            },
        ))
        .await
        .unwrap();

    let status = issue_err(&app, member_request(&app, "team_off", "user_ann")).await;
    let metadata = refusal(&status, Code::PermissionDenied, "SELF_SERVICE_DISABLED");
    assert_eq!(meta(&metadata, "team_id"), Some("team_off"));

    let mut r = member_request(&app, "team_ml", "user_ann");
    r.max_budget_micros = Some(10_001);
    let metadata = refusal(
        &issue_err(&app, r).await,
        Code::FailedPrecondition,
        "TEAM_BUDGET_CEILING_EXCEEDED",
    );
    assert_eq!(meta(&metadata, "team_id"), Some("team_ml"));
    assert_eq!(meta(&metadata, "field"), Some("max_budget_micros"));
    assert_eq!(meta(&metadata, "max_budget_micros"), Some("10000"));

    let mut r = member_request(&app, "team_ml", "user_ann");
    r.expires_at = None;
    let metadata = refusal(
        &issue_err(&app, r).await,
        Code::FailedPrecondition,
        "TEAM_EXPIRY_REQUIRED",
    );
    assert_eq!(meta(&metadata, "field"), Some("expires_at"));

    let mut r = member_request(&app, "team_ml", "user_ann");
    r.expires_at = Some(ts_in(&app.clock, 31 * DAY));
    let metadata = refusal(
        &issue_err(&app, r).await,
        Code::FailedPrecondition,
        "TEAM_EXPIRY_TOO_FAR",
    );
    assert_eq!(meta(&metadata, "max_expiry_days"), Some("30"));

    let mut r = member_request(&app, "team_ml", "user_ann");
    r.rate_limits = vec![rpm(61)];
    let metadata = refusal(
        &issue_err(&app, r).await,
        Code::FailedPrecondition,
        "TEAM_RATE_LIMIT_CEILING_EXCEEDED",
    );
    assert_eq!(meta(&metadata, "field"), Some("rate_limits"));
    assert_eq!(meta(&metadata, "ceiling"), Some("60"));
    // One rule broken: no PreconditionFailure, the ErrorInfo says it all.
    let mut r = member_request(&app, "team_ml", "user_ann");
    r.rate_limits = vec![rpm(61)];
    assert!(
        issue_err(&app, r)
            .await
            .get_details_precondition_failure()
            .is_none()
    );

    // Three rules broken at once: one answer names all three, each with its reason and
    // field, in a PreconditionFailure; the ErrorInfo carries the first. Nothing is
    // written but the denied audit row.
    let mut r = member_request(&app, "team_ml", "user_ann");
    r.max_budget_micros = Some(10_001);
    r.expires_at = None;
    r.rate_limits = vec![rpm(61)];
    let status = issue_err(&app, r).await;
    refusal(
        &status,
        Code::FailedPrecondition,
        "TEAM_BUDGET_CEILING_EXCEEDED",
    );
    let failure = status
        .get_details_precondition_failure()
        .unwrap_or_else(|| panic!("no PreconditionFailure in {status:?}"));
    let named: Vec<(&str, &str)> = failure
        .violations
        .iter()
        .map(|v| (v.r#type.as_str(), v.subject.as_str()))
        .collect();
    assert_eq!(
        named,
        [
            ("TEAM_BUDGET_CEILING_EXCEEDED", "max_budget_micros"),
            ("TEAM_EXPIRY_REQUIRED", "expires_at"),
            ("TEAM_RATE_LIMIT_CEILING_EXCEEDED", "rate_limits"),
        ]
    );
    for v in &failure.violations {
        assert!(status.message().contains(&v.description), "{status:?}");
    }

    // Within the policy: one key, then the member's maximum is reached.
    app.admin()
        .issue_key(member_request(&app, "team_ml", "user_ann"))
        .await
        .unwrap();
    let status = issue_err(&app, member_request(&app, "team_ml", "user_ann")).await;
    let metadata = refusal(
        &status,
        Code::PermissionDenied,
        "SELF_SERVICE_KEY_LIMIT_REACHED",
    );
    assert_eq!(meta(&metadata, "max_keys_per_user"), Some("1"));
    assert_eq!(meta(&metadata, "team_id"), Some("team_ml"));

    let status = issue_err(&app, member_request(&app, "team_nope", "user_ann")).await;
    let metadata = refusal(&status, Code::NotFound, "TEAM_NOT_FOUND");
    assert_eq!(meta(&metadata, "team_id"), Some("team_nope"));

    // A taken team id is refused as it always was (FAILED_PRECONDITION), with its reason.
    let status = client
        .create_team(create_team_request("team_ml", strict_policy()))
        .await
        .unwrap_err();
    let metadata = refusal(&status, Code::AlreadyExists, "TEAM_ALREADY_EXISTS");
    assert_eq!(meta(&metadata, "team_id"), Some("team_ml"));
}

async fn service_account_refusals_have_their_reasons(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = teams(&app);
    client
        .create_team(create_team_request("team_ml", strict_policy()))
        .await
        .unwrap();
    let account = proto::CreateServiceAccountRequest {
        workspace_id: "ws_test".into(),
        team_id: "team_ml".into(),
        service_account_id: "sa_batch".into(),
        name: "batch".into(),
        actor: Some(actor()),
    };
    client
        .create_service_account(account.clone())
        .await
        .unwrap();
    let status = client.create_service_account(account).await.unwrap_err();
    refusal(
        &status,
        Code::AlreadyExists,
        "SERVICE_ACCOUNT_ALREADY_EXISTS",
    );

    let mut r = issue_request("ws_test");
    r.team_id = "team_ml".into();
    r.owner = Some(proto::Owner {
        kind: proto::OwnerKind::ServiceAccount as i32,
        id: "sa_elsewhere".into(),
    });
    let metadata = refusal(
        &issue_err(&app, r.clone()).await,
        Code::FailedPrecondition,
        "SERVICE_ACCOUNT_NOT_IN_TEAM",
    );
    assert_eq!(meta(&metadata, "service_account_id"), Some("sa_elsewhere"));

    r.owner.as_mut().unwrap().id = "sa_batch".into();
    app.admin().issue_key(r).await.unwrap();
    let delete = |id: &str| proto::DeleteServiceAccountRequest {
        workspace_id: "ws_test".into(),
        service_account_id: id.into(),
        actor: Some(actor()),
    };
    let status = client
        .delete_service_account(delete("sa_batch"))
        .await
        .unwrap_err();
    refusal(
        &status,
        Code::FailedPrecondition,
        "SERVICE_ACCOUNT_OWNS_KEYS",
    );
    let status = client
        .delete_service_account(delete("sa_unknown"))
        .await
        .unwrap_err();
    let metadata = refusal(&status, Code::NotFound, "SERVICE_ACCOUNT_NOT_FOUND");
    assert_eq!(meta(&metadata, "service_account_id"), Some("sa_unknown"));
}

async fn plan_refusals_name_the_workspace_and_its_plan(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        let mut plans = (*s.plans).clone();
        plans.spark = PlanPolicy {
            api_keys: false,
            byok: false,
        };
        s.plans = std::sync::Arc::new(plans);
    })
    .await;
    app.db.create_workspaces(&["ws_spark"], "spark").await;

    let status = issue_err(&app, issue_request("ws_spark")).await;
    let metadata = refusal(&status, Code::FailedPrecondition, "PLAN_FORBIDS_API_KEYS");
    assert_eq!(meta(&metadata, "workspace_id"), Some("ws_spark"));
    assert_eq!(meta(&metadata, "plan"), Some("SPARK"));

    let put = |workspace_id: &str| proto::PutProviderKeyRequest {
        workspace_id: workspace_id.into(),
        provider: proto::Provider::Openai as i32,
        api_key: "sk-proj-0123456789abcdef0123456789abcdef".into(),
        actor: Some(actor()),
    };
    let status = provider_keys(&app, ADMIN_TOKEN)
        .put_provider_key(put("ws_spark"))
        .await
        .unwrap_err();
    let metadata = refusal(&status, Code::FailedPrecondition, "PLAN_FORBIDS_BYOK");
    assert_eq!(meta(&metadata, "plan"), Some("SPARK"));
    assert!(
        !format!("{status:?}").contains("sk-proj-0123"),
        "the provider key never comes back: {status:?}"
    );
}

async fn unknown_ids_are_not_found_with_the_kind_of_thing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let status = app
        .admin()
        .get_key(proto::GetKeyRequest {
            key_id: format!("key_{}", "0".repeat(24)),
            actor: None,
        })
        .await
        .unwrap_err();
    refusal(&status, Code::NotFound, "KEY_NOT_FOUND");

    let status = issue_err(&app, issue_request("ws_missing")).await;
    let metadata = refusal(&status, Code::NotFound, "WORKSPACE_NOT_FOUND");
    assert_eq!(meta(&metadata, "workspace_id"), Some("ws_missing"));

    let status = provider_keys(&app, ADMIN_TOKEN)
        .get_provider_key(proto::GetProviderKeyRequest {
            workspace_id: "ws_test".into(),
            provider: proto::Provider::Anthropic as i32,
        })
        .await
        .unwrap_err();
    let metadata = refusal(&status, Code::NotFound, "PROVIDER_KEY_NOT_FOUND");
    assert_eq!(meta(&metadata, "provider"), Some("anthropic"));

    // An unknown access group is named as one (it used to say "key not found").
    let status = groups(&app)
        .delete_access_group(proto::DeleteAccessGroupRequest {
            workspace_id: "ws_test".into(),
            name: "nope".into(),
            actor: Some(actor()),
        })
        .await
        .unwrap_err();
    let metadata = refusal(&status, Code::NotFound, "ACCESS_GROUP_NOT_FOUND");
    assert_eq!(meta(&metadata, "access_group"), Some("nope"));
    assert!(status.message().contains("access group nope"), "{status:?}");

    let status = workspaces(&app)
        .create_workspace(proto::CreateWorkspaceRequest {
            workspace_id: "ws_test".into(),
            name: "again".into(),
            plan: proto::Plan::Pro as i32,
            actor: Some(actor()),
        })
        .await
        .unwrap_err();
    let metadata = refusal(&status, Code::AlreadyExists, "WORKSPACE_ALREADY_EXISTS");
    assert_eq!(meta(&metadata, "workspace_id"), Some("ws_test"));
}

/// A mistyped workspace id is NOT_FOUND naming it on every workspace-scoped read, not an
/// empty list that looks like "no keys"; a workspace that exists and holds nothing lists
/// empty.
async fn an_unknown_workspace_is_not_found_on_every_workspace_scoped_read(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let missing = "ws_typo".to_owned();
    let mut statuses = vec![
        (
            "ListKeys",
            app.admin()
                .list_keys(proto::ListKeysRequest {
                    workspace_id: missing.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "ListAuditEvents",
            app.admin()
                .list_audit_events(proto::ListAuditEventsRequest {
                    workspace_id: missing.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "ListTeams",
            teams(&app)
                .list_teams(proto::ListTeamsRequest {
                    workspace_id: missing.clone(),
                })
                .await
                .map(drop),
        ),
        (
            "GetTeam",
            teams(&app)
                .get_team(proto::GetTeamRequest {
                    workspace_id: missing.clone(),
                    team_id: "team_a".into(),
                })
                .await
                .map(drop),
        ),
        (
            "ListServiceAccounts",
            teams(&app)
                .list_service_accounts(proto::ListServiceAccountsRequest {
                    workspace_id: missing.clone(),
                    team_id: "team_a".into(),
                })
                .await
                .map(drop),
        ),
        (
            "ListAccessGroups",
            groups(&app)
                .list_access_groups(proto::ListAccessGroupsRequest {
                    workspace_id: missing.clone(),
                })
                .await
                .map(drop),
        ),
        (
            "ListProviderKeys",
            provider_keys(&app, ADMIN_TOKEN)
                .list_provider_keys(proto::ListProviderKeysRequest {
                    workspace_id: missing.clone(),
                })
                .await
                .map(drop),
        ),
    ];
    for (rpc, result) in statuses.drain(..) {
        let status = result.expect_err(rpc);
        let metadata = refusal(&status, Code::NotFound, "WORKSPACE_NOT_FOUND");
        assert_eq!(meta(&metadata, "workspace_id"), Some("ws_typo"), "{rpc}");
    }

    // An existing workspace with nothing in it lists empty; an unknown team in it is the
    // team's NOT_FOUND.
    app.db.create_workspaces(&["ws_empty"], "pro").await;
    let keys = app
        .admin()
        .list_keys(proto::ListKeysRequest {
            workspace_id: "ws_empty".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(keys.keys.is_empty());
    let listed = teams(&app)
        .list_teams(proto::ListTeamsRequest {
            workspace_id: "ws_empty".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.teams.is_empty());
    let listed = groups(&app)
        .list_access_groups(proto::ListAccessGroupsRequest {
            workspace_id: "ws_empty".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.access_groups.is_empty());
    let status = teams(&app)
        .get_team(proto::GetTeamRequest {
            workspace_id: "ws_empty".into(),
            team_id: "team_a".into(),
        })
        .await
        .unwrap_err();
    refusal(&status, Code::NotFound, "TEAM_NOT_FOUND");
}

async fn state_refusals_have_their_reasons(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    let key_id = issued.key_info.unwrap().key_id;
    app.admin()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: key_id.clone(),
            actor: Some(actor()),
            reason: String::new(),
        })
        .await
        .unwrap();
    let status = app
        .admin()
        .rotate_key(proto::RotateKeyRequest {
            key_id: key_id.clone(),
            actor: Some(actor()),
            grace_period: None,
        })
        .await
        .unwrap_err();
    let metadata = refusal(&status, Code::FailedPrecondition, "KEY_REVOKED");
    assert_eq!(meta(&metadata, "key_id"), Some(key_id.as_str()));

    let via = |groups: &[&str]| {
        Some(proto::ResourceAccess {
            mode: ResourceAccessMode::Include as i32,
            targets: Vec::new(),
            access_groups: groups.iter().map(|g| g.to_string()).collect(),
        })
    };
    let mut r = issue_request("ws_test");
    r.resource_access = via(&["frontier", "cheap"]);
    let metadata = refusal(
        &issue_err(&app, r).await,
        Code::FailedPrecondition,
        "ACCESS_GROUPS_MISSING",
    );
    // Sorted: a key's groups are a set.
    assert_eq!(meta(&metadata, "access_groups"), Some("cheap,frontier"));

    let create = proto::CreateAccessGroupRequest {
        workspace_id: "ws_test".into(),
        name: "frontier".into(),
        targets: vec!["gpt-4o".into()],
        actor: Some(actor()),
    };
    groups(&app)
        .create_access_group(create.clone())
        .await
        .unwrap();
    let status = groups(&app).create_access_group(create).await.unwrap_err();
    refusal(&status, Code::AlreadyExists, "ACCESS_GROUP_ALREADY_EXISTS");
    app.issue_with(|r| r.resource_access = via(&["frontier"]))
        .await;
    let status = groups(&app)
        .delete_access_group(proto::DeleteAccessGroupRequest {
            workspace_id: "ws_test".into(),
            name: "frontier".into(),
            actor: Some(actor()),
        })
        .await
        .unwrap_err();
    let metadata = refusal(&status, Code::FailedPrecondition, "ACCESS_GROUP_IN_USE");
    assert_eq!(meta(&metadata, "access_group"), Some("frontier"));

    // An expired key cannot be rotated.
    let expiring = app
        .issue_with(|r| r.expires_at = Some(ts_in(&app.clock, 60)))
        .await
        .key_info
        .unwrap()
        .key_id;
    app.clock.advance(Duration::from_secs(61));
    let status = app
        .admin()
        .rotate_key(proto::RotateKeyRequest {
            key_id: expiring.clone(),
            actor: Some(actor()),
            grace_period: None,
        })
        .await
        .unwrap_err();
    let metadata = refusal(&status, Code::FailedPrecondition, "KEY_EXPIRED");
    assert_eq!(meta(&metadata, "key_id"), Some(expiring.as_str()));

    // A team with a live key cannot go; a team key cannot reach beyond its team; a
    // member cannot name another owner.
    teams(&app)
        .create_team(create_team_request(
            "team_ml",
            proto::TeamPolicy {
                resource_access: Some(proto::ResourceAccess {
                    mode: ResourceAccessMode::Include as i32,
                    targets: vec!["gpt-4o".into()],
                    access_groups: Vec::new(),
                }),
                ..strict_policy()
            },
        ))
        .await
        .unwrap();
    let mut r = issue_request("ws_test");
    r.team_id = "team_ml".into();
    r.resource_access = Some(proto::ResourceAccess {
        mode: ResourceAccessMode::Include as i32,
        targets: vec!["o3".into()],
        access_groups: Vec::new(),
    });
    let metadata = refusal(
        &issue_err(&app, r).await,
        Code::FailedPrecondition,
        "REACH_BEYOND_TEAM",
    );
    assert_eq!(meta(&metadata, "beyond"), Some("o3"));
    assert_eq!(meta(&metadata, "team_id"), Some("team_ml"));
    app.issue_with(|r| r.team_id = "team_ml".into()).await;
    let status = teams(&app)
        .delete_team(proto::DeleteTeamRequest {
            workspace_id: "ws_test".into(),
            team_id: "team_ml".into(),
            actor: Some(actor()),
        })
        .await
        .unwrap_err();
    let metadata = refusal(&status, Code::FailedPrecondition, "TEAM_IN_USE");
    assert_eq!(meta(&metadata, "team_id"), Some("team_ml"));
    let mut r = member_request(&app, "team_ml", "user_ann");
    r.owner = Some(user("user_bob"));
    let metadata = refusal(
        &issue_err(&app, r).await,
        Code::PermissionDenied,
        "SELF_SERVICE_OWNER_NOT_ACTOR",
    );
    assert_eq!(meta(&metadata, "owner"), Some("user:user_bob"));
    assert_eq!(meta(&metadata, "actor_id"), Some("user_ann"));
}

/// A replica with no key-encryption key cannot store provider keys, and says why.
async fn provider_keys_without_a_kek_are_refused_with_its_reason(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.keks = Vec::new()).await;
    let status = provider_keys(&app, ADMIN_TOKEN)
        .put_provider_key(proto::PutProviderKeyRequest {
            workspace_id: "ws_test".into(),
            provider: proto::Provider::Anthropic as i32,
            api_key: format!("sk-ant-{}", "a".repeat(40)),
            actor: Some(actor()),
        })
        .await
        .unwrap_err();
    refusal(&status, Code::FailedPrecondition, "KEK_NOT_CONFIGURED");
}

/// Every reason docs/errors.md promises is provoked through the API by some test, which
/// asserts it by name: a reason nothing can provoke is not documented. The two storage
/// fallbacks are the exception: they answer a store result a service did not expect,
/// which no request reaches today, and stay so that such a bug is not an INTERNAL.
#[test]
fn every_documented_reason_is_asserted_by_a_test() {
    const FALLBACKS: [&str; 2] = ["RESOURCE_NOT_FOUND", "RESOURCE_ALREADY_EXISTS"];
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests");
    let mut sources = String::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            sources.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/errors.md")).unwrap();
    let documented: Vec<&str> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|r| r.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    assert!(documented.len() > 30, "{documented:?}");
    let untested: Vec<&&str> = documented
        .iter()
        .filter(|r| !FALLBACKS.contains(r))
        .filter(|r| !sources.contains(&format!("\"{r}\"")))
        .collect();
    assert!(
        untested.is_empty(),
        "documented but provoked by no test: {untested:?}"
    );
}

async fn bad_input_carries_field_violations_and_the_reason(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut r = issue_request("ws_test");
    r.name = String::new();
    r.scopes = vec!["read".into(), "not a scope!".into()];
    let status = issue_err(&app, r).await;
    let metadata = refusal(&status, Code::InvalidArgument, "INVALID_REQUEST");
    let fields = violated_fields(&status);
    assert!(
        fields.contains(&"name".to_owned()) && fields.iter().any(|f| f.starts_with("scopes")),
        "{fields:?}"
    );
    assert_eq!(
        meta(&metadata, "violations"),
        Some(fields.len().to_string().as_str())
    );
    let bad = status.get_details_bad_request().unwrap();
    assert_eq!(bad.field_violations.len(), fields.len());
}

/// The rate-limit backend (Redis, nothing listening) failing closed: VerifyKey is
/// UNAVAILABLE with a retry delay.
async fn an_unreachable_rate_limit_backend_suggests_a_retry(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.limiter = LimiterSettings::Redis {
            url: SecretString::from("redis://127.0.0.1:1".to_owned()),
            prefix: "kwtest_error_details".into(),
            failure: FailureMode::Closed,
            circuit: Default::default(),
            lease: None,
            clock_skew: Duration::ZERO,
        };
    })
    .await;
    let issued = app.issue().await;
    let status = app
        .verifier()
        .verify_key(proto::VerifyKeyRequest {
            key: issued.key.clone(),
            cost: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let delay = retryable(&status, Code::Unavailable, "RATE_LIMIT_BACKEND_UNAVAILABLE");
    assert_eq!(delay, Duration::from_secs(1));
    assert!(!status.message().contains(&issued.key), "{status:?}");
}

/// Storage that does not answer: the test takes the database's write lock (SQLite) or
/// cuts the server's connection while it waits on a table lock (Postgres). The call is
/// UNAVAILABLE with a retry delay, and the same call succeeds once storage is back.
async fn unavailable_storage_suggests_a_retry(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let create = |id: &str| proto::CreateWorkspaceRequest {
        workspace_id: id.into(),
        name: id.into(),
        plan: proto::Plan::Pro as i32,
        actor: Some(actor()),
    };
    let status = match backend {
        Backend::Sqlite => {
            let mut holder = sqlx::SqliteConnection::connect(&app.db.url).await.unwrap();
            sqlx::raw_sql("BEGIN IMMEDIATE")
                .execute(&mut holder)
                .await
                .unwrap();
            // The server's write waits for its busy timeout, then gives up.
            let status = workspaces(&app)
                .create_workspace(create("ws_new"))
                .await
                .unwrap_err();
            sqlx::raw_sql("ROLLBACK")
                .execute(&mut holder)
                .await
                .unwrap();
            status
        }
        Backend::Postgres => {
            let mut holder = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
            sqlx::raw_sql("BEGIN; LOCK TABLE workspaces IN ACCESS EXCLUSIVE MODE")
                .execute(&mut holder)
                .await
                .unwrap();
            let mut client = workspaces(&app);
            let call = tokio::spawn(async move { client.create_workspace(create("ws_new")).await });
            // The server's connection waiting on the lock is cut, as a database restart
            // or a failover would.
            let deadline = Instant::now() + DEADLINE;
            loop {
                assert!(
                    Instant::now() < deadline,
                    "the call never waited on the lock"
                );
                let terminated: Vec<bool> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid() \
                     AND wait_event_type = 'Lock'",
                )
                .fetch_all(&mut holder)
                .await
                .unwrap();
                if terminated.contains(&true) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let status = timeout(DEADLINE, call).await.unwrap().unwrap().unwrap_err();
            sqlx::raw_sql("ROLLBACK")
                .execute(&mut holder)
                .await
                .unwrap();
            status
        }
    };
    let delay = retryable(&status, Code::Unavailable, "STORAGE_UNAVAILABLE");
    assert_eq!(delay, Duration::from_secs(1));
    workspaces(&app)
        .create_workspace(create("ws_new"))
        .await
        .expect("the retry succeeds once storage answers");
}

/// A WatchRevocations stream ended by the replica shutting down: UNAVAILABLE, a retry
/// delay, and the cursor to resume from in the metadata.
async fn a_stream_ended_by_shutdown_names_its_cursor_and_a_retry(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let mut stream = app
        .edge()
        .watch_revocations(proto::WatchRevocationsRequest {
            after_seq: 0,
            workspace_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let head = match timeout(DEADLINE, stream.message()).await.unwrap() {
        Ok(Some(proto::WatchRevocationsResponse {
            message: Some(Message::Heartbeat(h)),
        })) => h.head_seq,
        other => panic!("expected a heartbeat first, got {other:?}"),
    };
    let server = app.server.take().unwrap();
    timeout(DEADLINE, server.shutdown()).await.unwrap().unwrap();
    let status = loop {
        match timeout(DEADLINE, stream.message()).await.unwrap() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    let delay = retryable(&status, Code::Unavailable, "SERVER_SHUTTING_DOWN");
    assert_eq!(delay, Duration::from_secs(1));
    let info = status.get_details_error_info().unwrap();
    assert_eq!(
        meta(&info.metadata, "after_seq"),
        Some(head.to_string().as_str())
    );
}

both_backends!(
    caller_refusals_name_the_missing_token_the_unknown_token_and_the_role,
    the_scope_ceiling_names_the_scopes_the_actor_lacks,
    each_team_policy_rule_has_its_reason,
    service_account_refusals_have_their_reasons,
    plan_refusals_name_the_workspace_and_its_plan,
    unknown_ids_are_not_found_with_the_kind_of_thing,
    an_unknown_workspace_is_not_found_on_every_workspace_scoped_read,
    state_refusals_have_their_reasons,
    provider_keys_without_a_kek_are_refused_with_its_reason,
    bad_input_carries_field_violations_and_the_reason,
    an_unreachable_rate_limit_backend_suggests_a_retry,
    unavailable_storage_suggests_a_retry,
    a_stream_ended_by_shutdown_names_its_cursor_and_a_retry,
);
