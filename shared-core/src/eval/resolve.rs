//! Resolution: every rule outcome of a request (and of each batch item) into one [`Decision`].

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use super::{Outcome, Part};
use crate::cache_key;
use crate::context::RequestContext;
use crate::decision::{
    Actions, Charge, Decision, DecisionMetadata, Redaction, RuleError, RuleTrace, Verdict,
};
use crate::model::OnError;
use crate::set::{CompiledRule, Namespace, PolicySet};

/// The decision for a namespace no policy defines: deny.
pub(super) fn no_namespace(
    set: &PolicySet,
    ctx: &RequestContext,
    tags: &[String],
    explain: bool,
    key: Option<&str>,
) -> Decision {
    let inner = &set.0;
    Decision {
        decision: Verdict::Deny,
        reason: format!(
            "no policy for namespace `{}`: denied by default",
            ctx.namespace
        ),
        matched_rules: Vec::new(),
        actions: Actions {
            status: Some(403),
            ..Actions::default()
        },
        metadata: DecisionMetadata {
            namespace: ctx.namespace.clone(),
            bundle: inner.bundle.clone(),
            default_applied: true,
            // (No key, `DecisionKey::Unwanted`: nothing to cache under.)
            cacheable: key != Some(""),
            cache_key: key.map_or_else(
                || cache_key::compute(&inner.bundle, &ctx.namespace, tags, &[], ctx.views()),
                String::from,
            ),
            ..DecisionMetadata::default()
        },
        evaluation_time_us: 0,
        explain: explain.then(Vec::new),
    }
}

/// One enforcing match.
struct Hit<'a> {
    rule: &'a CompiledRule,
    verdict: Verdict,
    reason: String,
}

/// The decision of one part (the request, or one batch item).
struct PartDecision {
    verdict: Verdict,
    reason: String,
    matched_rules: Vec<String>,
    actions: Actions,
    policy: String,
    version: String,
    deciding_rule: Option<String>,
    shadow: Vec<String>,
    errors: Vec<RuleError>,
    charges: Vec<Charge>,
    remote: Vec<String>,
    cacheable: bool,
    trace: Vec<RuleTrace>,
}

pub(super) fn decide(
    set: &PolicySet,
    ns: &Namespace,
    ctx: &RequestContext,
    parts: &[Part],
    tags: &[String],
    explain: bool,
    key: Option<&str>,
) -> Decision {
    let inner = &set.0;
    // (The key the host looked up, when it says so: the same hash, not computed twice.)
    let cache_key = || {
        key.map_or_else(
            || cache_key::compute(&inner.bundle, &ns.name, tags, &ns.reads, ctx.views()),
            String::from,
        )
    };
    if let [part] = parts {
        // One request (not a batch): its decision as it is.
        let mut d = resolve_part(ns, part, explain);
        if d.verdict != Verdict::Allow {
            d.charges.clear();
        }
        let cacheable = d.cacheable;
        let max_tokens = max_tokens(ns, ctx, Some(part), d.verdict);
        let redact = redaction(ns, d.matched_rules.iter(), d.verdict);
        let (shadow, errors, charges, remote) = (
            core::mem::take(&mut d.shadow),
            core::mem::take(&mut d.errors),
            core::mem::take(&mut d.charges),
            core::mem::take(&mut d.remote),
        );
        return decision(
            d,
            ns,
            set,
            Merged {
                batch_item: None,
                shadow,
                errors,
                charges,
                remote,
                cacheable,
                cache_key: cache_key(),
                max_tokens,
                redact,
            },
            explain,
        );
    }
    let raw = parts;
    let parts: Vec<PartDecision> = parts
        .iter()
        .map(|part| resolve_part(ns, part, explain))
        .collect();
    // The strictest part decides (the request itself first on a tie).
    let deciding = parts
        .iter()
        .enumerate()
        .max_by_key(|(i, d)| (d.verdict, core::cmp::Reverse(*i)))
        .map_or(0, |(i, _)| i);
    let cacheable = parts.iter().all(|d| d.cacheable);
    let verdict = parts.get(deciding).map_or(ns.default, |d| d.verdict);
    let mut charges = Vec::new();
    let mut shadow = Vec::new();
    let mut errors = Vec::new();
    let mut remote: Vec<String> = Vec::new();
    for (i, d) in parts.iter().enumerate() {
        let prefix = match i {
            0 => String::new(),
            n => format!("batch item {}: ", n.saturating_sub(1)),
        };
        // Only a request that goes ahead charges its counters.
        if verdict == Verdict::Allow {
            charges.extend(d.charges.iter().cloned());
        }
        for s in &d.shadow {
            if !shadow.contains(s) {
                shadow.push(s.clone());
            }
        }
        errors.extend(d.errors.iter().map(|e| RuleError {
            rule: e.rule.clone(),
            message: format!("{prefix}{}", e.message),
        }));
        for r in &d.remote {
            if !remote.contains(r) {
                remote.push(r.clone());
            }
        }
    }
    // A batch's items are its requests: what any of them matched redacts the body.
    let redact = redaction(
        ns,
        parts.iter().flat_map(|p| p.matched_rules.iter()),
        verdict,
    );
    let Some(d) = parts.into_iter().nth(deciding) else {
        return no_namespace(set, ctx, tags, explain, key);
    };
    let merged = Merged {
        batch_item: deciding.checked_sub(1),
        shadow,
        errors,
        charges,
        remote,
        cacheable,
        cache_key: cache_key(),
        max_tokens: max_tokens(ns, ctx, raw.first(), verdict),
        redact,
    };
    decision(d, ns, set, merged, explain)
}

