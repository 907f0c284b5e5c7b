//! Bundles on object storage, through `object_store` (S3 and S3-compatible servers, GCS, Azure
//! Blob, local files). Under the store's URL (`s3://bucket/prefix`):
//!
//! - `bundles/<revision>.tar.gz`: every revision pushed, written once (a conditional create: a
//!   revision is never overwritten), the history;
//! - `current.json`: `{"revision", "digest", "previous"}`, the revision servers run, moved by a
//!   conditional write on the version read (`If-Match` on the ETag), so two pushes never both
//!   win and a rollback is one more move of the pointer.
//!
//! The pointer is not signed: servers verify the archive it names (signature and digests) and
//! that its manifest is the revision and digest the pointer names. Whoever can write the pointer
//! can make servers run any *signed* revision in the history, an older one included; keep write
//! access to the bucket as narrow as the signing key's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use object_store::path::Path as ObjectPath;
use object_store::{
    GetOptions, ObjectStore, ObjectStoreExt as _, ObjectStoreScheme, PutMode, PutOptions,
    PutPayload, RetryConfig, UpdateVersion,
};
use serde::{Deserialize, Serialize};

use super::archive::{valid_revision, Manifest};
use super::BundleError;

/// The pointer's name under the store's prefix.
pub const POINTER: &str = "current.json";
/// Where revisions are under the store's prefix.
pub const REVISIONS: &str = "bundles";
/// The largest pointer read.
const MAX_POINTER_BYTES: usize = 64 * 1024;

/// `current.json`: the revision servers run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Pointer {
    /// The revision.
    pub revision: String,
    /// Its manifest's content digest.
    pub digest: String,
    /// The revision it replaced, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
}

/// The pointer as read, with the version a conditional write or read names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    /// What it says.
    pub pointer: Pointer,
    /// Its ETag.
    pub e_tag: Option<String>,
    /// Its object version (stores that keep versions).
    pub version: Option<String>,
}

/// One revision in the store's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    /// Its name.
    pub revision: String,
    /// The archive's size.
    pub size: u64,
    /// When it was written (RFC 3339).
    pub written: String,
    /// Whether the pointer names it.
    pub current: bool,
}

/// How one call to the store is bounded.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// One request's time (connect included), retries apart.
    pub request: Duration,
    /// Retries of a failed request (network errors, 5xx), with back-off.
    pub retries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request: Duration::from_secs(10),
            retries: 2,
        }
    }
}

/// A bundle store: an object store and the prefix under it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    url: String,
    local: bool,
    limits: Limits,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// The environment variables each kind of store reads credentials and settings from (as their
/// SDKs do), lower-cased into options; options given explicitly win.
const ENV_PREFIXES: [&str; 3] = ["AWS_", "GOOGLE_", "AZURE_"];

