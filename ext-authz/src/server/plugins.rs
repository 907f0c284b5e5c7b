//! WASM plugin conditions (`when: { plugin: { name, args } }`), run with wasmtime.
//!
//! A plugin is a core WebAssembly module with no imports that exports `memory`,
//! `llm_policy_manifest`, `llm_policy_alloc` and `llm_policy_evaluate` (ABI 1, docs/plugins.md).
//! [`Plugins::load_dir`] compiles every `*.wasm` file of a directory once, checks its exports and
//! its manifest (the context fields it `reads` are checked against the core's schema) and keeps a
//! pre-linked [`InstancePre`] per plugin. [`Plugins::call`] then runs one rule: the declared
//! fields (only those) are serialized with the rule id and arguments into a fresh instance, which
//! is dropped after the call, so nothing survives between requests.
//!
//! Every call is bounded ([`PluginLimits`]): fuel (instructions), linear memory (a `memory.grow`
//! past the limit traps; the host never allocates more), a wall-clock deadline (epoch
//! interruption: one background thread per [`Plugins`] ticks the engine every millisecond and
//! stops when the last clone is dropped), the wasm stack, the input and the output size. A call
//! that breaks a limit is a [`PluginError`]; the rule's `onError` then applies. Instances come
//! from wasmtime's pooling allocator (memory slots reserved once, reset between calls), which
//! halves the per-call floor compared with mapping fresh memory: about 10 µs for a no-op module,
//! 20–150 µs for the shipped plugins on prompts up to 8 KB (docs/plugins.md).
//!
//! [`Plugins::call`] is synchronous and CPU-bound: run it on the blocking pool.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use llm_policy_core::context::Needs;
use llm_policy_core::model::PluginRef;
use llm_policy_core::schema::FieldRef;
use llm_policy_core::{PluginCheck, RequestContext};
use serde::ser::{SerializeMap as _, Serializer};
use serde::{Deserialize, Serialize};
use wasmtime::{
    Config, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Memory, Module,
    ModuleExport, OptLevel, PoolingAllocationConfig, ResourceLimiter, Store, Trap, TypedFunc,
    UpdateDeadline, ValType, WasmBacktraceDetails,
};

/// The plugin ABI version this host implements (the manifest's `abi`).
pub const ABI_VERSION: u32 = 1;

/// Largest plugin file read (bytes).
const MAX_MODULE_BYTES: u64 = 64 * 1024 * 1024;
/// Largest manifest read (bytes).
const MAX_MANIFEST_BYTES: usize = 64 * 1024;
/// How often the engine's epoch advances (the deadline's resolution).
const TICK: Duration = Duration::from_millis(1);
/// Longest plugin-supplied text (error message, reason) kept, in bytes.
const MAX_TEXT: usize = 1024;
/// Table elements an instance may have (Rust modules need a few hundred).
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// What one plugin call may use. Exceeding any of them fails the call (the rule's `onError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PluginLimits {
    /// Fuel per call: roughly one unit per WebAssembly instruction executed (including the
    /// instance's start-up).
    pub fuel: u64,
    /// Linear memory per instance, in bytes (including the module's initial memory).
    pub memory_bytes: u64,
    /// Wall-clock time per call, from instantiation to the output being read (1 ms resolution).
    pub timeout: Duration,
    /// Largest input JSON written into the instance, in bytes.
    pub max_input_bytes: usize,
    /// Largest output JSON read back, in bytes.
    pub max_output_bytes: usize,
    /// Largest native stack WebAssembly code may use, in bytes (deep recursion traps).
    pub max_stack_bytes: usize,
    /// Instances that can exist at once (the pooling allocator's slots), i.e. concurrent calls;
    /// a call beyond it fails. Each slot reserves address space, not memory.
    pub max_concurrent_calls: u32,
}

