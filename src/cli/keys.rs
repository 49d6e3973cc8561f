//! `keywarden keys issue|get|list|update|rotate|revoke|revoke-all|delete|reset-budget|
//! report-leaked`: KeyService.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use serde_json::json;

use super::output::{self, Format};
use super::policy_args::{LimitArgs, ReachArgs};
use super::{ActorArgs, CliError, Connection, Session, in_future, parse, warn_shown_once};
use crate::proto;

#[derive(Args)]
pub struct KeysArgs {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Issue a key. Its plaintext is printed this once: store it now.
    Issue(IssueArgs),
    /// Show one key (never its secret).
    Get {
        /// The key's id (`key_...`).
        key_id: String,
    },
    /// List a workspace's keys, newest first.
    List(ListArgs),
    /// Change a key's name, scopes, expiry, budget, metadata, limits, reach or networks
    /// (only what is given).
    Update(UpdateArgs),
    /// Give a key a new secret (printed this once); the old one stops now or after --grace.
    Rotate(RotateArgs),
    /// Revoke a key at once (idempotent).
    Revoke(RevokeArgs),
    /// Revoke every key of a workspace that matches one filter: an owner, a team, who
    /// issued it, or all (offboarding, a compromised CI system, a suspended tenant).
    RevokeAll(RevokeAllArgs),
    /// Remove a key from listings for good (it then verifies as not_found; the audit
    /// trail stays).
    Delete(KeyActorArgs),
    /// Start a key's budget again from now (an admin's act; audited).
    ResetBudget(KeyActorArgs),
    /// Report a key found where it should not be: a live key is revoked at once
    /// (reason leaked, audited, streamed). Pass the key as `-` to read it from stdin.
    ReportLeaked(ReportLeakedArgs),
}

