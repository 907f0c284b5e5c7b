//! The versioned registry of compiled policy sets (the "L3" cache: every kept version is ready to
//! serve, so a rollback is a pointer swap).
//!
//! A reload reads the policy path, validates and compiles everything, and only then swaps the
//! active version atomically; a bundle with errors is rejected with its located diagnostics and
//! the last good version keeps serving. A check holds the `Arc` of the version it started with,
//! so a swap never changes a decision in flight.
//!
//! With a [`SharedBundle`] (Redis, [`super::registry_sync`]) the bundle is shared by replicas:
//! the directory only seeds an empty store, API writes are validated here, then published, and
//! versions published by other replicas arrive through [`Registry::apply_shared`], validated and
//! compiled again before they serve.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use llm_policy_core::model_table::ModelTable;
use llm_policy_core::{
    source, Code, ContextConfig, Diagnostic, Diagnostics, Document, PolicySet, Severity,
};
use serde::Serialize;

/// One kept version of a policy ([`Registry::policy_versions`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyVersion {
    /// The registry version number.
    pub version: u64,
    /// When it was loaded (RFC 3339).
    pub loaded_at: String,
    /// How it came to be.
    pub origin: Origin,
    /// Its bundle digest.
    pub bundle: String,
    /// The policy's own `metadata.version` in it.
    pub policy_version: String,
    /// Whether it is the version serving.
    pub active: bool,
}

/// How a version came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Read from the policy path (start-up, file change, reload request).
    Load,
    /// Written through the API.
    Api,
    /// A policy was rolled back through the API.
    Rollback,
    /// Published by another replica (the shared registry).
    Shared,
    /// A signed bundle's revision from object storage.
    Bundle,
    /// A canary's candidate, promoted through the API.
    Canary,
}

/// Where a bundle shared by replicas is kept (Redis: [`super::registry_sync::RedisBundle`]).
pub trait SharedBundle: Send + Sync {
    /// Publishes `files` (`(path relative to the policy root, text)`) as the revision after
    /// `base` (the revision this replica serves). Returns the new revision's id (unique: a number
    /// and a digest of the content); refuses (409) when another replica published first, fails
    /// (503) when the store does.
    fn publish(
        &self,
        base: Option<&str>,
        files: &[(String, String)],
        origin: Origin,
    ) -> Result<String, RegistryError>;

    /// Whether the policy directory seeds the store when it is empty (Redis: yes; a signed
    /// bundle store: no, the server serves nothing until a signed revision is read).
    fn seeds_from_directory(&self) -> bool {
        true
    }
}

/// One policy file as it was read.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Where it was read.
    pub path: PathBuf,
    /// Its text.
    pub text: String,
}

/// One accepted bundle.
#[derive(Debug)]
pub struct Version {
    /// 1, 2, ... in the order accepted.
    pub number: u64,
    /// The compiled set.
    pub set: PolicySet,
    /// When it was accepted.
    pub loaded_at: SystemTime,
    /// How.
    pub origin: Origin,
    /// The files it was compiled from.
    pub files: Vec<SourceFile>,
    /// Its documents (for `GET /v1/bundle`).
    pub documents: Vec<Document>,
    /// Warnings found while compiling it.
    pub warnings: Vec<Diagnostic>,
}

impl Version {
    /// Logs its warnings (at `warn`), one line each: every path that starts serving a version
    /// does, so an operator sees e.g. a namespace whose policies disagree on `defaultDecision`.
    pub fn log_warnings(&self) {
        for w in &self.warnings {
            tracing::warn!(version = self.number, diagnostic = %w, "policy warning");
        }
    }

    /// `(namespace, name, version)` of every policy in it.
    pub fn policies(&self) -> Vec<PolicyEntry> {
        self.documents
            .iter()
            .filter_map(|d| {
                let meta = d.value.get("metadata")?;
                Some(PolicyEntry {
                    name: meta.get("name")?.as_str()?.to_string(),
                    namespace: meta
                        .get("namespace")
                        .and_then(|n| n.as_str())
                        .unwrap_or("default")
                        .to_string(),
                    version: meta
                        .get("version")
                        .and_then(|n| n.as_str())
                        .unwrap_or_default()
                        .to_string(),
                    file: d.file.clone(),
                    rules: d
                        .value
                        .pointer("/spec/rules")
                        .and_then(|r| r.as_array())
                        .map_or(0, Vec::len),
                })
            })
            .collect()
    }

    /// Its files as `(path relative to root, text)`.
    pub fn relative_files(&self, root: &Path) -> Vec<(String, &str)> {
        self.files
            .iter()
            .map(|f| {
                let path = f.path.strip_prefix(root).unwrap_or(&f.path);
                (path.display().to_string(), f.text.as_str())
            })
            .collect()
    }

    /// The file holding policy `name`.
    pub fn policy_file(&self, name: &str) -> Option<&SourceFile> {
        let doc = self.policy_documents(name).into_iter().next()?;
        self.files
            .iter()
            .find(|f| f.path.display().to_string() == doc.file)
    }

    /// The source text of the file holding policy `name`.
    pub fn policy_text(&self, name: &str) -> Option<&str> {
        self.policy_file(name).map(|f| f.text.as_str())
    }

    /// The documents of one policy (by name, in any namespace).
    pub fn policy_documents(&self, name: &str) -> Vec<&Document> {
        self.documents
            .iter()
            .filter(|d| d.value.pointer("/metadata/name").and_then(|n| n.as_str()) == Some(name))
            .collect()
    }
}

/// A policy as listed by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyEntry {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.version`.
    pub version: String,
    /// The file it was read from.
    pub file: String,
    /// Its rules (enabled or not).
    pub rules: usize,
}

