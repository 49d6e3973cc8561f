//! The edge's quota leases: per key id, the requests this edge may admit on its own,
//! granted by `LeaseQuota` and timed from when it asked (see "Quota leases" in the
//! [module documentation](super)).
//!
//! [`LeaseBook`] is the bookkeeping only: no IO, the time a parameter. The
//! [`super::EdgeCache`] holds it behind a mutex and decides when a grant may be
//! installed (its generation guard); the background task sends what
//! [`LeaseBook::take_batch`] hands it.
//!
//! A call spends a lease without that mutex: each key's [`LeaseCell`] is shared by the
//! book and the key's cached answers, and [`LeaseCell::admit`] takes a call's cost from
//! the held lease's atomic count. Only the book (under its mutex) puts a lease in a cell
//! or takes one out, and taking one out swaps its count to zero before its settlement
//! is written, so a call either took its cost first (and is counted as used) or finds no
//! room: nothing is admitted that the settlement misses. A call the cell cannot admit
//! (no lease, spent, expired) takes the book's slow path, which also asks for more.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use keywarden_domain::key_format::KeyHash;
use keywarden_domain::lease::MAX_LEASE;
use keywarden_proto as proto;

/// The life assumed before the server has said (its default).
const DEFAULT_LIFE: Duration = Duration::from_secs(2);

/// The longest life this edge accepts from a server, whatever it says.
const MAX_LIFE: Duration = Duration::from_secs(60);

/// After a failed LeaseQuota call, no new ask for a key before this.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// One lease held: what the server granted and what this edge has left of it.
struct Held {
    granted: u64,
    /// The requests it may still admit: taken by calls with no lock, swapped to zero
    /// when the lease is given up ([`Held::give_up`]). On a cache line of its own: each
    /// call writes it, and the fields a call only reads would otherwise move between
    /// cores with it.
    left: OwnLine,
    counted_at: i64,
    /// The grant's name at the server's counters, named again when it is settled.
    lease_id: u64,
    /// The key's own limits the grant was counted against, named again when it is
    /// settled.
    limits: Vec<proto::RateLimit>,
    /// For a key in pools, each pool's part of the grant, repeated when it is settled.
    pools: Vec<proto::PoolLease>,
    /// The grant's figures (the whole grant counted as used), shared with each call
    /// admitted from it (see [`Admitted`]).
    decision: Arc<proto::RateLimitDecision>,
    /// What this edge gives back of the lease this one replaced: counted by the server
    /// when it granted this one, soon freed by the settlement.
    returned: u64,
    asked_at: Instant,
    /// Not one call is admitted from it from here on: `asked_at + life`.
    ends: Instant,
    /// From then on an ask ahead is due whatever the rate: a third of the life left.
    low_at: Instant,
    /// The life, and the least time since the ask that [`Held::runs_low`] judges a rate
    /// over (a twentieth of the life), in nanoseconds.
    life_nanos: u128,
    min_elapsed: Duration,
    /// The decision's windows as a call's figures need them, inline, when they fit.
    windows: InlineWindows,
}

/// Requests one thread took from a lease ahead of its calls, spent by that thread alone.
/// They count as used from when they are taken: a reserve left when its lease ends is
/// settled as used, never admitted from afterwards. That is the under-admission a thread
/// adds per lease: at most [`MAX_RESERVE`] requests, and a [`RESERVE_SHARE`]th of what the
/// lease had left.
///
/// A reserve is spent with no look at its lease, so that a call it admits reads and
/// writes only its thread's memory: it carries the lease's end and figures, and is not
/// told when its lease is given up. The fronts keep that sound: every give-up an event, a
/// flush or the stream's loss makes also empties every front, and with it every reserve
/// (`front`). A lease given up at a refill or past its end leaves its reserves to be
/// spent, within its end, by calls its settlement counted.
pub(super) struct Reserve {
    held: Arc<Held>,
    left: u64,
    /// Given back to `remaining` beside `left`: what the lease had left when this was
    /// taken, and what it gives back of the lease it replaced.
    back: u64,
    ends: Instant,
    windows: InlineWindows,
    decision: Arc<proto::RateLimitDecision>,
}

impl Reserve {
    fn figures(&self) -> Figures<'_> {
        Figures {
            decision: &self.decision,
            windows: &self.windows,
            back: self.back.saturating_add(self.left),
        }
    }
}

/// A reserve holds at most this many requests...
pub const MAX_RESERVE: u64 = 31;
/// ...and at most this share of what its lease had left (one sixteenth).
pub const RESERVE_SHARE: u64 = 16;

/// An atomic count alone on its cache line.
#[repr(align(128))]
struct OwnLine(AtomicU64);

impl Held {
    /// A grant of `granted` requests with `decision`, asked for at `asked_at`, for `life`.
    #[allow(clippy::too_many_arguments)]
    fn new(
        granted: u64,
        counted_at: i64,
        lease_id: u64,
        limits: Vec<proto::RateLimit>,
        pools: Vec<proto::PoolLease>,
        decision: proto::RateLimitDecision,
        returned: u64,
        asked_at: Instant,
        life: Duration,
    ) -> Self {
        let ends = asked_at + life;
        Held {
            granted,
            left: OwnLine(AtomicU64::new(granted)),
            counted_at,
            lease_id,
            limits,
            pools,
            windows: InlineWindows::of(&decision),
            decision: Arc::new(decision),
            returned,
            asked_at,
            ends,
            low_at: ends.checked_sub(life / 3).unwrap_or(asked_at),
            life_nanos: life.as_nanos(),
            min_elapsed: life / 20,
        }
    }

