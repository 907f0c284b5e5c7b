//! Running the candidate rules: each rule's condition (or plugin), then its counter, as far as
//! the core can go; what only the host can answer becomes a [`Need`].

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use super::resolve;
use super::select;
use super::{
    Answer, CounterCheck, EvalOptions, Need, NeedId, NeedKind, Part, Pending, PluginCheck, Step,
};
use crate::condition::Scratch;
use crate::context::{FieldValue, RequestContext, View};
use crate::decision::{Charge, CounterKind};
use crate::model::Scope;
use crate::set::{CompiledRule, KeyPart, Limit, Namespace, PolicySet};

/// How one rule fared.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Left out by the requested tags.
    NotSelected,
    /// Matched; with the charge when a counter was over its limit.
    Matched(Option<Charge>),
    NotMatched,
    /// The condition failed (the rule's `onError` applies).
    Error(String),
    /// Left to the server: a plugin that could not run here, or a global counter not counted
    /// here (with its charge).
    Remote(Option<Charge>),
    /// Matched, but its counter is within the limit: the action does not apply.
    UnderLimit(Charge),
    /// Waiting for the host to run the rule's plugin.
    WaitPlugin(NeedId),
    /// Waiting for the host to check the rule's counter.
    WaitCounter(NeedId, Charge),
}

/// A clock for `evaluation_time_us` (none without `std`).
struct Timer {
    #[cfg(feature = "std")]
    start: std::time::Instant,
}

impl Timer {
    fn start() -> Timer {
        Timer {
            #[cfg(feature = "std")]
            start: std::time::Instant::now(),
        }
    }
    fn micros(&self) -> u64 {
        #[cfg(feature = "std")]
        {
            u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
        }
        #[cfg(not(feature = "std"))]
        {
            0
        }
    }
}

pub(super) fn start(set: &PolicySet, ctx: &RequestContext, opts: &EvalOptions<'_>) -> Step {
    let timer = Timer::start();
    let mut tags: Vec<String> = opts.tags.to_vec();
    tags.sort();
    tags.dedup();
    let Some(ns) = set.0.namespaces.get(ctx.namespace.as_str()) else {
        let mut d = resolve::no_namespace(set, ctx, &tags, opts.explain);
        d.evaluation_time_us = timer.micros();
        return Step::Done(d);
    };
    let mut needs = Vec::new();
    let mut parts = Vec::new();
    for (part, view) in ctx.views().enumerate() {
        let (candidates, left_out) = select::candidates(ns, view, &tags, opts.explain);
        let mut scratch = Scratch {
            #[cfg(feature = "cel")]
            cel_reads: &ns.cel_reads,
            ..Scratch::default()
        };
        let mut outcomes: Vec<(u32, Outcome)> = Vec::new();
        if opts.explain {
            outcomes.extend(left_out.into_iter().map(|i| (i, Outcome::NotSelected)));
        }
        let mut cacheable = true;
        for i in candidates {
            let Some(rule) = ns.rules.get(i as usize) else {
                continue;
            };
            cacheable &= !rule.volatile;
            let outcome = run_rule(rule, ns, view, &mut scratch, &mut needs, part);
            // Most candidates do not match: keeping them only costs memory (a batch has many
            // parts), unless they are to be explained.
            if outcome != Outcome::NotMatched || opts.explain {
                outcomes.push((i, outcome));
            }
        }
        if opts.explain {
            outcomes.sort_by_key(|(i, _)| *i);
        }
        parts.push(Part {
            outcomes,
            cacheable,
        });
    }
    let answers = alloc::vec![None; needs.len()];
    finish(
        Pending {
            set: set.clone(),
            namespace: ns.name.clone(),
            tags,
            explain: opts.explain,
            parts,
            needs,
            answers,
            elapsed_us: 0,
        },
        ctx,
        timer,
    )
}

