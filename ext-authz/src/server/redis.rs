//! The connection to Redis, shared by every feature that uses it when the server runs as one of
//! several replicas: counters ([`super::limits::redis_store`]), the L4 decision cache
//! ([`super::cache`]), the policy registry's store and pub/sub ([`super::registry_sync`]) and the
//! audit stream ([`super::audit`]).
//!
//! Every call has a deadline. A failed call is counted in
//! `llm_policy_redis_errors_total{feature,kind}` and, when a standalone Redis looks unreachable
//! (a timeout or a connection error), calls fail at once for a short while instead of each
//! waiting for its deadline (on a Redis Cluster, where one node's outage leaves the others
//! serving, each call waits for its own deadline instead); the connection is re-established in the background, so service comes back by
//! itself when Redis does. What a failure means is each feature's business (see
//! `docs/server.md#redis`): counters follow `limits.failureMode`, a cache lookup becomes a miss,
//! the registry keeps serving its last good version, audit records are dropped and counted.
//!
//! Standalone Redis, Redis Sentinel (`redis.sentinel`, [`sentinel`]) and Redis Cluster
//! (`redis.cluster: true`) are all served by the same calls: [`Conn`] is any of the three
//! connections, and every multi-key call names keys of one hash slot (see [`Redis::tagged`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use serde::{Deserialize, Serialize};

use super::metrics::Metrics;
use sentinel::{SentinelBlocking, SentinelConfig, SentinelConn};

pub mod local;
pub mod sentinel;

/// `redis:` in the configuration. Without a URL the server keeps everything in memory (one
/// replica).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` (`rediss://` for TLS is not built in).
    /// `llm-policy serve --redis-url` sets it too. With `cluster`, any node of the cluster.
    pub url: Option<String>,
    /// Find the master through Redis Sentinel instead of `url` (see [`SentinelConfig`]).
    pub sentinel: Option<SentinelConfig>,
    /// `url` is a node of a Redis Cluster (`llm-policy serve --redis-cluster`): the server learns
    /// the cluster's layout from it and sends every call to the node serving its keys.
    pub cluster: bool,
    /// More nodes of the cluster to learn its layout from, should `url`'s be down (with
    /// `cluster` only).
    pub nodes: Vec<String>,
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
            sentinel: None,
            cluster: false,
            nodes: Vec::new(),
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
    conn: Conn,
    client: Client,
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

/// One connection to Redis, standalone or Cluster: what [`Redis::run`] hands its call.
#[derive(Clone)]
pub enum Conn {
    /// A standalone Redis (reconnects by itself).
    Single(ConnectionManager),
    /// A Redis Cluster (routes each call to the node serving its keys).
    Cluster(ClusterConnection),
    /// The master Redis Sentinel names (asks again after a failover).
    Sentinel(SentinelConn),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(c) => c.get_db(),
        }
    }
}

/// Where connections of their own come from.
enum Client {
    Single(redis::Client),
    Cluster {
        client: Box<ClusterClient>,
        /// The configured nodes (pub/sub subscribes on the first that answers).
        nodes: Vec<redis::ConnectionInfo>,
    },
    Sentinel(Arc<SentinelBlocking>),
}

/// See [`Redis::tagged`].
fn tagged_key(prefix: &str, cluster: bool, tag: &str, name: &str) -> String {
    if cluster {
        format!("{prefix}{{{tag}}}:{name}")
    } else {
        format!("{prefix}{tag}:{name}")
    }
}

/// The part of `key` a Redis Cluster hashes when it has one: between its first `{` and the first
/// `}` after it, if not empty.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let rest = key.get(open.saturating_add(1)..)?;
    let close = rest.find('}')?;
    rest.get(..close).filter(|t| !t.is_empty())
}

/// A blocking connection of its own (registry writes, the audit writer's thread).
pub type Blocking = Box<dyn redis::ConnectionLike + Send>;

/// `url` as it may be shown in an error or a log: without its user name and password.
fn without_credentials(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at.saturating_add(1)..])
        }
        _ => url.to_string(),
    }
}

