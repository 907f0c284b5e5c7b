//! One request through the filter: pick LLM API calls, buffer their bodies, decide, then let the
//! request go (with the decision's headers) or answer it locally in the provider's format.
//!
//! Requests that need the policy server (global limits, budgets, plugin rules — exactly what the
//! core's pending state names) are sent to it as an ext_authz `Check` and paused until it
//! answers; the server's answer is applied as Envoy's ext_authz filter would apply it.

use std::rc::Rc;

use llm_policy_core::context::{Api, Provider};
use llm_policy_core::decision::{CounterKind, Verdict};
use llm_policy_core::gen_ai::GenAiUsage;
use llm_policy_core::identity::IdentityMode;
use llm_policy_core::model::Scope;
use llm_policy_core::model_table::{charge_for, ModelTable};
use llm_policy_core::reply::{self, Reply, DECISION_HEADER};
use llm_policy_core::rewrite::{add_include_usage, lower_max_tokens, usage_needs_asking, Lowered};
use llm_policy_core::usage::{Reading, UsageChunkStripper, UsageReader};
use llm_policy_core::wire::{self, LocalCounted, RESERVATION_HEADER};
use llm_policy_core::{Answer, ContextError, CounterCheck, NeedKind, PluginCheck, Step};
use llm_policy_core::{Decision, DecisionKey, EvalOptions, RequestContext, RequestInput, Timing};

use llm_policy_core::answer::{AnswerGuard, Pass};
use llm_policy_core::decision::Redaction;
use llm_policy_core::redact::{self, Placeholders, Restorer};

use crate::answer::{self, Kept};
use crate::config::FailureMode;
use crate::counters::{Count, Reservation};
use crate::ext_authz::{self, ServerAnswer};
use crate::host::{Host, Level, Metric};
use crate::outbox::{Outbox, UsageReport};
use crate::vm::Vm;

/// What the proxy does with the request after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on to the next filter (or upstream).
    Continue,
    /// Hold the request (buffering its body, waiting for the server, or answered locally).
    Pause,
}

#[derive(Debug)]
enum State {
    /// Headers not seen yet.
    New,
    /// Not an LLM API call, or already decided and let through.
    Passing,
    /// Buffering the body of an LLM API call.
    Buffering {
        provider: Provider,
        body_len: usize,
        /// The request headers, read once.
        headers: Vec<(String, String)>,
    },
    /// Waiting for the policy server's answer to the call with this token.
    Asking {
        token: u32,
        provider: Provider,
        /// The decision without the server's rules, for `failureMode: open`.
        provisional: Box<Decision>,
    },
    /// Answered locally (or by the server's denial).
    Answered,
}

/// How a request's check ends: applied to the request and counted in one place
/// ([`RequestFlow::finish`]), whoever decided (the bundle, the cache, the server, the failure
/// mode).
#[derive(Debug)]
enum Outcome {
    /// The request goes upstream with these headers set (in order: a later one wins) and these
    /// removed.
    Allow {
        set: Vec<(String, String)>,
        remove: Vec<String>,
        /// Lower the body's output cap to this (`transform.maxTokens`).
        max_tokens: Option<u64>,
    },
    /// The request goes upstream undecided (no bundle yet, failure mode open), with these headers
    /// set: not counted as a decision, nothing reserved.
    Pass { set: Vec<(String, String)> },
    /// The request is answered here.
    Reply(Reply, Ending),
    /// The request waits for the policy server's answer (the state says which call).
    Asking,
}

/// Why a request was answered here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Denied,
    Throttled,
    TooLarge,
    InvalidBody,
    /// The virtual API key was refused (401).
    Unauthenticated,
    /// No bundle yet, or the server could not answer (failure mode closed).
    Unavailable,
}

impl Ending {
    /// The stats a request answered this way counts.
    fn metrics(self) -> &'static [Metric] {
        match self {
            Ending::Denied => &[Metric::Denied],
            Ending::Throttled => &[Metric::Throttled],
            Ending::TooLarge => &[Metric::Rejected, Metric::BodyTooLarge],
            Ending::InvalidBody => &[Metric::Rejected, Metric::InvalidBody],
            Ending::Unauthenticated => &[Metric::Rejected, Metric::Unauthenticated],
            // The cause is counted where it happened (fallback failures, sync failures).
            Ending::Unavailable => &[],
        }
    }

    fn of_status(status: u16) -> Ending {
        if status == 429 {
            Ending::Throttled
        } else {
            Ending::Denied
        }
    }
}

