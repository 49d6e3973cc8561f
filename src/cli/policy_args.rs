//! Flags that several commands share: rate limits (`--limit rpm=600`) and a reach over
//! resources (`--reach include --target gpt-4o --access-group frontier`), for keys and
//! for teams.

use clap::{Args, ValueEnum};

use super::parse;
use crate::proto;

/// Rate limits, each `KIND=N` (rpm, rph, rpd, tpm, tpd).
#[derive(Args, Clone, Default)]
pub struct LimitArgs {
    /// A rate limit KIND=N (repeatable): rpm, rph, rpd (requests per minute, hour, day),
    /// tpm, tpd (tokens per minute, day). E.g. --limit rpm=600 --limit tpd=2000000.
    #[arg(long = "limit", value_parser = parse::limit, value_name = "KIND=N")]
    pub limits: Vec<proto::RateLimit>,
}

/// A pool: limits every key of a workspace, a team or an owner shares.
#[derive(Args, Clone, Default)]
pub struct PoolArgs {
    /// A limit of the pool every key here shares, KIND=N (repeatable; replaces the whole
    /// pool): rpm, rph, rpd, tpm, tpd. E.g. --pool rpm=1000.
    #[arg(long = "pool", value_parser = parse::limit, value_name = "KIND=N", conflicts_with = "no_pool")]
    pub pool: Vec<proto::RateLimit>,
    /// Remove the pool's limits.
    #[arg(long)]
    pub no_pool: bool,
    /// The pool's spend ceiling, in currency units (e.g. 500 or 12.50): what every key
    /// here may spend together in each period.
    #[arg(long, value_parser = parse::money_micros, value_name = "AMOUNT", conflicts_with = "no_pool_budget")]
    pub pool_budget: Option<u64>,
    /// How often the pool's budget starts again: lifetime (default), daily, weekly,
    /// monthly (UTC calendar) or Nd (every N days).
    #[arg(long, value_parser = parse::budget_period, value_name = "PERIOD", requires = "pool_budget")]
    pub pool_budget_period: Option<(proto::BudgetPeriod, u32)>,
    /// Remove the pool's budget.
    #[arg(long)]
    pub no_pool_budget: bool,
}

impl PoolArgs {
    /// The budget to set, if the flags name one (`Some(None)`: remove it).
    pub fn budget(&self) -> Option<Option<proto::PoolBudget>> {
        if self.no_pool_budget {
            return Some(None);
        }
        let max = self.pool_budget?;
        let (period, days) = self
            .pool_budget_period
            .unwrap_or((proto::BudgetPeriod::Unspecified, 0));
        Some(Some(proto::PoolBudget {
            max_budget_micros: max,
            budget_period: period as i32,
            budget_period_days: days,
            ..Default::default()
        }))
    }

    /// The pool to set, if the flags name one (`--no-pool`: an empty one).
    pub fn limits(&self) -> Option<Vec<proto::RateLimit>> {
        if self.no_pool {
            Some(Vec::new())
        } else {
            (!self.pool.is_empty()).then(|| self.pool.clone())
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ReachMode {
    /// Every resource.
    All,
    /// Only the targets and access groups listed.
    Include,
    /// Every resource but those listed.
    Exclude,
}

/// Which resources (models) are reachable.
#[derive(Args, Clone, Default)]
pub struct ReachArgs {
    /// How the listed targets and groups count (default with a list: include).
    #[arg(long, value_enum)]
    pub reach: Option<ReachMode>,
    /// A target (model) listed in the reach (repeatable).
    #[arg(long = "target", value_name = "TARGET")]
    pub targets: Vec<String>,
    /// An access group of the workspace listed in the reach (repeatable).
    #[arg(long = "access-group", value_name = "NAME")]
    pub access_groups: Vec<String>,
}

impl ReachArgs {
    /// Whether any of the flags was given.
    pub fn given(&self) -> bool {
        self.reach.is_some() || !self.targets.is_empty() || !self.access_groups.is_empty()
    }

    /// The reach the flags describe; `None` when none was given.
    pub fn resource_access(&self) -> Option<proto::ResourceAccess> {
        if !self.given() {
            return None;
        }
        let mode = match self.reach.unwrap_or(ReachMode::Include) {
            ReachMode::All => proto::ResourceAccessMode::All,
            ReachMode::Include => proto::ResourceAccessMode::Include,
            ReachMode::Exclude => proto::ResourceAccessMode::Exclude,
        };
        Some(proto::ResourceAccess {
            mode: mode as i32,
            targets: self.targets.clone(),
            access_groups: self.access_groups.clone(),
        })
    }
}
