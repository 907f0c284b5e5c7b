//! Redis Sentinel (`redis.sentinel`): the master is whichever node the sentinels name, and it
//! changes when they fail over.
//!
//! The sentinels are asked for the master's address, the node is checked to call itself master
//! (`ROLE`), and one multiplexed connection to it serves every call. The connection is forgotten,
//! and the next call asks the sentinels again, when
//! - a call finds it broken or the node demoted (`READONLY`), or calls time out twice in a row
//!   ([`SentinelConn::suspect`]);
//! - the sentinels name another master and that node calls itself master ([`WATCH_EVERY`]). A
//!   failover leaves the old master writable for seconds, until the sentinels turn it into a
//!   replica; without this watch, calls would go on writing there for all that time, and what
//!   they wrote would be lost. With it, for at most about one watch period.
//!
//! One lookup runs at a time, as a task of its own (a caller's deadline never cancels it
//! halfway), bounded by [`LOOKUP_WITHIN`]; callers meanwhile wait for it within their own
//! deadline, and after a failed lookup calls fail at once for [`RETRY_AFTER`]. The call that
//! failed is not retried: like any failed Redis call, it follows its feature's failure mode (see
//! [`super::Redis::run`]). Blocking connections (registry writes, the audit writer) and pub/sub
//! connect to the master this lookup found, never asking the sentinels themselves.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

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

/// Longest one lookup of the master may take (sentinels, `ROLE`, connecting).
pub const LOOKUP_WITHIN: Duration = Duration::from_secs(2);

/// After a failed lookup, calls fail at once this long instead of each asking again.
pub const RETRY_AFTER: Duration = Duration::from_millis(100);

/// The connection to the master: its generation, the master's connection details, the
/// connection.
type Current = (u64, redis::ConnectionInfo, MultiplexedConnection);

struct Shared {
    /// Asks the sentinels (held by the one lookup running).
    client: tokio::sync::Mutex<SentinelClient>,
    /// The connection to the current master (`None`: ask the sentinels).
    current: Mutex<Option<Current>>,
    generation: AtomicU64,
    /// Changes each time the master connected to is left for another (blocking connections
    /// follow it).
    masters: AtomicU64,
    /// A lookup is running.
    looking: AtomicBool,
    /// Milliseconds since `epoch` when the last lookup failed, and why.
    failed_at_ms: AtomicU64,
    failure: Mutex<String>,
    /// Wakes the callers waiting for a lookup.
    looked: tokio::sync::Notify,
    epoch: Instant,
    config: AsyncConnectionConfig,
    master_name: String,
}

/// Blocking connections of their own (registry writes, the audit writer's thread) to the master
/// [`SentinelConn`] found. Use them off the runtime (a thread of their own, `spawn_blocking`).
pub struct SentinelBlocking {
    conn: SentinelConn,
    runtime: tokio::runtime::Handle,
}

