//! Rate limits and budgets: what a key may consume, and the decision for one call.
//!
//! # The algorithm: a bucketed sliding window that never over-admits
//!
//! Each window (a minute, an hour, a day) is cut into [`BUCKETS`] buckets of
//! `window / BUCKETS` (1 s, 1 min, 24 min). A window's usage at time `t` is the sum of the
//! buckets from the current one back [`BUCKETS`] buckets: that span always reaches at
//! least one full window back from `t`, so
//!
//! - **no window of the configured length ever admits more than the limit** (requests):
//!   when a call is admitted, every admitted call of the last `window` was counted;
//! - the price is a conservative edge: usage between one window and one window plus one
//!   bucket ago still counts, so a call may be refused up to `window / 60` (1 s for a
//!   minute limit) before a perfect sliding log would admit it.
//!
//! Tokens are reported after the upstream call (ReportUsage), so a token window refuses
//! once it is spent (`used >= limit`); it can run over by the tokens of the calls admitted
//! before their usage was reported. Budgets work the same way on spend.
//!
//! A refused call consumes nothing. Memory: only non-empty buckets are kept, at most
//! `BUCKETS + 1` per window.
//!
//! Pure: time is a parameter (unix microseconds), no IO.

use std::collections::VecDeque;

use super::Micros;

/// Buckets per window.
pub const BUCKETS: i64 = 60;
/// The largest limit a key may hold (per window).
pub const MAX_LIMIT: u64 = 1_000_000_000_000;
/// The largest budget, in micro-units of currency (a billion units).
pub const MAX_BUDGET_MICROS: u64 = 1_000_000_000_000_000;
/// The most spend a key's total reaches: reported spend past it saturates there (in the
/// usage book and in the stored total). A thousand times the largest budget, so that no
/// budget decision ever changes, and well under what the BIGINT column holds
/// (about 9.2 × 10^18), which the stores' usage statement therefore never overflows.
pub const MAX_SPEND_MICROS: u64 = 1_000 * MAX_BUDGET_MICROS;
/// The most one bucket of a window counts: reported tokens past it saturate there (in
/// memory and in Redis). A thousand times the largest limit, so no decision changes;
/// exact in Lua's numbers (doubles, below 2^53) and far from Redis's 64-bit integers,
/// which its counters therefore never overflow. (Requests never get near it: a call is
/// counted only when it fits under its limit.)
pub const MAX_BUCKET_COUNT: u64 = 1_000 * MAX_LIMIT;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LimitUnit {
    Requests,
    Tokens,
}

impl LimitUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitUnit::Requests => "requests",
            LimitUnit::Tokens => "tokens",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "requests" => Some(LimitUnit::Requests),
            "tokens" => Some(LimitUnit::Tokens),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LimitWindow {
    Minute,
    Hour,
    Day,
}

impl LimitWindow {
    pub const ALL: [LimitWindow; 3] = [LimitWindow::Minute, LimitWindow::Hour, LimitWindow::Day];

    pub fn length(self) -> Micros {
        let second = super::MICROS_PER_SECOND;
        match self {
            LimitWindow::Minute => 60 * second,
            LimitWindow::Hour => 3600 * second,
            LimitWindow::Day => 86_400 * second,
        }
    }

    /// The length of one bucket (a whole number of microseconds for every window).
    pub fn bucket(self) -> Micros {
        self.length() / BUCKETS
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LimitWindow::Minute => "minute",
            LimitWindow::Hour => "hour",
            LimitWindow::Day => "day",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "minute" => Some(LimitWindow::Minute),
            "hour" => Some(LimitWindow::Hour),
            "day" => Some(LimitWindow::Day),
            _ => None,
        }
    }
}

/// At most `limit` units per `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateLimit {
    pub unit: LimitUnit,
    pub window: LimitWindow,
    pub limit: u64,
}

impl RateLimit {
    /// `rpm`-style short name: `requests/minute`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.unit.as_str(), self.window.as_str())
    }
}

/// Sorts limits (requests before tokens, shorter windows first) so that equal sets compare
/// and store alike.
pub fn normalized(mut limits: Vec<RateLimit>) -> Vec<RateLimit> {
    limits.sort_by_key(|l| (l.unit, l.window));
    limits
}