impl Default for PluginLimits {
    /// 500 M fuel, 16 MiB, 50 ms, 4 MiB in, 64 KiB out, 512 KiB of stack, 64 calls at once. On an
    /// 8 KB prompt the shipped plugins use under 0.5% of the fuel, under 1% of the time and 1.2 MiB
    /// of memory; a 1 MiB prompt still fits (about half the fuel, 14 ms, 11 MiB). Measurements in
    /// docs/plugins.md.
    fn default() -> Self {
        PluginLimits {
            fuel: 500_000_000,
            memory_bytes: 16 * 1024 * 1024,
            timeout: Duration::from_millis(50),
            max_input_bytes: 4 * 1024 * 1024,
            max_output_bytes: 64 * 1024,
            max_stack_bytes: 512 * 1024,
            max_concurrent_calls: 64,
        }
    }
}

/// What a plugin answered.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginOutput {
    /// Whether the rule's condition holds.
    pub matched: bool,
    /// The plugin's score, 0..1, when it gives one.
    pub score: Option<f64>,
    /// The plugin's explanation (one line, at most 1 KiB), when it gives one.
    pub reason: Option<String>,
    /// Fuel the call used (instantiation included): what [`PluginLimits::fuel`] is measured in.
    pub fuel_used: u64,
    /// The instance's linear memory at the end of the call, in bytes: its peak, since memory
    /// never shrinks (what [`PluginLimits::memory_bytes`] bounds).
    pub memory_used: u64,
}

/// What a loaded plugin declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    /// The name policies use.
    pub name: String,
    /// The plugin's version.
    pub version: String,
    /// The context field paths it reads, as declared.
    pub reads: Vec<String>,
    /// The file it was loaded from.
    pub file: PathBuf,
}

/// Why plugins could not be loaded, or a call failed. `Display` is one line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// A plugin file (or the directory) could not be loaded.
    #[error("plugin {}: {reason}", file.display())]
    Load {
        /// The file (or directory).
        file: PathBuf,
        /// Why.
        reason: String,
    },
    /// No plugin of that name is loaded.
    #[error("plugin `{0}` is not loaded")]
    NotLoaded(String),
    /// The input JSON is larger than [`PluginLimits::max_input_bytes`].
    #[error("plugin `{plugin}`: the input is over the limit of {limit} bytes")]
    InputTooLarge {
        /// The plugin.
        plugin: String,
        /// The limit.
        limit: usize,
    },
    /// The call used all of [`PluginLimits::fuel`].
    #[error("plugin `{plugin}` ran out of fuel (limit {fuel})")]
    OutOfFuel {
        /// The plugin.
        plugin: String,
        /// The limit.
        fuel: u64,
    },
    /// The call ran past [`PluginLimits::timeout`].
    #[error("plugin `{plugin}` ran past its deadline of {timeout:?}")]
    Deadline {
        /// The plugin.
        plugin: String,
        /// The limit.
        timeout: Duration,
    },
    /// The instance asked for more linear memory than [`PluginLimits::memory_bytes`].
    #[error("plugin `{plugin}` needed more than its memory limit of {limit} bytes")]
    MemoryLimit {
        /// The plugin.
        plugin: String,
        /// The limit.
        limit: u64,
    },
    /// The instance trapped (`unreachable`, a panic, an out-of-bounds access, stack overflow…).
    #[error("plugin `{plugin}` trapped: {reason}")]
    Trap {
        /// The plugin.
        plugin: String,
        /// The trap.
        reason: String,
    },
    /// The output broke the ABI: a bad pointer or length, too large, not JSON, no `match`.
    #[error("plugin `{plugin}` broke the ABI: {reason}")]
    BadOutput {
        /// The plugin.
        plugin: String,
        /// What was wrong.
        reason: String,
    },
    /// The plugin reported an error itself (`{"error": "..."}`), e.g. bad arguments.
    #[error("plugin `{plugin}` failed: {message}")]
    Failed {
        /// The plugin.
        plugin: String,
        /// Its message (one line, at most 1 KiB).
        message: String,
    },
    /// No instance could be made: every slot is busy ([`PluginLimits::max_concurrent_calls`]) or
    /// the host is out of resources.
    #[error("plugin `{plugin}` could not start: {reason}")]
    Unavailable {
        /// The plugin.
        plugin: String,
        /// Why.
        reason: String,
    },
}

/// The loaded plugins, compiled once. Cheap to clone (an `Arc`); safe to call from any number of
/// threads at once.
#[derive(Clone)]
pub struct Plugins {
    inner: Arc<Inner>,
}

