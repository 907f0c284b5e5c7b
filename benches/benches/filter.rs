//! The filter's request path natively, against a host that answers at once (no proxy): what the
//! filter's own logic costs per request, from the request's headers to its end, without the
//! proxy-wasm boundary and the VM. `make bench-filter` measures the same in Envoy; the
//! difference between the two is the boundary and the VM. A profiler can be pointed at this one
//! (`perf record` on the bench binary).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    reason = "bench harness: fixed inputs, a failure is a broken benchmark"
)]

use std::rc::Rc;
use std::time::Duration;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use llm_policy_filter::host::{CallRefused, Host, Level, Metric, SharedWrite};
use llm_policy_filter::outbox::Outbox;
use llm_policy_filter::request::{Flow, RequestFlow};
use llm_policy_filter::vm::Vm;

/// A proxy holding one request: its headers and body, as Envoy hands them to the filter.
struct BenchHost {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Host for BenchHost {
    fn request_headers(&mut self) -> Vec<(String, String)> {
        self.headers.clone()
    }
    fn request_body(&mut self, len: usize) -> Option<Vec<u8>> {
        self.body.get(..len).map(<[u8]>::to_vec)
    }
    fn set_request_header(&mut self, _: &str, _: Option<&str>) {}
    fn send_reply(&mut self, _: u16, _: &[(String, String)], _: &[u8]) {}
    fn set_request_body(&mut self, _: usize, _: &[u8]) {}
    fn response_header(&mut self, name: &str) -> Option<String> {
        match name {
            ":status" => Some("200".into()),
            "content-type" => Some("application/json".into()),
            _ => None,
        }
    }
    fn set_response_header(&mut self, _: &str, _: Option<&str>) {}
    fn response_body(&mut self, _: usize) -> Option<Vec<u8>> {
        None
    }
    fn set_response_body(&mut self, _: usize, _: &[u8]) {}
    fn resume_request(&mut self) {}
    fn now(&self) -> Duration {
        Duration::from_secs(1_800_000_000)
    }
    fn shared_get(&mut self, _: &str) -> Option<(Vec<u8>, u32)> {
        None
    }
    fn shared_set(&mut self, _: &str, _: &[u8], _: Option<u32>) -> SharedWrite {
        SharedWrite::Ok
    }
    fn grpc_call(
        &mut self,
        _: &str,
        _: &str,
        _: &str,
        _: &[(&str, &str)],
        _: &[u8],
        _: Duration,
    ) -> Result<u32, CallRefused> {
        Err(CallRefused("no server in the benchmark"))
    }
    fn http_call(&mut self, _: &str, _: &[(&str, &str)], _: Duration) -> Result<u32, CallRefused> {
        Err(CallRefused("no server in the benchmark"))
    }
    fn log(&mut self, _: Level, _: &str) {}
    fn metric(&mut self, _: Metric, _: u64) {}
}

/// The filter configuration with `policies` (YAML) inline.
fn vm(policies: &str) -> Rc<Vm> {
    let indented: String = policies.lines().map(|l| format!("  {l}\n")).collect();
    Rc::new(Vm::configure(&format!("policies: |\n{indented}")).unwrap())
}

/// The example bundle (`policies/`), both files in one text.
fn example_bundle() -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");
    let mut text = String::new();
    for name in ["llm-baseline.yaml", "restricted.yaml"] {
        text.push_str(&std::fs::read_to_string(format!("{root}/{name}")).unwrap());
        text.push_str("\n---\n");
    }
    text
}

/// One request through the filter, headers to end; the body made unique by `n` when `unique`.
fn one(vm: &Rc<Vm>, outbox: &Rc<Outbox>, host: &mut BenchHost) -> Flow {
    let mut flow = RequestFlow::new(Rc::clone(vm), Rc::clone(outbox));
    assert_eq!(flow.on_request_headers(host, false), Flow::Pause);
    let len = host.body.len();
    let f = flow.on_request_body(host, len, true);
    flow.on_response_headers(host, false);
    flow.on_response_body(host, 64, true);
    flow.on_done(host);
    f
}

fn requests(c: &mut Criterion) {
    let mut g = c.benchmark_group("filter");
    let hundred = llm_policy_bench::hundred_rules_yaml();
    let example = example_bundle();
    let outbox = Rc::new(Outbox::default());
    for (name, policies) in [("100-rules", &hundred), ("example-bundle", &example)] {
        let vm = vm(policies);
        for kb in [1usize, 8, 64] {
            let body = llm_policy_bench::nonce_chat_body(kb * 1024);
            let mut host = BenchHost {
                headers: llm_policy_bench::headers(&[
                    (":method", "POST"),
                    (":path", "/v1/chat/completions"),
                    (":authority", "api.openai.com"),
                    (":scheme", "http"),
                    ("content-type", "application/json"),
                    ("content-length", &body.len().to_string()),
                    ("x-request-id", "5b0c5b6e-8c1e-4d43-9d55-6f0f8d1c9a10"),
                    ("user-agent", "loadgen"),
                ]),
                body: body.into_bytes(),
            };
            assert_eq!(one(&vm, &outbox, &mut host), Flow::Continue);
            g.throughput(criterion::Throughput::Bytes(host.body.len() as u64));
            // The same body each time: the decision cache answers (its key is still built).
            g.bench_function(
                BenchmarkId::new(format!("{name}/same-body"), format!("{kb}KB")),
                |b| b.iter(|| one(black_box(&vm), &outbox, &mut host)),
            );
            // A new body each time (a count in the prompt's nonce): every request decided.
            let at = llm_policy_bench::nonce_at(&host.body).expect("the body has a nonce");
            let mut n = 0u64;
            g.bench_function(
                BenchmarkId::new(format!("{name}/unique"), format!("{kb}KB")),
                |b| {
                    b.iter(|| {
                        n += 1;
                        llm_policy_bench::write_nonce(&mut host.body, at, n);
                        one(black_box(&vm), &outbox, &mut host)
                    })
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, requests);
criterion_main!(benches);
