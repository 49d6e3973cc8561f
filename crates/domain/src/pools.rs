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

use crate::key::Owner;
use crate::limits::{self, LimitDecision, LimitScope, LimitUnit, RateLimit};

/// A pool a key's calls count against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub scope: LimitScope,
    /// The name of the pool's counter, shared by every key in it.
    pub counter: String,
    pub limits: Vec<RateLimit>,
}

impl Pool {
    pub fn owner(workspace_id: &str, owner: &Owner, limits: Vec<RateLimit>) -> Pool {
        Pool {
            scope: LimitScope::Owner,
            counter: format!("owner {workspace_id} {owner}"),
            limits,
        }
    }

    pub fn team(workspace_id: &str, team_id: &str, limits: Vec<RateLimit>) -> Pool {
        Pool {
            scope: LimitScope::Team,
            counter: format!("team {workspace_id} {team_id}"),
            limits,
        }
    }

    pub fn workspace(workspace_id: &str, limits: Vec<RateLimit>) -> Pool {
        Pool {
            scope: LimitScope::Workspace,
            counter: format!("workspace {workspace_id}"),
            limits,
        }
    }
}

/// The pools among `candidates` that limit anything, in the order a call is judged.
pub fn in_order(candidates: impl IntoIterator<Item = Pool>) -> Vec<Pool> {
    let mut pools: Vec<Pool> = candidates
        .into_iter()
        .filter(|p| !p.limits.is_empty())
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
