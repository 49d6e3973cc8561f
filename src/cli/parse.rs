//! Parsers for the CLI's flag values (durations, owners, times, money, secrets).
//!
//! They run as clap value parsers, so a malformed flag is a usage error (exit status 2)
//! that names the flag and shows the expected form, before any connection is made. The
//! server validates everything again; these only catch what a typo at the prompt produces.

use std::time::Duration;

use secrecy::SecretString;

use crate::proto;

/// The longest duration accepted (about 100 years): anything longer is a typo, and the
/// bound keeps `now + duration` far from overflowing.
const MAX_DURATION_SECS: u64 = 100 * 365 * 24 * 3600;

const DURATION_FORM: &str = "expected a number and a unit (s, m, h, d, w), e.g. 30d, 12h or 1h30m";

/// `30d`, `12h`, `90m`, `45s`, `2w`, or several of them together (`1h30m`).
pub fn duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration `{s}`: {DURATION_FORM}");
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(bad()),
        };
        if digits.is_empty() {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        total = n
            .checked_mul(unit)
            .and_then(|part| total.checked_add(part))
            .filter(|t| *t <= MAX_DURATION_SECS)
            .ok_or_else(|| format!("invalid duration `{s}`: at most 100 years"))?;
    }
    // A trailing number without a unit (`30`) is refused: minutes or days?
    if !digits.is_empty() {
        return Err(bad());
    }
    if total == 0 {
        return Err(format!("invalid duration `{s}`: must be longer than zero"));
    }
    Ok(Duration::from_secs(total))
}

/// `user:ID` or `service_account:ID` (`sa:ID` for short).
pub fn owner(s: &str) -> Result<proto::Owner, String> {
    let bad = || format!("invalid owner `{s}`: expected user:ID or service_account:ID");
    let (kind, id) = s.split_once(':').ok_or_else(bad)?;
    let kind = match kind {
        "user" => proto::OwnerKind::User,
        "service_account" | "sa" => proto::OwnerKind::ServiceAccount,
        _ => return Err(bad()),
    };
    if id.is_empty() {
        return Err(bad());
    }
    Ok(proto::Owner {
        kind: kind as i32,
        id: id.to_owned(),
    })
}

/// An RFC 3339 time, e.g. `2030-01-31T00:00:00Z`.
pub fn timestamp(s: &str) -> Result<prost_types::Timestamp, String> {
    s.parse::<prost_types::Timestamp>().map_err(|_| {
        format!("invalid time `{s}`: expected an RFC 3339 time such as 2030-01-31T00:00:00Z")
    })
}

/// An amount of currency (`5`, `5.25`, `0.0015`) in micro-units: exact, no floating point.
pub fn money_micros(s: &str) -> Result<u64, String> {
    let bad = || {
        format!("invalid amount `{s}`: expected a number with at most 6 decimals, e.g. 5 or 12.50")
    };
    let (whole, fraction) = s.split_once('.').unwrap_or((s, ""));
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) || fraction.len() > 6 {
        return Err(bad());
    }
    if s.ends_with('.') {
        return Err(bad());
    }
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    let fraction_micros: u64 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<6}").parse().map_err(|_| bad())?
    };
    whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(fraction_micros))
        .ok_or_else(|| format!("invalid amount `{s}`: too large"))
}

/// `KEY=VALUE` (metadata).
pub fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("invalid metadata `{s}`: expected KEY=VALUE")),
    }
}

/// A secret given on the command line or in the environment. Wrapped at once so that it
/// can never reach a Debug or error message. The error does not repeat the value.
pub fn secret(s: &str) -> Result<SecretString, String> {
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    Ok(SecretString::from(s.to_owned()))
}

/// A budget period: `lifetime`, `daily`, `weekly`, `monthly` (UTC calendar) or `Nd`
/// (every N days, 1 to 366), as the API's `budget_period` and `budget_period_days`.
pub fn budget_period(s: &str) -> Result<(proto::BudgetPeriod, u32), String> {
    use proto::BudgetPeriod as P;
    Ok(match s {
        "lifetime" => (P::Unspecified, 0),
        "daily" => (P::Daily, 0),
        "weekly" => (P::Weekly, 0),
        "monthly" => (P::Monthly, 0),
        _ => {
            let days = s
                .strip_suffix('d')
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| (1..=366).contains(n))
                .ok_or_else(|| {
                    format!(
                        "invalid budget period `{s}`: expected lifetime, daily, weekly, monthly or Nd (1 to 366 days, e.g. 30d)"
                    )
                })?;
            (P::RollingDays, days)
        }
    })
}

