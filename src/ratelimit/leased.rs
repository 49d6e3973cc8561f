//! A holder of quota leases: decides rate limits locally from leases granted by a shared
//! authority (Redis for replicas), asking the authority once per lease instead of once per
//! call.
//!
//! Per key it holds at most one lease: a number of requests it may admit, until a
//! deadline it times itself from when it *asked* (on the monotonic clock, so the lease
//! ends here no later than the authority counted it; see [`crate::domain::lease`]). A call
//! that finds room in the lease is decided with no IO. The first call to a key, or one
//! that finds the lease spent or expired, asks the authority and waits; before that
//! happens to a key in use, a background refill asks ahead (when what is left covers less
//! than half a lease's worth of calls at the key's observed rate, or a third of the life
//! is left), so a key in steady use never waits.
//!
//! Lease sizes follow each key's observed demand here: the calls of the lease just used
//! over its time, times the lease life and a margin, capped at half of the tightest
//! request limit (so one holder never takes everything while others ask). A key seen once
//! a minute gets a lease of one or two calls; a hot key a bigger one. What a lease did not
//! use goes back to the authority when it ends: on expiry (a sweeper settles expired
//! leases), when a refill replaces it, or when the key's limits change (an UpdateKey: the
//! verifier's cache is refilled with the new limits, and a lease for other limits is
//! settled and not used again).
//!
//! A refusal is remembered until the authority says the call could pass (`retry_at`), at
//! most one lease life, so a refused key does not cost an authority call per call.
//!
//! When the authority cannot be reached, calls keep being admitted from the lease held
//! until it runs out; then the authority's failure mode answers (`None`: open, an error:
//! closed). A settle that failed is kept and tried again by the sweeper; the authority
//! applies a grant's settle once (it registers grants by id), so a retry after a lost
//! answer counts nothing twice, and until then the lease stays counted: never an
//! over-admission.
//!
//! Budgets go through the same holder as **allowances of spend** ([`SpendGrant`]):
//! spend is known only after a call, so a holder admits a budgeted key's calls while less
//! than its allowance has been reported to it (ReportUsage at this replica), asks ahead
//! for the next (half reported, or a third of the life left), and settles what was
//! reported, all of it, when the allowance ends or is spent. A spent allowance is settled
//! before the next is asked for, so what calls in flight ran past it counts in the next
//! grant: a budget is overrun only by the calls in flight when an allowance ran out.
//!
//! The figures a call is answered with are the grant's, less what this holder used
//! since: `remaining` is what the authority had left after the grant plus what is left of
//! the lease, so `X-RateLimit-Remaining` counts down here and is true within the lease.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use quick_cache::UnitWeighter;
use quick_cache::sync::Cache;
use tokio::time::Instant;

use super::{BackendStats, Budget, BudgetCheck, Counter, LimiterError, RateLimiter, Reported};
use crate::domain::Micros;
use crate::domain::lease::{Amounts, Grant, MAX_LEASE};
use crate::domain::limits::{LimitDecision, LimitUnit, RateLimit, has_token_window};
use crate::domain::pools;

/// A lease as the authority recorded it: what a settle must name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    pub granted: u64,
    /// Tokens granted with it (its allowance of tokens).
    pub tokens: u64,
    pub counted_at: Micros,
    /// [`Grant::id`]: 0 settles without the authority's once-only check.
    pub id: u64,
}

impl From<&Grant> for LeaseRecord {
    /// What a settlement of `grant` names.
    fn from(grant: &Grant) -> Self {
        LeaseRecord {
            granted: grant.amount,
            tokens: grant.tokens,
            counted_at: grant.counted_at,
            id: grant.id,
        }
    }
}

/// A name for a grant, which its settlement repeats: 64 random bits, unique among a key's
/// grants in practice, never 0 (0 only when no randomness could be had: such a grant
/// cannot be settled and is freed by time, never an over-admission).
pub fn new_grant_id() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0;
    }
    u64::from_le_bytes(b).max(1)
}

/// A lease asked for: as [`QuotaAuthority::grant`] takes it.
#[derive(Clone, Debug)]
pub struct GrantAsk {
    pub key_id: String,
    pub limits: Vec<RateLimit>,
    pub want: Amounts,
    pub min: u64,
    pub life: Micros,
    pub now: Micros,
}

/// A lease to give back: the key, the limits it was granted against, its record and
/// what of it was used, at `now`.
#[derive(Clone, Debug)]
pub struct Settle {
    pub key_id: String,
    pub limits: Vec<RateLimit>,
    pub record: LeaseRecord,
    pub used: Amounts,
    pub now: Micros,
}

