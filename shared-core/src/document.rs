//! A parsed policy document: its data as a JSON value, and where each node was written.

use crate::diagnostic::{Code, Diagnostic, Position};
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use serde::de::DeserializeOwned;

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
        let mut canonical = String::new();
        canonical_json(&value, &mut canonical);
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
                Code::UnknownField
            } else if msg.starts_with("missing field") {
                Code::MissingField
            } else {
                Code::InvalidType
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

/// Writes `v` as JSON with object keys sorted at every level, so the text (and the bundle digest
/// and cache keys derived from it) does not depend on how `serde_json` orders maps in a given
/// build (`preserve_order` may be switched on by another crate in the dependency graph).
fn canonical_json(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut keys: alloc::vec::Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push(':');
                if let Some(x) = map.get(k) {
                    canonical_json(x, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(x, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&serde_json::to_string(scalar).unwrap_or_default()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_form_ignores_key_order() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b": 1, "a": {"y": [1, {"d": 2, "c": 3}], "x": "s"}}"#)
                .unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a": {"x": "s", "y": [1, {"c": 3, "d": 2}]}, "b": 1}"#)
                .unwrap();
        let (da, db) = (Document::from_value("a", a), Document::from_value("b", b));
        assert_eq!(da.canonical, db.canonical);
        assert_eq!(
            da.canonical,
            r#"{"a":{"x":"s","y":[1,{"c":3,"d":2}]},"b":1}"#
        );
    }
}
