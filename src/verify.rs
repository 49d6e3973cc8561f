//! The VerifyKey hot path.
//!
//! parse + checksum (no IO) → SHA-256 → cache lookup → decision → budget → rate limits →
//! note the use. A miss costs one indexed query by hash; a hash that matches nothing goes
//! to the negative cache. No lock is held across an await, and nothing is written to the
//! database on the way (the use is noted in the usage book, written in batches).
//!
//! A replica that has not read the event log within its freshness bound answers
//! [`VerifyError::Stale`] (UNAVAILABLE) for any well-formed key: its cache may hold a key
//! revoked elsewhere meanwhile.

use std::sync::Arc;

use crate::cache::{CachedKey, Lookup, VerifyCache};
use crate::clock::Clock;
use crate::domain::Micros;
use crate::domain::budget::SpendEpoch;
use crate::domain::key::{self, VerifiableKey, VerifyCode};
use crate::domain::key_format::{self, Brand, KeyHash};
use crate::domain::lease::{Amounts, Grant};
use crate::domain::limits::{self, LimitDecision, LimitScope, RateLimit, has_token_window};
use crate::domain::pools::{self, Pool};
use crate::domain::scopes::{EffectiveScopes, ScopeImplications};
use crate::domain::workspace::Plans;
use crate::events::EventHub;
use crate::metrics::Metrics;
use crate::ratelimit::leased::{LeaseRecord, QuotaAuthority, Settle};
use crate::ratelimit::{Budget, BudgetCheck, Counter, LimiterError, RateLimiter, Reported};
use crate::store::{Store, StoreError};
use crate::usage::UsageBook;

/// Keys whose pools with token windows or budgets a replica remembers, at most.
const USAGE_POOL_KEYS: u64 = 100_000;

/// The answer to one verification: whether the key passed (and then which key, always),
/// and for a key that passed every other check, the rate-limit decision and its spend.
pub struct Verdict {
    pub outcome: Outcome,
    pub limit: Option<LimitDecision>,
    /// The key has limits but the call passed without a decision: the shared counters
    /// could not be reached and the limiter fails open (`limit` is then `None`).
    pub limit_unknown: bool,
    pub spent_micros: u64,
    /// With BUDGET_EXCEEDED: whose budget was reached, the key's own or a pool's.
    pub budget_scope: Option<LimitScope>,
    /// The time the decision was made at (what `retry_after` counts from).
    pub decided_at: crate::domain::Micros,
}

/// Passed, with the key (a VALID answer always names its key, by construction), or
/// refused with why, and the key when one matched.
pub enum Outcome {
    Valid(Arc<CachedKey>),
    Refused(Refused, Option<Arc<CachedKey>>),
}

/// Why a verification was refused: a [`VerifyCode`] other than `Valid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused(VerifyCode);

impl Refused {
    /// `None` for `Valid`, which is no refusal.
    pub fn new(code: VerifyCode) -> Option<Refused> {
        (code != VerifyCode::Valid).then_some(Refused(code))
    }

    pub fn code(self) -> VerifyCode {
        self.0
    }
}

impl Verdict {
    pub fn code(&self) -> VerifyCode {
        match &self.outcome {
            Outcome::Valid(_) => VerifyCode::Valid,
            Outcome::Refused(why, _) => why.code(),
        }
    }

    /// The key that matched, if any.
    pub fn key(&self) -> Option<&Arc<CachedKey>> {
        match &self.outcome {
            Outcome::Valid(key) => Some(key),
            Outcome::Refused(_, key) => key.as_ref(),
        }
    }

