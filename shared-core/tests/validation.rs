//! Every validation error names the file, line, column and rule, with a code a user can look up.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;

use common::{compile, policy};
use llm_policy_core::{Diagnostic, Severity};

/// Compiles and returns the diagnostics (errors and warnings) of a failing policy.
fn errors(yaml: &str) -> Vec<Diagnostic> {
    match compile(yaml) {
        Ok(_) => panic!("expected validation errors"),
        Err(d) => d.0,
    }
}

/// The one error with `code`, asserting its line and rule.
fn expect(yaml: &str, code: &str, line: u32, rule: Option<&str>) -> Diagnostic {
    let all = errors(yaml);
    let d = all
        .iter()
        .find(|d| d.code == code)
        .unwrap_or_else(|| panic!("no `{code}` in {all:#?}"))
        .clone();
    assert_eq!(d.file.as_deref(), Some("test.yaml"));
    assert_eq!(d.position.map(|p| p.line), Some(line), "{d}");
    assert_eq!(d.rule.as_deref(), rule, "{d}");
    d
}

// `policy()` puts the first rule line at line 8.

#[test]
fn unknown_fields_point_at_the_key() {
    let y = policy("allow", "    - id: a\n      when: { cel: 'true' }\n      action: { decision: deny }\n      priorty: 3\n");
    let d = expect(&y, "unknown-field", 11, Some("a"));
    assert!(d.message.contains("priorty"), "{d}");
    assert_eq!(d.position.map(|p| p.column), Some(7));
    let y = "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: x, nmespace: y}\nspec: {}\n";
    expect(y, "unknown-field", 3, None);
}

#[test]
fn wrong_types_and_missing_fields() {
    let y = policy("allow", "    - id: a\n      priority: high\n      when: { cel: 'true' }\n      action: { decision: deny }\n");
    expect(&y, "invalid-type", 9, Some("a"));
    let y = policy("allow", "    - id: a\n      when: { cel: 'true' }\n");
    let d = expect(&y, "missing-field", 8, Some("a"));
    assert!(d.message.contains("action"));
    let y = policy(
        "allow",
        "    - id: a\n      when: { cel: 'true' }\n      action: { decision: block }\n",
    );
    expect(&y, "invalid-type", 10, Some("a"));
}

#[test]
fn duplicate_ids_name_the_first_definition() {
    let y = policy(
        "allow",
        "    - {id: a, when: {cel: 'true'}, action: {decision: deny}}\n    - {id: a, when: {cel: 'false'}, action: {decision: deny}}\n",
    );
    let d = expect(&y, "duplicate-id", 9, Some("a"));
    assert_eq!(d.help.as_deref(), Some("first defined at test.yaml:8:8"));
}

#[test]
fn cel_syntax_errors() {
    let y = policy("allow", "    - id: a\n      when: { cel: \"request.model ==\" }\n      action: { decision: deny }\n");
    expect(&y, "cel-syntax", 9, Some("a"));
}

#[test]
fn cel_unknown_fields_get_suggestions() {
    let y = policy("allow", "    - id: a\n      when: { cel: \"principal.teir == 'x'\" }\n      action: { decision: deny }\n");
    let d = expect(&y, "unknown-field", 9, Some("a"));
    assert_eq!(d.help.as_deref(), Some("did you mean `principal.tier`?"));
}

#[test]
fn dsl_unknown_field_with_suggestion() {
    let y = policy(
        "allow",
        "    - id: a\n      when:\n        match:\n          all:\n            - { field: request.model, op: eq, value: x }\n            - { field: request.modle, op: eq, value: x }\n      action: { decision: deny }\n",
    );
    let d = expect(&y, "invalid-match", 13, Some("a"));
    assert_eq!(d.help.as_deref(), Some("did you mean `request.model`?"));
    assert!(d.message.contains("request.modle"));
}