/// A rate limit `KIND=N`: `rpm`, `rph`, `rpd` (requests per minute, hour, day), `tpm`,
/// `tpd` (tokens per minute, day), e.g. `rpm=600` or `tpd=2000000`.
pub fn limit(s: &str) -> Result<proto::RateLimit, String> {
    use proto::{RateLimitUnit as U, RateLimitWindow as W};
    let bad = || {
        format!(
            "invalid limit `{s}`: expected KIND=N with KIND one of rpm, rph, rpd, tpm, tpd (e.g. rpm=600)"
        )
    };
    let (kind, n) = s.split_once('=').ok_or_else(bad)?;
    let (unit, window) = match kind {
        "rpm" => (U::Requests, W::Minute),
        "rph" => (U::Requests, W::Hour),
        "rpd" => (U::Requests, W::Day),
        "tpm" => (U::Tokens, W::Minute),
        "tpd" => (U::Tokens, W::Day),
        _ => return Err(bad()),
    };
    let limit: u64 = n.parse().map_err(|_| bad())?;
    if limit == 0 {
        return Err(format!("invalid limit `{s}`: must be at least 1"));
    }
    Ok(proto::RateLimit {
        unit: unit as i32,
        window: window as i32,
        limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_refuse_the_rest() {
        assert_eq!(duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(duration("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(duration("45s"), Ok(Duration::from_secs(45)));
        for bad in [
            "",
            "30",
            "d",
            "30x",
            "1.5h",
            "-1h",
            "0s",
            "h30",
            "99999999999999999999d",
        ] {
            assert!(duration(bad).is_err(), "{bad}");
        }
        assert!(duration("36500d").is_ok());
        assert!(duration("36501d").is_err());
    }

    #[test]
    fn owners_name_their_kind() {
        let o = owner("user:user_42").unwrap();
        assert_eq!(o.kind, proto::OwnerKind::User as i32);
        assert_eq!(o.id, "user_42");
        let o = owner("service_account:sa_1").unwrap();
        assert_eq!(o.kind, proto::OwnerKind::ServiceAccount as i32);
        assert_eq!(owner("sa:x").unwrap().id, "x");
        // The id may itself hold a colon: only the first one separates.
        assert_eq!(owner("user:a:b").unwrap().id, "a:b");
        for bad in ["user_42", "user:", "team:x", ":x", ""] {
            assert!(owner(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits_name_their_unit_and_window() {
        let l = limit("tpd=2000000").unwrap();
        assert_eq!(
            (l.unit, l.window, l.limit),
            (
                proto::RateLimitUnit::Tokens as i32,
                proto::RateLimitWindow::Day as i32,
                2_000_000
            )
        );
        assert_eq!(
            limit("rph=5").unwrap().window,
            proto::RateLimitWindow::Hour as i32
        );
        for bad in ["rpm", "rpm=", "rpm=x", "rpm=0", "tph=5", "=5", "rpm=-1"] {
            assert!(limit(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn money_is_exact_to_the_micro() {
        assert_eq!(money_micros("5"), Ok(5_000_000));
        assert_eq!(money_micros("12.50"), Ok(12_500_000));
        assert_eq!(money_micros("0.0015"), Ok(1500));
        assert_eq!(money_micros("0.000001"), Ok(1));
        for bad in [
            "",
            ".5",
            "5.",
            "1.0000001",
            "-1",
            "1e3",
            "abc",
            "99999999999999999",
        ] {
            assert!(money_micros(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(
            timestamp("2030-01-31T00:00:00Z").unwrap().seconds,
            1_896_048_000
        );
        // prost's parser also takes a bare date, as midnight UTC.
        assert_eq!(timestamp("2030-01-31").unwrap().seconds, 1_896_048_000);
        assert!(timestamp("31/01/2030").is_err());
        assert!(timestamp("tomorrow").is_err());
    }

    #[test]
    fn secret_errors_do_not_repeat_the_value() {
        assert!(secret("").is_err());
        assert!(secret("kw_live_x").is_ok());
        assert!(!key_value("x").unwrap_err().is_empty());
        assert_eq!(key_value("a=b=c").unwrap(), ("a".into(), "b=c".into()));
    }
}
