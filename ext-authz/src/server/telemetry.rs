//! Logs and traces. Logs: JSON lines on stderr (`LLM_POLICY_LOG=text` for text; levels from
//! `RUST_LOG`, default `info`). Traces: OpenTelemetry over OTLP/gRPC when `tracing.otlpEndpoint`
//! is set (off by default): a `check` span per check with `cache`, `evaluate` and `counters`
//! children, continuing the W3C `traceparent` of the request. With tracing off those spans are
//! disabled at their call sites and cost nothing.

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

/// `tracing:` in the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct TracingConfig {
    /// OTLP/gRPC collector, e.g. `http://otel-collector:4317` (default: none, tracing off).
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the spans (default `llm-policy`).
    pub service_name: String,
    /// Share of new traces sampled, 0 to 1 (default 1); a request's sampled parent is followed.
    pub sample_ratio: f64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            service_name: String::from("llm-policy"),
            sample_ratio: 1.0,
        }
    }
}

/// What must be flushed on shutdown.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// The span target the OTLP layer records (this crate's spans, at debug level).
const TARGET: &str = "llm_policy_server";

/// Installs the global subscriber: logs, and traces if configured. Call once, inside the tokio
/// runtime (the OTLP exporter uses it). A second call changes nothing.
pub fn init(config: Option<&TracingConfig>) -> Telemetry {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let text = std::env::var("LLM_POLICY_LOG").is_ok_and(|v| v == "text");
    let logs = if text {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    };
    let mut provider = None;
    let mut error = None;
    let traces = config
        .and_then(|c| c.otlp_endpoint.as_ref().map(|e| (c, e)))
        .and_then(|(c, endpoint)| {
            match opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
            {
                Ok(exporter) => {
                    let p = SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                            c.sample_ratio.clamp(0.0, 1.0),
                        ))))
                        .with_resource(resource(&c.service_name))
                        .build();
                    let tracer = p.tracer("llm-policy");
                    provider = Some(p);
                    Some(
                        tracing_opentelemetry::layer()
                            .with_tracer(tracer)
                            .with_filter(
                                tracing_subscriber::filter::Targets::new()
                                    .with_target(TARGET, tracing::Level::DEBUG),
                            ),
                    )
                }
                Err(e) => {
                    error = Some(format!("cannot export traces to {endpoint}: {e}"));
                    None
                }
            }
        });
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init();
    if let Some(e) = error {
        tracing::error!("{e}");
    } else if let Some(endpoint) = config.and_then(|c| c.otlp_endpoint.as_ref()) {
        tracing::info!(%endpoint, "exporting traces over OTLP");
    }
    Telemetry { provider }
}

impl Telemetry {
    /// Whether traces are exported.
    pub fn tracing(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered.
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                tracing::warn!(error = %e, "trace export did not flush");
            }
        }
    }
}

/// The resource every OpenTelemetry signal of the server carries (its `service.name`).
pub fn resource(service_name: &str) -> opentelemetry_sdk::Resource {
    opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name.to_string())
        .build()
}

/// Request headers as an OpenTelemetry extractor.
struct Headers<'a>(&'a [(String, String)]);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// Makes `span` continue the request's W3C trace context (`traceparent`, `tracestate`).
pub fn continue_trace(span: &tracing::Span, headers: &[(String, String)]) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if span.is_disabled() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    let _ = span.set_parent(parent);
}
