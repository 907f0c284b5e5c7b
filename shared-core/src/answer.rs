//! Response rules: the model's answer checked as it passes, the same way in the filter and on
//! the server's ext_proc edge.
//!
//! A `phase: response` rule reads `response.*` (and the request's small fields, kept with
//! [`RequestContext::for_answer`]). [`PolicySet::check_answer`] evaluates a namespace's response
//! rules once; [`AnswerGuard`] runs them over an answer:
//!
//! - **a JSON answer** is checked whole (up to `maxResponseBytes`) before any of it is sent;
//!   a deny replaces it with an error in the provider's format ([`Pass::Reply`]);
//! - **a stream** (OpenAI and Anthropic server-sent events) is checked as its events come, over
//!   a sliding window: the text of the new events plus the last `responseHoldBackBytes` bytes
//!   checked before them. Events pass whole and in order, but the last `responseHoldBackBytes`
//!   bytes of text are held back until what follows them was checked, so a match of up to that
//!   many bytes is caught before any of it is sent, whatever chunks it is split into. A deny
//!   drops what is held, ends the stream with an error event in the provider's format (the
//!   official SDKs raise it) and drops everything after it; [`AnswerGuard::cut`] says where.
//!
//! Reading the answer's usage is not this module's job: the hosts read it from the bytes the
//! upstream sent ([`crate::usage`]), so what was generated up to a cut is still charged.

mod read;

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;

pub use read::Said;

use crate::context::{RequestContext, View, ENTITY_CONFIDENCE};
use crate::decision::Verdict;
use crate::model::{Alert, OnError};
use crate::reply::{self, Reply};
use crate::set::PolicySet;
use crate::truth::Scratch;
use crate::usage::event_end;

/// A `phase: response` rule that denied the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerDeny {
    /// The rule.
    pub rule: String,
    /// Its policy.
    pub policy: String,
    /// The rule's reason (or which rule matched).
    pub reason: String,
    /// The status of the error reply (a JSON answer): the rule's, else 403.
    pub status: u16,
    /// The rule's headers, for the error reply.
    pub headers: Vec<(String, String)>,
    /// The rule asked for an audit record.
    pub audit: bool,
    /// The rule's alert.
    pub alert: Option<Alert>,
}

/// What the response rules said of an answer (or of one window of a stream).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnswerVerdict {
    /// The deciding deny, if the answer is denied.
    pub deny: Option<AnswerDeny>,
    /// Shadow rules that matched.
    pub shadow: Vec<String>,
    /// Rules whose condition failed (rule, message); those with `onError: deny` deny.
    pub errors: Vec<(String, String)>,
}

impl PolicySet {
    /// Whether `namespace` has response rules, so its answers are to be checked.
    pub fn checks_answers(&self, namespace: &str) -> bool {
        self.0
            .namespaces
            .get(namespace)
            .is_some_and(|ns| !ns.answer_rules.is_empty())
    }

    /// What the response rules of `ctx`'s namespace read of it, kept for its answer
    /// ([`RequestContext::for_answer`]).
    pub fn answer_context(&self, ctx: &RequestContext) -> RequestContext {
        let reads = self
            .0
            .namespaces
            .get(ctx.namespace.as_str())
            .map_or(&[][..], |ns| ns.answer_reads.fields.as_slice());
        ctx.for_answer(reads)
    }

    /// Whether the response rules of `namespace` read `response.entities`.
    pub fn answer_reads_entities(&self, namespace: &str) -> bool {
        self.0
            .namespaces
            .get(namespace)
            .is_some_and(|ns| ns.answer_reads.entities)
    }

