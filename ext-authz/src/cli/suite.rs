//! Policy test suites (`kind: PolicyTest`), in the manner of `opa test` / `cerbos compile`:
//!
//! ```yaml
//! apiVersion: llm-policy/v1
//! kind: PolicyTest
//! metadata: { name: baseline }
//! policy: ../llm-baseline.yaml      # file or directory, relative to this file
//! cases:
//!   - name: free tier may not use gpt-4o
//!     request: { path: /v1/chat/completions, headers: {x-user-tier: free}, body: {...} }
//!     tags: [models]                # optional: evaluate only rules with these tags
//!     expect: { decision: deny, matched_rules: [free-tier-models], reason: "..." }
//!   - name: broken JSON is a 400
//!     request: { body: "{not json" }
//!     expect: { error: invalid_body }
//!   - name: an answer with a card number is cut     # response rules: `expect` is the answer's
//!     request: { body: {...} }                      # verdict (allow or deny)
//!     response: { text: "Card 4111 1111 1111 1111", toolCalls: [], finishReason: stop }
//!     expect: { decision: deny, matched_rules: [no-pii-in-answers] }
//! ```

use std::path::{Path, PathBuf};

use llm_policy_core::decision::Verdict;
use llm_policy_core::model::KIND_POLICY_TEST;
use llm_policy_core::source;
use llm_policy_core::{ContextConfig, Diagnostics, Document, EvalOptions, LocalOnly, PolicySet};
use serde::Deserialize;

use crate::request::RequestFile;

/// A test suite file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Suite {
    /// `llm-policy/v1`.
    pub api_version: String,
    /// `PolicyTest`.
    pub kind: String,
    /// Name.
    pub metadata: SuiteMeta,
    /// Policy file or directory, relative to the suite file.
    pub policy: String,
    /// Context configuration for this suite (default: the one given to the command).
    #[serde(default)]
    pub context_config: Option<ContextConfig>,
    /// Cases.
    pub cases: Vec<Case>,
}

/// Suite metadata.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteMeta {
    /// Name.
    pub name: String,
    /// Description.
    #[serde(default)]
    pub description: Option<String>,
}

/// One case.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// Name shown in reports.
    pub name: String,
    /// The request.
    pub request: RequestFile,
    /// Tags to select rules with.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The model's answer to the request: the case then tests the response rules, and
    /// `expect` is what they decide of the answer (the request must be allowed).
    #[serde(default)]
    pub response: Option<AnswerCase>,
    /// What must come out.
    pub expect: Expect,
}

/// What the model answers, as response rules read it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AnswerCase {
    /// `response.text`.
    #[serde(default)]
    pub text: String,
    /// `response.tool_calls`.
    #[serde(default)]
    pub tool_calls: Vec<String>,
    /// `response.finish_reason`.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// `response.output_tokens`.
    #[serde(default)]
    pub output_tokens: Option<i64>,
}

/// Expected outcome; unset fields are not checked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The verdict.
    #[serde(default)]
    pub decision: Option<Verdict>,
    /// Exactly these enforcing matches, in this order.
    #[serde(default)]
    pub matched_rules: Option<Vec<String>>,
    /// Exactly this reason.
    #[serde(default)]
    pub reason: Option<String>,
    /// This HTTP status.
    #[serde(default)]
    pub status: Option<u16>,
    /// Exactly these shadow matches.
    #[serde(default)]
    pub shadow_matches: Option<Vec<String>>,
    /// Whether the server must finish the decision.
    #[serde(default)]
    pub needs_remote: Option<bool>,
    /// The request is rejected before evaluation with this error code (`invalid_body`, …).
    #[serde(default)]
    pub error: Option<String>,
    /// Exactly these distinct values redacted, by kind (`{email: 2}`; `{}`: none).
    #[serde(default)]
    pub redacted: Option<std::collections::BTreeMap<String, u32>>,
}

/// Outcome of one case.
#[derive(Debug)]
pub struct CaseResult {
    /// Case name.
    pub name: String,
    /// Line of the case in the suite file.
    pub line: Option<u32>,
    /// Differences; empty when it passed.
    pub diffs: Vec<String>,
}

/// Outcome of one suite.
#[derive(Debug)]
pub struct SuiteResult {
    /// Suite file.
    pub file: String,
    /// Suite name.
    pub name: String,
    /// Cases.
    pub cases: Vec<CaseResult>,
}

/// The suite documents (`kind: PolicyTest`) below the given paths.
pub fn find_suites(paths: &[PathBuf]) -> Result<Vec<Document>, Diagnostics> {
    let mut docs = source::load_documents(paths)?;
    docs.retain(|d| d.kind() == Some(KIND_POLICY_TEST));
    Ok(docs)
}

