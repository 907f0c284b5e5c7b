//! "Did you mean …?" suggestions for misspelt names.

use alloc::vec::Vec;

/// The candidate closest to `word` by edit distance, if it is close enough to be a likely typo.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = core::cmp::max(2, word.chars().count() / 3);
    candidates
        .map(|c| (distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance with transpositions counted as one edit (optimal string alignment),
/// over three rolling rows. Names are short; arithmetic saturates regardless.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut before: Vec<usize> = Vec::new();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = alloc::vec![i.saturating_add(1)];
        for (j, cb) in b.iter().enumerate() {
            let at = |row: &[usize], k: usize| row.get(k).copied().unwrap_or(usize::MAX);
            let cost = usize::from(ca != cb);
            let mut v = at(&prev, j.saturating_add(1))
                .saturating_add(1)
                .min(at(&cur, j).saturating_add(1))
                .min(at(&prev, j).saturating_add(cost));
            let transposed = i > 0
                && j > 0
                && a.get(i.saturating_sub(1)) == Some(cb)
                && b.get(j.saturating_sub(1)) == Some(ca);
            if transposed {
                v = v.min(at(&before, j.saturating_sub(1)).saturating_add(1));
            }
            cur.push(v);
        }
        before = core::mem::replace(&mut prev, cur);
    }
    prev.last().copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_typos() {
        assert_eq!(
            closest("modle", ["model", "path"].into_iter()),
            Some("model")
        );
        assert_eq!(closest("zzzzzz", ["model", "path"].into_iter()), None);
        assert_eq!(distance("modle", "model"), 1);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("kitten", "sitting"), 3);
    }
}
