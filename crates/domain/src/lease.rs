//! Quota leases: the arithmetic of granting a holder part of what remains of a limit.
//!
//! A holder (a replica in front of shared counters, an edge node in front of a replica)
//! asks an authority for up to `want` requests of a key's limits. The authority grants
//! what remains, at most `want`, and the holder may admit that many calls, on its own,
//! until the lease expires; then it settles, giving back what it did not use.
//!
//! # Why a lease never over-admits, whatever window is looked at
//!
//! A lease granted at `t` for `life` may be spent at any instant of `[t, t + life]`, so it
//! must count in every window that overlaps that span, not only in the window of `t`.
//! The authority therefore records the whole grant in the bucket of
//! `counted_at = t + life + skew` (a moment no use of it can come after) and counts, at
//! any `now`, every bucket from the oldest one still counted (see
//! [`crate::limits`]) onward, *future buckets included*. Then:
//!
//! - a window `(T - W, T]` that some use of the lease falls in has `T - W <= counted_at`,
//!   so the lease's bucket is at or after the oldest bucket counted at `T`;
//! - take the last lease granted among those with a use in that window, at `g <= T`: at
//!   `g` every other such lease was already recorded (granted before) and still counted
//!   (its bucket is at or after `T - W`, hence after `g - W`), and so was every call the
//!   authority admitted itself in that window; the grant left the sum at most the limit.
//!
//! So the calls admitted in any window, by every holder and the authority together, never
//! exceed the limit (`tests` below check it over random interleavings of grant, use,
//! release, expiry and a holder's crash). A crashed holder's lease simply stays recorded
//! until its bucket leaves the window.
//!
//! Settling a lease that was used `used` times by `now` takes the grant back from the
//! bucket of `counted_at` and counts `used` in the bucket of `now`: those calls all came
//! before `now`, so that bucket covers every window they fall in, and the unused part is
//! free at once for other holders.
//!
//! `skew` is the bound on how far the holder's view of the lease's end may run past the
//! authority's `t + life` (holders time a lease from when they *asked*, on their own
//! monotonic clock, which makes this zero between one authority and its holders; replicas
//! sharing Redis each bring their own wall clock, so for them it is the clock skew
//! allowed between replicas).
//!
//! Token windows go the same way, as an **allowance of tokens**: a grant may carry tokens
//! too (at most what every token window has left), recorded in the token windows in the
//! same bucket, and the holder admits calls while less than it has been reported to it.
//! Tokens are known only after a call, so a settle counts every token reported, also past
//! the allowance (the calls in flight when it ran out): a token window is overrun only by
//! those. A grant that asks for no tokens judges token windows as before (a spent window
//! grants nothing).
//!
//! Pure: time is a parameter, no IO.

use super::Micros;
use super::limits::{self, LimitDecision, LimitUnit, RateLimit, WindowUsage};

/// The largest lease, in requests, whatever a holder asks for.
pub const MAX_LEASE: u64 = 1_000_000;

/// What a lease holds, or what was used of it: requests, and tokens of the key's token
/// windows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Amounts {
    pub requests: u64,
    pub tokens: u64,
}

impl Amounts {
    pub fn requests(requests: u64) -> Self {
        Amounts {
            requests,
            tokens: 0,
        }
    }
}

/// What the authority handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Calls the holder may admit; 0 when refused.
    pub amount: u64,
    /// Tokens that may be reported to the holder before it asks again (0 when none were
    /// asked for, or the key has no token window).
    pub tokens: u64,
    /// Where the grant is recorded, in the authority's time: the bucket a settle must name.
    pub counted_at: Micros,
    /// The limits after the grant (remaining counts the grant as used); for a refusal,
    /// which window refused and when a call of `min` requests could pass.
    pub decision: LimitDecision,
    /// The authority's name for this grant, which a settle repeats so that it applies
    /// once; 0 where the authority keeps none (in-process counters).
    pub id: u64,
}

