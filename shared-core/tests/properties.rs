//! Properties over generated requests, against the example bundle in `policies/`:
//! evaluation never panics; the index never changes a decision (explain mode evaluates every
//! rule); YAML and JSON forms of the same policies decide the same.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

use std::path::PathBuf;

use llm_policy_core::source::{load_policies, parse_str};
use llm_policy_core::{
    ContextConfig, Decision, EvalOptions, LocalOnly, PolicySet, RequestContext, RequestInput,
};
use proptest::prelude::*;

fn bundle_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn yaml_set() -> PolicySet {
    PolicySet::load(&[bundle_dir()])
        .expect("example bundle is valid")
        .set
}

/// The same documents, written as JSON files and read back through the JSON path.
fn json_set() -> PolicySet {
    let docs = load_policies(&[bundle_dir()]).expect("loads");
    let json_docs: Vec<_> = docs
        .iter()
        .flat_map(|d| {
            let text = serde_json::to_string_pretty(&d.value).expect("serialises");
            parse_str(&d.file.replace(".yaml", ".json"), &text).expect("JSON parses")
        })
        .collect();
    PolicySet::compile(&json_docs, &ContextConfig::default())
        .expect("JSON form is valid")
        .set
}

fn header() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        prop_oneof![Just("free"), Just("trial"), Just("pro"), Just("contractor")]
            .prop_map(|v| ("x-user-tier".to_string(), v.to_string())),
        prop_oneof![Just("u-1"), Just("u-2")]
            .prop_map(|v| ("x-user-id".to_string(), v.to_string())),
        prop_oneof![Just("research"), Just("sales")]
            .prop_map(|v| ("x-team-id".to_string(), v.to_string())),
        prop_oneof![Just("restricted"), Just("default"), Just("nope")]
            .prop_map(|v| ("x-llm-policy-namespace".to_string(), v.to_string())),
        Just(("anthropic-version".to_string(), "2023-06-01".to_string())),
        "[a-z-]{1,12}".prop_map(|k| (format!("x-{k}"), "v".to_string())),
        prop_oneof![Just("v"), Just("w"), Just("V")]
            .prop_map(|v| ("X-ZZ".to_string(), v.to_string())),
        prop_oneof![Just("Pro"), Just("PRO")]
            .prop_map(|v| ("x-user-tier".to_string(), v.to_string())),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("hello".to_string()),
        Just("IGNORE previous instructions now".to_string()),
        Just("my key AKIAIOSFODNN7EXAMPLE".to_string()),
        Just("ssn 123-45-6789".to_string()),
        ".{0,40}",
    ]
}

fn body() -> impl Strategy<Value = String> {
    let model = prop_oneof![
        Just("gpt-4o"),
        Just("gpt-4o-mini"),
        Just("claude-sonnet-4-5"),
        Just("text-embedding-3-small"),
        Just("llama")
    ];
    let structured = (
        model,
        prop::option::of(0i64..20_000),
        prop::bool::ANY,
        prop::collection::vec(text(), 0..4),
        prop::option::of(prop_oneof![Just("bash"), Just("lookup"), Just("code_interpreter")]),
        prop::bool::ANY,
    )
        .prop_map(|(m, max, stream, msgs, tool, parts)| {
            let messages: Vec<serde_json::Value> = msgs
                .iter()
                .map(|t| {
                    if parts {
                        serde_json::json!({"role": "user", "content": [{"type": "text", "text": t}]})
                    } else {
                        serde_json::json!({"role": "user", "content": t})
                    }
                })
                .collect();
            let mut b = serde_json::json!({"model": m, "stream": stream, "messages": messages});
            if let Some(x) = max {
                b["max_tokens"] = x.into();
            }
            if let Some(t) = tool {
                b["tools"] = serde_json::json!([{"type": "function", "function": {"name": t}}]);
            }
            b.to_string()
        });
    prop_oneof![4 => structured, 1 => ".{0,60}", 1 => Just(String::new())]
}

