//! Loading policy files (`std`): YAML or JSON, one or several documents per file, a file or a
//! directory, with the line and column of every node kept for error messages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};
use yaml_rust2::Yaml;

use crate::diagnostic::{Diagnostic, Diagnostics};
use crate::document::{escape_segment, Document, Position};
use crate::model::KIND_POLICY_TEST;

/// Parses the text of one file into its documents. JSON is read by the same YAML 1.2 parser (JSON
/// is a subset), so both carry locations.
pub fn parse_str(file: &str, text: &str) -> Result<Vec<Document>, Diagnostic> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, true) {
        let m = e.marker();
        return Err(
            Diagnostic::error("syntax", format!("invalid YAML/JSON: {}", e.info()))
                .at(file, Some(position(m))),
        );
    }
    if let Some((msg, pos)) = builder.error.take() {
        return Err(Diagnostic::error("syntax", msg).at(file, Some(pos)));
    }
    Ok(builder
        .docs
        .into_iter()
        .map(|(value, spans)| Document::with_spans(file, value, spans))
        .collect())
}

/// Reads one file.
pub fn load_file(path: &Path) -> Result<Vec<Document>, Diagnostic> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Diagnostic::error("io", format!("cannot read file: {e}")).at(&name, None))?;
    parse_str(&name, &text)
}

/// Policy files of a path: the file itself, or every `.yaml` / `.yml` / `.json` file below a
/// directory (sorted, recursively).
pub fn policy_files(path: &Path) -> Result<Vec<PathBuf>, Diagnostic> {
    let name = path.display().to_string();
    let meta = std::fs::metadata(path)
        .map_err(|e| Diagnostic::error("io", format!("cannot read path: {e}")).at(&name, None))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| {
            Diagnostic::error("io", format!("cannot read directory: {e}"))
                .at(&dir.display().to_string(), None)
        })?;
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
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
pub fn load_policies<P: AsRef<Path>>(paths: &[P]) -> Result<Vec<Document>, Diagnostics> {
    let mut docs = load_documents(paths)?;
    docs.retain(|d| d.kind() != Some(KIND_POLICY_TEST));
    Ok(docs)
}

fn position(m: &Marker) -> Position {
    Position {
        line: u32::try_from(m.line()).unwrap_or(u32::MAX),
        column: u32::try_from(m.col() + 1).unwrap_or(u32::MAX),
    }
}

enum Frame {
    Map {
        map: Map<String, Value>,
        key: Option<String>,
        ptr: String,
        anchor: usize,
    },
    Seq {
        items: Vec<Value>,
        ptr: String,
        anchor: usize,
    },
}

/// Builds JSON values and a pointer → position map from parser events.
#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    docs: Vec<(Value, BTreeMap<String, Position>)>,
    spans: BTreeMap<String, Position>,
    anchors: BTreeMap<usize, Value>,
    root: Option<Value>,
    error: Option<(String, Position)>,
}

impl Builder {
    /// The pointer of the next node, or `None` when the next scalar is a map key.
    fn next_ptr(&self) -> Option<String> {
        match self.stack.last() {
            None => Some(String::new()),
            Some(Frame::Map { key: None, .. }) => None,
            Some(Frame::Map {
                key: Some(k), ptr, ..
            }) => Some(format!("{ptr}/{}", escape_segment(k))),
            Some(Frame::Seq { items, ptr, .. }) => Some(format!("{ptr}/{}", items.len())),
        }
    }

    fn fail(&mut self, msg: String, mark: Marker) {
        if self.error.is_none() {
            self.error = Some((msg, position(&mark)));
        }
    }

