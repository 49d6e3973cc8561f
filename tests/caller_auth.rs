//! Caller authentication and the RBAC ceiling through a real server, on both stores.
//!
//! Every RPC needs `authorization: Bearer <caller token>` with the service's role: no
//! credential or an unknown one is UNAUTHENTICATED, the wrong role is PERMISSION_DENIED,
//! and an API key is never a caller credential. Within KeyService, a key never holds a
//! scope its acting principal does not (implications count); a refusal changes nothing
//! and is audited as DENIED.

mod common;

use common::*;
use keywarden::domain::key_format::KeyHash;
use keywarden::proto::key_service_client::KeyServiceClient;
use keywarden::proto::verify_service_client::VerifyServiceClient;
use keywarden::proto::{self, AuditOutcome, KeyStatus, VerifyCode};
use prost_types::FieldMask;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Sends `authorization: <value>` as given, or no such metadata at all.
#[derive(Clone)]
struct Authorization(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Authorization {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type KeyClient = KeyServiceClient<InterceptedService<Channel, Authorization>>;
type VerifyClient = VerifyServiceClient<InterceptedService<Channel, Authorization>>;

fn authorization(header: Option<&str>) -> Authorization {
    Authorization(header.map(|h| h.parse().unwrap()))
}

fn key_client(app: &TestApp, header: Option<&str>) -> KeyClient {
    KeyServiceClient::with_interceptor(app.channel.clone(), authorization(header))
}

fn verify_client(app: &TestApp, header: Option<&str>) -> VerifyClient {
    VerifyServiceClient::with_interceptor(app.channel.clone(), authorization(header))
}

/// Rows in every table a request could write: keys, secrets, audit events.
async fn rows(app: &TestApp) -> [i64; 3] {
    [
        app.db.count("SELECT COUNT(*) FROM api_keys").await,
        app.db.count("SELECT COUNT(*) FROM key_secrets").await,
        app.db.count("SELECT COUNT(*) FROM audit_events").await,
    ]
}

async fn get(app: &TestApp, key_id: &str) -> proto::KeyInfo {
    app.admin()
        .get_key(proto::GetKeyRequest {
            key_id: key_id.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn acting(id: &str, permissions: &[&str]) -> Option<proto::Actor> {
    Some(proto::Actor {
        id: id.to_owned(),
        permissions: strings(permissions),
    })
}

/// Calls every KeyService RPC with a request that is valid for `key_id`, and returns the
/// status of each refusal (panicking if one is accepted).
async fn refusals_of_every_key_rpc(
    client: &mut KeyClient,
    key_id: &str,
) -> Vec<(&'static str, Status)> {
    fn refused<T>(
        rpc: &'static str,
        r: Result<tonic::Response<T>, Status>,
    ) -> (&'static str, Status) {
        match r {
            Ok(_) => panic!("{rpc} was accepted"),
            Err(status) => (rpc, status),
        }
    }
    let key_id = key_id.to_owned();
    vec![
        refused("IssueKey", client.issue_key(issue_request("ws_test")).await),
        refused(
            "GetKey",
            client
                .get_key(proto::GetKeyRequest {
                    key_id: key_id.clone(),
                    ..Default::default()
                })
                .await,
        ),
        refused(
            "ListKeys",
            client
                .list_keys(proto::ListKeysRequest {
                    workspace_id: "ws_test".into(),
                    ..Default::default()
                })
                .await,
        ),
        refused(
            "UpdateKey",
            client
                .update_key(proto::UpdateKeyRequest {
                    key_id: key_id.clone(),
                    actor: Some(actor()),
                    name: "taken over".into(),
                    scopes: strings(&["admin"]),
                    update_mask: Some(FieldMask {
                        paths: strings(&["name", "scopes"]),
                    }),
                    ..Default::default()
                })
                .await,
        ),
        refused(
            "RotateKey",
            client
                .rotate_key(proto::RotateKeyRequest {
                    key_id: key_id.clone(),
                    actor: Some(actor()),
                    grace_period: None,
                })
                .await,
        ),
        refused(
            "RevokeKey",
            client
                .revoke_key(proto::RevokeKeyRequest {
                    key_id: key_id.clone(),
                    actor: Some(actor()),
                    reason: "taken over".into(),
                })
                .await,
        ),
        refused(
            "DeleteKey",
            client
                .delete_key(proto::DeleteKeyRequest {
                    key_id: key_id.clone(),
                    actor: Some(actor()),
                })
                .await,
        ),
        refused(
            "ListAuditEvents",
            client
                .list_audit_events(proto::ListAuditEventsRequest {
                    workspace_id: "ws_test".into(),
                    page_size: 0,
                    page_token: String::new(),
                    ..Default::default()
                })
                .await,
        ),
    ]
}

/// Calls every VerifyService RPC; returns the status of each refusal.
async fn refusals_of_every_verify_rpc(
    client: &mut VerifyClient,
    key: &str,
) -> Vec<(&'static str, Status)> {
    let verify = client
        .verify_key(proto::VerifyKeyRequest {
            key: key.to_owned(),
            required_scopes: vec![],
            cost: 0,
            resource: String::new(),
            client_ip: String::new(),
        })
        .await;
    let ping = client.ping(proto::PingRequest {}).await;
    vec![
        ("VerifyKey", verify.expect_err("VerifyKey was accepted")),
        ("Ping", ping.expect_err("Ping was accepted")),
    ]
}

fn assert_all(refusals: &[(&str, Status)], code: Code, case: &str) {
    assert!(!refusals.is_empty());
    for (rpc, status) in refusals {
        assert_eq!(status.code(), code, "{case}: {rpc}: {status:?}");
    }
}

/// The scopes a PERMISSION_DENIED message of the RBAC ceiling names as missing.
fn named_missing(status: &Status) -> Vec<String> {
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let (_, missing) = status
        .message()
        .rsplit_once(": ")
        .unwrap_or_else(|| panic!("no list of scopes in {:?}", status.message()));
    let mut missing: Vec<String> = missing.split(", ").map(String::from).collect();
    missing.sort();
    missing
}

async fn calls_without_a_bearer_credential_are_unauthenticated(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    let before = issued.key_info.unwrap();
    for header in [
        None,
        Some("test-admin-token"),
        Some("Basic test-admin-token"),
        Some("Token test-admin-token"),
        Some("Bearer"),
        Some("Bearer    "),
        Some(""),
    ] {
        let case = format!("authorization: {header:?}");
        let key_refusals =
            refusals_of_every_key_rpc(&mut key_client(&app, header), &before.key_id).await;
        assert_all(&key_refusals, Code::Unauthenticated, &case);
        let verifier_header = header.map(|h| h.replace("admin", "verifier"));
        let verify_refusals = refusals_of_every_verify_rpc(
            &mut verify_client(&app, verifier_header.as_deref()),
            &issued.key,
        )
        .await;
        assert_all(&verify_refusals, Code::Unauthenticated, &case);
    }
    // The refusal says what is missing.
    let (_, status) =
        &refusals_of_every_key_rpc(&mut key_client(&app, None), &before.key_id).await[0];
    assert!(status.message().contains("authorization"), "{status:?}");
    // Nothing was written, nothing changed.
    assert_eq!(rows(&app).await, [1, 1, 1]);
    assert_eq!(get(&app, &before.key_id).await, before);
    assert!(app.verify(&issued.key, &[]).await.valid);
}

async fn unknown_caller_tokens_are_unauthenticated(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    let before = issued.key_info.unwrap();
    // Near misses of the real tokens, and the configured hash itself (tokens are configured
    // as hashes; presenting a hash is not presenting the token).
    for token in [
        "not-a-token".to_owned(),
        ADMIN_TOKEN.to_uppercase(),
        format!("{ADMIN_TOKEN}x"),
        ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1].to_owned(),
        KeyHash::of(ADMIN_TOKEN).to_hex(),
        format!("{ADMIN_TOKEN},{VERIFIER_TOKEN}"),
    ] {
        let header = format!("Bearer {token}");
        let refusals =
            refusals_of_every_key_rpc(&mut key_client(&app, Some(&header)), &before.key_id).await;
        assert_all(&refusals, Code::Unauthenticated, &token);
    }
    for token in [
        "not-a-token".to_owned(),
        VERIFIER_TOKEN.to_uppercase(),
        format!("{VERIFIER_TOKEN}x"),
        KeyHash::of(VERIFIER_TOKEN).to_hex(),
    ] {
        let header = format!("Bearer {token}");
        let refusals =
            refusals_of_every_verify_rpc(&mut verify_client(&app, Some(&header)), &issued.key)
                .await;
        assert_all(&refusals, Code::Unauthenticated, &token);
    }
    assert_eq!(rows(&app).await, [1, 1, 1]);
    assert_eq!(get(&app, &before.key_id).await, before);
}

async fn the_verifier_token_may_not_use_key_service(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    let before = issued.key_info.unwrap();
    let header = format!("Bearer {VERIFIER_TOKEN}");
    let refusals =
        refusals_of_every_key_rpc(&mut key_client(&app, Some(&header)), &before.key_id).await;
    assert_all(&refusals, Code::PermissionDenied, "verifier token");
    for (rpc, status) in &refusals {
        assert!(
            status.message().contains("`admin` role"),
            "{rpc}: {status:?}"
        );
    }
    assert_eq!(rows(&app).await, [1, 1, 1]);
    assert_eq!(get(&app, &before.key_id).await, before);
    assert!(app.verify(&issued.key, &[]).await.valid);
}

async fn the_admin_token_may_not_use_verify_service(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    let header = format!("Bearer {ADMIN_TOKEN}");
    let refusals =
        refusals_of_every_verify_rpc(&mut verify_client(&app, Some(&header)), &issued.key).await;
    assert_all(&refusals, Code::PermissionDenied, "admin token");
    for (rpc, status) in &refusals {
        assert!(
            status.message().contains("`verifier` role"),
            "{rpc}: {status:?}"
        );
    }
    // The same key and token are fine where they belong.
    assert!(app.verify(&issued.key, &[]).await.valid);
    assert_eq!(rows(&app).await, [1, 1, 1]);
}

async fn an_api_key_is_never_a_caller_credential(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // Even a key holding the `admin` scope.
    let issued = app.issue_with(|r| r.scopes = strings(&["admin"])).await;
    let before = issued.key_info.unwrap();
    assert!(app.verify(&issued.key, &["admin"]).await.valid);
    for header in [format!("Bearer {}", issued.key), issued.key.clone()] {
        let refusals =
            refusals_of_every_key_rpc(&mut key_client(&app, Some(&header)), &before.key_id).await;
        assert_all(&refusals, Code::Unauthenticated, &header);
        let refusals =
            refusals_of_every_verify_rpc(&mut verify_client(&app, Some(&header)), &issued.key)
                .await;
        assert_all(&refusals, Code::Unauthenticated, &header);
    }
    // It minted nothing and revoked, rotated, changed nothing: not even itself.
    assert_eq!(rows(&app).await, [1, 1, 1]);
    let after = get(&app, &before.key_id).await;
    assert_eq!(after, before);
    assert_eq!(after.status, KeyStatus::Active as i32);
    assert!(app.verify(&issued.key, &["admin"]).await.valid);
}

async fn issuing_scopes_beyond_the_actors_own_is_denied_named_and_audited(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut req = issue_request("ws_test");
    req.scopes = strings(&["read", "write", "billing:admin"]);
    req.actor = acting("user_limited", &["read"]);
    let status = app.admin().issue_key(req).await.unwrap_err();
    assert_eq!(
        named_missing(&status),
        ["billing:admin", "write"],
        "{status:?}"
    );
    assert_eq!(
        rows(&app).await[..2],
        [0, 0],
        "no key and no secret was written"
    );

    let events = app.audit("ws_test").await;
    assert_eq!(events.len(), 1, "{events:?}");
    let denied = &events[0];
    assert_eq!(denied.action, "key.issue");
    assert_eq!(denied.outcome, AuditOutcome::Denied as i32);
    assert_eq!(denied.actor_id, "user_limited");
    assert_eq!(denied.caller, "test-admin");
    assert_eq!(denied.key_id, "");
    assert!(
        denied.detail.contains("billing:admin") && denied.detail.contains("write"),
        "{denied:?}"
    );
}

async fn an_admin_actor_may_grant_the_scopes_admin_implies(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for (permissions, scopes) in [
        (&["admin"][..], &["read", "write"][..]),
        (&["admin"], &["read"]),
        (&["admin"], &["admin", "write"]),
        (&["write"], &["read", "write"]),
        (&["read", "write"], &["read"]),
    ] {
        let issued = app
            .issue_with(|r| {
                r.actor = acting("user_granter", permissions);
                // The actor's own key: a member (no `admin`) may issue only those.
                r.owner = Some(user("user_granter"));
                r.scopes = strings(scopes);
            })
            .await;
        let mut want = strings(scopes);
        want.sort();
        assert_eq!(issued.key_info.unwrap().scopes, want, "{permissions:?}");
        for scope in scopes {
            assert!(app.verify(&issued.key, &[scope]).await.valid, "{scope}");
        }
    }
    assert_eq!(rows(&app).await, [5, 5, 5]);
    let events = app.audit("ws_test").await;
    assert!(
        events
            .iter()
            .all(|e| e.outcome == AuditOutcome::Success as i32)
    );
}

async fn actors_may_not_grant_scopes_above_their_own(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for (permissions, scopes, missing) in [
        (&["write"][..], &["admin"][..], &["admin"][..]),
        (&["write"], &["read", "admin"], &["admin"]),
        (&["read"], &["read", "write"], &["write"]),
        (&[], &["read"], &["read"]),
        (
            &["admin"],
            &["admin", "knowledge:read"],
            &["knowledge:read"],
        ),
    ] {
        let mut req = issue_request("ws_test");
        req.actor = acting("user_climber", permissions);
        req.scopes = strings(scopes);
        let status = app.admin().issue_key(req).await.unwrap_err();
        assert_eq!(
            named_missing(&status),
            missing,
            "{permissions:?} granting {scopes:?}"
        );
    }
    assert_eq!(rows(&app).await, [0, 0, 5]);
    let events = app.audit("ws_test").await;
    assert!(
        events
            .iter()
            .all(|e| e.outcome == AuditOutcome::Denied as i32 && e.action == "key.issue"),
        "{events:?}"
    );
}

async fn updating_in_a_scope_beyond_the_actors_own_is_denied_and_changes_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // The writer's own key (a member without the admin permission manages only its own).
    let issued = app
        .issue_with(|r| r.owner = Some(user("user_writer")))
        .await;
    let before = issued.key_info.unwrap();
    assert_eq!(before.scopes, ["read"]);
    let status = app
        .admin()
        .update_key(proto::UpdateKeyRequest {
            key_id: before.key_id.clone(),
            actor: acting("user_writer", &["write"]),
            name: "escalated".into(),
            scopes: strings(&["read", "admin"]),
            update_mask: Some(FieldMask {
                paths: strings(&["name", "scopes"]),
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(named_missing(&status), ["admin"], "{status:?}");

    // Neither the scopes nor the name in the same request changed.
    assert_eq!(get(&app, &before.key_id).await, before);
    let answer = app.verify(&issued.key, &["admin"]).await;
    assert_eq!(code(&answer), VerifyCode::InsufficientScope);
    assert_eq!(answer.scopes, ["read"]);
    assert_eq!(
        code(&app.verify(&issued.key, &["write"]).await),
        VerifyCode::InsufficientScope
    );
    assert!(app.verify(&issued.key, &["read"]).await.valid);

    let events = app.audit("ws_test").await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].action, "key.update");
    assert_eq!(events[0].outcome, AuditOutcome::Denied as i32);
    assert_eq!(events[0].key_id, before.key_id);
    assert_eq!(events[0].actor_id, "user_writer");

    // Within the actor's own permissions the same update goes through.
    let updated = app
        .admin()
        .update_key(proto::UpdateKeyRequest {
            key_id: before.key_id.clone(),
            actor: acting("user_writer", &["write"]),
            scopes: strings(&["read", "write"]),
            update_mask: Some(FieldMask {
                paths: strings(&["scopes"]),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap();
    assert_eq!(updated.scopes, ["read", "write"]);
    assert!(app.verify(&issued.key, &["write"]).await.valid);
}

both_backends!(
    calls_without_a_bearer_credential_are_unauthenticated,
    unknown_caller_tokens_are_unauthenticated,
    the_verifier_token_may_not_use_key_service,
    the_admin_token_may_not_use_verify_service,
    an_api_key_is_never_a_caller_credential,
    issuing_scopes_beyond_the_actors_own_is_denied_named_and_audited,
    an_admin_actor_may_grant_the_scopes_admin_implies,
    actors_may_not_grant_scopes_above_their_own,
    updating_in_a_scope_beyond_the_actors_own_is_denied_and_changes_nothing,
);
