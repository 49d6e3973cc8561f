//! Values many cached keys have in common (workspace ids, scope sets, owners), held once
//! and shared: a key filled into the verify cache gets the copy the other keys already
//! hold instead of an allocation of its own.
//!
//! # Why written here
//!
//! The interning crates (internment, arc-interner) keep one process-wide table per type
//! and take its lock on every drop of a shared value; this one belongs to its cache, is
//! locked only when a key is filled, and forgets what no key holds any more in passes
//! whose cost is spread over the fills (a pass once the table has doubled since the last).

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use crate::cache::Hasher;

/// One shared copy of each value handed to [`Interner::share`] and still held elsewhere.
pub struct Interner<T: ?Sized> {
    table: Mutex<Table<T>>,
}

struct Table<T: ?Sized> {
    values: HashSet<Arc<T>, Hasher>,
    /// The table's size after its last pass over unheld values.
    after_last_pass: usize,
}

/// Passes start once a table holds this many values (a handful of workspaces and scope
/// sets never needs one).
const FIRST_PASS_AT: usize = 1024;

impl<T: ?Sized + Eq + Hash> Default for Interner<T> {
    fn default() -> Self {
        Interner {
            table: Mutex::new(Table {
                values: HashSet::default(),
                after_last_pass: 0,
            }),
        }
    }
}

impl<T: ?Sized + Eq + Hash> Interner<T> {
    /// The shared copy equal to `value`: the one held already, or `value` itself, kept
    /// from now on.
    pub fn share(&self, value: Arc<T>) -> Arc<T> {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = table.values.get::<T>(value.borrow()) {
            return held.clone();
        }
        if table.values.len() >= FIRST_PASS_AT.max(2 * table.after_last_pass) {
            // Only the table holds these: no cached key uses them any more.
            table.values.retain(|v| Arc::strong_count(v) > 1);
            table.after_last_pass = table.values.len();
        }
        table.values.insert(value.clone());
        value
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_copy() {
        let interner = Interner::<str>::default();
        let a = interner.share(Arc::from("ws_a"));
        let b = interner.share(Arc::from("ws_a"));
        let c = interner.share(Arc::from("ws_b"));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(interner.len(), 2);
    }

    #[test]
    fn values_no_one_holds_are_forgotten_as_the_table_grows() {
        let interner = Interner::<str>::default();
        let kept = interner.share(Arc::from("kept"));
        for i in 0..FIRST_PASS_AT * 4 {
            // Each is dropped at once: only the table holds it.
            interner.share(Arc::from(format!("gone {i}").as_str()));
        }
        assert!(
            interner.len() <= FIRST_PASS_AT + 1,
            "{} values held",
            interner.len()
        );
        let again = interner.share(Arc::from("kept"));
        assert!(Arc::ptr_eq(&kept, &again), "a held value was forgotten");
    }
}
