//! The server's configuration: one YAML (or JSON) file, every key optional, read with the core's
//! located loader so a mistake is reported with its file, line and column. Command-line flags
//! override the file for the common knobs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use llm_policy_core::{source, ContextConfig, Diagnostic, Diagnostics};
use serde::{Deserialize, Serialize};

/// The whole configuration (`llm-policy serve --config FILE`). See `docs/server.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct Config {
    /// Policy file or directory (default `./policies`).
    pub policies: PathBuf,
    /// Envoy ext_authz gRPC (and gRPC health) listener (default `0.0.0.0:50051`).
    pub grpc_listen: SocketAddr,
    /// REST API listener (default `0.0.0.0:8080`).
    pub http_listen: SocketAddr,
    /// Prometheus listener (default `0.0.0.0:9090`).
    pub metrics_listen: SocketAddr,
    /// File holding the admin token for API writes; without one, writes are refused.
    pub admin_token_file: Option<PathBuf>,
    /// File holding a token for API reads (policies, bundle, keys); without one, reads are
    /// open to whoever reaches the REST and gRPC listeners. The admin token also reads.
    pub read_token_file: Option<PathBuf>,
    /// File holding the token usage reports (`POST /v1/usage`, gRPC `RecordUsage`) must carry
    /// (the filter's `server.usageToken`); the admin token also reports. Without either,
    /// reports are refused and reservations are settled by `limits.unreported`.
    pub usage_token_file: Option<PathBuf>,
    /// The model table (docs/budgets.md): prices and output caps, re-read with the policies
    /// (default: the shipped `models/models.yaml`).
    pub models_file: Option<PathBuf>,
    /// Virtual API keys (`llm-policy keys create --file`), checked for requests Envoy marks
    /// `api-key` (docs/identity.md). With Redis they seed the shared keys; without, API
    /// writes (`/v1/keys`) are written back to this file.
    pub keys_file: Option<PathBuf>,
    /// How requests are read: namespace and principal headers, shield prefix, body limits.
    pub context: ContextConfig,
    /// Checks: deadline and what happens when the server cannot decide in time.
    pub check: CheckConfig,
    /// Hot reload of the policy directory.
    pub reload: ReloadConfig,
    /// Rate limits and budgets.
    pub limits: LimitsConfig,
    /// Decision records.
    pub audit: AuditConfig,
    /// Decision cache sizes.
    pub cache: super::cache::CacheConfig,
    /// OpenTelemetry traces (off unless an OTLP endpoint is set).
    pub tracing: super::telemetry::TracingConfig,
    /// TLS for the gRPC and REST listeners (off unless set).
    pub tls: Option<super::listen::TlsConfig>,
    /// Redis, shared by replicas: counters, L4 cache, registry, audit stream (off unless a URL
    /// is set).
    pub redis: super::redis::RedisConfig,
    /// WASM plugin conditions (off unless a directory is set).
    pub plugins: PluginsConfig,
    /// Policies from signed bundles on object storage instead of `policies` (off unless a store
    /// is set).
    pub bundle: BundleConfig,
    /// The fleet view of the filters syncing from this server (`GET /v1/fleet`).
    pub fleet: FleetConfig,
    /// Where rules' alerts are delivered (webhooks, Alertmanager; off unless one is set).
    pub alerts: super::alerts::AlertsConfig,
}

/// `fleet:` in the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct FleetConfig {
    /// A filter not seen syncing for this long leaves the fleet view, in seconds (default 300).
    pub stale_secs: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig { stale_secs: 300 }
    }
}

/// `bundle:` in the configuration: where signed bundles are, the keys they must be signed
/// with, how often the store is read (docs/bundles.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct BundleConfig {
    /// The store: `s3://bucket/prefix`, `gs://…`, `az://…`, `file:///dir`. When set, policies
    /// (and the model table, when the bundle has one) come only from its current revision.
    pub store: Option<String>,
    /// Store options (`object_store` keys: `aws_endpoint`, `aws_region`, `aws_allow_http`, …);
    /// credentials also from the environment (`AWS_ACCESS_KEY_ID`, …).
    pub options: std::collections::BTreeMap<String, String>,
    /// PEM public keys (ed25519); a revision must carry a signature by one of them.
    pub public_key_files: Vec<PathBuf>,
    /// How often the store's pointer is read, in milliseconds (default 10,000).
    pub poll_ms: u64,
    /// One request to the store, in milliseconds (default 5,000; two retries with back-off).
    pub timeout_ms: u64,
}

