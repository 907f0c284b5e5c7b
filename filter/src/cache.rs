//! The per-VM decision cache: a small bounded map from the core's cache key to a cacheable
//! decision. The key covers the bundle, so a new bundle never serves an old decision.

use std::rc::Rc;

use hashbrown::HashMap;
use llm_policy_core::Decision;

/// A bounded decision cache (one per worker VM; not shared).
#[derive(Debug, Default)]
pub struct DecisionCache {
    map: HashMap<String, Rc<Decision>>,
    capacity: usize,
}

impl DecisionCache {
    /// A cache of at most `capacity` decisions (0: off).
    pub fn new(capacity: usize) -> DecisionCache {
        DecisionCache {
            map: HashMap::with_capacity(capacity.min(4096)),
            capacity,
        }
    }

    /// Whether the cache is on.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// The decision cached under `key`.
    pub fn get(&self, key: &str) -> Option<Rc<Decision>> {
        self.map.get(key).cloned()
    }

    /// Caches a decision; when full, an arbitrary entry makes room.
    pub fn put(&mut self, key: String, decision: Rc<Decision>) {
        if self.capacity == 0 {
            return;
        }
        if self.map.len() >= self.capacity && !self.map.contains_key(&key) {
            if let Some(victim) = self.map.keys().next().cloned() {
                self.map.remove(&victim);
            }
        }
        self.map.insert(key, decision);
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
