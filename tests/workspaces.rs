//! Workspaces as stored entities: create / get / update through WorkspaceService, audited;
//! keys only in a workspace that exists and whose plan allows them; and how the free-form
//! workspace ids of keys issued before workspaces existed are migrated.

mod common;

use common::*;
use keywarden::domain::workspace::PlanPolicy;
use keywarden::proto::workspace_service_client::WorkspaceServiceClient;
use keywarden::proto::{self, Plan};
use prost_types::FieldMask;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type WorkspaceClient = WorkspaceServiceClient<InterceptedService<Channel, Bearer>>;

fn workspaces(app: &TestApp) -> WorkspaceClient {
    WorkspaceServiceClient::with_interceptor(app.channel.clone(), bearer(ADMIN_TOKEN))
}

fn create_req(id: &str, plan: Plan) -> proto::CreateWorkspaceRequest {
    proto::CreateWorkspaceRequest {
        workspace_id: id.to_owned(),
        name: format!("{id} inc."),
        plan: plan as i32,
        actor: Some(actor()),
    }
}

fn set_plan(id: &str, plan: Plan) -> proto::UpdateWorkspaceRequest {
    proto::UpdateWorkspaceRequest {
        workspace_id: id.to_owned(),
        actor: Some(actor()),
        plan: plan as i32,
        update_mask: Some(FieldMask {
            paths: vec!["plan".into()],
        }),
        ..Default::default()
    }
}

