//! The `keywarden` binary: `serve` (production, or `--dev` on embedded SQLite) and
//! `migrate`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keywarden::api::auth::{Role, TokenEntry, generate_token};
use keywarden::clock::Clock;
use keywarden::config::{Config, Settings};
use keywarden::domain::key_format::KeyHash;
use secrecy::{ExposeSecret, SecretString};

#[derive(Parser)]
#[command(
    name = "keywarden",
    version,
    about = "The credential authority for API keys"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    /// Measure throughput and latency against a real server (see BENCHMARKS.md).
    Bench(keywarden::bench::BenchArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse().command).await {
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
    config.database_url = Some(SecretString::from(format!("sqlite://{}", db.display())));
    let admin = generate_token()?;
    let verifier = generate_token()?;
    let edge = generate_token()?;
    let mut settings = config.into_settings()?;
    settings.tokens = std::sync::Arc::new(settings.tokens.extended(vec![
        TokenEntry::new("dev-admin".into(), KeyHash::of(&admin), vec![Role::Admin]),
        TokenEntry::new(
            "dev-verifier".into(),
            KeyHash::of(&verifier),
            vec![Role::Verifier],
        ),
        TokenEntry::new("dev-edge".into(), KeyHash::of(&edge), vec![Role::Edge]),
    ]));
    println!("==> Keywarden is running in DEV MODE. Do not use it in production.");
    println!(
        "    Data: {} (SQLite). Tokens are new on every start.",
        db.display()
    );
    println!("admin token: {admin}");
    println!("verifier token: {verifier}");
    println!("edge token: {edge}");
    Ok(settings)
}

async fn serve(settings: Settings) -> Result<(), BoxError> {
    let mut server = keywarden::server::start(&settings, Clock::System).await?;
    println!("listening on {}", server.addr());
    let stop = server.stop_handle();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
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
