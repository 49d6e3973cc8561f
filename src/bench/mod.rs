//! `keywarden bench`: the load generator and the benchmark report (BENCHMARKS.md).
//!
//! Each run starts the real `keywarden` binary as a child process over a fresh Postgres
//! database (or SQLite file), drives it with real tonic clients, and measures:
//! `issue`, `noop` (Ping: the transport's limit), `verify-hit`, `verify-hit` at half of its
//! peak rate, `verify-naive` (a second server on the same data with the cache off), and
//! `verify-miss` (every call a distinct key out of `--miss-keys` seeded keys), the limited
//! servers (`verify-ratelimited`, `verify-pooled`) in turns with their baselines, the
//! server's memory per verified key (`memory`: a million keys, once per `all`) and, when
//! `h2load` is installed, an independent client's noop / verify-hit throughput. The
//! revocation stream's scenarios (`revocation-latency`, `streams`) are in `stream.rs`;
//! `edge-verify` (the edge `Verifier` in this process, against a hash lookup) is in
//! `edge_verify.rs`.

pub mod bare;
mod connection;
mod cpu;
mod edge_verify;
mod exactness;
mod h2load;
mod load;
mod report;
mod seed;
mod server;
mod stream;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::{Args, ValueEnum};
use sqlx::Connection;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub use load::{LoadResult, LoadSpec};
pub use report::{BenchReport, RunReport};

use crate::api::auth::generate_token;
use crate::bearer::Bearer;
use crate::domain::key_format::{ApiKey, Brand, Environment};
use crate::proto;
use crate::proto::key_service_client::KeyServiceClient;
use crate::proto::team_service_client::TeamServiceClient;
use crate::proto::verify_service_client::VerifyServiceClient;
use crate::proto::workspace_service_client::WorkspaceServiceClient;
use connection::Http2;
use report::{BareFloor, MissFloor};
use server::{Launcher, Limits, ServerProcess, Tokens, UNREACHABLE_PER_MINUTE};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    All,
    Noop,
    VerifyHit,
    VerifyNaive,
    VerifyMiss,
    Issue,
    RevocationLatency,
    Streams,
    VerifyRatelimited,
    VerifyPooled,
    EdgeVerify,
    Exactness,
    /// Server memory per verified key with the default limit on (RSS growth over
    /// `--miss-keys` keys, each verified once). Seeding and verifying a million keys
    /// takes minutes, so `all` runs it in its last run only.
    Memory,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    Postgres,
    Sqlite,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Which scenario(s) to run.
    #[arg(long, value_enum, default_value = "all")]
    pub scenario: Scenario,
    /// The store the server under test uses.
    #[arg(long, value_enum, default_value = "postgres")]
    pub store: StoreKind,
    /// A Postgres database the benchmark may CREATE DATABASE from (it makes and drops its own).
    #[arg(
        long,
        env = "KEYWARDEN_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub postgres_url: String,
    /// Seconds per scenario.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Concurrent callers.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections the callers share.
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    /// Keys issued for the hit workloads.
    #[arg(long, default_value_t = 1000)]
    pub keys: usize,
    /// The Postgres connection pool of each server the benchmark starts
    /// (`database_max_connections`).
    #[arg(long, default_value_t = 32)]
    pub database_connections: u32,
    /// Keys seeded into Postgres for verify-miss (and for `--scenario memory`, which
    /// verifies each once).
    #[arg(long, default_value_t = 1_000_000)]
    pub miss_keys: usize,
    /// Redis for verify-ratelimited's shared counters (skipped when it does not answer).
    #[arg(
        long,
        env = "KEYWARDEN_BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Keys revoked one by one for revocation-latency.
    #[arg(long, default_value_t = 1000)]
    pub revocations: usize,
    /// Concurrent WatchRevocations streams opened on one replica for `streams`.
    #[arg(long, default_value_t = 10_000)]
    pub streams: usize,
    /// Key mix of the verify-hit workload, as weights: hit, miss (unknown), malformed, revoked.
    #[arg(long, default_value = "hit=100")]
    pub mix: String,
    /// Stop each scenario after this many calls (for smoke tests).
    #[arg(long)]
    pub max_requests: Option<u64>,
    /// Whole runs to make; the report shows medians.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Write the JSON result here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the Markdown report here (e.g. BENCHMARKS.md).
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Skip the independent h2load check even if h2load is installed.
    #[arg(long)]
    pub no_h2load: bool,
    /// Drive an already running server at HOST:PORT instead of starting one (a client on
    /// another machine than the server). Runs issue, noop, verify-hit and h2load; the
    /// scenarios that need a server of their own configuration are skipped. Keys are
    /// issued in workspace `ws_bench`, which is created if missing.
    #[arg(long, value_name = "HOST:PORT")]
    pub target: Option<String>,
    /// With --target: a caller token of the target with role admin.
    #[arg(long, env = "KEYWARDEN_BENCH_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// With --target: a caller token of the target with role verifier.
    #[arg(long, env = "KEYWARDEN_BENCH_VERIFIER_TOKEN", hide_env_values = true)]
    pub verifier_token: Option<String>,
}

/// The key mix of a verify workload, as cumulative weights out of their sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mix {
    pub hit: u32,
    pub miss: u32,
    pub malformed: u32,
    pub revoked: u32,
}

