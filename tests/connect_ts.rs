//! Connect's own TypeScript client (`@connectrpc/connect` with `@connectrpc/connect-node`,
//! from npm), with code generated from `proto/` by `protoc-gen-es`, run by node against a
//! real server on both stores, over HTTP/1.1 and HTTP/2: issue → verify → revoke →
//! verify → audit, and a refusal with its code and details. The client is
//! `tests/connect-ts/client.ts`; it is type-checked against the generated code first.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use common::*;
use serde_json::Value;

fn project() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/connect-ts")
}

/// Runs `program args` in the client's folder; panics with its output if it fails.
fn run(program: &str, args: &[&str], env: &[(&str, String)]) -> String {
    let output = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(project())
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} does not run ({e}); scripts/test.sh installs node and npm")
        });
    assert!(
        output.status.success(),
        "{program} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The client's packages installed from the lock file, its code generated from the
/// protos and type-checked: once per test binary.
fn prepared() {
    static PREPARED: OnceLock<()> = OnceLock::new();
    PREPARED.get_or_init(|| {
        run(
            "npm",
            &["ci", "--no-audit", "--no-fund", "--loglevel=error"],
            &[],
        );
        run("npm", &["run", "-s", "generate"], &[]);
        run("npm", &["run", "-s", "typecheck"], &[]);
    });
}

async fn connect_s_typescript_client_issues_verifies_revokes_and_reads_the_audit_log(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let addr = app.server().addr();
    // npm and node block; the server runs on this test's runtime meanwhile.
    let seen = tokio::task::spawn_blocking(move || {
        prepared();
        ["1.1", "2"].map(|version| {
            let out = run(
                "npx",
                &["tsx", "client.ts"],
                &[
                    ("KEYWARDEN_URL", format!("http://{addr}")),
                    ("ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
                    ("VERIFIER_TOKEN", VERIFIER_TOKEN.to_owned()),
                    ("HTTP_VERSION", version.to_owned()),
                ],
            );
            serde_json::from_str::<Value>(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
        })
    })
    .await
    .unwrap();
    for seen in seen {
        let key_id = seen["keyId"].as_str().unwrap();
        assert!(key_id.starts_with("key_"), "{seen}");
        assert_eq!(app.key_info(key_id).await.key_id, key_id, "issued for real");
        assert_eq!(seen["firstValid"], true, "{seen}");
        assert_eq!(
            seen["rateLimitIsBigint"], true,
            "int64 decoded as bigint: {seen}"
        );
        assert_eq!(seen["secondCode"], "REVOKED", "{seen}");
        assert_eq!(
            seen["auditActions"],
            serde_json::json!(["key.revoke", "key.issue"])
        );
        assert_eq!(seen["refusal"]["code"], "InvalidArgument", "{seen}");
        assert_eq!(
            seen["refusal"]["detailTypes"],
            serde_json::json!(["google.rpc.ErrorInfo", "google.rpc.BadRequest"])
        );
    }
}

both_backends!(connect_s_typescript_client_issues_verifies_revokes_and_reads_the_audit_log);
