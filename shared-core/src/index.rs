//! Rule selection by literal tests. A rule whose condition requires `field == literal` (or
//! `field in [literals]`) for one of the indexed fields is a candidate only when the request's
//! value is one of those literals; every other rule is always a candidate. The index is exact:
//! a skipped rule would have evaluated to false (also under CEL's error rules, since
//! `false && error` is false).

use alloc::string::String;
use alloc::vec::Vec;
use hashbrown::HashMap;

use crate::condition::{Cond, Leaf, Lit, Test};
use crate::context::{FieldValue, View};
use crate::schema::FieldRef;

/// Candidate lists per indexed field and value.
#[derive(Default)]
pub(crate) struct RuleIndex {
    keyed: Vec<(FieldRef, HashMap<String, Vec<u32>>)>,
    always: Vec<u32>,
}

/// Fields worth indexing: usually literal-tested, and always present (never a missing key) —
/// or a header tested leniently (a `match` leaf): a lenient test of a missing header is false,
/// where a strict one (CEL's) is an error the rule's `onError` decides, so that one is not
/// skipped.
fn indexable(f: &FieldRef, strict: bool) -> bool {
    match f {
        FieldRef::Model
        | FieldRef::Path
        | FieldRef::Api
        | FieldRef::Provider
        | FieldRef::Method
        | FieldRef::Host
        | FieldRef::Principal(_) => true,
        FieldRef::Header(_) => !strict,
        _ => false,
    }
}

/// The literal values a condition requires of one field, if it requires any.
fn required(c: &Cond) -> Option<(FieldRef, Vec<String>)> {
    match c {
        Cond::Leaf(Leaf {
            field,
            test,
            negate: false,
            ignore_case: false,
            size: false,
            strict,
            ..
        }) if indexable(field, *strict) => {
            let lits: &[Lit] = match test {
                Test::Eq(l) => core::slice::from_ref(l),
                Test::In(ls) => ls,
                _ => return None,
            };
            let strings: Option<Vec<String>> = lits
                .iter()
                .map(|l| match l {
                    Lit::Str(s) => Some(s.clone()),
                    _ => None,
                })
                .collect();
            strings.map(|s| (field.clone(), s))
        }
        // Prefer the most selective conjunct: model, then path, then the others.
        Cond::All(children) => children
            .iter()
            .filter_map(required)
            .min_by_key(|(f, _)| match f {
                FieldRef::Model => 0,
                FieldRef::Path => 1,
                _ => 2,
            }),
        Cond::Any(children) if !children.is_empty() => {
            let mut parts = children.iter().map(required);
            let (field, mut values) = parts.next()??;
            for p in parts {
                let (f, v) = p?;
                if f != field {
                    return None;
                }
                values.extend(v);
            }
            Some((field, values))
        }
        _ => None,
    }
}

impl RuleIndex {
    /// Builds the index over rules given by the condition each is selected by, in rule order
    /// (`None`: the rule is always a candidate). Linear in the rules and their literals.
    pub(crate) fn build<'c>(conds: impl Iterator<Item = Option<&'c Cond>>) -> RuleIndex {
        let mut idx = RuleIndex::default();
        for (i, cond) in conds.enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            let key = cond.and_then(required);
            match key {
                Some((field, values)) => {
                    if !idx.keyed.iter().any(|(f, _)| *f == field) {
                        idx.keyed.push((field.clone(), HashMap::new()));
                    }
                    if let Some((_, map)) = idx.keyed.iter_mut().find(|(f, _)| *f == field) {
                        for v in values {
                            let list = map.entry(v).or_default();
                            if list.last() != Some(&i) {
                                list.push(i);
                            }
                        }
                    }
                }
                None => idx.always.push(i),
            }
        }
        idx
    }

    /// Candidate rule positions for a request, ascending (= by descending priority).
    pub(crate) fn candidates(&self, view: View<'_>, out: &mut Vec<u32>) {
        out.clear();
        out.extend_from_slice(&self.always);
        let mut merged = false;
        for (field, map) in &self.keyed {
            if let FieldValue::Str(v) = view.get(field) {
                if let Some(list) = map.get(v) {
                    out.extend_from_slice(list);
                    merged = true;
                }
            }
        }
        if merged {
            out.sort_unstable();
        }
    }
}
