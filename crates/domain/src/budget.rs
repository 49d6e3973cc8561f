//! Budget periods: a budget (`max_budget_micros`) is spent over an **epoch** of spend,
//! and a new epoch starts at zero.
//!
//! An epoch begins at the later of the current period's start and the key's last manual
//! reset, and ends at the period's end:
//!
//! - lifetime (the default): one epoch from the last reset (or ever), ending never;
//! - daily, weekly (from Monday) and monthly (from the 1st), on the UTC calendar;
//! - every N days, counted from the last reset or, before any, from the key's creation.
//!
//! Spend is stored with the epoch it belongs to (`spend_epoch`), so a figure of an earlier
//! epoch counts nothing now, and a write of an earlier epoch's spend arriving after a new
//! one began changes nothing: no process has to run at the turn of a period, and every
//! replica computes the same epoch from the same clock.
//!
//! Pure: time is a parameter (unix microseconds, UTC); the calendar arithmetic is
//! Howard Hinnant's `days_from_civil` / `civil_from_days`, exact over the whole range of
//! dates a key can hold.

use crate::Micros;

const DAY: Micros = 86_400 * crate::MICROS_PER_SECOND;
/// The longest rolling period, in days.
pub const MAX_PERIOD_DAYS: u16 = 366;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BudgetPeriod {
    #[default]
    Lifetime,
    Day,
    Week,
    Month,
    /// Every N days (1 to [`MAX_PERIOD_DAYS`]).
    Days(u16),
}

impl BudgetPeriod {
    /// The stored form: `""`, `day`, `week`, `month`, `days:N`.
    pub fn as_text(self) -> String {
        match self {
            BudgetPeriod::Lifetime => String::new(),
            BudgetPeriod::Day => "day".into(),
            BudgetPeriod::Week => "week".into(),
            BudgetPeriod::Month => "month".into(),
            BudgetPeriod::Days(n) => format!("days:{n}"),
        }
    }

    pub fn parse(s: &str) -> Option<BudgetPeriod> {
        Some(match s {
            "" => BudgetPeriod::Lifetime,
            "day" => BudgetPeriod::Day,
            "week" => BudgetPeriod::Week,
            "month" => BudgetPeriod::Month,
            _ => {
                let n: u16 = s.strip_prefix("days:")?.parse().ok()?;
                if n == 0 || n > MAX_PERIOD_DAYS {
                    return None;
                }
                BudgetPeriod::Days(n)
            }
        })
    }
}

/// The span of spend a budget is judged over now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpendEpoch {
    /// When it began: what stored spend must be marked with to count in it.
    pub start: Micros,
    /// When the next begins (`Micros::MAX`: never, for a lifetime budget).
    pub ends: Micros,
}

impl SpendEpoch {
    /// The one epoch of a key with a lifetime budget that was never reset.
    pub const LIFETIME: SpendEpoch = SpendEpoch {
        start: 0,
        ends: Micros::MAX,
    };

    /// Whether `at` falls in it.
    pub fn contains(&self, at: Micros) -> bool {
        self.start <= at && at < self.ends
    }

    /// `stored` spend marked with epoch `stored_epoch`, as it counts in this one.
    pub fn count(&self, stored: u64, stored_epoch: Micros) -> u64 {
        if stored_epoch == self.start {
            stored
        } else {
            0
        }
    }
}

