//! Pools: rate limits shared by every key of an owner, a team or a workspace, so a tenant
//! cannot multiply its allowance by creating keys.
//!
//! A call counts against its key's own limits and every pool it belongs to, in the order
//! key, owner, team, workspace, and is refused by the first that is spent. Each pool is a
//! counter of its own, named by [`Pool::counter`]: the same counters, windows and quota
//! leases a key's own limits use, under a name no key id can take (ids hold no space).
//!
//! A call admitted by the key and refused by a pool must not stay counted in the key:
//! [`LimitDecision::uncounted`] is the answer's side of that, and each limiter gives the
//! cost back where it took it (or, where it cannot tell, keeps it: never over a limit).
//!
//! A pool may also have a budget ([`PoolBudget`]): a spend ceiling over a period, judged
//! as a key's is, against the spend every key of the pool reports. Its spend is kept
//! under the pool's counter name by the usage book and the limiters, and stored on the
//! pool's own row (the workspace, the team, the owner's limits) with its epoch.

use crate::Micros;
use crate::budget::{self, BudgetPeriod, SpendEpoch};
use crate::key::{Owner, OwnerKind};
use crate::limits::{self, LimitDecision, LimitScope, LimitUnit, MAX_BUDGET_MICROS, RateLimit};

/// A pool a key's calls count against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub scope: LimitScope,
    /// The name of the pool's counter, shared by every key in it.
    pub counter: String,
    pub limits: Vec<RateLimit>,
    /// The pool's spend ceiling, if any.
    pub budget: Option<PoolBudget>,
    /// The spend stored for the pool when it was read, in `spend.epoch`.
    pub spend: StoredSpend,
}

/// Spend as a row stores it: the total and the start of the epoch it counts in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoredSpend {
    pub micros: u64,
    pub epoch: Micros,
}

impl StoredSpend {
    /// What of it counts in `epoch`.
    pub fn in_epoch(&self, epoch: &SpendEpoch) -> u64 {
        epoch.count(self.micros, self.epoch)
    }
}

/// A pool's spend ceiling: at most `max_micros` reported by its keys together in each
/// period. Rolling periods (every N days) count from `anchor`, when the budget was set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolBudget {
    pub max_micros: u64,
    pub period: BudgetPeriod,
    pub anchor: Micros,
}

impl PoolBudget {
    /// The epoch its spend is judged over at `now`.
    pub fn epoch(&self, now: Micros) -> SpendEpoch {
        budget::epoch(self.period, self.anchor, 0, now)
    }

    /// The stored form: `MAX`, `MAX/PERIOD` or, for rolling periods, `MAX/days:N@ANCHOR`
    /// (PERIOD as [`BudgetPeriod::as_text`]); `""` for no budget.
    pub fn to_text(budget: Option<&PoolBudget>) -> String {
        match budget {
            None => String::new(),
            Some(b) => match b.period {
                BudgetPeriod::Lifetime => b.max_micros.to_string(),
                BudgetPeriod::Days(_) => {
                    format!("{}/{}@{}", b.max_micros, b.period.as_text(), b.anchor)
                }
                period => format!("{}/{}", b.max_micros, period.as_text()),
            },
        }
    }

    /// The inverse of [`PoolBudget::to_text`]; `Err(())` for text it never writes.
    #[allow(clippy::result_unit_err)]
    pub fn from_text(s: &str) -> Result<Option<PoolBudget>, ()> {
        if s.is_empty() {
            return Ok(None);
        }
        let (max, rest) = s.split_once('/').unwrap_or((s, ""));
        let (period, anchor) = rest.split_once('@').unwrap_or((rest, "0"));
        let max_micros: u64 = max.parse().map_err(|_| ())?;
        let period = BudgetPeriod::parse(period).ok_or(())?;
        let anchor: Micros = anchor.parse().map_err(|_| ())?;
        if max_micros > MAX_BUDGET_MICROS {
            return Err(());
        }
        Ok(Some(PoolBudget {
            max_micros,
            period,
            anchor,
        }))
    }

    /// `budget` as set at `now` over `before`: a rolling period counts from `now`, unless
    /// the same period was set before (then from when it was); a calendar or lifetime
    /// period needs no anchor.
    pub fn anchored(
        budget: Option<PoolBudget>,
        before: Option<&PoolBudget>,
        now: Micros,
    ) -> Option<PoolBudget> {
        let mut budget = budget?;
        budget.anchor = match (budget.period, before) {
            (BudgetPeriod::Days(_), Some(b)) if b.period == budget.period => b.anchor,
            (BudgetPeriod::Days(_), _) => now,
            _ => 0,
        };
        Some(budget)
    }
}

/// Which row a pool's counter names: what its spend is stored on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolOf {
    Workspace(String),
    Team {
        workspace_id: String,
        team_id: String,
    },
    Owner {
        workspace_id: String,
        owner: Owner,
    },
}