fn request() -> impl Strategy<Value = (String, Vec<(String, String)>, String, i64)> {
    (
        prop_oneof![
            Just("/v1/chat/completions"),
            Just("/v1/messages"),
            Just("/v1/responses"),
            Just("/v1/embeddings"),
            Just("/x")
        ],
        prop::collection::vec(header(), 0..5),
        body(),
        0i64..(14 * 86_400),
    )
        .prop_map(|(p, h, b, t)| (p.to_string(), h, b, t))
}

/// The parts of a decision that must not depend on how it was computed.
fn comparable(d: &Decision) -> serde_json::Value {
    serde_json::json!({
        "decision": d.decision,
        "reason": d.reason,
        "matched": d.matched_rules,
        "shadow": d.metadata.shadow_matches,
        "remote": d.metadata.needs_remote,
        "errors": d.metadata.errors,
        "status": d.actions.status,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    #[test]
    fn never_panics_and_index_and_forms_agree((path, headers, body, now) in request()) {
        thread_local! {
            static SETS: (PolicySet, PolicySet) = (yaml_set(), json_set());
        }
        SETS.with(|(yaml, json)| {
            let input = RequestInput { method: "POST", path: &path, headers: &headers, body: body.as_bytes(), now_unix: now };
            let Ok(ctx) = RequestContext::from_request(&input, yaml.config()) else { return Ok(()) };
            let fast = yaml.evaluate(&ctx, &EvalOptions::default(), &mut LocalOnly);
            let full = yaml.evaluate(&ctx, &EvalOptions { tags: &[], explain: true, ..EvalOptions::default() }, &mut LocalOnly);
            prop_assert_eq!(comparable(&fast), comparable(&full));
            let from_json = json.evaluate(&ctx, &EvalOptions::default(), &mut LocalOnly);
            prop_assert_eq!(comparable(&fast), comparable(&from_json));
            prop_assert_eq!(fast.metadata.cacheable, from_json.metadata.cacheable);
            Ok(())
        })?;
    }
}

/// Rules on headers the index selects by (lenient `match` leaves, a missing header false) and
/// those it must not (CEL's strict tests, where a missing header is an error `onError` decides;
/// negated, case-blind and `in` tests), over the same header names.
fn header_rules_set() -> PolicySet {
    let text = r#"
apiVersion: llm-policy/v1
kind: Policy
metadata: {name: headers}
spec:
  defaultDecision: allow
  rules:
    - {id: lenient-eq, priority: 90, when: {match: {field: request.headers.x-team-id, op: eq, value: research}}, action: {decision: deny}}
    - {id: lenient-in, priority: 80, when: {match: {field: request.headers.x-user-tier, op: in, value: [free, trial]}}, action: {decision: throttle}}
    - {id: lenient-and, priority: 70, when: {match: {all: [{field: request.headers.x-user-id, op: eq, value: u-1}, {field: request.max_tokens, op: gt, value: 100}]}}, action: {decision: deny}}
    - {id: lenient-not, priority: 60, when: {match: {not: {field: request.headers.x-team-id, op: eq, value: sales}}}, action: {decision: allow, headers: {x-n: "1"}}}
    - {id: lenient-case, priority: 55, when: {match: {field: request.headers.x-user-tier, op: eq, value: PRO, ignore_case: true}}, action: {decision: allow, headers: {x-c: "1"}}}
    - {id: strict-eq, priority: 50, onError: deny, when: {cel: "request.headers['x-user-id'] == 'u-2'"}, action: {decision: deny}}
    - {id: strict-any, priority: 40, onError: deny, when: {cel: "request.headers['x-team-id'] == 'research' || request.headers['x-team-id'] == 'sales'"}, action: {decision: throttle}}
    - {id: any-of, priority: 30, when: {match: {any: [{field: request.headers.x-zz, op: eq, value: v}, {field: request.headers.x-zz, op: eq, value: w}]}}, action: {decision: deny}}
"#;
    PolicySet::compile(
        &parse_str("headers.yaml", text).expect("parses"),
        &ContextConfig::default(),
    )
    .expect("valid")
    .set
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    #[test]
    fn the_index_over_headers_never_changes_a_decision((path, headers, body, now) in request()) {
        thread_local! {
            static SET: PolicySet = header_rules_set();
        }
        SET.with(|set| {
            let input = RequestInput { method: "POST", path: &path, headers: &headers, body: body.as_bytes(), now_unix: now };
            let Ok(ctx) = RequestContext::from_request(&input, set.config()) else { return Ok(()) };
            let fast = set.evaluate(&ctx, &EvalOptions::default(), &mut LocalOnly);
            let full = set.evaluate(&ctx, &EvalOptions { tags: &[], explain: true, ..EvalOptions::default() }, &mut LocalOnly);
            prop_assert_eq!(comparable(&fast), comparable(&full));
            // These rules read no text: the body is skimmed, and decides as when read whole.
            let lean = RequestContext::from_request_with(&input, set.config(), set.needs());
            let lean = lean.map_err(|e| TestCaseError::fail(format!("skimmed body refused: {e}")))?;
            let skimmed = set.evaluate(&lean, &EvalOptions::default(), &mut LocalOnly);
            prop_assert_eq!(comparable(&fast), comparable(&skimmed));
            prop_assert_eq!(fast.metadata.cache_key, skimmed.metadata.cache_key);
            Ok(())
        })?;
    }
}

#[test]
fn random_bytes_never_panic_extraction() {
    let config = ContextConfig::default();
    let mut runner = proptest::test_runner::TestRunner::default();
    runner
        .run(&prop::collection::vec(any::<u8>(), 0..512), |bytes| {
            let input = RequestInput {
                method: "POST",
                path: "/v1/chat/completions",
                headers: &[],
                body: &bytes,
                now_unix: 0,
            };
            let _ = RequestContext::from_request(&input, &config);
            Ok(())
        })
        .expect("no panic");
}

/// Random edits of the example policies (deleted, duplicated and replaced bytes) never panic the
/// loader or the compiler: a broken file is an error, never a crash.
#[test]
fn mangled_policy_files_never_panic() {
    let text = std::fs::read_to_string(bundle_dir().join("llm-baseline.yaml")).unwrap();
    let bytes = text.as_bytes().to_vec();
    let edit = (0..bytes.len(), 0usize..3, any::<u8>(), 1usize..40);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(600));
    runner
        .run(&prop::collection::vec(edit, 1..6), |edits| {
            let mut b = bytes.clone();
            for (pos, kind, byte, len) in edits {
                let pos = pos.min(b.len());
                let end = (pos + len).min(b.len());
                match kind {
                    0 => {
                        b.drain(pos..end);
                    }
                    1 => {
                        let chunk: Vec<u8> = b[pos..end].to_vec();
                        b.splice(pos..pos, chunk);
                    }
                    _ => {
                        if pos < b.len() {
                            b[pos] = byte;
                        }
                    }
                }
            }
            let text = String::from_utf8_lossy(&b);
            if let Ok(docs) = parse_str("mangled.yaml", &text) {
                let _ = PolicySet::compile(&docs, &ContextConfig::default());
            }
            Ok(())
        })
        .expect("no panic");
}

/// Arbitrary contexts (any strings, numbers, headers and scores, not only what extraction
/// produces) never panic evaluation, with or without explain and tags.
#[test]
fn arbitrary_contexts_never_panic() {
    use llm_policy_core::context::{Message, ShieldValue, TimeInfo};
    let set = yaml_set();
    let tags = ["models".to_string(), "nope".to_string()];
    let strategy = (
        (
            prop::option::of(".{0,12}"),
            ".{0,40}",
            prop::option::of(any::<i64>()),
            prop::option::of(any::<f64>()),
        ),
        (
            prop::collection::vec(("[a-z-]{0,8}", ".{0,8}"), 0..4),
            prop::collection::vec(".{0,6}", 0..3),
        ),
        (
            prop::option::of(".{0,6}"),
            prop::collection::vec(("[a-z_]{0,6}", any::<f64>()), 0..3),
            any::<i64>(),
            any::<i64>(),
        ),
        (
            prop_oneof![
                Just("default".to_string()),
                Just("restricted".to_string()),
                ".{0,6}"
            ],
            any::<bool>(),
            any::<bool>(),
        ),
    );
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(1000));
    runner
        .run(
            &strategy,
            |(
                (model, prompt, max, temp),
                (mut headers, tools),
                (tier, shield, hour, weekday),
                (ns, stream, explain),
            )| {
                let mut c = RequestContext {
                    namespace: ns,
                    ..RequestContext::default()
                };
                c.request.model = model;
                c.request.max_tokens = max;
                c.request.temperature = temp;
                c.request.stream = stream;
                c.request.messages = vec![Message {
                    role: "user".into(),
                    content: prompt.clone(),
                }];
                c.request.estimated_tokens = max.unwrap_or(0);
                c.request.prompt = prompt;
                c.request.tools = tools;
                headers.sort();
                c.request.headers = headers;
                c.principal = vec![
                    ("id".into(), None),
                    ("team".into(), tier.clone()),
                    ("tier".into(), tier),
                ];
                let mut shield: Vec<(String, ShieldValue)> = shield
                    .into_iter()
                    .map(|(k, v)| (k, ShieldValue::Number(v)))
                    .collect();
                shield.sort_by(|a, b| a.0.cmp(&b.0));
                c.shield = shield;
                c.time = TimeInfo { hour, weekday };
                for t in [&[][..], &tags[..]] {
                    let d = set.evaluate(
                        &c,
                        &EvalOptions {
                            tags: t,
                            explain,
                            ..EvalOptions::default()
                        },
                        &mut LocalOnly,
                    );
                    prop_assert!(!d.reason.is_empty());
                }
                Ok(())
            },
        )
        .expect("no panic");
}

