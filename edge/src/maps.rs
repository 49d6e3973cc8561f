//! Bounded maps: every quick_cache map of the edge and of the server is made here (the
//! server re-uses this module, as `keywarden::cache` does), so that they all hash and
//! bound the same way.

use quick_cache::sync::{Cache, DefaultLifecycle};

/// Tables keyed by secret hash hash them with foldhash, seeded at random per process: a
/// fraction of the default SipHash's cost on the hot path. Seeded, so collisions cannot be
/// worked out offline; foldhash claims no cryptographic strength, which is acceptable
/// here because the keys are already SHA-256 outputs and a crowded bucket would cost
/// lookups, never a wrong answer.
pub type Hasher = foldhash::quality::RandomState;

/// A quick_cache map of at most `capacity` in weight (entries, with `weigher`), hashed
/// with [`Hasher`].
pub fn bounded<K, V, W>(capacity: u64, weigher: W) -> Cache<K, V, W, Hasher>
where
    K: Eq + std::hash::Hash,
    V: Clone,
    W: quick_cache::Weighter<K, V> + Clone,
{
    Cache::with(
        usize::try_from(capacity).unwrap_or(usize::MAX),
        capacity,
        weigher,
        Hasher::default(),
        DefaultLifecycle::default(),
    )
}