/// Why a write or rollback was refused.
#[derive(Debug)]
pub enum RegistryError {
    /// The policies do not validate (the located findings).
    Invalid(Diagnostics),
    /// The request is malformed: a name the API does not write, a body that is not exactly the
    /// policy it names.
    Malformed(String),
    /// What the request names is not there: a version not kept, a policy a version lacks.
    NotFound(String),
    /// The registry's state does not allow it now: policies served from one file, nothing
    /// loaded yet, a file shared with other policies, another replica wrote first.
    Conflict(String),
    /// Storage failed: a file cannot be written, the shared store (Redis) is unreachable.
    Unavailable(String),
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryError::Invalid(d) => write!(f, "{d}"),
            RegistryError::Malformed(m)
            | RegistryError::NotFound(m)
            | RegistryError::Conflict(m)
            | RegistryError::Unavailable(m) => f.write_str(m),
        }
    }
}

/// The text of the model table's file last loaded, and last rejected.
type ModelsText = (String, Option<String>);

/// The registry.
pub struct Registry {
    path: PathBuf,
    /// The context policies compile with; its model table is replaced when the models file
    /// changes.
    context: ArcSwap<ContextConfig>,
    /// The context as configured (a bundle without a model table compiles with it).
    configured: Arc<ContextConfig>,
    /// The model table's text of the bundle serving, when it brought one.
    bundle_models: Mutex<Option<String>>,
    /// The model table's file (`modelsFile`), the text last loaded from it and the text last
    /// rejected (not reported again).
    models: Option<(PathBuf, Mutex<ModelsText>)>,
    keep: usize,
    active: ArcSwapOption<Version>,
    history: Mutex<Vec<Arc<Version>>>,
    next: AtomicU64,
    /// Serializes reloads and writes.
    writer: Mutex<()>,
    last_error: Mutex<Option<Diagnostics>>,
    /// Fingerprint of the files last rejected (so polling does not recompile them).
    last_rejected: Mutex<Option<u128>>,
    /// Tells subscribers (`WatchBundle`) about each new version.
    changes: tokio::sync::watch::Sender<Option<Arc<Version>>>,
    /// The names of the plugins loaded (`None`: no plugin directory).
    plugins: Option<Vec<String>>,
    /// The shared store, when replicas share the bundle.
    shared: std::sync::OnceLock<Arc<dyn SharedBundle>>,
    /// (revision serving, revision last rejected) of the shared store.
    revisions: Mutex<(Option<String>, Option<String>)>,
}

impl Registry {
    /// A registry over `path` (a file or directory); nothing is loaded yet.
    pub fn new(path: PathBuf, context: ContextConfig, keep: usize) -> Registry {
        Registry {
            path,
            configured: Arc::new(context.clone()),
            context: ArcSwap::from_pointee(context),
            bundle_models: Mutex::new(None),
            models: None,
            keep: keep.max(1),
            active: ArcSwapOption::empty(),
            history: Mutex::new(Vec::new()),
            next: AtomicU64::new(1),
            writer: Mutex::new(()),
            last_error: Mutex::new(None),
            last_rejected: Mutex::new(None),
            changes: tokio::sync::watch::Sender::new(None),
            plugins: None,
            shared: std::sync::OnceLock::new(),
            revisions: Mutex::new((None, None)),
        }
    }

    /// Reloads the model table from `path` with the policies (`text`: what the context's table
    /// was loaded from): a change recompiles the policies with the new prices; a table that
    /// does not load is reported like a broken policy, and the last good keeps serving.
    pub fn with_models_file(mut self, path: PathBuf, text: String) -> Registry {
        self.models = Some((path, Mutex::new((text, None))));
        self
    }

    /// The text of the model table serving, when it comes from `modelsFile` (the bundle sync
    /// hands it to the filters).
    pub fn models_text(&self) -> Option<String> {
        if let Some(text) = self.bundle_models.lock().ok().and_then(|m| m.clone()) {
            return Some(text);
        }
        let (_, last) = self.models.as_ref()?;
        last.lock().ok().map(|l| l.0.clone())
    }

    /// Reads the model table's file: the context with the new table when it changed (applied
    /// by [`Registry::accept_models`] once the policies compile with it), `None` when it did not
    /// (or is the table last rejected); an error when it cannot be read or parsed (the table
    /// serving stays).
    fn staged_models(&self) -> Result<Option<(ContextConfig, String)>, Diagnostics> {
        let Some((path, last)) = &self.models else {
            return Ok(None);
        };
        let text = source::read_file(path).map_err(|d| Diagnostics(vec![d]))?;
        let mut last = last.lock().map_err(|_| {
            Diagnostics(vec![Diagnostic::error(
                Code::Io,
                "model table lock poisoned",
            )])
        })?;
        let (loaded, rejected) = &mut *last;
        if *loaded == text || rejected.as_ref() == Some(&text) {
            return Ok(None);
        }
        match ModelTable::parse(&path.display().to_string(), &text) {
            Ok(table) => {
                let mut context = ContextConfig::clone(&self.context.load());
                context.models = Some(table);
                Ok(Some((context, text)))
            }
            Err(d) => {
                *rejected = Some(text);
                if let Ok(mut e) = self.last_error.lock() {
                    *e = Some(d.clone());
                }
                Err(d)
            }
        }
    }

    /// Compiles `files` with a staged model table; on success the table is the one serving.
    fn accept_models(
        &self,
        files: Vec<SourceFile>,
        (context, text): (ContextConfig, String),
    ) -> Result<(Arc<Version>, bool), Diagnostics> {
        let previous = self.context.swap(Arc::new(context));
        let result = self.accept(files, Origin::Load);
        match (&result, &self.models) {
            (Ok(_), Some((_, last))) => {
                if let Ok(mut last) = last.lock() {
                    *last = (text, None);
                }
            }
            // The policies do not compile with it: the table serving stays, and the next
            // reload tries the new one again.
            _ => self.context.store(previous),
        }
        result
    }