impl Store {
    /// Opens the store at `url` (`s3://bucket/prefix`, `gs://…`, `az://…`, `file:///dir`) with
    /// `options` (the `object_store` builder's keys, e.g. `aws_endpoint`, `aws_region`,
    /// `aws_allow_http`); credentials also come from the environment (`AWS_ACCESS_KEY_ID`, …).
    /// An option the store does not know is an error, not silently ignored.
    pub fn open(
        url: &str,
        options: &BTreeMap<String, String>,
        limits: Limits,
    ) -> Result<Store, BundleError> {
        crate::install_crypto_provider();
        let config = |m: String| BundleError::Config(format!("bundle store `{url}`: {m}"));
        let parsed = url::Url::parse(url).map_err(|e| config(e.to_string()))?;
        let (scheme, path) =
            ObjectStoreScheme::parse(&parsed).map_err(|e| config(e.to_string()))?;
        let mut all: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| ENV_PREFIXES.iter().any(|p| k.starts_with(p)))
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        for (k, v) in options {
            all.insert(k.to_ascii_lowercase(), v.clone());
        }
        let retry = RetryConfig {
            max_retries: limits.retries,
            retry_timeout: limits.request.saturating_mul(
                u32::try_from(limits.retries.saturating_add(1)).unwrap_or(u32::MAX),
            ),
            ..RetryConfig::default()
        };
        let unknown = |k: &str| config(format!("unknown option `{k}` for this kind of store"));
        let inner: Arc<dyn ObjectStore> = match scheme {
            ObjectStoreScheme::Local => {
                if let Some(k) = options.keys().next() {
                    return Err(unknown(k));
                }
                Arc::new(object_store::local::LocalFileSystem::new())
            }
            ObjectStoreScheme::AmazonS3 => {
                let mut b = object_store::aws::AmazonS3Builder::new()
                    .with_url(url)
                    .with_retry(retry)
                    .with_client_options(client_options(limits.request));
                for (k, v) in &all {
                    match k.parse::<object_store::aws::AmazonS3ConfigKey>() {
                        Ok(key) => b = b.with_config(key, v),
                        Err(_) if !options.contains_key(k) => {}
                        Err(_) => return Err(unknown(k)),
                    }
                }
                Arc::new(b.build().map_err(|e| config(e.to_string()))?)
            }
            ObjectStoreScheme::GoogleCloudStorage => {
                let mut b = object_store::gcp::GoogleCloudStorageBuilder::new()
                    .with_url(url)
                    .with_retry(retry)
                    .with_client_options(client_options(limits.request));
                for (k, v) in &all {
                    match k.parse::<object_store::gcp::GoogleConfigKey>() {
                        Ok(key) => b = b.with_config(key, v),
                        Err(_) if !options.contains_key(k) => {}
                        Err(_) => return Err(unknown(k)),
                    }
                }
                Arc::new(b.build().map_err(|e| config(e.to_string()))?)
            }
            ObjectStoreScheme::MicrosoftAzure => {
                let mut b = object_store::azure::MicrosoftAzureBuilder::new()
                    .with_url(url)
                    .with_retry(retry)
                    .with_client_options(client_options(limits.request));
                for (k, v) in &all {
                    match k.parse::<object_store::azure::AzureConfigKey>() {
                        Ok(key) => b = b.with_config(key, v),
                        Err(_) if !options.contains_key(k) => {}
                        Err(_) => return Err(unknown(k)),
                    }
                }
                Arc::new(b.build().map_err(|e| config(e.to_string()))?)
            }
            other => {
                return Err(config(format!(
                    "{other:?} stores are not supported (s3://, gs://, az://, file://)"
                )))
            }
        };
        Ok(Store {
            inner,
            prefix: path,
            url: url.trim_end_matches('/').to_string(),
            local: matches!(scheme, ObjectStoreScheme::Local),
            limits,
        })
    }

    /// The store's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL of a revision's archive (for messages).
    pub fn revision_url(&self, revision: &str) -> String {
        format!("{}/{REVISIONS}/{revision}.tar.gz", self.url)
    }

    fn child(&self, parts: &[&str]) -> ObjectPath {
        parts
            .iter()
            .fold(self.prefix.clone(), |p, part| p.clone().join(*part))
    }

    fn revision_path(&self, revision: &str) -> ObjectPath {
        self.child(&[REVISIONS, &format!("{revision}.tar.gz")])
    }

    /// One call, bounded: the request time for each try plus back-off.
    async fn bounded<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<object_store::Result<T>, BundleError> {
        let budget = self.limits.request.saturating_mul(
            u32::try_from(self.limits.retries.saturating_add(1)).unwrap_or(u32::MAX),
        ) + Duration::from_secs(1);
        tokio::time::timeout(budget, call).await.map_err(|_| {
            BundleError::Unavailable(format!(
                "{what}: the store did not answer within {} ms",
                budget.as_millis()
            ))
        })
    }

    /// Reads the pointer. `Ok(None)` when it is unchanged since `known` (its ETag), or absent
    /// (`Err(NotFound)`).
    pub async fn current(&self, known: Option<&str>) -> Result<Option<Current>, BundleError> {
        let path = self.child(&[POINTER]);
        let name = format!("{}/{POINTER}", self.url);
        let options = GetOptions {
            if_none_match: if self.local {
                None
            } else {
                known.map(str::to_string)
            },
            ..GetOptions::default()
        };
        let got = match self
            .bounded(&name, self.inner.get_opts(&path, options))
            .await?
        {
            Ok(g) => g,
            Err(object_store::Error::NotModified { .. }) => return Ok(None),
            Err(e) => return Err(store_error(&name, e)),
        };
        let meta = got.meta.clone();
        if known.is_some() && meta.e_tag.as_deref() == known {
            return Ok(None);
        }
        if meta.size > MAX_POINTER_BYTES as u64 {
            return Err(BundleError::Malformed(format!(
                "{name}: {} bytes: not a pointer",
                meta.size
            )));
        }
        let bytes = self
            .bounded(&name, got.bytes())
            .await?
            .map_err(|e| store_error(&name, e))?;
        let pointer: Pointer = serde_json::from_slice(&bytes)
            .map_err(|e| BundleError::Malformed(format!("{name}: {e}")))?;
        if !valid_revision(&pointer.revision) {
            return Err(BundleError::Malformed(format!(
                "{name}: revision `{}` is not a valid name",
                pointer.revision
            )));
        }
        Ok(Some(Current {
            pointer,
            e_tag: meta.e_tag,
            version: meta.version,
        }))
    }

    /// Reads a revision's archive (at most the archive limit).
    pub async fn fetch(&self, revision: &str) -> Result<Vec<u8>, BundleError> {
        let name = self.revision_url(revision);
        if !valid_revision(revision) {
            return Err(BundleError::Malformed(format!(
                "{name}: not a valid revision name"
            )));
        }
        let path = self.revision_path(revision);
        let got = self
            .bounded(&name, self.inner.get(&path))
            .await?
            .map_err(|e| store_error(&name, e))?;
        if got.meta.size > super::archive::MAX_ARCHIVE_BYTES as u64 {
            return Err(BundleError::Malformed(format!(
                "{name}: {} bytes: larger than {}",
                got.meta.size,
                super::archive::MAX_ARCHIVE_BYTES
            )));
        }
        let bytes = self
            .bounded(&name, got.bytes())
            .await?
            .map_err(|e| store_error(&name, e))?;
        Ok(bytes.to_vec())
    }

    /// Writes a revision's archive, once: a revision already in the store with other bytes is
    /// a conflict (the same bytes again are fine, so a push can be retried).
    pub async fn put_revision(
        &self,
        manifest: &Manifest,
        archive: &[u8],
    ) -> Result<(), BundleError> {
        let name = self.revision_url(&manifest.revision);
        let path = self.revision_path(&manifest.revision);
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let payload = PutPayload::from(archive.to_vec());
        match self
            .bounded(&name, self.inner.put_opts(&path, payload, options))
            .await?
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => {
                let there = self.fetch(&manifest.revision).await?;
                if there == archive {
                    Ok(())
                } else {
                    Err(BundleError::Conflict(format!(
                        "{name}: revision `{}` is already in the store with other content (revisions are never overwritten: build with another --revision)",
                        manifest.revision
                    )))
                }
            }
            Err(e) => Err(store_error(&name, e)),
        }
    }

    /// Moves the pointer to `revision` (whose manifest digest is `digest`), if it is still at
    /// `expected` (the pointer as read; `None`: there is none yet). Another writer first is a
    /// conflict.
    pub async fn move_pointer(
        &self,
        revision: &str,
        digest: &str,
        expected: Option<&Current>,
    ) -> Result<Pointer, BundleError> {
        let name = format!("{}/{POINTER}", self.url);
        let path = self.child(&[POINTER]);
        let pointer = Pointer {
            revision: revision.to_string(),
            digest: digest.to_string(),
            previous: expected.map(|c| c.pointer.revision.clone()),
        };
        let mut bytes = serde_json::to_vec_pretty(&pointer)
            .map_err(|e| BundleError::Malformed(e.to_string()))?;
        bytes.push(b'\n');
        let mode = match expected {
            None => PutMode::Create,
            // A local directory has no conditional update: read again just before writing
            // (one writer at a time is the operator's to ensure there).
            Some(c) if self.local => {
                let now = self.current(None).await?;
                if now.as_ref().map(|n| &n.pointer) != Some(&c.pointer) {
                    return Err(moved(&name));
                }
                PutMode::Overwrite
            }
            Some(c) => PutMode::Update(UpdateVersion {
                e_tag: c.e_tag.clone(),
                version: c.version.clone(),
            }),
        };
        let options = PutOptions {
            mode,
            ..PutOptions::default()
        };
        match self
            .bounded(
                &name,
                self.inner.put_opts(&path, PutPayload::from(bytes), options),
            )
            .await?
        {
            Ok(_) => Ok(pointer),
            Err(
                object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. },
            ) => Err(moved(&name)),
            Err(e) => Err(store_error(&name, e)),
        }
    }

    /// Every revision in the store, oldest first.
    pub async fn history(&self) -> Result<Vec<Revision>, BundleError> {
        let name = format!("{}/{REVISIONS}/", self.url);
        let current = match self.current(None).await {
            Ok(c) => c.map(|c| c.pointer.revision),
            Err(BundleError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        let prefix = self.child(&[REVISIONS]);
        let listing = self
            .bounded(&name, async {
                let mut out = Vec::new();
                let mut stream = self.inner.list(Some(&prefix));
                while let Some(item) = stream.next().await {
                    out.push(item?);
                }
                Ok(out)
            })
            .await?
            .map_err(|e| store_error(&name, e))?;
        let mut revisions: Vec<(chrono::DateTime<chrono::Utc>, Revision)> = listing
            .into_iter()
            .filter_map(|m| {
                let file = m.location.filename()?.to_string();
                let revision = file.strip_suffix(".tar.gz")?.to_string();
                Some((
                    m.last_modified,
                    Revision {
                        current: current.as_deref() == Some(revision.as_str()),
                        revision,
                        size: m.size,
                        written: m
                            .last_modified
                            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    },
                ))
            })
            .collect();
        revisions.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.revision.cmp(&b.1.revision)));
        Ok(revisions.into_iter().map(|(_, r)| r).collect())
    }
}

/// Client options before the configured ones (which may change them): each request bounded.
fn client_options(request: Duration) -> object_store::ClientOptions {
    object_store::ClientOptions::new()
        .with_timeout(request)
        .with_connect_timeout(request.min(Duration::from_secs(5)))
}

fn moved(name: &str) -> BundleError {
    BundleError::Conflict(format!(
        "{name}: another push moved the pointer first (read it again and retry)"
    ))
}

fn store_error(name: &str, e: object_store::Error) -> BundleError {
    match e {
        object_store::Error::NotFound { .. } => BundleError::NotFound(format!("{name}: not found")),
        other => BundleError::Unavailable(format!("{name}: {other}")),
    }
}
