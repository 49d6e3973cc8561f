//! The benchmark tool's own smoke test: a few hundred calls per scenario through the real
//! binary, checking that it reports sane, non-zero figures and writes both reports. No
//! figure is compared with a target here: performance is measured by `keywarden bench`,
//! not asserted by tests.

mod common;

use std::process::Command;

fn run_bench(extra: &[&str]) -> (serde_json::Value, String) {
    run_bench_with(extra, &[])
}

/// `keywarden bench` with a few hundred calls per scenario, `extra` arguments and `env`.
fn run_bench_with(extra: &[&str], env: &[(&str, &str)]) -> (serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let md = dir.path().join("BENCHMARKS.md");
    let output = Command::new(env!("CARGO_BIN_EXE_keywarden"))
        .args([
            "bench",
            "--duration",
            "2",
            "--keys",
            "40",
            "--max-requests",
            "300",
        ])
        .args(["--concurrency", "4", "--connections", "1", "--no-h2load"])
        .args(["--revocations", "20", "--streams", "150"])
        .args(extra)
        .arg("--out")
        .arg(&json)
        .arg("--markdown")
        .arg(&md)
        .env("KEYWARDEN_BENCH_POSTGRES_URL", common::postgres_admin_url())
        .env(
            "KEYWARDEN_BENCH_REDIS_URL",
            std::env::var("KEYWARDEN_TEST_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
        )
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "bench failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    (report, std::fs::read_to_string(&md).unwrap())
}

fn assert_spread(spread: &serde_json::Value, samples: u64) {
    assert_eq!(spread["samples"].as_u64(), Some(samples), "{spread}");
    let (p50, p99, max) = (
        spread["p50_us"].as_u64().unwrap(),
        spread["p99_us"].as_u64().unwrap(),
        spread["max_us"].as_u64().unwrap(),
    );
    assert!(p50 > 0 && p50 <= p99 && p99 <= max, "{spread}");
}

/// Every revocation reached the subscribers; every stream opened and got the event.
fn assert_stream_figures(run: &serde_json::Value, other_replica: bool) {
    let latency = &run["revocation_latency"];
    assert_eq!(latency["revocations"].as_u64(), Some(20), "{latency}");
    assert_eq!(latency["missed"].as_u64(), Some(0), "{latency}");
    assert_spread(&latency["same_replica"], 20);
    if other_replica {
        assert_spread(&latency["other_replica"], 20);
    } else {
        assert!(latency["other_replica"].is_null(), "{latency}");
    }
    let streams = &run["streams"];
    assert_eq!(streams["opened"].as_u64(), Some(150), "{streams}");
    assert_eq!(streams["missed"].as_u64(), Some(0), "{streams}");
    assert_spread(&streams["fanout"], 150);
    assert!(streams["bytes_per_stream"].as_f64().is_some(), "{streams}");
}

fn assert_sane(run: &serde_json::Value, scenario: &str, max_requests: u64) {
    let r = &run[scenario];
    assert!(r.is_object(), "{scenario} missing from {run}");
    let requests = r["requests"].as_u64().unwrap();
    assert!(requests > 0 && requests <= max_requests, "{scenario}: {r}");
    assert_eq!(r["errors"].as_u64(), Some(0), "{scenario}: {r}");
    assert!(r["throughput"].as_f64().unwrap() > 0.0, "{scenario}: {r}");
    let (p50, p99, p999) = (
        r["p50_us"].as_u64().unwrap(),
        r["p99_us"].as_u64().unwrap(),
        r["p999_us"].as_u64().unwrap(),
    );
    assert!(p50 > 0 && p50 <= p99 && p99 <= p999, "{scenario}: {r}");
    // The client's CPU is always this process's own; a few hundred calls may not reach
    // one clock tick, so only its presence and sign are checked.
    assert!(
        r["client_cores"].as_f64().unwrap() >= 0.0,
        "{scenario}: {r}"
    );
}

/// The server's CPU is reported for servers the bench started, and only for those.
fn assert_server_cpu(run: &serde_json::Value, scenario: &str, started_by_bench: bool) {
    let cores = &run[scenario]["server_cores"];
    if started_by_bench {
        assert!(cores.as_f64().unwrap() >= 0.0, "{scenario}: {cores}");
    } else {
        assert!(cores.is_null(), "{scenario}: {cores}");
    }
}

#[test]
fn the_bench_reports_sane_figures_on_sqlite() {
    let (report, markdown) = run_bench(&["--store", "sqlite"]);
    let run = &report["runs"][0];
    for scenario in [
        "issue",
        "noop",
        "noop_half_load",
        "verify_hit",
        "verify_hit_half_load",
        "verify_naive",
        "verify_ratelimited_memory",
        "verify_ratelimited_redis",
        "verify_pooled",
        "verify_own_limit_beside_pooled",
    ] {
        let max = if scenario == "issue" { 40 } else { 300 };
        assert_sane(run, scenario, max);
        assert_server_cpu(run, scenario, true);
    }
    assert!(
        run["verify_miss"].is_null(),
        "verify-miss runs on Postgres only"
    );
    assert!(run["memory"].is_null(), "memory runs on Postgres only");
    assert_stream_figures(run, false);
    // `--scenario all` includes edge-verify (its figures: the test below).
    assert!(run["edge_verify"]["calls"].as_u64().unwrap() > 0, "{run}");
    assert!(markdown.contains("verify-hit / noop throughput"));
    assert!(markdown.contains("| verify-hit |"));
    // The transport's floor: the bare tonic no-op server, in turns with Ping and VerifyKey.
    let bare = &run["bare"];
    for figure in ["bare_beside_noop", "noop", "bare_beside_hit", "verify_hit"] {
        let r = &bare[figure];
        assert!(r["throughput"].as_f64().unwrap() > 0.0, "{figure}: {bare}");
        assert_eq!(r["errors"].as_u64(), Some(0), "{figure}: {bare}");
    }
    assert!(markdown.contains("verify-hit / bare tonic no-op throughput"));
    assert!(markdown.contains("server CPU µs per call"));
    assert!(markdown.contains("| same replica |"));
}

#[test]
fn the_bench_seeds_postgres_and_measures_misses() {
    let (report, markdown) = run_bench(&[
        "--store",
        "postgres",
        "--miss-keys",
        "1200",
        "--mix",
        "hit=80,miss=10,malformed=5,revoked=5",
    ]);
    let run = &report["runs"][0];
    for scenario in [
        "noop",
        "verify_hit",
        "verify_naive",
        "verify_miss",
        "verify_ratelimited_memory",
        "verify_ratelimited_redis",
    ] {
        assert_sane(run, scenario, 500);
    }
    // `all` measures memory too, once, in its last run: seeded keys verified once each,
    // as many as `--max-requests` allows.
    let memory = &run["memory"];
    assert_eq!(memory["keys"].as_u64(), Some(1200), "{memory}");
    assert_eq!(memory["verified"].as_u64(), Some(300), "{memory}");
    assert_eq!(memory["errors"].as_u64(), Some(0), "{memory}");
    assert!(markdown.contains("server memory per verified key"));
    // The database's own floor for a miss, in turns with verify-miss, on keys of its own.
    let floor = &run["miss_floor"];
    for figure in ["verify_miss", "database"] {
        let r = &floor[figure];
        assert!(r["requests"].as_u64().unwrap() > 0, "{figure}: {floor}");
        assert!(r["throughput"].as_f64().unwrap() > 0.0, "{figure}: {floor}");
        assert_eq!(r["errors"].as_u64(), Some(0), "{figure}: {floor}");
    }
    assert!(markdown.contains("verify-miss / the database's own lookup by hash"));
    assert_stream_figures(run, true);
    // Two replicas and two edges on one limit: never over it, whatever the timing.
    let exact = &run["exactness"];
    let admitted = exact["admitted"].as_array().unwrap();
    assert_eq!(admitted.len(), 4, "{exact}");
    assert!(exact["max_ratio"].as_f64().unwrap() <= 1.0, "{exact}");
    assert_eq!(exact["errors"].as_u64(), Some(0), "{exact}");
    assert!(markdown.contains("exactness: most calls admitted"));
    assert!(markdown.contains("verify-miss p99"));
    assert!(markdown.contains("| verify-ratelimited (Redis) |"));
    assert!(markdown.contains("| other replica (Postgres NOTIFY) |"));
}

/// `memory` alone: keys seeded by COPY, each verified once VALID (so each row and its
/// secret were written as IssueKey writes them) on a server counting the default limit,
/// and the RSS figure reported with its target.
#[test]
fn the_memory_scenario_verifies_every_seeded_key_once() {
    let (report, markdown) = run_bench(&[
        "--store",
        "postgres",
        "--scenario",
        "memory",
        "--miss-keys",
        "250",
    ]);
    let memory = &report["runs"][0]["memory"];
    assert_eq!(memory["keys"].as_u64(), Some(250), "{memory}");
    assert_eq!(memory["verified"].as_u64(), Some(250), "{memory}");
    assert_eq!(memory["errors"].as_u64(), Some(0), "{memory}");
    assert!(
        memory["bytes_per_verified_key"].as_f64().is_some(),
        "{memory}"
    );
    assert!(
        markdown.contains("RSS growth over 250 keys verified once each"),
        "{markdown}"
    );
    assert!(report["runs"][0]["verify_miss"].is_null());
}

/// `edge-verify` alone: the edge `Verifier` in process, its leases held after the
/// warm-up, both workloads counted, and the two target rows written.
#[test]
fn the_bench_measures_the_edge_verifier_against_a_hash_lookup() {
    let (report, markdown) = run_bench(&["--store", "sqlite", "--scenario", "edge-verify"]);
    let run = &report["runs"][0];
    let e = &run["edge_verify"];
    assert_eq!(e["keys"].as_u64(), Some(40), "{e}");
    assert_eq!(e["warmed"].as_bool(), Some(true), "{e}");
    let calls = e["calls"].as_u64().unwrap();
    assert!(calls > 0 && calls <= 300, "{e}");
    assert_eq!(e["errors"].as_u64(), Some(0), "{e}");
    assert!(e["hits"].as_u64().unwrap() <= calls, "{e}");
    let share = e["without_round_trip"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&share), "{e}");
    let hash_calls = e["hash_lookup_calls"].as_u64().unwrap();
    assert!(hash_calls > 0 && hash_calls <= 300, "{e}");
    assert!(e["throughput"].as_f64().unwrap() > 0.0, "{e}");
    assert!(e["over_hash_lookup"].as_f64().unwrap() > 0.0, "{e}");
    for other in ["noop", "verify_hit", "verify_ratelimited_memory", "streams"] {
        assert!(run[other].is_null(), "{other} ran: {run}");
    }
    assert!(markdown.contains("edge-verify calls without a round trip"));
    assert!(markdown.contains("edge-verify / hash lookup"));
    assert!(markdown.contains("## Edge verifier in process"));
}

