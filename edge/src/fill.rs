//! The fill guard: a cache fill that raced an invalidation loses, so a revoked key is
//! never written back into a cache. The edge's cache and the server's use this one
//! mechanism.
//!
//! A miss reads its source (the database, or the server), then writes what it read into
//! the cache. If an invalidation happens in between, a naive fill writes the stale answer
//! back and it lives until evicted (LiteLLM had exactly this bug). Here each shard has a
//! generation: a fill takes a [`FillTicket`] (the generation) *before* it reads its
//! source, and [`FillGuard::complete`] runs the insert only if the shard's generation is
//! still the ticket's. [`FillGuard::invalidate`] bumps the generation and runs the
//! removal under the shard's write lock, and a fill checks and inserts under its read
//! lock, so a check-and-insert and a bump-and-remove never interleave.
//!
//! Each shard also guards a state of the cache's own (`S`): the edge keeps whether its
//! stream is caught up there, so that a fill that began while it was, and completes after
//! it was lost, loses too. Locks are held for a few instructions, never across an await.

use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Generations by shard, each with a state `S` the cache keeps under the same lock.
pub struct FillGuard<S> {
    shards: Box<[RwLock<Shard<S>>]>,
}

struct Shard<S> {
    generation: u64,
    state: S,
}

/// Proof of the generation of a shard a fill began at.
#[must_use]
#[derive(Debug)]
pub struct FillTicket {
    shard: usize,
    generation: u64,
}

impl<S> FillGuard<S> {
    /// `shards` shards (at least one), each starting with `state()`.
    pub fn new(shards: usize, state: impl Fn() -> S) -> Self {
        FillGuard {
            shards: (0..shards.max(1))
                .map(|_| {
                    RwLock::new(Shard {
                        generation: 0,
                        state: state(),
                    })
                })
                .collect(),
        }
    }

    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// A ticket for a fill of `shard` (taken modulo the shard count), to take before the
    /// source is read.
    pub fn begin(&self, shard: usize) -> FillTicket {
        let shard = shard % self.shards.len();
        FillTicket {
            shard,
            generation: self.read(shard).generation,
        }
    }

    /// [`FillGuard::begin`], or `None` when `open` says the shard's state admits no fill.
    pub fn begin_if(&self, shard: usize, open: impl FnOnce(&S) -> bool) -> Option<FillTicket> {
        let shard = shard % self.shards.len();
        let guard = self.read(shard);
        open(&guard.state).then_some(FillTicket {
            shard,
            generation: guard.generation,
        })
    }

    /// Runs `fill` (the insert) unless the ticket's shard was invalidated since the ticket
    /// was taken or `open` no longer holds, under the shard's read lock. Returns what
    /// `fill` returned, or `None` when the fill lost.
    pub fn complete<T>(
        &self,
        ticket: FillTicket,
        open: impl FnOnce(&S) -> bool,
        fill: impl FnOnce() -> T,
    ) -> Option<T> {
        let guard = self.read(ticket.shard);
        (guard.generation == ticket.generation && open(&guard.state)).then(fill)
    }

    /// Makes every fill of `shard` that began before this call lose, and runs `drop`
    /// (the removal, and any change to the state) under the shard's write lock.
    pub fn invalidate<T>(&self, shard: usize, drop: impl FnOnce(&mut S) -> T) -> T {
        let mut guard = self.write(shard % self.shards.len());
        guard.generation = guard.generation.wrapping_add(1);
        drop(&mut guard.state)
    }

    fn read(&self, shard: usize) -> RwLockReadGuard<'_, Shard<S>> {
        // A poisoned lock only means another thread panicked while holding it; a
        // generation and a state are always consistent.
        self.shards[shard]
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, shard: usize) -> RwLockWriteGuard<'_, Shard<S>> {
        self.shards[shard]
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fill_completes_when_nothing_happened_in_between() {
        let guard = FillGuard::new(4, || ());
        let ticket = guard.begin(1);
        assert_eq!(guard.complete(ticket, |_| true, || 7), Some(7));
    }

    #[test]
    fn a_fill_loses_to_an_invalidation_of_its_shard_only() {
        let guard = FillGuard::new(4, || ());
        let raced = guard.begin(1);
        let other = guard.begin(2);
        let mut removed = false;
        guard.invalidate(5, |_| removed = true); // 5 % 4: shard 1
        assert!(removed);
        assert_eq!(guard.complete(raced, |_| true, || ()), None);
        assert_eq!(guard.complete(other, |_| true, || ()), Some(()));
    }

    #[test]
    fn the_state_decides_whether_a_fill_may_begin_and_complete() {
        let guard = FillGuard::new(1, || true);
        let ticket = guard.begin_if(0, |open| *open).unwrap();
        // Closed without a bump (a state changed some other way): still refused.
        let closed = FillGuard::new(1, || false);
        assert!(closed.begin_if(0, |open| *open).is_none());
        assert_eq!(guard.complete(ticket, |open| !*open, || ()), None);
        let ticket = guard.begin_if(0, |open| *open).unwrap();
        guard.invalidate(0, |open| *open = false);
        assert_eq!(guard.complete(ticket, |open| *open, || ()), None);
        assert!(guard.begin_if(0, |open| *open).is_none());
    }
}
