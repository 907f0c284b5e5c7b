//! Decision records: one JSON line per decision (and per alert), written by a dedicated thread
//! from a bounded queue, so a slow disk never blocks a check. A record that does not fit the
//! queue is dropped and counted (`llm_policy_audit_dropped_total`); every record the queue
//! accepted is written before shutdown completes.

pub mod otlp;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use llm_policy_core::decision::{Decision, ErrorDetail};
use llm_policy_core::model::Alert;
use llm_policy_core::RequestContext;
use serde::Serialize;
use tokio::sync::mpsc;

use super::config::{AuditConfig, AuditScope, FileSinkConfig, PromptLogging};
use super::metrics::Metrics;

/// One decision record. Field names are a stable contract (see `docs/server.md`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Record {
    /// `decision`, `alert` for the extra record an `alert` action emits, `usage` for what an
    /// answer's usage charged, `response` for an answer a response rule cut, `canary` for a
    /// check a canary's candidate decided otherwise.
    pub kind: &'static str,
    /// Unique id, made by the server.
    pub id: String,
    /// The request's `x-request-id` as the client or proxy sent it (not unique, not trusted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// RFC 3339 UTC time with milliseconds.
    pub time: String,
    /// Namespace evaluated.
    pub namespace: String,
    /// The deciding policy (or the namespace's policies when the default decided).
    pub policy: String,
    /// That policy's `metadata.version`.
    pub policy_version: String,
    /// The registry version that decided.
    pub version: u64,
    /// The bundle digest.
    pub bundle: String,
    /// Principal attributes present on the request.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub principal: std::collections::BTreeMap<String, String>,
    /// How the principal was established (`jwt`, `api-key`, `trusted-header`, `none`) and by
    /// which virtual key (its id; never the key or a token).
    pub identity: IdentityRecord,
    /// The requested model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `allow`, `deny`, `throttle`, or `error` (the check could not decide).
    pub decision: String,
    /// HTTP status answered (200 for a request let through).
    pub status: u16,
    /// Enforcing rules that matched, deciding one first.
    pub matched_rules: Vec<String>,
    /// The reason.
    pub reason: String,
    /// Whole check time in microseconds.
    pub latency_us: u64,
    /// Whether the decision came from a cache (`l1`, `l2`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<&'static str>,
    /// W3C trace id of the request, when it carried `traceparent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Alert severity, when a matched rule raised one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert: Option<Alert>,
    /// The prompt, HMAC-SHA256-hashed or redacted, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// What an allowed request reserved (a `decision` record) or was charged once its answer's
    /// usage was read (a `usage` record), joined by `reservation`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spend: Option<SpendRecord>,
    /// Where a response rule cut the answer (a `response` record).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cut: Option<CutRecord>,
    /// What the request had replaced before it went upstream (`transform.redact`): distinct
    /// values by kind, never the values (a `decision` record).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub redacted: std::collections::BTreeMap<String, u32>,
    /// The rule that decided (none: the namespace's default decision).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deciding_rule: Option<String>,
    /// What a canary's candidate decided where it disagreed with the bundle serving (a
    /// `canary` record; the record's own decision fields are the serving bundle's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryRecord>,
    /// The context the decision was made from (`audit.context: true`), for `llm-policy replay`:
    /// every field, the request's text as `audit.prompts` says (off: empty), credential headers
    /// removed (a `decision` record).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<Box<llm_policy_core::RequestContext>>,
}

/// A canary candidate's decision, in a `canary` record.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CanaryRecord {
    /// The candidate's bundle digest.
    pub bundle: String,
    /// Its verdict.
    pub decision: String,
    /// Its deciding rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deciding_rule: Option<String>,
    /// Its matched enforcing rules.
    pub matched_rules: Vec<String>,
    /// Its reason.
    pub reason: String,
}

/// What in a header's name makes a recorded context leave it out: it may carry a credential
/// (`authorization`, `x-api-key`, `cookie`, `ocp-apim-subscription-key`, `x-amz-security-token`,
/// `x-session-id`, ...).
pub const CREDENTIAL_HEADER_PARTS: [&str; 9] = [
    "auth",
    "key",
    "token",
    "secret",
    "cookie",
    "session",
    "signature",
    "credential",
    "password",
];

/// Whether a recorded context leaves header `name` out.
pub fn is_credential_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    CREDENTIAL_HEADER_PARTS.iter().any(|p| name.contains(p))
}

