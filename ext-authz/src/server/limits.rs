//! Counters for rate limits and budgets, behind [`CounterStore`]: [`MemoryStore`] in this
//! process (one replica), [`redis_store::RedisStore`] in Redis (shared by every replica).
//!
//! A check *reserves*: the counter's spent and reserved amounts plus this request's charge must
//! fit the limit, checked and reserved atomically, so concurrent requests can never overshoot. A
//! request that goes ahead commits its reservations (a request count at once; tokens and cost
//! when usage is reported); one that does not releases them; one whose usage is never reported
//! releases (or commits, as configured) after a timeout.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use llm_policy_core::decision::{Charge, CounterKind};
use llm_policy_core::reply::LimitState;

pub mod redis_store;

/// A future a store returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A reservation's handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReservationId(pub u64);

/// What a counter said.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reserved {
    /// Whether the charge fit (`Some`: reserved) or not (`None`: the limit applies).
    pub reservation: Option<ReservationId>,
    /// The counter after the answer.
    pub state: LimitState,
}

/// Reservations held for a usage report.
pub type Held = Vec<(ReservationId, CounterKind)>;

/// Why a counter store could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The in-memory store holds its maximum number of counter keys.
    #[error("the counter store holds its maximum of {0} keys")]
    Full(u64),
    /// A lock was poisoned by a panic elsewhere (a bug).
    #[error("counter lock poisoned")]
    Poisoned,
    /// The Redis store failed (timed out, unreachable, or an error answer).
    #[error(transparent)]
    Redis(#[from] super::redis::RedisError),
}

/// Where counters live.
pub trait CounterStore: Send + Sync {
    /// Whether `charge` would fit now, reserving nothing (dry-run evaluations).
    fn peek<'a>(
        &'a self,
        charge: &'a Charge,
        now: u64,
    ) -> StoreFuture<'a, Result<Reserved, StoreError>>;
    /// Reserves `charge` if it fits its limit in the current window (`now`: Unix seconds).
    fn reserve<'a>(
        &'a self,
        charge: &'a Charge,
        now: u64,
    ) -> StoreFuture<'a, Result<Reserved, StoreError>>;
    /// Turns a reservation into spent amount: `actual` replaces the reserved amount when given.
    fn commit(
        &self,
        id: ReservationId,
        actual: Option<f64>,
    ) -> StoreFuture<'_, Result<(), StoreError>>;
    /// Gives a reservation back.
    fn release(&self, id: ReservationId) -> StoreFuture<'_, Result<(), StoreError>>;
    /// Keeps the token and cost reservations of an allowed request until its usage is reported,
    /// under `handle` (any replica may take them). `Ok(false)`: no room; the caller commits them
    /// at once instead.
    fn hold<'a>(
        &'a self,
        handle: &'a str,
        ids: &'a [(ReservationId, CounterKind)],
    ) -> StoreFuture<'a, Result<bool, StoreError>>;
    /// The reservations held under `handle` (they stay until [`CounterStore::forget`]: a report
    /// whose settlement fails half way can be sent again; settling is idempotent).
    fn held<'a>(&'a self, handle: &'a str) -> StoreFuture<'a, Result<Option<Held>, StoreError>>;
    /// Forgets a handle once its reservations are settled.
    fn forget<'a>(&'a self, handle: &'a str) -> StoreFuture<'a, Result<(), StoreError>>;
    /// Settles reservations made more than `timeout_secs` before `now` (Unix seconds): committed
    /// or released; forgets handles of that age and windows that ended before it. Returns the
    /// number of reservations settled.
    fn expire(&self, now: u64, timeout_secs: u64, commit: bool) -> StoreFuture<'_, usize>;
    /// Whether calls leave the process (a network round trip each): the engine then commits
    /// request counts off the check's path.
    fn remote(&self) -> bool {
        false
    }
}

#[derive(Debug, Default)]
struct Window {
    start: u64,
    end: u64,
    spent: f64,
    reserved: f64,
}