/// The filter's state for one request.
#[derive(Debug)]
pub struct RequestFlow {
    vm: Rc<Vm>,
    outbox: Rc<Outbox>,
    state: State,
    /// Local counters charged for this request.
    held: Vec<Reservation>,
    /// The request went upstream with an allow decision.
    allowed: bool,
    /// The server's reservation handle for token and cost budgets.
    handle: Option<String>,
    /// When the server's answer with the handle came (the GenAI request duration runs from
    /// it; the clock is read for those requests only).
    checked_at: Option<std::time::Duration>,
    /// Reading the response's usage (for a request that reserved tokens).
    usage: Option<UsageReader>,
    /// What the request reserved and how its usage is priced (requests some rule counts
    /// tokens or cost for).
    spend: Option<Spend>,
    /// Removing the usage chunk the filter asked for on the client's behalf.
    stripper: Option<UsageChunkStripper>,
    /// The request's provider and API, and its body's length as it goes upstream (after any
    /// rewrite).
    provider: Provider,
    api: Api,
    body_len: usize,
    /// The output cap the body was lowered to (told to the client in a response header).
    lowered: Option<u64>,
    /// The local counters charged that tell the client what is left (`remainingHeaders`).
    remaining: Vec<(CounterKind, reply::LimitState)>,
    /// Headers for the answer (the server's `response_headers_to_add`, what is left).
    respond: Vec<(String, String)>,
    /// What response rules read of the request, kept for its answer (namespaces with response
    /// rules).
    kept: Option<Kept>,
    /// The answer being checked by response rules, and what was kept for it.
    guard: Option<(AnswerGuard, Kept)>,
    /// The buffered length of a JSON answer held whole.
    whole_len: usize,
    /// The request as the server is asked about it (method, path, the headers rules read): what
    /// redaction reads when the server's answer says to redact.
    head: Option<Head>,
    /// The redacted values, for an answer that gets them back (`restore: true`).
    placeholders: Option<Placeholders>,
    /// The answer's placeholders being put back.
    restorer: Option<Restorer>,
    /// What was redacted ([`wire::REDACTED_HEADER`]), told to the client.
    redacted: Option<String>,
}

/// A request's method, path and the headers rules read.
type Head = (String, String, Vec<(String, String)>);

/// What a request that counts tokens or cost reserved, to settle its usage with.
#[derive(Debug, Clone)]
struct Spend {
    models: std::sync::Arc<ModelTable>,
    model: Option<String>,
    /// The prompt estimate.
    prompt: u64,
    /// The output reserved (`max_tokens`, else the model's default cap, for each choice).
    output: u64,
    /// The answers asked for (`n`, `best_of`).
    choices: u64,
}

impl Spend {
    /// What to charge for what the answer said ([`charge_for`]).
    fn charge(&self, reading: &Reading) -> (Option<f64>, Option<f64>) {
        charge_for(
            &self.models,
            self.model.as_deref(),
            self.prompt,
            self.output,
            reading,
        )
    }
}

impl RequestFlow {
    /// A request checked against `vm`'s bundle; its usage report, if any, goes to `outbox`.
    pub fn new(vm: Rc<Vm>, outbox: Rc<Outbox>) -> RequestFlow {
        RequestFlow {
            vm,
            outbox,
            state: State::New,
            held: Vec::new(),
            allowed: false,
            handle: None,
            checked_at: None,
            usage: None,
            spend: None,
            stripper: None,
            provider: Provider::Unknown,
            api: Api::Other,
            body_len: 0,
            lowered: None,
            remaining: Vec::new(),
            respond: Vec::new(),
            kept: None,
            guard: None,
            whole_len: 0,
            head: None,
            placeholders: None,
            restorer: None,
            redacted: None,
        }
    }

    /// Redacts the body as it goes upstream (`transform.redact`): the values of `r`'s kinds
    /// replaced by placeholders, kept for the answer when it restores them. A value that cannot
    /// be replaced refuses the request.
    fn redact(
        &mut self,
        host: &mut dyn Host,
        head: (&str, &str, &[(String, String)]),
        r: &Redaction,
    ) -> Result<(), redact::Unredactable> {
        let body = host.request_body(self.body_len).unwrap_or_default();
        let input = RequestInput {
            method: head.0,
            path: head.1,
            headers: head.2,
            body: &body,
            now_unix: 0,
        };
        let config = &self.vm.config.context;
        let done = redact::redact(&input, config, redact::kinds_of(r), r.restore)?;
        if let Some(new) = &done.body {
            host.set_request_body(self.body_len, new);
            host.set_request_header("content-length", Some(&new.len().to_string()));
            self.body_len = new.len();
        }
        self.redacted = wire::redacted_header(&done.counts);
        if r.restore && !done.placeholders.is_empty() {
            self.placeholders = Some(done.placeholders);
        }
        Ok(())
    }

    /// Whether the answer is read whole: a JSON answer response rules check, or values are
    /// restored in.
    fn reads_whole(&self) -> bool {
        self.guard.as_ref().is_some_and(|(g, _)| g.reads_whole())
            || self.restorer.as_ref().is_some_and(Restorer::reads_whole)
    }

    /// Lowers the body's output cap to `n` (`transform.maxTokens`), and what the request
    /// reserved with it.
    /// Returns false when the body cannot be lowered (then it must not go upstream as it is).
    fn lower(&mut self, host: &mut dyn Host, n: u64) -> bool {
        let body = host.request_body(self.body_len).unwrap_or_default();
        match lower_max_tokens(&body, self.api, n) {
            Some(Lowered::Body(new)) => {
                host.set_request_body(self.body_len, &new);
                host.set_request_header("content-length", Some(&new.len().to_string()));
                self.body_len = new.len();
            }
            Some(Lowered::Within) => {}
            None => return false,
        }
        if let Some(spend) = &mut self.spend {
            spend.output = spend.output.min(n.saturating_mul(spend.choices));
        }
        self.lowered = Some(n);
        true
    }