    fn push_value(&mut self, v: Value, anchor: usize, mark: Marker) {
        if anchor > 0 {
            self.anchors.insert(anchor, v.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(v),
            Some(Frame::Seq { items, .. }) => items.push(v),
            Some(Frame::Map { map, key, .. }) => {
                if let Some(k) = key.take() {
                    if map.insert(k.clone(), v).is_some() {
                        self.fail(format!("duplicate key `{k}`"), mark);
                    }
                }
            }
        }
    }
}

fn scalar_value(s: &str, style: TScalarStyle, tagged_str: bool) -> Result<Value, String> {
    if style != TScalarStyle::Plain || tagged_str {
        return Ok(Value::String(s.to_string()));
    }
    Ok(match Yaml::from_str(s) {
        Yaml::Integer(i) => Value::Number(i.into()),
        Yaml::Real(r) => {
            let f: f64 = r.parse().map_err(|_| format!("invalid number `{r}`"))?;
            Number::from_f64(f)
                .map(Value::Number)
                .ok_or_else(|| format!("`{r}` is not a finite number"))?
        }
        Yaml::Boolean(b) => Value::Bool(b),
        Yaml::Null => Value::Null,
        Yaml::String(s) => Value::String(s),
        _ => Value::String(s.to_string()),
    })
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        match ev {
            Event::DocumentStart => {
                self.spans.clear();
                self.root = None;
            }
            Event::DocumentEnd => {
                if let Some(v) = self.root.take() {
                    if !v.is_null() {
                        self.docs.push((v, std::mem::take(&mut self.spans)));
                    }
                }
            }
            Event::Scalar(s, style, anchor, tag) => {
                let tagged_str = tag.as_ref().is_some_and(|t| t.suffix == "str");
                match self.next_ptr() {
                    None => {
                        // A map key.
                        if let Some(Frame::Map { key, ptr, .. }) = self.stack.last_mut() {
                            self.spans
                                .insert(format!("{ptr}/{}", escape_segment(&s)), position(&mark));
                            *key = Some(s);
                        }
                    }
                    Some(ptr) => match scalar_value(&s, style, tagged_str) {
                        Ok(v) => {
                            self.spans.entry(ptr).or_insert(position(&mark));
                            self.push_value(v, anchor, mark);
                        }
                        Err(e) => self.fail(e, mark),
                    },
                }
            }
            Event::Alias(id) => {
                if self.next_ptr().is_none() {
                    self.fail(String::from("aliases cannot be map keys"), mark);
                    return;
                }
                match self.anchors.get(&id).cloned() {
                    Some(v) => self.push_value(v, 0, mark),
                    None => self.fail(String::from("unknown alias"), mark),
                }
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                let Some(ptr) = self.next_ptr() else {
                    self.fail(String::from("complex map keys are not supported"), mark);
                    return;
                };
                self.spans.entry(ptr.clone()).or_insert(position(&mark));
                self.stack.push(if matches!(ev, Event::SequenceStart(..)) {
                    Frame::Seq {
                        items: Vec::new(),
                        ptr,
                        anchor,
                    }
                } else {
                    Frame::Map {
                        map: Map::new(),
                        key: None,
                        ptr,
                        anchor,
                    }
                });
            }
            Event::SequenceEnd | Event::MappingEnd => match self.stack.pop() {
                Some(Frame::Seq { items, anchor, .. }) => {
                    self.push_value(Value::Array(items), anchor, mark)
                }
                Some(Frame::Map { map, anchor, .. }) => {
                    self.push_value(Value::Object(map), anchor, mark)
                }
                None => {}
            },
            Event::StreamStart | Event::StreamEnd | Event::Nothing => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn syntax_and_duplicate_key_errors_have_lines() {
        let e = parse_str("p.yaml", "a: [1, 2\nb: 3\n").unwrap_err();
        assert_eq!(e.file.as_deref(), Some("p.yaml"));
        assert!(e.position.is_some());
        let e = parse_str("p.yaml", "a: 1\na: 2\n").unwrap_err();
        assert!(e.message.contains("duplicate key"), "{}", e.message);
        assert_eq!(e.position.map(|p| p.line), Some(2));
    }

    #[test]
    fn anchors_and_aliases() {
        let docs = parse_str("p.yaml", "x: &m [a, b]\ny: *m\n").unwrap();
        assert_eq!(docs[0].value["y"][1], "b");
    }
}
