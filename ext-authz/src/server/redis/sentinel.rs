//! Redis Sentinel (`redis.sentinel`): the master is whichever node the sentinels name, and it
//! changes when they fail over.
//!
//! The sentinels are asked for the master's address, the node is checked to call itself master
//! (`ROLE`), and one multiplexed connection to it serves every call. The connection is forgotten,
//! and the next call asks the sentinels again, when
//! - a call finds it broken, timed out, or the node demoted (`READONLY`);
//! - the sentinels name another master ([`WATCH_EVERY`]). A failover leaves the old master
//!   writable for seconds, until the sentinels turn it into a replica; without this watch, calls
//!   would go on writing there, and what they wrote would be lost.
//!
//! The call that failed is not retried: like any failed Redis call, it follows its feature's
//! failure mode (see [`super::Redis::run`]), and its back-off keeps calls from queueing while the
//! sentinels elect a new master.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::AsyncConnectionConfig;
use serde::{Deserialize, Serialize};

/// `redis.sentinel` in the configuration: find the master through Redis Sentinel (instead of
/// `redis.url`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SentinelConfig {
    /// The name the sentinels monitor the master under (`sentinel monitor <name> …`).
    pub master_name: String,
    /// The sentinels, `redis://[user:password@]host:port` (credentials of the sentinels
    /// themselves; every URL must carry the same). Asked in order; at least one.
    pub nodes: Vec<String>,
    /// The master's database number (default 0).
    #[serde(default)]
    pub db: i64,
    /// The master's ACL user name (with `passwordFile`).
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the master's password (a mounted Secret); trailing whitespace is ignored.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// Calls to the master the sentinels name; cheap to clone (every clone shares the connection).
#[derive(Clone)]
pub struct SentinelConn {
    shared: Arc<Shared>,
}

/// How often the sentinels are asked whether the master is still the one connected to.
pub const WATCH_EVERY: Duration = Duration::from_millis(250);

/// The connection to the master: its generation, the master's address, the connection.
type Current = (u64, redis::ConnectionAddr, MultiplexedConnection);

struct Shared {
    /// Asks the sentinels (async calls). Held while one call rediscovers the master.
    client: tokio::sync::Mutex<SentinelClient>,
    /// The connection to the current master (`None`: ask the sentinels).
    current: Mutex<Option<Current>>,
    generation: AtomicU64,
    config: AsyncConnectionConfig,
    master_name: String,
}

/// Blocking connections of their own (registry writes, the audit writer's thread) to the master
/// the sentinels name now.
pub struct SentinelBlocking {
    client: Mutex<SentinelClient>,
    /// Changes each time the watch sees the sentinels name another master.
    masters: Arc<AtomicU64>,
}

/// A blocking connection that follows the master: when the sentinels name another, or the
/// connection is lost, its next call connects to the master named then.
pub struct FollowingConnection {
    sentinel: Arc<SentinelBlocking>,
    timeout: Duration,
    conn: Option<redis::Connection>,
    /// [`SentinelBlocking::masters`] when `conn` was made.
    master: u64,
}

/// Whether a failed call means the connection no longer reaches a master.
fn lost_master(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.code() == Some("READONLY")
        // A script's write refused by a replica comes back inside a script error.
        || e.to_string().contains("READONLY")
}

/// The sentinels' addresses and their shared credentials.
struct Sentinels {
    /// Each sentinel, with its credentials.
    infos: Vec<redis::ConnectionInfo>,
    addrs: Vec<redis::ConnectionAddr>,
    username: Option<String>,
    password: Option<String>,
}

