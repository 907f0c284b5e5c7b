//! The request context: the typed view of one LLM request that conditions read.
//!
//! Built once per request by [`RequestContext::from_request`] (in `extract`) from what Envoy (or
//! the CLI) sees: method, path, headers and body. Every field of the schema
//! ([`crate::schema::FIELDS`]) is present; absent values are null, empty or false as documented
//! there. This module holds the data only; building it is `extract`'s job.

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cmp::Ordering;
use serde::{Deserialize, Serialize};

use crate::schema::FieldRef;

/// How the context is read from headers. One per deployment; the policy set is compiled against it
/// (principal attributes are part of the schema conditions are checked against). Header names
/// match in any case (`X-Tenant` finds `x-tenant`).
///
/// As a file (`llm-policy --context-config`): `{namespaceHeader, principalHeaders: {id:
/// x-user-id, ...}, principalClaims: {id: sub, ...}, namespaceClaim, shieldPrefix, maxBodyBytes,
/// maxBatchItems, models, responseHoldBackBytes, maxResponseBytes}`.
///
/// Which of these headers a client may send itself depends on the identity mode Envoy runs in
/// (docs/identity.md): in every mode but `trusted-headers`, Envoy removes the client's copies of
/// the namespace, principal and shield headers before the filter or the server reads a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct ContextConfig {
    /// Header that selects the policy namespace (default `x-llm-policy-namespace`).
    pub namespace_header: String,
    /// Principal attributes and the header each is read from (defaults: `id` ← `x-user-id`,
    /// `tier` ← `x-user-tier`, `team` ← `x-team-id`, `org` ← `x-org-id`).
    pub principal_headers: BTreeMap<String, String>,
    /// With JWT identity: the claim of the verified token each principal attribute comes from
    /// (defaults: `id` ← `sub`, `tier` ← `tier`, `team` ← `team`, `org` ← `org`). Envoy's
    /// `jwt_authn` writes the claim into the attribute's header after removing the client's.
    pub principal_claims: BTreeMap<String, String>,
    /// With JWT identity: the claim naming the policy namespace (default: none, so every token
    /// is in the default namespace).
    pub namespace_claim: Option<String>,
    /// Prefix of shield score headers (default `x-llm-shield-`).
    pub shield_prefix: String,
    /// Bodies larger than this are rejected with 413 (default 4 MiB).
    pub max_body_bytes: usize,
    /// Batch bodies with more requests than this are rejected with 413 (default 10,000; each
    /// item is evaluated as a request).
    pub max_batch_items: usize,
    /// The model table (docs/budgets.md) token and cost charges are priced with (default: the
    /// shipped `models/models.yaml`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models: Option<crate::model_table::ModelTable>,
    /// `phase: response` rules on a stream: the generated text held back from the client
    /// until what follows it was checked (default 128 bytes). A match of up to this many bytes
    /// is caught before any of it is sent, whatever chunks it arrives in; the first token waits
    /// for this much text.
    pub response_hold_back_bytes: usize,
    /// `phase: response` rules: the largest JSON answer (or stream event) checked; a larger
    /// one is refused, never passed unchecked (default 4 MiB).
    pub max_response_bytes: usize,
}

impl Default for ContextConfig {
    fn default() -> Self {
        ContextConfig {
            namespace_header: String::from("x-llm-policy-namespace"),
            principal_headers: [
                ("id", "x-user-id"),
                ("tier", "x-user-tier"),
                ("team", "x-team-id"),
                ("org", "x-org-id"),
            ]
            .iter()
            .map(|(a, h)| (a.to_string(), h.to_string()))
            .collect(),
            principal_claims: [
                ("id", "sub"),
                ("tier", "tier"),
                ("team", "team"),
                ("org", "org"),
            ]
            .iter()
            .map(|(a, c)| (a.to_string(), c.to_string()))
            .collect(),
            namespace_claim: None,
            shield_prefix: String::from("x-llm-shield-"),
            max_body_bytes: 4 * 1024 * 1024,
            max_batch_items: 10_000,
            models: None,
            response_hold_back_bytes: 128,
            max_response_bytes: 4 * 1024 * 1024,
        }
    }
}

