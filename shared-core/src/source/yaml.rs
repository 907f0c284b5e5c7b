//! YAML 1.2 documents to JSON values with a pointer → position map, driven event by event (the
//! parser's own recursive loader is not used, so nesting cannot exhaust the stack), with the
//! depth and alias-expansion limits of [`super`].

use std::collections::BTreeMap;

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};
use yaml_rust2::Yaml;

use super::{alias_budget, span_budget, MAX_DOCUMENTS, MAX_DOCUMENT_DEPTH};
use crate::diagnostic::{Code, Diagnostic, Position};
use crate::document::{escape_segment, Document, Spans};

/// Parses every document of a YAML stream.
pub(super) fn parse(file: &str, text: &str) -> Result<Vec<Document>, Diagnostic> {
    let mut builder = Builder {
        alias_budget: alias_budget(text.len()),
        span_budget: span_budget(text.len()),
        ..Builder::default()
    };
    let mut parser = Parser::new_from_str(text);
    loop {
        let (ev, mark) = match parser.next_token() {
            Ok(x) => x,
            Err(e) => {
                return Err(Diagnostic::error(
                    Code::Syntax,
                    format!("invalid YAML/JSON: {}", e.info()),
                )
                .at(file, Some(position(e.marker()))))
            }
        };
        let end = ev == Event::StreamEnd;
        builder.on_event(ev, mark);
        if let Some((code, msg, pos)) = builder.error.take() {
            return Err(Diagnostic::error(code, msg).at(file, Some(pos)));
        }
        if end {
            break;
        }
    }
    Ok(builder
        .docs
        .into_iter()
        .map(|(value, spans)| Document::with_spans(file, value, spans))
        .collect())
}

/// `parent/segment`, allocated once at its final size.
fn child(parent: &str, segment: &str) -> String {
    let mut p = String::with_capacity(parent.len().saturating_add(segment.len()).saturating_add(1));
    p.push_str(parent);
    p.push('/');
    p.push_str(segment);
    p
}

fn position(m: &Marker) -> Position {
    Position {
        line: u32::try_from(m.line()).unwrap_or(u32::MAX),
        column: u32::try_from(m.col().saturating_add(1)).unwrap_or(u32::MAX),
    }
}

enum Frame {
    Map {
        map: Map<String, Value>,
        key: Option<String>,
        ptr: String,
        anchor: usize,
        /// `Builder::nodes` when the container opened (its size is the difference at close).
        start: usize,
    },
    Seq {
        items: Vec<Value>,
        ptr: String,
        anchor: usize,
        start: usize,
    },
}

/// Builds JSON values and a pointer → position map from parser events.
#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    docs: Vec<(Value, Spans)>,
    spans: Spans,
    /// Anchored values with their weights.
    anchors: BTreeMap<usize, (Value, usize)>,
    root: Option<Value>,
    /// Weight of the current document (one per node plus the bytes of its strings), aliases
    /// expanded.
    nodes: usize,
    /// Weight added by aliases in the file.
    aliased: usize,
    /// Bytes of the location tables' keys in the file.
    span_bytes: usize,
    alias_budget: usize,
    span_budget: usize,
    error: Option<(Code, String, Position)>,
}

impl Builder {
    /// The pointer of the next node, or `None` when the next scalar is a map key.
    fn next_ptr(&self) -> Option<String> {
        match self.stack.last() {
            None => Some(String::new()),
            Some(Frame::Map { key: None, .. }) => None,
            Some(Frame::Map {
                key: Some(k), ptr, ..
            }) => Some(child(ptr, &escape_segment(k))),
            Some(Frame::Seq { items, ptr, .. }) => Some(child(ptr, &items.len().to_string())),
        }
    }

    fn fail(&mut self, code: Code, msg: String, mark: Marker) {
        if self.error.is_none() {
            self.error = Some((code, msg, position(&mark)));
        }
    }

    /// Adds a value of `size` nodes (already counted in `nodes`) at the current place.
    fn push_value(&mut self, v: Value, anchor: usize, size: usize, mark: Marker) {
        if anchor > 0 {
            self.anchors.insert(anchor, (v.clone(), size));
        }
        match self.stack.last_mut() {
            None => self.root = Some(v),
            Some(Frame::Seq { items, .. }) => items.push(v),
            Some(Frame::Map { map, key, .. }) => {
                if let Some(k) = key.take() {
                    if map.insert(k.clone(), v).is_some() {
                        self.fail(Code::Syntax, format!("duplicate key `{k}`"), mark);
                    }
                }
            }
        }
    }