struct Inner {
    limits: PluginLimits,
    plugins: BTreeMap<String, Plugin>,
    /// Declared last: dropped (and its thread stopped) after the plugins.
    runtime: Option<Runtime>,
}

struct Runtime {
    engine: Engine,
    _ticker: Ticker,
}

struct Plugin {
    info: PluginInfo,
    /// `(declared path, field)`, in declaration order.
    reads: Vec<(String, FieldRef)>,
    pre: InstancePre<State>,
    exports: Exports,
}

/// The ABI exports, looked up once per module.
#[derive(Clone, Copy)]
struct Exports {
    memory: ModuleExport,
    manifest: ModuleExport,
    alloc: ModuleExport,
    evaluate: ModuleExport,
}

impl fmt::Debug for Plugins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugins")
            .field("plugins", &self.inner.plugins.keys().collect::<Vec<_>>())
            .field("limits", &self.inner.limits)
            .finish()
    }
}

impl Plugins {
    /// No plugins: every call answers [`PluginError::NotLoaded`]. Starts no thread.
    pub fn empty() -> Plugins {
        Plugins {
            inner: Arc::new(Inner {
                limits: PluginLimits::default(),
                plugins: BTreeMap::new(),
                runtime: None,
            }),
        }
    }

    /// Loads every `*.wasm` file of `dir` (not recursively; other files are ignored), in name
    /// order. `principal_attrs` are the configured principal attributes (the `principal.<name>`
    /// paths a manifest may read). Every error names the file and says why: not WebAssembly,
    /// imports, a missing or mistyped export, a bad manifest, an unknown field in `reads`, a
    /// duplicate name, an ABI other than 1.
    pub fn load_dir(
        dir: &Path,
        limits: PluginLimits,
        principal_attrs: &[String],
    ) -> Result<Plugins, PluginError> {
        let dir_error = |e: std::io::Error| PluginError::Load {
            file: dir.to_path_buf(),
            reason: format!("cannot read the plugin directory: {e}"),
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(dir_error)? {
            let path = entry.map_err(dir_error)?.path();
            if path.extension().is_some_and(|e| e == "wasm") && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        Plugins::load_files(&files, limits, principal_attrs)
    }

    /// Loads these plugin files (see [`Plugins::load_dir`]).
    pub fn load_files(
        files: &[PathBuf],
        limits: PluginLimits,
        principal_attrs: &[String],
    ) -> Result<Plugins, PluginError> {
        if files.is_empty() {
            let mut empty = Plugins::empty();
            if let Some(inner) = Arc::get_mut(&mut empty.inner) {
                inner.limits = limits;
            }
            return Ok(empty);
        }
        let engine = engine(&limits).map_err(|reason| PluginError::Load {
            file: files.first().cloned().unwrap_or_default(),
            reason,
        })?;
        let ticker = Ticker::start(engine.clone()).map_err(|e| PluginError::Load {
            file: files.first().cloned().unwrap_or_default(),
            reason: format!("cannot start the epoch thread: {e}"),
        })?;
        let mut plugins: BTreeMap<String, Plugin> = BTreeMap::new();
        for file in files {
            let plugin = load_one(&engine, &limits, file, principal_attrs).map_err(|reason| {
                PluginError::Load {
                    file: file.clone(),
                    reason,
                }
            })?;
            if let Some(other) = plugins.get(&plugin.info.name) {
                return Err(PluginError::Load {
                    file: file.clone(),
                    reason: format!(
                        "duplicate plugin name `{}` (also in {})",
                        plugin.info.name,
                        other.info.file.display()
                    ),
                });
            }
            plugins.insert(plugin.info.name.clone(), plugin);
        }
        Ok(Plugins {
            inner: Arc::new(Inner {
                limits,
                plugins,
                runtime: Some(Runtime {
                    engine,
                    _ticker: ticker,
                }),
            }),
        })
    }

    /// The names of the loaded plugins, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.inner.plugins.keys().map(String::as_str)
    }

    /// What the plugin `name` declared, if it is loaded.
    pub fn info(&self, name: &str) -> Option<&PluginInfo> {
        self.inner.plugins.get(name).map(|p| &p.info)
    }

    /// The scans the context must hold for the plugins `names` (those a bundle's rules call):
    /// what their manifests read of `request.prompt_entities` and `request.prompt_injection`. A
    /// plugin reading them gets the findings even when no rule reads those fields. (The text
    /// and its folding are already built for a bundle with plugin rules, and the token estimate
    /// is made on demand: neither is asked for here.)
    pub fn scans_for<'n>(&self, names: impl IntoIterator<Item = &'n String>) -> Needs {
        let mut needs = Needs::NONE;
        for p in names.into_iter().filter_map(|n| self.inner.plugins.get(n)) {
            let read = Needs::reading(p.reads.iter().map(|(_, f)| f));
            needs.entities |= read.entities;
            needs.injection |= read.injection;
            needs.prompt |= read.entities || read.injection;
        }
        needs
    }

