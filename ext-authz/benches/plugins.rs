//! What one WASM plugin call costs (`Plugins::call`: a fresh instance from the pool, the declared
//! fields serialized in, the plugin run, the output read and checked), for the shipped plugins on
//! a short prompt and an 8 KB one, and for a no-op module (the floor: instantiation and the ABI
//! round trip). Needs `make plugins`; skipped with a message otherwise.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    reason = "bench harness: fixed inputs, a failure is a broken benchmark"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use llm_policy_core::context::Message;
use llm_policy_core::RequestContext;
use llm_policy_server::server::plugins::{PluginLimits, Plugins};

/// `$CARGO_TARGET_DIR/plugins` (or `target/plugins`), where `make plugins` puts the modules.
fn plugin_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(|| root.join("target"), |t| root.join(t));
    target.join("plugins")
}

fn ctx(prompt: &str) -> RequestContext {
    let mut c = RequestContext::default();
    c.request.prompt = prompt.to_string();
    c.request.messages = vec![Message {
        role: "user".to_string(),
        content: prompt.to_string(),
    }];
    c
}

/// About 8 KB of ordinary text with numbers, dates and an address in it (nothing to find).
fn prompt_8k() -> String {
    let para = "In Q3 2024 the team shipped release 2.3.1 to 1,204 customers (see table 4.1, \
                rows 10-20); latency fell 12% and the on-call load dropped. Contact the \
                platform group for the migration plan before 2024-11-15. ";
    let mut s = String::new();
    while s.len() < 8 * 1024 {
        s.push_str(para);
    }
    s
}

const NOOP: &str = r#"(module
  (memory (export "memory") 1)
  (data (i32.const 16) "{\"abi\":1,\"name\":\"noop\",\"version\":\"0\",\"reads\":[\"request.prompt\"]}")
  (data (i32.const 1024) "{\"match\":false}")
  (func (export "llm_policy_manifest") (result i64) (i64.const 0x0000001000000040))
  (func (export "llm_policy_alloc") (param i32) (result i32)
    (drop (memory.grow (i32.add (i32.shr_u (local.get 0) (i32.const 16)) (i32.const 1))))
    (i32.const 65536))
  (func (export "llm_policy_evaluate") (param i32 i32) (result i64) (i64.const 0x000004000000000f))
)"#;

fn bench(c: &mut Criterion) {
    let dir = plugin_dir();
    let shipped = ["pii-detector", "prompt-injection"];
    if !shipped
        .iter()
        .all(|p| dir.join(format!("{p}.wasm")).is_file())
    {
        eprintln!(
            "skipped: the plugins are not built in {} (run `make plugins`)",
            dir.display()
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let noop = tmp.path().join("noop.wasm");
    std::fs::write(&noop, wat::parse_str(NOOP).unwrap()).unwrap();
    let mut files: Vec<PathBuf> = shipped
        .iter()
        .map(|p| dir.join(format!("{p}.wasm")))
        .collect();
    files.push(noop);
    let attrs: Vec<String> = ["id", "tier", "team"].map(String::from).to_vec();
    let plugins = Plugins::load_files(&files, PluginLimits::default(), &attrs).unwrap();

    let small = ctx("Please summarise this paper about distributed consensus in two sentences.");
    let large = ctx(&prompt_8k());
    let args = BTreeMap::new();
    let limits = plugins.limits();
    eprintln!("limits: {limits:?}");
    let mut g = c.benchmark_group("plugins");
    for name in ["noop", "pii-detector", "prompt-injection"] {
        for (label, ctx) in [("small", &small), ("8KB", &large)] {
            let out = plugins.call(name, "bench", &args, ctx).unwrap();
            assert!(!out.matched, "{name} {label}: {out:?}");
            eprintln!(
                "{name}/{label}: fuel {} ({:.2}% of the limit), memory {} KiB",
                out.fuel_used,
                out.fuel_used as f64 * 100.0 / limits.fuel as f64,
                out.memory_used / 1024
            );
            g.bench_function(format!("{name}/{label}"), |b| {
                b.iter(|| plugins.call(name, "bench", &args, ctx).unwrap())
            });
        }
    }
    g.finish();

    // Not a criterion measurement: how far a large prompt (1 MiB) is from the default limits.
    let huge = ctx(&prompt_8k().repeat(128));
    let roomy = PluginLimits {
        fuel: u64::MAX,
        timeout: std::time::Duration::from_secs(10),
        ..*limits
    };
    let roomy = Plugins::load_files(&files, roomy, &attrs).unwrap();
    for name in shipped {
        let t = Instant::now();
        match roomy.call(name, "bench", &args, &huge) {
            Ok(out) => eprintln!(
                "{name}/1MiB: {:?}, fuel {} ({:.0}% of the default limit), memory {} MiB",
                t.elapsed(),
                out.fuel_used,
                out.fuel_used as f64 * 100.0 / limits.fuel as f64,
                out.memory_used >> 20
            ),
            Err(e) => eprintln!("{name}/1MiB: {e} after {:?}", t.elapsed()),
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
