//! Evaluation and resolution: candidate rules through the index, every match collected, then one
//! decision. Highest-priority enforcing match decides (ties: deny > throttle > allow); headers,
//! audit and alert of all enforcing matches merge; shadow matches are reported only; the
//! namespace default applies when nothing enforcing matched.
//!
//! What the core cannot do alone goes through [`Hooks`]: WASM plugins and counters (rate limits,
//! budgets). [`LocalOnly`] answers "unknown" to both, and the decision then says which rules the
//! server must finish (`metadata.needs_remote`).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::cache_key;
use crate::compile::{CompiledRule, KeyPart, Namespace, PolicySet};
use crate::condition::Scratch;
use crate::context::{FieldValue, RequestContext};
use crate::decision::{
    Actions, Charge, CounterKind, Decision, DecisionMetadata, RuleError, RuleTrace, Verdict,
};
use crate::model::{OnError, PluginRef, Scope};

/// Options of one evaluation.
#[derive(Debug, Clone, Copy, Default)]
pub struct EvalOptions<'a> {
    /// Only rules carrying at least one of these tags (all rules when empty).
    pub tags: &'a [String],
    /// Report every rule's outcome in `explain`.
    pub explain: bool,
}

/// A plugin condition's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginCheck {
    /// The plugin ran.
    Matched(bool),
    /// The plugin failed (the rule's `onError` applies).
    Error(String),
    /// Plugins cannot run here; the server must evaluate the rule.
    Unavailable,
}

/// The state of a counter after a match charged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterCheck {
    /// Within the limit: the rule's action does not apply.
    Under,
    /// Over the limit: the rule's action applies.
    Over,
    /// Not counted here.
    Unknown,
}

/// What the core asks of its host.
pub trait Hooks {
    /// Evaluates a plugin condition.
    fn plugin(&mut self, rule: &str, plugin: &PluginRef, ctx: &RequestContext) -> PluginCheck;
    /// Checks (and, for a server, reserves) a counter.
    fn counter(&mut self, charge: &Charge) -> CounterCheck;
}

/// No plugins, no counters: what the CLI and a filter without a server can do.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalOnly;

impl Hooks for LocalOnly {
    fn plugin(&mut self, _: &str, _: &PluginRef, _: &RequestContext) -> PluginCheck {
        PluginCheck::Unavailable
    }
    fn counter(&mut self, _: &Charge) -> CounterCheck {
        CounterCheck::Unknown
    }
}

/// One enforcing match.
struct Hit<'a> {
    rule: &'a CompiledRule,
    verdict: Verdict,
    reason: String,
}

enum Outcome {
    Matched,
    NotMatched,
    Error(String),
    Remote,
    UnderLimit,
}

impl PolicySet {
    /// Evaluates one request. Never panics and never fails: condition errors follow each rule's
    /// `onError` and are reported in `metadata.errors`.
    pub fn evaluate(
        &self,
        ctx: &RequestContext,
        opts: &EvalOptions<'_>,
        hooks: &mut dyn Hooks,
    ) -> Decision {
        #[cfg(feature = "std")]
        let start = std::time::Instant::now();
        let mut d = self.decide(ctx, opts, hooks);
        #[cfg(feature = "std")]
        {
            d.evaluation_time_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        }
        #[cfg(not(feature = "std"))]
        {
            d.evaluation_time_us = 0;
        }
        d
    }

