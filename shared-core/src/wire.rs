//! The contract between the filter and the policy server, written once: both sides use these
//! names, encodings and rules, so they cannot drift apart.
//!
//! - The **reservation handle** ([`RESERVATION_HEADER`]): the server adds it to an allowed
//!   request whose token or cost reservations wait for a usage report; only the server may set
//!   it ([`SERVER_ONLY_HEADERS`]), and only [`is_reservation_handle`] strings are looked up.
//! - The **local counters** the filter counted itself, told to the server in the ext_authz
//!   `Check`'s context extensions ([`LocalCounted`]), which come from the proxy, never from the
//!   client.
//! - **Which headers rules see** ([`is_request_data`]): the same for a request the filter reads
//!   from Envoy and for one the server receives in a `Check`.
//! - **How identity was established** ([`IDENTITY_EXTENSION`]), told to the server the same way.
//! - What an allowed request goes ahead with besides headers ([`Grant`]: its reservation, its
//!   lowered output cap, whether its stream is to be asked for its usage), in the `Check`
//!   answer's dynamic metadata.
//! - The **bundle answer** of `GET /v1/bundle` the filter syncs from ([`BundleAnswer`]).
//!
//! The gRPC messages themselves come from `proto/` (generated on both sides).

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::reply::{LimitState, DECISION_HEADER};

/// The header carrying the handle a usage report names an allowed request by: 128 random bits
/// as 32 lower-case hex digits, known only to whoever sees the upstream request.
pub const RESERVATION_HEADER: &str = "x-llm-policy-reservation";

/// Headers only the policy engine sets on an upstream request: a client's copy is removed (the
/// filter removes it; the server's ext_authz answer removes it), and a rule may not set them.
pub const SERVER_ONLY_HEADERS: &[&str] = &[DECISION_HEADER, RESERVATION_HEADER, REWRITE_HEADER];

/// Set by the server's ext_authz answer on a request whose body is to be rewritten (its output
/// cap lowered, [`Grant::max_tokens`], or its stream asked for its usage,
/// [`Grant::include_usage`]): Envoy then runs the ext_proc filter that rewrites it
/// (the generated configuration skips that filter for every other request), and that filter
/// removes the header before the request goes upstream.
pub const REWRITE_HEADER: &str = "x-llm-policy-rewrite";

/// Envoy's ext_authz filter sets this when it forwarded only part of a body larger than its
/// buffer limit; Envoy's bookkeeping, not the client's.
pub const PARTIAL_BODY_HEADER: &str = "x-envoy-auth-partial-body";

/// Envoy's dynamic metadata namespace of the ext_authz filter: where the server's `Check`
/// answer puts the reservation ([`Reservation`]) instead of a header, so the handle never
/// reaches the provider; Envoy forwards the namespace to the server's ext_proc edge
/// (`metadata_options.forwarding_namespaces`), and the filter reads it from the answer.
pub const EXT_AUTHZ_METADATA: &str = "envoy.filters.http.ext_authz";

/// An allowed request's token and cost reservations waiting for its usage: the handle a usage
/// report names, and what the response path needs to price the answer. Carried in the `Check`
/// answer's dynamic metadata under these keys ([`Reservation::fields`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reservation {
    /// The handle ([`is_reservation_handle`]).
    pub handle: String,
    /// The request's model, as the model table is looked up.
    pub model: Option<String>,
    /// The prompt estimate reserved.
    pub prompt: u64,
    /// The output reserved (`max_tokens`, else the model's default cap).
    pub output: u64,
    /// `gen_ai.operation.name` and `gen_ai.provider.name` of the request
    /// ([`crate::gen_ai`]), when the conventions name them.
    pub gen_ai: Option<(String, String)>,
    /// When the check answered, in milliseconds since the Unix epoch (the GenAI request
    /// duration is measured from it); 0: unknown.
    pub checked_at_ms: u64,
}

impl Reservation {
    /// Metadata key of the handle.
    pub const HANDLE: &'static str = "llm_policy_reservation";
    /// Metadata key of the model.
    pub const MODEL: &'static str = "llm_policy_model";
    /// Metadata key of the prompt estimate.
    pub const PROMPT: &'static str = "llm_policy_prompt_tokens";
    /// Metadata key of the output reserved.
    pub const OUTPUT: &'static str = "llm_policy_output_tokens";
    /// Metadata key of the GenAI operation name.
    pub const OPERATION: &'static str = "llm_policy_gen_ai_operation";
    /// Metadata key of the GenAI provider name.
    pub const PROVIDER: &'static str = "llm_policy_gen_ai_provider";
    /// Metadata key of the check's time.
    pub const CHECKED_AT: &'static str = "llm_policy_checked_at_ms";

