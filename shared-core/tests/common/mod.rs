//! Helpers shared by the integration tests.
#![allow(
    dead_code,
    clippy::expect_used,
    reason = "helpers shared by test binaries that each use a subset"
)]

use llm_policy_core::decision::Decision;
use llm_policy_core::source::parse_str;
use llm_policy_core::{
    ContextConfig, ContextError, Diagnostics, EvalOptions, LocalOnly, PolicySet, RequestContext,
    RequestInput,
};

/// Compiles one YAML policy text.
pub fn compile(yaml: &str) -> Result<PolicySet, Diagnostics> {
    let docs = parse_str("test.yaml", yaml).map_err(|d| Diagnostics(vec![d]))?;
    PolicySet::compile(&docs, &ContextConfig::default()).map(|o| o.set)
}

/// A policy with the given rules (YAML list items, indented by 4) and default decision.
pub fn policy(default: &str, rules: &str) -> String {
    format!(
        "apiVersion: llm-policy/v1\nkind: Policy\nmetadata:\n  name: t\nspec:\n  defaultDecision: {default}\n  rules:\n{rules}"
    )
}

/// A context from headers and a JSON body (chat completions path).
pub fn ctx(headers: &[(&str, &str)], body: &str) -> RequestContext {
    ctx_at("/v1/chat/completions", headers, body)
}

/// A context for a path.
pub fn ctx_at(path: &str, headers: &[(&str, &str)], body: &str) -> RequestContext {
    try_ctx(path, headers, body).expect("valid request")
}

/// A context for a path, or why the request cannot be evaluated.
pub fn try_ctx(
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<RequestContext, ContextError> {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let input = RequestInput {
        method: "post",
        path,
        headers: &headers,
        body: body.as_bytes(),
        now_unix: 1_795_516_288,
    };
    RequestContext::from_request(&input, &ContextConfig::default())
}

/// Evaluates with no plugins and no counters.
pub fn eval(set: &PolicySet, ctx: &RequestContext) -> Decision {
    set.evaluate(ctx, &EvalOptions::default(), &mut LocalOnly)
}
