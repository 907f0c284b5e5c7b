//! Counters for rate limits and budgets, behind [`CounterStore`]: [`MemoryStore`] in this
//! process (one replica), [`redis_store::RedisStore`] in Redis (shared by every replica).
//!
//! A check *reserves*: the counter's spent and reserved amounts plus this request's charge must
//! fit the limit, checked and reserved atomically, so concurrent requests can never overshoot. A
//! request that goes ahead commits its reservations (a request count at once; tokens and cost
//! when usage is reported); one that does not releases them; one whose usage is never reported
//! releases (or commits, as configured) after a timeout.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use llm_policy_core::decision::{Charge, CounterKind};
use llm_policy_core::reply::LimitState;
use llm_policy_core::window;

pub mod redis_store;

/// A future a store returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A reservation's handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReservationId(pub u64);

impl ReservationId {
    /// Fits, but nothing was reserved (a peek, or a batch another charge of stopped).
    pub const NONE: ReservationId = ReservationId(0);
}

/// What a counter said.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reserved {
    /// Whether the charge fit (`Some`: reserved) or not (`None`: the limit applies).
    pub reservation: Option<ReservationId>,
    /// The counter after the answer.
    pub state: LimitState,
}

/// What a counter holds (`GET /v1/budgets/{key}`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CounterState {
    /// Spent in the sliding window.
    pub spent: f64,
    /// Reserved by requests whose usage is not known yet.
    pub reserved: f64,
    /// The window's length.
    pub window_secs: u64,
    /// Seconds until the oldest amount in the window stops counting (`None`: nothing counts).
    pub reset_secs: Option<u64>,
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
    /// Counters a store cannot charge together: of two namespaces (a bug; one request's
    /// counters are of its namespace).
    #[error("counters cannot be charged together: {0}")]
    Spread(String),
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
    /// Reserves every charge or none (a request that matched several budgets — key, user, team,
    /// org — charges all of them atomically): when one would not fit, it answers with no
    /// reservation, the others with [`ReservationId::NONE`], and nothing is reserved.
    fn reserve_all<'a>(
        &'a self,
        charges: &'a [Charge],
        now: u64,
    ) -> StoreFuture<'a, Result<Vec<Reserved>, StoreError>>;
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
    /// What a counter holds now: its sliding window's spent and reserved amounts (`None`: no
    /// such counter, or nothing in its window).
    fn state<'a>(
        &'a self,
        key: &'a str,
        now: u64,
    ) -> StoreFuture<'a, Result<Option<CounterState>, StoreError>>;
    /// Whether calls leave the process (a network round trip each): the engine then commits
    /// request counts off the check's path.
    fn remote(&self) -> bool {
        false
    }
}

/// One slot of a counter's sliding window ([`window`]).
#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    idx: u64,
    spent: f64,
    reserved: f64,
}

/// A counter: its slots, oldest first.
#[derive(Debug, Default)]
struct Counter {
    window: u64,
    slots: VecDeque<Slot>,
}

impl Counter {
    /// What the check at `now` counts: (used, oldest counted slot holding something).
    fn used(&self, now: u64) -> (f64, Option<u64>) {
        let first = window::first_counted(now, self.window);
        let mut used = 0.0;
        let mut oldest = None;
        for s in self.slots.iter().filter(|s| s.idx >= first) {
            let n = s.spent + s.reserved;
            if n > 0.0 {
                used += n;
                oldest.get_or_insert(s.idx);
            }
        }
        (used, oldest)
    }

    /// The slot `now` falls in (a clock that steps back uses the newest slot: it never
    /// resets a counter).
    fn current(&mut self, now: u64) -> &mut Slot {
        let idx = window::slot(now, self.window);
        if self.slots.back().is_none_or(|s| s.idx < idx) {
            self.slots.push_back(Slot {
                idx,
                ..Slot::default()
            });
        }
        // Just pushed when empty.
        let last = self.slots.len() - 1;
        &mut self.slots[last]
    }

    /// Forgets slots no check at `now` counts and no reservation refers to.
    fn trim(&mut self, now: u64) {
        let first = window::first_counted(now, self.window);
        self.slots.retain(|s| s.idx >= first || s.reserved > 0.0);
    }
}