fn sentinels(config: &SentinelConfig) -> Result<Sentinels, String> {
    if config.master_name.trim().is_empty() {
        return Err(String::from("redis.sentinel.masterName is empty"));
    }
    if config.nodes.is_empty() {
        return Err(String::from(
            "redis.sentinel.nodes lists no sentinel (give at least one, better three)",
        ));
    }
    let mut out = Sentinels {
        infos: Vec::new(),
        addrs: Vec::new(),
        username: None,
        password: None,
    };
    for (i, url) in config.nodes.iter().enumerate() {
        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .map_err(|e| format!("redis.sentinel.nodes[{i}] {url:?}: {e}"))?;
        let settings = info.redis_settings();
        let (user, pass) = (
            settings.username().map(String::from),
            settings.password().map(String::from),
        );
        if i == 0 {
            (out.username, out.password) = (user, pass);
        } else if (user, pass) != (out.username.clone(), out.password.clone()) {
            return Err(format!(
                "redis.sentinel.nodes[{i}] {url:?}: every sentinel URL must carry the same credentials"
            ));
        }
        out.addrs.push(info.addr().clone());
        out.infos.push(info);
    }
    Ok(out)
}

/// The master's password, from `passwordFile`.
fn master_password(config: &SentinelConfig) -> Result<Option<String>, String> {
    let Some(path) = &config.password_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("redis.sentinel.passwordFile {}: {e}", path.display()))?;
    Ok(Some(text.trim_end().to_string()))
}

/// A client that asks the sentinels for the master, with `config`'s credentials and
/// TCP_NODELAY towards the master.
fn client(config: &SentinelConfig) -> Result<SentinelClient, String> {
    let s = sentinels(config)?;
    let password = master_password(config)?;
    let mut builder = SentinelClientBuilder::new(
        s.addrs,
        config.master_name.as_str(),
        SentinelServerType::Master,
    )
    .map_err(|e| format!("redis.sentinel: {e}"))?
    .set_client_to_redis_db(config.db)
    .set_client_to_redis_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    if let Some(u) = &config.username {
        builder = builder.set_client_to_redis_username(u);
    }
    if let Some(p) = &password {
        builder = builder.set_client_to_redis_password(p);
    }
    if let Some(u) = &s.username {
        builder = builder.set_client_to_sentinel_username(u);
    }
    if let Some(p) = &s.password {
        builder = builder.set_client_to_sentinel_password(p);
    }
    builder.build().map_err(|e| format!("redis.sentinel: {e}"))
}

impl SentinelConn {
    /// Calls through the sentinels of `config` (nothing is connected until the first call),
    /// and the task that watches them for a new master. `connect` bounds connecting to the
    /// master, `response` each answer. Call it inside a tokio runtime.
    pub fn new(
        config: &SentinelConfig,
        connect: Duration,
        response: Duration,
    ) -> Result<(SentinelConn, SentinelBlocking), String> {
        let conn = SentinelConn {
            shared: Arc::new(Shared {
                client: tokio::sync::Mutex::new(client(config)?),
                current: Mutex::new(None),
                generation: AtomicU64::new(0),
                config: AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect))
                    .set_response_timeout(Some(response)),
                master_name: config.master_name.clone(),
            }),
        };
        let masters = Arc::new(AtomicU64::new(0));
        let blocking = SentinelBlocking {
            client: Mutex::new(client(config)?),
            masters: Arc::clone(&masters),
        };
        tokio::spawn(watch(
            Arc::downgrade(&conn.shared),
            masters,
            sentinels(config)?.infos,
            connect,
        ));
        Ok((conn, blocking))
    }

    fn current(shared: &Shared) -> Option<(u64, MultiplexedConnection)> {
        shared
            .current
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|(g, _, conn)| (*g, conn.clone())))
    }

    /// The connection to the master, asking the sentinels when there is none. The asking runs
    /// as a task of its own, so a caller's deadline never cancels it halfway; callers arriving
    /// meanwhile wait for it and share its connection.
    async fn connection(&self) -> redis::RedisResult<(u64, MultiplexedConnection)> {
        if let Some(c) = Self::current(&self.shared) {
            return Ok(c);
        }
        let shared = Arc::clone(&self.shared);
        let task = tokio::spawn(async move {
            let mut client = shared.client.lock().await;
            if let Some(c) = Self::current(&shared) {
                return Ok(c);
            }
            let master = client.async_get_client().await?;
            let addr = master.get_connection_info().addr().clone();
            let conn = master
                .get_multiplexed_async_connection_with_config(&shared.config)
                .await?;
            let generation = shared
                .generation
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            if let Ok(mut current) = shared.current.lock() {
                *current = Some((generation, addr.clone(), conn.clone()));
            }
            tracing::info!(
                master = %shared.master_name,
                address = %addr,
                generation,
                "Redis Sentinel: connected to the master"
            );
            Ok((generation, conn))
        });
        task.await.map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::Io,
                "asking the Redis sentinels failed",
                e.to_string(),
            ))
        })?
    }

    /// Forgets connection `generation` after `error`, if it means the master is lost.
    fn after(&self, generation: u64, error: &redis::RedisError) {
        if lost_master(error) {
            forget(&self.shared, generation, &error.to_string());
        }
    }
}

