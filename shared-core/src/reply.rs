//! What a proxy answers for a decision: the HTTP status, headers and body of a local reply (deny,
//! throttle, a request the core rejected), or the headers added to a request that goes ahead.
//! The server and the filter both render replies here, so a client sees the same bytes whichever
//! one decided.
//!
//! Error bodies use the provider's own format, so the official SDKs raise their usual
//! exceptions (`PermissionDeniedError`, `RateLimitError`, `BadRequestError`, ...):
//!
//! - OpenAI (and unknown providers): `{"error": {"message", "type", "param": null, "code"}}`;
//! - Anthropic (`request.provider == "anthropic"`): `{"type": "error", "error": {"type",
//!   "message"}}`.

use alloc::borrow::Cow;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::context::{Api, ContextError, Provider};
use crate::decision::{CounterKind, Decision, Verdict};
use crate::identity::KeyError;

/// The header that carries the verdict to the upstream (allow) or the client (deny, throttle).
pub const DECISION_HEADER: &str = "x-llm-policy-decision";

/// A local reply: what the client receives instead of the upstream's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Headers, lower-case names.
    pub headers: Vec<(String, String)>,
    /// `application/json` body.
    pub body: String,
}

/// What a counter said, for the `retry-after` and `x-ratelimit-*` headers of a throttle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitState {
    /// The counter's limit per window.
    pub limit: f64,
    /// What is left in the window.
    pub remaining: f64,
    /// Seconds until the window resets.
    pub reset_secs: u64,
}

