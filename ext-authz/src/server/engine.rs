//! One check, whatever protocol asked: build the context, look in the decision caches, evaluate
//! with the version serving, answer the core's needs (counters, WASM plugins), settle
//! reservations, render the reply, count and record it. Never longer than the deadline: past
//! it, the failure mode answers and nothing is charged.
//!
//! Protocol edges ([`super::envoy`], [`super::api`], [`super::rest`]) build a [`CheckInput`] and
//! turn the [`Checked`] into their own types.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tracing::field::Empty;
use tracing::Instrument as _;

use llm_policy_core::context::Needs;
use llm_policy_core::decision::{
    Charge, ChargeSource, CounterKind, Decision, ErrorBody, ErrorDetail, Verdict,
};
use llm_policy_core::gen_ai::{self, GenAiUsage};
use llm_policy_core::identity::{IdentityMode, KeyError};
use llm_policy_core::model::PluginRef;
use llm_policy_core::model::Scope;
use llm_policy_core::prompt_scan::Unscanned;
use llm_policy_core::redact;
use llm_policy_core::reply::{self, LimitState, Reply};
use llm_policy_core::rewrite::{add_include_usage, usage_needs_asking};
use llm_policy_core::wire::{self, LocalCounted};
use llm_policy_core::{
    Answer, ContextError, CounterCheck, DecisionKey, EvalOptions, Need, NeedId, NeedKind, Pending,
    PluginCheck, RequestContext, RequestInput, Step, Timing,
};

use super::audit::{Audit, CheckFacts, IdentityRecord, SpendRecord};
use super::cache::{Caches, Level, RemoteCache};
use super::canary::{Canary, CanaryStatus};
use super::config::{CheckConfig, FailureMode, LimitsConfig, PromptLogging, Unreported};
use super::key_store::KeyStore;
use super::limits::{CounterStore, ReservationId, Reserved, StoreError};
use super::metrics::Metrics;
use super::plugins::Plugins;
use super::registry::{Registry, Version};

/// A request as a protocol edge hands it over.
#[derive(Debug, Clone, Default)]
pub struct CheckInput {
    /// HTTP method.
    pub method: String,
    /// Path with the query.
    pub path: String,
    /// Headers (pseudo-headers such as `:authority` allowed).
    pub headers: Vec<(String, String)>,
    /// Body bytes (what the proxy buffered).
    pub body: Vec<u8>,
    /// The proxy buffered only part of the body (it is larger than the proxy's limit).
    pub partial_body: bool,
    /// Evaluation time for the rules (Unix seconds); now when absent. Counters always use the
    /// server's clock.
    pub now: Option<i64>,
    /// Report every rule's outcome; bypasses the caches.
    pub explain: bool,
    /// Reserve and commit counters (a request that will go ahead). Without it counters are only
    /// read: a dry run that consumes nothing.
    pub charge: bool,
    /// The proxy (the llm-policy filter) already counted the local-scope limits (`scope:
    /// local`): the rules whose counter was over, with its state. They are answered from here,
    /// not counted again. `None`: this server counts them (ext_authz-only deployments).
    pub local_counted: Option<LocalCounted>,
    /// How the proxy established the request's identity (its route configuration says so, or
    /// the filter): `api-key` makes the server look the key up. `None`: not said (the REST
    /// API, an older proxy configuration), so the identity headers are taken as sent.
    pub identity: Option<IdentityMode>,
}

/// The outcome of a check.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The decision (absent when the request was rejected before evaluation or the check
    /// failed).
    pub decision: Option<Decision>,
    /// The local reply (deny, throttle, rejected request, failure); `None`: let the request
    /// through with [`Checked::upstream`] added.
    pub reply: Option<Reply>,
    /// Headers to add to a request that goes ahead.
    pub upstream: Vec<(String, String)>,
    /// Headers to add to the answer of a request that goes ahead: its lowered output cap
    /// ([`wire::MAX_TOKENS_HEADER`]), what its counters have left (`remainingHeaders`).
    pub respond: Vec<(String, String)>,
    /// The token and cost reservations waiting for the answer's usage (an allowed request some
    /// budget or token limit counts): never a header to the provider; the ext_authz edge puts
    /// it in Envoy's dynamic metadata, the API edges hand the handle to their caller.
    pub reservation: Option<wire::Reservation>,
    /// With a reservation: the request is an OpenAI stream whose client did not ask for its
    /// usage, so the answer must be made to report it ([`wire::Grant::include_usage`]).
    pub include_usage: bool,
    /// Response rules check the answer of this allowed request: what they read of it
    /// ([`wire::Grant::answer`]).
    pub answer: Option<wire::AnswerCheck>,
    /// The request asked for its answer streamed ([`wire::Grant::stream`]).
    pub stream: bool,
    /// The registry version that decided (or was serving when the check failed).
    pub version: Option<Arc<Version>>,
    /// The cache level that answered.
    pub cache: Option<Level>,
    /// Why there is no decision: the request was rejected (400 / 413) or the check failed (503,
    /// or let through in failure mode open).
    pub error: Option<ErrorDetail>,
}

impl Checked {
    /// The number of the version that decided (0 when none was loaded).
    pub fn version_number(&self) -> u64 {
        self.version.as_ref().map_or(0, |v| v.number)
    }
}

/// Why a check could not decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// No policy loaded yet.
    NotReady,
    /// The deadline passed.
    Deadline,
    /// The counter store failed.
    Store,
    /// Evaluation stopped unexpectedly (a bug: logged).
    Internal,
}

impl Failure {
    fn as_str(self) -> &'static str {
        match self {
            Failure::NotReady => "not_ready",
            Failure::Deadline => "deadline",
            Failure::Store => "store",
            Failure::Internal => "internal",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Failure::NotReady => "the policy server has no policy loaded yet",
            Failure::Deadline => "the policy check did not finish in time",
            Failure::Store => "the rate-limit store is unavailable",
            Failure::Internal => "the policy check failed",
        }
    }
}

/// Bodies above this are parsed and evaluated on the blocking pool, so a few large requests
/// never stall the async workers that serve small ones.
const INLINE_BODY_BYTES: usize = 64 * 1024;

/// Whether a request's body is too large to evaluate on a runtime worker.
fn is_long(ctx: &RequestContext) -> bool {
    ctx.request.body_bytes > i64::try_from(INLINE_BODY_BYTES).unwrap_or(i64::MAX)
}

/// Longest client `x-request-id` kept in an audit record.
const MAX_REQUEST_ID: usize = 128;

/// Usage reported for an allowed request (`POST /v1/usage`, `RecordUsage`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// Tokens used (prompt + completion).
    pub tokens: Option<f64>,
    /// Cost in US dollars.
    pub usd: Option<f64>,
    /// What the GenAI metrics record of the answer.
    pub gen_ai: Option<GenAiUsage>,
}