/// Forgets connection `generation` (if still the current one): the next call asks the sentinels.
fn forget(shared: &Shared, generation: u64, why: &str) {
    if let Ok(mut current) = shared.current.lock() {
        if current.as_ref().is_some_and(|(g, _, _)| *g == generation) {
            tracing::warn!(
                master = %shared.master_name,
                why,
                "Redis Sentinel: the master is lost; the next call asks the sentinels"
            );
            *current = None;
        }
    }
}

/// Every [`WATCH_EVERY`], asks a sentinel which node is master: counts in `masters` each time
/// it is another than before, and forgets the connection when it is to another. Ends when the
/// connection is dropped.
async fn watch(
    shared: Weak<Shared>,
    masters: Arc<AtomicU64>,
    sentinels: Vec<redis::ConnectionInfo>,
    connect: Duration,
) {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect))
        .set_response_timeout(Some(connect));
    let mut asking: Option<(usize, MultiplexedConnection)> = None;
    let mut last: Option<(String, u16)> = None;
    let mut next = 0usize;
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if asking.is_none() {
            // The sentinels in turn, one a tick, until one answers.
            let i = next % sentinels.len().max(1);
            next = next.wrapping_add(1);
            let Some(info) = sentinels.get(i) else {
                return;
            };
            if let Ok(client) = redis::Client::open(info.clone()) {
                if let Ok(c) = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                {
                    asking = Some((i, c));
                }
            }
        }
        let Some((_, conn)) = asking.as_mut() else {
            continue;
        };
        let named: redis::RedisResult<Option<(String, u16)>> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&shared.master_name)
            .query_async(conn)
            .await;
        match named {
            Ok(Some((host, port))) => {
                if last.as_ref().is_some_and(|l| *l != (host.clone(), port)) {
                    masters.fetch_add(1, Ordering::Relaxed);
                }
                let connected = shared
                    .current
                    .lock()
                    .ok()
                    .and_then(|c| c.as_ref().map(|(g, addr, _)| (*g, addr.clone())));
                if let Some((generation, addr)) = connected {
                    let same = match &addr {
                        redis::ConnectionAddr::Tcp(h, p) => *h == host && *p == port,
                        _ => true,
                    };
                    if !same {
                        forget(
                            &shared,
                            generation,
                            &format!("the sentinels name {host}:{port} master"),
                        );
                    }
                }
                last = Some((host, port));
            }
            // Not answering, or not knowing the name: ask the next sentinel.
            Ok(None) | Err(_) => asking = None,
        }
    }
}

