//! `keywarden teams create|get|list|update|delete` (TeamService) and
//! `keywarden service-accounts create|list|delete`, a team's non-human key owners.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::output::{self, Format};
use super::policy_args::{PoolArgs, ReachArgs};
use super::{ActorArgs, CliError, Connection, Session, parse};
use crate::proto;

#[derive(Args)]
pub struct TeamsArgs {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: TeamsCommand,
}

#[derive(Subcommand)]
enum TeamsCommand {
    /// Create a team with its self-service policy.
    Create(CreateArgs),
    /// Show a team and its policy.
    Get(TeamRef),
    /// List a workspace's teams.
    List {
        /// The workspace.
        #[arg(long)]
        workspace: String,
    },
    /// Change a team's name, policy or pool: only the rules given change, the rest stay
    /// (a pool is replaced whole).
    Update(UpdateArgs),
    /// Delete a team and its service accounts (refused while it has keys neither revoked
    /// nor deleted).
    Delete {
        #[command(flatten)]
        team: TeamRef,
        #[command(flatten)]
        actor: ActorArgs,
    },
}

#[derive(Args)]
struct TeamRef {
    /// The team's id.
    team_id: String,
    /// The workspace it is in.
    #[arg(long)]
    workspace: String,
}

/// A team's self-service rules. On create, a rule not given is off; on update, a rule not
/// given stays as it is.
#[derive(Args, Default)]
struct PolicyArgs {
    /// Members (actors without `admin`) may issue their own keys in the team.
    #[arg(long, conflicts_with = "no_self_service")]
    self_service: bool,
    /// Members may not issue keys.
    #[arg(long)]
    no_self_service: bool,
    /// The most live keys a member may hold in the team (0: no cap).
    #[arg(long, value_name = "N")]
    max_keys_per_user: Option<u32>,
    /// The largest budget a member's key may have, in currency units; a member's key
    /// must then have one.
    #[arg(long, value_parser = parse::money_micros, value_name = "AMOUNT", conflicts_with = "no_max_budget")]
    max_budget: Option<u64>,
    /// No budget ceiling.
    #[arg(long)]
    no_max_budget: bool,
    /// Members' keys must expire.
    #[arg(long, conflicts_with = "no_require_expiry")]
    require_expiry: bool,
    /// Members' keys need not expire.
    #[arg(long)]
    no_require_expiry: bool,
    /// Members' keys expire within this many days (0: no bound).
    #[arg(long, value_name = "DAYS")]
    max_expiry_days: Option<u32>,
    /// A rate-limit ceiling KIND=N for members' keys (repeatable; replaces them all):
    /// rpm, rph, rpd, tpm, tpd.
    #[arg(long = "ceiling", value_parser = parse::limit, value_name = "KIND=N", conflicts_with = "no_ceilings")]
    ceilings: Vec<proto::RateLimit>,
    /// No rate-limit ceilings.
    #[arg(long)]
    no_ceilings: bool,
    /// What the team's keys may reach (replaces it): no key of the team reaches beyond.
    #[command(flatten)]
    reach: ReachArgs,
}

impl PolicyArgs {
    fn given(&self) -> bool {
        self.self_service
            || self.no_self_service
            || self.max_keys_per_user.is_some()
            || self.max_budget.is_some()
            || self.no_max_budget
            || self.require_expiry
            || self.no_require_expiry
            || self.max_expiry_days.is_some()
            || !self.ceilings.is_empty()
            || self.no_ceilings
            || self.reach.given()
    }

    /// `policy` with the rules given applied.
    fn apply(&self, mut policy: proto::TeamPolicy) -> proto::TeamPolicy {
        if self.self_service || self.no_self_service {
            policy.self_service_enabled = self.self_service;
        }
        if let Some(n) = self.max_keys_per_user {
            policy.max_keys_per_user = n;
        }
        if self.max_budget.is_some() || self.no_max_budget {
            policy.max_budget_micros = self.max_budget;
        }
        if self.require_expiry || self.no_require_expiry {
            policy.require_expiry = self.require_expiry;
        }
        if let Some(days) = self.max_expiry_days {
            policy.max_expiry_days = days;
        }
        if !self.ceilings.is_empty() || self.no_ceilings {
            policy.rate_limit_ceilings = self.ceilings.clone();
        }
        if let Some(reach) = self.reach.resource_access() {
            policy.resource_access = Some(reach);
        }
        policy
    }
}

#[derive(Args)]
struct CreateArgs {
    /// The new team's id (letters, digits, `_`, `-`).
    team_id: String,
    /// The workspace it is in.
    #[arg(long)]
    workspace: String,
    /// A display name (default: the id).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    actor: ActorArgs,
}

#[derive(Args)]
struct UpdateArgs {
    #[command(flatten)]
    team: TeamRef,
    /// A new display name.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    pool: PoolArgs,
    #[command(flatten)]
    actor: ActorArgs,
}