    fn count_written(&mut self, weight: usize) {
        self.nodes = self.nodes.saturating_add(weight);
    }

    /// Records where the node at `ptr` was written, within the table's budget.
    fn span(&mut self, ptr: String, mark: Marker) {
        self.span_bytes = self.span_bytes.saturating_add(ptr.len());
        if self.span_bytes > self.span_budget {
            self.fail(
                Code::DocumentTooLarge,
                String::from(
                    "the document's keys are too long for its size (long map keys nested deep)",
                ),
                mark,
            );
            return;
        }
        self.spans.entry(ptr).or_insert(position(&mark));
    }

    fn alias(&mut self, id: usize, mark: Marker) {
        if self.next_ptr().is_none() {
            self.fail(
                Code::Syntax,
                String::from("aliases cannot be map keys"),
                mark,
            );
            return;
        }
        let Some(size) = self.anchors.get(&id).map(|(_, n)| *n) else {
            self.fail(Code::Syntax, String::from("unknown alias"), mark);
            return;
        };
        let aliased = self.aliased.saturating_add(size);
        if aliased > self.alias_budget {
            self.fail(
                Code::DocumentTooLarge,
                format!(
                    "YAML aliases would add more than {} bytes to this document",
                    self.alias_budget
                ),
                mark,
            );
            return;
        }
        self.aliased = aliased;
        self.nodes = self.nodes.saturating_add(size);
        if let Some((v, _)) = self.anchors.get(&id).cloned() {
            self.push_value(v, 0, size, mark);
        }
    }

    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        match ev {
            Event::DocumentStart => {
                // Anchors are per document; the alias and location budgets are per file (a file
                // of many documents must not get a budget per document).
                self.spans.clear();
                self.anchors.clear();
                self.root = None;
                self.nodes = 0;
            }
            Event::DocumentEnd => {
                if let Some(v) = self.root.take() {
                    if !v.is_null() {
                        if self.docs.len() >= MAX_DOCUMENTS {
                            self.fail(
                                Code::DocumentTooLarge,
                                format!("more than {MAX_DOCUMENTS} documents in one file"),
                                mark,
                            );
                            return;
                        }
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
                            let at = child(ptr, &escape_segment(&s));
                            *key = Some(s);
                            self.span(at, mark);
                        }
                    }
                    Some(ptr) => match scalar_value(&s, style, tagged_str) {
                        Ok(v) => {
                            let weight = s.len().saturating_add(1);
                            self.span(ptr, mark);
                            self.count_written(weight);
                            self.push_value(v, anchor, weight, mark);
                        }
                        Err(e) => self.fail(Code::Syntax, e, mark),
                    },
                }
            }
            Event::Alias(id) => self.alias(id, mark),
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                let Some(ptr) = self.next_ptr() else {
                    self.fail(
                        Code::Syntax,
                        String::from("complex map keys are not supported"),
                        mark,
                    );
                    return;
                };
                if self.stack.len() >= MAX_DOCUMENT_DEPTH {
                    self.fail(
                        Code::DocumentTooDeep,
                        format!("maps and lists nest deeper than {MAX_DOCUMENT_DEPTH} levels"),
                        mark,
                    );
                    return;
                }
                self.span(ptr.clone(), mark);
                self.count_written(1);
                let start = self.nodes;
                self.stack.push(if matches!(ev, Event::SequenceStart(..)) {
                    Frame::Seq {
                        items: Vec::new(),
                        ptr,
                        anchor,
                        start,
                    }
                } else {
                    Frame::Map {
                        map: Map::new(),
                        key: None,
                        ptr,
                        anchor,
                        start,
                    }
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (value, anchor, start) = match self.stack.pop() {
                    Some(Frame::Seq {
                        items,
                        anchor,
                        start,
                        ..
                    }) => (Value::Array(items), anchor, start),
                    Some(Frame::Map {
                        map, anchor, start, ..
                    }) => (Value::Object(map), anchor, start),
                    None => return,
                };
                let size = self.nodes.saturating_sub(start).saturating_add(1);
                self.push_value(value, anchor, size, mark);
            }
            Event::StreamStart | Event::StreamEnd | Event::Nothing => {}
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
