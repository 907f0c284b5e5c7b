//! The server's decision caches and the engine's check, in process: what an L1 hit (per worker
//! thread), an L2 hit (shared) and an L3 lookup (the registry's active compiled version) cost,
//! and a whole `Engine::check` of an 8 KB chat request, cached and uncached; with a real
//! redis-server (started here on a free loopback port): an L4 hit, a counter reservation in Redis
//! against one in memory, and whole checks answered from L4 or charging a Redis counter.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "bench harness: fixed inputs, a failure is a broken benchmark"
)]

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use llm_policy_core::decision::{Actions, DecisionMetadata, Verdict};
use llm_policy_core::Decision;
use llm_policy_server::server::cache::RemoteCache;
use llm_policy_server::server::cache::{CacheConfig, Caches};
use llm_policy_server::server::config::{AuditConfig, CheckConfig};
use llm_policy_server::server::engine::{CheckInput, Engine};
use llm_policy_server::server::limits::redis_store::RedisStore;
use llm_policy_server::server::limits::{CounterStore, MemoryStore};
use llm_policy_server::server::metrics::Metrics;
use llm_policy_server::server::redis::{local::LocalRedis, Redis, RedisConfig};
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
    serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 256, "messages": [{"role": "user", "content": text}]})
        .to_string()
        .into_bytes()
}

/// An 8 KB chat completion request as Envoy hands it over, charging counters.
fn chat_input() -> CheckInput {
    CheckInput {
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: body(),
        charge: true,
        ..CheckInput::default()
    }
}

/// No in-process cache levels.
const NO_LOCAL_CACHE: CacheConfig = CacheConfig {
    l1_entries: 0,
    l2_entries: 0,
};

fn engine(cache: &CacheConfig) -> Engine {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    engine_on(root, cache, Arc::new(MemoryStore::default()))
}

fn engine_on(
    root: std::path::PathBuf,
    cache: &CacheConfig,
    store: Arc<dyn CounterStore>,
) -> Engine {
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
        None,
    )
    .unwrap();
    Engine::new(
        reg,
        store,
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
    let input = chat_input();
    let mut g = c.benchmark_group("check_8kb_chat");
    let cached = engine(&CacheConfig::default());
    let first = rt.block_on(cached.check(input.clone()));
    assert!(first.decision.unwrap().metadata.cacheable);
    g.bench_function("cached", |b| {
        b.iter(|| rt.block_on(cached.check(input.clone())))
    });
    let uncached = engine(&NO_LOCAL_CACHE);
    g.bench_function("uncached", |b| {
        b.iter(|| rt.block_on(uncached.check(input.clone())))
    });
    g.finish();
}

/// A policy whose one rule charges a global request counter on every request (a limit never
/// reached): every check asks the counter store. `make bench-redis` loads it too.
const COUNTED: &str = include_str!("../policies/counted.yaml");

fn bench_redis(c: &mut Criterion) {
    let server = LocalRedis::start().unwrap();
    let metrics = Metrics::new().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _in_runtime = rt.enter();
    let redis = Redis::connect(
        &RedisConfig {
            url: Some(server.url()),
            timeout_ms: 1000,
            ..RedisConfig::default()
        },
        metrics.clone(),
    )
    .unwrap()
    .unwrap();
    let key = "0123456789abcdef0123456789abcdef";

    let mut g = c.benchmark_group("redis");
    let l4 = RemoteCache::new(redis.clone(), 600);
    rt.block_on(async {
        l4.put(key, &decision());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    });
    assert!(rt.block_on(l4.get(key, &metrics)).is_some());
    g.bench_function("l4_hit", |b| {
        b.iter(|| rt.block_on(l4.get(key, &metrics)).unwrap())
    });
    let charge = llm_policy_core::decision::Charge {
        rule: "r".into(),
        source: llm_policy_core::decision::ChargeSource::RateLimit,
        key: "default/r/bench".into(),
        kind: llm_policy_core::decision::CounterKind::Requests,
        limit: 1e12,
        window_secs: 3600,
        amount: 1.0,
        scope: llm_policy_core::model::Scope::Global,
        output: 0,
        per_output: 0.0,
        fit: None,
        headers: false,
    };
    let reserve_commit = |store: &dyn CounterStore| {
        rt.block_on(async {
            let r = store.reserve(&charge, 0).await.unwrap();
            store.commit(r.reservation.unwrap(), None).await.unwrap();
        })
    };
    let memory = MemoryStore::default();
    g.bench_function("counter_memory_reserve_commit", |b| {
        b.iter(|| reserve_commit(&memory))
    });
    let in_redis = RedisStore::new(redis.clone(), 300);
    g.bench_function("counter_redis_reserve_commit", |b| {
        b.iter(|| reserve_commit(&in_redis))
    });
    g.finish();

    let input = chat_input();
    let mut g = c.benchmark_group("check_8kb_chat");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let from_l4 = engine_on(root, &NO_LOCAL_CACHE, Arc::new(MemoryStore::default()))
        .with_remote_cache(Some(RemoteCache::new(redis.clone(), 600)));
    rt.block_on(async {
        from_l4.check(input.clone()).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    });
    let hit = rt.block_on(from_l4.check(input.clone()));
    assert_eq!(hit.cache, Some(llm_policy_server::server::cache::Level::L4));
    g.bench_function("l4_hit", |b| {
        b.iter(|| rt.block_on(from_l4.check(input.clone())))
    });
    let dir = std::env::temp_dir().join(format!("llm-policy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("counted.yaml"), COUNTED).unwrap();
    for (name, store) in [
        (
            "counter_memory",
            Arc::new(MemoryStore::default()) as Arc<dyn CounterStore>,
        ),
        (
            "counter_redis",
            Arc::new(RedisStore::new(redis.clone(), 300)),
        ),
    ] {
        let e = engine_on(dir.clone(), &NO_LOCAL_CACHE, store);
        let first = rt.block_on(e.check(input.clone()));
        assert_eq!(
            first
                .decision
                .as_ref()
                .map(|d| d.matched_rules.clone())
                .unwrap_or_else(|| panic!("{name}: {:?}", first.error)),
            Vec::<String>::new(),
            "the counter is under its limit"
        );
        g.bench_function(name, |b| b.iter(|| rt.block_on(e.check(input.clone()))));
    }
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench, bench_redis);
criterion_main!(benches);
