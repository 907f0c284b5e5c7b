//! The audit log exported as OpenTelemetry log records over OTLP/gRPC (`audit.otlp`), so a
//! governance or SIEM pipeline behind an OpenTelemetry collector takes it without a custom reader.
//!
//! Each record becomes one log record: the JSON line as its body (the same bytes the file and
//! stdout sinks write), event name `llm_policy.audit`, severity `INFO` (`WARN` for `alert`
//! records), and the fields a pipeline routes on as attributes: `llm_policy.kind`,
//! `llm_policy.decision`, `llm_policy.namespace`, `llm_policy.record_id`. Records are batched
//! and exported from the SDK's own thread; an unreachable collector loses batches (the SDK
//! logs it) and never slows the writer.

use std::io;

use super::super::config::OtlpSinkConfig;
use super::Sink;
use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::logs::{SdkLogger, SdkLoggerProvider};

/// Audit records as OTLP log records.
pub struct OtlpSink {
    provider: SdkLoggerProvider,
    logger: SdkLogger,
}

impl OtlpSink {
    /// Builds the exporter (inside the tokio runtime: the gRPC client lives on it).
    pub fn new(config: &OtlpSinkConfig) -> io::Result<OtlpSink> {
        let exporter = opentelemetry_otlp::LogExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .build()
            .map_err(|e| io::Error::other(format!("audit.otlp {}: {e}", config.endpoint)))?;
        let provider = SdkLoggerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(super::super::telemetry::resource(&config.service_name))
            .build();
        let logger = provider.logger("llm-policy-audit");
        Ok(OtlpSink { provider, logger })
    }
}

impl Sink for OtlpSink {
    fn write(&mut self, line: &str) -> io::Result<()> {
        let fields: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        let text = |k: &str| {
            fields
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let kind = text("kind");
        let mut record = self.logger.create_log_record();
        record.set_event_name("llm_policy.audit");
        record.set_severity_number(if kind == "alert" {
            Severity::Warn
        } else {
            Severity::Info
        });
        record.set_body(AnyValue::from(line.to_string()));
        record.add_attribute("llm_policy.kind", kind);
        record.add_attribute("llm_policy.decision", text("decision"));
        record.add_attribute("llm_policy.namespace", text("namespace"));
        record.add_attribute("llm_policy.record_id", text("id"));
        self.logger.emit(record);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.provider
            .force_flush()
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

impl Drop for OtlpSink {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}