impl Mix {
    pub fn parse(s: &str) -> Result<Mix, String> {
        let mut mix = Mix {
            hit: 0,
            miss: 0,
            malformed: 0,
            revoked: 0,
        };
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}`: expected name=weight"))?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("`{part}`: weight must be an integer"))?;
            match name.trim() {
                "hit" => mix.hit = weight,
                "miss" => mix.miss = weight,
                "malformed" => mix.malformed = weight,
                "revoked" => mix.revoked = weight,
                other => {
                    return Err(format!(
                        "unknown mix entry `{other}` (hit, miss, malformed, revoked)"
                    ));
                }
            }
        }
        if mix.hit + mix.miss + mix.malformed + mix.revoked == 0 {
            return Err("the mix needs at least one non-zero weight".into());
        }
        Ok(mix)
    }

    fn total(&self) -> u32 {
        self.hit + self.miss + self.malformed + self.revoked
    }
}

type Verifier = VerifyServiceClient<InterceptedService<Http2, Bearer>>;
type Admin = KeyServiceClient<InterceptedService<Http2, Bearer>>;

struct Clients {
    verifiers: Vec<Verifier>,
    admins: Vec<Admin>,
}

async fn connect(
    server: &ServerProcess,
    tokens: &Tokens,
    connections: usize,
) -> Result<Clients, BoxError> {
    let admin = Bearer::indexed(&tokens.admin)?;
    let verifier = Bearer::indexed(&tokens.verifier)?;
    let mut clients = Clients {
        verifiers: Vec::new(),
        admins: Vec::new(),
    };
    let origin: http::Uri = format!("http://{}", server.addr).parse()?;
    for _ in 0..connections.max(1) {
        let connection = Http2::open(server.addr).await?;
        clients.verifiers.push(VerifyServiceClient::with_origin(
            InterceptedService::new(connection.clone(), verifier.clone()),
            origin.clone(),
        ));
        clients.admins.push(KeyServiceClient::with_origin(
            InterceptedService::new(connection, admin.clone()),
            origin.clone(),
        ));
    }
    Ok(clients)
}

/// A channel to `server` whose calls carry the admin token, for the services the
/// benchmark calls only to set up (workspaces, teams).
async fn admin_channel(
    server: &ServerProcess,
    tokens: &Tokens,
) -> Result<InterceptedService<Channel, Bearer>, BoxError> {
    let channel = Channel::from_shared(format!("http://{}", server.addr))?
        .connect()
        .await?;
    Ok(InterceptedService::new(
        channel,
        Bearer::indexed(&tokens.admin)?,
    ))
}

fn bench_actor() -> Option<proto::Actor> {
    Some(proto::Actor {
        id: "bench".into(),
        permissions: Vec::new(),
    })
}

/// A workspace benchmark keys live in (`ws_bench` for all but verify-pooled's), created
/// as an admin backend would.
async fn create_workspace(
    server: &ServerProcess,
    tokens: &Tokens,
    workspace_id: &str,
) -> Result<(), BoxError> {
    let created = WorkspaceServiceClient::new(admin_channel(server, tokens).await?)
        .create_workspace(proto::CreateWorkspaceRequest {
            workspace_id: workspace_id.into(),
            name: "bench".into(),
            plan: proto::Plan::Pro as i32,
            actor: bench_actor(),
        })
        .await;
    match created {
        // A server driven with --target may hold it from an earlier run.
        Err(status) if status.code() != tonic::Code::AlreadyExists => Err(status.into()),
        _ => Ok(()),
    }
}

fn issue_request(n: u64) -> proto::IssueKeyRequest {
    proto::IssueKeyRequest {
        workspace_id: "ws_bench".into(),
        name: format!("bench {n}"),
        environment: proto::Environment::Live as i32,
        scopes: vec!["read".into()],
        owner: Some(proto::Owner {
            kind: proto::OwnerKind::User as i32,
            id: "bench".into(),
        }),
        actor: Some(proto::Actor {
            id: "bench".into(),
            permissions: vec!["read".into()],
        }),
        ..Default::default()
    }
}

/// A database of the benchmark's own, dropped at the end.
struct BenchDb {
    admin_url: String,
    name: Option<String>,
    url: String,
    _dir: tempfile::TempDir,
}

impl BenchDb {
    async fn create(args: &BenchArgs) -> Result<BenchDb, BoxError> {
        let dir = tempfile::tempdir()?;
        match args.store {
            StoreKind::Sqlite => Ok(BenchDb {
                admin_url: String::new(),
                name: None,
                url: format!("sqlite://{}", dir.path().join("bench.db").display()),
                _dir: dir,
            }),
            StoreKind::Postgres => {
                let mut bytes = [0u8; 6];
                getrandom::fill(&mut bytes)?;
                let name = format!("kw_bench_{}", hex::encode(bytes));
                let mut conn = sqlx::PgConnection::connect(&args.postgres_url).await?;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await?;
                // What earlier runs (or anything else) left dirty is written out before
                // this run measures, not during it.
                seed::checkpoint(&mut conn).await;
                let base = args
                    .postgres_url
                    .rsplit_once('/')
                    .map_or(args.postgres_url.as_str(), |(b, _)| b);
                Ok(BenchDb {
                    admin_url: args.postgres_url.clone(),
                    url: format!("{base}/{name}"),
                    name: Some(name),
                    _dir: dir,
                })
            }
        }
    }

    async fn drop_database(self) {
        if let Some(name) = &self.name
            && let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin_url).await
        {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await;
        }
    }
}

/// Whether the run measures scenario `s` (the memory scenario: see [`run`]).
fn wants(args: &BenchArgs, s: Scenario) -> bool {
    (args.scenario == Scenario::All && s != Scenario::Memory) || args.scenario == s
}

/// The load of one scenario against `server`, at full speed.
fn spec(args: &BenchArgs, server: &ServerProcess) -> LoadSpec {
    LoadSpec {
        concurrency: args.concurrency.max(1),
        duration: Duration::from_secs_f64(args.duration.max(0.1)),
        max_requests: args.max_requests,
        rate: None,
        server_pid: server.pid(),
    }
}

fn print_line(name: &str, r: &LoadResult) {
    println!(
        "{name:<26} {:>9.0} req/s  p50 {:>6} µs  p90 {:>6} µs  p99 {:>6} µs  p99.9 {:>6} µs  errors {}",
        r.throughput, r.p50_us, r.p90_us, r.p99_us, r.p999_us, r.errors
    );
}

/// Runs the benchmark and writes its reports.
pub async fn run(args: BenchArgs, command: String) -> Result<BenchReport, BoxError> {
    let mix = Mix::parse(&args.mix)?;
    if args.scenario == Scenario::VerifyMiss && args.store != StoreKind::Postgres {
        return Err("verify-miss runs on Postgres (--store postgres)".into());
    }
    if args.scenario == Scenario::Memory && args.store != StoreKind::Postgres {
        return Err("memory runs on Postgres (--store postgres)".into());
    }
    let mut report = BenchReport {
        machine: machine(),
        command,
        store: format!("{:?}", args.store).to_lowercase(),
        concurrency: args.concurrency,
        connections: args.connections,
        duration_secs: args.duration,
        keys: args.keys,
        miss_keys: args.miss_keys,
        target: args.target.clone(),
        runs: Vec::new(),
    };
    for run in 0..args.runs.max(1) {
        println!("== run {} of {}", run + 1, args.runs.max(1));
        if let Some(target) = &args.target {
            report.runs.push(target_run(&args, mix, target).await?);
            continue;
        }
        // The memory scenario seeds and verifies a million keys: an `all` measures it once,
        // in its last run.
        let memory = args.scenario == Scenario::Memory
            || (args.scenario == Scenario::All
                && args.store == StoreKind::Postgres
                && run + 1 == args.runs.max(1));
        let db = BenchDb::create(&args).await?;
        let outcome = one_run(&args, mix, &db, memory).await;
        db.drop_database().await;
        report.runs.push(outcome?);
    }
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    }
    if let Some(md) = &args.markdown {
        std::fs::write(md, report.markdown())?;
    }
    Ok(report)
}

/// One run against an already running server (`--target`): the hit-path scenarios only,
/// since the others need servers of their own configuration.
async fn target_run(args: &BenchArgs, mix: Mix, target: &str) -> Result<RunReport, BoxError> {
    let (Some(admin), Some(verifier)) = (&args.admin_token, &args.verifier_token) else {
        return Err("--target needs the target's caller tokens: \
                    KEYWARDEN_BENCH_ADMIN_TOKEN (role admin) and \
                    KEYWARDEN_BENCH_VERIFIER_TOKEN (role verifier)"
            .into());
    };
    let addr = tokio::net::lookup_host(target)
        .await?
        .next()
        .ok_or_else(|| format!("--target {target}: no address"))?;
    let tokens = Tokens {
        admin: admin.clone(),
        verifier: verifier.clone(),
        edge: String::new(),
    };
    let server = ServerProcess::external(addr);
    let mut run = RunReport::default();
    hit_scenarios(args, mix, &server, &tokens, &mut run).await?;
    for scenario in [
        "verify-naive",
        "verify-ratelimited",
        "verify-pooled",
        "revocation-latency",
        "streams",
        "verify-miss",
        "edge-verify",
        "exactness",
    ] {
        println!("{scenario}: needs a server of its own configuration; skipped with --target");
    }
    Ok(run)
}

/// One run of the scenarios `args` asks for; `memory`: the memory scenario too.
async fn one_run(
    args: &BenchArgs,
    mix: Mix,
    db: &BenchDb,
    memory: bool,
) -> Result<RunReport, BoxError> {
    let tokens = Tokens {
        admin: generate_token()?,
        verifier: generate_token()?,
        edge: generate_token()?,
    };
    let mut run = RunReport::default();
    let launch = Launcher {
        dir: db._dir.path(),
        database_url: &db.url,
        tokens: &tokens,
        database_connections: args.database_connections,
    };
    let server = launch.start("cached", true, &Limits::Off).await?;
    let pools = hit_scenarios(args, mix, &server, &tokens, &mut run).await?;

    if wants(args, Scenario::VerifyNaive) {
        let naive = launch.start("naive", false, &Limits::Off).await?;
        let clients = connect(&naive, &tokens, args.connections).await?;
        let r = verify_mix(spec(args, &naive), &clients, &pools).await;
        print_line("verify-naive", &r);
        run.verify_naive = Some(r);
        if let Some(h) = run.h2load.as_mut() {
            match h2load::verify_rps(&naive, &tokens, &pools.hit[0], args).await {
                Ok(rps) => {
                    h.verify_naive_rps = rps;
                    println!("h2load: verify-naive {:.0} req/s", rps.unwrap_or(0.0));
                }
                Err(e) => println!("h2load (verify-naive) failed: {e}"),
            }
        }
        naive.stop().await;
    }

    if wants(args, Scenario::VerifyRatelimited) {
        let mut prefix = [0u8; 6];
        getrandom::fill(&mut prefix)?;
        let redis = Limits::Redis {
            url: args.redis_url.clone(),
            prefix: format!("kwbench_{}", hex::encode(prefix)),
        };
        for (name, limits) in [("memory", Limits::Memory), ("redis", redis)] {
            if let Limits::Redis { url, .. } = &limits
                && !redis_answers(url).await
            {
                println!("verify-ratelimited ({name}): Redis does not answer at {url}; skipped");
                continue;
            }
            let limited = launch
                .start(&format!("limited-{name}"), true, &limits)
                .await?;
            let clients = connect(&limited, &tokens, args.connections).await?;
            warm(&clients, &pools).await;
            // In turns with verify-hit on the unlimited server, so that the ratio is
            // taken over the same seconds (see `load::interleaved`).
            let hit_clients = connect(&server, &tokens, args.connections).await?;
            let (hit, r) = load::interleaved(
                &spec(args, &limited),
                INTERLEAVED_SLICES,
                |s| {
                    let s = LoadSpec {
                        server_pid: server.pid(),
                        ..s
                    };
                    let (clients, pools) = (&hit_clients, &pools);
                    async move { verify_valid(&s, clients, pools).await }
                },
                |s| {
                    let (clients, pools) = (&clients, &pools);
                    async move { verify_valid(&s, clients, pools).await }
                },
            )
            .await;
            print_line(&format!("verify-hit (beside ratelimited {name})"), &hit);
            print_line(&format!("verify-ratelimited ({name})"), &r);
            match name {
                "memory" => {
                    run.verify_ratelimited_memory = Some(r);
                    run.verify_hit_beside_memory = Some(hit);
                }
                _ => {
                    run.verify_ratelimited_redis = Some(r);
                    run.verify_hit_beside_redis = Some(hit);
                }
            }
            limited.stop().await;
        }
    }
    server.stop().await;

    if wants(args, Scenario::VerifyPooled) {
        pooled_scenario(args, &launch, &tokens, &pools, &mut run).await?;
    }

    if wants(args, Scenario::EdgeVerify) {
        // A limit no run reaches: every VALID answer carries a decision, so the edge
        // serves it only from a quota lease, which is what this scenario measures.
        let server = launch.start("edge", true, &Limits::Memory).await?;
        let outcome = edge_verify::run(
            &server,
            &tokens,
            &pools.hit,
            args.concurrency,
            Duration::from_secs_f64(args.duration.max(0.1)),
            args.max_requests,
        )
        .await;
        server.stop().await;
        let r = outcome?;
        println!(
            "edge-verify                {:>9.0} calls/s ({:.3} of a hash lookup's {:.0}); without a round trip {:.4} ({} server calls, {} lease calls of {}); errors {}",
            r.throughput,
            r.over_hash_lookup,
            r.hash_lookup_throughput,
            r.without_round_trip,
            r.server_calls,
            r.lease_calls,
            r.calls,
            r.errors
        );
        if !r.warmed {
            println!("edge-verify: not every key's lease was held after the warm-up");
        }
        run.edge_verify = Some(r);
    }

    if wants(args, Scenario::Exactness) {
        exactness_scenario(args, &launch, &tokens, &mut run).await?;
    }

    if wants(args, Scenario::RevocationLatency) || wants(args, Scenario::Streams) {
        let a = launch.start("stream-a", true, &Limits::Off).await?;
        if wants(args, Scenario::RevocationLatency) {
            // Another replica needs the shared Postgres (SQLite fans out in process only).
            let b = match args.store {
                StoreKind::Postgres => Some(launch.start("stream-b", true, &Limits::Off).await?),
                StoreKind::Sqlite => None,
            };
            let r = stream::revocation_latency(&a, b.as_ref(), &tokens, args.revocations).await?;
            let fmt = |s: &Option<stream::Spread>| {
                s.as_ref().map_or("n/a".to_owned(), |s| {
                    format!("p50 {} µs, p99 {} µs", s.p50_us, s.p99_us)
                })
            };
            println!(
                "revocation-latency         same replica {}; other replica {}; missed {}",
                fmt(&r.same_replica),
                fmt(&r.other_replica),
                r.missed
            );
            run.revocation_latency = Some(r);
            if let Some(b) = b {
                b.stop().await;
            }
        }
        if wants(args, Scenario::Streams) {
            let r = stream::streams(&a, &tokens, args.streams).await?;
            println!(
                "streams                    {} of {} open in {:.1} s, {} bytes per stream, fan-out p99 {} µs, missed {}",
                r.opened,
                r.requested,
                r.open_seconds,
                r.bytes_per_stream
                    .map_or("n/a".to_owned(), |b| format!("{b:.0}")),
                r.fanout.as_ref().map_or(0, |f| f.p99_us),
                r.missed
            );
            run.streams = Some(r);
        }
        a.stop().await;
    }

    if memory {
        run.memory = Some(memory_scenario(args, db, &launch, &tokens).await?);
    }

    if wants(args, Scenario::VerifyMiss) && args.store == StoreKind::Postgres {
        let keys = Arc::new(seed::seed_keys(&db.url, args.miss_keys, seed::Then::Settle).await?);
        let server = launch.start("miss", true, &Limits::Off).await?;
        let clients = Arc::new(connect(&server, &tokens, args.connections).await?);
        let next = Arc::new(AtomicUsize::new(0));
        let spec = LoadSpec {
            max_requests: Some(args.max_requests.unwrap_or(u64::MAX).min(keys.len() as u64)),
            ..spec(args, &server)
        };
        // Each call presents a key no call presented before (never cached).
        let miss = {
            let (clients, keys, next) = (clients.clone(), keys.clone(), next.clone());
            move |task: usize, _| {
                let mut client = clients.verifiers[task % clients.verifiers.len()].clone();
                let i = next.fetch_add(1, Ordering::Relaxed) % keys.len();
                let key = keys[i].clone();
                async move { expect_valid(&mut client, key).await }
            }
        };
        let r = load::run(&spec, miss.clone()).await;
        print_line("verify-miss", &r);
        // Seeded keys no call has presented yet.
        let unpresented = || keys.len().saturating_sub(next.load(Ordering::Relaxed)) as u64;
        // The latency target is for a server that is not saturated: half of that peak,
        // on keys not presented yet.
        let left = unpresented();
        let half = LoadSpec {
            max_requests: Some(spec.max_requests.unwrap_or(u64::MAX).min(left)),
            ..spec.half_of(&r)
        };
        run.verify_miss = Some(r);
        if left > 0 {
            let r = load::run(&half, miss.clone()).await;
            print_line("verify-miss at half load", &r);
            run.verify_miss_half_load = Some(r);
        }
        // The database's own floor for a miss: the statement a miss issues, by hash, on
        // keys not presented yet, through a pool of the server's size, in turns with
        // verify-miss (the same seconds).
        let left = unpresented();
        if left >= 2 {
            // Without sqlx's default ping before every acquire (a second round trip per
            // lookup), as the server's pool (`store::postgres`): the floor is the lookup.
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(args.database_connections)
                .test_before_acquire(false)
                .connect(&db.url)
                .await?;
            let floor = {
                let (pool, keys, next) = (pool.clone(), keys.clone(), next.clone());
                move |_, _| {
                    let pool = pool.clone();
                    let i = next.fetch_add(1, Ordering::Relaxed) % keys.len();
                    let hash = crate::domain::key_format::KeyHash::of(&keys[i]);
                    async move {
                        match sqlx::query(crate::store::FIND_SECRET)
                            .bind(&hash.as_bytes()[..])
                            .fetch_optional(&pool)
                            .await
                        {
                            Ok(Some(_)) => Ok(()),
                            Ok(None) => Err("a seeded key's secret was not found".to_owned()),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                }
            };
            // Each workload takes keys of its own: at most half of those left, so that no
            // key is presented twice (a second time would be a cache hit).
            let turns = LoadSpec {
                max_requests: Some(spec.max_requests.unwrap_or(u64::MAX).min(left / 2)),
                ..spec.clone()
            };
            let (m, f) = load::interleaved(
                &turns,
                INTERLEAVED_SLICES,
                |s| {
                    let call = miss.clone();
                    async move { load::run(&s, call).await }
                },
                |s| {
                    let call = floor.clone();
                    async move { load::run(&s, call).await }
                },
            )
            .await;
            pool.close().await;
            print_line("verify-miss (beside the database)", &m);
            print_line("the database's lookup by hash", &f);
            run.miss_floor = Some(MissFloor {
                verify_miss: m,
                database: f,
            });
        }
        server.stop().await;
    }
    Ok(run)
}

/// Server memory per verified key, as the design's target counts it: the cache entry,
/// the key's rate-limit counters and its usage record, so the server runs with the
/// deployment's default limit (100 requests a minute) counted in memory. `--miss-keys`
/// keys are seeded, then each is verified once (a miss that fills the cache, a
/// rate-limit decision, the use noted): the RSS growth over the run, per key verified.
/// The cache holds every key (its bound is set above the count, its TTL and so the usage
/// book's idle time past the run), so the figure is for all of them held at once.
async fn memory_scenario(
    args: &BenchArgs,
    db: &BenchDb,
    launch: &Launcher<'_>,
    tokens: &Tokens,
) -> Result<report::MemoryReport, BoxError> {
    let keys = Arc::new(seed::seed_keys(&db.url, args.miss_keys, seed::Then::Leave).await?);
    let cache = format!(
        "max_keys = {}\nttl_seconds = 7200\n",
        keys.len().saturating_mul(2).max(1)
    );
    let server = launch
        .start_with("memory", true, &Limits::Default, &cache)
        .await?;
    let clients = Arc::new(connect(&server, tokens, args.connections).await?);
    let next = Arc::new(AtomicUsize::new(0));
    let spec = LoadSpec {
        // Every key once, however long it takes.
        duration: Duration::from_secs(24 * 3600),
        max_requests: Some(args.max_requests.unwrap_or(u64::MAX).min(keys.len() as u64)),
        ..spec(args, &server)
    };
    let rss_before = server.rss_bytes();
    let r = load::run(&spec, {
        let (clients, keys, next) = (clients.clone(), keys.clone(), next.clone());
        move |task: usize, _| {
            let mut client = clients.verifiers[task % clients.verifiers.len()].clone();
            let i = next.fetch_add(1, Ordering::Relaxed) % keys.len();
            let key = keys[i].clone();
            async move { expect_valid(&mut client, key).await }
        }
    })
    .await;
    let rss_after = server.rss_bytes();
    server.stop().await;
    let verified = r.requests.saturating_sub(r.errors);
    let bytes_per_verified_key = match (rss_before, rss_after) {
        (Some(before), Some(after)) if verified > 0 => {
            Some(after.saturating_sub(before) as f64 / verified as f64)
        }
        _ => None,
    };
    println!(
        "memory                     {} keys verified in {:.1} s ({} errors): {} bytes of RSS per verified key (target <= 512)",
        verified,
        r.seconds,
        r.errors,
        bytes_per_verified_key.map_or("n/a".to_owned(), |b| format!("{b:.0}"))
    );
    Ok(report::MemoryReport {
        keys: keys.len(),
        verified,
        errors: r.errors,
        seconds: r.seconds,
        rss_before,
        rss_after,
        bytes_per_verified_key,
    })
}

/// The scenarios on the caching server: issue (the hit keys), noop, verify-hit at full
/// and half load, and h2load's check. Returns the key pools the later scenarios use.
async fn hit_scenarios(
    args: &BenchArgs,
    mix: Mix,
    server: &ServerProcess,
    tokens: &Tokens,
    run: &mut RunReport,
) -> Result<Arc<KeyPools>, BoxError> {
    let clients = Arc::new(connect(server, tokens, args.connections).await?);
    create_workspace(server, tokens, "ws_bench").await?;

    // Keys for the hit workloads, issued through the API (this is also the issue scenario).
    let issue_spec = issue_spec(args, server, args.keys);
    // A server just started opens its database connections, and prepares its statements
    // on each, as the first calls come: a few rounds of calls first, unmeasured, so that
    // the issue figure is the steady state's, not the server's start.
    let warm_up = LoadSpec {
        max_requests: Some(issue_spec.concurrency as u64 * ISSUE_WARM_UP_ROUNDS),
        ..issue_spec.clone()
    };
    issue_keys(&warm_up, &clients, issue_request).await;
    let (result, issued) = issue_keys(&issue_spec, &clients, issue_request).await;
    if wants(args, Scenario::Issue) {
        print_line("issue", &result);
        run.issue = Some(result);
    }
    if issued.is_empty() {
        return Err("no key could be issued".into());
    }
    let pools = Arc::new(KeyPools::build(&issued, mix, &clients).await?);
    warm(&clients, &pools).await;

    // Full load: noop and verify-hit in turns of a fifth of the duration each, so that
    // their ratio is taken over the same seconds (see `load::interleaved`).
    let (noop_full, hit_full) = match (
        wants(args, Scenario::Noop),
        wants(args, Scenario::VerifyHit),
    ) {
        (true, true) => {
            let (r, h) = load::interleaved(
                &spec(args, server),
                INTERLEAVED_SLICES,
                |s| noop(s, &clients),
                |s| verify_mix(s, &clients, &pools),
            )
            .await;
            (Some(r), Some(h))
        }
        (true, false) => (Some(noop(spec(args, server), &clients).await), None),
        (false, true) => (
            None,
            Some(verify_mix(spec(args, server), &clients, &pools).await),
        ),
        (false, false) => (None, None),
    };
    if let Some(r) = noop_full {
        print_line("noop", &r);
        // The same pacing as verify-hit's half-load run: the tail the transport, the
        // client and this machine impose on any RPC, which VerifyKey's cannot beat.
        let half = spec(args, server).half_of(&r);
        run.noop = Some(r);
        let r = noop(half, &clients).await;
        print_line("noop at half load", &r);
        run.noop_half_load = Some(r);
    }
    if let Some(r) = hit_full {
        print_line("verify-hit", &r);
        let half = spec(args, server).half_of(&r);
        run.verify_hit = Some(r);
        let r = verify_mix(half, &clients, &pools).await;
        print_line("verify-hit at half load", &r);
        run.verify_hit_half_load = Some(r);
    }
    // The transport's floor, beside each: a bare tonic no-op server (only where this
    // benchmark starts the servers, on this machine).
    if wants(args, Scenario::Noop) && wants(args, Scenario::VerifyHit) && server.pid().is_some() {
        let bare = bare::start().await?;
        let bare_clients = Arc::new(connect(&bare, tokens, args.connections).await?);
        let on_bare = |s: LoadSpec| LoadSpec {
            server_pid: bare.pid(),
            ..s
        };
        let (b, p) = load::interleaved(
            &spec(args, server),
            INTERLEAVED_SLICES,
            |s| noop(on_bare(s), &bare_clients),
            |s| noop(s, &clients),
        )
        .await;
        print_line("bare no-op (beside Ping)", &b);
        print_line("noop (beside bare)", &p);
        let (b2, h) = load::interleaved(
            &spec(args, server),
            INTERLEAVED_SLICES,
            |s| noop(on_bare(s), &bare_clients),
            |s| verify_mix(s, &clients, &pools),
        )
        .await;
        print_line("bare no-op (beside hit)", &b2);
        print_line("verify-hit (beside bare)", &h);
        run.bare = Some(BareFloor {
            bare_beside_noop: b,
            noop: p,
            bare_beside_hit: b2,
            verify_hit: h,
        });
        let h2 = if !args.no_h2load && args.scenario == Scenario::All {
            h2load::bare_rps(&bare, args).await
        } else {
            Ok(None)
        };
        bare.stop().await;
        match h2 {
            Ok(Some(rps)) => {
                println!("h2load: bare no-op {rps:.0} req/s");
                run.h2load_bare_rps = Some(rps);
            }
            Ok(None) => {}
            Err(e) => println!("h2load on the bare server failed: {e}"),
        }
    }
    if !args.no_h2load && args.scenario == Scenario::All {
        match h2load::measure(server, tokens, &pools.hit[0], args).await {
            Ok(Some(h)) => {
                println!(
                    "h2load: noop {:.0} req/s, verify-hit {:.0} req/s",
                    h.noop_rps, h.verify_hit_rps
                );
                run.h2load = Some(h);
            }
            Ok(None) => println!("h2load not installed: independent check skipped"),
            Err(e) => println!("h2load failed: {e}"),
        }
    }
    Ok(pools)
}

async fn expect_valid(client: &mut Verifier, key: String) -> Result<(), String> {
    let r = client
        .verify_key(proto::VerifyKeyRequest {
            key,
            required_scopes: Vec::new(),
            cost: 0,
            resource: String::new(),
            client_ip: String::new(),
        })
        .await
        .map_err(|e| e.to_string())?;
    if r.get_ref().valid {
        Ok(())
    } else {
        Err(format!("unexpected answer {:?}", r.get_ref().code))
    }
}

/// The keys a verify workload presents, by kind.
struct KeyPools {
    hit: Vec<String>,
    miss: Vec<String>,
    malformed: Vec<String>,
    revoked: Vec<String>,
    mix: Mix,
}

impl KeyPools {
    async fn build(
        issued: &[(String, String)],
        mix: Mix,
        clients: &Clients,
    ) -> Result<KeyPools, BoxError> {
        // A tenth of the issued keys are revoked when the mix asks for revoked keys.
        let revoked_count = if mix.revoked > 0 {
            (issued.len() / 10).max(1)
        } else {
            0
        };
        let mut admin = clients.admins[0].clone();
        let mut revoked = Vec::new();
        for (key, key_id) in &issued[..revoked_count.min(issued.len().saturating_sub(1))] {
            admin
                .revoke_key(proto::RevokeKeyRequest {
                    key_id: key_id.clone(),
                    actor: Some(proto::Actor {
                        id: "bench".into(),
                        permissions: Vec::new(),
                    }),
                    reason: "bench".into(),
                })
                .await?;
            revoked.push(key.clone());
        }
        let hit: Vec<String> = issued[revoked.len()..]
            .iter()
            .map(|(k, _)| k.clone())
            .collect();
        let mut miss = Vec::new();
        for _ in 0..1000 {
            miss.push(
                ApiKey::generate(&mut getrandom::SysRng, &Brand::default(), Environment::Live)?
                    .expose()
                    .to_owned(),
            );
        }
        let malformed = hit
            .iter()
            .take(1000)
            .map(|k| format!("{}x", &k[..k.len() - 1]))
            .collect();
        Ok(KeyPools {
            hit,
            miss,
            malformed,
            revoked,
            mix,
        })
    }

    fn pick(&self, task: usize, n: u64) -> &str {
        let slot =
            ((task as u64).wrapping_mul(7919).wrapping_add(n) % u64::from(self.mix.total())) as u32;
        let m = &self.mix;
        let pool = if slot < m.hit {
            &self.hit
        } else if slot < m.hit + m.miss {
            &self.miss
        } else if slot < m.hit + m.miss + m.malformed {
            &self.malformed
        } else {
            &self.revoked
        };
        let pool = if pool.is_empty() { &self.hit } else { pool };
        &pool[(n as usize).wrapping_mul(31).wrapping_add(task) % pool.len()]
    }
}

/// The load that issues `count` keys: at most 16 callers, until all are issued.
fn issue_spec(args: &BenchArgs, server: &ServerProcess, count: usize) -> LoadSpec {
    LoadSpec {
        max_requests: Some(count as u64),
        duration: Duration::from_secs(600),
        concurrency: args.concurrency.clamp(1, 16),
        ..spec(args, server)
    }
}

/// Calls per caller of the issue scenario made before it is measured.
const ISSUE_WARM_UP_ROUNDS: u64 = 4;

/// IssueKey of `request(n)` under `spec`: the run's figures, and each key issued with its
/// id.
async fn issue_keys(
    spec: &LoadSpec,
    clients: &Arc<Clients>,
    request: fn(u64) -> proto::IssueKeyRequest,
) -> (LoadResult, Vec<(String, String)>) {
    let issued = Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let result = {
        let (clients, issued) = (clients.clone(), issued.clone());
        load::run(spec, move |task, n| {
            let mut admin = clients.admins[task % clients.admins.len()].clone();
            let issued = issued.clone();
            async move {
                let r = admin
                    .issue_key(request(n))
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                let key_id = r.key_info.map(|i| i.key_id).unwrap_or_default();
                if let Ok(mut v) = issued.lock() {
                    v.push((r.key, key_id));
                }
                Ok(())
            }
        })
        .await
    };
    let issued = issued
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default();
    (result, issued)
}

/// Verifies every key once, so the measured runs start with a filled cache.
async fn warm(clients: &Clients, pools: &KeyPools) {
    let mut client = clients.verifiers[0].clone();
    for key in pools.hit.iter().chain(&pools.miss).chain(&pools.revoked) {
        let _ = client
            .verify_key(proto::VerifyKeyRequest {
                key: key.clone(),
                required_scopes: Vec::new(),
                cost: 0,
                resource: String::new(),
                client_ip: String::new(),
            })
            .await;
    }
}

/// Ping at `spec`'s load (the spec by value, so that a turn of `load::interleaved` can
/// hand it over).
async fn noop(spec: LoadSpec, clients: &Arc<Clients>) -> LoadResult {
    let clients = clients.clone();
    load::run(&spec, move |task, _| {
        let mut client = clients.verifiers[task % clients.verifiers.len()].clone();
        async move {
            client
                .ping(proto::PingRequest {})
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await
}

/// Turns of noop and verify-hit at full load (see `hit_scenarios`).
const INTERLEAVED_SLICES: u32 = 5;

async fn verify_mix(spec: LoadSpec, clients: &Clients, pools: &Arc<KeyPools>) -> LoadResult {
    let verifiers = Arc::new(clients.verifiers.clone());
    let pools = pools.clone();
    load::run(&spec, move |task, n| {
        let mut client = verifiers[task % verifiers.len()].clone();
        let key = pools.pick(task, n).to_owned();
        async move {
            client
                .verify_key(proto::VerifyKeyRequest {
                    key,
                    required_scopes: Vec::new(),
                    cost: 0,
                    resource: String::new(),
                    client_ip: String::new(),
                })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await
}

/// Verify-hit where every answer must be VALID (and carry a rate-limit decision when the
/// server applies limits): a limit reached by accident would show as errors.
async fn verify_valid(spec: &LoadSpec, clients: &Clients, pools: &Arc<KeyPools>) -> LoadResult {
    let verifiers = Arc::new(clients.verifiers.clone());
    let pools = pools.clone();
    load::run(spec, move |task, n| {
        let mut client = verifiers[task % verifiers.len()].clone();
        let key =
            pools.hit[(n as usize).wrapping_mul(31).wrapping_add(task) % pools.hit.len()].clone();
        async move { expect_valid(&mut client, key).await }
    })
    .await
}

/// `exactness`: two replicas leasing from one Redis, two edges leasing from them.
async fn exactness_scenario(
    args: &BenchArgs,
    launch: &Launcher<'_>,
    tokens: &Tokens,
    run: &mut RunReport,
) -> Result<(), BoxError> {
    if args.store != StoreKind::Postgres {
        println!("exactness: two replicas need the shared Postgres; skipped");
        return Ok(());
    }
    if !redis_answers(&args.redis_url).await {
        println!(
            "exactness: Redis does not answer at {}; skipped",
            args.redis_url
        );
        return Ok(());
    }
    let mut prefix = [0u8; 6];
    getrandom::fill(&mut prefix)?;
    let redis = Limits::Redis {
        url: args.redis_url.clone(),
        prefix: format!("kwbench_{}", hex::encode(prefix)),
    };
    let a = launch.start("exact-a", true, &redis).await?;
    let b = launch.start("exact-b", true, &redis).await?;
    let outcome = exactness::run(
        &a,
        &b,
        tokens,
        Duration::from_secs_f64(args.duration.max(0.1)),
    )
    .await;
    a.stop().await;
    b.stop().await;
    let r = outcome?;
    println!(
        "exactness                  admitted per key over its limit of {}/min: most {:.3}, least {:.3} ({:?} in {:.1} s; {} calls, errors {})",
        r.limit, r.max_ratio, r.min_ratio, r.admitted, r.seconds, r.calls, r.errors
    );
    run.exactness = Some(r);
    Ok(())
}

/// verify-pooled's keys: each in this workspace and this team, both with a pool.
const POOLED_WORKSPACE: &str = "ws_pooled";
const POOLED_TEAM: &str = "team_pooled";

/// The hit keys' request in the pooled workspace and team, by an actor who is also an
/// admin: the team's self-service is off, as a team's is by default.
fn pooled_issue_request(n: u64) -> proto::IssueKeyRequest {
    let mut request = issue_request(n);
    request.workspace_id = POOLED_WORKSPACE.into();
    request.team_id = POOLED_TEAM.into();
    if let Some(actor) = request.actor.as_mut() {
        actor
            .permissions
            .push(crate::domain::actor::ADMIN_PERMISSION.into());
    }
    request
}

/// `verify-pooled`: VerifyKey on cached keys that count against their own limit, their
/// team's pool and their workspace's pool, in turns with the hit keys, which count
/// against their own limit only, on one server counting in memory (the load of
/// verify-ratelimited's). Every limit is one no run reaches, so what the ratio shows is
/// what judging two more counters costs a call.
async fn pooled_scenario(
    args: &BenchArgs,
    launch: &Launcher<'_>,
    tokens: &Tokens,
    own: &Arc<KeyPools>,
    run: &mut RunReport,
) -> Result<(), BoxError> {
    let server = launch.start("pooled", true, &Limits::Memory).await?;
    create_pools(&server, tokens).await?;
    let clients = Arc::new(connect(&server, tokens, args.connections).await?);
    let (_, issued) = issue_keys(
        &issue_spec(args, &server, own.hit.len()),
        &clients,
        pooled_issue_request,
    )
    .await;
    if issued.len() < own.hit.len() {
        // One more, for the reason.
        let why = clients.admins[0]
            .clone()
            .issue_key(pooled_issue_request(0))
            .await
            .err()
            .map_or_else(String::new, |e| format!(": {e}"));
        return Err(format!(
            "verify-pooled: {} of {} pooled keys issued{why}",
            issued.len(),
            own.hit.len()
        )
        .into());
    }
    let pooled = Arc::new(KeyPools::build(&issued, Mix::parse("hit=1")?, &clients).await?);
    warm(&clients, own).await;
    warm(&clients, &pooled).await;
    // What each side counts against, read off one answer of each before measuring.
    for (keys, expected) in [
        (own, &[proto::LimitScope::Key][..]),
        (
            &pooled,
            &[
                proto::LimitScope::Key,
                proto::LimitScope::Team,
                proto::LimitScope::Workspace,
            ][..],
        ),
    ] {
        let scopes = limit_scopes(&clients, &keys.hit[0]).await?;
        if scopes != expected {
            return Err(format!(
                "verify-pooled: a key counted against {scopes:?}, expected {expected:?}"
            )
            .into());
        }
    }
    let (own_only, r) = load::interleaved(
        &spec(args, &server),
        INTERLEAVED_SLICES,
        |s| {
            let (clients, own) = (&clients, own);
            async move { verify_valid(&s, clients, own).await }
        },
        |s| {
            let (clients, pooled) = (&clients, &pooled);
            async move { verify_valid(&s, clients, pooled).await }
        },
    )
    .await;
    server.stop().await;
    print_line("verify-hit, own limit only", &own_only);
    print_line("verify-pooled", &r);
    println!(
        "verify-pooled / own limit only: {:.3}",
        r.throughput / own_only.throughput.max(f64::EPSILON)
    );
    run.verify_pooled = Some(r);
    run.verify_own_limit_beside_pooled = Some(own_only);
    Ok(())
}

/// A workspace pool and a team pool that no run reaches, for verify-pooled's keys.
async fn create_pools(server: &ServerProcess, tokens: &Tokens) -> Result<(), BoxError> {
    create_workspace(server, tokens, POOLED_WORKSPACE).await?;
    let channel = admin_channel(server, tokens).await?;
    let pool = vec![proto::RateLimit {
        unit: proto::RateLimitUnit::Requests as i32,
        window: proto::RateLimitWindow::Minute as i32,
        limit: UNREACHABLE_PER_MINUTE,
    }];
    let mask = || {
        Some(prost_types::FieldMask {
            paths: vec!["rate_limits".into()],
        })
    };
    WorkspaceServiceClient::new(channel.clone())
        .update_workspace(proto::UpdateWorkspaceRequest {
            workspace_id: POOLED_WORKSPACE.into(),
            actor: bench_actor(),
            rate_limits: pool.clone(),
            update_mask: mask(),
            ..Default::default()
        })
        .await?;
    let mut teams = TeamServiceClient::new(channel);
    teams
        .create_team(proto::CreateTeamRequest {
            workspace_id: POOLED_WORKSPACE.into(),
            team_id: POOLED_TEAM.into(),
            name: "bench".into(),
            policy: None,
            actor: bench_actor(),
        })
        .await?;
    teams
        .update_team(proto::UpdateTeamRequest {
            workspace_id: POOLED_WORKSPACE.into(),
            team_id: POOLED_TEAM.into(),
            actor: bench_actor(),
            rate_limits: pool,
            update_mask: mask(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// The scopes of the windows one VerifyKey of `key` counted against.
async fn limit_scopes(clients: &Clients, key: &str) -> Result<Vec<proto::LimitScope>, BoxError> {
    let r = clients.verifiers[0]
        .clone()
        .verify_key(proto::VerifyKeyRequest {
            key: key.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    if !r.valid {
        return Err(format!("verify-pooled: unexpected answer {:?}", r.code).into());
    }
    Ok(r.rate_limit
        .map(|d| d.windows.iter().map(|w| w.scope()).collect())
        .unwrap_or_default())
}

async fn redis_answers(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let ping = async {
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING").query_async::<String>(&mut c).await.ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), ping).await,
        Ok(Some(_))
    )
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!("{cores} cores ({cpu}), {mem_gib:.0} GiB, Linux")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_parse_and_refuse_nonsense() {
        assert_eq!(
            Mix::parse("hit=90,miss=5,malformed=5").unwrap(),
            Mix {
                hit: 90,
                miss: 5,
                malformed: 5,
                revoked: 0
            }
        );
        assert!(Mix::parse("hit=0").is_err());
        assert!(Mix::parse("hits=1").is_err());
        assert!(Mix::parse("hit=x").is_err());
    }
}