    /// Takes `cost` from what is left, if there is room. Returns what is left after.
    fn take(&self, cost: u64) -> Option<u64> {
        self.left
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(cost)
            })
            .ok()
            .map(|before| before - cost)
    }

    /// Takes `cost`, and ahead of later calls a share of what is left after it (at most
    /// [`MAX_RESERVE`], and a [`RESERVE_SHARE`]th), in one write. Returns what was
    /// taken beyond `cost` and what is left after.
    fn take_ahead(&self, cost: u64) -> Option<(u64, u64)> {
        let ahead = |left: u64| ((left - cost) / RESERVE_SHARE).min(MAX_RESERVE);
        let before = self
            .left
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                (left >= cost).then(|| left - cost - ahead(left))
            })
            .ok()?;
        let ahead = ahead(before);
        Some((ahead, before - cost - ahead))
    }

    /// The requests it may still admit.
    fn room(&self) -> u64 {
        self.left.0.load(Ordering::Relaxed)
    }

    /// Ends the lease: nothing more is admitted from it. Its settlement, made once, by
    /// whoever took it out of its cell (later calls would find nothing left).
    fn give_up(&self) -> proto::LeaseSettlement {
        let left = self.left.0.swap(0, Ordering::Relaxed);
        proto::LeaseSettlement {
            granted: self.granted,
            counted_at_micros: self.counted_at,
            used: self.granted.saturating_sub(left),
            limits: self.limits.clone(),
            lease_id: self.lease_id,
            pools: self.pools.clone(),
        }
    }

    /// Whether to ask ahead, with `left` left after a call and `demand` calls seen since
    /// the ask: so that the key's calls never wait, when what is left covers less than
    /// half a life at the rate seen, or a third of the life is left.
    ///
    /// In integers, as every call asks it: `left <= demand / elapsed * life / 2`.
    fn runs_low(&self, left: u64, demand: u64, now: Instant) -> bool {
        if now >= self.low_at {
            return true;
        }
        let elapsed = now
            .saturating_duration_since(self.asked_at)
            .max(self.min_elapsed);
        u128::from(left) * elapsed.as_nanos() * 2 <= u128::from(demand) * self.life_nanos
    }

    /// Calls admitted from it so far.
    fn used(&self) -> u64 {
        self.granted.saturating_sub(self.room())
    }

    /// A call's figures, with `left` left after it: the grant's, with what is left of
    /// the lease (and of the one it replaced) given back to `remaining`.
    fn figures(&self, left: u64) -> Figures<'_> {
        Figures {
            decision: &self.decision,
            windows: &self.windows,
            back: left.saturating_add(self.returned),
        }
    }
}

/// The windows of a decision a call's figures are made from, inline when there are at
/// most [`INLINE_WINDOWS`] of them (a key's own limits alone, or a few pools'), so that
/// a call admitted from a lease reads them where it reads the lease.
#[derive(Clone, Copy, Debug, Default)]
struct InlineWindows {
    /// How many windows the decision has: more than [`INLINE_WINDOWS`], and they are read
    /// from the decision itself.
    len: usize,
    items: [WindowFigures; INLINE_WINDOWS],
}

const INLINE_WINDOWS: usize = 4;

/// One window's figures as granted.
#[derive(Clone, Copy, Debug, Default)]
struct WindowFigures {
    limit: u64,
    remaining: u64,
    reset_at: i64,
    /// The window's length (a tie-break: the shorter is the tighter).
    window: i32,
}

impl WindowFigures {
    fn of(w: &proto::RateLimitWindowState) -> Self {
        WindowFigures {
            limit: w.limit.as_ref().map_or(0, |l| l.limit),
            remaining: w.remaining,
            reset_at: w.reset_at,
            window: w.limit.as_ref().map_or(0, |l| l.window),
        }
    }
}

impl InlineWindows {
    fn of(decision: &proto::RateLimitDecision) -> Self {
        let mut inline = InlineWindows {
            len: decision.windows.len(),
            ..InlineWindows::default()
        };
        for (item, w) in inline.items.iter_mut().zip(&decision.windows) {
            *item = WindowFigures::of(w);
        }
        inline
    }

    /// The windows, if they are all inline.
    fn get(&self) -> Option<&[WindowFigures]> {
        self.items.get(..self.len)
    }
}

/// A key's lease as its calls see it, shared by the book's slot and the key's cached
/// answers: read and spent with no lock (see the module documentation).
#[derive(Default)]
pub(super) struct LeaseCell {
    /// Put in and taken out only by the book, under its mutex.
    held: ArcSwapOption<Held>,
    /// Calls wanted since the lease was asked for and not admitted from the lease held
    /// (those are its `used`; see [`LeaseCell::demand`]): sizes the next ask.
    demand: AtomicU64,
    /// An ask is queued or on its way: one at a time per key.
    asking: AtomicBool,
    /// The largest cost of a call seen: an ask wants at least that much.
    max_cost: AtomicU64,
}

impl LeaseCell {
    fn new() -> Self {
        LeaseCell {
            max_cost: AtomicU64::new(1),
            ..LeaseCell::default()
        }
    }

    /// A call of `cost` at its first turn, admitted from the lease held if it has room:
    /// no lock. With it, whether an ask ahead is due ([`LeaseBook::ask_ahead`]). `None`:
    /// the call takes the book's way ([`LeaseBook::admit`]). What the call answers with
    /// is made by `answer` from its [`Figures`], read while the lease is held.
    pub(super) fn admit_with<T>(
        &self,
        cost: u64,
        now: Instant,
        answer: impl FnOnce(Figures<'_>) -> T,
    ) -> Option<(T, bool)> {
        let guard = self.held.load();
        let held = guard.as_ref().filter(|h| now < h.ends)?;
        let left = held.take(cost)?;
        // What the lease admitted counts as demand without a write of its own: the
        // count taken above is the call's one write to memory other cores share.
        let demand = self
            .demand
            .load(Ordering::Relaxed)
            .saturating_add(held.granted.saturating_sub(left));
        self.saw_cost(cost);
        let ask = !self.asking.load(Ordering::Relaxed) && held.runs_low(left, demand, now);
        Some((answer(held.figures(left)), ask))
    }

    /// [`LeaseCell::admit_with`] for a thread that keeps a [`Reserve`] of the lease (its
    /// front): a call the reserve covers writes no memory another core reads; one it
    /// does not takes its cost and a reserve ahead in one write to the lease's count.
    pub(super) fn admit_reserved<T>(
        &self,
        reserve: &mut Option<Reserve>,
        cost: u64,
        now: Instant,
        answer: impl FnOnce(Figures<'_>) -> T,
    ) -> Option<(T, bool)> {
        // Read from the reserve alone: nothing of the lease is touched.
        if let Some(r) = reserve.as_mut()
            && r.left >= cost
            && now < r.ends
        {
            r.left -= cost;
            return Some((answer(r.figures()), false));
        }
        let guard = self.held.load();
        let held = guard.as_ref().filter(|h| now < h.ends)?;
        // What is left of a reserve of the lease held; one of a lease since replaced is
        // dropped (its requests were counted as used by its settlement).
        let kept = reserve
            .as_ref()
            .filter(|r| Arc::ptr_eq(&r.held, held))
            .map_or(0, |r| r.left);
        // The call spends what is kept and takes the rest from the lease.
        let (left, lease_left) = held.take_ahead(cost - kept)?;
        *reserve = Some(Reserve {
            held: held.clone(),
            left,
            back: lease_left.saturating_add(held.returned),
            ends: held.ends,
            windows: held.windows,
            decision: held.decision.clone(),
        });
        let demand = self
            .demand
            .load(Ordering::Relaxed)
            .saturating_add(held.granted.saturating_sub(lease_left + left));
        self.saw_cost(cost);
        let ask =
            !self.asking.load(Ordering::Relaxed) && held.runs_low(lease_left + left, demand, now);
        Some((answer(held.figures(lease_left + left)), ask))
    }

    /// [`LeaseCell::admit_with`], the call's admission owned (tests).
    #[cfg(test)]
    pub(super) fn admit(&self, cost: u64, now: Instant) -> Option<(Admitted, bool)> {
        let guard = self.held.load();
        let held = guard.as_ref()?.clone();
        let (left, ask) = self.admit_with(cost, now, |f| f.back.saturating_sub(held.returned))?;
        Some((Admitted { held, left }, ask))
    }

    fn saw_cost(&self, cost: u64) {
        if cost > self.max_cost.load(Ordering::Relaxed) {
            self.max_cost.fetch_max(cost, Ordering::Relaxed);
        }
    }

    /// Takes the lease out, if any, for its settlement. What it admitted stays counted
    /// in the demand.
    fn take_held(&self) -> Option<proto::LeaseSettlement> {
        let settlement = self.held.swap(None).map(|held| held.give_up())?;
        self.demand.fetch_add(settlement.used, Ordering::Relaxed);
        Some(settlement)
    }

    /// Calls wanted since the lease was asked for, admitted or not.
    fn demand(&self) -> u64 {
        let used = self.held.load().as_ref().map_or(0, |h| h.used());
        self.demand.load(Ordering::Relaxed).saturating_add(used)
    }
}

/// The figures a gateway sends as `X-RateLimit-Limit`, `-Remaining` and `-Reset`: the
/// tightest window of a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitFigures {
    pub limit: u64,
    pub remaining: u64,
    /// Unix seconds.
    pub reset_at: i64,
}

/// A call admitted from a lease, as taken under the lease book's lock: the shared
/// lease and what it had left after the call, so that nothing is copied there. Its
/// figures are made from them (see [`Figures`]).
#[derive(Clone)]
pub(super) struct Admitted {
    held: Arc<Held>,
    left: u64,
}

impl PartialEq for Admitted {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.held, &other.held) && self.left == other.left
    }
}

