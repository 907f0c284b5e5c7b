//! What reading an answer's usage costs (the filter's response path, and the server's ext_proc
//! edge in ext_authz deployments), and the prompt estimate against the byte count it replaced.
//! Run with `cargo bench -p llm-policy-bench --bench spend`; the README reports one run.
#![allow(
    clippy::unwrap_used,
    missing_docs,
    reason = "bench harness: fixed inputs, a failure is a broken benchmark"
)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use llm_policy_core::tokens::estimate;
use llm_policy_core::usage::{UsageChunkStripper, UsageReader};

/// An OpenAI stream of `n` content chunks and its usage chunk, one SSE event per read.
fn openai_stream(n: usize) -> Vec<Vec<u8>> {
    let mut events: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            format!("data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{i}\"}},\"finish_reason\":null}}],\"usage\":null}}\n\n").into_bytes()
        })
        .collect();
    events.push(b"data: {\"id\":\"chatcmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":900,\"completion_tokens\":400,\"total_tokens\":1300}}\n\n".to_vec());
    events.push(b"data: [DONE]\n\n".to_vec());
    events
}

fn json_answer(bytes: usize) -> Vec<u8> {
    let text = "lorem ipsum dolor sit amet ".repeat(bytes / 27 + 1);
    format!("{{\"id\":\"x\",\"choices\":[{{\"message\":{{\"content\":\"{text}\"}}}}],\"usage\":{{\"prompt_tokens\":9,\"completion_tokens\":6,\"total_tokens\":15}}}}").into_bytes()
}

fn usage(c: &mut Criterion) {
    let mut g = c.benchmark_group("usage");
    let json = json_answer(8 * 1024);
    g.bench_function("json-8k", |b| {
        b.iter(|| {
            let mut r = UsageReader::new("application/json");
            r.feed(black_box(&json));
            r.finish()
        })
    });
    let stream = openai_stream(400);
    g.bench_function("sse-400-events", |b| {
        b.iter(|| {
            let mut r = UsageReader::new("text/event-stream");
            for e in &stream {
                r.feed(black_box(e));
            }
            r.finish()
        })
    });
    g.bench_function("sse-400-events-strip-usage-chunk", |b| {
        b.iter(|| {
            let mut s = UsageChunkStripper::default();
            let n = stream.len();
            let mut out = 0;
            for (i, e) in stream.iter().enumerate() {
                out += s.pass(black_box(e), i + 1 == n).len();
            }
            out
        })
    });
    g.finish();
}

fn estimates(c: &mut Criterion) {
    let mut g = c.benchmark_group("estimate");
    let english = "The policy engine reads the request and decides. ".repeat(8 * 1024 / 50);
    let chinese = "策略引擎读取请求并做出决定。".repeat(8 * 1024 / 42);
    for (name, text) in [("english-8k", &english), ("chinese-8k", &chinese)] {
        g.bench_function(format!("{name}/classes"), |b| {
            b.iter(|| estimate(black_box(text)))
        });
        g.bench_function(format!("{name}/bytes-div-4"), |b| {
            b.iter(|| black_box(text).len().div_ceil(4))
        });
    }
    g.finish();
}

criterion_group!(benches, usage, estimates);
criterion_main!(benches);