    fn decide(
        &self,
        ctx: &RequestContext,
        opts: &EvalOptions<'_>,
        hooks: &mut dyn Hooks,
    ) -> Decision {
        let inner = &self.0;
        let mut tags: Vec<String> = opts.tags.to_vec();
        tags.sort();
        tags.dedup();
        let Some(ns) = inner.namespaces.get(ctx.namespace.as_str()) else {
            return Decision {
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
                    cacheable: true,
                    cache_key: cache_key::compute(&inner.bundle, &ctx.namespace, &tags, &[], ctx),
                    ..DecisionMetadata::default()
                },
                evaluation_time_us: 0,
                explain: opts.explain.then(Vec::new),
            };
        };
        let selected = tag_mask(ns, &tags);
        let mut candidates: Vec<u32> = Vec::new();
        if opts.explain {
            candidates.extend(0..u32::try_from(ns.rules.len()).unwrap_or(u32::MAX));
        } else {
            ns.index.candidates(ctx, &mut candidates);
        }
        let mut scratch = Scratch {
            #[cfg(feature = "cel")]
            cel_reads: &ns.cel_reads,
            ..Scratch::default()
        };
        let mut hits: Vec<Hit<'_>> = Vec::new();
        let mut shadow = Vec::new();
        let mut errors = Vec::new();
        let mut charges = Vec::new();
        let mut remote: Vec<&CompiledRule> = Vec::new();
        let mut cacheable = true;
        let mut trace: Vec<RuleTrace> = Vec::new();
        let explain = opts.explain;

        for &i in &candidates {
            let Some(rule) = ns.rules.get(i as usize) else {
                continue;
            };
            if let Some(mask) = &selected {
                if !bit(mask, i as usize) {
                    if explain {
                        trace.push(rt(rule, "not_selected", None));
                    }
                    continue;
                }
            }
            cacheable &= !rule.volatile;
            let outcome = run_rule(rule, ns, ctx, &mut scratch, hooks, &mut charges);
            let (label, detail) = match &outcome {
                Outcome::Matched => ("matched", None),
                Outcome::NotMatched => ("not_matched", None),
                Outcome::Error(e) => ("error", Some(e.clone())),
                Outcome::Remote => ("remote", None),
                Outcome::UnderLimit => ("under_limit", None),
            };
            if explain {
                let label = if matches!(outcome, Outcome::Matched) && rule.action.limit.is_some() {
                    "over_limit"
                } else {
                    label
                };
                trace.push(rt(rule, label, detail));
            }
            match outcome {
                Outcome::Matched if rule.shadow => shadow.push(rule.id.clone()),
                Outcome::Matched => hits.push(Hit {
                    rule,
                    verdict: rule.action.decision,
                    reason: rule.action.reason.clone(),
                }),
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
                Outcome::Remote => remote.push(rule),
                Outcome::NotMatched | Outcome::UnderLimit => {}
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
        }

        // Resolve: rules are visited by descending priority, so `hits` is too.
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
        if let Some(di) = decider {
            if let Some(h) = hits.get(di) {
                matched_rules.push(h.rule.id.clone());
            }
        }
        for (i, h) in hits.iter().enumerate() {
            if Some(i) != decider {
                matched_rules.push(h.rule.id.clone());
            }
            for (k, v) in &h.rule.action.headers {
                actions
                    .headers
                    .entry(k.clone())
                    .or_insert_with(|| v.clone());
            }
            actions.audit |= h.rule.action.audit;
            actions.alert = actions.alert.max(h.rule.action.alert);
        }
        let (verdict, reason, policy, version, deciding_rule) = match decider
            .and_then(|i| hits.get(i))
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
                let names: Vec<&str> = ns.policies.iter().map(|p| p.name.as_str()).collect();
                let versions: Vec<&str> = ns.policies.iter().map(|p| p.version.as_str()).collect();
                (
                    ns.default,
                    format!("no rule matched: default {}", ns.default.as_str()),
                    names.join(","),
                    versions.join(","),
                    None,
                )
            }
        };
        // Remote rules matter only if they could still decide (priority at or above the decider's).
        let remote_rules: Vec<String> = remote
            .iter()
            .filter(|r| top.is_none_or(|p| r.priority >= p))
            .map(|r| r.id.clone())
            .collect();
        if explain {
            trace.sort_by_key(|t| core::cmp::Reverse(t.priority));
        }
        Decision {
            decision: verdict,
            reason,
            matched_rules,
            actions: Actions {
                // Only a request that goes ahead charges its counters.
                counters: if verdict == Verdict::Allow {
                    charges
                } else {
                    Vec::new()
                },
                ..actions
            },
            metadata: DecisionMetadata {
                namespace: ns.name.clone(),
                policy,
                version,
                bundle: inner.bundle.clone(),
                deciding_rule: deciding_rule.clone(),
                default_applied: deciding_rule.is_none(),
                shadow_matches: shadow,
                errors,
                cacheable,
                cache_key: cache_key::compute(&inner.bundle, &ns.name, &tags, &ns.reads, ctx),
                needs_remote: !remote_rules.is_empty(),
                remote_rules,
            },
            evaluation_time_us: 0,
            explain: explain.then_some(trace),
        }
    }
}