/// A context as a record holds it: the answer dropped, credential headers removed, every text
/// (prompt, folded prompt, turns; of batch items too) through `text` (the `audit.prompts`
/// form, or empty). The scanners' findings (`prompt_entities`, `prompt_injection`) and the
/// estimate stay: kinds and numbers, never values.
pub fn recorded_context(
    ctx: &llm_policy_core::RequestContext,
    text: impl Fn(&str) -> String,
) -> llm_policy_core::RequestContext {
    let mut c = ctx.clone();
    c.response = llm_policy_core::context::ResponseInfo::default();
    let scrub = |r: &mut llm_policy_core::context::RequestInfo| {
        r.headers.retain(|(k, _)| !is_credential_header(k));
        r.prompt = text(&r.prompt);
        r.prompt_folded = text(&r.prompt_folded);
        for m in &mut r.messages {
            m.content = text(&m.content);
        }
    };
    scrub(&mut c.request);
    for item in &mut c.batch {
        scrub(item);
    }
    c
}

/// Where an answer was cut: what the client had received and what had been read.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CutRecord {
    /// The answer was a stream (ended with an error event); else a JSON answer, replaced whole.
    pub stream: bool,
    /// Bytes of generated text the client had received before the cut.
    pub text_sent: u64,
    /// Bytes of the answer the client had received before the cut.
    pub bytes_sent: u64,
    /// Bytes of generated text read from the upstream when the rule denied.
    pub text_read: u64,
    /// Who cut: `filter` or `server` (the ext_proc edge).
    pub by: &'static str,
}

/// An answer a response rule denied, for its `response` record.
#[derive(Debug, Clone, Default)]
pub struct CutFacts {
    /// The request's namespace.
    pub namespace: String,
    /// The deciding rule (empty: the answer could not be checked).
    pub rule: String,
    /// Its policy.
    pub policy: String,
    /// The rule's reason.
    pub reason: String,
    /// The status of the error reply or event.
    pub status: u16,
    /// The requested model.
    pub model: Option<String>,
    /// The client's `x-request-id`.
    pub request_id: Option<String>,
    /// Principal attributes present on the request.
    pub principal: std::collections::BTreeMap<String, String>,
    /// Where it was cut.
    pub cut: CutRecord,
}

/// An alert a proxy raised, as its report says.
#[derive(Debug, Clone)]
pub struct AlertFacts {
    /// The request's namespace.
    pub namespace: String,
    /// The deciding rule.
    pub rule: String,
    /// Its policy.
    pub policy: String,
    /// The bundle that decided.
    pub bundle: String,
    /// The alert's severity.
    pub severity: llm_policy_core::model::Alert,
    /// The verdict.
    pub decision: String,
    /// The rule's reason.
    pub reason: String,
    /// The status the client got.
    pub status: u16,
    /// The requested model.
    pub model: Option<String>,
    /// The client's `x-request-id`.
    pub request_id: Option<String>,
    /// Principal attributes present on the request.
    pub principal: std::collections::BTreeMap<String, String>,
}

/// The spend of one request: estimated at the check, actual from the answer's usage.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SpendRecord {
    /// A digest of the reservation handle (the first 16 hex digits of its SHA-256): joins a
    /// request's `decision` and `usage` records without writing the handle, a credential.
    pub reservation: String,
    /// Estimated prompt tokens and the output reserved (`decision` records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_tokens: Option<u64>,
    /// Estimated cost at the model table's prices (`decision` records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_usd: Option<f64>,
    /// The output cap the request was lowered to (`transform.maxTokens`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Tokens charged from the answer's usage (`usage` records; absent: the reservation stood).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<f64>,
    /// Cost charged at the model table's prices (`usage` records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usd: Option<f64>,
}