#[test]
fn dsl_values_of_the_wrong_type() {
    for (leaf, what) in [
        (
            "{ field: request.max_tokens, op: gt, value: lots }",
            "needs a number",
        ),
        (
            "{ field: request.model, op: eq, value: 5 }",
            "is a string, but the value is a number",
        ),
        (
            "{ field: request.stream, op: eq, value: 'yes' }",
            "is a bool, but the value is a string",
        ),
        (
            "{ field: request.model, op: in, value: gpt-4o }",
            "takes a list",
        ),
        (
            "{ field: request.model, op: gt, value: 3 }",
            "compares numbers",
        ),
        (
            "{ field: request.model, op: eq, value: null }",
            "always false",
        ),
        (
            "{ field: request.model, op: bigger, value: 1 }",
            "unknown variant",
        ),
    ] {
        let y = policy("allow", &format!("    - id: a\n      when:\n        match: {leaf}\n      action: {{ decision: deny }}\n"));
        let all = errors(&y);
        let d = all.iter().find(|d| d.severity == Severity::Error).unwrap();
        assert!(d.message.contains(what), "{leaf}: {d}");
        assert_eq!(d.position.map(|p| p.line), Some(10), "{d}");
        assert_eq!(d.rule.as_deref(), Some("a"));
    }
}

#[test]
fn bad_regexes() {
    let y = policy("allow", "    - id: a\n      when:\n        match: { field: request.prompt, op: matches, value: '([a-z' }\n      action: { decision: deny }\n");
    let d = expect(&y, "invalid-match", 10, Some("a"));
    assert!(d.message.contains("invalid regular expression"));
}

#[test]
fn when_needs_exactly_one_condition() {
    let y = policy("allow", "    - id: a\n      when: { cel: 'true', match: { field: request.stream, op: exists } }\n      action: { decision: deny }\n");
    expect(&y, "invalid-condition", 9, Some("a"));
    let y = policy(
        "allow",
        "    - id: a\n      when: {}\n      action: { decision: deny }\n",
    );
    expect(&y, "invalid-condition", 9, Some("a"));
}

#[test]
fn conflicting_rules_are_errors() {
    let y = policy(
        "allow",
        "    - {id: a, priority: 3, when: {cel: 'request.stream'}, action: {decision: deny}}\n    - {id: b, priority: 3, when: {cel: 'request.stream'}, action: {decision: allow}}\n",
    );
    let d = expect(&y, "conflicting-rules", 9, Some("b"));
    assert!(d.message.contains("`a`"));
}

#[test]
fn shadowed_rules_are_warnings_only() {
    let y = policy(
        "allow",
        "    - {id: all, priority: 9, when: {match: {all: []}}, action: {decision: allow}}\n    - {id: low, when: {cel: 'request.stream'}, action: {decision: deny}}\n",
    );
    let docs = llm_policy_core::source::parse_str("test.yaml", &y).unwrap();
    let out = llm_policy_core::PolicySet::compile(&docs, &Default::default()).unwrap();
    assert_eq!(out.warnings.len(), 1);
    let w = &out.warnings[0];
    assert_eq!(w.code, "shadowed-rule");
    assert_eq!(w.severity, Severity::Warning);
    assert_eq!(w.rule.as_deref(), Some("low"));
    assert_eq!(w.position.map(|p| p.line), Some(9));
}

#[test]
fn limits_and_actions_are_checked() {
    let cases = [
        (
            "rateLimit: { key: '{principal.id}', per: minute }",
            "invalid-limit",
        ),
        (
            "rateLimit: { key: '{principal.idd}', requests: 5, per: minute }",
            "invalid-key",
        ),
        (
            "rateLimit: { key: '{request.messages}', requests: 5, per: minute }",
            "invalid-key",
        ),
        (
            "rateLimit: { key: '{principal.id}', requests: 5, per: fortnight }",
            "invalid-window",
        ),
        ("budget: { key: team, usd: -3, per: day }", "invalid-limit"),
        ("status: 999", "invalid-status"),
        (
            "rateLimit: { key: '{request.prompt}', requests: 5, per: minute }",
            "invalid-key",
        ),
        (
            "rateLimit: { key: '{principal.id}{principal.team}', requests: 5, per: minute }",
            "invalid-key",
        ),
        (
            "rateLimit: { key: '{principal.id}%2{request.model}', requests: 5, per: minute }",
            "invalid-key",
        ),
        (
            "rateLimit: { key: '{principal.id}{principal.id}{principal.id}{principal.id}{principal.id}{principal.id}{principal.id}{principal.id}{principal.id}', requests: 5, per: minute }",
            "invalid-key",
        ),
        ("headers: { 'X Bad': v }", "invalid-header"),
        ("headers: { transfer-encoding: chunked }", "invalid-header"),
        ("headers: { content-length: '5' }", "invalid-header"),
        ("headers: { x-llm-policy-decision: allow }", "invalid-header"),
        ("headers: { host: evil.example }", "invalid-header"),
    ];
    for (extra, code) in cases {
        let y = policy("allow", &format!("    - id: a\n      when: {{ cel: 'true' }}\n      action: {{ decision: throttle, {extra} }}\n"));
        let all = errors(&y);
        assert!(
            all.iter()
                .any(|d| d.code == code && d.rule.as_deref() == Some("a") && d.position.is_some()),
            "{extra}: {all:#?}"
        );
    }
}