/// The check engine, shared by every protocol edge.
pub struct Engine {
    registry: Arc<Registry>,
    store: Arc<dyn CounterStore>,
    caches: Caches,
    remote: Option<RemoteCache>,
    /// The plugins, and a permit per instance slot.
    plugins: Option<(Plugins, Arc<tokio::sync::Semaphore>)>,
    metrics: Metrics,
    audit: Audit,
    check: CheckConfig,
    limits: LimitsConfig,
    /// The virtual API keys.
    keys: Arc<KeyStore>,
    /// The canary running, if any (`PUT /v1/canary`).
    canary: arc_swap::ArcSwapOption<Canary>,
    /// Canary decisions in flight at most: past it a sampled check is skipped (counted), so a
    /// canary never takes more than this of the plugin slots, the blocking pool or Redis.
    canary_slots: Arc<tokio::sync::Semaphore>,
    /// The canary last run (its status after it ended).
    last_canary: std::sync::Mutex<Option<Arc<Canary>>>,
    /// This engine, once shared (`Engine::bind`): canary decisions run in tasks of their own.
    me: std::sync::OnceLock<std::sync::Weak<Engine>>,
}

/// Canary decisions in flight at most ([`Engine::decide_again`]).
const CANARY_IN_FLIGHT: usize = 16;

/// Milliseconds since the Unix epoch.
fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs CPU work inline, or on the blocking pool when it may be long.
async fn cpu<T: Send + 'static>(
    long: bool,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Failure> {
    if long {
        tokio::task::spawn_blocking(f).await.map_err(|e| {
            tracing::error!(error = %e, "evaluation task failed");
            Failure::Internal
        })
    } else {
        Ok(f())
    }
}