async fn audit_actions(app: &TestApp, workspace_id: &str) -> Vec<(String, i32)> {
    app.admin()
        .list_audit_events(proto::ListAuditEventsRequest {
            workspace_id: workspace_id.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
        .into_iter()
        .map(|e| (e.action, e.outcome))
        .collect()
}

async fn create_get_and_update_round_trip_and_are_audited(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = workspaces(&app);
    let created = client
        .create_workspace(create_req("ws_new", Plan::Spark))
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    assert_eq!(created.workspace_id, "ws_new");
    assert_eq!(created.name, "ws_new inc.");
    assert_eq!(created.plan(), Plan::Spark);
    assert!(created.api_keys_allowed && !created.byok_allowed);
    let got = client
        .get_workspace(proto::GetWorkspaceRequest {
            workspace_id: "ws_new".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    assert_eq!(got, created);

    app.clock.advance(std::time::Duration::from_secs(1));
    let updated = client
        .update_workspace(proto::UpdateWorkspaceRequest {
            name: "Renamed".into(),
            update_mask: Some(FieldMask {
                paths: vec!["name".into(), "plan".into()],
            }),
            ..set_plan("ws_new", Plan::Pro)
        })
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    assert_eq!(
        (updated.name.as_str(), updated.plan()),
        ("Renamed", Plan::Pro)
    );
    assert!(updated.byok_allowed);
    assert!(updated.updated_at.unwrap().seconds > created.updated_at.unwrap().seconds);
    assert_eq!(created.created_at, updated.created_at);

    // Creating it again is refused and changes nothing.
    let refused = client
        .create_workspace(create_req("ws_new", Plan::Enterprise))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists);
    let success = proto::AuditOutcome::Success as i32;
    assert_eq!(
        audit_actions(&app, "ws_new").await,
        [
            ("workspace.update".to_owned(), success),
            ("workspace.create".to_owned(), success)
        ]
    );

    for status in [
        client
            .get_workspace(proto::GetWorkspaceRequest {
                workspace_id: "ws_nope".into(),
            })
            .await
            .unwrap_err(),
        client
            .update_workspace(set_plan("ws_nope", Plan::Pro))
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("ws_nope"), "{status:?}");
    }
}

async fn keys_need_a_workspace_that_exists(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let before = app.db.count("SELECT count(*) FROM api_keys").await;
    let refused = app
        .admin()
        .issue_key(issue_request("ws_missing"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
    assert!(refused.message().contains("ws_missing"), "{refused:?}");
    assert_eq!(app.db.count("SELECT count(*) FROM api_keys").await, before);
}

async fn a_plan_without_api_keys_refuses_issue_until_upgraded(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        let mut plans = (*s.plans).clone();
        plans.spark = PlanPolicy {
            api_keys: false,
            byok: false,
        };
        s.plans = std::sync::Arc::new(plans);
    })
    .await;
    let mut client = workspaces(&app);
    let trial = client
        .create_workspace(create_req("ws_trial", Plan::Spark))
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    assert!(!trial.api_keys_allowed);
    let refused = app
        .admin()
        .issue_key(issue_request("ws_trial"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("SPARK plan") && refused.message().contains("API keys"),
        "{refused:?}"
    );
    assert_eq!(
        app.db
            .count("SELECT count(*) FROM api_keys WHERE workspace_id = 'ws_trial'")
            .await,
        0
    );
    assert_eq!(
        audit_actions(&app, "ws_trial").await[0],
        ("key.issue".to_owned(), proto::AuditOutcome::Denied as i32)
    );
    client
        .update_workspace(set_plan("ws_trial", Plan::Pro))
        .await
        .unwrap();
    app.admin()
        .issue_key(issue_request("ws_trial"))
        .await
        .unwrap();
}

async fn requests_are_validated_and_callers_checked(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = workspaces(&app);
    let status = client
        .create_workspace(proto::CreateWorkspaceRequest {
            workspace_id: "ws bad".into(),
            name: " ".into(),
            plan: 99,
            actor: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        ["workspace_id", "name", "plan", "actor"]
    );
    let status = client
        .create_workspace(create_req("ws_x", Plan::Unspecified))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["plan"]);
    let status = client
        .update_workspace(proto::UpdateWorkspaceRequest {
            update_mask: Some(FieldMask {
                paths: vec!["plan".into(), "owner".into()],
            }),
            ..set_plan("ws_test", Plan::Unspecified)
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["plan", "update_mask"]);
    let status = client
        .update_workspace(proto::UpdateWorkspaceRequest {
            update_mask: None,
            ..set_plan("ws_test", Plan::Pro)
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["update_mask"]);
    assert_eq!(
        app.db
            .count("SELECT count(*) FROM workspaces WHERE workspace_id = 'ws_x'")
            .await,
        0
    );
    // Admin only.
    let status =
        WorkspaceServiceClient::with_interceptor(app.channel.clone(), bearer(VERIFIER_TOKEN))
            .create_workspace(create_req("ws_y", Plan::Pro))
            .await
            .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

/// The migration's statement, run on keys written as the core issue wrote them: each
/// distinct workspace id becomes a SPARK workspace named after it, dated by its oldest
/// key.
async fn free_form_workspace_ids_migrate_to_spark_workspaces(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let first = app.issue().await;
    app.clock.advance(std::time::Duration::from_secs(5));
    app.issue().await;
    app.issue_with(|r| r.workspace_id = "ws_a".into()).await;
    app.db.execute("DELETE FROM workspaces").await;
    let migration = match backend {
        Backend::Sqlite => include_str!("../migrations/sqlite/0004_workspaces.sql"),
        Backend::Postgres => include_str!("../migrations/postgres/0004_workspaces.sql"),
    };
    let insert = &migration[migration.find("INSERT INTO workspaces").unwrap()..];
    app.db.execute(insert.trim().trim_end_matches(';')).await;
    assert_eq!(app.db.count("SELECT count(*) FROM workspaces").await, 2);
    assert_eq!(
        app.db
            .count(
                "SELECT count(*) FROM workspaces WHERE plan = 'spark' AND name = workspace_id \
                 AND workspace_id IN ('ws_test', 'ws_a')"
            )
            .await,
        2
    );
    let created = first.key_info.unwrap().created_at.unwrap();
    let created_micros = created.seconds * 1_000_000 + i64::from(created.nanos / 1000);
    assert_eq!(
        app.db
            .count("SELECT created_at FROM workspaces WHERE workspace_id = 'ws_test'")
            .await,
        created_micros
    );
}

/// ListWorkspaces pages through every workspace by id, a page token at a time, and
/// refuses a page token it did not issue or a page size out of range, naming the field.
async fn workspaces_are_listed_a_page_at_a_time(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = workspaces(&app);
    for id in ["pg_c", "pg_a", "pg_e", "pg_b", "pg_d"] {
        client
            .create_workspace(create_req(id, Plan::Pro))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_workspaces(proto::ListWorkspacesRequest {
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.workspaces.len() <= 2);
        pages += 1;
        for w in &page.workspaces {
            if ["pg_a", "pg_b", "pg_c", "pg_d", "pg_e"].contains(&w.workspace_id.as_str()) {
                assert_eq!(w.plan(), Plan::Pro, "{w:?}");
                assert_eq!(w.name, format!("{} inc.", w.workspace_id));
            }
            seen.push(w.workspace_id.clone());
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen, sorted, "in order of id, none twice");
    for id in ["pg_a", "pg_b", "pg_c", "pg_d", "pg_e"] {
        assert!(seen.iter().any(|s| s == id), "{id} missing from {seen:?}");
    }
    let total = usize::try_from(app.db.count("SELECT count(*) FROM workspaces").await).unwrap();
    assert_eq!(seen.len(), total);
    assert_eq!(pages, total.div_ceil(2), "no empty last page");

    for (request, field) in [
        (
            proto::ListWorkspacesRequest {
                page_size: 2,
                page_token: "bm90IG91cnM".into(),
            },
            "page_token",
        ),
        (
            proto::ListWorkspacesRequest {
                page_size: 1001,
                page_token: String::new(),
            },
            "page_size",
        ),
    ] {
        let status = client.list_workspaces(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&status), [field]);
    }
    // Only admins list workspaces.
    let status =
        WorkspaceServiceClient::with_interceptor(app.channel.clone(), bearer(VERIFIER_TOKEN))
            .list_workspaces(proto::ListWorkspacesRequest::default())
            .await
            .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

/// A key of a workspace moved to a plan without API keys stops verifying at once, with a
/// code of its own (it is not revoked), and works again when the plan allows keys. Each
/// change of plan appends an event per key, so other replicas and edge caches reload it.
async fn keys_answer_plan_forbids_keys_while_the_plan_forbids_them(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        let mut plans = (*s.plans).clone();
        plans.spark = PlanPolicy {
            api_keys: false,
            byok: false,
        };
        s.plans = std::sync::Arc::new(plans);
    })
    .await;
    let mut client = workspaces(&app);
    client
        .create_workspace(create_req("ws_paid", Plan::Pro))
        .await
        .unwrap();
    let issued = app
        .admin()
        .issue_key(issue_request("ws_paid"))
        .await
        .unwrap()
        .into_inner();
    let key_id = issued.key_info.as_ref().unwrap().key_id.clone();
    // Cached as valid first.
    assert_eq!(
        code(&app.verify(&issued.key, &[]).await),
        proto::VerifyCode::Valid
    );
    let events_sql = format!("SELECT count(*) FROM key_events WHERE key_id = '{key_id}'");
    let events_of_key = || app.db.count(&events_sql);
    let before = events_of_key().await;

    client
        .update_workspace(set_plan("ws_paid", Plan::Spark))
        .await
        .unwrap();
    let answer = app.verify(&issued.key, &[]).await;
    assert!(!answer.valid);
    assert_eq!(code(&answer), proto::VerifyCode::PlanForbidsKeys);
    assert_eq!(
        events_of_key().await,
        before + 1,
        "the change is on the log for other replicas"
    );
    let info = app
        .admin()
        .get_key(proto::GetKeyRequest {
            key_id: key_id.clone(),
            actor: None,
        })
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap();
    assert_eq!(
        info.status(),
        proto::KeyStatus::Active,
        "the key itself is untouched"
    );

    client
        .update_workspace(set_plan("ws_paid", Plan::Team))
        .await
        .unwrap();
    assert_eq!(
        code(&app.verify(&issued.key, &[]).await),
        proto::VerifyCode::Valid
    );
    assert_eq!(events_of_key().await, before + 2);
    // A rename is not a plan change: nothing to reload.
    client
        .update_workspace(proto::UpdateWorkspaceRequest {
            workspace_id: "ws_paid".into(),
            actor: Some(actor()),
            name: "Paid inc.".into(),
            update_mask: Some(FieldMask {
                paths: vec!["name".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(events_of_key().await, before + 2);
}

both_backends!(
    keys_answer_plan_forbids_keys_while_the_plan_forbids_them,
    workspaces_are_listed_a_page_at_a_time,
    create_get_and_update_round_trip_and_are_audited,
    keys_need_a_workspace_that_exists,
    a_plan_without_api_keys_refuses_issue_until_upgraded,
    requests_are_validated_and_callers_checked,
    free_form_workspace_ids_migrate_to_spark_workspaces,
);
