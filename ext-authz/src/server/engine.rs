//! One check, whatever protocol asked: build the context, look in the decision caches, evaluate
//! with the version serving, answer the core's needs (counters; plugins come with #8), settle
//! reservations, render the reply, count and record it. Never longer than the deadline: past
//! it, the failure mode answers.
//!
//! Protocol edges ([`super::envoy`], [`super::rest`]) build a [`CheckInput`] and turn the
//! [`Checked`] into their own types.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use llm_policy_core::decision::{
    ChargeSource, CounterKind, Decision, ErrorBody, ErrorDetail, Verdict,
};
use llm_policy_core::reply::{self, LimitState, Reply};
use llm_policy_core::{
    Answer, ContextError, CounterCheck, EvalOptions, NeedKind, PluginCheck, RequestContext,
    RequestInput, Step,
};

use super::audit::{self, Audit, Record};
use super::cache::{Caches, Level};
use super::config::{CheckConfig, FailureMode, LimitsConfig, PromptLogging, Unreported};
use super::limits::{CounterStore, ReservationId};
use super::metrics::Metrics;
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
    /// Evaluation time (Unix seconds); now when absent.
    pub now: Option<i64>,
    /// Report every rule's outcome (REST `?explain=true`); bypasses the caches.
    pub explain: bool,
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
    /// The registry version that decided.
    pub version: Option<u64>,
    /// The cache level that answered.
    pub cache: Option<Level>,
    /// Why there is no decision: the request was rejected (400 / 413) or the check failed (503,
    /// or let through in failure mode open).
    pub error: Option<ErrorDetail>,
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
}

impl Failure {
    fn as_str(self) -> &'static str {
        match self {
            Failure::NotReady => "not_ready",
            Failure::Deadline => "deadline",
            Failure::Store => "store",
        }
    }
}

/// The header a usage report names its request by.
pub const RESERVATION_HEADER: &str = "x-llm-policy-reservation";

/// Most requests whose token or cost reservations wait for a usage report at once; past it, new
/// ones are settled at once as `limits.unreported` says.
const MAX_UNREPORTED: usize = 100_000;

/// Token and cost reservations of allowed requests, waiting for their usage report.
#[derive(Default)]
struct Unsettled {
    by_request: HashMap<String, (u64, Vec<(ReservationId, CounterKind)>)>,
}

/// Usage reported for an allowed request (`POST /v1/usage`, `RecordUsage`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Tokens used (prompt + completion).
    pub tokens: Option<f64>,
    /// Cost in US dollars.
    pub usd: Option<f64>,
}