pub(super) fn resume(mut p: Pending, ctx: &RequestContext) -> Step {
    let timer = Timer::start();
    let set = p.set.clone();
    let Some(ns) = set.0.namespaces.get(p.namespace.as_str()) else {
        // A pending state always names a namespace of its own set; nothing to resume otherwise.
        let mut d = resolve::no_namespace(&set, ctx, &p.tags, p.explain);
        d.evaluation_time_us = p.elapsed_us.saturating_add(timer.micros());
        return Step::Done(d);
    };
    let answers = core::mem::take(&mut p.answers);
    let answer = |id: &NeedId| answers.get(id.0 as usize).cloned().flatten();
    let mut needs = Vec::new();
    let views: Vec<View<'_>> = ctx.views().collect();
    for (part, Part { outcomes, .. }) in p.parts.iter_mut().enumerate() {
        let Some(view) = views.get(part).copied() else {
            continue;
        };
        for (pos, outcome) in outcomes.iter_mut() {
            let Some(rule) = ns.rules.get(*pos as usize) else {
                continue;
            };
            let next = match &*outcome {
                Outcome::WaitPlugin(id) => match answer(id) {
                    Some(Answer::Plugin(PluginCheck::Matched(true))) => {
                        after_match(rule, ns, view, &mut needs, part)
                    }
                    Some(Answer::Plugin(PluginCheck::Matched(false))) => Outcome::NotMatched,
                    Some(Answer::Plugin(PluginCheck::Error(e))) => {
                        Outcome::Error(crate::condition::clip(e))
                    }
                    _ => Outcome::Remote(None),
                },
                Outcome::WaitCounter(id, charge) => {
                    let state = match answer(id) {
                        Some(Answer::Counter(c)) => c,
                        _ => CounterCheck::Unknown,
                    };
                    counter_outcome(state, charge.clone())
                }
                _ => continue,
            };
            *outcome = next;
        }
    }
    p.answers = alloc::vec![None; needs.len()];
    p.needs = needs;
    finish(p, ctx, timer)
}

fn finish(mut p: Pending, ctx: &RequestContext, timer: Timer) -> Step {
    p.elapsed_us = p.elapsed_us.saturating_add(timer.micros());
    if !p.needs.is_empty() {
        return Step::Pending(p);
    }
    let set = p.set.clone();
    match set.0.namespaces.get(p.namespace.as_str()) {
        Some(ns) => {
            let decide = Timer::start();
            let mut d = resolve::decide(&p, ns, ctx);
            d.evaluation_time_us = p.elapsed_us.saturating_add(decide.micros());
            Step::Done(d)
        }
        None => Step::Done(resolve::no_namespace(&set, ctx, &p.tags, p.explain)),
    }
}

/// Runs one rule as far as the core can: its condition (or asks for its plugin), then its
/// counter.
fn run_rule<'a>(
    rule: &CompiledRule,
    ns: &Namespace,
    view: View<'a>,
    scratch: &mut Scratch<'a>,
    needs: &mut Vec<Need>,
    part: usize,
) -> Outcome {
    if let Some(plugin) = &rule.plugin {
        let id = push_need(needs, rule, part, NeedKind::Plugin(plugin.clone()));
        return Outcome::WaitPlugin(id);
    }
    match rule.cond.eval(view, scratch) {
        Err(e) => Outcome::Error(crate::condition::clip(e.0)),
        Ok(false) => Outcome::NotMatched,
        Ok(true) => after_match(rule, ns, view, needs, part),
    }
}

fn push_need(needs: &mut Vec<Need>, rule: &CompiledRule, part: usize, kind: NeedKind) -> NeedId {
    let id = NeedId(u32::try_from(needs.len()).unwrap_or(u32::MAX));
    needs.push(Need {
        id,
        rule: rule.id.clone(),
        batch_item: part.checked_sub(1),
        kind,
    });
    id
}

/// A matched rule: done, unless it is limited (then its counter is needed).
fn after_match(
    rule: &CompiledRule,
    ns: &Namespace,
    view: View<'_>,
    needs: &mut Vec<Need>,
    part: usize,
) -> Outcome {
    let Some(limit) = &rule.action.limit else {
        return Outcome::Matched(None);
    };
    if rule.shadow {
        return Outcome::Matched(None);
    }
    let charge = charge(rule, ns, limit, view);
    let id = push_need(needs, rule, part, NeedKind::Counter(charge.clone()));
    Outcome::WaitCounter(id, charge)
}

fn counter_outcome(state: CounterCheck, charge: Charge) -> Outcome {
    match state {
        CounterCheck::Over => Outcome::Matched(Some(charge)),
        CounterCheck::Under => Outcome::UnderLimit(charge),
        CounterCheck::Unknown if charge.scope == Scope::Global => Outcome::Remote(Some(charge)),
        CounterCheck::Unknown => Outcome::UnderLimit(charge),
    }
}

fn charge(rule: &CompiledRule, ns: &Namespace, limit: &Limit, view: View<'_>) -> Charge {
    let r = view.req;
    Charge {
        rule: rule.id.clone(),
        source: limit.source,
        key: render_key(&ns.name, &rule.id, &limit.key, view),
        kind: limit.kind,
        limit: limit.limit,
        window_secs: limit.window_secs,
        amount: match limit.kind {
            CounterKind::Requests => 1.0,
            // Saturating: a request's `max_tokens` can be any i64.
            CounterKind::Tokens => {
                r.estimated_tokens
                    .max(0)
                    .saturating_add(r.max_tokens.unwrap_or(0).max(0)) as f64
            }
            CounterKind::Usd => 0.0,
        },
        scope: limit.scope,
    }
}

