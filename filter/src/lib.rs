//! The Envoy proxy-wasm filter of llm-policy.
//!
//! Not implemented yet (see `ROADMAP.md` step 3): this crate exists so the workspace builds the
//! shared core for `wasm32-wasip1` with the features the filter will use, and so a dependency that
//! cannot go into the proxy is caught now. It exports nothing to Envoy.

/// The core version this filter is built against.
pub fn core_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Compiles a policy bundle from JSON documents, as the filter will on configuration; returns the
/// number of rules. Exercises the whole core (DSL, CEL, index) inside the wasm build.
pub fn compile_bundle(docs: Vec<serde_json_value::Value>) -> Result<usize, String> {
    let docs: Vec<llm_policy_core::Document> = docs
        .into_iter()
        .enumerate()
        .map(|(i, v)| llm_policy_core::Document::from_value(format!("bundle[{i}]"), v))
        .collect();
    llm_policy_core::PolicySet::compile(&docs, &llm_policy_core::ContextConfig::default())
        .map(|out| out.set.rule_count())
        .map_err(|e| e.to_string())
}

/// Re-export of the JSON value type bundles are made of.
pub mod serde_json_value {
    pub use llm_policy_core::model::JsonValue as Value;
}