#[test]
fn transforms_are_checked_where_they_cannot_apply() {
    let cases = [
        // decision, rest of the action
        ("throttle", "transform: { maxTokens: 100 }"),
        ("allow", "transform: { maxTokens: 0 }"),
        ("allow", "transform: { maxTokens: 100, minTokens: 5 }"),
        ("allow", "transform: { maxTokens: 100 }, rateLimit: { key: u, requests: 5, per: minute }"),
        ("throttle", "transform: { maxTokens: fitBudget }"),
        ("throttle", "transform: { maxTokens: fitBudget }, rateLimit: { key: u, tokens: 5, per: minute }"),
        ("throttle", "transform: { maxTokens: fitBudget, minTokens: 0 }, budget: { key: u, tokens: 5, per: day }"),
        ("deny", "transform: { redact: [email] }"),
        ("allow", "transform: { redact: [emails] }"),
        ("allow", "transform: { restore: true }"),
        ("allow", "transform: { minTokens: 5, redact: [email] }"),
        ("allow", "transform: {}"),
    ];
    for (decision, extra) in cases {
        let y = policy("allow", &format!("    - id: a\n      when: {{ cel: 'true' }}\n      action: {{ decision: {decision}, {extra} }}\n"));
        let all = errors(&y);
        assert!(
            all.iter().any(|d| d.code == "invalid-transform"
                && d.rule.as_deref() == Some("a")
                && d.position.is_some_and(|p| p.line == 10)),
            "{extra}: {all:#?}"
        );
    }
    let y = policy("allow", "    - id: a\n      when: { plugin: { name: pii } }\n      action: { decision: allow, transform: { maxTokens: 10 } }\n");
    assert!(errors(&y).iter().any(|d| d.code == "invalid-transform"));
    for bad in ["fitbudget", "-3", "1.5"] {
        let y = policy("allow", &format!("    - id: a\n      when: {{ cel: 'true' }}\n      action: {{ decision: allow, transform: {{ maxTokens: {bad} }} }}\n"));
        assert!(!errors(&y).is_empty(), "{bad}");
    }
    for good in [
        "decision: allow, transform: { maxTokens: 1024 }",
        "decision: throttle, transform: { maxTokens: fitBudget }, budget: { key: u, usd: 5, per: day }",
        "decision: throttle, transform: { maxTokens: fitBudget, minTokens: 64 }, budget: { key: u, tokens: 5, per: day }",
    ] {
        let y = policy("allow", &format!("    - id: a\n      when: {{ cel: 'true' }}\n      action: {{ {good} }}\n"));
        assert!(compile(&y).is_ok(), "{good}");
    }
}

#[test]
fn header_errors() {
    let y = "apiVersion: llm-policy/v2\nkind: Policy\nmetadata: {name: x}\nspec: {}\n";
    expect(y, "api-version", 1, None);
    let y = "apiVersion: llm-policy/v1\nkind: Rules\nmetadata: {name: x}\nspec: {}\n";
    expect(y, "kind", 2, None);
    let a = policy("allow", "    []\n");
    let y = format!("{a}---\n{a}");
    let d = expect(&y, "duplicate-policy", 13, None);
    assert!(d.message.contains("`t`"));
}