    fn refused(
        why: Refused,
        key: Option<Arc<CachedKey>>,
        spent_micros: u64,
        decided_at: crate::domain::Micros,
    ) -> Verdict {
        Verdict {
            outcome: Outcome::Refused(why, key),
            limit: None,
            limit_unknown: false,
            spent_micros,
            budget_scope: None,
            decided_at,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Limiter(#[from] LimiterError),
    /// The replica has not read the event log within its freshness bound, so it cannot
    /// tell whether a key was revoked meanwhile (see [`crate::events::Freshness`]).
    #[error("the event log has not been read within the freshness bound")]
    Stale,
}

/// What verifications need besides the store and the cache.
pub struct VerifyPolicy {
    pub brand: Brand,
    pub implications: Arc<ScopeImplications>,
    /// Limits for keys that name none.
    pub default_limits: Arc<Vec<RateLimit>>,
    /// What each plan allows: a key of a workspace whose plan forbids keys is refused.
    pub plans: Arc<Plans>,
}

/// Where quota leases for edge nodes come from, and how long each may be used.
pub struct EdgeLeasing {
    /// The counters themselves (never a lease holder in front of them): the memory
    /// backend, or Redis.
    pub authority: Arc<dyn QuotaAuthority>,
    pub life: std::time::Duration,
}

/// One key's ask for a quota lease (see `LeaseQuota` in `verify.proto`).
pub struct LeaseAsk {
    pub key_id: String,
    /// The secret the holder verified.
    pub hash: KeyHash,
    /// 0: settle only.
    pub want: u64,
    pub min: u64,
    /// The holder's previous lease, to give back what it did not use.
    pub settle: Option<LeaseSettle>,
}

/// A lease being given back (see `LeaseSettlement` in `verify.proto`).
pub struct LeaseSettle {
    /// The key's own limits it was counted against (none when the key had none).
    pub limits: Vec<RateLimit>,
    pub record: LeaseRecord,
    /// How many of it were admitted: each counter of it admitted as many.
    pub used: u64,
    /// Each pool's part of it.
    pub pools: Vec<PoolPart>,
}

/// A pool's part of a lease of a key in pools: the grant its counter made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolPart {
    pub counter: String,
    pub limits: Vec<RateLimit>,
    pub record: LeaseRecord,
}

/// The answer to one [`LeaseAsk`].
pub struct LeaseAnswer {
    /// The key's own state ([`key::status`]), BUDGET_EXCEEDED, or RATE_LIMITED when the
    /// limits had no room.
    pub code: VerifyCode,
    /// The grant (or the refusal's figures); `None` when none was attempted.
    pub grant: Option<Grant>,
    /// The counters could not be reached: nothing granted.
    pub unknown: bool,
    pub decided_at: Micros,
    pub life: std::time::Duration,
    /// For a key in pools, each pool's part of `grant` (whose amount is the least any
    /// counter granted, and whose decision holds every counter's windows).
    pub pools: Vec<PoolPart>,
}

/// Settles the parts of one lease (the key's own counter, each pool's) with the
/// authority, in one round trip: each part used `used` of it (at most what that part
/// granted). A part without limits counted nothing. A settlement that fails leaves its
/// part counted until it leaves its window, which never admits too much.
async fn settle_parts<'a>(
    authority: &dyn QuotaAuthority,
    parts: impl Iterator<Item = (&'a str, &'a [RateLimit], LeaseRecord)>,
    used: u64,
    now: Micros,
) {
    let batch: Vec<Settle> = parts
        .filter(|(_, limits, _)| !limits.is_empty())
        .map(|(counter, limits, record)| Settle {
            key_id: counter.to_owned(),
            limits: limits.to_vec(),
            record,
            used: Amounts::requests(used.min(record.granted)),
            now,
        })
        .collect();
    if let Err(e) = authority.settle_many(&batch).await {
        tracing::debug!(error = %e, "settling an edge lease failed");
    }
}

/// The pools with token windows or a budget of each key this replica verified that has
/// any: where ReportUsage counts a key's tokens and spend besides the key's own.
type UsagePools = quick_cache::sync::Cache<
    String,
    Arc<Vec<Pool>>,
    quick_cache::UnitWeighter,
    crate::cache::Hasher,
>;

pub struct Verifier {
    store: Arc<dyn Store>,
    usage_pools: UsagePools,
    cache: Arc<VerifyCache>,
    limiter: Arc<dyn RateLimiter>,
    leasing: Option<EdgeLeasing>,
    usage: Arc<UsageBook>,
    clock: Clock,
    policy: VerifyPolicy,
    metrics: Arc<Metrics>,
    events: Arc<EventHub>,
}

impl Verifier {
    /// The keys are read from the store whose log `events` follows: the freshness that
    /// vouches for the cache is that store's.
    pub fn new(
        events: Arc<EventHub>,
        cache: Arc<VerifyCache>,
        limiter: Arc<dyn RateLimiter>,
        usage: Arc<UsageBook>,
        clock: Clock,
        policy: VerifyPolicy,
        metrics: Arc<Metrics>,
    ) -> Self {
        // A key's record changed (a reset starts a new spend epoch): the next report
        // reads it rather than counting in the epoch the book knew.
        let book = Arc::downgrade(&usage);
        events.on_key_event(Box::new(move |key_id| {
            if let Some(book) = book.upgrade() {
                book.forget_epoch(key_id);
            }
        }));
        Verifier {
            store: events.store().clone(),
            usage_pools: crate::cache::bounded(USAGE_POOL_KEYS, quick_cache::UnitWeighter),
            cache,
            limiter,
            leasing: None,
            usage,
            clock,
            policy,
            metrics,
            events,
        }
    }

