//! What the filter's logic needs from its proxy: the only interface between the two. The wasm
//! build implements it with proxy-wasm host calls (`wasm.rs`); the tests with a fake host that
//! records what the filter did.

use std::time::Duration;

/// Log levels (proxy-wasm's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Details.
    Debug,
    /// Normal operation.
    Info,
    /// Something is off but handled.
    Warn,
    /// Something failed.
    Error,
}

/// The outcome of a shared-data write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedWrite {
    /// Written.
    Ok,
    /// Another worker wrote first (the compare-and-swap value was stale).
    CasMismatch,
    /// The host refused.
    Failed,
}

/// Why the proxy would not start a call (gRPC or HTTP): the host's status, named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the proxy refused the call: {0}")]
pub struct CallRefused(pub &'static str);

/// The filter's counters and histograms (Envoy stats, `llm_policy.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Requests allowed.
    Allowed,
    /// Requests denied by a rule.
    Denied,
    /// Requests throttled.
    Throttled,
    /// Requests answered 400 (malformed body) or 413 (too large).
    Rejected,
    /// Requests with a body over the limit (413).
    BodyTooLarge,
    /// Requests whose body is not a valid request (400).
    InvalidBody,
    /// Requests whose virtual API key was missing, unknown, revoked or expired (401).
    Unauthenticated,
    /// Decisions served from the per-VM cache.
    CacheHit,
    /// Cache lookups that missed.
    CacheMiss,
    /// Checks sent to the policy server.
    FallbackCalls,
    /// Checks the server could not answer (transport error, bad answer).
    FallbackFailures,
    /// Checks the server did not answer in time.
    FallbackTimeouts,
    /// Local rate-limit keys that found no free slot.
    CounterTableFull,
    /// Bundles synced from the server.
    SyncOk,
    /// Bundle fetches that failed or brought a bundle that does not compile.
    SyncFailed,
    /// Usage reports sent to the server.
    UsageReports,
    /// Usage reports that could not be sent (or were dropped: queue full).
    UsageReportFailures,
    /// Answers to reserved requests whose usage could not be read.
    UsageUnknown,
    /// Answers a response rule denied (replaced, or a stream ended with an error event).
    AnswersCut,
    /// Context extraction and evaluation time, microseconds, of every 16th decision (histogram).
    EvaluationMicros,
    /// Requests a canary's candidate decided again.
    CanaryEvaluations,
    /// Of them, those it decided otherwise.
    CanaryDisagreements,
}

impl Metric {
    /// Every metric, for hosts that define them up front.
    pub const ALL: [Metric; 22] = [
        Metric::Allowed,
        Metric::Denied,
        Metric::Throttled,
        Metric::Rejected,
        Metric::BodyTooLarge,
        Metric::InvalidBody,
        Metric::Unauthenticated,
        Metric::CacheHit,
        Metric::CacheMiss,
        Metric::FallbackCalls,
        Metric::FallbackFailures,
        Metric::FallbackTimeouts,
        Metric::CounterTableFull,
        Metric::SyncOk,
        Metric::SyncFailed,
        Metric::UsageReports,
        Metric::UsageReportFailures,
        Metric::UsageUnknown,
        Metric::AnswersCut,
        Metric::EvaluationMicros,
        Metric::CanaryEvaluations,
        Metric::CanaryDisagreements,
    ];

    /// The stat name (Envoy shows it in `/stats/prometheus` with dots as underscores).
    pub fn name(self) -> &'static str {
        match self {
            Metric::Allowed => "llm_policy.decisions.allow",
            Metric::Denied => "llm_policy.decisions.deny",
            Metric::Throttled => "llm_policy.decisions.throttle",
            Metric::Rejected => "llm_policy.decisions.rejected",
            Metric::BodyTooLarge => "llm_policy.body_too_large",
            Metric::InvalidBody => "llm_policy.invalid_body",
            Metric::Unauthenticated => "llm_policy.unauthenticated",
            Metric::CacheHit => "llm_policy.cache.hit",
            Metric::CacheMiss => "llm_policy.cache.miss",
            Metric::FallbackCalls => "llm_policy.fallback.calls",
            Metric::FallbackFailures => "llm_policy.fallback.failures",
            Metric::FallbackTimeouts => "llm_policy.fallback.timeouts",
            Metric::CounterTableFull => "llm_policy.local_counters.full",
            Metric::SyncOk => "llm_policy.sync.ok",
            Metric::SyncFailed => "llm_policy.sync.failed",
            Metric::UsageReports => "llm_policy.usage.reports",
            Metric::UsageReportFailures => "llm_policy.usage.report_failures",
            Metric::UsageUnknown => "llm_policy.usage.unknown",
            Metric::AnswersCut => "llm_policy.answers.cut",
            Metric::EvaluationMicros => "llm_policy.evaluation_us",
            Metric::CanaryEvaluations => "llm_policy.canary.evaluations",
            Metric::CanaryDisagreements => "llm_policy.canary.disagreements",
        }
    }

    /// Whether the metric is a histogram (else a counter).
    pub fn is_histogram(self) -> bool {
        matches!(self, Metric::EvaluationMicros)
    }
}

/// The host calls the filter makes. Every call is infallible from the filter's side: a host
/// that refuses returns `None` / [`SharedWrite::Failed`] / `Err`, never panics.
pub trait Host {
    /// The request's headers (pseudo-headers `:method`, `:path`, `:authority` included).
    fn request_headers(&mut self) -> Vec<(String, String)>;
    /// The first `len` bytes of the buffered request body.
    fn request_body(&mut self, len: usize) -> Option<Vec<u8>>;
    /// Sets (replaces) a request header, or removes it with `None`.
    fn set_request_header(&mut self, name: &str, value: Option<&str>);
    /// Answers the client locally; the request never reaches the upstream.
    fn send_reply(&mut self, status: u16, headers: &[(String, String)], body: &[u8]);
    /// Replaces the buffered request body (its first `len` bytes: all of it) before it goes
    /// upstream.
    fn set_request_body(&mut self, len: usize, body: &[u8]);
    /// A response header (first value).
    fn response_header(&mut self, name: &str) -> Option<String>;
    /// Sets (replaces) a response header, or removes it with `None`.
    fn set_response_header(&mut self, name: &str, value: Option<&str>);
    /// The response body chunk being passed on (`len` bytes).
    fn response_body(&mut self, len: usize) -> Option<Vec<u8>>;
    /// Replaces the response body chunk being passed on (`len` bytes) with `bytes`.
    fn set_response_body(&mut self, len: usize, bytes: &[u8]);
    /// Lets a paused request continue (after an asynchronous decision).
    fn resume_request(&mut self);
    /// Wall-clock time since the Unix epoch.
    fn now(&self) -> Duration;
    /// A shared-data value and its compare-and-swap token.
    fn shared_get(&mut self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes a shared-data value if its token is still `cas` (`None`: unconditionally).
    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> SharedWrite;
    /// Starts a unary gRPC call on `cluster` with these initial metadata; the answer comes to
    /// the request's callback with the returned token.
    fn grpc_call(
        &mut self,
        cluster: &str,
        service: &str,
        method: &str,
        metadata: &[(&str, &str)],
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, CallRefused>;
    /// Starts an HTTP call on `cluster` (headers include `:method`, `:path`, `:authority`); the
    /// answer comes to the root context's callback with the returned token.
    fn http_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<u32, CallRefused>;
    /// Logs a line.
    fn log(&mut self, level: Level, message: &str);
    /// Adds to a counter, or records a histogram value.
    fn metric(&mut self, metric: Metric, value: u64);
}
