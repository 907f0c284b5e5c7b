//! The Envoy response edge: `envoy.service.ext_proc.v3.ExternalProcessor/Process`. In an
//! ext_authz deployment Envoy's ext_proc filter streams each answer to the server (observability
//! mode: Envoy does not wait for the server, the answer reaches the client as fast as without
//! it), with the `Check`'s reservation in the forwarded dynamic metadata. The edge reads the
//! answer's usage exactly as the filter does ([`UsageReader`], [`charge_for`]) and commits it.
//!
//! A stream without a reservation is closed after its response headers (no body is sent). A
//! stream that ends before its body did (client gone, upstream reset) is charged what streamed,
//! at least its reservation; one that never got its response headers keeps its reservation.
//!
//! The same service rewrites what ext_authz cannot: it lowers a request's output cap
//! (`transform.maxTokens`), and has an OpenAI stream whose client did not ask for its usage ask
//! for it (`stream_options.include_usage`), removing the extra usage chunk from the answer so
//! the client sees the stream it asked for. The generated configuration runs two more ext_proc
//! filters, only for requests whose `Check` answer set [`wire::REWRITE_HEADER`]:
//! - the rewrite stream (waited for, failing closed) starts with the request headers: the edge
//!   asks for the buffered body (a mode override), answers it rewritten ([`lower_max_tokens`],
//!   [`add_include_usage`]) with its new `content-length`, and removes the header;
//! - the answer stream (failing as the deployment's failure mode says) starts with the answer's
//!   headers and changes the answer: for an uncompressed event stream whose grant says usage was
//!   asked for, each chunk without the usage chunk ([`UsageChunkStripper`]); for an answer the
//!   grant says response rules check ([`wire::Grant::answer`]), the core's [`AnswerGuard`]: a
//!   JSON answer asked for buffered and answered whole (a deny is an immediate response, the
//!   error in the provider's format), a stream asked for streamed and each chunk answered with
//!   what the held-back window lets through (a deny ends it with the provider's error event).
//!   A cut is recorded (`response` audit record, `llm_policy_answers_cut_total`).
//!
//! Neither settles anything: the observability stream, which sees the answer before the answer
//! filter does, reads the usage from what the upstream sent, so what was generated up to a cut
//! is charged.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    HeaderMap, HeaderValue, HeaderValueOption, Metadata,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::{
    BodySendMode, HeaderSendMode,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation, processing_request, processing_response, BodyMutation, BodyResponse,
    CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse, ProcessingRequest,
    ProcessingResponse, TrailersResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status, Streaming};

use llm_policy_core::answer::{AnswerGuard, Pass};
use llm_policy_core::context::{Api, ContextConfig, Provider, RequestInput};
use llm_policy_core::detect::Entities;
use llm_policy_core::gen_ai::GenAiUsage;
use llm_policy_core::model_table::charge_for;
use llm_policy_core::redact::{self, Placeholders, Restorer};
use llm_policy_core::reply;
use llm_policy_core::rewrite::{self, add_include_usage, lower_max_tokens, Lowered};
use llm_policy_core::usage::{Reading, UsageChunkStripper, UsageReader};
use llm_policy_core::wire::{self, Grant, MetadataValue};

use super::audit::{CutFacts, CutRecord};
use super::engine::{Engine, Usage};

/// Whether a restoring rewrite stream reads a streamed answer streamed. Off: Envoy 1.40 loses
/// (now and then, under load) a streamed answer whose body has fully arrived before its headers
/// were answered, and the client gets an empty 200; buffered, the answer is restored whole and
/// sent at its end.
const STREAM_RESTORED: bool = false;

/// A body chunk above this is checked with [`tokio::task::block_in_place`].
const LARGE_BODY: usize = 64 * 1024;

/// The ext_proc service.
pub struct EnvoyUsage {
    engine: Arc<Engine>,
}

impl EnvoyUsage {
    /// A service recording usage with `engine`.
    pub fn new(engine: Arc<Engine>) -> EnvoyUsage {
        EnvoyUsage { engine }
    }
}

/// The `Check`'s grant in the forwarded metadata (empty when there is none); what response
/// rules read of the request only when `answer` (it is read once, by the stream that checks
/// the answer).
fn grant(metadata: Option<&Metadata>, answer: bool) -> Grant {
    let Some(fields) = metadata
        .and_then(|m| m.filter_metadata.get(wire::EXT_AUTHZ_METADATA))
        .map(|s| &s.fields)
    else {
        return Grant::default();
    };
    Grant::from_fields(|k| {
        match fields
            .get(k)
            .filter(|_| answer || k != Grant::ANSWER)?
            .kind
            .as_ref()?
        {
            Kind::StringValue(s) => Some(MetadataValue::Text(s.clone())),
            Kind::NumberValue(n) => Some(MetadataValue::Number(*n)),
            _ => None,
        }
    })
}

