//! Whole-namespace checks: rules no request can reach (shadowed), and rules that contradict each
//! other (conflicts). Linear in the rules: conditions are compared by fingerprint through a map,
//! never pairwise.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use hashbrown::HashMap;

use crate::condition::Cond;
use crate::diagnostic::{Code, Diagnostic};
use crate::set::CompiledRule;

/// Errors and warnings of a namespace's rules (sorted by descending priority).
pub(super) fn lint(rules: &[CompiledRule]) -> (Vec<Diagnostic>, Vec<Diagnostic>) {
    let (mut errors, mut warnings) = (Vec::new(), Vec::new());
    // Shadowed rules: a higher-priority enforcing rule that matches every request.
    let unconditional = rules.iter().find(|r| {
        !r.shadow && r.plugin.is_none() && r.action.limit.is_none() && is_always(&r.cond)
    });
    if let Some(u) = unconditional {
        for r in rules.iter().filter(|r| r.priority < u.priority) {
            warnings.push(
                r.origin.locate(
                    Diagnostic::warning(
                        Code::ShadowedRule,
                        format!(
                        "rule `{}` can never decide: rule `{}` (priority {}) matches every request",
                        r.id, u.id, u.priority
                    ),
                    )
                    .help(Some(String::from(
                        "raise its priority, or give the other rule a condition",
                    ))),
                    &r.id,
                ),
            );
        }
    }
    // Conflicts: equal priority, same condition (and plugin), contradictory decisions.
    let mut first_by_condition: HashMap<(i64, u128), usize> = HashMap::new();
    for (i, r) in rules.iter().enumerate() {
        if r.shadow || r.action.limit.is_some() {
            continue;
        }
        let key = (r.priority, r.cond.fingerprint(&r.plugin));
        match first_by_condition.get(&key).and_then(|&j| rules.get(j)) {
            Some(a) if a.action.decision != r.action.decision => {
                errors.push(r.origin.locate(
                    Diagnostic::error(
                        Code::ConflictingRules,
                        format!(
                            "rules `{}` and `{}` have the same priority ({}) and condition but decide {} and {}",
                            a.id,
                            r.id,
                            r.priority,
                            a.action.decision.as_str(),
                            r.action.decision.as_str()
                        ),
                    )
                    .help(Some(String::from("give one of them a higher priority"))),
                    &r.id,
                ));
            }
            Some(_) => {}
            None => {
                first_by_condition.insert(key, i);
            }
        }
    }
    (errors, warnings)
}

fn is_always(c: &Cond) -> bool {
    match c {
        Cond::Const(b) => *b,
        Cond::All(children) => children.iter().all(is_always),
        _ => false,
    }
}
