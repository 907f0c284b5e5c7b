//! Redact instead of deny (`transform: {redact: [email, credit_card], restore: true}`): the
//! values of the named kinds in a request are replaced by typed placeholders (`<EMAIL_1>`; the
//! same value is the same placeholder) before it goes upstream, and, with `restore`, put back
//! where the answer repeats a placeholder ([`Restorer`]). The filter and the server's ext_proc
//! edge both call this module; decisions and audit records carry only kinds and counts.
//!
//! What is replaced: every value the scanners find in the text as sent ([`pii::scan`], with the
//! confidence `request.prompt_entities` needs) in every JSON string of the body, keys included,
//! except inline binary data (a `data:` URL, a long base64 run). A value the scanners find only
//! in a view of the text (spelled out, encoded, split across turns) has no place to be replaced
//! at: after replacing, the request is read again as a rule would read it, and if
//! `request.prompt_entities` still holds a redacted kind the request is refused
//! ([`Unredactable`]): the upstream never sees a value of a kind the policy redacts.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::ops::Range;

use crate::context::{ContextConfig, Needs, RequestContext, RequestInput, ENTITY_CONFIDENCE};
use crate::decision::{Decision, Redaction, Verdict};
use crate::detect::{pii, Entities, Entity};

mod restore;

pub use restore::Restorer;

/// The kinds a `transform.redact` entry names: an entity name, or the groups `card`
/// (`credit_card`) and `secret` (`api_key`, `private_key`).
pub fn kinds_named(name: &str) -> Option<Entities> {
    let one = |e| Some(Entities::none().with(e));
    match name {
        "card" => one(Entity::CreditCard),
        "secret" | "secrets" => Some(
            Entities::none()
                .with(Entity::ApiKey)
                .with(Entity::PrivateKey),
        ),
        other => Entity::from_name(other).and_then(one),
    }
}

/// The kinds of a decision's redaction.
pub fn kinds_of(r: &Redaction) -> Entities {
    r.kinds
        .iter()
        .filter_map(|k| Entity::from_name(k))
        .fold(Entities::none(), |acc, e| acc.with(e))
}

/// The placeholder text of the `n`th value of `e`: `<EMAIL_1>`.
fn placeholder(e: Entity, n: u32) -> String {
    let mut s = String::from("<");
    s.push_str(&e.name().to_ascii_uppercase());
    s.push('_');
    s.push_str(&n.to_string());
    s.push('>');
    s
}

/// The values a request had replaced, by placeholder: what [`Restorer`] puts back. Held only in
/// the memory of the stream that redacted (never in metadata, headers or records).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Placeholders {
    /// Placeholder → value.
    by_placeholder: BTreeMap<String, String>,
    /// Value → placeholder.
    by_value: BTreeMap<String, String>,
    /// Placeholder-shaped words the request itself holds: never given a value.
    taken: BTreeSet<String>,
}

impl core::fmt::Debug for Placeholders {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Never the values, even in a debug log.
        f.debug_list().entries(self.by_placeholder.keys()).finish()
    }
}

impl Placeholders {
    /// Whether nothing is to be put back.
    pub fn is_empty(&self) -> bool {
        self.by_placeholder.is_empty()
    }

    /// Keeps for the answer only the values `restorable` says may be given back.
    fn keep_restorable(&mut self, restorable: impl Fn(&str) -> bool) {
        self.by_placeholder.retain(|_, v| restorable(v));
    }

    /// The value of `placeholder`.
    pub(crate) fn value(&self, placeholder: &str) -> Option<&str> {
        self.by_placeholder.get(placeholder).map(String::as_str)
    }

    /// Whether `s` is the start (not the whole) of a placeholder.
    pub(crate) fn starts_one(&self, s: &str) -> bool {
        self.by_placeholder
            .range::<str, _>((core::ops::Bound::Included(s), core::ops::Bound::Unbounded))
            .next()
            .is_some_and(|(p, _)| p.len() > s.len() && p.starts_with(s))
    }

