//! The bundle archive: a gzipped tar holding
//!
//! - `manifest.json`: the format, the revision, when it was built, and every other file's path,
//!   size and SHA-256, with a digest over that list (the bundle's content digest);
//! - `signatures.json`: ed25519 signatures over the manifest's exact bytes ([`super::signing`]);
//! - `policies/…`: the policy files (and test suites), as the policy directory held them;
//! - `models.yaml` (optional): the model table (prices, output caps) the policies compile with.
//!
//! Reading is bounded (compressed and unpacked size, entry count, path length) and strict: only
//! regular files, no absolute paths or `..`, no duplicates, UTF-8 text, nothing the manifest does
//! not list and nothing it lists missing.

use std::io::Read as _;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::BundleError;

/// The manifest's `format`.
pub const FORMAT: &str = "llm-policy-bundle/1";
/// The manifest's name in the archive.
pub const MANIFEST: &str = "manifest.json";
/// The signatures' name in the archive.
pub const SIGNATURES: &str = "signatures.json";
/// Where policy files are in the archive.
pub const POLICIES: &str = "policies/";
/// The model table's name in the archive.
pub const MODELS: &str = "models.yaml";
/// Largest archive read (compressed).
pub const MAX_ARCHIVE_BYTES: usize = 32 * 1024 * 1024;
/// Largest total of the files unpacked.
pub const MAX_UNPACKED_BYTES: u64 = 64 * 1024 * 1024;
/// Most entries in an archive.
pub const MAX_ENTRIES: usize = 10_000;
/// Longest path in an archive.
const MAX_PATH: usize = 512;
/// Largest manifest (a list of paths and digests).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// Most signatures a bundle may carry.
pub const MAX_SIGNATURES: usize = 8;

/// What `manifest.json` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The revision's name (letters, digits, `.`, `_`, `-`; at most 64): its object's name in
    /// the store.
    pub revision: String,
    /// When it was built (RFC 3339).
    pub created: String,
    /// SHA-256 over the file list (see [`content_digest`]), hex.
    pub digest: String,
    /// Every file but the manifest and the signatures, sorted by path.
    pub files: Vec<FileEntry>,
}

/// One file of a bundle, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileEntry {
    /// Its path in the archive.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, hex.
    pub sha256: String,
}

/// One signature over the manifest ([`super::signing`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Signature {
    /// The signing key's id ([`super::PublicKey::id`]).
    pub keyid: String,
    /// Always `ed25519`.
    pub algorithm: String,
    /// The signature, base64.
    pub signature: String,
}

/// `signatures.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signatures {
    /// Every signature (a bundle may be signed by several keys).
    pub signatures: Vec<Signature>,
}

/// A bundle in memory: its manifest (parsed, and the exact bytes signatures cover), its
/// signatures and its files.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The manifest.
    pub manifest: Manifest,
    /// The manifest's bytes as stored (what is signed).
    pub manifest_bytes: Vec<u8>,
    /// Its signatures.
    pub signatures: Signatures,
    /// Every listed file, `(path in the archive, text)`, sorted by path.
    pub files: Vec<(String, String)>,
}

