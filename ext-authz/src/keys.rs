//! Virtual API keys as the CLI (`llm-policy keys`) and the server (`/v1/keys`) make and keep
//! them: a new key's secret and record, and the key file. Looking a key up is the core's
//! ([`llm_policy_core::identity`]), so the filter and the server agree.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

use llm_policy_core::identity::{hash_key, KeyRecord, KeysFile, KEY_PREFIX};
use serde::Deserialize;

/// What a new key stands for (`llm-policy keys create`, `POST /v1/keys`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NewKey {
    /// The key's public name (default: `key-` and 8 random hex digits).
    #[serde(default)]
    pub id: Option<String>,
    /// Principal attributes (`id`, `tier`, `team`, …).
    #[serde(default)]
    pub principal: BTreeMap<String, String>,
    /// The policy namespace of the key's requests.
    #[serde(default)]
    pub namespace: Option<String>,
    /// When the key stops working, seconds since the Unix epoch.
    #[serde(default)]
    pub expires: Option<i64>,
}

/// Why a key could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NewKeyError {
    /// A field is unusable (the message names it).
    #[error("{0}")]
    Invalid(String),
    /// The system's random source failed.
    #[error("no random bytes for a key: {0}")]
    Random(String),
}

/// Longest id, attribute name or value a key record holds.
const MAX_FIELD: usize = 256;

fn printable(what: &str, text: &str) -> Result<(), NewKeyError> {
    if text.is_empty() || text.len() > MAX_FIELD || text.chars().any(char::is_control) {
        return Err(NewKeyError::Invalid(format!(
            "{what} must be 1 to {MAX_FIELD} bytes without control characters"
        )));
    }
    Ok(())
}

fn random_hex(bytes: usize) -> Result<String, NewKeyError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| NewKeyError::Random(e.to_string()))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// A new key: its secret (shown once, never stored) and its record (which holds only the
/// secret's SHA-256). `now`: seconds since the Unix epoch.
pub fn create(spec: &NewKey, now: i64) -> Result<(KeyRecord, String), NewKeyError> {
    let id = match &spec.id {
        Some(id) => id.clone(),
        None => format!("key-{}", random_hex(4)?),
    };
    printable("the key id", &id)?;
    for (attribute, value) in &spec.principal {
        printable("a principal attribute name", attribute)?;
        printable(&format!("principal.{attribute}"), value)?;
    }
    if let Some(ns) = &spec.namespace {
        printable("the namespace", ns)?;
    }
    if spec.expires.is_some_and(|at| at <= now) {
        return Err(NewKeyError::Invalid(String::from(
            "the expiry is in the past",
        )));
    }
    // 192 random bits: guessing is out of reach, and the hash needs no salt.
    let secret = format!("{KEY_PREFIX}{}", random_hex(24)?);
    let record = KeyRecord {
        id,
        hash: hash_key(&secret),
        principal: spec.principal.clone(),
        namespace: spec.namespace.clone(),
        expires: spec.expires,
        revoked: false,
        created: Some(now),
    };
    Ok((record, secret))
}

/// Writes a key file atomically (a temporary file renamed over it), readable by its owner only.
pub fn write_file(path: &Path, records: &[KeyRecord]) -> std::io::Result<()> {
    let file = KeysFile {
        keys: records.to_vec(),
    };
    let text = serde_json::to_string_pretty(&file).map_err(std::io::Error::other)?;
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".tmp-{}", std::process::id()));
    let tmp = std::path::PathBuf::from(name);
    let written = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_policy_core::identity::KeyTable;

    #[test]
    fn a_new_key_is_found_by_its_secret_and_only_its_hash_is_kept() {
        let spec = NewKey {
            id: Some("alice".into()),
            principal: [("tier".to_string(), "pro".to_string())].into(),
            ..NewKey::default()
        };
        let (record, secret) = create(&spec, 100).unwrap();
        assert!(secret.starts_with(KEY_PREFIX) && secret.len() == KEY_PREFIX.len() + 48);
        let text = serde_json::to_string(&record).unwrap();
        assert!(!text.contains(&secret[KEY_PREFIX.len()..]));
        let table = KeyTable::new(vec![record]).unwrap();
        let headers = vec![("x-api-key".to_string(), secret)];
        assert_eq!(table.authenticate(&headers, 101).unwrap().id, "alice");
    }

    #[test]
    fn bad_specs_are_refused() {
        let past = NewKey {
            expires: Some(5),
            ..NewKey::default()
        };
        assert!(create(&past, 10).is_err());
        let control = NewKey {
            id: Some("a\nb".into()),
            ..NewKey::default()
        };
        assert!(create(&control, 10).is_err());
    }

    #[test]
    fn the_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let (record, _) = create(&NewKey::default(), 1).unwrap();
        write_file(&path, std::slice::from_ref(&record)).unwrap();
        let table = llm_policy_core::identity::load_keys(&path).unwrap();
        assert_eq!(table.records().cloned().collect::<Vec<_>>(), vec![record]);
    }
}