    /// Whether no plugin is loaded.
    pub fn is_empty(&self) -> bool {
        self.inner.plugins.is_empty()
    }

    /// The limits every call runs under.
    pub fn limits(&self) -> &PluginLimits {
        &self.inner.limits
    }

    /// Runs plugin `name` for rule `rule` with the rule's `args` on `ctx` (the request, or the
    /// batch item the rule runs on), in a fresh instance. Synchronous and CPU-bound (up to
    /// [`PluginLimits::timeout`]): call it from a blocking thread.
    pub fn call(
        &self,
        name: &str,
        rule: &str,
        args: &BTreeMap<String, serde_json::Value>,
        ctx: &RequestContext,
    ) -> Result<PluginOutput, PluginError> {
        let (Some(plugin), Some(runtime)) = (self.inner.plugins.get(name), &self.inner.runtime)
        else {
            return Err(PluginError::NotLoaded(name.to_string()));
        };
        let limits = &self.inner.limits;
        let input = CallInput {
            rule,
            args,
            fields: Fields {
                reads: &plugin.reads,
                ctx,
            },
        };
        let mut buf = Capped {
            buf: Vec::new(),
            cap: limits.max_input_bytes,
        };
        serde_json::to_writer(&mut buf, &input).map_err(|_| PluginError::InputTooLarge {
            plugin: name.to_string(),
            limit: limits.max_input_bytes,
        })?;
        run(&runtime.engine, limits, plugin, &buf.buf)
    }

    /// [`Plugins::call`] as the core's [`PluginCheck`]: the output's `matched`, or the error's
    /// message (the rule's `onError` applies).
    pub fn check(&self, rule: &str, plugin: &PluginRef, ctx: &RequestContext) -> PluginCheck {
        match self.call(&plugin.name, rule, &plugin.args, ctx) {
            Ok(out) => PluginCheck::Matched(out.matched),
            Err(e) => PluginCheck::Error(e.to_string()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Engine, epoch ticker, per-store state.

fn engine(limits: &PluginLimits) -> Result<Engine, String> {
    let mut pool = PoolingAllocationConfig::new();
    let slots = limits.max_concurrent_calls.max(1);
    let memory_bytes = usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX);
    pool.total_core_instances(slots)
        .total_memories(slots)
        .total_tables(slots)
        .max_memories_per_module(1)
        .max_tables_per_module(1)
        .table_elements(MAX_TABLE_ELEMENTS)
        .max_memory_size(memory_bytes);

    let mut config = Config::new();
    config
        .consume_fuel(true)
        .epoch_interruption(true)
        .max_wasm_stack(limits.max_stack_bytes)
        .wasm_backtrace(false)
        .wasm_backtrace_details(WasmBacktraceDetails::Disable)
        .wasm_memory64(false)
        .wasm_multi_memory(false)
        .wasm_custom_page_sizes(false)
        .cranelift_opt_level(OptLevel::Speed)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config).map_err(|e| format!("cannot create the WebAssembly engine: {}", line(&e)))
}

/// Advances the engine's epoch every [`TICK`] until dropped (which stops and joins its thread).
struct Ticker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(engine: Engine) -> std::io::Result<Ticker> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("plugin-epoch".to_string())
            .spawn(move || {
                // Ends when the sender is dropped (`Disconnected`).
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
                    engine.increment_epoch();
                }
            })?;
        Ok(Ticker {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A store's data: its memory limiter.
struct State {
    memory_bytes: usize,
}

/// Marks a deadline trap (returned by the epoch callback).
#[derive(Debug)]
struct DeadlineExceeded;

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("deadline exceeded")
    }
}

impl std::error::Error for DeadlineExceeded {}

/// Marks a memory-limit trap (returned by the limiter).
#[derive(Debug)]
struct MemoryLimitExceeded;

impl fmt::Display for MemoryLimitExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("memory limit exceeded")
    }
}