/// An allowance of spend: how much may be reported to a holder for a key before it
/// asks again. Spend is known only after a call, so a holder admits calls while less
/// than the allowance has been reported to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpendGrant {
    pub amount: u64,
    /// The spend epoch it was granted in: its settlement counts there.
    pub epoch: Micros,
    /// As [`Grant::id`]: the settlement names it, and applies once.
    pub id: u64,
}

/// Where leases come from: the counters every holder of a key shares.
#[async_trait]
pub trait QuotaAuthority: Send + Sync + 'static {
    /// Grants up to `want.requests` requests of `limits` (at least `min`, or none), and up
    /// to `want.tokens` tokens of its token windows, for a holder that admits from it for
    /// at most `life`. `Ok(None)`: the authority cannot be reached and fails open.
    async fn grant(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        want: Amounts,
        min: u64,
        life: Micros,
        now: Micros,
    ) -> Result<Option<Grant>, LimiterError>;

    /// Gives back what a lease did not use: `used.requests` of `lease.granted` were
    /// admitted, and `used.tokens` reported (all of which count).
    async fn settle(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        lease: LeaseRecord,
        used: Amounts,
        now: Micros,
    ) -> Result<(), LimiterError>;

    /// Several grants at once, in one round trip where the authority can: each as
    /// [`QuotaAuthority::grant`] would make it, answered in the same order.
    async fn grant_many(&self, asks: &[GrantAsk]) -> Vec<Result<Option<Grant>, LimiterError>> {
        let mut answers = Vec::with_capacity(asks.len());
        for a in asks {
            answers.push(
                self.grant(&a.key_id, &a.limits, a.want, a.min, a.life, a.now)
                    .await,
            );
        }
        answers
    }

    /// Several settlements at once, in one round trip where the authority can: each as
    /// [`QuotaAuthority::settle`] would apply it. An error may leave some applied: a
    /// settlement applies once, so the caller sends them all again.
    async fn settle_many(&self, batch: &[Settle]) -> Result<(), LimiterError> {
        let mut outcome = Ok(());
        for s in batch {
            if let Err(e) = self
                .settle(&s.key_id, &s.limits, s.record, s.used, s.now)
                .await
            {
                outcome = Err(e);
            }
        }
        outcome
    }

    /// Counts usage reported to a holder that holds no allowance for it.
    async fn record_usage(
        &self,
        key_id: &str,
        usage: Reported,
        now: Micros,
    ) -> Result<(), LimiterError>;

    /// Grants up to `want` micro-units of what is left of `budget`: its ceiling less the
    /// spend every holder has counted and the allowances outstanding. A refusal is an
    /// amount of 0. `Ok(None)`: this authority keeps no shared spend (the holder's usage
    /// book alone judges), or it cannot be reached and fails open.
    async fn grant_spend(
        &self,
        _key_id: &str,
        _budget: Budget,
        _want: u64,
        _now: Micros,
    ) -> Result<Option<SpendGrant>, LimiterError> {
        Ok(None)
    }

    /// Ends an allowance: `used` micro-units were reported to its holder, all of which
    /// count (also what ran past the allowance: calls in flight when it ran out).
    async fn settle_spend(
        &self,
        _key_id: &str,
        _grant: SpendGrant,
        _used: u64,
    ) -> Result<(), LimiterError> {
        Ok(())
    }

    fn backend_stats(&self) -> BackendStats {
        BackendStats::default()
    }
}

#[derive(Clone, Copy, Debug)]
pub struct LeaseSettings {
    /// How long a holder admits from one lease.
    pub life: Duration,
    /// Keys whose lease state is kept at most.
    pub max_keys: u64,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            life: Duration::from_secs(2),
            max_keys: 1_000_000,
        }
    }
}

/// The lease held for one key.
struct Lease {
    record: LeaseRecord,
    used: u64,
    /// Tokens reported to this holder since the grant.
    tokens_used: u64,
    asked_at: Instant,
    /// When this holder stops admitting from it (asked_at + life).
    ends: Instant,
    /// The grant's view of the limits, with the grant counted as used.
    decision: LimitDecision,
}

#[derive(Default)]
struct Slot {
    /// The limits the lease (and a remembered refusal) was granted against.
    limits: Vec<RateLimit>,
    lease: Option<Lease>,
    /// A refusal, answered again until then.
    refused: Option<(Instant, LimitDecision)>,
    /// A refill is on its way (or a first grant): one at a time per key.
    asking: bool,
    /// Calls wanted since the current lease was asked for (admitted or not).
    demand: u64,
    /// Tokens reported since the current lease was asked for.
    tokens_reported: u64,
    /// The budget (its ceiling and spend epoch) the spend allowance was granted against.
    budget: Option<(u64, Micros)>,
    spend: Option<Allowance>,
    /// A refused allowance: BUDGET_EXCEEDED until then.
    spend_refused: Option<Instant>,
    spend_asking: bool,
}