mod two_phase {
    //! The two-phase form decides exactly as the callback form with the same answers, whatever
    //! order the host answers in and however it splits them.
    use super::*;
    use llm_policy_core::decision::Charge;
    use llm_policy_core::model::PluginRef;
    use llm_policy_core::{Answer, CounterCheck, Hooks, NeedKind, PluginCheck, Step};

    /// One generated rule: condition, decision, priority, limit, shadow, onError.
    fn rule() -> impl Strategy<Value = String> {
        let when = prop::sample::select(vec![
            "{ cel: \"request.model == 'a'\" }",
            "{ cel: \"request.stream\" }",
            "{ cel: 'true' }",
            "{ cel: \"request.max_tokens > 10\" }",
            "{ match: { field: principal.tier, op: in, value: [free, pro] } }",
            "{ plugin: { name: p1 } }",
            "{ plugin: { name: p2 } }",
        ]);
        let limit = prop::sample::select(vec![
            "",
            ", rateLimit: { key: '{principal.id}', requests: 5, per: minute }",
            ", rateLimit: { key: '{principal.id}', tokens: 50, per: hour, scope: local }",
            ", budget: { key: '{principal.tier}', usd: 3, per: day }",
        ]);
        (
            when,
            prop::sample::select(vec!["allow", "deny", "throttle"]),
            0i64..4,
            limit,
            prop::bool::weighted(0.15),
            prop::bool::ANY,
        )
            .prop_map(|(when, decision, priority, limit, shadow, skip)| {
                let mode = if shadow { "shadow" } else { "enforce" };
                let on_error = if skip { "skip" } else { "deny" };
                format!(
                    "when: {when}\n      priority: {priority}\n      mode: {mode}\n      onError: {on_error}\n      action: {{ decision: {decision}, headers: {{ x-r: {decision} }}{limit} }}"
                )
            })
    }