    /// Lets edge nodes lease quota (`LeaseQuota`) from `leasing.authority`, which must be
    /// the counters this verifier's limiter decides from (or the limiter itself).
    pub fn with_edge_leasing(mut self, leasing: EdgeLeasing) -> Self {
        self.leasing = Some(leasing);
        self
    }

    /// Whether `LeaseQuota` is served.
    pub fn leases_quota(&self) -> bool {
        self.leasing.is_some()
    }

    /// Handles a batch of lease asks, in order. Each key is looked up as VerifyKey looks
    /// it up (its hash through the cache, filled on a miss), so a grant is judged on the
    /// same record and the same limits (its own or the deployment default) as the calls
    /// it stands for. A settlement goes to the authority before the grant, so what it
    /// gives back can be granted again. An authority that cannot be reached grants
    /// nothing (`unknown`); a settlement that fails leaves the lease counted until it
    /// leaves its window, which never admits too much.
    ///
    /// `Ok(None)`: this replica does not lease quota.
    pub async fn lease(&self, asks: &[LeaseAsk]) -> Result<Option<Vec<LeaseAnswer>>, VerifyError> {
        let Some(leasing) = &self.leasing else {
            return Ok(None);
        };
        if !self.events.freshness().vouching() {
            return Err(VerifyError::Stale);
        }
        let life = crate::domain::micros_in(leasing.life);
        let mut answers = Vec::with_capacity(asks.len());
        for ask in asks {
            let answer = |code, grant, unknown, decided_at| LeaseAnswer {
                code,
                grant,
                unknown,
                decided_at,
                life: leasing.life,
                pools: Vec::new(),
            };
            let entry = match self.entry(&ask.hash).await? {
                Some(entry) if entry.key.key_id.is(&ask.key_id) => entry,
                // A hash of another key is that key's business, not this one's.
                _ => {
                    answers.push(answer(VerifyCode::NotFound, None, false, 0));
                    continue;
                }
            };
            let now = self.clock.now();
            if let Some(settle) = &ask.settle {
                // The calls the edge admitted from the lease, which never reached this
                // replica one by one, go into the usage history as they are settled.
                self.usage.history().admitted(
                    &ask.key_id,
                    settle.used.min(settle.record.granted),
                    now,
                );
                let own = (ask.key_id.as_str(), settle.limits.as_slice(), settle.record);
                let pools = settle
                    .pools
                    .iter()
                    .map(|p| (p.counter.as_str(), p.limits.as_slice(), p.record));
                let parts = std::iter::once(own).chain(pools);
                settle_parts(&*leasing.authority, parts, settle.used, now).await;
            }
            let code = key::status(&entry.key, entry.secret_valid_until(), now);
            if code != VerifyCode::Valid || ask.want == 0 {
                answers.push(answer(code, None, false, now));
                continue;
            }
            if self
                .budget(&entry, &ask.key_id, &entry.key.spend_epoch(now), now)
                .await?
                .1
                .is_some()
            {
                answers.push(answer(VerifyCode::BudgetExceeded, None, false, now));
                continue;
            }
            if !entry.key.pools().is_empty() {
                answers.push(self.lease_pooled(leasing, &entry, ask, life, now).await);
                continue;
            }
            match leasing
                .authority
                .grant(
                    &ask.key_id,
                    &entry.limits,
                    Amounts::requests(ask.want),
                    ask.min,
                    life,
                    now,
                )
                .await
            {
                Ok(Some(grant)) => {
                    let code = if grant.granted() {
                        VerifyCode::Valid
                    } else {
                        VerifyCode::RateLimited
                    };
                    answers.push(answer(code, Some(grant), false, now));
                }
                // Failing open or closed, the holder gets nothing: each of its calls then
                // goes to VerifyKey, which applies the failure mode.
                Ok(None) | Err(_) => answers.push(answer(VerifyCode::Valid, None, true, now)),
            }
        }
        Ok(Some(answers))
    }