impl SpendRecord {
    /// The digest a reservation handle is recorded under.
    pub fn digest(handle: &str) -> String {
        use sha2::Digest as _;
        let sum = sha2::Sha256::digest(handle.as_bytes());
        sum.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

/// How a check's principal was established: how, and by which virtual key (its id).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct IdentityRecord {
    /// `jwt`, `api-key`, `trusted-header` or `none`; `filter` on an alert a filter reported.
    pub via: &'static str,
    /// The virtual key's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Where records go.
pub trait Sink: Send {
    /// Writes one JSON line (without the newline).
    fn write(&mut self, line: &str) -> io::Result<()>;
    /// Flushes buffered lines.
    fn flush(&mut self) -> io::Result<()>;
}

/// Standard output.
pub struct StdoutSink(BufWriter<io::Stdout>);

impl StdoutSink {
    /// A sink on standard output.
    pub fn new() -> StdoutSink {
        StdoutSink(BufWriter::new(io::stdout()))
    }
}

impl Default for StdoutSink {
    fn default() -> Self {
        Self::new()
    }
}

impl Sink for StdoutSink {
    fn write(&mut self, line: &str) -> io::Result<()> {
        self.0.write_all(line.as_bytes())?;
        self.0.write_all(b"\n")
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// A file rotated by size: `audit.log` → `audit.log.1` → ... → `audit.log.<keep>`.
pub struct FileSink {
    config: FileSinkConfig,
    out: BufWriter<File>,
    size: u64,
}

impl FileSink {
    /// Opens (appends to) the file.
    pub fn open(config: FileSinkConfig) -> io::Result<FileSink> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.path)?;
        let size = file.metadata()?.len();
        Ok(FileSink {
            config,
            out: BufWriter::new(file),
            size,
        })
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut p = self.config.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.out.flush()?;
        if self.config.keep == 0 {
            std::fs::remove_file(&self.config.path)?;
        } else {
            for n in (1..self.config.keep).rev() {
                let from = self.rotated(n);
                if from.exists() {
                    std::fs::rename(&from, self.rotated(n + 1))?;
                }
            }
            std::fs::rename(&self.config.path, self.rotated(1))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.config.path)?;
        self.out = BufWriter::new(file);
        self.size = 0;
        Ok(())
    }
}

impl Sink for FileSink {
    fn write(&mut self, line: &str) -> io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size.saturating_add(len) > self.config.max_bytes {
            self.rotate()?;
        }
        self.out.write_all(line.as_bytes())?;
        self.out.write_all(b"\n")?;
        self.size = self.size.saturating_add(len);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

enum Msg {
    Record(Box<Record>),
    Shutdown,
}

/// A Redis stream (`XADD <prefix><stream> MAXLEN ~ <maxLen>`; field `record`: the JSON line).
/// The stream has a thread and a bounded queue of its own, so a slow or unreachable Redis never
/// holds up the other sinks: past the queue, records for the stream are dropped and counted
/// (`llm_policy_audit_dropped_total`, `llm_policy_redis_errors_total{feature="audit"}`); while
/// Redis is unreachable they are dropped too, reconnecting at most once a second.
pub struct StreamSink {
    tx: Option<std::sync::mpsc::SyncSender<String>>,
    thread: Option<JoinHandle<()>>,
    metrics: Metrics,
}

/// Appends a batch of lines to the stream in one call (one command, so a Redis Cluster routes
/// it by the stream's key). `KEYS`: the stream. `ARGV`: entries kept, then the lines.
static APPEND: std::sync::LazyLock<super::redis::LuaScript> = std::sync::LazyLock::new(|| {
    super::redis::LuaScript::new(
        r"
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'record', ARGV[i])
end
return 0
",
    )
});

/// Lines a [`StreamSink`] sends in one call at most.
const STREAM_BATCH: usize = 512;

/// Lines waiting for the stream's thread.
const STREAM_QUEUE: usize = 10_000;

/// The stream's thread: its connection and its batching.
struct StreamWriter {
    redis: super::redis::Redis,
    key: String,
    max_len: u64,
    conn: Option<super::redis::Blocking>,
    retry_at: Option<std::time::Instant>,
    metrics: Metrics,
}

impl StreamSink {
    /// A sink on the configured stream (starts its thread).
    pub fn new(redis: super::redis::Redis, config: &super::redis::StreamConfig) -> StreamSink {
        let metrics = redis.metrics().clone();
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(STREAM_QUEUE);
        let mut writer = StreamWriter {
            key: redis.key(&config.stream),
            max_len: config.max_len.max(1),
            redis,
            conn: None,
            retry_at: None,
            metrics: metrics.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(String::from("llm-policy-audit-stream"))
            .spawn(move || {
                // Batches: whatever is queued, up to STREAM_BATCH lines per call.
                while let Ok(first) = rx.recv() {
                    let mut lines = vec![first];
                    while lines.len() < STREAM_BATCH {
                        match rx.try_recv() {
                            Ok(l) => lines.push(l),
                            Err(_) => break,
                        }
                    }
                    writer.send(&lines);
                }
            })
            .ok();
        StreamSink {
            tx: Some(tx),
            thread,
            metrics,
        }
    }
}

impl StreamWriter {
    fn connection(&mut self) -> Result<&mut super::redis::Blocking, super::redis::RedisError> {
        if self.conn.is_none() {
            if self
                .retry_at
                .is_some_and(|at| std::time::Instant::now() < at)
            {
                return Err(super::redis::RedisError::Unavailable);
            }
            let timeout = self.redis.timeout().saturating_mul(4);
            let conn = self.redis.blocking(timeout);
            match conn {
                Ok(c) => {
                    if self.retry_at.take().is_some() {
                        tracing::info!("audit stream: Redis is reachable again");
                    }
                    self.conn = Some(c);
                }
                Err(e) => {
                    self.retry_at =
                        Some(std::time::Instant::now() + std::time::Duration::from_secs(1));
                    return Err(super::redis::RedisError::Failed(e.to_string()));
                }
            }
        }
        self.conn
            .as_mut()
            .ok_or(super::redis::RedisError::Unavailable)
    }

    fn send(&mut self, lines: &[String]) {
        let mut call = APPEND.prepare_invoke();
        call.key(&self.key).arg(self.max_len);
        for line in lines {
            call.arg(line);
        }
        let sent = self.connection().and_then(|c| {
            call.invoke::<()>(&mut **c)
                .map_err(|e| super::redis::RedisError::Failed(e.to_string()))
        });
        if let Err(e) = sent {
            let first = self.retry_at.is_none() || self.conn.is_some();
            self.conn = None;
            if self.retry_at.is_none() {
                self.retry_at = Some(std::time::Instant::now() + std::time::Duration::from_secs(1));
            }
            if first {
                tracing::warn!(error = %e, "audit stream: Redis unreachable, dropping records until it is back");
            }
            self.redis.count_error(super::redis::Feature::Audit, &e);
            self.metrics.audit_dropped.inc_by(lines.len() as u64);
        }
    }
}

impl Sink for StreamSink {
    fn write(&mut self, line: &str) -> io::Result<()> {
        let queued = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(line.to_string()).is_ok());
        if !queued {
            self.metrics.audit_dropped.inc();
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for StreamSink {
    /// Sends what is queued (each batch bounded by the Redis deadlines), then stops the thread.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The handle checks record through: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Msg>,
    /// Where alert records are delivered besides the log (webhooks, Alertmanager).
    alerts: super::alerts::Alerts,
    metrics: Metrics,
    scope: AuditScope,
    prompts: PromptLogging,
    prompt_key: Arc<[u8]>,
    sequence: Arc<AtomicU64>,
    context: bool,
}

/// The writer thread; [`Writer::shutdown`] drains the queue and joins it.
pub struct Writer {
    tx: mpsc::Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

/// Opens the sinks the configuration names (and the Redis stream, when given) and starts the
/// writer thread.
pub fn start(
    config: &AuditConfig,
    metrics: Metrics,
    stream: Option<StreamSink>,
) -> io::Result<(Audit, Writer)> {
    if config.prompts == PromptLogging::Hash && config.prompt_hash_key_file.is_none() {
        tracing::warn!(
            "audit.prompts is `hash` without audit.promptHashKeyFile: prompts are keyed with a \
             random key, so equal prompts match only within this process"
        );
    }
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if config.stdout {
        sinks.push(Box::new(StdoutSink::new()));
    }
    if let Some(f) = &config.file {
        sinks.push(Box::new(FileSink::open(f.clone())?));
    }
    if let Some(o) = &config.otlp {
        sinks.push(Box::new(otlp::OtlpSink::new(o)?));
    }
    if let Some(s) = stream {
        sinks.push(Box::new(s));
    }
    Ok(start_with(config, metrics, sinks))
}

/// Starts the writer thread on the given sinks.
pub fn start_with(
    config: &AuditConfig,
    metrics: Metrics,
    sinks: Vec<Box<dyn Sink>>,
) -> (Audit, Writer) {
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    let prompt_key: Arc<[u8]> = match config
        .prompt_hash_key_file
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
    {
        Some(k) if k.len() >= 16 => Arc::from(k),
        _ => {
            let mut k = [0u8; 32];
            let _ = getrandom::fill(&mut k);
            Arc::from(k.as_slice())
        }
    };
    let m = metrics.clone();
    let thread = std::thread::Builder::new()
        .name(String::from("llm-policy-audit"))
        .spawn(move || write_loop(rx, sinks, &m))
        .ok();
    let audit = Audit {
        tx: tx.clone(),
        metrics,
        scope: config.decisions,
        prompts: config.prompts,
        context: config.context,
        alerts: super::alerts::Alerts::default(),
        prompt_key,
        sequence: Arc::new(AtomicU64::new(0)),
    };
    (audit, Writer { tx, thread })
}

fn write_loop(mut rx: mpsc::Receiver<Msg>, mut sinks: Vec<Box<dyn Sink>>, metrics: &Metrics) {
    let write = |r: &Record, sinks: &mut Vec<Box<dyn Sink>>| {
        metrics.audit_queue.dec();
        let line = match serde_json::to_string(r) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize an audit record");
                return;
            }
        };
        for s in sinks.iter_mut() {
            if let Err(e) = s.write(&line) {
                tracing::error!(error = %e, "cannot write an audit record");
            }
        }
    };
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Msg::Record(r) => {
                write(&r, &mut sinks);
                // Flush when the queue is empty: batches under load, prompt when idle.
                if rx.is_empty() {
                    flush(&mut sinks);
                }
            }
            Msg::Shutdown => {
                // Refuse new records, write everything already accepted.
                rx.close();
                while let Ok(msg) = rx.try_recv() {
                    if let Msg::Record(r) = msg {
                        write(&r, &mut sinks);
                    }
                }
                break;
            }
        }
    }
    flush(&mut sinks);
}

fn flush(sinks: &mut [Box<dyn Sink>]) {
    for s in sinks.iter_mut() {
        if let Err(e) = s.flush() {
            tracing::error!(error = %e, "cannot flush the audit log");
        }
    }
}

/// What a check leaves behind for its audit record: what the engine knew when it answered.
#[derive(Debug)]
pub struct CheckFacts<'a> {
    /// The decision, when there was one.
    pub decision: Option<&'a Decision>,
    /// Why there was none: the request was rejected, or the check failed.
    pub error: Option<&'a ErrorDetail>,
    /// The check failed (the failure mode answered).
    pub failed: bool,
    /// The request context, when it could be built.
    pub ctx: Option<&'a RequestContext>,
    /// How the request's identity was established.
    pub identity: &'a IdentityRecord,
    /// The HTTP status the client got (200 when the request went upstream).
    pub status: u16,
    /// The registry version that decided (0: none loaded).
    pub version: u64,
    /// Its bundle digest.
    pub bundle: &'a str,
    /// The cache level that answered.
    pub cache: Option<&'static str>,
    /// How long the check took.
    pub latency: std::time::Duration,
    /// The W3C trace id, when the request carried one.
    pub trace_id: Option<String>,
    /// The client's `x-request-id`, when short enough.
    pub request_id: Option<String>,
    /// What an allowed request reserved.
    pub spend: Option<SpendRecord>,
}

impl CheckFacts<'_> {
    /// The verdict as the audit log names it (`error` for a failed check, `deny` for a rejected
    /// request).
    pub fn verdict(&self) -> &'static str {
        match (self.decision, self.failed) {
            (Some(d), _) => d.decision.as_str(),
            (None, true) => "error",
            (None, false) => "deny",
        }
    }
}

