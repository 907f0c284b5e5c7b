//! A parsed policy document: its data as a JSON value, and where each node was written.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::diagnostic::Diagnostic;

/// A 1-based line and column in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    /// Line, from 1.
    pub line: u32,
    /// Column, from 1.
    pub column: u32,
}

/// One policy (or test) document with its locations.
///
/// `value` is the document as JSON data (YAML is converted); `spans` maps JSON pointers
/// (`/spec/rules/0/when/cel`) to where that node (for a map entry: its key) was written. Without
/// `std`, documents come from JSON values and have no spans.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// File the document came from (as given by the caller).
    pub file: String,
    /// The data.
    pub value: serde_json::Value,
    /// Node locations by JSON pointer.
    pub spans: BTreeMap<String, Position>,
    /// Raw text digest input: the canonical JSON of `value` (used for the bundle version).
    pub(crate) canonical: String,
}

impl Document {
    /// A document from a JSON value, without locations.
    pub fn from_value(file: impl Into<String>, value: serde_json::Value) -> Document {
        Document::with_spans(file, value, BTreeMap::new())
    }

    /// A document with node locations.
    pub fn with_spans(
        file: impl Into<String>,
        value: serde_json::Value,
        spans: BTreeMap<String, Position>,
    ) -> Document {
        let canonical = serde_json::to_string(&value).unwrap_or_default();
        Document {
            file: file.into(),
            value,
            spans,
            canonical,
        }
    }

    /// Deserializes the whole document as `T`; an error names the file, line and column.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, Diagnostic> {
        self.parse_at("", &self.value, None)
    }

    /// Deserializes `value`, found at JSON pointer `base` of this document, as `T`.
    pub(crate) fn parse_at<T: DeserializeOwned>(
        &self,
        base: &str,
        value: &serde_json::Value,
        rule: Option<&str>,
    ) -> Result<T, Diagnostic> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let mut ptr = format!("{base}{}", pointer_of(e.path()));
            let msg = e.into_inner().to_string();
            let code = if msg.starts_with("unknown field") {
                // Point at the offending key itself.
                if let Some(name) = msg.split('`').nth(1) {
                    ptr = format!("{ptr}/{}", escape_segment(name));
                }
                "unknown-field"
            } else if msg.starts_with("missing field") {
                "missing-field"
            } else {
                "invalid-type"
            };
            Diagnostic::error(code, msg)
                .at(&self.file, self.position(&ptr))
                .rule(rule)
        })
    }

    /// The `kind` field, if any.
    pub fn kind(&self) -> Option<&str> {
        self.value.get("kind").and_then(serde_json::Value::as_str)
    }

    /// Where the node at `pointer` (or its nearest located ancestor) was written.
    pub fn position(&self, pointer: &str) -> Option<Position> {
        let mut p = pointer;
        loop {
            if let Some(pos) = self.spans.get(p) {
                return Some(*pos);
            }
            match p.rfind('/') {
                Some(i) => p = p.get(..i).unwrap_or_default(),
                None => return None,
            }
        }
    }
}

/// A JSON pointer from a serde path.
fn pointer_of(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut p = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => p.push_str(&format!("/{index}")),
            Segment::Map { key } => p.push_str(&format!("/{}", escape_segment(key))),
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    p
}

/// Escapes one JSON-pointer segment.
pub(crate) fn escape_segment(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}