#[test]
fn yaml_syntax_errors_have_positions() {
    let err = llm_policy_core::source::parse_str("test.yaml", "a: [1, 2\nb: {\n").unwrap_err();
    assert_eq!(err.code, "syntax");
    assert!(err.position.is_some());
    let err = llm_policy_core::source::parse_str("p.json", "{\"a\": 1,, }").unwrap_err();
    assert_eq!(err.position.map(|p| p.line), Some(1));
}

#[test]
fn deep_cel_nesting_is_rejected_not_a_crash() {
    let deep = format!("{}request.stream{}", "(".repeat(1_000), ")".repeat(1_000));
    let y = policy(
        "allow",
        &format!(
            "    - id: a\n      when: {{ cel: \"{deep}\" }}\n      action: {{ decision: deny }}\n"
        ),
    );
    expect(&y, "cel-too-deep", 9, Some("a"));
}

#[test]
fn all_errors_are_reported_at_once() {
    let y = policy(
        "allow",
        "    - {id: a, when: {cel: 'request.modle'}, action: {decision: deny}}\n    - {id: b, when: {cel: '1 +'}, action: {decision: deny}}\n    - {id: c, when: {match: {field: x.y, op: eq, value: 1}}, action: {decision: deny}}\n",
    );
    let all = errors(&y);
    let rules: Vec<&str> = all.iter().filter_map(|d| d.rule.as_deref()).collect();
    assert_eq!(rules, vec!["a", "b", "c"]);
}

#[test]
fn errors_in_a_later_document_of_a_file_point_into_that_document() {
    let a = policy(
        "allow",
        "    - {id: a, when: {cel: 'true'}, action: {decision: deny}}\n",
    );
    let b = "---\napiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: b, namespace: other}\nspec:\n  rules:\n    - id: bad\n      when: { cel: \"request.modle == 'x'\" }\n      action: { decision: deny }\n";
    let y = format!("{a}{b}");
    // `a` fills lines 1-8, `---` is line 9, so the CEL of `bad` is on line 16.
    expect(&y, "unknown-field", 16, Some("bad"));
}

#[test]
fn remaining_error_codes() {
    let long = format!("request.model == '{}'", "x".repeat(20_000));
    let y = policy(
        "allow",
        &format!(
            "    - id: a\n      when: {{ cel: \"{long}\" }}\n      action: {{ decision: deny }}\n"
        ),
    );
    expect(&y, "cel-too-large", 9, Some("a"));
    let y = policy("allow", "    - id: a\n      when: { cel: \"request.prompt.lowerAsci() == 'x'\" }\n      action: { decision: deny }\n");
    expect(&y, "cel-unknown-function", 9, Some("a"));
    let y = policy(
        "allow",
        "    - id: ''\n      when: { cel: 'true' }\n      action: { decision: deny }\n",
    );
    expect(&y, "invalid-id", 8, None);
    let y = policy(
        "allow",
        "    - id: a\n      when: { plugin: { name: ' ' } }\n      action: { decision: deny }\n",
    );
    expect(&y, "invalid-plugin", 9, Some("a"));
    let y = "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: ''}\nspec: {}\n";
    expect(y, "invalid-name", 3, None);
    let none = llm_policy_core::PolicySet::compile(&[], &Default::default()).unwrap_err();
    assert_eq!(none.0[0].code, "no-policies");
}

/// A one-rule policy whose rule has this `when` and `action` (rule on line 8, `when` on line 9,
/// `action` on line 10).
fn rule(when: &str, action: &str) -> String {
    policy(
        "allow",
        &format!("    - id: a\n      when: {when}\n      action: {action}\n"),
    )
}

#[test]
fn cel_checks_that_used_to_fail_on_every_request_are_load_errors_with_locations() {
    for (cel, code) in [
        ("request.prompt.matches('[unclosed')", "cel-regex"),
        (
            "request.prompt.lowerAscii().matches(r'\\\\w{300}')",
            "cel-regex",
        ),
        (
            "request.model == 'x' && foo(request.prompt)",
            "cel-unknown-function",
        ),
        ("request.model > 3", "cel-type"),
        ("request.model", "cel-type"),
        ("9223372036854775807 + 1 > 0", "cel-constant"),
        ("'X-Api-Key' in request.headers", "header-case"),
        ("has(shield.PII_SCORE)", "invalid-shield-name"),
        (
            "request.messages.exists(m, request.messages.exists(n, n == m))",
            "cel-too-complex",
        ),
        (
            &format!(
                "request.model == 'boom' && request.max_tokens == {}",
                vec!["1"; 5000].join("+")
            ),
            "cel-too-deep",
        ),
    ] {
        let y = rule(&format!("{{ cel: \"{cel}\" }}"), "{ decision: deny }");
        let d = expect(&y, code, 9, Some("a"));
        assert_eq!(d.position.map(|p| p.column), Some(15), "{cel}: {d}");
    }
}