    /// The metadata fields: (key, text or number).
    pub fn fields(&self) -> Vec<(&'static str, MetadataValue)> {
        let mut out = alloc::vec![
            (Self::HANDLE, MetadataValue::Text(self.handle.clone())),
            (Self::PROMPT, MetadataValue::Number(self.prompt as f64)),
            (Self::OUTPUT, MetadataValue::Number(self.output as f64)),
        ];
        if let Some(m) = &self.model {
            out.push((Self::MODEL, MetadataValue::Text(m.clone())));
        }
        if let Some((operation, provider)) = &self.gen_ai {
            out.push((Self::OPERATION, MetadataValue::Text(operation.clone())));
            out.push((Self::PROVIDER, MetadataValue::Text(provider.clone())));
        }
        if self.checked_at_ms > 0 {
            out.push((
                Self::CHECKED_AT,
                MetadataValue::Number(self.checked_at_ms as f64),
            ));
        }
        out
    }

    /// Reads the fields back (`get`: a field's value); `None` without a valid handle.
    pub fn from_fields(get: impl Fn(&str) -> Option<MetadataValue>) -> Option<Reservation> {
        let handle = match get(Self::HANDLE)? {
            MetadataValue::Text(h) if is_reservation_handle(&h) => h,
            _ => return None,
        };
        let number = |k: &str| match get(k) {
            Some(MetadataValue::Number(n)) if n.is_finite() && n >= 0.0 => n as u64,
            _ => 0,
        };
        let text = |k: &str| match get(k) {
            Some(MetadataValue::Text(t)) => Some(t),
            _ => None,
        };
        Some(Reservation {
            handle,
            model: text(Self::MODEL),
            prompt: number(Self::PROMPT),
            output: number(Self::OUTPUT),
            gen_ai: text(Self::OPERATION).zip(text(Self::PROVIDER)),
            checked_at_ms: number(Self::CHECKED_AT),
        })
    }
}

/// What an allowed request goes ahead with besides its headers, in the `Check` answer's dynamic
/// metadata ([`EXT_AUTHZ_METADATA`]): its reservation, and the output cap its body is lowered
/// to (`transform.maxTokens`; the filter rewrites the body, in an ext_authz deployment the
/// server's ext_proc edge does).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Grant {
    /// The token and cost reservations waiting for the answer's usage.
    pub reservation: Option<Reservation>,
    /// The output cap (`max_tokens`, each choice) the request's body must be lowered to.
    pub max_tokens: Option<u64>,
    /// The request is an OpenAI stream whose client did not ask for its usage: the body must
    /// ask (`stream_options.include_usage`) and the extra usage chunk be removed from the answer
    /// (in an ext_authz deployment the server's ext_proc edge does both; the filter does it
    /// itself).
    pub include_usage: bool,
    /// Response rules check the answer: what they read of the request (in an ext_authz
    /// deployment the server's ext_proc edge checks it; the filter keeps its own copy).
    pub answer: Option<AnswerCheck>,
    /// The body's personal data and secrets are replaced by placeholders on the way up
    /// (`transform.redact`; the kinds, and whether the answer gets them back): in an ext_authz
    /// deployment the server's rewrite stream redacts, and with `restore` also checks and
    /// restores the answer; the filter does it itself.
    pub redact: Option<crate::decision::Redaction>,
    /// The request asked for its answer streamed: a restoring rewrite stream asks for the answer
    /// streamed, else buffered, from the request's headers on (said with [`Grant::redact`]).
    pub stream: bool,
}