impl ContextConfig {
    /// What is wrong with these settings, if anything: `(key, message)`. A body limit of 0
    /// refuses every request; a hold-back window under 16 bytes could not hold a key's prefix
    /// and what identifies it; a response limit under 1 KiB refuses every answer.
    pub fn problem(&self) -> Option<(&'static str, &'static str)> {
        if self.max_body_bytes == 0 {
            return Some(("maxBodyBytes", "maxBodyBytes must be above 0"));
        }
        if self.response_hold_back_bytes < 16 {
            return Some((
                "responseHoldBackBytes",
                "responseHoldBackBytes must be at least 16: a smaller window lets a secret split over two chunks through",
            ));
        }
        if self.max_response_bytes < 1024 {
            return Some(("maxResponseBytes", "maxResponseBytes must be at least 1024"));
        }
        None
    }

    /// The configured principal attribute names.
    pub fn principal_attributes(&self) -> Vec<String> {
        self.principal_headers.keys().cloned().collect()
    }

    /// The same configuration with every header name and the shield prefix in lower case (how
    /// request headers are compared). A compiled set keeps this form.
    pub fn normalized(&self) -> ContextConfig {
        ContextConfig {
            namespace_header: self.namespace_header.to_ascii_lowercase(),
            principal_headers: self
                .principal_headers
                .iter()
                .map(|(a, h)| (a.clone(), h.to_ascii_lowercase()))
                .collect(),
            principal_claims: self.principal_claims.clone(),
            namespace_claim: self.namespace_claim.clone(),
            shield_prefix: self.shield_prefix.to_ascii_lowercase(),
            max_body_bytes: self.max_body_bytes,
            max_batch_items: self.max_batch_items,
            models: self.models.clone(),
            response_hold_back_bytes: self.response_hold_back_bytes,
            max_response_bytes: self.max_response_bytes,
        }
    }
}

/// The raw request as the caller sees it.
#[derive(Debug, Clone, Copy)]
pub struct RequestInput<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Path, possibly with a query string (ignored).
    pub path: &'a str,
    /// Header pairs; names in any case.
    pub headers: &'a [(String, String)],
    /// Raw body bytes (empty when there is none).
    pub body: &'a [u8],
    /// Evaluation time, seconds since the Unix epoch (UTC).
    pub now_unix: i64,
}

/// Why a request could not be turned into a context. Callers map these to HTTP 400 / 413.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// The body is not valid JSON, or not a JSON object.
    #[error("request body is not valid JSON: {0}")]
    InvalidBody(String),
    /// A field has a type the provider's API does not allow (e.g. `model: 5`).
    #[error("request body field `{field}` has the wrong type: {message}")]
    InvalidField {
        /// The JSON field.
        field: String,
        /// What was expected.
        message: String,
    },
    /// The body exceeds `max_body_bytes`.
    #[error("request body is {size} bytes, over the limit of {limit} bytes")]
    BodyTooLarge {
        /// Body size.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// A batch body holds more requests than `max_batch_items`.
    #[error("the batch holds more than {limit} requests")]
    BatchTooLarge {
        /// Configured limit.
        limit: usize,
    },
    /// A namespace or principal header was sent more than once with different values: which
    /// one is meant cannot be told (joined, they would be a new value no rule expects).
    #[error("header `{header}` was sent more than once with different values")]
    AmbiguousHeader {
        /// The header.
        header: String,
    },
}

impl ContextError {
    /// HTTP status the caller should answer with.
    pub fn status(&self) -> u16 {
        match self {
            ContextError::BodyTooLarge { .. } | ContextError::BatchTooLarge { .. } => 413,
            _ => 400,
        }
    }
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ContextError::InvalidBody(_) => "invalid_body",
            ContextError::InvalidField { .. } => "invalid_field",
            ContextError::BodyTooLarge { .. } => "body_too_large",
            ContextError::BatchTooLarge { .. } => "batch_too_large",
            ContextError::AmbiguousHeader { .. } => "ambiguous_header",
        }
    }
}