/// The content digest: SHA-256 over `path NUL size NUL sha256 LF` of every file, in path order.
pub fn content_digest(files: &[FileEntry]) -> String {
    let mut h = Sha256::new();
    for f in files {
        h.update(f.path.as_bytes());
        h.update([0]);
        h.update(f.size.to_string().as_bytes());
        h.update([0]);
        h.update(f.sha256.as_bytes());
        h.update([b'\n']);
    }
    hex(&h.finalize())
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Whether `r` can name a revision (it becomes an object's name).
pub fn valid_revision(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 64
        && !r.starts_with('.')
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Bundle {
    /// A bundle of `policies` (`(path relative to the policy directory, text)`) and an optional
    /// model table, unsigned. `revision` defaults to the build time and the digest's start
    /// (`20261207T101500Z-3fa9c1d2e4b5`).
    pub fn new(
        policies: Vec<(String, String)>,
        models: Option<String>,
        revision: Option<&str>,
        created: chrono::DateTime<chrono::Utc>,
    ) -> Result<Bundle, BundleError> {
        let mut files: Vec<(String, String)> = policies
            .into_iter()
            .map(|(p, t)| (format!("{POLICIES}{}", p.replace('\\', "/")), t))
            .collect();
        if let Some(m) = models {
            files.push((String::from(MODELS), m));
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        for (p, _) in &files {
            check_path(p).map_err(|m| BundleError::Malformed(format!("{p}: {m}")))?;
        }
        let entries: Vec<FileEntry> = files
            .iter()
            .map(|(p, t)| FileEntry {
                path: p.clone(),
                size: t.len() as u64,
                sha256: sha256_hex(t.as_bytes()),
            })
            .collect();
        let digest = content_digest(&entries);
        let revision = match revision {
            Some(r) if valid_revision(r) => r.to_string(),
            Some(r) => {
                return Err(BundleError::Malformed(format!(
                    "revision `{r}`: use 1 to 64 letters, digits, `.`, `_` or `-`, not starting with `.`"
                )))
            }
            None => format!(
                "{}-{}",
                created.format("%Y%m%dT%H%M%SZ"),
                digest.get(..12).unwrap_or(&digest)
            ),
        };
        let manifest = Manifest {
            format: String::from(FORMAT),
            revision,
            created: created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            digest,
            files: entries,
        };
        let mut manifest_bytes = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| BundleError::Malformed(format!("manifest: {e}")))?;
        manifest_bytes.push(b'\n');
        Ok(Bundle {
            manifest,
            manifest_bytes,
            signatures: Signatures::default(),
            files,
        })
    }

    /// The policy files, relative to the policy directory.
    pub fn policies(&self) -> Vec<(String, String)> {
        self.files
            .iter()
            .filter_map(|(p, t)| Some((p.strip_prefix(POLICIES)?.to_string(), t.clone())))
            .collect()
    }

    /// The policy files, named as in the archive (`policies/…`).
    pub fn policy_files(&self) -> Vec<(String, String)> {
        self.files
            .iter()
            .filter(|(p, _)| p.starts_with(POLICIES))
            .cloned()
            .collect()
    }

    /// The model table's text, if the bundle has one.
    pub fn models(&self) -> Option<&str> {
        self.files
            .iter()
            .find(|(p, _)| p == MODELS)
            .map(|(_, t)| t.as_str())
    }

    /// The archive's bytes: a gzipped tar, entries in a fixed order with fixed metadata, so the
    /// same bundle always gives the same bytes.
    pub fn to_archive(&self) -> Result<Vec<u8>, BundleError> {
        let io =
            |e: std::io::Error| BundleError::Malformed(format!("cannot write the archive: {e}"));
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let signatures = {
            let mut s = serde_json::to_vec_pretty(&self.signatures)
                .map_err(|e| BundleError::Malformed(format!("signatures: {e}")))?;
            s.push(b'\n');
            s
        };
        let mut append = |path: &str, bytes: &[u8]| -> Result<(), BundleError> {
            let mut header = tar::Header::new_ustar();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, path, bytes).map_err(io)
        };
        append(MANIFEST, &self.manifest_bytes)?;
        append(SIGNATURES, &signatures)?;
        for (p, t) in &self.files {
            append(p, t.as_bytes())?;
        }
        let gz = tar.into_inner().map_err(io)?;
        gz.finish().map_err(io)
    }

    /// Reads an archive (`name`: where it came from, for messages) and checks every file
    /// against the manifest. Signatures are read, not checked ([`super::verify`] does).
    pub fn read(name: &str, bytes: &[u8]) -> Result<Bundle, BundleError> {
        let bundle = Bundle::read_unchecked(name, bytes)?;
        bundle.check(name)?;
        Ok(bundle)
    }

    /// Every file against the manifest ([`Bundle::read`] does it; [`super::verify`] does it
    /// after the signature, so an unsigned archive costs no more than reading it).
    pub fn check(&self, name: &str) -> Result<(), BundleError> {
        check_files(name, &self.manifest, &self.files)
    }

    /// Reads an archive's entries, manifest and signatures without checking the files against
    /// the manifest.
    pub fn read_unchecked(name: &str, bytes: &[u8]) -> Result<Bundle, BundleError> {
        let malformed = |m: String| BundleError::Malformed(format!("{name}: {m}"));
        if bytes.len() > MAX_ARCHIVE_BYTES {
            return Err(malformed(format!(
                "{} bytes: larger than {MAX_ARCHIVE_BYTES}",
                bytes.len()
            )));
        }
        let gz = flate2::read::GzDecoder::new(bytes);
        // The whole stream is bounded too (headers, long names and padding besides the files'
        // bytes), above what the per-file count below allows, so that count says what was wrong.
        let stream_limit =
            MAX_UNPACKED_BYTES.saturating_add((MAX_ENTRIES as u64).saturating_mul(2048));
        let mut archive = tar::Archive::new(gz.take(stream_limit));
        let entries = archive
            .entries()
            .map_err(|e| malformed(format!("not a gzipped tar: {e}")))?;
        let mut manifest_bytes = None;
        let mut signatures_bytes = None;
        let mut files: Vec<(String, String)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut total: u64 = 0;
        for (count, entry) in entries.enumerate() {
            if count >= MAX_ENTRIES {
                return Err(malformed(format!("more than {MAX_ENTRIES} entries")));
            }
            let mut entry = entry.map_err(|e| malformed(format!("not a gzipped tar: {e}")))?;
            let path = entry.path_bytes().into_owned();
            let path = String::from_utf8(path)
                .map_err(|_| malformed(String::from("a path that is not UTF-8")))?;
            let path = path.strip_prefix("./").unwrap_or(&path).to_string();
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {}
                tar::EntryType::Directory => continue,
                other => {
                    return Err(malformed(format!(
                        "{path}: a {other:?} entry (only regular files are allowed)"
                    )))
                }
            }
            check_path(&path).map_err(|m| malformed(format!("{path}: {m}")))?;
            let size = entry.size();
            total = total.saturating_add(size);
            if total > MAX_UNPACKED_BYTES {
                return Err(malformed(format!(
                    "more than {MAX_UNPACKED_BYTES} bytes unpacked"
                )));
            }
            let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(1 << 20));
            entry
                .read_to_end(&mut data)
                .map_err(|e| malformed(format!("{path}: {e}")))?;
            let text = String::from_utf8(data)
                .map_err(|_| malformed(format!("{path}: not UTF-8 text")))?;
            if (path == MANIFEST || path == SIGNATURES) && text.len() > MAX_MANIFEST_BYTES {
                return Err(malformed(format!(
                    "{path}: larger than {MAX_MANIFEST_BYTES} bytes"
                )));
            }
            let duplicate = |p: &str| malformed(format!("{p}: more than once in the archive"));
            if path == MANIFEST {
                if manifest_bytes.replace(text.into_bytes()).is_some() {
                    return Err(duplicate(&path));
                }
            } else if path == SIGNATURES {
                if signatures_bytes.replace(text.into_bytes()).is_some() {
                    return Err(duplicate(&path));
                }
            } else {
                if !seen.insert(path.clone()) {
                    return Err(duplicate(&path));
                }
                files.push((path, text));
            }
        }
        let manifest_bytes =
            manifest_bytes.ok_or_else(|| malformed(format!("no {MANIFEST}: not a bundle")))?;
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| malformed(format!("{MANIFEST}: {e}")))?;
        if manifest.format != FORMAT {
            return Err(malformed(format!(
                "{MANIFEST}: format `{}` (this version reads `{FORMAT}`)",
                manifest.format
            )));
        }
        if !valid_revision(&manifest.revision) {
            return Err(malformed(format!(
                "{MANIFEST}: revision `{}` is not a valid name",
                manifest.revision
            )));
        }
        if manifest.files.len() > MAX_ENTRIES
            || manifest.files.windows(2).any(|w| match w {
                [a, b] => a.path >= b.path,
                _ => false,
            })
        {
            return Err(malformed(format!(
                "{MANIFEST}: its files are not listed once each, in path order (at most {MAX_ENTRIES})"
            )));
        }
        let signatures: Signatures = match signatures_bytes {
            Some(b) => {
                serde_json::from_slice(&b).map_err(|e| malformed(format!("{SIGNATURES}: {e}")))?
            }
            None => Signatures::default(),
        };
        if signatures.signatures.len() > MAX_SIGNATURES {
            return Err(malformed(format!(
                "{SIGNATURES}: more than {MAX_SIGNATURES} signatures"
            )));
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Bundle {
            manifest,
            manifest_bytes,
            signatures,
            files,
        })
    }
}