/// What a decision takes from every part (for one request: from itself).
struct Merged {
    batch_item: Option<usize>,
    shadow: Vec<String>,
    errors: Vec<RuleError>,
    charges: Vec<Charge>,
    remote: Vec<String>,
    cacheable: bool,
    cache_key: String,
    max_tokens: Option<u64>,
    /// What the request has replaced: the redactions of every part's matching rules.
    redact: Option<Redaction>,
}

/// The output cap the request goes ahead with, when a `transform.maxTokens` lowered it below
/// its own (a request without one may be answered with the model's largest output).
fn max_tokens(
    ns: &Namespace,
    ctx: &RequestContext,
    part: Option<&Part>,
    verdict: Verdict,
) -> Option<u64> {
    let r = &ctx.request;
    if verdict != Verdict::Allow || !crate::rewrite::lowers(r.api) {
        return None;
    }
    let lowered = part?.lowered()?;
    let own = ns
        .models
        .output_reservation(r.model.as_deref(), r.max_tokens);
    (lowered < own).then_some(lowered)
}

/// What the request has replaced before it goes upstream: the kinds of every enforcing rule that
/// matched and redacts (as with a fixed `maxTokens`, a matching rule's transform applies whichever
/// rule decided), restored when any of them restores.
fn redaction<'a>(
    ns: &Namespace,
    matched: impl Iterator<Item = &'a String>,
    verdict: Verdict,
) -> Option<Redaction> {
    if verdict != Verdict::Allow {
        return None;
    }
    let matched: Vec<&String> = matched.collect();
    let mut kinds = crate::detect::Entities::none();
    let mut restore = false;
    for r in ns
        .rules
        .iter()
        .filter(|r| !r.shadow && matched.contains(&&r.id))
    {
        if let Some(x) = r.action.redact {
            kinds = kinds.union(x.kinds);
            restore |= x.restore;
        }
    }
    (!kinds.is_empty()).then(|| Redaction {
        kinds: kinds.iter().map(|e| String::from(e.name())).collect(),
        restore,
        counts: BTreeMap::new(),
    })
}

/// The decision of the deciding part `d`, with what all parts contribute.
fn decision(
    d: PartDecision,
    ns: &Namespace,
    set: &PolicySet,
    m: Merged,
    explain: bool,
) -> Decision {
    let redact = m.redact;
    let redacts = redact.is_some();
    Decision {
        decision: d.verdict,
        reason: d.reason,
        matched_rules: d.matched_rules,
        actions: Actions {
            counters: m.charges,
            max_tokens: m.max_tokens,
            redact,
            ..d.actions
        },
        metadata: DecisionMetadata {
            namespace: ns.name.clone(),
            policy: d.policy,
            version: d.version,
            bundle: set.0.bundle.clone(),
            default_applied: d.deciding_rule.is_none(),
            deciding_rule: d.deciding_rule,
            batch_item: m.batch_item,
            shadow_matches: m.shadow,
            errors: m.errors,
            // A redacting decision carries its request's counts: never reused.
            // (An empty key, `DecisionKey::Unwanted`: nothing to cache under.)
            cacheable: m.cacheable && !redacts && !m.cache_key.is_empty(),
            cache_key: m.cache_key,
            needs_remote: !m.remote.is_empty(),
            remote_rules: m.remote,
        },
        evaluation_time_us: 0,
        explain: explain.then_some(d.trace),
    }
}