impl PoolOf {
    /// The row a counter name made by [`Pool::owner`], [`Pool::team`] or
    /// [`Pool::workspace`] names; `None` for any other name (a key id holds no space).
    pub fn of_counter(counter: &str) -> Option<PoolOf> {
        let mut parts = counter.split(' ');
        let of = match (parts.next()?, parts.next()?, parts.next()) {
            ("workspace", ws, None) => PoolOf::Workspace(ws.to_owned()),
            ("team", ws, Some(team)) => PoolOf::Team {
                workspace_id: ws.to_owned(),
                team_id: team.to_owned(),
            },
            ("owner", ws, Some(owner)) => {
                let (kind, id) = owner.split_once(':')?;
                PoolOf::Owner {
                    workspace_id: ws.to_owned(),
                    owner: Owner {
                        kind: OwnerKind::parse(kind)?,
                        id: id.to_owned(),
                    },
                }
            }
            _ => return None,
        };
        parts.next().is_none().then_some(of)
    }
}

/// Whether an account or counter name is a pool's rather than a key's.
pub fn is_pool_counter(name: &str) -> bool {
    name.contains(' ')
}

impl Pool {
    fn new(scope: LimitScope, counter: String, limits: Vec<RateLimit>) -> Pool {
        Pool {
            scope,
            counter,
            limits,
            budget: None,
            spend: StoredSpend::default(),
        }
    }

    pub fn owner(workspace_id: &str, owner: &Owner, limits: Vec<RateLimit>) -> Pool {
        Pool::new(
            LimitScope::Owner,
            format!("owner {workspace_id} {owner}"),
            limits,
        )
    }

    pub fn team(workspace_id: &str, team_id: &str, limits: Vec<RateLimit>) -> Pool {
        Pool::new(
            LimitScope::Team,
            format!("team {workspace_id} {team_id}"),
            limits,
        )
    }

    pub fn workspace(workspace_id: &str, limits: Vec<RateLimit>) -> Pool {
        Pool::new(
            LimitScope::Workspace,
            format!("workspace {workspace_id}"),
            limits,
        )
    }

    /// The same pool with a budget and the spend stored for it.
    pub fn with_budget(mut self, budget: Option<PoolBudget>, spend: StoredSpend) -> Pool {
        self.budget = budget;
        self.spend = spend;
        self
    }

    /// Whether ReportUsage has anything to count in it: tokens or spend.
    pub fn counts_usage(&self) -> bool {
        self.budget.is_some() || self.has_token_windows()
    }

    pub fn has_token_windows(&self) -> bool {
        limits::has_token_window(&self.limits)
    }
}

/// The pools among `candidates` that limit anything (a rate or a budget), in the order a
/// call is judged.
pub fn in_order(candidates: impl IntoIterator<Item = Pool>) -> Vec<Pool> {
    let mut pools: Vec<Pool> = candidates
        .into_iter()
        .filter(|p| !p.limits.is_empty() || p.budget.is_some())
        .collect();
    pools.sort_by_key(|p| p.scope);
    pools
}

impl LimitDecision {
    /// Marks every window as counting in `scope`'s counter.
    pub fn scoped(mut self, scope: LimitScope) -> LimitDecision {
        for w in &mut self.windows {
            w.scope = scope;
        }
        self
    }

    /// The same windows with a call of `cost` taken back out of them: it was admitted
    /// here, and refused by another counter, so it was not made.
    pub fn uncounted(mut self, cost: u64) -> LimitDecision {
        for w in &mut self.windows {
            if w.limit.unit == LimitUnit::Requests {
                w.used = w.used.saturating_sub(cost);
                w.remaining = w.limit.limit.saturating_sub(w.used);
            }
        }
        self
    }
}