/// The reply for a decision that is not `allow` (`None` for allow: the request goes ahead with
/// [`upstream_headers`]). `limit` is the state of the counter that made a throttle decide, if a
/// counter did.
pub fn for_decision(d: &Decision, provider: Provider, limit: Option<LimitState>) -> Option<Reply> {
    if d.decision == Verdict::Allow {
        return None;
    }
    let status = d.actions.status.unwrap_or(match d.decision {
        Verdict::Throttle => 429,
        _ => 403,
    });
    let mut headers: Vec<(String, String)> = d
        .actions
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    headers.push((DECISION_HEADER.into(), d.decision.as_str().into()));
    if d.decision == Verdict::Throttle {
        // The counter's state, unless the rule's own headers say otherwise.
        let reset = limit.map_or(1, |l| l.reset_secs.max(1));
        let mut computed = alloc::vec![("retry-after", reset.to_string())];
        if let Some(l) = limit {
            computed.push(("x-ratelimit-limit", whole(l.limit)));
            computed.push(("x-ratelimit-remaining", whole(l.remaining.max(0.0))));
            computed.push(("x-ratelimit-reset", reset.to_string()));
        }
        for (name, value) in computed {
            if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name)) {
                headers.push((name.into(), value));
            }
        }
    }
    let code = match d.decision {
        Verdict::Throttle => "rate_limited",
        _ => "policy_denied",
    };
    Some(Reply {
        status,
        body: error_body(provider, status, code, &d.reason),
        headers: with_content_type(headers),
    })
}

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens,usd}` for the answer to a request
/// that went ahead, from the counters it was charged on that asked for them
/// (`remainingHeaders`, with their state after the charge): per unit, the counter with the least
/// left. Reset in whole seconds.
pub fn remaining_headers(counters: &[(CounterKind, LimitState)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (kind, unit) in [
        (CounterKind::Requests, "requests"),
        (CounterKind::Tokens, "tokens"),
        (CounterKind::Usd, "usd"),
    ] {
        let tightest = counters
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, s)| s)
            .min_by(|a, b| a.remaining.total_cmp(&b.remaining));
        let Some(s) = tightest else {
            continue;
        };
        let amount = |v: f64| match kind {
            CounterKind::Usd => format!("{:.4}", v.max(0.0)),
            _ => whole(v.max(0.0)),
        };
        out.push((format!("x-ratelimit-limit-{unit}"), amount(s.limit)));
        out.push((format!("x-ratelimit-remaining-{unit}"), amount(s.remaining)));
        out.push((
            format!("x-ratelimit-reset-{unit}"),
            s.reset_secs.max(1).to_string(),
        ));
    }
    out
}

/// The state of the deciding rule's counter among those a host checked (`(rule, state)` of each
/// counter that was over), for [`for_decision`]'s `retry-after` and `x-ratelimit-*` headers.
pub fn deciding_limit(d: &Decision, over: &[(String, LimitState)]) -> Option<LimitState> {
    let rule = d.metadata.deciding_rule.as_deref()?;
    over.iter().find(|(r, _)| r == rule).map(|(_, s)| *s)
}

/// The reply for a request the core could not evaluate (400 / 413).
pub fn for_error(e: &ContextError, provider: Provider) -> Reply {
    let status = e.status();
    Reply {
        status,
        body: error_body(provider, status, e.code(), &e.to_string()),
        headers: with_content_type(alloc::vec![(DECISION_HEADER.into(), String::from("deny"))]),
    }
}

/// The reply when no decision could be made (the policy server unreachable or late, no bundle
/// yet) and the failure mode is closed: 503 `policy_unavailable`, marked
/// `x-llm-policy-decision: error`.
pub fn unavailable(provider: Provider, message: &str) -> Reply {
    Reply {
        status: 503,
        body: error_body(provider, 503, "policy_unavailable", message),
        headers: with_content_type(alloc::vec![(DECISION_HEADER.into(), String::from("error"))]),
    }
}

/// The reply to a request whose virtual API key was refused: 401 in the provider's format (the
/// SDKs raise their authentication error), marked `x-llm-policy-decision: deny`.
pub fn unauthenticated(provider: Provider, e: KeyError) -> Reply {
    Reply {
        status: 401,
        body: error_body(provider, 401, e.code(), &e.to_string()),
        headers: with_content_type(alloc::vec![
            (DECISION_HEADER.into(), String::from("deny")),
            (String::from("www-authenticate"), String::from("Bearer")),
        ]),
    }
}

/// The provider a request is addressed to, from its path and headers (as extraction decides it),
/// for replying to a request whose context could not be built.
pub fn provider_of(path: &str, headers: &[(String, String)]) -> Provider {
    classify(path, headers).0
}

/// Provider and API of a request from its path and headers, exactly as extraction decides them
/// (`Api::Other` for a path that is no LLM API call), with the path in [`api_path`] form. A
/// proxy uses it to pick the requests to check before reading their bodies.
pub fn classify<'p>(path: &'p str, headers: &[(String, String)]) -> (Provider, Api, Cow<'p, str>) {
    let wide = api_path(path);
    let (provider, api) = crate::extract::classify_wide(&wide, |name| {
        headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name))
    });
    (provider, api, wide)
}

/// The path as API classification reads it: normalized as extraction does (query and fragment
/// removed, unreserved escapes decoded, dot segments resolved), then lower case, with `\\`,
/// `%2F` and `%5C` as `/`, `;parameters` dropped and repeated slashes merged. Path patterns must
/// match this form, or a client could spell its way around them (`/v1/chat%2Fcompletions`,
/// `/v1/Chat/Completions`, `/v1/./chat/completions`). Borrowed when the path is in that form
/// already, as most are.
pub fn api_path(path: &str) -> Cow<'_, str> {
    match crate::extract::normalize_path(path) {
        Cow::Borrowed(normal) => crate::extract::api_path(normal),
        Cow::Owned(normal) => Cow::Owned(crate::extract::api_path(&normal).into_owned()),
    }
}

/// Headers added to a request that goes ahead: the verdict and the matched rules' headers.
pub fn upstream_headers(d: &Decision) -> Vec<(String, String)> {
    let mut h: Vec<(String, String)> = d
        .actions
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    h.push((DECISION_HEADER.into(), d.decision.as_str().into()));
    h
}

fn with_content_type(mut h: Vec<(String, String)>) -> Vec<(String, String)> {
    h.push(("content-type".into(), "application/json".into()));
    h
}

fn whole(x: f64) -> String {
    if (0.0..9.0e15).contains(&x) {
        // Truncation is the floor for non-negative values (no `f64::floor` without std).
        format!("{}", x as u64)
    } else {
        String::from("0")
    }
}

/// The provider's error type for a status.
fn error_type(provider: Provider, status: u16) -> &'static str {
    match (provider, status) {
        (Provider::Anthropic, 400) => "invalid_request_error",
        (Provider::Anthropic, 401) => "authentication_error",
        (Provider::Anthropic, 403) => "permission_error",
        (Provider::Anthropic, 404) => "not_found_error",
        (Provider::Anthropic, 413) => "request_too_large",
        (Provider::Anthropic, 429) => "rate_limit_error",
        (Provider::Anthropic, s) if s >= 500 => "api_error",
        (Provider::Anthropic, _) => "invalid_request_error",
        (_, 429) => "rate_limit_exceeded",
        (_, 401) => "authentication_error",
        (_, 403) => "permission_denied",
        (_, s) if s >= 500 => "server_error",
        _ => "invalid_request_error",
    }
}

/// The body of an error reply in the provider's format.
pub fn error_body(provider: Provider, status: u16, code: &str, message: &str) -> String {
    let kind = error_type(provider, status);
    let v = match provider {
        Provider::Anthropic => serde_json::json!({
            "type": "error",
            "error": { "type": kind, "message": message },
        }),
        Provider::Openai | Provider::Unknown => serde_json::json!({
            "error": { "message": message, "type": kind, "param": null, "code": code },
        }),
    };
    serde_json::to_string(&v).unwrap_or_default()
}

/// The event that ends a stream in the provider's format, so the official SDKs raise it: an
/// OpenAI chat or completions stream gets a `data:` event holding an `error` object (what the
/// SDK checks every event for), the Responses API the same as an `error` event, Anthropic an
/// `error` event with its error body.
pub fn stream_error(
    provider: Provider,
    api: Api,
    status: u16,
    code: &str,
    message: &str,
) -> Vec<u8> {
    let body = error_body(provider, status, code, message);
    let event = match (provider, api) {
        (Provider::Anthropic, _) | (_, Api::Responses) => format!("event: error\ndata: {body}\n\n"),
        _ => format!("data: {body}\n\n"),
    };
    event.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{Actions, DecisionMetadata};

    fn decision(v: Verdict, status: Option<u16>) -> Decision {
        Decision {
            decision: v,
            reason: String::from("model is not approved"),
            matched_rules: alloc::vec![],
            actions: Actions {
                status,
                ..Actions::default()
            },
            metadata: DecisionMetadata::default(),
            evaluation_time_us: 0,
            explain: None,
        }
    }

    #[test]
    fn allow_is_no_reply() {
        assert!(for_decision(&decision(Verdict::Allow, None), Provider::Openai, None).is_none());
    }

    #[test]
    fn deny_in_each_provider_format() {
        let d = decision(Verdict::Deny, Some(403));
        let r = for_decision(&d, Provider::Openai, None).unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"]["message"], "model is not approved");
        assert_eq!(v["error"]["type"], "permission_denied");
        assert_eq!(v["error"]["code"], "policy_denied");
        let r = for_decision(&d, Provider::Anthropic, None).unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "permission_error");
        assert!(r
            .headers
            .contains(&("x-llm-policy-decision".into(), "deny".into())));
    }

    #[test]
    fn throttle_carries_retry_after_and_rate_limit_headers() {
        let d = decision(Verdict::Throttle, Some(429));
        let state = LimitState {
            limit: 120.0,
            remaining: 0.0,
            reset_secs: 17,
        };
        let r = for_decision(&d, Provider::Openai, Some(state)).unwrap();
        let h = |k: &str| {
            r.headers
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(r.status, 429);
        assert_eq!(h("retry-after"), Some("17"));
        assert_eq!(h("x-ratelimit-limit"), Some("120"));
        assert_eq!(h("x-ratelimit-remaining"), Some("0"));
        let r = for_decision(&d, Provider::Anthropic, None).unwrap();
        assert!(r.body.contains("rate_limit_error"));
        // A rule's own retry-after wins; the header is never sent twice.
        let mut d = decision(Verdict::Throttle, Some(429));
        d.actions.headers.insert("retry-after".into(), "60".into());
        let r = for_decision(&d, Provider::Openai, Some(state)).unwrap();
        let retry: Vec<_> = r
            .headers
            .iter()
            .filter(|(k, _)| k == "retry-after")
            .collect();
        assert_eq!(retry, [&("retry-after".to_string(), "60".to_string())]);
    }

    #[test]
    fn provider_comes_from_the_path() {
        assert_eq!(
            provider_of("/v1/messages?beta=true", &[]),
            Provider::Anthropic
        );
        assert_eq!(provider_of("/v1/chat/completions", &[]), Provider::Openai);
    }

    #[test]
    fn rejected_requests_are_400_or_413() {
        let e = ContextError::InvalidBody("x".into());
        let r = for_error(&e, Provider::Openai);
        assert_eq!(r.status, 400);
        assert!(r.body.contains("invalid_request_error"));
        let e = ContextError::BodyTooLarge { size: 9, limit: 1 };
        let r = for_error(&e, Provider::Anthropic);
        assert_eq!(r.status, 413);
        assert!(r.body.contains("request_too_large"));
    }
}