/// A fresh reservation handle: 128 bits from the OS's CSPRNG.
fn reservation_handle() -> Option<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).ok()?;
    Some(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Engine {
    /// An engine over these parts.
    pub fn new(
        registry: Arc<Registry>,
        store: Arc<dyn CounterStore>,
        caches: Caches,
        metrics: Metrics,
        audit: Audit,
        check: CheckConfig,
        limits: LimitsConfig,
    ) -> Engine {
        Engine {
            registry,
            store,
            caches,
            remote: None,
            plugins: None,
            metrics,
            audit,
            check,
            limits,
            keys: Arc::new(KeyStore::empty()),
            canary: arc_swap::ArcSwapOption::empty(),
            canary_slots: Arc::new(tokio::sync::Semaphore::new(CANARY_IN_FLIGHT)),
            last_canary: std::sync::Mutex::new(None),
            me: std::sync::OnceLock::new(),
        }
    }

    /// Lets the engine hand work to tasks of its own (a canary's decisions, after the check
    /// answered). Call once it is in its `Arc`; without it, canaries decide nothing.
    pub fn bind(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
    }

    /// Starts a canary (replacing one running, which is aborted).
    pub fn start_canary(&self, canary: Canary) -> CanaryStatus {
        let canary = Arc::new(canary);
        if let Some(old) = self.canary.swap(Some(Arc::clone(&canary))) {
            old.end("aborted", String::from("replaced by a new canary"));
        }
        if let Ok(mut last) = self.last_canary.lock() {
            *last = Some(Arc::clone(&canary));
        }
        tracing::info!(
            candidate = canary.version.set.bundle(),
            sample = canary.sample,
            "canary started"
        );
        canary.status()
    }

    /// The canary running, if any.
    pub fn canary(&self) -> Option<Arc<Canary>> {
        self.canary.load_full()
    }

    /// The status of the canary running, or of the last one.
    pub fn canary_status(&self) -> Option<CanaryStatus> {
        self.last_canary
            .lock()
            .ok()
            .and_then(|l| l.as_ref().map(|c| c.status()))
    }

    /// Ends `canary` if it is still the one running (a newer one started meanwhile stays).
    pub fn end_this_canary(&self, canary: &Arc<Canary>, state: &str, reason: &str) -> bool {
        let previous = self
            .canary
            .compare_and_swap(&Some(Arc::clone(canary)), None::<Arc<Canary>>);
        let ended = previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, canary));
        if ended {
            canary.end(state, reason.to_string());
        }
        ended
    }

    /// Ends the canary running (`promoted`, `aborted`): the one ended, or `None`.
    pub fn end_canary(&self, state: &str, reason: &str) -> Option<Arc<Canary>> {
        let canary = self.canary.swap(None)?;
        canary.end(state, reason.to_string());
        Some(canary)
    }

    /// Decides `ctx` again with the canary's candidate, off the check's time (a task of its
    /// own): plugins run, counters are read and never charged. A different verdict is counted,
    /// recorded with both decisions, and may abort the canary.
    fn decide_again(&self, checked: &Checked, ctx: RequestContext, request_id: Option<String>) {
        let (Some(canary), Some(active)) = (self.canary.load_full(), checked.decision.as_ref())
        else {
            return;
        };
        if !canary.sampled() {
            return;
        }
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        // Bounded: a canary never queues work in front of real checks. A body too large to
        // decide on a runtime worker is skipped too.
        let long = is_long(&ctx);
        let permit = match Arc::clone(&self.canary_slots).try_acquire_owned() {
            Ok(p) if !long => p,
            _ => {
                self.metrics
                    .canary_evaluations
                    .with_label_values(&["skipped"])
                    .inc();
                return;
            }
        };
        let active = active.clone();
        let bundle = checked
            .version
            .as_deref()
            .map(|v| v.set.bundle().to_string())
            .unwrap_or_default();
        let version = checked.version_number();
        tokio::spawn(async move {
            let mut counting = Counting {
                held: Held::new(Arc::clone(&me.store)),
                over: Vec::new(),
                remaining: Vec::new(),
                charge: false,
                local: None,
                now: unix_now(),
                ask_usage: false,
            };
            let _permit = permit;
            let budget = me.check.deadline();
            let deadline = Instant::now() + budget;
            let decided = tokio::time::timeout(
                budget,
                me.evaluate(
                    &canary.version,
                    ctx.into(),
                    // (The candidate's bundle keys its own decisions.)
                    None,
                    false,
                    &mut counting,
                    deadline,
                ),
            )
            .await
            .unwrap_or(Err(Failure::Deadline));
            let (candidate, ctx) = match decided {
                Ok(d) => d,
                Err(f) => {
                    me.metrics
                        .canary_evaluations
                        .with_label_values(&["error"])
                        .inc();
                    tracing::debug!(reason = f.as_str(), "canary could not decide");
                    return;
                }
            };
            let from = active.decision.as_str();
            let to = candidate.decision.as_str();
            let rule = candidate
                .metadata
                .deciding_rule
                .clone()
                .unwrap_or_else(|| String::from("default"));
            let abort = canary.count(from, to, &rule);
            me.metrics
                .canary_evaluations
                .with_label_values(&[if from == to { "agree" } else { "disagree" }])
                .inc();
            if from != to {
                me.metrics
                    .canary_disagreements
                    .with_label_values(&[from, to, &rule])
                    .inc();
                me.audit.record_canary(
                    &active,
                    &candidate,
                    &ctx,
                    (version, &bundle, canary.version.set.bundle()),
                    request_id,
                );
            }
            if abort {
                let reason = format!(
                    "{} disagreements reached maxDisagreements",
                    canary.status().disagreements
                );
                // Only the canary that counted it: a newer one started meanwhile stays.
                me.end_this_canary(&canary, "aborted", &reason);
            }
        });
    }

    /// Uses these virtual API keys (none by default).
    pub fn with_keys(mut self, keys: Arc<KeyStore>) -> Engine {
        self.keys = keys;
        self
    }

    /// The virtual API keys.
    pub fn keys(&self) -> &Arc<KeyStore> {
        &self.keys
    }

    /// Establishes who the request is: for `api-key`, looks the key up and writes its identity
    /// into the headers (the client's identity headers were removed by the proxy; any left are
    /// replaced). Returns how, or why the key was refused.
    fn identify(
        &self,
        input: &mut CheckInput,
        version: Option<&Version>,
    ) -> (IdentityRecord, Option<KeyError>) {
        let mode = input.identity.unwrap_or(IdentityMode::TrustedHeaders);
        let mut identified = IdentityRecord {
            via: mode.via(),
            key: None,
        };
        if mode != IdentityMode::ApiKeys {
            return (identified, None);
        }
        let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
        let keys = self.keys.snapshot();
        match keys.table.authenticate(&input.headers, now) {
            Ok(record) => {
                if let Some(v) = version {
                    record.assert(v.set.config(), &mut input.headers);
                }
                identified.key = Some(record.id.clone());
                (identified, None)
            }
            Err(e) => (identified, Some(e)),
        }
    }

    /// Adds the L4 cache (Redis), asked after the in-process caches miss.
    pub fn with_remote_cache(mut self, remote: Option<RemoteCache>) -> Engine {
        self.remote = remote;
        self
    }

    /// Adds the WASM plugins plugin conditions run in (without them, plugin rules answer per
    /// their `onError`).
    pub fn with_plugins(mut self, plugins: Option<Plugins>) -> Engine {
        // Plugins are CPU-bound: more calls at once than cores only make every one of them
        // slower (and past its deadline); the rest wait, bounded by their check's deadline.
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        self.plugins = plugins.map(|p| {
            let slots = usize::try_from(p.limits().max_concurrent_calls).unwrap_or(1);
            (
                p,
                Arc::new(tokio::sync::Semaphore::new(slots.min(cores).max(1))),
            )
        });
        self
    }

    /// The registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Checks one request within the deadline.
    pub async fn check(&self, mut input: CheckInput) -> Checked {
        let started = Instant::now();
        let provider = reply::provider_of(&input.path, &input.headers);
        let trace_id = trace_id(&input.headers);
        let request_id = header(&input.headers, "x-request-id")
            .filter(|id| id.len() <= MAX_REQUEST_ID)
            .map(str::to_string);
        // Live traffic: a proxy's check (it charges counters, at the server's own time). An
        // evaluation through the API (a dry run, or a caller's time) is not: a canary ignores it.
        let live = input.charge && input.now.is_none();
        // One version for the whole check: decision, audit and metrics agree even across a swap.
        let version = self.registry.current();
        let deadline = self.check.deadline();
        // Disabled (free) unless traces are exported.
        let span = tracing::debug_span!(
            "check",
            otel.kind = "server",
            http.method = %input.method,
            decision = Empty,
            namespace = Empty,
            rule = Empty,
            cache = Empty,
        );
        super::telemetry::continue_trace(&span, &input.headers);
        let (identity, refused) = self.identify(&mut input, version.as_deref());
        let result = match refused {
            Some(e) => Ok((unauthenticated(version.clone(), e, provider), None)),
            None => tokio::time::timeout(
                deadline,
                self.decide(input, provider, version.clone(), started, deadline),
            )
            .instrument(span.clone())
            .await
            .unwrap_or(Err(Failure::Deadline)),
        };
        let latency = started.elapsed();
        self.metrics.check.observe(latency.as_secs_f64());
        let (checked, ctx, failure) = match result {
            Ok((checked, ctx)) => (checked, ctx, None),
            Err(f) => {
                self.metrics
                    .check_errors
                    .with_label_values(&[f.as_str()])
                    .inc();
                tracing::warn!(
                    reason = f.as_str(),
                    failure_mode = ?self.check.failure_mode,
                    "check could not decide"
                );
                (self.failed(f, provider, version), None, Some(f))
            }
        };
        if !span.is_disabled() {
            let verdict = checked.decision.as_ref().map_or(
                if failure.is_some() {
                    "error"
                } else {
                    "rejected"
                },
                |d| d.decision.as_str(),
            );
            span.record("decision", verdict);
            if let Some(d) = &checked.decision {
                span.record("namespace", d.metadata.namespace.as_str());
                span.record(
                    "rule",
                    d.metadata.deciding_rule.as_deref().unwrap_or("default"),
                );
            }
            if let Some(level) = checked.cache {
                span.record("cache", level.as_str());
            }
        }
        self.count(&checked);
        self.record(
            &checked,
            ctx.as_ref(),
            &identity,
            latency,
            trace_id,
            request_id.clone(),
            failure,
        );
        if let (true, Some(ctx)) = (live, ctx) {
            self.decide_again(&checked, ctx, request_id);
        }
        checked
    }

    fn failed(
        &self,
        f: Failure,
        provider: llm_policy_core::context::Provider,
        version: Option<Arc<Version>>,
    ) -> Checked {
        let error = Some(ErrorDetail {
            code: String::from("policy_unavailable"),
            message: f.message().to_string(),
            status: 503,
        });
        let (reply, upstream) = match self.check.failure_mode {
            FailureMode::Open => (
                None,
                vec![(reply::DECISION_HEADER.to_string(), String::from("error"))],
            ),
            FailureMode::Closed => (Some(reply::unavailable(provider, f.message())), Vec::new()),
        };
        Checked {
            respond: Vec::new(),
            reservation: None,
            include_usage: false,
            stream: false,
            answer: None,
            decision: None,
            reply,
            upstream,
            version,
            cache: None,
            error,
        }
    }

    /// Everything but the deadline, in its steps: the context, the caches, evaluation (answering
    /// the core's needs), the deadline, settling the reservations. Returns the context for
    /// accounting.
    async fn decide(
        &self,
        mut input: CheckInput,
        provider: llm_policy_core::context::Provider,
        version: Option<Arc<Version>>,
        started: Instant,
        deadline: Duration,
    ) -> Result<(Checked, Option<RequestContext>), Failure> {
        let version = version.ok_or(Failure::NotReady)?;
        let long = input.body.len() > INLINE_BODY_BYTES;
        let explain = input.explain;
        let mut counting = Counting {
            held: Held::new(Arc::clone(&self.store)),
            over: Vec::new(),
            remaining: Vec::new(),
            charge: input.charge,
            local: input.local_counted.take(),
            now: unix_now(),
            ask_usage: false,
        };
        let Built {
            ctx,
            raw,
            key,
            ask_usage,
        } = match self.context(input, &version, long).await? {
            Ok(built) => built,
            Err(e) => return Ok((rejected(version, &e, provider), None)),
        };
        counting.ask_usage = ask_usage;
        if let Some(checked) = self
            .cached(&version, ctx.before_scans(), key.as_ref())
            .await
        {
            // A hit skips the scans, unless the audit records the context (with the findings).
            let ctx = if self.audit.records_context() {
                cpu(long, move || ctx.scan()).await?
            } else {
                ctx.into_before_scans()
            };
            return Ok((checked, Some(ctx)));
        }
        let (mut decision, ctx) = self
            .evaluate(
                &version,
                ctx,
                key.clone(),
                explain,
                &mut counting,
                started + deadline,
            )
            .await?;
        // Past the deadline the failure mode answers, whatever was decided: nothing is
        // charged for a decision the proxy may never apply (the reservations go back).
        if started.elapsed() > deadline {
            return Err(Failure::Deadline);
        }
        if decision.actions.redact.is_some() {
            // Within the check's deadline, after the decision's own check of it: a body too large
            // to redact in time fails as the failure mode says (open: Envoy lets it go).
            // The counts for the decision and its record (the rewrite stream redacts the body
            // it forwards the same way); a value that cannot be redacted denies.
            let config = version.set.config().clone();
            decision = cpu(long, move || {
                let input = RequestInput {
                    method: &raw.method,
                    path: &raw.path,
                    headers: &raw.headers,
                    body: &raw.body,
                    now_unix: raw.now,
                };
                redact::apply(&mut decision, &input, &config);
                decision
            })
            .await?;
        }
        let checked = self.settle(version, decision, &ctx, counting, key).await;
        Ok((checked, Some(ctx)))
    }

    /// The request context, its cache key and whether its stream must be asked for its usage:
    /// the CPU-heavy part for large bodies. `Ok(Err(_))`: the request is rejected before evaluation (400 / 413).
    async fn context(
        &self,
        input: CheckInput,
        version: &Version,
        long: bool,
    ) -> Result<Result<Built, ContextError>, Failure> {
        let set = version.set.clone();
        let mut needs = set.needs();
        if self.audit.prompts() != PromptLogging::Off {
            needs.prompt = true;
        }
        if self.audit.records_context() {
            // A replay may read any field: the record holds them all.
            needs = Needs::ALL;
        }
        // A canary's candidate is decided on the same context: it holds what either reads.
        let candidate = self.canary.load_full().map(|c| c.version.set.clone());
        if let Some(c) = &candidate {
            needs = needs.union(c.needs());
        }
        // The scans a plugin the bundle calls reads are made for it even when no rule reads them.
        if let Some((plugins, _)) = &self.plugins {
            let called = candidate.iter().flat_map(|c| c.plugins());
            needs = needs.union(plugins.scans_for(set.plugins().iter().chain(called)));
        }
        let now = input
            .now
            .unwrap_or_else(|| i64::try_from(unix_now()).unwrap_or(0));
        cpu(long, move || {
            let ctx = if input.partial_body {
                Err(ContextError::BodyTooLarge {
                    size: content_length(&input.headers).unwrap_or(input.body.len()),
                    limit: set.config().max_body_bytes,
                })
            } else {
                // The prompt scans run only when the caches miss (`evaluate`).
                RequestContext::unscanned(
                    &RequestInput {
                        method: &input.method,
                        path: &input.path,
                        headers: &input.headers,
                        body: &input.body,
                        now_unix: now,
                    },
                    set.config(),
                    needs,
                )
            };
            ctx.map(|mut unscanned| {
                let ctx = unscanned.before_scans_mut();
                // Estimated once, for a namespace whose counters charge tokens or cost (the
                // charges and the reservation read it); a stream there must report its usage.
                let mut ask_usage = false;
                let counts = set.counts_tokens(&ctx.namespace);
                if counts
                    || candidate
                        .as_ref()
                        .is_some_and(|c| c.counts_tokens(&ctx.namespace))
                {
                    let n = ctx.request.prompt_tokens();
                    ctx.request.estimated_tokens = i64::try_from(n).unwrap_or(i64::MAX);
                }
                if counts {
                    let r = &ctx.request;
                    ask_usage = usage_needs_asking(r.provider, r.api, r.stream)
                        && add_include_usage(&input.body).is_some();
                }
                let explain = input.explain;
                let key = (!explain).then(|| {
                    set.cache_key_before_scans(
                        &unscanned,
                        &EvalOptions {
                            tags: &[],
                            explain,
                            ..EvalOptions::default()
                        },
                    )
                });
                Built {
                    ctx: unscanned,
                    raw: Raw {
                        method: input.method,
                        path: input.path,
                        headers: input.headers,
                        body: input.body,
                        now,
                    },
                    key,
                    ask_usage,
                }
            })
        })
        .instrument(tracing::debug_span!("extract"))
        .await
    }

    /// A decision from the caches: in process (L1, L2), then Redis (L4).
    async fn cached(
        &self,
        version: &Arc<Version>,
        ctx: &RequestContext,
        key: Option<&String>,
    ) -> Option<Checked> {
        let key = key?;
        let hit = {
            let _span = tracing::debug_span!("cache").entered();
            self.caches.get(key, &self.metrics)
        };
        if let Some((d, level)) = hit {
            return Some(render(
                Arc::clone(version),
                (*d).clone(),
                ctx,
                None,
                Some(level),
            ));
        }
        let remote = self.remote.as_ref()?;
        let d = remote
            .get(key, &self.metrics)
            .instrument(tracing::debug_span!("cache", level = "l4"))
            .await?;
        self.caches.put(key.clone(), Arc::clone(&d));
        Some(render(
            Arc::clone(version),
            (*d).clone(),
            ctx,
            None,
            Some(Level::L4),
        ))
    }

    /// Evaluates with `version`, answering what the core asks for (plugins, counters) until it
    /// decides. The context travels through the blocking pool and back.
    async fn evaluate(
        &self,
        version: &Version,
        ctx: Unscanned,
        key: Option<String>,
        explain: bool,
        counting: &mut Counting,
        deadline: Instant,
    ) -> Result<(Decision, RequestContext), Failure> {
        let set = version.set.clone();
        let long = is_long(ctx.before_scans());
        let (mut step, mut ctx) = cpu(long, move || {
            let ctx = ctx.scan();
            let opts = EvalOptions {
                tags: &[],
                explain,
                // (The key looked up in the caches: written into the decision, not hashed again.)
                cache_key: key
                    .as_deref()
                    .map_or(DecisionKey::Computed, DecisionKey::Known),
                // `llm_policy_evaluation_duration_seconds` is observed from it.
                timing: Timing::Measured,
            };
            let step = set.start(&ctx, &opts);
            (step, ctx)
        })
        .instrument(tracing::debug_span!("evaluate"))
        .await?;
        loop {
            let mut pending = match step {
                Step::Done(d) => return Ok((d, ctx)),
                Step::Pending(p) => p,
            };
            ctx = self
                .answer_needs(&mut pending, ctx, counting, deadline)
                .await?;
            (step, ctx) = cpu(long, move || {
                let step = pending.resume(&ctx);
                (step, ctx)
            })
            .instrument(tracing::debug_span!("evaluate"))
            .await?;
        }
    }

    /// Answers every need of one evaluation phase: the plugin calls together, then each counter.
    async fn answer_needs(
        &self,
        pending: &mut Pending,
        ctx: RequestContext,
        counting: &mut Counting,
        deadline: Instant,
    ) -> Result<RequestContext, Failure> {
        let needs = pending.needs().to_vec();
        let (plugin_answers, ctx) = if needs.iter().any(|n| matches!(n.kind, NeedKind::Plugin(_))) {
            self.run_plugins(&needs, ctx, deadline)
                .instrument(tracing::debug_span!("plugins"))
                .await?
        } else {
            (Vec::new(), ctx)
        };
        // The counters the store answers for a request that goes ahead: all of them reserved
        // together, or none (a hierarchy of budgets is charged atomically).
        let batch: Vec<(NeedId, String, Charge)> = needs
            .iter()
            .filter_map(|n| match &n.kind {
                NeedKind::Counter(c) if !counting.answers_locally(c) => {
                    Some((n.id, n.rule.clone(), c.clone()))
                }
                _ => None,
            })
            .collect();
        let mut batched = Vec::new();
        if counting.charge && batch.iter().any(|(_, _, c)| c.fit.is_some()) {
            batched = self.reserve_lowered(&batch, counting).await?;
        }
        if batched.is_empty() && counting.charge && batch.len() > 1 {
            let charges: Vec<Charge> = batch.iter().map(|(_, _, c)| c.clone()).collect();
            let span = tracing::debug_span!("counters", batch = charges.len());
            let result = self
                .store
                .reserve_all(&charges, counting.now)
                .instrument(span)
                .await;
            for (i, (id, rule, charge)) in batch.iter().enumerate() {
                let one = match &result {
                    Ok(all) => all.get(i).copied().ok_or(StoreError::Poisoned),
                    Err(e) => Err(e.clone()),
                };
                // One did not fit, so none was reserved. The ones that fit are reserved on their
                // own: if the rule that was over only allows (a soft budget), the request still
                // goes ahead and must be charged on the others; if it throttles, settling gives
                // them back.
                let check = match one {
                    Ok(r) if r.reservation == Some(ReservationId::NONE) => {
                        self.answer_counter(rule, charge, counting).await?
                    }
                    one => self.counter_answer(rule, charge, one, counting)?,
                };
                batched.push((*id, check));
            }
        }
        for need in needs {
            let answer = match &need.kind {
                NeedKind::Plugin(_) => Answer::Plugin(
                    plugin_answers
                        .iter()
                        .find(|(id, _)| *id == need.id)
                        .map_or(PluginCheck::Unavailable, |(_, a)| a.clone()),
                ),
                NeedKind::Counter(charge) => match batched.iter().find(|(id, _)| *id == need.id) {
                    Some((_, check)) => Answer::Counter(*check),
                    None => {
                        Answer::Counter(self.answer_counter(&need.rule, charge, counting).await?)
                    }
                },
            };
            pending.answer(need.id, answer);
        }
        Ok(ctx)
    }

    /// The counters of a request some `fitBudget` rule may lower: all reserved as asked, or —
    /// when the only ones over are budgets that may lower it — all reserved with the request's
    /// output cap lowered to what every one of them can still pay for (answered
    /// [`CounterCheck::Fit`]). Empty: neither fits (or the store failed); the counters are then
    /// answered as usual.
    async fn reserve_lowered(
        &self,
        batch: &[(NeedId, String, Charge)],
        counting: &mut Counting,
    ) -> Result<Vec<(NeedId, CounterCheck)>, Failure> {
        let charges: Vec<Charge> = batch.iter().map(|(_, _, c)| c.clone()).collect();
        let Ok(first) = self.store.reserve_all(&charges, counting.now).await else {
            return Ok(Vec::new());
        };
        let reserved = |r: &Reserved| r.reservation.is_some_and(|id| id != ReservationId::NONE);
        if first.len() == batch.len() && first.iter().all(reserved) {
            let mut out = Vec::with_capacity(batch.len());
            for ((id, rule, charge), r) in batch.iter().zip(first) {
                out.push((*id, self.counter_answer(rule, charge, Ok(r), counting)?));
            }
            return Ok(out);
        }
        // Every counter that did not fit must be one that may lower the request.
        let mut output = u64::MAX;
        for (c, r) in charges.iter().zip(&first) {
            if r.reservation.is_none() {
                match c.fitting_output(r.state.remaining) {
                    Some(o) => output = output.min(o),
                    None => return Ok(Vec::new()),
                }
            }
        }
        let lowered: Vec<Charge> = charges
            .iter()
            .map(|c| Charge {
                amount: c.amount_with_output(output),
                output: c.output.min(output),
                ..c.clone()
            })
            .collect();
        let Ok(second) = self.store.reserve_all(&lowered, counting.now).await else {
            return Ok(Vec::new());
        };
        // Another request took the room in between: nothing was reserved.
        if second.len() != batch.len() || !second.iter().all(reserved) {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(batch.len());
        for (((id, rule, _), charge), r) in batch.iter().zip(&lowered).zip(second) {
            let check = self.counter_answer(rule, charge, Ok(r), counting)?;
            let check = match (check, charge.fit) {
                (CounterCheck::Under, Some(_)) => CounterCheck::Fit(output),
                (check, _) => check,
            };
            out.push((*id, check));
        }
        Ok(out)
    }

    /// One counter: answered from the proxy's count for local limits it counted, else reserved
    /// (or, in a dry run, read) in the counter store. A store failure follows the failure mode.
    async fn answer_counter(
        &self,
        rule: &str,
        charge: &Charge,
        counting: &mut Counting,
    ) -> Result<CounterCheck, Failure> {
        if let (Scope::Local, Some(local)) = (charge.scope, &counting.local) {
            return Ok(match local.over(rule) {
                Some(state) => {
                    counting.over.push((rule.to_string(), state));
                    CounterCheck::Over
                }
                None => CounterCheck::Under,
            });
        }
        let span = tracing::debug_span!("counters", rule = %rule, charge = counting.charge);
        let result = if counting.charge {
            self.store
                .reserve(charge, counting.now)
                .instrument(span)
                .await
        } else {
            let peeked = self.store.peek(charge, counting.now).instrument(span).await;
            // A dry run says what the real check would: a `fitBudget` counter over its limit
            // that can pay for a lowered request lowers it.
            if let Ok(Reserved {
                reservation: None,
                state,
            }) = &peeked
            {
                if let Some(output) = charge.fitting_output(state.remaining) {
                    return Ok(CounterCheck::Fit(output));
                }
            }
            peeked
        };
        self.counter_answer(rule, charge, result, counting)
    }

    /// What the store said of one counter, as the core's answer: reserved (held until the check
    /// settles), fits without a reservation, or over (its state kept for the reply). A store
    /// failure follows the failure mode.
    fn counter_answer(
        &self,
        rule: &str,
        charge: &Charge,
        result: Result<Reserved, StoreError>,
        counting: &mut Counting,
    ) -> Result<CounterCheck, Failure> {
        let reserved = match result {
            Ok(r) => r,
            Err(e) => {
                self.counter_store_failed(rule, &e)?;
                return Ok(CounterCheck::Under);
            }
        };
        match reserved.reservation {
            Some(id) => {
                if charge.headers && (id != ReservationId::NONE || !counting.charge) {
                    counting.remaining.push((charge.kind, reserved.state));
                }
                if counting.charge && id != ReservationId::NONE {
                    counting.held.ids.push((id, charge.kind));
                    if charge.source == ChargeSource::Budget && charge.limit > 0.0 {
                        let kind = match charge.kind {
                            CounterKind::Usd => "usd",
                            _ => "tokens",
                        };
                        self.metrics
                            .budget_remaining
                            .with_label_values(&[kind])
                            .observe((reserved.state.remaining / charge.limit).clamp(0.0, 1.0));
                    }
                }
                Ok(CounterCheck::Under)
            }
            None => {
                if counting.charge {
                    let kind = match charge.source {
                        ChargeSource::RateLimit => "rate_limit",
                        ChargeSource::Budget => "budget",
                    };
                    self.metrics
                        .limit_rejections
                        .with_label_values(&[kind])
                        .inc();
                }
                counting.over.push((rule.to_string(), reserved.state));
                Ok(CounterCheck::Over)
            }
        }
    }

    /// The counter store failed: fail-closed ends the check (503), fail-open answers the
    /// counter as under its limit (counted in `llm_policy_counter_errors_total`).
    fn counter_store_failed(&self, rule: &str, e: &StoreError) -> Result<(), Failure> {
        let open = self.limits.failure_mode.unwrap_or(self.check.failure_mode) == FailureMode::Open;
        self.metrics
            .counter_errors
            .with_label_values(&[if open { "open" } else { "closed" }])
            .inc();
        if !open {
            tracing::error!(error = %e, "counter store failed");
            return Err(Failure::Store);
        }
        tracing::debug!(error = %e, rule = %rule, "counter store failed: limit not applied (failure mode open)");
        Ok(())
    }

    /// Settles the reservations of a decided check and renders its answer: a request that goes
    /// ahead spends its request counts now and keeps its token and cost reservations for its
    /// usage report (under a handle added upstream); anything else gives them back. Cacheable
    /// decisions are cached.
    async fn settle(
        &self,
        version: Arc<Version>,
        decision: Decision,
        ctx: &RequestContext,
        mut counting: Counting,
        key: Option<String>,
    ) -> Checked {
        let limit = reply::deciding_limit(&decision, &counting.over);
        let remaining = if decision.decision == Verdict::Allow {
            reply::remaining_headers(&counting.remaining)
        } else {
            Vec::new()
        };
        if decision.decision != Verdict::Allow {
            counting.held.release_now().await;
        } else if !counting.held.ids.is_empty() {
            let ids = std::mem::take(&mut counting.held.ids);
            let (requests, waiting): (Vec<_>, Vec<_>) = ids
                .into_iter()
                .partition(|(_, kind)| *kind == CounterKind::Requests);
            // Request counts are spent now; in a remote store off the check's path: reserved,
            // they already count against their limit, so committing later lets nothing through
            // (one Redis round trip less per check).
            if self.store.remote() && !requests.is_empty() {
                let store = Arc::clone(&self.store);
                tokio::spawn(async move {
                    for (id, _) in requests {
                        let _ = store.commit(id, None).await;
                    }
                });
            } else {
                for (id, _) in requests {
                    let _ = self.store.commit(id, None).await;
                }
            }
            if !waiting.is_empty() {
                let models = version.set.models();
                let lowered = decision.actions.max_tokens;
                let mut checked = render(version, decision, ctx, limit, None);
                if let Some(handle) = self.hold_for_usage(waiting).await {
                    let r = &ctx.request;
                    checked.reservation = Some(wire::Reservation {
                        handle,
                        model: r.model.clone(),
                        prompt: r.prompt_tokens(),
                        output: r.output_reservation(&models, lowered),
                        gen_ai: gen_ai::provider_name(r.provider)
                            .zip(gen_ai::operation_name(r.api))
                            .map(|(p, o)| (o.to_string(), p.to_string())),
                        checked_at_ms: unix_now_ms(),
                    });
                    checked.include_usage = counting.ask_usage;
                }
                checked.respond.extend(remaining);
                return checked;
            }
        }
        if let Some(key) = key {
            if decision.metadata.cacheable {
                if let Some(remote) = &self.remote {
                    remote.put(&key, &decision);
                }
                self.caches.put(key, Arc::new(decision.clone()));
            }
        }
        let mut checked = render(version, decision, ctx, limit, None);
        checked.respond.extend(remaining);
        checked
    }

    /// Runs the plugin conditions among `needs` on the blocking pool (each in a fresh sandboxed
    /// instance, bounded by the plugin limits) and hands the context back.
    async fn run_plugins(
        &self,
        needs: &[Need],
        ctx: RequestContext,
        deadline: Instant,
    ) -> Result<(Vec<(NeedId, PluginCheck)>, RequestContext), Failure> {
        let calls: Vec<(NeedId, String, Option<usize>, PluginRef)> = needs
            .iter()
            .filter_map(|n| match &n.kind {
                NeedKind::Plugin(p) => Some((n.id, n.rule.clone(), n.batch_item, p.clone())),
                NeedKind::Counter(_) => None,
            })
            .collect();
        let Some((plugins, slots)) = self.plugins.clone() else {
            let answers = calls
                .into_iter()
                .map(|(id, ..)| {
                    let why = "no plugin directory is configured on this server";
                    (id, PluginCheck::Error(why.to_string()))
                })
                .collect();
            return Ok((answers, ctx));
        };
        let metrics = self.metrics.clone();
        // Calls wait for a free instance slot (the check's deadline bounds the wait) rather than
        // fail when every slot is busy.
        let permit = slots.acquire_owned().await.map_err(|_| Failure::Internal)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let answers = calls
                .into_iter()
                .map(|(id, rule, item, plugin)| {
                    // A batch can ask for many calls: none starts once the check's deadline
                    // passed (the check has been answered by then).
                    if Instant::now() >= deadline {
                        let why = "the check's deadline passed before the plugin ran";
                        return (id, PluginCheck::Error(why.to_string()));
                    }
                    let batch_item = item.and_then(|i| ctx.batch_item(i));
                    let target = batch_item.as_ref().unwrap_or(&ctx);
                    let started = Instant::now();
                    let result = plugins.call(&plugin.name, &rule, &plugin.args, target);
                    metrics
                        .plugin_duration
                        .observe(started.elapsed().as_secs_f64());
                    let (label, answer) = match result {
                        Ok(out) => (
                            if out.matched { "match" } else { "no_match" },
                            PluginCheck::Matched(out.matched),
                        ),
                        Err(e) => {
                            tracing::warn!(plugin = %plugin.name, rule = %rule, error = %e, "plugin call failed: the rule's onError applies");
                            ("error", PluginCheck::Error(e.to_string()))
                        }
                    };
                    metrics
                        .plugin_calls
                        .with_label_values(&[plugin.name.as_str(), label])
                        .inc();
                    (id, answer)
                })
                .collect();
            (answers, ctx)
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "plugin task failed");
            Failure::Internal
        })
    }

    /// Keeps token and cost reservations until the request's usage is reported, under a fresh
    /// handle. When the store has no room (or no handle can be made), they are committed at once:
    /// the estimate counts as spent, so a flood of requests cannot switch budgets off.
    async fn hold_for_usage(&self, ids: Vec<(ReservationId, CounterKind)>) -> Option<String> {
        if let Some(handle) = reservation_handle() {
            match self.store.hold(&handle, &ids).await {
                Ok(true) => return Some(handle),
                Ok(false) => tracing::warn!(
                    "too many reservations wait for usage reports: committing estimates"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot hold reservations for a usage report: committing estimates")
                }
            }
        }
        for (id, _) in ids {
            let _ = self.store.commit(id, None).await;
        }
        None
    }

    /// Records an answer a response rule cut (in the filter, reported with a usage report, or
    /// on the ext_proc edge): its `response` audit record and metric.
    pub fn record_cut(&self, facts: super::audit::CutFacts) {
        let rule = if facts.rule.is_empty() {
            "(unchecked)"
        } else {
            facts.rule.as_str()
        };
        self.metrics
            .answers_cut
            .with_label_values(&[facts.namespace.as_str(), rule, facts.cut.by])
            .inc();
        tracing::warn!(
            namespace = %facts.namespace,
            rule,
            reason = %facts.reason,
            text_sent = facts.cut.text_sent,
            by = facts.cut.by,
            "an answer was cut by a response rule"
        );
        self.audit.record_cut(facts);
    }

    /// An alert a filter raised in a decision it made alone: counted, recorded and delivered as
    /// the server's own.
    pub fn record_alert(&self, facts: super::audit::AlertFacts) {
        let severity = format!("{:?}", facts.severity).to_ascii_lowercase();
        // The metric's label only names a rule the bundle serving has: a report cannot make
        // series (the record keeps what the report said).
        let known = self
            .registry
            .current()
            .is_some_and(|v| v.set.rule(&facts.namespace, &facts.rule).is_some());
        let rule = if known {
            facts.rule.as_str()
        } else {
            "unknown"
        };
        self.metrics
            .alerts
            .with_label_values(&[&severity, rule])
            .inc();
        self.audit.record_alert(facts);
    }

    /// Commits the usage of an allowed request, named by the `x-llm-policy-reservation` handle
    /// its check added upstream (on any replica sharing the counter store). Returns whether
    /// reservations were waiting under it; an error when the counter store cannot say (the
    /// report may be sent again).
    pub async fn record_usage(&self, handle: &str, usage: Usage) -> Result<bool, StoreError> {
        // Only handles this server could have made reach the store.
        let found = if wire::is_reservation_handle(handle) {
            self.store.held(handle).await
        } else {
            Ok(None)
        };
        let ids = match found {
            Ok(Some(ids)) => ids,
            Ok(None) => {
                self.metrics
                    .usage_reports
                    .with_label_values(&["unknown"])
                    .inc();
                return Ok(false);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a usage report's reservations");
                self.metrics
                    .usage_reports
                    .with_label_values(&["error"])
                    .inc();
                return Err(e);
            }
        };
        for (id, kind) in ids {
            let actual = match kind {
                CounterKind::Tokens => usage.tokens,
                CounterKind::Usd => usage.usd,
                CounterKind::Requests => None,
            };
            // Settling is idempotent: a report that fails here keeps its handle, and sent again
            // settles what is left.
            self.store
                .commit(id, actual.filter(|a| a.is_finite() && *a >= 0.0))
                .await
                .inspect_err(|_| {
                    self.metrics
                        .usage_reports
                        .with_label_values(&["error"])
                        .inc();
                })?;
        }
        let _ = self.store.forget(handle).await;
        self.metrics
            .usage_reports
            .with_label_values(&["recorded"])
            .inc();
        self.audit.record_usage(SpendRecord {
            reservation: SpendRecord::digest(handle),
            tokens: usage.tokens,
            usd: usage.usd,
            ..SpendRecord::default()
        });
        if let Some(usd) = usage.usd.filter(|u| u.is_finite() && *u > 0.0) {
            self.metrics.spend_usd.inc_by(usd);
        }
        if let Some(t) = usage.tokens.filter(|t| t.is_finite() && *t > 0.0) {
            self.metrics.spend_tokens.inc_by(t);
        }
        if let Some(g) = &usage.gen_ai {
            self.metrics.gen_ai(&self.models(), g);
        }
        Ok(true)
    }

    /// What the counter `key` holds now (`GET /v1/budgets/{key}`).
    pub async fn counter(
        &self,
        key: &str,
    ) -> Result<Option<super::limits::CounterState>, StoreError> {
        self.store.state(key, unix_now()).await
    }

    /// The serving policy set (none before any bundle loaded).
    pub fn policy_set(&self) -> Option<llm_policy_core::PolicySet> {
        self.registry.current().map(|v| v.set.clone())
    }

    /// The model table of the serving bundle (the shipped one before any bundle loaded).
    pub fn models(&self) -> Arc<llm_policy_core::model_table::ModelTable> {
        self.registry
            .current()
            .map(|v| v.set.models())
            .unwrap_or_default()
    }

    /// Settles reservations whose usage report did not come within the configured timeout
    /// (run periodically).
    pub async fn expire(&self) {
        let commit = self.limits.unreported == Unreported::Commit;
        let _ = self
            .store
            .expire(unix_now(), self.limits.reservation_timeout_secs, commit)
            .await;
    }

    /// Decision and alert metrics.
    fn count(&self, checked: &Checked) {
        let Some(d) = &checked.decision else {
            return;
        };
        let known = checked
            .version
            .as_ref()
            .is_some_and(|v| v.set.has_namespace(&d.metadata.namespace));
        // Namespaces come from a header: only the bundle's own become label values.
        let ns = if known {
            d.metadata.namespace.as_str()
        } else {
            "_unknown"
        };
        let rule = d.metadata.deciding_rule.as_deref().unwrap_or("default");
        self.metrics
            .decisions
            .with_label_values(&[d.decision.as_str(), ns, rule])
            .inc();
        if checked.cache.is_none() {
            self.metrics
                .evaluation
                .observe(d.evaluation_time_us as f64 / 1e6);
        }
        if let Some(a) = d.actions.alert {
            let severity = format!("{a:?}").to_ascii_lowercase();
            let alert_rule = d.matched_rules.first().map_or("default", String::as_str);
            self.metrics
                .alerts
                .with_label_values(&[&severity, alert_rule])
                .inc();
        }
    }

    /// The audit record of a check (and its alert record).
    #[allow(
        clippy::too_many_arguments,
        reason = "the facts of one check, each named"
    )]
    fn record(
        &self,
        checked: &Checked,
        ctx: Option<&RequestContext>,
        identity: &IdentityRecord,
        latency: Duration,
        trace_id: Option<String>,
        request_id: Option<String>,
        failure: Option<Failure>,
    ) {
        self.audit.record_check(&CheckFacts {
            decision: checked.decision.as_ref(),
            error: checked.error.as_ref(),
            failed: failure.is_some(),
            ctx,
            identity,
            status: checked.reply.as_ref().map_or(200, |r| r.status),
            version: checked.version_number(),
            bundle: checked.version.as_deref().map_or("", |v| v.set.bundle()),
            cache: checked.cache.map(Level::as_str),
            latency,
            trace_id,
            request_id,
            spend: checked.reservation.as_ref().map(|r| {
                let models = self.models();
                let lowered = checked.decision.as_ref().and_then(|d| d.actions.max_tokens);
                SpendRecord {
                    reservation: SpendRecord::digest(&r.handle),
                    estimated_tokens: Some(r.prompt.saturating_add(r.output)),
                    estimated_usd: Some(models.estimate_usd(
                        r.model.as_deref(),
                        r.prompt,
                        r.output,
                    )),
                    max_tokens: lowered,
                    ..SpendRecord::default()
                }
            }),
        });
    }
}

