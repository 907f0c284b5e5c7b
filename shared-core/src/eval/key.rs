//! Counter charges and their keys: `namespace/rule/rendered-template`, unambiguous whatever the
//! names and request values hold, and bounded in length.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::context::{FieldValue, View};
use crate::decision::{Charge, CounterKind};
use crate::set::{CompiledRule, KeyPart, Limit, Namespace};

/// The largest output cap a charge counts, each choice: far above any model's, and small
/// enough that amounts stay exact in `f64` (a `max_tokens` of 2^63 counts as this).
const MAX_OUTPUT: u64 = 1 << 32;

/// What `rule`'s counter charges for the request in `view`, whose output cap is lowered to
/// `cap` (a fixed `transform.maxTokens`) when one applies; `lowerable`: its body can be lowered,
/// so a `fitBudget` rule may lower it.
pub(super) fn charge(
    rule: &CompiledRule,
    ns: &Namespace,
    limit: &Limit,
    view: View<'_>,
    cap: Option<u64>,
    lowerable: bool,
) -> Charge {
    let r = view.req;
    let model = r.model.as_deref();
    let prompt = r.prompt_tokens();
    let each = ns
        .models
        .output_reservation(model, r.max_tokens)
        .min(MAX_OUTPUT);
    let each = cap.map_or(each, |c| c.min(each));
    let choices = u64::from(r.choices.max(1));
    let output = each.saturating_mul(choices);
    let fit = rule.action.fit.filter(|_| lowerable);
    let (per_output, fit) = match limit.kind {
        CounterKind::Requests => (0.0, None),
        CounterKind::Tokens => (choices as f64, fit),
        CounterKind::Usd => (
            ns.models.lookup(model).output * choices as f64 / crate::model_table::PER_MILLION,
            fit,
        ),
    };
    Charge {
        rule: rule.id.clone(),
        source: limit.source,
        key: render_key(&ns.name, &rule.id, &limit.key, view),
        kind: limit.kind,
        limit: limit.limit,
        window_secs: limit.window_secs,
        amount: match limit.kind {
            CounterKind::Requests => 1.0,
            // Saturating: a request's `max_tokens` can be any i64. Without one, the model's
            // largest output is reserved (docs/budgets.md): never the prompt alone.
            CounterKind::Tokens => prompt.saturating_add(output) as f64,
            CounterKind::Usd => ns.models.estimate_usd(model, prompt, output),
        },
        scope: limit.scope,
        output: if limit.kind == CounterKind::Requests {
            0
        } else {
            each
        },
        per_output,
        fit,
        headers: limit.headers,
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
    use crate::context::RequestContext;

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