    /// A grant for a key in pools: from its own counter (when it has limits of its own),
    /// then from each pool's, each asked for no more than the counters before it granted,
    /// so that the lease's amount is what every counter granted. A counter that refuses
    /// (or cannot be reached) ends the ask: what the others granted goes back at once.
    /// A pool with a token window or a budget is not leased to an edge (tokens and spend
    /// are counted when usage is reported, which a lease of requests cannot foresee): the
    /// key's calls are then judged here, as a key's own budget is.
    async fn lease_pooled(
        &self,
        leasing: &EdgeLeasing,
        entry: &CachedKey,
        ask: &LeaseAsk,
        life: Micros,
        now: Micros,
    ) -> LeaseAnswer {
        let answer = |code, grant, unknown, pools| LeaseAnswer {
            code,
            grant,
            unknown,
            decided_at: now,
            life: leasing.life,
            pools,
        };
        let pools = entry.key.pools();
        let per_call = |p: &Pool| p.has_token_windows() || p.budget.is_some();
        if has_token_window(&entry.limits) || pools.iter().any(per_call) {
            return answer(VerifyCode::Valid, None, true, Vec::new());
        }
        let authority = &leasing.authority;
        let mut amount = ask.want;
        let mut own: Option<LeaseRecord> = None;
        let mut parts: Vec<PoolPart> = Vec::with_capacity(pools.len());
        let mut decisions = Vec::with_capacity(pools.len() + 1);
        let own_limits: &[RateLimit] = &entry.limits;
        let counters = std::iter::once((ask.key_id.as_str(), LimitScope::Key, own_limits))
            .chain(
                pools
                    .iter()
                    .map(|p| (p.counter.as_str(), p.scope, p.limits.as_slice())),
            )
            .filter(|(_, _, limits)| !limits.is_empty());
        let mut refusal = None;
        for (counter, scope, limits) in counters {
            let want = Amounts::requests(amount);
            match authority
                .grant(counter, limits, want, ask.min, life, now)
                .await
            {
                Ok(Some(grant)) if grant.granted() => {
                    amount = amount.min(grant.amount);
                    decisions.push(grant.decision.clone().scoped(scope));
                    let record = LeaseRecord::from(&grant);
                    if scope == LimitScope::Key {
                        own = Some(record);
                    } else {
                        parts.push(PoolPart {
                            counter: counter.to_owned(),
                            limits: limits.to_vec(),
                            record,
                        });
                    }
                }
                Ok(Some(refused)) => {
                    refusal = Some(Some(Grant {
                        decision: refused.decision.scoped(scope),
                        ..refused
                    }));
                    break;
                }
                Ok(None) | Err(_) => {
                    refusal = Some(None);
                    break;
                }
            }
        }
        if let Some(refusal) = refusal {
            // Nothing of it was used: every part granted so far goes back.
            let own_part = own.map(|record| (ask.key_id.as_str(), own_limits, record));
            let pool_parts = parts
                .iter()
                .map(|p| (p.counter.as_str(), p.limits.as_slice(), p.record));
            settle_parts(&**authority, own_part.into_iter().chain(pool_parts), 0, now).await;
            return match refusal {
                Some(grant) => answer(VerifyCode::RateLimited, Some(grant), false, Vec::new()),
                None => answer(VerifyCode::Valid, None, true, Vec::new()),
            };
        }
        let (counted_at, id) = own.map_or((now, 0), |r| (r.counted_at, r.id));
        let grant = Grant {
            amount,
            tokens: 0,
            counted_at,
            decision: pools::combine(decisions),
            id,
        };
        answer(VerifyCode::Valid, Some(grant), false, parts)
    }

