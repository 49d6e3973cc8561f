//! The VerifyKey cache: verified key records by secret hash, plus a bounded negative cache
//! of hashes that matched nothing, so a flood of random well-formed keys costs one query
//! each at most once per TTL.
//!
//! # Fills cannot resurrect an invalidated entry
//!
//! A miss reads the row, then writes it into the cache. If a revoke commits and
//! invalidates in between, a naive fill writes the stale (still-valid) row back and the
//! revoked key lives on until eviction. Every hash maps to one of 64 shards of a
//! [`FillGuard`] (the edge's cache uses the same guard): a fill takes a [`FillTicket`]
//! *before* it reads the database, and [`VerifyCache::complete_fill`] inserts only if no
//! invalidation of that shard happened since. Invalidation bumps the shard's generation
//! and removes the entry under the shard's lock, so the check-and-insert and the
//! bump-and-remove cannot interleave.
//!
//! Reads ([`VerifyCache::get`]) take no lock of ours: they go straight to quick_cache's
//! sharded map. The shard locks are held only for a few instructions and never across
//! an await.
//!
//! # Why quick_cache, and TTLs judged on reading
//!
//! moka kept about 270 bytes of bookkeeping per entry (its deques, frequency sketch and
//! timer wheel) and recorded every read for its background maintenance; quick_cache's
//! S3-FIFO keeps an entry in a slab with a few bytes of state and reads under a shard's
//! read lock. It has no time-to-live, so each entry carries when it was cached and a
//! read past the TTL is a miss (the entry is then overwritten by the next fill, or
//! evicted by capacity).

use std::sync::Arc;
use std::time::{Duration, Instant};

use keywarden_edge::fill::{FillGuard, FillTicket};

use quick_cache::UnitWeighter;
use quick_cache::sync::Cache;

use crate::domain::Micros;
use crate::domain::key::{Owner, VerifiableKey};
use crate::domain::key_format::KeyHash;
use crate::domain::limits::RateLimit;
use crate::domain::scopes::EffectiveScopes;
use crate::interned::Interner;

const SHARDS: usize = 64;

/// What VerifyKey needs of a key, prepared once per fill.
#[derive(Debug)]
pub struct CachedKey {
    pub key: VerifiableKey,
    /// The end of the grace period of a secret a rotation replaced; `Micros::MAX` for the
    /// key's current secret (one word instead of an `Option`'s two). Read it with
    /// [`CachedKey::secret_valid_until`].
    pub secret_valid_until_or_max: Micros,
    pub effective_scopes: EffectiveScopes,
    /// The limits that apply: the key's own, or the deployment's default (shared).
    pub limits: Arc<Vec<RateLimit>>,
}

