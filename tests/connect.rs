//! HTTP/JSON by the Connect protocol, through curl (a client nobody here wrote) against a
//! real server on both stores: issue → verify → revoke → audit in JSON, the binary
//! encoding, Connect's error shape and HTTP statuses for the codes the services answer,
//! and hostile bodies refused with 400 / invalid_argument and nothing changed.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use keywarden::proto;
use prost::Message;
use serde_json::{Value, json};

/// What curl got back: the HTTP status, the headers (lowercase names) and the body.
struct Answer {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// A Connect error's code, after checking the answer is one.
    fn error_code(&self) -> String {
        assert!(
            self.headers.contains("content-type: application/json"),
            "{}",
            self.headers
        );
        self.json()["code"].as_str().unwrap_or_default().to_owned()
    }
}

/// POSTs `body` to `/<method>` with curl, as `content_type`, with `token` if any.
fn curl(
    app: &TestApp,
    method: &str,
    token: Option<&str>,
    content_type: &str,
    body: &[u8],
    extra: &[&str],
) -> Answer {
    let dir = tempfile::tempdir().unwrap();
    let (head, out) = (dir.path().join("head"), dir.path().join("body"));
    let url = format!("http://{}/{method}", app.server().addr());
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-X", "POST", "--data-binary", "@-", "-o"])
        .arg(&out)
        .arg("-D")
        .arg(&head)
        .args(["-w", "%{http_code}", "-H"])
        .arg(format!("content-type: {content_type}"))
        .args(extra)
        .arg(&url);
    if let Some(token) = token {
        cmd.arg("-H").arg(format!("authorization: Bearer {token}"));
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl runs");
    child.stdin.take().unwrap().write_all(body).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "curl failed: {output:?}");
    Answer {
        status: String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap(),
        headers: std::fs::read_to_string(&head).unwrap().to_lowercase(),
        body: std::fs::read(&out).unwrap_or_default(),
    }
}

fn post(app: &TestApp, method: &str, token: &str, body: Value) -> Answer {
    curl(
        app,
        method,
        Some(token),
        "application/json",
        body.to_string().as_bytes(),
        &[],
    )
}

fn issue_request() -> Value {
    json!({
        "workspaceId": "ws_test", "name": "from curl", "environment": "ENVIRONMENT_LIVE",
        "scopes": ["read"], "owner": {"kind": "OWNER_KIND_USER", "id": "user_1"},
        "actor": {"id": "user_1", "permissions": ["admin", "read"]}
    })
}

/// The issue's walkthrough: issue, verify, revoke, verify again, read the audit log, all
/// JSON in and out, over HTTP/1.1 and HTTP/2.
async fn curl_issues_verifies_revokes_and_reads_the_audit_log(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = post(
        &app,
        "keywarden.v1.KeyService/IssueKey",
        ADMIN_TOKEN,
        issue_request(),
    );
    assert_eq!(
        issued.status,
        200,
        "{}",
        String::from_utf8_lossy(&issued.body)
    );
    assert!(issued.headers.contains("content-type: application/json"));
    let issued = issued.json();
    let key = issued["key"].as_str().unwrap().to_owned();
    let key_id = issued["keyInfo"]["keyId"].as_str().unwrap().to_owned();
    assert_eq!(
        issued["keyInfo"]["status"], "KEY_STATUS_ACTIVE",
        "enums by name"
    );
    assert!(
        issued["keyInfo"]["createdAt"]
            .as_str()
            .unwrap()
            .ends_with('Z'),
        "Timestamps in RFC 3339"
    );

    let verified = curl(
        &app,
        "keywarden.v1.VerifyService/VerifyKey",
        Some(VERIFIER_TOKEN),
        "application/json",
        json!({ "key": key }).to_string().as_bytes(),
        &["--http2-prior-knowledge"],
    );
    assert!(
        verified.headers.starts_with("http/2 200"),
        "{}",
        verified.headers
    );
    let verified = verified.json();
    assert_eq!(verified["valid"], true);
    assert_eq!(verified["keyId"], key_id.as_str());
    assert!(
        verified["rateLimit"]["limit"]
            .as_str()
            .is_some_and(|n| n.parse::<u64>().is_ok()),
        "64-bit integers as strings: {verified}"
    );

    let revoked = post(
        &app,
        "keywarden.v1.KeyService/RevokeKey",
        ADMIN_TOKEN,
        json!({ "keyId": key_id, "reason": "left the company", "actor": {"id": "user_1"} }),
    );
    assert_eq!(revoked.status, 200);
    let verified = post(
        &app,
        "keywarden.v1.VerifyService/VerifyKey",
        VERIFIER_TOKEN,
        json!({ "key": key }),
    )
    .json();
    assert_eq!(
        verified["valid"],
        Value::Null,
        "false is the default, left out"
    );
    assert_eq!(verified["code"], "VERIFY_CODE_REVOKED");

    let audit = post(
        &app,
        "keywarden.v1.KeyService/ListAuditEvents",
        ADMIN_TOKEN,
        json!({ "workspaceId": "ws_test", "keyId": key_id }),
    )
    .json();
    let actions: Vec<&str> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["key.revoke", "key.issue"]);
    // The same call by the proto field names, which the JSON mapping accepts too.
    let by_proto_names = post(
        &app,
        "keywarden.v1.KeyService/ListAuditEvents",
        ADMIN_TOKEN,
        json!({ "workspace_id": "ws_test", "key_id": key_id }),
    )
    .json();
    assert_eq!(by_proto_names, audit);
}

