//! Who a request is: the identity modes a deployment runs in, and virtual API keys.
//!
//! In every mode but [`IdentityMode::TrustedHeaders`], Envoy removes the client's copies of the
//! namespace, principal and shield headers before the filter or the server reads a request
//! (`llm-policy envoy-config` generates that). What takes their place:
//!
//! - [`IdentityMode::Jwt`]: Envoy's `jwt_authn` verifies the token and writes the configured
//!   claims into the principal headers itself (`ContextConfig::principal_claims`);
//! - [`IdentityMode::ApiKeys`]: the client presents a virtual key where the provider's SDK puts a
//!   key; [`KeyTable::authenticate`] finds its record by the key's SHA-256 (the key itself is never
//!   stored), and [`KeyRecord::assert`] writes the record's attributes and namespace into the
//!   headers the context is read from. The filter and the server both call these, so a key means
//!   the same in both;
//! - [`IdentityMode::Anonymous`] (the default): nothing takes their place; every request is
//!   anonymous in the default namespace.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::context::ContextConfig;
use crate::diagnostic::{Code, Diagnostic, Diagnostics};
use crate::document::Document;

/// Reads a key table file (YAML or JSON, `{keys: [...]}`); errors name the file, line and column.
#[cfg(feature = "std")]
pub fn load_keys(path: &std::path::Path) -> Result<KeyTable, Diagnostics> {
    let docs = crate::source::load_file(path).map_err(|d| Diagnostics(alloc::vec![d]))?;
    match docs.as_slice() {
        [doc] => KeyTable::from_document(doc),
        [] => Ok(KeyTable::default()),
        _ => Err(Diagnostics(alloc::vec![Diagnostic::error(
            Code::InvalidApiKey,
            "a key file holds one document, `{keys: [...]}`",
        )
        .at(&path.display().to_string(), None)])),
    }
}

/// How a deployment establishes who a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityMode {
    /// No identity: client identity headers are removed, every request is anonymous.
    #[default]
    #[serde(rename = "none")]
    Anonymous,
    /// The identity headers are set by an authenticating gateway in front (trusted as sent).
    TrustedHeaders,
    /// A JWT verified by Envoy's `jwt_authn`; claims become principal attributes.
    Jwt,
    /// Virtual API keys looked up in a key table.
    ApiKeys,
}

impl IdentityMode {
    /// How an audit record says the principal was established: `none`, `trusted-header`,
    /// `jwt` or `api-key`.
    pub fn via(self) -> &'static str {
        match self {
            IdentityMode::Anonymous => "none",
            IdentityMode::TrustedHeaders => "trusted-header",
            IdentityMode::Jwt => "jwt",
            IdentityMode::ApiKeys => "api-key",
        }
    }

    /// The mode a [`IdentityMode::via`] string names (also the configuration's spellings:
    /// `trusted-headers`, `api-keys`).
    pub fn from_via(via: &str) -> Option<IdentityMode> {
        match via {
            "trusted-headers" => return Some(IdentityMode::TrustedHeaders),
            "api-keys" => return Some(IdentityMode::ApiKeys),
            _ => {}
        }
        [
            IdentityMode::Anonymous,
            IdentityMode::TrustedHeaders,
            IdentityMode::Jwt,
            IdentityMode::ApiKeys,
        ]
        .into_iter()
        .find(|m| m.via() == via)
    }
}

/// What every virtual key starts with (so secret scanners and people can tell one).
pub const KEY_PREFIX: &str = "lpk_";

/// The principal attribute a key's id stands in for when its record names none.
pub const PRINCIPAL_ID: &str = "id";

/// The header an Anthropic SDK sends its key in (OpenAI's SDK uses `Authorization: Bearer`).
pub const API_KEY_HEADER: &str = "x-api-key";

/// One virtual API key: what it stands for, never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KeyRecord {
    /// The key's public name (listed, revoked and audited by it).
    pub id: String,
    /// SHA-256 of the key, 64 lower-case hex digits.
    pub hash: String,
    /// Principal attributes (`id`, `tier`, `team`, …) the key's requests carry.
    #[serde(default)]
    pub principal: BTreeMap<String, String>,
    /// The policy namespace of the key's requests (default: the default namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// When the key stops working, seconds since the Unix epoch (none: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<i64>,
    /// A revoked key is refused; the record stays so the refusal says why.
    #[serde(default)]
    pub revoked: bool,
    /// When the key was created, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<i64>,
}

