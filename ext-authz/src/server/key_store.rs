//! The server's virtual API keys (`keysFile`, `/v1/keys`): the table checks read (an
//! `arc-swap`, no lock on the traffic path), and writes (create, revoke) that reach every
//! replica.
//!
//! Without Redis the table is the key file's: re-read when it changes (checked each [`POLL`], so
//! `llm-policy keys revoke --file` applies to a running server), and API writes re-read it
//! before they write it back. With Redis, the table is one Redis hash (`keys`: id → record); the
//! key file seeds ids Redis does not have yet, every write goes to Redis, and every replica
//! re-reads the hash each [`POLL`] (so a revocation on one replica applies on all of them within
//! it). Until Redis has been read once, no key is accepted: the file may hold keys revoked since.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use llm_policy_core::identity::{KeyRecord, KeyTable};
use llm_policy_core::Diagnostics;

use super::redis::{Feature, Redis};
use crate::keys::{self, NewKey, NewKeyError};

/// How often replicas re-read the keys from Redis.
pub const POLL: Duration = Duration::from_secs(1);

/// Deadline of one key read or write in Redis (off the traffic path).
const DEADLINE: Duration = Duration::from_secs(2);

/// Why a key write failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    /// The new key's fields are unusable.
    #[error("{0}")]
    Invalid(String),
    /// No key with this id.
    #[error("no key `{0}`")]
    NotFound(String),
    /// A key with this id exists.
    #[error("a key `{0}` exists")]
    Conflict(String),
    /// The store (Redis, the key file) could not be written or read.
    #[error("{0}")]
    Unavailable(String),
}

impl From<NewKeyError> for KeyStoreError {
    fn from(e: NewKeyError) -> Self {
        match e {
            NewKeyError::Invalid(m) => KeyStoreError::Invalid(m),
            NewKeyError::Random(m) => KeyStoreError::Unavailable(m),
        }
    }
}

/// The keys serving, with what every read needs, made once per change: the table checks look
/// keys up in, the records by id (`/v1/keys`, the bundle answer) and their digest (its ETag).
pub struct Snapshot {
    /// The table checks read.
    pub table: KeyTable,
    /// The records, by id.
    pub records: Vec<KeyRecord>,
    /// A digest of the records.
    pub digest: String,
}

impl Snapshot {
    fn of(table: KeyTable) -> Snapshot {
        let mut records: Vec<KeyRecord> = table.records().cloned().collect();
        records.sort_by(|a, b| a.id.cmp(&b.id));
        let text = serde_json::to_string(&records).unwrap_or_default();
        let digest = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()));
        Snapshot {
            table,
            records,
            digest,
        }
    }
}

/// The keys, and where writes go.
pub struct KeyStore {
    keys: ArcSwap<Snapshot>,
    file: Option<PathBuf>,
    redis: Option<Redis>,
    /// One write at a time on this replica (Redis writes are atomic per record).
    writing: tokio::sync::Mutex<()>,
    /// The key file's records (what seeds Redis).
    from_file: Vec<KeyRecord>,
    /// When the key file was last read as changed (no Redis).
    modified: std::sync::Mutex<Option<std::time::SystemTime>>,
    /// The key file's records are in Redis.
    seeded: std::sync::atomic::AtomicBool,
}

