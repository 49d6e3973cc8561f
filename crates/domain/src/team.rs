//! Teams and their self-service policy: the rules a key created by a team member
//! without the admin permission must follow. Pure: the caller supplies the key's fields,
//! the time and how many keys the member holds.

use serde::{Deserialize, Serialize};

use super::access::ResourceAccess;
use super::limits::{LimitUnit, LimitWindow, RateLimit};
use super::refusal::{Reason, Refusal, Violation};
use super::{MICROS_PER_SECOND, Micros};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeamPolicy {
    pub self_service_enabled: bool,
    /// 0: no cap.
    pub max_keys_per_user: u32,
    pub max_budget_micros: Option<u64>,
    pub require_expiry: bool,
    /// 0: no cap.
    pub max_expiry_days: u32,
    /// (unit, window, limit) as stored.
    pub rate_limit_ceilings: Vec<(String, String, u64)>,
    /// The widest reach any key of the team has, whoever issued it: a key reaches a
    /// resource only when both its own access and this allow it. Default: everything.
    #[serde(default)]
    pub resource_access: ResourceAccess,
}

impl TeamPolicy {
    pub fn ceilings(&self) -> Vec<RateLimit> {
        self.rate_limit_ceilings
            .iter()
            .filter_map(|(u, w, l)| {
                Some(RateLimit {
                    unit: LimitUnit::parse(u)?,
                    window: LimitWindow::parse(w)?,
                    limit: *l,
                })
            })
            .collect()
    }

    pub fn set_ceilings(&mut self, ceilings: &[RateLimit]) {
        self.rate_limit_ceilings = ceilings
            .iter()
            .map(|c| {
                (
                    c.unit.as_str().to_owned(),
                    c.window.as_str().to_owned(),
                    c.limit,
                )
            })
            .collect();
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Team {
    pub workspace_id: String,
    pub team_id: String,
    pub name: String,
    pub policy: TeamPolicy,
    /// The pool every key of the team counts against (empty: none).
    pub rate_limits: Vec<RateLimit>,
    /// The pool's spend ceiling, if any.
    pub budget: Option<crate::pools::PoolBudget>,
    /// The pool's spend as stored, with its epoch.
    pub spend: crate::pools::StoredSpend,
    pub created_at: Micros,
    pub updated_at: Micros,
}

/// A non-login owner of a team's keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub workspace_id: String,
    pub team_id: String,
    pub service_account_id: String,
    pub name: String,
    pub created_at: Micros,
}

/// The refusal of a team key owned by a service account that is not one of the team's.
pub fn service_account_not_in_team(service_account_id: &str, team_id: &str) -> Refusal {
    Refusal::new(
        Reason::ServiceAccountNotInTeam,
        format!("service account {service_account_id} is not in team {team_id}"),
    )
    .with("service_account_id", service_account_id)
    .with("team_id", team_id)
}

/// Why a self-service key is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SelfServiceRefusal {
    /// PERMISSION_DENIED.
    Disabled,
    /// PERMISSION_DENIED.
    TooManyKeys {
        max: u32,
    },
    /// FAILED_PRECONDITION from here on.
    BudgetAboveCeiling {
        ceiling: u64,
    },
    ExpiryRequired,
    ExpiryTooFar {
        max_days: u32,
    },
    RateLimitAboveCeiling {
        ceiling: RateLimit,
    },
    /// Several of the FAILED_PRECONDITION rules above at once (two or more), so that the
    /// member learns of every one in one answer.
    Breaches(Vec<SelfServiceRefusal>),
}