impl Record {
    /// The decision record of a check (`id` from [`Audit::next_id`], `prompt` as configured).
    pub fn of(facts: &CheckFacts<'_>, id: String, prompt: Option<String>) -> Record {
        let d = facts.decision;
        let ctx = facts.ctx;
        let reason = match (d, facts.error) {
            (Some(d), _) => d.reason.clone(),
            (None, Some(e)) => e.message.clone(),
            (None, None) => String::new(),
        };
        Record {
            kind: "decision",
            id,
            request_id: facts.request_id.clone(),
            time: rfc3339(std::time::SystemTime::now()),
            namespace: d
                .map(|d| d.metadata.namespace.clone())
                .or_else(|| ctx.map(|c| c.namespace.clone()))
                .unwrap_or_default(),
            policy: d.map(|d| d.metadata.policy.clone()).unwrap_or_default(),
            policy_version: d.map(|d| d.metadata.version.clone()).unwrap_or_default(),
            version: facts.version,
            bundle: facts.bundle.to_string(),
            principal: ctx
                .map(|c| c.principal_present().collect())
                .unwrap_or_default(),
            identity: facts.identity.clone(),
            model: ctx.and_then(|c| c.request.model.clone()),
            decision: facts.verdict().to_string(),
            status: facts.status,
            matched_rules: d.map(|d| d.matched_rules.clone()).unwrap_or_default(),
            reason,
            latency_us: u64::try_from(facts.latency.as_micros()).unwrap_or(u64::MAX),
            cache: facts.cache,
            trace_id: facts.trace_id.clone(),
            alert: d.and_then(|d| d.actions.alert),
            prompt,
            spend: facts.spend.clone(),
            cut: None,
            redacted: d
                .and_then(|d| d.actions.redact.as_ref())
                .map(|r| r.counts.clone())
                .unwrap_or_default(),
            deciding_rule: d.and_then(|d| d.metadata.deciding_rule.clone()),
            canary: None,
            context: None,
        }
    }
}

