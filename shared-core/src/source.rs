//! Loading policy files (`std`): YAML or JSON, one or several documents per file, a file or a
//! directory, with the line and column of every node kept for error messages.
//!
//! Every input is bounded: files over [`MAX_FILE_BYTES`] (what is read, not what the file
//! system says), documents nested deeper than [`MAX_DOCUMENT_DEPTH`], YAML aliases that would add
//! more than [`MAX_ALIAS_BYTES`] (or four times the file), more than [`MAX_DOCUMENTS`] documents
//! in a file, and location tables out of proportion to the file (long keys at depth) are located
//! errors, found while reading, before memory grows with them. Only regular files are read. Directory walks follow symbolic links once, skip hidden entries (Kubernetes
//! ConfigMap mounts keep the real files in `..data/` and `..<timestamp>/`, and link each file
//! from the top) and never visit a directory twice, so no layout can make the loader loop.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::diagnostic::{Code, Diagnostic, Diagnostics};
use crate::document::Document;
use crate::model::KIND_POLICY_TEST;

mod json;
mod yaml;

/// Largest policy file read, in bytes.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Deepest nesting of maps and lists in a document.
pub const MAX_DOCUMENT_DEPTH: usize = 64;
/// Most data YAML aliases may add to a file (all its documents together), in bytes of strings
/// plus one per node (also at most four times the file, with a floor of 64 KiB).
pub const MAX_ALIAS_BYTES: usize = 16 * 1024 * 1024;
/// Most documents in one file.
pub const MAX_DOCUMENTS: usize = 10_000;
/// Most directory entries one walk looks at.
pub const MAX_DIRECTORY_ENTRIES: usize = 100_000;

/// The budget for a file's location table: 16 times its size, at least 1 MiB.
pub(crate) fn span_budget(text_len: usize) -> usize {
    text_len.saturating_mul(16).max(1024 * 1024)
}

/// The budget for what aliases may add to a document of a file of `text_len` bytes.
pub(crate) fn alias_budget(text_len: usize) -> usize {
    MAX_ALIAS_BYTES.min(text_len.saturating_mul(4).max(64 * 1024))
}
/// Deepest directory below a policy directory that is searched.
pub const MAX_DIRECTORY_DEPTH: usize = 16;

/// Parses the text of one file into its documents. `.json` files (and text that parses as one
/// JSON value) are read as JSON; everything else as YAML 1.2, multi-document. Both keep
/// locations.
pub fn parse_str(file: &str, text: &str) -> Result<Vec<Document>, Diagnostic> {
    let looks_json = text.trim_start().starts_with(['{', '[']);
    if file.ends_with(".json") {
        return json::parse(file, text).map(|d| vec![d]);
    }
    if looks_json {
        // A YAML flow mapping also starts with `{`: fall back to YAML when it is not JSON.
        if let Ok(doc) = json::parse(file, text) {
            return Ok(vec![doc]);
        }
    }
    yaml::parse(file, text)
}

/// Reads one file.
pub fn load_file(path: &Path) -> Result<Vec<Document>, Diagnostic> {
    let name = path.display().to_string();
    let text = read_file(path)?;
    parse_str(&name, &text)
}

/// Reads one policy file's text, within the limits (regular files only, at most
/// [`MAX_FILE_BYTES`], UTF-8).
pub fn read_file(path: &Path) -> Result<String, Diagnostic> {
    use std::io::Read as _;
    let name = &path.display().to_string();
    let io = |e: std::io::Error| {
        Diagnostic::error(Code::Io, format!("cannot read file: {e}")).at(name, None)
    };
    let too_large = |size: String| {
        Diagnostic::error(
            Code::FileTooLarge,
            format!("file is {size} bytes, over the limit of {MAX_FILE_BYTES}"),
        )
        .at(name, None)
        .help(Some(String::from("split the policies into several files")))
    };
    // Checked before opening: opening a FIFO blocks, a device (/dev/zero) never ends.
    if !std::fs::metadata(path).map_err(io)?.is_file() {
        return Err(Diagnostic::error(Code::Io, "not a regular file").at(name, None));
    }
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(Diagnostic::error(Code::Io, "not a regular file").at(name, None));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large(meta.len().to_string()));
    }
    // The size can change between the check and the read: read at most one byte more.
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_FILE_BYTES {
        return Err(too_large(format!("more than {MAX_FILE_BYTES}")));
    }
    String::from_utf8(bytes)
        .map_err(|e| Diagnostic::error(Code::Io, format!("file is not UTF-8: {e}")).at(name, None))
}

fn is_policy_file(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn hidden(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|n| n.starts_with('.'))
}