impl SelfServiceRefusal {
    /// The refusal as a client sees it: a member who may not act at all
    /// (SELF_SERVICE_DISABLED, SELF_SERVICE_KEY_LIMIT_REACHED: PERMISSION_DENIED) or a key
    /// outside the policy (the TEAM_* reasons: FAILED_PRECONDITION), with the team and the
    /// field or limit at fault.
    pub fn refusal(&self, team_id: &str) -> Refusal {
        let message = self.reason(team_id);
        let refusal = match self {
            SelfServiceRefusal::Breaches(all) => {
                let violations = all
                    .iter()
                    .map(|b| {
                        let one = b.refusal(team_id);
                        let field = b.field().unwrap_or("");
                        Violation {
                            reason: one.reason,
                            field,
                            description: one.message,
                        }
                    })
                    .collect();
                let first = all.first().map_or_else(
                    || Refusal::new(Reason::SelfServiceDisabled, ""),
                    |b| b.refusal(team_id),
                );
                return Refusal { message, ..first }.with_violations(violations);
            }
            SelfServiceRefusal::Disabled => Refusal::new(Reason::SelfServiceDisabled, message),
            SelfServiceRefusal::TooManyKeys { max } => {
                Refusal::new(Reason::SelfServiceKeyLimitReached, message)
                    .with("max_keys_per_user", max)
            }
            SelfServiceRefusal::BudgetAboveCeiling { ceiling } => {
                Refusal::new(Reason::TeamBudgetCeilingExceeded, message)
                    .with("field", "max_budget_micros")
                    .with("max_budget_micros", ceiling)
            }
            SelfServiceRefusal::ExpiryRequired => {
                Refusal::new(Reason::TeamExpiryRequired, message).with("field", "expires_at")
            }
            SelfServiceRefusal::ExpiryTooFar { max_days } => {
                Refusal::new(Reason::TeamExpiryTooFar, message)
                    .with("field", "expires_at")
                    .with("max_expiry_days", max_days)
            }
            SelfServiceRefusal::RateLimitAboveCeiling { ceiling } => {
                Refusal::new(Reason::TeamRateLimitCeilingExceeded, message)
                    .with("field", "rate_limits")
                    .with("limit", ceiling.name())
                    .with("ceiling", ceiling.limit)
            }
        };
        refusal.with("team_id", team_id)
    }

    /// The request field a rule is about.
    fn field(&self) -> Option<&'static str> {
        match self {
            SelfServiceRefusal::BudgetAboveCeiling { .. } => Some("max_budget_micros"),
            SelfServiceRefusal::ExpiryRequired | SelfServiceRefusal::ExpiryTooFar { .. } => {
                Some("expires_at")
            }
            SelfServiceRefusal::RateLimitAboveCeiling { .. } => Some("rate_limits"),
            _ => None,
        }
    }

    pub fn reason(&self, team_id: &str) -> String {
        match self {
            SelfServiceRefusal::Breaches(all) => all
                .iter()
                .map(|b| b.reason(team_id))
                .collect::<Vec<_>>()
                .join("; "),
            SelfServiceRefusal::Disabled => {
                format!("self-service is off in team {team_id}")
            }
            SelfServiceRefusal::TooManyKeys { max } => {
                format!("you already hold the maximum of {max} keys in team {team_id}")
            }
            SelfServiceRefusal::BudgetAboveCeiling { ceiling } => format!(
                "max_budget_micros must be set and at most {ceiling}, team {team_id}'s max_budget"
            ),
            SelfServiceRefusal::ExpiryRequired => {
                format!("team {team_id} requires an expiry (expires_at)")
            }
            SelfServiceRefusal::ExpiryTooFar { max_days } => format!(
                "expires_at must be within {max_days} days (team {team_id}'s max_expiry_days)"
            ),
            SelfServiceRefusal::RateLimitAboveCeiling { ceiling } => format!(
                "the {} limit must be set and at most {}, team {team_id}'s ceiling",
                ceiling.name(),
                ceiling.limit
            ),
        }
    }
}

/// What a self-service key asks for.
#[derive(Clone, Copy)]
pub struct SelfServiceKey<'a> {
    pub max_budget_micros: Option<u64>,
    pub expires_at: Option<Micros>,
    /// The limits that will apply (the key's own, or the deployment's default).
    pub effective_limits: &'a [RateLimit],
}

