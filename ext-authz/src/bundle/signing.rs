//! Ed25519 signatures over a bundle's manifest (ring). Keys are PEM files as OpenSSL writes
//! them: a private key is PKCS#8 (`openssl genpkey -algorithm ed25519 -out key.pem`, or
//! `llm-policy bundle keygen`), a public key is SubjectPublicKeyInfo (`openssl pkey -in key.pem
//! -pubout`). A signature covers the context string [`CONTEXT`] followed by the manifest's exact
//! bytes; the manifest holds every file's digest, so it covers the whole bundle.

use std::path::Path;

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};
use sha2::{Digest as _, Sha256};

use super::archive::{hex, Signature};
use super::{Bundle, BundleError};

/// What a signature covers before the manifest's bytes (so a bundle signature is never valid
/// for anything else the key signs).
pub const CONTEXT: &[u8] = b"llm-policy-bundle/1 manifest\n";

/// The DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410), before the 32 key bytes.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// A key that signs bundles.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

/// A key a bundle's signature is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    bytes: [u8; 32],
}

impl PublicKey {
    /// Reads a PEM public key (SubjectPublicKeyInfo, ed25519).
    pub fn from_pem(name: &str, pem: &[u8]) -> Result<PublicKey, BundleError> {
        let der = SubjectPublicKeyInfoDer::from_pem_slice(pem)
            .map_err(|e| BundleError::Key(format!("{name}: not a PEM public key: {e}")))?;
        let der: &[u8] = der.as_ref();
        let key = der
            .strip_prefix(SPKI_PREFIX.as_slice())
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .ok_or_else(|| BundleError::Key(format!("{name}: not an ed25519 public key")))?;
        Ok(PublicKey { bytes: key })
    }

    /// Reads a PEM public key file.
    pub fn from_file(path: &Path) -> Result<PublicKey, BundleError> {
        let pem = std::fs::read(path)
            .map_err(|e| BundleError::Key(format!("{}: {e}", path.display())))?;
        PublicKey::from_pem(&path.display().to_string(), &pem)
    }

    /// The key as PEM (SubjectPublicKeyInfo).
    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.bytes);
        pem("PUBLIC KEY", &der)
    }

    /// Its id: the first 16 hex digits of the SHA-256 of the key's bytes.
    pub fn id(&self) -> String {
        let h = hex(&Sha256::digest(self.bytes));
        h.get(..16).unwrap_or(&h).to_string()
    }

    fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.bytes)
            .verify(message, signature)
            .is_ok()
    }
}

impl SigningKey {
    /// A new random key and its PKCS#8 PEM.
    pub fn generate() -> Result<(SigningKey, String), BundleError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| BundleError::Key(String::from("cannot generate a key")))?;
        let pem = pem("PRIVATE KEY", doc.as_ref());
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref())
            .map_err(|_| BundleError::Key(String::from("cannot generate a key")))?;
        Ok((SigningKey { pair }, pem))
    }

    /// Reads a PEM private key (PKCS#8 v1 or v2, ed25519).
    pub fn from_pem(name: &str, pem: &[u8]) -> Result<SigningKey, BundleError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem)
            .map_err(|e| BundleError::Key(format!("{name}: not a PEM private key: {e}")))?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
            .map_err(|e| BundleError::Key(format!("{name}: not an ed25519 private key: {e}")))?;
        Ok(SigningKey { pair })
    }

    /// Reads a PEM private key file.
    pub fn from_file(path: &Path) -> Result<SigningKey, BundleError> {
        let pem = std::fs::read(path)
            .map_err(|e| BundleError::Key(format!("{}: {e}", path.display())))?;
        SigningKey::from_pem(&path.display().to_string(), &pem)
    }

    /// Its public key.
    pub fn public(&self) -> PublicKey {
        let mut bytes = [0u8; 32];
        let public = self.pair.public_key().as_ref();
        if public.len() == bytes.len() {
            bytes.copy_from_slice(public);
        }
        PublicKey { bytes }
    }

    /// Signs `bundle`'s manifest: replaces any signature by this key, keeps the others.
    pub fn sign(&self, bundle: &mut Bundle) {
        let public = self.public();
        let signature = self.pair.sign(&signed_bytes(&bundle.manifest_bytes));
        let id = public.id();
        bundle.signatures.signatures.retain(|s| s.keyid != id);
        bundle.signatures.signatures.push(Signature {
            keyid: id,
            algorithm: String::from("ed25519"),
            signature: base64::engine::general_purpose::STANDARD.encode(signature.as_ref()),
        });
    }
}

