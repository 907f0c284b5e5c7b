//! Prometheus metrics, served on their own port: the engine's own, every name prefixed
//! `llm_policy_`, and the two of the OpenTelemetry GenAI conventions it can measure
//! (`gen_ai_client_token_usage`, `gen_ai_server_request_duration_seconds`; [`GenAiUsage`]).

use llm_policy_core::gen_ai::GenAiUsage;
use llm_policy_core::model_table::ModelTable;
use prometheus::{
    exponential_buckets, Counter, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the server exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `llm_policy_decisions_total{decision,namespace,rule}`.
    pub decisions: IntCounterVec,
    /// `llm_policy_evaluation_duration_seconds`: the core's own time.
    pub evaluation: Histogram,
    /// `llm_policy_check_duration_seconds`: a whole check, counters included.
    pub check: Histogram,
    /// `llm_policy_cache_requests_total{level,result}`.
    pub cache: IntCounterVec,
    /// `llm_policy_reloads_total{result}`.
    pub reloads: IntCounterVec,
    /// `llm_policy_bundle_info{bundle,version}`: 1 for the version serving.
    pub bundle: IntGaugeVec,
    /// `llm_policy_limit_rejections_total{kind}`.
    pub limit_rejections: IntCounterVec,
    /// `llm_policy_audit_dropped_total`.
    pub audit_dropped: IntCounter,
    /// `llm_policy_audit_queue_depth`.
    pub audit_queue: IntGauge,
    /// `llm_policy_alerts_total{severity,rule}`.
    pub alerts: IntCounterVec,
    /// `llm_policy_check_errors_total{kind}`: checks that could not decide (`not_ready`,
    /// `deadline`, `store`, `internal`).
    pub check_errors: IntCounterVec,
    /// `llm_policy_usage_reports_total{result}`.
    pub usage_reports: IntCounterVec,
    /// `llm_policy_answers_cut_total{namespace,rule,by}`.
    pub answers_cut: IntCounterVec,
    /// `llm_policy_spend_usd_total`: US dollars answers cost, as their usage was recorded.
    pub spend_usd: Counter,
    /// `llm_policy_spend_tokens_total`: tokens answers used, as their usage was recorded.
    pub spend_tokens: Counter,
    /// `llm_policy_budget_remaining_ratio{kind}`: what budgets had left (of their limit) at each
    /// check that reserved from them. Per key: `GET /v1/budgets/{key}` (a per-key series would
    /// grow with every user).
    pub budget_remaining: HistogramVec,
    /// `llm_policy_redis_errors_total{feature,kind}`.
    pub redis_errors: IntCounterVec,
    /// `llm_policy_counter_errors_total{result}`: counter-store failures answered per
    /// `limits.failureMode` (`open`: the limit was not applied; `closed`: the check failed).
    pub counter_errors: IntCounterVec,
    /// `llm_policy_plugin_calls_total{plugin,result}`: `match`, `no_match`, `error`.
    pub plugin_calls: IntCounterVec,
    /// `llm_policy_plugin_duration_seconds`: one plugin call.
    pub plugin_duration: Histogram,
    /// `llm_policy_bundle_fetches_total{result}`: reads of the bundle store (`applied`,
    /// `unchanged`, `refused`, `unavailable`).
    pub bundle_fetches: IntCounterVec,
    /// `llm_policy_bundle_store_up`: 1 when the last read of the bundle store got an answer.
    pub bundle_store_up: IntGauge,
    /// `llm_policy_canary_evaluations_total{result}`: checks a canary decided again (`agree`,
    /// `disagree`, `error`; `skipped`: too many in flight, or a body too large).
    pub canary_evaluations: IntCounterVec,
    /// `llm_policy_canary_disagreements_total{from,to,rule}`: checks the candidate decided
    /// otherwise (`rule`: its deciding rule, `default`).
    pub canary_disagreements: IntCounterVec,
    /// `llm_policy_fleet_proxies{bundle}`: filters that synced lately, by the bundle they run.
    pub fleet_proxies: IntGaugeVec,
    /// `llm_policy_alert_deliveries_total{sink,result}`: alerts sent to webhooks and
    /// Alertmanagers (`delivered`, `failed` after every retry, `dropped`: the queue was full).
    pub alert_deliveries: IntCounterVec,
    /// Tokens of each answer whose usage the provider reported, by type (`input`, `output`):
    /// the GenAI conventions' `gen_ai.client.token.usage` in its Prometheus name,
    /// `gen_ai_client_token_usage{gen_ai_operation_name,gen_ai_provider_name,gen_ai_request_model,gen_ai_token_type}`.
    pub gen_ai_tokens: HistogramVec,
    /// Seconds from the check's answer to the answer's end:
    /// `gen_ai_server_request_duration_seconds{gen_ai_operation_name,gen_ai_provider_name,gen_ai_request_model}`.
    pub gen_ai_duration: HistogramVec,
}