impl Audit {
    /// Records a check as configured: its decision record when the scope wants it, and an alert
    /// record when a rule raised one.
    pub fn record_check(&self, facts: &CheckFacts<'_>) {
        let d = facts.decision;
        let alert = d.and_then(|d| d.actions.alert);
        let wants = self.wants(facts.verdict(), d.is_some_and(|d| d.actions.audit));
        if !wants && alert.is_none() {
            return;
        }
        let prompt = facts.ctx.and_then(|c| self.prompt_field(&c.request.prompt));
        let mut record = Record::of(facts, self.next_id(), prompt);
        record.context = facts.ctx.and_then(|c| self.context_field(c));
        if alert.is_some() {
            let alert = Record {
                kind: "alert",
                id: self.next_id(),
                ..record.clone()
            };
            self.deliver(&alert);
            self.record(alert);
        }
        if wants {
            self.record(record);
        }
    }

    /// Records an alert a proxy raised in a decision it made alone (reported with its usage
    /// reports), and delivers it as the server's own.
    pub fn record_alert(&self, facts: AlertFacts) {
        let record = Record {
            kind: "alert",
            id: self.next_id(),
            request_id: facts.request_id,
            time: rfc3339(std::time::SystemTime::now()),
            namespace: facts.namespace,
            policy: facts.policy,
            bundle: facts.bundle,
            principal: facts.principal,
            identity: IdentityRecord {
                via: "filter",
                key: None,
            },
            model: facts.model,
            decision: facts.decision,
            status: facts.status,
            matched_rules: if facts.rule.is_empty() {
                Vec::new()
            } else {
                vec![facts.rule.clone()]
            },
            deciding_rule: (!facts.rule.is_empty()).then_some(facts.rule),
            reason: facts.reason,
            alert: Some(facts.severity),
            ..Record::default()
        };
        self.deliver(&record);
        self.record(record);
    }