/// One conversation turn.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`, …
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

/// A shield score: a number when the header parses as one, else the string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ShieldValue {
    /// Numeric score.
    Number(f64),
    /// Anything else.
    Text(String),
}

/// The LLM provider a request is addressed to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// OpenAI and OpenAI-compatible APIs (including Azure OpenAI).
    Openai,
    /// Anthropic.
    Anthropic,
    /// Anything else.
    #[default]
    Unknown,
}

/// Which API of the provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// Chat Completions.
    Chat,
    /// Legacy Completions.
    Completions,
    /// Embeddings.
    Embeddings,
    /// Responses.
    Responses,
    /// Anthropic Messages.
    Messages,
    /// A batch of requests (`/v1/messages/batches`, `/v1/batches`).
    Batch,
    /// OpenAI's Assistants API: assistants, threads, their messages and runs (`/v1/assistants`,
    /// `/v1/threads/...`), a request that carries a body.
    Assistants,
    /// Anything else.
    #[default]
    Other,
}

impl Provider {
    /// Schema string.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Unknown => "unknown",
        }
    }
}

impl Api {
    /// The body fields that cap an answer's output in this API's requests (what
    /// `request.max_tokens` reads, and what a `transform.maxTokens` lowers), and the one written
    /// when a request names none; `None` for APIs that answer with no output to cap.
    pub fn output_cap_fields(self) -> Option<(&'static [&'static str], &'static str)> {
        match self {
            // `max_tokens` is deprecated and refused by OpenAI's reasoning models; a body may
            // carry both.
            Api::Chat => Some((
                &["max_tokens", "max_completion_tokens"],
                "max_completion_tokens",
            )),
            Api::Completions | Api::Messages => Some((&["max_tokens"], "max_tokens")),
            Api::Responses => Some((&["max_output_tokens"], "max_output_tokens")),
            // Runs cap with `max_completion_tokens`, but the API's other bodies take no cap: a
            // lowered cap is not written into them.
            Api::Embeddings | Api::Batch | Api::Assistants | Api::Other => None,
        }
    }

    /// Schema string.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Completions => "completions",
            Api::Embeddings => "embeddings",
            Api::Responses => "responses",
            Api::Messages => "messages",
            Api::Batch => "batch",
            Api::Assistants => "assistants",
            Api::Other => "other",
        }
    }
}

impl RequestInfo {
    /// The output tokens this request may be answered with, to reserve: its `max_tokens` (else
    /// the model's output cap), lowered to `lowered` (the decision's `actions.max_tokens`), for
    /// each of its `choices`.
    pub fn output_reservation(
        &self,
        models: &crate::model_table::ModelTable,
        lowered: Option<u64>,
    ) -> u64 {
        let each = models.output_reservation(self.model.as_deref(), self.max_tokens);
        lowered
            .map_or(each, |l| l.min(each))
            .saturating_mul(u64::from(self.choices.max(1)))
    }

    /// The prompt token estimate ([`crate::tokens::estimate`]): `estimated_tokens` when it was
    /// computed, else computed now from `prompt`. Set `estimated_tokens` to it once when it will
    /// be asked for more than once.
    pub fn prompt_tokens(&self) -> u64 {
        match u64::try_from(self.estimated_tokens) {
            Ok(n) if n > 0 || self.prompt.is_empty() => n,
            _ => crate::tokens::estimate(&self.prompt),
        }
    }
}