impl std::fmt::Debug for Admitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admitted")
            .field("lease_id", &self.held.lease_id)
            .field("left", &self.left)
            .finish()
    }
}

impl Admitted {
    /// The figures of this call, borrowed from the lease.
    pub(super) fn figures_of(&self) -> Figures<'_> {
        self.held.figures(self.left)
    }

    /// The whole decision, as VerifyKey answers it.
    #[cfg(test)]
    pub(super) fn decision(&self) -> proto::RateLimitDecision {
        self.figures_of().decision()
    }

    /// The tightest window's figures alone.
    #[cfg(test)]
    pub(super) fn figures(&self) -> RateLimitFigures {
        self.figures_of().figures()
    }
}

/// A call admitted from a lease, borrowed: the grant's figures, with `back` given back
/// to `remaining`, so that `X-RateLimit-Remaining` counts down truthfully while this
/// edge is the only user. A call admitted by a [`LeaseCell`] reads them while it holds
/// the lease, so that nothing of the grant is shared or copied per call.
#[derive(Clone, Copy, Debug)]
pub(super) struct Figures<'a> {
    decision: &'a proto::RateLimitDecision,
    windows: &'a InlineWindows,
    back: u64,
}

impl Figures<'_> {
    /// A window's state for this call.
    fn window(&self, w: WindowFigures) -> (u64, u64, i64) {
        let remaining = w.remaining.saturating_add(self.back).min(w.limit);
        (w.limit, remaining, w.reset_at)
    }

    /// The tightest window as the server picks it when a call passes: least headroom as a
    /// share of the limit, the shorter window on a tie.
    fn tightest(&self) -> Option<(u64, u64, i64)> {
        let tighter = |a: &WindowFigures, b: &WindowFigures| {
            let ((la, ra, _), (lb, rb, _)) = (self.window(*a), self.window(*b));
            (u128::from(ra) * u128::from(lb))
                .cmp(&(u128::from(rb) * u128::from(la)))
                .then(a.window.cmp(&b.window))
        };
        let tightest = match self.windows.get() {
            Some(inline) => inline.iter().copied().min_by(tighter),
            None => self
                .decision
                .windows
                .iter()
                .map(WindowFigures::of)
                .min_by(tighter),
        };
        tightest.map(|w| self.window(w))
    }

    /// The whole decision, as VerifyKey answers it.
    pub(super) fn decision(&self) -> proto::RateLimitDecision {
        let mut d = self.decision.clone();
        let tightest = self.tightest();
        for w in &mut d.windows {
            let (limit, remaining, _) = self.window(WindowFigures::of(w));
            w.remaining = remaining;
            w.used = limit.saturating_sub(remaining);
            w.allowed = true;
        }
        if let Some((limit, remaining, reset_at)) = tightest {
            d.limit = limit;
            d.remaining = remaining;
            d.reset_at = reset_at;
        }
        d.allowed = true;
        d.retry_after = None;
        d
    }

    /// The tightest window's figures alone: no allocation.
    pub(super) fn figures(&self) -> RateLimitFigures {
        let (limit, remaining, reset_at) = self.tightest().unwrap_or((
            self.decision.limit,
            self.decision.remaining,
            self.decision.reset_at,
        ));
        RateLimitFigures {
            limit,
            remaining,
            reset_at,
        }
    }
}

/// One key's lease state.
struct Slot {
    /// A secret of the key (the one first verified): asks name it.
    hash: KeyHash,
    /// The lease held and the key's demand, spent by calls with no lock.
    cell: Arc<LeaseCell>,
    /// No new ask before this (after a refusal, or a failed call).
    not_before: Option<Instant>,
    /// Since when the cell's demand was counted.
    since: Instant,
    /// The most one ask wants: half the tightest request limit, so one holder never
    /// takes everything while others ask.
    cap: u64,
}

impl Slot {
    fn new(hash: KeyHash, cap: u64, now: Instant) -> Self {
        Slot {
            hash,
            cell: Arc::new(LeaseCell::new()),
            not_before: None,
            since: now,
            cap,
        }
    }

    fn may_ask(&self, now: Instant) -> bool {
        !self.cell.asking.load(Ordering::Relaxed) && self.not_before.is_none_or(|t| now >= t)
    }

    fn asking(&self) -> bool {
        self.cell.asking.load(Ordering::Relaxed)
    }

    fn set_asking(&self, asking: bool) {
        self.cell.asking.store(asking, Ordering::Relaxed);
    }

    /// The lease held, if it may still admit a call at `now`.
    fn live(&self, now: Instant) -> Option<Arc<Held>> {
        self.cell.held.load_full().filter(|h| now < h.ends)
    }

    /// Whether the lease held has ended by `now`.
    fn ended(&self, now: Instant) -> bool {
        self.cell
            .held
            .load()
            .as_ref()
            .is_some_and(|h| now >= h.ends)
    }
}