impl Grant {
    pub fn granted(&self) -> bool {
        self.amount > 0
    }
}

/// Grants up to `want.requests` requests (at least `min`, or nothing) of `limits` at
/// `now`, and up to `want.tokens` tokens of its token windows, for a holder that will
/// admit from it for at most `life` (plus `skew`), recording the grant in `usage` (one per
/// limit, same order).
pub fn grant(
    limits: &[RateLimit],
    usage: &mut [WindowUsage],
    now: Micros,
    want: Amounts,
    min: u64,
    life: Micros,
    skew: Micros,
) -> Grant {
    let min = min.max(1);
    let want_requests = want.requests.clamp(min, MAX_LEASE.max(min));
    let counted_at = now.saturating_add(life.max(0)).saturating_add(skew.max(0));
    let mut amount = want_requests;
    let mut tokens = if crate::limits::has_token_window(limits) {
        want.tokens.min(limits::MAX_LIMIT)
    } else {
        0
    };
    let mut ok = usage.len() >= limits.len();
    for (limit, u) in limits.iter().zip(usage.iter_mut()) {
        u.prune(limit.window, now);
        let used = u.used(limit.window, now);
        let left = limit.limit.saturating_sub(used);
        match limit.unit {
            LimitUnit::Requests => amount = amount.min(left),
            LimitUnit::Tokens => {
                ok &= left > 0;
                tokens = tokens.min(left);
            }
        }
    }
    if !ok || amount < min {
        return Grant {
            amount: 0,
            tokens: 0,
            counted_at,
            decision: limits::describe(limits, usage, now, min, false),
            id: 0,
        };
    }
    for (limit, u) in limits.iter().zip(usage.iter_mut()) {
        let n = match limit.unit {
            LimitUnit::Requests => amount,
            LimitUnit::Tokens => tokens,
        };
        if life <= 0 && skew <= 0 {
            u.add(limit.window, now, n);
        } else {
            u.add_at(limit.window, now, counted_at, n);
        }
    }
    Grant {
        amount,
        tokens,
        counted_at,
        decision: limits::describe(limits, usage, now, amount, true),
        id: 0,
    }
}