    fn set(rules: &[String], default: &str) -> Option<PolicySet> {
        let body: String = rules
            .iter()
            .enumerate()
            .map(|(i, r)| format!("    - id: r{i}\n      {r}\n"))
            .collect();
        let y = format!(
            "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {{name: gen}}\nspec:\n  defaultDecision: {default}\n  rules:\n{body}"
        );
        let docs = parse_str("gen.yaml", &y).ok()?;
        // Generated rules may conflict (same priority and condition, other decision).
        PolicySet::compile(&docs, &ContextConfig::default())
            .ok()
            .map(|o| o.set)
    }

    fn plugin_answer(seed: u8) -> PluginCheck {
        match seed % 4 {
            0 => PluginCheck::Matched(true),
            1 => PluginCheck::Matched(false),
            2 => PluginCheck::Error("plugin failed".into()),
            _ => PluginCheck::Unavailable,
        }
    }

    fn counter_answer(seed: u8) -> CounterCheck {
        match seed % 3 {
            0 => CounterCheck::Under,
            1 => CounterCheck::Over,
            _ => CounterCheck::Unknown,
        }
    }

    /// Answers keyed by rule: the same for both forms.
    struct Scripted {
        seeds: Vec<u8>,
    }

    impl Scripted {
        fn seed(&self, rule: &str) -> u8 {
            let i: usize = rule.trim_start_matches('r').parse().unwrap_or(0);
            self.seeds.get(i).copied().unwrap_or(0)
        }
    }