#[derive(Args)]
struct ReportLeakedArgs {
    /// The key as found, or `-` to read it from stdin (keeps it out of the shell history).
    #[arg(value_parser = parse::secret, value_name = "KEY")]
    key: secrecy::SecretString,
    /// Where it was found, for the audit log.
    #[arg(long, default_value = "")]
    source_url: String,
    #[command(flatten)]
    actor: ActorArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum EnvArg {
    Live,
    Test,
}

#[derive(Clone, Copy, ValueEnum)]
enum StatusArg {
    Active,
    Revoked,
    Expired,
}

#[derive(Args)]
struct IssueArgs {
    /// The workspace (tenant) the key belongs to; it must exist.
    #[arg(long)]
    workspace: String,
    /// A display name.
    #[arg(long)]
    name: String,
    /// The key's environment, part of the key itself (`kw_live_...` / `kw_test_...`).
    #[arg(long = "env", value_enum, default_value = "live")]
    environment: EnvArg,
    /// A scope the key grants (repeatable). The actor must hold it.
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    /// Expire after this long: 30d, 12h, 1h30m (s, m, h, d, w).
    #[arg(long, value_parser = parse::duration, conflicts_with = "expires_at")]
    expires_in: Option<Duration>,
    /// Expire at this time (RFC 3339, e.g. 2030-01-31T00:00:00Z).
    #[arg(long, value_parser = parse::timestamp)]
    expires_at: Option<prost_types::Timestamp>,
    /// Who the key belongs to: user:ID or service_account:ID. An admin actor must name
    /// one; a self-service actor may leave it out (its key is its own).
    #[arg(long, value_parser = parse::owner)]
    owner: Option<proto::Owner>,
    /// The team the key belongs to.
    #[arg(long = "team", value_name = "TEAM_ID")]
    team_id: Option<String>,
    /// The key's own limit in requests per minute (otherwise the deployment's default).
    #[arg(long, value_name = "REQUESTS")]
    rpm: Option<u64>,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    reach: ReachArgs,
    /// A spend ceiling, in currency units (e.g. 25 or 12.50).
    #[arg(long, value_parser = parse::money_micros, value_name = "AMOUNT")]
    budget: Option<u64>,
    /// How often the budget starts again: lifetime (default), daily, weekly, monthly
    /// (UTC calendar) or Nd (every N days).
    #[arg(long, value_parser = parse::budget_period, value_name = "PERIOD")]
    budget_period: Option<(proto::BudgetPeriod, u32)>,
    /// Metadata KEY=VALUE (repeatable).
    #[arg(long = "meta", value_parser = parse::key_value, value_name = "KEY=VALUE")]
    metadata: Vec<(String, String)>,
    /// A CIDR range the key's calls may come from (repeatable; none: anywhere).
    #[arg(long = "allow-cidr", value_name = "CIDR")]
    allowed_cidrs: Vec<String>,
    #[command(flatten)]
    actor: ActorArgs,
}

#[derive(Args)]
struct ListArgs {
    /// The workspace whose keys to list.
    #[arg(long)]
    workspace: String,
    /// Only keys in this status.
    #[arg(long, value_enum)]
    status: Option<StatusArg>,
    /// Only keys of this owner: user:ID or service_account:ID.
    #[arg(long, value_parser = parse::owner)]
    owner: Option<proto::Owner>,
    /// Only keys not used since this time (never-used keys included), RFC 3339.
    #[arg(long, value_parser = parse::timestamp)]
    unused_since: Option<prost_types::Timestamp>,
    /// Only keys whose name starts with this.
    #[arg(long)]
    name_prefix: Option<String>,
    /// Only keys with this metadata entry KEY=VALUE.
    #[arg(long = "meta", value_parser = parse::key_value, value_name = "KEY=VALUE")]
    metadata: Option<(String, String)>,
    /// Only keys of this team.
    #[arg(long = "team", value_name = "TEAM_ID")]
    team_id: Option<String>,
    /// Keys per page (1 to 1000; the server's default is 50).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1000))]
    page_size: Option<i32>,
    /// Continue from a previous page (its `next_page_token`).
    #[arg(long, conflicts_with = "all")]
    page_token: Option<String>,
    /// Follow every page and print them as one list.
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
#[command(group(
    ArgGroup::new("change")
        .required(true)
        .multiple(true)
        .args(["name", "scopes", "expires_at", "expires_in", "no_expiry", "budget", "no_budget", "budget_period", "metadata", "limits", "default_limits", "reach", "targets", "access_groups", "allowed_cidrs", "any_network"])
))]
struct UpdateArgs {
    /// The key's id (`key_...`).
    key_id: String,
    /// A new display name.
    #[arg(long)]
    name: Option<String>,
    /// The key's new scopes (repeatable; replaces them all).
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    /// A new expiry (RFC 3339).
    #[arg(long, value_parser = parse::timestamp, conflicts_with_all = ["expires_in", "no_expiry"])]
    expires_at: Option<prost_types::Timestamp>,
    /// A new expiry, this long from now (30d, 12h).
    #[arg(long, value_parser = parse::duration, conflicts_with = "no_expiry")]
    expires_in: Option<Duration>,
    /// The key no longer expires.
    #[arg(long)]
    no_expiry: bool,
    /// A new spend ceiling, in currency units.
    #[arg(long, value_parser = parse::money_micros, value_name = "AMOUNT", conflicts_with = "no_budget")]
    budget: Option<u64>,
    /// Remove the spend ceiling.
    #[arg(long)]
    no_budget: bool,
    /// A new budget period: lifetime, daily, weekly, monthly or Nd.
    #[arg(long, value_parser = parse::budget_period, value_name = "PERIOD")]
    budget_period: Option<(proto::BudgetPeriod, u32)>,
    /// The key's new metadata KEY=VALUE (repeatable; replaces it all).
    #[arg(long = "meta", value_parser = parse::key_value, value_name = "KEY=VALUE")]
    metadata: Vec<(String, String)>,
    /// The key's new rate limits (replace them all).
    #[command(flatten)]
    limits: LimitArgs,
    /// Drop the key's own limits: the deployment's default applies.
    #[arg(long, conflicts_with = "limits")]
    default_limits: bool,
    /// The key's new reach (replaces it).
    #[command(flatten)]
    reach: ReachArgs,
    /// The key's new network allowlist (repeatable; replaces it).
    #[arg(
        long = "allow-cidr",
        value_name = "CIDR",
        conflicts_with = "any_network"
    )]
    allowed_cidrs: Vec<String>,
    /// Drop the network allowlist: calls from anywhere.
    #[arg(long)]
    any_network: bool,
    #[command(flatten)]
    actor: ActorArgs,
}

