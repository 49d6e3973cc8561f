//! `keywarden usage`: a workspace's usage history (QueryUsage), grouped by key, owner,
//! team or workspace, per hour or day, as a table or JSON.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::output;
use super::{ActorArgs, CliError, Connection, Session, parse};
use crate::proto;

#[derive(Args)]
pub struct UsageArgs {
    #[command(flatten)]
    conn: Connection,
    /// The workspace.
    #[arg(long)]
    workspace: String,
    /// What each row sums.
    #[arg(long = "by", value_enum, default_value = "workspace")]
    group_by: GroupArg,
    /// Rows per hour or per day (hours: at most 31 days back).
    #[arg(long, value_enum, default_value = "day")]
    granularity: GranularityArg,
    /// How far back from now (30d, 12h).
    #[arg(long, value_parser = parse::duration, default_value = "7d")]
    since: Duration,
    /// Rows per page (1 to 1000).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1000))]
    page_size: Option<i32>,
    /// Continue from a previous page (its `next_page_token`).
    #[arg(long, conflicts_with = "all")]
    page_token: Option<String>,
    /// Follow every page and print them as one list.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    actor: ActorArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum GroupArg {
    Key,
    Owner,
    Team,
    Workspace,
}

#[derive(Clone, Copy, ValueEnum)]
enum GranularityArg {
    Hour,
    Day,
}

pub async fn run(a: UsageArgs) -> Result<ExitCode, CliError> {
    let session = Session::open(&a.conn).await?;
    let since = prost_types::Timestamp::from(
        std::time::SystemTime::now()
            .checked_sub(a.since)
            .unwrap_or(std::time::UNIX_EPOCH),
    );
    let group_by = match a.group_by {
        GroupArg::Key => proto::UsageGroupBy::Key,
        GroupArg::Owner => proto::UsageGroupBy::Owner,
        GroupArg::Team => proto::UsageGroupBy::Team,
        GroupArg::Workspace => proto::UsageGroupBy::Workspace,
    };
    let granularity = match a.granularity {
        GranularityArg::Hour => proto::UsageGranularity::Hour,
        GranularityArg::Day => proto::UsageGranularity::Day,
    };
    let (records, next_page_token) =
        super::pages(a.page_token.unwrap_or_default(), a.all, |page_token| {
            let request = proto::QueryUsageRequest {
                workspace_id: a.workspace.clone(),
                group_by: group_by as i32,
                granularity: granularity as i32,
                since: Some(since),
                until: None,
                page_size: a.page_size.unwrap_or(0),
                page_token,
                actor: Some(a.actor.proto()),
            };
            let mut client = session.usage();
            async move {
                let page = client.query_usage(request).await?.into_inner();
                Ok((page.records, page.next_page_token))
            }
        })
        .await?;
    output::emit_list(
        session.format,
        "records",
        &records,
        output::usage_json,
        output::usage_table,
        Some(next_page_token.as_str()).filter(|t| !t.is_empty()),
    )?;
    Ok(ExitCode::SUCCESS)
}