    /// Checks plugin conditions against these loaded plugins (`None`: no plugin directory; plugin
    /// rules then answer per their `onError`, with a warning at load).
    pub fn with_plugins(mut self, names: Option<Vec<String>>) -> Registry {
        self.plugins = names;
        self
    }

    /// Shares the bundle with other replicas through `store` (once, at start).
    pub fn share(&self, store: Arc<dyn SharedBundle>) {
        let _ = self.shared.set(store);
    }

    /// Whether the bundle is shared (API writes are published; the directory only seeds).
    pub fn is_shared(&self) -> bool {
        self.shared.get().is_some()
    }

    /// The shared revision serving, if any.
    pub fn shared_revision(&self) -> Option<String> {
        self.revisions.lock().ok().and_then(|r| r.0.clone())
    }

    /// The directory policy files are named relative to.
    fn root(&self) -> PathBuf {
        if self.path.is_dir() {
            self.path.clone()
        } else {
            self.path
                .parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        }
    }

    /// Swaps in revision `revision` of the shared bundle (`files` relative to the policy root)
    /// after validating and compiling it. `None` when it is the revision serving or the one last
    /// rejected (nothing to do).
    pub fn apply_shared(
        &self,
        revision: &str,
        files: Vec<(String, String)>,
    ) -> Option<Result<(Arc<Version>, bool), Diagnostics>> {
        let root = self.root();
        let files = files
            .into_iter()
            .map(|(rel, text)| SourceFile {
                path: root.join(rel),
                text,
            })
            .collect();
        self.apply_revision(revision, files, None, Origin::Shared)
    }

    /// Swaps in revision `revision` of a signed bundle (verified by the caller): `files` named
    /// as in the archive (`policies/…`, so a diagnostic names the bundle's file), compiled with
    /// the bundle's model table `(name, text)` when it has one, else the configured one.
    pub fn apply_bundle(
        &self,
        revision: &str,
        files: Vec<(String, String)>,
        models: Option<(&str, &str)>,
    ) -> Option<Result<(Arc<Version>, bool), Diagnostics>> {
        let files = files
            .into_iter()
            .map(|(path, text)| SourceFile {
                path: PathBuf::from(path),
                text,
            })
            .collect();
        let (context, text) = match self.bundle_context(models) {
            Ok(c) => c,
            Err(d) => {
                if let Ok(mut r) = self.revisions.lock() {
                    r.1 = Some(revision.to_string());
                }
                if let Ok(mut e) = self.last_error.lock() {
                    *e = Some(d.clone());
                }
                return Some(Err(d));
            }
        };
        self.apply_revision(revision, files, Some((context, text)), Origin::Bundle)
    }

    /// The context a bundle compiles with: the configured one, with the bundle's model table
    /// `(name, text)` when it has one (and that text, to hand to the filters).
    fn bundle_context(
        &self,
        models: Option<(&str, &str)>,
    ) -> Result<(ContextConfig, Option<String>), Diagnostics> {
        let mut context = ContextConfig::clone(&self.configured);
        let text = match models {
            Some((name, text)) => {
                context.models = Some(ModelTable::parse(name, text)?);
                Some(text.to_string())
            }
            None => None,
        };
        Ok((context, text))
    }

    /// Whether policies come from a signed bundle store (files are named as in the archive).
    fn follows_bundle(&self) -> bool {
        self.shared.get().is_some_and(|s| !s.seeds_from_directory())
    }

    /// Where a file named `rel` (relative to the policy root, as `GET /v1/bundle` names it) is.
    fn file_path(&self, rel: &str) -> Result<PathBuf, RegistryError> {
        let ok = !rel.is_empty()
            && rel.len() <= 512
            && !rel.starts_with('/')
            && !rel.contains('\\')
            && rel
                .split('/')
                .all(|p| !p.is_empty() && p != "." && p != ".." && !p.starts_with('.'))
            && [".yaml", ".yml", ".json"].iter().any(|e| rel.ends_with(e));
        if !ok {
            return Err(RegistryError::Malformed(format!(
                "`{rel}` is not a policy file this API writes (a relative .yaml, .yml or .json path, no hidden or `..` parts)"
            )));
        }
        Ok(if self.follows_bundle() {
            PathBuf::from(rel)
        } else {
            self.root().join(rel)
        })
    }

