//! The admin CLI as an operator runs it: the real `keywarden` binary (keys, verify,
//! provider-keys, audit) against a real server on an ephemeral port, its stdout, stderr
//! and exit status inspected.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// What one run of the binary left.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.transcript()))
    }

    fn transcript(&self) -> String {
        format!(
            "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    fn assert_ok(&self) -> &Self {
        assert_eq!(self.code, 0, "{}", self.transcript());
        self
    }

    /// Neither stream holds `secret`.
    fn assert_never_shows(&self, secret: &str) {
        assert!(
            !self.stdout.contains(secret) && !self.stderr.contains(secret),
            "a secret was printed\n{}",
            self.transcript()
        );
    }
}

/// Runs `keywarden ARGS` with the given environment (and none of the caller's
/// `KEYWARDEN_*` variables), feeding `stdin` if given.
async fn keywarden_with(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keywarden"));
    cmd.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEYWARDEN_") {
            cmd.env_remove(&name);
        }
    }
    cmd.envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("cannot start the keywarden binary");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).await.unwrap();
        // Closing it is the end of input.
        drop(pipe);
    }
    // A bound so that a hung child fails the test instead of hanging it; not a timing
    // assertion.
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("keywarden did not exit")
        .unwrap();
    Run {
        code: out.status.code().expect("killed by a signal"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// A server and the flags that reach it as its admin.
struct Cli {
    app: TestApp,
    addr: String,
}

impl Cli {
    async fn start() -> Cli {
        let app = TestApp::spawn(Backend::Sqlite).await;
        let addr = format!("http://{}", app.server().addr());
        Cli { app, addr }
    }

    /// `keywarden ARGS --addr ADDR --token <admin> --actor-id user_admin`.
    async fn admin(&self, args: &[&str]) -> Run {
        self.admin_stdin(args, None).await
    }

    async fn admin_stdin(&self, args: &[&str], stdin: Option<&str>) -> Run {
        let mut all = args.to_vec();
        all.extend(["--addr", &self.addr, "--token", ADMIN_TOKEN]);
        keywarden_with(&all, &[("KEYWARDEN_ACTOR", "user_admin")], stdin).await
    }

    /// `keywarden verify - --addr ADDR --token <verifier> ARGS`, the key on stdin.
    async fn verify(&self, key: &str, args: &[&str]) -> Run {
        let mut all = vec![
            "verify",
            "-",
            "--addr",
            &self.addr,
            "--token",
            VERIFIER_TOKEN,
        ];
        all.extend(args);
        keywarden_with(&all, &[], Some(&format!("{key}\n"))).await
    }

    /// Issues a key in ws_test through the CLI; returns (plaintext, key id).
    async fn issue(&self, name: &str) -> (String, String) {
        let run = self
            .admin(&[
                "keys",
                "issue",
                "--workspace",
                "ws_test",
                "--name",
                name,
                "--scope",
                "read",
                "--owner",
                "user:user_1",
                "-o",
                "json",
            ])
            .await;
        run.assert_ok();
        let out = run.json();
        let key = out["key"].as_str().unwrap().to_owned();
        let key_id = out["key_info"]["key_id"].as_str().unwrap().to_owned();
        (key, key_id)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_prints_the_key_once_and_get_and_list_never_show_it() {
    let cli = Cli::start().await;
    let run = cli
        .admin(&[
            "keys",
            "issue",
            "--workspace",
            "ws_test",
            "--name",
            "ci key",
            "--scope",
            "read",
            "--owner",
            "service_account:sa_ci",
            "--expires-in",
            "30d",
            "--rpm",
            "120",
            "--budget",
            "12.50",
            "--meta",
            "team=ml",
            "-o",
            "json",
        ])
        .await;
    run.assert_ok();
    assert!(
        run.stderr.contains("only time the key is shown"),
        "{}",
        run.transcript()
    );
    let out = run.json();
    let key = out["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("kw_live_"), "{key}");
    let info = &out["key_info"];
    let key_id = info["key_id"].as_str().unwrap().to_owned();
    assert_eq!(info["owner"], "service_account:sa_ci");
    assert_eq!(info["status"], "active");
    assert_eq!(info["max_budget_micros"], 12_500_000);
    assert_eq!(info["rate_limits"][0]["limit"], 120);
    assert_eq!(info["rate_limits"][0]["window"], "minute");
    assert_eq!(info["metadata"]["team"], "ml");
    // RFC 3339 UTC, 30 days out (the server's clock started at the wall clock).
    let expires = info["expires_at"].as_str().unwrap();
    assert!(expires.ends_with('Z'), "{expires}");
    let expires: prost_types::Timestamp = expires.parse().unwrap();
    let created: prost_types::Timestamp = info["created_at"].as_str().unwrap().parse().unwrap();
    let days = (expires.seconds - created.seconds) as f64 / 86_400.0;
    assert!((29.9..30.1).contains(&days), "{days}");
    // What the server holds agrees.
    let stored = cli
        .app
        .admin()
        .get_key(keywarden::proto::GetKeyRequest {
            key_id: key_id.clone(),
            actor: None,
        })
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap();
    assert_eq!(stored.name, "ci key");
    assert_eq!(stored.max_budget_micros, Some(12_500_000));

    let get = cli.admin(&["keys", "get", &key_id]).await;
    get.assert_ok().assert_never_shows(&key);
    assert!(get.stdout.contains("ci key"), "{}", get.transcript());
    assert!(get.stdout.contains("12.50"), "{}", get.transcript());

    let list = cli.admin(&["keys", "list", "--workspace", "ws_test"]).await;
    list.assert_ok().assert_never_shows(&key);
    let lines: Vec<&str> = list.stdout.lines().collect();
    assert!(lines[0].starts_with("KEY ID"), "{}", list.transcript());
    assert!(lines[1].starts_with(&key_id), "{}", list.transcript());
    // Aligned: every column starts where its header does.
    let status_at = lines[0].find("STATUS").unwrap();
    assert_eq!(&lines[1][status_at..status_at + 6], "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_exits_0_for_a_valid_key_and_1_once_it_is_revoked() {
    let cli = Cli::start().await;
    let (key, key_id) = cli.issue("to revoke").await;

    let run = cli.verify(&key, &["--scope", "read"]).await;
    run.assert_ok().assert_never_shows(&key);
    assert!(run.stdout.contains("valid"), "{}", run.transcript());
    assert!(run.stdout.contains(&key_id), "{}", run.transcript());
    assert!(run.stdout.contains("remaining"), "{}", run.transcript());

    // A scope the key lacks: not valid, exit 1.
    let run = cli.verify(&key, &["--scope", "admin", "-o", "json"]).await;
    assert_eq!(run.code, 1, "{}", run.transcript());
    assert_eq!(run.json()["code"], "insufficient_scope");

    let revoked = cli
        .admin(&[
            "keys", "revoke", &key_id, "--reason", "leaked", "-o", "json",
        ])
        .await;
    revoked.assert_ok();
    assert_eq!(revoked.json()["status"], "revoked");
    assert_eq!(revoked.json()["revoke_reason"], "leaked");

    let run = cli.verify(&key, &["-o", "json"]).await;
    assert_eq!(run.code, 1, "{}", run.transcript());
    let answer = run.json();
    assert_eq!(answer["valid"], false);
    assert_eq!(answer["code"], "revoked");
    assert_eq!(answer["key_id"], key_id.as_str());

    // The key on the command line works too; a malformed one is an answer, not an error.
    let run = keywarden_with(
        &[
            "verify",
            "kw_live_nope",
            "--addr",
            &cli.addr,
            "--token",
            VERIFIER_TOKEN,
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.transcript());
    assert!(run.stdout.contains("malformed"), "{}", run.transcript());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_changes_only_the_flags_given() {
    let cli = Cli::start().await;
    let (_, key_id) = cli.issue("before").await;
    let run = cli
        .admin(&[
            "keys",
            "update",
            &key_id,
            "--name",
            "after",
            "--expires-at",
            "2030-01-31T00:00:00Z",
            "-o",
            "json",
        ])
        .await;
    run.assert_ok();
    let out = run.json();
    assert_eq!(out["name"], "after");
    assert_eq!(out["expires_at"], "2030-01-31T00:00:00Z");
    // Not named: unchanged.
    assert_eq!(out["scopes"], serde_json::json!(["read"]));

    let run = cli
        .admin(&["keys", "update", &key_id, "--no-expiry", "-o", "json"])
        .await;
    run.assert_ok();
    assert_eq!(run.json()["expires_at"], Value::Null);
    assert_eq!(run.json()["name"], "after");

    // No change asked for: a usage error, and nothing is sent.
    let run = cli.admin(&["keys", "update", &key_id]).await;
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(run.stderr.contains("--name"), "{}", run.transcript());
    let updates = cli
        .app
        .audit("ws_test")
        .await
        .into_iter()
        .filter(|e| e.action == "key.update")
        .count();
    assert_eq!(updates, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_prints_a_new_key_and_the_old_one_stops() {
    let cli = Cli::start().await;
    let (old, key_id) = cli.issue("rotating").await;
    let run = cli.admin(&["keys", "rotate", &key_id]).await;
    run.assert_ok();
    assert!(
        run.stderr.contains("only time the key is shown"),
        "{}",
        run.transcript()
    );
    let new_key = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("key "))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no key line\n{}", run.transcript()));
    assert!(new_key.starts_with("kw_live_"), "{new_key}");
    assert_ne!(new_key, old);
    assert!(run.stdout.contains("old_key_valid_until"));

    cli.verify(&new_key, &[]).await.assert_ok();
    let run = cli.verify(&old, &[]).await;
    assert_eq!(run.code, 1, "{}", run.transcript());

    // With a grace period, JSON names when the old secret stops.
    let run = cli
        .admin(&["keys", "rotate", &key_id, "--grace", "1h", "-o", "json"])
        .await;
    run.assert_ok();
    let out = run.json();
    let until: prost_types::Timestamp = out["old_key_valid_until"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let rotated: prost_types::Timestamp = out["key_info"]["rotated_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(until.seconds - rotated.seconds, 3600);
    cli.verify(&new_key, &[]).await.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_the_key_from_listings() {
    let cli = Cli::start().await;
    let (key, key_id) = cli.issue("doomed").await;
    cli.admin(&["keys", "delete", &key_id]).await.assert_ok();
    let list = cli
        .admin(&["keys", "list", "--workspace", "ws_test", "-o", "json"])
        .await;
    list.assert_ok();
    assert_eq!(list.json()["keys"], serde_json::json!([]));
    let run = cli.verify(&key, &["-o", "json"]).await;
    assert_eq!(run.code, 1);
    assert_eq!(run.json()["code"], "not_found");
    let run = cli.admin(&["keys", "get", &key_id]).await;
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(
        run.stderr.starts_with("error: NOT_FOUND: "),
        "{}",
        run.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_and_all_follows_every_page() {
    let cli = Cli::start().await;
    let mut ids = Vec::new();
    for name in ["one", "two", "three"] {
        ids.push(cli.issue(name).await.1);
    }
    let run = cli
        .admin(&[
            "keys",
            "list",
            "--workspace",
            "ws_test",
            "--page-size",
            "1",
            "-o",
            "json",
        ])
        .await;
    run.assert_ok();
    let page = run.json();
    assert_eq!(page["keys"].as_array().unwrap().len(), 1);
    let token = page["next_page_token"].as_str().unwrap().to_owned();
    assert!(!token.is_empty());

    let run = cli
        .admin(&[
            "keys",
            "list",
            "--workspace",
            "ws_test",
            "--page-size",
            "1",
            "--page-token",
            &token,
            "-o",
            "json",
        ])
        .await;
    run.assert_ok();
    assert_ne!(run.json()["keys"][0]["key_id"], page["keys"][0]["key_id"]);

    let run = cli
        .admin(&[
            "keys",
            "list",
            "--workspace",
            "ws_test",
            "--page-size",
            "1",
            "--all",
            "-o",
            "json",
        ])
        .await;
    run.assert_ok();
    let mut listed: Vec<String> = run.json()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_id"].as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
    assert_eq!(run.json()["next_page_token"], "");

    // Table mode says where the next page is, on stderr.
    let run = cli
        .admin(&["keys", "list", "--workspace", "ws_test", "--page-size", "1"])
        .await;
    run.assert_ok();
    assert!(run.stderr.contains("--page-token"), "{}", run.transcript());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_key_from_stdin_is_stored_and_only_ever_shown_masked() {
    const ANTHROPIC: &str = "sk-ant-api03-cliSecretValue0123456789abcdWXYZ";
    const OPENAI: &str = "sk-proj-cliOtherSecret0123456789abcdefQRST";
    let cli = Cli::start().await;
    let put = cli
        .admin_stdin(
            &[
                "provider-keys",
                "put",
                "--workspace",
                "ws_test",
                "--provider",
                "anthropic",
                "--api-key",
                "-",
            ],
            Some(&format!("{ANTHROPIC}\n")),
        )
        .await;
    put.assert_ok().assert_never_shows(ANTHROPIC);
    assert!(put.stdout.contains("****WXYZ"), "{}", put.transcript());
    let put = cli
        .admin_stdin(
            &[
                "provider-keys",
                "put",
                "--workspace",
                "ws_test",
                "--provider",
                "openai",
                "--api-key-stdin",
                "-o",
                "json",
            ],
            Some(OPENAI),
        )
        .await;
    put.assert_ok().assert_never_shows(OPENAI);
    assert_eq!(put.json()["last_four"], "QRST");

    // The server holds exactly what was piped (the resolver role gets it back).
    let resolved =
        keywarden::proto::provider_key_service_client::ProviderKeyServiceClient::with_interceptor(
            cli.app.channel.clone(),
            bearer(RESOLVER_TOKEN),
        )
        .resolve_provider_key(keywarden::proto::ResolveProviderKeyRequest {
            workspace_id: "ws_test".into(),
            provider: keywarden::proto::Provider::Anthropic as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .api_key;
    assert_eq!(resolved, ANTHROPIC);

    let list = cli
        .admin(&["provider-keys", "list", "--workspace", "ws_test"])
        .await;
    list.assert_ok().assert_never_shows(ANTHROPIC);
    list.assert_never_shows(OPENAI);
    assert!(list.stdout.contains("anthropic"), "{}", list.transcript());
    assert!(list.stdout.contains("****WXYZ"), "{}", list.transcript());
    assert!(list.stdout.contains("****QRST"), "{}", list.transcript());

    // A refused key: the error names the field, never the value.
    let bad = "sk-ant-has spaces in it and is refused";
    let run = cli
        .admin_stdin(
            &[
                "provider-keys",
                "put",
                "--workspace",
                "ws_test",
                "--provider",
                "anthropic",
                "--api-key-stdin",
            ],
            Some(bad),
        )
        .await;
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(
        run.stderr.starts_with("error: INVALID_ARGUMENT: "),
        "{}",
        run.transcript()
    );
    assert!(run.stderr.contains("api_key"), "{}", run.transcript());
    run.assert_never_shows(bad);

    // Nothing on stdin: a usage error before any call.
    let run = cli
        .admin_stdin(
            &[
                "provider-keys",
                "put",
                "--workspace",
                "ws_test",
                "--provider",
                "openai",
                "--api-key-stdin",
            ],
            Some(""),
        )
        .await;
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(
        run.stderr.contains("no provider key on stdin"),
        "{}",
        run.transcript()
    );

    let del = cli
        .admin(&[
            "provider-keys",
            "delete",
            "--workspace",
            "ws_test",
            "--provider",
            "openai",
        ])
        .await;
    del.assert_ok();
    let list = cli
        .admin(&[
            "provider-keys",
            "list",
            "--workspace",
            "ws_test",
            "-o",
            "json",
        ])
        .await;
    list.assert_ok();
    assert_eq!(list.json()["provider_keys"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_list_shows_every_action_under_the_named_actor() {
    let cli = Cli::start().await;
    let (_, key_id) = cli.issue("audited").await;
    cli.admin(&["keys", "update", &key_id, "--name", "renamed"])
        .await
        .assert_ok();
    cli.admin(&["keys", "rotate", &key_id]).await.assert_ok();
    cli.admin(&["keys", "revoke", &key_id]).await.assert_ok();

    let run = cli
        .admin(&["audit", "list", "--workspace", "ws_test"])
        .await;
    run.assert_ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines[0].starts_with("TIME"), "{}", run.transcript());
    for action in ["key.issue", "key.update", "key.rotate", "key.revoke"] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(action) && l.contains(&key_id)),
            "{action} missing\n{}",
            run.transcript()
        );
    }

    let run = cli
        .admin(&["audit", "list", "--workspace", "ws_test", "-o", "json"])
        .await;
    run.assert_ok();
    let events = run.json()["events"].as_array().unwrap().clone();
    assert_eq!(events.len(), 4);
    // Newest first; each under the actor the CLI named and the caller token's name.
    assert_eq!(events[0]["action"], "key.revoke");
    for e in &events {
        assert_eq!(e["actor_id"], "user_admin");
        assert_eq!(e["caller"], "test-admin");
        assert_eq!(e["outcome"], "success");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_token_and_actor_come_from_the_environment() {
    let cli = Cli::start().await;
    let env = [
        ("KEYWARDEN_ADDR", cli.addr.as_str()),
        ("KEYWARDEN_TOKEN", ADMIN_TOKEN),
        ("KEYWARDEN_ACTOR", "user_env"),
        ("KEYWARDEN_ACTOR_PERMISSIONS", "read,write"),
    ];
    let run = keywarden_with(
        &[
            "keys",
            "issue",
            "--workspace",
            "ws_test",
            "--name",
            "from env",
            "--scope",
            "write",
            "--owner",
            "user:user_env",
            "-o",
            "json",
        ],
        &env,
        None,
    )
    .await;
    run.assert_ok();
    assert_eq!(run.json()["key_info"]["created_by"], "user_env");
    let run = keywarden_with(&["keys", "list", "--workspace", "ws_test"], &env, None).await;
    run.assert_ok();
    assert!(run.stdout.contains("from env"), "{}", run.transcript());
    // The permissions from the variable are the ceiling: `admin` is not among them.
    let run = keywarden_with(
        &[
            "keys",
            "issue",
            "--workspace",
            "ws_test",
            "--name",
            "too much",
            "--scope",
            "admin",
            "--owner",
            "user:user_env",
        ],
        &env,
        None,
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(
        run.stderr.starts_with("error: PERMISSION_DENIED: "),
        "{}",
        run.transcript()
    );
    // The token in the variable is never echoed, not even by --help.
    let help = keywarden_with(&["keys", "list", "--help"], &env, None).await;
    help.assert_ok().assert_never_shows(ADMIN_TOKEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_or_missing_token_is_a_clear_error_with_exit_2() {
    let cli = Cli::start().await;
    let bad = "not-a-configured-token";
    let run = keywarden_with(
        &[
            "keys",
            "list",
            "--workspace",
            "ws_test",
            "--addr",
            &cli.addr,
            "--token",
            bad,
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(
        run.stderr.starts_with("error: UNAUTHENTICATED: "),
        "{}",
        run.transcript()
    );
    assert!(run.stdout.is_empty(), "{}", run.transcript());
    run.assert_never_shows(bad);

    // The verifier token cannot manage keys.
    let run = keywarden_with(
        &[
            "keys",
            "list",
            "--workspace",
            "ws_test",
            "--addr",
            &cli.addr,
            "--token",
            VERIFIER_TOKEN,
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(
        run.stderr.starts_with("error: PERMISSION_DENIED: "),
        "{}",
        run.transcript()
    );

    let run = keywarden_with(
        &[
            "keys",
            "list",
            "--workspace",
            "ws_test",
            "--addr",
            &cli.addr,
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(
        run.stderr.contains("no caller token") && run.stderr.contains("KEYWARDEN_TOKEN"),
        "{}",
        run.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_flags_are_usage_errors_and_send_nothing() {
    let cli = Cli::start().await;
    let base = [
        "keys",
        "issue",
        "--workspace",
        "ws_test",
        "--name",
        "x",
        "--scope",
        "read",
    ];
    let cases: &[(&[&str], &str)] = &[
        (
            &["--owner", "user:u1", "--expires-in", "30x"],
            "--expires-in",
        ),
        (
            &["--owner", "user:u1", "--expires-in", "30"],
            "--expires-in",
        ),
        (&["--owner", "bob"], "--owner"),
        (&["--owner", "team:t1"], "--owner"),
        (&["--owner", "user:u1", "--budget", "1.2.3"], "--budget"),
        (
            &["--owner", "user:u1", "--expires-at", "next tuesday"],
            "--expires-at",
        ),
        (&["--owner", "user:u1", "--env", "prod"], "--env"),
        (&["--owner", "user:u1", "--meta", "novalue"], "--meta"),
        (
            &[
                "--owner",
                "user:u1",
                "--expires-in",
                "1d",
                "--expires-at",
                "2099-01-01T00:00:00Z",
            ],
            "--expires-at",
        ),
    ];
    for (extra, flag) in cases {
        let run = cli.admin(&[&base[..], extra].concat()).await;
        assert_eq!(run.code, 2, "{extra:?}\n{}", run.transcript());
        assert!(
            run.stderr.starts_with("error: ") && run.stderr.contains(flag),
            "{extra:?} should name {flag}\n{}",
            run.transcript()
        );
        assert!(run.stdout.is_empty(), "{}", run.transcript());
    }
    // The actor is required for a mutation.
    let run = keywarden_with(
        &[
            "keys",
            "revoke",
            "key_x",
            "--addr",
            &cli.addr,
            "--token",
            ADMIN_TOKEN,
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(run.stderr.contains("--actor-id"), "{}", run.transcript());
    // A page size out of range.
    let run = cli
        .admin(&["keys", "list", "--workspace", "ws_test", "--page-size", "0"])
        .await;
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(run.stderr.contains("--page-size"), "{}", run.transcript());

    // Nothing reached the server.
    assert!(cli.app.audit("ws_test").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_refusals_print_the_code_and_the_field() {
    let cli = Cli::start().await;
    // A workspace id the server refuses: INVALID_ARGUMENT naming the field.
    let run = cli
        .admin(&[
            "keys",
            "issue",
            "--workspace",
            "bad workspace!",
            "--name",
            "x",
            "--owner",
            "user:u1",
        ])
        .await;
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(
        run.stderr.starts_with("error: INVALID_ARGUMENT: ") && run.stderr.contains("workspace_id"),
        "{}",
        run.transcript()
    );
    // A workspace that does not exist.
    let run = cli
        .admin(&[
            "keys",
            "issue",
            "--workspace",
            "ws_nowhere",
            "--name",
            "x",
            "--owner",
            "user:u1",
        ])
        .await;
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(
        run.stderr.starts_with("error: NOT_FOUND: "),
        "{}",
        run.transcript()
    );
    // A grace period past the 7-day bound.
    let (_, key_id) = cli.issue("graceful").await;
    let run = cli
        .admin(&["keys", "rotate", &key_id, "--grace", "8d"])
        .await;
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(run.stderr.contains("grace_period"), "{}", run.transcript());
    // Empty stdin for verify.
    let run = keywarden_with(
        &[
            "verify",
            "-",
            "--addr",
            &cli.addr,
            "--token",
            VERIFIER_TOKEN,
        ],
        &[],
        Some("\n"),
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(
        run.stderr.contains("no key on stdin"),
        "{}",
        run.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_reported_with_its_address() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let run = keywarden_with(
        &[
            "keys",
            "get",
            "key_x",
            "--addr",
            &addr,
            "--token",
            ADMIN_TOKEN,
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(
        run.stderr
            .starts_with(&format!("error: cannot connect to http://{addr}")),
        "{}",
        run.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspaces_create_then_keys_in_it() {
    let cli = Cli::start().await;
    let run = cli
        .admin(&[
            "workspaces",
            "create",
            "ws_cli",
            "--name",
            "CLI",
            "--plan",
            "spark",
            "-o",
            "json",
        ])
        .await;
    run.assert_ok();
    assert_eq!(run.json()["plan"], "spark");
    assert_eq!(run.json()["byok_allowed"], false);
    let run = cli.admin(&["workspaces", "get", "ws_cli"]).await;
    run.assert_ok();
    assert!(run.stdout.contains("spark"), "{}", run.transcript());
    // SPARK has no BYOK: the refusal comes through with its code.
    let run = cli
        .admin_stdin(
            &[
                "provider-keys",
                "put",
                "--workspace",
                "ws_cli",
                "--provider",
                "openai",
                "--api-key-stdin",
            ],
            Some("sk-proj-abcdefghijklmnopqrstuvwxyz"),
        )
        .await;
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(
        run.stderr.starts_with("error: FAILED_PRECONDITION: "),
        "{}",
        run.transcript()
    );
}

/// Pools through the CLI: a workspace's, a team's and an owner's, set, shown and removed,
/// and the owner's binding a key's second call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_are_set_shown_and_removed_through_the_cli() {
    let cli = Cli::start().await;
    let ok = |run: Run| {
        run.assert_ok();
        run.json()
    };
    let rpm = |n: u64| serde_json::json!([{"unit": "requests", "window": "minute", "limit": n}]);
    let workspace = ok(cli
        .admin(&[
            "workspaces",
            "update",
            "ws_test",
            "--pool",
            "rpm=500",
            "-o",
            "json",
        ])
        .await);
    assert_eq!(workspace["pool"], rpm(500));
    ok(cli
        .admin(&[
            "teams",
            "create",
            "team_ml",
            "--workspace",
            "ws_test",
            "-o",
            "json",
        ])
        .await);
    let team = ok(cli
        .admin(&[
            "teams",
            "update",
            "team_ml",
            "--workspace",
            "ws_test",
            "--pool",
            "rpm=50",
            "-o",
            "json",
        ])
        .await);
    assert_eq!(team["pool"], rpm(50));
    let set = ok(cli
        .admin(&[
            "workspaces",
            "owner-limits",
            "ws_test",
            "--owner",
            "user:user_1",
            "--pool",
            "rpm=1",
            "-o",
            "json",
        ])
        .await);
    assert_eq!(set["pool"], rpm(1));
    assert_eq!(set["owner"], "user:user_1");
    let (key, _) = cli.issue("pooled").await;
    cli.verify(&key, &[]).await.assert_ok();
    let refused = cli.verify(&key, &[]).await;
    assert_eq!(refused.code, 1, "{}", refused.transcript());
    assert!(
        refused.stdout.contains("rate_limited"),
        "{}",
        refused.transcript()
    );
    // Shown as a table without --pool; removed with --no-pool.
    let shown = cli
        .admin(&[
            "workspaces",
            "owner-limits",
            "ws_test",
            "--owner",
            "user:user_1",
        ])
        .await;
    shown.assert_ok();
    assert!(
        shown.stdout.contains("pool          1 requests/minute"),
        "{}",
        shown.transcript()
    );
    let removed = ok(cli
        .admin(&[
            "workspaces",
            "owner-limits",
            "ws_test",
            "--owner",
            "user:user_1",
            "--no-pool",
            "-o",
            "json",
        ])
        .await);
    assert_eq!(removed["pool"], serde_json::json!([]));
    let run = cli
        .admin(&[
            "workspaces",
            "owner-limits",
            "ws_test",
            "--owner",
            "user:user_1",
            "--pool",
            "rpm=1",
            "--no-pool",
        ])
        .await;
    assert_eq!(run.code, 2, "{}", run.transcript());
}

/// Every admin service has its commands: access groups, teams with their policy, service
/// accounts, keys with token limits, a reach and networks, and workspace updates, each
/// run as printed in docs/cli.md and checked through its JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teams_groups_service_accounts_and_key_policy_through_the_cli() {
    let cli = Cli::start().await;
    let ok = |run: Run| {
        run.assert_ok();
        run.json()
    };
    let group = ok(cli
        .admin(&[
            "access-groups",
            "create",
            "frontier",
            "--workspace",
            "ws_test",
            "--target",
            "gpt-4o",
            "--target",
            "o3",
            "-o",
            "json",
        ])
        .await);
    assert_eq!(group["targets"], serde_json::json!(["gpt-4o", "o3"]));
    let groups = ok(cli
        .admin(&[
            "access-groups",
            "list",
            "--workspace",
            "ws_test",
            "-o",
            "json",
        ])
        .await);
    assert_eq!(groups["access_groups"][0]["name"], "frontier");

    let team = ok(cli
        .admin(&[
            "teams",
            "create",
            "team_ml",
            "--workspace",
            "ws_test",
            "--name",
            "ML",
            "--self-service",
            "--max-keys-per-user",
            "2",
            "--ceiling",
            "rpm=60",
            "--reach",
            "include",
            "--access-group",
            "frontier",
            "-o",
            "json",
        ])
        .await);
    let policy = &team["policy"];
    assert_eq!(policy["self_service_enabled"], true);
    assert_eq!(policy["max_keys_per_user"], 2);
    assert_eq!(policy["rate_limit_ceilings"][0]["limit"], 60);
    assert_eq!(policy["resource_access"]["mode"], "include");
    assert_eq!(
        policy["resource_access"]["access_groups"],
        serde_json::json!(["frontier"])
    );
    // An update changes the rules given and keeps the others.
    let team = ok(cli
        .admin(&[
            "teams",
            "update",
            "team_ml",
            "--workspace",
            "ws_test",
            "--max-expiry-days",
            "30",
            "-o",
            "json",
        ])
        .await);
    assert_eq!(team["policy"]["max_expiry_days"], 30);
    assert_eq!(team["policy"]["self_service_enabled"], true);
    assert_eq!(team["policy"]["rate_limit_ceilings"][0]["limit"], 60);
    let teams = ok(cli
        .admin(&["teams", "list", "--workspace", "ws_test", "-o", "json"])
        .await);
    assert_eq!(teams["teams"][0]["team_id"], "team_ml");
    let shown = cli
        .admin(&["teams", "get", "team_ml", "--workspace", "ws_test"])
        .await;
    shown.assert_ok();
    assert!(
        shown.stdout.contains("include: group:frontier"),
        "{}",
        shown.transcript()
    );

    let account = ok(cli
        .admin(&[
            "service-accounts",
            "create",
            "sa_ci",
            "--workspace",
            "ws_test",
            "--team",
            "team_ml",
            "-o",
            "json",
        ])
        .await);
    assert_eq!(account["team_id"], "team_ml");
    let accounts = ok(cli
        .admin(&[
            "service-accounts",
            "list",
            "--workspace",
            "ws_test",
            "--team",
            "team_ml",
            "-o",
            "json",
        ])
        .await);
    assert_eq!(
        accounts["service_accounts"][0]["service_account_id"],
        "sa_ci"
    );

    // A team key with a token limit and a reach within the team's.
    let issued = ok(cli
        .admin(&[
            "keys",
            "issue",
            "--workspace",
            "ws_test",
            "--name",
            "ci",
            "--team",
            "team_ml",
            "--owner",
            "service_account:sa_ci",
            "--limit",
            "tpd=100000",
            "--reach",
            "include",
            "--target",
            "gpt-4o",
            "-o",
            "json",
        ])
        .await);
    let info = &issued["key_info"];
    assert_eq!(info["rate_limits"][0]["unit"], "tokens");
    assert_eq!(info["rate_limits"][0]["window"], "day");
    assert_eq!(
        info["resource_access"]["targets"],
        serde_json::json!(["gpt-4o"])
    );
    let key_id = info["key_id"].as_str().unwrap().to_owned();
    let updated = ok(cli
        .admin(&[
            "keys",
            "update",
            &key_id,
            "--limit",
            "rpm=5",
            "--allow-cidr",
            "10.0.0.0/8",
            "-o",
            "json",
        ])
        .await);
    assert_eq!(updated["rate_limits"][0]["limit"], 5);
    assert_eq!(updated["rate_limits"].as_array().unwrap().len(), 1);
    assert_eq!(updated["allowed_cidrs"], serde_json::json!(["10.0.0.0/8"]));
    assert_eq!(
        updated["resource_access"]["targets"],
        serde_json::json!(["gpt-4o"]),
        "untouched"
    );
    let updated = ok(cli
        .admin(&[
            "keys",
            "update",
            &key_id,
            "--default-limits",
            "--any-network",
            "-o",
            "json",
        ])
        .await);
    assert!(updated["rate_limits"].as_array().unwrap().is_empty());
    assert!(updated["allowed_cidrs"].as_array().unwrap().is_empty());
    // Widening the team's reach is refused, naming what is beyond it.
    let run = cli
        .admin(&[
            "keys", "update", &key_id, "--reach", "include", "--target", "claude",
        ])
        .await;
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(
        run.stderr.starts_with("error: FAILED_PRECONDITION: ") && run.stderr.contains("claude"),
        "{}",
        run.transcript()
    );

    let ws = ok(cli
        .admin(&[
            "workspaces",
            "update",
            "ws_test",
            "--name",
            "Testing",
            "-o",
            "json",
        ])
        .await);
    assert_eq!(ws["name"], "Testing");
    let all = ok(cli
        .admin(&["workspaces", "list", "--all", "-o", "json"])
        .await);
    assert!(
        all["workspaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["workspace_id"] == "ws_test"),
        "{all}"
    );

    // A team goes only once its keys do; its service accounts go with it.
    let run = cli
        .admin(&["teams", "delete", "team_ml", "--workspace", "ws_test"])
        .await;
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(
        run.stderr.contains("FAILED_PRECONDITION"),
        "{}",
        run.transcript()
    );
    cli.admin(&["keys", "revoke", &key_id]).await.assert_ok();
    cli.admin(&["teams", "delete", "team_ml", "--workspace", "ws_test"])
        .await
        .assert_ok();
    let run = cli
        .admin(&[
            "service-accounts",
            "list",
            "--workspace",
            "ws_test",
            "--team",
            "team_ml",
        ])
        .await;
    assert!(run.stderr.contains("NOT_FOUND"), "{}", run.transcript());
    cli.admin(&[
        "access-groups",
        "delete",
        "frontier",
        "--workspace",
        "ws_test",
    ])
    .await
    .assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_secret_is_printed_once_and_never_listed() {
    let cli = Cli::start().await;
    let created = cli
        .admin(&[
            "webhooks",
            "create",
            "--workspace",
            "ws_test",
            "--url",
            "https://hooks.example.com/kw",
            "--event",
            "key.revoked,key.leaked",
            "-o",
            "json",
        ])
        .await;
    created.assert_ok();
    let doc = created.json();
    let secret = doc["signing_secret"].as_str().unwrap().to_owned();
    let id = doc["webhook_id"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{}", created.transcript());
    assert_eq!(
        doc["event_types"],
        serde_json::json!(["key.revoked", "key.leaked"])
    );
    for format in ["table", "json"] {
        let list = cli
            .admin(&["webhooks", "list", "--workspace", "ws_test", "-o", format])
            .await;
        list.assert_ok().assert_never_shows(&secret);
        assert!(list.stdout.contains(&id), "{}", list.transcript());
    }
    let rotated = cli
        .admin(&[
            "webhooks",
            "rotate-secret",
            "--workspace",
            "ws_test",
            "--webhook",
            &id,
        ])
        .await;
    rotated.assert_ok();
    assert!(
        rotated.stdout.contains("signing secret: whsec_"),
        "{}",
        rotated.transcript()
    );
    assert!(!rotated.stdout.contains(&secret));
    cli.admin(&[
        "webhooks",
        "delete",
        "--workspace",
        "ws_test",
        "--webhook",
        &id,
    ])
    .await
    .assert_ok();
    let refused = cli
        .admin(&[
            "webhooks",
            "delete",
            "--workspace",
            "ws_test",
            "--webhook",
            &id,
        ])
        .await;
    assert_eq!(refused.code, 2, "{}", refused.transcript());
    assert!(
        refused.stderr.contains("NOT_FOUND"),
        "{}",
        refused.transcript()
    );
}