/// A call's turn at the lease of its key.
#[derive(Debug, PartialEq)]
pub(super) enum Admit {
    /// Admitted from the lease.
    Served(Admitted),
    /// No room now, but an ask for the key is queued or on its way: worth waiting for.
    Wait,
    /// No lease to admit from: the call goes to the server.
    NotLeased,
}

/// Every lease this edge holds, by key id.
pub(super) struct LeaseBook {
    slots: HashMap<String, Slot, crate::maps::Hasher>,
    /// Key ids whose ask is queued (their slot's `asking` set), not sent yet.
    queued: Vec<String>,
    /// Leases given up (expired, replaced, dropped) for the next LeaseQuota call to
    /// settle, with the key's id and a hash of it.
    settlements: Vec<(String, String, proto::LeaseSettlement)>,
    /// The life of the last grant: sizes asks.
    life: Duration,
    /// Asks wait until then after the server said it leases nothing.
    off_until: Option<Instant>,
}

impl Default for LeaseBook {
    fn default() -> Self {
        LeaseBook {
            slots: HashMap::default(),
            queued: Vec::new(),
            settlements: Vec::new(),
            life: DEFAULT_LIFE,
            off_until: None,
        }
    }
}

/// The cap of one ask for a key answered with `decision`: half its tightest request
/// limit, its own or a pool's (at least 1), or `None` when the answer cannot be leased (a
/// token window: those are counted when usage is reported, which a lease cannot
/// foresee). A key in pools is leased from its own counter and each pool's together
/// (the server grants what all of them have room for).
pub(super) fn lease_cap(decision: &proto::RateLimitDecision) -> Option<u64> {
    let mut cap = MAX_LEASE;
    for w in &decision.windows {
        let limit = w.limit.as_ref()?;
        if limit.unit != proto::RateLimitUnit::Requests as i32 {
            return None;
        }
        cap = cap.min((limit.limit / 2).max(1));
    }
    (!decision.windows.is_empty()).then_some(cap)
}

/// Whether a window of a decision is the key's own (not a pool's).
fn is_own(scope: i32) -> bool {
    scope == proto::LimitScope::Unspecified as i32 || scope == proto::LimitScope::Key as i32
}

/// A grant's life, if it is one this edge can use.
fn life_of(grant: &proto::LeaseGrant) -> Option<Duration> {
    let d = grant.life.as_ref()?;
    let life = Duration::new(
        u64::try_from(d.seconds).ok()?,
        u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000)?,
    );
    (!life.is_zero() && life <= MAX_LIFE).then_some(life)
}

impl LeaseBook {
    /// Whether leases wait to be settled (the lease task should run).
    pub(super) fn has_settlements(&self) -> bool {
        !self.settlements.is_empty()
    }

    fn queue(&mut self, key_id: &str, now: Instant) -> bool {
        if self.off_until.is_some_and(|t| now < t) {
            return false;
        }
        match self.slots.get(key_id) {
            Some(slot) if slot.may_ask(now) => {
                slot.set_asking(true);
                self.queued.push(key_id.to_owned());
                true
            }
            _ => false,
        }
    }

    /// A call admitted by the key's [`LeaseCell`] found the lease running low: queue an
    /// ask unless one is on its way. Returns whether one was queued.
    pub(super) fn ask_ahead(&mut self, key_id: &str, now: Instant) -> bool {
        self.queue(key_id, now)
    }

    /// The key's [`LeaseCell`], for its cached answers to share (the slot made if the
    /// key has none).
    pub(super) fn cell(
        &mut self,
        key_id: &str,
        hash: KeyHash,
        cap: u64,
        now: Instant,
    ) -> Arc<LeaseCell> {
        self.slots
            .entry(key_id.to_owned())
            .or_insert_with(|| Slot::new(hash, cap, now))
            .cell
            .clone()
    }

    /// A call of `cost` requests for `key_id`, whose answer is cached and needs a lease.
    /// `first`: its first turn (its demand is counted once). Returns the call's fate and
    /// whether an ask was queued (the background task must be woken).
    pub(super) fn admit(
        &mut self,
        key_id: &str,
        cost: u64,
        first: bool,
        now: Instant,
    ) -> (Admit, bool) {
        let Some(slot) = self.slots.get(key_id) else {
            return (Admit::NotLeased, false);
        };
        let cell = &slot.cell;
        // No lease this edge asks for could admit it: to the server at once.
        if cost > slot.cap {
            if first {
                cell.demand.fetch_add(cost, Ordering::Relaxed);
            }
            return (Admit::NotLeased, false);
        }
        cell.saw_cost(cost);
        if let Some(held) = slot.live(now)
            && let Some(left) = held.take(cost)
        {
            // Admitted: counted in the lease's `used`, which the demand includes.
            let demand = cell.demand();
            let queued = held.runs_low(left, demand, now) && self.queue(key_id, now);
            return (Admit::Served(Admitted { held, left }), queued);
        }
        if first {
            cell.demand.fetch_add(cost, Ordering::Relaxed);
        }
        // Spent or expired. An expired lease is given up at once: nothing more is
        // admitted from it, and what it did not use goes back with the next call.
        if slot.ended(now)
            && let Some(settlement) = cell.take_held()
        {
            let hash = slot.hash.to_hex();
            self.settlements.push((key_id.to_owned(), hash, settlement));
        }
        let queued = self.queue(key_id, now);
        let asking = self.slots.get(key_id).is_some_and(Slot::asking);
        (
            if asking {
                Admit::Wait
            } else {
                Admit::NotLeased
            },
            queued,
        )
    }

    /// The server answered a call for `key_id` (secret `hash`) VALID with a decision this
    /// edge can lease (`cap` from [`lease_cap`]), and the answer was cached: make sure a
    /// lease is on its way. Returns whether an ask was queued.
    pub(super) fn want(&mut self, key_id: &str, hash: KeyHash, cap: u64, now: Instant) -> bool {
        let slot = self
            .slots
            .entry(key_id.to_owned())
            .or_insert_with(|| Slot::new(hash, cap, now));
        slot.cell.demand.fetch_add(1, Ordering::Relaxed);
        slot.cap = cap;
        let has_room = slot.live(now).is_some_and(|h| h.room() > 0);
        !has_room && self.queue(key_id, now)
    }

    /// How many requests to ask for: the demand seen since the last grant, scaled to a
    /// lease's life with a margin, capped.
    fn size(&self, slot: &Slot, now: Instant) -> u64 {
        let life = self.life.as_secs_f64();
        let elapsed = now
            .saturating_duration_since(slot.since)
            .as_secs_f64()
            .max(life / 20.0)
            .max(f64::EPSILON);
        let demand = slot.cell.demand();
        let expected = (demand.max(1) as f64 / elapsed * life * 1.5).ceil();
        let expected = if expected.is_finite() && expected >= 1.0 {
            expected.min(MAX_LEASE as f64) as u64
        } else {
            1
        };
        let max_cost = slot.cell.max_cost.load(Ordering::Relaxed);
        expected.max(max_cost).clamp(1, slot.cap.max(1))
    }