/// The most tokens one answer is recorded with (more: the report is not believed).
const MAX_TOKENS: f64 = 16_777_216.0;
/// The longest request duration recorded, in seconds.
const MAX_SECONDS: f64 = 86_400.0;

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let seconds = |name: &str, help: &str| -> Result<Histogram, prometheus::Error> {
            // 1 µs … ~1 s.
            let h = Histogram::with_opts(
                HistogramOpts::new(name, help).buckets(exponential_buckets(1e-6, 2.0, 21)?),
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let decisions = counter_vec(
            "llm_policy_decisions_total",
            "Decisions by verdict, namespace and deciding rule (`default` when none decided).",
            &["decision", "namespace", "rule"],
        )?;
        let evaluation = seconds(
            "llm_policy_evaluation_duration_seconds",
            "Time the policy core spent on a decision.",
        )?;
        let check = seconds(
            "llm_policy_check_duration_seconds",
            "Time of a whole check (request parsing, counters, audit hand-off).",
        )?;
        let cache = counter_vec(
            "llm_policy_cache_requests_total",
            "Decision cache lookups by level and result.",
            &["level", "result"],
        )?;
        let reloads = counter_vec(
            "llm_policy_reloads_total",
            "Policy reloads by result (ok, unchanged, error).",
            &["result"],
        )?;
        let bundle = IntGaugeVec::new(
            Opts::new("llm_policy_bundle_info", "The bundle serving (value 1)."),
            &["bundle", "version"],
        )?;
        registry.register(Box::new(bundle.clone()))?;
        let limit_rejections = counter_vec(
            "llm_policy_limit_rejections_total",
            "Requests a rate limit or budget stopped, by kind (rate_limit, budget).",
            &["kind"],
        )?;
        let audit_dropped = IntCounter::new(
            "llm_policy_audit_dropped_total",
            "Decision records dropped because the audit queue was full.",
        )?;
        registry.register(Box::new(audit_dropped.clone()))?;
        let audit_queue = IntGauge::new(
            "llm_policy_audit_queue_depth",
            "Decision records waiting to be written.",
        )?;
        registry.register(Box::new(audit_queue.clone()))?;
        let alerts = counter_vec(
            "llm_policy_alerts_total",
            "Alerts raised by rules, by severity and rule.",
            &["severity", "rule"],
        )?;
        let check_errors = counter_vec(
            "llm_policy_check_errors_total",
            "Checks that could not decide, by kind (not_ready, deadline, store, internal), answered per the failure mode.",
            &["kind"],
        )?;
        let usage_reports = counter_vec(
            "llm_policy_usage_reports_total",
            "Usage reports by result (recorded; unknown: no reservation waited under the handle).",
            &["result"],
        )?;
        let answers_cut = counter_vec(
            "llm_policy_answers_cut_total",
            "Answers a response rule denied (a JSON answer replaced, a stream ended with an error event), by namespace, rule and where (filter, server).",
            &["namespace", "rule", "by"],
        )?;
        let spend_usd = Counter::new(
            "llm_policy_spend_usd_total",
            "US dollars answers cost (the model table's prices), as their usage was recorded.",
        )?;
        registry.register(Box::new(spend_usd.clone()))?;
        let spend_tokens = Counter::new(
            "llm_policy_spend_tokens_total",
            "Tokens answers used, as their usage was recorded.",
        )?;
        registry.register(Box::new(spend_tokens.clone()))?;
        let budget_remaining = HistogramVec::new(
            HistogramOpts::new(
                "llm_policy_budget_remaining_ratio",
                "What budgets had left, as a fraction of their limit, at each check that reserved from them, by kind (tokens, usd).",
            )
            .buckets(vec![0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]),
            &["kind"],
        )?;
        registry.register(Box::new(budget_remaining.clone()))?;
        let redis_errors = counter_vec(
            "llm_policy_redis_errors_total",
            "Failed Redis calls by feature (counters, usage, cache, registry, audit) and kind (timeout, unavailable, error).",
            &["feature", "kind"],
        )?;
        let counter_errors = counter_vec(
            "llm_policy_counter_errors_total",
            "Counter-store failures by how they were answered (open: limit not applied; closed: check failed).",
            &["result"],
        )?;
        let plugin_calls = counter_vec(
            "llm_policy_plugin_calls_total",
            "WASM plugin calls by plugin and result (match, no_match, error: the rule's onError applied).",
            &["plugin", "result"],
        )?;
        let plugin_duration = seconds(
            "llm_policy_plugin_duration_seconds",
            "Time of one WASM plugin call (fresh instance, input, run, output).",
        )?;
        let bundle_fetches = counter_vec(
            "llm_policy_bundle_fetches_total",
            "Reads of the signed bundle store by result (applied: a new revision serves; unchanged; refused: unsigned, tampered or invalid, the last good serves; unavailable: the store did not answer).",
            &["result"],
        )?;
        let bundle_store_up = IntGauge::new(
            "llm_policy_bundle_store_up",
            "1 when the last read of the signed bundle store got an answer, 0 when it did not.",
        )?;
        registry.register(Box::new(bundle_store_up.clone()))?;
        let canary_evaluations = counter_vec(
            "llm_policy_canary_evaluations_total",
            "Checks a canary's candidate decided again, by result (agree, disagree, error; skipped: too many in flight, or a body too large).",
            &["result"],
        )?;
        let canary_disagreements = counter_vec(
            "llm_policy_canary_disagreements_total",
            "Checks a canary's candidate decided otherwise than the bundle serving, by verdict serving (from), the candidate's (to) and its deciding rule.",
            &["from", "to", "rule"],
        )?;
        let fleet_proxies = IntGaugeVec::new(
            Opts::new(
                "llm_policy_fleet_proxies",
                "Envoy filters that synced their bundle from this server lately, by the bundle they run (`none`: not loaded yet).",
            ),
            &["bundle"],
        )?;
        registry.register(Box::new(fleet_proxies.clone()))?;
        let alert_deliveries = counter_vec(
            "llm_policy_alert_deliveries_total",
            "Alerts sent to webhooks and Alertmanagers, by sink (webhook, alertmanager) and result (delivered; failed: every retry failed; dropped: the sink's queue was full).",
            &["sink", "result"],
        )?;
        // The label values known up front start at 0, so the first event is an increase (a
        // Prometheus `increase()` over a series that appears at 1 sees nothing).
        for (vec, values) in [
            (&reloads, &["ok", "unchanged", "error"][..]),
            (
                &check_errors,
                &["not_ready", "deadline", "store", "internal"][..],
            ),
            (&counter_errors, &["open", "closed"][..]),
            (
                &bundle_fetches,
                &["applied", "unchanged", "refused", "unavailable"][..],
            ),
            (&usage_reports, &["recorded", "unknown", "error"][..]),
            (
                &canary_evaluations,
                &["agree", "disagree", "error", "skipped"][..],
            ),
            (&limit_rejections, &["rate_limit", "budget"][..]),
        ] {
            for v in values {
                vec.with_label_values(&[v]);
            }
        }
        for level in ["l1", "l2", "l4"] {
            for result in ["hit", "miss"] {
                cache.with_label_values(&[level, result]);
            }
        }
        // The conventions' bucket boundaries.
        let gen_ai_tokens = HistogramVec::new(
            HistogramOpts::new(
                "gen_ai_client_token_usage",
                "Tokens of each answer whose usage the provider reported, by type (OpenTelemetry GenAI gen_ai.client.token.usage).",
            )
            .buckets(exponential_buckets(1.0, 4.0, 14)?),
            &[
                "gen_ai_operation_name",
                "gen_ai_provider_name",
                "gen_ai_request_model",
                "gen_ai_token_type",
            ],
        )?;
        registry.register(Box::new(gen_ai_tokens.clone()))?;
        let gen_ai_duration = HistogramVec::new(
            HistogramOpts::new(
                "gen_ai_server_request_duration_seconds",
                "Seconds from the check's answer to the answer's end (OpenTelemetry GenAI gen_ai.server.request.duration).",
            )
            .buckets(exponential_buckets(0.01, 2.0, 14)?),
            &[
                "gen_ai_operation_name",
                "gen_ai_provider_name",
                "gen_ai_request_model",
            ],
        )?;
        registry.register(Box::new(gen_ai_duration.clone()))?;
        Ok(Metrics {
            gen_ai_tokens,
            gen_ai_duration,
            alert_deliveries,
            fleet_proxies,
            canary_evaluations,
            canary_disagreements,
            bundle_fetches,
            bundle_store_up,
            spend_usd,
            spend_tokens,
            budget_remaining,
            plugin_calls,
            plugin_duration,
            usage_reports,
            answers_cut,
            redis_errors,
            counter_errors,
            registry,
            decisions,
            evaluation,
            check,
            cache,
            reloads,
            bundle,
            limit_rejections,
            audit_dropped,
            audit_queue,
            alerts,
            check_errors,
        })
    }

    /// Marks `bundle` as the one serving (the previous one's gauge is removed).
    pub fn serving(&self, bundle: &str, version: u64) {
        self.bundle.reset();
        self.bundle
            .with_label_values(&[bundle, &version.to_string()])
            .set(1);
    }

    /// Records one answer in the GenAI metrics. Label values are bounded: operations and
    /// providers the conventions name (anything else is not recorded), and the model as the
    /// table names it (`other` for any model it does not).
    pub fn gen_ai(&self, models: &ModelTable, usage: &GenAiUsage) {
        let known_operation = matches!(
            usage.operation.as_str(),
            "chat" | "text_completion" | "embeddings"
        );
        let known_provider = matches!(usage.provider.as_str(), "openai" | "anthropic");
        if !known_operation || !known_provider {
            return;
        }
        let model = models.label(usage.model.as_deref());
        let labels = [usage.operation.as_str(), usage.provider.as_str(), model];
        // A usage report is trusted as far as its token: no more than any context window holds,
        // no answer longer than a day (a value past them would make a sum useless for good).
        for (kind, tokens) in [("input", usage.input), ("output", usage.output)] {
            if let Some(t) = tokens.filter(|t| t.is_finite() && (0.0..=MAX_TOKENS).contains(t)) {
                self.gen_ai_tokens
                    .with_label_values(&[labels[0], labels[1], labels[2], kind])
                    .observe(t);
            }
        }
        if let Some(d) = usage
            .duration_secs
            .filter(|d| d.is_finite() && (0.0..=MAX_SECONDS).contains(d))
        {
            self.gen_ai_duration.with_label_values(&labels).observe(d);
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a failed expectation is a failed test"
    )]

    use super::*;

    #[test]
    fn gen_ai_label_values_are_bounded_whatever_a_report_says() {
        let m = Metrics::new().unwrap();
        let models = ModelTable::default();
        let usage = |operation: &str, provider: &str, model: &str| GenAiUsage {
            operation: operation.into(),
            provider: provider.into(),
            model: Some(model.into()),
            input: Some(12.0),
            output: Some(30.0),
            duration_secs: Some(0.25),
        };
        m.gen_ai(&models, &usage("chat", "openai", "gpt-4o-mini-2024-07-18"));
        // A model nobody priced is `other`; an operation or provider the conventions do not name
        // is not recorded at all.
        m.gen_ai(&models, &usage("chat", "anthropic", "my-model-\"}{x"));
        m.gen_ai(&models, &usage("evil", "openai", "gpt-4o-mini"));
        m.gen_ai(&models, &usage("chat", "evil", "gpt-4o-mini"));
        // Values no answer has are not believed.
        let mut huge = usage("chat", "openai", "gpt-4o-mini*");
        huge.input = Some(1e308);
        huge.duration_secs = Some(1e9);
        m.gen_ai(&models, &huge);
        let text = m.render();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("gen_ai_client_token_usage_count"))
            .collect();
        assert_eq!(series.len(), 4, "{series:#?}");
        assert!(text.contains(r#"gen_ai_client_token_usage_sum{gen_ai_operation_name="chat",gen_ai_provider_name="openai",gen_ai_request_model="gpt-4o-mini",gen_ai_token_type="input"} 12"#), "{text}");
        assert!(text.contains(r#"gen_ai_request_model="other",gen_ai_token_type="output"} 30"#));
        assert!(text.contains(r#"gen_ai_server_request_duration_seconds_count{gen_ai_operation_name="chat",gen_ai_provider_name="anthropic",gen_ai_request_model="other"} 1"#));
        assert!(!text.contains("evil"));
        assert!(!text.contains("e308") && !text.contains("gpt-4o-mini*"));
        // The huge report's output counted (30 + 30), its input and duration not.
        assert!(
            text.contains(r#"gen_ai_request_model="gpt-4o-mini",gen_ai_token_type="output"} 60"#),
            "{text}"
        );
    }
}