/// What checking an answer needs of its request ([`crate::answer`]): the request as response
/// rules read it ([`crate::context::RequestContext::for_answer`]) and its `x-request-id`, for the audit record
/// of a cut.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct AnswerCheck {
    /// The request's context as response rules read it.
    pub ctx: crate::context::RequestContext,
    /// The request's `x-request-id`, as the client or proxy sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl Grant {
    /// Metadata key of the lowered output cap.
    pub const MAX_TOKENS: &'static str = "llm_policy_max_tokens";

    /// Metadata key of [`Grant::include_usage`] (`1`).
    pub const INCLUDE_USAGE: &'static str = "llm_policy_include_usage";

    /// Metadata key of [`Grant::answer`] (JSON).
    pub const ANSWER: &'static str = "llm_policy_answer";

    /// Metadata key of [`Grant::redact`]: the kinds, comma-separated, then `;restore` when the
    /// answer gets the values back and `;stream` when it is asked for streamed
    /// (`email,credit_card;restore;stream`).
    pub const REDACT: &'static str = "llm_policy_redact";

    /// Whether there is nothing to say (no metadata is sent).
    pub fn is_empty(&self) -> bool {
        self.reservation.is_none()
            && self.max_tokens.is_none()
            && !self.include_usage
            && self.answer.is_none()
            && self.redact.is_none()
    }

    /// Whether the request goes through the ext_proc filters gated by [`REWRITE_HEADER`]: its
    /// body is rewritten, or its answer is changed (its usage chunk removed, or response rules
    /// check it).
    pub fn gates(&self) -> bool {
        self.rewrites() || self.answer.is_some()
    }

    /// Whether the request's body is rewritten on its way up (its cap lowered, or its usage
    /// asked for).
    pub fn rewrites(&self) -> bool {
        self.max_tokens.is_some() || self.include_usage || self.redact.is_some()
    }

    /// Whether the rewrite stream also reads the answer: it restores redacted values, and so
    /// (before restoring) runs the response rules the answer stream would.
    pub fn restores(&self) -> bool {
        self.redact.as_ref().is_some_and(|r| r.restore)
    }

    /// The metadata fields: (key, text or number).
    pub fn fields(&self) -> Vec<(&'static str, MetadataValue)> {
        let mut out = self
            .reservation
            .as_ref()
            .map(Reservation::fields)
            .unwrap_or_default();
        if let Some(n) = self.max_tokens {
            out.push((Self::MAX_TOKENS, MetadataValue::Number(n as f64)));
        }
        if self.include_usage {
            out.push((Self::INCLUDE_USAGE, MetadataValue::Number(1.0)));
        }
        if let Some(a) = &self.answer {
            if let Ok(json) = serde_json::to_string(a) {
                out.push((Self::ANSWER, MetadataValue::Text(json)));
            }
        }
        if let Some(r) = &self.redact {
            let mut v = r.kinds.join(",");
            if r.restore {
                v.push_str(";restore");
            }
            if self.stream {
                v.push_str(";stream");
            }
            out.push((Self::REDACT, MetadataValue::Text(v)));
        }
        out
    }

    /// Reads the fields back (`get`: a field's value).
    pub fn from_fields(get: impl Fn(&str) -> Option<MetadataValue>) -> Grant {
        let max_tokens = match get(Self::MAX_TOKENS) {
            // At least one token: a cap of 0 is no answer at all, never what a rule allows.
            Some(MetadataValue::Number(n)) if n.is_finite() && n >= 1.0 => Some(n as u64),
            _ => None,
        };
        let answer = match get(Self::ANSWER) {
            Some(MetadataValue::Text(json)) => serde_json::from_str(&json).ok(),
            _ => None,
        };
        let mut stream = false;
        let redact = match get(Self::REDACT) {
            Some(MetadataValue::Text(v)) => {
                let mut parts = v.split(';');
                let kinds: Vec<String> = parts
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .filter(|k| crate::detect::Entity::from_name(k).is_some())
                    .map(String::from)
                    .collect();
                let mut restore = false;
                for flag in parts {
                    restore |= flag == "restore";
                    stream |= flag == "stream";
                }
                (!kinds.is_empty()).then(|| crate::decision::Redaction {
                    kinds,
                    restore,
                    counts: Default::default(),
                })
            }
            _ => None,
        };
        Grant {
            include_usage: get(Self::INCLUDE_USAGE) == Some(MetadataValue::Number(1.0)),
            reservation: Reservation::from_fields(&get),
            max_tokens,
            answer,
            redact,
            stream,
        }
    }
}

/// The response header that tells the client its request's output cap was lowered
/// (`transform.maxTokens`), and to what.
pub const MAX_TOKENS_HEADER: &str = "x-llm-policy-max-tokens";

/// The response header that tells the client what its request had replaced before it went
/// upstream (`transform.redact`): distinct values by kind, `email=2, credit_card=1`; never the
/// values.
pub const REDACTED_HEADER: &str = "x-llm-policy-redacted";

/// The value of [`REDACTED_HEADER`] for `counts` (`None`: nothing was replaced).
pub fn redacted_header(counts: &alloc::collections::BTreeMap<String, u32>) -> Option<String> {
    use core::fmt::Write as _;
    let mut out = String::new();
    for e in crate::detect::Entity::ALL {
        if let Some(n) = counts.get(e.name()) {
            if !out.is_empty() {
                out.push_str(", ");
            }
            let _ = write!(out, "{}={n}", e.name());
        }
    }
    (!out.is_empty()).then_some(out)
}