impl Default for BundleConfig {
    fn default() -> Self {
        BundleConfig {
            store: None,
            options: std::collections::BTreeMap::new(),
            public_key_files: Vec::new(),
            poll_ms: 10_000,
            timeout_ms: 5_000,
        }
    }
}

/// `plugins:` in the configuration: where plugin modules are and what one call may use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct PluginsConfig {
    /// Directory of `*.wasm` plugin modules, loaded and compiled at start (a bad module stops the
    /// start, naming the file). Without one, plugin rules answer per their `onError`.
    pub dir: Option<PathBuf>,
    /// Fuel per call (about one unit per WebAssembly instruction; default 500,000,000).
    pub fuel: u64,
    /// Linear memory per call, in bytes (default 16 MiB).
    pub memory_bytes: u64,
    /// Wall-clock time per call, in milliseconds (default 50; the check's deadline bounds the
    /// whole check).
    pub timeout_ms: u64,
    /// Largest input a call gets (the declared fields as JSON), in bytes (default 4 MiB).
    pub max_input_bytes: usize,
    /// Calls running at once (default 64); a call beyond it fails (the rule's `onError`).
    pub max_concurrent_calls: u32,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        let d = super::plugins::PluginLimits::default();
        PluginsConfig {
            dir: None,
            fuel: d.fuel,
            memory_bytes: d.memory_bytes,
            timeout_ms: u64::try_from(d.timeout.as_millis()).unwrap_or(50),
            max_input_bytes: d.max_input_bytes,
            max_concurrent_calls: d.max_concurrent_calls,
        }
    }
}

impl PluginsConfig {
    /// The limits of one call.
    pub fn limits(&self) -> super::plugins::PluginLimits {
        super::plugins::PluginLimits {
            fuel: self.fuel,
            memory_bytes: self.memory_bytes,
            timeout: Duration::from_millis(self.timeout_ms.max(1)),
            max_concurrent_calls: self.max_concurrent_calls.max(1),
            max_input_bytes: self.max_input_bytes,
            ..super::plugins::PluginLimits::default()
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policies: PathBuf::from("policies"),
            grpc_listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            metrics_listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            admin_token_file: None,
            read_token_file: None,
            usage_token_file: None,
            models_file: None,
            keys_file: None,
            context: ContextConfig::default(),
            check: CheckConfig::default(),
            reload: ReloadConfig::default(),
            limits: LimitsConfig::default(),
            audit: AuditConfig::default(),
            cache: super::cache::CacheConfig::default(),
            tracing: super::telemetry::TracingConfig::default(),
            tls: None,
            redis: super::redis::RedisConfig::default(),
            plugins: PluginsConfig::default(),
            bundle: BundleConfig::default(),
            fleet: FleetConfig::default(),
            alerts: super::alerts::AlertsConfig::default(),
        }
    }
}

/// What a check does when it cannot decide (the deadline passed, the counter store failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FailureMode {
    /// Deny with 503 (default).
    Closed,
    /// Let the request through (marked `x-llm-policy-decision: error`).
    Open,
}

/// Check settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct CheckConfig {
    /// Longest a check may take, in milliseconds (default 150: under Envoy's default 200 ms
    /// ext_authz timeout, so the answer is ours, not Envoy's).
    pub deadline_ms: u64,
    /// What a check that cannot decide answers (default closed).
    pub failure_mode: FailureMode,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            deadline_ms: 150,
            failure_mode: FailureMode::Closed,
        }
    }
}

impl CheckConfig {
    /// The deadline as a duration.
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms.max(1))
    }
}

/// Hot reload settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct ReloadConfig {
    /// Watch the policy path and reload on changes (default true).
    pub watch: bool,
    /// Wait this long after the last change before reloading, in milliseconds (default 250).
    pub debounce_ms: u64,
    /// Also re-read the policy path this often, in milliseconds, in case a file event was
    /// missed (default 2000; 0: off). Unchanged files are not recompiled.
    pub poll_ms: u64,
    /// Versions kept for rollback (default 20).
    pub history: usize,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch: true,
            debounce_ms: 250,
            poll_ms: 2000,
            history: 20,
        }
    }
}

/// What happens to a token or cost reservation that no usage report commits in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Unreported {
    /// Give the reservation back: only for deployments where every answer's usage is reported
    /// (a client that can keep its answer's usage from being reported spends for free).
    Release,
    /// Count the reservation as spent (default): an answer whose usage never came costs what
    /// it reserved, never nothing.
    Commit,
}

