//! CEL's library on request data, evaluated as policy conditions: timestamps and durations from
//! headers, the strings extension under its load-time cost bounds, backtick-quoted names, and
//! runtime errors written as CEL (never Rust debug text).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;

use common::{compile, ctx, eval, policy};
use llm_policy_core::decision::{Decision, Verdict};

const BODY: &str = r#"{"model":"gpt-4o","max_tokens":300,"tools":[{"type":"function","function":{"name":"web_search"}},{"type":"function","function":{"name":"code"}}],"messages":[{"role":"user","content":"my key is sk-abc, ok?"}]}"#;

/// Evaluates one CEL condition (a deny rule, `onError: skip`) on a request with `headers`.
fn run(cel: &str, headers: &[(&str, &str)]) -> Decision {
    let rules = format!(
        "    - id: r\n      onError: skip\n      when: {{ cel: {} }}\n      action: {{ decision: deny }}\n",
        serde_json::to_string(cel).unwrap()
    );
    let set = compile(&policy("allow", &rules)).unwrap_or_else(|e| panic!("{cel}: {e}"));
    eval(&set, &ctx(headers, BODY))
}

fn holds(cel: &str, headers: &[(&str, &str)]) -> bool {
    let d = run(cel, headers);
    assert!(
        d.metadata.errors.is_empty(),
        "{cel}: {:?}",
        d.metadata.errors
    );
    d.decision == Verdict::Deny
}

/// The runtime error of a condition.
fn error(cel: &str, headers: &[(&str, &str)]) -> String {
    let d = run(cel, headers);
    assert_eq!(d.decision, Verdict::Allow, "{cel}");
    d.metadata
        .errors
        .first()
        .unwrap_or_else(|| panic!("{cel}: no error"))
        .message
        .clone()
}

#[test]
fn timestamps_and_durations_from_request_data() {
    let h = [
        ("x-exp", "2026-03-01T12:00:00Z"),
        ("x-iat", "2026-03-01T11:30:00+01:00"),
        ("x-ttl", "90m"),
    ];
    for (cel, want) in [
        (
            "timestamp(request.headers['x-exp']) > timestamp('2026-01-01T00:00:00Z')",
            true,
        ),
        (
            "timestamp(request.headers['x-exp']) - timestamp(request.headers['x-iat']) == duration('1h30m')",
            true,
        ),
        (
            "timestamp(request.headers['x-iat']) + duration(request.headers['x-ttl']) == timestamp(request.headers['x-exp'])",
            true,
        ),
        (
            "duration(request.headers['x-ttl']) > duration('2h')",
            false,
        ),
        (
            "timestamp(request.headers['x-exp']).getHours('-05:00') == 7",
            true,
        ),
        (
            "timestamp(request.headers['x-exp']).getDayOfWeek() == 0",
            true,
        ),
        (
            "int(timestamp(request.headers['x-exp'])) == 1772366400",
            true,
        ),
        (
            "string(timestamp(request.headers['x-iat'])) == '2026-03-01T10:30:00Z'",
            true,
        ),
    ] {
        assert_eq!(holds(cel, &h), want, "{cel}");
    }
    let e = error(
        "timestamp(request.headers['x-exp']) > timestamp(0)",
        &[("x-exp", "tomorrow")],
    );
    assert!(e.contains("timestamp"), "{e}");
}

#[test]
fn string_functions_on_request_data() {
    let h = [("x-groups", "dev, admin ,ops"), ("x-user-id", "u-1")];
    for (cel, want) in [
        (
            "request.headers['x-groups'].split(',', 16).exists(g, g.trim() == 'admin')",
            true,
        ),
        ("request.prompt.indexOf('sk-') == 10", true),
        ("request.prompt.lastIndexOf('k') == 9", false),
        ("request.tools.join(', ') == 'web_search, code'", true),
        (
            "'%s for %s: %d'.format([request.model, principal.id, request.max_tokens]) == 'gpt-4o for u-1: 300'",
            true,
        ),
        (
            // Tool definitions are text the model reads too.
            "request.prompt.replace('sk-abc', '[key]') == 'my key is [key], ok?\\nweb_search\\ncode'",
            true,
        ),
        ("strings.quote(request.model) == '\"gpt-4o\"'", true),
        ("request.headers.`x-user-id` == 'u-1'", true),
        ("has(request.headers.`x-groups`)", true),
    ] {
        assert_eq!(holds(cel, &h), want, "{cel}");
    }
}

#[test]
fn runtime_errors_are_written_as_cel() {
    let e = error(
        "int(request.headers['x-n']) / int(request.headers['x-d']) > 1",
        &[("x-n", "5"), ("x-d", "0")],
    );
    assert_eq!(e, "division by zero: 5 / 0");
    let e = error("uint(request.headers['x-n']) - 10u > 1u", &[("x-n", "5")]);
    assert_eq!(e, "overflow: 5u - 10u is out of range");
    let e = error(
        "timestamp(request.headers['x-exp']) + duration('1s') > timestamp(0)",
        &[("x-exp", "9999-12-31T23:59:59Z")],
    );
    assert_eq!(
        e,
        "overflow: timestamp('9999-12-31T23:59:59Z') + duration('1s') is out of range"
    );
    let e = error(
        "request.headers['x-groups'].split(',', 4)[9] == 'x'",
        &[("x-groups", "a,b")],
    );
    assert_eq!(e, "index 9 out of range");
}
