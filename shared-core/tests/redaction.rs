//! `transform: {redact, restore}` through a policy: the decision names the kinds of every
//! matching allow rule, applying it redacts the body and writes the counts, a value the
//! scanners see only through a disguise turns the decision into a deny, and what the decision
//! says never holds a value.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;

use common::{compile, ctx, eval, policy};
use llm_policy_core::context::{ContextConfig, RequestInput};
use llm_policy_core::decision::Verdict;
use llm_policy_core::redact;

const RULES: &str = r#"    - id: redact-personal-data
      when: {match: {field: request.method, op: eq, value: POST}}
      action: {decision: allow, transform: {redact: [email, card]}}
    - id: restore-for-support
      when: {match: {field: principal.team, op: eq, value: support}}
      action: {decision: allow, transform: {redact: [secret], restore: true}}
    - id: no-ssn
      priority: 5
      when: {match: {field: request.prompt_entities, op: contains, value: us_ssn}}
      action: {decision: deny, reason: no social security numbers}
"#;

fn body(text: &str) -> String {
    serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})
        .to_string()
}

fn input<'a>(headers: &'a [(String, String)], body: &'a str) -> RequestInput<'a> {
    RequestInput {
        method: "POST",
        path: "/v1/chat/completions",
        headers,
        body: body.as_bytes(),
        now_unix: 0,
    }
}

#[test]
fn the_decision_names_the_kinds_of_every_matching_rule() {
    let set = compile(&policy("allow", RULES)).expect("valid policy");
    let b = body("ann@example.com and sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb7cDe0fGh");
    let d = eval(&set, &ctx(&[("x-team-id", "support")], &b));
    let r = d.actions.redact.clone().expect("redacts");
    assert_eq!(r.kinds, ["email", "credit_card", "api_key", "private_key"]);
    assert!(r.restore);
    let d = eval(&set, &ctx(&[("x-team-id", "sales")], &b));
    let r = d.actions.redact.clone().expect("redacts");
    assert_eq!(r.kinds, ["email", "credit_card"]);
    assert!(!r.restore);
    // A deny redacts nothing.
    let d = eval(&set, &ctx(&[], &body("ssn 123-45-6789")));
    assert_eq!(d.decision, Verdict::Deny);
    assert_eq!(d.actions.redact, None);
}

#[test]
fn applying_writes_the_counts_and_never_a_value() {
    let set = compile(&policy("allow", RULES)).expect("valid policy");
    let b = body("ann@example.com, bob@example.org, ann@example.com, 4111-1111-1111-1111");
    let headers = vec![("x-team-id".to_string(), "sales".to_string())];
    let c = ctx(&[("x-team-id", "sales")], &b);
    let mut d = eval(&set, &c);
    let done =
        redact::apply(&mut d, &input(&headers, &b), &ContextConfig::default()).expect("redacted");
    let sent = String::from_utf8(done.body.expect("changed")).unwrap();
    assert!(
        sent.contains("<EMAIL_1>, <EMAIL_2>, <EMAIL_1>, <CREDIT_CARD_1>"),
        "{sent}"
    );
    let r = d.actions.redact.as_ref().unwrap();
    assert_eq!(r.counts.get("email"), Some(&2));
    assert_eq!(r.counts.get("credit_card"), Some(&1));
    let json = serde_json::to_string(&d).unwrap();
    assert!(
        !json.contains("example.com") && !json.contains("4111"),
        "{json}"
    );
    assert!(
        json.contains(
            r#""redact":{"kinds":["email","credit_card"],"counts":{"credit_card":1,"email":2}}"#
        ),
        "{json}"
    );
}

#[test]
fn a_disguised_value_turns_the_decision_into_a_deny() {
    let set = compile(&policy("allow", RULES)).expect("valid policy");
    let b = body("write to ann＠example．com please");
    let headers = Vec::new();
    let mut d = eval(&set, &ctx(&[], &b));
    assert_eq!(d.decision, Verdict::Allow);
    assert!(redact::apply(&mut d, &input(&headers, &b), &ContextConfig::default()).is_none());
    assert_eq!(d.decision, Verdict::Deny);
    assert_eq!(d.actions.status, Some(403));
    assert!(d.reason.contains("email"), "{}", d.reason);
    assert_eq!(d.actions.redact, None);
}

#[test]
fn a_batch_is_redacted_when_any_of_its_requests_matches() {
    let set = compile(&policy(
        "allow",
        r#"    - id: redact-contact
      when: {match: {field: request.prompt_entities, op: contains, value: [email]}}
      action: {decision: allow, transform: {redact: [email]}}
"#,
    ))
    .expect("valid policy");
    let b = serde_json::json!({"requests": [
        {"custom_id": "a", "params": {"model": "claude-sonnet-4-5", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hello"}]}},
        {"custom_id": "b", "params": {"model": "claude-sonnet-4-5", "max_tokens": 10,
            "messages": [{"role": "user", "content": "mail ann@example.org"}]}}]})
    .to_string();
    let c = common::ctx_at("/v1/messages/batches", &[], &b);
    let mut d = eval(&set, &c);
    assert_eq!(d.decision, Verdict::Allow);
    assert!(d.actions.redact.is_some(), "{d:?}");
    let headers = Vec::new();
    let input = RequestInput {
        path: "/v1/messages/batches",
        ..input(&headers, &b)
    };
    let done = redact::apply(&mut d, &input, &ContextConfig::default()).expect("redacted");
    let sent = String::from_utf8(done.body.expect("changed")).unwrap();
    assert!(
        sent.contains("mail <EMAIL_1>") && !sent.contains("ann@"),
        "{sent}"
    );
}