    /// Evaluates the response rules of `ctx`'s namespace over `ctx.response`: the highest
    /// priority enforcing match decides, a deny winning a tie; a condition that fails counts as
    /// a deny match unless the rule says `onError: skip`.
    pub fn check_answer(&self, ctx: &RequestContext) -> AnswerVerdict {
        let mut verdict = AnswerVerdict::default();
        let Some(ns) = self.0.namespaces.get(ctx.namespace.as_str()) else {
            return verdict;
        };
        let view = View {
            ctx,
            req: &ctx.request,
        };
        let mut scratch = Scratch {
            #[cfg(feature = "cel")]
            cel_reads: &ns.answer_reads.cel,
            ..Scratch::default()
        };
        let mut decided: Option<&crate::set::CompiledRule> = None;
        for rule in &ns.answer_rules {
            if decided.is_some_and(|d| d.priority > rule.priority) && !rule.shadow {
                continue;
            }
            let matched = match rule.cond.eval(view, &mut scratch) {
                Ok(m) => m,
                Err(e) => {
                    verdict
                        .errors
                        .push((rule.id.clone(), crate::truth::clip(e.0)));
                    rule.on_error == OnError::Deny
                }
            };
            if !matched {
                continue;
            }
            if rule.shadow {
                verdict.shadow.push(rule.id.clone());
                continue;
            }
            let stronger = match decided {
                None => true,
                Some(d) => {
                    d.priority == rule.priority
                        && d.action.decision != Verdict::Deny
                        && rule.action.decision == Verdict::Deny
                }
            };
            if stronger {
                decided = Some(rule);
            }
        }
        verdict.deny = decided
            .filter(|r| r.action.decision == Verdict::Deny)
            .map(|r| AnswerDeny {
                rule: r.id.clone(),
                policy: r.origin.policy.clone(),
                reason: if r.action.reason.is_empty() {
                    alloc::format!("the answer matched rule `{}`", r.id)
                } else {
                    r.action.reason.clone()
                },
                status: r.action.status.unwrap_or(403),
                headers: r
                    .action
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                audit: r.action.audit,
                alert: r.action.alert,
            });
        verdict
    }
}

/// What response rules read of an answer given as text (tests, `llm-policy test`): its
/// entities found by the scanners, its tools folded.
pub fn response_of(
    text: &str,
    tool_calls: &[String],
    finish_reason: Option<&str>,
    output_tokens: Option<i64>,
) -> crate::context::ResponseInfo {
    crate::context::ResponseInfo {
        text: String::from(text),
        entities: crate::detect::entity_names(text, ENTITY_CONFIDENCE),
        tool_calls: tool_calls.iter().map(|t| crate::fold::fold(t)).collect(),
        finish_reason: finish_reason.map(String::from),
        output_tokens,
    }
}

/// What to do with a chunk of the answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Pass {
    /// Send these bytes in its place (possibly none: they are held back).
    Bytes(Vec<u8>),
    /// A JSON answer being read whole: nothing is sent yet.
    Wait,
    /// Send this reply instead of the whole answer (a JSON answer denied): its status, its
    /// headers (replacing `content-type`, without `content-length` and `content-encoding`) and
    /// its body.
    Reply(Reply),
}

/// Where and why an answer was cut.
#[derive(Debug, Clone, PartialEq)]
pub struct Cut {
    /// The deny.
    pub deny: AnswerDeny,
    /// The answer was a stream.
    pub stream: bool,
    /// Bytes of text the client had received before the cut.
    pub text_sent: usize,
    /// Bytes of the answer the client had received before the cut.
    pub bytes_sent: usize,
    /// Bytes of text read from the upstream when the rule denied.
    pub text_read: usize,
}

/// One channel of a stream's text (a choice, a content block, an output item, a tool call's
/// arguments): each is its own text, however the provider interleaves them.
#[derive(Debug, Default)]
struct Channel {
    id: u32,
    /// Bytes of its text in held-back events.
    held: usize,
    /// The last `hold` bytes of its text checked.
    tail: String,
    /// Its text not yet checked.
    new: String,
    /// Its text is over (checked whole): what is held of it may go.
    closed: bool,
}

/// A whole event held back: its bytes, and its text's length on each channel it carries text
/// on.
type Held = (Vec<u8>, Vec<(u32, usize)>);

/// Channels a stream keeps apart at most (a provider sends a few; OpenAI caps `n` at 128); a
/// stream with more is refused, never read as one text.
const MAX_CHANNELS: usize = 1024;

/// How the answer is read.
#[derive(Debug)]
enum Form {
    /// A JSON answer, read whole.
    Json,
    /// A server-sent-event stream.
    Sse,
    /// An answer that cannot be read (compressed): refused whole.
    Unreadable,
}

/// Response rules run over one answer as it passes (see the module docs).
#[derive(Debug)]
pub struct AnswerGuard {
    set: PolicySet,
    ctx: RequestContext,
    entities: bool,
    hold: usize,
    max: usize,
    form: Form,
    /// Unfinished event (stream) or the body so far (JSON).
    buf: Vec<u8>,
    /// Whole events held back.
    held: VecDeque<Held>,
    /// Per channel: the text held back, and the last `hold` bytes of text checked.
    channels: Vec<Channel>,
    /// Bytes of the events held back.
    held_bytes: usize,
    /// Where the search for the end of the unfinished event resumes.
    scanned: usize,
    /// Text came on more channels than are kept apart.
    overflow: bool,
    text_read: usize,
    text_sent: usize,
    bytes_sent: usize,
    cut: Option<Cut>,
    shadow: Vec<String>,
}

