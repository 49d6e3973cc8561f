//! The workspace's crates enforce the layers: what a crate may not depend on is checked
//! on its resolved dependency tree (`cargo tree -e normal`), so a forbidden crate pulled
//! in by any path fails here rather than in review.

use std::collections::BTreeSet;
use std::process::Command;

/// The crates `package` depends on at run time (normal edges only, every depth).
fn normal_dependencies(package: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "--locked",
            "-p",
            package,
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn assert_free_of(package: &str, forbidden: &[&str]) {
    let deps = normal_dependencies(package);
    assert!(
        deps.contains(package),
        "{package} not in its own tree: {deps:?}"
    );
    let found: Vec<_> = forbidden.iter().filter(|f| deps.contains(**f)).collect();
    assert!(
        found.is_empty(),
        "{package} depends on {found:?}, which its layer forbids"
    );
}

#[test]
fn the_domain_crate_pulls_in_no_runtime_database_or_transport() {
    assert_free_of("keywarden-domain", &["tokio", "sqlx", "tonic", "getrandom"]);
}

#[test]
fn the_edge_crate_carries_none_of_the_servers_dependencies() {
    assert_free_of(
        "keywarden-edge",
        &[
            "sqlx",
            "axum",
            "redis",
            "argon2",
            "aes-gcm",
            "opentelemetry_sdk",
            "metrics-exporter-prometheus",
            "clap",
            "keywarden",
        ],
    );
}

#[test]
fn the_check_sees_a_dependency_at_any_depth() {
    // The server reaches hyper only through tonic and axum: the check must see it.
    let deps = normal_dependencies("keywarden");
    for name in [
        "tokio",
        "sqlx",
        "tonic",
        "hyper",
        "redis",
        "clap",
        "keywarden-edge",
    ] {
        assert!(deps.contains(name), "{name} missing from {deps:?}");
    }
}
