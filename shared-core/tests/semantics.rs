//! Evaluation semantics: priorities, ties, merging, shadow rules, errors, defaults, namespaces,
//! tags, counters, remote rules and cache keys.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;

use common::{compile, ctx, eval, policy};
use llm_policy_core::decision::Verdict;
use llm_policy_core::model::Alert;
use llm_policy_core::{
    Answer, CounterCheck, EvalOptions, Hooks, LocalOnly, NeedKind, Pending, PluginCheck, Step,
    Timing,
};

const RULES: &str = r#"
    - id: deny-gpt4o
      priority: 10
      when: { cel: "request.model == 'gpt-4o'" }
      action: { decision: deny, reason: "no gpt-4o", headers: { x-a: deny }, alert: low }
    - id: throttle-gpt4o
      priority: 10
      when: { match: { field: request.model, op: eq, value: gpt-4o } }
      action: { decision: throttle, reason: "slow down", headers: { x-a: throttle, x-b: t }, audit: true, alert: high }
    - id: allow-pro
      priority: 20
      when: { match: { field: principal.tier, op: eq, value: pro } }
      action: { decision: allow, reason: "pro users", headers: { x-c: pro } }
    - id: shadow-all-gpt
      priority: 100
      mode: shadow
      when: { match: { field: request.model, op: starts_with, value: gpt- } }
      action: { decision: deny, reason: "observing" }
"#;