#[derive(Args)]
struct RotateArgs {
    /// The key's id (`key_...`).
    key_id: String,
    /// How long the old secret keeps working (at most 7d; default: it stops at once).
    #[arg(long, value_parser = parse::duration)]
    grace: Option<Duration>,
    #[command(flatten)]
    actor: ActorArgs,
}

#[derive(Args)]
struct RevokeArgs {
    /// The key's id (`key_...`).
    key_id: String,
    /// Why, for the audit log and the key's record.
    #[arg(long, default_value = "")]
    reason: String,
    #[command(flatten)]
    actor: ActorArgs,
}

#[derive(Args)]
#[command(group(ArgGroup::new("filter").required(true).args(["owner", "team_id", "created_by", "all"])))]
struct RevokeAllArgs {
    /// The workspace.
    #[arg(long)]
    workspace: String,
    /// Every key of this owner: user:ID or service_account:ID.
    #[arg(long, value_parser = parse::owner)]
    owner: Option<proto::Owner>,
    /// Every key of this team.
    #[arg(long = "team", value_name = "TEAM_ID")]
    team_id: Option<String>,
    /// Every key this actor issued.
    #[arg(long, value_name = "ACTOR_ID")]
    created_by: Option<String>,
    /// Every key of the workspace.
    #[arg(long)]
    all: bool,
    /// Why, for the audit log and each key's record.
    #[arg(long, default_value = "")]
    reason: String,
    #[command(flatten)]
    actor: ActorArgs,
}

#[derive(Args)]
/// A key and the actor acting on it (delete, reset-budget).
struct KeyActorArgs {
    /// The key's id (`key_...`).
    key_id: String,
    #[command(flatten)]
    actor: ActorArgs,
}