impl KeyRecord {
    /// Writes this key's identity into `headers`: every header the context reads the namespace
    /// or a principal attribute from is removed, then the record's values are set in them (the
    /// key's id as `principal.id` when the record has none). Attributes the context
    /// configuration does not name are left out.
    pub fn assert(&self, config: &ContextConfig, headers: &mut Vec<(String, String)>) {
        let owned = |name: &str| {
            name.eq_ignore_ascii_case(&config.namespace_header)
                || config
                    .principal_headers
                    .values()
                    .any(|h| h.eq_ignore_ascii_case(name))
        };
        headers.retain(|(name, _)| !owned(name));
        for (attribute, value) in &self.principal {
            if let Some(header) = config.principal_headers.get(attribute) {
                headers.push((header.to_ascii_lowercase(), value.clone()));
            }
        }
        // A key always names someone: without an `id` attribute its own id is the principal's,
        // so per-principal limits and budgets apply to it.
        if !self.principal.contains_key(PRINCIPAL_ID) {
            if let Some(header) = config.principal_headers.get(PRINCIPAL_ID) {
                headers.push((header.to_ascii_lowercase(), self.id.clone()));
            }
        }
        if let Some(ns) = &self.namespace {
            headers.push((config.namespace_header.to_ascii_lowercase(), ns.clone()));
        }
    }

    /// Why this key cannot be used at `now` (seconds since the Unix epoch), if it cannot.
    pub fn refusal(&self, now: i64) -> Option<KeyError> {
        if self.revoked {
            return Some(KeyError::Revoked);
        }
        match self.expires {
            Some(at) if now >= at => Some(KeyError::Expired),
            _ => None,
        }
    }
}

/// Why a request's key was refused (the 401's message; never the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// No `Authorization: Bearer` and no `x-api-key` header.
    #[error("no API key: send it as `Authorization: Bearer <key>` or `x-api-key: <key>`")]
    Missing,
    /// Both headers, with different keys (or one header sent twice).
    #[error("more than one API key was sent")]
    Ambiguous,
    /// No key with this hash.
    #[error("the API key is not valid")]
    Unknown,
    /// The key was revoked.
    #[error("the API key has been revoked")]
    Revoked,
    /// The key's expiry has passed.
    #[error("the API key has expired")]
    Expired,
}

impl KeyError {
    /// The error code in the reply body (OpenAI's `code`).
    pub fn code(self) -> &'static str {
        match self {
            KeyError::Missing => "missing_api_key",
            KeyError::Ambiguous | KeyError::Unknown => "invalid_api_key",
            KeyError::Revoked => "revoked_api_key",
            KeyError::Expired => "expired_api_key",
        }
    }
}

/// SHA-256 of a key, as 64 lower-case hex digits (what a [`KeyRecord`] stores).
pub fn hash_key(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        for nibble in [b >> 4, b & 0x0f] {
            // A nibble is always a hex digit (lower-case from `from_digit`).
            out.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
        }
    }
    out
}

/// The key a request presents: `x-api-key`, or the credentials of `Authorization: Bearer`.
/// Both with different values, or either sent twice with different values, is ambiguous.
pub fn presented_key(headers: &[(String, String)]) -> Result<&str, KeyError> {
    let mut found: Option<&str> = None;
    for (name, value) in headers {
        let key = if name.eq_ignore_ascii_case(API_KEY_HEADER) {
            value.trim()
        } else if name.eq_ignore_ascii_case("authorization") {
            match value.trim().split_once(' ') {
                Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
                _ => continue,
            }
        } else {
            continue;
        };
        if key.is_empty() {
            continue;
        }
        match found {
            Some(k) if k != key => return Err(KeyError::Ambiguous),
            _ => found = Some(key),
        }
    }
    found.ok_or(KeyError::Missing)
}

/// The on-disk form of a key table (`--keys-file`, `llm-policy keys`): `{keys: [...]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    /// The records.
    #[serde(default)]
    pub keys: Vec<KeyRecord>,
}

