//! Envoy's ext_authz API (`envoy.service.auth.v3.Authorization/Check`) through a real
//! tonic client, with CheckRequests shaped as Envoy sends them: every answer (allowed,
//! 401, 403, 429, 400), the headers it adds and removes, the caller's role, and hostile
//! header values. The key never appears in an answer.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use envoy_types::ext_authz::v3::pb::{
    CheckRequest, CheckResponse, HeaderValueOption, HttpResponse,
};
use envoy_types::pb::envoy::config::core::v3::address::Address;
use envoy_types::pb::envoy::config::core::v3::{self as core, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::google::protobuf::value::Kind;
use keywarden::api::ext_authz::settings::{ExtAuthzInput, ExtAuthzSettings};
use keywarden::domain::key_format::{ApiKey, Brand, Environment};
use keywarden::proto::{self, ResourceAccessMode};
use prost_types::FieldMask;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = AuthorizationClient<InterceptedService<Channel, Bearer>>;

const CLIENT_IP: &str = "203.0.113.7";

/// `/v1/admin` needs `admin`, the rest of `/v1/` needs `read`; the model is in `x-model`.
fn ext_authz_settings() -> ExtAuthzSettings {
    let mut path_scopes = HashMap::new();
    path_scopes.insert("/v1/admin".to_owned(), vec!["admin".to_owned()]);
    path_scopes.insert("/v1/".to_owned(), vec!["read".to_owned()]);
    let d = ExtAuthzSettings::default();
    ExtAuthzSettings::new(ExtAuthzInput {
        enabled: true,
        key_headers: &d.key_headers,
        path_scopes: &path_scopes,
        resource_header: Some("x-model"),
        key_id_header: &d.key_id_header,
        workspace_id_header: &d.workspace_id_header,
    })
    .unwrap()
}

async fn spawn(backend: Backend) -> TestApp {
    TestApp::spawn_with(backend, |s| s.ext_authz = Arc::new(ext_authz_settings())).await
}

fn client(app: &TestApp, token: &str) -> Client {
    AuthorizationClient::with_interceptor(app.channel.clone(), bearer(token))
}

/// A CheckRequest as Envoy builds it for `POST path` from `source_ip`, with `headers`
/// (and the pseudo-headers Envoy always includes).
fn request_from(source_ip: Option<&str>, path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    let mut all: HashMap<String, String> = [
        (":authority", "api.example.com"),
        (":method", "POST"),
        (":path", path),
        (":scheme", "https"),
        ("content-type", "application/json"),
        ("user-agent", "curl/8.5.0"),
        ("x-request-id", "4b0c6f5e-8f1d-4c55-a0b4-1f2e3d4c5b6a"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in headers {
        all.insert(k.to_string(), v.to_string());
    }
    let peer = |ip: &str, port: u32| Peer {
        address: Some(core::Address {
            address: Some(Address::SocketAddress(SocketAddress {
                address: ip.to_owned(),
                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: source_ip.map(|ip| peer(ip, 51234)),
            destination: Some(peer("10.0.0.5", 8443)),
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: "1234567890".into(),
                    method: "POST".into(),
                    headers: all,
                    path: path.into(),
                    host: "api.example.com".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/2".into(),
                    size: -1,
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    }
}

fn request(path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    request_from(Some(CLIENT_IP), path, headers)
}

fn bearer_key(key: &str) -> String {
    format!("Bearer {key}")
}

fn header<'r>(headers: &'r [HeaderValueOption], name: &str) -> Option<&'r str> {
    headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == name)
        .map(|h| h.value.as_str())
}

/// What Envoy would do with an answer.
enum Answer {
    Allowed {
        upstream: Vec<HeaderValueOption>,
        removed: Vec<String>,
        downstream: Vec<HeaderValueOption>,
        metadata: Option<envoy_types::pb::google::protobuf::Struct>,
    },
    Denied {
        http_status: i32,
        headers: Vec<HeaderValueOption>,
        reason: String,
    },
}

impl Answer {
    /// Asserts a denial with `http_status` and `reason`; returns its headers.
    fn denied(self, http_status: i32, reason: &str) -> Vec<HeaderValueOption> {
        match self {
            Answer::Denied {
                http_status: got,
                headers,
                reason: why,
            } => {
                assert_eq!((got, why.as_str()), (http_status, reason));
                headers
            }
            Answer::Allowed { .. } => panic!("allowed; expected {http_status} {reason}"),
        }
    }

    fn reason(&self) -> String {
        match self {
            Answer::Allowed { .. } => "allowed".into(),
            Answer::Denied {
                http_status,
                reason,
                ..
            } => format!("{http_status} {reason}"),
        }
    }
}

/// Calls Check and reads the answer as Envoy does. `secret`: a key that must appear
/// nowhere in the answer.
async fn check(client: &mut Client, req: CheckRequest, secret: &str) -> Answer {
    let resp: CheckResponse = client.check(req).await.unwrap().into_inner();
    if !secret.is_empty() {
        assert!(
            !format!("{resp:?}").contains(secret),
            "the answer carries the key"
        );
    }
    let grpc = resp.status.as_ref().map_or(-1, |s| s.code);
    match resp.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            assert_eq!(grpc, 0, "an OK answer has gRPC status OK");
            Answer::Allowed {
                upstream: ok.headers,
                removed: ok.headers_to_remove,
                downstream: ok.response_headers_to_add,
                metadata: resp.dynamic_metadata,
            }
        }
        Some(HttpResponse::DeniedResponse(denied)) => {
            assert_eq!(grpc, 7, "a denial has gRPC status PERMISSION_DENIED");
            assert_eq!(
                header(&denied.headers, "content-type"),
                Some("application/json")
            );
            let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
            let reason = body["error"].as_str().unwrap().to_owned();
            assert_eq!(
                body,
                serde_json::json!({ "error": reason }),
                "only the reason"
            );
            Answer::Denied {
                http_status: denied.status.map_or(0, |s| s.code),
                headers: denied.headers,
                reason,
            }
        }
        other => panic!("not an OK or a denial: {other:?}"),
    }
}

fn unknown_key() -> String {
    ApiKey::generate(&mut getrandom::SysRng, &Brand::default(), Environment::Live)
        .unwrap()
        .expose()
        .to_owned()
}

async fn a_valid_key_is_allowed_and_identified_upstream(backend: Backend) {
    let app = spawn(backend).await;
    let issued = app.issue().await;
    let key_id = issued.key_info.as_ref().unwrap().key_id.clone();
    let mut c = client(&app, VERIFIER_TOKEN);
    // A client trying to pass its own identity upstream is overwritten.
    let req = request(
        "/v1/chat/completions?stream=true",
        &[
            ("authorization", &bearer_key(&issued.key)),
            ("x-keywarden-key-id", "key_someone_else"),
            ("x-model", "gpt-4o"),
        ],
    );
    let Answer::Allowed {
        upstream,
        removed,
        downstream,
        metadata,
    } = check(&mut c, req, &issued.key).await
    else {
        panic!("refused");
    };
    assert_eq!(
        header(&upstream, "x-keywarden-key-id"),
        Some(key_id.as_str())
    );
    assert_eq!(
        header(&upstream, "x-keywarden-workspace-id"),
        Some("ws_test")
    );
    let overwrite = envoy_types::ext_authz::v3::pb::HeaderAppendAction::OverwriteIfExistsOrAdd;
    assert!(upstream.iter().all(|h| h.append_action == overwrite as i32));
    assert!(removed.contains(&"authorization".to_owned()), "{removed:?}");
    assert!(removed.contains(&"x-api-key".to_owned()), "{removed:?}");
    assert_eq!(header(&downstream, "x-ratelimit-limit"), Some("1000000"));
    assert_eq!(header(&downstream, "x-ratelimit-remaining"), Some("999999"));
    let reset: i64 = header(&downstream, "x-ratelimit-reset")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        reset > app.clock.now() / 1_000_000,
        "reset is in the future"
    );
    let fields = metadata.unwrap().fields;
    match &fields["key_id"].kind {
        Some(Kind::StringValue(id)) => assert_eq!(id, &key_id),
        other => panic!("key_id metadata: {other:?}"),
    }
}

async fn x_api_key_is_read_when_there_is_no_authorization_header(backend: Backend) {
    let app = spawn(backend).await;
    let issued = app.issue().await;
    let mut c = client(&app, VERIFIER_TOKEN);
    let req = request("/v1/embeddings", &[("x-api-key", &issued.key)]);
    let answer = check(&mut c, req, &issued.key).await;
    assert!(
        matches!(answer, Answer::Allowed { .. }),
        "{}",
        answer.reason()
    );
    // The first configured header present decides: a bad `authorization` is not
    // rescued by a good `x-api-key`.
    let req = request(
        "/v1/embeddings",
        &[
            ("authorization", "Basic dXNlcjpwYXNz"),
            ("x-api-key", &issued.key),
        ],
    );
    check(&mut c, req, &issued.key)
        .await
        .denied(401, "malformed_key");
}

async fn a_request_without_a_key_is_401(backend: Backend) {
    let app = spawn(backend).await;
    let mut c = client(&app, VERIFIER_TOKEN);
    let headers = check(&mut c, request("/v1/chat/completions", &[]), "")
        .await
        .denied(401, "missing_key");
    assert_eq!(header(&headers, "www-authenticate"), Some("Bearer"));
    // A CheckRequest with no HTTP attributes at all (not an HTTP filter) names no key.
    check(&mut c, CheckRequest::default(), "")
        .await
        .denied(401, "missing_key");
}

async fn malformed_unknown_revoked_and_expired_keys_are_401(backend: Backend) {
    let app = spawn(backend).await;
    let mut c = client(&app, VERIFIER_TOKEN);
    let good = app.issue().await;
    let mut typo = good.key.clone().into_bytes();
    typo[12] = if typo[12] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    for bad in [
        bearer_key(&typo),
        bearer_key("kw_live_short"),
        bearer_key("sk-ant-api03-abc"),
        "Bearer".to_owned(),
        format!("Token {}", good.key),
        good.key.clone(),
    ] {
        let req = request("/v1/chat", &[("authorization", &bad)]);
        let answer = check(&mut c, req, &good.key).await;
        assert_eq!(answer.reason(), "401 malformed_key", "{bad:?}");
    }

    let unknown = unknown_key();
    let req = request("/v1/chat", &[("authorization", &bearer_key(&unknown))]);
    check(&mut c, req, &unknown)
        .await
        .denied(401, "unknown_key");

    let revoked = app.issue().await;
    app.admin()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: revoked.key_info.unwrap().key_id,
            actor: Some(actor()),
            reason: "leaked".into(),
        })
        .await
        .unwrap();
    let req = request("/v1/chat", &[("authorization", &bearer_key(&revoked.key))]);
    check(&mut c, req, &revoked.key)
        .await
        .denied(401, "revoked_key");

    // Expiry by the server's manual clock: no sleeping.
    let expiring = app.issue().await;
    app.admin()
        .update_key(proto::UpdateKeyRequest {
            key_id: expiring.key_info.unwrap().key_id,
            actor: Some(actor()),
            expires_at: Some(ts_in(&app.clock, 10)),
            update_mask: Some(FieldMask {
                paths: vec!["expires_at".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let req = || request("/v1/chat", &[("x-api-key", &expiring.key)]);
    let answer = check(&mut c, req(), &expiring.key).await;
    assert!(
        matches!(answer, Answer::Allowed { .. }),
        "{}",
        answer.reason()
    );
    app.clock.advance(std::time::Duration::from_secs(10));
    check(&mut c, req(), &expiring.key)
        .await
        .denied(401, "expired_key");
}

async fn a_path_needing_a_scope_the_key_lacks_is_403(backend: Backend) {
    let app = spawn(backend).await;
    let mut c = client(&app, VERIFIER_TOKEN);
    let reader = app.issue().await.key;
    let admin = app
        .issue_with(|r| r.scopes = vec!["admin".into()])
        .await
        .key;
    let ask = |path: &str, key: &str| request(path, &[("authorization", &bearer_key(key))]);
    for (path, key, expected) in [
        ("/v1/chat/completions", &reader, "allowed"),
        ("/healthz", &reader, "allowed"),
        ("/v1/admin/keys", &reader, "403 insufficient_scope"),
        // Escaped and differently cased spellings of the admin path need admin too.
        ("/v1/%61dmin/keys", &reader, "403 insufficient_scope"),
        ("/V1/Admin/keys", &reader, "403 insufficient_scope"),
        // Spellings an upstream could resolve elsewhere are refused outright.
        ("/v1/public/../admin/keys", &reader, "400 invalid_path"),
        ("/v1//admin", &reader, "400 invalid_path"),
        ("/v1/%252e%252e/admin", &reader, "400 invalid_path"),
        // admin implies write implies read.
        ("/v1/admin/keys", &admin, "allowed"),
        ("/v1/chat/completions", &admin, "allowed"),
    ] {
        let answer = check(&mut c, ask(path, key), key).await;
        assert_eq!(answer.reason(), expected, "{path}");
    }
}

async fn a_model_the_key_may_not_use_is_403(backend: Backend) {
    let app = spawn(backend).await;
    let mut c = client(&app, VERIFIER_TOKEN);
    let key = app
        .issue_with(|r| {
            r.resource_access = Some(proto::ResourceAccess {
                mode: ResourceAccessMode::Include as i32,
                targets: vec!["gpt-4o".into()],
                access_groups: Vec::new(),
            })
        })
        .await
        .key;
    let auth = bearer_key(&key);
    for (model, expected) in [
        (Some("gpt-4o"), "allowed"),
        (Some("claude-opus-4"), "403 resource_forbidden"),
        // A key limited to some models needs the request to name one.
        (None, "403 resource_forbidden"),
        (Some("gpt 4o; drop"), "400 invalid_resource"),
    ] {
        let mut headers = vec![("authorization", auth.as_str())];
        if let Some(m) = model {
            headers.push(("x-model", m));
        }
        let answer = check(&mut c, request("/v1/chat", &headers), &key).await;
        assert_eq!(answer.reason(), expected, "{model:?}");
    }
}

async fn a_client_outside_the_key_network_is_403(backend: Backend) {
    let app = spawn(backend).await;
    let mut c = client(&app, VERIFIER_TOKEN);
    let key = app
        .issue_with(|r| r.allowed_cidrs = vec!["10.0.0.0/8".into()])
        .await
        .key;
    let auth = bearer_key(&key);
    let headers = [("authorization", auth.as_str())];
    for (source, expected) in [
        (Some("10.1.2.3"), "allowed"),
        (Some("::ffff:10.1.2.3"), "allowed"),
        (Some(CLIENT_IP), "403 ip_forbidden"),
        (Some("not-an-ip"), "403 ip_forbidden"),
        (None, "403 ip_forbidden"),
    ] {
        let answer = check(&mut c, request_from(source, "/v1/chat", &headers), &key).await;
        assert_eq!(answer.reason(), expected, "{source:?}");
    }
}

async fn a_key_over_its_rate_limit_is_429_with_retry_after(backend: Backend) {
    let app = spawn(backend).await;
    let mut c = client(&app, VERIFIER_TOKEN);
    let issued = app
        .issue_with(|r| {
            r.rate_limits = vec![proto::RateLimit {
                unit: proto::RateLimitUnit::Requests as i32,
                window: proto::RateLimitWindow::Minute as i32,
                limit: 3,
            }]
        })
        .await;
    // VerifyKey and Check count against the same limit: one verifier behind both.
    assert!(app.verify(&issued.key, &[]).await.valid);
    let req = || request("/v1/chat", &[("x-api-key", &issued.key)]);
    for remaining in ["1", "0"] {
        let Answer::Allowed { downstream, .. } = check(&mut c, req(), &issued.key).await else {
            panic!("refused under the limit");
        };
        assert_eq!(header(&downstream, "x-ratelimit-limit"), Some("3"));
        assert_eq!(
            header(&downstream, "x-ratelimit-remaining"),
            Some(remaining)
        );
    }
    let headers = check(&mut c, req(), &issued.key)
        .await
        .denied(429, "rate_limited");
    // The same wait VerifyKey announces (the manual clock has not moved), in whole
    // seconds rounded up.
    let refused = app.verify(&issued.key, &[]).await;
    assert!(!refused.valid, "VerifyKey agrees");
    let wait = refused.rate_limit.unwrap().retry_after.unwrap();
    let expected = wait.seconds + i64::from(wait.nanos > 0);
    let retry: i64 = header(&headers, "retry-after").unwrap().parse().unwrap();
    assert_eq!(retry, expected.max(1));
    assert_eq!(header(&headers, "x-ratelimit-limit"), Some("3"));
    assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("0"));
    assert!(header(&headers, "x-ratelimit-reset").is_some());
}

async fn a_key_over_its_budget_is_429(backend: Backend) {
    let app = spawn(backend).await;
    let mut c = client(&app, VERIFIER_TOKEN);
    let issued = app.issue_with(|r| r.max_budget_micros = Some(1_000)).await;
    let req = || request("/v1/chat", &[("x-api-key", &issued.key)]);
    let answer = check(&mut c, req(), &issued.key).await;
    assert!(
        matches!(answer, Answer::Allowed { .. }),
        "{}",
        answer.reason()
    );
    app.verifier()
        .report_usage(proto::ReportUsageRequest {
            key_id: issued.key_info.unwrap().key_id,
            tokens: 0,
            spend_micros: 1_000,
        })
        .await
        .unwrap();
    check(&mut c, req(), &issued.key)
        .await
        .denied(429, "budget_exceeded");
}

async fn hostile_header_values_get_a_clean_401(backend: Backend) {
    let app = spawn(backend).await;
    let mut c = client(&app, VERIFIER_TOKEN);
    let good = app.issue().await.key;
    let huge = format!("Bearer {}", "k".repeat(64 * 1024));
    let huge_raw = format!("{good}{}", "A".repeat(600));
    for (name, value) in [
        ("authorization", huge.as_str()),
        ("x-api-key", huge_raw.as_str()),
        ("x-api-key", "kw_live_ÿÿÿÿ\u{202e}ǝʞoɹ"),
        (
            "authorization",
            "Bearer 🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑",
        ),
        ("x-api-key", "kw_live_\u{0}\u{1}\u{7f}"),
        ("x-api-key", "kw_live_,kw_live_"),
        ("authorization", "Bearer \u{a0}"),
    ] {
        let answer = check(&mut c, request("/v1/chat", &[(name, value)]), &good).await;
        assert_eq!(
            answer.reason(),
            "401 malformed_key",
            "{name}: {:.40}",
            value
        );
    }
    // A hostile model header and path are refused as requests, not crashes.
    let auth = bearer_key(&good);
    let huge_model = "m".repeat(10_000);
    for (path, model, expected) in [
        ("/v1/chat", huge_model.as_str(), "400 invalid_resource"),
        ("/v1/chat", "gpt-4o\u{0}", "400 invalid_resource"),
        ("/v1/\u{0}admin", "", "400 invalid_path"),
        ("/v1/%ff%fe", "", "400 invalid_path"),
    ] {
        let mut headers = vec![("authorization", auth.as_str())];
        if !model.is_empty() {
            headers.push(("x-model", model));
        }
        let answer = check(&mut c, request(path, &headers), &good).await;
        assert_eq!(answer.reason(), expected, "{path:?}");
    }
    // The server is still answering, and the good key still works.
    let answer = check(&mut c, request("/v1/chat", &[("x-api-key", &good)]), &good).await;
    assert!(
        matches!(answer, Answer::Allowed { .. }),
        "{}",
        answer.reason()
    );
}

async fn only_callers_with_the_verifier_role_may_check(backend: Backend) {
    let app = spawn(backend).await;
    let key = app.issue().await.key;
    let req = || request("/v1/chat", &[("x-api-key", &key)]);
    let err = client(&app, ADMIN_TOKEN).check(req()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    for token in ["not-a-caller-token", key.as_str()] {
        let err = client(&app, token).check(req()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
        assert!(!err.message().contains(&key));
    }
    let mut anonymous = AuthorizationClient::new(app.channel.clone());
    let err = anonymous.check(req()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
}

both_backends!(
    a_valid_key_is_allowed_and_identified_upstream,
    x_api_key_is_read_when_there_is_no_authorization_header,
    a_request_without_a_key_is_401,
    malformed_unknown_revoked_and_expired_keys_are_401,
    a_path_needing_a_scope_the_key_lacks_is_403,
    a_model_the_key_may_not_use_is_403,
    a_client_outside_the_key_network_is_403,
    a_key_over_its_rate_limit_is_429_with_retry_after,
    a_key_over_its_budget_is_429,
    hostile_header_values_get_a_clean_401,
    only_callers_with_the_verifier_role_may_check,
);

/// A deployment that turns ext_authz off does not serve it (the service is configuration,
/// not storage: one backend is enough).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_ext_authz_is_not_served() {
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.ext_authz = Arc::new(ExtAuthzSettings {
            enabled: false,
            ..ExtAuthzSettings::default()
        })
    })
    .await;
    let err = client(&app, VERIFIER_TOKEN)
        .check(request("/v1/chat", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    let (listed, _) = reflect(&app, "keywarden.v1.VerifyService").await;
    assert!(
        !listed.iter().any(|s| s == AUTHORIZATION),
        "reflection lists a service not served: {listed:?}"
    );
}

const AUTHORIZATION: &str = "envoy.service.auth.v3.Authorization";

/// Asks reflection (v1alpha, as grpcurl does) for the services it lists and for the files
/// that define `symbol`, then, as grpcurl does, for every file those import, by name, to
/// the last: the names of every file it answered, or the first error.
async fn reflect(app: &TestApp, symbol: &str) -> (Vec<String>, Result<Vec<String>, tonic::Status>) {
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let listed = match ask_reflection(app, MessageRequest::ListServices(String::new()))
        .await
        .unwrap()
    {
        MessageResponse::ListServicesResponse(list) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("not a list of services: {other:?}"),
    };
    let mut names: Vec<String> = Vec::new();
    let mut wanted = vec![MessageRequest::FileContainingSymbol(symbol.to_owned())];
    while let Some(request) = wanted.pop() {
        let files = match ask_reflection(app, request).await {
            Err(status) => return (listed, Err(status)),
            Ok(MessageResponse::FileDescriptorResponse(files)) => files.file_descriptor_proto,
            Ok(MessageResponse::ErrorResponse(e)) => {
                return (
                    listed,
                    Err(tonic::Status::new(
                        tonic::Code::from(e.error_code),
                        e.error_message,
                    )),
                );
            }
            Ok(other) => panic!("not a file answer: {other:?}"),
        };
        for bytes in files {
            use prost::Message as _;
            let file = prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap();
            if names.iter().any(|n| n == file.name()) {
                continue;
            }
            names.push(file.name().to_owned());
            for import in &file.dependency {
                if !names.contains(import) {
                    wanted.push(MessageRequest::FileByFilename(import.clone()));
                }
            }
        }
    }
    (listed, Ok(names))
}

async fn ask_reflection(
    app: &TestApp,
    message: tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest,
) -> Result<tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse, tonic::Status>
{
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    let mut answers = ServerReflectionClient::new(app.channel.clone())
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    match answers.message().await {
        Ok(Some(answer)) => Ok(answer.message_response.unwrap()),
        Ok(None) => panic!("no reflection answer"),
        Err(status) => Err(status),
    }
}

/// grpcurl can describe and call Check with no Envoy protos at hand: reflection lists the
/// service and answers its file and every file it imports, to the last; and it knows the error
/// details Keywarden's refusals carry, so grpcurl prints an ErrorInfo instead of "not
/// recognized" and a base64 blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_describes_check_and_the_error_details() {
    let app = spawn(Backend::Sqlite).await;
    let (listed, files) = reflect(&app, AUTHORIZATION).await;
    assert!(listed.iter().any(|s| s == AUTHORIZATION), "{listed:?}");
    let names = files.unwrap();
    for file in [
        "envoy/service/auth/v3/external_auth.proto",
        "envoy/config/core/v3/base.proto",
        "validate/validate.proto",
        "google/rpc/status.proto",
    ] {
        assert!(
            names.iter().any(|n| n == file),
            "{file} not answered: {names:?}"
        );
    }
    // tonic-types names the file `error_details.proto`; a client finds it by symbol.
    for symbol in [
        "google.rpc.ErrorInfo",
        "google.rpc.BadRequest",
        "google.rpc.RetryInfo",
        "google.rpc.PreconditionFailure",
    ] {
        let (_, files) = reflect(&app, symbol).await;
        let names = files.unwrap_or_else(|e| panic!("{symbol}: {e:?}"));
        assert!(
            names.iter().any(|n| n.ends_with("error_details.proto")),
            "{symbol}: {names:?}"
        );
    }
    let (_, unknown) = reflect(&app, "google.rpc.NoSuchThing").await;
    assert!(unknown.is_err(), "reflection knows only what it was given");
}

/// The code block of `lang` in `docs/envoy.md`.
fn doc_block(lang: &str) -> String {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/envoy.md")).unwrap();
    let start = doc.find(&format!("```{lang}\n")).unwrap() + lang.len() + 4;
    let len = doc[start..].find("```").unwrap();
    doc[start..start + len].to_owned()
}

/// The Envoy configuration in the docs is YAML with the settings the check relies on.
#[test]
fn the_documented_envoy_filter_fails_closed_and_sends_the_verifier_token() {
    let config: serde_norway::Value = serde_norway::from_str(&doc_block("yaml")).unwrap();
    let hcm = &config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let filter = &hcm["http_filters"][0];
    assert_eq!(
        filter["name"].as_str(),
        Some("envoy.filters.http.ext_authz")
    );
    let authz = &filter["typed_config"];
    assert_eq!(authz["transport_api_version"].as_str(), Some("V3"));
    assert_eq!(authz["failure_mode_allow"].as_bool(), Some(false));
    let grpc = &authz["grpc_service"];
    assert_eq!(
        grpc["envoy_grpc"]["cluster_name"].as_str(),
        Some("keywarden")
    );
    let metadata = &grpc["initial_metadata"][0];
    assert_eq!(metadata["key"].as_str(), Some("authorization"));
    assert!(metadata["value"].as_str().unwrap().starts_with("Bearer "));
    let clusters = config["static_resources"]["clusters"]
        .as_sequence()
        .unwrap();
    assert!(
        clusters
            .iter()
            .any(|c| c["name"].as_str() == Some("keywarden"))
    );
}

/// The Keywarden configuration in the docs loads and means what the docs say.
#[test]
fn the_documented_keywarden_section_loads() {
    use figment::Figment;
    use figment::providers::{Format, Toml};
    let toml = format!("database_url = \"sqlite::memory:\"\n{}", doc_block("toml"));
    let config: keywarden::config::Config =
        Figment::new().merge(Toml::string(&toml)).extract().unwrap();
    let s = config.into_settings().unwrap().ext_authz;
    assert_eq!(s.resource_header.as_deref(), Some("x-model"));
    assert_eq!(s.routes.required_for("/v1/admin/keys"), ["admin"]);
    assert_eq!(s.routes.required_for("/v1/chat"), ["read"]);
    assert!(s.routes.required_for("/v1/public/status").is_empty());
}