/// The `request` part of the context.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestInfo {
    /// Upper-case method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Host / authority.
    pub host: String,
    /// Lower-cased header names with values, sorted by name (a JSON map when serialized).
    #[serde(with = "pairs")]
    pub headers: Vec<(String, String)>,
    /// Provider.
    pub provider: Provider,
    /// API.
    pub api: Api,
    /// Model.
    pub model: Option<String>,
    /// Streaming requested.
    pub stream: bool,
    /// Output token cap.
    pub max_tokens: Option<i64>,
    /// Answers generated for this request (OpenAI `n`, `best_of`; 1 when absent), each up to
    /// the output cap: what an output reservation is multiplied by.
    #[serde(skip)]
    pub choices: u32,
    /// Temperature.
    pub temperature: Option<f64>,
    /// End-user id from the body.
    pub user: Option<String>,
    /// Conversation turns.
    pub messages: Vec<Message>,
    /// All prompt text joined.
    pub prompt: String,
    /// `prompt` folded ([`crate::fold::fold`]; built only when a rule reads it).
    pub prompt_folded: String,
    /// The kinds of personal data and secrets found in `prompt` or its views
    /// ([`crate::detect::entities`], confidence at least [`ENTITY_CONFIDENCE`]); built only when
    /// a rule reads it.
    pub prompt_entities: Vec<String>,
    /// The prompt-injection score of `prompt` and its views, 0..1
    /// ([`crate::detect::injection_score`]); computed only when a rule reads it.
    pub prompt_injection: f64,
    /// Prompt token estimate (computed at extraction only when a rule reads it: see
    /// [`RequestInfo::prompt_tokens`]).
    pub estimated_tokens: i64,
    /// Tool names, folded ([`crate::fold::fold`]: lower case, look-alike letters as Latin).
    pub tools: Vec<String>,
    /// The canonical type of each tool in `tools`, in the same order
    /// (see `request.tool_types` in the schema).
    pub tool_types: Vec<String>,
    /// Body size.
    pub body_bytes: i64,
    /// What the prompt scanners read, as extraction left it: scans still to run, and the seams
    /// of the user turns they read with `prompt` (see [`crate::prompt_scan`]). Never serialized.
    #[serde(skip)]
    pub(crate) scan: ScanInput,
}

/// What the prompt scanners of one request (or batch item) read, as extraction left it (run by
/// [`crate::prompt_scan`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ScanInput {
    /// Set by extraction: the scanners' fields are (or will be) a function of
    /// `request.prompt` and [`ScanInput::seams`]. Unset in a context built any other way (a
    /// replayed audit record holds the findings, not the text).
    pub(crate) known: bool,
    /// `request.prompt_entities` is still to be computed.
    pub(crate) entities: bool,
    /// `request.prompt_injection` is still to be computed.
    pub(crate) injection: bool,
    /// `request.prompt_folded` is still to be computed (from the prompt alone).
    pub(crate) folded: bool,
    /// The seams of the user turns ([`crate::detect::seams`]), read after the prompt.
    pub(crate) seams: String,
}

impl ScanInput {
    /// The scans `entities` and `injection` still to run over the prompt and `seams`, and the
    /// prompt still to be folded (`folded`).
    pub(crate) fn pending(
        entities: bool,
        injection: bool,
        folded: bool,
        seams: String,
    ) -> ScanInput {
        ScanInput {
            known: true,
            entities,
            injection,
            folded,
            seams,
        }
    }

    /// The seams read after the prompt, when the scanners' fields are a function of the prompt
    /// and them (a context extraction built).
    pub(crate) fn seams(&self) -> Option<&str> {
        self.known.then_some(self.seams.as_str())
    }

    /// Whether a scan is still to run.
    pub(crate) fn is_pending(&self) -> bool {
        self.entities || self.injection || self.folded
    }
}

/// The `time` part of the context.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeInfo {
    /// Hour, UTC.
    pub hour: i64,
    /// Day of week, 0 = Sunday.
    pub weekday: i64,
}

