//! The server under test: the same `keywarden` binary, started as a child process with a
//! generated configuration, so the benchmark measures exactly what is deployed.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::BoxError;
use crate::domain::key_format::KeyHash;

pub struct ServerProcess {
    /// `None` for a server this benchmark did not start (`--target`).
    child: Option<Child>,
    pub addr: SocketAddr,
}

/// The rate limits the server under test applies.
#[derive(Clone, Debug)]
pub enum Limits {
    /// No limits at all (no deployment default): the bare verification.
    Off,
    /// A limit no run reaches, counted in the server's memory: the decision's own cost.
    Memory,
    /// The same, counted in Redis (one script call per decision).
    Redis { url: String, prefix: String },
    /// The deployment's default limit (100 requests a minute), counted in memory: what a
    /// server configured with nothing of its own counts for every key.
    Default,
}

/// Requests a minute no run reaches: the limit of the limited servers' deployment default,
/// and of verify-pooled's pools.
pub const UNREACHABLE_PER_MINUTE: u64 = 1_000_000_000_000;

impl Limits {
    fn config(&self) -> String {
        let unreachable = format!(
            "default = [{{ unit = \"requests\", window = \"minute\", limit = {UNREACHABLE_PER_MINUTE} }}]\n"
        );
        match self {
            Limits::Off => "[rate_limits]\ndefault = []\n".to_owned(),
            Limits::Default => String::new(),
            Limits::Memory => format!("[rate_limits]\n{unreachable}"),
            Limits::Redis { url, prefix } => format!(
                "[rate_limits]\n{unreachable}backend = \"redis\"\nredis_url = \"{url}\"\n\
                 redis_prefix = \"{prefix}\"\nredis_failure = \"closed\"\n"
            ),
        }
    }
}

pub struct Tokens {
    pub admin: String,
    pub verifier: String,
    pub edge: String,
}

/// What every server of one benchmark run shares: where its files go, its database, the
/// callers' tokens and the pool size. Servers differ only in what a scenario needs.
pub struct Launcher<'a> {
    pub dir: &'a Path,
    pub database_url: &'a str,
    pub tokens: &'a Tokens,
    pub database_connections: u32,
}

impl Launcher<'_> {
    /// Starts `keywarden serve` on a free loopback port: `name` names its configuration
    /// file, `cache_enabled` off makes the naive server, `limits` the rate limits.
    pub async fn start(
        &self,
        name: &str,
        cache_enabled: bool,
        limits: &Limits,
    ) -> Result<ServerProcess, BoxError> {
        self.start_with(name, cache_enabled, limits, "").await
    }

    /// [`Launcher::start`], with `cache` added to the server's `[cache]` section (lines of
    /// TOML, e.g. its size and TTL).
    pub async fn start_with(
        &self,
        name: &str,
        cache_enabled: bool,
        limits: &Limits,
        cache: &str,
    ) -> Result<ServerProcess, BoxError> {
        let Launcher {
            dir,
            database_url,
            tokens,
            database_connections,
        } = *self;
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\ndatabase_url = \"{database_url}\"\n\
                 database_max_connections = {database_connections}\n\n\
                 [[tokens]]\nname = \"bench-admin\"\nsha256 = \"{}\"\nroles = [\"admin\"]\n\n\
                 [[tokens]]\nname = \"bench-verifier\"\nsha256 = \"{}\"\nroles = [\"verifier\"]\n\n\
                 [[tokens]]\nname = \"bench-edge\"\nsha256 = \"{}\"\nroles = [\"edge\"]\n\n\
                 [cache]\nenabled = {cache_enabled}\n{cache}\n{}",
                KeyHash::of(&tokens.admin).to_hex(),
                KeyHash::of(&tokens.verifier).to_hex(),
                KeyHash::of(&tokens.edge).to_hex(),
                limits.config(),
            ),
        )?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .env_remove("KEYWARDEN_DATABASE_URL");
        ServerProcess::spawn(command, Duration::from_secs(60)).await
    }
}

impl ServerProcess {
    /// A server started by someone else, at `addr`: never stopped by the benchmark.
    pub fn external(addr: SocketAddr) -> ServerProcess {
        ServerProcess { child: None, addr }
    }

    /// Starts `command` (this binary, serving on a free port) and waits, at most
    /// `timeout`, for the `listening on <addr>` line it prints once bound.
    pub async fn spawn(mut command: Command, timeout: Duration) -> Result<ServerProcess, BoxError> {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(timeout, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    return Ok::<_, BoxError>(addr.trim().parse()?);
                }
            }
            Err("server exited before listening".into())
        })
        .await??;
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(ServerProcess {
            child: Some(child),
            addr,
        })
    }

    /// The server's process id, if this benchmark started it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref()?.id()
    }

    /// Resident memory of the server process, in bytes (Linux).
    pub fn rss_bytes(&self) -> Option<u64> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    pub async fn stop(mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill().await;
        }
    }
}