pub async fn run(args: KeysArgs) -> Result<ExitCode, CliError> {
    let session = Session::open(&args.conn).await?;
    match args.command {
        KeysCommand::Issue(a) => issue(&session, a).await?,
        KeysCommand::Get { key_id } => {
            let info = session
                .keys()
                .get_key(proto::GetKeyRequest {
                    key_id,
                    actor: None,
                })
                .await?
                .into_inner()
                .key_info;
            show_key(&session, info)?;
        }
        KeysCommand::List(a) => list(&session, a).await?,
        KeysCommand::Update(a) => update(&session, a).await?,
        KeysCommand::Rotate(a) => rotate(&session, a).await?,
        KeysCommand::ReportLeaked(a) => {
            use secrecy::ExposeSecret as _;
            let key = if a.key.expose_secret() == "-" {
                secrecy::SecretString::from(super::read_stdin_secret("key")?.as_str())
            } else {
                a.key
            };
            let answer = session
                .keys()
                .report_leaked_key(proto::ReportLeakedKeyRequest {
                    key: key.expose_secret().to_owned(),
                    source_url: a.source_url,
                    actor: Some(a.actor.proto()),
                })
                .await?
                .into_inner();
            let label = match answer.label() {
                proto::LeakLabel::TruePositive => "true_positive",
                proto::LeakLabel::FalsePositive => "false_positive",
                proto::LeakLabel::Unspecified => "unspecified",
            };
            match session.format {
                Format::Json => output::emit_json(&json!({
                    "label": label,
                    "key_id": answer.key_id,
                    "revoked": answer.revoked,
                }))?,
                Format::Table => output::emit(&output::fields(&[
                    ("label", label.to_owned()),
                    ("key_id", answer.key_id.clone()),
                    ("revoked", answer.revoked.to_string()),
                ]))?,
            }
        }
        KeysCommand::Revoke(a) => {
            let info = session
                .keys()
                .revoke_key(proto::RevokeKeyRequest {
                    key_id: a.key_id,
                    actor: Some(a.actor.proto()),
                    reason: a.reason,
                })
                .await?
                .into_inner()
                .key_info;
            show_key(&session, info)?;
        }
        KeysCommand::RevokeAll(a) => {
            let revoked = session
                .keys()
                .revoke_keys(proto::RevokeKeysRequest {
                    workspace_id: a.workspace,
                    owner: a.owner,
                    team_id: a.team_id.unwrap_or_default(),
                    created_by: a.created_by.unwrap_or_default(),
                    all: a.all,
                    reason: a.reason,
                    actor: Some(a.actor.proto()),
                })
                .await?
                .into_inner()
                .revoked;
            match session.format {
                Format::Json => output::emit_json(&json!({ "revoked": revoked }))?,
                Format::Table => output::emit(&format!("revoked {revoked} keys\n"))?,
            }
        }
        KeysCommand::ResetBudget(a) => {
            let info = session
                .keys()
                .reset_budget(proto::ResetBudgetRequest {
                    key_id: a.key_id,
                    actor: Some(a.actor.proto()),
                })
                .await?
                .into_inner()
                .key_info;
            show_key(&session, info)?;
        }
        KeysCommand::Delete(a) => {
            session
                .keys()
                .delete_key(proto::DeleteKeyRequest {
                    key_id: a.key_id.clone(),
                    actor: Some(a.actor.proto()),
                })
                .await?;
            output::emit_deleted(session.format, &a.key_id)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn environment(e: EnvArg) -> proto::Environment {
    match e {
        EnvArg::Live => proto::Environment::Live,
        EnvArg::Test => proto::Environment::Test,
    }
}

fn status(s: StatusArg) -> proto::KeyStatus {
    match s {
        StatusArg::Active => proto::KeyStatus::Active,
        StatusArg::Revoked => proto::KeyStatus::Revoked,
        StatusArg::Expired => proto::KeyStatus::Expired,
    }
}

fn requests_per_minute(limit: u64) -> proto::RateLimit {
    proto::RateLimit {
        unit: proto::RateLimitUnit::Requests as i32,
        window: proto::RateLimitWindow::Minute as i32,
        limit,
    }
}

async fn issue(session: &Session, a: IssueArgs) -> Result<(), CliError> {
    let expires_at = a.expires_at.or(a.expires_in.map(in_future));
    let response = session
        .keys()
        .issue_key(proto::IssueKeyRequest {
            workspace_id: a.workspace,
            name: a.name,
            environment: environment(a.environment) as i32,
            scopes: a.scopes,
            expires_at,
            owner: a.owner,
            actor: Some(a.actor.proto()),
            metadata: a.metadata.into_iter().collect::<HashMap<_, _>>(),
            rate_limits: a
                .rpm
                .map(requests_per_minute)
                .into_iter()
                .chain(a.limits.limits)
                .collect(),
            max_budget_micros: a.budget,
            budget_period: a.budget_period.map_or(0, |(p, _)| p as i32),
            budget_period_days: a.budget_period.map_or(0, |(_, d)| d),
            resource_access: a.reach.resource_access(),
            allowed_cidrs: a.allowed_cidrs,
            team_id: a.team_id.unwrap_or_default(),
        })
        .await?
        .into_inner();
    show_new_secret(session, &response.key, response.key_info, None)
}

async fn rotate(session: &Session, a: RotateArgs) -> Result<(), CliError> {
    let grace_period = a
        .grace
        .map(|d| {
            prost_types::Duration::try_from(d)
                .map_err(|_| CliError::Usage("--grace is too long".into()))
        })
        .transpose()?;
    let response = session
        .keys()
        .rotate_key(proto::RotateKeyRequest {
            key_id: a.key_id,
            actor: Some(a.actor.proto()),
            grace_period,
        })
        .await?
        .into_inner();
    show_new_secret(
        session,
        &response.key,
        response.key_info,
        Some(response.old_key_valid_until),
    )
}

async fn update(session: &Session, a: UpdateArgs) -> Result<(), CliError> {
    // The mask names exactly the fields whose flags were given: UpdateKey changes those
    // and leaves the rest alone.
    let mut paths = Vec::new();
    if a.name.is_some() {
        paths.push("name");
    }
    if !a.scopes.is_empty() {
        paths.push("scopes");
    }
    let expires_at = a.expires_at.or(a.expires_in.map(in_future));
    if expires_at.is_some() || a.no_expiry {
        paths.push("expires_at");
    }
    if a.budget_period.is_some() {
        paths.push("budget_period");
    }
    if a.budget.is_some() || a.no_budget {
        paths.push("max_budget_micros");
    }
    if !a.metadata.is_empty() {
        paths.push("metadata");
    }
    if !a.limits.limits.is_empty() || a.default_limits {
        paths.push("rate_limits");
    }
    if a.reach.given() {
        paths.push("resource_access");
    }
    if !a.allowed_cidrs.is_empty() || a.any_network {
        paths.push("allowed_cidrs");
    }
    let info = session
        .keys()
        .update_key(proto::UpdateKeyRequest {
            key_id: a.key_id,
            actor: Some(a.actor.proto()),
            name: a.name.unwrap_or_default(),
            scopes: a.scopes,
            expires_at,
            metadata: a.metadata.into_iter().collect(),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.into_iter().map(str::to_owned).collect(),
            }),
            rate_limits: a.limits.limits,
            max_budget_micros: a.budget,
            resource_access: a.reach.resource_access(),
            allowed_cidrs: a.allowed_cidrs,
            budget_period: a.budget_period.map_or(0, |(p, _)| p as i32),
            budget_period_days: a.budget_period.map_or(0, |(_, d)| d),
        })
        .await?
        .into_inner()
        .key_info;
    show_key(session, info)
}

async fn list(session: &Session, a: ListArgs) -> Result<(), CliError> {
    let (keys, next_page_token) =
        super::pages(a.page_token.unwrap_or_default(), a.all, |page_token| {
            let request = proto::ListKeysRequest {
                workspace_id: a.workspace.clone(),
                owner: a.owner.clone(),
                status: a
                    .status
                    .map(status)
                    .unwrap_or(proto::KeyStatus::Unspecified) as i32,
                page_size: a.page_size.unwrap_or(0),
                page_token,
                unused_since: a.unused_since,
                actor: None,
                name_prefix: a.name_prefix.clone().unwrap_or_default(),
                metadata_key: a.metadata.as_ref().map(|m| m.0.clone()).unwrap_or_default(),
                metadata_value: a.metadata.as_ref().map(|m| m.1.clone()).unwrap_or_default(),
                team_id: a.team_id.clone().unwrap_or_default(),
            };
            let mut client = session.keys();
            async move {
                let page = client.list_keys(request).await?.into_inner();
                Ok((page.keys, page.next_page_token))
            }
        })
        .await?;
    output::emit_list(
        session.format,
        "keys",
        &keys,
        output::key_info_json,
        output::key_table,
        Some(&next_page_token),
    )
}

fn show_key(session: &Session, info: Option<proto::KeyInfo>) -> Result<(), CliError> {
    let info = info.unwrap_or_default();
    match session.format {
        Format::Json => output::emit_json(&output::key_info_json(&info)),
        Format::Table => output::emit(&output::fields(&output::key_info_fields(&info))),
    }
}

/// A new key's plaintext (issue, rotate) on stdout, the warning on stderr.
fn show_new_secret(
    session: &Session,
    key: &str,
    info: Option<proto::KeyInfo>,
    old_key_valid_until: Option<Option<prost_types::Timestamp>>,
) -> Result<(), CliError> {
    let info = info.unwrap_or_default();
    warn_shown_once();
    match session.format {
        Format::Json => {
            let mut value = json!({ "key": key, "key_info": output::key_info_json(&info) });
            if let Some(until) = old_key_valid_until {
                value["old_key_valid_until"] = json!(output::time(until.as_ref()));
            }
            output::emit_json(&value)
        }
        Format::Table => {
            let mut fields = vec![("key", key.to_owned())];
            if let Some(until) = old_key_valid_until {
                fields.push(("old_key_valid_until", output::time_cell(until.as_ref())));
            }
            fields.extend(output::key_info_fields(&info));
            output::emit(&output::fields(&fields))
        }
    }
}