impl TimeInfo {
    /// Hour and weekday of a Unix timestamp (UTC); any `i64` is accepted.
    pub fn from_unix(secs: i64) -> TimeInfo {
        let days = secs.div_euclid(86_400);
        let hour = secs.rem_euclid(86_400).div_euclid(3600);
        // 1970-01-01 was a Thursday (4): (days + 4) mod 7, without overflow at i64::MAX.
        let weekday = days.rem_euclid(7).saturating_add(4).rem_euclid(7);
        TimeInfo { hour, weekday }
    }
}

/// The context conditions read. See the schema in [`crate::schema::FIELDS`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestContext {
    /// Policy namespace selected by the namespace header (`default` when absent).
    pub namespace: String,
    /// Request fields.
    pub request: RequestInfo,
    /// Principal attributes, in configuration order; null when the header is missing.
    #[serde(with = "pairs")]
    pub principal: Vec<(String, Option<String>)>,
    /// Shield scores, sorted by name.
    #[serde(with = "pairs")]
    pub shield: Vec<(String, ShieldValue)>,
    /// Evaluation time.
    pub time: TimeInfo,
    /// The requests inside a batch body (`request.api == "batch"`), each evaluated as its own
    /// request (method, path, host, headers and body size are the batch's). Empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub batch: Vec<RequestInfo>,
    /// What the model answered, for `phase: response` rules (empty while the request is
    /// evaluated).
    #[serde(default, skip_serializing_if = "ResponseInfo::is_empty")]
    pub response: ResponseInfo,
}

/// The `response` part of the context: what the model answered, as `phase: response` rules
/// read it (see the schema's `response.*` fields).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResponseInfo {
    /// The answer's text: a JSON answer whole, a stream's window.
    pub text: String,
    /// The kinds of personal data and secrets in `text` (built only when a rule reads them).
    pub entities: Vec<String>,
    /// The tools the model called so far, folded.
    pub tool_calls: Vec<String>,
    /// Why the model stopped, once it said.
    pub finish_reason: Option<String>,
    /// The output tokens the provider reported, once it did.
    pub output_tokens: Option<i64>,
}

impl ResponseInfo {
    /// Whether nothing was answered yet.
    pub fn is_empty(&self) -> bool {
        *self == ResponseInfo::default()
    }
}

impl RequestContext {
    /// What of this request `phase: response` rules reading `reads` see, kept while its answer
    /// is checked (and, in an ext_authz deployment, carried to the ext_proc edge): the small
    /// fields every answer check needs (namespace, provider, API, method, path, host, stream,
    /// caps, time) and of the others only those read. Never the request's text or batch items;
    /// of the headers only those read by name (the whole map holds the client's credentials).
    pub fn for_answer(&self, reads: &[FieldRef]) -> RequestContext {
        let r = &self.request;
        let read = |f: &FieldRef| reads.contains(f);
        let reads_any = |f: fn(&FieldRef) -> bool| reads.iter().any(f);
        RequestContext {
            namespace: self.namespace.clone(),
            request: RequestInfo {
                method: r.method.clone(),
                path: r.path.clone(),
                host: r.host.clone(),
                headers: r
                    .headers
                    .iter()
                    .filter(|(k, _)| {
                        reads
                            .iter()
                            .any(|f| matches!(f, FieldRef::Header(h) if h == k))
                    })
                    .cloned()
                    .collect(),
                provider: r.provider,
                api: r.api,
                model: r.model.clone().filter(|_| read(&FieldRef::Model)),
                stream: r.stream,
                max_tokens: r.max_tokens,
                choices: r.choices,
                temperature: r.temperature,
                user: r.user.clone().filter(|_| read(&FieldRef::User)),
                tools: if read(&FieldRef::Tools) {
                    r.tools.clone()
                } else {
                    Vec::new()
                },
                tool_types: if read(&FieldRef::ToolTypes) {
                    r.tool_types.clone()
                } else {
                    Vec::new()
                },
                body_bytes: r.body_bytes,
                ..RequestInfo::default()
            },
            principal: if reads_any(|f| {
                matches!(f, FieldRef::PrincipalAll | FieldRef::Principal(_))
            }) {
                self.principal.clone()
            } else {
                Vec::new()
            },
            shield: if reads_any(|f| matches!(f, FieldRef::ShieldAll | FieldRef::Shield(_))) {
                self.shield.clone()
            } else {
                Vec::new()
            },
            time: self.time,
            batch: Vec::new(),
            response: ResponseInfo::default(),
        }
    }
}