/// `--target`: the bench drives a server it did not start (as from another machine), with
/// that server's own tokens, and runs only the hit-path scenarios.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_drives_an_already_running_server_with_target() {
    let app = common::TestApp::spawn(common::Backend::Sqlite).await;
    let target = app.server().addr().to_string();
    // The bench blocks on its child process; the server under test runs on this runtime.
    let (report, markdown) = tokio::task::spawn_blocking(move || {
        run_bench_with(
            &["--target", &target],
            &[
                ("KEYWARDEN_BENCH_ADMIN_TOKEN", common::ADMIN_TOKEN),
                ("KEYWARDEN_BENCH_VERIFIER_TOKEN", common::VERIFIER_TOKEN),
            ],
        )
    })
    .await
    .unwrap();
    let run = &report["runs"][0];
    assert_sane(run, "issue", 40);
    for scenario in [
        "noop",
        "noop_half_load",
        "verify_hit",
        "verify_hit_half_load",
    ] {
        assert_sane(run, scenario, 300);
        assert_server_cpu(run, scenario, false);
    }
    for skipped in [
        "verify_naive",
        "verify_miss",
        "revocation_latency",
        "streams",
        "edge_verify",
    ] {
        assert!(run[skipped].is_null(), "{skipped} ran with --target: {run}");
    }
    // The keys were issued on the target itself, in the workspace the bench made there:
    // the 40 measured, after the unmeasured warm-up of 4 rounds of the 4 callers.
    assert_eq!(
        app.db
            .count("SELECT COUNT(*) FROM api_keys WHERE workspace_id = 'ws_bench'")
            .await,
        40 + 4 * 4
    );
    assert!(markdown.contains("already running keywarden"), "{markdown}");
}

#[test]
fn target_without_its_tokens_is_refused() {
    let output = Command::new(env!("CARGO_BIN_EXE_keywarden"))
        .args(["bench", "--target", "127.0.0.1:9", "--no-h2load"])
        .env_remove("KEYWARDEN_BENCH_ADMIN_TOKEN")
        .env_remove("KEYWARDEN_BENCH_VERIFIER_TOKEN")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("KEYWARDEN_BENCH_ADMIN_TOKEN"), "{stderr}");
}