/// Evaluates one rule: its condition (or plugin), then its counter if it has one.
fn run_rule<'a>(
    rule: &CompiledRule,
    ns: &Namespace,
    ctx: &'a RequestContext,
    scratch: &mut Scratch<'a>,
    hooks: &mut dyn Hooks,
    charges: &mut Vec<Charge>,
) -> Outcome {
    let matched = match &rule.plugin {
        Some(p) => match hooks.plugin(&rule.id, p, ctx) {
            PluginCheck::Matched(b) => Ok(b),
            PluginCheck::Error(e) => Err(e),
            PluginCheck::Unavailable => return Outcome::Remote,
        },
        None => rule.cond.eval(ctx, scratch).map_err(|e| e.0),
    };
    match matched {
        Err(e) => Outcome::Error(e),
        Ok(false) => Outcome::NotMatched,
        Ok(true) => {
            let Some(limit) = &rule.action.limit else {
                return Outcome::Matched;
            };
            if rule.shadow {
                return Outcome::Matched;
            }
            let charge = Charge {
                rule: rule.id.clone(),
                source: limit.source,
                key: render_key(&ns.name, &rule.id, &limit.key, ctx),
                kind: limit.kind,
                limit: limit.limit,
                window_secs: limit.window_secs,
                amount: match limit.kind {
                    CounterKind::Requests => 1.0,
                    CounterKind::Tokens => {
                        (ctx.request.estimated_tokens + ctx.request.max_tokens.unwrap_or(0).max(0))
                            as f64
                    }
                    CounterKind::Usd => 0.0,
                },
                scope: limit.scope,
            };
            let state = hooks.counter(&charge);
            charges.push(charge);
            match state {
                CounterCheck::Over => Outcome::Matched,
                CounterCheck::Under => Outcome::UnderLimit,
                CounterCheck::Unknown if limit.scope == Scope::Global => Outcome::Remote,
                CounterCheck::Unknown => Outcome::UnderLimit,
            }
        }
    }
}

fn rt(rule: &CompiledRule, outcome: &str, detail: Option<String>) -> RuleTrace {
    RuleTrace {
        rule: rule.id.clone(),
        priority: rule.priority,
        outcome: outcome.to_string(),
        shadow: rule.shadow,
        detail,
    }
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

/// `namespace/rule/rendered-template`; null values render as `-`.
fn render_key(ns: &str, rule: &str, parts: &[KeyPart], ctx: &RequestContext) -> String {
    let mut key = format!("{ns}/{rule}/");
    for p in parts {
        match p {
            KeyPart::Text(t) => key.push_str(t),
            KeyPart::Field(f) => match ctx.get(f) {
                FieldValue::Str(s) => key.push_str(s),
                FieldValue::Int(i) => key.push_str(&i.to_string()),
                FieldValue::Float(x) => key.push_str(&format!("{x}")),
                FieldValue::Bool(b) => key.push_str(if b { "true" } else { "false" }),
                _ => key.push('-'),
            },
        }
    }
    key
}