/// A header's value (`raw_value` as Envoy sends it, or `value`).
fn header(headers: Option<&HeaderMap>, name: &str) -> Option<String> {
    let h = headers?.headers.iter().find(|h| h.key == name)?;
    Some(if h.raw_value.is_empty() {
        h.value.clone()
    } else {
        String::from_utf8_lossy(&h.raw_value).into_owned()
    })
}

/// The request headers rules read (pseudo-headers but `:authority` left out), as sent.
fn request_headers(headers: Option<&HeaderMap>) -> Vec<(String, String)> {
    headers
        .map(|m| {
            m.headers
                .iter()
                .filter(|x| wire::is_request_data(&x.key))
                .map(|x| {
                    let v = if x.raw_value.is_empty() {
                        x.value.clone()
                    } else {
                        String::from_utf8_lossy(&x.raw_value).into_owned()
                    };
                    (x.key.clone(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One answer being read (or, on the request path, one request being lowered).
#[derive(Default)]
struct Answer {
    reservation: Option<wire::Reservation>,
    /// A request-path stream: it rewrites a request and settles nothing.
    request: Option<Rewrite>,
    /// A stream that changes the answer; it settles nothing.
    edit: Option<Edit>,
    /// The response headers came: `None` while the upstream has not answered.
    status: Option<u16>,
    reader: Option<UsageReader>,
    done: bool,
}

impl Answer {
    /// What to charge, once the stream ended (`None` fields: the reservation stands).
    fn settle(self, engine: &Engine) -> Option<(String, Usage)> {
        if self.request.is_some() || self.edit.is_some() {
            return None;
        }
        let r = self.reservation?;
        let usage = match (self.status, self.reader) {
            // The provider refused the request: nothing was spent (a 5xx may be Envoy's, after
            // the provider spent: the reservation stands).
            (Some(s), _) if (400..500).contains(&s) && s != 408 => Usage {
                tokens: Some(0.0),
                usd: Some(0.0),
                gen_ai: None,
            },
            (Some(s), Some(reader)) if s < 400 => {
                let reading: Reading = reader.finish();
                let models = engine.models();
                let (tokens, usd) =
                    charge_for(&models, r.model.as_deref(), r.prompt, r.output, &reading);
                Usage {
                    tokens,
                    usd,
                    gen_ai: gen_ai_of(&r, &reading),
                }
            }
            // No answer at all: the reservation stands.
            _ => Usage::default(),
        };
        Some((r.handle, usage))
    }
}

/// What the GenAI metrics record of an answer read here: its duration from the check.
fn gen_ai_of(r: &wire::Reservation, reading: &Reading) -> Option<GenAiUsage> {
    let (operation, provider) = r.gen_ai.clone()?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0);
    let duration = (r.checked_at_ms > 0).then(|| (now_ms - r.checked_at_ms as f64) / 1000.0);
    Some(GenAiUsage::named(
        operation,
        provider,
        r.model.as_deref(),
        reading,
        duration,
    ))
}

/// Whether a message is of the answer (not the request).
fn answers(m: &processing_request::Request) -> bool {
    use processing_request::Request as In;
    matches!(
        m,
        In::ResponseHeaders(_) | In::ResponseBody(_) | In::ResponseTrailers(_)
    )
}

/// The reply a non-observability Envoy expects for `request` (ignored in observability mode).
fn ack(request: &processing_request::Request) -> Option<ProcessingResponse> {
    use processing_request::Request as In;
    use processing_response::Response as Out;
    let response = match request {
        In::RequestHeaders(_) => Out::RequestHeaders(HeadersResponse::default()),
        In::ResponseHeaders(_) => Out::ResponseHeaders(HeadersResponse::default()),
        In::RequestBody(_) => Out::RequestBody(BodyResponse::default()),
        In::ResponseBody(_) => Out::ResponseBody(BodyResponse::default()),
        In::RequestTrailers(_) => Out::RequestTrailers(TrailersResponse::default()),
        In::ResponseTrailers(_) => Out::ResponseTrailers(TrailersResponse::default()),
    };
    Some(ProcessingResponse {
        response: Some(response),
        ..ProcessingResponse::default()
    })
}

/// A request being rewritten: its personal data and secrets redacted, its output cap lowered,
/// its stream's usage asked for.
struct Rewrite {
    provider: Provider,
    api: Api,
    max_tokens: Option<u64>,
    include_usage: bool,
    /// `transform.redact`: the kinds, and what redaction reads of the request.
    redact: Option<Redacting>,
}

/// A request whose body is redacted on its way up.
struct Redacting {
    kinds: Entities,
    /// The answer comes back through this stream: response rules, then the values restored.
    restore: bool,
    /// The request asked for its answer streamed: the answer is asked for streamed (else
    /// buffered) from the request headers on, never by an override at the answer's headers
    /// (Envoy loses a body that has fully arrived before such an override turns streaming on).
    stream: bool,
    /// What response rules read of the request (with `restore`).
    answer: Option<wire::AnswerCheck>,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    config: ContextConfig,
    /// What was replaced, once the body was redacted.
    placeholders: Placeholders,
}

impl Rewrite {
    /// Whether anything is rewritten.
    fn rewrites(&self) -> bool {
        self.max_tokens.is_some() || self.include_usage || self.redact.is_some()
    }

    /// Whether the answer comes back through this stream.
    fn restores(&self) -> bool {
        self.redact.as_ref().is_some_and(|r| r.restore)
    }
}

/// A header to set.
fn set_header(key: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            raw_value: value.into_bytes(),
            ..HeaderValue::default()
        }),
        ..HeaderValueOption::default()
    }
}

/// A processing mode for the rest of a stream (a mode override replaces the whole mode):
/// request and response headers, request and response bodies; trailers skipped.
fn mode(
    request_headers: HeaderSendMode,
    response_headers: HeaderSendMode,
    request_body: BodySendMode,
    response_body: BodySendMode,
) -> ProcessingMode {
    ProcessingMode {
        request_header_mode: request_headers as i32,
        response_header_mode: response_headers as i32,
        request_body_mode: request_body as i32,
        response_body_mode: response_body as i32,
        request_trailer_mode: HeaderSendMode::Skip as i32,
        response_trailer_mode: HeaderSendMode::Skip as i32,
    }
}

/// The reply to a message of a rewritten request: the headers without [`wire::REWRITE_HEADER`]
/// (and, when the body is to be rewritten, a request for it buffered), then the body rewritten.
fn rewrite_reply(
    state: &mut Rewrite,
    message: &processing_request::Request,
) -> Option<ProcessingResponse> {
    use processing_request::Request as In;
    use processing_response::Response as Out;
    match message {
        In::RequestHeaders(h) => {
            let body_follows = state.rewrites() && !h.end_of_stream;
            // A restoring stream reads the answer (and runs its response rules, which the
            // answer stream leaves to it) even for a request without a body.
            let answer_follows = state.restores();
            // A restoring stream also reads the answer: its headers, and its body streamed or
            // buffered as the request asked.
            let (answer_headers, answer_body) = match &state.redact {
                Some(r) if r.restore && r.stream && STREAM_RESTORED => {
                    (HeaderSendMode::Send, BodySendMode::Streamed)
                }
                Some(r) if r.restore => (HeaderSendMode::Send, BodySendMode::Buffered),
                _ => (HeaderSendMode::Skip, BodySendMode::None),
            };
            Some(ProcessingResponse {
                response: Some(Out::RequestHeaders(HeadersResponse {
                    response: Some(CommonResponse {
                        header_mutation: Some(HeaderMutation {
                            remove_headers: vec![wire::REWRITE_HEADER.to_string()],
                            ..HeaderMutation::default()
                        }),
                        ..CommonResponse::default()
                    }),
                })),
                // The whole mode is replaced: the response stays unsent. The request headers
                // stay `SEND` (already sent): in buffered mode only then may the body's answer
                // set its `content-length`.
                mode_override: (body_follows || answer_follows).then(|| {
                    let request_body = if body_follows {
                        BodySendMode::Buffered
                    } else {
                        BodySendMode::None
                    };
                    mode(
                        HeaderSendMode::Send,
                        answer_headers,
                        request_body,
                        answer_body,
                    )
                }),
                ..ProcessingResponse::default()
            })
        }
        In::RequestBody(b) => {
            let mut body: Option<Vec<u8>> = None;
            if let Some(r) = &mut state.redact {
                let input = RequestInput {
                    method: &r.method,
                    path: &r.path,
                    headers: &r.headers,
                    body: &b.body,
                    now_unix: 0,
                };
                match redact::redact(&input, &r.config, r.kinds, r.restore) {
                    Ok(done) => {
                        body = done.body;
                        r.placeholders = done.placeholders;
                    }
                    // The check found it redactable; the body it was given was another.
                    Err(left) => return Some(immediate(left.reply(state.provider))),
                }
            }
            if let Some(n) = state.max_tokens {
                match lower_max_tokens(body.as_deref().unwrap_or(&b.body), state.api, n) {
                    Some(Lowered::Body(lowered)) => body = Some(lowered),
                    Some(Lowered::Within) => {}
                    // Never upstream with a larger cap than was paid for.
                    None => return Some(refuse(state.provider)),
                }
            }
            if state.include_usage {
                if let Some(asked) = add_include_usage(body.as_deref().unwrap_or(&b.body)) {
                    body = Some(asked);
                }
            }
            // In buffered mode the processor sets the new length (Envoy keeps the old one).
            let response = body.map(|body| CommonResponse {
                header_mutation: Some(HeaderMutation {
                    set_headers: vec![set_header("content-length", body.len().to_string())],
                    ..HeaderMutation::default()
                }),
                body_mutation: Some(BodyMutation {
                    mutation: Some(body_mutation::Mutation::Body(body)),
                }),
                ..CommonResponse::default()
            });
            Some(ProcessingResponse {
                response: Some(Out::RequestBody(BodyResponse { response })),
                ..ProcessingResponse::default()
            })
        }
        other => ack(other),
    }
}

/// What the answer stream changes in the answer.
#[derive(Default)]
struct Edit {
    /// Removing the usage chunk the edge asked for.
    stripper: Option<UsageChunkStripper>,
    /// Response rules over the answer, and what they read of the request.
    guard: Option<(AnswerGuard, wire::AnswerCheck)>,
    /// The redacted values put back (after the response rules read the answer).
    restorer: Option<Restorer>,
    /// The body's mode was set with the request headers (a restoring rewrite stream): whether
    /// it comes buffered. `None`: the answer's headers set it.
    buffered: Option<bool>,
}

impl Edit {
    /// Whether there is nothing to change (no body is asked for).
    fn is_idle(&self) -> bool {
        self.stripper.is_none() && self.guard.is_none() && self.restorer.is_none()
    }

    /// Whether the answer is read whole (a JSON answer response rules check or values are
    /// restored in).
    fn reads_whole(&self) -> bool {
        self.buffered.unwrap_or_else(|| {
            self.guard.as_ref().is_some_and(|(g, _)| g.reads_whole())
                || self.restorer.as_ref().is_some_and(Restorer::reads_whole)
        })
    }
}

/// The reply to a message of an answer being changed: for its headers, a request for its body
/// (buffered for an answer response rules read whole, else streamed); for the body, what
/// passes of it. A cut made by this message comes back too, to be recorded.
fn edit_reply(
    edit: &mut Edit,
    message: &processing_request::Request,
) -> (Option<ProcessingResponse>, Option<CutFacts>) {
    use processing_request::Request as In;
    use processing_response::Response as Out;
    match message {
        In::ResponseHeaders(_) => {
            let whole = edit.reads_whole();
            let body_mode = if whole {
                BodySendMode::Buffered
            } else {
                BodySendMode::Streamed
            };
            // A stream's held-back window changes its bytes: the upstream's length no longer
            // holds.
            // Restored values change a JSON answer's length too.
            let changes = (edit.guard.is_some() && !whole) || edit.restorer.is_some();
            let response = changes.then(|| CommonResponse {
                header_mutation: Some(HeaderMutation {
                    remove_headers: vec![String::from("content-length")],
                    ..HeaderMutation::default()
                }),
                ..CommonResponse::default()
            });
            let reply = ProcessingResponse {
                response: Some(Out::ResponseHeaders(HeadersResponse { response })),
                mode_override: (!edit.is_idle() && edit.buffered.is_none()).then(|| {
                    mode(
                        HeaderSendMode::Skip,
                        HeaderSendMode::Send,
                        BodySendMode::None,
                        body_mode,
                    )
                }),
                ..ProcessingResponse::default()
            };
            (Some(reply), None)
        }
        In::ResponseBody(b) => {
            let mut out: Option<Vec<u8>> = None;
            let mut cut = None;
            // A buffered body is the whole answer, also when trailers follow it (then without
            // `end_of_stream`).
            let edit_whole = edit.reads_whole();
            if let Some((g, check)) = &mut edit.guard {
                let was_cut = g.cut().is_some();
                let end = b.end_of_stream || edit_whole;
                match g.push(&b.body, end) {
                    Pass::Reply(reply) => {
                        let cut = cut_facts(g, check);
                        return (Some(immediate(reply)), cut);
                    }
                    Pass::Bytes(bytes) => out = Some(bytes),
                    Pass::Wait => out = Some(Vec::new()),
                }
                if !was_cut {
                    cut = cut_facts(g, check);
                }
            }
            if let Some(r) = &mut edit.restorer {
                let end = b.end_of_stream || edit_whole;
                out = Some(r.push(out.as_deref().unwrap_or(&b.body), end));
            }
            if let Some(stripper) = &mut edit.stripper {
                out = Some(stripper.pass(out.as_deref().unwrap_or(&b.body), b.end_of_stream));
            }
            let response = out.filter(|o| *o != b.body).map(|out| CommonResponse {
                body_mutation: Some(BodyMutation {
                    mutation: Some(body_mutation::Mutation::Body(out)),
                }),
                ..CommonResponse::default()
            });
            let reply = ProcessingResponse {
                response: Some(Out::ResponseBody(BodyResponse { response })),
                ..ProcessingResponse::default()
            };
            (Some(reply), cut)
        }
        other => (ack(other), None),
    }
}

/// The audit facts of the guard's cut, if it cut.
fn cut_facts(g: &AnswerGuard, check: &wire::AnswerCheck) -> Option<CutFacts> {
    let cut = g.cut()?;
    let ctx = &check.ctx;
    Some(CutFacts {
        namespace: ctx.namespace.clone(),
        rule: cut.deny.rule.clone(),
        policy: cut.deny.policy.clone(),
        reason: cut.deny.reason.clone(),
        status: cut.deny.status,
        model: ctx.request.model.clone(),
        request_id: check.request_id.clone(),
        principal: ctx.principal_present().collect(),
        cut: CutRecord {
            stream: cut.stream,
            text_sent: u64::try_from(cut.text_sent).unwrap_or(u64::MAX),
            bytes_sent: u64::try_from(cut.bytes_sent).unwrap_or(u64::MAX),
            text_read: u64::try_from(cut.text_read).unwrap_or(u64::MAX),
            by: "server",
        },
    })
}

/// The answer to a request whose output cap cannot be lowered: 503 in the provider's format.
fn refuse(provider: Provider) -> ProcessingResponse {
    let message = "the request's output cap could not be lowered as the policy requires";
    tracing::error!("{message}");
    immediate(reply::unavailable(provider, message))
}

/// A local reply instead of what was on its way (a request, or an answer not yet sent).
fn immediate(reply: reply::Reply) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(processing_response::Response::ImmediateResponse(
            ImmediateResponse {
                status: Some(HttpStatus {
                    code: i32::from(reply.status),
                }),
                headers: Some(HeaderMutation {
                    set_headers: reply
                        .headers
                        .into_iter()
                        .map(|(k, v)| set_header(&k, v))
                        .collect(),
                    ..HeaderMutation::default()
                }),
                body: reply.body.into_bytes(),
                ..ImmediateResponse::default()
            },
        )),
        ..ProcessingResponse::default()
    }
}

/// Reads one message into `answer`; returns whether the stream has nothing more to say.
/// `engine` gives the serving policy set to an answer response rules check.
fn read(answer: &mut Answer, message: &ProcessingRequest, engine: &Engine) -> bool {
    use processing_request::Request as In;
    // The grant, read once: until a reservation is found, and with the request headers.
    // (A restoring rewrite stream runs the response rules: it reads them with the request's
    // headers.)
    let checks_answer = (matches!(&message.request, Some(In::ResponseHeaders(_)))
        && !message.observability_mode
        && answer.request.is_none())
        || matches!(&message.request, Some(In::RequestHeaders(_)));
    let fresh = match (&message.request, &answer.reservation) {
        (Some(In::RequestHeaders(_)), _) | (_, None) => {
            Some(grant(message.metadata_context.as_ref(), checks_answer))
        }
        _ => None,
    };
    if answer.reservation.is_none() {
        answer.reservation = fresh.as_ref().and_then(|g| g.reservation.clone());
    }
    match &message.request {
        Some(In::RequestHeaders(h)) => {
            let path = header(h.headers.as_ref(), ":path").unwrap_or_default();
            let grant = fresh.unwrap_or_default();
            let restores = grant.restores();
            let stream = grant.stream;
            let redact = grant.redact.map(|r| Redacting {
                kinds: redact::kinds_of(&r),
                restore: r.restore,
                stream,
                answer: grant.answer.filter(|_| restores),
                method: header(h.headers.as_ref(), ":method").unwrap_or_default(),
                path: path.clone(),
                headers: request_headers(h.headers.as_ref()),
                // The rules' context settings, as the check read the request with.
                config: engine
                    .policy_set()
                    .map(|set| set.config().clone())
                    .unwrap_or_default(),
                placeholders: Placeholders::default(),
            });
            let request = Rewrite {
                provider: reply::provider_of(&path, &[]),
                api: rewrite::api_of(&path),
                max_tokens: grant.max_tokens,
                include_usage: grant.include_usage,
                redact,
            };
            // Nothing more to come when nothing is to be rewritten.
            answer.done = !request.rewrites() || (h.end_of_stream && !request.restores());
            answer.request = Some(request);
        }
        Some(In::RequestBody(b)) => {
            let restores = answer.request.as_ref().is_some_and(Rewrite::restores);
            answer.done = b.end_of_stream && !restores;
        }
        Some(In::ResponseHeaders(h))
            if !message.observability_mode
                && answer.request.as_ref().is_some_and(Rewrite::restores) =>
        {
            // The restoring rewrite stream: the response rules the answer stream leaves to it,
            // then the values put back.
            let headers = h.headers.as_ref();
            let ct = header(headers, "content-type").unwrap_or_default();
            let encoding = header(headers, "content-encoding");
            let status = header(headers, ":status")
                .and_then(|s| s.parse().ok())
                .unwrap_or(200);
            let redacting = answer.request.as_mut().and_then(|r| r.redact.as_mut());
            let mut edit = Edit {
                buffered: redacting.as_ref().map(|r| !(r.stream && STREAM_RESTORED)),
                ..Edit::default()
            };
            if let Some(r) = redacting.filter(|_| !h.end_of_stream) {
                let set = engine.policy_set();
                edit.guard = r.answer.take().and_then(|check| {
                    let g = AnswerGuard::new(
                        set.as_ref()?,
                        check.ctx.clone(),
                        status,
                        &ct,
                        encoding.as_deref(),
                    )?;
                    Some((g, check))
                });
                let max = r.config.max_response_bytes;
                edit.restorer = Restorer::new(
                    core::mem::take(&mut r.placeholders),
                    &ct,
                    encoding.as_deref(),
                    max,
                )
                .filter(|_| (200..300).contains(&status));
            }
            // The body comes in the mode the request headers set, changed or not: every chunk is
            // answered.
            answer.done = h.end_of_stream;
            answer.edit = Some(edit);
        }
        Some(In::ResponseHeaders(h)) if !message.observability_mode && answer.request.is_none() => {
            // The stream that changes the answer. The usage chunk the edge asked for is removed
            // from an uncompressed event stream only (anything else passes as it came).
            let headers = h.headers.as_ref();
            let ct = header(headers, "content-type").unwrap_or_default();
            let encoding = header(headers, "content-encoding");
            let plain = encoding
                .as_deref()
                .is_none_or(|e| e.trim().eq_ignore_ascii_case("identity"));
            let grant = fresh.unwrap_or_default();
            let strips = grant.include_usage
                && UsageReader::is_event_stream(&ct)
                && plain
                && !h.end_of_stream;
            let status = header(headers, ":status")
                .and_then(|s| s.parse().ok())
                .unwrap_or(200);
            // A restoring request's rewrite stream runs its response rules.
            let restores = grant.restores();
            let guard = grant
                .answer
                .filter(|_| !h.end_of_stream && !restores)
                .and_then(|check| {
                    let set = engine.policy_set()?;
                    let g = AnswerGuard::new(
                        &set,
                        check.ctx.clone(),
                        status,
                        &ct,
                        encoding.as_deref(),
                    )?;
                    Some((g, check))
                });
            let edit = Edit {
                stripper: strips.then(UsageChunkStripper::default),
                guard,
                restorer: None,
                buffered: None,
            };
            answer.done = edit.is_idle();
            answer.edit = Some(edit);
        }
        Some(In::ResponseHeaders(h)) => {
            let headers = h.headers.as_ref();
            answer.status = Some(
                header(headers, ":status")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(200),
            );
            // Nothing reserved: no body is needed.
            if answer.reservation.is_none() {
                return true;
            }
            let ct = header(headers, "content-type").unwrap_or_default();
            let encoding = header(headers, "content-encoding");
            answer.reader = Some(UsageReader::for_response(&ct, encoding.as_deref()));
            answer.done = h.end_of_stream;
        }
        Some(In::ResponseBody(b)) => {
            if let Some(reader) = &mut answer.reader {
                reader.feed(&b.body);
            }
            answer.done = b.end_of_stream;
        }
        Some(In::ResponseTrailers(_)) => answer.done = true,
        _ => {}
    }
    answer.done
}

#[tonic::async_trait]
impl ExternalProcessor for EnvoyUsage {
    type ProcessStream = tokio_stream::wrappers::ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let engine = Arc::clone(&self.engine);
        tokio::spawn(async move {
            let mut answer = Answer::default();
            // A stream error is the end of the stream: what was read is settled.
            while let Some(Ok(message)) = incoming.next().await {
                let over = read(&mut answer, &message, &engine);
                if !message.observability_mode {
                    let (reply, cut) = match (
                        message.request.as_ref(),
                        &mut answer.request,
                        &mut answer.edit,
                    ) {
                        (None, _, _) => (None, None),
                        // A large body is rewritten or checked off the async workers (a
                        // whole JSON body scanned for personal data takes milliseconds per
                        // MiB).
                        (Some(m @ processing_request::Request::RequestBody(b)), Some(r), _)
                            if b.body.len() > LARGE_BODY =>
                        {
                            (tokio::task::block_in_place(|| rewrite_reply(r, m)), None)
                        }
                        (Some(m), Some(r), _) if !answers(m) => (rewrite_reply(r, m), None),
                        (Some(m @ processing_request::Request::ResponseBody(b)), _, Some(edit))
                            if b.body.len() > LARGE_BODY =>
                        {
                            tokio::task::block_in_place(|| edit_reply(edit, m))
                        }
                        (Some(m), _, Some(edit)) => edit_reply(edit, m),
                        (Some(m), _, None) => (ack(m), None),
                    };
                    if let Some(cut) = cut {
                        engine.record_cut(cut);
                    }
                    if let Some(reply) = reply {
                        if tx.send(Ok(reply)).await.is_err() {
                            break;
                        }
                    }
                }
                if over {
                    break;
                }
            }
            // Closing our side tells Envoy no more messages are needed.
            drop(tx);
            if let Some((handle, usage)) = answer.settle(&engine) {
                if let Err(e) = engine.record_usage(&handle, usage).await {
                    tracing::warn!(error = %e, "cannot record an answer's usage: its reservation settles by the timeout");
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::panic,
        reason = "test code: a failed expectation is a failed test"
    )]

    use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders};

    use super::*;

    fn body_of(reply: &ProcessingResponse) -> Option<Vec<u8>> {
        use processing_response::Response as Out;
        let common = match reply.response.as_ref()? {
            Out::RequestBody(b) | Out::ResponseBody(b) => b.response.as_ref()?,
            _ => return None,
        };
        match common.body_mutation.as_ref()?.mutation.as_ref()? {
            body_mutation::Mutation::Body(b) => Some(b.clone()),
            _ => None,
        }
    }

    #[test]
    fn a_stream_is_asked_for_its_usage_and_the_usage_chunk_removed_across_chunks() {
        use processing_request::Request as In;
        let mut state = Rewrite {
            provider: Provider::Openai,
            api: Api::Chat,
            max_tokens: Some(10),
            include_usage: true,
            redact: None,
        };
        let headers = rewrite_reply(
            &mut state,
            &In::RequestHeaders(HttpHeaders {
                end_of_stream: false,
                ..HttpHeaders::default()
            }),
        )
        .unwrap();
        let mode = headers.mode_override.unwrap();
        assert_eq!(mode.request_body_mode, BodySendMode::Buffered as i32);
        let body = br#"{"model":"gpt-4o","stream":true,"max_tokens":500,"messages":[]}"#;
        let reply = rewrite_reply(&mut state, &request_body(body)).unwrap();
        let sent: serde_json::Value = serde_json::from_slice(&body_of(&reply).unwrap()).unwrap();
        assert_eq!(sent["max_tokens"], 10);
        assert_eq!(sent["stream_options"]["include_usage"], true);
        // The answer (the other filter's stream), its usage chunk split over two body chunks.
        let mut stripper = Edit {
            stripper: Some(UsageChunkStripper::default()),
            guard: None,
            restorer: None,
            buffered: None,
        };
        let headers = edit_reply(&mut stripper, &In::ResponseHeaders(HttpHeaders::default()))
            .0
            .unwrap();
        assert_eq!(
            headers.mode_override.unwrap().response_body_mode,
            BodySendMode::Streamed as i32
        );
        let text = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
                    data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n\
                    data: [DONE]\n\n";
        let split = text.find("completion_tokens").unwrap();
        let mut out = Vec::new();
        for (chunk, end) in [(&text[..split], false), (&text[split..], true)] {
            let reply = edit_reply(&mut stripper, &answer_chunk(chunk.as_bytes(), end))
                .0
                .unwrap();
            out.extend(body_of(&reply).unwrap_or_else(|| chunk.as_bytes().to_vec()));
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\ndata: [DONE]\n\n"
        );
    }

    /// A request's whole body.
    fn request_body(bytes: &[u8]) -> processing_request::Request {
        processing_request::Request::RequestBody(HttpBody {
            body: bytes.to_vec(),
            end_of_stream: true,
            ..HttpBody::default()
        })
    }

    /// A chunk of the answer.
    fn answer_chunk(bytes: &[u8], end: bool) -> processing_request::Request {
        processing_request::Request::ResponseBody(HttpBody {
            body: bytes.to_vec(),
            end_of_stream: end,
            ..HttpBody::default()
        })
    }

    #[test]
    fn a_client_that_asked_for_usage_keeps_its_body_and_its_chunk() {
        use processing_request::Request as In;
        let mut state = Rewrite {
            provider: Provider::Openai,
            api: Api::Chat,
            max_tokens: None,
            include_usage: true,
            redact: None,
        };
        let body = br#"{"stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
        let reply = rewrite_reply(&mut state, &request_body(body)).unwrap();
        assert_eq!(body_of(&reply), None, "the body goes as sent");
        // Nothing to remove (the Check did not ask): the headers' reply asks for no body.
        let mut none = Edit::default();
        let headers = edit_reply(&mut none, &In::ResponseHeaders(HttpHeaders::default()))
            .0
            .unwrap();
        assert_eq!(headers.mode_override, None);
        let usage = b"data: {\"choices\":[],\"usage\":{\"completion_tokens\":2}}\n\n";
        let reply = edit_reply(&mut none, &answer_chunk(usage, true)).0.unwrap();
        assert_eq!(body_of(&reply), None, "the answer goes as sent");
    }

    /// An answer guard of a namespace whose one response rule denies `AKIA` keys.
    fn guarded(ct: &str) -> Edit {
        let yaml = "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  defaultDecision: allow\n  rules:\n    - id: no-keys\n      phase: response\n      when: {match: {field: response.entities, op: contains, value: api_key}}\n      action: {decision: deny, reason: no keys}\n";
        let docs = llm_policy_core::source::parse_str("p.yaml", yaml).unwrap();
        let set = llm_policy_core::PolicySet::compile(&docs, &Default::default())
            .unwrap()
            .set;
        let check = wire::AnswerCheck {
            ctx: llm_policy_core::RequestContext {
                namespace: "default".into(),
                ..Default::default()
            },
            request_id: Some("r-9".into()),
        };
        let g = AnswerGuard::new(&set, check.ctx.clone(), 200, ct, None).unwrap();
        Edit {
            stripper: None,
            guard: Some((g, check)),
            restorer: None,
            buffered: None,
        }
    }

    #[test]
    fn a_restoring_rewrite_stream_redacts_the_body_and_restores_the_answer() {
        use processing_request::Request as In;
        let mut state = Rewrite {
            provider: Provider::Openai,
            api: Api::Chat,
            max_tokens: None,
            include_usage: false,
            redact: Some(Redacting {
                kinds: Entities::all(),
                restore: true,
                stream: false,
                answer: None,
                method: "POST".into(),
                path: "/v1/chat/completions".into(),
                headers: Vec::new(),
                config: ContextConfig::default(),
                placeholders: Placeholders::default(),
            }),
        };
        let headers = rewrite_reply(
            &mut state,
            &In::RequestHeaders(HttpHeaders {
                end_of_stream: false,
                ..HttpHeaders::default()
            }),
        )
        .unwrap();
        let mode = headers.mode_override.unwrap();
        assert_eq!(mode.request_body_mode, BodySendMode::Buffered as i32);
        assert_eq!(mode.response_header_mode, HeaderSendMode::Send as i32);
        let body =
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"mail ann@example.com"}]}"#;
        let reply = rewrite_reply(&mut state, &request_body(body)).unwrap();
        let sent: serde_json::Value = serde_json::from_slice(&body_of(&reply).unwrap()).unwrap();
        assert_eq!(sent["messages"][0]["content"], "mail <EMAIL_1>");
        // A value the scanners see only spelled out: refused, never forwarded.
        let disguised = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"ann [at] example [dot] com"}]}"#;
        let mut other = Rewrite {
            redact: state.redact.as_ref().map(|r| Redacting {
                kinds: r.kinds,
                restore: false,
                stream: false,
                answer: None,
                method: r.method.clone(),
                path: r.path.clone(),
                headers: Vec::new(),
                config: ContextConfig::default(),
                placeholders: Placeholders::default(),
            }),
            ..state_like(&state)
        };
        let reply = rewrite_reply(&mut other, &request_body(disguised)).unwrap();
        match reply.response {
            Some(processing_response::Response::ImmediateResponse(r)) => {
                assert_eq!(r.status.unwrap().code, 403);
                assert!(!String::from_utf8_lossy(&r.body).contains("example"));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // The answer: restored in a JSON answer read whole.
        let placeholders = state.redact.as_mut().unwrap().placeholders.clone();
        let mut edit = Edit {
            restorer: Restorer::new(placeholders, "application/json", None, 1 << 20),
            ..Edit::default()
        };
        let headers = edit_reply(&mut edit, &In::ResponseHeaders(HttpHeaders::default()))
            .0
            .unwrap();
        assert_eq!(
            headers.mode_override.unwrap().response_body_mode,
            BodySendMode::Buffered as i32
        );
        let answer = br#"{"choices":[{"message":{"content":"Sent to <EMAIL_1>."}}]}"#;
        let reply = edit_reply(&mut edit, &answer_chunk(answer, true))
            .0
            .unwrap();
        let got: serde_json::Value = serde_json::from_slice(&body_of(&reply).unwrap()).unwrap();
        assert_eq!(
            got["choices"][0]["message"]["content"],
            "Sent to ann@example.com."
        );
    }

    fn state_like(s: &Rewrite) -> Rewrite {
        Rewrite {
            provider: s.provider,
            api: s.api,
            max_tokens: None,
            include_usage: false,
            redact: None,
        }
    }

    #[test]
    fn response_rules_answer_a_json_answer_whole_and_cut_a_stream() {
        use processing_request::Request as In;
        use processing_response::Response as Out;
        // JSON: asked for buffered; a deny is an immediate response in the provider's format.
        let mut edit = guarded("application/json");
        let (headers, _) = edit_reply(&mut edit, &In::ResponseHeaders(HttpHeaders::default()));
        assert_eq!(
            headers.unwrap().mode_override.unwrap().response_body_mode,
            BodySendMode::Buffered as i32
        );
        let answer = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"AKIAIOSFODNN7EXAMPLE"}}]}"#;
        let (reply, cut) = edit_reply(&mut edit, &answer_chunk(answer, true));
        let Some(Out::ImmediateResponse(r)) = reply.unwrap().response else {
            panic!("an immediate response");
        };
        assert_eq!(r.status.unwrap().code, 403);
        assert!(String::from_utf8(r.body)
            .unwrap()
            .contains("response_denied"));
        let cut = cut.unwrap();
        assert_eq!(
            (cut.rule.as_str(), cut.request_id.as_deref(), cut.cut.by),
            ("no-keys", Some("r-9"), "server")
        );
        // A stream: streamed, chunks held back, the key never passes.
        let mut edit = guarded("text/event-stream");
        let (headers, _) = edit_reply(&mut edit, &In::ResponseHeaders(HttpHeaders::default()));
        assert_eq!(
            headers.unwrap().mode_override.unwrap().response_body_mode,
            BodySendMode::Streamed as i32
        );
        let mut sent = Vec::new();
        let mut cuts = 0;
        for piece in ["hello ", "there, AKIAIOSF", "ODNN7EXAMPLE", " bye"] {
            let event = format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{piece}\"}}}}]}}\n\n"
            );
            let (reply, cut) = edit_reply(&mut edit, &answer_chunk(event.as_bytes(), false));
            cuts += usize::from(cut.is_some());
            sent.extend(body_of(&reply.unwrap()).unwrap_or_else(|| event.into_bytes()));
        }
        let sent = String::from_utf8(sent).unwrap();
        assert_eq!(cuts, 1, "the cut is recorded once");
        assert!(!sent.contains("AKIA"), "{sent}");
        assert!(sent.contains("response_denied"), "{sent}");
    }
}