/// The answer for a request rejected before evaluation (a bad or too large body).
fn rejected(
    version: Arc<Version>,
    e: &ContextError,
    provider: llm_policy_core::context::Provider,
) -> Checked {
    Checked {
        respond: Vec::new(),
        reservation: None,
        include_usage: false,
        stream: false,
        answer: None,
        decision: None,
        reply: Some(reply::for_error(e, provider)),
        upstream: Vec::new(),
        version: Some(version),
        cache: None,
        error: Some(ErrorBody::from(e).error),
    }
}

/// The answer for a request whose virtual key was refused: 401 in the provider's format.
fn unauthenticated(
    version: Option<Arc<Version>>,
    e: KeyError,
    provider: llm_policy_core::context::Provider,
) -> Checked {
    Checked {
        respond: Vec::new(),
        reservation: None,
        include_usage: false,
        stream: false,
        answer: None,
        decision: None,
        reply: Some(reply::unauthenticated(provider, e)),
        upstream: Vec::new(),
        version,
        cache: None,
        error: Some(ErrorDetail {
            code: e.code().to_string(),
            message: e.to_string(),
            status: 401,
        }),
    }
}

/// What answering the counters of one check collects.
impl Counting {
    /// Whether the proxy's own count answers this counter (a local limit it counted).
    fn answers_locally(&self, charge: &Charge) -> bool {
        charge.scope == Scope::Local && self.local.is_some()
    }
}