    /// Response headers arrived. An answer response rules check whole holds them back until it
    /// has been read.
    pub fn on_response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Flow {
        if let Some(kept) = self.kept.take().filter(|_| self.allowed && !end_of_stream) {
            let vm = Rc::clone(&self.vm);
            if let Some(set) = vm.set.as_ref() {
                self.guard = answer::guard(host, set, kept);
            }
        }
        if let Some(p) = self.placeholders.take().filter(|_| !end_of_stream) {
            let max = self.vm.config.context.max_response_bytes;
            self.restorer = answer::restorer(host, p, max);
            if self.restorer.is_some() {
                // Restored values change the answer's length.
                host.set_response_header("content-length", None);
            }
        }
        let whole = self.reads_whole();
        let flow = self.usage_headers(host, end_of_stream);
        if whole {
            Flow::Pause
        } else {
            flow
        }
    }

    /// Response headers: the decision's headers added, the answer's usage to be read.
    fn usage_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Flow {
        if let Some(n) = self.lowered {
            host.set_response_header(wire::MAX_TOKENS_HEADER, Some(&n.to_string()));
        }
        if let Some(r) = &self.redacted {
            host.set_response_header(wire::REDACTED_HEADER, Some(r));
        }
        for (name, value) in &self.respond {
            host.set_response_header(name, Some(value));
        }
        let wants =
            self.allowed && (self.handle.is_some() || self.held.iter().any(Reservation::is_tokens));
        // Most answers: nothing to read, no host call.
        if self.stripper.is_none() && (!wants || self.usage.is_some()) {
            return Flow::Continue;
        }
        let status = host
            .response_header(":status")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(200);
        let encoding = host.response_header("content-encoding");
        if self.stripper.is_some() {
            let ct = host.response_header("content-type").unwrap_or_default();
            if status >= 400
                || end_of_stream
                || !UsageReader::is_event_stream(&ct)
                || encoding.is_some()
            {
                self.stripper = None;
            } else {
                // Bytes will be removed: the length the upstream declared no longer holds.
                host.set_response_header("content-length", None);
            }
        }
        if !wants || self.usage.is_some() {
            return Flow::Continue;
        }
        if refused(status) {
            // The provider refused the request: nothing was spent.
            self.settle_with(host, (Some(0.0), Some(0.0)), None);
            return Flow::Continue;
        }
        if status >= 400 {
            // An error answer is not in the GenAI metrics (as the server's ext_proc edge).
            self.checked_at = None;
        }
        let ct = host.response_header("content-type").unwrap_or_default();
        self.usage = Some(UsageReader::for_response(&ct, encoding.as_deref()));
        if end_of_stream {
            self.settle(host);
        }
        Flow::Continue
    }

