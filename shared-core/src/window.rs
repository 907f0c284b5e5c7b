//! Sliding windows for rate limits and budgets (docs/budgets.md), the same arithmetic in the
//! filter's local counters, the server's memory store and its Redis scripts.
//!
//! A window of `W` seconds is kept as slots of `L = ceil(W / SLOTS)` seconds. A check counts
//! every slot that overlaps the last `W + 1` seconds — a partly overlapping slot counts whole —
//! so across **any** interval of `W` seconds no more than the limit is admitted: when the last
//! request of the interval was admitted, everything earlier in the interval was counted. The
//! price of the bound is a limit that frees up in steps of one slot (a tenth of the window)
//! rather than continuously; clock-aligned fixed windows, by contrast, admit twice the limit
//! across a boundary.

/// Slots per window.
pub const SLOTS: u64 = 10;

/// The slot length of a window of `window_secs`.
pub fn slot_len(window_secs: u64) -> u64 {
    window_secs.max(1).div_ceil(SLOTS)
}

/// Most slots one check counts (`first_counted ..= slot`), whatever the window: a ring of this
/// many slots holds a whole window.
pub const MAX_COUNTED: u64 = SLOTS + 3;

/// The slot `now` falls in.
pub fn slot(now: u64, window_secs: u64) -> u64 {
    now.checked_div(slot_len(window_secs)).unwrap_or(now)
}

/// The oldest slot a check at `now` counts.
pub fn first_counted(now: u64, window_secs: u64) -> u64 {
    now.saturating_sub(window_secs.max(1).saturating_add(1))
        .checked_div(slot_len(window_secs))
        .unwrap_or(0)
}

/// Seconds until `oldest` (the oldest slot still holding something) stops counting.
pub fn reset_secs(oldest: u64, now: u64, window_secs: u64) -> u64 {
    let len = slot_len(window_secs);
    // Slot `oldest` stops counting once `first_counted` passes it.
    let until = oldest
        .saturating_add(1)
        .saturating_mul(len)
        .saturating_add(window_secs.max(1))
        .saturating_add(1);
    until.saturating_sub(now).max(1)
}

/// Whether a charge of `amount` fits a counter that counts `used` against `limit`: a charge of 0
/// (a cost not known yet) fits while the limit is not spent. The filter's counters and the
/// server's stores decide with this (the Redis scripts write the same comparison).
pub fn fits(used: f64, amount: f64, limit: f64) -> bool {
    if amount > 0.0 {
        used + amount <= limit
    } else {
        used < limit
    }
}

/// `retry-after` for a counter whose oldest counted slot is `oldest` (`None`: nothing counts,
/// a slot).
pub fn retry_after(oldest: Option<u64>, now: u64, window_secs: u64) -> u64 {
    oldest.map_or(slot_len(window_secs), |o| reset_secs(o, now, window_secs))
}

/// What a check answers of a counter that counts `used` against `limit` (`oldest`: its oldest
/// counted slot): what is left and when it resets, after `added` (an amount put into slot
/// `idx` by this check; `None`: nothing was). The filter's counters and the memory store answer
/// with this.
pub fn state(
    limit: f64,
    used: f64,
    oldest: Option<u64>,
    added: Option<(f64, u64)>,
    now: u64,
    window_secs: u64,
) -> crate::reply::LimitState {
    let (amount, oldest) = match added {
        Some((amount, idx)) => (amount, Some(oldest.map_or(idx, |o| o.min(idx)))),
        None => (0.0, oldest),
    };
    crate::reply::LimitState {
        limit,
        remaining: (limit - used - amount).max(0.0),
        reset_secs: retry_after(oldest, now, window_secs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;

    /// Admits one request at each second of `times` against `limit` per `window`, as a store
    /// does; returns the admission times.
    fn admit(times: &[u64], limit: u64, window: u64) -> alloc::vec::Vec<u64> {
        let mut slots: BTreeMap<u64, u64> = BTreeMap::new();
        let mut out = alloc::vec::Vec::new();
        for &t in times {
            let first = first_counted(t, window);
            let used: u64 = slots.range(first..).map(|(_, n)| n).sum();
            if used < limit {
                *slots.entry(slot(t, window)).or_default() += 1;
                out.push(t);
            }
        }
        out
    }

    #[test]
    fn no_interval_of_a_window_admits_more_than_the_limit() {
        // A request every second for five minutes, and bursts around each minute boundary.
        let mut times: alloc::vec::Vec<u64> = (0..300).collect();
        for b in [59, 60, 119, 120, 179] {
            times.extend(core::iter::repeat_n(b, 20));
        }
        times.sort_unstable();
        for (limit, window) in [(5, 60), (1, 1), (3, 7), (100, 60)] {
            let admitted = admit(&times, limit, window);
            assert!(!admitted.is_empty());
            for &start in &admitted {
                let within = admitted
                    .iter()
                    .filter(|&&t| t >= start && t < start + window)
                    .count() as u64;
                assert!(
                    within <= limit,
                    "{within} in [{start}, +{window}) for {limit}"
                );
            }
        }
        // The limit comes back: 5 per minute over five minutes admits at least 4 per minute.
        assert!(admit(&times, 5, 60).len() >= 20);
    }

    #[test]
    fn a_check_counts_at_most_max_counted_slots() {
        for window in 1..2000 {
            for now in [window * 7, window * 7 + 1, window * 13 + window / 2] {
                let n = slot(now, window) - first_counted(now, window) + 1;
                assert!(n <= MAX_COUNTED, "{n} slots for {window} s at {now}");
            }
        }
    }

    #[test]
    fn reset_says_when_the_oldest_slot_stops_counting() {
        // 60 s windows, 6 s slots: slot 10 (60..66) counts until first_counted passes it.
        let r = reset_secs(10, 70, 60);
        assert!(first_counted(70 + r, 60) > 10);
        assert!(first_counted(70 + r - 1, 60) <= 10);
    }
}