/// Text form for storage: `requests/minute=100 tokens/day=1000000`.
pub fn join(limits: &[RateLimit]) -> String {
    limits
        .iter()
        .map(|l| format!("{}={}", l.name(), l.limit))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn split(s: &str) -> Option<Vec<RateLimit>> {
    s.split_whitespace()
        .map(|part| {
            let (name, limit) = part.split_once('=')?;
            let (unit, window) = name.split_once('/')?;
            Some(RateLimit {
                unit: LimitUnit::parse(unit)?,
                window: LimitWindow::parse(window)?,
                limit: limit.parse().ok()?,
            })
        })
        .collect()
}

/// One window's usage: non-empty buckets, oldest first, as (bucket number, amount).
///
/// Buckets may lie ahead of `now`: a quota lease is counted in the bucket of its expiry
/// (see [`crate::lease`]), and every bucket from the oldest counted one onward
/// counts, future ones included.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WindowUsage {
    buckets: VecDeque<(i64, u64)>,
    /// The newest bucket a call was counted in ([`WindowUsage::add`]); a clock that
    /// stepped back counts there instead of further back.
    newest: i64,
}

impl WindowUsage {
    /// From (bucket number, amount) pairs in any order (e.g. read back from Redis).
    pub fn from_buckets(mut pairs: Vec<(i64, u64)>) -> Self {
        pairs.sort_unstable();
        WindowUsage {
            buckets: pairs.into_iter().filter(|(_, n)| *n > 0).collect(),
            newest: 0,
        }
    }

    /// Whether it counts nothing (no bucket left).
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The one bucket it counts, when it counts one and that bucket is its newest (where
    /// the next call counts): the state of most windows between calls, which a holder can
    /// keep in two words and give back with [`WindowUsage::of_single`] unchanged.
    pub fn single(&self) -> Option<(i64, u64)> {
        match (self.buckets.len(), self.buckets.front()) {
            (1, Some(&(b, n))) if b == self.newest => Some((b, n)),
            _ => None,
        }
    }

    /// The window [`WindowUsage::single`] described.
    pub fn of_single(bucket: i64, amount: u64) -> Self {
        let mut buckets = VecDeque::new();
        buckets.reserve_exact(1);
        buckets.push_back((bucket, amount));
        WindowUsage {
            buckets,
            newest: bucket,
        }
    }

    pub fn buckets(&self) -> impl Iterator<Item = (i64, u64)> + '_ {
        self.buckets.iter().copied()
    }

    /// The oldest bucket still counted at `now`.
    fn first_counted(window: LimitWindow, now: Micros) -> i64 {
        now.div_euclid(window.bucket()) - BUCKETS
    }

    /// When bucket `b` stops being counted.
    fn leaves_at(window: LimitWindow, b: i64) -> Micros {
        (b + BUCKETS + 1).saturating_mul(window.bucket())
    }

    /// Forgets buckets no longer counted at `now`.
    pub fn prune(&mut self, window: LimitWindow, now: Micros) {
        let first = Self::first_counted(window, now);
        while self.buckets.front().is_some_and(|(b, _)| *b < first) {
            self.buckets.pop_front();
        }
    }

    /// The amount counted at `now`.
    pub fn used(&self, window: LimitWindow, now: Micros) -> u64 {
        let first = Self::first_counted(window, now);
        self.buckets
            .iter()
            .filter(|(b, _)| *b >= first)
            .fold(0u64, |sum, (_, n)| sum.saturating_add(*n))
    }

    /// Counts `amount` used at `now`.
    pub fn add(&mut self, window: LimitWindow, now: Micros, amount: u64) {
        if amount == 0 {
            return;
        }
        self.prune(window, now);
        let current = now.div_euclid(window.bucket());
        // A clock that stepped back: count it in the newest bucket rather than further
        // back (it leaves the window no earlier than it should).
        self.newest = self.newest.max(current);
        self.insert(self.newest, amount);
    }

    /// Counts `amount` in the bucket of `at` (a lease's expiry, ahead of `now`).
    pub fn add_at(&mut self, window: LimitWindow, now: Micros, at: Micros, amount: u64) {
        if amount == 0 {
            return;
        }
        self.prune(window, now);
        self.insert(at.div_euclid(window.bucket()), amount);
    }

    /// Takes back up to `amount` from the bucket of `at` (a lease given back).
    pub fn remove_at(&mut self, window: LimitWindow, at: Micros, amount: u64) {
        let b = at.div_euclid(window.bucket());
        if let Some(i) = self.buckets.iter().position(|(x, _)| *x == b) {
            let n = &mut self.buckets[i].1;
            *n = n.saturating_sub(amount);
            if *n == 0 {
                self.buckets.remove(i);
            }
        }
    }