/// `url`'s connection details, with TCP_NODELAY: small commands go out at once (with Nagle, a
/// script load split over two segments waits for a delayed ACK: tens of milliseconds).
fn node_info(field: &str, url: &str) -> Result<redis::ConnectionInfo, String> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(|e| format!("{field} {:?}: {e}", without_credentials(url)))?;
    let tcp = info.tcp_settings().clone().set_nodelay(true);
    Ok(info.set_tcp_settings(tcp))
}

impl Redis {
    /// A connection to `config.url` (made lazily: the server starts while Redis is down and
    /// connects when it is back). Errors only on a malformed URL or configuration. Call it
    /// inside a tokio runtime (the connection lives on it).
    pub fn connect(config: &RedisConfig, metrics: Metrics) -> Result<Option<Redis>, String> {
        let timeout = Duration::from_millis(config.timeout_ms.max(1));
        let connect_timeout = Duration::from_millis(500);
        if let Some(sentinel) = &config.sentinel {
            if config.url.is_some() || config.cluster || !config.nodes.is_empty() {
                return Err(String::from(
                    "redis.sentinel finds the master itself: leave out redis.url, redis.cluster and redis.nodes",
                ));
            }
            let (conn, blocking) =
                SentinelConn::new(sentinel, connect_timeout, timeout.saturating_mul(4))?;
            return Ok(Some(Redis::with(
                config,
                Conn::Sentinel(conn),
                Client::Sentinel(Arc::new(blocking)),
                metrics,
            )));
        }
        let Some(url) = &config.url else {
            if config.cluster || !config.nodes.is_empty() {
                return Err(String::from(
                    "redis.cluster needs redis.url (a node of the cluster)",
                ));
            }
            return Ok(None);
        };
        if !config.cluster && !config.nodes.is_empty() {
            return Err(String::from(
                "redis.nodes names nodes of a Redis Cluster: set redis.cluster: true too",
            ));
        }
        if config.cluster {
            // Keys used together must share a slot whatever the prefix holds.
            let one = tagged_key(&config.key_prefix, true, "c0", "a");
            let two = tagged_key(&config.key_prefix, true, "c0", "b");
            if hash_tag(&one).is_none() || hash_tag(&one) != hash_tag(&two) {
                return Err(format!(
                    "redis.keyPrefix {:?}: on a Redis Cluster the prefix must not hold an empty hash tag (`{{}}`)",
                    config.key_prefix
                ));
            }
        }
        let (conn, client) = if config.cluster {
            let nodes = std::iter::once(node_info("redis.url", url))
                .chain(config.nodes.iter().map(|u| node_info("redis.nodes", u)))
                .collect::<Result<Vec<_>, _>>()?;
            let tcp = nodes[0].tcp_settings().clone();
            let client = ClusterClient::builder(nodes.clone())
                .connection_timeout(connect_timeout)
                .response_timeout(timeout.saturating_mul(4))
                .retries(2)
                .max_retry_wait(500)
                .tcp_settings(tcp)
                .build()
                .map_err(|e| format!("redis.url {:?}: {e}", without_credentials(url)))?;
            let conn = client.get_pending_async_connection_with_config(
                redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(connect_timeout)
                    .set_response_timeout(timeout.saturating_mul(4)),
            );
            (
                Conn::Cluster(conn),
                Client::Cluster {
                    client: Box::new(client),
                    nodes,
                },
            )
        } else {
            let client = redis::Client::open(node_info("redis.url", url)?)
                .map_err(|e| format!("redis.url {:?}: {e}", without_credentials(url)))?;
            let manager = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(Some(timeout.saturating_mul(4)))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            let conn = client
                .get_connection_manager_lazy(manager)
                .map_err(|e| format!("redis.url {:?}: {e}", without_credentials(url)))?;
            (Conn::Single(conn), Client::Single(client))
        };
        Ok(Some(Redis::with(config, conn, client, metrics)))
    }

    fn with(config: &RedisConfig, conn: Conn, client: Client, metrics: Metrics) -> Redis {
        Redis {
            inner: Arc::new(Inner {
                conn,
                client,
                prefix: config.key_prefix.clone(),
                timeout: Duration::from_millis(config.timeout_ms.max(1)),
                backoff: Duration::from_millis(config.backoff_ms),
                down_until_ms: AtomicU64::new(0),
                failures: std::sync::atomic::AtomicU32::new(0),
                epoch: Instant::now(),
                metrics,
            }),
        }
    }

