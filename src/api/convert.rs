//! Conversions between protobuf messages and domain types. Incoming values are checked
//! here (the API edge): unknown enum values, out-of-range timestamps and durations become
//! field violations instead of surprises further in.

use std::collections::{BTreeMap, HashMap};

use prost_types::{Duration as PbDuration, Timestamp};

use crate::domain::access::{self, AccessMode, NetworkAllowlist, ResourceAccess};
use crate::domain::actor::Actor;
use crate::domain::budget::{BudgetPeriod, MAX_PERIOD_DAYS};
use crate::domain::key::{KeyRecord, KeyStatus, Owner, OwnerKind};
use crate::domain::key_format::Environment;
use crate::domain::leak::LeakLabel;
use crate::domain::limits::{LimitDecision, LimitScope, LimitUnit, LimitWindow, RateLimit};
use crate::domain::pools::{PoolBudget, StoredSpend};
use crate::domain::validate::{MAX_PAGE_TOKEN_LEN, Violations};
use crate::domain::{MICROS_PER_SECOND, Micros};
use crate::proto;
use crate::store::{AuditOutcome, AuditRecord};

/// Timestamps from year 1 to 9999, as google.protobuf.Timestamp allows.
const MIN_SECONDS: i64 = -62_135_596_800;
const MAX_SECONDS: i64 = 253_402_300_799;

pub fn timestamp(at: Micros) -> Timestamp {
    Timestamp {
        seconds: at.div_euclid(MICROS_PER_SECOND),
        nanos: (at.rem_euclid(MICROS_PER_SECOND) * 1000) as i32,
    }
}

pub fn micros_of(ts: &Timestamp, field: &str, v: &mut Violations) -> Option<Micros> {
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&ts.seconds) || !(0..1_000_000_000).contains(&ts.nanos)
    {
        v.add(field, "is not a valid timestamp");
        return None;
    }
    Some(ts.seconds * MICROS_PER_SECOND + i64::from(ts.nanos / 1000))
}

pub fn duration_micros(d: &PbDuration, field: &str, v: &mut Violations) -> Option<Micros> {
    let valid = (0..=315_576_000_000).contains(&d.seconds) && (0..1_000_000_000).contains(&d.nanos);
    if !valid {
        v.add(field, "must be a non-negative duration");
        return None;
    }
    Some(d.seconds * MICROS_PER_SECOND + i64::from(d.nanos / 1000))
}

