//! Signed policy bundles (docs/bundles.md): what `llm-policy bundle build|sign|verify|push`
//! makes and `llm-policy serve` follows from object storage.
//!
//! - [`archive`]: the archive (a gzipped tar of `manifest.json`, `signatures.json`,
//!   `policies/…` and an optional `models.yaml`): built from a policy directory, read back with
//!   limits, every file checked against the manifest's digests.
//! - [`signing`]: ed25519 keys (PEM, as `openssl genpkey -algorithm ed25519` writes them) and the
//!   signatures over the manifest.
//! - [`store`]: bundles on object storage (S3, GCS, Azure, local files, through `object_store`):
//!   immutable revisions plus a `current.json` pointer moved by conditional writes, so history and
//!   rollback need no second database.
//!
//! The CLI and the server share this module; neither trusts a bundle before [`verify`] has
//! checked its signature and every digest.

pub mod archive;
pub mod signing;
pub mod store;

pub use archive::{Bundle, Manifest};
pub use signing::{PublicKey, SigningKey};

/// Why a bundle was refused or could not be read or written. Each kind names where: the
/// archive's file, or the store's object.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The archive is not one: not gzip or tar, a path that escapes, a link, too large, text
    /// that is not UTF-8, a manifest that does not parse.
    #[error("{0}")]
    Malformed(String),
    /// A file differs from what the manifest says (digest or size), is missing, or is not in
    /// the manifest.
    #[error("{0}")]
    Tampered(String),
    /// No signature by a trusted key verifies the manifest (unsigned, signed by another key, or
    /// a signature that does not match).
    #[error("{0}")]
    Untrusted(String),
    /// A key file cannot be read or is not an ed25519 key.
    #[error("{0}")]
    Key(String),
    /// The store cannot be reached or answered with an error.
    #[error("{0}")]
    Unavailable(String),
    /// What was asked for is not in the store.
    #[error("{0}")]
    NotFound(String),
    /// The store changed under the write: the revision exists already, or another push moved
    /// the pointer first.
    #[error("{0}")]
    Conflict(String),
    /// The store's URL or options are wrong.
    #[error("{0}")]
    Config(String),
}

/// Reads an archive and checks it: every file against the manifest, the manifest against at
/// least one signature by `trusted`: the bundle and the id of the key whose signature verified.
/// `name` says where it came from in every message.
pub fn verify(
    name: &str,
    bytes: &[u8],
    trusted: &[PublicKey],
) -> Result<(Bundle, String), BundleError> {
    // The signature first: an archive nobody trusted signed costs no more than reading it.
    let bundle = Bundle::read_unchecked(name, bytes)?;
    let key = signing::check(name, &bundle, trusted)?;
    bundle.check(name)?;
    Ok((bundle, key))
}