/// Checks a new self-service key against its team's policy, the member holding `held`
/// keys.
pub fn check_self_service(
    policy: &TeamPolicy,
    key: &SelfServiceKey<'_>,
    held: u64,
    now: Micros,
) -> Result<(), SelfServiceRefusal> {
    if !policy.self_service_enabled {
        return Err(SelfServiceRefusal::Disabled);
    }
    if policy.max_keys_per_user > 0 && held >= u64::from(policy.max_keys_per_user) {
        return Err(SelfServiceRefusal::TooManyKeys {
            max: policy.max_keys_per_user,
        });
    }
    check_self_service_change(policy, key, now)
}

/// What the store reads, under its locks and inside the insert's transaction, about a
/// team key being issued: the team's policy as it stands, the live keys the owner holds
/// in the team, and the team of the service account that owns the key.
#[derive(Clone, Copy, Debug)]
pub struct TeamIssue<'a> {
    pub team_id: &'a str,
    pub policy: &'a TeamPolicy,
    /// The owner's live keys in the team (counted only for a self-service member).
    pub held: u64,
    /// For a key owned by a service account: that account's team (`None`: no such
    /// account). `None` too for a key owned by a user.
    pub service_account_team: Option<&'a str>,
}

/// Whether a team key may be issued: a key owned by a service account is owned by one
/// of the team's, and a self-service member's key (`member`) keeps to the team's policy
/// with the keys the member already holds there. One decision over one reading, so a
/// member cannot pass a count made before a concurrent issue committed.
pub fn check_team_issue(
    issue: &TeamIssue<'_>,
    owner: &crate::key::Owner,
    member: Option<&SelfServiceKey<'_>>,
    now: Micros,
) -> Result<(), Refusal> {
    if owner.kind == crate::key::OwnerKind::ServiceAccount
        && issue.service_account_team != Some(issue.team_id)
    {
        return Err(service_account_not_in_team(&owner.id, issue.team_id));
    }
    match member {
        Some(key) => check_self_service(issue.policy, key, issue.held, now)
            .map_err(|refusal| refusal.refusal(issue.team_id)),
        None => Ok(()),
    }
}