/// Every file against the manifest: listed, same size and digest; every listed file present;
/// the manifest's digest over its list.
fn check_files(
    name: &str,
    manifest: &Manifest,
    files: &[(String, String)],
) -> Result<(), BundleError> {
    let tampered = |m: String| BundleError::Tampered(format!("{name}: {m}"));
    // The manifest is sorted and unique (checked when read): found by binary search.
    let listed = |path: &str| {
        manifest
            .files
            .binary_search_by(|f| f.path.as_str().cmp(path))
            .ok()
            .and_then(|i| manifest.files.get(i))
    };
    for (path, text) in files {
        let Some(entry) = listed(path) else {
            return Err(tampered(format!("{path}: not listed in the manifest")));
        };
        if entry.size != text.len() as u64 || entry.sha256 != sha256_hex(text.as_bytes()) {
            return Err(tampered(format!(
                "{path}: its content differs from the manifest's digest"
            )));
        }
    }
    for entry in &manifest.files {
        if files
            .binary_search_by(|(p, _)| p.as_str().cmp(entry.path.as_str()))
            .is_err()
        {
            return Err(tampered(format!(
                "{}: listed in the manifest, missing from the archive",
                entry.path
            )));
        }
    }
    if content_digest(&manifest.files) != manifest.digest {
        return Err(tampered(format!(
            "{MANIFEST}: its digest does not match its file list"
        )));
    }
    Ok(())
}