fn resolve_part(ns: &Namespace, part: &Part, explain: bool) -> PartDecision {
    let outcomes = &part.outcomes;
    let mut hits: Vec<Hit<'_>> = Vec::new();
    let mut shadow = Vec::new();
    let mut errors = Vec::new();
    let mut charges = Vec::new();
    let mut remote: Vec<&CompiledRule> = Vec::new();
    let cacheable = part.cacheable;
    let mut trace: Vec<RuleTrace> = Vec::new();
    for (pos, outcome) in outcomes {
        let Some(rule) = ns.rules.get(*pos as usize) else {
            continue;
        };
        if explain {
            trace.push(rule_trace(rule, outcome));
        }
        match outcome {
            Outcome::Matched(charge) => {
                charges.extend(charge.iter().cloned());
                if rule.shadow {
                    shadow.push(rule.id.clone());
                } else {
                    hits.push(Hit {
                        rule,
                        verdict: rule.action.decision,
                        reason: rule.action.reason.clone(),
                    });
                }
            }
            Outcome::Error(e) => {
                errors.push(RuleError {
                    rule: rule.id.clone(),
                    message: e.clone(),
                });
                if rule.on_error == OnError::Deny && !rule.shadow {
                    hits.push(Hit {
                        rule,
                        verdict: Verdict::Deny,
                        reason: format!("rule `{}` failed and fails closed: {e}", rule.id),
                    });
                }
            }
            Outcome::Remote(charge) => {
                charges.extend(charge.iter().cloned());
                remote.push(rule);
            }
            Outcome::UnderLimit(charge) => charges.push(charge.clone()),
            // Waiting states never reach resolution: an unanswered need becomes `Remote`.
            Outcome::WaitPlugin(_) | Outcome::WaitCounter(..) => remote.push(rule),
            Outcome::NotMatched | Outcome::NotSelected | Outcome::Skipped => {}
        }
    }
    if explain {
        for (id, prio) in &ns.disabled {
            trace.push(RuleTrace {
                rule: id.clone(),
                priority: *prio,
                outcome: "disabled".into(),
                shadow: false,
                detail: None,
            });
        }
        trace.sort_by_key(|t| core::cmp::Reverse(t.priority));
    }

    // Rules are visited by descending priority, so `hits` is too.
    let top = hits.first().map(|h| h.rule.priority);
    let decider = top.and_then(|p| {
        hits.iter()
            .enumerate()
            .take_while(|(_, h)| h.rule.priority == p)
            .max_by_key(|(i, h)| (h.verdict, core::cmp::Reverse(*i)))
            .map(|(i, _)| i)
    });
    let mut actions = Actions::default();
    let mut matched_rules = Vec::with_capacity(hits.len());
    // Headers: the deciding rule's win a clash, then higher priority, then file order.
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    let order = decider
        .into_iter()
        .chain((0..hits.len()).filter(|i| Some(*i) != decider));
    for i in order {
        let Some(h) = hits.get(i) else {
            continue;
        };
        matched_rules.push(h.rule.id.clone());
        for (k, v) in &h.rule.action.headers {
            headers.entry(k.clone()).or_insert_with(|| v.clone());
        }
        actions.audit |= h.rule.action.audit;
        actions.alert = actions.alert.max(h.rule.action.alert);
    }
    actions.headers = headers;
    let (verdict, reason, policy, version, deciding_rule) = match decider.and_then(|i| hits.get(i))
    {
        Some(h) => {
            let info = ns.policies.get(h.rule.policy);
            let reason = if h.reason.is_empty() {
                format!("matched rule `{}`", h.rule.id)
            } else {
                h.reason.clone()
            };
            actions.status = match h.verdict {
                Verdict::Allow => None,
                Verdict::Deny => Some(h.rule.action.status.unwrap_or(403)),
                Verdict::Throttle => Some(h.rule.action.status.unwrap_or(429)),
            };
            (
                h.verdict,
                reason,
                info.map(|p| p.name.clone()).unwrap_or_default(),
                info.map(|p| p.version.clone()).unwrap_or_default(),
                Some(h.rule.id.clone()),
            )
        }
        None => {
            actions.status = (ns.default == Verdict::Deny).then_some(403);

            (
                ns.default,
                String::from(default_reason(ns.default)),
                ns.policy_names.clone(),
                ns.policy_versions.clone(),
                None,
            )
        }
    };
    // Remote rules matter only if they could still decide (priority at or above the decider's).
    let remote: Vec<String> = remote
        .iter()
        .filter(|r| top.is_none_or(|p| r.priority >= p))
        .map(|r| r.id.clone())
        .collect();
    PartDecision {
        verdict,
        reason,
        matched_rules,
        actions,
        policy,
        version,
        deciding_rule,
        shadow,
        errors,
        charges,
        remote,
        cacheable,
        trace,
    }
}

fn rule_trace(rule: &CompiledRule, outcome: &Outcome) -> RuleTrace {
    let (label, detail) = match outcome {
        Outcome::NotSelected => ("not_selected", None),
        Outcome::Matched(Some(_)) => ("over_limit", None),
        Outcome::Matched(None) => ("matched", None),
        Outcome::NotMatched => ("not_matched", None),
        Outcome::Error(e) => ("error", Some(e.clone())),
        Outcome::Remote(_) | Outcome::WaitPlugin(_) | Outcome::WaitCounter(..) => ("remote", None),
        Outcome::UnderLimit(_) => ("under_limit", None),
        Outcome::Skipped => ("skipped", None),
    };
    RuleTrace {
        rule: rule.id.clone(),
        priority: rule.priority,
        outcome: label.to_string(),
        shadow: rule.shadow,
        detail,
    }
}

/// The reason of a decision no rule made: a constant, not formatted per request.
fn default_reason(default: Verdict) -> &'static str {
    match default {
        Verdict::Allow => "no rule matched: default allow",
        Verdict::Throttle => "no rule matched: default throttle",
        Verdict::Deny => "no rule matched: default deny",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_reason_names_the_default() {
        for v in [Verdict::Allow, Verdict::Throttle, Verdict::Deny] {
            assert_eq!(
                default_reason(v),
                format!("no rule matched: default {}", v.as_str())
            );
        }
    }
}