    /// Records usage reported after an upstream call: tokens in the token windows, spend
    /// in the usage book. Returns the key's spend as this replica sees it, or `None` for
    /// a key that does not exist. Reads the key from storage only when this replica has
    /// not seen it recently.
    pub async fn report_usage(
        &self,
        key_id: &str,
        tokens: u64,
        spend_micros: u64,
    ) -> Result<Option<u64>, VerifyError> {
        let now = self.clock.now();
        // The book knows the key's spend epoch until it ends; otherwise the record says
        // which epoch it is in now and what it has spent in it.
        let read = if self.usage.knows(key_id, now) {
            None
        } else {
            match self.store.get_key(key_id).await? {
                Some(key) => {
                    let epoch = key.spend_epoch_at(now);
                    Some((epoch.count(key.spent_micros, key.spend_epoch), epoch))
                }
                None => return Ok(None),
            }
        };
        let (persisted_micros, epoch) = read.map_or_else(
            || self.usage.persisted(key_id),
            |(persisted, epoch)| (persisted, epoch.start),
        );
        let reported = Reported {
            tokens,
            spend_micros,
            persisted_micros,
            epoch,
        };
        self.limiter.record_usage(key_id, reported, now).await?;
        // A pool's token windows count every token of its keys, and its budget their
        // spend. Known for the keys this replica verified (their pools are read with
        // them); a report to a replica that never verified the key counts in the key's
        // own windows and budget only (see the README's "Budgets across replicas").
        if (tokens > 0 || spend_micros > 0)
            && let Some(pools) = self.usage_pools.get(key_id)
        {
            for pool in pools.iter() {
                self.report_to_pool(pool, tokens, spend_micros, now).await?;
            }
        }
        self.usage
            .history()
            .report(key_id, tokens, spend_micros, now);
        Ok(Some(self.usage.add_spend(key_id, spend_micros, read, now)))
    }

    /// Counts a report's tokens in a pool's token windows and its spend in the pool's
    /// budget (each where the pool has them).
    async fn report_to_pool(
        &self,
        pool: &Pool,
        tokens: u64,
        spend_micros: u64,
        now: Micros,
    ) -> Result<(), LimiterError> {
        let tokens = if pool.has_token_windows() { tokens } else { 0 };
        let (spend_micros, epoch, persisted) = match pool.budget {
            Some(budget) if spend_micros > 0 => {
                let epoch = budget.epoch(now);
                let stored = pool.spend.in_epoch(&epoch);
                let seen = self.usage.spend(&pool.counter, stored, &epoch);
                self.usage
                    .add_spend(&pool.counter, spend_micros, Some((stored, epoch)), now);
                (spend_micros, epoch.start, seen.persisted)
            }
            _ => (0, 0, 0),
        };
        if tokens == 0 && spend_micros == 0 {
            return Ok(());
        }
        let reported = Reported {
            tokens,
            spend_micros,
            persisted_micros: persisted,
            epoch,
        };
        self.limiter
            .record_usage(&pool.counter, reported, now)
            .await
    }