impl AnswerGuard {
    /// A guard for the answer to `ctx` (as [`RequestContext::for_answer`] keeps it), when its
    /// namespace has response rules and the answer is one to check: a 2xx JSON answer or event
    /// stream (an error of the provider, or another content type, passes as it is).
    pub fn new(
        set: &PolicySet,
        ctx: RequestContext,
        status: u16,
        content_type: &str,
        content_encoding: Option<&str>,
    ) -> Option<AnswerGuard> {
        if !set.checks_answers(&ctx.namespace) || !(200..300).contains(&status) {
            return None;
        }
        let ct = content_type.trim_start();
        let starts = |p: &str| ct.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p));
        let compressed = content_encoding
            .map(str::trim)
            .is_some_and(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"));
        let form = if compressed {
            Form::Unreadable
        } else if starts("text/event-stream") {
            Form::Sse
        } else if starts("application/json") || ct.is_empty() {
            Form::Json
        } else {
            return None;
        };
        let config = set.config();
        Some(AnswerGuard {
            entities: set.answer_reads_entities(&ctx.namespace),
            set: set.clone(),
            ctx,
            hold: config.response_hold_back_bytes,
            max: config.max_response_bytes,
            form,
            buf: Vec::new(),
            held: VecDeque::new(),
            channels: Vec::new(),
            held_bytes: 0,
            scanned: 0,
            overflow: false,
            text_read: 0,
            text_sent: 0,
            bytes_sent: 0,
            cut: None,
            shadow: Vec::new(),
        })
    }

    /// Whether the whole answer is read before any of it is sent (a JSON answer, or one that
    /// cannot be read): the host holds the response headers back until [`AnswerGuard::push`]
    /// says what to send.
    pub fn reads_whole(&self) -> bool {
        !matches!(self.form, Form::Sse)
    }

    /// Where and why the answer was cut, once it was.
    pub fn cut(&self) -> Option<&Cut> {
        self.cut.as_ref()
    }

    /// The shadow rules that matched so far.
    pub fn shadow(&self) -> &[String] {
        &self.shadow
    }

    /// The next chunk of the answer (`end`: the answer ends with it): what to send for it.
    pub fn push(&mut self, chunk: &[u8], end: bool) -> Pass {
        if self.cut.is_some() {
            return Pass::Bytes(Vec::new());
        }
        match self.form {
            Form::Sse => Pass::Bytes(self.push_event_bytes(chunk, end)),
            Form::Json | Form::Unreadable => self.push_whole(chunk, end),
        }
    }

    fn push_whole(&mut self, chunk: &[u8], end: bool) -> Pass {
        if matches!(self.form, Form::Unreadable) {
            return self.refuse("the answer is compressed and cannot be checked");
        }
        self.buf.extend_from_slice(chunk);
        if self.buf.len() > self.max {
            return self.refuse("the answer is too large to be checked");
        }
        if !end {
            return Pass::Wait;
        }
        let said = match serde_json::from_slice::<serde_json::Value>(&self.buf) {
            Ok(v) => read::answer(&v),
            // Not JSON after all: all of it is text.
            Err(_) => Said::raw(&self.buf),
        };
        if said.error {
            return Pass::Bytes(core::mem::take(&mut self.buf));
        }
        self.text_read = said.text.len();
        self.note(&said);
        match self.check(said.text) {
            Some(deny) => Pass::Reply(self.deny_whole(deny)),
            None => Pass::Bytes(core::mem::take(&mut self.buf)),
        }
    }

    /// A JSON answer denied: the reply that replaces it.
    fn deny_whole(&mut self, deny: AnswerDeny) -> Reply {
        let provider = self.ctx.request.provider;
        let mut headers = deny.headers.clone();
        headers.push((String::from(reply::DECISION_HEADER), String::from("deny")));
        // The answer was generated and paid for: an SDK retrying a 429 or 5xx would have it
        // generated (and paid for) again.
        headers.push((String::from("x-should-retry"), String::from("false")));
        headers.push((
            String::from("content-type"),
            String::from("application/json"),
        ));
        let body = reply::error_body(provider, deny.status, "response_denied", &deny.reason);
        let status = deny.status;
        self.cut = Some(Cut {
            deny,
            stream: false,
            text_sent: 0,
            bytes_sent: 0,
            text_read: self.text_read,
        });
        self.buf = Vec::new();
        Reply {
            status,
            headers,
            body,
        }
    }

    /// An answer that cannot be checked: refused, never passed unchecked (502: the upstream's
    /// answer is what failed).
    fn refuse(&mut self, why: &str) -> Pass {
        let deny = AnswerDeny {
            rule: String::new(),
            policy: String::new(),
            reason: String::from(why),
            status: 502,
            headers: Vec::new(),
            audit: true,
            alert: None,
        };
        match self.form {
            Form::Sse => Pass::Bytes(self.end_stream(deny)),
            Form::Json | Form::Unreadable => Pass::Reply(self.deny_whole(deny)),
        }
    }

    fn push_event_bytes(&mut self, chunk: &[u8], end: bool) -> Vec<u8> {
        self.buf.extend_from_slice(chunk);
        let mut said_more = false;
        let mut start = 0usize;
        // The unfinished event was searched up to `scanned` already (less the 3 bytes a
        // delimiter split by the chunk could start with): a large event costs linear time.
        let mut from = self.scanned.saturating_sub(3);
        while let Some((_, next)) = event_end(self.buf.get(from..).unwrap_or_default()) {
            let to = from.saturating_add(next);
            let event = self.buf.get(start..to).unwrap_or_default().to_vec();
            said_more |= self.take_event(event);
            start = to;
            from = to;
        }
        self.buf.drain(..start.min(self.buf.len()));
        self.scanned = self.buf.len();
        if self.buf.len() > self.max {
            return self.refused_stream("an event of the answer is too large to be checked");
        }
        if end && !self.buf.is_empty() {
            let last = core::mem::take(&mut self.buf);
            said_more |= self.take_event(last);
        }
        if self.overflow {
            return self.refused_stream("the answer interleaves too many texts to be checked");
        }
        if self.held_bytes > self.max {
            return self.refused_stream("the answer holds back too much to be checked");
        }
        let fresh = self.channels.iter().any(|c| !c.new.is_empty());
        if fresh || said_more || end {
            // Each channel's window: what it had checked last, then its new text.
            let mut window = String::new();
            for c in &mut self.channels {
                if c.new.is_empty() {
                    continue;
                }
                if !window.is_empty() {
                    window.push('\n');
                }
                let mut text = core::mem::take(&mut c.tail);
                text.push_str(&c.new);
                c.new.clear();
                window.push_str(&text);
                c.tail = last_bytes(&text, self.hold);
            }
            if let Some(deny) = self.check(window) {
                return self.end_stream(deny);
            }
        }
        // An event goes once every channel it carries text on has `hold` bytes checked after
        // it (events without text go as soon as those before them went).
        let mut out = Vec::new();
        while let Some((_, texts)) = self.held.front() {
            let ready = end
                || texts.iter().all(|(id, len)| {
                    self.channels
                        .iter()
                        .find(|c| c.id == *id)
                        .is_none_or(|c| c.closed || c.held.saturating_sub(*len) >= self.hold)
                });
            if !ready {
                break;
            }
            let Some((bytes, texts)) = self.held.pop_front() else {
                break;
            };
            for (id, len) in texts {
                if let Some(c) = self.channels.iter_mut().find(|c| c.id == id) {
                    c.held = c.held.saturating_sub(len);
                }
                self.text_sent = self.text_sent.saturating_add(len);
            }
            self.bytes_sent = self.bytes_sent.saturating_add(bytes.len());
            self.held_bytes = self.held_bytes.saturating_sub(bytes.len());
            out.extend_from_slice(&bytes);
        }
        out
    }

    fn refused_stream(&mut self, why: &str) -> Vec<u8> {
        match self.refuse(why) {
            Pass::Bytes(b) => b,
            _ => Vec::new(),
        }
    }

    /// Reads one whole event into the held queue; its text joins its channels' new text.
    /// Returns whether it said something besides text (a tool called, the end, the usage).
    fn take_event(&mut self, event: Vec<u8>) -> bool {
        let mut said = event_said(&event);
        // Text an event repeats is read for a channel that has had none (a stream resumed
        // after its deltas); for the others it was read as it streamed.
        for (id, text) in core::mem::take(&mut said.repeats) {
            if !self.channels.iter().any(|c| c.id == id) {
                said.pieces.push((id, text));
            }
        }
        let mut texts: Vec<(u32, usize)> = Vec::with_capacity(said.pieces.len());
        for (id, text) in &said.pieces {
            let Some(at) = self.channel_at(*id).filter(|_| *id != read::TOO_MANY) else {
                self.overflow = true;
                continue;
            };
            if let Some(c) = self.channels.get_mut(at) {
                c.held = c.held.saturating_add(text.len());
                c.new.push_str(text);
                c.closed = false;
            }
            match texts.iter_mut().find(|(c, _)| c == id) {
                Some((_, n)) => *n = n.saturating_add(text.len()),
                None => texts.push((*id, text.len())),
            }
            self.text_read = self.text_read.saturating_add(text.len());
        }
        self.held_bytes = self.held_bytes.saturating_add(event.len());
        self.held.push_back((event, texts));
        for (from, to) in &said.ends {
            for c in self
                .channels
                .iter_mut()
                .filter(|c| (*from..*to).contains(&c.id))
            {
                c.closed = true;
            }
        }
        let more = !said.tools.is_empty() || said.finish.is_some() || said.output_tokens.is_some();
        self.note(&said);
        more
    }

    /// Where channel `id` is in `channels` (added); `None` past [`MAX_CHANNELS`].
    fn channel_at(&mut self, id: u32) -> Option<usize> {
        if let Some(at) = self.channels.iter().position(|c| c.id == id) {
            return Some(at);
        }
        if self.channels.len() >= MAX_CHANNELS {
            return None;
        }
        self.channels.push(Channel {
            id,
            ..Channel::default()
        });
        Some(self.channels.len().saturating_sub(1))
    }

    /// Keeps what an answer said besides its text.
    fn note(&mut self, said: &Said) {
        let r = &mut self.ctx.response;
        r.tool_calls.extend(said.tools.iter().cloned());
        if said.finish.is_some() {
            r.finish_reason.clone_from(&said.finish);
        }
        if said.output_tokens.is_some() {
            r.output_tokens = said.output_tokens;
        }
    }

    /// Runs the rules over `text` (the whole answer, or a stream's windows).
    fn check(&mut self, text: String) -> Option<AnswerDeny> {
        self.ctx.response.entities = if self.entities {
            crate::detect::entity_names(&text, ENTITY_CONFIDENCE)
        } else {
            Vec::new()
        };
        self.ctx.response.text = text;
        let verdict = self.set.check_answer(&self.ctx);
        for s in verdict.shadow {
            if !self.shadow.contains(&s) {
                self.shadow.push(s);
            }
        }
        self.ctx.response.text = String::new();
        verdict.deny
    }

    /// A stream denied: what is held is dropped; the error event ends it.
    fn end_stream(&mut self, deny: AnswerDeny) -> Vec<u8> {
        let provider = self.ctx.request.provider;
        let api = self.ctx.request.api;
        let event =
            reply::stream_error(provider, api, deny.status, "response_denied", &deny.reason);
        self.cut = Some(Cut {
            deny,
            stream: true,
            text_sent: self.text_sent,
            bytes_sent: self.bytes_sent,
            text_read: self.text_read,
        });
        self.held.clear();
        self.buf = Vec::new();
        event
    }
}

/// What one SSE event says: its `data:` lines joined, read as JSON (not JSON: all of it is
/// text; `[DONE]`: nothing).
fn event_said(event: &[u8]) -> Said {
    let mut data: Vec<u8> = Vec::new();
    let mut lines = 0usize;
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(d) = line.strip_prefix(b"data:") {
            if lines > 0 {
                data.push(b'\n');
            }
            data.extend_from_slice(d.strip_prefix(b" ").unwrap_or(d));
            lines = lines.saturating_add(1);
        }
    }
    let trimmed = data.trim_ascii();
    if trimmed.is_empty() || trimmed == b"[DONE]" {
        return Said::default();
    }
    match serde_json::from_slice::<serde_json::Value>(trimmed) {
        Ok(v) => read::event(&v),
        Err(_) => Said::raw(trimmed),
    }
}

/// The last `n` bytes of `s` (fewer, to start on a character).
fn last_bytes(s: &str, n: usize) -> String {
    let mut from = s.len().saturating_sub(n);
    while !s.is_char_boundary(from) {
        from = from.saturating_add(1);
    }
    String::from(s.get(from..).unwrap_or_default())
}