    /// `prefix` + `name`: every key and channel is named through this (or [`Redis::tagged`]).
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.inner.prefix)
    }

    /// The name of a key used together with others of `tag` (in one script or call). On a Redis
    /// Cluster: `prefix` + `{tag}:` + `name`, a hash tag, so they share a slot and one node serves
    /// them all (a prefix with a tag of its own puts every key in that one slot, which works
    /// too). On a standalone Redis: `prefix` + `tag:` + `name`, the names earlier releases used.
    pub fn tagged(&self, tag: &str, name: &str) -> String {
        tagged_key(&self.inner.prefix, self.is_cluster(), tag, name)
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.client, Client::Cluster { .. })
    }

    /// A blocking connection of its own, with `timeout` on connecting, reading and writing.
    pub fn blocking(&self, timeout: Duration) -> redis::RedisResult<Blocking> {
        match &self.inner.client {
            Client::Single(client) => {
                let conn = client.get_connection_with_timeout(timeout)?;
                conn.set_read_timeout(Some(timeout))?;
                conn.set_write_timeout(Some(timeout))?;
                Ok(Box::new(conn))
            }
            Client::Cluster { client, .. } => {
                let conn = client.get_connection()?;
                conn.set_read_timeout(Some(timeout))?;
                conn.set_write_timeout(Some(timeout))?;
                Ok(Box::new(conn))
            }
            Client::Sentinel(sentinel) => Ok(Box::new(sentinel.connection(timeout)?)),
        }
    }

    /// A pub/sub connection of its own. On a Redis Cluster, messages published on any node
    /// reach every node, so it subscribes on the first configured node that answers.
    pub async fn pubsub(&self) -> redis::RedisResult<redis::aio::PubSub> {
        match &self.inner.client {
            Client::Single(client) => client.get_async_pubsub().await,
            Client::Sentinel(sentinel) => sentinel.pubsub().await,
            Client::Cluster { nodes, .. } => {
                let mut last = None;
                for node in nodes {
                    match redis::Client::open(node.clone()) {
                        Ok(c) => match c.get_async_pubsub().await {
                            Ok(p) => return Ok(p),
                            Err(e) => last = Some(e),
                        },
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::ClusterConnectionNotFound,
                        "no Redis Cluster node answered",
                    ))
                }))
            }
        }
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
        F: FnOnce(Conn) -> Fut,
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
        F: FnOnce(Conn) -> Fut,
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
        // On a Redis Cluster one node's outage is not everyone's: calls to the other nodes go
        // on, and calls to that node fail at their deadline.
        let unreachable = unreachable && !self.is_cluster();
        let in_a_row = if unreachable {
            self.inner.failures.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            0
        };
        // One slow answer is not an outage: back off after a second failure in a row.
        if in_a_row >= FAILURES_TO_BACK_OFF {
            // A connection that only times out may be dead without anyone saying so.
            if let Conn::Sentinel(c) = &self.inner.conn {
                c.suspect();
            }
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

/// A Lua script, run by its digest (`EVALSHA`) and sent whole (`EVAL`) to a node that does not
/// know it yet. (`redis::Script` loads it with `SCRIPT LOAD` instead, which a Redis Cluster sends
/// to every primary: while one is down, no node could learn a script, and a replica promoted
/// in a failover starts without any.) `EVAL` goes where its keys are, and leaves the script
/// cached there.
pub struct LuaScript {
    code: String,
    hash: String,
}

impl LuaScript {
    /// The script `code`.
    pub fn new(code: &str) -> LuaScript {
        LuaScript {
            hash: redis::Script::new(code).get_hash().to_string(),
            code: code.to_string(),
        }
    }

    /// A call with no keys or arguments yet.
    pub fn prepare_invoke(&self) -> LuaCall<'_> {
        LuaCall {
            script: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    /// A call, its first key `key`.
    pub fn key<T: redis::ToRedisArgs>(&self, key: T) -> LuaCall<'_> {
        let mut call = self.prepare_invoke();
        call.key(key);
        call
    }
}

/// One call of a [`LuaScript`]: its keys and arguments.
pub struct LuaCall<'a> {
    script: &'a LuaScript,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl LuaCall<'_> {
    /// Adds a key.
    pub fn key<T: redis::ToRedisArgs>(&mut self, key: T) -> &mut Self {
        self.keys.extend(key.to_redis_args());
        self
    }

    /// Adds an argument.
    pub fn arg<T: redis::ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.args.extend(arg.to_redis_args());
        self
    }

    /// `EVALSHA` (`by_digest`) or `EVAL`.
    fn command(&self, by_digest: bool) -> redis::Cmd {
        let mut cmd = if by_digest {
            let mut c = redis::cmd("EVALSHA");
            c.arg(&self.script.hash);
            c
        } else {
            let mut c = redis::cmd("EVAL");
            c.arg(&self.script.code);
            c
        };
        cmd.arg(self.keys.len()).arg(&self.keys).arg(&self.args);
        cmd
    }

    /// Runs the call on an async connection.
    pub async fn invoke_async<T: redis::FromRedisValue>(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> redis::RedisResult<T> {
        match self.command(true).query_async(conn).await {
            Err(e) if unknown_script(&e) => self.command(false).query_async(conn).await,
            other => other,
        }
    }

    /// Runs the call on a blocking connection.
    pub fn invoke<T: redis::FromRedisValue>(
        &self,
        conn: &mut dyn redis::ConnectionLike,
    ) -> redis::RedisResult<T> {
        match self.command(true).query(conn) {
            Err(e) if unknown_script(&e) => self.command(false).query(conn),
            other => other,
        }
    }
}

/// Whether the node answered that it does not know the script's digest.
fn unknown_script(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a failed expectation is a failed test"
    )]

    use super::*;

    fn connect(config: RedisConfig) -> Result<Option<Redis>, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { Redis::connect(&config, Metrics::new().unwrap()) })
    }

    #[test]
    fn cluster_settings_that_cannot_work_are_refused() {
        let one = |url: &str| Some(String::from(url));
        for (config, refused) in [
            (
                RedisConfig {
                    cluster: true,
                    ..RedisConfig::default()
                },
                "needs redis.url",
            ),
            (
                RedisConfig {
                    url: one("redis://127.0.0.1:1"),
                    nodes: vec!["redis://127.0.0.1:2".into()],
                    ..RedisConfig::default()
                },
                "redis.cluster: true",
            ),
            (
                RedisConfig {
                    url: one("redis://127.0.0.1:1"),
                    cluster: true,
                    nodes: vec!["not a url".into()],
                    ..RedisConfig::default()
                },
                "redis.nodes \"not a url\"",
            ),
            (
                RedisConfig {
                    url: one("redis://127.0.0.1:1"),
                    cluster: true,
                    key_prefix: String::from("a{}b:"),
                    ..RedisConfig::default()
                },
                "empty hash tag",
            ),
        ] {
            let e = connect(config).err().unwrap();
            assert!(e.contains(refused), "{e}");
        }
        // Made lazily: nothing needs to answer yet.
        let r = connect(RedisConfig {
            url: Some("redis://127.0.0.1:1".into()),
            cluster: true,
            ..RedisConfig::default()
        })
        .unwrap()
        .unwrap();
        assert!(r.is_cluster());
        assert_eq!(r.tagged("c3", "c:ns/r/k"), "llm-policy:{c3}:c:ns/r/k");
        // A prefix with a tag of its own, or a stray brace: still one slot per tag.
        for prefix in ["{tenant}:", "x{", "}"] {
            let (a, b) = (
                tagged_key(prefix, true, "c0", "a"),
                tagged_key(prefix, true, "c0", "b"),
            );
            assert!(
                hash_tag(&a).is_some() && hash_tag(&a) == hash_tag(&b),
                "{prefix}"
            );
        }
        // A standalone Redis keeps the names of earlier releases.
        assert_eq!(tagged_key("p:", false, "bundle", "head"), "p:bundle:head");
    }
}