    /// Verifies `presented` for a call that needs what `request` names and counts `cost`
    /// requests (at least 1).
    pub async fn verify(
        &self,
        presented: &str,
        request: &key::Request<'_>,
        cost: u64,
    ) -> Result<Verdict, VerifyError> {
        let verdict = self.decide(presented, request, cost).await?;
        let code = verdict.code();
        self.metrics.verified(code);
        // An admitted call is counted by the usage book as it notes the use.
        if code != VerifyCode::Valid
            && let Some(key) = verdict.key()
        {
            self.usage
                .history()
                .count(&key.key.key_id.text(), code, verdict.decided_at);
        }
        Ok(verdict)
    }

    async fn decide(
        &self,
        presented: &str,
        request: &key::Request<'_>,
        cost: u64,
    ) -> Result<Verdict, VerifyError> {
        if key_format::parse(&self.policy.brand, presented).is_err() {
            return Ok(not_found_as(VerifyCode::Malformed));
        }
        // Everything past the key's text depends on the log: a replica that has not read
        // it lately cannot tell a revoked key from a live one, in its cache or not.
        if !self.events.freshness().vouching() {
            return Err(VerifyError::Stale);
        }
        let hash = KeyHash::of(presented);
        let Some(entry) = self.entry(&hash).await? else {
            return Ok(not_found());
        };
        let now = self.clock.now();
        let code = key::decide(
            &entry.key,
            entry.secret_valid_until(),
            &entry.effective_scopes,
            request,
            now,
        );
        if code == VerifyCode::NotFound {
            return Ok(not_found());
        }
        if let Some(why) = Refused::new(code) {
            return Ok(Verdict::refused(why, Some(entry), 0, now));
        }
        let key_id = entry.key.key_id.text();
        let key_id: &str = &key_id;
        let epoch = entry.key.spend_epoch(now);
        let (spent_micros, over_budget) = self.budget(&entry, key_id, &epoch, now).await?;
        if let Some(scope) = over_budget {
            let why = Refused(VerifyCode::BudgetExceeded);
            let mut verdict = Verdict::refused(why, Some(entry), spent_micros, now);
            verdict.budget_scope = Some(scope);
            return Ok(verdict);
        }
        // A key without limits (none of its own and no deployment default) needs no
        // decision, and its answer says so by carrying none. A key with limits whose
        // counters could not be reached (failing open) carries none either, marked unknown.
        // A key in pools counts against each of them too, after its own limits.
        let pools = entry.key.pools();
        let (decision, limit_unknown) = if entry.limits.is_empty() && pools.is_empty() {
            (None, false)
        } else {
            let own = Counter {
                id: key_id,
                scope: LimitScope::Key,
                limits: &entry.limits,
            };
            let decision = if pools.is_empty() {
                self.limiter.check(&[own], cost.max(1), now).await?
            } else {
                let counters: Vec<Counter<'_>> = std::iter::once(own)
                    .filter(|c| !c.limits.is_empty())
                    .chain(pools.iter().map(|p| Counter {
                        id: &p.counter,
                        scope: p.scope,
                        limits: &p.limits,
                    }))
                    .collect();
                self.limiter.check(&counters, cost.max(1), now).await?
            };
            let unknown = decision.is_none();
            (decision, unknown)
        };
        let outcome = if decision.as_ref().is_none_or(|d| d.allowed) {
            if decision.is_some() {
                self.metrics.limit_allowed.increment(1);
            } else if limit_unknown {
                self.metrics.limit_unknown.increment(1);
            }
            // The id as the cache holds it, packed: the ledger finds it without packing.
            self.usage.mark_used(
                entry.key.key_id.as_ref(),
                entry.key.spent_in(&epoch),
                epoch,
                now,
            );
            Outcome::Valid(entry)
        } else {
            self.metrics.limit_refused.increment(1);
            Outcome::Refused(Refused(VerifyCode::RateLimited), Some(entry))
        };
        Ok(Verdict {
            outcome,
            limit: decision,
            limit_unknown,
            spent_micros,
            budget_scope: None,
            decided_at: now,
        })
    }

