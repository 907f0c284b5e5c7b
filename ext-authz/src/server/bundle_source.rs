//! Policies from signed bundles on object storage (`bundle.store`, docs/bundles.md).
//!
//! Every `pollMs` the server reads the store's pointer (`current.json`, a conditional read on its
//! ETag, so an unchanged store costs one small request); a new revision is fetched, verified
//! (every file against the manifest, the manifest against a signature by a configured key, the
//! manifest's revision and digest against the pointer's), compiled and only then swapped in. A
//! revision refused for any reason is logged with where (the archive's file, its line for a
//! policy error), counted (`llm_policy_bundle_fetches_total{result="refused"}`) and not fetched
//! again until the pointer moves; the last good revision keeps serving. A store that cannot be
//! reached is counted (`result="unavailable"`, `llm_policy_bundle_store_up` 0), logged, and
//! tried again at the next poll.
//!
//! API writes are refused (409): the bundle is the only source of policies.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::engine::Engine;
use super::registry::{Origin, RegistryError, SharedBundle};
use crate::bundle::store::{Limits, Store};
use crate::bundle::{self, BundleError, PublicKey};

/// What `GET /v1/bundle/source` says.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    /// The store's URL.
    pub store: String,
    /// The revision serving, if any.
    pub revision: Option<String>,
    /// The id of the key whose signature it carries.
    pub signed_by: Option<String>,
    /// When the store was last read successfully (RFC 3339).
    pub last_success: Option<String>,
    /// The last error (unreachable store, refused revision), cleared by a good read.
    pub last_error: Option<String>,
    /// The revision last refused.
    pub refused: Option<String>,
}

/// The bundle store the server follows.
pub struct BundleSource {
    store: Store,
    keys: Vec<PublicKey>,
    poll: Duration,
    /// The pointer's ETag last handled (applied or refused): unchanged, nothing to do.
    seen: Mutex<Option<String>>,
    status: Mutex<SourceStatus>,
}

impl BundleSource {
    /// Opens the store and reads the public keys (a key that cannot be read stops the start).
    pub fn new(config: &super::config::BundleConfig) -> Result<BundleSource, BundleError> {
        let url = config
            .store
            .clone()
            .ok_or_else(|| BundleError::Config(String::from("no bundle store configured")))?;
        let keys = config
            .public_key_files
            .iter()
            .map(|p| PublicKey::from_file(p))
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(BundleError::Config(String::from(
                "a bundle store needs at least one public key",
            )));
        }
        let limits = Limits {
            request: Duration::from_millis(config.timeout_ms.max(100)),
            retries: 2,
        };
        let store = Store::open(&url, &config.options, limits)?;
        Ok(BundleSource {
            status: Mutex::new(SourceStatus {
                store: store.url().to_string(),
                ..SourceStatus::default()
            }),
            store,
            keys,
            poll: Duration::from_millis(config.poll_ms.max(100)),
            seen: Mutex::new(None),
        })
    }

    /// The status `GET /v1/bundle/source` answers.
    pub fn status(&self) -> SourceStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// A revision of the store, fetched and verified as one to serve would be (a canary's
    /// candidate): its manifest must name that revision.
    pub async fn fetch_verified(&self, revision: &str) -> Result<bundle::Bundle, BundleError> {
        let bytes = self.store.fetch(revision).await?;
        let name = self.store.revision_url(revision);
        let keys = self.keys.clone();
        let wanted = revision.to_string();
        tokio::task::spawn_blocking(move || {
            let (b, _) = bundle::verify(&name, &bytes, &keys)?;
            if b.manifest.revision != wanted {
                return Err(BundleError::Tampered(format!(
                    "{name}: manifest.json names revision `{}`",
                    b.manifest.revision
                )));
            }
            Ok(b)
        })
        .await
        .map_err(|e| BundleError::Unavailable(e.to_string()))?
    }

    /// The store's URL.
    pub fn url(&self) -> &str {
        self.store.url()
    }

    fn note(&self, f: impl FnOnce(&mut SourceStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }
}

impl SharedBundle for BundleSource {
    fn publish(
        &self,
        _base: Option<&str>,
        _files: &[(String, String)],
        _origin: Origin,
    ) -> Result<String, RegistryError> {
        Err(RegistryError::Conflict(format!(
            "policies come from signed bundles at {}: build, sign and push a new revision (llm-policy bundle build|push)",
            self.store.url()
        )))
    }

    fn seeds_from_directory(&self) -> bool {
        false
    }
}

/// What one poll did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Polled {
    Applied,
    Unchanged,
    Refused,
    Unavailable,
}

impl Polled {
    fn label(self) -> &'static str {
        match self {
            Polled::Applied => "applied",
            Polled::Unchanged => "unchanged",
            Polled::Refused => "refused",
            Polled::Unavailable => "unavailable",
        }
    }
}

