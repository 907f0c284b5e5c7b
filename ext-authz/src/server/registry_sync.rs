//! The policy registry shared by replicas through Redis (`redis.registry: true`).
//!
//! Keys (after the configured prefix):
//! - `bundle:head`: the revision serving everywhere; `bundle:seq`: the last revision number;
//! - `bundle:rev:{n}`: a revision, `{"files": [[path, text], ...], "origin": ..., "at": ...}`;
//! - `bundle:history`: the kept revisions, newest first (older ones are deleted);
//! - channel `bundle`: a revision number, published on every write.
//!
//! A write (API put or rollback) is validated and compiled by the replica that takes it, then
//! published with a compare-and-set on the head (a write racing another is refused with 409, so
//! no write is lost silently); every replica hears the channel (and polls the head every few
//! seconds, for messages missed while disconnected), fetches the revision, validates and
//! compiles it again and only then swaps it in. A revision a replica cannot compile is logged,
//! counted (`llm_policy_reloads_total{result="error"}`) and skipped there: that replica keeps
//! serving its last good version. An empty Redis (first start, or restarted without
//! persistence) is seeded with the bundle a replica serves.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::Script;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::StreamExt as _;

use super::engine::Engine;
use super::redis::{Feature, Redis};
use super::registry::{Origin, RegistryError, SharedBundle};

/// Revisions kept in Redis.
const KEEP: u64 = 20;

/// How often the head is read even without a message.
const POLL: Duration = Duration::from_secs(2);

/// Deadline of reading a revision (a bundle can be megabytes; this is off the traffic path).
const READ_DEADLINE: Duration = Duration::from_secs(2);

/// `KEYS`: head, seq, history, revision prefix. `ARGV`: base revision (`` none), payload,
/// revisions kept, channel. Returns `{1, n}` or `{0, head}` when the head moved.
static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local head = redis.call('GET', KEYS[1])
if head and ARGV[1] ~= head then return {0, head} end
local n = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[4] .. n, ARGV[2])
redis.call('SET', KEYS[1], n)
redis.call('LPUSH', KEYS[3], n)
local keep = tonumber(ARGV[3])
for _, old in ipairs(redis.call('LRANGE', KEYS[3], keep, -1)) do
  redis.call('DEL', KEYS[4] .. old)
end
redis.call('LTRIM', KEYS[3], 0, keep - 1)
redis.call('PUBLISH', ARGV[4], n)
return {1, tostring(n)}
",
    )
});

/// One revision as stored.
#[derive(Debug, Serialize, Deserialize)]
struct Revision {
    files: Vec<(String, String)>,
    origin: Origin,
    at: u64,
}

/// The bundle in Redis.
pub struct RedisBundle {
    redis: Redis,
    head: String,
    seq: String,
    history: String,
    prefix: String,
    channel: String,
}

impl RedisBundle {
    /// The shared bundle on `redis`.
    pub fn new(redis: Redis) -> RedisBundle {
        RedisBundle {
            head: redis.key("bundle:head"),
            seq: redis.key("bundle:seq"),
            history: redis.key("bundle:history"),
            prefix: redis.key("bundle:rev:"),
            channel: redis.key("bundle"),
            redis,
        }
    }

    /// The head revision and its files (`Ok(None)`: the store is empty).
    async fn head(&self) -> Result<Option<(u64, Vec<(String, String)>)>, String> {
        let head: Option<u64> = self
            .redis
            .run_for(Feature::Registry, READ_DEADLINE, |mut conn| async move {
                redis::cmd("GET")
                    .arg(&self.head)
                    .query_async(&mut conn)
                    .await
            })
            .await
            .map_err(|e| e.to_string())?;
        let Some(n) = head else {
            return Ok(None);
        };
        let key = format!("{}{n}", self.prefix);
        let payload: Option<Vec<u8>> = self
            .redis
            .run_for(Feature::Registry, READ_DEADLINE, |mut conn| async move {
                redis::cmd("GET").arg(&key).query_async(&mut conn).await
            })
            .await
            .map_err(|e| e.to_string())?;
        let payload = payload.ok_or_else(|| format!("revision {n} is missing"))?;
        let rev: Revision = serde_json::from_slice(&payload)
            .map_err(|e| format!("revision {n} is unreadable: {e}"))?;
        Ok(Some((n, rev.files)))
    }
}

