//! Leaked keys revoke themselves: a secret scanner's signed report (curl, against the
//! `[http]` listener of a real server on both stores) revokes every live key it names,
//! audited with the scanner as actor and streamed to edge nodes, and labels each token;
//! a report that is not signed by a configured key, too large, malformed or over the
//! scanner's rate is refused whole and changes nothing; repeating a report is harmless.
//! `KeyService.ReportLeakedKey` does the same for a key a person found.

mod common;

use std::process::Stdio;

use tokio::io::AsyncWriteExt as _;

use base64::Engine as _;
use common::*;
use keywarden::config::{HttpSettings, ScannerSettings};
use keywarden::domain::key_format::KeyHash;
use keywarden::proto::{self, VerifyCode};
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use serde_json::{Value, json};
use tonic::Code;

const SCANNER_KEY_ID: &str = "scanner-key-1";

/// The scanner's key, fixed so the test needs no randomness.
fn scanner_key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32].into()).unwrap()
}

/// A server whose `[http]` listener takes reports signed by [`scanner_key`], at most
/// `per_minute` a minute.
async fn spawn(backend: Backend, per_minute: u64) -> TestApp {
    TestApp::spawn_with(backend, move |s| {
        s.http = HttpSettings {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            scanners: vec![ScannerSettings {
                name: "github".into(),
                key_id: SCANNER_KEY_ID.into(),
                key: *scanner_key().verifying_key(),
                reports_per_minute: per_minute,
            }],
        };
    })
    .await
}

fn sign(key: &SigningKey, body: &[u8]) -> String {
    let signature: Signature = key.sign(body);
    base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes())
}

/// POSTs `body` to the scanning endpoint with curl, with these headers: the status and
/// the body. (Run as a child process the runtime awaits: the server under test shares
/// the test's workers, so the test never blocks one.)
async fn post(app: &TestApp, body: &[u8], headers: &[String]) -> (u16, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("body");
    let url = format!(
        "http://{}/v1/secret-scanning/reports",
        app.server().http_addr().unwrap()
    );
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "-X", "POST", "--data-binary", "@-", "-o"])
        .arg(&out)
        .args(["-w", "%{http_code}", "-H", "content-type: application/json"]);
    for h in headers {
        cmd.arg("-H").arg(h);
    }
    let mut child = cmd
        .arg(url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(body).await.unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    let status = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap();
    (status, std::fs::read(out).unwrap_or_default())
}

