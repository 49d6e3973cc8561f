//! `keywarden workspaces create|get|list|update`: WorkspaceService. Keys and provider keys live in a
//! workspace, so a walkthrough on a fresh server starts here.

use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};

use super::output::{self, Format};
use super::policy_args::PoolArgs;
use super::{ActorArgs, CliError, Connection, Session, parse};
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
    /// List every workspace by id, a page at a time.
    List(ListArgs),
    /// Rename a workspace or move it to another plan (a plan without API keys makes its
    /// keys answer plan_forbids_keys until a plan allows them again).
    Update(UpdateArgs),
    /// Show or set the pool every key of one owner in the workspace shares
    /// (--pool rpm=N ..., or --no-pool).
    OwnerLimits(OwnerLimitsArgs),
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("change").required(true).multiple(true).args(["name", "plan", "pool", "no_pool", "pool_budget", "no_pool_budget"])))]
struct UpdateArgs {
    /// The workspace's id.
    workspace_id: String,
    /// A new display name.
    #[arg(long)]
    name: Option<String>,
    /// A new plan.
    #[arg(long, value_enum)]
    plan: Option<PlanArg>,
    #[command(flatten)]
    pool: PoolArgs,
    #[command(flatten)]
    actor: ActorArgs,
}

#[derive(Args)]
struct OwnerLimitsArgs {
    /// The workspace's id.
    workspace_id: String,
    /// The owner: user:ID or service_account:ID.
    #[arg(long, value_parser = parse::owner)]
    owner: proto::Owner,
    /// Without --pool or --no-pool, the owner's pool is shown.
    #[command(flatten)]
    pool: PoolArgs,
    #[command(flatten)]
    actor: ActorArgs,
}

#[derive(Args)]
struct ListArgs {
    /// Workspaces per page (1 to 1000; the server's default is 50).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1000))]
    page_size: Option<i32>,
    /// Continue from a previous page (its `next_page_token`).
    #[arg(long, conflicts_with = "all")]
    page_token: Option<String>,
    /// Follow every page and print them as one list.
    #[arg(long)]
    all: bool,
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
        WorkspacesCommand::List(a) => return list(&session, a).await,
        WorkspacesCommand::OwnerLimits(a) => return owner_limits(&session, a).await,
        WorkspacesCommand::Update(a) => {
            let mut paths = Vec::new();
            if a.name.is_some() {
                paths.push("name".to_owned());
            }
            if a.plan.is_some() {
                paths.push("plan".to_owned());
            }
            let pool = a.pool.limits();
            if pool.is_some() {
                paths.push("rate_limits".to_owned());
            }
            let budget = a.pool.budget();
            if budget.is_some() {
                paths.push("budget".to_owned());
            }
            session
                .workspaces()
                .update_workspace(proto::UpdateWorkspaceRequest {
                    workspace_id: a.workspace_id,
                    actor: Some(a.actor.proto()),
                    name: a.name.unwrap_or_default(),
                    plan: a.plan.map_or(proto::Plan::Unspecified, plan) as i32,
                    rate_limits: pool.unwrap_or_default(),
                    budget: budget.flatten(),
                    update_mask: Some(prost_types::FieldMask { paths }),
                })
                .await?
                .into_inner()
                .workspace
        }
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

async fn list(session: &Session, a: ListArgs) -> Result<ExitCode, CliError> {
    let (workspaces, next_page_token) =
        super::pages(a.page_token.unwrap_or_default(), a.all, |page_token| {
            let request = proto::ListWorkspacesRequest {
                page_size: a.page_size.unwrap_or(0),
                page_token,
            };
            let mut client = session.workspaces();
            async move {
                let page = client.list_workspaces(request).await?.into_inner();
                Ok((page.workspaces, page.next_page_token))
            }
        })
        .await?;
    output::emit_list(
        session.format,
        "workspaces",
        &workspaces,
        output::workspace_json,
        output::workspace_table,
        Some(&next_page_token),
    )?;
    Ok(ExitCode::SUCCESS)
}

async fn owner_limits(session: &Session, a: OwnerLimitsArgs) -> Result<ExitCode, CliError> {
    let mut client = session.workspaces();
    let current = client
        .get_owner_limits(proto::GetOwnerLimitsRequest {
            workspace_id: a.workspace_id.clone(),
            owner: Some(a.owner.clone()),
        })
        .await?
        .into_inner();
    // The pool is set whole: what the flags do not name stays as it is.
    let (rate_limits, budget) = (a.pool.limits(), a.pool.budget());
    let limits = if rate_limits.is_none() && budget.is_none() {
        current
    } else {
        client
            .set_owner_limits(proto::SetOwnerLimitsRequest {
                workspace_id: a.workspace_id,
                owner: Some(a.owner),
                rate_limits: rate_limits.unwrap_or(current.rate_limits),
                budget: budget.unwrap_or(current.budget),
                actor: Some(a.actor.proto()),
            })
            .await?
            .into_inner()
    };
    match session.format {
        Format::Json => output::emit_json(&output::owner_limits_json(&limits))?,
        Format::Table => output::emit(&output::fields(&output::owner_limits_fields(&limits)))?,
    }
    Ok(ExitCode::SUCCESS)
}