impl SharedBundle for RedisBundle {
    fn publish(
        &self,
        base: Option<u64>,
        files: &[(String, String)],
        origin: Origin,
    ) -> Result<u64, RegistryError> {
        let unavailable = |e: String| {
            self.redis.count_error(
                Feature::Registry,
                &super::redis::RedisError::Failed(e.clone()),
            );
            RegistryError::Refused(
                format!("the shared policy store (Redis) is unavailable: {e}"),
                503,
            )
        };
        let payload = serde_json::to_string(&Revision {
            files: files.to_vec(),
            origin,
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
        .map_err(|e| unavailable(e.to_string()))?;
        // Writes run on the blocking pool: a connection of their own, with the call deadline.
        let timeout = self.redis.timeout().saturating_mul(8);
        let mut conn = self
            .redis
            .client()
            .get_connection_with_timeout(timeout)
            .map_err(|e| unavailable(e.to_string()))?;
        conn.set_read_timeout(Some(timeout))
            .and_then(|()| conn.set_write_timeout(Some(timeout)))
            .map_err(|e| unavailable(e.to_string()))?;
        let (ok, n): (i64, String) = PUBLISH
            .key(&self.head)
            .key(&self.seq)
            .key(&self.history)
            .key(&self.prefix)
            .arg(base.map(|b| b.to_string()).unwrap_or_default())
            .arg(payload)
            .arg(KEEP)
            .arg(&self.channel)
            .invoke(&mut conn)
            .map_err(|e| unavailable(e.to_string()))?;
        if ok != 1 {
            return Err(RegistryError::Refused(
                format!(
                    "another replica published revision {n} first: this replica serves {}; retry",
                    base.map_or_else(|| String::from("none"), |b| b.to_string())
                ),
                409,
            ));
        }
        n.parse()
            .map_err(|_| unavailable(format!("unexpected revision {n:?}")))
    }
}

/// Brings the registry to the shared head once: applies it, or seeds an empty store with the
/// version serving. Returns whether a version now serves.
pub async fn sync_once(engine: &Arc<Engine>, bundle: &Arc<RedisBundle>) -> bool {
    let registry = Arc::clone(engine.registry());
    match bundle.head().await {
        Ok(Some((n, files))) => {
            if registry.shared_revision() != Some(n) {
                let e = Arc::clone(engine);
                let applied = tokio::task::spawn_blocking(move || {
                    e.registry()
                        .apply_shared(n, files)
                        .map(|r| super::report_reload(&e, r))
                })
                .await;
                if let Ok(Some(Ok(v))) = applied {
                    tracing::info!(
                        revision = n,
                        version = v.number,
                        "shared policy revision serving"
                    );
                }
            }
        }
        Ok(None) => {
            if let Some(files) = registry.serving_files() {
                let b = Arc::clone(bundle);
                let r = Arc::clone(&registry);
                let seeded = tokio::task::spawn_blocking(move || {
                    let n = b.publish(None, &files, Origin::Load)?;
                    r.published(n);
                    Ok::<u64, RegistryError>(n)
                })
                .await;
                match seeded {
                    Ok(Ok(n)) => tracing::info!(
                        revision = n,
                        "the shared policy store was empty: seeded with the version serving"
                    ),
                    Ok(Err(RegistryError::Refused(m, _))) => {
                        tracing::warn!(error = %m, "cannot seed the shared policy store")
                    }
                    _ => {}
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "cannot read the shared policy head"),
    }
    registry.current().is_some()
}

/// Follows the shared store until `stopped`: every message on the channel and every poll tick
/// (2 s) syncs; `on_serving` runs after a sync that leaves a version serving.
pub fn spawn<F, Fut>(
    engine: Arc<Engine>,
    bundle: Arc<RedisBundle>,
    on_serving: F,
    mut stopped: watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        loop {
            // (Re)subscribe; while that fails, keep polling.
            let sub = tokio::time::timeout(Duration::from_secs(1), async {
                let mut p = bundle.redis.client().get_async_pubsub().await?;
                p.subscribe(&bundle.channel).await?;
                Ok::<_, redis::RedisError>(p)
            })
            .await;
            let mut pubsub = match sub {
                Ok(Ok(p)) => Some(p),
                _ => None,
            };
            let mut messages = pubsub.as_mut().map(|p| p.on_message());
            loop {
                let heard = async {
                    match messages.as_mut() {
                        Some(m) => m.next().await.is_some(),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    alive = heard => {
                        if !alive {
                            break;
                        }
                    }
                    _ = tick.tick() => {
                        if messages.is_none() {
                            // Try to subscribe again on every tick while unsubscribed.
                            if sync_once(&engine, &bundle).await {
                                on_serving().await;
                            }
                            break;
                        }
                    }
                    _ = super::stopped_signal(&mut stopped) => return,
                }
                if sync_once(&engine, &bundle).await {
                    on_serving().await;
                }
            }
            drop(messages);
            drop(pubsub);
        }
    });
}