#[derive(Debug)]
struct Reservation {
    key: String,
    slot: u64,
    amount: f64,
    made_at: u64,
}

const SHARDS: usize = 16;

/// Counters in this process.
pub struct MemoryStore {
    shards: Vec<Mutex<HashMap<String, Counter>>>,
    reservations: Mutex<HashMap<u64, Reservation>>,
    /// Reservations waiting for a usage report, by handle: (held at, ids).
    held: Mutex<HashMap<String, (u64, Held)>>,
    next: AtomicU64,
    /// Counter keys held now (over all shards).
    keys: AtomicU64,
    /// The latest time a check or expiry ran at: usage is spent in its slot.
    clock: AtomicU64,
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
            clock: AtomicU64::new(0),
            max_keys,
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Counter>> {
        &self.shards[shard_of(key)]
    }

    /// Reserves every charge or none, under the locks of all their shards at once (taken in
    /// shard order, so two batches never wait on each other in a circle).
    fn reserve_all_now(&self, charges: &[Charge], now: u64) -> Result<Vec<Reserved>, StoreError> {
        self.clock.fetch_max(now, Ordering::Relaxed);
        let mut order: Vec<usize> = charges.iter().map(|c| shard_of(&c.key)).collect();
        order.sort_unstable();
        order.dedup();
        let mut guards = Vec::with_capacity(order.len());
        for &i in &order {
            guards.push((i, self.shards[i].lock().map_err(poisoned)?));
        }
        let mut states = Vec::with_capacity(charges.len());
        let mut all_fit = true;
        let mut new_keys = 0u64;
        for (n, charge) in charges.iter().enumerate() {
            let i = shard_of(&charge.key);
            let Some((_, shard)) = guards.iter_mut().find(|(g, _)| *g == i) else {
                return Err(StoreError::Poisoned);
            };
            // What earlier charges of this batch add to the same counter.
            let earlier: f64 = charges[..n]
                .iter()
                .filter(|c| c.key == charge.key)
                .map(|c| c.amount)
                .sum();
            let window = charge.window_secs.max(1);
            let (used, oldest) = match shard.get_mut(&charge.key) {
                Some(c) => {
                    c.window = window;
                    c.trim(now);
                    c.used(now)
                }
                None => {
                    if !charges[..n].iter().any(|c| c.key == charge.key) {
                        new_keys += 1;
                    }
                    (0.0, None)
                }
            };
            let used = used + earlier;
            let fits = window::fits(used, charge.amount, charge.limit);
            all_fit &= fits;
            states.push((fits, used, oldest, window));
        }
        if self.keys.load(Ordering::Relaxed).saturating_add(new_keys) > self.max_keys {
            return Err(StoreError::Full(self.max_keys));
        }
        let mut out = Vec::with_capacity(charges.len());
        let mut made = Vec::new();
        for (charge, (fits, used, oldest, window)) in charges.iter().zip(states) {
            if !all_fit {
                out.push(Reserved {
                    reservation: fits.then_some(ReservationId::NONE),
                    state: window::state(charge.limit, used, oldest, None, now, window),
                });
                continue;
            }
            let i = shard_of(&charge.key);
            let Some((_, shard)) = guards.iter_mut().find(|(g, _)| *g == i) else {
                return Err(StoreError::Poisoned);
            };
            if !shard.contains_key(&charge.key) {
                self.keys.fetch_add(1, Ordering::Relaxed);
            }
            let c = shard.entry(charge.key.clone()).or_default();
            c.window = window;
            let slot = c.current(now);
            slot.reserved += charge.amount;
            let slot = slot.idx;
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            made.push((
                id,
                Reservation {
                    key: charge.key.clone(),
                    slot,
                    amount: charge.amount,
                    made_at: now,
                },
            ));
            out.push(Reserved {
                reservation: Some(ReservationId(id)),
                state: window::state(
                    charge.limit,
                    used,
                    oldest,
                    Some((charge.amount, slot)),
                    now,
                    window,
                ),
            });
        }
        drop(guards);
        self.reservations.lock().map_err(poisoned)?.extend(made);
        Ok(out)
    }

