//! The filter configuration: one JSON or YAML document (the `configuration` of Envoy's wasm
//! filter), read with the core's located loader, so a mistake is reported with its line and
//! column and Envoy rejects the configuration.

use std::time::Duration;

use llm_policy_core::identity::{IdentityMode, KeyRecord, KeyTable};
use llm_policy_core::{source, ContextConfig, Diagnostic, Diagnostics, Document, PolicySet};
use serde::{Deserialize, Serialize};

/// Where errors in the filter configuration are said to be.
pub const CONFIG_FILE: &str = "filter configuration";

/// Where errors in an inline policy bundle are said to be.
pub const INLINE_POLICIES: &str = "filter configuration: policies";

/// The default body limit of the filter (1 MiB): bodies are buffered in the proxy.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

/// The filter configuration. See `docs/filter.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct FilterConfig {
    /// The policy bundle: YAML or JSON text (one or more documents), or a list of documents.
    /// May be empty when `sync` brings the bundle from the server.
    pub policies: Option<serde_json::Value>,
    /// How requests are read (headers, body limits). `maxBodyBytes` defaults to 1 MiB here.
    pub context: ContextConfig,
    /// Which requests are LLM API calls (the others pass untouched, unbuffered).
    pub routes: RoutesConfig,
    /// What happens when a request needs the policy server and it cannot answer.
    pub failure_mode: FailureMode,
    /// The policy server (ext_authz gRPC), for rules the filter cannot decide alone.
    pub server: Option<ServerConfig>,
    /// Fetch the bundle from the server's REST API and swap in new versions.
    pub sync: Option<SyncConfig>,
    /// Decisions cached per worker VM (default 1,024; 0 turns the cache off).
    pub cache_entries: usize,
    /// Slots of the local rate-limit table shared by the workers (default 65,536). Each live
    /// counter key takes one; a key that finds no free slot is not counted (and logged).
    pub local_counter_slots: u32,
    /// How the request's identity is established (docs/identity.md).
    pub identity: IdentityConfig,
}

/// `identity:` in the filter configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct IdentityConfig {
    /// `none` (default), `trusted-headers`, `jwt` or `api-keys`: what the Envoy configuration
    /// does (`llm-policy envoy-config --identity`). With `api-keys` the filter looks up the
    /// request's virtual key; the server is told the mode when the filter asks it.
    pub mode: IdentityMode,
    /// The virtual keys (`llm-policy keys create`), when the filter does not sync them.
    pub keys: Vec<KeyRecord>,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            policies: None,
            context: ContextConfig {
                max_body_bytes: DEFAULT_MAX_BODY_BYTES,
                ..ContextConfig::default()
            },
            routes: RoutesConfig::default(),
            failure_mode: FailureMode::Closed,
            server: None,
            sync: None,
            cache_entries: 1024,
            local_counter_slots: 65_536,
            identity: IdentityConfig::default(),
        }
    }
}

/// Which requests the filter checks.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct RoutesConfig {
    /// Paths checked: exact (`/v1/chat/completions`) or a prefix ending in `*` (`/v1/*`).
    /// Empty (default): every OpenAI, Azure OpenAI and Anthropic API path the core recognises
    /// (chat, completions, embeddings, responses, messages, batches).
    pub paths: Vec<String>,
    /// Hosts (`:authority`, port ignored) checked; empty (default): every host.
    pub hosts: Vec<String>,
}

/// What a request that needs the server gets when the server cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FailureMode {
    /// 503 in the provider's format (default).
    Closed,
    /// Decide without the rules that needed the server (marked `x-llm-policy-decision: error`
    /// upstream when the result is allow).
    Open,
}

/// The policy server, called over Envoy's gRPC client (`dispatch_grpc_call`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServerConfig {
    /// The Envoy cluster of the server's gRPC port (it must be an HTTP/2 cluster).
    pub cluster: String,
    /// Longest a check may wait for the server, in milliseconds (default 200).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The server's usage token (`usageTokenFile`), sent with usage reports as
    /// `Authorization: Bearer` (a server refuses reports without it).
    #[serde(default)]
    pub usage_token: Option<String>,
}

fn default_timeout_ms() -> u64 {
    200
}

impl ServerConfig {
    /// The timeout as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.clamp(1, 60_000))
    }
}

/// `sync:` in the filter configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SyncConfig {
    /// The Envoy cluster of the server's REST port.
    pub cluster: String,
    /// The bundle's path (default `/v1/bundle`).
    #[serde(default = "default_path")]
    pub path: String,
    /// `:authority` of the request (default the cluster name).
    #[serde(default)]
    pub authority: Option<String>,
    /// How often to ask, in milliseconds (default 10,000; at least 100).
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// Longest a fetch may take, in milliseconds (default 5,000).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// The server's read token, sent as `Authorization: Bearer` (when the server has one).
    #[serde(default)]
    pub token: Option<String>,
}