    /// Adds to bucket `b`, keeping the buckets in order (most land at the back).
    fn insert(&mut self, b: i64, amount: u64) {
        let at = self
            .buckets
            .iter()
            .rposition(|(x, _)| *x <= b)
            .map_or(0, |i| i + 1);
        match at.checked_sub(1).and_then(|i| self.buckets.get_mut(i)) {
            // A bucket counts at most MAX_BUCKET_COUNT (and never less than it held).
            Some((x, n)) if *x == b => {
                *n = (*n).max(n.saturating_add(amount).min(MAX_BUCKET_COUNT))
            }
            _ => {
                // A window's first bucket takes room for one, not the four a `VecDeque`
                // grows to: a key used now and then never counts more than one.
                if self.buckets.capacity() == 0 {
                    self.buckets.reserve_exact(1);
                }
                self.buckets.insert(at, (b, amount.min(MAX_BUCKET_COUNT)))
            }
        }
    }

    /// The earliest time from `now` at which the counted amount is at most `target`;
    /// `now` if it already is.
    fn when_at_most(&self, window: LimitWindow, now: Micros, target: u64) -> Micros {
        let first = Self::first_counted(window, now);
        let mut used = self.used(window, now);
        if used <= target {
            return now;
        }
        for (b, n) in self.buckets.iter().filter(|(b, _)| *b >= first) {
            used = used.saturating_sub(*n);
            if used <= target {
                return Self::leaves_at(window, *b);
            }
        }
        // Unreachable: with every bucket gone, used is 0 <= target.
        self.reset_at(window, now)
    }

    /// When everything counted at `now` has left the window; `now` if nothing is counted.
    pub fn reset_at(&self, window: LimitWindow, now: Micros) -> Micros {
        let first = Self::first_counted(window, now);
        self.buckets
            .back()
            .filter(|(b, _)| *b >= first)
            .map_or(now, |(b, _)| Self::leaves_at(window, *b))
    }
}

/// Whether one window lets a call of `cost` requests through now.
pub fn window_allows(limit: &RateLimit, used: u64, cost: u64) -> bool {
    match limit.unit {
        LimitUnit::Requests => used.saturating_add(cost) <= limit.limit,
        // Tokens are known only after the call: refuse once the window is spent.
        LimitUnit::Tokens => used < limit.limit,
    }
}

/// Whose counter a window counts in: the key's own, or a pool every key of an owner, a
/// team or a workspace shares (see [`crate::pools`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LimitScope {
    #[default]
    Key,
    Owner,
    Team,
    Workspace,
}

impl LimitScope {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitScope::Key => "key",
            LimitScope::Owner => "owner",
            LimitScope::Team => "team",
            LimitScope::Workspace => "workspace",
        }
    }
}

/// The state of one window after a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowState {
    pub limit: RateLimit,
    /// Whose counter it is.
    pub scope: LimitScope,
    pub used: u64,
    pub remaining: u64,
    /// When all of the counted usage has left the window (the quota is whole again).
    pub reset_at: Micros,
    /// For a window that refused: when the same call would be let through. `None` when it
    /// never would (a cost above the limit).
    pub retry_at: Option<Micros>,
    pub allowed: bool,
}

/// The rate-limit part of a verification.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitDecision {
    pub allowed: bool,
    /// One per configured limit, in the key's order.
    pub windows: Vec<WindowState>,
    /// The window a gateway reports in its `X-RateLimit-*` headers: the refusing window
    /// that frees up last, or (when allowed) the one with the least headroom.
    pub tightest: Option<usize>,
}

/// Whether any of `limits` counts tokens (a window a call's own admission cannot
/// decide: tokens are known only when usage is reported).
pub fn has_token_window(limits: &[RateLimit]) -> bool {
    limits.iter().any(|l| l.unit == LimitUnit::Tokens)
}

impl LimitDecision {
    pub fn tightest(&self) -> Option<&WindowState> {
        self.tightest.and_then(|i| self.windows.get(i))
    }

    /// When the refused call may be retried (the latest of its refusing windows).
    pub fn retry_at(&self) -> Option<Micros> {
        self.tightest().and_then(|w| w.retry_at)
    }
}

