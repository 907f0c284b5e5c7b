//! `llm-policy bundle keygen|build|sign|verify|push|history|activate`: signed policy bundles
//! (docs/bundles.md). `build` refuses policies that do not validate; `push` and `activate`
//! refuse a bundle whose signature does not verify with the given public keys, so the store
//! only ever names bundles servers will accept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use llm_policy_core::model_table::ModelTable;
use llm_policy_core::{source, ContextConfig, Diagnostics, PolicySet};

use crate::bundle::store::{Limits, Store};
use crate::bundle::{self, Bundle, BundleError, PublicKey, SigningKey};

/// `llm-policy bundle` arguments.
#[derive(Debug, Clone, Args)]
pub struct BundleArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: BundleCommand,
}

/// Where a bundle store is: its URL and options.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// The store: `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`,
    /// `file:///dir`. Credentials come from the environment (`AWS_ACCESS_KEY_ID`, …).
    #[arg(long)]
    pub store: String,
    /// A store option, `key=value` (repeat): `aws_endpoint=http://127.0.0.1:9000`,
    /// `aws_region=eu-west-1`, `aws_allow_http=true`, …
    #[arg(long = "option", value_parser = option)]
    pub options: Vec<(String, String)>,
}

/// The `bundle` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum BundleCommand {
    /// Make a signing key: `PREFIX.pem` (private, mode 0600) and `PREFIX.pub` (public).
    Keygen {
        /// Path prefix of the two files.
        #[arg(long)]
        out: PathBuf,
    },
    /// Build a bundle from a policy directory (validated first), signed when a key is given.
    Build {
        /// Policy file or directory.
        #[arg(long)]
        policies: PathBuf,
        /// The model table to ship with it (prices, output caps).
        #[arg(long)]
        models: Option<PathBuf>,
        /// The revision's name (default: build time and digest).
        #[arg(long)]
        revision: Option<String>,
        /// Sign with this private key (PEM).
        #[arg(long)]
        key: Option<PathBuf>,
        /// The archive to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a bundle (adds this key's signature, keeps others).
    Sign {
        /// The private key (PEM).
        #[arg(long)]
        key: PathBuf,
        /// The archive.
        bundle: PathBuf,
        /// Where to write the signed archive (default: in place).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify a bundle: digests, a signature by one of the keys, policies that compile.
    Verify {
        /// A trusted public key (PEM; repeat).
        #[arg(long = "public-key", required = true)]
        public_keys: Vec<PathBuf>,
        /// The archive (or `--store` and `--revision`).
        bundle: Option<PathBuf>,
        /// Read it from this store.
        #[arg(long)]
        store: Option<String>,
        /// Store options (`key=value`).
        #[arg(long = "option", value_parser = option)]
        options: Vec<(String, String)>,
        /// The revision to read from the store (default: the current one).
        #[arg(long)]
        revision: Option<String>,
    },
    /// Push a signed bundle to a store and make it the current revision.
    Push {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// A trusted public key the bundle must verify with before it is pushed (repeat).
        #[arg(long = "public-key", required = true)]
        public_keys: Vec<PathBuf>,
        /// The archive.
        bundle: PathBuf,
        /// Upload the revision without making it current.
        #[arg(long)]
        no_activate: bool,
    },
    /// List the revisions in a store (oldest first; `*` the current one).
    History {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Make a revision already in the store the current one (a rollback, or a roll forward).
    Activate {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// The revision.
        #[arg(long)]
        revision: String,
        /// A trusted public key the revision must verify with (repeat).
        #[arg(long = "public-key", required = true)]
        public_keys: Vec<PathBuf>,
    },
}

fn option(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected key=value, got `{text}`"))
}

/// A failed command: its message (exit 2).
#[derive(Debug)]
pub struct Failed(String);

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<BundleError> for Failed {
    fn from(e: BundleError) -> Self {
        Failed(e.to_string())
    }
}

impl From<Diagnostics> for Failed {
    fn from(d: Diagnostics) -> Self {
        Failed(
            d.0.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
        )
    }
}

/// Runs a `bundle` subcommand: the text to print.
pub fn run(args: &BundleArgs, context: &ContextConfig) -> Result<String, Failed> {
    match &args.command {
        BundleCommand::Keygen { out } => keygen(out),
        BundleCommand::Build {
            policies,
            models,
            revision,
            key,
            out,
        } => build(
            policies,
            models.as_deref(),
            revision.as_deref(),
            key.as_deref(),
            out,
            context,
        ),
        BundleCommand::Sign { key, bundle, out } => {
            let bytes = read(bundle)?;
            let mut b = Bundle::read(&bundle.display().to_string(), &bytes)?;
            let key = SigningKey::from_file(key)?;
            key.sign(&mut b);
            let out = out.as_ref().unwrap_or(bundle);
            write(out, &b.to_archive()?)?;
            Ok(format!(
                "signed {} (revision {}) with key {}\n",
                out.display(),
                b.manifest.revision,
                key.public().id()
            ))
        }
        BundleCommand::Verify {
            public_keys,
            bundle,
            store,
            options,
            revision,
        } => {
            let keys = public_keys_from(public_keys)?;
            let (name, bytes, expected) = match (bundle, store) {
                (Some(path), None) => (path.display().to_string(), read(path)?, None),
                (None, Some(url)) => block_on(async {
                    let store =
                        Store::open(url, &options.iter().cloned().collect(), Limits::default())?;
                    let (revision, digest) = match revision {
                        Some(r) => (r.clone(), None),
                        None => {
                            let p = current(&store).await?.pointer;
                            (p.revision, Some(p.digest))
                        }
                    };
                    let bytes = store.fetch(&revision).await?;
                    Ok::<_, Failed>((
                        store.revision_url(&revision),
                        bytes,
                        Some((revision, digest)),
                    ))
                })??,
                _ => {
                    return Err(Failed(String::from(
                        "give an archive, or --store (not both)",
                    )))
                }
            };
            let (b, key) = checked(&name, &bytes, &keys, context)?;
            // From a store: the manifest must be the revision (and, for the current one, the
            // digest) the store names, as a server checks.
            if let Some((revision, digest)) = expected {
                if b.manifest.revision != revision || digest.is_some_and(|d| d != b.manifest.digest)
                {
                    return Err(Failed(format!(
                        "{name}: manifest.json names revision `{}` with digest {}, not what the store names",
                        b.manifest.revision, b.manifest.digest
                    )));
                }
            }
            Ok(format!(
                "verified {name}: revision {}, digest {}, {} files, signed by {key}\n",
                b.manifest.revision,
                b.manifest.digest,
                b.files.len()
            ))
        }
        BundleCommand::Push {
            store,
            public_keys,
            bundle,
            no_activate,
        } => {
            let keys = public_keys_from(public_keys)?;
            let bytes = read(bundle)?;
            let (b, _) = checked(&bundle.display().to_string(), &bytes, &keys, context)?;
            block_on(async {
                let s = open(store)?;
                s.put_revision(&b.manifest, &bytes).await?;
                if *no_activate {
                    return Ok(format!(
                        "pushed {} (not current)\n",
                        s.revision_url(&b.manifest.revision)
                    ));
                }
                let was = match s.current(None).await {
                    Ok(c) => c,
                    Err(BundleError::NotFound(_)) => None,
                    Err(e) => return Err(e.into()),
                };
                let p = s
                    .move_pointer(&b.manifest.revision, &b.manifest.digest, was.as_ref())
                    .await?;
                Ok::<_, Failed>(format!(
                    "pushed {}; current: {} (was {})\n",
                    s.revision_url(&p.revision),
                    p.revision,
                    p.previous.as_deref().unwrap_or("none")
                ))
            })?
        }
        BundleCommand::History { store } => block_on(async {
            let s = open(store)?;
            let mut out = String::new();
            for r in s.history().await? {
                out.push_str(&format!(
                    "{} {}  {}  {} bytes\n",
                    if r.current { "*" } else { " " },
                    r.revision,
                    r.written,
                    r.size
                ));
            }
            Ok::<_, Failed>(out)
        })?,
        BundleCommand::Activate {
            store,
            revision,
            public_keys,
        } => {
            let keys = public_keys_from(public_keys)?;
            block_on(async {
                let s = open(store)?;
                let bytes = s.fetch(revision).await?;
                let (b, _) = checked(&s.revision_url(revision), &bytes, &keys, context)?;
                if b.manifest.revision != *revision {
                    return Err(Failed(format!(
                        "{}: its manifest names revision `{}`",
                        s.revision_url(revision),
                        b.manifest.revision
                    )));
                }
                let was = current(&s).await.ok();
                let p = s
                    .move_pointer(revision, &b.manifest.digest, was.as_ref())
                    .await?;
                Ok::<_, Failed>(format!(
                    "current: {} (was {})\n",
                    p.revision,
                    p.previous.as_deref().unwrap_or("none")
                ))
            })?
        }
    }
}

fn open(store: &StoreArgs) -> Result<Store, Failed> {
    let options: BTreeMap<String, String> = store.options.iter().cloned().collect();
    Ok(Store::open(&store.store, &options, Limits::default())?)
}

async fn current(store: &Store) -> Result<crate::bundle::store::Current, Failed> {
    store
        .current(None)
        .await?
        .ok_or_else(|| Failed(format!("{}: no current revision", store.url())))
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> Result<T, Failed> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failed(format!("cannot start the runtime: {e}")))?;
    Ok(rt.block_on(f))
}

fn keygen(out: &Path) -> Result<String, Failed> {
    let private = out.with_extension("pem");
    let public = out.with_extension("pub");
    for p in [&private, &public] {
        if p.exists() {
            return Err(Failed(format!("{}: exists (not overwritten)", p.display())));
        }
    }
    let (key, pem) = SigningKey::generate()?;
    write_private(&private, pem.as_bytes())?;
    write(&public, key.public().to_pem().as_bytes())?;
    Ok(format!(
        "key {}: private {} (keep it secret), public {}\n",
        key.public().id(),
        private.display(),
        public.display()
    ))
}

fn build(
    policies: &Path,
    models: Option<&Path>,
    revision: Option<&str>,
    key: Option<&Path>,
    out: &Path,
    context: &ContextConfig,
) -> Result<String, Failed> {
    let files = bundle::archive::read_policy_dir(policies)?;
    let models = models
        .map(|p| source::read_file(p).map_err(|d| Diagnostics(vec![d])))
        .transpose()?;
    let mut b = Bundle::new(files, models, revision, chrono::Utc::now())?;
    compile(&b, context)?;
    let signed = match key {
        Some(k) => {
            let key = SigningKey::from_file(k)?;
            key.sign(&mut b);
            format!(", signed by {}", key.public().id())
        }
        None => String::from(", unsigned (llm-policy bundle sign)"),
    };
    write(out, &b.to_archive()?)?;
    Ok(format!(
        "built {}: revision {}, digest {}, {} files{signed}\n",
        out.display(),
        b.manifest.revision,
        b.manifest.digest,
        b.files.len()
    ))
}

/// Verified and compiled: the bundle and the id of the key that signed it.
fn checked(
    name: &str,
    bytes: &[u8],
    keys: &[PublicKey],
    context: &ContextConfig,
) -> Result<(Bundle, String), Failed> {
    let (b, key) = bundle::verify(name, bytes, keys)?;
    compile(&b, context).map_err(|e| Failed(format!("{name}: {e}")))?;
    Ok((b, key))
}

/// Compiles a bundle's policies (test suites skipped) with its model table, as a server would.
pub fn compile(b: &Bundle, context: &ContextConfig) -> Result<PolicySet, Failed> {
    let mut context = context.clone();
    if let Some(text) = b.models() {
        context.models = Some(ModelTable::parse(crate::bundle::archive::MODELS, text)?);
    }
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (path, text) in &b.files {
        if !path.starts_with(crate::bundle::archive::POLICIES) {
            continue;
        }
        match source::parse_str(path, text) {
            Ok(d) => docs.extend(d),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(Diagnostics(errors).into());
    }
    docs.retain(|d| d.kind() != Some(llm_policy_core::model::KIND_POLICY_TEST));
    Ok(PolicySet::compile(&docs, &context)?.set)
}

fn public_keys_from(paths: &[PathBuf]) -> Result<Vec<PublicKey>, Failed> {
    paths
        .iter()
        .map(|p| PublicKey::from_file(p).map_err(Failed::from))
        .collect()
}

fn read(path: &Path) -> Result<Vec<u8>, Failed> {
    std::fs::read(path).map_err(|e| Failed(format!("{}: {e}", path.display())))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), Failed> {
    std::fs::write(path, bytes).map_err(|e| Failed(format!("{}: {e}", path.display())))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Failed> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Failed(format!("{}: {e}", path.display())))?;
    f.write_all(bytes)
        .map_err(|e| Failed(format!("{}: {e}", path.display())))
}
