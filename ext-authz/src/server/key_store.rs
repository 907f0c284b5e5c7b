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

/// The keys, and where writes go.
pub struct KeyStore {
    table: ArcSwap<KeyTable>,
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
        let table = if redis.is_some() {
            KeyTable::default()
        } else {
            from_file.clone()
        };
        Ok(KeyStore {
            from_file: from_file.records().cloned().collect(),
            modified: std::sync::Mutex::new(modified),
            table: ArcSwap::from_pointee(table),
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
            table: ArcSwap::from_pointee(KeyTable::default()),
            file: None,
            redis: None,
            writing: tokio::sync::Mutex::new(()),
            seeded: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The table checks read.
    pub fn table(&self) -> Arc<KeyTable> {
        self.table.load_full()
    }

    /// The records, by id.
    pub fn list(&self) -> Vec<KeyRecord> {
        let mut all: Vec<KeyRecord> = self.table.load().records().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// A digest of the table (the filter's sync compares it).
    pub fn digest(&self) -> String {
        let list = self.list();
        let text = serde_json::to_string(&list).unwrap_or_default();
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
    }

    fn hash_key(&self) -> Option<(Redis, String)> {
        self.redis.as_ref().map(|r| (r.clone(), r.key("keys")))
    }

    /// Makes a key; returns its record and its secret (shown once).
    pub async fn create(&self, spec: &NewKey) -> Result<(KeyRecord, String), KeyStoreError> {
        let _one = self.writing.lock().await;
        let (record, secret) = keys::create(spec, keys::unix_now())?;
        if let Some((redis, hash)) = self.hash_key() {
            let json = serde_json::to_string(&record)
                .map_err(|e| KeyStoreError::Unavailable(e.to_string()))?;
            let id = record.id.clone();
            let added: bool = redis
                .run_for(Feature::Registry, DEADLINE, |mut c| async move {
                    redis::cmd("HSETNX")
                        .arg(&hash)
                        .arg(&id)
                        .arg(&json)
                        .query_async(&mut c)
                        .await
                })
                .await
                .map_err(|e| KeyStoreError::Unavailable(e.to_string()))?;
            if !added {
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
        if let Some((redis, hash)) = self.hash_key() {
            self.refresh().await?;
            let mut record = self
                .list()
                .into_iter()
                .find(|r| r.id == id)
                .ok_or_else(|| KeyStoreError::NotFound(id.to_string()))?;
            record.revoked = true;
            let json = serde_json::to_string(&record)
                .map_err(|e| KeyStoreError::Unavailable(e.to_string()))?;
            let field = record.id.clone();
            redis
                .run_for(Feature::Registry, DEADLINE, |mut c| async move {
                    redis::cmd("HSET")
                        .arg(&hash)
                        .arg(&field)
                        .arg(&json)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await
                .map_err(|e| KeyStoreError::Unavailable(e.to_string()))?;
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
        let table = KeyTable::new(all.clone()).map_err(|errors| {
            KeyStoreError::Invalid(
                errors
                    .into_iter()
                    .map(|(_, m)| m)
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        if let Some(path) = &self.file {
            keys::write_file(path, &all).map_err(|e| {
                KeyStoreError::Unavailable(format!("cannot write {}: {e}", path.display()))
            })?;
            if let Ok(mut m) = self.modified.lock() {
                *m = modified(path);
            }
        }
        self.table.store(Arc::new(table));
        Ok(())
    }

    /// Copies the key file's records that Redis does not hold yet into Redis (a revocation
    /// made through the API is never undone by the file), then reads the table.
    pub async fn seed(&self) -> Result<(), KeyStoreError> {
        let Some((redis, hash)) = self.hash_key() else {
            return Ok(());
        };
        for record in &self.from_file {
            let json = serde_json::to_string(record)
                .map_err(|e| KeyStoreError::Unavailable(e.to_string()))?;
            let (hash, id) = (hash.clone(), record.id.clone());
            redis
                .run_for(Feature::Registry, DEADLINE, |mut c| async move {
                    redis::cmd("HSETNX")
                        .arg(&hash)
                        .arg(&id)
                        .arg(&json)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await
                .map_err(|e| KeyStoreError::Unavailable(e.to_string()))?;
        }
        self.refresh().await?;
        self.seeded
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Re-reads the keys from Redis (nothing without it). A record that does not parse is
    /// skipped and logged; the rest still apply.
    pub async fn refresh(&self) -> Result<(), KeyStoreError> {
        let Some((redis, hash)) = self.hash_key() else {
            return Ok(());
        };
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
        match KeyTable::new(records) {
            Ok(table) => {
                if *self.table.load_full() != table {
                    self.table.store(Arc::new(table));
                }
                Ok(())
            }
            Err(errors) => Err(KeyStoreError::Invalid(
                errors
                    .into_iter()
                    .map(|(_, m)| m)
                    .collect::<Vec<_>>()
                    .join("; "),
            )),
        }
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
        self.table.store(Arc::new(table));
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
