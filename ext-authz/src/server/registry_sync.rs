//! The policy registry shared by replicas through Redis (`redis.registry: true`).
//!
//! Keys (after the configured prefix; on a Redis Cluster `{bundle}:` instead of `bundle:`, one
//! hash tag, so one node serves them and the publish script may write them all):
//! - `bundle:head`: the id of the revision serving everywhere, `{n}:{digest}` (the digest of
//!   its content keeps ids unique even when a Redis restarted empty numbers revisions from 1
//!   again); `bundle:seq`: the last revision number;
//! - `bundle:rev:{id}`: a revision, `{"files": [[path, text], ...], "origin": ..., "at": ...}`;
//! - `bundle:history`: the kept revisions, newest first (older ones are deleted);
//! - channel `bundle`: a revision number, published on every write (on a Redis Cluster, a
//!   message published on one node reaches subscribers on every node).
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

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::StreamExt as _;

use super::engine::Engine;
use super::redis::{Feature, LuaScript, Redis};
use super::registry::{Origin, RegistryError, SharedBundle};

/// Revisions kept in Redis.
const KEEP: u64 = 20;

/// How often the head is read even without a message.
const POLL: Duration = Duration::from_secs(2);

/// Deadline of reading a revision (a bundle can be megabytes; this is off the traffic path).
const READ_DEADLINE: Duration = Duration::from_secs(2);

/// `KEYS`: head, seq, history, revision prefix. `ARGV`: base revision id (`` none), payload,
/// revisions kept, channel, payload digest. Returns `{1, id}` or `{0, head}` when the head moved.
static PUBLISH: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r"
local head = redis.call('GET', KEYS[1])
if head and ARGV[1] ~= head then return {0, head} end
local n = redis.call('INCR', KEYS[2]) .. ':' .. ARGV[5]
redis.call('SET', KEYS[4] .. n, ARGV[2])
redis.call('SET', KEYS[1], n)
redis.call('LPUSH', KEYS[3], n)
local keep = tonumber(ARGV[3])
for _, old in ipairs(redis.call('LRANGE', KEYS[3], keep, -1)) do
  redis.call('DEL', KEYS[4] .. old)
end
redis.call('LTRIM', KEYS[3], 0, keep - 1)
redis.call('PUBLISH', ARGV[4], n)
return {1, n}
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
            // One hash tag: the publish script writes all of them (Redis Cluster).
            head: redis.tagged("bundle", "head"),
            seq: redis.tagged("bundle", "seq"),
            history: redis.tagged("bundle", "history"),
            prefix: redis.tagged("bundle", "rev:"),
            channel: redis.key("bundle"),
            redis,
        }
    }

    /// The head revision's id (`Ok(None)`: the store is empty).
    async fn head(&self) -> Result<Option<String>, String> {
        self.redis
            .run_for(Feature::Registry, READ_DEADLINE, |mut conn| async move {
                redis::cmd("GET")
                    .arg(&self.head)
                    .query_async(&mut conn)
                    .await
            })
            .await
            .map_err(|e| e.to_string())
    }

    /// A revision's stored payload.
    async fn payload(&self, id: &str) -> Result<Vec<u8>, String> {
        let key = format!("{}{id}", self.prefix);
        let payload: Option<Vec<u8>> = self
            .redis
            .run_for(Feature::Registry, READ_DEADLINE, |mut conn| async move {
                redis::cmd("GET").arg(&key).query_async(&mut conn).await
            })
            .await
            .map_err(|e| e.to_string())?;
        payload.ok_or_else(|| format!("revision {id} is missing"))
    }
}

/// A revision's files from its payload.
fn files_of(id: &str, payload: &[u8]) -> Result<Vec<(String, String)>, String> {
    serde_json::from_slice::<Revision>(payload)
        .map(|r| r.files)
        .map_err(|e| format!("revision {id} is unreadable: {e}"))
}

impl SharedBundle for RedisBundle {
    fn publish(
        &self,
        base: Option<&str>,
        files: &[(String, String)],
        origin: Origin,
    ) -> Result<String, RegistryError> {
        let unavailable = |e: String| {
            self.redis.count_error(
                Feature::Registry,
                &super::redis::RedisError::Failed(e.clone()),
            );
            RegistryError::Unavailable(format!(
                "the shared policy store (Redis) is unavailable: {e}"
            ))
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
            .blocking(timeout)
            .map_err(|e| unavailable(e.to_string()))?;
        let digest = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(payload.as_bytes()));
        let (ok, n): (i64, String) = PUBLISH
            .key(&self.head)
            .key(&self.seq)
            .key(&self.history)
            .key(&self.prefix)
            .arg(base.unwrap_or_default())
            .arg(payload)
            .arg(KEEP)
            .arg(&self.channel)
            .arg(digest)
            .invoke(&mut *conn)
            .map_err(|e| unavailable(e.to_string()))?;
        if ok != 1 {
            return Err(RegistryError::Conflict(format!(
                "another replica published revision {n} first: this replica serves {}; retry",
                base.unwrap_or("none")
            )));
        }
        Ok(n)
    }
}

/// Brings the registry to the shared head once: applies it, or seeds an empty store with the
/// version serving. Returns whether a version now serves.
pub async fn sync_once(engine: &Arc<Engine>, bundle: &Arc<RedisBundle>) -> bool {
    let registry = Arc::clone(engine.registry());
    match bundle.head().await {
        Ok(Some(id)) => {
            // The payload (megabytes, maybe) is read only when the head moved.
            if registry.shared_revision().as_deref() != Some(id.as_str()) {
                match bundle.payload(&id).await {
                    Ok(payload) => {
                        let e = Arc::clone(engine);
                        let applied = tokio::task::spawn_blocking(move || {
                            let files = files_of(&id, &payload)?;
                            Ok::<_, String>(
                                e.registry()
                                    .apply_shared(&id, files)
                                    .map(|r| (id, super::report_reload(&e, r))),
                            )
                        })
                        .await;
                        match applied {
                            Ok(Ok(Some((id, Ok(v))))) => tracing::info!(
                                revision = %id,
                                version = v.number,
                                "shared policy revision serving"
                            ),
                            Ok(Err(e)) => {
                                tracing::warn!(error = %e, "cannot read the shared policy revision")
                            }
                            _ => {}
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read the shared policy revision"),
                }
            }
        }
        Ok(None) => {
            if let Some(files) = registry.serving_files() {
                let b = Arc::clone(bundle);
                let r = Arc::clone(&registry);
                let seeded = tokio::task::spawn_blocking(move || {
                    let id = b.publish(None, &files, Origin::Load)?;
                    r.published(id.clone());
                    Ok::<String, RegistryError>(id)
                })
                .await;
                match seeded {
                    Ok(Ok(id)) => tracing::warn!(
                        revision = %id,
                        "the shared policy store was empty: seeded with the version this replica serves"
                    ),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot seed the shared policy store")
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
                let mut p = bundle.redis.pubsub().await?;
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
