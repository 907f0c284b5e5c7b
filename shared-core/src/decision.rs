//! The decision and error JSON shared by the filter, the server, the CLI and the audit log.
//! The field names and shapes here are a stable contract (see `docs/decision.md`).

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::model::Alert;

/// allow / deny / throttle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Let through.
    Allow,
    /// Slow down.
    Throttle,
    /// Reject.
    Deny,
}

impl Verdict {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Throttle => "throttle",
            Verdict::Deny => "deny",
        }
    }
}

/// The result of evaluating one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The verdict.
    pub decision: Verdict,
    /// The deciding rule's reason, or which default applied.
    pub reason: String,
    /// Every enforcing rule that matched, by descending priority (the deciding one first).
    pub matched_rules: Vec<String>,
    /// What to do besides the verdict.
    pub actions: Actions,
    /// Provenance and hints for caching and remote evaluation.
    pub metadata: DecisionMetadata,
    /// Wall-clock evaluation time in microseconds (0 where no clock is available, or where the
    /// host did not ask for it: [`crate::Timing::Skipped`]).
    pub evaluation_time_us: u64,
    /// Per-rule outcomes, when asked for (`--explain`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<Vec<RuleTrace>>,
}

/// Merged actions of the enforcing matches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Actions {
    /// HTTP status for deny / throttle replies (none for allow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Headers from every enforcing match. On a clash the deciding rule's value wins, then the
    /// higher-priority rule's, then the rule written first. Added to the reply for deny /
    /// throttle, to the upstream request for allow.
    pub headers: BTreeMap<String, String>,
    /// Some enforcing match asked for an audit record.
    pub audit: bool,
    /// The highest alert severity of the enforcing matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<Alert>,
    /// Counters to charge (rate limits and budgets of matched rules under their limit); empty
    /// unless the decision is `allow`, since a rejected request consumes nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub counters: Vec<Charge>,
    /// Lower the request's output cap (`max_tokens`, each choice) to this before it goes
    /// upstream (`transform.maxTokens`: a rule's fixed cap or what a budget can pay for). Only
    /// on `allow`, and only when it is below the request's own cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Replace personal data and secrets in the request by placeholders before it goes upstream
    /// (`transform.redact` of the enforcing rules that matched). Only on `allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redact: Option<Redaction>,
}

/// What a request has replaced before it goes upstream ([`crate::redact`]): the kinds, whether
/// the answer gets the values back, and (once the body was redacted) how many distinct values of
/// each kind were replaced. Never the values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redaction {
    /// The kinds replaced (entity names, in reporting order).
    pub kinds: Vec<String>,
    /// The answer's placeholders are replaced by the values (`restore: true`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub restore: bool,
    /// Distinct values replaced, by kind; empty until the body is redacted, and when nothing
    /// was found.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counts: BTreeMap<String, u32>,
}

/// What kind of counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CounterKind {
    /// Requests per window.
    Requests,
    /// Tokens per window (rate limit or budget).
    Tokens,
    /// US dollars per window (budget).
    Usd,
}

/// One counter a request charges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    /// The rule that owns the counter.
    pub rule: String,
    /// `rate_limit` or `budget`.
    pub source: ChargeSource,
    /// The rendered key, e.g. `cap-free-tier:user-42`.
    pub key: String,
    /// Unit.
    pub kind: CounterKind,
    /// Limit per window.
    pub limit: f64,
    /// Window length in seconds.
    pub window_secs: u64,
    /// What this request reserves: 1 request, or estimated prompt tokens + max_tokens.
    pub amount: f64,
    /// Counted by the filter (`local`) or the server (`global`).
    pub scope: crate::model::Scope,
    /// The output cap (`max_tokens`, each choice) that `amount` counts (0 for requests).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub output: u64,
    /// What one token less of `output` takes off `amount`.
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub per_output: f64,
    /// `transform: {maxTokens: fitBudget}`: when `amount` does not fit, the request may go ahead
    /// with `output` lowered to what fits, down to this many tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fit: Option<u64>,
    /// `remainingHeaders`: the answer to a request that goes ahead says what is left
    /// ([`crate::reply::remaining_headers`]).
    #[serde(default, skip_serializing_if = "is_false")]
    pub headers: bool,
}

