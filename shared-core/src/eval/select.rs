//! Candidate rules of a request: through the index (or every rule, when explaining), minus the
//! rules the requested tags leave out.

use alloc::string::String;
use alloc::vec::Vec;

use crate::context::View;
use crate::set::Namespace;

/// Rule positions to run, ascending (= by descending priority), and the positions left out by
/// the tags (reported by explain).
pub(super) fn candidates(
    ns: &Namespace,
    view: View<'_>,
    tags: &[String],
    explain: bool,
) -> (Vec<u32>, Vec<u32>) {
    let mut all: Vec<u32> = Vec::new();
    if explain {
        all.extend(0..u32::try_from(ns.rules.len()).unwrap_or(u32::MAX));
    } else {
        ns.index.candidates(view, &mut all);
    }
    let Some(mask) = tag_mask(ns, tags) else {
        return (all, Vec::new());
    };
    all.into_iter().partition(|&i| bit(&mask, i as usize))
}

fn bit(mask: &[u64], i: usize) -> bool {
    mask.get(i / 64)
        .is_some_and(|w| w & (1u64 << (i % 64)) != 0)
}

/// Union of the requested tags' bitsets; `None` when no tags were requested.
fn tag_mask(ns: &Namespace, tags: &[String]) -> Option<Vec<u64>> {
    if tags.is_empty() {
        return None;
    }
    let mut mask = alloc::vec![0u64; ns.rules.len().div_ceil(64)];
    for t in tags {
        if let Some(bits) = ns.tags.get(t.as_str()) {
            for (m, b) in mask.iter_mut().zip(bits) {
                *m |= b;
            }
        }
    }
    Some(mask)
}
