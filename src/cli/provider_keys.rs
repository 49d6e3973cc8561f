//! `keywarden provider-keys put|get|list|delete`: ProviderKeyService (BYOK), admin side.
//! The CLI can store a provider key but never shows one: every response is masked, and
//! it does not offer ResolveProviderKey.

use std::process::ExitCode;

use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use zeroize::Zeroizing;

use super::output::{self, Format};
use super::{ActorArgs, CliError, Connection, Session, parse, read_stdin_secret};
use crate::proto;

#[derive(Args)]
pub struct ProviderKeysArgs {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: ProviderKeysCommand,
}

#[derive(Subcommand)]
enum ProviderKeysCommand {
    /// Store (or replace) the workspace's key for a provider. Needs a plan with BYOK.
    Put(PutArgs),
    /// Show one provider key, masked.
    Get(TargetArgs),
    /// List the workspace's provider keys, masked.
    List {
        /// The workspace.
        #[arg(long)]
        workspace: String,
    },
    /// Delete the workspace's key for a provider (back to managed access).
    Delete {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        actor: ActorArgs,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ProviderArg {
    Anthropic,
    Openai,
}

#[derive(Args)]
struct TargetArgs {
    /// The workspace.
    #[arg(long)]
    workspace: String,
    /// The provider.
    #[arg(long, value_enum)]
    provider: ProviderArg,
}

#[derive(Args)]
#[command(group(ArgGroup::new("secret").required(true).args(["api_key", "api_key_stdin"])))]
struct PutArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// The provider's key, or `-` to read it from stdin (prefer stdin: a flag stays in
    /// the shell history).
    #[arg(long, value_parser = parse::secret, value_name = "KEY")]
    api_key: Option<SecretString>,
    /// Read the provider's key from stdin.
    #[arg(long)]
    api_key_stdin: bool,
    #[command(flatten)]
    actor: ActorArgs,
}

fn provider(p: ProviderArg) -> i32 {
    match p {
        ProviderArg::Anthropic => proto::Provider::Anthropic as i32,
        ProviderArg::Openai => proto::Provider::Openai as i32,
    }
}

pub async fn run(args: ProviderKeysArgs) -> Result<ExitCode, CliError> {
    match args.command {
        ProviderKeysCommand::Put(a) => {
            // Read before connecting: nothing on stdin is a usage error.
            let api_key = match &a.api_key {
                Some(given) if given.expose_secret() != "-" => {
                    Zeroizing::new(given.expose_secret().to_owned())
                }
                _ => read_stdin_secret("provider key")?,
            };
            let session = Session::open(&args.conn).await?;
            let stored = session
                .provider_keys()
                .put_provider_key(proto::PutProviderKeyRequest {
                    workspace_id: a.target.workspace,
                    provider: provider(a.target.provider),
                    api_key: api_key.as_str().to_owned(),
                    actor: Some(a.actor.proto()),
                })
                .await?
                .into_inner()
                .provider_key;
            show_one(&session, stored.unwrap_or_default())?;
        }
        ProviderKeysCommand::Get(t) => {
            let session = Session::open(&args.conn).await?;
            let found = session
                .provider_keys()
                .get_provider_key(proto::GetProviderKeyRequest {
                    workspace_id: t.workspace,
                    provider: provider(t.provider),
                })
                .await?
                .into_inner()
                .provider_key;
            show_one(&session, found.unwrap_or_default())?;
        }
        ProviderKeysCommand::List { workspace } => {
            let session = Session::open(&args.conn).await?;
            let keys = session
                .provider_keys()
                .list_provider_keys(proto::ListProviderKeysRequest {
                    workspace_id: workspace,
                })
                .await?
                .into_inner()
                .provider_keys;
            output::emit_list(
                session.format,
                "provider_keys",
                &keys,
                output::provider_key_json,
                output::provider_key_table,
                None,
            )?;
        }
        ProviderKeysCommand::Delete { target, actor } => {
            let session = Session::open(&args.conn).await?;
            let name = output::provider(provider(target.provider));
            session
                .provider_keys()
                .delete_provider_key(proto::DeleteProviderKeyRequest {
                    workspace_id: target.workspace.clone(),
                    provider: provider(target.provider),
                    actor: Some(actor.proto()),
                })
                .await?;
            match session.format {
                Format::Json => output::emit_json(&json!({
                    "deleted": { "workspace_id": target.workspace, "provider": name },
                }))?,
                Format::Table => {
                    output::emit(&format!("deleted the {name} key of {}\n", target.workspace))?
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show_one(session: &Session, key: proto::ProviderKeyInfo) -> Result<(), CliError> {
    match session.format {
        Format::Json => output::emit_json(&output::provider_key_json(&key)),
        Format::Table => output::emit(&output::provider_key_table(&[key]).render()),
    }
}