struct Counting {
    /// The reservations taken (given back if the check ends any other way).
    held: Held,
    /// The rules whose counter was over, with its state (a throttle's `retry-after` and
    /// `x-ratelimit-*` come from the deciding one).
    over: Vec<(String, LimitState)>,
    /// The counters reserved that tell the client what is left (`remainingHeaders`), with
    /// their state after the reservation.
    remaining: Vec<(CounterKind, LimitState)>,
    /// Reserve (a request that will go ahead) rather than only read.
    charge: bool,
    /// The local limits the proxy counted itself.
    local: Option<LocalCounted>,
    /// The counters' clock (the server's, Unix seconds).
    now: u64,
    /// The request is an OpenAI stream whose client did not ask for its usage.
    ask_usage: bool,
}

/// A request's context, built from its headers and body.
struct Built {
    /// Its scans run only when the caches miss.
    ctx: Unscanned,
    /// The request as it came, for a decision that redacts it ([`redact::apply`]).
    raw: Raw,
    /// Its cache key (none when explaining).
    key: Option<String>,
    /// An OpenAI stream whose client did not ask for its usage, in a namespace that counts
    /// tokens or cost.
    ask_usage: bool,
}

/// A request as it came: what redaction reads.
struct Raw {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    now: i64,
}

/// The answer for a decision.
fn render(
    version: Arc<Version>,
    decision: Decision,
    ctx: &RequestContext,
    limit: Option<LimitState>,
    cache: Option<Level>,
) -> Checked {
    let reply = reply::for_decision(&decision, ctx.request.provider, limit);
    let set = &version.set;
    let answer = (reply.is_none()
        && set.checks_answers(&ctx.namespace)
        && ctx.request.api != llm_policy_core::context::Api::Batch)
        .then(|| wire::AnswerCheck {
            ctx: set.answer_context(ctx),
            request_id: ctx.header("x-request-id").map(str::to_string),
        });
    let (upstream, respond) = if reply.is_none() {
        let respond = decision
            .actions
            .max_tokens
            .map(|n| (wire::MAX_TOKENS_HEADER.to_string(), n.to_string()))
            .into_iter()
            .chain(
                decision
                    .actions
                    .redact
                    .as_ref()
                    .and_then(|r| wire::redacted_header(&r.counts))
                    .map(|v| (wire::REDACTED_HEADER.to_string(), v)),
            )
            .collect();
        (reply::upstream_headers(&decision), respond)
    } else {
        (Vec::new(), Vec::new())
    };
    Checked {
        reservation: None,
        include_usage: false,
        answer,
        stream: ctx.request.stream,
        decision: Some(decision),
        reply,
        upstream,
        respond,
        version: Some(version),
        cache,
        error: None,
    }
}