fn signed_bytes(manifest: &[u8]) -> Vec<u8> {
    let mut m = CONTEXT.to_vec();
    m.extend_from_slice(manifest);
    m
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Checks that a signature by one of `trusted` verifies `bundle`'s manifest: the id of the key
/// that did. Signatures by other keys are ignored; each trusted key's first signature is tried
/// once; when none verifies, the bundle is refused (it was changed after signing).
pub fn check(name: &str, bundle: &Bundle, trusted: &[PublicKey]) -> Result<String, BundleError> {
    if trusted.is_empty() {
        return Err(BundleError::Untrusted(format!(
            "{name}: no trusted public key configured"
        )));
    }
    if bundle.signatures.signatures.is_empty() {
        return Err(BundleError::Untrusted(format!(
            "{name}: unsigned (no signature in signatures.json)"
        )));
    }
    let message = signed_bytes(&bundle.manifest_bytes);
    let mut known = false;
    let mut tried: Vec<&str> = Vec::new();
    for s in &bundle.signatures.signatures {
        let Some(key) = trusted.iter().find(|k| k.id() == s.keyid) else {
            continue;
        };
        if tried.contains(&s.keyid.as_str()) {
            continue;
        }
        tried.push(&s.keyid);
        known = true;
        let sig = base64::engine::general_purpose::STANDARD
            .decode(&s.signature)
            .unwrap_or_default();
        if s.algorithm == "ed25519" && key.verifies(&message, &sig) {
            return Ok(key.id());
        }
    }
    if known {
        Err(BundleError::Untrusted(format!(
            "{name}: manifest.json: the signature by a trusted key does not verify (the manifest was changed after signing)"
        )))
    } else {
        let ids: Vec<&str> = bundle
            .signatures
            .signatures
            .iter()
            .map(|s| s.keyid.as_str())
            .collect();
        Err(BundleError::Untrusted(format!(
            "{name}: signed by {} only, none of them a trusted key",
            ids.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> Bundle {
        Bundle::new(
            vec![(String::from("a.yaml"), String::from("kind: Policy\n"))],
            None,
            Some("r1"),
            chrono::DateTime::from_timestamp(0, 0).unwrap_or_default(),
        )
        .unwrap()
    }

    #[test]
    fn a_signed_bundle_verifies_and_every_change_is_caught() {
        let (key, pem) = SigningKey::generate().unwrap();
        let again = SigningKey::from_pem("k", pem.as_bytes()).unwrap();
        assert_eq!(again.public(), key.public());
        let public = PublicKey::from_pem("p", key.public().to_pem().as_bytes()).unwrap();
        let mut b = bundle();
        key.sign(&mut b);
        let bytes = b.to_archive().unwrap();
        let (read, by) = crate::bundle::verify("b", &bytes, std::slice::from_ref(&public)).unwrap();
        assert_eq!(by, public.id());
        assert_eq!(read.manifest.revision, "r1");

        // Unsigned.
        let e = crate::bundle::verify(
            "b",
            &bundle().to_archive().unwrap(),
            std::slice::from_ref(&public),
        );
        assert!(e.err().is_some_and(|e| e.to_string().contains("unsigned")));
        // Another key.
        let (other, _) = SigningKey::generate().unwrap();
        let e = crate::bundle::verify("b", &bytes, &[other.public()]);
        assert!(e
            .err()
            .is_some_and(|e| e.to_string().contains("none of them a trusted key")));
        // The manifest changed after signing (a re-listed file with its new digest).
        let mut changed = b.clone();
        changed.manifest.created = String::from("2030-01-01T00:00:00Z");
        changed.manifest_bytes = serde_json::to_vec(&changed.manifest).unwrap();
        let e = crate::bundle::verify("b", &changed.to_archive().unwrap(), &[public]);
        assert!(e
            .err()
            .is_some_and(|e| e.to_string().contains("does not verify")));
    }

    #[test]
    fn openssl_keys_are_read() {
        // `openssl genpkey -algorithm ed25519` (PKCS#8 v1) and `openssl pkey -pubout`.
        let private = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEII0Ls/Rc7FD00fFHjdPyspEFyF5mGtRScHvBQebNM+oN\n-----END PRIVATE KEY-----\n";
        let public = b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAwOSeNTrJQgToqEtY1F/sg1uGeh0RFrFtTNwmoOLgcKE=\n-----END PUBLIC KEY-----\n";
        let key = SigningKey::from_pem("k", private).unwrap();
        assert_eq!(key.public(), PublicKey::from_pem("p", public).unwrap());
        assert!(PublicKey::from_pem("p", private).is_err());
        assert!(SigningKey::from_pem("k", public).is_err());
    }
}