impl KeyStore {
    /// The keys of `file` (none without one); with `redis`, they seed it (see [`KeyStore::seed`]).
    pub fn load(file: Option<PathBuf>, redis: Option<Redis>) -> Result<KeyStore, Diagnostics> {
        // A key file that does not exist yet is an empty one (the first API write creates it).
        let from_file = match &file {
            Some(path) if path.exists() => llm_policy_core::identity::load_keys(path)?,
            _ => KeyTable::default(),
        };
        let modified = file.as_deref().and_then(modified);
        // With Redis, nothing is served before Redis is read (it knows the revocations).
        let serving = if redis.is_some() {
            KeyTable::default()
        } else {
            from_file.clone()
        };
        Ok(KeyStore {
            from_file: from_file.records().cloned().collect(),
            modified: std::sync::Mutex::new(modified),
            keys: ArcSwap::from_pointee(Snapshot::of(serving)),
            file,
            redis,
            writing: tokio::sync::Mutex::new(()),
            seeded: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// No keys, nowhere to write them.
    pub fn empty() -> KeyStore {
        KeyStore {
            from_file: Vec::new(),
            modified: std::sync::Mutex::new(None),
            keys: ArcSwap::from_pointee(Snapshot::of(KeyTable::default())),
            file: None,
            redis: None,
            writing: tokio::sync::Mutex::new(()),
            seeded: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The keys serving.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.keys.load_full()
    }

    /// The records, by id.
    pub fn list(&self) -> Vec<KeyRecord> {
        self.keys.load().records.clone()
    }

    fn serve(&self, table: KeyTable) {
        self.keys.store(Arc::new(Snapshot::of(table)));
    }

    /// Writes one record into the Redis hash (`HSETNX`: only if its id is new; `HSET`: over
    /// it); whether it was written. `Ok(false)` without Redis.
    async fn put(&self, command: &str, record: &KeyRecord) -> Result<bool, KeyStoreError> {
        let Some(redis) = &self.redis else {
            return Ok(false);
        };
        let json =
            serde_json::to_string(record).map_err(|e| KeyStoreError::Unavailable(e.to_string()))?;
        let (hash, id) = (redis.key("keys"), record.id.clone());
        redis
            .run_for(Feature::Registry, DEADLINE, |mut c| async move {
                redis::cmd(command)
                    .arg(&hash)
                    .arg(&id)
                    .arg(&json)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await
            .map(|written| written > 0 || command == "HSET")
            .map_err(|e| KeyStoreError::Unavailable(e.to_string()))
    }

    /// Makes a key; returns its record and its secret (shown once).
    pub async fn create(&self, spec: &NewKey) -> Result<(KeyRecord, String), KeyStoreError> {
        let _one = self.writing.lock().await;
        let (record, secret) = keys::create(spec, keys::unix_now())?;
        if self.redis.is_some() {
            if !self.put("HSETNX", &record).await? {
                return Err(KeyStoreError::Conflict(record.id));
            }
            self.refresh().await?;
            return Ok((record, secret));
        }
        self.reread_file()?;
        let mut all = self.list();
        if all.iter().any(|r| r.id == record.id) {
            return Err(KeyStoreError::Conflict(record.id));
        }
        all.push(record.clone());
        self.keep(all)?;
        Ok((record, secret))
    }

    /// Revokes a key (the record stays, refused with `revoked`).
    pub async fn revoke(&self, id: &str) -> Result<KeyRecord, KeyStoreError> {
        let _one = self.writing.lock().await;
        if self.redis.is_some() {
            self.refresh().await?;
            let mut record = self
                .list()
                .into_iter()
                .find(|r| r.id == id)
                .ok_or_else(|| KeyStoreError::NotFound(id.to_string()))?;
            record.revoked = true;
            self.put("HSET", &record).await?;
            self.refresh().await?;
            return Ok(record);
        }
        self.reread_file()?;
        let mut all = self.list();
        let record = all
            .iter_mut()
            .find(|r| r.id == id)
            .ok_or_else(|| KeyStoreError::NotFound(id.to_string()))?;
        record.revoked = true;
        let revoked = record.clone();
        self.keep(all)?;
        Ok(revoked)
    }

    /// Swaps in `all` and writes the key file (no Redis), remembering its new time.
    fn keep(&self, all: Vec<KeyRecord>) -> Result<(), KeyStoreError> {
        let table =
            KeyTable::new(all.clone()).map_err(|e| KeyStoreError::Invalid(e.to_string()))?;
        if let Some(path) = &self.file {
            keys::write_file(path, &all).map_err(|e| {
                KeyStoreError::Unavailable(format!("cannot write {}: {e}", path.display()))
            })?;
            if let Ok(mut m) = self.modified.lock() {
                *m = modified(path);
            }
        }
        self.serve(table);
        Ok(())
    }

    /// Copies the key file's records that Redis does not hold yet into Redis (a revocation
    /// made through the API is never undone by the file), then reads the table.
    pub async fn seed(&self) -> Result<(), KeyStoreError> {
        if self.redis.is_none() {
            return Ok(());
        }
        for record in &self.from_file {
            self.put("HSETNX", record).await?;
        }
        self.refresh().await?;
        self.seeded
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Re-reads the keys from Redis (nothing without it). A record that does not parse is
    /// skipped and logged; the rest still apply.
    pub async fn refresh(&self) -> Result<(), KeyStoreError> {
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        let hash = redis.key("keys");
        let stored: Vec<(String, String)> = redis
            .run_for(Feature::Registry, DEADLINE, |mut c| async move {
                redis::cmd("HGETALL").arg(&hash).query_async(&mut c).await
            })
            .await
            .map_err(|e| KeyStoreError::Unavailable(e.to_string()))?;
        let mut records = Vec::with_capacity(stored.len());
        for (id, json) in stored {
            match serde_json::from_str::<KeyRecord>(&json) {
                Ok(r) if r.id == id => records.push(r),
                Ok(_) | Err(_) => {
                    tracing::warn!(key = %id, "skipping an unreadable key record in Redis")
                }
            }
        }
        let table = KeyTable::new(records).map_err(|e| KeyStoreError::Invalid(e.to_string()))?;
        if self.keys.load().table != table {
            self.serve(table);
        }
        Ok(())
    }

    /// Re-reads the key file (no Redis): the table it holds now. A file that does not load is
    /// reported and the last good table keeps serving.
    fn reread_file(&self) -> Result<(), KeyStoreError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        if !path.exists() {
            return Ok(());
        }
        let stamp = modified(path);
        let table = llm_policy_core::identity::load_keys(path).map_err(|d| {
            KeyStoreError::Invalid(
                d.0.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        if let Ok(mut m) = self.modified.lock() {
            *m = stamp;
        }
        self.serve(table);
        Ok(())
    }

    /// What the poll does: seeds Redis until that has worked once (Redis may be down at start),
    /// then re-reads it; without Redis, re-reads the key file when it changed.
    pub async fn seed_or_refresh(&self) -> Result<(), KeyStoreError> {
        if self.redis.is_none() {
            let changed = match (&self.file, self.modified.lock()) {
                (Some(path), Ok(m)) => modified(path) != *m,
                _ => false,
            };
            if changed {
                let _one = self.writing.lock().await;
                self.reread_file()?;
                tracing::info!("virtual keys re-read from the key file");
            }
            return Ok(());
        }
        if self.seeded.load(std::sync::atomic::Ordering::Relaxed) {
            return self.refresh().await;
        }
        self.seed().await
    }

    /// Whether this server holds keys at all (a key file or Redis): only then does the bundle
    /// answer carry them, so a filter's own keys are not replaced by none.
    pub fn configured(&self) -> bool {
        self.file.is_some() || self.redis.is_some()
    }
}

/// When a file was last modified (none when it cannot be read).
fn modified(path: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}