/// What a rule set needs extracted; fields no rule reads are skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// Build `request.messages`.
    pub messages: bool,
    /// Build `request.prompt`.
    pub prompt: bool,
    /// Build `request.prompt_folded` (needs `prompt`).
    pub folded: bool,
    /// Scan the prompt for personal data and secrets: `request.prompt_entities` (needs `prompt`).
    pub entities: bool,
    /// Score the prompt for injection: `request.prompt_injection` (needs `prompt`).
    pub injection: bool,
    /// Estimate `request.estimated_tokens` from the prompt (some rule reads it; needs `prompt`).
    /// Counters that charge tokens estimate on demand ([`RequestInfo::prompt_tokens`]).
    pub estimate: bool,
}

impl Needs {
    /// Extract nothing beyond the fields every request has (no rule reads text).
    pub const NONE: Needs = Needs {
        messages: false,
        prompt: false,
        folded: false,
        entities: false,
        injection: false,
        estimate: false,
    };

    /// Extract everything.
    pub const ALL: Needs = Needs {
        messages: true,
        prompt: true,
        folded: true,
        entities: true,
        injection: true,
        estimate: true,
    };

    /// What extraction must build for a reader of `fields` (a namespace's rules, a plugin's
    /// manifest): the text for anything read from it, the scans and the folding for their fields.
    #[must_use]
    pub fn reading<'f>(fields: impl IntoIterator<Item = &'f FieldRef>) -> Needs {
        let mut needs = Needs::NONE;
        for f in fields {
            needs.prompt |= matches!(
                f,
                FieldRef::Prompt
                    | FieldRef::PromptFolded
                    | FieldRef::PromptEntities
                    | FieldRef::PromptInjection
                    | FieldRef::EstimatedTokens
            );
            needs.folded |= *f == FieldRef::PromptFolded;
            needs.entities |= *f == FieldRef::PromptEntities;
            needs.injection |= *f == FieldRef::PromptInjection;
            needs.estimate |= *f == FieldRef::EstimatedTokens;
            needs.messages |= *f == FieldRef::Messages;
        }
        needs
    }

    /// What either needs (a bundle and a canary's candidate decided on one context).
    #[must_use]
    pub fn union(self, other: Needs) -> Needs {
        Needs {
            messages: self.messages || other.messages,
            prompt: self.prompt || other.prompt,
            folded: self.folded || other.folded,
            entities: self.entities || other.entities,
            injection: self.injection || other.injection,
            estimate: self.estimate || other.estimate,
        }
    }
}

/// The least confidence a finding needs to be listed in `request.prompt_entities`: every scanner's
/// shape-checked findings (a Luhn-valid card of a known issuer, a grouped national phone number);
/// not a Luhn-valid number of unknown issuer (0.4).
pub const ENTITY_CONFIDENCE: f64 = 0.7;

