//! `keywarden workspaces create|get`: WorkspaceService. Keys and provider keys live in a
//! workspace, so a walkthrough on a fresh server starts here.

use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};

use super::output::{self, Format};
use super::{ActorArgs, CliError, Connection, Session};
use crate::proto;

#[derive(Args)]
pub struct WorkspacesArgs {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: WorkspacesCommand,
}

#[derive(Subcommand)]
enum WorkspacesCommand {
    /// Create a workspace on a plan.
    Create(CreateArgs),
    /// Show a workspace and what its plan allows.
    Get {
        /// The workspace's id.
        workspace_id: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PlanArg {
    Spark,
    Pro,
    Team,
    Enterprise,
}

#[derive(Args)]
struct CreateArgs {
    /// The new workspace's id (letters, digits, `_`, `-`).
    workspace_id: String,
    /// A display name (default: the id).
    #[arg(long)]
    name: Option<String>,
    /// The plan, which decides what the workspace may do.
    #[arg(long, value_enum)]
    plan: PlanArg,
    #[command(flatten)]
    actor: ActorArgs,
}

fn plan(p: PlanArg) -> proto::Plan {
    match p {
        PlanArg::Spark => proto::Plan::Spark,
        PlanArg::Pro => proto::Plan::Pro,
        PlanArg::Team => proto::Plan::Team,
        PlanArg::Enterprise => proto::Plan::Enterprise,
    }
}

pub async fn run(args: WorkspacesArgs) -> Result<ExitCode, CliError> {
    let session = Session::open(&args.conn).await?;
    let workspace = match args.command {
        WorkspacesCommand::Create(a) => {
            session
                .workspaces()
                .create_workspace(proto::CreateWorkspaceRequest {
                    name: a.name.unwrap_or_else(|| a.workspace_id.clone()),
                    workspace_id: a.workspace_id,
                    plan: plan(a.plan) as i32,
                    actor: Some(a.actor.proto()),
                })
                .await?
                .into_inner()
                .workspace
        }
        WorkspacesCommand::Get { workspace_id } => {
            session
                .workspaces()
                .get_workspace(proto::GetWorkspaceRequest { workspace_id })
                .await?
                .into_inner()
                .workspace
        }
    };
    let workspace = workspace.unwrap_or_default();
    match session.format {
        Format::Json => output::emit_json(&output::workspace_json(&workspace))?,
        Format::Table => output::emit(&output::fields(&output::workspace_fields(&workspace)))?,
    }
    Ok(ExitCode::SUCCESS)
}