    /// The placeholder of `value` of kind `e`, numbered on first sight (`counts`: the last
    /// number of each kind); numbers whose placeholder the request itself contains are skipped,
    /// so a placeholder written by the client is never restored to a value.
    fn of(&mut self, e: Entity, value: &str, counts: &mut [u32]) -> String {
        if let Some(p) = self.by_value.get(value) {
            return p.clone();
        }
        let n = counts.get_mut(e as usize);
        let mut next = n.as_deref().copied().unwrap_or(0);
        let p = loop {
            next = next.saturating_add(1);
            let p = placeholder(e, next);
            if !self.taken.contains(&p) || next == u32::MAX {
                break p;
            }
        };
        if let Some(n) = n {
            *n = next;
        }
        self.by_placeholder.insert(p.clone(), String::from(value));
        self.by_value.insert(String::from(value), p.clone());
        p
    }
}

/// The placeholder-shaped words (`<WORD_12>`) in `text`.
fn placeholder_words(text: &[u8], into: &mut BTreeSet<String>) {
    let mut i = 0;
    while let Some(at) = text
        .get(i..)
        .and_then(|t| t.iter().position(|b| *b == b'<'))
    {
        let start = i.saturating_add(at);
        let word = text
            .get(start.saturating_add(1)..)
            .unwrap_or_default()
            .iter()
            .take(40)
            .position(|b| !(b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_'));
        if let Some(len) = word {
            if len > 0 && text.get(start.saturating_add(1).saturating_add(len)) == Some(&b'>') {
                if let Some(w) = text.get(start..start.saturating_add(len).saturating_add(2)) {
                    into.insert(String::from_utf8_lossy(w).into_owned());
                }
            }
        }
        i = start.saturating_add(1);
    }
}

/// A request redacted: the body to send, what was replaced, and how many distinct values of each
/// kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redacted {
    /// The body to send upstream (the original when nothing was replaced).
    pub body: Option<Vec<u8>>,
    /// What [`Restorer`] puts back.
    pub placeholders: Placeholders,
    /// Distinct values replaced, by kind name.
    pub counts: BTreeMap<String, u32>,
}

/// A request that cannot be redacted: it is refused, never forwarded as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unredactable {
    /// It still holds a value of these redacted kinds after redaction (written so that the
    /// scanners find it only in a view: spelled out, encoded, split across turns).
    Disguised {
        /// The kinds left (names).
        kinds: Vec<String>,
    },
    /// Some of its text cannot be read (an escape that is no character, bytes that are not
    /// UTF-8), so what it holds cannot be known.
    Unreadable,
}

impl Unredactable {
    /// The reply refusing the request: 403 in the provider's format, marked denied.
    pub fn reply(&self, provider: crate::context::Provider) -> crate::reply::Reply {
        crate::reply::Reply {
            status: 403,
            body: crate::reply::error_body(provider, 403, "policy_denied", &self.reason()),
            headers: alloc::vec![
                (
                    String::from(crate::reply::DECISION_HEADER),
                    String::from("deny")
                ),
                (
                    String::from("content-type"),
                    String::from("application/json")
                ),
            ],
        }
    }

    /// The reason given to the client and recorded.
    pub fn reason(&self) -> String {
        match self {
            Unredactable::Disguised { kinds } => alloc::format!(
                "the request holds {} that the policy redacts, written so that it cannot be replaced",
                kinds.join(", ")
            ),
            Unredactable::Unreadable => String::from(
                "the request holds text that cannot be read (an escape that is no character, or bytes that are not UTF-8): what the policy redacts cannot be found in it",
            ),
        }
    }
}

/// Keys whose value is a credential the provider needs to act for the client (an MCP server's
/// token), never text the model reads: not redacted.
const CREDENTIAL_KEYS: &[&str] = &["authorization", "authorization_token"];

