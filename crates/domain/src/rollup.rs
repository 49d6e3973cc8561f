//! Usage history: per key and hour (and per key and day), what was admitted, what was
//! refused and why, and the tokens and spend reported, so that "what did this workspace
//! spend last week" is one query.
//!
//! Replicas tally in memory and write the tallies in batches, to an hour row and a day
//! row of each key at once: a day is the sum of its hours without a job that rolls them
//! up, and the two are kept for different retentions. A query reads one granularity over
//! a bounded span ([`check_span`]).
//!
//! Pure: time is a parameter (unix microseconds, UTC).

use crate::Micros;
use crate::key::VerifyCode;

const HOUR: Micros = 3_600 * crate::MICROS_PER_SECOND;
const DAY: Micros = 24 * HOUR;
/// The longest span one query of hours may cover.
pub const MAX_HOURS_SPAN: Micros = 31 * DAY;
/// The longest span one query of days may cover.
pub const MAX_DAYS_SPAN: Micros = 400 * DAY;

/// The refusals a key's usage counts, each its own column: every [`VerifyCode`] a call
/// with a known key can be refused with.
pub const REFUSALS: [(VerifyCode, &str); 8] = [
    (VerifyCode::RateLimited, "rate_limited"),
    (VerifyCode::BudgetExceeded, "budget_exceeded"),
    (VerifyCode::InsufficientScope, "insufficient_scope"),
    (VerifyCode::ResourceForbidden, "resource_forbidden"),
    (VerifyCode::IpForbidden, "ip_forbidden"),
    (VerifyCode::Revoked, "revoked"),
    (VerifyCode::Expired, "expired"),
    (VerifyCode::PlanForbidsKeys, "plan_forbids_keys"),
];

/// What one key did in one bucket of time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub admitted: u64,
    /// One per [`REFUSALS`], in its order.
    pub refused: [u64; REFUSALS.len()],
    pub tokens: u64,
    pub spend_micros: u64,
}

impl Tally {
    /// Counts a verification's outcome (NOT_FOUND and MALFORMED name no key: callers do
    /// not count them).
    pub fn count(&mut self, code: VerifyCode) {
        if code == VerifyCode::Valid {
            self.admitted = self.admitted.saturating_add(1);
        } else if let Some(i) = REFUSALS.iter().position(|(c, _)| *c == code) {
            self.refused[i] = self.refused[i].saturating_add(1);
        }
    }

    pub fn add(&mut self, other: &Tally) {
        self.admitted = self.admitted.saturating_add(other.admitted);
        for (mine, theirs) in self.refused.iter_mut().zip(other.refused) {
            *mine = mine.saturating_add(theirs);
        }
        self.tokens = self.tokens.saturating_add(other.tokens);
        self.spend_micros = self.spend_micros.saturating_add(other.spend_micros);
    }

    pub fn refused_total(&self) -> u64 {
        self.refused.iter().fold(0, |a, b| a.saturating_add(*b))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Granularity {
    Hour,
    Day,
}

impl Granularity {
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    /// The start of the bucket `at` falls in.
    pub fn bucket(self, at: Micros) -> Micros {
        let len = match self {
            Granularity::Hour => HOUR,
            Granularity::Day => DAY,
        };
        at.div_euclid(len) * len
    }
}

/// How usage is grouped in a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    Key,
    Owner,
    Team,
    Workspace,
}

/// Whether `[since, until)` is a span one query may read at `granularity`: not empty,
/// and at most [`MAX_HOURS_SPAN`] of hours or [`MAX_DAYS_SPAN`] of days.
pub fn check_span(granularity: Granularity, since: Micros, until: Micros) -> Result<(), String> {
    if until <= since {
        return Err("must be after since".into());
    }
    let (max, what) = match granularity {
        Granularity::Hour => (MAX_HOURS_SPAN, "31 days of hours"),
        Granularity::Day => (MAX_DAYS_SPAN, "400 days of days"),
    };
    if until.saturating_sub(since) > max {
        return Err(format!("spans at most {what} after since"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_counts_each_outcome_in_its_own_column() {
        let mut t = Tally::default();
        for code in [
            VerifyCode::Valid,
            VerifyCode::Valid,
            VerifyCode::RateLimited,
            VerifyCode::Revoked,
            VerifyCode::NotFound,
        ] {
            t.count(code);
        }
        assert_eq!(t.admitted, 2);
        assert_eq!(t.refused[0], 1, "rate_limited");
        assert_eq!(t.refused[5], 1, "revoked");
        assert_eq!(t.refused_total(), 2, "NOT_FOUND names no key");
        let mut sum = t;
        sum.add(&t);
        assert_eq!((sum.admitted, sum.refused_total()), (4, 4));
    }

    #[test]
    fn every_refusal_of_a_known_key_has_a_column() {
        use VerifyCode as C;
        for code in [
            C::Revoked,
            C::Expired,
            C::InsufficientScope,
            C::RateLimited,
            C::BudgetExceeded,
            C::ResourceForbidden,
            C::IpForbidden,
            C::PlanForbidsKeys,
        ] {
            assert!(REFUSALS.iter().any(|(c, _)| *c == code), "{code:?}");
        }
    }

    #[test]
    fn buckets_are_whole_utc_hours_and_days() {
        let at = 1_796_464_800 * crate::MICROS_PER_SECOND + 1_234; // 2026-12-05 10:00
        assert_eq!(Granularity::Hour.bucket(at), at - 1_234);
        assert_eq!(Granularity::Day.bucket(at), at - 1_234 - 10 * HOUR);
    }

    #[test]
    fn spans_are_bounded_per_granularity() {
        assert!(check_span(Granularity::Hour, 0, MAX_HOURS_SPAN).is_ok());
        assert!(check_span(Granularity::Hour, 0, MAX_HOURS_SPAN + 1).is_err());
        assert!(check_span(Granularity::Day, 0, MAX_DAYS_SPAN).is_ok());
        assert!(check_span(Granularity::Day, 0, MAX_DAYS_SPAN + 1).is_err());
        assert!(check_span(Granularity::Day, 5, 5).is_err());
    }
}
