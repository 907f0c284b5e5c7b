//! OpenTelemetry: spans exported over OTLP/gRPC to a collector on loopback (a real tonic server
//! speaking the OTLP trace service), continuing the request's W3C `traceparent`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{chat, check, check_request, policy, Harness};
use llm_policy_server::server::telemetry::{self, TracingConfig};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = req
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.0.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_are_traced_and_continue_the_callers_trace() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let c = collector.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(c))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    let tel = telemetry::init(Some(&TracingConfig {
        otlp_endpoint: Some(format!("http://{addr}")),
        ..TracingConfig::default()
    }));
    assert!(tel.tracing());

    let rules = "    - { id: no-gpt-3, when: { match: { field: request.model, op: eq, value: gpt-3 } }, action: { decision: deny } }\n";
    let h = Harness::start(&[("p.yaml", &policy("p", "allow", rules))], |_| {}).await;
    let mut client = h.grpc().await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let a = check(
        &mut client,
        check_request(
            "POST",
            "/v1/chat/completions",
            &[("traceparent", &format!("00-{trace}-{parent}-01"))],
            &chat("gpt-3", "hi"),
        ),
    )
    .await;
    assert_eq!(a.status, 403);
    h.stop().await;
    tokio::task::spawn_blocking(move || tel.shutdown())
        .await
        .unwrap();

    // Only this test's trace: other tests in this binary run servers whose checks are traced
    // by the same global subscriber.
    let mut spans = Vec::new();
    for _ in 0..50 {
        spans = collector.0.lock().unwrap().clone();
        spans.retain(|s| hex(&s.trace_id) == trace);
        if spans.iter().any(|s| s.name == "check") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let check_span = spans
        .iter()
        .find(|s| s.name == "check")
        .expect("a check span in the caller's trace");
    assert_eq!(
        hex(&check_span.trace_id),
        trace,
        "continues the caller's trace"
    );
    assert_eq!(hex(&check_span.parent_span_id), parent);
    let attr = |name: &str| {
        check_span
            .attributes
            .iter()
            .find(|kv| kv.key == name)
            .and_then(|kv| kv.value.as_ref())
            .map(|v| format!("{:?}", v.value))
    };
    assert!(attr("decision").unwrap().contains("deny"));
    assert!(attr("rule").unwrap().contains("no-gpt-3"));
    // Children of the check, in the same trace.
    for child in ["extract", "cache", "evaluate"] {
        let s = spans.iter().find(|s| s.name == child).unwrap_or_else(|| {
            panic!(
                "a {child} span in {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
        assert_eq!(hex(&s.trace_id), trace);
        assert_eq!(
            s.parent_span_id, check_span.span_id,
            "{child} is a child of check"
        );
    }
}

#[derive(Clone, Default)]
struct LogCollector(Arc<Mutex<Vec<opentelemetry_proto::tonic::logs::v1::LogRecord>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::LogsService
    for LogCollector
{
    async fn export(
        &self,
        req: tonic::Request<
            opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest,
        >,
    ) -> Result<
        tonic::Response<opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse>,
        tonic::Status,
    > {
        let records = req
            .into_inner()
            .resource_logs
            .into_iter()
            .flat_map(|r| r.scope_logs)
            .flat_map(|s| s.log_records);
        self.0.lock().unwrap().extend(records);
        Ok(tonic::Response::new(Default::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_are_exported_as_otlp_logs() {
    use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::LogsServiceServer;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    let collector = LogCollector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let c = collector.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(LogsServiceServer::new(c))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    let rules = "    - { id: no-gpt-3, when: { match: { field: request.model, op: eq, value: gpt-3 } }, action: { decision: deny, alert: high } }\n";
    let h = Harness::start(&[("p.yaml", &policy("p", "allow", rules))], move |c| {
        c.audit.otlp = Some(llm_policy_server::server::config::OtlpSinkConfig {
            endpoint: format!("http://{addr}"),
            service_name: String::from("llm-policy-test"),
        });
    })
    .await;
    let mut client = h.grpc().await;
    let a = check(
        &mut client,
        check_request("POST", "/v1/chat/completions", &[], &chat("gpt-3", "hi")),
    )
    .await;
    assert!(!a.allowed);
    // Stopping the server flushes the audit queue and the exporter.
    let file = h.stop().await;
    let start = std::time::Instant::now();
    while collector.0.lock().unwrap().len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the audit records at the collector"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let records = collector.0.lock().unwrap().clone();
    let attr = |r: &opentelemetry_proto::tonic::logs::v1::LogRecord, k: &str| {
        r.attributes
            .iter()
            .find(|a| a.key == k)
            .and_then(|a| a.value.as_ref()?.value.clone())
    };
    let kinds: Vec<_> = records.iter().map(|r| attr(r, "llm_policy.kind")).collect();
    assert!(
        kinds.contains(&Some(Any::StringValue("decision".into()))),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&Some(Any::StringValue("alert".into()))),
        "{kinds:?}"
    );
    let decision = records
        .iter()
        .find(|r| attr(r, "llm_policy.kind") == Some(Any::StringValue("decision".into())))
        .unwrap();
    assert_eq!(decision.event_name, "llm_policy.audit");
    // The body is the line the file sink wrote.
    let Some(Any::StringValue(body)) = decision.body.as_ref().and_then(|b| b.value.clone()) else {
        panic!("no body");
    };
    assert!(file.lines().any(|l| l == body), "{body}");
}
