//! The `keywarden` binary: `serve` (production, or `--dev` on embedded SQLite),
//! `migrate`, and the admin CLI (`keys`, `verify`, ... in `keywarden::cli`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keywarden::api::auth::{Role, TokenEntry, generate_token};
use keywarden::clock::Clock;
use keywarden::config::{Config, LogFormat, Settings, TracingConfig};
use keywarden::domain::key_format::KeyHash;
use keywarden::telemetry::Telemetry;
use secrecy::{ExposeSecret, SecretString};

/// jemalloc, not glibc's malloc: a server holding a million cached keys keeps them in
/// small allocations made among a miss's short-lived ones, and glibc's arenas could not
/// give the holes back: 903 bytes of RSS per verified key at 1 000 000 keys against 475
/// with jemalloc, for the same 391 bytes of heap (`keywarden bench --scenario memory`;
/// see src/bench/notes.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "keywarden",
    version,
    about = "The credential authority for API keys"
)]
struct Cli {
    #[command(subcommand)]
    command: TopLevel,
}

/// The server's own commands, then the admin CLI's (clients of a running server).
#[derive(Subcommand)]
enum TopLevel {
    #[command(flatten)]
    Server(Command),
    #[command(flatten)]
    Admin(keywarden::cli::AdminCommand),
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server.
    Serve {
        /// Development mode: SQLite in --data-dir, fresh caller tokens printed at start.
        #[arg(long)]
        dev: bool,
        /// A TOML configuration file (overridden by KEYWARDEN_* variables).
        #[arg(long, env = "KEYWARDEN_CONFIG")]
        config: Option<PathBuf>,
        /// Where dev mode keeps its SQLite database.
        #[arg(long, default_value = "./keywarden-data")]
        data_dir: PathBuf,
        /// Address to listen on (overrides the configuration).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Run the database migrations and exit.
    Migrate {
        #[arg(long, env = "KEYWARDEN_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print a new random caller token and the SHA-256 to put in the configuration.
    Token,
    /// Key-encryption keys of provider keys.
    Kek {
        #[command(subcommand)]
        command: KekCommand,
    },
    /// Measure throughput and latency against a real server (see BENCHMARKS.md).
    Bench(keywarden::bench::BenchArgs),
    /// The benchmark's transport floor: a bare tonic no-op server (started by `bench`).
    #[command(hide = true)]
    BenchBareServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
}

#[derive(Subcommand)]
enum KekCommand {
    /// Rewrap every stored data key to the newest configured KEK, in batches, while the
    /// servers keep running; afterwards older KEK versions can leave the configuration.
    Rewrap {
        #[arg(long, env = "KEYWARDEN_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print 32 random bytes, base64, for a new `[[keks]]` entry's key_base64.
    New,
}

/// Logs and traces as configured (text logs and no export when nothing is).
fn init_telemetry(format: LogFormat, tracing: &TracingConfig) -> Option<Telemetry> {
    match keywarden::telemetry::init(format, tracing) {
        Ok(telemetry) => Some(telemetry),
        Err(e) => {
            eprintln!("error: {e}");
            None
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let command = match Cli::parse().command {
        // The admin CLI has its own exit statuses (see keywarden::cli).
        TopLevel::Admin(admin) => {
            let _ = init_telemetry(LogFormat::Text, &TracingConfig::default());
            return keywarden::cli::run(admin).await;
        }
        TopLevel::Server(command) => command,
    };
    // Logs and traces are configuration: read it before anything logs. A configuration
    // that does not load is reported by the command itself.
    let config_file = match &command {
        Command::Serve { config, .. }
        | Command::Migrate { config }
        | Command::Kek {
            command: KekCommand::Rewrap { config },
        } => Some(config.as_deref()),
        _ => None,
    };
    let (format, tracing) = config_file
        .and_then(|file| Config::load(file).ok())
        .map(|c| (c.log.format, c.tracing))
        .unwrap_or_default();
    let Some(telemetry) = init_telemetry(format, &tracing) else {
        return ExitCode::FAILURE;
    };
    let result = run(command).await;
    telemetry.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn run(command: Command) -> Result<(), BoxError> {
    match command {
        Command::Serve {
            dev,
            config,
            data_dir,
            listen,
        } => {
            let mut config = Config::load(config.as_deref())?;
            if let Some(listen) = listen {
                config.listen = listen;
            }
            let settings = if dev {
                dev_settings(config, &data_dir)?
            } else {
                config.into_settings()?
            };
            serve(settings).await
        }
        Command::Migrate { config } => {
            let settings = Config::load(config.as_deref())?.into_settings()?;
            keywarden::store::open(
                settings.database_url.expose_secret(),
                settings.database_max_connections,
            )
            .await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Bench(args) => {
            // As the reader runs it (`keywarden bench ...`), not where this binary lives.
            let command = std::iter::once("keywarden".to_owned())
                .chain(std::env::args().skip(1))
                .collect::<Vec<_>>()
                .join(" ");
            keywarden::bench::run(args, command).await?;
            Ok(())
        }
        Command::BenchBareServer { listen } => {
            keywarden::bench::bare::serve(listen).await?;
            Ok(())
        }
        Command::Kek {
            command: KekCommand::Rewrap { config },
        } => {
            let settings = Config::load(config.as_deref())?.into_settings()?;
            let store = keywarden::store::open(
                settings.database_url.expose_secret(),
                settings.database_max_connections,
            )
            .await?;
            let ring = keywarden::server::build_ring(&settings).await?;
            keywarden::provider_keys::check_keks(
                store.as_ref(),
                ring.as_deref(),
                Clock::System.now(),
            )
            .await?;
            let keys = keywarden::provider_keys::ProviderKeys::new(
                store,
                Clock::System,
                settings.plans.clone(),
                ring,
            );
            let (rewrapped, version) = keys.rewrap().await?;
            println!("rewrapped {rewrapped} provider key(s) to KEK version {version}");
            Ok(())
        }
        Command::Kek {
            command: KekCommand::New,
        } => {
            println!("{}", new_kek_base64()?);
            Ok(())
        }
        Command::Token => {
            let token = generate_token()?;
            println!("token:  {token}");
            println!("sha256: {}", KeyHash::of(&token).to_hex());
            Ok(())
        }
    }
}

/// Dev mode, like `vault server -dev`: SQLite in the data directory and fresh tokens for
/// every role, printed once.
fn dev_settings(mut config: Config, data_dir: &std::path::Path) -> Result<Settings, BoxError> {
    std::fs::create_dir_all(data_dir)?;
    let db = data_dir.join("keywarden.db");
    owner_only_database(&db)?;
    config.database_url = Some(SecretString::from(format!("sqlite://{}", db.display())));
    // The product's model of scopes, as the README and docs/cli.md present it, unless the
    // configuration names its own: an `admin` actor may grant `write` and `read`.
    let default_implications = config.scope_implications.is_empty();
    if default_implications {
        config.scope_implications = [
            ("admin".to_owned(), vec!["write".to_owned()]),
            ("write".to_owned(), vec!["read".to_owned()]),
        ]
        .into();
    }
    // The usage history shows a call a second later rather than a minute, unless the
    // configuration says otherwise: what a developer trying QueryUsage expects.
    let fast_history = config.usage.history_interval_ms
        == keywarden::config::UsageConfig::default().history_interval_ms;
    if fast_history {
        config.usage.history_interval_ms = 1_000;
    }
    let admin = generate_token()?;
    let verifier = generate_token()?;
    let edge = generate_token()?;
    let resolver = generate_token()?;
    let kek_file = data_dir.join("kek.key");
    let kek = dev_kek(&kek_file)?;
    // A developer's webhook receiver runs on localhost: let endpoints reach it.
    config.webhooks.allow_private_addresses = true;
    let mut settings = config.into_settings()?;
    if settings.keks.is_empty() {
        settings.keks = vec![(1, keywarden::config::KekMaterial::Raw(kek))];
    }
    settings.tokens = std::sync::Arc::new(settings.tokens.extended(vec![
        TokenEntry::new("dev-admin".into(), KeyHash::of(&admin), vec![Role::Admin]),
        TokenEntry::new(
            "dev-verifier".into(),
            KeyHash::of(&verifier),
            vec![Role::Verifier],
        ),
        TokenEntry::new("dev-edge".into(), KeyHash::of(&edge), vec![Role::Edge]),
        TokenEntry::new(
            "dev-provider-resolver".into(),
            KeyHash::of(&resolver),
            vec![Role::ProviderResolver],
        ),
    ]));
    println!("==> Keywarden is running in DEV MODE. Do not use it in production.");
    println!(
        "    Data: {} (SQLite). Tokens are new on every start.",
        db.display()
    );
    if default_implications {
        println!(
            "    Scopes: admin implies write, write implies read ([scope_implications] to change)."
        );
    }
    if fast_history {
        println!("    Usage history is written every second (every minute by default).");
    }
    println!("    Webhooks may reach private and loopback addresses (dev mode only).");
    println!("admin token: {admin}");
    println!("verifier token: {verifier}");
    println!("edge token: {edge}");
    println!("provider-resolver token: {resolver}");
    println!(
        "    Provider keys are encrypted under a KEK kept in {} (dev mode only: configure [[keks]] in production).",
        kek_file.display()
    );
    Ok(settings)
}

/// Dev mode's database, its write-ahead log and index are owner-only, like its KEK. The
/// store creates a new database so (SQLite gives the other two the database file's
/// mode); a data directory from a version that left them readable by all is tightened
/// here, before SQLite opens them.
fn owner_only_database(db: &std::path::Path) -> Result<(), BoxError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mut files = vec![db.to_path_buf()];
        for suffix in ["-wal", "-shm"] {
            let mut name = db.as_os_str().to_owned();
            name.push(suffix);
            files.push(name.into());
        }
        for file in files {
            match std::fs::metadata(&file) {
                Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
                    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                        .map_err(|e| format!("cannot make {} owner-only: {e}", file.display()))?;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{}: {e}", file.display()).into()),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = db;
    Ok(())
}

/// 32 random bytes as base64.
fn new_kek_base64() -> Result<String, BoxError> {
    use base64::Engine;
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(key.as_mut()).map_err(|e| e.to_string())?;
    Ok(base64::engine::general_purpose::STANDARD.encode(key.as_ref()))
}

/// Dev mode's KEK: made once, kept in the data directory (owner-only), reused after.
fn dev_kek(path: &std::path::Path) -> Result<zeroize::Zeroizing<[u8; 32]>, BoxError> {
    use base64::Engine;
    if !path.exists() {
        let encoded = new_kek_base64()?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        std::io::Write::write_all(&mut options.open(path)?, encoded.as_bytes())?;
    }
    let encoded = zeroize::Zeroizing::new(std::fs::read_to_string(path)?);
    let bytes =
        zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(encoded.trim())?);
    let key: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| format!("{} does not hold a 32-byte key", path.display()))?;
    Ok(zeroize::Zeroizing::new(key))
}

/// Binds first (`starting on ADDR`), waits for the database while health answers
/// NOT_SERVING (see `keywarden::startup`), then serves (`listening on ADDR`) until SIGTERM
/// or Ctrl-C, which also ends the wait.
async fn serve(settings: Settings) -> Result<(), BoxError> {
    let (signal, signalled) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = signal.send(true);
    });
    let until_signalled = |mut signalled: tokio::sync::watch::Receiver<bool>| async move {
        let _ = signalled.wait_for(|s| *s).await;
    };
    let starting = keywarden::startup::Starting::bind(&settings).await?;
    println!("starting on {}", starting.addr());
    let opened = tokio::select! {
        opened = keywarden::startup::open_store(&settings) => opened,
        () = until_signalled(signalled.clone()) => {
            starting.shutdown().await;
            return Ok(());
        }
    };
    let store = match opened {
        Ok(store) => store,
        Err(e) => {
            starting.shutdown().await;
            return Err(e.into());
        }
    };
    let mut server = starting.serve(&settings, store, Clock::System).await?;
    println!("listening on {}", server.addr());
    let stop = server.stop_handle();
    tokio::spawn(async move {
        until_signalled(signalled).await;
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
    });
    server.join().await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
