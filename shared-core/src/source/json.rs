//! JSON documents: values from `serde_json` (full JSON, surrogate pairs included, as Python's
//! `json.dumps` writes them), and a linear, non-recursive scan of the text for the position of
//! every node, duplicate keys and the depth limit.

use std::collections::HashSet;

use serde_json::Value;

use super::{span_budget, MAX_DOCUMENT_DEPTH};
use crate::diagnostic::{Code, Diagnostic, Position};
use crate::document::{escape_segment, Document, Spans};

/// Parses one JSON document.
pub(super) fn parse(file: &str, text: &str) -> Result<Document, Diagnostic> {
    let spans = scan(text, span_budget(text.len()))
        .map_err(|(code, msg, pos)| Diagnostic::error(code, msg).at(file, Some(pos)))?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        Diagnostic::error(Code::Syntax, format!("invalid JSON: {e}")).at(
            file,
            Some(Position {
                line: u32::try_from(e.line()).unwrap_or(u32::MAX),
                column: u32::try_from(e.column()).unwrap_or(u32::MAX),
            }),
        )
    })?;
    Ok(Document::with_spans(file, value, spans))
}

enum Frame {
    Object {
        ptr: String,
        keys: HashSet<String>,
        key: Option<String>,
    },
    Array {
        ptr: String,
        index: usize,
    },
}

type ScanError = (Code, String, Position);

/// Positions of every node by JSON pointer (a map entry: where its key is written).
fn scan(text: &str, budget: usize) -> Result<Spans, ScanError> {
    let mut spans = Spans::new();
    let mut span_bytes = 0usize;
    let mut record = |spans: &mut Spans, ptr: String, at: Position, replace: bool| {
        span_bytes = span_bytes.saturating_add(ptr.len());
        if span_bytes > budget {
            return Err((
                Code::DocumentTooLarge,
                String::from(
                    "the document's keys are too long for its size (long map keys nested deep)",
                ),
                at,
            ));
        }
        if replace {
            spans.insert(ptr, at);
        } else {
            spans.entry(ptr).or_insert(at);
        }
        Ok(())
    };
    let mut stack: Vec<Frame> = Vec::new();
    let (mut line, mut column) = (1u32, 1u32);
    let mut chars = text.char_indices().peekable();
    // The pointer of the value that starts next.
    let next_ptr = |stack: &[Frame]| -> String {
        match stack.last() {
            None => String::new(),
            Some(Frame::Object { ptr, key, .. }) => {
                format!(
                    "{ptr}/{}",
                    escape_segment(key.as_deref().unwrap_or_default())
                )
            }
            Some(Frame::Array { ptr, index }) => format!("{ptr}/{index}"),
        }
    };
    while let Some((start, c)) = chars.next() {
        let here = Position { line, column };
        column = column.saturating_add(1);
        match c {
            '\n' => {
                line = line.saturating_add(1);
                column = 1;
            }
            ' ' | '\t' | '\r' | ':' => {}
            ',' => {
                if let Some(Frame::Array { index, .. }) = stack.last_mut() {
                    *index = index.saturating_add(1);
                }
            }
            '{' | '[' => {
                if stack.len() >= MAX_DOCUMENT_DEPTH {
                    return Err((
                        Code::DocumentTooDeep,
                        format!("maps and lists nest deeper than {MAX_DOCUMENT_DEPTH} levels"),
                        here,
                    ));
                }
                let ptr = next_ptr(&stack);
                record(&mut spans, ptr.clone(), here, false)?;
                stack.push(if c == '{' {
                    Frame::Object {
                        ptr,
                        keys: HashSet::new(),
                        key: None,
                    }
                } else {
                    Frame::Array { ptr, index: 0 }
                });
            }
            '}' | ']' => {
                stack.pop();
                if let Some(Frame::Object { key, .. }) = stack.last_mut() {
                    *key = None;
                }
            }
            '"' => {
                // Find the closing quote (escapes skipped); the text is decoded by serde_json.
                let mut end = start;
                let mut escaped = false;
                for (i, ch) in chars.by_ref() {
                    column = column.saturating_add(1);
                    if escaped {
                        escaped = false;
                    } else if ch == '\\' {
                        escaped = true;
                    } else if ch == '"' {
                        end = i;
                        break;
                    } else if ch == '\n' {
                        line = line.saturating_add(1);
                        column = 1;
                    }
                }
                let raw = text.get(start..=end).unwrap_or_default();
                match stack.last_mut() {
                    Some(Frame::Object { ptr, keys, key }) if key.is_none() => {
                        let k: String = serde_json::from_str(raw).map_err(|e| {
                            (Code::Syntax, format!("invalid JSON string: {e}"), here)
                        })?;
                        if !keys.insert(k.clone()) {
                            return Err((Code::Syntax, format!("duplicate key `{k}`"), here));
                        }
                        let at = format!("{ptr}/{}", escape_segment(&k));
                        *key = Some(k);
                        record(&mut spans, at, here, true)?;
                    }
                    _ => {
                        record(&mut spans, next_ptr(&stack), here, false)?;
                        if let Some(Frame::Object { key, .. }) = stack.last_mut() {
                            *key = None;
                        }
                    }
                }
            }
            _ => {
                // A number or a literal: skip to the next delimiter.
                while let Some((_, ch)) = chars
                    .next_if(|(_, ch)| !matches!(ch, ',' | ']' | '}' | ' ' | '\t' | '\r' | '\n'))
                {
                    let _ = ch;
                    column = column.saturating_add(1);
                }
                record(&mut spans, next_ptr(&stack), here, false)?;
                if let Some(Frame::Object { key, .. }) = stack.last_mut() {
                    *key = None;
                }
            }
        }
    }
    Ok(spans)
}
