//! `keywarden access-groups create|list|update|delete`: AccessGroupService. A group is a
//! named set of targets a key's or a team's reach can name (`--access-group NAME`), so a
//! target added to it later is reachable without touching the keys.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::output::{self, Format};
use super::{ActorArgs, CliError, Connection, Session};
use crate::proto;

#[derive(Args)]
pub struct AccessGroupsArgs {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: AccessGroupsCommand,
}

#[derive(Args)]
struct GroupArgs {
    /// The group's name (a-z, 0-9, `_`, `-`, starting with a letter).
    name: String,
    /// The workspace.
    #[arg(long)]
    workspace: String,
    /// A target (model) in the group (repeatable; on update, replaces them all).
    #[arg(long = "target", value_name = "TARGET", required = true)]
    targets: Vec<String>,
    #[command(flatten)]
    actor: ActorArgs,
}

#[derive(Subcommand)]
enum AccessGroupsCommand {
    /// Create an access group.
    Create(GroupArgs),
    /// List a workspace's access groups.
    List {
        /// The workspace.
        #[arg(long)]
        workspace: String,
    },
    /// Replace a group's targets: every key and team naming it follows at once.
    Update(GroupArgs),
    /// Delete a group (refused while a key or a team's reach names it).
    Delete {
        /// The group's name.
        name: String,
        /// The workspace.
        #[arg(long)]
        workspace: String,
        #[command(flatten)]
        actor: ActorArgs,
    },
}

pub async fn run(args: AccessGroupsArgs) -> Result<ExitCode, CliError> {
    let session = Session::open(&args.conn).await?;
    let mut client = session.access_groups();
    let group = match args.command {
        AccessGroupsCommand::Create(a) => {
            client
                .create_access_group(proto::CreateAccessGroupRequest {
                    workspace_id: a.workspace,
                    name: a.name,
                    targets: a.targets,
                    actor: Some(a.actor.proto()),
                })
                .await?
                .into_inner()
                .access_group
        }
        AccessGroupsCommand::Update(a) => {
            client
                .update_access_group(proto::UpdateAccessGroupRequest {
                    workspace_id: a.workspace,
                    name: a.name,
                    targets: a.targets,
                    actor: Some(a.actor.proto()),
                })
                .await?
                .into_inner()
                .access_group
        }
        AccessGroupsCommand::List { workspace } => {
            let groups = client
                .list_access_groups(proto::ListAccessGroupsRequest {
                    workspace_id: workspace,
                })
                .await?
                .into_inner()
                .access_groups;
            output::emit_list(
                session.format,
                "access_groups",
                &groups,
                output::access_group_json,
                output::access_group_table,
                None,
            )?;
            return Ok(ExitCode::SUCCESS);
        }
        AccessGroupsCommand::Delete {
            name,
            workspace,
            actor,
        } => {
            client
                .delete_access_group(proto::DeleteAccessGroupRequest {
                    workspace_id: workspace,
                    name: name.clone(),
                    actor: Some(actor.proto()),
                })
                .await?;
            output::emit_deleted(session.format, &name)?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    let group = group.unwrap_or_default();
    match session.format {
        Format::Json => output::emit_json(&output::access_group_json(&group))?,
        Format::Table => {
            output::emit(&output::access_group_table(std::slice::from_ref(&group)).render())?
        }
    }
    Ok(ExitCode::SUCCESS)
}