    /// Gives up every lease past its end (what it did not use is settled with the next
    /// call), and forgets idle keys.
    pub(super) fn sweep(&mut self, now: Instant) {
        let mut given_up = Vec::new();
        self.slots.retain(|key_id, slot| {
            if slot.ended(now)
                && let Some(settlement) = slot.cell.take_held()
            {
                given_up.push((key_id.clone(), slot.hash.to_hex(), settlement));
            }
            // A key not asked for in a while, with nothing held, is forgotten; its next
            // VALID from the server starts it afresh (a new cell, which its next fill
            // gives its cached answers).
            slot.cell.held.load().is_some()
                || slot.asking()
                || now.saturating_duration_since(slot.since) < MAX_LIFE
        });
        self.settlements.extend(given_up);
    }

    /// The next LeaseQuota call's asks (at most `max`): the queued asks for grants (only
    /// when `grants`: the cache is in use), each carrying the settlement of its key's
    /// last lease if one is waiting, then the other settlements alone. Expired leases
    /// are swept first.
    pub(super) fn take_batch(
        &mut self,
        grants: bool,
        max: usize,
        now: Instant,
    ) -> Vec<proto::LeaseAsk> {
        self.sweep(now);
        let mut asks = Vec::new();
        let queued = std::mem::take(&mut self.queued);
        let mut later = Vec::new();
        for key_id in queued {
            let Some(slot) = self.slots.get(&key_id) else {
                continue;
            };
            if !grants {
                slot.set_asking(false);
                continue;
            }
            if asks.len() >= max {
                later.push(key_id);
                continue;
            }
            let settle = self
                .settlements
                .iter()
                .position(|(k, _, _)| *k == key_id)
                .map(|i| self.settlements.swap_remove(i).2);
            asks.push(proto::LeaseAsk {
                key_id: key_id.clone(),
                key_hash: slot.hash.to_hex(),
                want: self.size(slot, now),
                min: 1,
                settle,
            });
        }
        self.queued = later;
        while asks.len() < max
            && let Some((key_id, hash, settle)) = self.settlements.pop()
        {
            asks.push(proto::LeaseAsk {
                key_id,
                key_hash: hash,
                want: 0,
                min: 0,
                settle: Some(settle),
            });
        }
        asks
    }