    /// Hands an alert record to the alert sinks (when any is configured).
    fn deliver(&self, record: &Record) {
        if !self.alerts.enabled() {
            return;
        }
        let mut body = record.clone();
        body.context = None;
        self.alerts.deliver(super::alerts::AlertEvent {
            id: record.id.clone(),
            time: record.time.clone(),
            severity: record
                .alert
                .map(|a| format!("{a:?}").to_ascii_lowercase())
                .unwrap_or_default(),
            rule: record
                .deciding_rule
                .clone()
                .or_else(|| record.matched_rules.first().cloned())
                .unwrap_or_default(),
            namespace: record.namespace.clone(),
            decision: record.decision.clone(),
            status: record.status,
            reason: record.reason.clone(),
            model: record.model.clone(),
            request_id: record.request_id.clone(),
            body: serde_json::to_vec(&body).unwrap_or_default(),
        });
    }

    /// Delivers alert records to `alerts` too.
    pub fn with_alerts(mut self, alerts: super::alerts::Alerts) -> Audit {
        self.alerts = alerts;
        self
    }

    /// Records what an answer's usage charged a reservation (a `usage` record), when the audit
    /// log records anything.
    pub fn record_usage(&self, spend: SpendRecord) {
        if self.scope == AuditScope::None {
            return;
        }
        self.record(Record {
            kind: "usage",
            id: self.next_id(),
            time: rfc3339(std::time::SystemTime::now()),
            spend: Some(spend),
            ..Record::default()
        });
    }