/// Describes the windows of `limits` given their usage *after* the decision (admitted
/// cost already counted), for a call of `cost` that was `allowed` or not.
pub fn describe(
    limits: &[RateLimit],
    usage: &[WindowUsage],
    now: Micros,
    cost: u64,
    allowed: bool,
) -> LimitDecision {
    let empty = WindowUsage::default();
    let windows: Vec<WindowState> = limits
        .iter()
        .enumerate()
        .map(|(i, limit)| {
            let u = usage.get(i).unwrap_or(&empty);
            let used = u.used(limit.window, now);
            // After an admitted call its cost is part of `used`; judge the window by
            // what it was before.
            let before = if allowed && limit.unit == LimitUnit::Requests {
                used.saturating_sub(cost)
            } else {
                used
            };
            let ok = window_allows(limit, before, cost);
            let retry_at = (!ok)
                .then(|| match limit.unit {
                    LimitUnit::Requests => (cost <= limit.limit)
                        .then(|| u.when_at_most(limit.window, now, limit.limit - cost)),
                    LimitUnit::Tokens => {
                        Some(u.when_at_most(limit.window, now, limit.limit.saturating_sub(1)))
                    }
                })
                .flatten();
            WindowState {
                limit: *limit,
                scope: LimitScope::Key,
                used,
                remaining: limit.limit.saturating_sub(used),
                reset_at: u.reset_at(limit.window, now),
                retry_at,
                allowed: ok,
            }
        })
        .collect();
    let tightest = tightest(&windows, allowed);
    LimitDecision {
        allowed,
        windows,
        tightest,
    }
}

/// The window a gateway reports: the refusing window that frees up last, or (when
/// allowed) the one with the least headroom as a share of its limit, the shorter window
/// on a tie.
pub fn tightest(windows: &[WindowState], allowed: bool) -> Option<usize> {
    if allowed {
        (0..windows.len()).min_by(|&a, &b| {
            let (wa, wb) = (&windows[a], &windows[b]);
            let share_a = u128::from(wa.remaining) * u128::from(wb.limit.limit);
            let share_b = u128::from(wb.remaining) * u128::from(wa.limit.limit);
            share_a
                .cmp(&share_b)
                .then(wa.limit.window.cmp(&wb.limit.window))
        })
    } else {
        (0..windows.len())
            .filter(|&i| !windows[i].allowed)
            .max_by_key(|&i| windows[i].retry_at.unwrap_or(Micros::MAX))
    }
}

/// Decides a call of `cost` requests against `limits` with their `usage` (one per limit,
/// same order), consuming the cost from every request window when it is let through.
pub fn decide(
    limits: &[RateLimit],
    usage: &mut [WindowUsage],
    now: Micros,
    cost: u64,
) -> LimitDecision {
    let allowed = limits.iter().zip(usage.iter()).all(|(limit, u)| {
        let used = u.used(limit.window, now);
        window_allows(limit, used, cost)
    }) && usage.len() >= limits.len();
    for (limit, u) in limits.iter().zip(usage.iter_mut()) {
        u.prune(limit.window, now);
        if allowed && limit.unit == LimitUnit::Requests {
            u.add(limit.window, now, cost);
        }
    }
    describe(limits, usage, now, cost, allowed)
}