/// One answer from the decisions of each counter a call was judged by, in order: every
/// window of each, allowed only when all allowed, the tightest window picked among all
/// (so a refusal names the pool that refused it, and `X-RateLimit-*` the binding limit).
pub fn combine(parts: Vec<LimitDecision>) -> LimitDecision {
    let allowed = parts.iter().all(|d| d.allowed);
    let windows: Vec<_> = parts.into_iter().flat_map(|d| d.windows).collect();
    let tightest = limits::tightest(&windows, allowed);
    LimitDecision {
        allowed,
        windows,
        tightest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::OwnerKind;
    use crate::limits::{LimitWindow, WindowUsage, decide};

    fn rpm(limit: u64) -> Vec<RateLimit> {
        vec![RateLimit {
            unit: LimitUnit::Requests,
            window: LimitWindow::Minute,
            limit,
        }]
    }

    #[test]
    fn counters_of_different_scopes_never_share_a_name_with_each_other_or_a_key() {
        let owner = Owner {
            kind: OwnerKind::User,
            id: "t1".into(),
        };
        let names = [
            Pool::owner("ws", &owner, rpm(1)).counter,
            Pool::team("ws", "t1", rpm(1)).counter,
            Pool::workspace("ws", rpm(1)).counter,
        ];
        assert_eq!(
            names.len(),
            names.iter().collect::<std::collections::HashSet<_>>().len()
        );
        // Key ids hold no space; every pool counter does.
        assert!(names.iter().all(|n| n.contains(' ')));
    }

    #[test]
    fn a_counter_name_names_its_pools_row_and_no_key_id_names_one() {
        let owner = Owner {
            kind: OwnerKind::ServiceAccount,
            id: "sa_1".into(),
        };
        assert_eq!(
            PoolOf::of_counter(&Pool::owner("ws", &owner, rpm(1)).counter),
            Some(PoolOf::Owner {
                workspace_id: "ws".into(),
                owner
            })
        );
        assert_eq!(
            PoolOf::of_counter(&Pool::team("ws", "t", rpm(1)).counter),
            Some(PoolOf::Team {
                workspace_id: "ws".into(),
                team_id: "t".into()
            })
        );
        assert_eq!(
            PoolOf::of_counter(&Pool::workspace("ws", rpm(1)).counter),
            Some(PoolOf::Workspace("ws".into()))
        );
        for name in [
            "key_abc",
            "workspace a b",
            "owner ws nobody:x",
            "team ws",
            "",
        ] {
            assert_eq!(PoolOf::of_counter(name), None, "{name}");
        }
    }

    #[test]
    fn budgets_round_trip_through_their_stored_form() {
        for b in [
            None,
            Some(PoolBudget {
                max_micros: 5,
                period: BudgetPeriod::Lifetime,
                anchor: 0,
            }),
            Some(PoolBudget {
                max_micros: 50_000_000,
                period: BudgetPeriod::Month,
                anchor: 0,
            }),
            Some(PoolBudget {
                max_micros: 1,
                period: BudgetPeriod::Days(30),
                anchor: 1_700_000_000_000_000,
            }),
        ] {
            assert_eq!(
                PoolBudget::from_text(&PoolBudget::to_text(b.as_ref())),
                Ok(b)
            );
        }
        for bad in ["x", "5/fortnight", "5/days:0@1", "5/days:3@x", "-1"] {
            assert_eq!(PoolBudget::from_text(bad), Err(()), "{bad}");
        }
    }

    #[test]
    fn a_pool_with_a_budget_and_no_rate_limit_is_kept() {
        let budget = PoolBudget {
            max_micros: 10,
            period: BudgetPeriod::Month,
            anchor: 0,
        };
        let pools = in_order([
            Pool::workspace("ws", Vec::new()).with_budget(Some(budget), StoredSpend::default())
        ]);
        assert_eq!(pools.len(), 1);
        assert!(pools[0].counts_usage());
        assert!(!pools[0].has_token_windows());
    }

    #[test]
    fn pools_without_limits_are_dropped_and_the_rest_judged_owner_team_workspace() {
        let owner = Owner {
            kind: OwnerKind::User,
            id: "u".into(),
        };
        let pools = in_order([
            Pool::workspace("ws", rpm(5)),
            Pool::team("ws", "t", Vec::new()),
            Pool::owner("ws", &owner, rpm(2)),
        ]);
        let scopes: Vec<_> = pools.iter().map(|p| p.scope).collect();
        assert_eq!(scopes, [LimitScope::Owner, LimitScope::Workspace]);
    }

    #[test]
    fn a_refusal_by_a_pool_names_the_pool_and_takes_the_call_back_out_of_the_key() {
        let now = 1_000_000_000;
        let mut key_usage = vec![WindowUsage::default()];
        let key = decide(&rpm(100), &mut key_usage, now, 1);
        assert!(key.allowed);
        assert_eq!(key.windows[0].used, 1);
        let mut team_usage = vec![WindowUsage::default()];
        team_usage[0].add(LimitWindow::Minute, now, 10);
        let team = decide(&rpm(10), &mut team_usage, now, 1).scoped(LimitScope::Team);
        assert!(!team.allowed);
        let d = combine(vec![key.uncounted(1), team]);
        assert!(!d.allowed);
        assert_eq!(d.windows.len(), 2);
        assert_eq!(d.windows[0].used, 0);
        assert_eq!(d.windows[0].remaining, 100);
        let binding = d.tightest().unwrap();
        assert_eq!(binding.scope, LimitScope::Team);
        assert_eq!(binding.limit.limit, 10);
    }

    #[test]
    fn an_admitted_call_reports_the_pool_with_least_headroom_as_binding() {
        let now = 1_000_000_000;
        let key = decide(&rpm(100), &mut [WindowUsage::default()], now, 1);
        let mut ws_usage = vec![WindowUsage::default()];
        ws_usage[0].add(LimitWindow::Minute, now, 7);
        let ws = decide(&rpm(10), &mut ws_usage, now, 1).scoped(LimitScope::Workspace);
        let d = combine(vec![key, ws]);
        assert!(d.allowed);
        let binding = d.tightest().unwrap();
        assert_eq!(binding.scope, LimitScope::Workspace);
        assert_eq!(binding.remaining, 2);
    }
}