/// A field's value as conditions see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum FieldValue<'a> {
    /// A map key that is not there (a header or shield score).
    Missing,
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
    StrList(&'a [String]),
    StrMap(&'a [(String, String)]),
    Principal(&'a [(String, Option<String>)]),
    Shield(&'a [(String, ShieldValue)]),
    Messages(&'a [Message]),
}

/// Compares a stored (lower-case) header name with a name in any case, without allocating.
pub(crate) fn cmp_header(stored: &str, name: &str) -> Ordering {
    stored
        .bytes()
        .cmp(name.bytes().map(|b| b.to_ascii_lowercase()))
}

/// The value of a header in lower-cased, sorted pairs (one per name); `name` in any case.
pub(crate) fn find_header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .binary_search_by(|(k, _)| cmp_header(k, name))
        .ok()
        .and_then(|i| headers.get(i))
        .map(|(_, v)| v.as_str())
}

impl RequestContext {
    /// The value of a header (name in any case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.request.headers, name)
    }

    /// The principal attributes the request carries (those without a value left out), e.g. for
    /// an audit record.
    pub fn principal_present(&self) -> impl Iterator<Item = (String, String)> + '_ {
        self.principal
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
    }

    /// The value of a principal attribute.
    pub fn principal(&self, attr: &str) -> Option<&str> {
        self.principal
            .iter()
            .find(|(a, _)| a == attr)
            .and_then(|(_, v)| v.as_deref())
    }

    /// The context one item of a batch is evaluated with: this context with the item's request
    /// fields (method, path, host, headers and body size stay the batch's). `None` when there is
    /// no such item.
    pub fn batch_item(&self, index: usize) -> Option<RequestContext> {
        let item = self.batch.get(index)?;
        Some(RequestContext {
            namespace: self.namespace.clone(),
            request: RequestInfo {
                method: self.request.method.clone(),
                path: self.request.path.clone(),
                host: self.request.host.clone(),
                headers: self.request.headers.clone(),
                body_bytes: self.request.body_bytes,
                ..item.clone()
            },
            principal: self.principal.clone(),
            shield: self.shield.clone(),
            time: self.time,
            batch: Vec::new(),
            response: ResponseInfo::default(),
        })
    }

    /// The views evaluation runs over: the request itself, then every batch item.
    pub(crate) fn views(&self) -> impl Iterator<Item = View<'_>> {
        core::iter::once(View {
            ctx: self,
            req: &self.request,
        })
        .chain(self.batch.iter().map(move |req| View { ctx: self, req }))
    }

    /// The view of the request itself.
    #[cfg(test)]
    pub(crate) fn view(&self) -> View<'_> {
        View {
            ctx: self,
            req: &self.request,
        }
    }
}

/// What one evaluation reads: a context and which request fields apply (the request's own, or a
/// batch item's). Method, path, host, headers and body size always come from the request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View<'a> {
    pub ctx: &'a RequestContext,
    pub req: &'a RequestInfo,
}

