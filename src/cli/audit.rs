//! `keywarden audit list`: a workspace's audit log (ListAuditEvents), newest first.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::output;
use super::{CliError, Connection, Session};
use crate::proto;

#[derive(Args)]
pub struct AuditArgs {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// List a workspace's audit events, newest first.
    List(ListArgs),
}

#[derive(Args)]
struct ListArgs {
    /// The workspace.
    #[arg(long)]
    workspace: String,
    /// Events per page (1 to 1000).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1000))]
    page_size: Option<i32>,
    /// Continue from a previous page (its `next_page_token`).
    #[arg(long, conflicts_with = "all")]
    page_token: Option<String>,
    /// Follow every page and print them as one list.
    #[arg(long)]
    all: bool,
    /// Only events about this key.
    #[arg(long = "key", value_name = "KEY_ID")]
    key_id: Option<String>,
    /// Only events of this actor.
    #[arg(long = "actor", value_name = "ACTOR_ID")]
    actor_id: Option<String>,
    /// Only events of this action (key.issue, key.revoke, team.delete, ...).
    #[arg(long)]
    action: Option<String>,
    /// Only events at or after this time, RFC 3339.
    #[arg(long, value_parser = super::parse::timestamp)]
    since: Option<prost_types::Timestamp>,
    /// Only events before this time, RFC 3339.
    #[arg(long, value_parser = super::parse::timestamp)]
    until: Option<prost_types::Timestamp>,
}

pub async fn run(args: AuditArgs) -> Result<ExitCode, CliError> {
    let AuditCommand::List(a) = args.command;
    let session = Session::open(&args.conn).await?;
    let (events, next_page_token) =
        super::pages(a.page_token.unwrap_or_default(), a.all, |page_token| {
            let request = proto::ListAuditEventsRequest {
                workspace_id: a.workspace.clone(),
                page_size: a.page_size.unwrap_or(0),
                page_token,
                key_id: a.key_id.clone().unwrap_or_default(),
                actor_id: a.actor_id.clone().unwrap_or_default(),
                action: a.action.clone().unwrap_or_default(),
                since: a.since,
                until: a.until,
            };
            let mut client = session.keys();
            async move {
                let page = client.list_audit_events(request).await?.into_inner();
                Ok((page.events, page.next_page_token))
            }
        })
        .await?;
    output::emit_list(
        session.format,
        "events",
        &events,
        output::audit_event_json,
        output::audit_table,
        Some(&next_page_token),
    )?;
    Ok(ExitCode::SUCCESS)
}
