//! The connection to Redis, shared by every feature that uses it when the server runs as one of
//! several replicas: counters ([`super::limits::redis_store`]), the L4 decision cache
//! ([`super::cache`]), the policy registry's store and pub/sub ([`super::registry_sync`]) and the
//! audit stream ([`super::audit`]).
//!
//! Every call has a deadline. A failed call is counted in
//! `llm_policy_redis_errors_total{feature,kind}` and, when Redis looks unreachable (a timeout or
//! a connection error), calls fail at once for a short while instead of each waiting for its
//! deadline; the connection is re-established in the background, so service comes back by
//! itself when Redis does. What a failure means is each feature's business (see
//! `docs/server.md#redis`): counters follow `limits.failureMode`, a cache lookup becomes a miss,
//! the registry keeps serving its last good version, audit records are dropped and counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use super::metrics::Metrics;

/// `redis:` in the configuration. Without a URL the server keeps everything in memory (one
/// replica).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` (standalone Redis; `rediss://` for TLS is not
    /// built in). `llm-policy serve --redis-url` sets it too.
    pub url: Option<String>,
    /// Prefix of every key and channel (default `llm-policy:`), so several deployments can share
    /// one Redis.
    pub key_prefix: String,
    /// Deadline of one Redis call, in milliseconds (default 25).
    pub timeout_ms: u64,
    /// After a timeout or connection error, calls fail at once for this long, in milliseconds
    /// (default 500), instead of each waiting for its deadline while Redis is away.
    pub backoff_ms: u64,
    /// Keep rate limits and budgets in Redis (default true when a URL is set).
    pub counters: bool,
    /// The L4 decision cache.
    pub cache: RemoteCacheConfig,
    /// Audit records to a Redis stream.
    pub audit: Option<StreamConfig>,
    /// Keep policy versions in Redis and follow writes made on any replica.
    pub registry: bool,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            key_prefix: String::from("llm-policy:"),
            timeout_ms: 25,
            backoff_ms: 500,
            counters: true,
            cache: RemoteCacheConfig::default(),
            audit: None,
            registry: false,
        }
    }
}

/// The L4 decision cache (`redis.cache`). Off by default: a hit costs a Redis round trip (about
/// 60 µs on loopback, `make bench`), several times what evaluating the example bundle costs
/// (about 8 µs for an 8 KB request; the context is extracted before any cache is asked, since the
/// key is made from it). Turn it on for bundles whose evaluation costs more than a round trip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct RemoteCacheConfig {
    /// Look decisions up in Redis after the in-process caches miss (default false).
    pub enabled: bool,
    /// How long a decision stays, in seconds (default 600).
    pub ttl_secs: u64,
}

impl Default for RemoteCacheConfig {
    fn default() -> Self {
        RemoteCacheConfig {
            enabled: false,
            ttl_secs: 600,
        }
    }
}

/// The audit stream (`redis.audit`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct StreamConfig {
    /// Stream key, after the prefix (default `audit`).
    pub stream: String,
    /// Entries kept, approximately (`XADD MAXLEN ~`; default 100,000).
    pub max_len: u64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            stream: String::from("audit"),
            max_len: 100_000,
        }
    }
}

/// What uses Redis (the `feature` label of the error counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// Rate limits and budgets.
    Counters,
    /// Usage-report handles.
    Usage,
    /// The L4 decision cache.
    Cache,
    /// The registry.
    Registry,
    /// The audit stream.
    Audit,
}

impl Feature {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Feature::Counters => "counters",
            Feature::Usage => "usage",
            Feature::Cache => "cache",
            Feature::Registry => "registry",
            Feature::Audit => "audit",
        }
    }
}

/// A Redis call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisError {
    /// No answer within the deadline.
    #[error("Redis did not answer within {0} ms")]
    Timeout(u64),
    /// Redis looked unreachable moments ago; the call was not tried.
    #[error("Redis is unavailable (backing off)")]
    Unavailable,
    /// Redis answered with an error, or the connection failed.
    #[error("Redis error: {0}")]
    Failed(String),
}

impl RedisError {
    fn kind(&self) -> &'static str {
        match self {
            RedisError::Timeout(_) => "timeout",
            RedisError::Unavailable => "unavailable",
            RedisError::Failed(_) => "error",
        }
    }
}

/// Timeouts or connection errors in a row after which calls back off.
const FAILURES_TO_BACK_OFF: u32 = 2;

/// A shared, reconnecting Redis connection with deadlines.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    backoff: Duration,
    /// Milliseconds since `epoch` until which calls fail at once (0: none).
    down_until_ms: AtomicU64,
    /// Timeouts and connection errors in a row (back-off starts at [`FAILURES_TO_BACK_OFF`]).
    failures: std::sync::atomic::AtomicU32,
    epoch: Instant,
    metrics: Metrics,
}

