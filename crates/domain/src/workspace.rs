//! Workspaces (tenants) and what their plan allows.

use super::Micros;
use super::limits::RateLimit;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Plan {
    /// The free tier.
    Spark,
    Pro,
    Team,
    Enterprise,
}

impl Plan {
    pub const ALL: [Plan; 4] = [Plan::Spark, Plan::Pro, Plan::Team, Plan::Enterprise];

    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Spark => "spark",
            Plan::Pro => "pro",
            Plan::Team => "team",
            Plan::Enterprise => "enterprise",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Plan::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// `SPARK`, as messages name plans.
    pub fn display(self) -> String {
        self.as_str().to_ascii_uppercase()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workspace {
    pub workspace_id: String,
    pub name: String,
    pub plan: Plan,
    /// The pool every key of the workspace counts against (empty: none).
    pub rate_limits: Vec<RateLimit>,
    /// The pool's spend ceiling, if any.
    pub budget: Option<crate::pools::PoolBudget>,
    /// The pool's spend as stored, with its epoch.
    pub spend: crate::pools::StoredSpend,
    pub created_at: Micros,
    pub updated_at: Micros,
}

/// What one plan allows, per deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanPolicy {
    /// Whether the workspace may hold API keys at all (trial organisations may not).
    pub api_keys: bool,
    /// Whether it may store its own provider keys.
    pub byok: bool,
}

/// Every plan's policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plans {
    pub spark: PlanPolicy,
    pub pro: PlanPolicy,
    pub team: PlanPolicy,
    pub enterprise: PlanPolicy,
}

impl Default for Plans {
    /// Keys on every plan; BYOK on every plan but the free one.
    fn default() -> Self {
        let paid = PlanPolicy {
            api_keys: true,
            byok: true,
        };
        Plans {
            spark: PlanPolicy {
                api_keys: true,
                byok: false,
            },
            pro: paid,
            team: paid,
            enterprise: paid,
        }
    }
}

impl Plans {
    pub fn policy(&self, plan: Plan) -> PlanPolicy {
        match plan {
            Plan::Spark => self.spark,
            Plan::Pro => self.pro,
            Plan::Team => self.team,
            Plan::Enterprise => self.enterprise,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_round_trip_and_the_free_tier_has_no_byok_by_default() {
        for plan in Plan::ALL {
            assert_eq!(Plan::parse(plan.as_str()), Some(plan));
        }
        assert_eq!(Plan::parse("gold"), None);
        let plans = Plans::default();
        assert!(!plans.policy(Plan::Spark).byok);
        assert!(plans.policy(Plan::Spark).api_keys);
        assert!(plans.policy(Plan::Pro).byok);
    }
}