pub fn duration_pb(d: std::time::Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

pub fn environment(raw: i32, field: &str, v: &mut Violations) -> Option<Environment> {
    match proto::Environment::try_from(raw) {
        Ok(proto::Environment::Live) => Some(Environment::Live),
        Ok(proto::Environment::Test) => Some(Environment::Test),
        Ok(proto::Environment::Unspecified) => {
            v.add(field, "is required: ENVIRONMENT_LIVE or ENVIRONMENT_TEST");
            None
        }
        Err(_) => {
            v.add(field, "is not a known environment");
            None
        }
    }
}

pub fn environment_pb(env: Environment) -> proto::Environment {
    match env {
        Environment::Live => proto::Environment::Live,
        Environment::Test => proto::Environment::Test,
    }
}

pub fn owner(given: Option<&proto::Owner>, field: &str, v: &mut Violations) -> Option<Owner> {
    let Some(given) = given else {
        v.add(field, "is required");
        return None;
    };
    let kind = match proto::OwnerKind::try_from(given.kind) {
        Ok(proto::OwnerKind::User) => Some(OwnerKind::User),
        Ok(proto::OwnerKind::ServiceAccount) => Some(OwnerKind::ServiceAccount),
        Ok(proto::OwnerKind::Unspecified) => {
            v.add(
                format!("{field}.kind"),
                "is required: OWNER_KIND_USER or OWNER_KIND_SERVICE_ACCOUNT",
            );
            None
        }
        Err(_) => {
            v.add(format!("{field}.kind"), "is not a known owner kind");
            None
        }
    };
    v.principal_id(&format!("{field}.id"), &given.id);
    Some(Owner {
        kind: kind?,
        id: given.id.clone(),
    })
}

pub fn owner_pb(owner: &Owner) -> proto::Owner {
    proto::Owner {
        kind: match owner.kind {
            OwnerKind::User => proto::OwnerKind::User,
            OwnerKind::ServiceAccount => proto::OwnerKind::ServiceAccount,
        } as i32,
        id: owner.id.clone(),
    }
}

pub fn actor(given: Option<&proto::Actor>, v: &mut Violations) -> Actor {
    let Some(given) = given else {
        v.add("actor", "is required");
        return Actor {
            id: String::new(),
            permissions: Vec::new(),
        };
    };
    v.principal_id("actor.id", &given.id);
    Actor {
        id: given.id.clone(),
        permissions: v.permissions("actor.permissions", &given.permissions),
    }
}

/// An actor a request may name (GetKey, ListKeys): validated like a required one when
/// present.
pub fn optional_actor(given: Option<&proto::Actor>, v: &mut Violations) -> Option<Actor> {
    given.map(|a| actor(Some(a), v))
}

/// `None` for UNSPECIFIED (no filter).
pub fn status_filter(raw: i32, field: &str, v: &mut Violations) -> Option<KeyStatus> {
    match proto::KeyStatus::try_from(raw) {
        Ok(proto::KeyStatus::Unspecified) => None,
        Ok(proto::KeyStatus::Active) => Some(KeyStatus::Active),
        Ok(proto::KeyStatus::Revoked) => Some(KeyStatus::Revoked),
        Ok(proto::KeyStatus::Expired) => Some(KeyStatus::Expired),
        Err(_) => {
            v.add(field, "is not a known key status");
            None
        }
    }
}

pub fn metadata(
    given: &HashMap<String, String>,
    field: &str,
    v: &mut Violations,
) -> BTreeMap<String, String> {
    let out: BTreeMap<String, String> = given.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.metadata(field, &out);
    out
}

/// Rate limits from the wire: units and windows must be named and known.
pub fn rate_limits(given: &[proto::RateLimit], field: &str, v: &mut Violations) -> Vec<RateLimit> {
    if given.len() > 6 {
        v.add(
            field,
            "must hold at most 6 limits (one per unit and window)",
        );
        return Vec::new();
    }
    let mut out = Vec::with_capacity(given.len());
    for (i, l) in given.iter().enumerate() {
        let unit = match proto::RateLimitUnit::try_from(l.unit) {
            Ok(proto::RateLimitUnit::Requests) => Some(LimitUnit::Requests),
            Ok(proto::RateLimitUnit::Tokens) => Some(LimitUnit::Tokens),
            _ => {
                v.add(
                    format!("{field}[{i}].unit"),
                    "must be RATE_LIMIT_UNIT_REQUESTS or RATE_LIMIT_UNIT_TOKENS",
                );
                None
            }
        };
        let window = match proto::RateLimitWindow::try_from(l.window) {
            Ok(proto::RateLimitWindow::Minute) => Some(LimitWindow::Minute),
            Ok(proto::RateLimitWindow::Hour) => Some(LimitWindow::Hour),
            Ok(proto::RateLimitWindow::Day) => Some(LimitWindow::Day),
            _ => {
                v.add(
                    format!("{field}[{i}].window"),
                    "must be RATE_LIMIT_WINDOW_MINUTE, _HOUR or _DAY",
                );
                None
            }
        };
        if let (Some(unit), Some(window)) = (unit, window) {
            out.push(RateLimit {
                unit,
                window,
                limit: l.limit,
            });
        }
    }
    if out.len() == given.len() {
        v.rate_limits(field, &out)
    } else {
        out
    }
}

pub fn rate_limit_pb(l: &RateLimit) -> proto::RateLimit {
    proto::RateLimit {
        unit: match l.unit {
            LimitUnit::Requests => proto::RateLimitUnit::Requests,
            LimitUnit::Tokens => proto::RateLimitUnit::Tokens,
        } as i32,
        window: match l.window {
            LimitWindow::Minute => proto::RateLimitWindow::Minute,
            LimitWindow::Hour => proto::RateLimitWindow::Hour,
            LimitWindow::Day => proto::RateLimitWindow::Day,
        } as i32,
        limit: l.limit,
    }
}

/// Unix seconds, rounded up: a reset is never announced before it happens.
pub fn unix_seconds_ceil(at: Micros) -> i64 {
    at.div_euclid(MICROS_PER_SECOND) + i64::from(at.rem_euclid(MICROS_PER_SECOND) != 0)
}

pub fn limit_decision_pb(d: &LimitDecision, now: Micros) -> proto::RateLimitDecision {
    let tightest = d.tightest();
    proto::RateLimitDecision {
        allowed: d.allowed,
        limit: tightest.map_or(0, |w| w.limit.limit),
        remaining: tightest.map_or(0, |w| w.remaining),
        reset_at: tightest.map_or(0, |w| unix_seconds_ceil(w.reset_at)),
        retry_after: d.retry_at().filter(|_| !d.allowed).map(|at| {
            let wait = (at - now).max(0);
            PbDuration {
                seconds: wait / MICROS_PER_SECOND,
                nanos: ((wait % MICROS_PER_SECOND) * 1000) as i32,
            }
        }),
        windows: d
            .windows
            .iter()
            .map(|w| proto::RateLimitWindowState {
                limit: Some(rate_limit_pb(&w.limit)),
                used: w.used,
                remaining: w.remaining,
                reset_at: unix_seconds_ceil(w.reset_at),
                allowed: w.allowed,
                scope: limit_scope_pb(w.scope) as i32,
            })
            .collect(),
        scope: tightest.map_or(proto::LimitScope::Unspecified, |w| limit_scope_pb(w.scope)) as i32,
    }
}

pub fn limit_scope_pb(scope: LimitScope) -> proto::LimitScope {
    match scope {
        LimitScope::Key => proto::LimitScope::Key,
        LimitScope::Owner => proto::LimitScope::Owner,
        LimitScope::Team => proto::LimitScope::Team,
        LimitScope::Workspace => proto::LimitScope::Workspace,
    }
}

/// The paths of an update mask, each of which must be one of `known`; a missing or empty
/// mask is a violation. Unknown paths are reported with [`unknown_mask_path`].
pub fn mask_paths<'a>(
    mask: Option<&'a prost_types::FieldMask>,
    known: &[&str],
    v: &mut Violations,
) -> &'a [String] {
    let paths = mask.map(|m| m.paths.as_slice()).unwrap_or_default();
    if paths.is_empty() {
        v.add(
            "update_mask",
            format!("must name at least one of {}", known.join(", ")),
        );
    }
    paths
}