    /// Whether `charge` would fit its sliding window now, reserving nothing.
    fn peek_now(&self, charge: &Charge, now: u64) -> Result<Reserved, StoreError> {
        let window = charge.window_secs.max(1);
        let shard = self.shard(&charge.key).lock().map_err(poisoned)?;
        let (used, oldest) = shard.get(&charge.key).map_or((0.0, None), |c| c.used(now));
        let fits = window::fits(used, charge.amount, charge.limit);
        let extra = if fits { charge.amount } else { 0.0 };
        Ok(Reserved {
            reservation: fits.then_some(ReservationId::NONE),
            state: LimitState {
                limit: charge.limit,
                remaining: (charge.limit - used - extra).max(0.0),
                reset_secs: window::retry_after(oldest, now, window),
            },
        })
    }

    fn settle(&self, id: ReservationId, spend: Option<f64>) -> Result<(), StoreError> {
        let Some(r) = self.reservations.lock().map_err(poisoned)?.remove(&id.0) else {
            return Ok(());
        };
        let mut shard = self.shard(&r.key).lock().map_err(poisoned)?;
        if let Some(c) = shard.get_mut(&r.key) {
            if let Some(s) = c.slots.iter_mut().find(|s| s.idx == r.slot) {
                s.reserved = (s.reserved - r.amount).max(0.0);
            }
            // Spent now (usage reported late still counts, from when it was reported).
            if let Some(amount) = spend {
                let now = self.clock.load(Ordering::Relaxed);
                c.current(now).spent += amount.max(0.0);
            }
        }
        Ok(())
    }

    /// The spent and reserved amounts a counter holds (every slot; tests and metrics).
    pub fn usage(&self, key: &str) -> (f64, f64) {
        self.shard(key)
            .lock()
            .ok()
            .and_then(|s| {
                s.get(key).map(|c| {
                    c.slots
                        .iter()
                        .fold((0.0, 0.0), |(a, b), s| (a + s.spent, b + s.reserved))
                })
            })
            .unwrap_or((0.0, 0.0))
    }

    fn state_now(&self, key: &str, now: u64) -> Result<Option<CounterState>, StoreError> {
        let shard = self.shard(key).lock().map_err(poisoned)?;
        Ok(shard.get(key).map(|c| {
            let first = window::first_counted(now, c.window);
            let (spent, reserved) = c
                .slots
                .iter()
                .filter(|s| s.idx >= first)
                .fold((0.0, 0.0), |(a, b), s| (a + s.spent, b + s.reserved));
            let (_, oldest) = c.used(now);
            CounterState {
                spent,
                reserved,
                window_secs: c.window,
                reset_secs: oldest.map(|o| window::reset_secs(o, now, c.window)),
            }
        }))
    }
}

/// The shard a counter key lives in.
fn shard_of(key: &str) -> usize {
    let h = xxhash_rust::xxh3::xxh3_64(key.as_bytes());
    usize::try_from(h % SHARDS as u64)
        .unwrap_or(0)
        .min(SHARDS - 1)
}