/// A blocking connection that follows the master: when another is connected to, or the
/// connection is lost, its next call connects to the master found then.
pub struct FollowingConnection {
    sentinel: Arc<SentinelBlocking>,
    timeout: Duration,
    conn: Option<(redis::ConnectionAddr, redis::Connection)>,
    /// [`Shared::masters`] when `conn` was made.
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
    if config.db < 0 {
        return Err(format!(
            "redis.sentinel.db {}: a database number is 0 or more",
            config.db
        ));
    }
    for (i, url) in config.nodes.iter().enumerate() {
        let shown = super::without_credentials(url);
        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .map_err(|e| format!("redis.sentinel.nodes[{i}] {shown:?}: {e}"))?;
        let settings = info.redis_settings();
        let (user, pass) = (
            settings.username().map(String::from),
            settings.password().map(String::from),
        );
        if i == 0 {
            (out.username, out.password) = (user, pass);
        } else if (user, pass) != (out.username.clone(), out.password.clone()) {
            return Err(format!(
                "redis.sentinel.nodes[{i}] {shown:?}: every sentinel URL must carry the same credentials"
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
    /// Calls through the sentinels of `config` (nothing is connected until the first call), and
    /// the task that watches them for a new master; and blocking connections to the same master.
    /// `connect` bounds connecting to the master, `response` each answer. Call it inside a tokio
    /// runtime.
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
                masters: AtomicU64::new(0),
                looking: AtomicBool::new(false),
                failed_at_ms: AtomicU64::new(0),
                failure: Mutex::new(String::new()),
                looked: tokio::sync::Notify::new(),
                epoch: Instant::now(),
                config: AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect))
                    .set_response_timeout(Some(response)),
                master_name: config.master_name.clone(),
            }),
        };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| String::from("redis.sentinel: no tokio runtime to connect on"))?;
        tokio::spawn(watch(
            Arc::downgrade(&conn.shared),
            sentinels(config)?.infos,
            connect,
        ));
        let blocking = SentinelBlocking {
            conn: conn.clone(),
            runtime,
        };
        Ok((conn, blocking))
    }

    fn current(shared: &Shared) -> Option<Current> {
        shared.current.lock().ok().and_then(|c| c.clone())
    }

    /// The connection to the master; when there is none, waits for the lookup (starting it if
    /// none runs). Fails at once within [`RETRY_AFTER`] of a failed lookup.
    async fn connection(&self) -> redis::RedisResult<Current> {
        let shared = &self.shared;
        let looked = shared.looked.notified();
        tokio::pin!(looked);
        looked.as_mut().enable();
        if let Some(c) = Self::current(shared) {
            return Ok(c);
        }
        if !shared.looking.swap(true, Ordering::AcqRel) {
            let failed_at = shared.failed_at_ms.load(Ordering::Relaxed);
            if failed_at > 0 && since(shared) < failed_at.saturating_add(millis(RETRY_AFTER)) {
                shared.looking.store(false, Ordering::Release);
                return Err(lookup_failed(shared));
            }
            tokio::spawn(look_up(Arc::clone(shared)));
        }
        looked.await;
        Self::current(shared).ok_or_else(|| lookup_failed(shared))
    }

    /// The master's connection details (looking it up if needed).
    pub async fn master(&self) -> redis::RedisResult<redis::ConnectionInfo> {
        self.connection().await.map(|(_, info, _)| info)
    }

    /// Calls timed out twice in a row: the connection may be dead without anyone saying so (a
    /// peer gone silent). Forget it; the next call looks the master up again.
    pub fn suspect(&self) {
        if let Some((generation, _, _)) = Self::current(&self.shared) {
            forget(&self.shared, generation, "calls time out");
        }
    }

    /// Forgets connection `generation` after `error`, if it means the master is lost.
    fn after(&self, generation: u64, error: &redis::RedisError) {
        if lost_master(error) {
            forget(&self.shared, generation, &error.to_string());
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the shared state was made (never 0: 0 means "never" in `failed_at_ms`).
fn since(shared: &Shared) -> u64 {
    millis(shared.epoch.elapsed()).saturating_add(1)
}

fn lookup_failed(shared: &Shared) -> redis::RedisError {
    let why = shared.failure.lock().map(|f| f.clone()).unwrap_or_default();
    redis::RedisError::from((
        redis::ErrorKind::Io,
        "no Redis master: the sentinels were asked",
        why,
    ))
}

/// One lookup: asks the sentinels for the master, checks it, connects; then wakes the callers.
async fn look_up(shared: Arc<Shared>) {
    let found = tokio::time::timeout(LOOKUP_WITHIN, async {
        let mut client = shared.client.lock().await;
        let master = client.async_get_client().await?;
        let info = master.get_connection_info().clone();
        let conn = master
            .get_multiplexed_async_connection_with_config(&shared.config)
            .await?;
        Ok::<_, redis::RedisError>((info, conn))
    })
    .await;
    match found {
        Ok(Ok((info, conn))) => {
            let generation = shared
                .generation
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            tracing::info!(
                master = %shared.master_name,
                address = %info.addr(),
                generation,
                "Redis Sentinel: connected to the master"
            );
            if let Ok(mut current) = shared.current.lock() {
                *current = Some((generation, info, conn));
            }
            shared.failed_at_ms.store(0, Ordering::Relaxed);
        }
        Ok(Err(e)) => failed(&shared, e.to_string()),
        Err(_) => failed(
            &shared,
            format!("no answer within {} ms", LOOKUP_WITHIN.as_millis()),
        ),
    }
    shared.looking.store(false, Ordering::Release);
    shared.looked.notify_waiters();
}

fn failed(shared: &Shared, why: String) {
    tracing::warn!(master = %shared.master_name, error = %why, "Redis Sentinel: cannot find the master");
    if let Ok(mut f) = shared.failure.lock() {
        *f = why;
    }
    shared.failed_at_ms.store(since(shared), Ordering::Relaxed);
}

/// Forgets connection `generation` (if still the current one): the next call asks the sentinels.
fn forget(shared: &Shared, generation: u64, why: &str) {
    if let Ok(mut current) = shared.current.lock() {
        if current.as_ref().is_some_and(|(g, _, _)| *g == generation) {
            tracing::warn!(
                master = %shared.master_name,
                why,
                "Redis Sentinel: leaving the master; the next call asks the sentinels"
            );
            *current = None;
            shared.masters.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Whether `node` answers `ROLE` as a master.
async fn is_master(
    node: redis::ConnectionAddr,
    template: &redis::ConnectionInfo,
    config: &AsyncConnectionConfig,
) -> bool {
    let info = template.clone().set_addr(node);
    let Ok(client) = redis::Client::open(info) else {
        return false;
    };
    let Ok(mut c) = client
        .get_multiplexed_async_connection_with_config(config)
        .await
    else {
        return false;
    };
    let role: redis::RedisResult<Vec<redis::Value>> = redis::cmd("ROLE").query_async(&mut c).await;
    matches!(role.as_deref(), Ok([redis::Value::BulkString(r), ..]) if r.as_slice() == b"master")
}

/// Every [`WATCH_EVERY`], asks a sentinel which node is master, and forgets the connection when
/// the sentinels name another node that calls itself master (a sentinel naming a dead node, or
/// one still a replica, leaves it alone). Ends when the connection is dropped.
async fn watch(shared: Weak<Shared>, sentinels: Vec<redis::ConnectionInfo>, connect: Duration) {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect))
        .set_response_timeout(Some(connect));
    let mut asking: Option<MultiplexedConnection> = None;
    let mut next = 0usize;
    let mut unanswered_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if asking.is_none() {
            // The sentinels in turn, one a tick, until one answers.
            let Some(info) = sentinels.get(next % sentinels.len().max(1)) else {
                return;
            };
            next = next.wrapping_add(1);
            if let Ok(client) = redis::Client::open(info.clone()) {
                asking = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .ok();
            }
        }
        let named: Option<(String, u16)> = match asking.as_mut() {
            Some(conn) => redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(&shared.master_name)
                .query_async(conn)
                .await
                .ok()
                .flatten(),
            None => None,
        };
        let Some((host, port)) = named else {
            // Not answering, or not knowing the name: ask the next sentinel.
            asking = None;
            let since = *unanswered_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_secs(30) {
                tracing::warn!(master = %shared.master_name, "Redis Sentinel: no sentinel has named the master for 30 s");
                unanswered_since = Some(Instant::now());
            }
            continue;
        };
        unanswered_since = None;
        let Some((generation, info, _)) = SentinelConn::current(&shared) else {
            continue;
        };
        let same = match info.addr() {
            redis::ConnectionAddr::Tcp(h, p) => *h == host && *p == port,
            _ => true,
        };
        if !same
            && is_master(
                redis::ConnectionAddr::Tcp(host.clone(), port),
                &info,
                &config,
            )
            .await
        {
            forget(
                &shared,
                generation,
                &format!("the sentinels name {host}:{port} master"),
            );
        }
    }
}

impl redis::aio::ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let (generation, _, mut conn) = self.connection().await?;
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
            let (generation, _, mut conn) = self.connection().await?;
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
    /// The connection to the master connected to now.
    fn connected(&mut self) -> redis::RedisResult<&mut redis::Connection> {
        let master = self.sentinel.conn.shared.masters.load(Ordering::Relaxed);
        if master != self.master {
            self.conn = None;
        }
        let (addr, conn) = match self.conn.take() {
            Some(c) => c,
            None => {
                let info = self.sentinel.master(self.timeout)?;
                let addr = info.addr().clone();
                let c = redis::Client::open(info)?.get_connection_with_timeout(self.timeout)?;
                c.set_read_timeout(Some(self.timeout))?;
                c.set_write_timeout(Some(self.timeout))?;
                self.master = master;
                (addr, c)
            }
        };
        Ok(&mut self.conn.insert((addr, conn)).1)
    }

    /// Forgets the connection after `error`, if it means the master is lost (and the shared
    /// connection too, when it is to the same node).
    fn after<T>(&mut self, result: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(e) = &result {
            if lost_master(e) {
                if let Some((addr, _)) = self.conn.take() {
                    let shared = &self.sentinel.conn.shared;
                    if let Some((generation, info, _)) = SentinelConn::current(shared) {
                        if *info.addr() == addr {
                            forget(shared, generation, &e.to_string());
                        }
                    }
                }
            }
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
        self.conn.as_ref().map_or(0, |(_, c)| c.get_db())
    }

    fn check_connection(&mut self) -> bool {
        self.connected().is_ok_and(|c| c.check_connection())
    }

    fn is_open(&self) -> bool {
        self.conn.as_ref().is_some_and(|(_, c)| c.is_open())
    }
}

impl SentinelBlocking {
    /// The master's connection details, within `timeout` (blocking: call it off the runtime).
    fn master(&self, timeout: Duration) -> redis::RedisResult<redis::ConnectionInfo> {
        let conn = self.conn.clone();
        self.runtime
            .block_on(async move { tokio::time::timeout(timeout, conn.master()).await })
            .map_err(|_| {
                redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no Redis master found in time",
                ))
            })?
    }

    /// A blocking connection to the current master, `timeout` on connecting, reading and
    /// writing; it follows the master when another is connected to.
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
    pub async fn pubsub(&self) -> redis::RedisResult<redis::aio::PubSub> {
        let info = self.conn.master().await?;
        redis::Client::open(info)?.get_async_pubsub().await
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