/// Reports a mask path that is none of `known` (echoing at most 64 characters of it).
pub fn unknown_mask_path(path: &str, known: &[&str], v: &mut Violations) {
    let expected = match known.split_last() {
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    v.add(
        "update_mask",
        format!(
            "unknown path `{}`: expected {expected}",
            path.chars().take(64).collect::<String>()
        ),
    );
}

pub fn resource_access_pb(a: &ResourceAccess) -> proto::ResourceAccess {
    proto::ResourceAccess {
        mode: match a.mode {
            AccessMode::All => proto::ResourceAccessMode::All,
            AccessMode::Include => proto::ResourceAccessMode::Include,
            AccessMode::Exclude => proto::ResourceAccessMode::Exclude,
        } as i32,
        targets: a.targets.iter().cloned().collect(),
        access_groups: a.groups.iter().cloned().collect(),
    }
}

/// Resource access from the wire (unset: every resource).
pub fn resource_access(
    given: Option<&proto::ResourceAccess>,
    field: &str,
    v: &mut Violations,
) -> ResourceAccess {
    let Some(given) = given else {
        return ResourceAccess::default();
    };
    let mode = match proto::ResourceAccessMode::try_from(given.mode) {
        Ok(proto::ResourceAccessMode::Unspecified | proto::ResourceAccessMode::All) => {
            Some(AccessMode::All)
        }
        Ok(proto::ResourceAccessMode::Include) => Some(AccessMode::Include),
        Ok(proto::ResourceAccessMode::Exclude) => Some(AccessMode::Exclude),
        Err(_) => {
            v.add(format!("{field}.mode"), "is not a known mode");
            None
        }
    };
    if given.targets.len() > access::MAX_TARGETS {
        v.add(
            format!("{field}.targets"),
            format!("must hold at most {} targets", access::MAX_TARGETS),
        );
        return ResourceAccess::default();
    }
    for (i, t) in given.targets.iter().enumerate() {
        if !access::is_target(t) {
            v.add(
                format!("{field}.targets[{i}]"),
                "must be 1 to 128 printable ASCII characters without spaces",
            );
        }
    }
    if mode == Some(AccessMode::All) && !given.targets.is_empty() {
        v.add(
            format!("{field}.targets"),
            "must be empty when every resource is allowed (mode ALL)",
        );
    }
    if given.access_groups.len() > access::MAX_TARGETS {
        v.add(
            format!("{field}.access_groups"),
            format!("must hold at most {} groups", access::MAX_TARGETS),
        );
    }
    for (i, g) in given.access_groups.iter().enumerate() {
        if !access::is_group_name(g) {
            v.add(
                format!("{field}.access_groups[{i}]"),
                "must be 1 to 64 of a-z, 0-9, '_' and '-', starting with a letter",
            );
        }
    }
    if mode == Some(AccessMode::All) && !given.access_groups.is_empty() {
        v.add(
            format!("{field}.access_groups"),
            "must be empty when every resource is allowed (mode ALL)",
        );
    }
    ResourceAccess {
        mode: mode.unwrap_or_default(),
        targets: given.targets.iter().cloned().collect(),
        groups: given.access_groups.iter().cloned().collect(),
        group_targets: Default::default(),
    }
}

/// A network allowlist from the wire: CIDR ranges or bare addresses, IPv4 or IPv6.
pub fn allowed_cidrs(given: &[String], field: &str, v: &mut Violations) -> NetworkAllowlist {
    if given.len() > access::MAX_CIDRS {
        v.add(
            field,
            format!("must hold at most {} ranges", access::MAX_CIDRS),
        );
        return NetworkAllowlist::default();
    }
    let mut nets = Vec::with_capacity(given.len());
    for (i, c) in given.iter().enumerate() {
        match (c.len() <= 64).then(|| access::parse_cidr(c)).flatten() {
            Some(net) if !nets.contains(&net) => nets.push(net),
            Some(_) => {}
            None => v.add(
                format!("{field}[{i}]"),
                "is not a CIDR range or an IP address (e.g. 10.0.0.0/8, 2001:db8::/32)",
            ),
        }
    }
    NetworkAllowlist { nets }
}

pub fn key_info(key: &KeyRecord, now: Micros) -> proto::KeyInfo {
    let epoch = key.spend_epoch_at(now);
    proto::KeyInfo {
        key_id: key.key_id.clone(),
        workspace_id: key.workspace_id.clone(),
        name: key.name.clone(),
        environment: environment_pb(key.environment) as i32,
        display: key.display.clone(),
        scopes: key.scopes.clone(),
        status: match key.status(now) {
            KeyStatus::Active => proto::KeyStatus::Active,
            KeyStatus::Revoked => proto::KeyStatus::Revoked,
            KeyStatus::Expired => proto::KeyStatus::Expired,
        } as i32,
        created_at: Some(timestamp(key.created_at)),
        expires_at: key.expires_at.map(timestamp),
        revoked_at: key.revoked_at.map(timestamp),
        owner: Some(owner_pb(&key.owner)),
        created_by: key.created_by.clone(),
        metadata: key
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        updated_at: Some(timestamp(key.updated_at)),
        rotated_at: key.rotated_at.map(timestamp),
        revoke_reason: key.revoke_reason.clone().unwrap_or_default(),
        rate_limits: key.rate_limits.iter().map(rate_limit_pb).collect(),
        max_budget_micros: key.max_budget_micros,
        spent_micros: key.spent_at(now),
        last_used_at: key.last_used_at.map(timestamp),
        resource_access: Some(resource_access_pb(&key.resource_access)),
        allowed_cidrs: key.network.nets.iter().map(ToString::to_string).collect(),
        team_id: key.team_id.clone().unwrap_or_default(),
        budget_period: budget_period_pb(key.budget_period).0 as i32,
        budget_period_days: budget_period_pb(key.budget_period).1,
        budget_period_start: (epoch.start != 0).then(|| timestamp(epoch.start)),
        budget_resets_at: (epoch.ends != Micros::MAX).then(|| timestamp(epoch.ends)),
    }
}

/// A budget period from its two request fields (`field` and `{field}_days`).
pub fn budget_period(raw: i32, days: u32, field: &str, v: &mut Violations) -> BudgetPeriod {
    let days_field = format!("{field}_days");
    let period = match proto::BudgetPeriod::try_from(raw) {
        Ok(proto::BudgetPeriod::Unspecified) => BudgetPeriod::Lifetime,
        Ok(proto::BudgetPeriod::Daily) => BudgetPeriod::Day,
        Ok(proto::BudgetPeriod::Weekly) => BudgetPeriod::Week,
        Ok(proto::BudgetPeriod::Monthly) => BudgetPeriod::Month,
        Ok(proto::BudgetPeriod::RollingDays) => {
            match u16::try_from(days)
                .ok()
                .filter(|d| (1..=MAX_PERIOD_DAYS).contains(d))
            {
                Some(d) => return BudgetPeriod::Days(d),
                None => {
                    v.add(
                        days_field,
                        "must be 1 to 366 with BUDGET_PERIOD_ROLLING_DAYS",
                    );
                    return BudgetPeriod::Lifetime;
                }
            }
        }
        Err(_) => {
            v.add(field, "is not a known budget period");
            return BudgetPeriod::Lifetime;
        }
    };
    if days != 0 {
        v.add(days_field, "is only for BUDGET_PERIOD_ROLLING_DAYS");
    }
    period
}

pub fn budget_period_pb(period: BudgetPeriod) -> (proto::BudgetPeriod, u32) {
    match period {
        BudgetPeriod::Lifetime => (proto::BudgetPeriod::Unspecified, 0),
        BudgetPeriod::Day => (proto::BudgetPeriod::Daily, 0),
        BudgetPeriod::Week => (proto::BudgetPeriod::Weekly, 0),
        BudgetPeriod::Month => (proto::BudgetPeriod::Monthly, 0),
        BudgetPeriod::Days(n) => (proto::BudgetPeriod::RollingDays, u32::from(n)),
    }
}

/// A pool's budget from a request (`None`: no budget); its output-only fields are
/// ignored, and its anchor is the store's to set.
pub fn pool_budget(
    pb: Option<&proto::PoolBudget>,
    field: &str,
    v: &mut Violations,
) -> Option<PoolBudget> {
    let pb = pb?;
    v.budget(&format!("{field}.max_budget_micros"), pb.max_budget_micros);
    let period = budget_period(
        pb.budget_period,
        pb.budget_period_days,
        &format!("{field}.budget_period"),
        v,
    );
    Some(PoolBudget {
        max_micros: pb.max_budget_micros,
        period,
        anchor: 0,
    })
}

/// A pool's budget as answered, with the spend stored in its current period at `now`.
pub fn pool_budget_pb(
    budget: Option<&PoolBudget>,
    spend: StoredSpend,
    now: Micros,
) -> Option<proto::PoolBudget> {
    let budget = budget?;
    let epoch = budget.epoch(now);
    let (period, days) = budget_period_pb(budget.period);
    Some(proto::PoolBudget {
        max_budget_micros: budget.max_micros,
        budget_period: period as i32,
        budget_period_days: days,
        spent_micros: spend.in_epoch(&epoch),
        budget_period_start: (epoch.start != 0).then(|| timestamp(epoch.start)),
        budget_resets_at: (epoch.ends != Micros::MAX).then(|| timestamp(epoch.ends)),
    })
}

pub fn leak_label_pb(label: LeakLabel) -> proto::LeakLabel {
    match label {
        LeakLabel::TruePositive => proto::LeakLabel::TruePositive,
        LeakLabel::FalsePositive => proto::LeakLabel::FalsePositive,
    }
}

pub fn audit_event(e: &AuditRecord) -> proto::AuditEvent {
    proto::AuditEvent {
        id: e.id,
        workspace_id: e.workspace_id.clone(),
        actor_id: e.actor_id.clone(),
        caller: e.caller.clone(),
        action: e.action.clone(),
        key_id: e.key_id.clone().unwrap_or_default(),
        outcome: match e.outcome {
            AuditOutcome::Success => proto::AuditOutcome::Success,
            AuditOutcome::Denied => proto::AuditOutcome::Denied,
        } as i32,
        detail: e.detail.clone(),
        occurred_at: Some(timestamp(e.occurred_at)),
    }
}

/// A request's `page_token`: `None` when empty, else what `decode` makes of it, or a
/// violation naming the field.
pub fn page_token_field<T>(
    token: &str,
    v: &mut Violations,
    decode: impl Fn(&str) -> Option<T>,
) -> Option<T> {
    if token.is_empty() {
        return None;
    }
    let decoded = (token.len() <= MAX_PAGE_TOKEN_LEN)
        .then(|| decode(token))
        .flatten();
    if decoded.is_none() {
        v.add("page_token", "is not a page token this service issued");
    }
    decoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_including_before_the_epoch() {
        let mut v = Violations::default();
        for at in [0, 1, 1_700_000_000_123_456, -1, -1_500_000] {
            assert_eq!(micros_of(&timestamp(at), "t", &mut v), Some(at));
        }
        assert!(v.is_empty());
    }

    #[test]
    fn mask_paths_name_what_is_expected() {
        let mut v = Violations::default();
        assert!(mask_paths(None, &["name", "plan"], &mut v).is_empty());
        unknown_mask_path(&"x".repeat(100), &["name", "scopes", "plan"], &mut v);
        let described: Vec<_> = v.0.iter().map(|f| f.description.as_str()).collect();
        assert_eq!(
            described,
            [
                "must name at least one of name, plan".to_owned(),
                format!(
                    "unknown path `{}`: expected name, scopes or plan",
                    "x".repeat(64)
                ),
            ]
        );
    }

    #[test]
    fn out_of_range_timestamps_and_durations_are_violations() {
        let mut v = Violations::default();
        micros_of(
            &Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            },
            "a",
            &mut v,
        );
        micros_of(
            &Timestamp {
                seconds: 0,
                nanos: -1,
            },
            "b",
            &mut v,
        );
        duration_micros(
            &PbDuration {
                seconds: -5,
                nanos: 0,
            },
            "c",
            &mut v,
        );
        duration_micros(
            &PbDuration {
                seconds: i64::MAX,
                nanos: 0,
            },
            "d",
            &mut v,
        );
        let fields: Vec<_> = v.0.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["a", "b", "c", "d"]);
    }
}
