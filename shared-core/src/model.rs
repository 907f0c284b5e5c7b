//! The policy language v1 as data: what a policy file may contain.
//!
//! Every struct rejects unknown fields, so a typo in a key is an error, not a silently ignored
//! setting. The same types read YAML and JSON (YAML is converted to a JSON value first, keeping
//! locations on the side, see [`crate::Document`]).

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// The only `apiVersion` this crate reads.
pub const API_VERSION: &str = "llm-policy/v1";
/// `kind` of a policy document.
pub const KIND_POLICY: &str = "Policy";
/// `kind` of a policy test suite (skipped when loading a policy directory).
pub const KIND_POLICY_TEST: &str = "PolicyTest";

/// One policy document (`kind: Policy`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyDoc {
    /// Must be `llm-policy/v1`.
    pub api_version: String,
    /// Must be `Policy`.
    pub kind: String,
    /// Name, namespace, version, tags.
    pub metadata: Metadata,
    /// Default decision and rules.
    pub spec: Spec,
}

/// Policy metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Required, unique per namespace.
    pub name: String,
    /// Namespace the rules apply to; `default` when absent.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Free-form version string reported in decisions.
    #[serde(default)]
    pub version: Option<String>,
    /// Tags of the policy (informational).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Human description.
    #[serde(default)]
    pub description: Option<String>,
}

fn default_namespace() -> String {
    String::from("default")
}

/// Policy body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spec {
    /// Decision when no enforcing rule matches. Default `deny` (fail closed).
    #[serde(default = "default_decision")]
    pub default_decision: DefaultDecision,
    /// The rules.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

fn default_decision() -> DefaultDecision {
    DefaultDecision::Deny
}

/// What applies when nothing enforcing matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultDecision {
    /// Let the request through.
    Allow,
    /// Reject the request.
    Deny,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    /// Required, unique in the namespace.
    pub id: String,
    /// Human description.
    #[serde(default)]
    pub description: Option<String>,
    /// Higher is stronger. Default 0.
    #[serde(default)]
    pub priority: i64,
    /// Disabled rules are loaded and validated but never evaluated. Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `enforce` (default) or `shadow` (reported, never changes the decision).
    #[serde(default)]
    pub mode: Mode,
    /// `request` (default): the rule decides whether a request goes upstream. `response`: it
    /// tests the model's answer (`response.*`) as it passes, and a deny ends it.
    #[serde(default)]
    pub phase: Phase,
    /// What a runtime error in the condition does. Default `deny`.
    #[serde(default)]
    pub on_error: OnError,
    /// Tags select subsets of rules (the evaluate API).
    #[serde(default)]
    pub tags: Vec<String>,
    /// The condition: exactly one of `cel`, `match`, `plugin`.
    pub when: When,
    /// What a match does.
    pub action: Action,
}

fn yes() -> bool {
    true
}

/// Enforcing or shadow rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Matches count towards the decision.
    #[default]
    Enforce,
    /// Matches are reported in `metadata.shadow_matches` only.
    Shadow,
}

/// When a rule is evaluated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// On the request, before it goes upstream.
    #[default]
    Request,
    /// On the answer, as it comes back: a JSON answer whole, a stream through a held-back
    /// window (docs/policy-language.md, "Response rules").
    Response,
}

/// Runtime-error policy of a rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// The rule counts as a deny match (fail closed).
    #[default]
    Deny,
    /// The rule counts as not matched; the error is still reported.
    Skip,
}

/// A condition. Exactly one field must be set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    /// A CEL expression over the request context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cel: Option<String>,
    /// The YAML DSL, kept as raw data here and parsed into a [`MatchExpr`] by the compiler (which
    /// reports errors with their exact location inside the tree).
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matcher: Option<serde_json::Value>,
    /// A WASM plugin, evaluated by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<PluginRef>,
}

/// The YAML DSL: `all` / `any` / `not` over leaves.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum MatchExpr {
    /// `{all: [...]}`: every child matches (an empty list is true).
    All {
        /// Children.
        all: Vec<MatchExpr>,
    },
    /// `{any: [...]}`: at least one child matches (an empty list is false).
    Any {
        /// Children.
        any: Vec<MatchExpr>,
    },
    /// `{not: ...}`: the child does not match.
    Not {
        /// Child.
        not: alloc::boxed::Box<MatchExpr>,
    },
    /// `{field, op, value}`.
    Leaf(Leaf),
}

/// A DSL leaf test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Leaf {
    /// A field path of the request context, e.g. `request.model`.
    pub field: String,
    /// The operator.
    pub op: Op,
    /// The operand (absent for `exists`, where it defaults to `true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
    /// Case-insensitive string comparison for `eq ne in not_in contains not_contains starts_with
    /// ends_with`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub ignore_case: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// DSL leaf operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Equal.
    Eq,
    /// Not equal (false when the field is null).
    Ne,
    /// Member of a list of values.
    In,
    /// Not a member (false when the field is null).
    NotIn,
    /// Greater than.
    Gt,
    /// Greater or equal.
    Gte,
    /// Less than.
    Lt,
    /// Less or equal.
    Lte,
    /// Substring (string field) or element (list field); a list value means "any of".
    Contains,
    /// Negation of `contains` (false when the field is null).
    NotContains,
    /// String prefix.
    StartsWith,
    /// String suffix.
    EndsWith,
    /// Regular expression (linear-time `regex` syntax), unanchored.
    Matches,
    /// Presence: not null, not empty. `value: false` tests absence.
    Exists,
}

/// A WASM-plugin condition, evaluated by the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginRef {
    /// Plugin name, e.g. `pii-detector`.
    pub name: String,
    /// Arguments passed to the plugin.
    #[serde(default)]
    pub args: BTreeMap<String, serde_json::Value>,
}