impl std::error::Error for MemoryLimitExceeded {}

impl ResourceLimiter for State {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Trap (rather than have `memory.grow` return -1) so the error says what happened.
        if desired > self.memory_bytes {
            Err(wasmtime::Error::new(MemoryLimitExceeded))
        } else {
            Ok(true)
        }
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        1
    }

    fn memories(&self) -> usize {
        1
    }
}

/// A fresh store with the call's limits: fuel, memory, and a deadline checked on every epoch
/// tick against the wall clock.
fn store(engine: &Engine, limits: &PluginLimits) -> Result<Store<State>, String> {
    let mut store = Store::new(
        engine,
        State {
            memory_bytes: usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX),
        },
    );
    store.limiter(|s| s);
    store.set_fuel(limits.fuel).map_err(|e| line(&e))?;
    let deadline = Instant::now() + limits.timeout;
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if Instant::now() >= deadline {
            Err(wasmtime::Error::new(DeadlineExceeded))
        } else {
            Ok(UpdateDeadline::Continue(1))
        }
    });
    Ok(store)
}

// ---------------------------------------------------------------------------------------------
// Loading.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    abi: u32,
    name: String,
    version: String,
    reads: Vec<String>,
}

fn load_one(
    engine: &Engine,
    limits: &PluginLimits,
    file: &Path,
    principal_attrs: &[String],
) -> Result<Plugin, String> {
    let size = std::fs::metadata(file)
        .map_err(|e| format!("cannot read: {e}"))?
        .len();
    if size > MAX_MODULE_BYTES {
        return Err(format!(
            "{size} bytes is over the limit of {MAX_MODULE_BYTES} bytes"
        ));
    }
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read: {e}"))?;
    if !bytes.starts_with(b"\0asm") {
        return Err("not a WebAssembly module (no `\\0asm` header)".to_string());
    }
    let module = Module::new(engine, &bytes)
        .map_err(|e| format!("invalid or unsupported WebAssembly module: {}", line(&e)))?;

    let imports: Vec<String> = module
        .imports()
        .map(|i| format!("`{}.{}`", i.module(), i.name()))
        .collect();
    if !imports.is_empty() {
        return Err(format!(
            "imports {}: plugins may import nothing (no WASI, no host functions)",
            imports.join(", ")
        ));
    }
    let exports = Exports {
        memory: export(
            &module,
            "memory",
            |t| matches!(t, ExternType::Memory(_)),
            "a memory",
        )?,
        manifest: export(
            &module,
            "llm_policy_manifest",
            |t| func(t, &[], &[ValType::I64]),
            "a function `() -> i64`",
        )?,
        alloc: export(
            &module,
            "llm_policy_alloc",
            |t| func(t, &[ValType::I32], &[ValType::I32]),
            "a function `(i32) -> i32`",
        )?,
        evaluate: export(
            &module,
            "llm_policy_evaluate",
            |t| func(t, &[ValType::I32, ValType::I32], &[ValType::I64]),
            "a function `(i32, i32) -> i64`",
        )?,
    };
    let pre = Linker::<State>::new(engine)
        .instantiate_pre(&module)
        .map_err(|e| format!("cannot link: {}", line(&e)))?;

    // The manifest, from an instance of its own under the call limits.
    let mut store = store(engine, limits)?;
    let instance = pre
        .instantiate(&mut store)
        .map_err(|e| format!("cannot instantiate: {}", line(&e)))?;
    let memory = memory_of(&instance, &mut store, &exports)?;
    let manifest_fn: TypedFunc<(), i64> = typed(&instance, &mut store, &exports.manifest)?;
    let packed = manifest_fn
        .call(&mut store, ())
        .map_err(|e| format!("`llm_policy_manifest` failed: {}", line(&e)))?;
    let bytes = read_packed(&memory, &store, packed, MAX_MANIFEST_BYTES)
        .map_err(|e| format!("`llm_policy_manifest`: {e}"))?;
    let manifest: Manifest =
        serde_json::from_slice(bytes).map_err(|e| format!("invalid manifest: {e}"))?;
    if manifest.abi != ABI_VERSION {
        return Err(format!(
            "manifest `abi` is {}; this server implements ABI {ABI_VERSION}",
            manifest.abi
        ));
    }
    let name_ok = !manifest.name.is_empty()
        && manifest.name.len() <= 64
        && manifest
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !name_ok {
        return Err(format!(
            "invalid manifest: name {:?} must be 1-64 letters, digits, `-`, `_` or `.`",
            manifest.name
        ));
    }
    if manifest.version.is_empty() || manifest.version.len() > 64 {
        return Err("invalid manifest: version must be 1-64 characters".to_string());
    }
    let mut reads: Vec<(String, FieldRef)> = Vec::new();
    for path in &manifest.reads {
        let (field, _) = FieldRef::parse_path(path, principal_attrs).map_err(|e| {
            let hint = e
                .suggestion
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            format!(
                "manifest of `{}` reads unknown field `{path}`: {}{hint}",
                manifest.name, e.message
            )
        })?;
        if !reads.iter().any(|(p, _)| p == path) {
            reads.push((path.clone(), field));
        }
    }
    Ok(Plugin {
        info: PluginInfo {
            name: manifest.name,
            version: manifest.version,
            reads: reads.iter().map(|(p, _)| p.clone()).collect(),
            file: file.to_path_buf(),
        },
        reads,
        pre,
        exports,
    })
}