impl Slot {
    /// Nothing held, asked for or remembered at `at`: the slot can go (a call makes a
    /// new one).
    fn holds_nothing(&self, at: Instant) -> bool {
        self.lease.is_none()
            && self.spend.is_none()
            && !self.asking
            && !self.spend_asking
            && self.refused.as_ref().is_none_or(|(until, _)| *until <= at)
            && self.spend_refused.is_none_or(|until| until <= at)
    }
}

/// The spend allowance held for one key.
struct Allowance {
    grant: SpendGrant,
    /// Spend reported to this holder since the grant.
    used: u64,
    asked_at: Instant,
    ends: Instant,
}

/// A lease to give back: the limits it was granted against, its record, its use.
type ToSettle = (Vec<RateLimit>, LeaseRecord, Amounts);

/// A settle that failed, kept to be tried again.
struct Unsettled {
    what: Settlement,
    since: Instant,
}

enum Settlement {
    Requests(Settle),
    Spend {
        key_id: String,
        grant: SpendGrant,
        used: u64,
    },
}

/// Failed settles kept at most; past it a lease stays counted until it leaves its window.
const MAX_UNSETTLED: usize = 100_000;
/// How long a failed settle is tried again (the authority registers a grant for longer).
const RETRY_SETTLES_FOR: Duration = Duration::from_secs(300);
/// How long an ask ahead, or a replaced lease's settlement, waits for others to go with
/// it: one round trip to the authority for all the keys that asked ahead meanwhile, and
/// one for all the leases replaced. An ask ahead is made while the key's lease still
/// has room (a third of its life, or half of its calls, at the least), so no call waits
/// for it; what a replaced lease did not use is free again that much later. Nothing is
/// admitted twice either way.
const GATHER: Duration = Duration::from_millis(5);

pub struct LeasedLimiter {
    authority: Arc<dyn QuotaAuthority>,
    unsettled: Mutex<Vec<Unsettled>>,
    /// Asks ahead waiting to be sent together (see [`GATHER`]), with when each was
    /// made (its lease's life counts from then).
    asking_ahead: std::sync::Mutex<Vec<(GrantAsk, Instant)>>,
    /// Replaced leases waiting to be settled together (see [`GATHER`]).
    settling: std::sync::Mutex<Vec<Settle>>,
    gathered: Arc<tokio::sync::Notify>,
    settings: LeaseSettings,
    /// Bounded by `max_keys`; a slot holding nothing is dropped by the sweeper.
    slots: Cache<String, Arc<Mutex<Slot>>, UnitWeighter, crate::cache::Hasher>,
}