/// `application/proto`: the same call, the body protobuf's binary encoding both ways.
async fn binary_protobuf_calls_round_trip(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let key = app.issue().await.key;
    let request = proto::VerifyKeyRequest {
        key,
        ..Default::default()
    };
    let answer = curl(
        &app,
        "keywarden.v1.VerifyService/VerifyKey",
        Some(VERIFIER_TOKEN),
        "application/proto",
        &request.encode_to_vec(),
        &[],
    );
    assert_eq!(answer.status, 200);
    assert!(answer.headers.contains("content-type: application/proto"));
    let response = proto::VerifyKeyResponse::decode(answer.body.as_slice()).unwrap();
    assert!(response.valid);
    let garbage = curl(
        &app,
        "keywarden.v1.VerifyService/VerifyKey",
        Some(VERIFIER_TOKEN),
        "application/proto",
        b"\xff\xff\xff",
        &[],
    );
    assert_eq!(
        (garbage.status, garbage.error_code().as_str()),
        (400, "invalid_argument")
    );
}

/// Each code the services answer, as Connect shows it: its name, its HTTP status, and the
/// gRPC status's details (ErrorInfo's `reason`, BadRequest's field) decoded.
async fn errors_come_in_connects_shape_with_its_statuses(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let cases: Vec<(Answer, u16, &str)> = vec![
        (
            post(
                &app,
                "keywarden.v1.KeyService/IssueKey",
                ADMIN_TOKEN,
                json!({}),
            ),
            400,
            "invalid_argument",
        ),
        (
            curl(
                &app,
                "keywarden.v1.KeyService/IssueKey",
                None,
                "application/json",
                b"{}",
                &[],
            ),
            401,
            "unauthenticated",
        ),
        (
            post(
                &app,
                "keywarden.v1.KeyService/IssueKey",
                VERIFIER_TOKEN,
                issue_request(),
            ),
            403,
            "permission_denied",
        ),
        (
            post(
                &app,
                "keywarden.v1.KeyService/GetKey",
                ADMIN_TOKEN,
                json!({"keyId": "key_missing00000000000000000"}),
            ),
            404,
            "not_found",
        ),
        (
            post(
                &app,
                "keywarden.v1.WorkspaceService/CreateWorkspace",
                ADMIN_TOKEN,
                json!({"workspaceId": "ws_test", "name": "again", "plan": "PLAN_PRO", "actor": {"id": "user_1"}}),
            ),
            409,
            "already_exists",
        ),
        (
            post(
                &app,
                "keywarden.v1.KeyService/IssueKey",
                ADMIN_TOKEN,
                json!({
                    "workspaceId": "ws_test", "name": "n", "environment": "ENVIRONMENT_LIVE",
                    "scopes": ["admin"], "owner": {"kind": "OWNER_KIND_USER", "id": "user_1"},
                    "actor": {"id": "user_1", "permissions": ["read"]}
                }),
            ),
            403,
            "permission_denied",
        ),
        (
            post(
                &app,
                "keywarden.v1.RevocationService/WatchRevocations",
                ADMIN_TOKEN,
                json!({}),
            ),
            501,
            "unimplemented",
        ),
        (
            post(
                &app,
                "keywarden.v1.KeyService/NoSuchMethod",
                ADMIN_TOKEN,
                json!({}),
            ),
            501,
            "unimplemented",
        ),
    ];
    for (answer, status, code) in &cases {
        assert_eq!(
            (answer.status, answer.error_code().as_str()),
            (*status, *code),
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    let invalid = cases[0].0.json();
    let details = invalid["details"].as_array().unwrap();
    let types: Vec<&str> = details
        .iter()
        .map(|d| d["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["google.rpc.ErrorInfo", "google.rpc.BadRequest"]);
    assert_eq!(details[0]["debug"]["reason"], "INVALID_REQUEST");
    assert_eq!(
        details[1]["debug"]["fieldViolations"][0]["field"], "workspace_id",
        "BadRequest names the field"
    );
    assert!(details[0]["value"].as_str().is_some_and(|v| !v.is_empty()));
    let ceiling = cases[5].0.json();
    assert_eq!(
        ceiling["details"][0]["debug"]["reason"],
        "SCOPE_CEILING_EXCEEDED"
    );
    let missing_token = cases[1].0.json();
    assert_eq!(
        missing_token["details"][0]["debug"]["reason"],
        "CALLER_TOKEN_MISSING"
    );
}

/// Hostile bodies: unknown fields, wrong types, trailing garbage, invalid UTF-8, deep
/// nesting, 10 MB: each a 400 / invalid_argument naming the problem, and none of them
/// issues a key or writes an audit event.
async fn hostile_json_is_refused_and_changes_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let with = |f: &dyn Fn(&mut Value)| {
        let mut body = issue_request();
        f(&mut body);
        body.to_string().into_bytes()
    };
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let huge = format!(
        r#"{{"workspaceId": "ws_test", "name": "{}"}}"#,
        "x".repeat(10 * 1024 * 1024)
    );
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("unknown field", with(&|b| b["isAdmin"] = json!(true))),
        ("wrong type", with(&|b| b["scopes"] = json!(5))),
        (
            "wrong enum",
            with(&|b| b["environment"] = json!("ENVIRONMENT_MOON")),
        ),
        ("number for a string", with(&|b| b["name"] = json!(12))),
        ("trailing garbage", [with(&|_| ()), b"}}".to_vec()].concat()),
        ("not JSON", b"issue me a key".to_vec()),
        (
            "invalid UTF-8",
            [&b"{\"workspaceId\": \"ws_"[..], b"\xff\xfe", b"\"}"].concat(),
        ),
        (
            "deep nesting",
            format!(r#"{{"scopes": {deep}}}"#).into_bytes(),
        ),
        ("10 MB", huge.into_bytes()),
    ];
    for (what, body) in bodies {
        let answer = curl(
            &app,
            "keywarden.v1.KeyService/IssueKey",
            Some(ADMIN_TOKEN),
            "application/json",
            &body,
            &[],
        );
        assert_eq!(
            (answer.status, answer.error_code().as_str()),
            (400, "invalid_argument"),
            "{what}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        assert!(
            answer.json()["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }
    let keys = app
        .admin()
        .list_keys(proto::ListKeysRequest {
            workspace_id: "ws_test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(keys.keys.is_empty(), "no hostile body issued a key");
    let audit = app
        .admin()
        .list_audit_events(proto::ListAuditEventsRequest {
            workspace_id: "ws_test".into(),
            action: "key.issue".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(audit.events.is_empty());
}

both_backends!(
    curl_issues_verifies_revokes_and_reads_the_audit_log,
    binary_protobuf_calls_round_trip,
    errors_come_in_connects_shape_with_its_statuses,
    hostile_json_is_refused_and_changes_nothing,
);

/// CORS is off by default (no `access-control-*` headers, so browsers refuse); with
/// origins configured, a preflight from one of them is answered with what Connect's
/// browser clients need, and one from elsewhere is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_by_default_and_allows_only_configured_origins() {
    let preflight = |app: &TestApp, origin: &str| {
        let out = Command::new("curl")
            .args(["-sS", "-i", "-X", "OPTIONS", "-H"])
            .arg(format!("origin: {origin}"))
            .args([
                "-H",
                "access-control-request-method: POST",
                "-H",
                "access-control-request-headers: content-type,authorization,connect-protocol-version",
            ])
            .arg(format!(
                "http://{}/keywarden.v1.KeyService/IssueKey",
                app.server().addr()
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_lowercase()
    };
    let off = TestApp::spawn(Backend::Sqlite).await;
    assert!(!preflight(&off, "https://console.example").contains("access-control-allow-origin"));
    let answer = curl(
        &off,
        "keywarden.v1.VerifyService/VerifyKey",
        Some(VERIFIER_TOKEN),
        "application/json",
        b"{}",
        &["-H", "origin: https://console.example"],
    );
    assert!(!answer.headers.contains("access-control-allow-origin"));

    let on = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.connect.cors = Some(keywarden::config::CorsOrigins::List(vec![
            "https://console.example".into(),
        ]));
    })
    .await;
    let allowed = preflight(&on, "https://console.example");
    assert!(
        allowed.contains("access-control-allow-origin: https://console.example"),
        "{allowed}"
    );
    assert!(allowed.contains("authorization"), "{allowed}");
    assert!(allowed.contains("connect-protocol-version"), "{allowed}");
    assert!(!preflight(&on, "https://evil.example").contains("access-control-allow-origin"));
    let answer = curl(
        &on,
        "keywarden.v1.VerifyService/VerifyKey",
        Some(VERIFIER_TOKEN),
        "application/json",
        b"{}",
        &["-H", "origin: https://console.example"],
    );
    assert!(
        answer
            .headers
            .contains("access-control-allow-origin: https://console.example"),
        "{}",
        answer.headers
    );
}

/// `GET /openapi.json`: the JSON surface, a path for every unary RPC the server routes,
/// and the operation it describes answers as described.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_every_unary_call() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let out = Command::new("curl")
        .args(["-sS", "-f"])
        .arg(format!("http://{}/openapi.json", app.server().addr()))
        .output()
        .unwrap();
    assert!(out.status.success());
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    let paths = doc["paths"].as_object().unwrap();
    let rpcs = keywarden::api::connect::Rpcs::compiled().unwrap();
    let mut unary: Vec<&str> = rpcs.unary_paths().collect();
    unary.sort_unstable();
    let mut documented: Vec<&str> = paths.keys().map(String::as_str).collect();
    documented.sort_unstable();
    assert_eq!(documented, unary);
    let verify = &paths["/keywarden.v1.VerifyService/VerifyKey"]["post"];
    assert_eq!(
        verify["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/keywarden.v1.VerifyKeyRequest"
    );
    let schema = &doc["components"]["schemas"]["keywarden.v1.VerifyKeyResponse"]["properties"];
    let answer = post(
        &app,
        "keywarden.v1.VerifyService/VerifyKey",
        VERIFIER_TOKEN,
        json!({ "key": app.issue().await.key }),
    )
    .json();
    for field in answer.as_object().unwrap().keys() {
        assert!(
            schema.get(field).is_some(),
            "{field} is answered but not documented"
        );
    }
}

/// `[connect] enabled = false`: a JSON call is not translated (the gRPC server answers
/// it as the malformed gRPC call it is), and there is no document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_can_be_turned_off() {
    let app = TestApp::spawn_with(Backend::Sqlite, |s| s.connect.enabled = false).await;
    let answer = post(
        &app,
        "keywarden.v1.VerifyService/VerifyKey",
        VERIFIER_TOKEN,
        json!({ "key": "kw_live_x" }),
    );
    assert!(
        !answer.headers.contains("content-type: application/json"),
        "{}",
        answer.headers
    );
    assert!(serde_json::from_slice::<Value>(&answer.body).is_err());
}

/// `connect-timeout-ms` bounds the call: a deadline already past (0) is answered
/// `deadline_exceeded` (504) without starting the call, so it writes nothing; a
/// malformed header is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeouts_bound_the_call() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let body = issue_request().to_string();
    let late = curl(
        &app,
        "keywarden.v1.KeyService/IssueKey",
        Some(ADMIN_TOKEN),
        "application/json",
        body.as_bytes(),
        &["-H", "connect-timeout-ms: 0"],
    );
    assert_eq!(
        (late.status, late.error_code().as_str()),
        (504, "deadline_exceeded")
    );
    let bad = curl(
        &app,
        "keywarden.v1.KeyService/IssueKey",
        Some(ADMIN_TOKEN),
        "application/json",
        body.as_bytes(),
        &["-H", "connect-timeout-ms: soon"],
    );
    assert_eq!(
        (bad.status, bad.error_code().as_str()),
        (400, "invalid_argument")
    );
    let keys = app
        .admin()
        .list_keys(proto::ListKeysRequest {
            workspace_id: "ws_test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(keys.keys.is_empty(), "the call cut short wrote nothing");
    let in_time = curl(
        &app,
        "keywarden.v1.KeyService/IssueKey",
        Some(ADMIN_TOKEN),
        "application/json",
        body.as_bytes(),
        &["-H", "connect-timeout-ms: 10000"],
    );
    assert_eq!(in_time.status, 200);
}