fn export(
    module: &Module,
    name: &str,
    ok: impl Fn(&ExternType) -> bool,
    what: &str,
) -> Result<ModuleExport, String> {
    match module.get_export(name) {
        None => Err(format!("missing export `{name}` (ABI {ABI_VERSION})")),
        Some(t) if !ok(&t) => Err(format!("export `{name}` must be {what}")),
        Some(_) => module
            .get_export_index(name)
            .ok_or_else(|| format!("missing export `{name}` (ABI {ABI_VERSION})")),
    }
}

fn func(t: &ExternType, params: &[ValType], results: &[ValType]) -> bool {
    let ExternType::Func(f) = t else {
        return false;
    };
    let same = |a: Vec<ValType>, b: &[ValType]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| ValType::eq(x, y))
    };
    same(f.params().collect(), params) && same(f.results().collect(), results)
}

fn memory_of(
    instance: &wasmtime::Instance,
    store: &mut Store<State>,
    exports: &Exports,
) -> Result<Memory, String> {
    instance
        .get_module_export(&mut *store, &exports.memory)
        .and_then(|e| e.into_memory())
        .ok_or_else(|| "export `memory` is not a memory".to_string())
}

fn typed<P, R>(
    instance: &wasmtime::Instance,
    store: &mut Store<State>,
    export: &ModuleExport,
) -> Result<TypedFunc<P, R>, String>
where
    P: wasmtime::WasmParams,
    R: wasmtime::WasmResults,
{
    instance
        .get_module_export(&mut *store, export)
        .and_then(|e| e.into_func())
        .ok_or_else(|| "an ABI export is not a function".to_string())?
        .typed::<P, R>(&*store)
        .map_err(|e| line(&e))
}

/// The bytes at `(ptr << 32) | len` in `memory`, at most `max` of them.
fn read_packed<'a>(
    memory: &Memory,
    store: &'a Store<State>,
    packed: i64,
    max: usize,
) -> Result<&'a [u8], String> {
    let packed = packed as u64;
    let ptr = (packed >> 32) as usize;
    let len = (packed & 0xffff_ffff) as usize;
    if len > max {
        return Err(format!(
            "output of {len} bytes is over the limit of {max} bytes"
        ));
    }
    memory
        .data(store)
        .get(ptr..ptr.saturating_add(len))
        .ok_or_else(|| format!("output at {ptr}+{len} is outside the instance's memory"))
}

// ---------------------------------------------------------------------------------------------
// Calls.