impl redis::aio::ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let (generation, mut conn) = self.connection().await?;
            let result = conn.req_packed_command(cmd).await;
            if let Err(e) = &result {
                self.after(generation, e);
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            let (generation, mut conn) = self.connection().await?;
            let result = conn.req_packed_commands(pipeline, offset, count).await;
            if let Err(e) = &result {
                self.after(generation, e);
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

impl FollowingConnection {
    /// The connection to the master named now.
    fn connected(&mut self) -> redis::RedisResult<&mut redis::Connection> {
        let master = self.sentinel.masters.load(Ordering::Relaxed);
        if master != self.master {
            self.conn = None;
        }
        let conn = match self.conn.take() {
            Some(c) => c,
            None => {
                let c = self
                    .sentinel
                    .master()?
                    .get_connection_with_timeout(self.timeout)?;
                c.set_read_timeout(Some(self.timeout))?;
                c.set_write_timeout(Some(self.timeout))?;
                self.master = master;
                c
            }
        };
        Ok(self.conn.insert(conn))
    }

    /// Forgets the connection after `error`, if it means the master is lost.
    fn after<T>(&mut self, result: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if result.as_ref().is_err_and(lost_master) {
            self.conn = None;
        }
        result
    }
}

impl redis::ConnectionLike for FollowingConnection {
    fn req_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<redis::Value> {
        let result = self.connected()?.req_packed_command(cmd);
        self.after(result)
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<redis::Value>> {
        let result = self.connected()?.req_packed_commands(cmd, offset, count);
        self.after(result)
    }

    fn get_db(&self) -> i64 {
        self.conn.as_ref().map_or(0, |c| c.get_db())
    }

    fn check_connection(&mut self) -> bool {
        self.connected().is_ok_and(|c| c.check_connection())
    }

    fn is_open(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.is_open())
    }
}

impl SentinelBlocking {
    /// A client for the master the sentinels name now (blocking: call it off the runtime).
    fn master(&self) -> redis::RedisResult<redis::Client> {
        let mut client = self.client.lock().map_err(|_| {
            redis::RedisError::from((redis::ErrorKind::Io, "the sentinel client was poisoned"))
        })?;
        client.get_client()
    }

    /// A blocking connection to the current master, `timeout` on connecting, reading and
    /// writing; it follows the master when the sentinels name another.
    pub fn connection(
        self: &Arc<Self>,
        timeout: Duration,
    ) -> redis::RedisResult<FollowingConnection> {
        let mut conn = FollowingConnection {
            sentinel: Arc::clone(self),
            timeout,
            conn: None,
            master: 0,
        };
        conn.connected()?;
        Ok(conn)
    }

    /// A pub/sub connection to the current master.
    pub async fn pubsub(self: Arc<Self>) -> redis::RedisResult<redis::aio::PubSub> {
        // Asking is blocking (short, bounded by the sentinels' answers): off the runtime.
        let client = tokio::task::spawn_blocking(move || self.master())
            .await
            .map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "asking the Redis sentinels failed",
                    e.to_string(),
                ))
            })??;
        client.get_async_pubsub().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a failed expectation is a failed test"
    )]

    use super::*;

    fn config(nodes: &[&str]) -> SentinelConfig {
        SentinelConfig {
            master_name: String::from("m"),
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            db: 0,
            username: None,
            password_file: None,
        }
    }

    #[test]
    fn sentinel_settings_that_cannot_work_are_refused() {
        let no_name = SentinelConfig {
            master_name: String::from(" "),
            ..config(&["redis://127.0.0.1:26379"])
        };
        assert!(sentinels(&no_name).err().unwrap().contains("masterName"));
        assert!(sentinels(&config(&[]))
            .err()
            .unwrap()
            .contains("no sentinel"));
        assert!(sentinels(&config(&["http://x"]))
            .err()
            .unwrap()
            .contains("nodes[0]"));
        let mixed = config(&["redis://:a@127.0.0.1:1", "redis://:b@127.0.0.1:2"]);
        assert!(sentinels(&mixed)
            .err()
            .unwrap()
            .contains("same credentials"));
        let missing = SentinelConfig {
            password_file: Some(PathBuf::from("/nonexistent/llm-policy-redis-password")),
            ..config(&["redis://127.0.0.1:26379"])
        };
        assert!(client(&missing).err().unwrap().contains("passwordFile"));
        let two = sentinels(&config(&[
            "redis://:p@127.0.0.1:1",
            "redis://:p@127.0.0.1:2",
        ]))
        .unwrap();
        assert_eq!(two.addrs.len(), 2);
        assert_eq!(two.password.as_deref(), Some("p"));
    }

    #[test]
    fn only_a_lost_connection_or_a_demoted_master_forgets_the_connection() {
        let readonly = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "READONLY You can't write against a read only replica.",
        ));
        assert!(lost_master(&readonly), "{readonly:?} {:?}", readonly.code());
        let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(lost_master(&io));
        let script = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "ERR Error running script",
        ));
        assert!(!lost_master(&script));
    }
}