    /// A response body chunk of `body_size` bytes is passing: as it came, or as response rules
    /// let it (a stream's held-back window; a JSON answer held whole until its end).
    pub fn on_response_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        if self.reads_whole() {
            if !end_of_stream {
                self.whole_len = body_size;
                return Flow::Pause;
            }
            return self.answer_whole(host, body_size);
        }
        if self.usage.is_none()
            && self.stripper.is_none()
            && self.guard.is_none()
            && self.restorer.is_none()
        {
            return Flow::Continue;
        }
        let chunk = if body_size > 0 {
            host.response_body(body_size).unwrap_or_default()
        } else {
            Vec::new()
        };
        // The usage is read from what the upstream sent: what was generated up to a cut is
        // charged.
        if let Some(reader) = &mut self.usage {
            reader.feed(&chunk);
        }
        let mut out = None;
        if let Some((g, _)) = &mut self.guard {
            let was_cut = g.cut().is_some();
            out = Some(match g.push(&chunk, end_of_stream) {
                Pass::Bytes(b) => b,
                Pass::Wait | Pass::Reply(_) => Vec::new(),
            });
            if !was_cut {
                self.report_cut(host);
            }
        }
        // Put back after the response rules read the answer as the model wrote it.
        if let Some(r) = &mut self.restorer {
            out = Some(r.push(out.as_deref().unwrap_or(&chunk), end_of_stream));
        }
        if let Some(stripper) = &mut self.stripper {
            out = Some(stripper.pass(out.as_deref().unwrap_or(&chunk), end_of_stream));
        }
        if let Some(out) = out.filter(|o| *o != chunk) {
            host.set_response_body(body_size, &out);
        }
        if end_of_stream {
            self.settle(host);
        }
        Flow::Continue
    }

    /// The whole of a JSON answer response rules check: sent as it came, or replaced by the
    /// error reply. Its usage is read either way.
    fn answer_whole(&mut self, host: &mut dyn Host, len: usize) -> Flow {
        let body = host.response_body(len).unwrap_or_default();
        if let Some(reader) = &mut self.usage {
            reader.feed(&body);
        }
        let mut out = None;
        if let Some((g, _)) = &mut self.guard {
            match g.push(&body, true) {
                Pass::Reply(reply) => {
                    answer::replace(host, len, &reply);
                    self.restorer = None;
                }
                Pass::Bytes(b) if b != body => out = Some(b),
                Pass::Bytes(_) | Pass::Wait => {}
            }
            self.report_cut(host);
        }
        if let Some(r) = &mut self.restorer {
            out = Some(r.push(out.as_deref().unwrap_or(&body), true));
        }
        if let Some(b) = out.filter(|b| *b != body) {
            host.set_response_body(len, &b);
        }
        self.settle(host);
        Flow::Continue
    }

    /// Reports the answer's cut, if it was just cut.
    fn report_cut(&mut self, host: &mut dyn Host) {
        let Some((g, kept)) = &self.guard else {
            return;
        };
        let Some(cut) = g.cut() else {
            return;
        };
        let report = answer::report_cut(host, cut, kept);
        if !self.outbox.push(report) {
            host.metric(Metric::UsageReportFailures, 1);
        }
    }

    /// Response trailers arrived: the body has ended (a JSON answer held whole is decided now;
    /// a stream's held-back text cannot be sent after its body, so it is checked and dropped).
    pub fn on_response_trailers(&mut self, host: &mut dyn Host) -> Flow {
        if self.reads_whole() {
            return self.answer_whole(host, self.whole_len);
        }
        if let Some((g, _)) = &mut self.guard {
            let was_cut = g.cut().is_some();
            if let Pass::Bytes(held) = g.push(&[], true) {
                if !held.is_empty() {
                    host.log(
                        Level::Warn,
                        "a stream ended with trailers: its last held-back bytes are dropped",
                    );
                }
            }
            if !was_cut {
                self.report_cut(host);
            }
        }
        self.settle(host);
        Flow::Continue
    }

    /// The stream is over (Envoy's log callback). An answer still being read was cut off (the
    /// client went away, the upstream failed): its usage is unknown.
    pub fn on_done(&mut self, host: &mut dyn Host) {
        // Never let through (the client went away while the server was asked): what the
        // request reserved locally goes back.
        if !self.allowed {
            for r in std::mem::take(&mut self.held) {
                self.vm.counters.release(host, &r);
            }
        }
        // A body still being read was cut: what streamed of it still counts.
        if self.usage.is_some() {
            self.settle(host);
        } else if self.allowed && self.handle.is_some() {
            host.metric(Metric::UsageUnknown, 1);
            self.settle_with(host, (None, None), None);
        }
    }

    /// Settles with what the answer said (or, cut, what of it streamed).
    fn settle(&mut self, host: &mut dyn Host) {
        let Some(reader) = self.usage.take() else {
            return;
        };
        let reading = reader.finish();
        if reading.usage.is_none() {
            host.metric(Metric::UsageUnknown, 1);
        }
        let charged = match &self.spend {
            Some(spend) => spend.charge(&reading),
            None => (reading.usage.map(|u| u.tokens()), None),
        };
        let duration = self
            .checked_at
            .map(|at| host.now().saturating_sub(at).as_secs_f64());
        let model = self.spend.as_ref().and_then(|s| s.model.as_deref());
        let gen_ai = duration
            .and_then(|d| GenAiUsage::of(self.provider, self.api, model, &reading, Some(d)));
        self.settle_with(host, charged, gen_ai);
    }

    /// Reconciles the reservations with what was spent: local token counters get the
    /// difference, the server a usage report. Unknown usage (`None`) keeps the local estimates
    /// and asks the server to count its estimate as spent, so an answer without usage — a cut
    /// connection, a provider that does not say — cannot dodge a budget.
    fn settle_with(
        &mut self,
        host: &mut dyn Host,
        (tokens, usd): (Option<f64>, Option<f64>),
        gen_ai: Option<GenAiUsage>,
    ) {
        self.usage = None;
        if let Some(t) = tokens {
            for r in self.held.iter().filter(|r| r.is_tokens()) {
                self.vm.counters.adjust(host, r, t - r.amount());
            }
        }
        if let Some(handle) = self.handle.take() {
            if !self.outbox.push(UsageReport {
                handle,
                tokens,
                usd,
                cut: None,
                alert: None,
                gen_ai,
            }) {
                host.metric(Metric::UsageReportFailures, 1);
            }
        }
    }

    /// Request headers arrived (`end_of_stream`: there is no body).
    pub fn on_request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Flow {
        if !matches!(self.state, State::New) {
            return Flow::Continue;
        }
        let mut headers = host.request_headers();
        // Virtual keys guard every request, not only the LLM calls the rules check: Envoy puts
        // the provider's real key on whatever goes upstream. The key's record is who the
        // request is, written into the headers the context is read from (before anything reads
        // them).
        if self.vm.config.identity.mode == IdentityMode::ApiKeys {
            let now = i64::try_from(host.now().as_secs()).unwrap_or(i64::MAX);
            match self.vm.keys.authenticate(&headers, now) {
                Ok(record) => record.assert(&self.vm.config.context, &mut headers),
                Err(e) => {
                    let path = header(&headers, ":path").unwrap_or("/");
                    let provider = reply::provider_of(path, &headers);
                    let outcome = Outcome::Reply(
                        reply::unauthenticated(provider, e),
                        Ending::Unauthenticated,
                    );
                    return self.finish(host, outcome);
                }
            }
        }
        let path = header(&headers, ":path").unwrap_or("/");
        let Some(provider) = self.vm.routes.check(path, &headers) else {
            self.state = State::Passing;
            return Flow::Continue;
        };
        // Only the policy engine sets these upstream.
        for name in wire::SERVER_ONLY_HEADERS {
            if header(&headers, name).is_some() {
                host.set_request_header(name, None);
            }
        }
        let Some(set) = &self.vm.set else {
            let outcome = self.no_bundle(host, provider);
            return self.finish(host, outcome);
        };
        let limit = set.config().max_body_bytes;
        if let Some(declared) =
            header(&headers, "content-length").and_then(|v| v.parse::<usize>().ok())
        {
            if declared > limit {
                return self.finish(host, too_large(provider, declared, limit));
            }
        }
        if end_of_stream {
            let outcome = self.decide(host, provider, 0, headers);
            return self.finish(host, outcome);
        }
        self.state = State::Buffering {
            provider,
            body_len: 0,
            headers,
        };
        Flow::Pause
    }

    /// A body chunk arrived; `body_size` is everything buffered so far.
    pub fn on_request_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        let State::Buffering {
            provider, body_len, ..
        } = &mut self.state
        else {
            return self.passing();
        };
        let provider = *provider;
        *body_len = body_size;
        let limit = self.vm.config.context.max_body_bytes;
        if body_size > limit {
            return self.finish(host, too_large(provider, body_size, limit));
        }
        if !end_of_stream {
            return Flow::Pause;
        }
        let headers = self.take_headers();
        let outcome = self.decide(host, provider, body_size, headers);
        self.finish(host, outcome)
    }

    /// The headers kept while buffering.
    fn take_headers(&mut self) -> Vec<(String, String)> {
        match &mut self.state {
            State::Buffering { headers, .. } => std::mem::take(headers),
            _ => Vec::new(),
        }
    }

    /// Request trailers arrived: the body is complete (HTTP/2 requests with trailers never see
    /// `end_of_stream` in the body callback).
    pub fn on_request_trailers(&mut self, host: &mut dyn Host) -> Flow {
        let State::Buffering {
            provider, body_len, ..
        } = self.state
        else {
            return self.passing();
        };
        let headers = self.take_headers();
        let outcome = self.decide(host, provider, body_len, headers);
        self.finish(host, outcome)
    }

    /// The answer to the policy-server call `token`: `status` is the gRPC status of the call
    /// (non-zero: the call failed or timed out), `body` the response message.
    pub fn on_server_answer(
        &mut self,
        host: &mut dyn Host,
        token: u32,
        status: u32,
        body: Option<Vec<u8>>,
    ) {
        let State::Asking {
            token: expected,
            provider,
            ..
        } = &self.state
        else {
            return;
        };
        if *expected != token {
            return;
        }
        let provider = *provider;
        let answer = match (status, body) {
            (0, Some(bytes)) => {
                ServerAnswer::decode(&bytes).map_err(|e| format!("bad CheckResponse: {e}"))
            }
            (0, None) => Err(String::from("empty answer")),
            (4, _) => {
                host.metric(Metric::FallbackTimeouts, 1);
                Err(String::from("timed out"))
            }
            (code, _) => Err(format!("gRPC status {code}")),
        };
        let outcome = match answer {
            Ok(ServerAnswer::Allow {
                set,
                remove,
                respond,
                grant,
            }) => {
                // The handle is for the usage report, never for the provider.
                self.handle = grant.reservation.map(|r| r.handle);
                self.checked_at = self.handle.as_ref().map(|_| host.now());
                if let (Some(r), Some((method, path, data))) = (&grant.redact, self.head.take()) {
                    if let Err(left) = self.redact(host, (&method, &path, &data), r) {
                        let outcome = Outcome::Reply(left.reply(provider), Ending::Denied);
                        self.finish(host, outcome);
                        return;
                    }
                }
                // What the server's counters have left; the local ones are added on allow.
                self.respond = respond;
                Outcome::Allow {
                    set,
                    remove,
                    max_tokens: grant.max_tokens,
                }
            }
            Ok(ServerAnswer::Deny {
                status,
                headers,
                body,
            }) => Outcome::Reply(
                Reply {
                    status,
                    headers,
                    body,
                },
                Ending::of_status(status),
            ),
            Err(why) => {
                self.server_failed(host, &format!("policy server check failed: {why}"));
                let State::Asking { provisional, .. } =
                    std::mem::replace(&mut self.state, State::Answered)
                else {
                    return;
                };
                self.without_server(host, provider, *provisional)
            }
        };
        if self.finish(host, outcome) == Flow::Continue {
            host.resume_request();
        }
    }

    /// Applies how the check ended to the request, and counts it: the one place that does.
    fn finish(&mut self, host: &mut dyn Host, outcome: Outcome) -> Flow {
        match outcome {
            Outcome::Allow {
                set,
                remove,
                max_tokens,
            } => {
                for name in remove {
                    host.set_request_header(&name, None);
                }
                if let Some(n) = max_tokens {
                    if !self.lower(host, n) {
                        let message =
                            "the request's output cap could not be lowered as the policy requires";
                        host.log(Level::Error, message);
                        return self.finish(host, unavailable(self.provider, message));
                    }
                }
                for (name, value) in set {
                    // The reservation handle is for the usage report, not for the provider.
                    if name == RESERVATION_HEADER {
                        self.handle = Some(value);
                        self.checked_at = Some(host.now());
                        continue;
                    }
                    // For Envoy's ext_proc filter of an ext_authz deployment: the filter lowers
                    // the body itself.
                    if name == wire::REWRITE_HEADER {
                        continue;
                    }
                    host.set_request_header(&name, Some(&value));
                }
                // An answer whose usage is read, or that response rules check, must come
                // uncompressed.
                if self.handle.is_some()
                    || self.held.iter().any(Reservation::is_tokens)
                    || self.kept.is_some()
                    || self.placeholders.is_some()
                {
                    host.set_request_header("accept-encoding", None);
                }
                if !self.remaining.is_empty() {
                    let own = reply::remaining_headers(&self.remaining);
                    for (name, value) in own {
                        if !self.respond.iter().any(|(k, _)| *k == name) {
                            self.respond.push((name, value));
                        }
                    }
                }
                host.metric(Metric::Allowed, 1);
                self.allowed = true;
                self.state = State::Passing;
                Flow::Continue
            }
            Outcome::Pass { set } => {
                for (name, value) in set {
                    host.set_request_header(&name, Some(&value));
                }
                self.state = State::Passing;
                Flow::Continue
            }
            Outcome::Reply(reply, ending) => {
                for r in std::mem::take(&mut self.held) {
                    self.vm.counters.release(host, &r);
                }
                for metric in ending.metrics() {
                    host.metric(*metric, 1);
                }
                self.state = State::Answered;
                host.send_reply(reply.status, &reply.headers, reply.body.as_bytes());
                Flow::Pause
            }
            Outcome::Asking => Flow::Pause,
        }
    }

    fn passing(&self) -> Flow {
        match self.state {
            State::Answered | State::Asking { .. } | State::Buffering { .. } => Flow::Pause,
            _ => Flow::Continue,
        }
    }

    /// No bundle yet (it comes from the server): the failure mode answers.
    fn no_bundle(&self, host: &mut dyn Host, provider: Provider) -> Outcome {
        host.log(Level::Warn, "no policy bundle yet (waiting for the sync)");
        match self.vm.config.failure_mode {
            FailureMode::Closed => unavailable(provider, "no policy bundle is loaded yet"),
            FailureMode::Open => Outcome::Pass {
                set: vec![(DECISION_HEADER.to_string(), String::from("error"))],
            },
        }
    }

    /// Builds the context from the buffered request and decides: locally, from the cache, or
    /// by asking the server.
    fn decide(
        &mut self,
        host: &mut dyn Host,
        provider: Provider,
        body_len: usize,
        mut headers: Vec<(String, String)>,
    ) -> Outcome {
        let vm = Rc::clone(&self.vm);
        let Some(set) = vm.set.as_ref() else {
            return self.no_bundle(host, provider);
        };
        let now = host.now();
        let body = if body_len > 0 {
            host.request_body(body_len).unwrap_or_default()
        } else {
            Vec::new()
        };
        // What rules read, as the server's ext_authz edge sees it: moved to the front, in
        // arrival order (a stable sort), and borrowed from there rather than copied. Every other
        // reader looks headers up by name, which the order does not change.
        headers.sort_by_key(|(k, _)| !wire::is_request_data(k));
        let (data, _) =
            headers.split_at(headers.partition_point(|(k, _)| wire::is_request_data(k)));
        let input = RequestInput {
            method: header(&headers, ":method").unwrap_or("GET"),
            path: header(&headers, ":path").unwrap_or("/"),
            headers: data,
            body: &body,
            now_unix: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
        };
        // A canary's candidate decides this request again only when sampled: only then does
        // the context hold what the candidate reads.
        let canary = vm.canary.as_ref().filter(|c| c.sampled());
        let needs = match canary {
            Some(c) => c.needs(set.needs()),
            None => set.needs(),
        };
        // The prompt scans run only when the decision cache misses (their text is in the key).
        let mut unscanned = match RequestContext::unscanned(&input, set.config(), needs) {
            Ok(u) => u,
            Err(e) => return rejected(&e, provider),
        };
        self.provider = provider;
        self.api = unscanned.before_scans().request.api;
        self.body_len = body.len();
        if set.counts_tokens(&unscanned.before_scans().namespace) {
            self.count_spend(host, set, unscanned.before_scans_mut(), provider, &body);
        }
        let opts = EvalOptions::default();
        // Only where a hit saves more than the key costs (the namespace's rules read the prompt).
        let key = vm
            .cache
            .try_borrow()
            .ok()
            .filter(|c| c.enabled() && set.caching_pays(&unscanned.before_scans().namespace))
            .map(|_| set.cache_key_before_scans(&unscanned, &opts));
        let hit = key
            .as_ref()
            .and_then(|k| vm.cache.try_borrow().ok().and_then(|c| c.get(k)));
        if key.is_some() {
            host.metric(
                if hit.is_some() {
                    Metric::CacheHit
                } else {
                    Metric::CacheMiss
                },
                1,
            );
        }
        // A hit needs no scan: the kept context for the answer's rules holds none of their
        // findings (a response rule cannot read them).
        let ctx = if hit.is_some() {
            unscanned.into_before_scans()
        } else {
            unscanned.scan()
        };
        if set.checks_answers(&ctx.namespace) && ctx.request.api != Api::Batch {
            self.kept = Some(Kept {
                ctx: set.answer_context(&ctx),
                request_id: header(&headers, "x-request-id").map(str::to_string),
            });
        }
        if let Some(d) = hit {
            // (A sampled canary's candidate scans what it reads: evaluation never reads a
            // context without its scans.)
            if let Some(c) = canary {
                c.decide(host, &ctx, d.decision);
            }
            self.raise_alert(host, &d, &ctx, &headers, provider);
            return of_decision(&d, provider, None);
        }
        let mut local = LocalCounted::default();
        // (The key just looked up: written into the decision, not hashed again; none when the
        // decision is not cached.)
        let opts = EvalOptions {
            cache_key: key
                .as_deref()
                .map_or(DecisionKey::Unwanted, DecisionKey::Known),
            // The filter times a sample of its decisions itself (`time_decision`); the core's
            // two readings per request would be two calls out of the VM.
            timing: Timing::Skipped,
            ..opts
        };
        let (decision, remote) = self.evaluate(host, set, &ctx, &opts, now.as_secs(), &mut local);
        self.time_decision(host, now);
        if remote || decision.metadata.needs_remote {
            self.head = Some((
                input.method.to_string(),
                input.path.to_string(),
                data.to_vec(),
            ));
            return self.ask_server(host, provider, &headers, &body, &local, decision);
        }
        if let Some(c) = canary {
            c.decide(host, &ctx, decision.decision);
        }
        self.raise_alert(host, &decision, &ctx, &headers, provider);
        if let Some(r) = decision
            .actions
            .redact
            .as_ref()
            .filter(|_| decision.decision == Verdict::Allow)
        {
            if let Err(left) = self.redact(host, (input.method, input.path, data), r) {
                return Outcome::Reply(left.reply(provider), Ending::Denied);
            }
        }
        if let Some(k) = key {
            if decision.metadata.cacheable {
                if let Ok(mut c) = vm.cache.try_borrow_mut() {
                    c.put(k, Rc::new(decision.clone()));
                }
            }
        }
        let limit = reply::deciding_limit(&decision, &local.over);
        of_decision(&decision, provider, limit)
    }

    /// A decision the filter made alone that raised an `alert`: reported to the server (which
    /// records and delivers it) with the usage reports.
    fn raise_alert(
        &self,
        host: &mut dyn Host,
        d: &Decision,
        ctx: &RequestContext,
        headers: &[(String, String)],
        provider: Provider,
    ) {
        let Some(severity) = d.actions.alert else {
            return;
        };
        let status = reply::for_decision(d, provider, None).map_or(200, |r| r.status);
        let severity = match severity {
            llm_policy_core::model::Alert::Low => "low",
            llm_policy_core::model::Alert::Medium => "medium",
            llm_policy_core::model::Alert::High => "high",
            llm_policy_core::model::Alert::Critical => "critical",
        };
        let report = UsageReport {
            handle: String::new(),
            tokens: None,
            usd: None,
            cut: None,
            alert: Some(crate::outbox::RaisedAlert {
                namespace: d.metadata.namespace.clone(),
                rule: d.metadata.deciding_rule.clone().unwrap_or_default(),
                policy: d.metadata.policy.clone(),
                severity: String::from(severity),
                decision: String::from(d.decision.as_str()),
                reason: d.reason.clone(),
                status: u32::from(status),
                model: ctx.request.model.clone(),
                request_id: header(headers, "x-request-id")
                    .filter(|id| id.len() <= 128)
                    .map(str::to_string),
                principal: ctx.principal_present().collect(),
                bundle: d.metadata.bundle.clone(),
            }),
            gen_ai: None,
        };
        if !self.outbox.push(report) {
            host.metric(Metric::UsageReportFailures, 1);
        }
    }

    /// For a request some rule counts tokens or cost for: remembers what it reserves, and has
    /// an OpenAI stream report its usage (`stream_options.include_usage`, its extra chunk
    /// removed on the way back when the client did not ask for it).
    fn count_spend(
        &mut self,
        host: &mut dyn Host,
        set: &llm_policy_core::PolicySet,
        ctx: &mut RequestContext,
        provider: Provider,
        body: &[u8],
    ) {
        // Estimated once: the counters' charges read it again.
        let prompt = ctx.request.prompt_tokens();
        ctx.request.estimated_tokens = i64::try_from(prompt).unwrap_or(i64::MAX);
        let r = &ctx.request;
        let models = set.models();
        let output = r.output_reservation(&models, None);
        self.spend = Some(Spend {
            models,
            model: r.model.clone(),
            prompt,
            output,
            choices: u64::from(r.choices.max(1)),
        });
        if !usage_needs_asking(provider, r.api, r.stream) {
            return;
        }
        if let Some(new) = add_include_usage(body) {
            host.set_request_body(body.len(), &new);
            host.set_request_header("content-length", Some(&new.len().to_string()));
            self.body_len = new.len();
            self.stripper = Some(UsageChunkStripper::default());
        }
    }

    /// Evaluates, answering local counters from the shared-data table (the rules whose counter
    /// was over go into `local`); global counters and plugins are left for the server. Returns
    /// the decision and whether the server must be asked.
    fn evaluate(
        &mut self,
        host: &mut dyn Host,
        set: &llm_policy_core::PolicySet,
        ctx: &RequestContext,
        opts: &EvalOptions<'_>,
        now_secs: u64,
        local: &mut LocalCounted,
    ) -> (Decision, bool) {
        let mut remote = false;
        let mut step = set.start(ctx, opts);
        loop {
            let mut pending = match step {
                Step::Done(d) => return (d, remote),
                Step::Pending(p) => p,
            };
            for need in pending.needs().to_vec() {
                let answer = match &need.kind {
                    NeedKind::Counter(c) if c.scope == Scope::Local => {
                        match self.vm.counters.reserve(host, c, now_secs) {
                            Count::Under(r) => {
                                if c.headers {
                                    self.remaining.push(r.left());
                                }
                                self.held.push(r);
                                Answer::Counter(CounterCheck::Under)
                            }
                            Count::Over(state) => {
                                local.over.push((need.rule.clone(), state));
                                Answer::Counter(CounterCheck::Over)
                            }
                            Count::Unknown => Answer::Counter(CounterCheck::Unknown),
                        }
                    }
                    NeedKind::Counter(_) => {
                        remote = true;
                        Answer::Counter(CounterCheck::Unknown)
                    }
                    NeedKind::Plugin(_) => {
                        remote = true;
                        Answer::Plugin(PluginCheck::Unavailable)
                    }
                };
                pending.answer(need.id, answer);
            }
            step = pending.resume(ctx);
        }
    }

    /// Records the time of every 16th decision, from `started` (the clock is a host call).
    fn time_decision(&self, host: &mut dyn Host, started: std::time::Duration) {
        let n = self.vm.decisions.get().wrapping_add(1);
        self.vm.decisions.set(n);
        if n.is_multiple_of(16) {
            let spent = host.now().saturating_sub(started);
            host.metric(
                Metric::EvaluationMicros,
                u64::try_from(spent.as_micros()).unwrap_or(u64::MAX),
            );
        }
    }

    /// Sends the request to the policy server, or follows the failure mode without one.
    fn ask_server(
        &mut self,
        host: &mut dyn Host,
        provider: Provider,
        headers: &[(String, String)],
        body: &[u8],
        local: &LocalCounted,
        provisional: Decision,
    ) -> Outcome {
        let Some(server) = self.vm.config.server.clone() else {
            if !self.vm.warned_no_server.replace(true) {
                host.log(
                    Level::Warn,
                    &format!(
                        "rules {:?} need the policy server, and no `server` is configured: the failure mode answers (logged once)",
                        provisional.metadata.remote_rules
                    ),
                );
            }
            return self.without_server(host, provider, provisional);
        };
        let message = ext_authz::check_request(headers, body, local, self.vm.config.identity.mode);
        host.metric(Metric::FallbackCalls, 1);
        match host.grpc_call(
            &server.cluster,
            ext_authz::SERVICE,
            ext_authz::METHOD,
            &[],
            &message,
            server.timeout(),
        ) {
            Ok(token) => {
                self.state = State::Asking {
                    token,
                    provider,
                    provisional: Box::new(provisional),
                };
                Outcome::Asking
            }
            Err(e) => {
                self.server_failed(
                    host,
                    &format!(
                        "cannot call the policy server on cluster {}: {e}",
                        server.cluster
                    ),
                );
                self.without_server(host, provider, provisional)
            }
        }
    }

    /// Counts a failed server call and logs the first of a run, then every 100th: a client must
    /// not be able to write one log line per request.
    fn server_failed(&self, host: &mut dyn Host, message: &str) {
        host.metric(Metric::FallbackFailures, 1);
        let n = self.vm.server_failures.get();
        self.vm.server_failures.set(n.wrapping_add(1));
        if n.is_multiple_of(100) {
            host.log(Level::Warn, &format!("{message} ({} so far)", n + 1));
        }
    }

    /// The server could not answer: closed → 503; open → the decision without its rules,
    /// marked `x-llm-policy-decision: error` when it lets the request go.
    fn without_server(
        &mut self,
        host: &mut dyn Host,
        provider: Provider,
        provisional: Decision,
    ) -> Outcome {
        // What the filter's own rules redact is redacted even so: the failure mode lets the
        // server's rules go, never the ones the filter applied.
        if let (Some(r), Some((method, path, data)), FailureMode::Open) = (
            provisional
                .actions
                .redact
                .as_ref()
                .filter(|_| provisional.decision == Verdict::Allow),
            self.head.take(),
            self.vm.config.failure_mode,
        ) {
            if let Err(left) = self.redact(host, (&method, &path, &data), r) {
                return Outcome::Reply(left.reply(provider), Ending::Denied);
            }
        }
        match self.vm.config.failure_mode {
            FailureMode::Closed => unavailable(provider, "the policy server could not be reached"),
            FailureMode::Open => match of_decision(&provisional, provider, None) {
                Outcome::Allow {
                    mut set,
                    remove,
                    max_tokens,
                } => {
                    set.push((DECISION_HEADER.to_string(), String::from("error")));
                    Outcome::Allow {
                        set,
                        remove,
                        max_tokens,
                    }
                }
                other => other,
            },
        }
    }
}