/// Rate limit and budget settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct LimitsConfig {
    /// Seconds a token or cost reservation waits for its usage report (default 300).
    pub reservation_timeout_secs: u64,
    /// What an unreported reservation becomes (default commit).
    pub unreported: Unreported,
    /// What a check answers when the counter store fails (Redis unreachable or slow, or the
    /// in-memory store full): `open` lets the rule's limit pass (counted in
    /// `llm_policy_counter_errors_total`), `closed` fails the check (503). Default: the check's
    /// `failureMode`.
    pub failure_mode: Option<FailureMode>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            reservation_timeout_secs: 300,
            unreported: Unreported::Commit,
            failure_mode: None,
        }
    }
}

/// Which decisions are recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuditScope {
    /// Every decision (default).
    All,
    /// Decisions a matched rule asked to audit (`audit: true`), and every deny and throttle.
    Flagged,
    /// None (alerts are still recorded).
    None,
}

/// How prompts appear in records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PromptLogging {
    /// Never (default).
    Off,
    /// The prompt's HMAC-SHA256 (see `promptHashKeyFile`).
    Hash,
    /// The prompt with every run of letters and digits replaced by its length (`[5] [3]`).
    Redact,
}

/// Audit settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct AuditConfig {
    /// Which decisions are recorded (default all).
    pub decisions: AuditScope,
    /// Write records to standard output, one JSON line each (default true).
    pub stdout: bool,
    /// Also write them to this file, rotated by size.
    pub file: Option<FileSinkConfig>,
    /// Also export them as OpenTelemetry log records over OTLP/gRPC.
    pub otlp: Option<OtlpSinkConfig>,
    /// Records waiting to be written; past this, new records are dropped and counted (default
    /// 10,000).
    pub queue: usize,
    /// Prompts in records (default off).
    pub prompts: PromptLogging,
    /// Key (at least 16 bytes) for `prompts: hash`, so hashes match across restarts and
    /// replicas; without it a random key per process.
    pub prompt_hash_key_file: Option<PathBuf>,
    /// Decision records carry the context they were decided from, for `llm-policy replay`
    /// (default false): every field, the text as `prompts` says, credential headers removed.
    /// Every request is then read as if every rule read everything (the scanners run).
    pub context: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            decisions: AuditScope::All,
            stdout: true,
            file: None,
            queue: 10_000,
            prompts: PromptLogging::Off,
            prompt_hash_key_file: None,
            context: false,
            otlp: None,
        }
    }
}

/// `audit.otlp:`: where audit records are exported as OpenTelemetry log records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OtlpSinkConfig {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://otel-collector:4317`.
    pub endpoint: String,
    /// `service.name` of the records (default `llm-policy`).
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

fn default_service_name() -> String {
    String::from("llm-policy")
}

/// A rotating audit file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileSinkConfig {
    /// The file; rotated ones get `.1`, `.2`, ...
    pub path: PathBuf,
    /// Rotate past this size (default 100 MiB).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept (default 5).
    #[serde(default = "default_keep")]
    pub keep: usize,
}

fn default_max_bytes() -> u64 {
    100 * 1024 * 1024
}

fn default_keep() -> usize {
    5
}

/// Flags that override the file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (YAML or JSON).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Policy file or directory.
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// gRPC listener (Envoy ext_authz, health).
    #[arg(long)]
    pub grpc_listen: Option<SocketAddr>,
    /// REST listener.
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// Prometheus listener.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// File holding the admin token for API writes.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// File holding a token for API reads (policies, bundle, keys).
    #[arg(long)]
    pub read_token_file: Option<PathBuf>,
    /// File holding the token usage reports must carry.
    #[arg(long)]
    pub usage_token_file: Option<PathBuf>,
    /// The model table (prices, output caps); default: the shipped one.
    #[arg(long)]
    pub models_file: Option<PathBuf>,
    /// Virtual API keys file (`llm-policy keys create --file`).
    #[arg(long)]
    pub keys_file: Option<PathBuf>,
    /// Redis URL (`redis://host:port`): counters, L4 cache and the other `redis:` features
    /// shared with the other replicas.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// `--redis-url` is a node of a Redis Cluster (`redis.cluster: true`).
    #[arg(long)]
    pub redis_cluster: bool,
    /// Directory of WASM plugin modules (`*.wasm`).
    #[arg(long)]
    pub plugins_dir: Option<PathBuf>,
}