/// What a match does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Action {
    /// allow / deny / throttle.
    pub decision: ActionDecision,
    /// Reason reported in the decision.
    #[serde(default)]
    pub reason: Option<String>,
    /// HTTP status (defaults: deny 403, throttle 429).
    #[serde(default)]
    pub status: Option<u16>,
    /// Headers added to the reply (deny / throttle) or to the upstream request (allow).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Write an audit record for matching requests.
    #[serde(default)]
    pub audit: bool,
    /// Raise an alert of this severity.
    #[serde(default)]
    pub alert: Option<Alert>,
    /// Make the action conditional on a request or token rate limit.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Make the action conditional on a token or cost budget.
    #[serde(default)]
    pub budget: Option<Budget>,
    /// Change the request that goes ahead: lower its output cap (`maxTokens`).
    #[serde(default)]
    pub transform: Option<Transform>,
}

/// `transform: {maxTokens: 1024}` or `transform: {maxTokens: fitBudget, minTokens: 64}`: the
/// request goes upstream with its output cap lowered (docs/budgets.md); `transform: {redact:
/// [email, credit_card], restore: true}`: with the values of those kinds replaced by typed
/// placeholders (`<EMAIL_1>`), put back in the answer when `restore` (docs/policy-language.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Transform {
    /// The cap: a number of tokens, or `fitBudget` (what the rule's budget can still pay for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<MaxTokens>,
    /// With `fitBudget`: the smallest output worth sending (default 1); a budget that cannot
    /// pay for this much output throttles as usual.
    #[serde(default)]
    pub min_tokens: Option<u64>,
    /// The kinds of personal data and secrets replaced by placeholders before the request goes
    /// upstream: entity names (`email`, `phone`, `credit_card`, `iban`, `us_ssn`, `api_key`,
    /// `private_key`) or the groups `card` and `secret`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redact: Vec<String>,
    /// Put the redacted values back where the answer repeats their placeholders.
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub restore: bool,
}

/// The value of `transform.maxTokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxTokens {
    /// A fixed cap, on an allow rule: every request it allows answers with at most this many
    /// tokens (each choice).
    Cap(u64),
    /// On a budget rule: a request the budget cannot pay for in full goes ahead with its output
    /// lowered to what the budget can still pay for, instead of being throttled.
    FitBudget,
}

impl Serialize for MaxTokens {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MaxTokens::Cap(n) => s.serialize_u64(*n),
            MaxTokens::FitBudget => s.serialize_str("fitBudget"),
        }
    }
}

impl<'de> Deserialize<'de> for MaxTokens {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MaxTokens, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = MaxTokens;
            fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str("a positive number of tokens or `fitBudget`")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<MaxTokens, E> {
                Ok(MaxTokens::Cap(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<MaxTokens, E> {
                u64::try_from(n).map(MaxTokens::Cap).map_err(|_| {
                    E::custom("`maxTokens` must be a positive number of tokens or `fitBudget`")
                })
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<MaxTokens, E> {
                match s {
                    "fitBudget" => Ok(MaxTokens::FitBudget),
                    _ => Err(E::custom(alloc::format!(
                        "`maxTokens: {s}`: write a positive number of tokens or `fitBudget`"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// allow / deny / throttle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionDecision {
    /// Let through.
    Allow,
    /// Slow down (HTTP 429 by default).
    Throttle,
    /// Reject (HTTP 403 by default).
    Deny,
}

/// Alert severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Alert {
    /// Low.
    Low,
    /// Medium.
    Medium,
    /// High.
    High,
    /// Critical.
    Critical,
}

/// `rateLimit: {key, requests | tokens, per, scope}`: the rule's action applies only once the
/// counter named by `key` is over the limit in the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Counter key template, e.g. `"{principal.id}"` or `"{principal.team}:{request.model}"`.
    pub key: String,
    /// Requests allowed per window.
    #[serde(default)]
    pub requests: Option<u64>,
    /// Tokens (estimated prompt + max_tokens, reconciled with usage) allowed per window.
    #[serde(default)]
    pub tokens: Option<u64>,
    /// Window: `second`, `minute`, `hour`, `day`, `month` or a duration like `30s`, `5m`, `2h`.
    pub per: String,
    /// `global` (default; counted in Redis by the server, one limit for all replicas) or `local`
    /// (per Envoy instance, counted by the filter in shared data).
    #[serde(default)]
    pub scope: Scope,
    /// Tell the client what is left: `x-ratelimit-{limit,remaining,reset}-requests` (or
    /// `-tokens`) on the answers to the requests this limit lets through.
    #[serde(default, rename = "remainingHeaders")]
    pub remaining_headers: bool,
}

/// Where a rate limit is counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Shared by every replica (server, Redis).
    #[default]
    Global,
    /// Per Envoy instance (filter shared data).
    Local,
}

/// `budget: {key, tokens | usd, per}`: the rule's action applies once the budget is spent.
/// Budgets are always global (server, Redis, reserve → commit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Counter key template, as for rate limits.
    pub key: String,
    /// Token budget per window.
    #[serde(default)]
    pub tokens: Option<u64>,
    /// Cost budget in US dollars per window.
    #[serde(default)]
    pub usd: Option<f64>,
    /// Window, as for rate limits.
    pub per: String,
    /// Tell the client what is left: `x-ratelimit-{limit,remaining,reset}-tokens` (or `-usd`)
    /// on the answers to the requests this budget lets through.
    #[serde(default, rename = "remainingHeaders")]
    pub remaining_headers: bool,
}

/// The JSON value type used for raw policy data (re-exported so dependants need not pin
/// `serde_json` themselves).
pub type JsonValue = serde_json::Value;