    /// The files serving (or the directory) with `overlay` (`(path relative to the policy root,
    /// text)`) written over them or added.
    fn overlaid(&self, overlay: &[(String, String)]) -> Result<Vec<SourceFile>, RegistryError> {
        let mut files = self.base_files()?;
        for (rel, text) in overlay {
            let path = self.file_path(rel)?;
            files.retain(|f| f.path != path);
            files.push(SourceFile {
                path,
                text: text.clone(),
            });
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    fn unswapped(files: Vec<SourceFile>, compiled: Compiled) -> Version {
        let (set, documents, warnings) = compiled;
        Version {
            number: 0,
            set,
            loaded_at: SystemTime::now(),
            origin: Origin::Canary,
            files,
            documents,
            warnings,
        }
    }

    /// A canary's candidate: the files serving with `overlay` written over them, validated and
    /// compiled as a reload would, not swapped in (its number is 0).
    pub fn candidate(&self, overlay: &[(String, String)]) -> Result<Version, RegistryError> {
        let files = self.overlaid(overlay)?;
        let compiled = compile(&files, &self.context.load(), self.plugins.as_deref())
            .map_err(RegistryError::Invalid)?;
        Ok(Registry::unswapped(files, compiled))
    }

    /// A canary's candidate from a signed bundle (verified by the caller): its policy files
    /// named as in the archive, its model table if it has one; not swapped in.
    pub fn candidate_bundle(
        &self,
        files: Vec<(String, String)>,
        models: Option<(&str, &str)>,
    ) -> Result<Version, RegistryError> {
        let (context, _) = self
            .bundle_context(models)
            .map_err(RegistryError::Invalid)?;
        let mut files: Vec<SourceFile> = files
            .into_iter()
            .map(|(path, text)| SourceFile {
                path: PathBuf::from(path),
                text,
            })
            .collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let compiled =
            compile(&files, &context, self.plugins.as_deref()).map_err(RegistryError::Invalid)?;
        Ok(Registry::unswapped(files, compiled))
    }

    /// Makes a canary's candidate the version serving: `overlay` written over the files serving
    /// (into the directory, or published to the replicas), validated first as every write is.
    /// A signed bundle store refuses (change the store: `llm-policy bundle activate`).
    /// `expected`: the candidate's bundle digest, as the canary measured it; files that changed
    /// since (on disk, or published) make another bundle, and the promotion is refused.
    pub fn promote(
        &self,
        overlay: &[(String, String)],
        expected: &str,
    ) -> Result<Arc<Version>, RegistryError> {
        let _guard = self.writer.lock();
        if !self.path.is_dir() && !self.is_shared() {
            return Err(RegistryError::Conflict(String::from(
                "policies are served from a single file: write them through the file",
            )));
        }
        let files = self.overlaid(overlay)?;
        let (set, _, _) = compile(&files, &self.context.load(), self.plugins.as_deref())
            .map_err(RegistryError::Invalid)?;
        if set.bundle() != expected {
            return Err(RegistryError::Conflict(format!(
                "the policy files changed since the canary started: the candidate would now be bundle {}, not the {expected} measured; start the canary again",
                set.bundle()
            )));
        }
        if let Some(shared) = self.shared.get() {
            let root = self.root();
            let relative: Vec<(String, String)> = files
                .iter()
                .map(|f| {
                    let p = f.path.strip_prefix(&root).unwrap_or(&f.path);
                    (p.display().to_string(), f.text.clone())
                })
                .collect();
            let revision =
                shared.publish(self.shared_revision().as_deref(), &relative, Origin::Canary)?;
            let (v, _) = self
                .accept(files, Origin::Canary)
                .map_err(RegistryError::Invalid)?;
            self.published(revision);
            return Ok(v);
        }
        let root = self.root().canonicalize().map_err(|e| {
            RegistryError::Unavailable(format!("cannot resolve the policy directory: {e}"))
        })?;
        for (rel, text) in overlay {
            let path = self.file_path(rel)?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    RegistryError::Unavailable(format!("cannot create {}: {e}", dir.display()))
                })?;
                // A linked directory inside the policy directory must not lead out of it.
                let real = dir.canonicalize().map_err(|e| {
                    RegistryError::Unavailable(format!("cannot resolve {}: {e}", dir.display()))
                })?;
                if !real.starts_with(&root) {
                    return Err(RegistryError::Malformed(format!(
                        "`{rel}` leads out of the policy directory"
                    )));
                }
            }
            write_atomically(&path, text).map_err(|e| {
                RegistryError::Unavailable(format!("cannot write {}: {e}", path.display()))
            })?;
        }
        let (v, _) = self
            .accept(
                read_files(&self.path).map_err(RegistryError::Invalid)?,
                Origin::Canary,
            )
            .map_err(RegistryError::Invalid)?;
        Ok(v)
    }

    /// Compiles and swaps in one revision of a store (`context`: the context it compiles with,
    /// and the model table's text it brings), unless it is serving or was rejected already.
    fn apply_revision(
        &self,
        revision: &str,
        mut files: Vec<SourceFile>,
        context: Option<(ContextConfig, Option<String>)>,
        origin: Origin,
    ) -> Option<Result<(Arc<Version>, bool), Diagnostics>> {
        let _guard = self.writer.lock();
        let (serving, rejected) = self
            .revisions
            .lock()
            .map(|r| r.clone())
            .unwrap_or((None, None));
        if serving.as_deref() == Some(revision) || rejected.as_deref() == Some(revision) {
            return None;
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let (result, models) = match context {
            Some((context, models)) => {
                let previous = self.context.swap(Arc::new(context));
                let result = self.accept(files, origin);
                if result.is_err() {
                    self.context.store(previous);
                }
                (result, Some(models))
            }
            None => (self.accept(files, origin), None),
        };
        if let Ok(mut r) = self.revisions.lock() {
            match &result {
                Ok(_) => *r = (Some(revision.to_string()), None),
                Err(_) => r.1 = Some(revision.to_string()),
            }
        }
        if let (Ok(_), Some(models), Ok(mut m)) = (&result, models, self.bundle_models.lock()) {
            *m = models;
        }
        Some(result)
    }

    /// The files serving, relative to the policy root (what seeds an empty shared store).
    pub fn serving_files(&self) -> Option<Vec<(String, String)>> {
        let root = self.root();
        self.current().map(|v| {
            v.relative_files(&root)
                .into_iter()
                .map(|(p, t)| (p, t.to_string()))
                .collect()
        })
    }

    /// Records that this replica published `revision` of what it serves (seeding the store).
    pub fn published(&self, revision: String) {
        if let Ok(mut r) = self.revisions.lock() {
            *r = (Some(revision), None);
        }
    }

    /// The files a write starts from: the directory, or (shared) the version serving.
    fn base_files(&self) -> Result<Vec<SourceFile>, RegistryError> {
        if self.is_shared() {
            return Ok(self.current().map(|v| v.files.clone()).unwrap_or_default());
        }
        read_files(&self.path).map_err(RegistryError::Invalid)
    }

    /// Stores a validated write (`text` for the file `target` in `files`) and swaps it in: into
    /// the directory, or (shared) published for every replica.
    fn store(
        &self,
        files: Vec<SourceFile>,
        target: &Path,
        text: &str,
        origin: Origin,
    ) -> Result<Arc<Version>, RegistryError> {
        let Some(shared) = self.shared.get() else {
            write_atomically(target, text).map_err(|e| {
                RegistryError::Unavailable(format!("cannot write {}: {e}", target.display()))
            })?;
            let (v, _) = self
                .accept(
                    read_files(&self.path).map_err(RegistryError::Invalid)?,
                    origin,
                )
                .map_err(RegistryError::Invalid)?;
            return Ok(v);
        };
        let root = self.root();
        let relative: Vec<(String, String)> = files
            .iter()
            .map(|f| {
                let p = f.path.strip_prefix(&root).unwrap_or(&f.path);
                (p.display().to_string(), f.text.clone())
            })
            .collect();
        let revision = shared.publish(self.shared_revision().as_deref(), &relative, origin)?;
        let (v, _) = self.accept(files, origin).map_err(RegistryError::Invalid)?;
        self.published(revision);
        Ok(v)
    }

    /// The policy path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The version serving now (`None` until the first good load).
    pub fn current(&self) -> Option<Arc<Version>> {
        self.active.load_full()
    }

    /// A receiver that sees every version swapped in from now on (and the current one).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Option<Arc<Version>>> {
        self.changes.subscribe()
    }

    /// The kept versions, oldest first.
    pub fn versions(&self) -> Vec<Arc<Version>> {
        self.history.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// The kept versions that hold policy `name`, oldest first (`NotFound` when none does): what
    /// the REST and gRPC version listings show.
    pub fn policy_versions(&self, name: &str) -> Result<Vec<PolicyVersion>, RegistryError> {
        let active = self.current().map(|v| v.number);
        let versions: Vec<PolicyVersion> = self
            .versions()
            .iter()
            .filter_map(|v| {
                let entry = v.policies().into_iter().find(|p| p.name == name)?;
                Some(PolicyVersion {
                    version: v.number,
                    loaded_at: super::audit::rfc3339(v.loaded_at),
                    origin: v.origin,
                    bundle: v.set.bundle().to_string(),
                    policy_version: entry.version,
                    active: Some(v.number) == active,
                })
            })
            .collect();
        if versions.is_empty() {
            return Err(RegistryError::NotFound(format!(
                "no kept version has a policy `{name}`"
            )));
        }
        Ok(versions)
    }

    /// The errors of the last rejected reload (cleared by a good one).
    pub fn last_error(&self) -> Option<Diagnostics> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Reads and compiles the policy path; on success swaps it in (unless it is the bundle already
    /// serving) and returns the version serving afterwards, and whether it changed.
    /// Shared: the directory only seeded the store, so this keeps the version serving (the
    /// shared store is followed by [`super::registry_sync`]).
    pub fn reload(&self) -> Result<(Arc<Version>, bool), Diagnostics> {
        let _guard = self.writer.lock();
        if let (true, Some(cur)) = (self.is_shared(), self.current()) {
            return Ok((cur, false));
        }
        if self.shared.get().is_some_and(|s| !s.seeds_from_directory()) {
            return Err(Diagnostics(vec![Diagnostic::error(
                Code::Io,
                "no signed bundle revision has been read from the store yet",
            )]));
        }
        let staged = self.staged_models()?;
        let files = read_files(&self.path)?;
        if let Some(staged) = staged {
            return self.accept_models(files, staged);
        }
        self.reload_files(files)
    }

    /// Like [`Registry::reload`], but `None` when the files are those serving or those last
    /// rejected: what a watcher or poller calls, so an unchanged (or still broken) directory is
    /// neither recompiled nor reported again.
    pub fn reload_if_changed(&self) -> Option<Result<(Arc<Version>, bool), Diagnostics>> {
        let _guard = self.writer.lock();
        let staged = match self.staged_models() {
            Ok(staged) => staged,
            Err(d) => return Some(Err(d)),
        };
        let files = match read_files(&self.path) {
            Ok(f) => f,
            Err(d) => return Some(Err(d)),
        };
        if let Some(staged) = staged {
            return Some(self.accept_models(files, staged));
        }
        let print = fingerprint(&files);
        let serving = self.current().map(|v| fingerprint(&v.files));
        let rejected = self.last_rejected.lock().ok().and_then(|r| *r);
        if Some(print) == serving || Some(print) == rejected {
            return None;
        }
        Some(self.reload_files(files))
    }

    fn reload_files(&self, files: Vec<SourceFile>) -> Result<(Arc<Version>, bool), Diagnostics> {
        // The same files as the version serving: nothing to compile (cheap enough to poll).
        if let Some(cur) = self.current() {
            let same = cur.files.len() == files.len()
                && cur
                    .files
                    .iter()
                    .zip(&files)
                    .all(|(a, b)| a.path == b.path && a.text == b.text);
            if same {
                if let Ok(mut e) = self.last_error.lock() {
                    *e = None;
                }
                return Ok((cur, false));
            }
        }
        self.accept(files, Origin::Load)
    }

    /// Validates `files`, and swaps them in if they compile. Holds no lock (callers do).
    fn accept(
        &self,
        files: Vec<SourceFile>,
        origin: Origin,
    ) -> Result<(Arc<Version>, bool), Diagnostics> {
        let result = compile(&files, &self.context.load(), self.plugins.as_deref());
        let (set, documents, warnings) = match result {
            Ok(x) => x,
            Err(d) => {
                if let Ok(mut e) = self.last_error.lock() {
                    *e = Some(d.clone());
                }
                if let Ok(mut r) = self.last_rejected.lock() {
                    *r = Some(fingerprint(&files));
                }
                return Err(d);
            }
        };
        if let Ok(mut e) = self.last_error.lock() {
            *e = None;
        }
        if let Ok(mut r) = self.last_rejected.lock() {
            *r = None;
        }
        if let Some(cur) = self.current() {
            if cur.set.bundle() == set.bundle() {
                return Ok((cur, false));
            }
        }
        let version = Arc::new(Version {
            number: self.next.fetch_add(1, Ordering::SeqCst),
            set,
            loaded_at: SystemTime::now(),
            origin,
            files,
            documents,
            warnings,
        });
        if let Ok(mut h) = self.history.lock() {
            h.push(Arc::clone(&version));
            let excess = h.len().saturating_sub(self.keep);
            h.drain(..excess);
        }
        self.active.store(Some(Arc::clone(&version)));
        self.changes.send_replace(Some(Arc::clone(&version)));
        Ok((version, true))
    }

    /// Writes one policy (`text`, YAML or JSON, holding exactly that policy) to the policy
    /// directory and reloads. The whole bundle must validate first; nothing is written otherwise.
    pub fn put_policy(&self, name: &str, text: &str) -> Result<Arc<Version>, RegistryError> {
        let _guard = self.writer.lock();
        if !self.path.is_dir() && !self.is_shared() {
            return Err(RegistryError::Conflict(String::from(
                "policies are served from a single file: write them through the file",
            )));
        }
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            || name.starts_with('.')
        {
            return Err(RegistryError::Malformed(format!(
                "`{name}` is not a policy name this API writes (letters, digits, -, _, .)"
            )));
        }
        let file_name = format!("{name}.yaml");
        let docs = source::parse_str(&file_name, text)
            .map_err(|d| RegistryError::Invalid(Diagnostics(vec![d])))?;
        let named: Vec<&str> = docs
            .iter()
            .filter_map(|d| d.value.pointer("/metadata/name").and_then(|n| n.as_str()))
            .collect();
        if named != [name] {
            return Err(RegistryError::Malformed(format!(
                "the body must hold exactly one policy named `{name}` (it holds {named:?})"
            )));
        }
        let current = self.base_files()?;
        let target = self.file_of(name, &current)?;
        let mut files: Vec<SourceFile> = current.into_iter().filter(|f| f.path != target).collect();
        files.push(SourceFile {
            path: target.clone(),
            text: text.to_string(),
        });
        files.sort_by(|a, b| a.path.cmp(&b.path));
        // Validate before touching the directory or the shared store.
        compile(&files, &self.context.load(), self.plugins.as_deref())
            .map_err(RegistryError::Invalid)?;
        self.store(files, &target, text, Origin::Api)
    }

    /// Restores one policy to its text in version `to` (or, without `to`, in the newest kept
    /// version where it differs from now) and reloads.
    pub fn rollback_policy(
        &self,
        name: &str,
        to: Option<u64>,
    ) -> Result<Arc<Version>, RegistryError> {
        // The target is chosen and written under the lock: no write slips in between.
        let _guard = self.writer.lock();
        let current = self
            .current()
            .ok_or_else(|| RegistryError::Conflict(String::from("no policies loaded yet")))?;
        let text_in = |v: &Version| -> Option<(PathBuf, String)> {
            let file = v.policy_file(name)?;
            Some((file.path.clone(), file.text.clone()))
        };
        let now = text_in(&current);
        let history = self.versions();
        let target = match to {
            Some(n) => history
                .iter()
                .find(|v| v.number == n)
                .ok_or_else(|| RegistryError::NotFound(format!("version {n} is not kept")))?
                .clone(),
            None => history
                .iter()
                .rev()
                .find(|v| v.number < current.number && text_in(v).is_some() && text_in(v) != now)
                .ok_or_else(|| {
                    RegistryError::NotFound(format!("no earlier version of `{name}` is kept"))
                })?
                .clone(),
        };
        let (path, text) = text_in(&target).ok_or_else(|| {
            RegistryError::NotFound(format!("version {} has no policy `{name}`", target.number))
        })?;
        let on_disk = self.base_files()?;
        // The API writes whole files: a file the policy shares with others (now or in the
        // target version) would roll them back too.
        let here = self.file_of(name, &on_disk)?;
        self.file_of(
            name,
            &[SourceFile {
                path: path.clone(),
                text: text.clone(),
            }],
        )?;
        if here != path {
            return Err(RegistryError::Conflict(format!(
                "`{name}` moved from {} to {} since version {}: restore it through the files",
                path.display(),
                here.display(),
                target.number
            )));
        }
        let mut files: Vec<SourceFile> = on_disk.into_iter().filter(|f| f.path != path).collect();
        files.push(SourceFile {
            path: path.clone(),
            text: text.clone(),
        });
        files.sort_by(|a, b| a.path.cmp(&b.path));
        compile(&files, &self.context.load(), self.plugins.as_deref())
            .map_err(RegistryError::Invalid)?;
        self.store(files, &path, &text, Origin::Rollback)
    }

    /// The file a policy lives in now, or `<dir>/<name>.yaml` for a new one; a file shared with
    /// other policies is refused (the API writes whole files), and so is a new policy whose file
    /// name is taken by other policies.
    fn file_of(&self, name: &str, files: &[SourceFile]) -> Result<PathBuf, RegistryError> {
        for f in files {
            let docs = source::parse_str(&f.path.display().to_string(), &f.text)
                .map_err(|d| RegistryError::Invalid(Diagnostics(vec![d])))?;
            let names: Vec<&str> = docs
                .iter()
                .filter_map(|d| d.value.pointer("/metadata/name").and_then(|n| n.as_str()))
                .collect();
            if names.contains(&name) {
                if names.len() > 1 {
                    return Err(RegistryError::Conflict(format!(
                        "`{name}` shares {} with other policies: edit that file instead",
                        f.path.display()
                    )));
                }
                return Ok(f.path.clone());
            }
        }
        let fresh = self.root().join(format!("{name}.yaml"));
        if files.iter().any(|f| f.path == fresh) {
            return Err(RegistryError::Conflict(format!(
                "{} holds other policies: a new policy `{name}` cannot take its place",
                fresh.display()
            )));
        }
        Ok(fresh)
    }
}

/// Reads every policy file of `path` (the loader's limits and directory rules).
fn read_files(path: &Path) -> Result<Vec<SourceFile>, Diagnostics> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for f in source::policy_files(path).map_err(|d| Diagnostics(vec![d]))? {
        match source::read_file(&f) {
            Ok(text) => files.push(SourceFile { path: f, text }),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(Diagnostics(errors))
    }
}

/// A hash of file names and contents.
fn fingerprint(files: &[SourceFile]) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for f in files {
        let path = f.path.display().to_string();
        h.update(&(path.len() as u64).to_le_bytes());
        h.update(path.as_bytes());
        h.update(&(f.text.len() as u64).to_le_bytes());
        h.update(f.text.as_bytes());
    }
    h.digest128()
}

