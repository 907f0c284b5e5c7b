//! Response rules in the filter: the core's [`AnswerGuard`] over the answer's bytes as Envoy
//! hands them over, and what the filter does with what it says. A JSON answer is held whole
//! (response headers paused, body buffered) and sent as it came or replaced by the error reply;
//! a stream's chunks are replaced by what the guard lets through (the held-back window), its
//! `content-length` dropped. A cut is counted, logged and reported to the server for its audit
//! log.

use llm_policy_core::answer::{AnswerGuard, Cut};
use llm_policy_core::reply::Reply;
use llm_policy_core::{PolicySet, RequestContext};

use crate::host::{Host, Level, Metric};
use crate::outbox::{AnswerCut, UsageReport};

/// What the filter keeps of a request whose answer response rules check.
#[derive(Debug)]
pub struct Kept {
    /// The request's context as response rules read it.
    pub ctx: RequestContext,
    /// Its `x-request-id`.
    pub request_id: Option<String>,
}

/// The answer's status, content type and content encoding, from its headers.
fn head(host: &mut dyn Host) -> (u16, String, Option<String>) {
    let status = host
        .response_header(":status")
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(200);
    let ct = host.response_header("content-type").unwrap_or_default();
    (status, ct, host.response_header("content-encoding"))
}

/// What puts the redacted values back into the answer whose headers just arrived, if it is one
/// to restore (a 2xx JSON answer or event stream, uncompressed).
pub fn restorer(
    host: &mut dyn Host,
    placeholders: llm_policy_core::redact::Placeholders,
    max_bytes: usize,
) -> Option<llm_policy_core::redact::Restorer> {
    let (status, ct, encoding) = head(host);
    llm_policy_core::redact::Restorer::new(placeholders, &ct, encoding.as_deref(), max_bytes)
        .filter(|_| (200..300).contains(&status))
}

/// A guard for the answer whose headers just arrived, if it is one to check.
pub fn guard(host: &mut dyn Host, set: &PolicySet, kept: Kept) -> Option<(AnswerGuard, Kept)> {
    let (status, ct, encoding) = head(host);
    let g = AnswerGuard::new(set, kept.ctx.clone(), status, &ct, encoding.as_deref())?;
    if !g.reads_whole() {
        // Held-back bytes change the body: the upstream's length no longer holds.
        host.set_response_header("content-length", None);
    }
    Some((g, kept))
}

/// Replaces the whole buffered answer (`len` bytes) by `reply`.
pub fn replace(host: &mut dyn Host, len: usize, reply: &Reply) {
    host.set_response_header(":status", Some(&reply.status.to_string()));
    for name in ["content-length", "content-encoding"] {
        host.set_response_header(name, None);
    }
    for (name, value) in &reply.headers {
        host.set_response_header(name, Some(value));
    }
    host.set_response_body(len, reply.body.as_bytes());
}

/// Counts, logs and reports a cut (the report carries no usage: the handle is empty).
pub fn report_cut(host: &mut dyn Host, cut: &Cut, kept: &Kept) -> UsageReport {
    host.metric(Metric::AnswersCut, 1);
    host.log(
        Level::Warn,
        &format!(
            "answer cut by rule `{}` after {} bytes of text: {}",
            cut.deny.rule, cut.text_sent, cut.deny.reason
        ),
    );
    let ctx = &kept.ctx;
    UsageReport {
        handle: String::new(),
        tokens: None,
        usd: None,
        cut: Some(AnswerCut {
            namespace: ctx.namespace.clone(),
            rule: cut.deny.rule.clone(),
            policy: cut.deny.policy.clone(),
            reason: cut.deny.reason.clone(),
            status: u32::from(cut.deny.status),
            stream: cut.stream,
            text_sent: u64::try_from(cut.text_sent).unwrap_or(u64::MAX),
            bytes_sent: u64::try_from(cut.bytes_sent).unwrap_or(u64::MAX),
            text_read: u64::try_from(cut.text_read).unwrap_or(u64::MAX),
            model: ctx.request.model.clone(),
            request_id: kept.request_id.clone(),
            principal: ctx.principal_present().collect(),
        }),
        alert: None,
        gen_ai: None,
    }
}
