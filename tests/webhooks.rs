//! Webhooks end to end: a real HTTP receiver started in the test, the real server on
//! each store, signatures checked as a receiver would check them, time moved with the
//! manual clock (never slept on).

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use common::*;
use keywarden::domain::webhook::{self, WebhookUrl};
use keywarden::proto::webhook_service_client::WebhookServiceClient;
use keywarden::proto::{self};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type WebhookClient = WebhookServiceClient<InterceptedService<Channel, Bearer>>;

const ALL_TYPES: &[&str] = &[
    "key.issued",
    "key.revoked",
    "key.rotated",
    "key.deleted",
    "key.leaked",
    "key.expiring",
    "key.budget_threshold",
];

/// How the receiver answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ok,
    /// 500 for the first N requests, then 200.
    FailFirst(usize),
    AlwaysFail,
    /// Never answers.
    Hang,
}

#[derive(Clone, Debug)]
struct Delivery {
    id_header: String,
    signature: String,
    body: Vec<u8>,
}

impl Delivery {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn event_type(&self) -> String {
        self.json()["type"].as_str().unwrap().to_owned()
    }

    fn id(&self) -> String {
        self.json()["id"].as_str().unwrap().to_owned()
    }
}

#[derive(Default)]
struct Seen {
    /// Requests answered 2xx, in arrival order.
    ok: Vec<Delivery>,
    /// Every request, answered or not.
    attempts: usize,
}

#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    mode: Mode,
    seen: Arc<Mutex<Seen>>,
}