/// Policy files of a path: the file itself, or every `.yaml` / `.yml` / `.json` file below a
/// directory, sorted, each once. Symbolic links are followed (a link to a file is read under the
/// link's name); hidden files and directories (names starting with `.`) are skipped; a directory
/// reached twice (a link cycle, or two links to one place) is searched once.
pub fn policy_files(path: &Path) -> Result<Vec<PathBuf>, Diagnostic> {
    let name = path.display().to_string();
    let io = |what: &str, at: &str, e: std::io::Error| {
        Diagnostic::error(Code::Io, format!("cannot read {what}: {e}")).at(at, None)
    };
    let meta = std::fs::metadata(path).map_err(|e| io("path", &name, e))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !meta.is_dir() {
        return Err(
            Diagnostic::error(Code::Io, "not a regular file or a directory").at(&name, None),
        );
    }
    let mut out = Vec::new();
    let mut files_seen: HashSet<PathBuf> = HashSet::new();
    let mut dirs_seen: HashSet<PathBuf> = HashSet::new();
    let root = std::fs::canonicalize(path).map_err(|e| io("directory", &name, e))?;
    dirs_seen.insert(root);
    let mut stack = vec![(path.to_path_buf(), 0usize)];
    let mut seen = 0usize;
    while let Some((dir, depth)) = stack.pop() {
        let at = dir.display().to_string();
        let entries = std::fs::read_dir(&dir).map_err(|e| io("directory", &at, e))?;
        let mut names: Vec<PathBuf> = Vec::new();
        for entry in entries.flatten() {
            seen = seen.saturating_add(1);
            if seen > MAX_DIRECTORY_ENTRIES {
                return Err(Diagnostic::error(
                    Code::Io,
                    format!("more than {MAX_DIRECTORY_ENTRIES} entries below this directory"),
                )
                .at(&name, None)
                .help(Some(String::from(
                    "point the loader at the directory that holds the policies",
                ))));
            }
            if !hidden(&entry.file_name()) {
                names.push(entry.path());
            }
        }
        names.sort();
        for p in names {
            // `metadata` follows links; a dangling link is reported when the file is read.
            let Ok(meta) = std::fs::metadata(&p) else {
                if is_policy_file(&p) {
                    out.push(p);
                }
                continue;
            };
            let Ok(real) = std::fs::canonicalize(&p) else {
                continue;
            };
            if meta.is_dir() {
                if depth < MAX_DIRECTORY_DEPTH && dirs_seen.insert(real) {
                    stack.push((p, depth.saturating_add(1)));
                }
            } else if meta.is_file() && is_policy_file(&p) && files_seen.insert(real) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Loads every document (of any kind) of the given paths (files or directories), collecting all
/// file errors.
pub fn load_documents<P: AsRef<Path>>(paths: &[P]) -> Result<Vec<Document>, Diagnostics> {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match policy_files(path.as_ref()) {
            Ok(files) => {
                for f in files {
                    match load_file(&f) {
                        Ok(d) => docs.extend(d),
                        Err(e) => errors.push(e),
                    }
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(Diagnostics(errors))
    }
}

/// Loads every policy document of the given paths; test suites (`kind: PolicyTest`) are skipped.
/// Finding no document at all is an error naming the paths.
pub fn load_policies<P: AsRef<Path>>(paths: &[P]) -> Result<Vec<Document>, Diagnostics> {
    let mut docs = load_documents(paths)?;
    docs.retain(|d| d.kind() != Some(KIND_POLICY_TEST));
    if docs.is_empty() {
        let names: Vec<String> = paths
            .iter()
            .map(|p| p.as_ref().display().to_string())
            .collect();
        let mut d =
            Diagnostic::error(Code::NoPolicies, "no policy documents found")
                .help(Some(String::from(
                "policy files end in .yaml, .yml or .json and hold documents with `kind: Policy`",
            )));
        d.file = Some(names.join(", "));
        return Err(Diagnostics(vec![d]));
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostic::Position;

    #[test]
    fn yaml_values_and_positions() {
        let docs = parse_str(
            "p.yaml",
            "a: 1\nb:\n  - x\n  - 'y'\n  - 2.5\nc: ~\nd: \"true\"\n---\ne: true\n",
        )
        .unwrap();
        assert_eq!(docs.len(), 2);
        let d = &docs[0];
        assert_eq!(d.value["a"], 1);
        assert_eq!(d.value["b"][1], "y");
        assert_eq!(d.value["b"][2], 2.5);
        assert!(d.value["c"].is_null());
        assert_eq!(d.value["d"], "true");
        assert_eq!(d.position("/b/1"), Some(Position { line: 4, column: 5 }));
        assert_eq!(d.position("/a"), Some(Position { line: 1, column: 1 }));
        assert_eq!(docs[1].value["e"], true);
    }

    #[test]
    fn json_is_read_with_positions() {
        let docs = parse_str("p.json", "{\n  \"a\": {\"b\": [1, 2]}\n}").unwrap();
        assert_eq!(docs[0].value["a"]["b"][1], 2);
        assert_eq!(docs[0].position("/a/b").map(|p| p.line), Some(2));
        assert_eq!(
            docs[0].position("/a/b/1"),
            Some(Position {
                line: 2,
                column: 18
            })
        );
    }

    #[test]
    fn json_surrogate_pairs_as_python_writes_them() {
        let docs = parse_str("p.json", r#"{"reason": "\ud83d\ude00 \u00e9"}"#).unwrap();
        assert_eq!(docs[0].value["reason"], "\u{1F600} \u{e9}");
        // The same text with another extension is still read as JSON.
        let docs = parse_str("upload", r#"{"reason": "\ud83d\ude00"}"#).unwrap();
        assert_eq!(docs[0].value["reason"], "\u{1F600}");
        let e = parse_str("p.json", r#"{"reason": "\ud83d"}"#).unwrap_err();
        assert_eq!(e.code, Code::Syntax);
    }

    #[test]
    fn syntax_and_duplicate_key_errors_have_lines() {
        let e = parse_str("p.yaml", "a: [1, 2\nb: 3\n").unwrap_err();
        assert_eq!(e.file.as_deref(), Some("p.yaml"));
        assert!(e.position.is_some());
        let e = parse_str("p.yaml", "a: 1\na: 2\n").unwrap_err();
        assert!(e.message.contains("duplicate key"), "{}", e.message);
        assert_eq!(e.position.map(|p| p.line), Some(2));
        let e = parse_str("p.json", "{\"a\": 1,\n \"a\": 2}").unwrap_err();
        assert!(e.message.contains("duplicate key"), "{}", e.message);
        assert_eq!(e.position.map(|p| p.line), Some(2));
    }

    #[test]
    fn anchors_and_aliases() {
        let docs = parse_str("p.yaml", "x: &m [a, b]\ny: *m\n").unwrap();
        assert_eq!(docs[0].value["y"][1], "b");
    }

    #[test]
    fn billion_laughs_fail_fast() {
        // 9 levels of ten aliases each: 10^9 nodes if expanded.
        let mut y = String::from("l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            y.push_str(&format!(
                "l{i}: &l{i} [*l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}]\n"
            ));
        }
        let t = std::time::Instant::now();
        let e = parse_str("laughs.yaml", &y).unwrap_err();
        assert_eq!(e.code, Code::DocumentTooLarge);
        assert!(e.position.is_some());
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn an_alias_of_a_large_value_counts_its_bytes() {
        // A few aliases of an 8 MB string: few nodes, a lot of memory.
        let big = "x".repeat(1 << 20);
        let y = format!("a: &a \"{big}\"\nb: [{}]\n", vec!["*a"; 100].join(", "));
        let e = parse_str("fat.yaml", &y).unwrap_err();
        assert_eq!(e.code, Code::DocumentTooLarge);
        // A few aliases of a small anchor are fine.
        let y = format!("a: &a {{k: v}}\nb: [{}]\n", vec!["*a"; 100].join(", "));
        assert!(parse_str("ok.yaml", &y).is_ok());
    }

    #[test]
    fn the_alias_budget_is_per_file_not_per_document() {
        let doc = format!(
            "---\na: &a \"{}\"\nb: [{}]\n",
            "x".repeat(4096),
            ["*a"; 10].join(", ")
        );
        // One document is fine; a file of many such documents is not.
        assert!(parse_str("one.yaml", &doc).is_ok());
        let e = parse_str("many.yaml", &doc.repeat(200)).unwrap_err();
        assert_eq!(e.code, Code::DocumentTooLarge);
    }

    #[test]
    fn long_keys_at_depth_cannot_blow_up_the_location_table() {
        let key = "k".repeat(100_000);
        let items = vec!["1"; 20_000].join(",");
        for (name, text) in [
            ("long.json", format!("{{\"{key}\": [{items}]}}")),
            ("long.yaml", format!("? {key}\n: [{items}]\n")),
        ] {
            let e = parse_str(name, &text).unwrap_err();
            assert_eq!(e.code, Code::DocumentTooLarge, "{name}");
        }
    }

    #[test]
    fn too_many_documents_in_a_file() {
        let text = "--- 1\n".repeat(MAX_DOCUMENTS + 1);
        let e = parse_str("many.yaml", &text).unwrap_err();
        assert_eq!(e.code, Code::DocumentTooLarge);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        for text in [
            format!("a: {}1{}", "[".repeat(100_000), "]".repeat(100_000)),
            format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000)),
            (0..200)
                .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
                .collect::<String>(),
        ] {
            for name in ["deep.yaml", "deep.json"] {
                let e = parse_str(name, &text).unwrap_err();
                assert!(
                    matches!(e.code, Code::DocumentTooDeep | Code::Syntax),
                    "{name}: {e}"
                );
            }
        }
        let ok = format!("a: {}1{}", "[".repeat(60), "]".repeat(60));
        assert!(parse_str("ok.yaml", &ok).is_ok());
    }
}