fn lock(m: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LeasedLimiter {
    /// Starts the sweeper that settles expired leases (it stops when the limiter is
    /// dropped). Must be called within a Tokio runtime.
    pub fn new(
        authority: Arc<dyn QuotaAuthority>,
        settings: LeaseSettings,
        clock: crate::clock::Clock,
    ) -> Arc<Self> {
        let gathered = Arc::new(tokio::sync::Notify::new());
        let limiter = Arc::new(LeasedLimiter {
            authority,
            unsettled: Mutex::new(Vec::new()),
            asking_ahead: std::sync::Mutex::new(Vec::new()),
            settling: std::sync::Mutex::new(Vec::new()),
            gathered: gathered.clone(),
            settings,
            slots: crate::cache::bounded(settings.max_keys, UnitWeighter),
        });
        tokio::spawn(sweep(Arc::downgrade(&limiter), clock));
        tokio::spawn(send_gathered(Arc::downgrade(&limiter), gathered));
        limiter
    }

    fn slot(&self, key_id: &str) -> Arc<Mutex<Slot>> {
        crate::cache::get_or_default(&self.slots, key_id)
    }

    /// What to ask for: the calls (and tokens) seen over the last lease, scaled to a
    /// lease's life with a margin, plus `cost`; capped at half the tightest limit. Tokens
    /// at least a thousandth of the tightest token limit, none without a token window.
    fn want(&self, limits: &[RateLimit], s: &Slot, since: Option<Instant>, cost: u64) -> Amounts {
        let expected = |seen: u64, first: u64| since.map_or(first, |at| self.expected(seen, at));
        let tightest = |unit| {
            limits
                .iter()
                .filter(|l| l.unit == unit)
                .map(|l| l.limit)
                .min()
        };
        let cap = tightest(LimitUnit::Requests).map_or(MAX_LEASE, |l| (l / 2).max(1));
        let requests = expected(s.demand, 1)
            .min(cap)
            .max(1)
            .saturating_add(cost)
            .min(MAX_LEASE);
        let tokens = tightest(LimitUnit::Tokens).map_or(0, |l| {
            let floor = (l / 1000).max(1);
            expected(s.tokens_reported, floor)
                .max(floor)
                .min((l / 2).max(1))
        });
        Amounts { requests, tokens }
    }

    /// What `seen` (calls, tokens or spend since `since`) comes to over one lease life at
    /// the same rate (the time since counted as at least a twentieth of a life).
    fn per_life(&self, seen: u64, since: Instant) -> f64 {
        let life = self.settings.life.as_secs_f64();
        let elapsed = since.elapsed().as_secs_f64().max(life / 20.0);
        seen as f64 / elapsed * life
    }

    /// What to ask for, having seen `seen` since `since`: a lease life's worth, and half
    /// again as margin.
    fn expected(&self, seen: u64, since: Instant) -> u64 {
        (self.per_life(seen, since) * 1.5).ceil() as u64
    }

    /// Settles `lease` in the background, with the others replaced within [`GATHER`].
    fn settle_later(&self, key_id: &str, (limits, record, used): ToSettle, now: Micros) {
        let settle = Settle {
            key_id: key_id.to_owned(),
            limits,
            record,
            used,
            now,
        };
        self.settling
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(settle);
        self.gathered.notify_one();
    }

    /// Asks for a lease ahead of need, in the background, with the others asked ahead
    /// within [`GATHER`]. The key's slot is `asking` until the answer is in.
    fn ask_later(&self, key_id: &str, limits: &[RateLimit], want: Amounts, now: Micros) {
        let ask = GrantAsk {
            key_id: key_id.to_owned(),
            limits: limits.to_vec(),
            want,
            min: 1,
            life: crate::domain::micros_in(self.settings.life),
            now,
        };
        self.asking_ahead
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((ask, Instant::now()));
        self.gathered.notify_one();
    }

    /// Sends the asks ahead gathered, in one round trip, and installs each answer (a
    /// lease it replaces is settled with the others).
    async fn send_asks(&self, asks: Vec<(GrantAsk, Instant)>) {
        if asks.is_empty() {
            return;
        }
        let (asks, asked_at): (Vec<GrantAsk>, Vec<Instant>) = asks.into_iter().unzip();
        let answers = self.authority.grant_many(&asks).await;
        for ((ask, asked_at), answer) in asks.iter().zip(asked_at).zip(answers) {
            match answer {
                Ok(Some(grant)) => {
                    let (_, to_settle) =
                        self.install(&ask.key_id, &ask.limits, grant, 0, asked_at, ask.now);
                    if let Some(to_settle) = to_settle {
                        self.settle_later(&ask.key_id, to_settle, ask.now);
                    }
                }
                Ok(None) | Err(_) => {
                    // The lease held is used until it ends; then a call asks again.
                    lock(&self.slot(&ask.key_id)).asking = false;
                }
            }
        }
    }

    async fn settle(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        record: LeaseRecord,
        used: Amounts,
        now: Micros,
    ) {
        let settle = Settle {
            key_id: key_id.to_owned(),
            limits: limits.to_vec(),
            record,
            used,
            now,
        };
        self.send_settlements(vec![settle], Instant::now()).await;
    }

    async fn settle_spend(&self, key_id: &str, held: &Allowance) {
        let what = Settlement::Spend {
            key_id: key_id.to_owned(),
            grant: held.grant,
            used: held.used,
        };
        self.send_settlement(what, Instant::now()).await;
    }

    /// Sends settlements of leases, in one round trip; those that fail are kept and
    /// tried again by the sweeper (a settlement applies once, whatever the retries).
    /// Meanwhile the leases stay counted: never an over-admission.
    async fn send_settlements(&self, batch: Vec<Settle>, since: Instant) {
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.authority.settle_many(&batch).await {
            tracing::debug!(error = %e, "settling quota leases failed; retried later");
            self.keep_unsettled(batch.into_iter().map(Settlement::Requests), since);
        }
    }

    /// Sends a settlement of a spend allowance; one that fails is kept and tried again.
    async fn send_settlement(&self, what: Settlement, since: Instant) {
        let sent = match &what {
            Settlement::Requests(s) => self.authority.settle_many(std::slice::from_ref(s)).await,
            Settlement::Spend {
                key_id,
                grant,
                used,
            } => self.authority.settle_spend(key_id, *grant, *used).await,
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, "settling a quota lease failed; retried later");
            self.keep_unsettled(std::iter::once(what), since);
        }
    }

    fn keep_unsettled(&self, what: impl Iterator<Item = Settlement>, since: Instant) {
        let mut unsettled = self
            .unsettled
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let room = MAX_UNSETTLED.saturating_sub(unsettled.len());
        unsettled.extend(what.take(room).map(|what| Unsettled { what, since }));
    }

    /// Tries the settles that failed again (those younger than [`RETRY_SETTLES_FOR`]):
    /// the leases' together, each allowance's on its own.
    async fn retry_settles(&self) {
        let pending = std::mem::take(
            &mut *self
                .unsettled
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let mut leases = Vec::new();
        for u in pending {
            if u.since.elapsed() >= RETRY_SETTLES_FOR {
                continue;
            }
            match u.what {
                Settlement::Requests(s) => leases.push((s, u.since)),
                spend => self.send_settlement(spend, u.since).await,
            }
        }
        // The oldest's age is kept for them all: never tried for longer than it.
        let since = leases.iter().map(|(_, at)| *at).min();
        if let Some(since) = since {
            let batch = leases.into_iter().map(|(s, _)| s).collect();
            self.send_settlements(batch, since).await;
        }
    }

    /// Asks for a new lease for `key_id` and installs it; settles the one it replaces.
    /// `cost`: a call waiting for it, admitted from it when it arrives. The lease's life
    /// is timed from before the ask, so it ends here no later than the authority counts
    /// it.
    async fn ask(
        self: &Arc<Self>,
        key_id: &str,
        limits: &[RateLimit],
        want: Amounts,
        cost: u64,
        now: Micros,
    ) -> Result<Option<(LimitDecision, u64)>, LimiterError> {
        let asked_at = Instant::now();
        let life = crate::domain::micros_in(self.settings.life);
        let answer = self
            .authority
            .grant(key_id, limits, want, cost.max(1), life, now)
            .await;
        let grant = match answer {
            Ok(Some(grant)) => grant,
            Ok(None) | Err(_) => {
                lock(&self.slot(key_id)).asking = false;
                // `None` fails open: admitted, no decision, nothing held.
                return answer.map(|_| None);
            }
        };
        let (answer, to_settle) = self.install(key_id, limits, grant, cost, asked_at, now);
        // Off the call's path: the lease it replaces is given back in the background.
        if let Some(to_settle) = to_settle {
            self.settle_later(key_id, to_settle, now);
        }
        Ok(Some(answer))
    }

    /// Puts a grant in place under the slot's lock; returns the answer for a call of
    /// `cost` waiting for it with the id of the lease it was counted in (0: none), and
    /// what must be settled (a lease it replaced, or the grant itself when the key's
    /// limits changed meanwhile).
    fn install(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        grant: Grant,
        cost: u64,
        asked_at: Instant,
        now: Micros,
    ) -> ((LimitDecision, u64), Option<ToSettle>) {
        let slot = self.slot(key_id);
        let mut s = lock(&slot);
        s.asking = false;
        let record = LeaseRecord::from(&grant);
        if s.limits.as_slice() != limits {
            // The key's limits changed while this grant was on its way: it is given back
            // unused rather than held against limits no longer the key's.
            let settle = grant
                .granted()
                .then(|| (limits.to_vec(), record, Amounts::default()));
            return ((grant.decision, 0), settle);
        }
        if !grant.granted() {
            let until = grant
                .decision
                .retry_at()
                .map(|at| Duration::from_micros(at.saturating_sub(now).max(0).unsigned_abs()))
                .unwrap_or(self.settings.life)
                .min(self.settings.life);
            s.refused = Some((asked_at + until, grant.decision.clone()));
            return ((grant.decision, 0), None);
        }
        s.refused = None;
        s.demand = 0;
        s.tokens_reported = 0;
        let lease = Lease {
            record,
            used: cost,
            tokens_used: 0,
            asked_at,
            ends: asked_at + self.settings.life,
            decision: grant.decision,
        };
        let answer = (answer_from(&lease), lease.record.id);
        let old = s
            .lease
            .replace(lease)
            .map(|old| (limits.to_vec(), old.record, old.used_amounts()));
        (answer, old)
    }

    /// How much spend to ask for: what was reported over the allowance before, scaled to
    /// a lease's life with a margin; at least a thousandth of the budget (the authority
    /// grants at most half of what is left).
    fn want_spend(&self, budget: Budget, reported: u64, since: Option<Instant>) -> u64 {
        let expected = since.map_or(0, |at| self.expected(reported, at));
        expected.max(budget.max_micros / 1000).max(1)
    }

    /// Asks for a spend allowance for `key_id` and installs it; settles the one it
    /// replaces.
    async fn ask_spend(
        self: &Arc<Self>,
        key_id: &str,
        budget: Budget,
        want: u64,
        now: Micros,
    ) -> Result<BudgetCheck, LimiterError> {
        let asked_at = Instant::now();
        let answer = self.authority.grant_spend(key_id, budget, want, now).await;
        let slot = self.slot(key_id);
        let grant = match answer {
            Ok(Some(grant)) => grant,
            // `None` fails open (or keeps no shared spend): the usage book judged.
            Ok(None) | Err(_) => {
                lock(&slot).spend_asking = false;
                return answer.map(|_| BudgetCheck::Room);
            }
        };
        let check = if grant.amount > 0 {
            BudgetCheck::Room
        } else {
            BudgetCheck::Exceeded
        };
        let held = Allowance {
            grant,
            used: 0,
            asked_at,
            ends: asked_at + self.settings.life,
        };
        let to_settle = {
            let mut s = lock(&slot);
            s.spend_asking = false;
            if s.budget != Some((budget.max_micros, budget.epoch)) {
                // The budget (or its epoch) changed while this grant was on its way: given
                // back unused.
                (grant.amount > 0).then_some(held)
            } else if grant.amount == 0 {
                s.spend_refused = Some(asked_at + self.settings.life);
                None
            } else {
                s.spend_refused = None;
                s.spend.replace(held)
            }
        };
        if let Some(old) = to_settle {
            let (this, key_id) = (self.clone(), key_id.to_owned());
            tokio::spawn(async move { this.settle_spend(&key_id, &old).await });
        }
        Ok(check)
    }

    async fn sweep_once(self: &Arc<Self>, now: Micros) {
        self.retry_settles().await;
        let at = Instant::now();
        let mut expired = Vec::new();
        let mut spent = Vec::new();
        let mut idle = Vec::new();
        for (key_id, slot) in self.slots.iter() {
            let mut s = lock(&slot);
            // Held nothing since the last sweep at least (a lease that ends now leaves
            // its slot, and the demand it saw, until the next one).
            if s.holds_nothing(at) {
                idle.push(key_id.clone());
                continue;
            }
            if s.lease.as_ref().is_some_and(|l| l.ends <= at) {
                let limits = s.limits.clone();
                if let Some(lease) = s.lease.take() {
                    expired.push((key_id.clone(), limits, lease));
                }
            }
            if s.spend.as_ref().is_some_and(|a| a.ends <= at)
                && let Some(held) = s.spend.take()
            {
                spent.push((key_id.clone(), held));
            }
        }
        for key_id in idle {
            // Checked again under the shard's lock: a call may have used it since.
            self.slots
                .remove_if(&key_id, |slot| lock(slot).holds_nothing(at));
        }
        let expired = expired
            .into_iter()
            .map(|(key_id, limits, lease)| Settle {
                key_id,
                limits,
                record: lease.record,
                used: lease.used_amounts(),
                now,
            })
            .collect();
        self.send_settlements(expired, at).await;
        for (key_id, held) in spent {
            self.settle_spend(&key_id, &held).await;
        }
    }
}

impl Lease {
    fn used_amounts(&self) -> Amounts {
        Amounts {
            requests: self.used,
            tokens: self.tokens_used,
        }
    }

    /// Whether a call of `cost` fits: requests left, and the allowance of tokens not all
    /// reported (where the key has token windows).
    fn has_room(&self, cost: u64, tokens: bool) -> bool {
        self.used.saturating_add(cost) <= self.record.granted
            && (!tokens || self.tokens_used < self.record.tokens)
    }
}

/// The decision for a call admitted from `lease`: the grant's figures, with what is left
/// of the lease given back to `remaining`.
fn answer_from(lease: &Lease) -> LimitDecision {
    let unused = lease.record.granted.saturating_sub(lease.used);
    let unused_tokens = lease.record.tokens.saturating_sub(lease.tokens_used);
    let mut d = lease.decision.clone();
    for w in &mut d.windows {
        let back = match w.limit.unit {
            LimitUnit::Requests => unused,
            LimitUnit::Tokens => unused_tokens,
        };
        w.remaining = w.remaining.saturating_add(back).min(w.limit.limit);
        w.used = w.limit.limit - w.remaining;
    }
    d.allowed = true;
    d
}

/// Sends the asks ahead and the settlements gathered meanwhile, each kind together,
/// [`GATHER`] after the first of them; ends when the limiter is dropped.
async fn send_gathered(limiter: Weak<LeasedLimiter>, wake: Arc<tokio::sync::Notify>) {
    loop {
        // Woken by something to send; otherwise looks once a second whether the
        // limiter is still there.
        let woken = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
        if woken.is_ok() {
            tokio::time::sleep(GATHER).await;
        }
        let Some(limiter) = limiter.upgrade() else {
            return;
        };
        let asks = std::mem::take(
            &mut *limiter
                .asking_ahead
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        limiter.send_asks(asks).await;
        let settlements = std::mem::take(
            &mut *limiter
                .settling
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        limiter.send_settlements(settlements, Instant::now()).await;
    }
}

async fn sweep(limiter: Weak<LeasedLimiter>, clock: crate::clock::Clock) {
    let every = match limiter.upgrade() {
        Some(l) => (l.settings.life / 4).max(Duration::from_millis(10)),
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(limiter) = limiter.upgrade() else {
            return;
        };
        limiter.sweep_once(clock.now()).await;
    }
}

/// Lets [`LeasedLimiter`] stand where a [`RateLimiter`] is expected (it needs an `Arc` of
/// itself to refill in the background).
pub struct Leases(pub Arc<LeasedLimiter>);

impl Leases {
    /// Decides a call against one key's (or pool's) lease; with the decision, the id of
    /// the lease the call was counted in (0: none), for [`Leases::untake`].
    async fn take(
        &self,
        key_id: &str,
        limits: &[RateLimit],
        cost: u64,
        now: Micros,
    ) -> Result<Option<(LimitDecision, u64)>, LimiterError> {
        let this = &self.0;
        let at = Instant::now();
        let slot = this.slot(key_id);
        let (want, stale) = {
            let mut s = lock(&slot);
            s.demand = s.demand.saturating_add(cost);
            let mut stale = None;
            if s.limits.as_slice() != limits {
                stale = s.lease.take().map(|l| (s.limits.clone(), l));
                s.refused = None;
                s.limits = limits.to_vec();
            }
            let tokens = has_token_window(limits);
            if let Some(lease) = s.lease.as_mut()
                && at < lease.ends
                && lease.has_room(cost, tokens)
            {
                lease.used += cost;
                let answer = (answer_from(lease), lease.record.id);
                let left = lease.record.granted - lease.used;
                let (asked_at, ends) = (lease.asked_at, lease.ends);
                let tokens_low =
                    tokens && lease.tokens_used.saturating_mul(2) >= lease.record.tokens;
                // Ask ahead while the key is in use, so its calls never wait.
                let soon = left as f64 <= this.per_life(s.demand, asked_at) / 2.0
                    || tokens_low
                    || ends - at <= this.settings.life / 3;
                if soon && !s.asking {
                    s.asking = true;
                    let want = this.want(limits, &s, Some(asked_at), 0);
                    this.ask_later(key_id, limits, want, now);
                }
                return Ok(Some(answer));
            }
            if let Some((until, decision)) = &s.refused
                && at < *until
            {
                return Ok(Some((decision.clone(), 0)));
            }
            let since = s.lease.as_ref().map(|l| l.asked_at);
            s.asking = true;
            let want = this.want(limits, &s, since, cost);
            // A spent or ended lease is settled before the next is asked for: tokens
            // reported past its allowance (calls in flight when it ran out) then count
            // in the next grant, rather than leaving room there that was already used.
            let old = s.lease.take().map(|l| (s.limits.clone(), l));
            (want, stale.or(old))
        };
        // Limits changed (an UpdateKey): the old lease is given back before the new
        // limits are asked for, so the grant sees exactly what was used under the old.
        if let Some((old_limits, old)) = stale {
            this.settle(key_id, &old_limits, old.record, old.used_amounts(), now)
                .await;
        }
        this.ask(key_id, limits, want, cost, now).await
    }

    /// Gives a call's cost back to the lease it was counted in, if that lease is still
    /// the one held: a lease that was replaced meanwhile has been settled with the call
    /// counted, which is never an over-admission, and crediting its successor could be.
    fn untake(&self, key_id: &str, lease_id: u64, cost: u64) {
        if lease_id == 0 {
            return;
        }
        if let Some(slot) = self.0.slots.get(key_id) {
            let mut s = lock(&slot);
            if let Some(lease) = s.lease.as_mut()
                && lease.record.id == lease_id
            {
                lease.used = lease.used.saturating_sub(cost);
            }
        }
    }
}

#[async_trait]
impl RateLimiter for Leases {
    /// Each counter from its own lease, in order; a refusal gives the cost back to the
    /// leases of the counters before it (see [`Leases::untake`]).
    async fn check(
        &self,
        counters: &[Counter<'_>],
        cost: u64,
        now: Micros,
    ) -> Result<Option<LimitDecision>, LimiterError> {
        if let [one] = counters {
            return Ok(self
                .take(one.id, one.limits, cost, now)
                .await?
                .map(|(d, _)| d.scoped(one.scope)));
        }
        let mut parts: Vec<(LimitDecision, u64)> = Vec::with_capacity(counters.len());
        for (i, c) in counters.iter().enumerate() {
            let Some((d, lease_id)) = self.take(c.id, c.limits, cost, now).await? else {
                return Ok(None);
            };
            let refused = !d.allowed;
            parts.push((d.scoped(c.scope), lease_id));
            if refused {
                for (earlier, (d, lease_id)) in counters.iter().zip(parts.iter_mut()).take(i) {
                    self.untake(earlier.id, *lease_id, cost);
                    *d = std::mem::take(d).uncounted(cost);
                }
                break;
            }
        }
        Ok(Some(pools::combine(
            parts.into_iter().map(|(d, _)| d).collect(),
        )))
    }

    fn backend_stats(&self) -> BackendStats {
        self.0.authority.backend_stats()
    }

    /// Spend reported for a key this holder holds an allowance for is counted against it
    /// (and reaches the authority when the allowance is settled); the rest goes to the
    /// authority at once.
    async fn record_usage(
        &self,
        key_id: &str,
        usage: Reported,
        now: Micros,
    ) -> Result<(), LimiterError> {
        let mut rest = usage;
        if let Some(slot) = self.0.slots.get(key_id) {
            let mut s = lock(&slot);
            s.tokens_reported = s.tokens_reported.saturating_add(usage.tokens);
            if let Some(lease) = s.lease.as_mut()
                && lease.record.tokens > 0
            {
                lease.tokens_used = lease.tokens_used.saturating_add(usage.tokens);
                rest.tokens = 0;
            }
            if let Some(held) = s.spend.as_mut()
                && usage.spend_micros > 0
            {
                held.used = held.used.saturating_add(usage.spend_micros);
                rest.spend_micros = 0;
            }
        }
        if rest.tokens == 0 && rest.spend_micros == 0 {
            return Ok(());
        }
        self.0.authority.record_usage(key_id, rest, now).await
    }

    /// Admits while the key's spend allowance has room: spend reported to this holder
    /// since the grant is below it. Asks for more ahead (half of it reported, or a third
    /// of its life left), so a key in steady use never waits.
    async fn check_budget(
        &self,
        key_id: &str,
        budget: Budget,
        now: Micros,
    ) -> Result<BudgetCheck, LimiterError> {
        let this = &self.0;
        let at = Instant::now();
        let slot = this.slot(key_id);
        let (want, stale) = {
            let mut s = lock(&slot);
            let mut stale = None;
            if s.budget != Some((budget.max_micros, budget.epoch)) {
                stale = s.spend.take();
                s.spend_refused = None;
                s.budget = Some((budget.max_micros, budget.epoch));
            }
            if let Some(held) = s.spend.as_ref()
                && at < held.ends
                && held.used < held.grant.amount
            {
                let soon = held.used.saturating_mul(2) >= held.grant.amount
                    || held.ends - at <= this.settings.life / 3;
                if soon && !s.spend_asking {
                    let want = this.want_spend(budget, held.used, Some(held.asked_at));
                    s.spend_asking = true;
                    let (this, key_id) = (this.clone(), key_id.to_owned());
                    tokio::spawn(async move {
                        if let Err(e) = this.ask_spend(&key_id, budget, want, now).await {
                            tracing::debug!(error = %e, "refilling a spend allowance failed");
                        }
                    });
                }
                return Ok(BudgetCheck::Room);
            }
            if let Some(until) = s.spend_refused
                && at < until
            {
                return Ok(BudgetCheck::Exceeded);
            }
            s.spend_asking = true;
            let held = s.spend.as_ref();
            let want =
                this.want_spend(budget, held.map_or(0, |h| h.used), held.map(|h| h.asked_at));
            // A spent or ended allowance is settled before the next is asked for, like
            // one granted under a budget that changed (an UpdateKey): what was reported
            // past it (calls in flight when it ran out) then counts in the next grant,
            // rather than leaving room there that was already spent.
            (want, stale.or_else(|| s.spend.take()))
        };
        if let Some(old) = stale {
            this.settle_spend(key_id, &old).await;
        }
        this.ask_spend(key_id, budget, want, now).await
    }
}