#[derive(Debug)]
struct Reservation {
    key: String,
    window_start: u64,
    amount: f64,
    made_at: u64,
}

const SHARDS: usize = 16;

/// Counters in this process.
pub struct MemoryStore {
    shards: Vec<Mutex<HashMap<String, Window>>>,
    reservations: Mutex<HashMap<u64, Reservation>>,
    /// Reservations waiting for a usage report, by handle: (held at, ids).
    held: Mutex<HashMap<String, (u64, Held)>>,
    next: AtomicU64,
    /// Counter keys held now (over all shards).
    keys: AtomicU64,
    max_keys: u64,
}

/// Counter keys a [`MemoryStore`] holds by default (about 150 bytes each).
pub const DEFAULT_MAX_KEYS: u64 = 1_000_000;

/// Most requests whose token or cost reservations wait for a usage report at once in a
/// [`MemoryStore`]; past it, [`CounterStore::hold`] says no (the estimate is committed).
const MAX_HELD: usize = 100_000;

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::with_max_keys(DEFAULT_MAX_KEYS)
    }
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Poisoned
}

impl MemoryStore {
    /// A store holding at most `max_keys` counter keys: keys come from request values (users,
    /// teams), so past the cap a new key is an error (the check's failure mode applies) rather
    /// than unbounded memory.
    pub fn with_max_keys(max_keys: u64) -> MemoryStore {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            reservations: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            keys: AtomicU64::new(0),
            max_keys,
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Window>> {
        let h = xxhash_rust::xxh3::xxh3_64(key.as_bytes());
        let i = usize::try_from(h % SHARDS as u64).unwrap_or(0);
        &self.shards[i.min(SHARDS - 1)]
    }

    /// Checks `charge` against its window and, when `reserve`, reserves it.
    fn reserve_now(
        &self,
        charge: &Charge,
        now: u64,
        reserve: bool,
    ) -> Result<Reserved, StoreError> {
        let window = charge.window_secs.max(1);
        let start = now - now % window;
        let reset_secs = start.saturating_add(window).saturating_sub(now);
        let mut shard = self.shard(&charge.key).lock().map_err(poisoned)?;
        if !shard.contains_key(&charge.key) {
            if self.keys.load(Ordering::Relaxed) >= self.max_keys {
                return Err(StoreError::Full(self.max_keys));
            }
            self.keys.fetch_add(1, Ordering::Relaxed);
        }
        let w = shard.entry(charge.key.clone()).or_default();
        // Only a newer window replaces the one kept: a clock step back never resets a counter.
        if start > w.start || w.end == 0 {
            *w = Window {
                start,
                end: start.saturating_add(window),
                ..Window::default()
            };
        }
        let used = w.spent + w.reserved;
        // A request limit counts one per request whatever `amount` says; a charge of 0 (a cost
        // budget before the cost is known) fits while the budget is not spent.
        let fits = if charge.amount > 0.0 {
            used + charge.amount <= charge.limit
        } else {
            used < charge.limit
        };
        let remaining_after = |extra: f64| (charge.limit - used - extra).max(0.0);
        if !fits || !reserve {
            return Ok(Reserved {
                reservation: fits.then_some(ReservationId(0)),
                state: LimitState {
                    limit: charge.limit,
                    remaining: remaining_after(if fits { charge.amount } else { 0.0 }),
                    reset_secs,
                },
            });
        }
        w.reserved += charge.amount;
        let window_start = w.start;
        drop(shard);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.reservations.lock().map_err(poisoned)?.insert(
            id,
            Reservation {
                key: charge.key.clone(),
                window_start,
                amount: charge.amount,
                made_at: now,
            },
        );
        Ok(Reserved {
            reservation: Some(ReservationId(id)),
            state: LimitState {
                limit: charge.limit,
                remaining: remaining_after(charge.amount),
                reset_secs,
            },
        })
    }

    fn settle(&self, id: ReservationId, spend: Option<f64>) -> Result<(), StoreError> {
        let Some(r) = self.reservations.lock().map_err(poisoned)?.remove(&id.0) else {
            return Ok(());
        };
        let mut shard = self.shard(&r.key).lock().map_err(poisoned)?;
        if let Some(w) = shard.get_mut(&r.key) {
            // The reservation left with its window; usage reported after the window turned is
            // spent in the current one (a call that crossed the boundary still counts).
            if w.start == r.window_start {
                w.reserved = (w.reserved - r.amount).max(0.0);
            }
            if let Some(s) = spend {
                w.spent += s.max(0.0);
            }
        }
        Ok(())
    }

    /// The spent and reserved amounts of a key's current window (tests and metrics).
    pub fn usage(&self, key: &str) -> (f64, f64) {
        self.shard(key)
            .lock()
            .ok()
            .and_then(|s| s.get(key).map(|w| (w.spent, w.reserved)))
            .unwrap_or((0.0, 0.0))
    }
}

impl CounterStore for MemoryStore {
    fn peek<'a>(
        &'a self,
        charge: &'a Charge,
        now: u64,
    ) -> StoreFuture<'a, Result<Reserved, StoreError>> {
        Box::pin(async move { self.reserve_now(charge, now, false) })
    }

    fn reserve<'a>(
        &'a self,
        charge: &'a Charge,
        now: u64,
    ) -> StoreFuture<'a, Result<Reserved, StoreError>> {
        Box::pin(async move { self.reserve_now(charge, now, true) })
    }

    fn commit(
        &self,
        id: ReservationId,
        actual: Option<f64>,
    ) -> StoreFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let amount = match actual {
                Some(a) => Some(a),
                None => self
                    .reservations
                    .lock()
                    .map_err(poisoned)?
                    .get(&id.0)
                    .map(|r| r.amount),
            };
            self.settle(id, amount)
        })
    }

    fn release(&self, id: ReservationId) -> StoreFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.settle(id, None) })
    }

    fn hold<'a>(
        &'a self,
        handle: &'a str,
        ids: &'a [(ReservationId, CounterKind)],
    ) -> StoreFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut held = self.held.lock().map_err(poisoned)?;
            if held.len() >= MAX_HELD {
                return Ok(false);
            }
            let at = self
                .reservations
                .lock()
                .map_err(poisoned)?
                .get(&ids.first().map_or(0, |(id, _)| id.0))
                .map_or(0, |r| r.made_at);
            held.insert(handle.to_string(), (at, ids.to_vec()));
            Ok(true)
        })
    }

    fn held<'a>(&'a self, handle: &'a str) -> StoreFuture<'a, Result<Option<Held>, StoreError>> {
        Box::pin(async move {
            Ok(self
                .held
                .lock()
                .map_err(poisoned)?
                .get(handle)
                .map(|(_, ids)| ids.clone()))
        })
    }

    fn forget<'a>(&'a self, handle: &'a str) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.held.lock().map_err(poisoned)?.remove(handle);
            Ok(())
        })
    }

    fn expire(&self, now: u64, timeout_secs: u64, commit: bool) -> StoreFuture<'_, usize> {
        let before = now.saturating_sub(timeout_secs);
        Box::pin(async move {
            if let Ok(mut held) = self.held.lock() {
                held.retain(|_, (at, _)| *at >= before);
            }
            let old: Vec<(u64, f64)> = match self.reservations.lock() {
                Ok(r) => r
                    .iter()
                    .filter(|(_, r)| r.made_at < before)
                    .map(|(id, r)| (*id, r.amount))
                    .collect(),
                Err(_) => return 0,
            };
            for (id, amount) in &old {
                let _ = self.settle(ReservationId(*id), commit.then_some(*amount));
            }
            // Windows that ended before `before` hold nothing a check can read: drop them, so
            // counters keyed by request values (users, tenants) do not accumulate forever.
            for shard in &self.shards {
                if let Ok(mut s) = shard.lock() {
                    let held = s.len();
                    s.retain(|_, w| w.end >= before || w.reserved > 0.0);
                    let dropped = held.saturating_sub(s.len()) as u64;
                    self.keys.fetch_sub(
                        dropped.min(self.keys.load(Ordering::Relaxed)),
                        Ordering::Relaxed,
                    );
                }
            }
            old.len()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_policy_core::decision::{ChargeSource, CounterKind};
    use llm_policy_core::model::Scope;
    use std::sync::Arc;

    fn charge(amount: f64, limit: f64) -> Charge {
        Charge {
            rule: "r".into(),
            source: ChargeSource::Budget,
            key: "default/r/team".into(),
            kind: CounterKind::Tokens,
            limit,
            window_secs: 60,
            amount,
            scope: Scope::Global,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_reservations_never_overshoot() {
        let store = Arc::new(MemoryStore::default());
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let s = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                s.reserve(&charge(7.0, 1000.0), 120)
                    .await
                    .unwrap()
                    .reservation
            }));
        }
        let mut granted = 0;
        for t in tasks {
            if t.await.unwrap().is_some() {
                granted += 1;
            }
        }
        // 142 × 7 = 994 ≤ 1000 < 143 × 7.
        assert_eq!(granted, 142);
        let (spent, reserved) = store.usage("default/r/team");
        assert_eq!((spent, reserved), (0.0, 994.0));
    }

    #[tokio::test]
    async fn commit_release_and_expiry() {
        let store = MemoryStore::default();
        let a = store.reserve(&charge(100.0, 1000.0), 60).await.unwrap();
        let b = store.reserve(&charge(100.0, 1000.0), 61).await.unwrap();
        store
            .commit(a.reservation.unwrap(), Some(40.0))
            .await
            .unwrap();
        store.release(b.reservation.unwrap()).await.unwrap();
        assert_eq!(store.usage("default/r/team"), (40.0, 0.0));
        let c = store.reserve(&charge(100.0, 1000.0), 62).await.unwrap();
        assert_eq!(c.state.remaining, 860.0);
        assert_eq!(store.expire(63, 0, true).await, 1);
        assert_eq!(store.usage("default/r/team"), (140.0, 0.0));
        // A new window starts empty.
        let d = store.reserve(&charge(100.0, 1000.0), 125).await.unwrap();
        assert_eq!(d.state.remaining, 900.0);
        assert_eq!(d.state.reset_secs, 55);
        // Ended windows are forgotten.
        store.expire(1000, 0, false).await;
        assert_eq!(store.usage("default/r/team"), (0.0, 0.0));
        assert!(store.shards.iter().all(|s| s.lock().unwrap().is_empty()));
    }

    #[tokio::test]
    async fn an_older_time_never_resets_a_window_and_late_usage_still_counts() {
        let store = MemoryStore::default();
        let a = store.reserve(&charge(100.0, 1000.0), 130).await.unwrap();
        // A check that claims to run in an earlier window sees this one.
        let b = store.reserve(&charge(901.0, 1000.0), 10).await.unwrap();
        assert!(b.reservation.is_none());
        // Usage reported after the window turned counts in the new window.
        let _ = store.reserve(&charge(1.0, 1000.0), 185).await.unwrap();
        store
            .commit(a.reservation.unwrap(), Some(700.0))
            .await
            .unwrap();
        assert_eq!(store.usage("default/r/team").0, 700.0);
        // Peeking reserves nothing.
        let p = store.peek(&charge(200.0, 1000.0), 186).await.unwrap();
        assert!(p.reservation.is_some());
        assert_eq!(store.usage("default/r/team").1, 1.0);
    }

    #[tokio::test]
    async fn the_number_of_keys_is_bounded() {
        let store = MemoryStore::with_max_keys(2);
        let mut c = charge(1.0, 10.0);
        for k in ["a", "b"] {
            c.key = k.into();
            assert!(store.reserve(&c, 60).await.is_ok());
        }
        c.key = "c".into();
        assert!(store.reserve(&c, 60).await.is_err());
        // Ended windows make room.
        store.expire(10_000, 0, false).await;
        assert!(store.reserve(&c, 10_000).await.is_ok());
    }
}