/// The input JSON: `{"rule", "args", "fields"}`.
#[derive(Serialize)]
struct CallInput<'a> {
    rule: &'a str,
    args: &'a BTreeMap<String, serde_json::Value>,
    fields: Fields<'a>,
}

/// The declared fields of a context, as a flat JSON map (path → value; null when absent).
struct Fields<'a> {
    reads: &'a [(String, FieldRef)],
    ctx: &'a RequestContext,
}

impl Serialize for Fields<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.reads.len()))?;
        for (path, field) in self.reads {
            map.serialize_entry(path, &FieldValue(field, self.ctx))?;
        }
        map.end()
    }
}

/// One field of a context as JSON, read in place (nothing else of the context is serialized).
struct FieldValue<'a>(&'a FieldRef, &'a RequestContext);

impl Serialize for FieldValue<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ctx = self.1;
        let r = &ctx.request;
        match self.0 {
            FieldRef::Method => s.serialize_str(&r.method),
            FieldRef::Path => s.serialize_str(&r.path),
            FieldRef::Host => s.serialize_str(&r.host),
            FieldRef::Headers => s.collect_map(r.headers.iter().map(|(k, v)| (k, v))),
            FieldRef::Header(name) => ctx.header(name).serialize(s),
            FieldRef::Provider => s.serialize_str(r.provider.as_str()),
            FieldRef::Api => s.serialize_str(r.api.as_str()),
            FieldRef::Model => r.model.serialize(s),
            FieldRef::Stream => s.serialize_bool(r.stream),
            FieldRef::MaxTokens => r.max_tokens.serialize(s),
            FieldRef::Temperature => r.temperature.serialize(s),
            FieldRef::User => r.user.serialize(s),
            FieldRef::Messages => r.messages.serialize(s),
            FieldRef::Prompt => s.serialize_str(&r.prompt),
            FieldRef::PromptFolded => s.serialize_str(&r.prompt_folded),
            FieldRef::PromptEntities => r.prompt_entities.serialize(s),
            FieldRef::PromptInjection => s.serialize_f64(r.prompt_injection),
            FieldRef::EstimatedTokens => {
                s.serialize_i64(i64::try_from(r.prompt_tokens()).unwrap_or(i64::MAX))
            }
            FieldRef::Tools => r.tools.serialize(s),
            FieldRef::ToolTypes => r.tool_types.serialize(s),
            FieldRef::BodyBytes => s.serialize_i64(r.body_bytes),
            FieldRef::PrincipalAll => s.collect_map(ctx.principal.iter().map(|(k, v)| (k, v))),
            FieldRef::Principal(attr) => ctx.principal(attr).serialize(s),
            FieldRef::ShieldAll => s.collect_map(ctx.shield.iter().map(|(k, v)| (k, v))),
            FieldRef::Shield(name) => ctx
                .shield
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v)
                .serialize(s),
            FieldRef::Hour => s.serialize_i64(ctx.time.hour),
            FieldRef::Weekday => s.serialize_i64(ctx.time.weekday),
            // Plugins run on requests: the answer is not known yet (empty).
            FieldRef::ResponseText => s.serialize_str(&ctx.response.text),
            FieldRef::ResponseEntities => ctx.response.entities.serialize(s),
            FieldRef::ResponseToolCalls => ctx.response.tool_calls.serialize(s),
            FieldRef::ResponseFinishReason => ctx.response.finish_reason.serialize(s),
            FieldRef::ResponseOutputTokens => ctx.response.output_tokens.serialize(s),
            // Element fields exist only inside CEL comprehensions; a manifest cannot name one.
            FieldRef::Elem(_) => s.serialize_unit(),
        }
    }
}