/// Whether a key's budget is spent.
pub fn budget_exceeded(max_budget_micros: Option<u64>, spent_micros: u64) -> bool {
    max_budget_micros.is_some_and(|max| spent_micros >= max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Micros = super::super::MICROS_PER_SECOND;
    /// A time on a minute boundary, far from zero.
    const T0: Micros = 1_800_000_000 * S;

    fn rpm(limit: u64) -> RateLimit {
        RateLimit {
            unit: LimitUnit::Requests,
            window: LimitWindow::Minute,
            limit,
        }
    }

    fn limit(unit: LimitUnit, window: LimitWindow, limit: u64) -> RateLimit {
        RateLimit {
            unit,
            window,
            limit,
        }
    }

    fn fresh(n: usize) -> Vec<WindowUsage> {
        vec![WindowUsage::default(); n]
    }

    #[test]
    fn exactly_the_limit_is_admitted_with_remaining_counting_down() {
        let limits = [rpm(10)];
        let mut usage = fresh(1);
        for i in 0..10u64 {
            let d = decide(&limits, &mut usage, T0 + i as i64, 1);
            assert!(d.allowed, "call {i}");
            assert_eq!(d.tightest().unwrap().remaining, 9 - i);
        }
        let d = decide(&limits, &mut usage, T0 + 10, 1);
        assert!(!d.allowed);
        let w = d.tightest().unwrap();
        assert_eq!((w.used, w.remaining), (10, 0), "a refusal consumes nothing");
        // Everything was counted in the bucket of T0: it leaves 61 s later.
        assert_eq!(w.retry_at, Some(T0 + 61 * S));
        assert_eq!(w.reset_at, T0 + 61 * S);
    }

    #[test]
    fn a_burst_at_a_window_edge_never_doubles_the_limit() {
        // 10 calls at the very end of one minute, then a flood at the start of the next:
        // a fixed window would admit 10 more; here none until the first ten have left.
        let limits = [rpm(10)];
        let mut usage = fresh(1);
        let edge = T0 + 60 * S - 1;
        for _ in 0..10 {
            assert!(decide(&limits, &mut usage, edge, 1).allowed);
        }
        assert!(!decide(&limits, &mut usage, edge + 1, 1).allowed);
        assert!(!decide(&limits, &mut usage, edge + 59 * S, 1).allowed);
        // Counted in bucket 59 of the first minute: leaves at T0 + 120 s.
        assert!(!decide(&limits, &mut usage, T0 + 120 * S - 1, 1).allowed);
        assert!(decide(&limits, &mut usage, T0 + 120 * S, 1).allowed);
    }

    #[test]
    fn no_sliding_window_admits_more_than_the_limit() {
        // Calls every 250 ms for five minutes against 30/minute: in every span of 60 s,
        // at most 30 admitted.
        let limits = [rpm(30)];
        let mut usage = fresh(1);
        let mut admitted = Vec::new();
        let mut t = T0 + 123_456;
        while t < T0 + 300 * S {
            if decide(&limits, &mut usage, t, 1).allowed {
                admitted.push(t);
            }
            t += S / 4;
        }
        for (i, start) in admitted.iter().enumerate() {
            let within = admitted[i..]
                .iter()
                .take_while(|&&a| a < start + 60 * S)
                .count();
            assert!(within <= 30, "{within} admitted in the minute from {start}");
        }
        // And the limiter is not starving the caller: about 30 a minute get through.
        assert!(admitted.len() >= 5 * 29, "{}", admitted.len());
    }

    #[test]
    fn cost_above_one_counts_whole_and_is_refused_whole() {
        let limits = [rpm(10)];
        let mut usage = fresh(1);
        assert!(decide(&limits, &mut usage, T0, 7).allowed);
        let d = decide(&limits, &mut usage, T0 + 1, 4);
        assert!(!d.allowed, "7 + 4 > 10");
        assert_eq!(d.tightest().unwrap().remaining, 3);
        assert!(decide(&limits, &mut usage, T0 + 2, 3).allowed);
        // A cost above the limit never passes, and says so.
        let d = decide(&[rpm(5)], &mut fresh(1), T0, 6);
        assert!(!d.allowed);
        assert_eq!(d.retry_at(), None);
    }

    #[test]
    fn the_minute_may_pass_while_the_hour_refuses() {
        let limits = [rpm(5), limit(LimitUnit::Requests, LimitWindow::Hour, 8)];
        let mut usage = fresh(2);
        for i in 0..5 {
            assert!(decide(&limits, &mut usage, T0 + i, 1).allowed);
        }
        let d = decide(&limits, &mut usage, T0 + 10, 1);
        assert!(!d.allowed);
        assert!(!d.windows[0].allowed && d.windows[1].allowed);
        // Two minutes later the minute is free: three more, then the hour refuses.
        let later = T0 + 120 * S;
        for i in 0..3 {
            assert!(decide(&limits, &mut usage, later + i, 1).allowed);
        }
        let d = decide(&limits, &mut usage, later + 5, 1);
        assert!(!d.allowed);
        assert!(d.windows[0].allowed && !d.windows[1].allowed);
        let hour = d.tightest().unwrap();
        assert_eq!(hour.limit.window, LimitWindow::Hour);
        // Hour buckets are a minute long: the first five leave 61 minutes after T0.
        assert_eq!(hour.retry_at, Some(T0 + 61 * 60 * S));
        // Nothing was consumed from the minute by the refused call.
        assert_eq!(d.windows[0].used, 3);
    }

    #[test]
    fn tokens_refuse_once_spent_and_free_up_as_they_leave() {
        let limits = [
            rpm(100),
            limit(LimitUnit::Tokens, LimitWindow::Minute, 1000),
        ];
        let mut usage = fresh(2);
        assert!(decide(&limits, &mut usage, T0, 1).allowed);
        usage[1].add(LimitWindow::Minute, T0 + S, 600);
        assert!(decide(&limits, &mut usage, T0 + 2 * S, 1).allowed);
        usage[1].add(LimitWindow::Minute, T0 + 3 * S, 400);
        let d = decide(&limits, &mut usage, T0 + 4 * S, 1);
        assert!(!d.allowed);
        let w = d.tightest().unwrap();
        assert_eq!(w.limit.unit, LimitUnit::Tokens);
        // The 600 tokens of second 1 leave at 62 s, and 400 < 1000.
        assert_eq!(w.retry_at, Some(T0 + 62 * S));
        assert!(decide(&limits, &mut usage, T0 + 62 * S, 1).allowed);
    }

    #[test]
    fn a_bucket_counts_tokens_up_to_its_ceiling_and_still_refuses() {
        let limits = [limit(LimitUnit::Tokens, LimitWindow::Day, MAX_LIMIT)];
        let mut usage = fresh(1);
        usage[0].add(LimitWindow::Day, T0, MAX_BUCKET_COUNT - 10);
        usage[0].add(LimitWindow::Day, T0, MAX_LIMIT);
        usage[0].add(LimitWindow::Day, T0, u64::MAX);
        assert_eq!(usage[0].used(LimitWindow::Day, T0), MAX_BUCKET_COUNT);
        let d = decide(&limits, &mut usage, T0, 1);
        assert!(!d.allowed);
        assert_eq!(d.tightest().unwrap().used, MAX_BUCKET_COUNT);
    }

    #[test]
    fn the_tightest_window_is_the_one_with_least_headroom() {
        let limits = [rpm(100), limit(LimitUnit::Requests, LimitWindow::Day, 3)];
        let d = decide(&limits, &mut fresh(2), T0, 1);
        assert!(d.allowed);
        let w = d.tightest().unwrap();
        assert_eq!((w.limit.window, w.remaining), (LimitWindow::Day, 2));
    }

    #[test]
    fn a_window_of_one_bucket_comes_back_whole_from_its_two_words() {
        let mut u = WindowUsage::default();
        u.add(LimitWindow::Minute, T0, 3);
        let (b, n) = u.single().unwrap();
        assert_eq!(WindowUsage::of_single(b, n), u);
        u.add(LimitWindow::Minute, T0 + S, 1);
        assert_eq!(u.single(), None, "two buckets");
        // A lease's bucket ahead of the newest is not a single window's state.
        let mut leased = WindowUsage::default();
        leased.add_at(LimitWindow::Minute, T0, T0 + 2 * S, 5);
        assert_eq!(leased.single(), None);
    }

    #[test]
    fn old_buckets_are_forgotten() {
        let mut u = WindowUsage::default();
        for i in 0..200 {
            u.add(LimitWindow::Minute, T0 + i * S, 1);
        }
        assert_eq!(u.buckets().count(), 61);
        assert_eq!(u.used(LimitWindow::Minute, T0 + 199 * S), 61);
    }

    #[test]
    fn limits_round_trip_through_their_text_form() {
        let limits = normalized(vec![
            limit(LimitUnit::Tokens, LimitWindow::Day, 1_000_000),
            rpm(100),
        ]);
        assert_eq!(join(&limits), "requests/minute=100 tokens/day=1000000");
        assert_eq!(split(&join(&limits)), Some(limits));
        assert_eq!(split(""), Some(vec![]));
        assert_eq!(split("requests/week=1"), None);
    }

    proptest::proptest! {
        /// Whatever the arrival pattern and costs, no span of one window admits more
        /// than the limit.
        #[test]
        fn no_arrival_pattern_over_admits(
            limit in 1u64..20,
            calls in proptest::collection::vec((0i64..3_000, 1u64..4), 1..400),
        ) {
            let limits = [rpm(limit)];
            let mut usage = fresh(1);
            let mut t = T0;
            let mut admitted: Vec<(Micros, u64)> = Vec::new();
            for (gap_ms, cost) in calls {
                t += gap_ms * 1000;
                if decide(&limits, &mut usage, t, cost).allowed {
                    admitted.push((t, cost));
                }
            }
            for (i, (start, _)) in admitted.iter().enumerate() {
                let sum: u64 = admitted[i..]
                    .iter()
                    .take_while(|(a, _)| *a < start + 60 * S)
                    .map(|(_, c)| c)
                    .sum();
                proptest::prop_assert!(sum <= limit, "{} admitted in the minute from {}", sum, start);
            }
        }
    }

    #[test]
    fn budgets_are_spent_at_the_ceiling() {
        assert!(!budget_exceeded(None, u64::MAX));
        assert!(!budget_exceeded(Some(100), 99));
        assert!(budget_exceeded(Some(100), 100));
    }
}