    /// The key's spend as this replica sees it, and whose budget is reached, if any: the
    /// key's own, then its pools' in the order they are judged (see [`Self::reached`]).
    async fn budget(
        &self,
        entry: &CachedKey,
        key_id: &str,
        epoch: &SpendEpoch,
        now: Micros,
    ) -> Result<(u64, Option<LimitScope>), LimiterError> {
        let spend = self
            .usage
            .spend(entry.key.key_id.as_ref(), entry.key.spent_in(epoch), epoch);
        if let Some(max_micros) = entry.key.max_budget_micros()
            && self.reached(key_id, max_micros, spend, epoch, now).await?
        {
            return Ok((spend.total, Some(LimitScope::Key)));
        }
        for pool in entry.key.pools() {
            let Some(budget) = &pool.budget else {
                continue;
            };
            let epoch = budget.epoch(now);
            let pool_spend = self
                .usage
                .spend(&pool.counter, pool.spend.in_epoch(&epoch), &epoch);
            if self
                .reached(&pool.counter, budget.max_micros, pool_spend, &epoch, now)
                .await?
            {
                return Ok((spend.total, Some(pool.scope)));
            }
        }
        Ok((spend.total, None))
    }

    /// Whether a budget of `max_micros` is reached: by the spend this replica sees, or
    /// past it by the spend every replica shares and their outstanding allowances (the
    /// limiter's judgement; the memory backend shares none).
    async fn reached(
        &self,
        counter: &str,
        max_micros: u64,
        spend: crate::usage::Spend,
        epoch: &SpendEpoch,
        now: Micros,
    ) -> Result<bool, LimiterError> {
        if limits::budget_exceeded(Some(max_micros), spend.total) {
            return Ok(true);
        }
        let budget = Budget {
            max_micros,
            persisted_micros: spend.persisted,
            epoch: epoch.start,
        };
        Ok(self.limiter.check_budget(counter, budget, now).await? == BudgetCheck::Exceeded)
    }

    /// The key a secret hash belongs to, from the cache or filled into it.
    async fn entry(&self, hash: &KeyHash) -> Result<Option<Arc<CachedKey>>, StoreError> {
        match self.cache.get(hash) {
            Lookup::Hit(entry) => {
                self.metrics.cache_hits.increment(1);
                Ok(Some(entry))
            }
            Lookup::KnownMissing => {
                self.metrics.cache_negative_hits.increment(1);
                Ok(None)
            }
            Lookup::Miss => {
                self.metrics.cache_misses.increment(1);
                self.fill(hash).await
            }
        }
    }

    async fn fill(&self, hash: &KeyHash) -> Result<Option<Arc<CachedKey>>, StoreError> {
        let ticket = self.cache.begin_fill(hash);
        let found = self.store.find_secret(hash).await?;
        let found = found.map(|mut found| {
            // The deployment's default is shared by every key that has none of its own.
            let limits = if found.key.rate_limits.is_empty() {
                self.policy.default_limits.clone()
            } else {
                Arc::new(std::mem::take(&mut found.key.rate_limits))
            };
            let usage_pools: Vec<Pool> = found
                .pools
                .iter()
                .filter(|p| p.counts_usage())
                .cloned()
                .collect();
            if usage_pools.is_empty() {
                self.usage_pools.remove(&found.key.key_id);
            } else {
                self.usage_pools
                    .insert(found.key.key_id.clone(), Arc::new(usage_pools));
            }
            let mut key: VerifiableKey = found.key.into();
            self.cache.share_parts(&mut key);
            key.set_pools(found.pools);
            key.plan_forbids_keys = found
                .plan
                .is_some_and(|plan| !self.policy.plans.policy(plan).api_keys);
            Arc::new(CachedKey {
                effective_scopes: EffectiveScopes::new(&self.policy.implications, &key.scopes),
                limits,
                key,
                secret_valid_until_or_max: found.valid_until.unwrap_or(Micros::MAX),
            })
        });
        self.cache.complete_fill(ticket, found.clone());
        Ok(found)
    }
}

fn not_found() -> Verdict {
    not_found_as(VerifyCode::NotFound)
}

/// No key matched: NOT_FOUND, or MALFORMED.
fn not_found_as(code: VerifyCode) -> Verdict {
    Verdict::refused(Refused(code), None, 0, 0)
}