type Compiled = (PolicySet, Vec<Document>, Vec<Diagnostic>);

/// Parses and compiles files (test suites skipped), as `llm-policy validate` does; then checks
/// plugin conditions against `plugins`, the plugins loaded (`None`: the server has no plugin
/// directory, so plugin rules answer per their `onError`, with a warning).
fn compile(
    files: &[SourceFile],
    context: &ContextConfig,
    plugins: Option<&[String]>,
) -> Result<Compiled, Diagnostics> {
    let (set, docs, mut warnings) = compile_rules(files, context)?;
    let mut errors = Vec::new();
    for (rule, plugin) in set.plugin_rules() {
        if plugins.is_some_and(|p| p.contains(&plugin.name)) {
            continue;
        }
        let (severity, message) = match plugins {
            Some(loaded) => (
                Severity::Error,
                format!(
                    "plugin `{}` is not loaded on this server (loaded: {})",
                    plugin.name,
                    if loaded.is_empty() {
                        String::from("none")
                    } else {
                        loaded.join(", ")
                    }
                ),
            ),
            None => (
                Severity::Warning,
                format!(
                    "plugin `{}`: this server has no plugin directory (`plugins.dir`), so the rule answers per its `onError`",
                    plugin.name
                ),
            ),
        };
        let mut d = Diagnostic::error(Code::UnknownPlugin, message)
            .at(&rule.origin.file, rule.origin.position);
        d.severity = severity;
        d.rule = Some(rule.id);
        match severity {
            Severity::Error => errors.push(d),
            _ => warnings.push(d),
        }
    }
    if errors.is_empty() {
        Ok((set, docs, warnings))
    } else {
        Err(Diagnostics(errors))
    }
}