/// Whether a response status says the provider refused the request, so nothing was spent: a
/// 4xx (a 408 is Envoy's own timeout of a request the provider may still be answering, and
/// billing). A 5xx may come from Envoy (an upstream timeout, a reset) after the provider spent:
/// the reservation stands.
pub fn refused(status: u16) -> bool {
    (400..500).contains(&status) && status != 408
}

/// The decision's outcome: upstream with its headers, or its reply.
fn of_decision(d: &Decision, provider: Provider, limit: Option<reply::LimitState>) -> Outcome {
    match reply::for_decision(d, provider, limit) {
        Some(r) => {
            let ending = if d.decision == Verdict::Throttle {
                Ending::Throttled
            } else {
                Ending::Denied
            };
            Outcome::Reply(r, ending)
        }
        None => Outcome::Allow {
            set: reply::upstream_headers(d),
            remove: Vec::new(),
            max_tokens: d.actions.max_tokens,
        },
    }
}

/// A request rejected before evaluation (400 / 413).
fn rejected(e: &ContextError, provider: Provider) -> Outcome {
    let ending = if e.status() == 413 {
        Ending::TooLarge
    } else {
        Ending::InvalidBody
    };
    Outcome::Reply(reply::for_error(e, provider), ending)
}

/// 413 for a body over the limit.
fn too_large(provider: Provider, size: usize, limit: usize) -> Outcome {
    rejected(&ContextError::BodyTooLarge { size, limit }, provider)
}

/// 503 in the provider's format, marked `x-llm-policy-decision: error`.
fn unavailable(provider: Provider, message: &str) -> Outcome {
    Outcome::Reply(reply::unavailable(provider, message), Ending::Unavailable)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}