impl CounterStore for MemoryStore {
    fn reserve_all<'a>(
        &'a self,
        charges: &'a [Charge],
        now: u64,
    ) -> StoreFuture<'a, Result<Vec<Reserved>, StoreError>> {
        Box::pin(async move { self.reserve_all_now(charges, now) })
    }

    fn peek<'a>(
        &'a self,
        charge: &'a Charge,
        now: u64,
    ) -> StoreFuture<'a, Result<Reserved, StoreError>> {
        Box::pin(async move { self.peek_now(charge, now) })
    }

    fn reserve<'a>(
        &'a self,
        charge: &'a Charge,
        now: u64,
    ) -> StoreFuture<'a, Result<Reserved, StoreError>> {
        Box::pin(async move {
            let mut all = self.reserve_all_now(std::slice::from_ref(charge), now)?;
            all.pop().ok_or(StoreError::Poisoned)
        })
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

    fn state<'a>(
        &'a self,
        key: &'a str,
        now: u64,
    ) -> StoreFuture<'a, Result<Option<CounterState>, StoreError>> {
        Box::pin(async move { self.state_now(key, now) })
    }

    fn expire(&self, now: u64, timeout_secs: u64, commit: bool) -> StoreFuture<'_, usize> {
        let before = now.saturating_sub(timeout_secs);
        self.clock.fetch_max(now, Ordering::Relaxed);
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
            // Slots no check counts any more are dropped, then counters left empty, so counters
            // keyed by request values (users, tenants) do not accumulate forever.
            for shard in &self.shards {
                if let Ok(mut s) = shard.lock() {
                    let held = s.len();
                    for c in s.values_mut() {
                        c.trim(now);
                    }
                    s.retain(|_, c| !c.slots.is_empty());
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
            output: 0,
            per_output: 0.0,
            fit: None,
            headers: false,
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
        // The window slides: a minute later (t = 125) what was spent at 60..63 still counts
        // (its 6-second slot overlaps the last minute), until the slot has aged out.
        let d = store.reserve(&charge(100.0, 1000.0), 125).await.unwrap();
        assert_eq!(d.state.remaining, 760.0);
        assert_eq!(d.state.reset_secs, 66 + 60 + 1 - 125);
        let e = store.peek(&charge(100.0, 1000.0), 127).await.unwrap();
        assert_eq!(e.state.remaining, 800.0);
        // Slots no check counts are forgotten.
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
    async fn a_limit_holds_across_any_window_not_only_the_clock_aligned_one() {
        // 5 per minute: 5 at 0:59 and then every second until 2:00; a fixed window would admit 5
        // more at 1:00.
        let store = MemoryStore::default();
        let mut c = charge(1.0, 5.0);
        c.kind = CounterKind::Requests;
        let mut admitted = Vec::new();
        for t in std::iter::repeat_n(59, 5).chain(60..180) {
            if let Some(id) = store.reserve(&c, t).await.unwrap().reservation {
                store.commit(id, None).await.unwrap();
                admitted.push(t);
            }
        }
        for &start in &admitted {
            let within = admitted
                .iter()
                .filter(|&&t| t >= start && t < start + 60)
                .count();
            assert!(
                within <= 5,
                "{within} admitted in the minute from {start}: {admitted:?}"
            );
        }
        assert!(admitted.len() >= 9, "{admitted:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_hierarchy_is_charged_all_or_nothing_and_never_overshoots() {
        // user 1,000 and team 1,500: two users of one team, 100 tokens a request, concurrently.
        let store = Arc::new(MemoryStore::default());
        let of = |user: &str| {
            let mut u = charge(100.0, 1000.0);
            u.key = format!("default/u/{user}");
            let mut t = charge(100.0, 1500.0);
            t.key = "default/t/team".into();
            vec![u, t]
        };
        let mut tasks = Vec::new();
        for i in 0..60 {
            let s = Arc::clone(&store);
            let charges = of(if i % 2 == 0 { "a" } else { "b" });
            tasks.push(tokio::spawn(async move {
                let r = s.reserve_all(&charges, 60).await.unwrap();
                r.iter()
                    .all(|r| r.reservation.is_some_and(|id| id != ReservationId::NONE))
            }));
        }
        let mut granted = 0;
        for t in tasks {
            if t.await.unwrap() {
                granted += 1;
            }
        }
        // The team's 1,500 stops at 15; neither user's 1,000 is passed.
        assert_eq!(granted, 15);
        assert_eq!(store.usage("default/t/team").1, 1500.0);
        let (a, b) = (store.usage("default/u/a").1, store.usage("default/u/b").1);
        assert_eq!(a + b, 1500.0);
        assert!(a <= 1000.0 && b <= 1000.0);
        // A stopped batch reserved nothing: the user still fits alone.
        let r = store.reserve_all(&of("c"), 61).await.unwrap();
        assert!(r[0].reservation == Some(ReservationId::NONE) && r[1].reservation.is_none());
        assert_eq!(store.usage("default/u/c"), (0.0, 0.0));
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