/// A dynamic metadata value (`google.protobuf.Value`, the kinds used).
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    /// `string_value`.
    Text(String),
    /// `number_value`.
    Number(f64),
}

/// Whether `handle` has the form of a reservation handle (32 lower-case hex digits): nothing else
/// is looked up in the counter store.
pub fn is_reservation_handle(handle: &str) -> bool {
    handle.len() == 32
        && handle
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether a request header is request data that rules read: not the pseudo-headers other than
/// `:authority` (method and path come separately), not the reservation handle (the server's),
/// not Envoy's partial-body flag. The filter and the server's `Check` edge both filter with this.
pub fn is_request_data(name: &str) -> bool {
    (!name.starts_with(':') || name == ":authority")
        && !name.eq_ignore_ascii_case(RESERVATION_HEADER)
        && !name.eq_ignore_ascii_case(PARTIAL_BODY_HEADER)
}

/// Context extension set by the filter when it calls the server: it counted the local-scope
/// limits itself (value [`LOCAL_COUNTERS_BY_PROXY`]).
pub const LOCAL_COUNTERS_EXTENSION: &str = "llm-policy.local-counters";
/// The value of [`LOCAL_COUNTERS_EXTENSION`].
pub const LOCAL_COUNTERS_BY_PROXY: &str = "proxy";
/// Context extension with the rules whose local counter was over: a JSON object `{rule: [limit,
/// remaining, reset_secs]}`.
pub const LOCAL_OVER_EXTENSION: &str = "llm-policy.local-over";

/// Context extension naming how the proxy established the request's identity
/// ([`crate::identity::IdentityMode::via`]: `none`, `trusted-header`, `jwt`, `api-key`). Set
/// by Envoy's route configuration for ext_authz and by the filter when it calls the server, so
/// the server knows whether to look up a virtual key and what its audit record says.
pub const IDENTITY_EXTENSION: &str = "llm-policy.identity";

/// The local-scope limits the filter counted for a request: the rules whose counter was over,
/// with its state. The server answers those rules from here instead of counting them again.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalCounted {
    /// Rules whose local counter was over its limit.
    pub over: Vec<(String, LimitState)>,
}

impl LocalCounted {
    /// The two context extensions that say so: `(name, value)` pairs.
    pub fn extensions(&self) -> [(&'static str, String); 2] {
        let over: BTreeMap<&str, (f64, f64, u64)> = self
            .over
            .iter()
            .map(|(rule, s)| (rule.as_str(), (s.limit, s.remaining, s.reset_secs)))
            .collect();
        [
            (
                LOCAL_COUNTERS_EXTENSION,
                String::from(LOCAL_COUNTERS_BY_PROXY),
            ),
            (
                LOCAL_OVER_EXTENSION,
                serde_json::to_string(&over).unwrap_or_else(|_| String::from("{}")),
            ),
        ]
    }

    /// Reads the context extensions of a `Check` (`get` looks one up): `None` when the proxy did
    /// not count local limits (an ext_authz-only deployment: the server counts them). An
    /// unreadable list of rules counts as none over.
    pub fn from_extensions<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<LocalCounted> {
        if get(LOCAL_COUNTERS_EXTENSION) != Some(LOCAL_COUNTERS_BY_PROXY) {
            return None;
        }
        let over: BTreeMap<String, (f64, f64, u64)> = get(LOCAL_OVER_EXTENSION)
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or_default();
        Some(LocalCounted {
            over: over
                .into_iter()
                .map(|(rule, (limit, remaining, reset_secs))| {
                    let state = LimitState {
                        limit,
                        remaining,
                        reset_secs,
                    };
                    (rule, state)
                })
                .collect(),
        })
    }

    /// The state of `rule`'s local counter if it was over.
    pub fn over(&self, rule: &str) -> Option<LimitState> {
        self.over
            .iter()
            .find(|(r, _)| r == rule)
            .map(|(_, state)| *state)
    }
}

/// The answer of `GET /v1/bundle`: the bundle serving, as files (the ETag is the digest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleAnswer {
    /// The registry version number.
    pub version: u64,
    /// The bundle's content digest.
    pub bundle: String,
    /// The policy files, relative to the policy directory.
    pub files: Vec<BundleFile>,
    /// The virtual API keys the server holds (none when it holds no key table): a filter in
    /// `api-keys` identity swaps them in. The ETag covers them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<crate::identity::KeyRecord>>,
    /// The model table the bundle was compiled with, as its YAML text, when the server loads
    /// its own (`modelsFile`): the filter prices with it too (else both use the shipped one).
    /// The bundle digest covers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<String>,
    /// The canary running on the server, if any: the filter decides sampled requests with it
    /// too (never enforcing) and reports its counts with its next syncs ([`SYNC_CANARY_HEADER`]).
    /// The ETag covers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryBundle>,
}