/// Checks an existing self-service key as an update or a rotation would leave it: the
/// same rules as for a new key but the count (the key is already counted). A key that a
/// tightened policy no longer admits cannot be changed or rotated by its member until it
/// is brought within the policy (revoking it is always allowed).
pub fn check_self_service_change(
    policy: &TeamPolicy,
    key: &SelfServiceKey<'_>,
    now: Micros,
) -> Result<(), SelfServiceRefusal> {
    if !policy.self_service_enabled {
        return Err(SelfServiceRefusal::Disabled);
    }
    // Every rule the key breaks, not only the first: one answer tells the member all
    // there is to change.
    let mut breaches = Vec::new();
    if let Some(ceiling) = policy.max_budget_micros
        && key.max_budget_micros.is_none_or(|b| b > ceiling)
    {
        breaches.push(SelfServiceRefusal::BudgetAboveCeiling { ceiling });
    }
    if policy.require_expiry && key.expires_at.is_none() {
        breaches.push(SelfServiceRefusal::ExpiryRequired);
    } else if policy.max_expiry_days > 0 {
        let latest = now + i64::from(policy.max_expiry_days) * 86_400 * MICROS_PER_SECOND;
        if key.expires_at.is_none_or(|e| e > latest) {
            breaches.push(SelfServiceRefusal::ExpiryTooFar {
                max_days: policy.max_expiry_days,
            });
        }
    }
    for ceiling in policy.ceilings() {
        let within = key.effective_limits.iter().any(|l| {
            l.unit == ceiling.unit && l.window == ceiling.window && l.limit <= ceiling.limit
        });
        if !within {
            breaches.push(SelfServiceRefusal::RateLimitAboveCeiling { ceiling });
        }
    }
    match breaches.len() {
        0 => Ok(()),
        1 => Err(breaches.remove(0)),
        _ => Err(SelfServiceRefusal::Breaches(breaches)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Micros = 86_400 * MICROS_PER_SECOND;

    fn rpm(n: u64) -> RateLimit {
        RateLimit {
            unit: LimitUnit::Requests,
            window: LimitWindow::Minute,
            limit: n,
        }
    }

    #[test]
    fn each_rule_refuses_with_its_reason() {
        let mut policy = TeamPolicy {
            self_service_enabled: true,
            max_keys_per_user: 2,
            max_budget_micros: Some(1000),
            require_expiry: true,
            max_expiry_days: 30,
            ..TeamPolicy::default()
        };
        policy.set_ceilings(&[rpm(60)]);
        let limits = [rpm(60)];
        let ok = SelfServiceKey {
            max_budget_micros: Some(1000),
            expires_at: Some(30 * DAY),
            effective_limits: &limits,
        };
        assert_eq!(check_self_service(&policy, &ok, 1, 0), Ok(()));
        assert_eq!(
            check_self_service(&policy, &ok, 2, 0),
            Err(SelfServiceRefusal::TooManyKeys { max: 2 })
        );
        let over = [rpm(61)];
        for (key, refusal) in [
            (
                SelfServiceKey {
                    max_budget_micros: Some(1001),
                    ..ok
                },
                SelfServiceRefusal::BudgetAboveCeiling { ceiling: 1000 },
            ),
            (
                SelfServiceKey {
                    expires_at: None,
                    ..ok
                },
                SelfServiceRefusal::ExpiryRequired,
            ),
            (
                SelfServiceKey {
                    expires_at: Some(30 * DAY + 1),
                    ..ok
                },
                SelfServiceRefusal::ExpiryTooFar { max_days: 30 },
            ),
            (
                SelfServiceKey {
                    effective_limits: &over,
                    ..ok
                },
                SelfServiceRefusal::RateLimitAboveCeiling { ceiling: rpm(60) },
            ),
        ] {
            let refused = check_self_service(&policy, &key, 0, 0).unwrap_err();
            assert_eq!(refused, refusal);
            assert!(refused.refusal("t").reason.as_str().starts_with("TEAM_"));
        }
        policy.self_service_enabled = false;
        assert_eq!(
            check_self_service(&policy, &ok, 0, 0),
            Err(SelfServiceRefusal::Disabled)
        );
    }

    /// A key that breaks several rules is refused naming every one, in the policy's
    /// order, each with its own reason and field; the first is the refusal's reason.
    #[test]
    fn every_broken_rule_is_named_at_once() {
        let mut policy = TeamPolicy {
            self_service_enabled: true,
            max_budget_micros: Some(1000),
            require_expiry: true,
            max_expiry_days: 30,
            ..TeamPolicy::default()
        };
        policy.set_ceilings(&[rpm(60)]);
        let key = SelfServiceKey {
            max_budget_micros: None,
            expires_at: None,
            effective_limits: &[rpm(100)],
        };
        let refused = check_self_service_change(&policy, &key, 0).unwrap_err();
        assert_eq!(
            refused,
            SelfServiceRefusal::Breaches(vec![
                SelfServiceRefusal::BudgetAboveCeiling { ceiling: 1000 },
                SelfServiceRefusal::ExpiryRequired,
                SelfServiceRefusal::RateLimitAboveCeiling { ceiling: rpm(60) },
            ])
        );
        let refusal = refused.refusal("team_ml");
        assert_eq!(refusal.reason, Reason::TeamBudgetCeilingExceeded);
        let named: Vec<(Reason, &str)> = refusal
            .violations
            .iter()
            .map(|v| (v.reason, v.field))
            .collect();
        assert_eq!(
            named,
            [
                (Reason::TeamBudgetCeilingExceeded, "max_budget_micros"),
                (Reason::TeamExpiryRequired, "expires_at"),
                (Reason::TeamRateLimitCeilingExceeded, "rate_limits"),
            ]
        );
        for v in &refusal.violations {
            assert!(refusal.message.contains(&v.description), "{refusal:?}");
        }
        // One rule broken: that rule alone, as before.
        let one = SelfServiceKey {
            max_budget_micros: Some(10),
            expires_at: Some(DAY),
            effective_limits: &[rpm(100)],
        };
        assert_eq!(
            check_self_service_change(&policy, &one, 0),
            Err(SelfServiceRefusal::RateLimitAboveCeiling { ceiling: rpm(60) })
        );
        assert!(
            SelfServiceRefusal::ExpiryRequired
                .refusal("t")
                .violations
                .is_empty()
        );
    }

    #[test]
    fn a_change_is_judged_by_every_rule_but_the_count() {
        let policy = TeamPolicy {
            self_service_enabled: true,
            max_keys_per_user: 1,
            max_budget_micros: Some(1000),
            ..TeamPolicy::default()
        };
        let within = SelfServiceKey {
            max_budget_micros: Some(1000),
            expires_at: None,
            effective_limits: &[],
        };
        // The member holds its one key: a new one is refused, changing it is not.
        assert_eq!(
            check_self_service(&policy, &within, 1, 0),
            Err(SelfServiceRefusal::TooManyKeys { max: 1 })
        );
        assert_eq!(check_self_service_change(&policy, &within, 0), Ok(()));
        let over = SelfServiceKey {
            max_budget_micros: Some(1001),
            ..within
        };
        assert_eq!(
            check_self_service_change(&policy, &over, 0),
            Err(SelfServiceRefusal::BudgetAboveCeiling { ceiling: 1000 })
        );
        let off = TeamPolicy {
            self_service_enabled: false,
            ..policy
        };
        assert_eq!(
            check_self_service_change(&off, &within, 0),
            Err(SelfServiceRefusal::Disabled)
        );
    }

    #[test]
    fn a_team_issue_checks_the_account_s_team_and_a_member_s_policy() {
        use crate::key::{Owner, OwnerKind};
        let policy = TeamPolicy {
            self_service_enabled: true,
            max_keys_per_user: 2,
            ..TeamPolicy::default()
        };
        let issue = TeamIssue {
            team_id: "team_ml",
            policy: &policy,
            held: 1,
            service_account_team: Some("team_ml"),
        };
        let account = Owner {
            kind: OwnerKind::ServiceAccount,
            id: "sa_ml".to_owned(),
        };
        let user = Owner {
            kind: OwnerKind::User,
            id: "user_ann".to_owned(),
        };
        let key = SelfServiceKey {
            max_budget_micros: None,
            expires_at: None,
            effective_limits: &[],
        };
        assert_eq!(check_team_issue(&issue, &account, None, 0), Ok(()));
        // An account of another team, or none at all.
        for other in [Some("team_ops"), None] {
            let refusal = check_team_issue(
                &TeamIssue {
                    service_account_team: other,
                    ..issue
                },
                &account,
                None,
                0,
            )
            .unwrap_err();
            assert_eq!(refusal.reason, Reason::ServiceAccountNotInTeam);
        }
        // A member below the cap passes; at it, refused; an admin's issue counts nothing.
        assert_eq!(check_team_issue(&issue, &user, Some(&key), 0), Ok(()));
        let full = TeamIssue { held: 2, ..issue };
        let refusal = check_team_issue(&full, &user, Some(&key), 0).unwrap_err();
        assert_eq!(refusal.reason, Reason::SelfServiceKeyLimitReached);
        assert_eq!(check_team_issue(&full, &user, None, 0), Ok(()));
        // The member's policy is the one read with the count: off means refused.
        let off = TeamPolicy {
            self_service_enabled: false,
            ..policy.clone()
        };
        let refusal = check_team_issue(
            &TeamIssue {
                policy: &off,
                ..issue
            },
            &user,
            Some(&key),
            0,
        )
        .unwrap_err();
        assert_eq!(refusal.reason, Reason::SelfServiceDisabled);
    }
}