/// A report signed by the scanner's key: the status and the labels by token hash.
async fn report(app: &TestApp, tokens: &[&str]) -> (u16, Vec<(String, String)>) {
    let body = json!(
        tokens
            .iter()
            .map(|t| json!({"token": t, "type": "keywarden_api_key", "url": "https://github.com/acme/app/blob/main/.env", "source": "content"}))
            .collect::<Vec<_>>()
    )
    .to_string();
    let (status, answer) = post(
        app,
        body.as_bytes(),
        &[
            format!("github-public-key-identifier: {SCANNER_KEY_ID}"),
            format!(
                "github-public-key-signature: {}",
                sign(&scanner_key(), body.as_bytes())
            ),
        ],
    )
    .await;
    let labels = serde_json::from_slice::<Value>(&answer)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|l| {
            (
                l["token_hash"].as_str().unwrap_or_default().to_owned(),
                l["label"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    (status, labels)
}

async fn leaked(app: &TestApp) -> Vec<proto::AuditEvent> {
    app.audit("ws_test")
        .await
        .into_iter()
        .filter(|e| e.action == "key.leaked")
        .collect()
}

/// The issue's case: a live key in a report is revoked at once (reason `leaked`, the
/// scanner the actor, the URL recorded, a REVOKED event on the stream, the cached answer
/// gone); a key revoked already and a key of ours are true positives; an invented token
/// and a well-formed key of nobody are false positives; the answer echoes no token.
async fn a_scanners_report_revokes_the_live_keys_it_names(backend: Backend) {
    let app = spawn(backend, 60).await;
    let live = app.issue().await;
    let dead = app.issue().await;
    let dead_id = dead.key_info.as_ref().unwrap().key_id.clone();
    app.admin()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: dead_id.clone(),
            actor: Some(actor()),
            reason: "rotated out".into(),
        })
        .await
        .unwrap();
    let live_id = live.key_info.as_ref().unwrap().key_id.clone();
    let verifier = app.verifier();
    assert!(verify_with(&verifier, &live.key, 1).await.valid, "cached");
    // An edge node's stream, on a connection of its own (unread until the end, it would
    // hold up a connection it shared).
    let mut stream = edge_client(channel_to(app.server()).await, EDGE_TOKEN)
        .watch_revocations(proto::WatchRevocationsRequest {
            after_seq: 0,
            workspace_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();

    // Same shape as a real key, last character changed: the checksum fails. (Changed to
    // another character than it was: one key in 62 ends in `x` already.)
    let (head, last) = live.key.split_at(live.key.len() - 1);
    let invented = format!("{head}{}", if last == "x" { "y" } else { "x" });
    let nobody = keywarden::domain::key_format::ApiKey::generate(
        &mut getrandom::SysRng,
        &keywarden::domain::key_format::Brand::default(),
        keywarden::domain::key_format::Environment::Live,
    )
    .unwrap();
    let nobody = nobody.expose();
    let (status, labels) = report(&app, &[&live.key, &dead.key, &invented, nobody]).await;
    assert_eq!(status, 200);
    let hash = |t: &str| KeyHash::of(t).to_hex();
    assert_eq!(
        labels,
        [
            (hash(&live.key), "true_positive".to_owned()),
            (hash(&dead.key), "true_positive".to_owned()),
            (hash(&invented), "false_positive".to_owned()),
            (hash(nobody), "false_positive".to_owned()),
        ]
    );
    let r = verify_with(&verifier, &live.key, 1).await;
    assert_eq!(
        code(&r),
        VerifyCode::Revoked,
        "revoked at once, cache included"
    );
    let info = app.key_info(&live_id).await;
    assert_eq!(info.revoke_reason, "leaked");
    let events = leaked(&app).await;
    assert_eq!(events.len(), 1, "the live key only: {events:?}");
    assert_eq!(events[0].actor_id, "scanner:github");
    assert_eq!(events[0].key_id, live_id);
    assert!(
        events[0]
            .detail
            .contains("https://github.com/acme/app/blob/main/.env")
    );
    assert!(
        !events[0].detail.contains(&live.key),
        "no key in the audit log"
    );
    let mut revoked_on_stream = Vec::new();
    while revoked_on_stream.is_empty() {
        let message = tokio::time::timeout(std::time::Duration::from_secs(10), stream.message())
            .await
            .expect("the stream carries the revocations")
            .unwrap()
            .unwrap();
        if let Some(proto::watch_revocations_response::Message::Event(e)) = message.message
            && e.kind() == proto::KeyEventKind::Revoked
        {
            revoked_on_stream.push(e.key_id);
        }
    }
    assert_eq!(
        revoked_on_stream,
        std::slice::from_ref(&live_id),
        "the leaked key's revocation"
    );

    // Again: the same labels, nothing more revoked or audited.
    let (status, again) = report(&app, &[&live.key, &dead.key, &invented, nobody]).await;
    assert_eq!((status, &again), (200, &labels));
    assert_eq!(
        leaked(&app).await.len(),
        1,
        "repeating a report is harmless"
    );
}

/// Refused whole, each with a 4xx, and nothing changed: no key identifier, an unknown
/// one, a signature of other bytes, a body over 1 MiB, a signed body that is not the
/// expected JSON, and a scanner over its reports per minute.
async fn bad_reports_are_refused_and_change_nothing(backend: Backend) {
    let app = spawn(backend, 3).await;
    let live = app.issue().await;
    let body = json!([{ "token": live.key, "type": "t", "url": "u", "source": "s" }]).to_string();
    let signed = |b: &[u8]| {
        vec![
            format!("github-public-key-identifier: {SCANNER_KEY_ID}"),
            format!("github-public-key-signature: {}", sign(&scanner_key(), b)),
        ]
    };
    let other_key = SigningKey::from_bytes(&[9u8; 32].into()).unwrap();
    let huge = format!(
        r#"[{{"token": "{}", "type": "t", "url": "{}"}}]"#,
        live.key,
        "u".repeat(1024 * 1024)
    );
    let cases: Vec<(&str, Vec<u8>, Vec<String>, u16)> = vec![
        ("no headers", body.clone().into_bytes(), vec![], 401),
        (
            "unknown key id",
            body.clone().into_bytes(),
            vec![
                "github-public-key-identifier: someone-else".into(),
                format!(
                    "github-public-key-signature: {}",
                    sign(&scanner_key(), body.as_bytes())
                ),
            ],
            401,
        ),
        (
            "signed by another key",
            body.clone().into_bytes(),
            vec![
                format!("github-public-key-identifier: {SCANNER_KEY_ID}"),
                format!(
                    "github-public-key-signature: {}",
                    sign(&other_key, body.as_bytes())
                ),
            ],
            401,
        ),
        (
            "signature of other bytes",
            body.clone().into_bytes(),
            signed(b"[]"),
            401,
        ),
        (
            "signature not base64",
            body.clone().into_bytes(),
            vec![
                format!("github-public-key-identifier: {SCANNER_KEY_ID}"),
                "github-public-key-signature: !!!".into(),
            ],
            401,
        ),
        (
            "over 1 MiB",
            huge.clone().into_bytes(),
            signed(huge.as_bytes()),
            413,
        ),
        (
            "not JSON",
            b"revoke all".to_vec(),
            signed(b"revoke all"),
            400,
        ),
        (
            "not an array",
            br#"{"token": "x"}"#.to_vec(),
            signed(br#"{"token": "x"}"#),
            400,
        ),
    ];
    for (what, body, headers, status) in &cases {
        assert_eq!(post(&app, body, headers).await.0, *status, "{what}");
    }
    let verifier = app.verifier();
    assert!(
        verify_with(&verifier, &live.key, 1).await.valid,
        "nothing revoked"
    );
    assert!(leaked(&app).await.is_empty());

    // Three reports a minute: the fourth is refused, and revokes nothing.
    let (harmless, _) = report(&app, &[]).await;
    assert_eq!(harmless, 200);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(report(&app, &[]).await.0);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    let (status, _) = report(&app, &[&live.key]).await;
    assert_eq!(status, 429);
    assert!(verify_with(&verifier, &live.key, 1).await.valid);
}

/// `ReportLeakedKey`: a person reports a key (pasted in a support ticket): revoked at
/// once and audited with that person as actor; again, nothing more; an invented key is a
/// false positive; the fields are checked; only an admin token may call it.
async fn a_person_reports_a_leaked_key_by_rpc(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let live = app.issue().await;
    let live_id = live.key_info.as_ref().unwrap().key_id.clone();
    let request = |key: &str| proto::ReportLeakedKeyRequest {
        key: key.to_owned(),
        source_url: "https://support.example/tickets/42".into(),
        actor: Some(actor()),
    };
    let first = app
        .admin()
        .report_leaked_key(request(&live.key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.label(), proto::LeakLabel::TruePositive);
    assert!(first.revoked);
    assert_eq!(first.key_id, live_id);
    assert_eq!(
        code(&verify_with(&app.verifier(), &live.key, 1).await),
        VerifyCode::Revoked
    );
    let again = app
        .admin()
        .report_leaked_key(request(&live.key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.label(), again.revoked, again.key_id.as_str()),
        (proto::LeakLabel::TruePositive, false, live_id.as_str())
    );
    let events = leaked(&app).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].actor_id, actor().id);
    assert!(events[0].detail.contains("tickets/42"));

    let invented = app
        .admin()
        .report_leaked_key(request("kw_live_notakeyatall"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (invented.label(), invented.revoked, invented.key_id.as_str()),
        (proto::LeakLabel::FalsePositive, false, "")
    );
    let e = app
        .admin()
        .report_leaked_key(proto::ReportLeakedKeyRequest {
            key: String::new(),
            source_url: "x".repeat(3000),
            actor: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut fields = violated_fields(&e);
    fields.sort();
    assert_eq!(fields, ["actor", "key", "source_url"]);
    let e = app
        .admin_with(VERIFIER_TOKEN)
        .report_leaked_key(request(&live.key))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "keys cannot manage keys");
}

both_backends!(
    a_scanners_report_revokes_the_live_keys_it_names,
    bad_reports_are_refused_and_change_nothing,
    a_person_reports_a_leaked_key_by_rpc,
);

/// With `[tls]` configured, the `[http]` listener speaks TLS with the same certificate:
/// curl trusting that certificate gets the endpoint's answers over HTTPS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_listener_serves_tls_with_the_tls_files() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = test_settings(&db);
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    settings.tls = Some(keywarden::config::TlsSettings {
        cert_pem: cert.cert.pem().into_bytes(),
        key_pem: zeroize::Zeroizing::new(cert.signing_key.serialize_pem().into_bytes()),
        client_ca_pem: None,
    });
    settings.http = HttpSettings {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        scanners: vec![ScannerSettings {
            name: "github".into(),
            key_id: SCANNER_KEY_ID.into(),
            key: *scanner_key().verifying_key(),
            reports_per_minute: 60,
        }],
    };
    let server = keywarden::server::start(&settings, keywarden::clock::Clock::System)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let port = server.http_addr().unwrap().port();
    let body = b"[]";
    let curl = |headers: Vec<String>| {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&ca)
            .arg("--resolve")
            .arg(format!("localhost:{port}:127.0.0.1"))
            .args(["-X", "POST", "--data-binary", "[]"]);
        for h in headers {
            cmd.arg("-H").arg(h);
        }
        cmd.arg(format!(
            "https://localhost:{port}/v1/secret-scanning/reports"
        ));
        cmd
    };
    let openapi = tokio::process::Command::new("curl")
        .args(["-sS", "-f", "--cacert"])
        .arg(&ca)
        .arg("--resolve")
        .arg(format!("localhost:{port}:127.0.0.1"))
        .arg(format!("https://localhost:{port}/openapi.json"))
        .output()
        .await
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&openapi.stdout).unwrap();
    assert_eq!(
        doc["openapi"], "3.0.3",
        "the document on the HTTP listener too"
    );
    let unsigned = curl(vec![]).output().await.unwrap();
    assert_eq!(String::from_utf8_lossy(&unsigned.stdout), "401");
    let signed = curl(vec![
        format!("github-public-key-identifier: {SCANNER_KEY_ID}"),
        format!(
            "github-public-key-signature: {}",
            sign(&scanner_key(), body)
        ),
    ])
    .output()
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&signed.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&signed.stderr)
    );
    server.shutdown().await.unwrap();
}