impl Charge {
    /// `amount` with the output cap lowered to `output` (never raised).
    pub fn amount_with_output(&self, output: u64) -> f64 {
        let fewer = self.output.saturating_sub(output) as f64;
        (self.amount - fewer * self.per_output).max(0.0)
    }

    /// The largest output cap whose amount fits in `room`, if the rule lets the request be
    /// lowered (`fit`) and at least its minimum fits.
    pub fn fitting_output(&self, room: f64) -> Option<u64> {
        let min = self.fit?;
        if self.per_output <= 0.0 || !room.is_finite() {
            return None;
        }
        let fixed = self.amount - self.output as f64 * self.per_output;
        let tokens = (room - fixed) / self.per_output;
        if tokens.is_nan() || tokens < min as f64 {
            return None;
        }
        // A saturating cast that drops the fraction (rounds down); never above what was asked
        // for.
        let mut tokens = (tokens as u64).min(self.output);
        // Rounding may leave the lowered amount a hair above the room (amounts are exact below
        // 2^53, so a token or two at most).
        for _ in 0..4 {
            if self.amount_with_output(tokens) <= room {
                return Some(tokens);
            }
            tokens = tokens.checked_sub(1).filter(|t| *t >= min)?;
        }
        None
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero_f64(n: &f64) -> bool {
    *n == 0.0
}

/// Rate limit or budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeSource {
    /// `action.rateLimit`.
    RateLimit,
    /// `action.budget`.
    Budget,
}

/// A runtime error of one rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleError {
    /// Rule id.
    pub rule: String,
    /// What went wrong.
    pub message: String,
}

/// Provenance of a decision and what the caller may do with it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DecisionMetadata {
    /// Namespace evaluated.
    pub namespace: String,
    /// The deciding rule's policy, or the namespace's policies (comma-separated) for a default.
    pub policy: String,
    /// That policy's `metadata.version` (empty when it has none).
    pub version: String,
    /// Digest of the whole compiled bundle; changes whenever any policy file changes.
    pub bundle: String,
    /// The deciding rule, if a rule decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deciding_rule: Option<String>,
    /// Whether the namespace default decided.
    pub default_applied: bool,
    /// For a batch: the item whose evaluation decided (`None`: the batch request itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_item: Option<usize>,
    /// Shadow rules that matched (never change the decision).
    pub shadow_matches: Vec<String>,
    /// Runtime errors of rule conditions.
    pub errors: Vec<RuleError>,
    /// Whether this decision may be cached under `cache_key`.
    pub cacheable: bool,
    /// Stable hash of (bundle, namespace, tags, values of the fields the namespace's rules read).
    pub cache_key: String,
    /// The decision is provisional: the server must evaluate `remote_rules` (plugins, global
    /// rate limits, budgets) before it is final.
    pub needs_remote: bool,
    /// Rules the core could not finish locally.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_rules: Vec<String>,
}

/// How one rule fared (explain mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleTrace {
    /// Rule id.
    pub rule: String,
    /// Priority.
    pub priority: i64,
    /// `matched`, `not_matched`, `error`, `disabled`, `not_selected` (tags), `remote`,
    /// `under_limit`, `over_limit`, `skipped` (below a rule that already denied or throttled:
    /// its plugin or counter was not asked for).
    pub outcome: String,
    /// Whether it is a shadow rule.
    pub shadow: bool,
    /// Details (error text, limit state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The JSON body of an error reply: `{"error": {"code", "message", "status"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// An error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable code: `invalid_body`, `invalid_field`, `body_too_large`, `invalid_policy`, …
    pub code: String,
    /// Human message.
    pub message: String,
    /// HTTP status.
    pub status: u16,
}

impl From<&crate::context::ContextError> for ErrorBody {
    fn from(e: &crate::context::ContextError) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code: e.code().into(),
                message: alloc::string::ToString::to_string(e),
                status: e.status(),
            },
        }
    }
}