/// The check engine, shared by every protocol edge.
pub struct Engine {
    registry: Arc<Registry>,
    store: Arc<dyn CounterStore>,
    caches: Caches,
    metrics: Metrics,
    audit: Audit,
    check: CheckConfig,
    limits: LimitsConfig,
    unsettled: Mutex<Unsettled>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
            metrics,
            audit,
            check,
            limits,
            unsettled: Mutex::new(Unsettled::default()),
        }
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
    pub async fn check(&self, input: CheckInput) -> Checked {
        let started = Instant::now();
        let provider = reply::provider_of(&input.path, &input.headers);
        let trace_id = trace_id(&input.headers);
        let request_id = header(&input.headers, "x-request-id").map(str::to_string);
        let result = tokio::time::timeout(
            self.check.deadline(),
            self.decide(&input, request_id.as_deref()),
        )
        .await
        .unwrap_or(Err(Failure::Deadline));
        let latency = started.elapsed();
        self.metrics.check.observe(latency.as_secs_f64());
        match result {
            Ok((checked, ctx)) => {
                self.account(&checked, ctx.as_ref(), latency, trace_id, request_id);
                checked
            }
            Err(f) => {
                self.metrics
                    .check_errors
                    .with_label_values(&[f.as_str()])
                    .inc();
                let checked = self.failed(f, provider);
                tracing::warn!(
                    reason = f.as_str(),
                    "check could not decide: failure mode {:?}",
                    self.check.failure_mode
                );
                let version = self.registry.current();
                self.record(
                    &checked,
                    None,
                    version.as_deref(),
                    latency,
                    trace_id,
                    request_id,
                    Some(f),
                );
                checked
            }
        }
    }

    fn failed(&self, f: Failure, provider: llm_policy_core::context::Provider) -> Checked {
        let version = self.registry.current().map(|v| v.number);
        let message = match f {
            Failure::NotReady => "the policy server has no policy loaded yet",
            Failure::Deadline => "the policy check did not finish in time",
            Failure::Store => "the rate-limit store is unavailable",
        };
        let error = Some(ErrorDetail {
            code: String::from("policy_unavailable"),
            message: message.to_string(),
            status: 503,
        });
        match self.check.failure_mode {
            FailureMode::Open => Checked {
                decision: None,
                reply: None,
                upstream: vec![(reply::DECISION_HEADER.to_string(), String::from("error"))],
                version,
                cache: None,
                error,
            },
            FailureMode::Closed => Checked {
                decision: None,
                reply: Some(Reply {
                    status: 503,
                    headers: vec![
                        (reply::DECISION_HEADER.to_string(), String::from("error")),
                        (
                            String::from("content-type"),
                            String::from("application/json"),
                        ),
                    ],
                    body: reply::error_body(provider, 503, "policy_unavailable", message),
                }),
                upstream: Vec::new(),
                version,
                cache: None,
                error,
            },
        }
    }

    /// Everything but the deadline. Returns the context for accounting.
    async fn decide(
        &self,
        input: &CheckInput,
        request_id: Option<&str>,
    ) -> Result<(Checked, Option<RequestContext>), Failure> {
        let version = self.registry.current().ok_or(Failure::NotReady)?;
        let set = &version.set;
        let mut needs = set.needs();
        if self.audit.prompts() != PromptLogging::Off {
            needs.prompt = true;
        }
        let now = input
            .now
            .unwrap_or_else(|| i64::try_from(unix_now()).unwrap_or(0));
        let ctx = if input.partial_body {
            Err(ContextError::BodyTooLarge {
                size: content_length(&input.headers).unwrap_or(input.body.len()),
                limit: set.config().max_body_bytes,
            })
        } else {
            RequestContext::from_request_with(
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
        let ctx = match ctx {
            Ok(c) => c,
            Err(e) => {
                let provider = reply::provider_of(&input.path, &input.headers);
                return Ok((
                    Checked {
                        decision: None,
                        reply: Some(reply::for_error(&e, provider)),
                        upstream: Vec::new(),
                        version: Some(version.number),
                        cache: None,
                        error: Some(ErrorBody::from(&e).error),
                    },
                    None,
                ));
            }
        };
        let opts = EvalOptions {
            tags: &[],
            explain: input.explain,
        };
        // Caches: only for plain checks (an explained decision carries its trace).
        let key = (!input.explain).then(|| set.cache_key(&ctx, &opts));
        if let Some(key) = &key {
            if let Some((d, level)) = self.caches.get(key, &self.metrics) {
                let checked = self.render(&version, (*d).clone(), &ctx, None, Some(level));
                return Ok((checked, Some(ctx)));
            }
        }
        let mut held = Held::new(Arc::clone(&self.store));
        let mut limit_states: Vec<(String, LimitState)> = Vec::new();
        let mut step = set.start(&ctx, &opts);
        let now_secs = u64::try_from(now).unwrap_or(0);
        let decision = loop {
            match step {
                Step::Done(d) => break d,
                Step::Pending(mut p) => {
                    for need in p.needs().to_vec() {
                        let answer = match &need.kind {
                            NeedKind::Plugin(_) => Answer::Plugin(PluginCheck::Error(
                                String::from("WASM plugins are not available on this server"),
                            )),
                            NeedKind::Counter(charge) => {
                                let r =
                                    self.store.reserve(charge, now_secs).await.map_err(|e| {
                                        tracing::error!(error = %e.0, "counter store failed");
                                        Failure::Store
                                    })?;
                                match r.reservation {
                                    Some(id) => {
                                        held.ids.push((id, charge.kind));
                                        Answer::Counter(CounterCheck::Under)
                                    }
                                    None => {
                                        let kind = match charge.source {
                                            ChargeSource::RateLimit => "rate_limit",
                                            ChargeSource::Budget => "budget",
                                        };
                                        self.metrics
                                            .limit_rejections
                                            .with_label_values(&[kind])
                                            .inc();
                                        limit_states.push((need.rule.clone(), r.state));
                                        Answer::Counter(CounterCheck::Over)
                                    }
                                }
                            }
                        };
                        p.answer(need.id, answer);
                    }
                    step = p.resume(&ctx);
                }
            }
        };
        // Settle: a request that goes ahead spends its request counts now and keeps its token
        // and cost reservations for its usage report; anything else gives them back.
        if decision.decision == Verdict::Allow {
            let ids = std::mem::take(&mut held.ids);
            let mut waiting = Vec::new();
            for (id, kind) in ids {
                if kind == CounterKind::Requests {
                    let _ = self.store.commit(id, None).await;
                } else {
                    waiting.push((id, kind));
                }
            }
            if !waiting.is_empty() {
                let key = request_id.map_or_else(|| self.audit.next_id(), str::to_string);
                self.hold_for_usage(key.clone(), waiting).await;
                let limit = deciding_limit(&decision, &limit_states);
                let mut checked = self.render(&version, decision, &ctx, limit, None);
                checked.upstream.push((RESERVATION_HEADER.to_string(), key));
                return Ok((checked, Some(ctx)));
            }
        } else {
            held.release_now().await;
        }
        if let Some(key) = key {
            if decision.metadata.cacheable {
                self.caches.put(key, Arc::new(decision.clone()));
            }
        }
        let limit = deciding_limit(&decision, &limit_states);
        Ok((
            self.render(&version, decision, &ctx, limit, None),
            Some(ctx),
        ))
    }

    fn render(
        &self,
        version: &Version,
        decision: Decision,
        ctx: &RequestContext,
        limit: Option<LimitState>,
        cache: Option<Level>,
    ) -> Checked {
        let reply = reply::for_decision(&decision, ctx.request.provider, limit);
        let upstream = if reply.is_none() {
            reply::upstream_headers(&decision)
        } else {
            Vec::new()
        };
        Checked {
            decision: Some(decision),
            reply,
            upstream,
            version: Some(version.number),
            cache,
            error: None,
        }
    }

    async fn hold_for_usage(&self, key: String, ids: Vec<(ReservationId, CounterKind)>) {
        let overflow = {
            let Ok(mut u) = self.unsettled.lock() else {
                return;
            };
            if u.by_request.len() >= MAX_UNREPORTED {
                Some(ids)
            } else {
                u.by_request
                    .entry(key)
                    .or_insert_with(|| (unix_now(), Vec::new()))
                    .1
                    .extend(ids);
                None
            }
        };
        if let Some(ids) = overflow {
            tracing::warn!("too many requests wait for usage reports: settling at once");
            self.settle(ids.into_iter().map(|(id, _)| id).collect())
                .await;
        }
    }

    async fn settle(&self, ids: Vec<ReservationId>) {
        for id in ids {
            let _ = match self.limits.unreported {
                Unreported::Commit => self.store.commit(id, None).await,
                Unreported::Release => self.store.release(id).await,
            };
        }
    }

    /// Commits the usage of an allowed request (by its `x-request-id`, or the
    /// `x-llm-policy-reservation` header the check added). Returns whether the request had
    /// reservations waiting.
    pub async fn record_usage(&self, request: &str, usage: Usage) -> bool {
        let Some((_, ids)) = self
            .unsettled
            .lock()
            .ok()
            .and_then(|mut u| u.by_request.remove(request))
        else {
            return false;
        };
        for (id, kind) in ids {
            let actual = match kind {
                CounterKind::Tokens => usage.tokens,
                CounterKind::Usd => usage.usd,
                CounterKind::Requests => None,
            };
            let _ = self
                .store
                .commit(id, actual.filter(|a| a.is_finite() && *a >= 0.0))
                .await;
        }
        true
    }

    /// Settles reservations whose usage report did not come within the configured timeout
    /// (run periodically).
    pub async fn expire(&self) {
        let before = unix_now().saturating_sub(self.limits.reservation_timeout_secs);
        let old: Vec<ReservationId> = match self.unsettled.lock() {
            Ok(mut u) => {
                let keys: Vec<String> = u
                    .by_request
                    .iter()
                    .filter(|(_, (at, _))| *at < before)
                    .map(|(k, _)| k.clone())
                    .collect();
                keys.iter()
                    .filter_map(|k| u.by_request.remove(k))
                    .flat_map(|(_, ids)| ids.into_iter().map(|(id, _)| id))
                    .collect()
            }
            Err(_) => Vec::new(),
        };
        self.settle(old).await;
        let _ = self
            .store
            .expire(before, self.limits.unreported == Unreported::Commit)
            .await;
    }

    /// Metrics and audit of a decided check.
    fn account(
        &self,
        checked: &Checked,
        ctx: Option<&RequestContext>,
        latency: std::time::Duration,
        trace_id: Option<String>,
        request_id: Option<String>,
    ) {
        let version = self.registry.current();
        if let Some(d) = &checked.decision {
            let set_has_ns = version
                .as_ref()
                .is_some_and(|v| v.set.has_namespace(&d.metadata.namespace));
            let ns = if set_has_ns {
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
        self.record(
            checked,
            ctx,
            version.as_deref(),
            latency,
            trace_id,
            request_id,
            None,
        );
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one private call site per outcome"
    )]
    fn record(
        &self,
        checked: &Checked,
        ctx: Option<&RequestContext>,
        version: Option<&Version>,
        latency: std::time::Duration,
        trace_id: Option<String>,
        request_id: Option<String>,
        failure: Option<Failure>,
    ) {
        let d = checked.decision.as_ref();
        let verdict = match (d, failure) {
            (Some(d), _) => d.decision.as_str(),
            (None, Some(_)) => "error",
            (None, None) => "deny",
        };
        let flagged = d.is_some_and(|d| d.actions.audit);
        let alert = d.and_then(|d| d.actions.alert);
        let wants = self.audit.wants(verdict, flagged);
        if !wants && alert.is_none() {
            return;
        }
        let reason = match (d, &checked.error) {
            (Some(d), _) => d.reason.clone(),
            (None, Some(e)) => e.message.clone(),
            (None, None) => String::new(),
        };
        let record = Record {
            kind: "decision",
            id: request_id.unwrap_or_else(|| self.audit.next_id()),
            time: audit::rfc3339(SystemTime::now()),
            namespace: d
                .map(|d| d.metadata.namespace.clone())
                .or_else(|| ctx.map(|c| c.namespace.clone()))
                .unwrap_or_default(),
            policy: d.map(|d| d.metadata.policy.clone()).unwrap_or_default(),
            policy_version: d.map(|d| d.metadata.version.clone()).unwrap_or_default(),
            version: checked.version.or(version.map(|v| v.number)).unwrap_or(0),
            bundle: version
                .map(|v| v.set.bundle().to_string())
                .unwrap_or_default(),
            principal: ctx
                .map(|c| {
                    c.principal
                        .iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
                        .collect()
                })
                .unwrap_or_default(),
            model: ctx.and_then(|c| c.request.model.clone()),
            decision: verdict.to_string(),
            status: checked.reply.as_ref().map_or(200, |r| r.status),
            matched_rules: d.map(|d| d.matched_rules.clone()).unwrap_or_default(),
            reason,
            latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            cache: checked.cache.map(Level::as_str),
            trace_id,
            alert,
            prompt: ctx.and_then(|c| audit::prompt_field(self.audit.prompts(), &c.request.prompt)),
        };
        if let Some(a) = alert {
            self.audit.record(Record {
                kind: "alert",
                alert: Some(a),
                ..record.clone()
            });
        }
        if wants {
            self.audit.record(record);
        }
    }
}

/// The counter state of the rule that decided a throttle, if a counter made it decide.
fn deciding_limit(d: &Decision, states: &[(String, LimitState)]) -> Option<LimitState> {
    let rule = d.metadata.deciding_rule.as_deref()?;
    states.iter().find(|(r, _)| r == rule).map(|(_, s)| *s)
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
}