/// A path the archive may hold: relative, no `.`/`..` parts, no backslashes or control
/// characters, a policy file under `policies/` or the model table.
fn check_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() || path.len() > MAX_PATH {
        return Err("an empty or overlong path");
    }
    if path.starts_with('/') || path.contains('\\') || path.chars().any(char::is_control) {
        return Err("an absolute path, a backslash or a control character");
    }
    if path
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err("a path with an empty, `.` or `..` part");
    }
    if path == MANIFEST || path == SIGNATURES || path == MODELS {
        return Ok(());
    }
    if !path.starts_with(POLICIES) {
        return Err("not under policies/ (a bundle holds policies/…, models.yaml, the manifest and the signatures)");
    }
    Ok(())
}

/// Reads a policy directory (or file) as a bundle's policy files: the loader's files (hidden
/// entries skipped, links followed once), named relative to the directory.
pub fn read_policy_dir(path: &Path) -> Result<Vec<(String, String)>, llm_policy_core::Diagnostics> {
    use llm_policy_core::{source, Diagnostics};
    let root = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for f in source::policy_files(path).map_err(|d| Diagnostics(vec![d]))? {
        match source::read_file(&f) {
            Ok(text) => {
                let rel = f.strip_prefix(&root).unwrap_or(&f);
                let rel: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                files.push((rel.join("/"), text));
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(Diagnostics(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
    }

    fn sample() -> Bundle {
        Bundle::new(
            vec![(String::from("a.yaml"), String::from("kind: Policy\n"))],
            Some(String::from("models: {}\n")),
            None,
            now(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn an_archive_reads_back_as_written_and_is_reproducible() {
        let b = sample();
        let bytes = b.to_archive().unwrap_or_default();
        assert_eq!(bytes, b.to_archive().unwrap_or_default());
        let back = Bundle::read("x", &bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.manifest, b.manifest);
        assert_eq!(back.files, b.files);
        assert_eq!(
            back.policies(),
            vec![(String::from("a.yaml"), String::from("kind: Policy\n"))]
        );
        assert_eq!(back.models(), Some("models: {}\n"));
        assert!(b.manifest.revision.starts_with("20270115T080000Z-"));
    }

    /// An archive written entry by entry, to say what a hostile one holds.
    fn raw(entries: &[(&str, &[u8], tar::EntryType)]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut t = tar::Builder::new(gz);
        for (p, data, kind) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            // Written into the header directly: `append_data` refuses `..` itself.
            let name = &mut h.as_old_mut().name;
            let n = p.len().min(name.len());
            if let (Some(dst), Some(src)) = (name.get_mut(..n), p.as_bytes().get(..n)) {
                dst.copy_from_slice(src);
            }
            h.set_cksum();
            let _ = t.append(&h, *data);
        }
        t.into_inner()
            .ok()
            .and_then(|g| g.finish().ok())
            .unwrap_or_default()
    }

    #[test]
    fn hostile_archives_are_refused_with_the_file_named() {
        let b = sample();
        let manifest = b.manifest_bytes.as_slice();
        let file = b"kind: Policy\n".as_slice();
        let models = b"models: {}\n".as_slice();
        let reg = tar::EntryType::Regular;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"not gzip".to_vec(), "not a gzipped tar"),
            (raw(&[("policies/a.yaml", file, reg)]), "no manifest.json"),
            (
                raw(&[
                    (MANIFEST, manifest, reg),
                    ("policies/a.yaml", b"kind: Policy\nx: 1\n", reg),
                    (MODELS, models, reg),
                ]),
                "policies/a.yaml: its content differs",
            ),
            (
                raw(&[(MANIFEST, manifest, reg), ("policies/a.yaml", file, reg)]),
                "models.yaml: listed in the manifest, missing",
            ),
            (
                raw(&[
                    (MANIFEST, manifest, reg),
                    ("policies/a.yaml", file, reg),
                    (MODELS, models, reg),
                    ("policies/b.yaml", file, reg),
                ]),
                "policies/b.yaml: not listed",
            ),
            (
                raw(&[
                    (MANIFEST, manifest, reg),
                    ("policies/../../etc/x", file, reg),
                ]),
                "`..` part",
            ),
            (
                raw(&[(MANIFEST, manifest, reg), ("/etc/passwd", file, reg)]),
                "an absolute path",
            ),
            (
                raw(&[
                    (MANIFEST, manifest, reg),
                    ("policies/l.yaml", b"", tar::EntryType::Symlink),
                ]),
                "only regular files",
            ),
            (
                raw(&[
                    (MANIFEST, manifest, reg),
                    ("policies/a.yaml", file, reg),
                    ("policies/a.yaml", file, reg),
                ]),
                "more than once",
            ),
            (
                raw(&[
                    (MANIFEST, manifest, reg),
                    ("policies/a.yaml", &[0xff, 0xfe], reg),
                ]),
                "not UTF-8",
            ),
            (
                raw(&[(MANIFEST, manifest, reg), ("elsewhere.yaml", file, reg)]),
                "not under policies/",
            ),
        ];
        for (bytes, want) in cases {
            match Bundle::read("bundle.tar.gz", &bytes) {
                Ok(_) => panic!("accepted: {want}"),
                Err(e) => {
                    let m = e.to_string();
                    assert!(m.starts_with("bundle.tar.gz: "), "{m}");
                    assert!(m.contains(want), "want {want:?} in {m:?}");
                }
            }
        }
    }

    #[test]
    fn a_manifest_whose_list_was_edited_is_refused() {
        let mut b = sample();
        b.manifest.files.retain(|f| f.path != MODELS);
        b.files.retain(|(p, _)| p != MODELS);
        b.manifest_bytes = serde_json::to_vec(&b.manifest).unwrap_or_default();
        let bytes = b.to_archive().unwrap_or_default();
        let e = Bundle::read("b", &bytes).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("digest does not match its file list")));
    }

    #[test]
    fn a_manifest_listing_a_file_twice_or_out_of_order_or_too_many_signatures_is_refused() {
        let mut b = sample();
        let first = b.manifest.files[0].clone();
        b.manifest.files.push(first);
        b.manifest_bytes = serde_json::to_vec(&b.manifest).unwrap_or_default();
        let e = Bundle::read("b", &b.to_archive().unwrap_or_default())
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("listed once each, in path order")));
        let mut b = sample();
        for i in 0..=MAX_SIGNATURES {
            b.signatures.signatures.push(Signature {
                keyid: format!("{i}"),
                algorithm: String::from("ed25519"),
                signature: String::new(),
            });
        }
        let e = Bundle::read("b", &b.to_archive().unwrap_or_default())
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("more than 8 signatures")));
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_limit() {
        let zeros = vec![b'a'; 1024 * 1024];
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let mut t = tar::Builder::new(gz);
        for i in 0..70 {
            let mut h = tar::Header::new_ustar();
            h.set_size(zeros.len() as u64);
            h.set_mode(0o644);
            let _ = t.append_data(&mut h, format!("policies/{i}.yaml"), zeros.as_slice());
        }
        let bytes = t
            .into_inner()
            .ok()
            .and_then(|g| g.finish().ok())
            .unwrap_or_default();
        assert!(bytes.len() < MAX_ARCHIVE_BYTES);
        let e = Bundle::read("b", &bytes).err().map(|e| e.to_string());
        assert!(
            e.is_some_and(|e| e.contains("bytes unpacked")),
            "limit not hit"
        );
    }

    #[test]
    fn revisions_are_object_names() {
        assert!(valid_revision("2026-12-07.1"));
        for bad in ["", "../x", "a/b", ".hidden", "a b", &"x".repeat(65)] {
            assert!(!valid_revision(bad), "{bad}");
        }
        assert!(Bundle::new(vec![], None, Some("a/b"), now()).is_err());
    }
}