fn compile_rules(files: &[SourceFile], context: &ContextConfig) -> Result<Compiled, Diagnostics> {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        match source::parse_str(&f.path.display().to_string(), &f.text) {
            Ok(d) => docs.extend(d),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(Diagnostics(errors));
    }
    docs.retain(|d| d.kind() != Some(llm_policy_core::model::KIND_POLICY_TEST));
    if docs.is_empty() {
        return Err(Diagnostics(vec![Diagnostic::error(
            Code::NoPolicies,
            "no policy documents found",
        )]));
    }
    let out = PolicySet::compile(&docs, context)?;
    let warnings = out
        .warnings
        .into_iter()
        .filter(|w| w.severity == Severity::Warning)
        .collect();
    Ok((out.set, docs, warnings))
}

/// Writes `text` to a temporary file beside `path`, then renames it over `path` (a watcher
/// never sees half a file).
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("policy")
    ));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, model: &str) -> String {
        format!(
            "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {{name: {name}}}\nspec:\n  defaultDecision: allow\n  rules:\n    - {{id: r-{name}, when: {{cel: \"request.model == '{model}'\"}}, action: {{decision: deny}}}}\n"
        )
    }

    #[test]
    fn a_bad_bundle_is_rejected_and_the_last_good_keeps_serving() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), policy("a", "x")).unwrap();
        let r = Registry::new(dir.path().to_path_buf(), ContextConfig::default(), 5);
        let (v1, changed) = r.reload().unwrap();
        assert!(changed && v1.number == 1);
        std::fs::write(dir.path().join("a.yaml"), "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: a}\nspec: {rules: [{id: r, when: {cel: 'request.modle'}, action: {decision: deny}}]}\n").unwrap();
        let e = r.reload().unwrap_err();
        assert_eq!(e.0[0].code, "unknown-field");
        assert_eq!(r.current().unwrap().number, 1);
        assert!(r.last_error().is_some());
        // The same bundle again is not a new version.
        std::fs::write(dir.path().join("a.yaml"), policy("a", "x")).unwrap();
        let (v, changed) = r.reload().unwrap();
        assert!(!changed && v.number == 1);
        assert!(r.last_error().is_none());
    }

    #[test]
    fn the_model_table_reloads_with_the_policies_and_a_bad_one_keeps_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).unwrap();
        std::fs::write(policies.join("a.yaml"), policy("a", "x")).unwrap();
        let table = |price: f64| {
            format!("asOf: \"2026-01-01\"\nfallback: {{contextWindow: 1000, maxOutput: 100, input: 1.0, output: 2.0}}\nmodels:\n  m: {{provider: openai, contextWindow: 1000, maxOutput: 100, input: {price}, output: 2.0}}\n")
        };
        let models = dir.path().join("models.yaml");
        std::fs::write(&models, table(1.0)).unwrap();
        let context = ContextConfig {
            models: Some(ModelTable::parse("models.yaml", &table(1.0)).unwrap()),
            ..ContextConfig::default()
        };
        let r = Registry::new(policies.clone(), context, 5)
            .with_models_file(models.clone(), table(1.0));
        let (v1, _) = r.reload().unwrap();
        let price = |v: &Version| v.set.models().lookup(Some("m")).input;
        assert_eq!(price(&v1), 1.0);
        assert!(r.reload_if_changed().is_none(), "nothing changed");
        // New prices: a new version, the policies recompiled with them (a new bundle digest).
        std::fs::write(&models, table(3.0)).unwrap();
        let (v2, changed) = r.reload_if_changed().unwrap().unwrap();
        assert!(changed && v2.number == 2 && price(&v2) == 3.0);
        assert_ne!(v1.set.bundle(), v2.set.bundle());
        // A broken table: located, reported once, the last good keeps serving.
        std::fs::write(&models, "asOf: 2026\nmodels:\n  m: {input: -1}\n").unwrap();
        let e = r.reload_if_changed().unwrap().unwrap_err();
        assert!(
            e.0[0]
                .file
                .as_deref()
                .is_some_and(|f| f.ends_with("models.yaml")),
            "{e:?}"
        );
        assert_eq!(r.current().unwrap().number, 2);
        assert!(r.last_error().is_some());
        assert!(
            r.reload_if_changed().is_none(),
            "the same broken table is not reported again"
        );
        std::fs::write(&models, table(5.0)).unwrap();
        let (v3, _) = r.reload_if_changed().unwrap().unwrap();
        assert_eq!(price(&v3), 5.0);
        assert!(r.last_error().is_none());
    }

    #[test]
    fn a_plugin_the_server_has_not_loaded_is_a_located_error() {
        let dir = tempfile::tempdir().unwrap();
        let text = "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: a}\nspec:\n  rules:\n    - id: pii\n      when: {plugin: {name: pii-detector}}\n      action: {decision: deny}\n";
        std::fs::write(dir.path().join("a.yaml"), text).unwrap();
        // With a plugin directory, an unknown name rejects the bundle, located.
        let r = Registry::new(dir.path().to_path_buf(), ContextConfig::default(), 5)
            .with_plugins(Some(vec![String::from("prompt-injection")]));
        let e = r.reload().unwrap_err();
        assert_eq!(e.0[0].code, "unknown-plugin");
        assert_eq!(e.0[0].rule.as_deref(), Some("pii"));
        assert_eq!(e.0[0].position.map(|p| p.line), Some(6));
        assert!(
            e.0[0].message.contains("loaded: prompt-injection"),
            "{}",
            e.0[0].message
        );
        // Loaded: fine. Without a plugin directory: a warning, the rule answers per onError.
        let r = Registry::new(dir.path().to_path_buf(), ContextConfig::default(), 5)
            .with_plugins(Some(vec![String::from("pii-detector")]));
        assert!(r.reload().unwrap().0.warnings.is_empty());
        let r = Registry::new(dir.path().to_path_buf(), ContextConfig::default(), 5);
        let (v, _) = r.reload().unwrap();
        assert_eq!(v.warnings[0].code, "unknown-plugin");
    }

    #[test]
    fn writes_validate_first_and_rollback_restores_a_policy() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), policy("a", "x")).unwrap();
        let r = Registry::new(dir.path().to_path_buf(), ContextConfig::default(), 5);
        r.reload().unwrap();
        let v2 = r.put_policy("a", &policy("a", "y")).unwrap();
        assert_eq!(v2.number, 2);
        assert!(std::fs::read_to_string(dir.path().join("a.yaml"))
            .unwrap()
            .contains("'y'"));
        // Invalid: nothing written.
        let bad = policy("a", "z").replace("request.model", "request.modle");
        assert!(matches!(
            r.put_policy("a", &bad),
            Err(RegistryError::Invalid(_))
        ));
        assert!(std::fs::read_to_string(dir.path().join("a.yaml"))
            .unwrap()
            .contains("'y'"));
        // Wrong name in the body.
        assert!(matches!(
            r.put_policy("a", &policy("b", "z")),
            Err(RegistryError::Malformed(_))
        ));
        // A new policy gets its own file.
        r.put_policy("b", &policy("b", "z")).unwrap();
        assert!(dir.path().join("b.yaml").exists());
        let v = r.rollback_policy("a", None).unwrap();
        assert!(std::fs::read_to_string(dir.path().join("a.yaml"))
            .unwrap()
            .contains("'x'"));
        assert_eq!(v.origin, Origin::Rollback);
        assert_eq!(r.versions().len(), 4);
    }

    #[test]
    fn writes_never_touch_policies_sharing_a_file() {
        let dir = tempfile::tempdir().unwrap();
        // `c.yaml` holds policies a and b.
        std::fs::write(
            dir.path().join("c.yaml"),
            format!("{}---\n{}", policy("a", "x"), policy("b", "x")),
        )
        .unwrap();
        let r = Registry::new(dir.path().to_path_buf(), ContextConfig::default(), 5);
        r.reload().unwrap();
        // A new policy named after the shared file would overwrite it.
        assert!(matches!(
            r.put_policy("c", &policy("c", "y")),
            Err(RegistryError::Conflict(_))
        ));
        assert!(matches!(
            r.put_policy("a", &policy("a", "y")),
            Err(RegistryError::Conflict(_))
        ));
        // Rolling back `a` would roll back `b` too.
        let both = |m: &str| format!("{}---\n{}", policy("a", m), policy("b", m));
        std::fs::write(dir.path().join("c.yaml"), both("z")).unwrap();
        r.reload().unwrap();
        assert!(matches!(
            r.rollback_policy("a", Some(1)),
            Err(RegistryError::Conflict(_))
        ));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("c.yaml")).unwrap(),
            both("z")
        );
    }
}
