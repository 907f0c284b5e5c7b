//! A throw-away `redis-server` on a free loopback port, for tests, benchmarks and demos (nothing
//! persisted; stopped when dropped). The binary is `$REDIS_SERVER` or `redis-server` on the
//! `PATH`.

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
        let mut r = LocalRedis {
            child: None,
            port: free_port()?,
        };
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
                    format!("cannot start {bin} (install redis-server or set REDIS_SERVER): {e}"),
                )
            })?;
        self.child = Some(child);
        connect(self.port).map(drop)
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The slot ranges of a [`LocalCluster`]'s three nodes.
const SLOTS: [(u64, u64); 3] = [(0, 5460), (5461, 10922), (10923, 16383)];

/// A free loopback port.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A throw-away Redis Cluster of three primaries (no replicas) on free loopback ports, its
/// 16,384 slots split in three; stopped and its directory removed when dropped.
pub struct LocalCluster {
    children: Vec<Child>,
    ports: Vec<u16>,
    /// Each node's cluster bus port.
    buses: Vec<u16>,
    dir: std::path::PathBuf,
}

impl LocalCluster {
    /// Starts the three nodes, joins them and waits (at most 20 s) until every node
    /// serves all slots. Tried three times: a free port picked for a node can be taken by
    /// another test's server before the node binds it, and that cluster never forms.
    pub fn start() -> std::io::Result<LocalCluster> {
        let mut last = None;
        for _ in 0..3 {
            match Self::start_once() {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no attempt")))
    }

    fn start_once() -> std::io::Result<LocalCluster> {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let dir = std::env::temp_dir().join(format!(
            "llm-policy-cluster-{}-{}",
            std::process::id(),
            free_port()?
        ));
        std::fs::create_dir_all(&dir)?;
        let mut cluster = LocalCluster {
            children: Vec::new(),
            ports: Vec::new(),
            buses: Vec::new(),
            dir,
        };
        for _ in 0..3 {
            let (port, bus) = (free_port()?, free_port()?);
            let child = Command::new(&bin)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus.to_string(),
                ])
                .args(["--cluster-node-timeout", "5000"])
                .arg("--cluster-config-file")
                .arg(cluster.dir.join(format!("nodes-{port}.conf")))
                .arg("--dir")
                .arg(&cluster.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot start {bin}: {e}")))?;
            cluster.children.push(child);
            cluster.ports.push(port);
            cluster.buses.push(bus);
        }
        let mut conns = Vec::new();
        for port in &cluster.ports {
            conns.push(connect(*port)?);
        }
        let (first, first_bus) = (cluster.ports[0], cluster.buses[0]);
        for (i, conn) in conns.iter_mut().enumerate() {
            let (from, to) = SLOTS[i];
            redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(from)
                .arg(to)
                .query::<()>(conn)
                .map_err(std::io::Error::other)?;
            if i > 0 {
                redis::cmd("CLUSTER")
                    .arg("MEET")
                    .arg("127.0.0.1")
                    .arg(first)
                    .arg(first_bus)
                    .query::<()>(conn)
                    .map_err(std::io::Error::other)?;
            }
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            let ready = conns.iter_mut().all(|c| {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(c)
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
                    && info.contains("cluster_known_nodes:3")
                    && info.contains("cluster_slots_assigned:16384")
            });
            if ready {
                return Ok(cluster);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(std::io::Error::other(
            "the Redis Cluster did not form within 20 s",
        ))
    }

    /// Kills node `i` (0..3), as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(c) = self.children.get_mut(i) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The node (0..3) serving `key`'s hash slot.
    pub fn node_of(&self, key: &str) -> std::io::Result<usize> {
        let mut conn = connect(self.ports[0])?;
        let slot: u64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut conn)
            .map_err(std::io::Error::other)?;
        Ok(SLOTS.iter().position(|(_, to)| slot <= *to).unwrap_or(2))
    }

    /// Its nodes' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }
}

/// A connection to the redis-server on `port`, once it answers (at most 30 s: a cluster's
/// nodes start together on a busy 2-core CI machine).
fn connect(port: u16) -> std::io::Result<redis::Connection> {
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{port}")).map_err(std::io::Error::other)?;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200)) {
            if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                return Ok(c);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(std::io::Error::other(format!(
        "redis-server on port {port} did not answer within 30 s"
    )))
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The name a [`LocalSentinel`]'s sentinels monitor the master under.
pub const SENTINEL_MASTER: &str = "llm-policy";

/// A throw-away Redis Sentinel deployment on free loopback ports: a master, one replica, and
/// three sentinels (quorum 2) that fail over two seconds after the master stops answering; stopped
/// and its directory removed when dropped.
pub struct LocalSentinel {
    /// The data nodes (a port, and the process unless killed); the first starts as master.
    nodes: Vec<(u16, Option<Child>)>,
    sentinels: Vec<(u16, Child)>,
    dir: std::path::PathBuf,
}

impl LocalSentinel {
    /// Starts the master, its replica and the sentinels, and waits (at most 30 s) until the
    /// replica is in sync and every sentinel knows the replica and the other two sentinels (a
    /// failover needs both).
    pub fn start() -> std::io::Result<LocalSentinel> {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let dir = std::env::temp_dir().join(format!(
            "llm-policy-sentinel-{}-{}",
            std::process::id(),
            free_port()?
        ));
        std::fs::create_dir_all(&dir)?;
        let mut s = LocalSentinel {
            nodes: Vec::new(),
            sentinels: Vec::new(),
            dir,
        };
        let spawn = |cmd: &mut Command| {
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot start {bin}: {e}")))
        };
        let master = free_port()?;
        for i in 0..2 {
            let port = if i == 0 { master } else { free_port()? };
            let mut cmd = Command::new(&bin);
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&s.dir);
            if i > 0 {
                cmd.args(["--replicaof", "127.0.0.1", &master.to_string()]);
            }
            let child = spawn(&mut cmd)?;
            s.nodes.push((port, Some(child)));
        }
        for (port, _) in &s.nodes {
            connect(*port)?;
        }
        for _ in 0..3 {
            let port = free_port()?;
            let conf = s.dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                     sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER} 2000\n\
                     sentinel failover-timeout {SENTINEL_MASTER} 5000\n\
                     sentinel parallel-syncs {SENTINEL_MASTER} 1\n",
                    dir = s.dir.display()
                ),
            )?;
            let child = spawn(Command::new(&bin).arg(&conf).arg("--sentinel"))?;
            s.sentinels.push((port, child));
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if s.settled(master) {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(std::io::Error::other(
            "the Redis Sentinel deployment did not settle within 30 s",
        ))
    }

    /// Whether every sentinel names `master`, knows a replica and the two other sentinels.
    fn settled(&self, master: u16) -> bool {
        self.sentinels.iter().all(|(port, _)| {
            let Ok(mut c) = connect(*port) else {
                return false;
            };
            let fields: Vec<String> = redis::cmd("SENTINEL")
                .arg("MASTER")
                .arg(SENTINEL_MASTER)
                .query(&mut c)
                .unwrap_or_default();
            let field = |name: &str| {
                fields
                    .iter()
                    .position(|f| f == name)
                    .and_then(|i| fields.get(i + 1))
                    .cloned()
                    .unwrap_or_default()
            };
            field("port") == master.to_string()
                && field("num-slaves") == "1"
                && field("num-other-sentinels") == "2"
        })
    }

    /// The sentinels' URLs.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|(p, _)| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The port of the master the first answering sentinel names.
    pub fn master_port(&self) -> std::io::Result<u16> {
        for (port, _) in &self.sentinels {
            let Ok(mut c) = connect_now(*port) else {
                continue;
            };
            let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(SENTINEL_MASTER)
                .query(&mut c)
                .map_err(std::io::Error::other)?;
            if let Some((_, p)) = addr {
                return Ok(p);
            }
        }
        Err(std::io::Error::other("no sentinel names a master"))
    }

    /// A connection to the current master.
    pub fn master(&self) -> std::io::Result<redis::Connection> {
        connect(self.master_port()?)
    }

    /// Kills the current master, as a crash would; returns its port.
    pub fn kill_master(&mut self) -> std::io::Result<u16> {
        let port = self.master_port()?;
        for (p, child) in &mut self.nodes {
            if *p == port {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
        Ok(port)
    }

    /// Asks a sentinel to fail over now (the master is alive and becomes a replica).
    pub fn failover(&self) -> std::io::Result<()> {
        let (port, _) = &self.sentinels[0];
        redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(SENTINEL_MASTER)
            .query::<()>(&mut connect(*port)?)
            .map_err(std::io::Error::other)
    }

    /// Waits (at most 30 s) until the sentinels name a master other than `old` and that node
    /// calls itself master; returns its port.
    pub fn wait_for_new_master(&self, old: u16) -> std::io::Result<u16> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(port) = self.master_port() {
                if port != old {
                    if let Ok(mut c) = connect_now(port) {
                        let role: Vec<redis::Value> =
                            redis::cmd("ROLE").query(&mut c).unwrap_or_default();
                        if matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master")
                        {
                            return Ok(port);
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(std::io::Error::other(
            "the sentinels did not fail over within 30 s",
        ))
    }
}

/// A connection to the redis-server on `port` if it answers now.
fn connect_now(port: u16) -> std::io::Result<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .map_err(std::io::Error::other)?
        .get_connection_with_timeout(Duration::from_millis(500))
        .map_err(std::io::Error::other)
}

impl Drop for LocalSentinel {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for (_, c) in &mut self.sentinels {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