/// Why records do not make a [`KeyTable`]: each bad record's index and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTableErrors(pub Vec<(usize, String)>);

impl core::fmt::Display for KeyTableErrors {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (n, (_, message)) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str("; ")?;
            }
            f.write_str(message)?;
        }
        Ok(())
    }
}

impl KeyTableErrors {
    /// The errors located in `doc`, whose records are the array at JSON pointer `records`.
    pub fn located(self, doc: &Document, records: &str) -> Diagnostics {
        Diagnostics(
            self.0
                .into_iter()
                .map(|(i, message)| {
                    Diagnostic::error(Code::InvalidApiKey, message)
                        .at(&doc.file, doc.position(&format!("{records}/{i}")))
                })
                .collect(),
        )
    }
}

/// The virtual keys a proxy accepts, by hash.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyTable {
    by_hash: BTreeMap<String, KeyRecord>,
}

impl KeyTable {
    /// A table of `records`. Errors (the record's index and a message, one per bad record): a
    /// hash that is not 64 lower-case hex digits, an empty or repeated id, a repeated hash.
    pub fn new(records: Vec<KeyRecord>) -> Result<KeyTable, KeyTableErrors> {
        let mut errors = Vec::new();
        let mut by_hash = BTreeMap::new();
        let mut ids = BTreeMap::new();
        for (i, r) in records.into_iter().enumerate() {
            if r.id.is_empty() {
                errors.push((i, String::from("the id is empty")));
                continue;
            }
            if r.hash.len() != 64
                || !r
                    .hash
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            {
                errors.push((
                    i,
                    format!(
                        "key `{}`: `hash` must be the key's SHA-256 as 64 lower-case hex digits",
                        r.id
                    ),
                ));
                continue;
            }
            if ids.insert(r.id.clone(), ()).is_some() {
                errors.push((i, format!("the id `{}` is used twice", r.id)));
                continue;
            }
            if by_hash.contains_key(&r.hash) {
                errors.push((
                    i,
                    format!("key `{}` is the same key as an earlier record", r.id),
                ));
                continue;
            }
            by_hash.insert(r.hash.clone(), r);
        }
        if errors.is_empty() {
            Ok(KeyTable { by_hash })
        } else {
            Err(KeyTableErrors(errors))
        }
    }

    /// The table a document (`{keys: [...]}`) holds; errors are located in it.
    pub fn from_document(doc: &Document) -> Result<KeyTable, Diagnostics> {
        let file: KeysFile = doc.parse().map_err(|d| Diagnostics(alloc::vec![d]))?;
        KeyTable::new(file.keys).map_err(|e| e.located(doc, "/keys"))
    }

    /// The record of the key `headers` present, if it may be used at `now` (seconds since the
    /// Unix epoch).
    pub fn authenticate(
        &self,
        headers: &[(String, String)],
        now: i64,
    ) -> Result<&KeyRecord, KeyError> {
        let key = presented_key(headers)?;
        let record = self.by_hash.get(&hash_key(key)).ok_or(KeyError::Unknown)?;
        match record.refusal(now) {
            Some(e) => Err(e),
            None => Ok(record),
        }
    }

    /// The records, ordered by hash.
    pub fn records(&self) -> impl Iterator<Item = &KeyRecord> {
        self.by_hash.values()
    }