#[test]
fn unguarded_null_reads_warn_with_the_guard_to_write() {
    let y = rule(
        "{ cel: \"principal.id.startsWith('rate-')\" }",
        "{ decision: deny }",
    );
    let docs = llm_policy_core::source::parse_str("test.yaml", &y).unwrap();
    let out = llm_policy_core::PolicySet::compile(&docs, &Default::default()).unwrap();
    let w = &out.warnings[0];
    assert_eq!(w.code, "cel-unguarded");
    assert_eq!(w.position.map(|p| p.line), Some(9));
    assert!(
        w.help
            .as_deref()
            .unwrap()
            .contains("principal.id != null && ..."),
        "{w}"
    );
}

#[test]
fn actions_that_cannot_be_sent_are_errors() {
    let y = rule("{ cel: 'true' }", "{ decision: deny, status: 200 }");
    let d = expect(&y, "invalid-status", 10, Some("a"));
    assert!(d.message.contains("4xx or 5xx"), "{d}");
    let y = rule("{ cel: 'true' }", "{ decision: allow, status: 403 }");
    expect(&y, "invalid-status", 10, Some("a"));
    let y = rule(
        "{ cel: 'true' }",
        "{ decision: deny, headers: { x-h: \"a\\r\\nset-cookie: x=1\" } }",
    );
    let d = expect(&y, "invalid-header", 10, Some("a"));
    assert!(d.message.contains("control characters"), "{d}");
}

#[test]
fn empty_or_broken_namespaces_are_errors() {
    for ns in ["''", "'   '", "\"a\\nb\""] {
        let y = format!(
            "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {{name: x, namespace: {ns}}}\nspec: {{}}\n"
        );
        expect(&y, "invalid-namespace", 3, None);
    }
}

#[test]
fn a_document_that_is_not_a_map_says_so() {
    let y = "- apiVersion: llm-policy/v1\n  kind: Policy\n- apiVersion: llm-policy/v1\n";
    let d = expect(y, "invalid-document", 1, None);
    assert!(d.message.contains("a list"), "{d}");
    assert!(d.help.as_deref().unwrap().contains("---"), "{d}");
}

#[test]
fn dsl_nesting_is_bounded() {
    let deep = format!(
        "{}{{ field: request.stream, op: exists }}{}",
        "{not: ".repeat(40),
        "}".repeat(40)
    );
    let y = rule(&format!("{{ match: {deep} }}"), "{ decision: deny }");
    let all = errors(&y);
    assert!(
        all.iter()
            .any(|d| d.code == "invalid-match" && d.message.contains("deeper than 32")),
        "{all:#?}"
    );
}

#[test]
fn a_context_config_with_capitals_still_matches() {
    use llm_policy_core::{ContextConfig, RequestContext, RequestInput};
    let config = ContextConfig {
        namespace_header: "X-Tenant".into(),
        principal_headers: [("id".to_string(), "X-User".to_string())]
            .into_iter()
            .collect(),
        shield_prefix: "X-Shield-".into(),
        ..ContextConfig::default()
    };
    let headers = vec![
        ("x-tenant".to_string(), "acme".to_string()),
        ("X-USER".to_string(), "u1".to_string()),
        ("x-shield-pii-score".to_string(), "0.7".to_string()),
    ];
    let input = RequestInput {
        method: "POST",
        path: "/v1/chat/completions",
        headers: &headers,
        body: b"{}",
        now_unix: 0,
    };
    let c = RequestContext::from_request(&input, &config).unwrap();
    assert_eq!(c.namespace, "acme");
    assert_eq!(c.principal("id"), Some("u1"));
    assert_eq!(c.shield.len(), 1);
    assert_eq!(c.shield[0].0, "pii_score");
    // The compiled set keeps the configuration in lower case.
    let y = policy("allow", "    []\n");
    let docs = llm_policy_core::source::parse_str("test.yaml", &y).unwrap();
    let set = llm_policy_core::PolicySet::compile(&docs, &config)
        .unwrap()
        .set;
    assert_eq!(set.config().namespace_header, "x-tenant");
}

