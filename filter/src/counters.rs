//! Local-scope rate limits (`scope: local`), counted in proxy-wasm shared data so every worker VM
//! of one Envoy sees the same counts.
//!
//! Each counter is a sliding window ([`llm_policy_core::window`], the server's arithmetic): a
//! ring of per-slot amounts, so no interval of the window's length admits more than the limit.
//!
//! The counters live in a fixed table of `slots` shared-data entries (`llm_policy.c.<n>`), so a
//! flood of distinct keys (one per client-chosen header value, say) cannot grow Envoy's memory: a
//! key hashes (with a random seed the first worker stores, so a client cannot aim at another
//! key's slots) to a slot and probes up to [`PROBES`] slots for its own live entry, else the
//! first one that is free: never used, or holding nothing its window still counts (expired, or
//! idle: everything it held was given back). A live count is never evicted, so a flood cannot
//! reset another key's limit. Each update is a compare-and-swap, retried when another worker
//! wrote first. A key that finds no free slot is counted in `llm_policy.local_counters.full`
//! and, failing closed (the default), is over its limit; failing open, it is not counted.
//!
//! One race is left: the very first write of a never-used slot cannot be a compare-and-swap
//! (proxy-wasm has no "create if absent"), so two workers creating the same slot at the same
//! instant may lose one count, once per slot.

use std::cell::Cell;

use llm_policy_core::decision::{Charge, CounterKind};
use llm_policy_core::reply::LimitState;
use llm_policy_core::window;

use crate::host::{Host, Level, Metric, SharedWrite};

/// Slots probed for one key.
pub const PROBES: u32 = 8;

/// Compare-and-swap attempts per slot before giving up.
const CAS_ATTEMPTS: u32 = 64;

/// Slots of a counter's ring: every slot one check counts.
const RING: usize = window::MAX_COUNTED as usize;

/// A table entry: which key, its window, and the ring of its newest slots' amounts.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Entry {
    key: u64,
    window: u64,
    /// The newest slot written.
    newest: u64,
    /// Amount per slot, at `slot % RING`.
    ring: [f64; RING],
}

impl Entry {
    const LEN: usize = 24 + 8 * RING;

    fn new(key: u64, window: u64, now: u64) -> Entry {
        Entry {
            key,
            window,
            newest: window::slot(now, window),
            ring: [0.0; RING],
        }
    }

    fn at(idx: u64) -> usize {
        usize::try_from(idx % RING as u64).unwrap_or(0)
    }

    /// What a check at `now` counts, and the oldest slot holding any of it.
    fn used(&self, now: u64) -> (f64, Option<u64>) {
        let first = window::first_counted(now, self.window);
        let oldest_kept = self.newest.saturating_sub(RING as u64 - 1);
        let mut used = 0.0;
        let mut oldest = None;
        for idx in first.max(oldest_kept)..=self.newest {
            let n = self.ring[Entry::at(idx)];
            if n > 0.0 {
                used += n;
                oldest.get_or_insert(idx);
            }
        }
        (used, oldest)
    }

    /// Moves the ring forward to the slot of `now` (slots it passes start empty).
    fn advance(&mut self, now: u64) {
        let cur = window::slot(now, self.window);
        if cur <= self.newest {
            return;
        }
        let from = self
            .newest
            .saturating_add(1)
            .max(cur.saturating_sub(RING as u64 - 1));
        for idx in from..=cur {
            self.ring[Entry::at(idx)] = 0.0;
        }
        self.newest = cur;
    }

    /// Adds `delta` to slot `idx` if the ring still holds it (never below zero).
    fn add(&mut self, idx: u64, delta: f64) {
        if idx + (RING as u64) > self.newest && idx <= self.newest {
            let v = &mut self.ring[Entry::at(idx)];
            *v = (*v + delta).max(0.0);
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.extend_from_slice(&self.key.to_le_bytes());
        out.extend_from_slice(&self.window.to_le_bytes());
        out.extend_from_slice(&self.newest.to_le_bytes());
        for v in self.ring {
            out.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Entry> {
        if bytes.len() != Self::LEN {
            return None;
        }
        let mut words = bytes.chunks_exact(8).map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        });
        let (key, window, newest) = (words.next()?, words.next()?, words.next()?);
        let mut ring = [0.0; RING];
        for v in &mut ring {
            *v = f64::from_bits(words.next()?);
        }
        Some(Entry {
            key,
            window,
            newest,
            ring,
        })
    }
}

/// A charge held in a slot, to give back if the request does not go ahead.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    slot: String,
    key: u64,
    /// The window slot the amount went into.
    idx: u64,
    amount: f64,
    kind: CounterKind,
    /// The counter after the charge.
    state: LimitState,
}