impl Config {
    /// The configuration file (if any) with the flags applied.
    pub fn load(args: &ServeArgs) -> Result<Config, Diagnostics> {
        let mut config = match &args.config {
            Some(path) => read(path)?,
            None => Config::default(),
        };
        if let Some(p) = &args.policies {
            config.policies = p.clone();
        }
        if let Some(a) = args.grpc_listen {
            config.grpc_listen = a;
        }
        if let Some(a) = args.http_listen {
            config.http_listen = a;
        }
        if let Some(a) = args.metrics_listen {
            config.metrics_listen = a;
        }
        if let Some(p) = &args.admin_token_file {
            config.admin_token_file = Some(p.clone());
        }
        if let Some(p) = &args.usage_token_file {
            config.usage_token_file = Some(p.clone());
        }
        if let Some(p) = &args.models_file {
            config.models_file = Some(p.clone());
        }
        if let Some(p) = &args.read_token_file {
            config.read_token_file = Some(p.clone());
        }
        if let Some(p) = &args.keys_file {
            config.keys_file = Some(p.clone());
        }
        if let Some(u) = &args.redis_url {
            config.redis.url = Some(u.clone());
        }
        if args.redis_cluster {
            config.redis.cluster = true;
        }
        if let Some(d) = &args.plugins_dir {
            config.plugins.dir = Some(d.clone());
        }
        Ok(config)
    }

    /// The admin token, if one is configured (trimmed; an empty file is an error).
    pub fn admin_token(&self) -> Result<Option<String>, Diagnostics> {
        token(self.admin_token_file.as_deref(), "admin")
    }

    /// The read token, if one is configured (as the admin token).
    pub fn read_token(&self) -> Result<Option<String>, Diagnostics> {
        token(self.read_token_file.as_deref(), "read")
    }

    /// The usage token, if one is configured (as the admin token).
    pub fn usage_token(&self) -> Result<Option<String>, Diagnostics> {
        token(self.usage_token_file.as_deref(), "usage")
    }
}

/// A token from its file: trimmed, at least 16 characters.
fn token(path: Option<&Path>, which: &str) -> Result<Option<String>, Diagnostics> {
    let Some(path) = path else {
        return Ok(None);
    };
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        one(Diagnostic::error(
            llm_policy_core::Code::Io,
            format!("cannot read the {which} token: {e}"),
        )
        .at(&name, None))
    })?;
    let token = text.trim().to_string();
    if token.len() < 16 {
        return Err(one(Diagnostic::error(
            llm_policy_core::Code::Io,
            format!("the {which} token must be at least 16 characters"),
        )
        .at(&name, None)));
    }
    Ok(Some(token))
}

fn one(d: Diagnostic) -> Diagnostics {
    Diagnostics(vec![d])
}

fn read(path: &Path) -> Result<Config, Diagnostics> {
    let docs = source::load_file(path).map_err(one)?;
    let Some(doc) = docs.first() else {
        return Ok(Config::default());
    };
    let config: Config = doc.parse().map_err(one)?;
    if let Some((key, message)) = config.context.problem() {
        let d = Diagnostic::error(llm_policy_core::Code::InvalidType, message).at(
            &path.display().to_string(),
            doc.position(&format!("/context/{key}")),
        );
        return Err(one(d));
    }
    let problem = match &config.bundle.store {
        Some(_) if config.bundle.public_key_files.is_empty() => Some((
            "/bundle/store",
            "a bundle store needs `publicKeyFiles`: revisions are only served when signed by one of them",
        )),
        Some(_) if config.redis.registry => Some((
            "/redis/registry",
            "`redis.registry` and `bundle.store` both say where policies come from: choose one (every replica reads the bundle store itself)",
        )),
        _ => None,
    };
    if let Some((pointer, message)) = problem {
        let d = Diagnostic::error(llm_policy_core::Code::InvalidType, message)
            .at(&path.display().to_string(), doc.position(pointer));
        return Err(one(d));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_optional_and_typos_are_located() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.yaml");
        std::fs::write(&ok, "check: {deadlineMs: 50}\naudit: {stdout: false}\n").unwrap();
        let c = Config::load(&ServeArgs {
            config: Some(ok),
            grpc_listen: Some("127.0.0.1:1".parse().unwrap()),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(c.check.deadline_ms, 50);
        assert!(!c.audit.stdout);
        assert_eq!(c.grpc_listen.port(), 1);
        assert_eq!(c.policies, PathBuf::from("policies"));
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "check:\n  deadlineMS: 50\n").unwrap();
        let e = Config::load(&ServeArgs {
            config: Some(bad),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert_eq!(e.0[0].code, "unknown-field");
        assert_eq!(e.0[0].position.map(|p| p.line), Some(2));
    }
}