impl<'a> View<'a> {
    /// The value of one field. Every `FieldRef` is answered here, so adding a field to the schema
    /// without a value is a compile error.
    pub(crate) fn get(&self, field: &FieldRef) -> FieldValue<'a> {
        let outer = &self.ctx.request;
        let r = self.req;
        match field {
            FieldRef::Method => FieldValue::Str(&outer.method),
            FieldRef::Path => FieldValue::Str(&outer.path),
            FieldRef::Host => FieldValue::Str(&outer.host),
            FieldRef::Headers => FieldValue::StrMap(&outer.headers),
            FieldRef::Header(name) => match find_header(&outer.headers, name) {
                Some(v) => FieldValue::Str(v),
                None => FieldValue::Missing,
            },
            FieldRef::Provider => FieldValue::Str(r.provider.as_str()),
            FieldRef::Api => FieldValue::Str(r.api.as_str()),
            FieldRef::Model => opt_str(&r.model),
            FieldRef::Stream => FieldValue::Bool(r.stream),
            FieldRef::MaxTokens => r.max_tokens.map_or(FieldValue::Null, FieldValue::Int),
            FieldRef::Temperature => r.temperature.map_or(FieldValue::Null, FieldValue::Float),
            FieldRef::User => opt_str(&r.user),
            FieldRef::Messages => FieldValue::Messages(&r.messages),
            FieldRef::Prompt => FieldValue::Str(&r.prompt),
            FieldRef::PromptFolded => FieldValue::Str(&r.prompt_folded),
            FieldRef::PromptEntities => FieldValue::StrList(&r.prompt_entities),
            FieldRef::PromptInjection => FieldValue::Float(r.prompt_injection),
            FieldRef::EstimatedTokens => {
                FieldValue::Int(i64::try_from(r.prompt_tokens()).unwrap_or(i64::MAX))
            }
            FieldRef::Tools => FieldValue::StrList(&r.tools),
            FieldRef::ToolTypes => FieldValue::StrList(&r.tool_types),
            FieldRef::BodyBytes => FieldValue::Int(outer.body_bytes),
            FieldRef::PrincipalAll => FieldValue::Principal(&self.ctx.principal),
            FieldRef::Principal(attr) => match self.ctx.principal.iter().find(|(a, _)| a == attr) {
                Some((_, v)) => opt_str(v),
                None => FieldValue::Missing,
            },
            FieldRef::ShieldAll => FieldValue::Shield(&self.ctx.shield),
            FieldRef::Shield(name) => {
                let shield = &self.ctx.shield;
                match shield
                    .binary_search_by(|(k, _)| k.as_str().cmp(name))
                    .ok()
                    .and_then(|i| shield.get(i))
                {
                    Some((_, ShieldValue::Number(n))) => FieldValue::Float(*n),
                    Some((_, ShieldValue::Text(s))) => FieldValue::Str(s),
                    None => FieldValue::Missing,
                }
            }
            FieldRef::ResponseText => FieldValue::Str(&self.ctx.response.text),
            FieldRef::ResponseEntities => FieldValue::StrList(&self.ctx.response.entities),
            FieldRef::ResponseToolCalls => FieldValue::StrList(&self.ctx.response.tool_calls),
            FieldRef::ResponseFinishReason => opt_str(&self.ctx.response.finish_reason),
            FieldRef::ResponseOutputTokens => self
                .ctx
                .response
                .output_tokens
                .map_or(FieldValue::Null, FieldValue::Int),
            FieldRef::Hour => FieldValue::Int(self.ctx.time.hour),
            FieldRef::Weekday => FieldValue::Int(self.ctx.time.weekday),
            // Element fields exist only inside a list comprehension (see `truth::Elem`).
            FieldRef::Elem(_) => FieldValue::Missing,
        }
    }
}

/// Serializes sorted `(name, value)` lists as JSON maps.
mod pairs {
    use alloc::collections::BTreeMap;
    use alloc::string::String;
    use alloc::vec::Vec;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, V: Serialize>(
        v: &[(String, V)],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(v.iter().map(|(k, v)| (k, v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, V: Deserialize<'de>>(
        d: D,
    ) -> Result<Vec<(String, V)>, D::Error> {
        let m: BTreeMap<String, V> = BTreeMap::deserialize(d)?;
        Ok(m.into_iter().collect())
    }
}

fn opt_str(v: &Option<String>) -> FieldValue<'_> {
    match v {
        Some(s) => FieldValue::Str(s.as_str()),
        None => FieldValue::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weekday_and_hour_from_unix() {
        // 2026-11-24T10:31:28Z is a Tuesday.
        let t = TimeInfo::from_unix(1795516288);
        assert_eq!(
            t,
            TimeInfo {
                hour: 10,
                weekday: 2
            }
        );
        assert_eq!(
            TimeInfo::from_unix(0),
            TimeInfo {
                hour: 0,
                weekday: 4
            }
        );
        // 1969-12-31 was a Wednesday; extremes do not overflow.
        assert_eq!(TimeInfo::from_unix(-1).weekday, 3);
        for t in [i64::MIN, i64::MAX] {
            let t = TimeInfo::from_unix(t);
            assert!((0..24).contains(&t.hour) && (0..7).contains(&t.weekday));
        }
    }

    #[test]
    fn header_names_match_in_any_case() {
        let h = vec![("x-tenant".to_string(), "a".to_string())];
        assert_eq!(find_header(&h, "X-Tenant"), Some("a"));
        assert_eq!(find_header(&h, "x-tenant"), Some("a"));
        assert_eq!(find_header(&h, "x-tenants"), None);
    }
}