pub async fn run(args: TeamsArgs) -> Result<ExitCode, CliError> {
    let session = Session::open(&args.conn).await?;
    let mut client = session.teams();
    let team = match args.command {
        TeamsCommand::Create(a) => {
            client
                .create_team(proto::CreateTeamRequest {
                    name: a.name.unwrap_or_else(|| a.team_id.clone()),
                    workspace_id: a.workspace,
                    team_id: a.team_id,
                    policy: Some(a.policy.apply(proto::TeamPolicy::default())),
                    actor: Some(a.actor.proto()),
                })
                .await?
                .into_inner()
                .team
        }
        TeamsCommand::Get(t) => {
            client
                .get_team(proto::GetTeamRequest {
                    workspace_id: t.workspace,
                    team_id: t.team_id,
                })
                .await?
                .into_inner()
                .team
        }
        TeamsCommand::List { workspace } => {
            let teams = client
                .list_teams(proto::ListTeamsRequest {
                    workspace_id: workspace,
                })
                .await?
                .into_inner()
                .teams;
            output::emit_list(
                session.format,
                "teams",
                &teams,
                output::team_json,
                output::team_table,
                None,
            )?;
            return Ok(ExitCode::SUCCESS);
        }
        TeamsCommand::Update(a) => update(&session, a).await?,
        TeamsCommand::Delete { team, actor } => {
            client
                .delete_team(proto::DeleteTeamRequest {
                    workspace_id: team.workspace,
                    team_id: team.team_id.clone(),
                    actor: Some(actor.proto()),
                })
                .await?;
            output::emit_deleted(session.format, &team.team_id)?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    show_team(&session, team)
}

/// The policy is one field of the API: the team is read, the rules given are applied to
/// its policy, and the whole policy is written back (a concurrent change of another rule
/// between the two is lost; the audit log shows both).
async fn update(session: &Session, a: UpdateArgs) -> Result<Option<proto::Team>, CliError> {
    let pool = a.pool.limits();
    let budget = a.pool.budget();
    if a.name.is_none() && !a.policy.given() && pool.is_none() && budget.is_none() {
        return Err(CliError::Usage(
            "nothing to change: give --name, a policy flag, --pool, --no-pool, --pool-budget or --no-pool-budget".into(),
        ));
    }
    let mut client = session.teams();
    let mut paths = Vec::new();
    let mut policy = None;
    if a.policy.given() {
        let current = client
            .get_team(proto::GetTeamRequest {
                workspace_id: a.team.workspace.clone(),
                team_id: a.team.team_id.clone(),
            })
            .await?
            .into_inner()
            .team
            .and_then(|t| t.policy)
            .unwrap_or_default();
        policy = Some(a.policy.apply(current));
        paths.push("policy".to_owned());
    }
    if a.name.is_some() {
        paths.push("name".to_owned());
    }
    if pool.is_some() {
        paths.push("rate_limits".to_owned());
    }
    if budget.is_some() {
        paths.push("budget".to_owned());
    }
    Ok(client
        .update_team(proto::UpdateTeamRequest {
            workspace_id: a.team.workspace,
            team_id: a.team.team_id,
            actor: Some(a.actor.proto()),
            name: a.name.unwrap_or_default(),
            policy,
            rate_limits: pool.unwrap_or_default(),
            budget: budget.flatten(),
            update_mask: Some(prost_types::FieldMask { paths }),
        })
        .await?
        .into_inner()
        .team)
}

fn show_team(session: &Session, team: Option<proto::Team>) -> Result<ExitCode, CliError> {
    let team = team.unwrap_or_default();
    match session.format {
        Format::Json => output::emit_json(&output::team_json(&team))?,
        Format::Table => output::emit(&output::fields(&output::team_fields(&team)))?,
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct ServiceAccountsArgs {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: ServiceAccountsCommand,
}

#[derive(Subcommand)]
enum ServiceAccountsCommand {
    /// Create a service account in a team: an owner of the team's keys that is not a
    /// person (a pipeline, a batch job).
    Create {
        /// The new account's id.
        service_account_id: String,
        /// The workspace.
        #[arg(long)]
        workspace: String,
        /// The team it belongs to.
        #[arg(long)]
        team: String,
        /// A display name (default: the id).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        actor: ActorArgs,
    },
    /// List a team's service accounts.
    List {
        /// The workspace.
        #[arg(long)]
        workspace: String,
        /// The team.
        #[arg(long)]
        team: String,
    },
    /// Delete a service account (refused while it owns keys not revoked).
    Delete {
        /// The account's id.
        service_account_id: String,
        /// The workspace.
        #[arg(long)]
        workspace: String,
        #[command(flatten)]
        actor: ActorArgs,
    },
}

pub async fn run_service_accounts(args: ServiceAccountsArgs) -> Result<ExitCode, CliError> {
    let session = Session::open(&args.conn).await?;
    let mut client = session.teams();
    match args.command {
        ServiceAccountsCommand::Create {
            service_account_id,
            workspace,
            team,
            name,
            actor,
        } => {
            let account = client
                .create_service_account(proto::CreateServiceAccountRequest {
                    workspace_id: workspace,
                    team_id: team,
                    name: name.unwrap_or_else(|| service_account_id.clone()),
                    service_account_id,
                    actor: Some(actor.proto()),
                })
                .await?
                .into_inner()
                .service_account
                .unwrap_or_default();
            match session.format {
                Format::Json => output::emit_json(&output::service_account_json(&account))?,
                Format::Table => output::emit(
                    &output::service_account_table(std::slice::from_ref(&account)).render(),
                )?,
            }
        }
        ServiceAccountsCommand::List { workspace, team } => {
            let accounts = client
                .list_service_accounts(proto::ListServiceAccountsRequest {
                    workspace_id: workspace,
                    team_id: team,
                })
                .await?
                .into_inner()
                .service_accounts;
            output::emit_list(
                session.format,
                "service_accounts",
                &accounts,
                output::service_account_json,
                output::service_account_table,
                None,
            )?;
        }
        ServiceAccountsCommand::Delete {
            service_account_id,
            workspace,
            actor,
        } => {
            client
                .delete_service_account(proto::DeleteServiceAccountRequest {
                    workspace_id: workspace,
                    service_account_id: service_account_id.clone(),
                    actor: Some(actor.proto()),
                })
                .await?;
            output::emit_deleted(session.format, &service_account_id)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
