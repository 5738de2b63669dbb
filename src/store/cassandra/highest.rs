//! Values that only grow — conversation heads, a user's receipt watermarks —
//! as this node last read or wrote them, so conversation lists and syncs read
//! only what it has not seen yet.
//!
//! Every update keeps the higher of the old and the new value, so a read racing
//! a write can never move a value back; and since this node writes every change
//! of its keyspace (one node per keyspace, see the module doc), a value once
//! known here stays current. Bounded: past [`MAX_ENTRIES`] everything is
//! forgotten and read again.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};

const MAX_ENTRIES: usize = 200_000;

#[derive(Debug)]
pub(super) struct Highest<K, V> {
    values: Mutex<HashMap<K, V>>,
    /// The higher of two values.
    higher: fn(V, V) -> V,
}

impl<K: Hash + Eq, V: Copy> Highest<K, V> {
    pub(super) fn new(higher: fn(V, V) -> V) -> Self {
        Self {
            values: Mutex::default(),
            higher,
        }
    }

    pub(super) fn get(&self, key: &K) -> Option<V> {
        self.values
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
    }

    /// Keeps the higher of `value` and what is known; returns that.
    pub(super) fn raise(&self, key: K, value: V) -> V {
        let mut values = self.values.lock().unwrap_or_else(PoisonError::into_inner);
        if values.len() >= MAX_ENTRIES && !values.contains_key(&key) {
            values.clear();
        }
        let higher = self.higher;
        let kept = values.get(&key).map_or(value, |known| higher(*known, value));
        values.insert(key, kept);
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_never_moves_back() {
        let highest: Highest<u8, u64> = Highest::new(u64::max);
        assert_eq!(highest.get(&1), None);
        assert_eq!(highest.raise(1, 5), 5);
        // A read that started before the write of 5 lands after it.
        assert_eq!(highest.raise(1, 3), 5);
        assert_eq!(highest.raise(1, 8), 8);
        assert_eq!(highest.get(&1), Some(8));
    }
}