/// The differences between what a case expects of an answer and what the response rules say.
fn check_answer(
    set: &PolicySet,
    ctx: &llm_policy_core::RequestContext,
    answer: &AnswerCase,
    e: &Expect,
) -> Vec<String> {
    let mut diffs = Vec::new();
    let mut kept = set.answer_context(ctx);
    kept.response = llm_policy_core::answer::response_of(
        &answer.text,
        &answer.tool_calls,
        answer.finish_reason.as_deref(),
        answer.output_tokens,
    );
    let v = set.check_answer(&kept);
    let (decision, rules, reason, status) = match &v.deny {
        Some(d) => (
            Verdict::Deny,
            vec![d.rule.clone()],
            d.reason.clone(),
            Some(d.status),
        ),
        None => (Verdict::Allow, Vec::new(), String::new(), None),
    };
    if let Some(want) = e.decision.filter(|w| *w != decision) {
        diffs.push(format!(
            "answer: expected {}, got {}",
            want.as_str(),
            decision.as_str()
        ));
    }
    if let Some(want) = e.matched_rules.as_ref().filter(|w| **w != rules) {
        diffs.push(format!(
            "matched_rules: expected {}, got {}",
            show_list(want),
            show_list(&rules)
        ));
    }
    if let Some(want) = e.reason.as_ref().filter(|w| **w != reason) {
        diffs.push(format!("reason: expected {want:?}, got {reason:?}"));
    }
    if let Some(want) = e.status.filter(|w| Some(*w) != status) {
        diffs.push(format!("status: expected {want}, got {status:?}"));
    }
    if let Some(want) = e.shadow_matches.as_ref().filter(|w| **w != v.shadow) {
        diffs.push(format!(
            "shadow_matches: expected {}, got {}",
            show_list(want),
            show_list(&v.shadow)
        ));
    }
    for (rule, message) in &v.errors {
        if !diffs.is_empty() {
            diffs.push(format!("(rule `{rule}` errored: {message})"));
        }
    }
    diffs
}

fn show_list(v: &[String]) -> String {
    format!("[{}]", v.join(", "))
}

/// Runs one suite document. Errors (unreadable suite, invalid policy) are returned as diagnostics.
/// `config` applies unless the suite sets `contextConfig`.
pub fn run_suite(doc: &Document, config: &ContextConfig) -> Result<SuiteResult, Diagnostics> {
    let file = doc.file.clone();
    let suite: Suite = doc.parse().map_err(|e| Diagnostics(vec![e]))?;
    let dir = Path::new(&doc.file).parent().unwrap_or(Path::new("."));
    let policy_path = dir.join(&suite.policy);
    let config = suite.context_config.as_ref().unwrap_or(config);
    let set = PolicySet::load_with(&[policy_path], config)?.set;
    let mut cases = Vec::new();
    for (i, case) in suite.cases.iter().enumerate() {
        let line = doc.position(&format!("/cases/{i}")).map(|p| p.line);
        cases.push(CaseResult {
            name: case.name.clone(),
            line,
            diffs: check(&set, case),
        });
    }
    Ok(SuiteResult {
        file,
        name: suite.metadata.name,
        cases,
    })
}

/// The differences between what a case expects and what the policy decides.
pub fn check(set: &PolicySet, case: &Case) -> Vec<String> {
    let mut diffs = Vec::new();
    let e = &case.expect;
    let ctx = match case.request.context(set) {
        Ok(c) => c,
        Err(err) => {
            match &e.error {
                Some(code) if code == err.code() => {}
                Some(code) => diffs.push(format!(
                    "error: expected {code}, got {} ({err})",
                    err.code()
                )),
                None => diffs.push(format!("request rejected before evaluation: {err}")),
            }
            return diffs;
        }
    };
    if let Some(code) = &e.error {
        diffs.push(format!(
            "error: expected {code}, but the request was evaluated"
        ));
        return diffs;
    }
    let mut d = set.evaluate(
        &ctx,
        &EvalOptions {
            tags: &case.tags,
            explain: false,
            ..EvalOptions::default()
        },
        &mut LocalOnly,
    );
    case.request.redact(&mut d, set.config());
    if let Some(answer) = &case.response {
        if d.decision != Verdict::Allow {
            diffs.push(format!(
                "the request was not allowed ({}: {}): its answer cannot be tested",
                d.decision.as_str(),
                d.reason
            ));
            return diffs;
        }
        return check_answer(set, &ctx, answer, e);
    }
    if let Some(want) = e.decision {
        if want != d.decision {
            diffs.push(format!(
                "decision: expected {}, got {}",
                want.as_str(),
                d.decision.as_str()
            ));
        }
    }
    if let Some(want) = &e.redacted {
        let got = d
            .actions
            .redact
            .as_ref()
            .map(|r| r.counts.clone())
            .unwrap_or_default();
        if *want != got {
            diffs.push(format!("redacted: expected {want:?}, got {got:?}"));
        }
    }
    if let Some(want) = &e.matched_rules {
        if *want != d.matched_rules {
            diffs.push(format!(
                "matched_rules: expected {}, got {}",
                show_list(want),
                show_list(&d.matched_rules)
            ));
        }
    }
    if let Some(want) = &e.reason {
        if *want != d.reason {
            diffs.push(format!("reason: expected {want:?}, got {:?}", d.reason));
        }
    }
    if let Some(want) = e.status {
        if Some(want) != d.actions.status {
            let got = d
                .actions
                .status
                .map_or_else(|| String::from("none (allow)"), |s| s.to_string());
            diffs.push(format!("status: expected {want}, got {got}"));
        }
    }
    if let Some(want) = &e.shadow_matches {
        if *want != d.metadata.shadow_matches {
            diffs.push(format!(
                "shadow_matches: expected {}, got {}",
                show_list(want),
                show_list(&d.metadata.shadow_matches)
            ));
        }
    }
    if let Some(want) = e.needs_remote {
        if want != d.metadata.needs_remote {
            diffs.push(format!(
                "needs_remote: expected {want}, got {}",
                d.metadata.needs_remote
            ));
        }
    }
    for err in &d.metadata.errors {
        if !diffs.is_empty() {
            diffs.push(format!("(rule `{}` errored: {})", err.rule, err.message));
        }
    }
    diffs
}