/// Reservations taken during a check: released if the check ends any other way (an error, the
/// deadline dropping the future).
struct Held {
    store: Arc<dyn CounterStore>,
    ids: Vec<(ReservationId, CounterKind)>,
}

impl Held {
    fn new(store: Arc<dyn CounterStore>) -> Held {
        Held {
            store,
            ids: Vec::new(),
        }
    }

    async fn release_now(&mut self) {
        for (id, _) in std::mem::take(&mut self.ids) {
            let _ = self.store.release(id).await;
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let ids = std::mem::take(&mut self.ids);
        if ids.is_empty() {
            return;
        }
        let store = Arc::clone(&self.store);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for (id, _) in ids {
                    let _ = store.release(id).await;
                }
            });
        }
    }
}

fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn content_length(headers: &[(String, String)]) -> Option<usize> {
    header(headers, "content-length")?.trim().parse().ok()
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
fn trace_id(headers: &[(String, String)]) -> Option<String> {
    let tp = header(headers, "traceparent")?;
    let mut parts = tp.trim().split('-');
    let (_version, id) = (parts.next()?, parts.next()?);
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id.bytes().any(|b| b != b'0'))
        .then(|| id.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_gives_the_trace_id() {
        let h = |v: &str| vec![(String::from("traceparent"), v.to_string())];
        assert_eq!(
            trace_id(&h(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            ))
            .as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id(&h("00-0000-00f067aa0ba902b7-01")), None);
        assert_eq!(trace_id(&h("garbage")), None);
        assert_eq!(
            trace_id(&h(&format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)))),
            None
        );
    }

    #[test]
    fn reservation_handles_are_random_128_bit() {
        let a = reservation_handle().unwrap();
        let b = reservation_handle().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