/// `%` and `/` escaped, so `namespace/rule/` is unambiguous whatever the names hold.
fn escape_key_part(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
}

/// Longest encoded field value kept in a counter key; longer ones are replaced by a hash.
const MAX_KEY_VALUE: usize = 128;

/// A request value in a counter key: letters, digits, `-`, `.` and `_` as they are (unless the
/// template's own text uses them), everything else percent-encoded, so that no two values (and
/// no value and the template's separators) render alike; null is `%-`, which no encoded value
/// contains. A value longer than [`MAX_KEY_VALUE`] encoded becomes `~` and its xxh3-64 hash.
fn push_key_value(key: &mut String, value: &str, reserved: &[char]) {
    let start = key.len();
    for c in value.chars() {
        if (c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')) && !reserved.contains(&c) {
            key.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                key.push_str(&format!("%{b:02X}"));
            }
        }
        if key.len().saturating_sub(start) > MAX_KEY_VALUE {
            key.truncate(start);
            key.push_str(&format!(
                "~{:016x}",
                xxhash_rust::xxh3::xxh3_64(value.as_bytes())
            ));
            return;
        }
    }
}

/// `namespace/rule/rendered-template` (namespace and rule escaped, request values encoded by
/// [`push_key_value`]).
fn render_key(ns: &str, rule: &str, parts: &[KeyPart], view: View<'_>) -> String {
    let mut key = String::new();
    escape_key_part(ns, &mut key);
    key.push('/');
    escape_key_part(rule, &mut key);
    key.push('/');
    let reserved: Vec<char> = parts
        .iter()
        .filter_map(|p| match p {
            KeyPart::Text(t) => Some(t.chars()),
            KeyPart::Field(_) => None,
        })
        .flatten()
        .collect();
    for p in parts {
        match p {
            KeyPart::Text(t) => key.push_str(t),
            KeyPart::Field(f) => match view.get(f) {
                FieldValue::Str(s) => push_key_value(&mut key, s, &reserved),
                FieldValue::Int(i) => push_key_value(&mut key, &i.to_string(), &reserved),
                FieldValue::Float(x) => push_key_value(&mut key, &format!("{x}"), &reserved),
                FieldValue::Bool(b) => key.push_str(if b { "true" } else { "false" }),
                _ => key.push_str("%-"),
            },
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_keys_cannot_collide_across_rule_and_key() {
        let ctx = RequestContext {
            namespace: String::from("default"),
            ..RequestContext::default()
        };
        let v = ctx.view();
        let a = render_key("default", "a", &[KeyPart::Text("b/c".into())], v);
        let b = render_key("default", "a/b", &[KeyPart::Text("c".into())], v);
        assert_ne!(a, b);
        assert_eq!(a, "default/a/b/c");
        assert_eq!(b, "default/a%2Fb/c");
        assert_eq!(
            render_key("n%2F", "r", &[], v),
            "n%252F/r/",
            "an escape sequence in a name is itself escaped"
        );
    }

    #[test]
    fn request_values_cannot_collide_in_a_key() {
        let key = |id: Option<&str>, model: &str| {
            let mut ctx = RequestContext {
                principal: vec![("id".into(), id.map(String::from))],
                ..RequestContext::default()
            };
            ctx.request.model = Some(model.into());
            let parts = [
                KeyPart::Field(crate::schema::FieldRef::Principal("id".into())),
                KeyPart::Text(":".into()),
                KeyPart::Field(crate::schema::FieldRef::Model),
            ];
            render_key("default", "r", &parts, ctx.view())
        };
        // `x:y` + `z` and `x` + `y:z`.
        assert_ne!(key(Some("x:y"), "z"), key(Some("x"), "y:z"));
        // An id of `-` and no id at all.
        assert_ne!(key(Some("-"), "m"), key(None, "m"));
        assert_eq!(key(Some("user-1"), "gpt-4o"), "default/r/user-1:gpt-4o");
        assert_eq!(key(Some("a@b.c"), "m"), "default/r/a%40b.c:m");
        // A long value is hashed: the key stays short.
        let long = "u".repeat(10_000);
        let k = key(Some(&long), "m");
        assert!(k.len() < 64 && k.contains('~'), "{k}");
        assert_ne!(k, key(Some(&"u".repeat(10_001)), "m"));
    }
}