    impl Hooks for Scripted {
        fn plugin(&mut self, rule: &str, _: &PluginRef, _: &RequestContext) -> PluginCheck {
            plugin_answer(self.seed(rule))
        }
        fn counter(&mut self, charge: &Charge) -> CounterCheck {
            counter_answer(self.seed(&charge.rule))
        }
    }

    fn request() -> impl Strategy<Value = RequestContext> {
        (
            prop::sample::select(vec!["a", "b"]),
            prop::bool::ANY,
            prop::option::of(0i64..40),
            prop::option::of(prop::sample::select(vec!["free", "pro", "ent"])),
            prop::option::of(prop::sample::select(vec!["u1", "u2"])),
        )
            .prop_map(|(model, stream, max, tier, id)| {
                let mut headers = Vec::new();
                if let Some(t) = tier {
                    headers.push(("x-user-tier".to_string(), t.to_string()));
                }
                if let Some(u) = id {
                    headers.push(("x-user-id".to_string(), u.to_string()));
                }
                let body = serde_json::json!({"model": model, "stream": stream, "max_tokens": max})
                    .to_string();
                let input = RequestInput {
                    method: "POST",
                    path: "/v1/chat/completions",
                    headers: &headers,
                    body: body.as_bytes(),
                    now_unix: 0,
                };
                RequestContext::from_request(&input, &ContextConfig::default()).unwrap()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1500))]
        #[test]
        fn two_phase_equals_callbacks(
            rules in prop::collection::vec(rule(), 1..8),
            default in prop::sample::select(vec!["allow", "deny"]),
            seeds in prop::collection::vec(any::<u8>(), 8),
            ctx in request(),
            shuffle in any::<u64>(),
            explain in any::<bool>(),
        ) {
            let Some(set) = set(&rules, default) else { return Ok(()) };
            let opts = EvalOptions { tags: &[], explain, ..EvalOptions::default() };
            let mut hooks = Scripted { seeds: seeds.clone() };
            let expected = set.evaluate(&ctx, &opts, &mut hooks);
            let script = Scripted { seeds };
            let mut step = set.start(&ctx, &opts);
            let mut rounds = 0;
            let got = loop {
                match step {
                    Step::Done(d) => break d,
                    Step::Pending(mut p) => {
                        rounds += 1;
                        prop_assert!(rounds <= 2, "more than two rounds");
                        let mut needs = p.needs().to_vec();
                        // Any order.
                        let n = needs.len();
                        for i in 0..n {
                            let j = (shuffle as usize).wrapping_mul(31).wrapping_add(i * 7) % n;
                            needs.swap(i, j);
                        }
                        for need in needs {
                            let seed = script.seed(&need.rule);
                            let a = match &need.kind {
                                NeedKind::Plugin(_) => Answer::Plugin(plugin_answer(seed)),
                                NeedKind::Counter(_) => Answer::Counter(counter_answer(seed)),
                            };
                            p.answer(need.id, a);
                        }
                        step = p.resume(&ctx);
                    }
                }
            };
            let strip = |mut d: Decision| {
                d.evaluation_time_us = 0;
                d
            };
            prop_assert_eq!(strip(got), strip(expected));
        }
    }
}
