//! Load + compile time of large policy sets (what a hot reload costs): YAML text to a compiled
//! `PolicySet`, for 1,000 and 10,000 rules in the DSL, in translatable CEL and in a realistic mix.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    reason = "bench harness: fixed inputs, a failure is a broken benchmark"
)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use llm_policy_bench::{load_policy, LoadKind};
use llm_policy_core::source::parse_str;
use llm_policy_core::{ContextConfig, PolicySet};

fn load(yaml: &str) -> PolicySet {
    let docs = parse_str("load.yaml", yaml).unwrap();
    PolicySet::compile(&docs, &ContextConfig::default())
        .unwrap()
        .set
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("load");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for n in [1_000usize, 10_000] {
        for (name, kind) in [
            ("dsl", LoadKind::Dsl),
            ("cel", LoadKind::Cel),
            ("mixed", LoadKind::Mixed),
        ] {
            let yaml = load_policy(n, kind);
            assert_eq!(load(&yaml).rule_count(), n);
            g.bench_with_input(BenchmarkId::new(name, n), &yaml, |b, y| b.iter(|| load(y)));
        }
        let yaml = load_policy(n, LoadKind::Mixed);
        g.bench_with_input(BenchmarkId::new("mixed-parse-only", n), &yaml, |b, y| {
            b.iter(|| parse_str("load.yaml", y).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