impl CachedKey {
    /// `None` for the key's current secret; the end of the grace period otherwise.
    pub fn secret_valid_until(&self) -> Option<Micros> {
        (self.secret_valid_until_or_max != Micros::MAX).then_some(self.secret_valid_until_or_max)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct CacheSizes {
    pub max_keys: u64,
    pub ttl: Duration,
    pub negative_max_keys: u64,
    pub negative_ttl: Duration,
}

impl Default for CacheSizes {
    fn default() -> Self {
        CacheSizes {
            max_keys: 1_000_000,
            ttl: Duration::from_secs(300),
            negative_max_keys: 100_000,
            negative_ttl: Duration::from_secs(30),
        }
    }
}

pub enum Lookup {
    Hit(Arc<CachedKey>),
    /// Recently looked up and matched no secret.
    KnownMissing,
    Miss,
}

/// A fill under way: its hash, and the guard's ticket for the hash's shard.
#[must_use]
pub struct Fill {
    hash: KeyHash,
    ticket: FillTicket,
}

/// The one way a bounded map is made, shared with the edge (see `keywarden_edge::maps`).
pub(crate) use keywarden_edge::maps::{Hasher, bounded};

/// A map's value for `key`, made by `Default` (and inserted) when it has none.
pub(crate) fn get_or_default<V: Clone + Default>(
    cache: &Cache<String, V, UnitWeighter, Hasher>,
    key: &str,
) -> V {
    match cache.get_or_insert_with(key, || Ok::<_, std::convert::Infallible>(V::default())) {
        Ok(value) => value,
        Err(never) => match never {},
    }
}

/// A cache of `T` by secret hash, each entry with the millisecond (since the cache was
/// made) it was cached at.
type Timed<T> = Cache<KeyHash, (T, u64), UnitWeighter, Hasher>;

pub struct VerifyCache {
    entries: Timed<Arc<CachedKey>>,
    missing: Timed<()>,
    /// What the millisecond stamps count from.
    epoch: Instant,
    ttl_ms: u64,
    negative_ttl_ms: u64,
    guard: FillGuard<()>,
    enabled: bool,
    workspaces: Interner<str>,
    scope_sets: Interner<[String]>,
    owners: Interner<Owner>,
}

impl VerifyCache {
    pub fn new(sizes: CacheSizes) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        VerifyCache {
            entries: bounded(sizes.max_keys, UnitWeighter),
            missing: bounded(sizes.negative_max_keys, UnitWeighter),
            epoch: Instant::now(),
            ttl_ms: ms(sizes.ttl),
            negative_ttl_ms: ms(sizes.negative_ttl),
            guard: FillGuard::new(SHARDS, || ()),
            enabled: true,
            workspaces: Interner::default(),
            scope_sets: Interner::default(),
            owners: Interner::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A cache that never holds anything: every VerifyKey reads the database. Only for
    /// measuring what the cache is worth.
    pub fn disabled() -> Self {
        let mut cache = VerifyCache::new(CacheSizes {
            max_keys: 0,
            negative_max_keys: 0,
            ..CacheSizes::default()
        });
        cache.enabled = false;
        cache
    }

    pub fn get(&self, hash: &KeyHash) -> Lookup {
        let now = self.now_ms();
        let fresh = |at: u64, ttl: u64| now.saturating_sub(at) < ttl;
        match self.entries.get(hash) {
            Some((hit, at)) if fresh(at, self.ttl_ms) => Lookup::Hit(hit),
            _ => match self.missing.get(hash) {
                Some(((), at)) if fresh(at, self.negative_ttl_ms) => Lookup::KnownMissing,
                _ => Lookup::Miss,
            },
        }
    }

    /// Gives `key` the copies of its workspace id, scopes and owner that the cache's
    /// other keys hold, where they have equal ones. Call before caching it.
    pub fn share_parts(&self, key: &mut VerifiableKey) {
        key.workspace_id = self.workspaces.share(key.workspace_id.clone());
        key.scopes = self.scope_sets.share(key.scopes.clone());
        key.owner = self.owners.share(key.owner.clone());
    }

    /// Call before reading the database for `hash`.
    pub fn begin_fill(&self, hash: &KeyHash) -> Fill {
        Fill {
            hash: *hash,
            ticket: self.guard.begin(shard(hash)),
        }
    }

    /// Caches what the database said (`None`: no such secret) unless `hash`'s shard was
    /// invalidated since the ticket was taken. Returns whether it was cached.
    pub fn complete_fill(&self, fill: Fill, found: Option<Arc<CachedKey>>) -> bool {
        if !self.enabled {
            return false;
        }
        let Fill { hash, ticket } = fill;
        self.guard
            .complete(
                ticket,
                |()| true,
                || {
                    let now = self.now_ms();
                    match found {
                        Some(entry) => self.entries.insert(hash, (entry, now)),
                        None => self.missing.insert(hash, ((), now)),
                    }
                },
            )
            .is_some()
    }

    /// Drops whatever is cached for `hash`, and makes every fill that started before this
    /// call lose.
    pub fn invalidate(&self, hash: &KeyHash) {
        self.guard.invalidate(shard(hash), |()| {
            self.entries.remove(hash);
            self.missing.remove(hash);
        });
    }

    /// Entries held, stale ones included until they are overwritten or evicted.
    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The fill guard's shard of `hash`.
fn shard(hash: &KeyHash) -> usize {
    usize::from(hash.0[0]) % SHARDS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::key::KeyRecord;

    fn entry(revoked: bool) -> Arc<CachedKey> {
        Arc::new(CachedKey {
            key: KeyRecord {
                scopes: vec![],
                revoked_at: revoked.then_some(1),
                ..KeyRecord::sample("key_x")
            }
            .into(),
            secret_valid_until_or_max: Micros::MAX,
            effective_scopes: EffectiveScopes::default(),
            limits: Arc::default(),
        })
    }

    #[test]
    fn a_fill_hits_afterwards() {
        let cache = VerifyCache::new(CacheSizes::default());
        let h = KeyHash::of("a");
        assert!(matches!(cache.get(&h), Lookup::Miss));
        let t = cache.begin_fill(&h);
        assert!(cache.complete_fill(t, Some(entry(false))));
        assert!(matches!(cache.get(&h), Lookup::Hit(_)));
    }

    #[test]
    fn a_fill_that_raced_an_invalidation_loses() {
        let cache = VerifyCache::new(CacheSizes::default());
        let h = KeyHash::of("a");
        // The miss reads the row before the revoke commits ...
        let t = cache.begin_fill(&h);
        let stale = entry(false);
        // ... the revoke commits and invalidates ...
        cache.invalidate(&h);
        // ... and the stale fill must not win.
        assert!(!cache.complete_fill(t, Some(stale)));
        assert!(matches!(cache.get(&h), Lookup::Miss));
        // A fill that starts after the invalidation reads the revoked row and is kept.
        let t = cache.begin_fill(&h);
        assert!(cache.complete_fill(t, Some(entry(true))));
        let Lookup::Hit(hit) = cache.get(&h) else {
            panic!("expected a hit")
        };
        assert!(hit.key.revoked);
    }

    #[test]
    fn invalidation_drops_cached_and_negative_entries() {
        let cache = VerifyCache::new(CacheSizes::default());
        let (a, b) = (KeyHash::of("a"), KeyHash::of("b"));
        let t = cache.begin_fill(&a);
        assert!(cache.complete_fill(t, Some(entry(false))));
        let t = cache.begin_fill(&b);
        assert!(cache.complete_fill(t, None));
        assert!(matches!(cache.get(&b), Lookup::KnownMissing));
        cache.invalidate(&a);
        cache.invalidate(&b);
        assert!(matches!(cache.get(&a), Lookup::Miss));
        assert!(matches!(cache.get(&b), Lookup::Miss));
    }

    #[test]
    fn racing_fills_and_invalidations_never_leave_a_stale_entry() {
        // Many threads fill "valid" while one invalidates after "revoking": once the last
        // invalidation is done, a fill that started before it must not be visible.
        let cache = Arc::new(VerifyCache::new(CacheSizes::default()));
        let h = KeyHash::of("k");
        for _ in 0..200 {
            let tickets: Vec<_> = (0..8).map(|_| cache.begin_fill(&h)).collect();
            let c = cache.clone();
            let invalidator = std::thread::spawn(move || c.invalidate(&h));
            let fillers: Vec<_> = tickets
                .into_iter()
                .map(|t| {
                    let c = cache.clone();
                    std::thread::spawn(move || c.complete_fill(t, Some(entry(false))))
                })
                .collect();
            invalidator.join().unwrap();
            for f in fillers {
                f.join().unwrap();
            }
            // Whatever won before the invalidation was removed by it; whatever came after lost.
            assert!(matches!(cache.get(&h), Lookup::Miss));
        }
    }

    #[test]
    fn an_entry_past_its_ttl_is_a_miss() {
        let cache = VerifyCache::new(CacheSizes {
            ttl: Duration::from_millis(1),
            negative_ttl: Duration::from_millis(1),
            ..CacheSizes::default()
        });
        let (a, b) = (KeyHash::of("a"), KeyHash::of("b"));
        assert!(cache.complete_fill(cache.begin_fill(&a), Some(entry(false))));
        assert!(cache.complete_fill(cache.begin_fill(&b), None));
        std::thread::sleep(Duration::from_millis(5));
        assert!(matches!(cache.get(&a), Lookup::Miss));
        assert!(matches!(cache.get(&b), Lookup::Miss));
    }

    #[test]
    fn a_disabled_cache_holds_nothing() {
        let cache = VerifyCache::disabled();
        let h = KeyHash::of("a");
        let t = cache.begin_fill(&h);
        assert!(!cache.complete_fill(t, Some(entry(false))));
        assert!(matches!(cache.get(&h), Lookup::Miss));
    }
}