    /// Records an answer a response rule denied (a `response` record: a deny, so every scope
    /// but `none` wants it).
    pub fn record_cut(&self, facts: CutFacts) {
        if self.scope == AuditScope::None {
            return;
        }
        self.record(Record {
            kind: "response",
            id: self.next_id(),
            request_id: facts.request_id,
            time: rfc3339(std::time::SystemTime::now()),
            namespace: facts.namespace,
            policy: facts.policy,
            principal: facts.principal,
            model: facts.model,
            decision: String::from("deny"),
            status: facts.status,
            matched_rules: if facts.rule.is_empty() {
                Vec::new()
            } else {
                vec![facts.rule]
            },
            reason: facts.reason,
            cut: Some(facts.cut),
            ..Record::default()
        });
    }

    /// Whether a decision with this verdict and `audit` flag is recorded.
    pub fn wants(&self, verdict: &str, flagged: bool) -> bool {
        match self.scope {
            AuditScope::All => true,
            AuditScope::Flagged => flagged || verdict != "allow",
            AuditScope::None => false,
        }
    }

    /// How prompts are logged.
    pub fn prompts(&self) -> PromptLogging {
        self.prompts
    }

    /// Records a check a canary's candidate decided otherwise: the serving decision in the
    /// record's fields, the candidate's in `canary` (`versions`: the registry version and
    /// bundle serving, the candidate's bundle). Always recorded, whatever `decisions` says.
    pub fn record_canary(
        &self,
        active: &Decision,
        candidate: &Decision,
        ctx: &RequestContext,
        (version, bundle, candidate_bundle): (u64, &str, &str),
        request_id: Option<String>,
    ) {
        self.record(Record {
            kind: "canary",
            id: self.next_id(),
            request_id,
            time: rfc3339(std::time::SystemTime::now()),
            namespace: active.metadata.namespace.clone(),
            policy: active.metadata.policy.clone(),
            policy_version: active.metadata.version.clone(),
            version,
            bundle: bundle.to_string(),
            principal: ctx.principal_present().collect(),
            model: ctx.request.model.clone(),
            decision: active.decision.as_str().to_string(),
            matched_rules: active.matched_rules.clone(),
            reason: active.reason.clone(),
            deciding_rule: active.metadata.deciding_rule.clone(),
            canary: Some(CanaryRecord {
                bundle: candidate_bundle.to_string(),
                decision: candidate.decision.as_str().to_string(),
                deciding_rule: candidate.metadata.deciding_rule.clone(),
                matched_rules: candidate.matched_rules.clone(),
                reason: candidate.reason.clone(),
            }),
            context: self.context_field(ctx),
            ..Record::default()
        });
    }

    /// Whether decision records carry their context (`audit.context`).
    pub fn records_context(&self) -> bool {
        self.context
    }

    /// The context as a record holds it (`audit.context`), else `None`.
    pub fn context_field(
        &self,
        ctx: &llm_policy_core::RequestContext,
    ) -> Option<Box<llm_policy_core::RequestContext>> {
        self.context.then(|| {
            Box::new(recorded_context(ctx, |t| {
                self.prompt_field(t).unwrap_or_default()
            }))
        })
    }

    /// The prompt as configured for a record.
    pub fn prompt_field(&self, prompt: &str) -> Option<String> {
        prompt_field(self.prompts, &self.prompt_key, prompt)
    }

    /// A fresh record id, unique within this process run.
    pub fn next_id(&self) -> String {
        let n = self.sequence.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{n:x}", start_nanos())
    }

    /// Queues a record; drops (and counts) it when the queue is full or closed.
    pub fn record(&self, record: Record) {
        self.metrics.audit_queue.inc();
        if self.tx.try_send(Msg::Record(Box::new(record))).is_err() {
            self.metrics.audit_queue.dec();
            self.metrics.audit_dropped.inc();
        }
    }
}