#[test]
fn ties_resolve_deny_over_throttle_and_actions_merge() {
    let set = compile(&policy("allow", RULES)).unwrap();
    let d = eval(&set, &ctx(&[], r#"{"model":"gpt-4o"}"#));
    assert_eq!(d.decision, Verdict::Deny);
    assert_eq!(d.reason, "no gpt-4o");
    assert_eq!(d.matched_rules, vec!["deny-gpt4o", "throttle-gpt4o"]);
    assert_eq!(d.actions.status, Some(403));
    // The deciding (first) rule's header wins a clash; others merge.
    assert_eq!(
        d.actions.headers.get("x-a").map(String::as_str),
        Some("deny")
    );
    assert_eq!(d.actions.headers.get("x-b").map(String::as_str), Some("t"));
    assert!(d.actions.audit);
    assert_eq!(d.actions.alert, Some(Alert::High));
    assert_eq!(d.metadata.shadow_matches, vec!["shadow-all-gpt"]);
    assert_eq!(d.metadata.deciding_rule.as_deref(), Some("deny-gpt4o"));
    assert!(!d.metadata.default_applied);
}

#[test]
fn higher_priority_allow_beats_lower_deny() {
    let set = compile(&policy("deny", RULES)).unwrap();
    let d = eval(
        &set,
        &ctx(&[("x-user-tier", "pro")], r#"{"model":"gpt-4o"}"#),
    );
    assert_eq!(d.decision, Verdict::Allow);
    assert_eq!(
        d.matched_rules,
        vec!["allow-pro", "deny-gpt4o", "throttle-gpt4o"]
    );
    assert_eq!(d.actions.status, None);
    assert_eq!(d.reason, "pro users");
}

#[test]
fn default_applies_when_nothing_enforcing_matches() {
    let set = compile(&policy("deny", RULES)).unwrap();
    let d = eval(&set, &ctx(&[], r#"{"model":"gpt-4o-mini"}"#));
    assert_eq!(d.decision, Verdict::Deny);
    assert!(d.metadata.default_applied);
    assert_eq!(d.reason, "no rule matched: default deny");
    assert_eq!(d.metadata.shadow_matches, vec!["shadow-all-gpt"]);
    assert!(d.matched_rules.is_empty());
}

#[test]
fn default_is_deny_unless_said_otherwise() {
    let set = compile(
        "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: x}\nspec:\n  rules: []\n",
    )
    .unwrap();
    assert_eq!(eval(&set, &ctx(&[], "{}")).decision, Verdict::Deny);
}

#[test]
fn runtime_errors_follow_on_error() {
    let rules = r#"
    - id: strict
      priority: 5
      when: { cel: "request.temperature > 1.0" }
      action: { decision: allow }
    - id: lenient
      priority: 9
      onError: skip
      when: { cel: "request.headers['x-team'] == 'a'" }
      action: { decision: deny }
"#;
    let set = compile(&policy("allow", rules)).unwrap();
    let d = eval(&set, &ctx(&[], r#"{"model":"m"}"#));
    // `strict` errors (null > 1.0) and fails closed; `lenient` errors and is skipped.
    assert_eq!(d.decision, Verdict::Deny);
    assert_eq!(d.matched_rules, vec!["strict"]);
    assert!(d.reason.contains("fails closed"), "{}", d.reason);
    let errored: Vec<&str> = d.metadata.errors.iter().map(|e| e.rule.as_str()).collect();
    assert_eq!(errored, vec!["lenient", "strict"]);
    // With values present, no errors.
    let d = eval(
        &set,
        &ctx(&[("x-team", "b")], r#"{"model":"m","temperature":1.5}"#),
    );
    assert_eq!(d.decision, Verdict::Allow);
    assert!(d.metadata.errors.is_empty());
}

#[test]
fn dsl_null_comparisons_are_false_and_exists_tests_presence() {
    let rules = r#"
    - id: ne-free
      when: { match: { field: principal.tier, op: ne, value: free } }
      action: { decision: deny }
    - id: no-user
      priority: 1
      when: { match: { field: principal.id, op: exists, value: false } }
      action: { decision: throttle }
"#;
    let set = compile(&policy("allow", rules)).unwrap();
    let d = eval(&set, &ctx(&[], "{}"));
    assert_eq!(d.matched_rules, vec!["no-user"]);
    let d = eval(
        &set,
        &ctx(&[("x-user-tier", "pro"), ("x-user-id", "u")], "{}"),
    );
    assert_eq!(d.matched_rules, vec!["ne-free"]);
}

#[test]
fn namespaces_are_separate_and_unknown_namespace_is_denied() {
    let a = policy(
        "allow",
        "    - {id: r, when: {cel: 'true'}, action: {decision: deny}}\n",
    );
    let b = "---\napiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: other, namespace: team-b}\nspec: {defaultDecision: allow, rules: []}\n";
    let set = compile(&format!("{a}{b}")).unwrap();
    assert_eq!(set.namespaces(), vec!["default", "team-b"]);
    assert_eq!(eval(&set, &ctx(&[], "{}")).decision, Verdict::Deny);
    let d = eval(&set, &ctx(&[("x-llm-policy-namespace", "team-b")], "{}"));
    assert_eq!(d.decision, Verdict::Allow);
    let d = eval(&set, &ctx(&[("x-llm-policy-namespace", "nope")], "{}"));
    assert_eq!(d.decision, Verdict::Deny);
    assert!(d.reason.contains("no policy for namespace `nope`"));
}

#[test]
fn any_deny_default_in_a_namespace_makes_the_default_deny() {
    let a = policy(
        "allow",
        "    - {id: r, when: {cel: 'false'}, action: {decision: deny}}\n",
    );
    let b = "---\napiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: strict}\nspec: {defaultDecision: deny, rules: []}\n";
    let set = compile(&format!("{a}{b}")).unwrap();
    let d = eval(&set, &ctx(&[], "{}"));
    assert_eq!(d.decision, Verdict::Deny);
    assert_eq!(d.metadata.policy, "t,strict");
}

#[test]
fn tags_select_rules() {
    let rules = r#"
    - {id: a, tags: [x], when: {cel: 'true'}, action: {decision: deny}}
    - {id: b, tags: [y], priority: -1, when: {cel: 'true'}, action: {decision: throttle}}
"#;
    let set = compile(&policy("allow", rules)).unwrap();
    let c = ctx(&[], "{}");
    let y = vec!["y".to_string()];
    let d = set.evaluate(
        &c,
        &EvalOptions {
            tags: &y,
            explain: false,
            ..EvalOptions::default()
        },
        &mut LocalOnly,
    );
    assert_eq!(d.matched_rules, vec!["b"]);
    let none = vec!["zzz".to_string()];
    let d = set.evaluate(
        &c,
        &EvalOptions {
            tags: &none,
            explain: false,
            ..EvalOptions::default()
        },
        &mut LocalOnly,
    );
    assert!(d.matched_rules.is_empty());
    assert_ne!(
        set.evaluate(
            &c,
            &EvalOptions {
                tags: &y,
                explain: false,
                ..EvalOptions::default()
            },
            &mut LocalOnly
        )
        .metadata
        .cache_key,
        set.evaluate(&c, &EvalOptions::default(), &mut LocalOnly)
            .metadata
            .cache_key
    );
}

#[test]
fn a_skipped_clock_changes_nothing_but_the_evaluation_time() {
    let rules = format!(
        "{LIMITS}    - id: no-gpt-3\n      priority: 1\n      when: {{ match: {{ field: request.model, op: eq, value: gpt-3.5-turbo }} }}\n      action: {{ decision: deny, reason: \"no\" }}\n"
    );
    let set = compile(&policy("allow", &rules)).unwrap();
    let skipped = EvalOptions {
        timing: Timing::Skipped,
        ..EvalOptions::default()
    };
    for body in [r#"{"model":"gpt-3.5-turbo"}"#, r#"{"model":"gpt-4o"}"#] {
        let c = ctx(&[("x-user-id", "u1")], body);
        // At once (the callback form)...
        let measured = set.evaluate(&c, &EvalOptions::default(), &mut LocalOnly);
        let d = set.evaluate(&c, &skipped, &mut LocalOnly);
        assert_eq!(d.evaluation_time_us, 0);
        let mut without_time = measured.clone();
        without_time.evaluation_time_us = 0;
        assert_eq!(d, without_time, "{body}");
        // ...and in two phases, through a resumption (the plugin is asked for).
        let Step::Pending(mut p) = set.start(&c, &skipped) else {
            panic!("the plugin is asked for");
        };
        answer_all(&mut p, CounterCheck::Under);
        let Step::Done(d) = p.resume(&c) else {
            panic!("everything was answered");
        };
        assert_eq!(d.evaluation_time_us, 0);
    }
}

/// Answers every need of `p`: plugins do not match, counters are `counter`.
fn answer_all(p: &mut Pending, counter: CounterCheck) {
    for need in p.needs().to_vec() {
        let answer = match need.kind {
            NeedKind::Plugin(_) => Answer::Plugin(PluginCheck::Matched(false)),
            NeedKind::Counter(_) => Answer::Counter(counter),
        };
        p.answer(need.id, answer);
    }
}

struct Fake {
    over: bool,
    plugin: PluginCheck,
    charged: Vec<String>,
}

impl Hooks for Fake {
    fn plugin(
        &mut self,
        _: &str,
        _: &llm_policy_core::model::PluginRef,
        _: &llm_policy_core::RequestContext,
    ) -> PluginCheck {
        self.plugin.clone()
    }
    fn counter(&mut self, c: &llm_policy_core::decision::Charge) -> CounterCheck {
        self.charged.push(c.key.clone());
        if self.over {
            CounterCheck::Over
        } else {
            CounterCheck::Under
        }
    }
}

const LIMITS: &str = r#"
    - id: per-user
      priority: 5
      when: { match: { field: principal.id, op: exists } }
      action:
        decision: throttle
        reason: "too many"
        rateLimit: { key: "{principal.id}:{request.model}", requests: 10, per: 1m }
    - id: pii
      priority: 50
      when: { plugin: { name: pii-detector, args: { threshold: 0.5 } } }
      action: { decision: deny, reason: "pii" }
"#;

#[test]
fn rate_limits_apply_only_over_the_limit_and_report_charges() {
    let set = compile(&policy("allow", LIMITS)).unwrap();
    let c = ctx(&[("x-user-id", "u1")], r#"{"model":"gpt-4o"}"#);
    let mut under = Fake {
        over: false,
        plugin: PluginCheck::Matched(false),
        charged: vec![],
    };
    let d = set.evaluate(&c, &EvalOptions::default(), &mut under);
    assert_eq!(d.decision, Verdict::Allow);
    assert_eq!(under.charged, vec!["default/per-user/u1:gpt-4o"]);
    assert_eq!(d.actions.counters.len(), 1);
    assert_eq!(d.actions.counters[0].window_secs, 60);
    assert!(!d.metadata.needs_remote);
    assert!(!d.metadata.cacheable);
    let mut over = Fake {
        over: true,
        plugin: PluginCheck::Matched(false),
        charged: vec![],
    };
    let d = set.evaluate(&c, &EvalOptions::default(), &mut over);
    assert_eq!(d.decision, Verdict::Throttle);
    assert_eq!(d.actions.status, Some(429));
    assert!(
        d.actions.counters.is_empty(),
        "a rejected request charges nothing"
    );
}

#[test]
fn a_set_names_the_plugins_its_rules_call() {
    let set = compile(&policy("allow", LIMITS)).unwrap();
    assert_eq!(set.plugins(), ["pii-detector"]);
    // The text a plugin may read is built; the scans are the host's to add per plugin manifest.
    let needs = set.needs();
    assert!(needs.prompt && needs.messages && needs.folded);
    assert!(!needs.entities && !needs.injection && !needs.estimate);
    let twice = format!(
        "{LIMITS}{}",
        LIMITS
            .replace("id: per-user", "id: other")
            .replace("id: pii", "id: pii-2")
    );
    assert_eq!(
        compile(&policy("allow", &twice)).unwrap().plugins(),
        ["pii-detector"]
    );
    let none = compile(&policy(
        "allow",
        &LIMITS[..LIMITS.find("    - id: pii").unwrap()],
    ))
    .unwrap();
    assert!(none.plugins().is_empty());
    assert!(!none.needs().messages);
}

#[test]
fn plugins_and_global_limits_need_the_server_locally() {
    let set = compile(&policy("allow", LIMITS)).unwrap();
    let c = ctx(&[("x-user-id", "u1")], r#"{"model":"gpt-4o"}"#);
    let d = eval(&set, &c);
    assert!(d.metadata.needs_remote);
    assert_eq!(d.metadata.remote_rules, vec!["pii", "per-user"]);
    // With plugins available, a plugin match decides.
    let mut hooks = Fake {
        over: false,
        plugin: PluginCheck::Matched(true),
        charged: vec![],
    };
    let d = set.evaluate(&c, &EvalOptions::default(), &mut hooks);
    assert_eq!(d.decision, Verdict::Deny);
    assert_eq!(d.reason, "pii");
    // A failing plugin fails closed by default.
    let mut hooks = Fake {
        over: false,
        plugin: PluginCheck::Error("timeout".into()),
        charged: vec![],
    };
    let d = set.evaluate(&c, &EvalOptions::default(), &mut hooks);
    assert_eq!(d.decision, Verdict::Deny);
    assert_eq!(d.metadata.errors[0].message, "timeout");
}

#[test]
fn cache_key_depends_only_on_fields_the_rules_read() {
    let rules = r#"
    - id: m
      when: { match: { field: request.model, op: eq, value: gpt-4o } }
      action: { decision: deny }
"#;
    let set = compile(&policy("allow", rules)).unwrap();
    let a = eval(
        &set,
        &ctx(
            &[("x-user-id", "1")],
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"a"}]}"#,
        ),
    );
    let b = eval(
        &set,
        &ctx(
            &[("x-user-id", "2")],
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"b"}]}"#,
        ),
    );
    let c = eval(&set, &ctx(&[], r#"{"model":"gpt-4o-mini"}"#));
    assert!(a.metadata.cacheable);
    assert_eq!(a.metadata.cache_key, b.metadata.cache_key);
    assert_ne!(a.metadata.cache_key, c.metadata.cache_key);
    // A different bundle gives different keys.
    let other = compile(&policy("deny", rules)).unwrap();
    assert_ne!(
        eval(&other, &ctx(&[], r#"{"model":"gpt-4o"}"#))
            .metadata
            .cache_key,
        a.metadata.cache_key
    );
}

#[test]
fn time_rules_are_not_cacheable() {
    let rules = "    - {id: night, when: {cel: 'time.hour < 6'}, action: {decision: deny}}\n";
    let set = compile(&policy("allow", rules)).unwrap();
    assert!(!eval(&set, &ctx(&[], "{}")).metadata.cacheable);
}

#[test]
fn explain_reports_every_rule_and_decides_like_the_index() {
    let set = compile(&policy("allow", RULES)).unwrap();
    let c = ctx(&[("x-user-tier", "pro")], r#"{"model":"gpt-4o-mini"}"#);
    let fast = eval(&set, &c);
    let explained = set.evaluate(
        &c,
        &EvalOptions {
            tags: &[],
            explain: true,
            ..EvalOptions::default()
        },
        &mut LocalOnly,
    );
    assert_eq!(fast.decision, explained.decision);
    assert_eq!(fast.matched_rules, explained.matched_rules);
    let trace = explained.explain.unwrap();
    assert_eq!(trace.len(), 4);
    let outcome = |id: &str| {
        trace
            .iter()
            .find(|t| t.rule == id)
            .map(|t| t.outcome.clone())
            .unwrap()
    };
    assert_eq!(outcome("allow-pro"), "matched");
    assert_eq!(outcome("deny-gpt4o"), "not_matched");
}

#[test]
fn decision_json_is_stable() {
    let set = compile(&policy("allow", RULES)).unwrap();
    let d = eval(&set, &ctx(&[], r#"{"model":"gpt-4o"}"#));
    let v = serde_json::to_value(&d).unwrap();
    for key in [
        "decision",
        "reason",
        "matched_rules",
        "actions",
        "metadata",
        "evaluation_time_us",
    ] {
        assert!(v.get(key).is_some(), "{key}");
    }
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["actions"]["alert"], "high");
    assert!(v.get("explain").is_none());
    let back: llm_policy_core::Decision = serde_json::from_value(v).unwrap();
    assert_eq!(back, d);
}

#[test]
fn extraction_needs_follow_what_rules_read() {
    let model_only = compile(&policy(
        "allow",
        "    - {id: m, when: {cel: \"request.model == 'x'\"}, action: {decision: deny}}\n",
    ))
    .unwrap();
    assert_eq!(model_only.needs(), llm_policy_core::context::Needs::NONE);
    let scan = compile(&policy("allow", "    - {id: p, when: {match: {field: request.prompt_entities, op: contains, value: email}}, action: {decision: deny}}\n    - {id: q, when: {match: {field: request.prompt_injection, op: gte, value: 0.7}}, action: {decision: deny}}\n")).unwrap();
    let needs = scan.needs();
    assert!(needs.prompt && needs.entities && needs.injection && !needs.folded);
    let prompt = compile(&policy("allow", "    - {id: p, when: {match: {field: request.prompt, op: contains, value: secret}}, action: {decision: deny}}\n")).unwrap();
    assert_eq!(
        prompt.needs(),
        llm_policy_core::context::Needs {
            messages: false,
            prompt: true,
            folded: false,
            entities: false,
            injection: false,
            estimate: false
        }
    );
    let messages = compile(&policy("allow", "    - {id: i, when: {cel: \"request.messages.exists(m, m.role == 'tool')\"}, action: {decision: deny}}\n")).unwrap();
    assert!(messages.needs().messages);
    // Skipping text changes nothing for a set that does not read it.
    let body = r#"{"model":"x","messages":[{"role":"user","content":"a secret"}]}"#;
    let headers: Vec<(String, String)> = Vec::new();
    let input = llm_policy_core::RequestInput {
        method: "POST",
        path: "/v1/chat/completions",
        headers: &headers,
        body: body.as_bytes(),
        now_unix: 0,
    };
    let lean = llm_policy_core::RequestContext::from_request_with(
        &input,
        model_only.config(),
        model_only.needs(),
    )
    .unwrap();
    assert_eq!(lean.request.prompt, "");
    assert_eq!(eval(&model_only, &lean).decision, Verdict::Deny);
    assert_eq!(
        eval(&model_only, &lean).metadata.cache_key,
        eval(&model_only, &ctx(&[], body)).metadata.cache_key
    );
}

#[test]
fn dsl_header_names_match_in_any_case() {
    let rules = r#"
    - id: key-required
      when: { match: { field: request.headers, op: not_contains, value: X-Api-Key } }
      action: { decision: deny }
"#;
    let set = compile(&policy("allow", rules)).unwrap();
    assert_eq!(
        eval(&set, &ctx(&[("x-api-key", "k")], "{}")).decision,
        Verdict::Allow
    );
    assert_eq!(eval(&set, &ctx(&[], "{}")).decision, Verdict::Deny);
}

#[test]
fn the_deciding_rules_headers_win_a_clash_at_equal_priority() {
    // `a-allow` is written first, `b-deny` decides (deny beats allow at equal priority): the
    // reply must carry the deny rule's header.
    let rules = r#"
    - { id: a-allow, priority: 7, when: { cel: "request.stream" }, action: { decision: allow, headers: { x-h: allow, x-only-a: a } } }
    - { id: b-deny, priority: 7, when: { cel: "request.model == 'm'" }, action: { decision: deny, headers: { x-h: deny } } }
    - { id: c-low, priority: 1, when: { cel: "request.stream" }, action: { decision: allow, headers: { x-h: low, x-only-c: c } } }
"#;
    let set = compile(&policy("allow", rules)).unwrap();
    let d = eval(&set, &ctx(&[], r#"{"model":"m","stream":true}"#));
    assert_eq!(d.decision, Verdict::Deny);
    assert_eq!(d.matched_rules, vec!["b-deny", "a-allow", "c-low"]);
    let h = |k: &str| d.actions.headers.get(k).map(String::as_str);
    assert_eq!(h("x-h"), Some("deny"));
    assert_eq!(h("x-only-a"), Some("a"));
    assert_eq!(h("x-only-c"), Some("c"));
}

const TOKEN_LIMIT: &str = r#"
    - id: tokens
      when: { cel: "true" }
      action: { decision: throttle, rateLimit: { key: "{principal.id}", tokens: 1000, per: minute } }
"#;

#[test]
fn huge_max_tokens_charge_a_saturated_positive_amount() {
    let set = compile(&policy("allow", TOKEN_LIMIT)).unwrap();
    let c = ctx(
        &[("x-user-id", "u")],
        r#"{"model":"m","max_tokens":9223372036854775807,"messages":[{"role":"user","content":"hello world"}]}"#,
    );
    let mut hooks = Fake {
        over: false,
        plugin: PluginCheck::Matched(false),
        charged: vec![],
    };
    let d = set.evaluate(&c, &EvalOptions::default(), &mut hooks);
    // Counted as 2^32 tokens: far above any model's output, exact in f64.
    let amount = d.actions.counters[0].amount;
    assert_eq!(amount, c.request.prompt_tokens() as f64 + 4_294_967_296.0);
    let c = ctx(&[("x-user-id", "u")], r#"{"model":"m","max_tokens":-5}"#);
    let d = set.evaluate(&c, &EvalOptions::default(), &mut hooks);
    assert_eq!(d.actions.counters[0].amount, 0.0);
}

const CLAMP: &str = r#"
    - id: free-cap
      when: { match: { field: principal.tier, op: eq, value: free } }
      action: { decision: allow, transform: { maxTokens: 256 } }
    - id: user-budget
      when: { match: { field: principal.id, op: exists } }
      action: { decision: throttle, budget: { key: "{principal.id}", tokens: 100000, per: day }, transform: { maxTokens: fitBudget, minTokens: 16 } }
    - id: user-requests
      when: { match: { field: principal.id, op: exists } }
      action: { decision: throttle, rateLimit: { key: "{principal.id}", requests: 100, per: day } }
"#;

/// Counters answered with `Fit(n)`: only those whose rule may lower the request (else under), or
/// every one, as a host that lowers what it may not would.
struct Fits {
    output: u64,
    every: bool,
}

impl Fits {
    fn lowerable(output: u64) -> Fits {
        Fits {
            output,
            every: false,
        }
    }
}

impl Hooks for Fits {
    fn plugin(
        &mut self,
        _: &str,
        _: &llm_policy_core::model::PluginRef,
        _: &llm_policy_core::RequestContext,
    ) -> PluginCheck {
        PluginCheck::Matched(false)
    }
    fn counter(&mut self, c: &llm_policy_core::decision::Charge) -> CounterCheck {
        if self.every || c.fit.is_some() {
            CounterCheck::Fit(self.output)
        } else {
            CounterCheck::Under
        }
    }
}

#[test]
fn a_fixed_cap_lowers_the_request_and_what_its_counters_charge() {
    let set = compile(&policy("allow", CLAMP)).unwrap();
    let free = ctx(
        &[("x-user-id", "u"), ("x-user-tier", "free")],
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
    );
    let d = set.evaluate(
        &free,
        &EvalOptions::default(),
        &mut Fits::lowerable(u64::MAX),
    );
    assert_eq!(d.decision, Verdict::Allow);
    assert_eq!(d.actions.max_tokens, Some(256));
    let tokens = &d.actions.counters[0];
    assert_eq!((tokens.output, tokens.fit), (256, Some(16)));
    assert_eq!(tokens.amount, free.request.prompt_tokens() as f64 + 256.0);
    assert_eq!(d.actions.counters[1].output, 0, "requests count no output");
    // A request that asks for less keeps its own cap.
    let small = ctx(
        &[("x-user-id", "u"), ("x-user-tier", "free")],
        r#"{"model":"gpt-4o-mini","max_tokens":100}"#,
    );
    let d = set.evaluate(
        &small,
        &EvalOptions::default(),
        &mut Fits::lowerable(u64::MAX),
    );
    assert_eq!(d.actions.max_tokens, None);
    assert_eq!(d.actions.counters[0].output, 100);
    // Another tier is not capped.
    let pro = ctx(
        &[("x-user-id", "u"), ("x-user-tier", "pro")],
        r#"{"model":"gpt-4o-mini","max_tokens":5000}"#,
    );
    let d = set.evaluate(
        &pro,
        &EvalOptions::default(),
        &mut Fits::lowerable(u64::MAX),
    );
    assert_eq!(d.actions.max_tokens, None);
    assert_eq!(d.actions.counters[0].output, 5000);
}

#[test]
fn a_budget_that_fits_a_lower_cap_lowers_the_request_instead_of_throttling() {
    let set = compile(&policy("allow", CLAMP)).unwrap();
    let c = ctx(
        &[("x-user-id", "u"), ("x-user-tier", "pro")],
        r#"{"model":"gpt-4o-mini","max_tokens":5000,"n":2}"#,
    );
    let d = set.evaluate(&c, &EvalOptions::default(), &mut Fits::lowerable(40));
    assert_eq!(d.decision, Verdict::Allow);
    assert_eq!(d.actions.max_tokens, Some(40));
    let tokens = &d.actions.counters[0];
    assert_eq!(tokens.output, 40);
    // Two choices of 40 tokens each, and the prompt.
    assert_eq!(tokens.amount, c.request.prompt_tokens() as f64 + 80.0);
    assert_eq!(
        tokens.amount_with_output(10),
        c.request.prompt_tokens() as f64 + 20.0
    );
    // Room for the prompt and 50 tokens of each choice: 50; for less than the minimum: none.
    let room = c.request.prompt_tokens() as f64 + 100.0;
    assert_eq!(
        d.actions.counters[0].fitting_output(room),
        Some(40),
        "never above the output counted"
    );
    let full = llm_policy_core::decision::Charge {
        output: 5000,
        amount: c.request.prompt_tokens() as f64 + 10_000.0,
        ..tokens.clone()
    };
    assert_eq!(full.fitting_output(room), Some(50));
    assert_eq!(
        full.fitting_output(c.request.prompt_tokens() as f64 + 31.0),
        None
    );
    // A host that lowers a counter whose rule does not allow it: the rule applies.
    let d = set.evaluate(
        &c,
        &EvalOptions::default(),
        &mut Fits {
            output: 10,
            every: true,
        },
    );
    assert_eq!(d.decision, Verdict::Throttle);
    assert_eq!(d.actions.max_tokens, None);
}

#[test]
fn only_requests_whose_body_can_be_lowered_are_charged_lowered() {
    let set = compile(&policy("allow", CLAMP)).unwrap();
    // Embeddings answer no output; a path the engine does not know cannot be rewritten: neither
    // is capped nor lowered by a budget (a `Fit` answer then counts as over).
    for (path, body) in [
        (
            "/v1/embeddings",
            r#"{"model":"text-embedding-3-small","input":"hi","max_tokens":5000}"#,
        ),
        (
            "/v1beta/models/gemini:generateContent",
            r#"{"max_tokens":5000}"#,
        ),
    ] {
        let c = common::ctx_at(path, &[("x-user-id", "u"), ("x-user-tier", "free")], body);
        let d = set.evaluate(&c, &EvalOptions::default(), &mut Fits::lowerable(40));
        assert_eq!(d.actions.max_tokens, None, "{path}");
        assert!(d.actions.counters.iter().all(|c| c.fit.is_none()), "{path}");
    }
    // A chat request's cap is the field chat reads: `max_output_tokens` caps nothing there.
    let c = ctx(
        &[("x-user-id", "u"), ("x-user-tier", "pro")],
        r#"{"model":"gpt-4o-mini","max_output_tokens":1}"#,
    );
    assert_eq!(c.request.max_tokens, None);
    let d = set.evaluate(&c, &EvalOptions::default(), &mut Fits::lowerable(u64::MAX));
    assert_eq!(d.actions.counters[0].output, 16384);
}

#[test]
fn a_capped_decision_is_not_cached() {
    // Whether the cap lowers a request depends on the request's own cap, which the cache key
    // does not read.
    let set = compile(&policy("allow", "    - id: cap\n      when: { cel: 'true' }\n      action: { decision: allow, transform: { maxTokens: 256 } }\n")).unwrap();
    let small = ctx(&[], r#"{"model":"gpt-4o-mini","max_tokens":100}"#);
    let d = set.evaluate(&small, &EvalOptions::default(), &mut LocalOnly);
    assert_eq!(d.actions.max_tokens, None);
    assert!(!d.metadata.cacheable);
}

const BATCH_RULES: &str = r#"
    - id: approved-models
      priority: 10
      when: { cel: "request.api == 'messages' && !(request.model in ['claude-sonnet-4-5'])" }
      action: { decision: deny, reason: "model is not approved" }
    - id: secrets
      priority: 20
      when: { cel: "request.prompt.contains('sk-')" }
      action: { decision: deny, reason: "secret in prompt" }
    - id: per-item-requests
      when: { cel: "request.api == 'messages'" }
      action: { decision: throttle, rateLimit: { key: "{principal.id}", requests: 100, per: minute, scope: local } }
"#;

fn batch(items: &[(&str, &str)]) -> String {
    let items: Vec<String> = items
        .iter()
        .map(|(model, text)| {
            format!(r#"{{"custom_id":"x","params":{{"model":"{model}","max_tokens":5,"messages":[{{"role":"user","content":"{text}"}}]}}}}"#)
        })
        .collect();
    format!(r#"{{"requests":[{}]}}"#, items.join(","))
}

#[test]
fn a_batch_is_decided_by_its_strictest_item() {
    let set = compile(&policy("allow", BATCH_RULES)).unwrap();
    let headers = [("anthropic-version", "2023-06-01"), ("x-user-id", "u")];
    let ok = batch(&[("claude-sonnet-4-5", "hi"), ("claude-sonnet-4-5", "yo")]);
    let d = eval(&set, &common::ctx_at("/v1/messages/batches", &headers, &ok));
    assert_eq!(d.decision, Verdict::Allow);
    // Each item is a request: two request charges.
    assert_eq!(d.actions.counters.len(), 2);
    let bad_model = batch(&[("claude-sonnet-4-5", "hi"), ("claude-opus-4", "yo")]);
    let d = eval(
        &set,
        &common::ctx_at("/v1/messages/batches", &headers, &bad_model),
    );
    assert_eq!(d.decision, Verdict::Deny);
    assert_eq!(d.reason, "model is not approved");
    assert_eq!(d.metadata.batch_item, Some(1));
    assert!(d.actions.counters.is_empty());
    let secret = batch(&[
        ("claude-sonnet-4-5", "sk-live-123"),
        ("claude-sonnet-4-5", "yo"),
    ]);
    let d = eval(
        &set,
        &common::ctx_at("/v1/messages/batches", &headers, &secret),
    );
    assert_eq!(
        (d.decision, d.metadata.batch_item),
        (Verdict::Deny, Some(0))
    );
    // The cache key covers every item.
    let a = eval(&set, &common::ctx_at("/v1/messages/batches", &headers, &ok));
    let b = eval(
        &set,
        &common::ctx_at(
            "/v1/messages/batches",
            &headers,
            &batch(&[("claude-sonnet-4-5", "hi"), ("claude-sonnet-4-5", "zz")]),
        ),
    );
    assert_ne!(a.metadata.cache_key, b.metadata.cache_key);
}

mod two_phase {
    use super::*;

    #[test]
    fn what_the_host_must_answer_is_listed_and_the_answers_decide() {
        let set = compile(&policy("allow", LIMITS)).unwrap();
        let c = ctx(&[("x-user-id", "u1")], r#"{"model":"gpt-4o"}"#);
        let Step::Pending(mut p) = set.start(&c, &EvalOptions::default()) else {
            panic!("a plugin and a limited rule need the host");
        };
        let kinds: Vec<(String, bool)> = p
            .needs()
            .iter()
            .map(|n| (n.rule.clone(), matches!(n.kind, NeedKind::Plugin(_))))
            .collect();
        assert_eq!(
            kinds,
            vec![("pii".to_string(), true), ("per-user".to_string(), false)]
        );
        answer_all(&mut p, CounterCheck::Over);
        let Step::Done(d) = p.resume(&c) else {
            panic!("all answered");
        };
        assert_eq!(d.decision, Verdict::Throttle);
        assert!(!d.metadata.needs_remote);
    }

    #[test]
    fn nothing_is_asked_below_a_rule_that_already_denied() {
        let rules = format!(
            "{LIMITS}    - id: no-gpt-3\n      priority: 100\n      when: {{ match: {{ field: request.model, op: eq, value: gpt-3.5-turbo }} }}\n      action: {{ decision: deny, reason: \"no\" }}\n    - id: same-level\n      priority: 100\n      when: {{ plugin: {{ name: scorer }} }}\n      action: {{ decision: deny, reason: \"scored\" }}\n"
        );
        let set = compile(&policy("allow", &rules)).unwrap();
        let c = ctx(&[("x-user-id", "u1")], r#"{"model":"gpt-3.5-turbo"}"#);
        let opts = EvalOptions {
            explain: true,
            ..EvalOptions::default()
        };
        // A plugin at the deny's own priority could still decide (ties go to deny): asked.
        let Step::Pending(p) = set.start(&c, &opts) else {
            panic!("the same-priority plugin is asked for");
        };
        let asked: Vec<&str> = p.needs().iter().map(|n| n.rule.as_str()).collect();
        assert_eq!(asked, vec!["same-level"]);
        let Step::Done(d) = p.resume(&c) else {
            panic!("nothing else is needed");
        };
        assert_eq!(d.decision, Verdict::Deny);
        assert_eq!(d.metadata.deciding_rule.as_deref(), Some("no-gpt-3"));
        let trace: Vec<(String, String)> = d
            .explain
            .unwrap()
            .into_iter()
            .map(|t| (t.rule, t.outcome))
            .collect();
        assert!(
            trace.contains(&("pii".into(), "skipped".into())),
            "{trace:?}"
        );
        assert!(
            trace.contains(&("per-user".into(), "skipped".into())),
            "{trace:?}"
        );
        // The callback form asks nothing below the deny either.
        let mut hooks = Fake {
            over: true,
            plugin: PluginCheck::Matched(true),
            charged: vec![],
        };
        let d = set.evaluate(&c, &EvalOptions::default(), &mut hooks);
        assert_eq!(d.decision, Verdict::Deny);
        assert!(hooks.charged.is_empty());
        // Another model: the lower rules are asked as before.
        let c = ctx(&[("x-user-id", "u1")], r#"{"model":"gpt-4o"}"#);
        let Step::Pending(p) = set.start(&c, &EvalOptions::default()) else {
            panic!("the plugin and the counter are needed");
        };
        assert_eq!(p.needs().len(), 3);
    }

    #[test]
    fn unanswered_needs_are_left_to_the_server() {
        let set = compile(&policy("allow", LIMITS)).unwrap();
        let c = ctx(&[("x-user-id", "u1")], r#"{"model":"gpt-4o"}"#);
        let Step::Pending(p) = set.start(&c, &EvalOptions::default()) else {
            panic!("pending");
        };
        let Step::Done(d) = p.resume(&c) else {
            panic!("nothing new to ask");
        };
        assert_eq!(d, {
            let mut local = eval(&set, &c);
            local.evaluation_time_us = d.evaluation_time_us;
            local
        });
        assert_eq!(d.metadata.remote_rules, vec!["pii", "per-user"]);
    }

    #[test]
    fn a_matching_plugin_on_a_limited_rule_asks_for_its_counter_next() {
        let rules = r#"
    - id: pii-budget
      when: { plugin: { name: pii } }
      action: { decision: deny, budget: { key: "{principal.team}", tokens: 10, per: day } }
"#;
        let set = compile(&policy("allow", rules)).unwrap();
        let c = ctx(&[("x-team-id", "t")], r#"{"model":"m"}"#);
        let Step::Pending(mut p) = set.start(&c, &EvalOptions::default()) else {
            panic!("plugin");
        };
        let id = p.needs()[0].id;
        p.answer(id, Answer::Plugin(PluginCheck::Matched(true)));
        let Step::Pending(mut p) = p.resume(&c) else {
            panic!("the budget is needed next");
        };
        let NeedKind::Counter(charge) = &p.needs()[0].kind else {
            panic!("a counter");
        };
        assert_eq!(charge.key, "default/pii-budget/t");
        let id = p.needs()[0].id;
        p.answer(id, Answer::Counter(CounterCheck::Over));
        let Step::Done(d) = p.resume(&c) else {
            panic!("done");
        };
        assert_eq!(d.decision, Verdict::Deny);
    }

    #[test]
    fn pending_keeps_the_set_it_started_with() {
        let set = compile(&policy("allow", LIMITS)).unwrap();
        let c = ctx(&[("x-user-id", "u1")], r#"{"model":"gpt-4o"}"#);
        let bundle = set.bundle().to_string();
        let Step::Pending(p) = set.start(&c, &EvalOptions::default()) else {
            panic!("pending");
        };
        drop(set); // a reload swapped it out
        fn send<T: Send>(t: T) -> T {
            t
        }
        let p = send(p);
        let Step::Done(d) = p.resume(&c) else {
            panic!("done");
        };
        assert_eq!(d.metadata.bundle, bundle);
    }

    #[test]
    fn no_host_is_asked_when_no_rule_needs_one() {
        let set = compile(&policy("allow", RULES)).unwrap();
        let c = ctx(&[], r#"{"model":"gpt-4o"}"#);
        let Step::Done(d) = set.start(&c, &EvalOptions::default()) else {
            panic!("decided locally");
        };
        assert_eq!(d.decision, Verdict::Deny);
    }
}

#[test]
fn cache_key_before_evaluation_is_the_decisions_key() {
    let set = compile(&policy("allow", RULES)).unwrap();
    for body in [
        r#"{"model":"gpt-4o"}"#,
        r#"{"model":"gpt-4o-mini"}"#,
        r#"{"model":"claude"}"#,
    ] {
        let c = ctx(&[], body);
        let key = set.cache_key(&c, &EvalOptions::default());
        assert_eq!(key, eval(&set, &c).metadata.cache_key, "{body}");
    }
    // An unknown namespace (denied by default) too.
    let c = ctx(&[("x-llm-policy-namespace", "nowhere")], "{}");
    assert_eq!(
        set.cache_key(&c, &EvalOptions::default()),
        eval(&set, &c).metadata.cache_key
    );
}

#[test]
fn a_limited_rule_makes_a_decision_uncacheable_only_when_it_matched() {
    let rules = r#"
    - id: limit-free
      priority: 10
      when: { match: { field: principal.tier, op: eq, value: free } }
      action: { decision: throttle, rateLimit: { key: "{principal.id}", requests: 5, per: minute } }
"#;
    let set = compile(&policy("allow", rules)).unwrap();
    let pro = eval(&set, &ctx(&[("x-user-tier", "pro")], "{}"));
    assert!(pro.metadata.cacheable, "the counter was never consulted");
    let free = eval(
        &set,
        &ctx(&[("x-user-tier", "free"), ("x-user-id", "u")], "{}"),
    );
    assert!(!free.metadata.cacheable);
}