/// Redacts `input`'s body: every value of `kinds` replaced by its placeholder, then the body
/// read again as a rule reads it (with `config`); a redacted kind still found refuses it. With
/// `restore`, the placeholders kept for the answer are those of values the request's user turns
/// hold: a value only the application put in (a system prompt, a tool definition, `metadata`)
/// is never given back, whatever the model is asked to repeat.
pub fn redact(
    input: &RequestInput<'_>,
    config: &ContextConfig,
    kinds: Entities,
    restore: bool,
) -> Result<Redacted, Unredactable> {
    let mut placeholders = Placeholders::default();
    let mut numbers = [0u32; Entity::ALL.len()];
    let mut distinct = [0u32; Entity::ALL.len()];
    let body = input.body;
    let mut out: Option<Vec<u8>> = None;
    // Only a JSON body has text a rule reads (anything else passes as it is, and is read again
    // below like any other).
    let json = serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok();
    let tokens: Vec<Range<usize>> = if json {
        strings(body).collect()
    } else {
        Vec::new()
    };
    let mut texts = Vec::with_capacity(tokens.len());
    for token in &tokens {
        // A string that does not decode (a lone surrogate escape passes a JSON check) could
        // hide anything.
        let text = body
            .get(token.clone())
            .and_then(decode)
            .ok_or(Unredactable::Unreadable)?;
        // Placeholders the client wrote itself (decoded: `\u003c` is `<`) are never reused.
        placeholder_words(text.as_bytes(), &mut placeholders.taken);
        texts.push(text);
    }
    let mut at = 0;
    let mut key: Option<&str> = None;
    for (token, text) in tokens.iter().zip(&texts) {
        let is_key = body
            .get(token.end..)
            .unwrap_or_default()
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            == Some(&b':');
        let credential = !is_key
            && key.is_some_and(|k| CREDENTIAL_KEYS.iter().any(|c| c.eq_ignore_ascii_case(k)));
        if is_key {
            key = Some(text);
        }
        if credential || binary(text) {
            continue;
        }
        let found = spans(text, kinds);
        if found.is_empty() {
            continue;
        }
        let mut replaced = String::with_capacity(text.len());
        let mut from = 0;
        for (e, span) in found {
            let (Some(before), Some(value)) = (text.get(from..span.start), text.get(span.clone()))
            else {
                continue;
            };
            replaced.push_str(before);
            let known = placeholders.by_value.len();
            let p = placeholders.of(e, value, &mut numbers);
            if placeholders.by_value.len() > known {
                if let Some(d) = distinct.get_mut(e as usize) {
                    *d = d.saturating_add(1);
                }
            }
            replaced.push_str(&p);
            from = span.end;
        }
        replaced.push_str(text.get(from..).unwrap_or_default());
        let o = out.get_or_insert_with(|| Vec::with_capacity(body.len()));
        o.extend_from_slice(body.get(at..token.start).unwrap_or_default());
        match serde_json::to_vec(&replaced) {
            Ok(encoded) => o.extend_from_slice(&encoded),
            Err(_) => return Err(Unredactable::Unreadable),
        }
        at = token.end;
    }
    if let Some(o) = &mut out {
        o.extend_from_slice(body.get(at..).unwrap_or_default());
    }
    // Read again, as `request.prompt_entities` reads it: views, decoded runs, seams of turns.
    // Placeholders are longer than some values: the body the request was allowed with may grow
    // past the size limit, which is not a reason to stop reading it.
    let sent = RequestInput {
        body: out.as_deref().unwrap_or(body),
        ..*input
    };
    let unbounded = ContextConfig {
        max_body_bytes: usize::MAX,
        ..config.clone()
    };
    let needs = Needs {
        prompt: true,
        entities: true,
        ..Needs::NONE
    };
    match RequestContext::from_request_with(&sent, &unbounded, needs) {
        Ok(ctx) => {
            let left: Vec<String> = kinds
                .iter()
                .map(Entity::name)
                .filter(|k| {
                    core::iter::once(&ctx.request)
                        .chain(&ctx.batch)
                        .any(|r| r.prompt_entities.iter().any(|f| f == k))
                })
                .map(String::from)
                .collect();
            if !left.is_empty() {
                return Err(Unredactable::Disguised { kinds: left });
            }
        }
        // A JSON body the reader refuses: nothing reads its text (it is refused before it
        // is checked, or is no API's), except one that could not be read again.
        Err(_) if json => return Err(Unredactable::Unreadable),
        Err(_) => {}
    }
    if restore && !placeholders.is_empty() {
        let original = RequestContext::from_request_with(
            input,
            &unbounded,
            Needs {
                messages: true,
                ..Needs::NONE
            },
        )
        .map(|ctx| {
            core::iter::once(ctx.request)
                .chain(ctx.batch)
                .flat_map(|r| r.messages)
                .filter(|m| m.role == "user")
                .map(|m| m.content)
                .collect::<Vec<String>>()
        })
        .unwrap_or_default();
        placeholders.keep_restorable(|value| original.iter().any(|t| t.contains(value)));
    } else {
        placeholders.by_placeholder.clear();
    }
    let counts = Entity::ALL
        .into_iter()
        .filter_map(|e| {
            let n = distinct.get(e as usize).copied().unwrap_or(0);
            (n > 0).then(|| (String::from(e.name()), n))
        })
        .collect();
    Ok(Redacted {
        body: out,
        placeholders,
        counts,
    })
}

