//! The plaintext of a key appears nowhere at rest, in logs, traces, errors or Debug
//! output: the real binary runs at `RUST_LOG=trace` through issue, rotate, revoke and
//! verify (also of a key with a wrong checksum), then its whole output, every byte of
//! the SQLite files and every row of every Postgres table are searched for each key and
//! for its secret part (and, in dev mode, for a webhook's signing secret, used to sign a
//! delivery meanwhile).

mod common;
mod process_harness;

use common::*;
use keywarden::proto::{self, IssueKeyRequest, VerifyCode};
use process_harness::*;
use sha2::{Digest, Sha256};
use sqlx::Connection;

/// A plaintext key and what must never be found of it.
struct Plain {
    key: String,
}

impl Plain {
    fn new(key: String) -> Plain {
        let plain = Plain { key };
        assert_eq!(plain.secret().len(), 32, "{}", plain.key);
        plain
    }

    /// The 32 secret characters between `kw_<env>_` and the 6-character checksum.
    fn secret(&self) -> &str {
        let body = self.key.splitn(3, '_').nth(2).unwrap();
        assert_eq!(body.len(), 38, "{}", self.key);
        &body[..32]
    }

    fn sha256(&self) -> [u8; 32] {
        Sha256::digest(self.key.as_bytes()).into()
    }

    fn sha256_hex(&self) -> String {
        hex::encode(self.sha256())
    }