impl Redis {
    /// A connection to `config.url` (made lazily: the server starts while Redis is down and
    /// connects when it is back). Errors only on a malformed URL. Call it inside a tokio
    /// runtime (the connection lives on it).
    pub fn connect(config: &RedisConfig, metrics: Metrics) -> Result<Option<Redis>, String> {
        let Some(url) = &config.url else {
            return Ok(None);
        };
        // TCP_NODELAY: small commands go out at once (with Nagle, a script load split over two
        // segments waits for a delayed ACK: tens of milliseconds).
        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .map_err(|e| format!("redis.url {url:?}: {e}"))?;
        let tcp = info.tcp_settings().clone().set_nodelay(true);
        let client = redis::Client::open(info.set_tcp_settings(tcp))
            .map_err(|e| format!("redis.url {url:?}: {e}"))?;
        let timeout = Duration::from_millis(config.timeout_ms.max(1));
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(timeout.saturating_mul(4)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = client
            .get_connection_manager_lazy(manager)
            .map_err(|e| format!("redis.url {url:?}: {e}"))?;
        Ok(Some(Redis {
            inner: Arc::new(Inner {
                conn,
                client,
                prefix: config.key_prefix.clone(),
                timeout,
                backoff: Duration::from_millis(config.backoff_ms),
                down_until_ms: AtomicU64::new(0),
                failures: std::sync::atomic::AtomicU32::new(0),
                epoch: Instant::now(),
                metrics,
            }),
        }))
    }

    /// `prefix` + `name`: every key and channel is named through this.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.inner.prefix)
    }

    /// The client (for connections of their own: pub/sub, the audit writer thread).
    pub fn client(&self) -> &redis::Client {
        &self.inner.client
    }

    /// The deadline of one call.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The metrics (errors are counted here).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    fn backoff_ms(&self) -> u64 {
        u64::try_from(self.inner.backoff.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Counts a failure of `feature` (for callers with connections of their own).
    pub fn count_error(&self, feature: Feature, error: &RedisError) {
        self.inner
            .metrics
            .redis_errors
            .with_label_values(&[feature.as_str(), error.kind()])
            .inc();
    }

    /// Runs one call (a command, pipeline or script on the shared connection) within the
    /// deadline; counts and classifies its failure.
    pub async fn run<T, F, Fut>(&self, feature: Feature, call: F) -> Result<T, RedisError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        self.run_for(feature, self.inner.timeout, call).await
    }

    /// [`Redis::run`] with a deadline of its own, for calls off the traffic path (reading a
    /// policy bundle). Their timeouts do not make traffic calls back off; a connection error
    /// still does.
    pub async fn run_for<T, F, Fut>(
        &self,
        feature: Feature,
        timeout: Duration,
        call: F,
    ) -> Result<T, RedisError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let until = self.inner.down_until_ms.load(Ordering::Relaxed);
        if until != 0 {
            // Backing off: fail at once, except one caller per backoff period, which probes.
            let now = self.now_ms();
            let probe = now >= until
                && self
                    .inner
                    .down_until_ms
                    .compare_exchange(
                        until,
                        now.saturating_add(self.backoff_ms()),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_ok();
            if !probe {
                let e = RedisError::Unavailable;
                self.count_error(feature, &e);
                return Err(e);
            }
        }
        let result = tokio::time::timeout(timeout, call(self.inner.conn.clone())).await;
        let error = match result {
            Ok(Ok(v)) => {
                self.inner.failures.store(0, Ordering::Relaxed);
                if until != 0 {
                    self.inner.down_until_ms.store(0, Ordering::Relaxed);
                    tracing::info!(feature = feature.as_str(), "Redis is reachable again");
                }
                return Ok(v);
            }
            Ok(Err(e)) => {
                let unreachable = e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal();
                (RedisError::Failed(e.to_string()), unreachable)
            }
            Err(_) => (
                RedisError::Timeout(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
                timeout <= self.inner.timeout,
            ),
        };
        let (error, unreachable) = error;
        let in_a_row = if unreachable {
            self.inner.failures.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            0
        };
        // One slow answer is not an outage: back off after a second failure in a row.
        if in_a_row >= FAILURES_TO_BACK_OFF {
            let until = self.now_ms().saturating_add(self.backoff_ms());
            if self.inner.down_until_ms.swap(until, Ordering::Relaxed) == 0 {
                tracing::warn!(feature = feature.as_str(), error = %error, "Redis unreachable: backing off");
            }
        } else {
            tracing::warn!(feature = feature.as_str(), error = %error, "Redis call failed");
        }
        self.count_error(feature, &error);
        Err(error)
    }
}

/// A throw-away `redis-server` on a free loopback port, for tests, benchmarks and demos (nothing
/// persisted; stopped when dropped). The binary is `$REDIS_SERVER` or `redis-server` on the
/// `PATH`.
pub mod local {
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// A running redis-server.
    pub struct LocalRedis {
        child: Option<Child>,
        port: u16,
    }

    impl LocalRedis {
        /// Starts one on a free port and waits (at most 10 s) until it answers.
        pub fn start() -> std::io::Result<LocalRedis> {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let mut r = LocalRedis { child: None, port };
            r.restart()?;
            Ok(r)
        }

        /// Its port.
        pub fn port(&self) -> u16 {
            self.port
        }

        /// Its URL.
        pub fn url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.port)
        }

        /// Kills it, as a crash would.
        pub fn kill(&mut self) {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }

        /// Starts it again on the same port, empty.
        pub fn restart(&mut self) -> std::io::Result<()> {
            self.kill();
            let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
            let child = Command::new(&bin)
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "cannot start {bin} (install redis-server or set REDIS_SERVER): {e}"
                        ),
                    )
                })?;
            self.child = Some(child);
            let client = redis::Client::open(self.url()).map_err(std::io::Error::other)?;
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(10) {
                if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200)) {
                    if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                        return Ok(());
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::io::Error::other(
                "redis-server did not answer within 10 s",
            ))
        }
    }

    impl Drop for LocalRedis {
        fn drop(&mut self) {
            self.kill();
        }
    }
}