/// A writer that fails once more than `cap` bytes were written.
struct Capped {
    buf: Vec<u8>,
    cap: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.cap {
            return Err(std::io::ErrorKind::OutOfMemory.into());
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The output JSON: `{"match", "score"?, "reason"?}` or `{"error"}`; other fields are ignored.
#[derive(Deserialize)]
struct RawOutput {
    #[serde(rename = "match")]
    matched: Option<bool>,
    score: Option<f64>,
    reason: Option<String>,
    error: Option<String>,
}

/// One call in a fresh instance.
fn run(
    engine: &Engine,
    limits: &PluginLimits,
    plugin: &Plugin,
    input: &[u8],
) -> Result<PluginOutput, PluginError> {
    let name = &plugin.info.name;
    let unavailable = |reason: String| PluginError::Unavailable {
        plugin: name.clone(),
        reason,
    };
    let bad = |reason: String| PluginError::BadOutput {
        plugin: name.clone(),
        reason,
    };
    let trapped = |e: wasmtime::Error| classify(e, name, limits);

    let mut store = store(engine, limits).map_err(unavailable)?;
    let instance = plugin.pre.instantiate(&mut store).map_err(|e| {
        if is_limit(&e) {
            trapped(e)
        } else {
            unavailable(line(&e))
        }
    })?;
    let e = &plugin.exports;
    let memory = memory_of(&instance, &mut store, e).map_err(bad)?;
    let alloc: TypedFunc<i32, i32> = typed(&instance, &mut store, &e.alloc).map_err(bad)?;
    let evaluate: TypedFunc<(i32, i32), i64> =
        typed(&instance, &mut store, &e.evaluate).map_err(bad)?;

    let len = i32::try_from(input.len()).map_err(|_| PluginError::InputTooLarge {
        plugin: name.clone(),
        limit: limits.max_input_bytes,
    })?;
    let ptr = alloc.call(&mut store, len).map_err(trapped)?;
    if ptr == 0 && len > 0 {
        return Err(bad(format!("`llm_policy_alloc({len})` returned 0")));
    }
    memory
        .write(&mut store, ptr as u32 as usize, input)
        .map_err(|_| {
            bad(format!(
                "`llm_policy_alloc({len})` returned {ptr}, outside the instance's memory"
            ))
        })?;
    let packed = evaluate.call(&mut store, (ptr, len)).map_err(trapped)?;
    let bytes = read_packed(&memory, &store, packed, limits.max_output_bytes).map_err(bad)?;
    let out: RawOutput =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("output is not valid JSON: {e}")))?;
    if let Some(message) = out.error {
        return Err(PluginError::Failed {
            plugin: name.clone(),
            message: clip(&message),
        });
    }
    let matched = out
        .matched
        .ok_or_else(|| bad("output has no boolean `match`".to_string()))?;
    if let Some(score) = out.score {
        if !(0.0..=1.0).contains(&score) {
            return Err(bad(format!("`score` {score} is not between 0 and 1")));
        }
    }
    Ok(PluginOutput {
        matched,
        score: out.score,
        reason: out.reason.as_deref().map(clip),
        fuel_used: limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0)),
        memory_used: memory.data_size(&store) as u64,
    })
}

/// Whether an error is one of the call limits (not a host problem).
fn is_limit(e: &wasmtime::Error) -> bool {
    e.downcast_ref::<Trap>().is_some()
        || e.downcast_ref::<DeadlineExceeded>().is_some()
        || e.downcast_ref::<MemoryLimitExceeded>().is_some()
}

fn classify(e: wasmtime::Error, plugin: &str, limits: &PluginLimits) -> PluginError {
    let plugin = plugin.to_string();
    if e.downcast_ref::<DeadlineExceeded>().is_some() {
        return PluginError::Deadline {
            plugin,
            timeout: limits.timeout,
        };
    }
    if e.downcast_ref::<MemoryLimitExceeded>().is_some() {
        return PluginError::MemoryLimit {
            plugin,
            limit: limits.memory_bytes,
        };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => PluginError::OutOfFuel {
            plugin,
            fuel: limits.fuel,
        },
        Some(Trap::Interrupt) => PluginError::Deadline {
            plugin,
            timeout: limits.timeout,
        },
        Some(trap) => PluginError::Trap {
            plugin,
            reason: trap.to_string(),
        },
        None => PluginError::Trap {
            plugin,
            reason: line(&e),
        },
    }
}

/// An error chain on one line.
fn line(e: &wasmtime::Error) -> String {
    clip(&format!("{e:#}"))
}

/// Plugin-supplied or multi-line text as one line of at most [`MAX_TEXT`] bytes.
fn clip(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_TEXT));
    for c in text.chars() {
        if out.len() + c.len_utf8() > MAX_TEXT {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

#[cfg(test)]
mod tests;
