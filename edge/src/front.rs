//! Each thread's own copies of the answers it serves: a cached answer is found and handed
//! out without writing memory another core reads.
//!
//! The shared cache (quick_cache) takes a shard's read lock and marks the entry as used
//! on every `get`, and each answer handed out bumps the reference count of the one shared
//! `Arc`. With callers on two cores, each of those writes moves a cache line from one core
//! to the other: they cost a cached answer most of its time (the `edge-verify` bench).
//! A thread's front holds, for the hashes it has served, its own copy of the answer, the
//! shared entry (for the key's lease cell) and the thread's reserve of the key's lease
//! (`leases::Reserve`). A hit there reads the front, spends the reserve, and clones an
//! `Arc` only its own thread touches; once in a reserve's worth of calls it takes the
//! next reserve with one write to the lease's count.
//!
//! **Coherence.** Every change that may make an answer stale (an event's invalidation,
//! a flush, the stream's health changing) bumps [`Fronts::generation`] once it is done.
//! A call reads the generation before it looks at anything, and a thread's front made
//! under another generation is emptied before it is used. So a call that starts after an
//! invalidation has returned never sees what it dropped, as with the shared cache alone.
//! An answer copied in by a call that read the generation before an invalidation is
//! tagged with that older generation and dropped by the next call.
//!
//! **Bounds.** A front holds at most [`FRONT_CAPACITY`] answers. Once full it takes no
//! more until its next emptying: the hashes beyond are served from the shared cache, as
//! before, rather than copied in and out in turn. Each invalidation empties every front,
//! so a busy stream costs each thread one copy per hot key per event.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use thread_local::ThreadLocal;

use keywarden_domain::key_format::KeyHash;

use crate::maps::Hasher;

/// Answers a thread's front holds at most.
pub const FRONT_CAPACITY: usize = 4096;

/// Every thread's front, and the generation that keeps them coherent.
pub(crate) struct Fronts<A: Send> {
    threads: ThreadLocal<RefCell<Front<A>>>,
    generation: Generation,
}

/// On a cache line of its own: read by every call, written only by invalidations.
#[repr(align(128))]
struct Generation(AtomicU64);

/// One thread's answers, all made under `generation`.
pub(crate) struct Front<A> {
    generation: u64,
    answers: HashMap<KeyHash, A, Hasher>,
}

impl<A: Send> Fronts<A> {
    pub(crate) fn new() -> Self {
        Fronts {
            threads: ThreadLocal::new(),
            generation: Generation(AtomicU64::new(0)),
        }
    }

    /// Read by a call before it looks at the front or at the shared cache.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.0.load(Ordering::Acquire)
    }

    /// Called after a change that may make a cached answer stale has been made: every
    /// front is emptied at its thread's next call.
    pub(crate) fn invalidate(&self) {
        self.generation.0.fetch_add(1, Ordering::Release);
    }

    /// `f` with this thread's front, emptied first if it was made under a generation
    /// other than `generation` (read by the same call, before).
    pub(crate) fn with<R>(&self, generation: u64, f: impl FnOnce(&mut Front<A>) -> R) -> R {
        let cell = self.threads.get_or(|| {
            RefCell::new(Front {
                generation,
                answers: HashMap::default(),
            })
        });
        // Never borrowed twice: `f` is given no way back to the fronts.
        let mut front = cell.borrow_mut();
        if front.generation != generation {
            front.answers.clear();
            front.generation = generation;
        }
        f(&mut front)
    }
}

impl<A> Front<A> {
    #[cfg(test)]
    fn get(&self, hash: &KeyHash) -> Option<&A> {
        self.answers.get(hash)
    }

    pub(crate) fn get_mut(&mut self, hash: &KeyHash) -> Option<&mut A> {
        self.answers.get_mut(hash)
    }

    #[cfg(test)]
    fn contains(&self, hash: &KeyHash) -> bool {
        self.answers.contains_key(hash)
    }

    /// Copies an answer in (in place of the hash's copy, if any), unless the front is
    /// full and holds no copy for the hash (it then stays as it is).
    pub(crate) fn insert(&mut self, hash: KeyHash, answer: A) {
        if let Some(held) = self.answers.get_mut(&hash) {
            *held = answer;
        } else if self.answers.len() < FRONT_CAPACITY {
            self.answers.insert(hash, answer);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.answers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u32) -> KeyHash {
        KeyHash::of(&format!("key-{n}"))
    }

    #[test]
    fn an_invalidation_empties_the_front_at_its_next_use() {
        let fronts = Fronts::<u32>::new();
        let before = fronts.generation();
        fronts.with(before, |f| f.insert(hash(1), 1));
        assert_eq!(fronts.with(before, |f| f.get(&hash(1)).copied()), Some(1));
        fronts.invalidate();
        let after = fronts.generation();
        assert_ne!(before, after);
        assert_eq!(fronts.with(after, |f| f.get(&hash(1)).copied()), None);
    }

    #[test]
    fn an_answer_copied_under_an_older_generation_is_dropped_by_the_next_call() {
        let fronts = Fronts::<u32>::new();
        // A call read the generation, then an invalidation ran, then it copied in.
        let read = fronts.generation();
        fronts.invalidate();
        fronts.with(read, |f| f.insert(hash(1), 1));
        let next = fronts.generation();
        assert_eq!(fronts.with(next, |f| f.get(&hash(1)).copied()), None);
    }

    #[test]
    fn a_full_front_takes_no_more() {
        let fronts = Fronts::<u32>::new();
        let g = fronts.generation();
        for n in 0..FRONT_CAPACITY as u32 + 10 {
            fronts.with(g, |f| f.insert(hash(n), n));
        }
        fronts.with(g, |f| {
            assert_eq!(f.len(), FRONT_CAPACITY);
            assert!(f.contains(&hash(0)));
            assert!(!f.contains(&hash(FRONT_CAPACITY as u32)));
        });
    }

    #[test]
    fn a_full_front_still_replaces_what_it_holds() {
        let fronts = Fronts::<u32>::new();
        let g = fronts.generation();
        for n in 0..FRONT_CAPACITY as u32 {
            fronts.with(g, |f| f.insert(hash(n), n));
        }
        fronts.with(g, |f| f.insert(hash(3), 30));
        assert_eq!(fronts.with(g, |f| f.get(&hash(3)).copied()), Some(30));
    }

    #[test]
    fn threads_have_fronts_of_their_own() {
        let fronts = std::sync::Arc::new(Fronts::<u32>::new());
        let g = fronts.generation();
        fronts.with(g, |f| f.insert(hash(1), 1));
        let other = fronts.clone();
        let seen = std::thread::spawn(move || other.with(g, |f| f.get(&hash(1)).copied()))
            .join()
            .unwrap();
        assert_eq!(seen, None);
    }
}