impl Reservation {
    /// The amount reserved.
    pub fn amount(&self) -> f64 {
        self.amount
    }

    /// What the counter is, and has left, after the charge (for `remainingHeaders`).
    pub fn left(&self) -> (CounterKind, LimitState) {
        (self.kind, self.state)
    }

    /// Whether it counts tokens (reconciled with the answer's usage).
    pub fn is_tokens(&self) -> bool {
        self.kind == CounterKind::Tokens
    }
}

/// What a counter said.
#[derive(Debug, Clone, PartialEq)]
pub enum Count {
    /// Under the limit; the charge is held.
    Under(Reservation),
    /// Over the limit; nothing was charged.
    Over(LimitState),
    /// Not counted (no free slot, or the host refused).
    Unknown,
}

/// The local counter table.
#[derive(Debug)]
pub struct Counters {
    slots: u32,
    /// A key that finds no free slot is over its limit (fail closed) rather than not counted.
    fail_closed: bool,
    /// When "table full" was last logged (Unix seconds), so a flood does not flood the log.
    logged: Cell<u64>,
}

/// Shared-data key of the table's hash seed: random, chosen by the first worker, so a client
/// cannot compute which slots its keys land in.
const SEED_KEY: &str = "llm_policy.c.seed";

impl Counters {
    /// A table of `slots` entries (at least [`PROBES`]); `fail_closed`: what a key that finds no
    /// free slot gets.
    pub fn new(slots: u32, fail_closed: bool) -> Counters {
        Counters {
            slots: slots.max(PROBES),
            fail_closed,
            logged: Cell::new(0),
        }
    }

    /// The table's seed, read from shared data each time (so every worker uses the one stored,
    /// even after two raced to create it).
    fn seed(host: &mut dyn Host) -> u64 {
        if let Some(seed) = host.shared_get(SEED_KEY).and_then(|(v, _)| word(&v)) {
            return seed;
        }
        let fresh =
            std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8);
        let _ = host.shared_set(SEED_KEY, &fresh.to_le_bytes(), None);
        host.shared_get(SEED_KEY)
            .and_then(|(v, _)| word(&v))
            .unwrap_or(fresh)
    }

    /// Adds `charge.amount` to the charge's counter if that stays within its sliding window's
    /// limit.
    pub fn reserve(&self, host: &mut dyn Host, charge: &Charge, now_secs: u64) -> Count {
        let key = key_hash(Counters::seed(host), &charge.rule, &charge.key);
        let window = charge.window_secs.max(1);
        let base = key % u64::from(self.slots);
        let names: Vec<String> = (0..u64::from(PROBES))
            .map(|p| slot_name((base + p) % u64::from(self.slots)))
            .collect();
        for _ in 0..CAS_ATTEMPTS {
            // Our own entry anywhere in the probe window first; else the first free slot (never
            // used, or holding nothing its window still counts). Claiming a free slot before
            // looking further would start a second count for the same key.
            let mut own = None;
            let mut free = None;
            for name in &names {
                let (entry, cas) = match host.shared_get(name) {
                    Some((bytes, cas)) => (Entry::decode(&bytes), Some(cas)),
                    None => (None, None),
                };
                match entry {
                    Some(e) if e.key == key && e.window == window => {
                        own = Some((name, e, cas));
                        break;
                    }
                    Some(e) if e.used(now_secs).0 > 0.0 => {}
                    _ => {
                        if free.is_none() {
                            free = Some((name, cas));
                        }
                    }
                }
            }
            let (slot, mut entry, cas) = match (own, free) {
                (Some(own), _) => own,
                (None, Some((name, cas))) => (name, Entry::new(key, window, now_secs), cas),
                (None, None) => return self.full(host, charge, now_secs),
            };
            entry.advance(now_secs);
            let (used, oldest) = entry.used(now_secs);
            if !window::fits(used, charge.amount, charge.limit) {
                return Count::Over(window::state(
                    charge.limit,
                    used,
                    oldest,
                    None,
                    now_secs,
                    window,
                ));
            }
            let idx = entry.newest;
            entry.add(idx, charge.amount);
            match host.shared_set(slot, &entry.encode(), cas) {
                SharedWrite::Ok => {
                    return Count::Under(Reservation {
                        slot: slot.clone(),
                        key,
                        idx,
                        amount: charge.amount,
                        kind: charge.kind,
                        state: window::state(
                            charge.limit,
                            used,
                            oldest,
                            Some((charge.amount, idx)),
                            now_secs,
                            window,
                        ),
                    })
                }
                SharedWrite::CasMismatch => continue,
                SharedWrite::Failed => return Count::Unknown,
            }
        }
        Count::Unknown
    }

    /// No free slot for the key: over its limit when failing closed, else not counted.
    fn full(&self, host: &mut dyn Host, charge: &Charge, now: u64) -> Count {
        host.metric(Metric::CounterTableFull, 1);
        if now >= self.logged.get().saturating_add(10) {
            self.logged.set(now);
            host.log(
                Level::Warn,
                &format!(
                    "local counters: no free slot for a key of rule {} ({}); raise localCounterSlots",
                    charge.rule,
                    if self.fail_closed {
                        "counted as over its limit"
                    } else {
                        "not counted"
                    }
                ),
            );
        }
        if self.fail_closed {
            Count::Over(LimitState {
                limit: charge.limit,
                remaining: 0.0,
                reset_secs: window::slot_len(charge.window_secs),
            })
        } else {
            Count::Unknown
        }
    }

    /// Gives a reservation back (if its slot still counts).
    pub fn release(&self, host: &mut dyn Host, r: &Reservation) {
        self.adjust(host, r, -r.amount);
    }

    /// Adds `delta` (negative: takes back) to a reserved counter, e.g. actual minus estimated
    /// tokens once a response reports its usage. The count never goes below zero.
    pub fn adjust(&self, host: &mut dyn Host, r: &Reservation, delta: f64) {
        for _ in 0..CAS_ATTEMPTS {
            let Some((bytes, cas)) = host.shared_get(&r.slot) else {
                return;
            };
            let Some(mut e) = Entry::decode(&bytes) else {
                return;
            };
            if e.key != r.key {
                return;
            }
            e.add(r.idx, delta);
            match host.shared_set(&r.slot, &e.encode(), Some(cas)) {
                SharedWrite::CasMismatch => continue,
                SharedWrite::Ok | SharedWrite::Failed => return,
            }
        }
    }
}

