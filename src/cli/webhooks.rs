//! `keywarden webhooks create|list|delete|rotate-secret`: WebhookService. The signing
//! secret is printed by `create` and `rotate-secret` only, once, as the API gives it.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::json;

use super::output::{self, Format};
use super::{ActorArgs, CliError, Connection, Session};
use crate::proto;

#[derive(Args)]
pub struct WebhooksArgs {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: WebhooksCommand,
}

#[derive(Subcommand)]
enum WebhooksCommand {
    /// A new endpoint; prints its signing secret, this once.
    Create {
        /// The workspace.
        #[arg(long)]
        workspace: String,
        /// Where to POST (http:// or https://).
        #[arg(long)]
        url: String,
        /// An event type (repeatable, or comma-separated): key.issued, key.revoked,
        /// key.rotated, key.deleted, key.leaked, key.expiring, key.budget_threshold.
        #[arg(
            long = "event",
            value_name = "TYPE",
            value_delimiter = ',',
            required = true
        )]
        events: Vec<String>,
        #[command(flatten)]
        actor: ActorArgs,
    },
    /// The workspace's endpoints and their delivery state (never a secret).
    List {
        /// The workspace.
        #[arg(long)]
        workspace: String,
    },
    /// Delete an endpoint: nothing more is sent to it.
    Delete {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        actor: ActorArgs,
    },
    /// A new signing secret, printed this once; the old one signs nothing more.
    RotateSecret {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        actor: ActorArgs,
    },
}

#[derive(Args)]
struct TargetArgs {
    /// The workspace.
    #[arg(long)]
    workspace: String,
    /// The endpoint (`wh_...`).
    #[arg(long = "webhook")]
    webhook_id: String,
}

pub async fn run(args: WebhooksArgs) -> Result<ExitCode, CliError> {
    let session = Session::open(&args.conn).await?;
    match args.command {
        WebhooksCommand::Create {
            workspace,
            url,
            events,
            actor,
        } => {
            let created = session
                .webhooks()
                .create_webhook(proto::CreateWebhookRequest {
                    workspace_id: workspace,
                    url,
                    event_types: events,
                    actor: Some(actor.proto()),
                })
                .await?
                .into_inner();
            show_with_secret(
                &session,
                created.webhook.unwrap_or_default(),
                &created.signing_secret,
            )?;
        }
        WebhooksCommand::List { workspace } => {
            let hooks = session
                .webhooks()
                .list_webhooks(proto::ListWebhooksRequest {
                    workspace_id: workspace,
                })
                .await?
                .into_inner()
                .webhooks;
            output::emit_list(
                session.format,
                "webhooks",
                &hooks,
                output::webhook_json,
                output::webhook_table,
                None,
            )?;
        }
        WebhooksCommand::Delete { target, actor } => {
            session
                .webhooks()
                .delete_webhook(proto::DeleteWebhookRequest {
                    workspace_id: target.workspace.clone(),
                    webhook_id: target.webhook_id.clone(),
                    actor: Some(actor.proto()),
                })
                .await?;
            match session.format {
                Format::Json => output::emit_json(&json!({
                    "deleted": { "workspace_id": target.workspace, "webhook_id": target.webhook_id },
                }))?,
                Format::Table => output::emit(&format!(
                    "deleted webhook {} of {}\n",
                    target.webhook_id, target.workspace
                ))?,
            }
        }
        WebhooksCommand::RotateSecret { target, actor } => {
            let rotated = session
                .webhooks()
                .rotate_webhook_secret(proto::RotateWebhookSecretRequest {
                    workspace_id: target.workspace,
                    webhook_id: target.webhook_id,
                    actor: Some(actor.proto()),
                })
                .await?
                .into_inner();
            show_with_secret(
                &session,
                rotated.webhook.unwrap_or_default(),
                &rotated.signing_secret,
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show_with_secret(
    session: &Session,
    webhook: proto::Webhook,
    secret: &str,
) -> Result<(), CliError> {
    match session.format {
        Format::Json => {
            let mut doc = output::webhook_json(&webhook);
            doc["signing_secret"] = secret.into();
            output::emit_json(&doc)
        }
        Format::Table => {
            output::emit(&output::webhook_table(&[webhook]).render())?;
            output::emit(&format!(
                "signing secret: {secret}\n(shown this once: store it with your receiver)\n"
            ))
        }
    }
}