impl Writer {
    /// Writes everything queued, flushes the sinks and stops the thread; gives up after
    /// `timeout` (a sink that blocks, e.g. a full pipe) with an error log rather than hang.
    pub async fn shutdown(mut self, timeout: std::time::Duration) {
        let drain = async {
            // Waits for room when the queue is full: every record already accepted is written.
            let _ = self.tx.send(Msg::Shutdown).await;
            if let Some(t) = self.thread.take() {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
        };
        if tokio::time::timeout(timeout, drain).await.is_err() {
            tracing::error!(
                queued = self.tx.max_capacity() - self.tx.capacity(),
                "the audit sink did not drain in time: queued records are lost"
            );
        }
    }
}

/// The prompt as configured: `None` (off), its HMAC-SHA256 under `key`, or its shape (every run
/// of letters and digits replaced by its length).
pub fn prompt_field(mode: PromptLogging, key: &[u8], prompt: &str) -> Option<String> {
    use hmac::Mac as _;
    match mode {
        PromptLogging::Off => None,
        PromptLogging::Hash => {
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).ok()?;
            mac.update(prompt.as_bytes());
            let tag = mac.finalize().into_bytes();
            Some(format!(
                "hmac-sha256:{}",
                tag.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ))
        }
        PromptLogging::Redact => {
            let mut out = String::new();
            let mut run = 0usize;
            for c in prompt.chars().chain(std::iter::once(' ')) {
                if c.is_alphanumeric() {
                    run = run.saturating_add(1);
                } else {
                    if run > 0 {
                        out.push_str(&format!("[{run}]"));
                        run = 0;
                    }
                    out.push(c);
                }
            }
            out.pop();
            Some(out)
        }
    }
}

fn start_nanos() -> u128 {
    static START: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    *START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    })
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-25T18:03:07.123Z`.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm), all in u64.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Memory(Arc<Mutex<Vec<String>>>);

    impl Sink for Memory {
        fn write(&mut self, line: &str) -> io::Result<()> {
            self.0
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?
                .push(line.to_string());
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Blocks the writer until released, so the queue fills.
    struct Gate(Arc<Mutex<()>>, Memory);

    impl Sink for Gate {
        fn write(&mut self, line: &str) -> io::Result<()> {
            drop(self.0.lock());
            self.1.write(line)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn dates_are_rfc3339() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_795_629_787_123);
        assert_eq!(rfc3339(t), "2026-11-25T18:03:07.123Z");
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn prompts_are_hashed_or_redacted_never_copied() {
        let key = b"0123456789abcdef";
        assert_eq!(prompt_field(PromptLogging::Off, key, "secret"), None);
        let h = prompt_field(PromptLogging::Hash, key, "my secret").unwrap();
        assert!(h.starts_with("hmac-sha256:") && !h.contains("secret"));
        assert_eq!(
            h,
            prompt_field(PromptLogging::Hash, key, "my secret").unwrap()
        );
        assert_ne!(
            h,
            prompt_field(PromptLogging::Hash, b"another key 1234", "my secret").unwrap()
        );
        assert_eq!(
            prompt_field(PromptLogging::Redact, key, "my card 4111-1111!").unwrap(),
            "[2] [4] [4]-[4]!"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_drops_and_counts_and_shutdown_writes_every_accepted_record() {
        let metrics = Metrics::new().unwrap();
        let gate = Arc::new(Mutex::new(()));
        let memory = Memory::default();
        let config = AuditConfig {
            queue: 10,
            ..AuditConfig::default()
        };
        let held = gate.lock().unwrap();
        let (audit, writer) = start_with(
            &config,
            metrics.clone(),
            vec![Box::new(Gate(Arc::clone(&gate), memory.clone()))],
        );
        for i in 0..50 {
            audit.record(Record {
                kind: "decision",
                id: i.to_string(),
                ..Record::default()
            });
        }
        // The writer holds at most one record; the queue holds 10.
        let dropped = metrics.audit_dropped.get();
        assert!((39..=40).contains(&dropped), "dropped {dropped}");
        drop(held);
        writer.shutdown(std::time::Duration::from_secs(5)).await;
        let lines = memory.0.lock().unwrap().clone();
        assert_eq!(lines.len() as u64, 50 - dropped);
        assert!(lines[0].contains("\"id\":\"0\""));
        assert_eq!(metrics.audit_queue.get(), 0);
        // After shutdown nothing is accepted, and nothing blocks.
        audit.record(Record::default());
        assert_eq!(metrics.audit_dropped.get(), dropped + 1);
    }

    #[test]
    fn the_file_rotates_by_size_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut s = FileSink::open(FileSinkConfig {
            path: path.clone(),
            max_bytes: 100,
            keep: 2,
        })
        .unwrap();
        for i in 0..20 {
            s.write(&format!("{i:040}")).unwrap();
        }
        s.flush().unwrap();
        assert!(path.exists());
        assert!(dir.path().join("audit.log.1").exists());
        assert!(dir.path().join("audit.log.2").exists());
        assert!(!dir.path().join("audit.log.3").exists());
        let last = std::fs::read_to_string(&path).unwrap();
        assert!(last.ends_with(&format!("{:040}\n", 19)));
        assert!(last.len() <= 100);
    }
}