fn word(bytes: &[u8]) -> Option<u64> {
    let b: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(b))
}

fn slot_name(n: u64) -> String {
    format!("llm_policy.c.{n}")
}

fn key_hash(seed: u64, rule: &str, key: &str) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::with_seed(seed);
    h.update(rule.as_bytes());
    h.update(&[0]);
    h.update(key.as_bytes());
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeHost;
    use llm_policy_core::decision::ChargeSource;
    use llm_policy_core::model::Scope;

    fn charge(key: &str, limit: f64) -> Charge {
        Charge {
            rule: "r".into(),
            source: ChargeSource::RateLimit,
            key: key.into(),
            kind: CounterKind::Requests,
            limit,
            window_secs: 60,
            amount: 1.0,
            scope: Scope::Local,
            output: 0,
            per_output: 0.0,
            fit: None,
            headers: false,
        }
    }

    #[test]
    fn counts_up_to_the_limit_then_says_over_until_the_window_slides_past() {
        let mut host = FakeHost::default();
        let c = Counters::new(64, false);
        for _ in 0..3 {
            assert!(matches!(
                c.reserve(&mut host, &charge("a", 3.0), 120),
                Count::Under(_)
            ));
        }
        match c.reserve(&mut host, &charge("a", 3.0), 130) {
            Count::Over(s) => {
                assert_eq!(s.remaining, 0.0);
                // The slot of 120..126 stops counting a minute (and a second) after it ends.
                assert_eq!(s.reset_secs, 126 + 61 - 130);
            }
            other => panic!("{other:?}"),
        }
        // Another key has its own count.
        assert!(matches!(
            c.reserve(&mut host, &charge("b", 3.0), 130),
            Count::Under(_)
        ));
        // A minute after 120 the three still count (a clock-aligned window would have reset at
        // 180); once their slot has slid out, the key starts over.
        assert!(matches!(
            c.reserve(&mut host, &charge("a", 3.0), 180),
            Count::Over(_)
        ));
        assert!(matches!(
            c.reserve(&mut host, &charge("a", 3.0), 187),
            Count::Under(_)
        ));
    }

    #[test]
    fn a_release_gives_the_charge_back() {
        let mut host = FakeHost::default();
        let c = Counters::new(64, false);
        let Count::Under(r) = c.reserve(&mut host, &charge("a", 1.0), 0) else {
            panic!()
        };
        assert!(matches!(
            c.reserve(&mut host, &charge("a", 1.0), 0),
            Count::Over(_)
        ));
        c.release(&mut host, &r);
        assert!(matches!(
            c.reserve(&mut host, &charge("a", 1.0), 0),
            Count::Under(_)
        ));
    }

    #[test]
    fn concurrent_writers_never_overshoot() {
        // Every second write loses its compare-and-swap: the retry must re-read the count.
        let mut host = FakeHost {
            cas_conflicts: 1000,
            ..FakeHost::default()
        };
        let c = Counters::new(64, false);
        let under = (0..50)
            .filter(|_| matches!(c.reserve(&mut host, &charge("a", 20.0), 0), Count::Under(_)))
            .count();
        assert_eq!(under, 20);
    }

    #[test]
    fn a_flood_of_keys_is_bounded_by_the_table_and_a_full_table_fails_as_configured() {
        let mut host = FakeHost::default();
        let open = Counters::new(16, false);
        let counted = (0..1000)
            .filter(|i| {
                matches!(
                    open.reserve(&mut host, &charge(&format!("k{i}"), 5.0), 0),
                    Count::Under(_)
                )
            })
            .count();
        assert!(
            counted <= 16,
            "one key per slot while the window runs: {counted}"
        );
        assert!(host.shared.len() <= 17, "16 slots and the seed");
        assert!(host.count(Metric::CounterTableFull) > 0);
        // Failing closed, a key without a slot is over its limit.
        let closed = Counters::new(16, true);
        let over = (1000..1100)
            .filter(|i| {
                matches!(
                    closed.reserve(&mut host, &charge(&format!("k{i}"), 5.0), 0),
                    Count::Over(_)
                )
            })
            .count();
        assert!(over > 0);
        // Once the window ended, slots are reused.
        assert!(matches!(
            open.reserve(&mut host, &charge("late", 5.0), 3600),
            Count::Under(_)
        ));
    }

    #[test]
    fn a_key_keeps_its_count_when_slots_before_it_free_up() {
        // Eight slots: every key probes all of them. Seven one-second keys take seven slots,
        // then a one-minute key (limit 2) the last one.
        let mut host = FakeHost::default();
        let c = Counters::new(8, false);
        let short = |k: &str| Charge {
            window_secs: 1,
            ..charge(k, 100.0)
        };
        for i in 0..7 {
            assert!(matches!(
                c.reserve(&mut host, &short(&format!("s{i}")), 120),
                Count::Under(_)
            ));
        }
        for _ in 0..2 {
            assert!(matches!(
                c.reserve(&mut host, &charge("a", 2.0), 120),
                Count::Under(_)
            ));
        }
        // The one-second windows end: their slots are free, but "a" still has its count.
        assert!(matches!(
            c.reserve(&mut host, &charge("a", 2.0), 125),
            Count::Over(_)
        ));
    }

    #[test]
    fn idle_entries_are_reclaimed_before_a_key_is_refused_but_live_counts_never_are() {
        // Eight slots, every key probes all eight.
        let mut host = FakeHost::default();
        let c = Counters::new(8, true);
        let mut held = Vec::new();
        for i in 0..8 {
            let Count::Under(r) = c.reserve(&mut host, &charge(&format!("k{i}"), 5.0), 0) else {
                panic!("k{i}")
            };
            held.push(r);
        }
        // Full of live counts: a new key is refused (fail closed), and no live count was evicted.
        assert!(matches!(
            c.reserve(&mut host, &charge("new", 5.0), 1),
            Count::Over(_)
        ));
        for i in 0..8 {
            match c.reserve(&mut host, &charge(&format!("k{i}"), 1.0), 2) {
                Count::Over(s) => assert_eq!(s.remaining, 0.0),
                other => panic!("k{i} lost its count: {other:?}"),
            }
        }
        // One key's request never went ahead (released): its entry is idle and is reclaimed.
        c.release(&mut host, &held[3]);
        assert!(matches!(
            c.reserve(&mut host, &charge("new", 5.0), 3),
            Count::Under(_)
        ));
    }

    #[test]
    fn the_seed_is_shared_by_every_worker() {
        let mut host = FakeHost::default();
        let a = Counters::new(64, false);
        let b = Counters::new(64, false);
        // Two workers' tables over the same shared data count one key together.
        assert!(matches!(
            a.reserve(&mut host, &charge("x", 2.0), 0),
            Count::Under(_)
        ));
        assert!(matches!(
            b.reserve(&mut host, &charge("x", 2.0), 0),
            Count::Under(_)
        ));
        assert!(matches!(
            a.reserve(&mut host, &charge("x", 2.0), 0),
            Count::Over(_)
        ));
        assert!(host.shared.contains_key(SEED_KEY));
    }
}