/// Applies a decision's redaction to its request: `Ok(None)` when the decision redacts nothing
/// (not an allow, or no redacting rule matched); the counts are written into the decision. A
/// request that cannot be redacted turns the decision into a deny (403) with the reason.
pub fn apply(
    decision: &mut Decision,
    input: &RequestInput<'_>,
    config: &ContextConfig,
) -> Option<Redacted> {
    if decision.decision != Verdict::Allow {
        return None;
    }
    let r = decision.actions.redact.as_mut()?;
    match redact(input, config, kinds_of(r), r.restore) {
        Ok(done) => {
            r.counts = done.counts.clone();
            Some(done)
        }
        Err(left) => {
            decision.decision = Verdict::Deny;
            decision.reason = left.reason();
            decision.actions.status = Some(403);
            decision.actions.counters.clear();
            decision.actions.max_tokens = None;
            decision.actions.redact = None;
            decision.metadata.cacheable = false;
            None
        }
    }
}

/// The `(kind, span)` of each value of `kinds` in `text`, in order, none overlapping (the
/// longer, then the more confident, of overlapping findings).
fn spans(text: &str, kinds: Entities) -> Vec<(Entity, Range<usize>)> {
    let mut found: Vec<pii::Finding> = pii::scan(text, kinds)
        .into_iter()
        .filter(|f| f.confidence >= ENTITY_CONFIDENCE && f.end > f.start)
        .collect();
    found.sort_by(|a, b| {
        a.start
            .cmp(&b.start)
            .then(b.end.cmp(&a.end))
            .then(b.confidence.total_cmp(&a.confidence))
    });
    let mut out: Vec<(Entity, Range<usize>)> = Vec::new();
    for f in found {
        if let Some((_, last)) = out.last_mut() {
            if f.start < last.end {
                // Overlapping: one placeholder over both.
                last.end = last.end.max(f.end);
                continue;
            }
        }
        out.push((f.entity, f.start..f.end));
    }
    out.retain(|(_, s)| text.is_char_boundary(s.start) && text.is_char_boundary(s.end));
    out
}

/// Inline binary data, never text: a `data:` URL, or a long run of base64 without a space.
fn binary(text: &str) -> bool {
    text.get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case("data:"))
        || (text.len() > 256
            && text.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_')
            }))
}

/// The byte range of every string (keys too) of a valid JSON text, quotes included.
pub(crate) fn strings(json: &[u8]) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut i = 0;
    core::iter::from_fn(move || {
        while let Some(&b) = json.get(i) {
            if b != b'"' {
                i = i.saturating_add(1);
                continue;
            }
            let start = i;
            let mut j = i.saturating_add(1);
            while let Some(&c) = json.get(j) {
                match c {
                    b'\\' => j = j.saturating_add(2),
                    b'"' => break,
                    _ => j = j.saturating_add(1),
                }
            }
            i = j.saturating_add(1);
            return Some(start..i.min(json.len()));
        }
        None
    })
}

/// A JSON string token decoded (borrowed when it has no escape).
pub(crate) fn decode(token: &[u8]) -> Option<alloc::borrow::Cow<'_, str>> {
    let inner = token.get(1..token.len().checked_sub(1)?)?;
    if !inner.contains(&b'\\') {
        return core::str::from_utf8(inner)
            .ok()
            .map(alloc::borrow::Cow::Borrowed);
    }
    serde_json::from_slice::<String>(token)
        .ok()
        .map(alloc::borrow::Cow::Owned)
}

#[cfg(test)]
mod tests;
