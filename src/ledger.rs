//! The ledger: one record per key (or pool counter) this replica is counting, holding the
//! key's usage account ([`crate::usage`]) and its rate-limit counters
//! ([`crate::ratelimit::memory`]) together, so a verified key costs one map entry, one
//! copy of its id and one lock, not two of each.
//!
//! # Why shaped like this
//!
//! Every verified key has a record, so its size is most of what a key costs beside the
//! cache entry (`tests/memory.rs` counts it). The table holds a pointer per record
//! (hashbrown's `HashTable` over boxed records, each holding its own id): a table slot is
//! one word, and the slack of a table that grows by doubling is paid in words, not in
//! records. A minted key id (`key_` and 24 base62 characters) is packed into 18 bytes
//! inside the record ([`crate::domain::packed_id`]); any other id (a pool's counter
//! name) is a boxed string. The verify cache holds a key's id packed the same way, so
//! the usage book finds a verified key's record without packing its id again.
//!
//! 32 shards, each behind a mutex held for a few instructions: the usage book and the
//! memory limiter each lock the shard of the key they work on, never across an await. A
//! call judged by several counters locks their shards together, in shard order, so two
//! such calls never wait on each other in a circle.
//!
//! A record lives while either part needs it: the usage book's flush forgets an idle
//! account and drops the windows that count nothing any more, and removes the record
//! once both are empty.

use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};

use hashbrown::HashTable;

use crate::domain::packed_id::{IdRef, PackedId};
use crate::ratelimit::memory::KeyCounters;
use crate::usage::Account;

const SHARDS: usize = 32;

/// One key's (or pool's) record.
pub(crate) struct Record {
    id: PackedId,
    pub(crate) account: Account,
    pub(crate) counters: KeyCounters,
}

impl Record {
    /// The id, as the key id or counter name it was made from.
    pub(crate) fn id(&self) -> String {
        self.id.to_string()
    }
}

type Table = HashTable<Box<Record>>;

pub struct Ledger {
    shards: Box<[Mutex<Table>]>,
    hasher: foldhash::quality::RandomState,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            shards: (0..SHARDS).map(|_| Mutex::new(Table::new())).collect(),
            hasher: foldhash::quality::RandomState::default(),
        }
    }
}

/// A shard, locked, and where in it one id is.
struct Found<'s, 'i> {
    table: MutexGuard<'s, Table>,
    id: IdRef<'i>,
    hash: u64,
}

impl Ledger {
    pub fn new() -> Self {
        Ledger::default()
    }

    fn hash(&self, id: &IdRef<'_>) -> u64 {
        self.hasher.hash_one(id)
    }

    /// The shard of a hash: bits the table itself does not use to place an entry.
    fn shard_of(hash: u64) -> usize {
        (hash >> 40) as usize % SHARDS
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Table> {
        self.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn find<'i>(&self, id: IdRef<'i>) -> Found<'_, 'i> {
        let hash = self.hash(&id);
        Found {
            table: self.lock(Self::shard_of(hash)),
            id,
            hash,
        }
    }

    /// Runs `f` on the record of `id` (a key id or counter name, or one packed already:
    /// the hot path packs a cached key's id once, when it is filled), if there is one.
    pub(crate) fn get<'i, T>(
        &self,
        id: impl Into<IdRef<'i>>,
        f: impl FnOnce(&mut Record) -> T,
    ) -> Option<T> {
        let mut found = self.find(id.into());
        let Found { table, id, hash } = &mut found;
        table
            .find_mut(*hash, |r| r.id.as_ref() == *id)
            .map(|r| f(r))
    }

    /// The record of `id` (its `hash`) in its shard's `table`, made empty first if there
    /// is none.
    fn record_in<'t>(&self, table: &'t mut Table, hash: u64, id: &IdRef<'_>) -> &'t mut Record {
        table
            .entry(
                hash,
                |r| r.id.as_ref() == *id,
                |r| self.hash(&r.id.as_ref()),
            )
            .or_insert_with(|| {
                Box::new(Record {
                    id: id.to_held(),
                    account: Account::default(),
                    counters: KeyCounters::default(),
                })
            })
            .into_mut()
    }

    /// Runs `f` on the record of `id`, made empty first if there is none.
    pub(crate) fn entry<'i, T>(
        &self,
        id: impl Into<IdRef<'i>>,
        f: impl FnOnce(&mut Record) -> T,
    ) -> T {
        let mut found = self.find(id.into());
        let Found { table, id, hash } = &mut found;
        f(self.record_in(table, *hash, id))
    }

    /// Runs `f` on the counters of every id in `ids` at once (each record made if there
    /// is none), every shard concerned locked for the whole of it, in shard order. The
    /// ids must differ.
    pub(crate) fn with_counters<T>(
        &self,
        ids: &[&str],
        f: impl FnOnce(&mut [KeyCounters]) -> T,
    ) -> T {
        let refs: Vec<(IdRef<'_>, u64)> = ids
            .iter()
            .map(|id| {
                let id = IdRef::of(id);
                let hash = self.hash(&id);
                (id, hash)
            })
            .collect();
        let mut shards: Vec<usize> = refs.iter().map(|(_, h)| Self::shard_of(*h)).collect();
        shards.sort_unstable();
        shards.dedup();
        let mut locked: Vec<(usize, MutexGuard<'_, Table>)> =
            shards.iter().map(|&s| (s, self.lock(s))).collect();
        // Each record's counters are taken out, judged together, and put back, all
        // under the same locks.
        let mut counters: Vec<KeyCounters> = Vec::with_capacity(refs.len());
        for (id, hash) in &refs {
            let shard = Self::shard_of(*hash);
            let Some((_, table)) = locked.iter_mut().find(|(s, _)| *s == shard) else {
                counters.push(KeyCounters::default());
                continue;
            };
            let record = self.record_in(table, *hash, id);
            counters.push(std::mem::take(&mut record.counters));
        }
        let out = f(&mut counters);
        for ((id, hash), c) in refs.iter().zip(counters) {
            let shard = Self::shard_of(*hash);
            if let Some((_, table)) = locked.iter_mut().find(|(s, _)| *s == shard)
                && let Some(record) = table.find_mut(*hash, |r| r.id.as_ref() == *id)
            {
                record.counters = c;
            }
        }
        out
    }

    /// Keeps only the records `keep` says to, shard by shard (each shard locked while it
    /// is gone through).
    pub(crate) fn retain(&self, mut keep: impl FnMut(&mut Record) -> bool) {
        for shard in 0..SHARDS {
            self.lock(shard).retain(|r| keep(r));
        }
    }

    /// Records held.
    pub fn len(&self) -> usize {
        (0..SHARDS).map(|s| self.lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_found_by_id_and_dropped() {
        let ledger = Ledger::new();
        let ids: Vec<String> = (0..500)
            .map(|_| crate::domain::ids::new_key_id(&mut getrandom::SysRng).unwrap())
            .chain((0..50).map(|i| format!("team ws t{i}")))
            .collect();
        for id in &ids {
            ledger.entry(id, |_| ());
        }
        assert_eq!(ledger.len(), ids.len());
        for id in &ids {
            assert_eq!(ledger.get(id, |r| r.id()).as_deref(), Some(id.as_str()));
        }
        assert_eq!(ledger.get("key_unknown", |_| ()), None);
        ledger.retain(|r| r.id() != ids[3]);
        assert_eq!(ledger.get(&ids[3], |_| ()), None);
        assert_eq!(ledger.len(), ids.len() - 1);
    }
}