/// Reads the store once and applies a new revision. Returns whether a version now serves.
pub async fn poll_once(engine: &Arc<Engine>, source: &Arc<BundleSource>) -> bool {
    let polled = poll(engine, source).await;
    let metrics = engine.metrics();
    metrics
        .bundle_fetches
        .with_label_values(&[polled.label()])
        .inc();
    metrics
        .bundle_store_up
        .set(i64::from(polled != Polled::Unavailable));
    engine.registry().current().is_some()
}

async fn poll(engine: &Arc<Engine>, source: &Arc<BundleSource>) -> Polled {
    let seen = source.seen.lock().ok().and_then(|s| s.clone());
    let current = match source.store.current(seen.as_deref()).await {
        Ok(None) => return succeeded(source, Polled::Unchanged),
        Ok(Some(c)) => c,
        Err(e @ BundleError::Unavailable(_)) => return unreachable(source, &e),
        Err(e) => {
            // No pointer yet, or one that does not parse: nothing to apply.
            tracing::warn!(store = %source.store.url(), error = %e, "no bundle revision to serve");
            source.note(|s| s.last_error = Some(e.to_string()));
            return Polled::Refused;
        }
    };
    let revision = current.pointer.revision.clone();
    let handled = |source: &BundleSource| {
        if let Ok(mut s) = source.seen.lock() {
            *s = current.e_tag.clone();
        }
    };
    if engine.registry().shared_revision().as_deref() == Some(revision.as_str()) {
        handled(source);
        return succeeded(source, Polled::Unchanged);
    }
    let bytes = match source.store.fetch(&revision).await {
        Ok(b) => b,
        Err(e @ BundleError::Unavailable(_)) => return unreachable(source, &e),
        Err(e) => return refused(source, &revision, &e.to_string(), || handled(source)),
    };
    let name = source.store.revision_url(&revision);
    let e = Arc::clone(engine);
    let keys = source.keys.clone();
    let pointer = current.pointer.clone();
    // Verifying and compiling are CPU work: the blocking pool, off the runtime's workers.
    let outcome = tokio::task::spawn_blocking(move || {
        let (b, key) = bundle::verify(&name, &bytes, &keys).map_err(|e| e.to_string())?;
        if b.manifest.revision != pointer.revision || b.manifest.digest != pointer.digest {
            return Err(format!(
                "{name}: manifest.json names revision `{}` with digest {}, the pointer revision `{}` with digest {}",
                b.manifest.revision, b.manifest.digest, pointer.revision, pointer.digest
            ));
        }
        let models = b.models().map(|t| (crate::bundle::archive::MODELS, t));
        let applied = e
            .registry()
            .apply_bundle(&pointer.revision, b.policy_files(), models);
        match applied {
            // Nothing to do: it is serving, or it was refused before (the pointer was written
            // again with a revision already refused: still refused).
            None if e.registry().shared_revision().as_deref() == Some(pointer.revision.as_str()) => {
                Ok((None, key))
            }
            None => Err(format!(
                "{name}: refused before (its policies do not compile here); the last good revision keeps serving"
            )),
            Some(r) => match super::report_reload(&e, r) {
                Ok(v) => Ok((Some(v.number), key)),
                Err(d) => Err(format!("{name}: {d}")),
            },
        }
    })
    .await;
    match outcome {
        Ok(Ok((version, key))) => {
            handled(source);
            tracing::info!(store = %source.store.url(), revision = %revision, version = ?version, signed_by = %key, "signed bundle revision serving");
            source.note(|s| {
                s.revision = Some(revision.clone());
                s.signed_by = Some(key);
            });
            succeeded(source, Polled::Applied)
        }
        Ok(Err(message)) => refused(source, &revision, &message, || handled(source)),
        Err(join) => refused(source, &revision, &join.to_string(), || {}),
    }
}

fn unreachable(source: &BundleSource, e: &BundleError) -> Polled {
    tracing::warn!(store = %source.store.url(), error = %e, "bundle store unreachable: the last good revision keeps serving");
    source.note(|s| s.last_error = Some(e.to_string()));
    Polled::Unavailable
}

fn succeeded(source: &BundleSource, polled: Polled) -> Polled {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    source.note(|s| {
        s.last_success = Some(now);
        s.last_error = None;
    });
    polled
}

fn refused(source: &BundleSource, revision: &str, message: &str, handled: impl FnOnce()) -> Polled {
    handled();
    tracing::error!(store = %source.store.url(), revision = %revision, error = %message, "bundle revision refused: the last good revision keeps serving");
    source.note(|s| {
        s.last_error = Some(message.to_string());
        s.refused = Some(revision.to_string());
    });
    Polled::Refused
}

/// Polls the store every `pollMs` until `stopped`; `on_serving` runs after a poll that leaves a
/// version serving.
pub fn spawn<F, Fut>(
    engine: Arc<Engine>,
    source: Arc<BundleSource>,
    on_serving: F,
    mut stopped: watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(source.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if poll_once(&engine, &source).await {
                        on_serving().await;
                    }
                }
                _ = super::stopped_signal(&mut stopped) => return,
            }
        }
    });
}