impl Receiver {
    async fn start(mode: Mode) -> Receiver {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let rx = Receiver { addr, mode, seen };
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(rx.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        rx
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn ok(&self) -> Vec<Delivery> {
        self.seen.lock().unwrap().ok.clone()
    }

    fn attempts(&self) -> usize {
        self.seen.lock().unwrap().attempts
    }
}

async fn receive(State(rx): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let attempt = {
        let mut seen = rx.seen.lock().unwrap();
        seen.attempts += 1;
        seen.attempts
    };
    let fail = match rx.mode {
        Mode::Ok => false,
        Mode::FailFirst(n) => attempt <= n,
        Mode::AlwaysFail => true,
        Mode::Hang => {
            std::future::pending::<()>().await;
            true
        }
    };
    if fail {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    rx.seen.lock().unwrap().ok.push(Delivery {
        id_header: header(webhook::ID_HEADER),
        signature: header(webhook::SIGNATURE_HEADER),
        body: body.to_vec(),
    });
    StatusCode::OK
}

fn webhooks(app: &TestApp) -> WebhookClient {
    webhooks_with(app, ADMIN_TOKEN)
}

fn webhooks_with(app: &TestApp, token: &str) -> WebhookClient {
    WebhookServiceClient::with_interceptor(app.channel.clone(), bearer(token))
}

fn create_request(workspace_id: &str, url: &str, types: &[&str]) -> proto::CreateWebhookRequest {
    proto::CreateWebhookRequest {
        workspace_id: workspace_id.to_owned(),
        url: url.to_owned(),
        event_types: types.iter().map(|t| t.to_string()).collect(),
        actor: Some(actor()),
    }
}

async fn create(app: &TestApp, url: &str, types: &[&str]) -> proto::CreateWebhookResponse {
    webhooks(app)
        .create_webhook(create_request("ws_test", url, types))
        .await
        .unwrap()
        .into_inner()
}

async fn list(app: &TestApp) -> Vec<proto::Webhook> {
    webhooks(app)
        .list_webhooks(proto::ListWebhooksRequest {
            workspace_id: "ws_test".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .webhooks
}

/// Checks a delivery as a receiver would: the signature over the raw body with the
/// secret, at the server's (manual) clock, and the id header against the body's id.
fn assert_signed(d: &Delivery, secret: &str, app: &TestApp) {
    let now = app.clock.now() / 1_000_000;
    assert!(
        webhook::verify(secret.as_bytes(), &d.signature, &d.body, now, 300),
        "bad signature {} on {}",
        d.signature,
        String::from_utf8_lossy(&d.body)
    );
    assert_eq!(d.id_header, d.id());
}

async fn rotate(app: &TestApp, key_id: &str) {
    app.admin()
        .rotate_key(proto::RotateKeyRequest {
            key_id: key_id.to_owned(),
            actor: Some(actor()),
            grace_period: None,
        })
        .await
        .unwrap();
}

async fn revoke(app: &TestApp, key_id: &str) {
    app.admin()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: key_id.to_owned(),
            actor: Some(actor()),
            reason: "test".to_owned(),
        })
        .await
        .unwrap();
}

async fn delete(app: &TestApp, key_id: &str) {
    app.admin()
        .delete_key(proto::DeleteKeyRequest {
            key_id: key_id.to_owned(),
            actor: Some(actor()),
        })
        .await
        .unwrap();
}

async fn webhooks_arrive_in_order_with_valid_signatures(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let rx = Receiver::start(Mode::Ok).await;
    let created = create(&app, &rx.url(), ALL_TYPES).await;
    let secret = created.signing_secret.clone();
    assert!(secret.starts_with("whsec_"), "{secret}");
    let issued = app.issue().await;
    let key_id = issued.key_info.unwrap().key_id;
    rotate(&app, &key_id).await;
    revoke(&app, &key_id).await;
    // Revoking a revoked key changes nothing, and announces nothing.
    revoke(&app, &key_id).await;
    delete(&app, &key_id).await;
    // The background delivery, no poll asked for.
    eventually("four deliveries", async || rx.ok().len() >= 4).await;
    let got = rx.ok();
    assert_eq!(
        got.iter().map(Delivery::event_type).collect::<Vec<_>>(),
        ["key.issued", "key.rotated", "key.revoked", "key.deleted"]
    );
    let mut ids = Vec::new();
    for d in &got {
        assert_signed(d, &secret, &app);
        let body = d.json();
        assert_eq!(body["workspace_id"], "ws_test");
        assert_eq!(body["data"]["key"]["key_id"], key_id.as_str());
        // Never a secret: neither the key nor the signing secret.
        let text = String::from_utf8_lossy(&d.body);
        assert!(!text.contains(&issued.key), "{text}");
        assert!(!text.contains(&secret), "{text}");
        ids.push(d.id());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "every event has its own id");
    // A signature under another secret does not verify.
    assert!(!webhook::verify(
        b"whsec_other",
        &got[0].signature,
        &got[0].body,
        app.clock.now() / 1_000_000,
        300
    ));
}

async fn a_receiver_failing_three_times_gets_every_event_in_order(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let rx = Receiver::start(Mode::FailFirst(3)).await;
    let created = create(&app, &rx.url(), &["key.issued", "key.revoked"]).await;
    let mut expected = Vec::new();
    for _ in 0..3 {
        let k = app.issue().await.key_info.unwrap().key_id;
        expected.push(("key.issued".to_owned(), k));
    }
    revoke(&app, &expected[0].1.clone()).await;
    expected.push(("key.revoked".to_owned(), expected[0].1.clone()));
    // Each poll retries once the backoff has passed: move the clock past it.
    for _ in 0..20 {
        app.server().poll_webhooks().await;
        if rx.ok().len() >= expected.len() {
            break;
        }
        app.clock.advance(std::time::Duration::from_secs(3600));
    }
    assert!(rx.attempts() >= 4, "three failures, then success");
    let got = rx.ok();
    let mut seen: Vec<(String, String)> = got
        .iter()
        .map(|d| {
            assert_signed(d, &created.signing_secret, &app);
            (
                d.event_type(),
                d.json()["data"]["key"]["key_id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    // At least once: a repeat is allowed, never a reordering or a gap.
    seen.dedup();
    assert_eq!(seen, expected);
    let state = list(&app).await;
    assert_eq!(state[0].failures, 0, "a success clears the failures");
    assert!(state[0].disabled_at.is_none());
}

async fn expiry_notices_go_out_once_per_lead_time(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let rx = Receiver::start(Mode::Ok).await;
    create(&app, &rx.url(), &["key.expiring"]).await;
    let key_id = app
        .issue_with(|r| r.expires_at = Some(ts_in(&app.clock, 10 * 24 * 3600)))
        .await
        .key_info
        .unwrap()
        .key_id;
    let notices = || {
        rx.ok()
            .iter()
            .filter(|d| d.event_type() == "key.expiring")
            .map(|d| d.json()["data"]["lead_seconds"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    app.server().poll_webhooks().await;
    assert!(notices().is_empty(), "ten days ahead: none due");
    // Three days on: seven days left, the 7-day notice.
    app.clock
        .advance(std::time::Duration::from_secs(3 * 24 * 3600));
    app.server().poll_webhooks().await;
    assert_eq!(notices(), [7 * 24 * 3600]);
    // Polls and time within the same lead send nothing more.
    app.clock.advance(std::time::Duration::from_secs(24 * 3600));
    app.server().poll_webhooks().await;
    app.server().poll_webhooks().await;
    assert_eq!(notices(), [7 * 24 * 3600]);
    // One day left: the 1-day notice, once.
    app.clock
        .advance(std::time::Duration::from_secs(5 * 24 * 3600));
    app.server().poll_webhooks().await;
    app.server().poll_webhooks().await;
    assert_eq!(notices(), [7 * 24 * 3600, 24 * 3600]);
    // Past the expiry: nothing.
    app.clock
        .advance(std::time::Duration::from_secs(2 * 24 * 3600));
    app.server().poll_webhooks().await;
    assert_eq!(notices(), [7 * 24 * 3600, 24 * 3600]);
    let last = rx.ok().pop().unwrap().json();
    assert_eq!(last["data"]["key"]["key_id"], key_id.as_str());
    assert!(last["data"]["expires_at"].as_i64().is_some());
    // A key issued with one day and a half left never saw its 7-day moment: it gets the
    // 1-day notice only.
    let soon = app
        .issue_with(|r| r.expires_at = Some(ts_in(&app.clock, 36 * 3600)))
        .await
        .key_info
        .unwrap()
        .key_id;
    app.server().poll_webhooks().await;
    assert_eq!(
        notices().len(),
        2,
        "the 7-day notice of a key with 36 hours left is not sent"
    );
    app.clock.advance(std::time::Duration::from_secs(13 * 3600));
    app.server().poll_webhooks().await;
    assert_eq!(notices()[2..], [24 * 3600]);
    assert_eq!(
        rx.ok().last().unwrap().json()["data"]["key"]["key_id"],
        soon.as_str()
    );
}

async fn report_and_flush(app: &TestApp, key_id: &str, spend: u64) {
    report_with(&app.verifier(), key_id, 0, spend)
        .await
        .unwrap();
    app.server().flush_usage().await;
}

async fn budget_thresholds_go_out_once_per_period(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let rx = Receiver::start(Mode::Ok).await;
    create(&app, &rx.url(), &["key.budget_threshold"]).await;
    let issued = app.issue_with(|r| r.max_budget_micros = Some(1_000)).await;
    let key_id = issued.key_info.unwrap().key_id;
    app.verify(&issued.key, &[]).await;
    let thresholds = || {
        rx.ok()
            .iter()
            .map(|d| d.json()["data"]["threshold_percent"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    report_and_flush(&app, &key_id, 700).await;
    app.server().poll_webhooks().await;
    assert!(thresholds().is_empty(), "70%: none");
    report_and_flush(&app, &key_id, 150).await;
    app.server().poll_webhooks().await;
    app.server().poll_webhooks().await;
    assert_eq!(thresholds(), [80]);
    report_and_flush(&app, &key_id, 200).await;
    app.server().poll_webhooks().await;
    app.server().poll_webhooks().await;
    assert_eq!(thresholds(), [80, 100]);
    let last = rx.ok().pop().unwrap().json();
    assert_eq!(last["data"]["spent_micros"], 1_050);
    assert_eq!(last["data"]["max_budget_micros"], 1_000);
    // A new period: each threshold once more.
    app.clock.advance(std::time::Duration::from_secs(1));
    app.admin()
        .reset_budget(proto::ResetBudgetRequest {
            key_id: key_id.clone(),
            actor: Some(actor()),
        })
        .await
        .unwrap();
    app.server().poll_webhooks().await;
    assert_eq!(thresholds(), [80, 100], "nothing spent in the new period");
    // The replica judges (and counts) the key in its new period from its next VerifyKey.
    app.verify(&issued.key, &[]).await;
    report_and_flush(&app, &key_id, 900).await;
    app.server().poll_webhooks().await;
    app.server().poll_webhooks().await;
    assert_eq!(thresholds(), [80, 100, 80]);
}

async fn an_endpoint_failing_for_24_hours_is_disabled_with_an_audit_row(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let rx = Receiver::start(Mode::AlwaysFail).await;
    let created = create(&app, &rx.url(), &["key.issued"]).await;
    let webhook_id = created.webhook.unwrap().webhook_id;
    app.issue().await;
    app.server().poll_webhooks().await;
    let first = list(&app).await.remove(0);
    assert_eq!(first.failures, 1);
    assert!(first.last_error.contains("500"), "{}", first.last_error);
    assert!(first.disabled_at.is_none());
    let mut hours = 0;
    while list(&app).await[0].disabled_at.is_none() {
        assert!(hours <= 30, "still enabled after {hours} hours of failures");
        app.clock.advance(std::time::Duration::from_secs(2 * 3600));
        hours += 2;
        app.server().poll_webhooks().await;
    }
    assert!(hours >= 24, "disabled after {hours} hours, before 24");
    let audit = app.audit("ws_test").await;
    let disabled: Vec<_> = audit
        .iter()
        .filter(|e| e.action == "webhook.disabled")
        .collect();
    assert_eq!(disabled.len(), 1, "{audit:?}");
    assert!(disabled[0].detail.contains(&webhook_id));
    // Nothing more is tried.
    let attempts = rx.attempts();
    app.clock.advance(std::time::Duration::from_secs(48 * 3600));
    app.issue().await;
    app.server().poll_webhooks().await;
    assert_eq!(rx.attempts(), attempts);
}

async fn undelivered_events_survive_a_restart(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let rx = Receiver::start(Mode::FailFirst(1)).await;
    let created = create(&app, &rx.url(), &["key.issued"]).await;
    let key_id = app.issue().await.key_info.unwrap().key_id;
    app.server().poll_webhooks().await;
    assert_eq!(rx.attempts(), 1);
    assert!(rx.ok().is_empty());
    app.server.take().unwrap().shutdown().await.unwrap();
    // Another server on the same database: the outbox and the cursor were durable.
    let server = keywarden::server::start(&test_settings(&app.db), app.clock.clone())
        .await
        .unwrap();
    app.clock.advance(std::time::Duration::from_secs(3600));
    server.poll_webhooks().await;
    let got = rx.ok();
    assert_eq!(got.len(), 1);
    assert_signed(&got[0], &created.signing_secret, &app);
    assert_eq!(got[0].json()["data"]["key"]["key_id"], key_id.as_str());
    server.shutdown().await.unwrap();
}

async fn a_receiver_that_never_answers_slows_no_rpc(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let rx = Receiver::start(Mode::Hang).await;
    create(&app, &rx.url(), ALL_TYPES).await;
    let issued = app.issue().await;
    eventually("the delivery to hang", async || rx.attempts() >= 1).await;
    // While a delivery hangs, every RPC answers: delivery is off their path.
    let answer = app.verify(&issued.key, &[]).await;
    assert_eq!(code(&answer), proto::VerifyCode::Valid);
    let second = app.issue().await;
    revoke(&app, &second.key_info.unwrap().key_id).await;
    assert_eq!(list(&app).await.len(), 1);
}

async fn private_addresses_are_refused_unless_allowed(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.webhooks.allow_private = false).await;
    for url in [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://10.0.0.7/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "https://192.168.1.10/hook",
        // Forms resolvers read as 127.0.0.1.
        "http://2130706433/hook",
        "http://0x7f.1/hook",
    ] {
        let err = webhooks(&app)
            .create_webhook(create_request("ws_test", url, &["key.issued"]))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&err), ["url"], "{url}");
    }
    // A public name is accepted at creation (its addresses are judged at delivery).
    webhooks(&app)
        .create_webhook(create_request(
            "ws_test",
            "https://hooks.example.com/kw",
            &["key.issued"],
        ))
        .await
        .unwrap();
    assert!(
        app.audit("ws_test")
            .await
            .iter()
            .any(|e| e.action == "webhook.create")
    );
}

/// The delivery-time check: a name whose address is loopback is refused after it is
/// resolved, and nothing reaches the receiver.
#[tokio::test]
async fn delivery_refuses_a_name_that_resolves_to_a_private_address() {
    let rx = Receiver::start(Mode::Ok).await;
    let client =
        keywarden::webhooks::Client::new(false, std::time::Duration::from_secs(5)).unwrap();
    let url = WebhookUrl::parse(&format!("http://localhost:{}/hook", rx.addr.port())).unwrap();
    let err = client
        .post(&url, Bytes::from_static(b"{}"), &[])
        .await
        .unwrap_err();
    assert!(
        matches!(err, keywarden::webhooks::DeliveryError::PrivateAddress(_)),
        "{err}"
    );
    let literal = WebhookUrl::parse(&rx.url()).unwrap();
    assert!(
        client
            .post(&literal, Bytes::from_static(b"{}"), &[])
            .await
            .is_err()
    );
    assert_eq!(rx.attempts(), 0);
    // Allowed, the same delivery arrives.
    let allowed =
        keywarden::webhooks::Client::new(true, std::time::Duration::from_secs(5)).unwrap();
    allowed
        .post(&url, Bytes::from_static(b"{}"), &[])
        .await
        .unwrap();
    assert_eq!(rx.attempts(), 1);
}

async fn bad_requests_name_the_field(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let cases: Vec<(proto::CreateWebhookRequest, &str)> = vec![
        (
            create_request("ws_test", "ftp://example.com/", &["key.issued"]),
            "url",
        ),
        (create_request("ws_test", "", &["key.issued"]), "url"),
        (
            create_request("ws_test", "https://u:p@example.com/", &["key.issued"]),
            "url",
        ),
        (
            create_request(
                "ws_test",
                &format!("https://example.com/{}", "a".repeat(3000)),
                &["key.issued"],
            ),
            "url",
        ),
        (
            create_request("ws_test", "https://example.com/", &["key.exploded"]),
            "event_types[0]",
        ),
        (
            create_request("ws_test", "https://example.com/", &[]),
            "event_types",
        ),
        (
            create_request(
                "ws_test",
                "https://example.com/",
                &["key.issued", "key.issued"],
            ),
            "event_types[1]",
        ),
        (
            create_request("", "https://example.com/", &["key.issued"]),
            "workspace_id",
        ),
        (
            create_request(&"w".repeat(100), "https://example.com/", &["key.issued"]),
            "workspace_id",
        ),
    ];
    for (request, field) in cases {
        let err = webhooks(&app).create_webhook(request).await.unwrap_err();
        assert_eq!(violated_fields(&err), [field]);
    }
    let mut no_actor = create_request("ws_test", "https://example.com/", &["key.issued"]);
    no_actor.actor = None;
    let err = webhooks(&app).create_webhook(no_actor).await.unwrap_err();
    assert_eq!(violated_fields(&err), ["actor"]);
    // Nothing was written by any of them.
    assert!(list(&app).await.is_empty());
    assert!(
        !app.audit("ws_test")
            .await
            .iter()
            .any(|e| e.action.starts_with("webhook."))
    );
    // A workspace that does not exist.
    let err = webhooks(&app)
        .create_webhook(create_request(
            "ws_nope",
            "https://example.com/",
            &["key.issued"],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(reason(&err), "WORKSPACE_NOT_FOUND");
    // Delete and rotate: the id's shape, then its existence.
    let err = webhooks(&app)
        .delete_webhook(proto::DeleteWebhookRequest {
            workspace_id: "ws_test".into(),
            webhook_id: "nope".into(),
            actor: Some(actor()),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["webhook_id"]);
    let missing = keywarden::domain::ids::new_webhook_id(&mut getrandom::SysRng).unwrap();
    let err = webhooks(&app)
        .rotate_webhook_secret(proto::RotateWebhookSecretRequest {
            workspace_id: "ws_test".into(),
            webhook_id: missing,
            actor: Some(actor()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(reason(&err), "WEBHOOK_NOT_FOUND");
}

async fn only_admins_manage_webhooks(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for token in [VERIFIER_TOKEN, EDGE_TOKEN, RESOLVER_TOKEN] {
        let err = webhooks_with(&app, token)
            .create_webhook(create_request(
                "ws_test",
                "https://example.com/",
                &["key.issued"],
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let err = webhooks_with(&app, token)
            .list_webhooks(proto::ListWebhooksRequest {
                workspace_id: "ws_test".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }
    let err = webhooks_with(&app, "not-a-token")
        .list_webhooks(proto::ListWebhooksRequest {
            workspace_id: "ws_test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
}

async fn secrets_are_shown_once_and_never_listed_or_stored(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let rx = Receiver::start(Mode::Ok).await;
    let created = create(&app, &rx.url(), &["key.issued", "key.revoked"]).await;
    let webhook = created.webhook.unwrap();
    let first = created.signing_secret;
    let listed = list(&app).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].webhook_id, webhook.webhook_id);
    assert_eq!(listed[0].url, rx.url());
    assert_eq!(listed[0].event_types, ["key.issued", "key.revoked"]);
    assert!(!format!("{listed:?}").contains(&first));
    assert!(
        !app.db.dump_text().await.contains(&first),
        "stored in the clear"
    );
    // Rotate: a new secret signs what follows, the old one nothing.
    let rotated = webhooks(&app)
        .rotate_webhook_secret(proto::RotateWebhookSecretRequest {
            workspace_id: "ws_test".into(),
            webhook_id: webhook.webhook_id.clone(),
            actor: Some(actor()),
        })
        .await
        .unwrap()
        .into_inner();
    let second = rotated.signing_secret;
    assert_ne!(first, second);
    assert!(!app.db.dump_text().await.contains(&second));
    app.issue().await;
    app.server().poll_webhooks().await;
    let got = rx.ok();
    assert_eq!(got.len(), 1);
    assert_signed(&got[0], &second, &app);
    assert!(!webhook::verify(
        first.as_bytes(),
        &got[0].signature,
        &got[0].body,
        app.clock.now() / 1_000_000,
        300
    ));
    // Delete: listed no more, delivered to no more, audited.
    webhooks(&app)
        .delete_webhook(proto::DeleteWebhookRequest {
            workspace_id: "ws_test".into(),
            webhook_id: webhook.webhook_id.clone(),
            actor: Some(actor()),
        })
        .await
        .unwrap();
    assert!(list(&app).await.is_empty());
    app.issue().await;
    app.server().poll_webhooks().await;
    assert_eq!(rx.ok().len(), 1);
    let actions: Vec<String> = app
        .audit("ws_test")
        .await
        .into_iter()
        .map(|e| e.action)
        .filter(|a| a.starts_with("webhook."))
        .collect();
    assert_eq!(
        actions,
        ["webhook.delete", "webhook.rotate_secret", "webhook.create"]
    );
    for e in app.audit("ws_test").await {
        assert!(!e.detail.contains(&first) && !e.detail.contains(&second));
    }
}

async fn a_leaked_key_announces_its_revocation_and_the_leak(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let rx = Receiver::start(Mode::Ok).await;
    create(&app, &rx.url(), &["key.revoked", "key.leaked"]).await;
    let issued = app.issue().await;
    app.admin()
        .report_leaked_key(proto::ReportLeakedKeyRequest {
            key: issued.key.clone(),
            source_url: "https://gist.example.com/x".into(),
            actor: Some(actor()),
        })
        .await
        .unwrap();
    app.server().poll_webhooks().await;
    let got = rx.ok();
    assert_eq!(
        got.iter().map(Delivery::event_type).collect::<Vec<_>>(),
        ["key.revoked", "key.leaked"]
    );
    assert_eq!(got[1].json()["data"]["key"]["revoke_reason"], "leaked");
    assert!(!String::from_utf8_lossy(&got[1].body).contains(&issued.key));
}

async fn a_workspace_has_at_most_twenty_endpoints(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for i in 0..20 {
        webhooks(&app)
            .create_webhook(create_request(
                "ws_test",
                &format!("https://hooks.example.com/{i}"),
                &["key.issued"],
            ))
            .await
            .unwrap();
    }
    let err = webhooks(&app)
        .create_webhook(create_request(
            "ws_test",
            "https://hooks.example.com/x",
            &["key.issued"],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&err), "WEBHOOK_LIMIT_REACHED");
    assert_eq!(list(&app).await.len(), 20);
    // A refusal by policy is audited as denied, and writes nothing else.
    let audit = app.audit("ws_test").await;
    let denied: Vec<_> = audit
        .iter()
        .filter(|e| e.outcome == proto::AuditOutcome::Denied as i32)
        .collect();
    assert_eq!(denied.len(), 1, "{audit:?}");
    assert_eq!(denied[0].action, "webhook.create");
    // Another workspace counts its own.
    webhooks(&app)
        .create_webhook(create_request(
            "ws_a",
            "https://hooks.example.com/a",
            &["key.issued"],
        ))
        .await
        .unwrap();
}

async fn without_a_kek_no_endpoint_is_created(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.keks.clear()).await;
    let err = webhooks(&app)
        .create_webhook(create_request(
            "ws_test",
            "https://example.com/",
            &["key.issued"],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&err), "KEK_NOT_CONFIGURED");
    assert!(list(&app).await.is_empty());
}

/// Two replicas on one Postgres, both polling: one holds the delivery lock, so each
/// event is delivered once, in order (the lock is what keeps two from sending the same
/// endpoint's events at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_deliver_each_event_once_in_order() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let _second = Replica::start(&app, |_| {}).await;
    let rx = Receiver::start(Mode::Ok).await;
    create(&app, &rx.url(), &["key.issued"]).await;
    let mut expected = Vec::new();
    for _ in 0..8 {
        expected.push(app.issue().await.key_info.unwrap().key_id);
    }
    eventually("eight deliveries", async || rx.ok().len() >= 8).await;
    // A little more time for a duplicate to show, if one were coming: bounded polls.
    for _ in 0..5 {
        app.server().poll_webhooks().await;
    }
    let got: Vec<String> = rx
        .ok()
        .iter()
        .map(|d| {
            d.json()["data"]["key"]["key_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(got, expected);
}

/// A KEK rotation covers webhook secrets: rewrapped by RewrapProviderKeys, the old KEK
/// can go, and deliveries are still signed with the same secret.
async fn webhook_secrets_follow_a_kek_rotation(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let rx = Receiver::start(Mode::Ok).await;
    let created = create(&app, &rx.url(), &["key.issued"]).await;
    app.server.take().unwrap().shutdown().await.unwrap();
    let kek = |v: u8| {
        (
            u32::from(v),
            keywarden::config::KekMaterial::Raw(zeroize::Zeroizing::new([v; 32])),
        )
    };
    let mut both = test_settings(&app.db);
    both.keks = vec![kek(1), kek(2)];
    let server = keywarden::server::start(&both, app.clock.clone())
        .await
        .unwrap();
    let channel = channel_to(&server).await;
    let rewrapped =
        keywarden::proto::provider_key_service_client::ProviderKeyServiceClient::with_interceptor(
            channel,
            bearer(ADMIN_TOKEN),
        )
        .rewrap_provider_keys(proto::RewrapProviderKeysRequest {
            actor: Some(actor()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((rewrapped.rewrapped, rewrapped.kek_version), (1, 2));
    server.shutdown().await.unwrap();
    // Only the new KEK: the server starts (nothing needs the old one) and signs.
    let mut only_new = test_settings(&app.db);
    only_new.keks = vec![kek(2)];
    let server = keywarden::server::start(&only_new, app.clock.clone())
        .await
        .unwrap();
    app.channel = channel_to(&server).await;
    app.issue().await;
    server.poll_webhooks().await;
    let got = rx.ok();
    assert_eq!(got.len(), 1);
    assert_signed(&got[0], &created.signing_secret, &app);
    server.shutdown().await.unwrap();
}

async fn scrape(app: &TestApp) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app.server().metrics_addr().expect("metrics are on");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

fn metric_line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find(|l| l.starts_with(prefix))
}

async fn deliveries_and_the_oldest_undelivered_event_are_measured(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.metrics_listen = Some("127.0.0.1:0".parse().unwrap())
    })
    .await;
    let rx = Receiver::start(Mode::FailFirst(1)).await;
    create(&app, &rx.url(), &["key.issued"]).await;
    app.issue().await;
    app.server().poll_webhooks().await;
    app.clock.advance(std::time::Duration::from_secs(600));
    // A poll reads the age before the retry succeeds, and the next one after.
    app.server().poll_webhooks().await;
    let text = scrape(&app).await;
    assert_eq!(
        metric_line(
            &text,
            "keywarden_webhook_deliveries_total{outcome=\"failed\"}"
        ),
        Some("keywarden_webhook_deliveries_total{outcome=\"failed\"} 1"),
        "{text}"
    );
    assert_eq!(
        metric_line(
            &text,
            "keywarden_webhook_deliveries_total{outcome=\"delivered\"}"
        ),
        Some("keywarden_webhook_deliveries_total{outcome=\"delivered\"} 1")
    );
    app.server().poll_webhooks().await;
    let text = scrape(&app).await;
    assert_eq!(
        metric_line(&text, "keywarden_webhook_oldest_undelivered_seconds "),
        Some("keywarden_webhook_oldest_undelivered_seconds 0"),
        "nothing waits after the delivery: {text}"
    );
    // An event that cannot be delivered ages with the clock.
    let failing = Receiver::start(Mode::AlwaysFail).await;
    create(&app, &failing.url(), &["key.issued"]).await;
    app.issue().await;
    app.server().poll_webhooks().await;
    app.clock.advance(std::time::Duration::from_secs(30));
    app.server().poll_webhooks().await;
    let text = scrape(&app).await;
    let age: f64 = metric_line(&text, "keywarden_webhook_oldest_undelivered_seconds ")
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(age >= 30.0, "{age}");
}

/// The README's Python receiver, as printed, against real deliveries: it accepts what
/// Keywarden signs (and prints each event once) and refuses a forged signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_receiver_checks_real_deliveries() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("```python\n# receiver.py")
        .expect("the receiver in README.md");
    let code = &readme[start + "```python\n".len()..];
    let code = &code[..code.find("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("receiver.py");
    std::fs::write(&script, code).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = TestApp::spawn(Backend::Sqlite).await;
    let created = create(
        &app,
        &format!("http://127.0.0.1:{port}/keywarden"),
        &["key.revoked"],
    )
    .await;
    let mut receiver = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(&created.signing_secret)
        .arg(port.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs the README's receiver");
    eventually("the receiver to listen", async || {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    // The receiver checks `t` against its own clock: the test's manual clock started at
    // the real time moments ago and has not been moved.
    let key_id = app.issue().await.key_info.unwrap().key_id;
    revoke(&app, &key_id).await;
    app.server().poll_webhooks().await;
    let state = list(&app).await.remove(0);
    assert_eq!(
        state.failures, 0,
        "the receiver refused: {}",
        state.last_error
    );
    // A forged signature is refused (400).
    let client = keywarden::webhooks::Client::new(true, std::time::Duration::from_secs(5)).unwrap();
    let url = WebhookUrl::parse(&format!("http://127.0.0.1:{port}/keywarden")).unwrap();
    let forged = client
        .post(
            &url,
            Bytes::from_static(
                br#"{"id":"evt_x","type":"key.revoked","data":{"key":{"key_id":"k"}}}"#,
            ),
            &[(webhook::SIGNATURE_HEADER, "t=1,v1=00".to_owned())],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(forged, keywarden::webhooks::DeliveryError::Status(400)),
        "{forged}"
    );
    receiver.kill().await.unwrap();
    let mut printed = String::new();
    use tokio::io::AsyncReadExt;
    receiver
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut printed)
        .await
        .unwrap();
    assert_eq!(printed, format!("key.revoked {key_id}\n"));
}

/// The replica holding the delivery lock goes away: another takes the lock over at its
/// next poll and delivers what follows, from the durable cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replica_takes_delivery_over() {
    let mut app = TestApp::spawn(Backend::Postgres).await;
    let rx = Receiver::start(Mode::Ok).await;
    create(&app, &rx.url(), &["key.issued"]).await;
    // The first replica holds the lock before the second starts.
    eventually("the first replica to take the delivery lock", async || {
        app.db
            .count(
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .await
            == 1
    })
    .await;
    let second = Replica::start(&app, |_| {}).await;
    let first_key = app.issue().await.key_info.unwrap().key_id;
    eventually("the first delivery", async || rx.ok().len() == 1).await;
    app.server.take().unwrap().shutdown().await.unwrap();
    let admin = keywarden::proto::key_service_client::KeyServiceClient::with_interceptor(
        second.channel.clone(),
        bearer(ADMIN_TOKEN),
    );
    let second_key = admin
        .clone()
        .issue_key(issue_request("ws_test"))
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap()
        .key_id;
    eventually("the second replica to deliver", async || rx.ok().len() >= 2).await;
    let got: Vec<String> = rx
        .ok()
        .iter()
        .map(|d| {
            d.json()["data"]["key"]["key_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(got, [first_key, second_key]);
}

both_backends!(
    a_workspace_has_at_most_twenty_endpoints,
    deliveries_and_the_oldest_undelivered_event_are_measured,
    webhook_secrets_follow_a_kek_rotation,
    without_a_kek_no_endpoint_is_created,
    webhooks_arrive_in_order_with_valid_signatures,
    a_receiver_failing_three_times_gets_every_event_in_order,
    expiry_notices_go_out_once_per_lead_time,
    budget_thresholds_go_out_once_per_period,
    an_endpoint_failing_for_24_hours_is_disabled_with_an_audit_row,
    undelivered_events_survive_a_restart,
    a_receiver_that_never_answers_slows_no_rpc,
    private_addresses_are_refused_unless_allowed,
    bad_requests_name_the_field,
    only_admins_manage_webhooks,
    secrets_are_shown_once_and_never_listed_or_stored,
    a_leaked_key_announces_its_revocation_and_the_leak,
);