fn default_path() -> String {
    String::from("/v1/bundle")
}

fn default_interval() -> u64 {
    10_000
}

fn default_timeout() -> u64 {
    5_000
}

impl FilterConfig {
    /// Parses the filter configuration (JSON or YAML). Errors are located in the configuration.
    pub fn parse(text: &str) -> Result<FilterConfig, Diagnostics> {
        if text.trim().is_empty() {
            return Ok(FilterConfig::default());
        }
        let docs = source::parse_str(CONFIG_FILE, text).map_err(one)?;
        let [doc] = docs.as_slice() else {
            return Err(one(Diagnostic::error(
                llm_policy_core::Code::InvalidType,
                "the filter configuration must be one document",
            )
            .at(CONFIG_FILE, None)));
        };
        let mut config: FilterConfig = doc.parse().map_err(one)?;
        if doc.value.pointer("/context/maxBodyBytes").is_none() {
            config.context.max_body_bytes = DEFAULT_MAX_BODY_BYTES;
        }
        let bad = |pointer: &str, msg: &str| {
            one(Diagnostic::error(llm_policy_core::Code::InvalidType, msg)
                .at(CONFIG_FILE, doc.position(pointer)))
        };
        if let Some((key, message)) = config.context.problem() {
            return Err(bad(&format!("/context/{key}"), message));
        }
        if config.routes.hosts.iter().any(|h| h.trim().is_empty()) {
            return Err(bad(
                "/routes/hosts",
                "an empty host matches nothing: remove it",
            ));
        }
        if config.routes.paths.iter().any(|p| !p.starts_with('/')) {
            return Err(bad("/routes/paths", "paths start with `/`"));
        }
        if config
            .server
            .as_ref()
            .is_some_and(|s| s.cluster.trim().is_empty())
        {
            return Err(bad("/server/cluster", "the server's cluster name is empty"));
        }
        if let Err(errors) = KeyTable::new(config.identity.keys.clone()) {
            return Err(errors.located(doc, "/identity/keys"));
        }
        Ok(config)
    }

    /// The configured virtual keys (checked by [`FilterConfig::parse`]).
    pub fn keys(&self) -> KeyTable {
        KeyTable::new(self.identity.keys.clone()).unwrap_or_default()
    }

    /// Compiles the inline bundle (`None` when there is none).
    pub fn compile_policies(&self) -> Result<Option<PolicySet>, Diagnostics> {
        let docs = match &self.policies {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(text)) => {
                source::parse_str(INLINE_POLICIES, text).map_err(one)?
            }
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| Document::from_value(format!("{INLINE_POLICIES}[{i}]"), v.clone()))
                .collect(),
            Some(other) => vec![Document::from_value(INLINE_POLICIES, other.clone())],
        };
        // Warnings are dropped: they were shown when the bundle was validated.
        PolicySet::compile(&docs, &self.context).map(|out| Some(out.set))
    }
}

fn one(d: Diagnostic) -> Diagnostics {
    Diagnostics(vec![d])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_located_errors() {
        let c = FilterConfig::parse("").unwrap();
        assert_eq!(c.context.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(c.failure_mode, FailureMode::Closed);
        let c = FilterConfig::parse("context: {maxBodyBytes: 10}\nfailureMode: open\n").unwrap();
        assert_eq!(c.context.max_body_bytes, 10);
        assert_eq!(c.failure_mode, FailureMode::Open);
        let e = FilterConfig::parse("routes:\n  pathz: []\n").unwrap_err();
        assert_eq!(e.0[0].code, "unknown-field");
        assert_eq!(e.0[0].position.map(|p| p.line), Some(2));
        assert!(e.to_string().contains(CONFIG_FILE), "{e}");
    }

    #[test]
    fn inline_policies_compile_or_fail_located() {
        let good = "policies: |\n  apiVersion: llm-policy/v1\n  kind: Policy\n  metadata: {name: p}\n  spec:\n    rules:\n      - id: r\n        when: {cel: \"request.model == 'x'\"}\n        action: {decision: deny}\n";
        let set = FilterConfig::parse(good)
            .unwrap()
            .compile_policies()
            .unwrap()
            .unwrap();
        assert_eq!(set.rule_count(), 1);
        let bad = good.replace("request.model ==", "request.model ===");
        let e = FilterConfig::parse(&bad)
            .unwrap()
            .compile_policies()
            .unwrap_err();
        let text = e.to_string();
        assert!(text.contains(INLINE_POLICIES), "{text}");
        assert_eq!(e.0[0].position.map(|p| p.line), Some(7), "{text}");
    }
}
