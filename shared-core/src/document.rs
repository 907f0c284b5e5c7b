//! A parsed policy document: its data as a JSON value, and where each node was written.

use crate::diagnostic::{Code, Diagnostic, Position};
use alloc::format;
use alloc::string::{String, ToString};
use serde::de::DeserializeOwned;

/// Node locations by JSON pointer.
pub type Spans = hashbrown::HashMap<String, Position>;

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
    pub spans: Spans,
    /// xxh3-128 of the canonical JSON of `value` (keys sorted): the document's part of the
    /// bundle digest, the same whatever file, format or key order it came from.
    pub(crate) digest: u128,
}

impl Document {
    /// A document from a JSON value, without locations.
    pub fn from_value(file: impl Into<String>, value: serde_json::Value) -> Document {
        Document::with_spans(file, value, Spans::new())
    }

    /// A document with node locations.
    pub fn with_spans(file: impl Into<String>, value: serde_json::Value, spans: Spans) -> Document {
        let mut hasher = Hasher(xxhash_rust::xxh3::Xxh3::new());
        canonical_json(&value, &mut hasher);
        Document {
            file: file.into(),
            value,
            spans,
            digest: hasher.0.digest128(),
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

/// Feeds text straight into the digest (no intermediate string).
struct Hasher(xxhash_rust::xxh3::Xxh3);

impl core::fmt::Write for Hasher {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.0.update(s.as_bytes());
        Ok(())
    }
}

/// Writes `v` as JSON with object keys sorted at every level, so the text (and the bundle digest
/// and cache keys derived from it) does not depend on how `serde_json` orders maps in a given
/// build (`preserve_order` may be switched on by another crate in the dependency graph).
/// Recursion is bounded by the document depth limit of the loaders (and serde_json's 128).
fn canonical_json(v: &serde_json::Value, out: &mut impl core::fmt::Write) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut keys: alloc::vec::Vec<&String> = map.keys().collect();
            keys.sort();
            let _ = out.write_char('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    let _ = out.write_char(',');
                }
                json_string(k, out);
                let _ = out.write_char(':');
                if let Some(x) = map.get(k) {
                    canonical_json(x, out);
                }
            }
            let _ = out.write_char('}');
        }
        Value::Array(items) => {
            let _ = out.write_char('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    let _ = out.write_char(',');
                }
                canonical_json(x, out);
            }
            let _ = out.write_char(']');
        }
        Value::String(s) => json_string(s, out),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Bool(b) => {
            let _ = out.write_str(if *b { "true" } else { "false" });
        }
        Value::Null => {
            let _ = out.write_str("null");
        }
    }
}

/// A JSON string literal, escaped as `serde_json` escapes it.
fn json_string(s: &str, out: &mut impl core::fmt::Write) {
    let _ = out.write_char('"');
    let mut start = 0;
    for (i, c) in s.char_indices() {
        let esc = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            '\u{8}' => "\\b",
            '\u{c}' => "\\f",
            c if (c as u32) < 0x20 => "",
            _ => continue,
        };
        let _ = out.write_str(s.get(start..i).unwrap_or_default());
        if esc.is_empty() {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            let _ = out.write_str(esc);
        }
        start = i.saturating_add(c.len_utf8());
    }
    let _ = out.write_str(s.get(start..).unwrap_or_default());
    let _ = out.write_char('"');
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
pub(crate) fn escape_segment(s: &str) -> alloc::borrow::Cow<'_, str> {
    if s.contains(['~', '/']) {
        alloc::borrow::Cow::Owned(s.replace('~', "~0").replace('/', "~1"))
    } else {
        alloc::borrow::Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_form_ignores_key_order() {
        let a: serde_json::Value = serde_json::from_str(
            r#"{"b": 1, "a": {"y": [1, {"d": 2, "c": "q\"\u0001\n"}], "x": "s"}}"#,
        )
        .unwrap();
        let b: serde_json::Value = serde_json::from_str(
            r#"{"a": {"x": "s", "y": [1, {"c": "q\"\u0001\n", "d": 2}]}, "b": 1}"#,
        )
        .unwrap();
        let (da, db) = (
            Document::from_value("a", a.clone()),
            Document::from_value("b", b),
        );
        assert_eq!(da.digest, db.digest);
        let mut text = String::new();
        canonical_json(&a, &mut text);
        assert_eq!(
            text,
            r#"{"a":{"x":"s","y":[1,{"c":"q\"\u0001\n","d":2}]},"b":1}"#
        );
        // The same escaping as serde_json.
        let s = "tab\t quote\" back\\ \u{7} é";
        let mut mine = String::new();
        json_string(s, &mut mine);
        assert_eq!(mine, serde_json::to_string(s).unwrap());
    }
}