    /// Puts the grants answering `asks` (sent at `asked_at`) in place; `valid`: no event,
    /// flush or disconnection happened since the asks were taken, so no lease dropped
    /// since is brought back. A grant not installed is settled unused.
    pub(super) fn install(
        &mut self,
        valid: bool,
        asked_at: Instant,
        asks: &[proto::LeaseAsk],
        grants: &[proto::LeaseGrant],
    ) {
        for (i, ask) in asks.iter().enumerate() {
            if ask.want == 0 {
                continue;
            }
            let grant = grants.get(i).filter(|g| g.key_id == ask.key_id);
            let life = grant.and_then(life_of);
            if let Some(life) = life {
                self.life = life;
            }
            let mut unused = grant
                .filter(|g| g.amount > 0)
                .map(|g| proto::LeaseSettlement {
                    granted: g.amount,
                    counted_at_micros: g.counted_at_micros,
                    used: 0,
                    lease_id: g.lease_id,
                    // The key's own windows: a pool's are settled by its part.
                    limits: g
                        .rate_limit
                        .iter()
                        .flat_map(|d| d.windows.iter().filter(|w| is_own(w.scope)))
                        .filter_map(|w| w.limit)
                        .collect(),
                    pools: g.pools.clone(),
                });
            if let Some(slot) = self.slots.get_mut(&ask.key_id) {
                slot.set_asking(false);
                match grant {
                    Some(g)
                        if valid
                            && g.amount > 0
                            && g.code == proto::VerifyCode::Valid as i32
                            && g.rate_limit.as_ref().and_then(lease_cap).is_some() =>
                    {
                        if let (Some(life), Some(decision), Some(settlement)) =
                            (life, g.rate_limit.clone(), unused.take())
                        {
                            // The old lease ends before the new one is put in: a call
                            // meanwhile finds no room and waits for the book's lock.
                            let old = slot.cell.take_held();
                            let returned =
                                old.as_ref().map_or(0, |o| o.granted.saturating_sub(o.used));
                            if let Some(old) = old {
                                self.settlements.push((
                                    ask.key_id.clone(),
                                    slot.hash.to_hex(),
                                    old,
                                ));
                            }
                            slot.cell.demand.store(0, Ordering::Relaxed);
                            slot.cell.held.store(Some(Arc::new(Held::new(
                                g.amount,
                                g.counted_at_micros,
                                g.lease_id,
                                settlement.limits,
                                settlement.pools,
                                decision,
                                returned,
                                asked_at,
                                life,
                            ))));
                            slot.since = asked_at;
                            slot.not_before = None;
                        }
                    }
                    // Refused: no new ask until the call could pass (at most one life);
                    // meanwhile calls go to the server, which counts them exactly.
                    Some(g) if valid => {
                        let wait = g
                            .rate_limit
                            .as_ref()
                            .and_then(|d| d.retry_after.as_ref())
                            .and_then(|d| {
                                Some(Duration::new(
                                    u64::try_from(d.seconds).ok()?,
                                    u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000)?,
                                ))
                            })
                            .unwrap_or(self.life)
                            .min(self.life);
                        slot.not_before = Some(asked_at + wait);
                    }
                    _ => {}
                }
            }
            // Not installed (refused nothing, but raced an event, or unusable): given back.
            if let Some(settlement) = unused {
                self.settlements
                    .push((ask.key_id.clone(), ask.key_hash.clone(), settlement));
            }
        }
    }

    /// The LeaseQuota call failed: no grant, and the settlements it carried are lost
    /// (those leases stay counted by the server until they leave their windows: nothing
    /// is over-admitted). `off`: the server leases nothing; ask again only after `off`.
    pub(super) fn failed(&mut self, asks: &[proto::LeaseAsk], off: Option<Duration>, now: Instant) {
        for ask in asks.iter().filter(|a| a.want > 0) {
            if let Some(slot) = self.slots.get_mut(&ask.key_id) {
                slot.set_asking(false);
                slot.not_before = Some(now + RETRY_AFTER_FAILURE);
            }
        }
        if let Some(off) = off {
            self.off_until = Some(now + off);
        }
    }

    /// Drops the key's lease (an event about it): nothing more is admitted from it, and
    /// what it did not use is settled.
    pub(super) fn drop_key(&mut self, key_id: &str) {
        if let Some(slot) = self.slots.remove(key_id)
            && let Some(settlement) = slot.cell.take_held()
        {
            self.settlements
                .push((key_id.to_owned(), slot.hash.to_hex(), settlement));
        }
    }

    /// Drops every lease (a flush, a disconnection, a shutdown).
    pub(super) fn drop_all(&mut self) {
        for (key_id, slot) in self.slots.drain() {
            if let Some(settlement) = slot.cell.take_held() {
                self.settlements
                    .push((key_id, slot.hash.to_hex(), settlement));
            }
        }
        self.queued.clear();
    }

    /// The requests still admissible from the key's lease now (tests, debugging).
    #[cfg(test)]
    fn room(&self, key_id: &str, now: Instant) -> u64 {
        self.slots
            .get(key_id)
            .and_then(|s| s.live(now))
            .map_or(0, |h| h.room())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIFE: Duration = Duration::from_secs(2);

    fn rpm(limit: u64) -> proto::RateLimit {
        proto::RateLimit {
            unit: proto::RateLimitUnit::Requests as i32,
            window: proto::RateLimitWindow::Minute as i32,
            limit,
        }
    }

    /// The figures a server sends with a VALID answer or a grant: `remaining` left.
    fn decision(limit: u64, remaining: u64) -> proto::RateLimitDecision {
        proto::RateLimitDecision {
            allowed: true,
            limit,
            remaining,
            reset_at: 1_800_000_060,
            retry_after: None,
            windows: vec![proto::RateLimitWindowState {
                limit: Some(rpm(limit)),
                used: limit - remaining,
                remaining,
                reset_at: 1_800_000_060,
                allowed: true,
                scope: proto::LimitScope::Key as i32,
            }],
            scope: proto::LimitScope::Key as i32,
        }
    }

    fn grant(key_id: &str, amount: u64, remaining_after: u64) -> proto::LeaseGrant {
        proto::LeaseGrant {
            key_id: key_id.to_owned(),
            amount,
            counted_at_micros: 1_800_000_002_000_000,
            life: Some(prost_types::Duration {
                seconds: LIFE.as_secs() as i64,
                nanos: 0,
            }),
            rate_limit: Some(decision(100, remaining_after)),
            code: proto::VerifyCode::Valid as i32,
            rate_limit_unknown: false,
            lease_id: 7,
            pools: Vec::new(),
        }
    }

    /// A book holding a lease of `amount` for key "k" (limit 100, one call admitted by
    /// the server before), granted at `t0`.
    fn holding(amount: u64, t0: Instant) -> LeaseBook {
        let mut book = LeaseBook::default();
        assert!(book.want("k", KeyHash::of("secret"), 50, t0));
        let asks = book.take_batch(true, 1000, t0);
        assert_eq!(asks.len(), 1);
        assert_eq!(asks[0].key_hash, KeyHash::of("secret").to_hex());
        book.install(true, t0, &asks, &[grant("k", amount, 99 - amount)]);
        book
    }

    #[test]
    fn a_lease_admits_what_it_holds_and_counts_the_figures_down() {
        let t0 = Instant::now();
        let mut book = holding(3, t0);
        for left in [98, 97, 96] {
            match book.admit("k", 1, true, t0).0 {
                Admit::Served(a) => {
                    let d = a.decision();
                    assert_eq!(d.remaining, left);
                    let f = a.figures();
                    assert_eq!((f.limit, f.remaining, f.reset_at), (100, left, d.reset_at));
                    assert_eq!(d.windows[0].remaining, left);
                    assert_eq!(d.windows[0].used, 100 - left);
                    assert!(d.allowed);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(book.room("k", t0), 0);
        // Spent: the call waits for the refill asked ahead, or goes to the server.
        assert!(!matches!(book.admit("k", 1, true, t0).0, Admit::Served(_)));
    }

    #[test]
    fn a_call_costing_more_than_is_left_is_not_admitted() {
        let t0 = Instant::now();
        let mut book = holding(3, t0);
        assert!(matches!(book.admit("k", 4, true, t0).0, Admit::Wait));
        assert_eq!(book.room("k", t0), 3, "nothing taken");
        assert!(matches!(book.admit("k", 3, true, t0).0, Admit::Served(_)));
    }

    #[test]
    fn a_call_no_lease_could_hold_goes_to_the_server_at_once() {
        let t0 = Instant::now();
        let mut book = holding(3, t0);
        // The cap is 50 (half the limit of 100).
        assert_eq!(book.admit("k", 51, true, t0), (Admit::NotLeased, false));
        // A costly call that a lease could hold makes the next ask at least that big.
        assert!(matches!(book.admit("k", 40, true, t0).0, Admit::Wait));
        let asks = book.take_batch(true, 1000, t0);
        assert!(asks[0].want >= 40, "{}", asks[0].want);
    }

    #[test]
    fn nothing_is_admitted_past_the_end_of_a_lease_and_it_is_settled() {
        let t0 = Instant::now();
        let mut book = holding(10, t0);
        assert!(matches!(book.admit("k", 1, true, t0).0, Admit::Served(_)));
        let late = t0 + LIFE;
        assert!(!matches!(
            book.admit("k", 1, true, late).0,
            Admit::Served(_)
        ));
        // The expired lease goes back with the next call: 1 of 10 used.
        let asks = book.take_batch(true, 1000, late);
        let settled: Vec<_> = asks.iter().filter_map(|a| a.settle.as_ref()).collect();
        assert_eq!(settled.len(), 1);
        assert_eq!((settled[0].granted, settled[0].used), (10, 1));
        assert_eq!(settled[0].limits, vec![rpm(100)]);
        assert_eq!(settled[0].counted_at_micros, 1_800_000_002_000_000);
        assert_eq!(settled[0].lease_id, 7, "the grant is named by its id");
    }

    #[test]
    fn a_pooled_lease_settles_the_keys_own_windows_and_repeats_each_pools_part() {
        let t0 = Instant::now();
        let mut book = LeaseBook::default();
        assert!(book.want("k", KeyHash::of("secret"), 5, t0));
        let asks = book.take_batch(true, 1000, t0);
        let mut g = grant("k", 4, 96);
        let mut team = g.rate_limit.as_ref().unwrap().windows[0];
        team.scope = proto::LimitScope::Team as i32;
        team.limit = Some(rpm(10));
        g.rate_limit.as_mut().unwrap().windows.push(team);
        let part = proto::PoolLease {
            counter: "team ws t".into(),
            granted: 4,
            counted_at_micros: 1_800_000_002_000_001,
            lease_id: 9,
            limits: vec![rpm(10)],
        };
        g.pools = vec![part.clone()];
        book.install(true, t0, &asks, &[g]);
        assert!(matches!(book.admit("k", 1, true, t0).0, Admit::Served(_)));
        book.drop_key("k");
        let asks = book.take_batch(true, 1000, t0);
        let settle = asks[0].settle.as_ref().unwrap();
        assert_eq!((settle.granted, settle.used), (4, 1));
        assert_eq!(settle.limits, vec![rpm(100)], "the key's own windows only");
        assert_eq!(settle.pools, vec![part], "the team's part, unchanged");
    }

    #[test]
    fn the_sweep_settles_an_expired_lease_nobody_calls_for() {
        let t0 = Instant::now();
        let mut book = holding(10, t0);
        assert!(book.take_batch(true, 1000, t0 + LIFE / 2).is_empty());
        let asks = book.take_batch(true, 1000, t0 + LIFE);
        assert_eq!(asks.len(), 1);
        assert_eq!(asks[0].want, 0, "a settlement alone");
        assert_eq!(asks[0].settle.as_ref().unwrap().used, 0);
    }

    #[test]
    fn calls_spend_the_cell_without_the_book_and_the_figures_count_down() {
        let t0 = Instant::now();
        let mut book = holding(3, t0);
        let cell = book.cell("k", KeyHash::of("secret"), 50, t0);
        for left in [98, 97, 96] {
            let (admitted, _) = cell.admit(1, t0).expect("room in the lease");
            assert_eq!(admitted.figures().remaining, left);
        }
        assert!(cell.admit(1, t0).is_none(), "spent: the book's way");
        assert!(cell.admit(1, t0 + LIFE).is_none(), "ended: the book's way");
        assert_eq!(book.room("k", t0), 0);
    }

    #[test]
    fn a_cell_running_low_asks_ahead_once() {
        let t0 = Instant::now();
        let mut book = holding(10, t0);
        let cell = book.cell("k", KeyHash::of("secret"), 50, t0);
        // Ten calls within a tenth of the life: the rate seen would spend a new lease
        // long before it ends.
        let asks: Vec<bool> = (0..9).map(|_| cell.admit(1, t0).unwrap().1).collect();
        assert!(asks.iter().any(|a| *a), "{asks:?}");
        assert!(book.ask_ahead("k", t0));
        assert!(!cell.admit(1, t0).unwrap().1, "an ask is on its way");
        assert!(!book.ask_ahead("k", t0));
        let batch = book.take_batch(true, 1000, t0);
        assert_eq!(batch.len(), 1);
        assert!(batch[0].want > 0);
    }

    /// A book holding a lease of 20 000 for key "k" (of a limit of 100 000), granted at
    /// `t0`, and its cell: room for threads to race.
    fn large_lease(t0: Instant) -> (LeaseBook, Arc<LeaseCell>) {
        let mut book = LeaseBook::default();
        assert!(book.want("k", KeyHash::of("secret"), 50_000, t0));
        let asks = book.take_batch(true, 1000, t0);
        let mut g = grant("k", 20_000, 0);
        g.rate_limit = Some(decision(100_000, 79_999));
        book.install(true, t0, &asks, &[g]);
        let cell = book.cell("k", KeyHash::of("secret"), 50_000, t0);
        (book, cell)
    }

    /// Calls spending a cell on other threads while the book gives the lease up: each
    /// call is either in the settlement's `used` or not admitted, never both or neither.
    #[test]
    fn a_lease_given_up_while_calls_spend_it_settles_exactly_what_was_admitted() {
        let mut raced = 0;
        for _ in 0..50 {
            let t0 = Instant::now();
            let (mut book, cell) = large_lease(t0);
            let start = std::sync::Barrier::new(3);
            let admitted = std::thread::scope(|scope| {
                let spenders: Vec<_> = (0..2)
                    .map(|_| {
                        let (cell, start) = (&cell, &start);
                        scope.spawn(move || {
                            start.wait();
                            let mut n = 0u64;
                            while cell.admit(1, t0).is_some() {
                                n += 1;
                            }
                            n
                        })
                    })
                    .collect();
                start.wait();
                std::thread::yield_now();
                book.drop_key("k");
                spenders.into_iter().map(|s| s.join().unwrap()).sum::<u64>()
            });
            let asks = book.take_batch(true, 1000, t0);
            let settle = asks[0].settle.as_ref().unwrap();
            assert_eq!(settle.used, admitted);
            assert!(cell.admit(1, t0).is_none());
            raced += usize::from(admitted > 0 && admitted < 20_000);
        }
        // The lease was given up while calls were spending it, not only before or after.
        assert!(raced > 0);
    }

    /// A thread's calls through its reserve: `remaining` as the cell's own calls count it.
    fn reserved(cell: &LeaseCell, reserve: &mut Option<Reserve>, now: Instant) -> Option<u64> {
        cell.admit_reserved(reserve, 1, now, |f| f.figures().remaining)
            .map(|(remaining, _)| remaining)
    }

    #[test]
    fn a_reserve_counts_the_figures_down_as_the_cell_does_and_takes_ahead_in_one_write() {
        let t0 = Instant::now();
        let mut book = holding(40, t0);
        let cell = book.cell("k", KeyHash::of("secret"), 50, t0);
        let mut reserve = None;
        // Granted 40 of the 99 the server had left: 98, 97, ... as calls are admitted.
        assert_eq!(reserved(&cell, &mut reserve, t0), Some(98));
        // The first call took its own request and a sixteenth of the 39 after it.
        assert_eq!(book.room("k", t0), 40 - 1 - 39 / RESERVE_SHARE);
        for left in (59..98).rev() {
            assert_eq!(reserved(&cell, &mut reserve, t0), Some(left), "{left}");
        }
        assert_eq!(book.room("k", t0), 0);
        assert_eq!(reserved(&cell, &mut reserve, t0), None, "all 40 admitted");
    }

    #[test]
    fn a_reserve_ends_with_its_lease_and_is_counted_as_used_when_it_is_given_up() {
        let t0 = Instant::now();
        let mut book = holding(40, t0);
        let cell = book.cell("k", KeyHash::of("secret"), 50, t0);
        let mut reserve = None;
        assert!(reserved(&cell, &mut reserve, t0).is_some());
        let taken = 39 / RESERVE_SHARE;
        assert!(
            reserve.as_ref().is_some_and(|r| r.left == taken),
            "a reserve taken"
        );
        assert_eq!(
            reserved(&cell, &mut reserve, t0 + LIFE),
            None,
            "past the end"
        );
        book.drop_key("k");
        let asks = book.take_batch(true, 1000, t0);
        let settle = asks[0].settle.as_ref().unwrap();
        // One call admitted, and the reserve it took counted with it: a call the reserve
        // admits after the give-up (before its front is emptied) is counted already.
        assert_eq!((settle.granted, settle.used), (40, 1 + taken));
        let mut after = 0;
        while reserved(&cell, &mut reserve, t0).is_some() {
            after += 1;
        }
        assert_eq!(after, taken, "the reserve alone, nothing more of the lease");
    }

    /// Threads each spending the cell through their own reserve while the book gives the
    /// lease up: never more admitted than the settlement counts as used, and no more than
    /// a reserve per thread counted and not admitted.
    #[test]
    fn reserves_never_admit_past_the_grant_and_strand_at_most_one_reserve_a_thread() {
        const THREADS: u64 = 3;
        for round in 0..30 {
            let t0 = Instant::now();
            let (mut book, cell) = large_lease(t0);
            let start = std::sync::Barrier::new(THREADS as usize + 1);
            let admitted = std::thread::scope(|scope| {
                let spenders: Vec<_> = (0..THREADS)
                    .map(|_| {
                        let (cell, start) = (&cell, &start);
                        scope.spawn(move || {
                            let mut reserve = None;
                            start.wait();
                            let mut n = 0u64;
                            while reserved(cell, &mut reserve, t0).is_some() {
                                n += 1;
                            }
                            n
                        })
                    })
                    .collect();
                start.wait();
                // Half the rounds give the lease up while it is spent, half let it run dry.
                if round % 2 == 0 {
                    std::thread::yield_now();
                    book.drop_key("k");
                }
                spenders.into_iter().map(|s| s.join().unwrap()).sum::<u64>()
            });
            if round % 2 == 1 {
                assert_eq!(admitted, 20_000, "run dry: every request admitted");
                book.drop_key("k");
            }
            let asks = book.take_batch(true, 1000, t0);
            let settle = asks[0].settle.as_ref().unwrap();
            assert!(admitted <= settle.used, "{admitted} > {}", settle.used);
            assert!(
                settle.used - admitted <= THREADS * MAX_RESERVE,
                "{} stranded",
                settle.used - admitted
            );
        }
    }

    #[test]
    fn an_event_drops_the_lease_and_settles_what_it_did_not_use() {
        let t0 = Instant::now();
        let mut book = holding(10, t0);
        for _ in 0..4 {
            assert!(matches!(book.admit("k", 1, true, t0).0, Admit::Served(_)));
        }
        book.drop_key("k");
        assert_eq!(book.admit("k", 1, true, t0).0, Admit::NotLeased);
        let asks = book.take_batch(true, 1000, t0);
        assert_eq!(asks.len(), 1);
        let settle = asks[0].settle.as_ref().unwrap();
        assert_eq!((asks[0].want, settle.granted, settle.used), (0, 10, 4));
    }

    #[test]
    fn a_grant_that_raced_an_event_is_given_back_unused() {
        let t0 = Instant::now();
        let mut book = LeaseBook::default();
        assert!(book.want("k", KeyHash::of("secret"), 50, t0));
        let asks = book.take_batch(true, 1000, t0);
        // The event the grant raced (its generation check fails at install).
        book.drop_key("k");
        book.install(false, t0, &asks, &[grant("k", 7, 92)]);
        assert_eq!(book.admit("k", 1, true, t0).0, Admit::NotLeased);
        let asks = book.take_batch(true, 1000, t0);
        let settle = asks[0].settle.as_ref().unwrap();
        assert_eq!((asks[0].want, settle.granted, settle.used), (0, 7, 0));
    }

    #[test]
    fn a_refill_replaces_the_lease_and_settles_the_old_one() {
        let t0 = Instant::now();
        let mut book = holding(4, t0);
        // Fast use: the refill is asked ahead.
        let mut queued = false;
        for _ in 0..3 {
            let (admit, q) = book.admit("k", 1, true, t0);
            assert!(matches!(admit, Admit::Served(_)));
            queued |= q;
        }
        assert!(queued, "asked ahead");
        let asks = book.take_batch(true, 1000, t0);
        assert_eq!(asks.len(), 1);
        assert!(asks[0].want >= 1 && asks[0].want <= 50, "{}", asks[0].want);
        // Server: 1 + 4 counted before, 10 granted now.
        book.install(true, t0, &asks, &[grant("k", 10, 85)]);
        match book.admit("k", 1, true, t0).0 {
            // 1 by the server, 3 + 1 from leases: 96 left, the old lease's unused one
            // counted as given back.
            Admit::Served(a) => assert_eq!(a.decision().remaining, 95),
            other => panic!("{other:?}"),
        }
        let asks = book.take_batch(true, 1000, t0);
        let settle = asks[0].settle.as_ref().unwrap();
        assert_eq!((settle.granted, settle.used), (4, 3));
    }

    #[test]
    fn a_refusal_stops_asking_until_the_call_could_pass() {
        let t0 = Instant::now();
        let mut book = LeaseBook::default();
        assert!(book.want("k", KeyHash::of("secret"), 50, t0));
        let asks = book.take_batch(true, 1000, t0);
        let mut refused = grant("k", 0, 0);
        refused.code = proto::VerifyCode::RateLimited as i32;
        refused.rate_limit.as_mut().unwrap().retry_after = Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        });
        book.install(true, t0, &asks, &[refused]);
        assert_eq!(book.admit("k", 1, true, t0).0, Admit::NotLeased);
        assert!(book.take_batch(true, 1000, t0).is_empty());
        assert!(!book.want("k", KeyHash::of("secret"), 50, t0));
        assert!(book.want("k", KeyHash::of("secret"), 50, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn while_the_cache_is_not_in_use_only_settlements_are_sent() {
        let t0 = Instant::now();
        let mut book = holding(5, t0);
        assert!(book.want("other", KeyHash::of("other"), 50, t0));
        book.drop_all();
        let asks = book.take_batch(false, 1000, t0);
        assert_eq!(asks.len(), 1);
        assert_eq!(asks[0].want, 0);
        assert_eq!(book.admit("k", 1, true, t0).0, Admit::NotLeased);
    }

    #[test]
    fn token_windows_are_not_leased() {
        let mut d = decision(100, 50);
        assert_eq!(lease_cap(&d), Some(50));
        d.windows.push(proto::RateLimitWindowState {
            limit: Some(proto::RateLimit {
                unit: proto::RateLimitUnit::Tokens as i32,
                window: proto::RateLimitWindow::Minute as i32,
                limit: 1000,
            }),
            ..Default::default()
        });
        assert_eq!(lease_cap(&d), None);
        assert_eq!(lease_cap(&proto::RateLimitDecision::default()), None);
    }

    #[test]
    fn a_pool_window_caps_the_lease_like_the_keys_own() {
        let mut d = decision(100, 50);
        assert_eq!(lease_cap(&d), Some(50));
        let mut team = d.windows[0];
        team.scope = proto::LimitScope::Team as i32;
        if let Some(l) = team.limit.as_mut() {
            l.limit = 10;
        }
        d.windows.push(team);
        assert_eq!(
            lease_cap(&d),
            Some(5),
            "the team's tighter limit caps the ask"
        );
    }
}