/// The epoch at `now` of a key created at `created_at` and last reset at `reset_at` (0:
/// never).
pub fn epoch(
    period: BudgetPeriod,
    created_at: Micros,
    reset_at: Micros,
    now: Micros,
) -> SpendEpoch {
    let day = now.div_euclid(DAY);
    let (start, ends) = match period {
        BudgetPeriod::Lifetime => {
            return SpendEpoch {
                start: reset_at,
                ends: Micros::MAX,
            };
        }
        BudgetPeriod::Day => (day * DAY, (day + 1) * DAY),
        BudgetPeriod::Week => {
            // 1970-01-01 was a Thursday: day 0 is weekday 3 counted from Monday.
            let monday = day - (day + 3).rem_euclid(7);
            (monday * DAY, (monday + 7) * DAY)
        }
        BudgetPeriod::Month => {
            let (y, m, _) = civil_from_days(day);
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            (
                days_from_civil(y, m, 1) * DAY,
                days_from_civil(ny, nm, 1) * DAY,
            )
        }
        BudgetPeriod::Days(n) => {
            let anchor = if reset_at != 0 { reset_at } else { created_at };
            let len = Micros::from(n.max(1)) * DAY;
            let start = anchor + (now - anchor).div_euclid(len) * len;
            return SpendEpoch {
                start,
                ends: start + len,
            };
        }
    };
    SpendEpoch {
        start: start.max(reset_at),
        ends,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date of a day since 1970-01-01 (Hinnant).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 2026-12-05 10:00:00 UTC, a Saturday.
    const NOW: Micros = 1_796_464_800 * crate::MICROS_PER_SECOND;

    fn at(y: i64, m: i64, d: i64) -> Micros {
        days_from_civil(y, m, d) * DAY
    }

    #[test]
    fn calendar_periods_start_at_midnight_monday_and_the_first_utc() {
        assert_eq!(civil_from_days(NOW / DAY), (2026, 12, 5));
        let e = epoch(BudgetPeriod::Day, 0, 0, NOW);
        assert_eq!((e.start, e.ends), (at(2026, 12, 5), at(2026, 12, 6)));
        let e = epoch(BudgetPeriod::Week, 0, 0, NOW);
        assert_eq!((e.start, e.ends), (at(2026, 11, 30), at(2026, 12, 7)));
        let e = epoch(BudgetPeriod::Month, 0, 0, NOW);
        assert_eq!((e.start, e.ends), (at(2026, 12, 1), at(2027, 1, 1)));
        // February of a leap year.
        let e = epoch(BudgetPeriod::Month, 0, 0, at(2028, 2, 29) + 5);
        assert_eq!((e.start, e.ends), (at(2028, 2, 1), at(2028, 3, 1)));
    }

    #[test]
    fn a_reset_starts_a_new_epoch_until_the_period_ends() {
        let reset = NOW - 3_600 * crate::MICROS_PER_SECOND;
        let e = epoch(BudgetPeriod::Month, 0, reset, NOW);
        assert_eq!((e.start, e.ends), (reset, at(2027, 1, 1)));
        // Next month the calendar takes over again.
        let e = epoch(BudgetPeriod::Month, 0, reset, at(2027, 1, 3));
        assert_eq!(e.start, at(2027, 1, 1));
        let e = epoch(BudgetPeriod::Lifetime, 0, reset, NOW);
        assert_eq!((e.start, e.ends), (reset, Micros::MAX));
        assert_eq!(
            epoch(BudgetPeriod::Lifetime, 0, 0, NOW),
            SpendEpoch::LIFETIME
        );
    }

    #[test]
    fn rolling_periods_count_from_creation_then_from_the_last_reset() {
        let created = at(2026, 11, 1) + 12 * 3_600 * crate::MICROS_PER_SECOND;
        let e = epoch(BudgetPeriod::Days(30), created, 0, NOW);
        assert_eq!((e.start, e.ends), (created + 30 * DAY, created + 60 * DAY));
        let reset = NOW - DAY;
        let e = epoch(BudgetPeriod::Days(7), created, reset, NOW);
        assert_eq!((e.start, e.ends), (reset, reset + 7 * DAY));
    }

    #[test]
    fn stored_spend_counts_only_in_its_own_epoch() {
        let e = epoch(BudgetPeriod::Month, 0, 0, NOW);
        assert_eq!(e.count(500, e.start), 500);
        assert_eq!(e.count(500, at(2026, 11, 1)), 0, "last month's spend");
        assert_eq!(SpendEpoch::LIFETIME.count(500, 0), 500);
    }

    #[test]
    fn periods_round_trip_through_their_stored_form() {
        for p in [
            BudgetPeriod::Lifetime,
            BudgetPeriod::Day,
            BudgetPeriod::Week,
            BudgetPeriod::Month,
            BudgetPeriod::Days(30),
        ] {
            assert_eq!(BudgetPeriod::parse(&p.as_text()), Some(p));
        }
        for bad in ["days:0", "days:367", "days:x", "year", "DAY"] {
            assert_eq!(BudgetPeriod::parse(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn the_calendar_round_trips(day in -1_000_000i64..1_000_000) {
            let (y, m, d) = civil_from_days(day);
            prop_assert_eq!(days_from_civil(y, m, d), day);
            prop_assert!((1..=12).contains(&m) && (1..=31).contains(&d));
        }

        #[test]
        fn every_instant_lies_in_its_epoch_and_epochs_tile_time(
            now in 0i64..4_000_000_000_000_000,
            created in 0i64..2_000_000_000_000_000,
            n in 1u16..=366,
        ) {
            for period in [BudgetPeriod::Day, BudgetPeriod::Week, BudgetPeriod::Month, BudgetPeriod::Days(n)] {
                let e = epoch(period, created, 0, now);
                prop_assert!(e.contains(now), "{:?} {:?}", period, e);
                // The next epoch begins where this one ends.
                let next = epoch(period, created, 0, e.ends);
                prop_assert_eq!(next.start, e.ends);
            }
        }
    }
}
