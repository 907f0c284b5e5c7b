//! The `llm-policy` binary: exit codes, output formats and error reports.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llm-policy"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts that the command's stderr contains `needle`, showing stderr otherwise.
fn stderr_has(out: &Output, needle: &str) {
    let err = text(&out.stderr);
    assert!(err.contains(needle), "no {needle:?} in stderr:\n{err}");
}

fn write(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write");
    p.display().to_string()
}

#[test]
fn validate_accepts_the_example_bundle() {
    let out = run(&["validate", "policies"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("valid: 2 policies"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn validate_rejects_a_broken_file_with_locations() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "bad.yaml",
        "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: bad}\nspec:\n  rules:\n    - id: r1\n      when: { match: { field: request.modle, op: eq, value: x } }\n      action: { decision: deny }\n",
    );
    let out = run(&["validate", &f]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("{f}:7:")), "{err}");
    assert!(err.contains("did you mean `request.model`?"), "{err}");
    assert!(err.contains("(rule `r1`)"), "{err}");
    let out = run(&["validate", "no/such/path"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no/such/path"));
    let f = write(dir.path(), "syntax.yaml", "apiVersion: [\n");
    let out = run(&["validate", &f]);
    assert_eq!(out.status.code(), Some(2));
    stderr_has(&out, "error[syntax]");
}

#[test]
fn eval_prints_the_decision_json() {
    let out = run(&[
        "eval",
        "--policy",
        "policies",
        "--request",
        "examples/requests/free-tier-gpt4o.json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(d["decision"], "deny");
    assert_eq!(d["matched_rules"][0], "free-tier-models");
    assert_eq!(d["actions"]["status"], 402);
    assert!(d.get("explain").is_none());
}

#[test]
fn eval_explain_lists_every_rule() {
    let out = run(&[
        "eval",
        "-p",
        "policies",
        "-r",
        "examples/requests/allowed-chat.json",
        "--explain",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["decision"], "allow");
    let trace = d["explain"].as_array().unwrap();
    assert_eq!(trace.len(), 10, "every rule of the default namespace");
    assert!(trace
        .iter()
        .any(|t| t["rule"] == "per-user-request-rate" && t["outcome"] == "remote"));
    let out = run(&[
        "eval",
        "-p",
        "policies",
        "-r",
        "examples/requests/allowed-chat.json",
        "--explain",
        "--format",
        "text",
    ]);
    let t = text(&out.stdout);
    assert!(t.starts_with("decision: ALLOW"), "{t}");
    assert!(t.contains("block-secrets-in-prompt"), "{t}");
}

#[test]
fn eval_rejects_invalid_input_with_exit_2() {
    let out = run(&[
        "eval",
        "-p",
        "policies",
        "-r",
        "examples/requests/malformed-body.json",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).expect("error JSON");
    assert_eq!(e["error"]["code"], "invalid_body");
    assert_eq!(e["error"]["status"], 400);
    let dir = tempfile::tempdir().unwrap();
    let r = write(dir.path(), "r.json", "{\"path\": 5}");
    let out = run(&["eval", "-p", "policies", "-r", &r]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("invalid request file"));
    let p = write(
        dir.path(),
        "p.yaml",
        "apiVersion: llm-policy/v1\nkind: Policy\n",
    );
    let out = run(&[
        "eval",
        "-p",
        &p,
        "-r",
        "examples/requests/allowed-chat.json",
    ]);
    assert_eq!(out.status.code(), Some(2));
    stderr_has(&out, "missing field");
}

#[test]
fn test_runs_the_example_suites() {
    let out = run(&["test", "policies"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let last = text(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(last.ends_with(" passed, 0 failed"), "{last}");
}

#[test]
fn test_reports_a_failed_case_with_a_diff_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let policy = root()
        .join("policies/llm-baseline.yaml")
        .display()
        .to_string();
    let suite = write(
        dir.path(),
        "s.yaml",
        &format!(
            "apiVersion: llm-policy/v1\nkind: PolicyTest\nmetadata: {{name: s}}\npolicy: {policy}\ncases:\n  - name: wrong on purpose\n    request: {{ headers: {{ x-user-tier: pro }}, body: {{ model: gpt-4o }} }}\n    expect: {{ decision: deny, matched_rules: [x], status: 402 }}\n  - name: right\n    request: {{ headers: {{ x-user-tier: pro }}, body: {{ model: gpt-4o }} }}\n    expect: {{ decision: allow }}\n"
        ),
    );
    let out = run(&["test", &suite]);
    assert_eq!(out.status.code(), Some(1));
    let o = text(&out.stdout);
    assert!(
        o.contains(&format!("FAIL {suite}:6 wrong on purpose")),
        "{o}"
    );
    assert!(o.contains("decision: expected deny, got allow"), "{o}");
    assert!(o.contains("matched_rules: expected [x], got []"), "{o}");
    assert!(o.contains("status: expected 402, got none (allow)"), "{o}");
    assert!(!o.contains("Some("), "{o}");
    assert!(o.contains("1 passed, 1 failed"), "{o}");
}

#[test]
fn test_with_a_broken_policy_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "p.yaml",
        "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: p}\nspec: {rules: [{id: a}]}\n",
    );
    let suite = write(
        dir.path(),
        "s_test.yaml",
        "apiVersion: llm-policy/v1\nkind: PolicyTest\nmetadata: {name: s}\npolicy: p.yaml\ncases: []\n",
    );
    let out = run(&["test", &suite]);
    assert_eq!(out.status.code(), Some(2));
    stderr_has(&out, "p.yaml:4:");
}

#[test]
fn the_schema_doc_is_current() {
    let out = run(&["schema"]);
    assert_eq!(out.status.code(), Some(0));
    let doc = std::fs::read_to_string(root().join("docs/context-schema.md")).unwrap();
    assert_eq!(
        text(&out.stdout),
        doc,
        "run `make docs` to regenerate docs/context-schema.md"
    );
}

#[test]
fn the_table_of_codes_in_the_docs_is_current() {
    let out = run(&["codes"]);
    assert_eq!(out.status.code(), Some(0));
    let doc = std::fs::read_to_string(root().join("docs/policy-language.md")).unwrap();
    let start = doc.find("<!-- codes:start -->\n").unwrap() + "<!-- codes:start -->\n".len();
    let end = doc.find("<!-- codes:end -->").unwrap();
    assert_eq!(
        text(&out.stdout),
        &doc[start..end],
        "run `make docs` to regenerate the table of codes in docs/policy-language.md"
    );
    for code in llm_policy_core::Code::ALL {
        assert!(doc.contains(&format!("`{}`", code.as_str())), "{code}");
    }
}

#[test]
fn context_config_changes_the_schema_and_the_headers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "ctx.yaml",
        "principalHeaders: { id: x-forwarded-user, dept: x-dept }\nnamespaceHeader: x-tenant\n",
    );
    let p = write(
        dir.path(),
        "p.yaml",
        "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: p, namespace: acme}\nspec:\n  defaultDecision: allow\n  rules:\n    - {id: dept, when: {cel: \"principal.dept == 'blocked'\"}, action: {decision: deny}}\n",
    );
    let r = write(
        dir.path(),
        "r.json",
        r#"{"headers": {"x-tenant": "acme", "x-dept": "blocked"}, "body": {"model": "m"}}"#,
    );
    let out = run(&["eval", "--context-config", &cfg, "-p", &p, "-r", &r]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["decision"], "deny");
    assert_eq!(d["metadata"]["namespace"], "acme");
    // Without the configuration, `principal.dept` is not part of the schema.
    let out = run(&["validate", &p]);
    assert_eq!(out.status.code(), Some(2));
    stderr_has(&out, "configured principal attributes: id, org, team, tier");
    let bad = write(dir.path(), "bad.yaml", "principalHeader: {}\n");
    let out = run(&["validate", "--context-config", &bad, &p]);
    assert_eq!(out.status.code(), Some(2));
    stderr_has(&out, "bad.yaml:1:1");
}

#[test]
fn context_shows_what_conditions_see() {
    let out = run(&[
        "context",
        "-r",
        "examples/requests/anthropic-jailbreak.json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(c["namespace"], "default");
    assert_eq!(c["request"]["provider"], "anthropic");
    assert_eq!(c["request"]["api"], "messages");
    assert_eq!(c["request"]["headers"]["anthropic-version"], "2023-06-01");
    assert_eq!(c["principal"]["id"], "u-8");
    assert_eq!(c["principal"]["tier"], "enterprise");
    assert!(c["principal"]["team"].is_null());
    assert!(c["request"]["prompt"]
        .as_str()
        .unwrap()
        .starts_with("You are a support assistant"));
    let out = run(&["context", "-r", "examples/requests/malformed-body.json"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_closed_stdout_is_not_a_panic() {
    use std::io::Read as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_llm-policy"))
        .arg("schema")
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // The pipe is closed now; the rest of the output goes nowhere.
    let out = child.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(101), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );
}
