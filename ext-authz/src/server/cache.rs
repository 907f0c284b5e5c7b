//! Decision caches. L1: a small cache per worker thread (no locking); L2: one bounded cache
//! shared by every thread; (L3 is the registry's compiled versions); L4: Redis, shared by every
//! replica ([`RemoteCache`], when Redis is configured), asked after L1 and L2 miss.
//!
//! Keys are the core's cache keys: a hash of the bundle, the namespace and the values of every
//! field the namespace's rules read. A new bundle therefore never sees an old decision, and only
//! decisions the core marks `cacheable` (no time, counter or plugin involved) are stored.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use llm_policy_core::Decision;
use serde::{Deserialize, Serialize};

use super::metrics::Metrics;
use super::redis::{Feature, Redis};

/// Which cache answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The worker thread's own cache.
    L1,
    /// The shared cache.
    L2,
    /// Redis, shared by the replicas.
    L4,
}

impl Level {
    /// `l1` / `l2`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::L1 => "l1",
            Level::L2 => "l2",
            Level::L4 => "l4",
        }
    }
}

/// Cache sizes (`cache:` in the configuration); 0 turns a level off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct CacheConfig {
    /// Decisions kept per worker thread (default 128).
    pub l1_entries: usize,
    /// Decisions kept in the shared cache (default 10,000).
    pub l2_entries: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            l1_entries: 128,
            l2_entries: 10_000,
        }
    }
}

type Entry = Arc<Decision>;

thread_local! {
    /// (owner id, cache): a thread serves one [`Caches`] at a time; another owner starts afresh.
    static L1: RefCell<Option<(u64, quick_cache::unsync::Cache<String, Entry>)>> = const { RefCell::new(None) };
}

static OWNERS: AtomicU64 = AtomicU64::new(1);

/// Both levels.
pub struct Caches {
    id: u64,
    l1_entries: usize,
    l2: Option<quick_cache::sync::Cache<String, Entry>>,
}

impl Caches {
    /// Caches of the configured sizes.
    pub fn new(config: &CacheConfig) -> Caches {
        Caches {
            id: OWNERS.fetch_add(1, Ordering::Relaxed),
            l1_entries: config.l1_entries,
            l2: (config.l2_entries > 0).then(|| quick_cache::sync::Cache::new(config.l2_entries)),
        }
    }

    fn with_l1<T>(
        &self,
        f: impl FnOnce(&mut quick_cache::unsync::Cache<String, Entry>) -> T,
    ) -> Option<T> {
        if self.l1_entries == 0 {
            return None;
        }
        L1.try_with(|cell| {
            let mut slot = cell.try_borrow_mut().ok()?;
            if slot.as_ref().is_none_or(|(owner, _)| *owner != self.id) {
                *slot = Some((self.id, quick_cache::unsync::Cache::new(self.l1_entries)));
            }
            slot.as_mut().map(|(_, c)| f(c))
        })
        .ok()
        .flatten()
    }

    /// Looks a decision up, L1 then L2 (an L2 hit is copied into L1), counting each lookup.
    pub fn get(&self, key: &str, metrics: &Metrics) -> Option<(Entry, Level)> {
        let count = |level: &str, hit: bool| {
            metrics
                .cache
                .with_label_values(&[level, if hit { "hit" } else { "miss" }])
                .inc();
        };
        if let Some(found) = self.with_l1(|c| c.get(key).cloned()) {
            count("l1", found.is_some());
            if let Some(d) = found {
                return Some((d, Level::L1));
            }
        }
        let l2 = self.l2.as_ref()?;
        let found = l2.get(key);
        count("l2", found.is_some());
        let d = found?;
        self.with_l1(|c| c.insert(key.to_string(), Arc::clone(&d)));
        Some((d, Level::L2))
    }

    /// Stores a cacheable decision in both levels.
    pub fn put(&self, key: String, decision: Entry) {
        self.with_l1(|c| c.insert(key.clone(), Arc::clone(&decision)));
        if let Some(l2) = &self.l2 {
            l2.insert(key, decision);
        }
    }
}

/// The L4 cache: decisions in Redis under `d:{core cache key}` (the key includes the bundle
/// digest, so replicas serving different bundles never share an entry), as the decision JSON.
/// A failed or slow lookup is a miss; stores are written in the background.
#[derive(Clone)]
pub struct RemoteCache {
    redis: Redis,
    ttl_secs: u64,
}

impl RemoteCache {
    /// Decisions kept `ttl_secs` on `redis`.
    pub fn new(redis: Redis, ttl_secs: u64) -> RemoteCache {
        RemoteCache {
            redis,
            ttl_secs: ttl_secs.max(1),
        }
    }

    /// Looks a decision up (counted as level `l4`); any failure is a miss.
    pub async fn get(&self, key: &str, metrics: &Metrics) -> Option<Entry> {
        let rkey = self.redis.key(&format!("d:{key}"));
        let found: Option<Vec<u8>> = self
            .redis
            .run(Feature::Cache, |mut conn| async move {
                redis::cmd("GET").arg(&rkey).query_async(&mut conn).await
            })
            .await
            .ok()
            .flatten();
        let decision = found.and_then(|bytes| serde_json::from_slice::<Decision>(&bytes).ok());
        metrics
            .cache
            .with_label_values(&["l4", if decision.is_some() { "hit" } else { "miss" }])
            .inc();
        decision.map(Arc::new)
    }

    /// Stores a decision in the background (the check does not wait for Redis).
    pub fn put(&self, key: &str, decision: &Decision) {
        let Ok(json) = serde_json::to_vec(decision) else {
            return;
        };
        let this = self.clone();
        let rkey = self.redis.key(&format!("d:{key}"));
        tokio::spawn(async move {
            let _: Result<(), _> = this
                .redis
                .run(Feature::Cache, |mut conn| async move {
                    redis::cmd("SET")
                        .arg(&rkey)
                        .arg(json)
                        .arg("EX")
                        .arg(this.ttl_secs)
                        .query_async(&mut conn)
                        .await
                })
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_policy_core::decision::{Actions, DecisionMetadata, Verdict};

    fn decision(reason: &str) -> Entry {
        Arc::new(Decision {
            decision: Verdict::Deny,
            reason: reason.to_string(),
            matched_rules: vec![],
            actions: Actions::default(),
            metadata: DecisionMetadata::default(),
            evaluation_time_us: 0,
            explain: None,
        })
    }

    #[test]
    fn l1_then_l2_and_owners_do_not_share_l1() {
        let m = Metrics::new().unwrap();
        let a = Caches::new(&CacheConfig::default());
        assert!(a.get("k", &m).is_none());
        a.put("k".into(), decision("x"));
        assert_eq!(a.get("k", &m).unwrap().1, Level::L1);
        // Another thread has its own L1: the first lookup there is an L2 hit, then L1.
        std::thread::scope(|s| {
            s.spawn(|| {
                assert_eq!(a.get("k", &m).unwrap().1, Level::L2);
                assert_eq!(a.get("k", &m).unwrap().1, Level::L1);
            });
        });
        let b = Caches::new(&CacheConfig::default());
        assert!(b.get("k", &m).is_none());
        let off = Caches::new(&CacheConfig {
            l1_entries: 0,
            l2_entries: 0,
        });
        off.put("k".into(), decision("x"));
        assert!(off.get("k", &m).is_none());
        assert_eq!(m.cache.with_label_values(&["l1", "hit"]).get(), 2);
    }
}