    /// The key with its last (checksum) character changed: same secret, bad checksum.
    fn wrong_checksum(&self) -> String {
        let mut k = self.key.clone();
        let last = k.pop().unwrap();
        k.push(if last == 'a' { 'b' } else { 'a' });
        k
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Asserts that neither a key nor its secret occurs in `haystack`.
fn assert_absent(haystack: &[u8], keys: &[Plain], place: &str) {
    assert!(
        !haystack.is_empty(),
        "{place} is empty: nothing was searched"
    );
    for plain in keys {
        assert!(
            !contains(haystack, plain.key.as_bytes()),
            "the key {} is in {place}",
            plain.key
        );
        assert!(
            !contains(haystack, plain.secret().as_bytes()),
            "the secret of {} is in {place}",
            plain.key
        );
    }
}

/// A workspace's own provider key, stored and resolved in dev mode.
const PROVIDER_KEY: &str = "sk-ant-api03-Pq7Lm2Vx9Kw4Rt1Yb6Cd3Fg8Hj5Sa0Zn";

/// Puts a provider key (admin) and resolves it (provider-resolver).
async fn provider_key_workload(server: &Server, admin_token: &str, resolver_token: &str) {
    use keywarden::proto::provider_key_service_client::ProviderKeyServiceClient;
    let mut admin =
        ProviderKeyServiceClient::with_interceptor(server.channel().await, bearer(admin_token));
    let put = admin
        .put_provider_key(proto::PutProviderKeyRequest {
            workspace_id: "ws_secrets".into(),
            provider: proto::Provider::Anthropic as i32,
            api_key: PROVIDER_KEY.into(),
            actor: Some(actor()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!format!("{put:?}").contains(&PROVIDER_KEY[8..16]));
    let resolved =
        ProviderKeyServiceClient::with_interceptor(server.channel().await, bearer(resolver_token))
            .resolve_provider_key(proto::ResolveProviderKeyRequest {
                workspace_id: "ws_secrets".into(),
                provider: proto::Provider::Anthropic as i32,
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(resolved.api_key, PROVIDER_KEY);
}

/// Creates a webhook (dev mode lets it reach 127.0.0.1) and waits until a delivery,
/// signed with its secret, has arrived; returns the signing secret.
async fn webhook_workload(server: &Server, admin_token: &str) -> String {
    use keywarden::proto::webhook_service_client::WebhookServiceClient;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = vec![0u8; 64 * 1024];
            let _ = socket.read(&mut buf).await;
            let _ = socket
                .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                .await;
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    let created =
        WebhookServiceClient::with_interceptor(server.channel().await, bearer(admin_token))
            .create_webhook(proto::CreateWebhookRequest {
                workspace_id: "ws_secrets".into(),
                url: format!("http://{addr}/hook"),
                event_types: vec!["key.issued".into()],
                actor: Some(actor()),
            })
            .await
            .unwrap()
            .into_inner();
    assert!(!format!("{:?}", created.webhook).contains(&created.signing_secret));
    let mut admin = server.admin(admin_token).await;
    admin
        .issue_key(issue_req(
            "ws_secrets",
            "announced",
            proto::Environment::Live,
        ))
        .await
        .unwrap();
    eventually("a webhook delivery", async || {
        received.load(Ordering::SeqCst) >= 1
    })
    .await;
    created.signing_secret
}

/// Neither `key` nor any 8-character run of it is in `haystack`.
fn assert_no_part_of(haystack: &[u8], key: &str, place: &str) {
    for run in key.as_bytes().windows(8) {
        assert!(
            !contains(haystack, run),
            "`{}` of a provider key is in {place}",
            String::from_utf8_lossy(run)
        );
    }
}

/// Text with its ANSI escape sequences (log colours) removed, so that no colour code
/// can split a secret from the search.
fn strip_ansi(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == 0x1b && bytes.get(i + 1) == Some(&b'[') {
            i += 2;
            while i < bytes.len() && !(0x40..=0x7e).contains(&bytes[i]) {
                i += 1;
            }
            i += 1;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

fn issue_req(workspace_id: &str, name: &str, env: proto::Environment) -> IssueKeyRequest {
    let mut r = issue_request(workspace_id);
    r.name = name.into();
    r.environment = env as i32;
    r.actor.as_mut().unwrap().permissions = vec!["admin".into(), "read".into()];
    r
}

/// Issues keys, rotates one (with a grace period, so both its secrets are stored),
/// revokes one, verifies each and a wrong-checksum variant of each, and makes bad
/// requests that carry a key. Checks the Debug output of what comes back. Returns every
/// plaintext the server ever handed out.
async fn workload(server: &Server, admin_token: &str, verifier_token: &str) -> Vec<Plain> {
    server.create_workspace(admin_token, "ws_secrets").await;
    let mut admin = server.admin(admin_token).await;
    let mut verifier = server.verifier(verifier_token).await;
    let mut keys = Vec::new();
    let mut ids = Vec::new();
    for (i, env) in [
        proto::Environment::Live,
        proto::Environment::Test,
        proto::Environment::Live,
        proto::Environment::Live,
    ]
    .into_iter()
    .enumerate()
    {
        let issued = admin
            .issue_key(issue_req("ws_secrets", &format!("key {i}"), env))
            .await
            .unwrap()
            .into_inner();
        let plain = Plain::new(issued.key);
        let info = issued.key_info.unwrap();
        let debug = format!("{info:?}");
        assert!(!debug.contains(plain.secret()), "{debug}");
        assert!(!debug.contains(&plain.key), "{debug}");
        // The masked display is there instead, to show the check looks at the real thing.
        assert!(debug.contains(&info.display), "{debug}");
        ids.push(info.key_id);
        keys.push(plain);
    }

    // Rotate key 0, keeping its old secret valid for an hour.
    let rotated = admin
        .rotate_key(proto::RotateKeyRequest {
            key_id: ids[0].clone(),
            actor: Some(actor()),
            grace_period: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let new0 = Plain::new(rotated.key);
    let debug = format!("{:?}", rotated.key_info.unwrap());
    assert!(!debug.contains(new0.secret()) && !debug.contains(keys[0].secret()));
    keys.push(new0);

    // Revoke key 1.
    let revoked = admin
        .revoke_key(proto::RevokeKeyRequest {
            key_id: ids[1].clone(),
            actor: Some(actor()),
            reason: "leaked in a test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!format!("{revoked:?}").contains(keys[1].secret()));

    let expected = [
        VerifyCode::Valid,   // key 0, old secret, in its grace period
        VerifyCode::Revoked, // key 1
        VerifyCode::Valid,
        VerifyCode::Valid,
        VerifyCode::Valid, // key 0, new secret
    ];
    for (plain, expected) in keys.iter().zip(expected) {
        let verdict = verifier
            .verify_key(proto::VerifyKeyRequest {
                key: plain.key.clone(),
                required_scopes: vec!["read".into()],
                cost: 0,
                resource: String::new(),
                client_ip: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(verdict.code, expected as i32, "{}: {verdict:?}", plain.key);
        assert!(!format!("{verdict:?}").contains(plain.secret()));

        let verdict = verifier
            .verify_key(proto::VerifyKeyRequest {
                key: plain.wrong_checksum(),
                required_scopes: vec![],
                cost: 0,
                resource: String::new(),
                client_ip: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(verdict.code, VerifyCode::Malformed as i32, "{verdict:?}");
    }

    // Bad requests that carry a key where it does not belong: the errors, in full Debug
    // form (message, metadata and binary details), do not hold it.
    let key = &keys[2];
    let mut errors = Vec::new();
    errors.push(
        admin
            .get_key(proto::GetKeyRequest {
                key_id: key.key.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    errors.push(
        admin
            .revoke_key(proto::RevokeKeyRequest {
                key_id: key.key.clone(),
                actor: Some(actor()),
                reason: key.key.clone(),
            })
            .await
            .unwrap_err(),
    );
    let mut bad_issue = issue_req(
        "ws_secrets",
        &format!("{}\u{7}", key.key),
        proto::Environment::Live,
    );
    bad_issue.scopes = vec![key.key.clone()];
    bad_issue
        .metadata
        .insert(format!("{}!", key.key), "x".into());
    errors.push(admin.issue_key(bad_issue).await.unwrap_err());
    errors.push(
        verifier
            .verify_key(proto::VerifyKeyRequest {
                key: key.key.clone(),
                required_scopes: vec![key.key.clone()],
                cost: 0,
                resource: String::new(),
                client_ip: String::new(),
            })
            .await
            .unwrap_err(),
    );
    for status in &errors {
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        let debug = format!("{status:?}");
        assert!(!debug.contains(key.secret()), "{debug}");
        assert!(!debug.contains(&key.key), "{debug}");
    }
    keys
}

/// Stops the server with SIGTERM and returns everything it wrote to stdout and stderr.
async fn stop_and_collect_output(server: &mut Server) -> Vec<u8> {
    let status = server.terminate().await;
    assert!(
        status.success(),
        "{status}\n{}",
        server.process.transcript()
    );
    let mut out = server.process.stdout_bytes();
    out.extend_from_slice(&server.process.stderr_bytes());
    out
}

/// The trace output is real trace output: it shows the requests were traced.
fn assert_traced(output: &[u8]) {
    let text = String::from_utf8_lossy(output);
    assert!(text.contains("TRACE"), "RUST_LOG=trace had no effect");
    assert!(text.contains("key issued") && text.contains("key rotated"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_on_sqlite_keeps_no_plaintext() {
    // The harness's SQLite database file is where dev mode keeps its database: its
    // directory is the data dir, and `db` reads the same file afterwards.
    let db = TestDb::new(Backend::Sqlite).await;
    let db_file = std::path::PathBuf::from(db.url.strip_prefix("sqlite://").unwrap());
    let data_dir = db_file.parent().unwrap().to_owned();
    let mut cmd = dev_server(&data_dir);
    cmd.env("RUST_LOG", "trace");
    let mut server = Server::start(cmd).await;
    let admin = server.stdout_value("admin token: ");
    let verifier = server.stdout_value("verifier token: ");

    let resolver = server.stdout_value("provider-resolver token: ");

    let keys = workload(&server, &admin, &verifier).await;
    provider_key_workload(&server, &admin, &resolver).await;
    let signing_secret = webhook_workload(&server, &admin).await;
    let output = stop_and_collect_output(&mut server).await;
    assert_traced(&output);
    assert_absent(&output, &keys, "the server's output");
    assert_absent(&strip_ansi(&output), &keys, "the server's output");
    assert_no_part_of(&strip_ansi(&output), PROVIDER_KEY, "the server's output");
    assert_no_part_of(&strip_ansi(&output), &signing_secret, "the server's output");

    // Every byte of every file in the data dir, read raw (free pages, WAL and all),
    // before anything else opens the database.
    let mut all_files = Vec::new();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&data_dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        assert_absent(&bytes, &keys, &path.display().to_string());
        assert_no_part_of(&bytes, PROVIDER_KEY, &path.display().to_string());
        assert_no_part_of(&bytes, &signing_secret, &path.display().to_string());
        names.push(path.file_name().unwrap().to_string_lossy().into_owned());
        all_files.extend_from_slice(&bytes);
    }
    assert!(names.iter().any(|n| n == "keywarden.db"), "{names:?}");
    // What is stored is the SHA-256 of each key, so the search looked in the right place.
    for plain in &keys {
        assert!(
            contains(&all_files, &plain.sha256()),
            "the hash of {} is not in the data dir files {names:?}",
            plain.key
        );
        assert_eq!(
            db.count(&format!(
                "SELECT count(*) FROM key_secrets WHERE lower(hex(secret_hash)) = '{}'",
                plain.sha256_hex()
            ))
            .await,
            1,
            "key_secrets does not hold the hash of {}",
            plain.key
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_with_a_config_file_keeps_no_plaintext() {
    let db = TestDb::new(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), Some(&db.url), ADMIN_TOKEN, VERIFIER_TOKEN);
    let mut cmd = config_server(&config);
    cmd.env("RUST_LOG", "trace");
    let mut server = Server::start(cmd).await;

    let keys = workload(&server, ADMIN_TOKEN, VERIFIER_TOKEN).await;
    let output = stop_and_collect_output(&mut server).await;
    assert_traced(&output);
    assert_absent(&output, &keys, "the server's output");
    assert_absent(&strip_ansi(&output), &keys, "the server's output");

    // Every row of every table, as text.
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    for expected in ["api_keys", "audit_events", "key_secrets"] {
        assert!(tables.iter().any(|t| t == expected), "{tables:?}");
    }
    let mut key_secrets_rows = String::new();
    for table in &tables {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT t::text FROM \"{table}\" t"
        )))
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let text = rows.join("\n");
        if table == "api_keys" || table == "key_secrets" || table == "audit_events" {
            assert!(!rows.is_empty(), "{table} is empty");
        }
        if !text.is_empty() {
            assert_absent(text.as_bytes(), &keys, &format!("table {table}"));
        }
        if table == "key_secrets" {
            key_secrets_rows = text;
        }
    }
    conn.close().await.unwrap();
    // What is stored is the SHA-256 of each key, so the search looked in the right place.
    for plain in &keys {
        assert!(
            key_secrets_rows.contains(&plain.sha256_hex()),
            "the hash of {} is not in key_secrets:\n{key_secrets_rows}",
            plain.key
        );
        assert_eq!(
            db.count(&format!(
                "SELECT count(*) FROM key_secrets WHERE encode(secret_hash, 'hex') = '{}'",
                plain.sha256_hex()
            ))
            .await,
            1
        );
    }
}

/// JSON logs (`log.format = "json"`), at trace level: every line the server writes to
/// stderr is one JSON object, the RPC and store spans are in them, and no key is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_and_keep_no_plaintext() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut cmd = dev_server(data_dir.path());
    cmd.env("RUST_LOG", "trace")
        .env("KEYWARDEN_LOG__FORMAT", "json");
    let mut server = Server::start(cmd).await;
    let admin = server.stdout_value("admin token: ");
    let verifier = server.stdout_value("verifier token: ");
    let keys = workload(&server, &admin, &verifier).await;
    let status = server.terminate().await;
    assert!(status.success(), "{}", server.process.transcript());
    let stderr = server.process.stderr_bytes();
    let text = String::from_utf8(stderr.clone()).unwrap();
    let mut spans = std::collections::BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(value.get("level").is_some(), "{line}");
        if let Some(name) = value.pointer("/span/name").and_then(|n| n.as_str()) {
            spans.insert(name.to_owned());
        }
    }
    assert!(spans.contains("rpc"), "no RPC span in the logs: {spans:?}");
    assert!(
        spans.contains("insert_key"),
        "no store span in the logs: {spans:?}"
    );
    assert_absent(&stderr, &keys, "the JSON logs");
}