#[test]
fn json_policies_with_escapes_python_writes() {
    let json = r#"{"apiVersion": "llm-policy/v1", "kind": "Policy", "metadata": {"name": "p"},
      "spec": {"rules": [{"id": "r", "when": {"cel": "request.prompt.contains('\ud83d\ude00')"},
        "action": {"decision": "deny", "reason": "no \u00e9mojis"}}]}}"#;
    let docs = llm_policy_core::source::parse_str("p.json", json).unwrap();
    let set = llm_policy_core::PolicySet::compile(&docs, &Default::default()).unwrap();
    assert_eq!(set.set.rule_count(), 1);
    let bad = json.replace("\"kind\": \"Policy\"", "\"kind\": 5");
    let e = llm_policy_core::source::parse_str("p.json", &bad)
        .map(|d| llm_policy_core::PolicySet::compile(&d, &Default::default()).unwrap_err())
        .unwrap();
    assert_eq!(e.0[0].code, "invalid-type");
    assert_eq!(e.0[0].position.map(|p| p.line), Some(1));
}

#[test]
fn rules_keep_where_they_were_written() {
    let y = policy(
        "allow",
        "    - {id: a, when: {cel: 'true'}, action: {decision: deny}}\n    - id: b\n      when: {cel: 'false'}\n      action: {decision: deny}\n",
    );
    let set = compile(&y).unwrap();
    let b = set.rule("default", "b").unwrap();
    assert_eq!(b.origin.file, "test.yaml");
    assert_eq!(b.origin.position.map(|p| (p.line, p.column)), Some((9, 7)));
    assert_eq!(b.origin.policy, "t");
}

#[test]
fn policies_of_one_namespace_that_disagree_on_the_default_warn_naming_both() {
    let allow = "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: base, namespace: team}\nspec:\n  defaultDecision: allow\n  rules: []\n";
    let silent = "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: extra, namespace: team}\nspec:\n  rules:\n    - {id: r, when: {cel: \"request.model == 'x'\"}, action: {decision: deny}}\n";
    let other_ns = "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: lone, namespace: other}\nspec:\n  defaultDecision: deny\n";
    let mut docs = llm_policy_core::source::parse_str("a.yaml", allow).unwrap();
    docs.extend(llm_policy_core::source::parse_str("b.yaml", silent).unwrap());
    docs.extend(llm_policy_core::source::parse_str("c.yaml", other_ns).unwrap());
    let out = llm_policy_core::PolicySet::compile(&docs, &Default::default()).unwrap();
    let mixed: Vec<_> = out
        .warnings
        .iter()
        .filter(|w| w.code == "mixed-default-decision")
        .collect();
    assert_eq!(mixed.len(), 1, "{:#?}", out.warnings);
    let w = mixed[0];
    assert_eq!(w.severity, Severity::Warning);
    // Located at the policy that turned the namespace to deny, naming the other's file.
    assert_eq!(w.file.as_deref(), Some("b.yaml"));
    assert_eq!(w.position.map(|p| p.line), Some(3));
    assert!(w.message.contains("namespace `team`"), "{w}");
    assert!(w.message.contains("leaves `defaultDecision` out"), "{w}");
    assert!(w.message.contains("a.yaml:5:"), "{w}");
    // Still fail closed, as documented.
    assert!(out.set.has_namespace("team"));
    // Agreeing policies say nothing.
    let mut same = llm_policy_core::source::parse_str("a.yaml", allow).unwrap();
    same.extend(
        llm_policy_core::source::parse_str(
            "b.yaml",
            &silent.replace("spec:\n", "spec:\n  defaultDecision: allow\n"),
        )
        .unwrap(),
    );
    let out = llm_policy_core::PolicySet::compile(&same, &Default::default()).unwrap();
    assert!(out.warnings.is_empty(), "{:#?}", out.warnings);
}
