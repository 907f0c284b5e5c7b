//! The server's decision caches and the engine's check, in process: what an L1 hit (per worker
//! thread), an L2 hit (shared) and an L3 lookup (the registry's active compiled version) cost,
//! and a whole `Engine::check` of an 8 KB chat request, cached and uncached.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    reason = "bench harness: fixed inputs, a failure is a broken benchmark"
)]

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use llm_policy_core::decision::{Actions, DecisionMetadata, Verdict};
use llm_policy_core::Decision;
use llm_policy_server::server::cache::{CacheConfig, Caches};
use llm_policy_server::server::config::{AuditConfig, CheckConfig};
use llm_policy_server::server::engine::{CheckInput, Engine};
use llm_policy_server::server::limits::MemoryStore;
use llm_policy_server::server::metrics::Metrics;
use llm_policy_server::server::{audit, registry};

fn decision() -> Arc<Decision> {
    Arc::new(Decision {
        decision: Verdict::Allow,
        reason: "no rule matched: default allow".into(),
        matched_rules: vec![],
        actions: Actions::default(),
        metadata: DecisionMetadata::default(),
        evaluation_time_us: 3,
        explain: None,
    })
}

fn body() -> Vec<u8> {
    let text = "Please review the following paragraph about distributed systems. ".repeat(120);
    serde_json::json!({"model": "gpt-4o", "max_tokens": 256, "messages": [{"role": "user", "content": text}]})
        .to_string()
        .into_bytes()
}

fn engine(cache: &CacheConfig) -> Engine {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let reg = Arc::new(registry::Registry::new(root, Default::default(), 2));
    reg.reload().unwrap();
    let metrics = Metrics::new().unwrap();
    let (audit, _writer) = audit::start(
        &AuditConfig {
            decisions: llm_policy_server::server::config::AuditScope::None,
            stdout: false,
            ..AuditConfig::default()
        },
        metrics.clone(),
    )
    .unwrap();
    Engine::new(
        reg,
        Arc::new(MemoryStore::default()),
        Caches::new(cache),
        metrics,
        audit,
        CheckConfig::default(),
        Default::default(),
    )
}

fn bench(c: &mut Criterion) {
    let metrics = Metrics::new().unwrap();
    let key = "0123456789abcdef0123456789abcdef";
    let mut g = c.benchmark_group("cache");
    let both = Caches::new(&CacheConfig::default());
    both.put(key.into(), decision());
    g.bench_function("l1_hit", |b| b.iter(|| both.get(key, &metrics).unwrap()));
    let l2_only = Caches::new(&CacheConfig {
        l1_entries: 0,
        l2_entries: 10_000,
    });
    l2_only.put(key.into(), decision());
    g.bench_function("l2_hit", |b| b.iter(|| l2_only.get(key, &metrics).unwrap()));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let reg = registry::Registry::new(root, Default::default(), 2);
    reg.reload().unwrap();
    g.bench_function("l3_active_version", |b| b.iter(|| reg.current().unwrap()));
    g.finish();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let input = CheckInput {
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: body(),
        charge: true,
        ..CheckInput::default()
    };
    let mut g = c.benchmark_group("check_8kb_chat");
    let cached = engine(&CacheConfig::default());
    let first = rt.block_on(cached.check(input.clone()));
    assert!(first.decision.unwrap().metadata.cacheable);
    g.bench_function("cached", |b| {
        b.iter(|| rt.block_on(cached.check(input.clone())))
    });
    let uncached = engine(&CacheConfig {
        l1_entries: 0,
        l2_entries: 0,
    });
    g.bench_function("uncached", |b| {
        b.iter(|| rt.block_on(uncached.check(input.clone())))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