/// Settles a lease of `granted` recorded at `counted_at`, of which the holder admitted
/// `used.requests` requests and was reported `used.tokens` tokens by `now`: the rest is
/// given back. Tokens count in full, also past the allowance (requests never run past).
pub fn settle(
    limits: &[RateLimit],
    usage: &mut [WindowUsage],
    counted_at: Micros,
    granted: Amounts,
    used: Amounts,
    now: Micros,
) {
    for (limit, u) in limits.iter().zip(usage.iter_mut()) {
        let (granted, used) = match limit.unit {
            LimitUnit::Requests => (granted.requests, used.requests.min(granted.requests)),
            LimitUnit::Tokens => (granted.tokens, used.tokens.min(limits::MAX_BUCKET_COUNT)),
        };
        u.remove_at(limit.window, counted_at, granted);
        // Counted no later than the grant was: `now` past `counted_at` means the holder
        // settled late, and its uses all came before `counted_at`.
        u.add_at(limit.window, now, now.min(counted_at), used);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::LimitWindow;

    const S: Micros = crate::MICROS_PER_SECOND;
    const T0: Micros = 1_800_000_000 * S;

    fn rpm(limit: u64) -> RateLimit {
        RateLimit {
            unit: LimitUnit::Requests,
            window: LimitWindow::Minute,
            limit,
        }
    }

    #[test]
    fn a_grant_takes_what_remains_and_no_more() {
        let limits = [rpm(10)];
        let mut usage = vec![WindowUsage::default()];
        let g = grant(&limits, &mut usage, T0, Amounts::requests(6), 1, 2 * S, 0);
        assert_eq!(g.amount, 6);
        assert_eq!(g.decision.tightest().unwrap().remaining, 4);
        let g2 = grant(&limits, &mut usage, T0, Amounts::requests(6), 1, 2 * S, 0);
        assert_eq!(g2.amount, 4, "only what remains");
        let g3 = grant(&limits, &mut usage, T0, Amounts::requests(1), 1, 2 * S, 0);
        assert!(!g3.granted());
        assert!(!g3.decision.allowed);
        // The leases count until their bucket (T0 + 2 s) leaves the minute.
        assert_eq!(g3.decision.retry_at(), Some(T0 + 63 * S));
    }

    #[test]
    fn a_grant_smaller_than_the_call_is_no_grant() {
        let limits = [rpm(10)];
        let mut usage = vec![WindowUsage::default()];
        assert_eq!(
            grant(&limits, &mut usage, T0, Amounts::requests(8), 1, S, 0).amount,
            8
        );
        let g = grant(&limits, &mut usage, T0, Amounts::requests(5), 3, S, 0);
        assert!(!g.granted(), "2 remain, the call costs 3");
        assert_eq!(
            usage[0].used(LimitWindow::Minute, T0),
            8,
            "nothing recorded"
        );
    }

    #[test]
    fn settling_gives_back_what_was_not_used() {
        let limits = [rpm(10)];
        let mut usage = vec![WindowUsage::default()];
        let g = grant(&limits, &mut usage, T0, Amounts::requests(10), 1, 5 * S, 0);
        assert_eq!(g.amount, 10);
        settle(
            &limits,
            &mut usage,
            g.counted_at,
            Amounts::requests(g.amount),
            Amounts::requests(3),
            T0 + S,
        );
        assert_eq!(usage[0].used(LimitWindow::Minute, T0 + S), 3);
        assert_eq!(
            grant(
                &limits,
                &mut usage,
                T0 + S,
                Amounts::requests(10),
                1,
                5 * S,
                0
            )
            .amount,
            7
        );
    }

    #[test]
    fn a_spent_token_window_grants_nothing() {
        let limits = [
            rpm(10),
            RateLimit {
                unit: LimitUnit::Tokens,
                window: LimitWindow::Minute,
                limit: 100,
            },
        ];
        let mut usage = vec![WindowUsage::default(), WindowUsage::default()];
        usage[1].add(LimitWindow::Minute, T0, 100);
        let g = grant(&limits, &mut usage, T0, Amounts::requests(5), 1, S, 0);
        assert!(!g.granted());
        assert_eq!(usage[0].used(LimitWindow::Minute, T0), 0);
    }

    fn tpm(limit: u64) -> RateLimit {
        RateLimit {
            unit: LimitUnit::Tokens,
            window: LimitWindow::Minute,
            limit,
        }
    }

    #[test]
    fn a_token_allowance_takes_what_the_token_window_has_left_and_counts_all_reported() {
        let limits = [rpm(100), tpm(1_000)];
        let mut usage = vec![WindowUsage::default(), WindowUsage::default()];
        let want = Amounts {
            requests: 5,
            tokens: 600,
        };
        let a = grant(&limits, &mut usage, T0, want, 1, 2 * S, 0);
        assert_eq!((a.amount, a.tokens), (5, 600));
        let b = grant(&limits, &mut usage, T0, want, 1, 2 * S, 0);
        assert_eq!(
            (b.amount, b.tokens),
            (5, 400),
            "only what the window has left"
        );
        let c = grant(&limits, &mut usage, T0, want, 1, 2 * S, 0);
        assert!(!c.granted(), "the token window is all given out");
        // The first holder was reported 700 tokens (its calls in flight ran past 600):
        // all of them count; the second gives its 400 back unused.
        let granted = |g: &Grant| Amounts {
            requests: g.amount,
            tokens: g.tokens,
        };
        let used = Amounts {
            requests: 2,
            tokens: 700,
        };
        settle(&limits, &mut usage, a.counted_at, granted(&a), used, T0 + S);
        settle(
            &limits,
            &mut usage,
            b.counted_at,
            granted(&b),
            Amounts::default(),
            T0 + S,
        );
        assert_eq!(usage[1].used(LimitWindow::Minute, T0 + S), 700);
        let d = grant(&limits, &mut usage, T0 + S, want, 1, 2 * S, 0);
        assert_eq!(d.tokens, 300);
    }

    #[derive(Clone, Debug)]
    enum Step {
        /// Time passes (µs).
        Wait(i64),
        /// Holder asks for a lease of this size, for this life (µs).
        Ask(usize, u64, i64),
        /// Holder admits one call from its lease, if it has one left and unexpired.
        Use(usize),
        /// Holder settles its lease.
        Release(usize),
        /// Holder disappears: its lease is never settled.
        Crash(usize),
        /// The authority admits a call of its own (a lease of one, used at once).
        Direct,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            (1i64..3_000_000).prop_map(Step::Wait),
            (0usize..4, 1u64..30, 100_000i64..8_000_000).prop_map(|(h, n, l)| Step::Ask(h, n, l)),
            (0usize..4).prop_map(Step::Use),
            (0usize..4).prop_map(Step::Use),
            (0usize..4).prop_map(Step::Use),
            (0usize..4).prop_map(Step::Release),
            (0usize..4).prop_map(Step::Crash),
            Just(Step::Direct),
        ]
    }

    struct Held {
        granted: u64,
        used: u64,
        counted_at: Micros,
        /// The holder stops using the lease here (it timed it from its request).
        ends_at: Micros,
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]

        /// Invariant 1: in every window of the limit's length, the calls admitted by all
        /// holders and the authority together never exceed the limit.
        #[test]
        fn no_interleaving_admits_more_than_the_limit_in_any_window(
            limit in 1u64..40,
            steps in proptest::collection::vec(step(), 1..600),
        ) {
            let limits = [rpm(limit)];
            let mut usage = vec![WindowUsage::default()];
            let mut holders: Vec<Option<Held>> = (0..4).map(|_| None).collect();
            let mut now = T0;
            let mut admitted: Vec<Micros> = Vec::new();
            for s in steps {
                match s {
                    Step::Wait(d) => now += d,
                    Step::Ask(h, want, life) => {
                        if let Some(old) = holders[h].take() {
                            settle(&limits, &mut usage, old.counted_at, Amounts::requests(old.granted), Amounts::requests(old.used), now);
                        }
                        let g = grant(&limits, &mut usage, now, Amounts::requests(want), 1, life, 0);
                        if g.granted() {
                            holders[h] = Some(Held {
                                granted: g.amount,
                                used: 0,
                                counted_at: g.counted_at,
                                ends_at: now + life,
                            });
                        }
                    }
                    Step::Use(h) => {
                        if let Some(held) = holders[h].as_mut()
                            && held.used < held.granted
                            && now <= held.ends_at
                        {
                            held.used += 1;
                            admitted.push(now);
                        }
                    }
                    Step::Release(h) => {
                        if let Some(old) = holders[h].take() {
                            settle(&limits, &mut usage, old.counted_at, Amounts::requests(old.granted), Amounts::requests(old.used), now);
                        }
                    }
                    Step::Crash(h) => holders[h] = None,
                    Step::Direct => {
                        if grant(&limits, &mut usage, now, Amounts::requests(1), 1, 0, 0).granted() {
                            admitted.push(now);
                        }
                    }
                }
            }
            admitted.sort_unstable();
            let window = LimitWindow::Minute.length();
            for (i, start) in admitted.iter().enumerate() {
                let in_window = admitted[i..].iter().take_while(|t| **t < start + window).count();
                proptest::prop_assert!(
                    in_window as u64 <= limit,
                    "{} admitted in the minute from {} (limit {})", in_window, start, limit
                );
            }
        }
    }
}