/// A canary's candidate, as `GET /v1/bundle` hands it to the filters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryBundle {
    /// The candidate's bundle digest (the filters' counts name it).
    pub bundle: String,
    /// Its policy files.
    pub files: Vec<BundleFile>,
    /// Its model table, when it differs from the bundle's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<String>,
    /// The share of requests decided again (0 < sample <= 1).
    pub sample: f64,
}

/// Whether the `n`-th request (counted from 0) a canary sampling `sample` (0 < sample <= 1)
/// sees is decided again: every 1/sample-th, evenly. The filter and the server sample alike.
pub fn canary_sampled(n: u64, sample: f64) -> bool {
    #[expect(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a count of requests; the whole part of a product in [0, n] (truncation is the floor here)"
    )]
    let step = |k: u64| (k as f64 * sample) as u64;
    step(n.saturating_add(1)) > step(n)
}

/// What a filter's bundle sync tells the server about itself (`GET /v1/bundle` request headers;
/// the server's fleet view, `GET /v1/fleet`): its Envoy node id.
pub const SYNC_NODE_HEADER: &str = "x-llm-policy-node";
/// The bundle digest the syncing filter runs.
pub const SYNC_RUNNING_HEADER: &str = "x-llm-policy-running";
/// The syncing filter's last sync error (absent: its last sync was good).
pub const SYNC_ERROR_HEADER: &str = "x-llm-policy-sync-error";
/// The syncing filter's canary counts: `<vm id>;<candidate bundle>;<evaluated>;<disagreements>`
/// (cumulative for that candidate in that VM; each Envoy worker's VM syncs on its own).
pub const SYNC_CANARY_HEADER: &str = "x-llm-policy-canary";

/// The value of [`SYNC_CANARY_HEADER`].
pub fn canary_counts(vm: &str, bundle: &str, evaluated: u64, disagreements: u64) -> String {
    alloc::format!("{vm};{bundle};{evaluated};{disagreements}")
}

/// Reads a [`SYNC_CANARY_HEADER`] value: (vm id, candidate bundle, evaluated, disagreements).
pub fn parse_canary_counts(value: &str) -> Option<(String, String, u64, u64)> {
    let mut parts = value.split(';');
    let vm = String::from(parts.next()?);
    let bundle = String::from(parts.next()?);
    let evaluated = parts.next()?.parse().ok()?;
    let disagreements = parts.next()?.parse().ok()?;
    if parts.next().is_some() || vm.is_empty() || bundle.is_empty() {
        return None;
    }
    Some((vm, bundle, evaluated, disagreements))
}

/// One file of a [`BundleAnswer`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleFile {
    /// Path relative to the policy directory.
    pub path: String,
    /// The file's text.
    pub text: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_counted_round_trips_through_the_extensions() {
        let counted = LocalCounted {
            over: alloc::vec![(
                String::from("per-user"),
                LimitState {
                    limit: 5.0,
                    remaining: 0.0,
                    reset_secs: 42,
                },
            )],
        };
        let ext = counted.extensions();
        let get = |k: &str| ext.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(LocalCounted::from_extensions(get), Some(counted.clone()));
        assert_eq!(counted.over("per-user").map(|s| s.reset_secs), Some(42));
        assert_eq!(counted.over("other"), None);
        // Not counted by a proxy: the server counts.
        assert_eq!(LocalCounted::from_extensions(|_| None), None);
        // Garbage in the list: nothing over, still counted by the proxy.
        let garbage = |k: &str| match k {
            LOCAL_COUNTERS_EXTENSION => Some("proxy"),
            _ => Some("not json"),
        };
        assert_eq!(
            LocalCounted::from_extensions(garbage),
            Some(LocalCounted::default())
        );
    }

    #[test]
    fn request_data_and_handles() {
        for h in [":authority", "x-user-id", "content-length"] {
            assert!(is_request_data(h), "{h}");
        }
        for h in [
            ":path",
            ":method",
            "X-LLM-Policy-Reservation",
            PARTIAL_BODY_HEADER,
        ] {
            assert!(!is_request_data(h), "{h}");
        }
        assert!(is_reservation_handle("0123456789abcdef0123456789abcdef"));
        assert!(!is_reservation_handle("0123456789ABCDEF0123456789abcdef"));
        assert!(!is_reservation_handle("stolen"));
    }
}
