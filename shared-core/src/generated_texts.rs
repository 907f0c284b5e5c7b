//! Texts generated for the tests that compare a fast path with the full one: every text joins
//! up to `most` pieces picked by a xorshift generator (deterministic: a failure names its input
//! and reruns the same).

use alloc::string::String;

/// 20,000 texts of up to `most - 1` of `pieces` each, from `seed`.
pub(crate) fn generated(
    pieces: &'static [&'static str],
    mut seed: u64,
    most: u64,
) -> impl Iterator<Item = String> {
    (0..20_000).map(move |_| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut t = String::new();
        for k in 0..seed % most {
            let pick = seed.rotate_left((k * 5) as u32) % pieces.len() as u64;
            t.push_str(pieces.get(pick as usize).copied().unwrap_or_default());
        }
        t
    })
}