    /// How many records the table holds.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn record(id: &str, key: &str) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            hash: hash_key(key),
            principal: [("id", "alice"), ("tier", "pro"), ("unknown", "x")]
                .iter()
                .map(|(a, v)| (a.to_string(), v.to_string()))
                .collect(),
            namespace: Some("research".into()),
            expires: None,
            revoked: false,
            created: None,
        }
    }

    #[test]
    fn hashes_are_sha256_hex() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_presented_key_comes_from_either_header_never_two() {
        assert_eq!(
            presented_key(&h(&[("Authorization", "Bearer k1")])),
            Ok("k1")
        );
        assert_eq!(
            presented_key(&h(&[("authorization", "bearer  k1 ")])),
            Ok("k1")
        );
        assert_eq!(presented_key(&h(&[("X-Api-Key", "k2")])), Ok("k2"));
        assert_eq!(
            presented_key(&h(&[("x-api-key", "k2"), ("authorization", "Bearer k2")])),
            Ok("k2")
        );
        assert_eq!(
            presented_key(&h(&[("x-api-key", "k2"), ("authorization", "Bearer k3")])),
            Err(KeyError::Ambiguous)
        );
        assert_eq!(
            presented_key(&h(&[("x-api-key", "k2"), ("x-api-key", "k3")])),
            Err(KeyError::Ambiguous)
        );
        assert_eq!(
            presented_key(&h(&[("authorization", "Basic a2V5")])),
            Err(KeyError::Missing)
        );
        assert_eq!(
            presented_key(&h(&[("x-api-key", " ")])),
            Err(KeyError::Missing)
        );
        assert_eq!(presented_key(&h(&[])), Err(KeyError::Missing));
    }

    #[test]
    fn keys_are_found_by_hash_and_refused_when_revoked_or_expired() {
        let mut revoked = record("r", "lpk_r");
        revoked.revoked = true;
        let mut expired = record("e", "lpk_e");
        expired.expires = Some(100);
        let table = KeyTable::new(vec![record("a", "lpk_a"), revoked, expired]).unwrap();
        let auth = |k: &str, now| {
            table
                .authenticate(&h(&[("authorization", &format!("Bearer {k}"))]), now)
                .map(|r| r.id.clone())
        };
        assert_eq!(auth("lpk_a", 0), Ok("a".into()));
        assert_eq!(auth("lpk_A", 0), Err(KeyError::Unknown));
        assert_eq!(auth("lpk_r", 0), Err(KeyError::Revoked));
        assert_eq!(auth("lpk_e", 99), Ok("e".into()));
        assert_eq!(auth("lpk_e", 100), Err(KeyError::Expired));
    }

    #[test]
    fn bad_tables_are_refused_with_every_reason() {
        let mut bad_hash = record("b", "x");
        bad_hash.hash = bad_hash.hash.to_ascii_uppercase();
        let errors = KeyTable::new(vec![
            record("a", "k"),
            record("a", "k2"),
            record("c", "k"),
            bad_hash,
            record("", "k3"),
        ])
        .unwrap_err();
        let at: Vec<usize> = errors.0.iter().map(|(i, _)| *i).collect();
        assert_eq!(at, [1, 2, 3, 4], "{errors:?}");
        assert!(errors.0[0].1.contains("used twice"));
        assert!(errors.0[1].1.contains("same key"));
        assert!(errors.0[2].1.contains("64 lower-case hex"));
        assert!(errors.0[3].1.contains("empty"));
        assert_eq!(errors.to_string().matches("; ").count(), 3);
    }

    #[test]
    fn asserting_a_key_replaces_every_identity_header() {
        let config = ContextConfig::default();
        let mut headers = h(&[
            ("X-User-Id", "mallory"),
            ("x-user-tier", "enterprise"),
            ("X-LLM-Policy-Namespace", "open"),
            ("content-type", "application/json"),
        ]);
        record("a", "k").assert(&config, &mut headers);
        assert_eq!(
            headers,
            h(&[
                ("content-type", "application/json"),
                ("x-user-id", "alice"),
                ("x-user-tier", "pro"),
                ("x-llm-policy-namespace", "research"),
            ])
        );
    }

    #[test]
    fn a_key_without_a_principal_id_is_its_own_principal() {
        let mut r = record("laptop-7", "k");
        r.principal.remove("id");
        let mut headers = h(&[("x-user-id", "mallory")]);
        r.assert(&ContextConfig::default(), &mut headers);
        assert!(headers.contains(&("x-user-id".to_string(), "laptop-7".to_string())));
        assert!(!headers.iter().any(|(_, v)| v == "mallory"));
    }

    #[test]
    fn modes_round_trip_their_audit_names() {
        for m in [
            IdentityMode::Anonymous,
            IdentityMode::TrustedHeaders,
            IdentityMode::Jwt,
            IdentityMode::ApiKeys,
        ] {
            assert_eq!(IdentityMode::from_via(m.via()), Some(m));
        }
        assert_eq!(
            serde_json::to_string(&IdentityMode::ApiKeys).unwrap(),
            "\"api-keys\""
        );
        assert_eq!(
            serde_json::from_str::<IdentityMode>("\"none\"").unwrap(),
            IdentityMode::Anonymous
        );
    }
}
