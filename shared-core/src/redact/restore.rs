//! `restore: true`: the redacted values put back where the answer repeats their placeholders,
//! in a JSON answer (read whole) and in an event stream (event by event). A placeholder the
//! provider splits across two events of one text (`<EMA` … `IL_1>`) is restored whole: an event
//! whose text ends with the start of a placeholder is held until the next event of the same text
//! (by key and index fields), and the two are sent as one. Restoring is for the client's
//! convenience, not a guard: anything it cannot read (a compressed or oversized answer, a
//! placeholder split across interleaved texts) passes with the placeholder, never with another
//! value.

use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;

use super::{decode, Placeholders};

/// The keys of index fields that tell the texts of one answer apart (choices, content blocks,
/// output items, tool calls).
const INDEX_KEYS: &[&str] = &["index", "output_index", "content_index", "item_id"];

/// Keys whose string value is JSON text (tool-call arguments): a value restored into it is
/// escaped as a JSON string's content.
const JSON_TEXT_KEYS: &[&str] = &["arguments", "partial_json"];

/// The Responses API's event type whose `delta` is a tool call's arguments.
const ARGUMENTS_EVENT: &[u8] = b"response.function_call_arguments.delta";

/// How an answer is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A JSON answer: buffered, restored at its end.
    Whole,
    /// An event stream: restored event by event.
    Events,
    /// Passed as it comes (over the size bound).
    Pass,
}

/// Which text of an answer a string is: its key and the answer's index fields.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Text {
    key: Option<String>,
    indexes: Vec<(String, String)>,
}

/// An event held because its text ends with the start of a placeholder.
#[derive(Debug)]
struct Held {
    event: Vec<u8>,
    text: Text,
    /// The held string's decoded value.
    value: String,
}

/// Puts a request's redacted values back into its answer.
#[derive(Debug)]
pub struct Restorer {
    placeholders: Placeholders,
    mode: Mode,
    buf: Vec<u8>,
    held: Option<Held>,
    max: usize,
    restored: u32,
}

impl Restorer {
    /// A restorer for an answer of `content_type` and `encoding`, reading at most `max_bytes`
    /// at once (a whole JSON answer, one event); `None` when there is nothing to restore or
    /// the answer cannot be read (compressed, neither JSON nor an event stream).
    pub fn new(
        placeholders: Placeholders,
        content_type: &str,
        encoding: Option<&str>,
        max_bytes: usize,
    ) -> Option<Restorer> {
        if placeholders.is_empty() {
            return None;
        }
        if encoding.is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity")) {
            return None;
        }
        let ct = content_type.to_ascii_lowercase();
        let mode = if ct.contains("text/event-stream") {
            Mode::Events
        } else if ct.contains("json") {
            Mode::Whole
        } else {
            return None;
        };
        Some(Restorer {
            placeholders,
            mode,
            buf: Vec::new(),
            held: None,
            max: max_bytes,
            restored: 0,
        })
    }

    /// Whether the answer is read whole (a JSON answer).
    pub fn reads_whole(&self) -> bool {
        self.mode == Mode::Whole
    }

    /// How many placeholders were put back so far.
    pub fn restored(&self) -> u32 {
        self.restored
    }

    /// The bytes to send for `chunk` (`end`: the answer's last).
    pub fn push(&mut self, chunk: &[u8], end: bool) -> Vec<u8> {
        match self.mode {
            Mode::Pass => {
                let mut out = core::mem::take(&mut self.buf);
                out.extend_from_slice(chunk);
                out
            }
            Mode::Whole => {
                self.buf.extend_from_slice(chunk);
                if self.buf.len() > self.max {
                    self.mode = Mode::Pass;
                    return core::mem::take(&mut self.buf);
                }
                if !end {
                    return Vec::new();
                }
                let body = core::mem::take(&mut self.buf);
                let strings = value_strings(&body, 0);
                self.restore_strings(&body, &strings).unwrap_or(body)
            }
            Mode::Events => {
                self.buf.extend_from_slice(chunk);
                let mut out = Vec::new();
                while let Some(n) = event_end(&self.buf) {
                    let rest = self.buf.split_off(n);
                    let event = core::mem::replace(&mut self.buf, rest);
                    self.event(event, &mut out);
                }
                if self.buf.len() > self.max {
                    // An event this long is not one the provider sends: passed as it is.
                    self.flush_held(&mut out);
                    out.append(&mut self.buf);
                }
                if end {
                    let last = core::mem::take(&mut self.buf);
                    if !last.is_empty() {
                        self.event(last, &mut out);
                    }
                    self.flush_held(&mut out);
                }
                out
            }
        }
    }

    /// Sends a held event as it is (restored, its last text without the placeholder's end).
    fn flush_held(&mut self, out: &mut Vec<u8>) {
        if let Some(h) = self.held.take() {
            let restored = self.restore_event(&h.event);
            out.extend_from_slice(&restored.unwrap_or(h.event));
        }
    }

    /// One whole event: restored and sent, held, or merged with the one held.
    fn event(&mut self, mut event: Vec<u8>, out: &mut Vec<u8>) {
        if let Some(h) = self.held.take() {
            let strings = data_strings(&event);
            match strings.iter().find(|(_, t)| *t == h.text) {
                Some((range, _)) => {
                    // The held text goes in front of this event's: one event, the placeholder
                    // whole.
                    let joined = event
                        .get(range.clone())
                        .and_then(decode)
                        .map(|v| {
                            let mut s = h.value.clone();
                            s.push_str(&v);
                            s
                        })
                        .and_then(|s| serde_json::to_vec(&s).ok());
                    match joined {
                        Some(encoded) => {
                            event.splice(range.clone(), encoded);
                        }
                        None => {
                            self.held = Some(h);
                            self.flush_held(out);
                        }
                    }
                }
                None => {
                    self.held = Some(h);
                    self.flush_held(out);
                }
            }
        }
        // The text ends with the start of a placeholder: held for the next event of it.
        for (range, text) in data_strings(&event) {
            let Some(value) = event.get(range).and_then(decode) else {
                continue;
            };
            if self.ends_partial(&value) {
                let value = value.into_owned();
                self.held = Some(Held { event, text, value });
                return;
            }
        }
        let restored = self.restore_event(&event);
        out.extend_from_slice(&restored.unwrap_or(event));
    }

    /// Whether `s` ends with the start (not the whole) of a placeholder.
    fn ends_partial(&self, s: &str) -> bool {
        let tail = s.len().saturating_sub(40);
        let Some(at) = s
            .as_bytes()
            .get(tail..)
            .and_then(|t| t.iter().rposition(|b| *b == b'<'))
        else {
            return false;
        };
        s.get(tail.saturating_add(at)..)
            .is_some_and(|start| self.placeholders.starts_one(start))
    }

    /// `event` with the placeholders of its data restored (`None`: nothing to restore).
    fn restore_event(&mut self, event: &[u8]) -> Option<Vec<u8>> {
        let ranges: Vec<(Range<usize>, Text)> = data_strings(event);
        self.restore_strings(event, &ranges)
    }

    /// `bytes` with the placeholders of its strings (`ranges`) restored.
    fn restore_strings(
        &mut self,
        bytes: &[u8],
        ranges: &[(Range<usize>, Text)],
    ) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        let mut at = 0;
        // The Responses API streams a tool call's arguments as `delta` of its own event type.
        let arguments_event = bytes
            .windows(ARGUMENTS_EVENT.len())
            .any(|w| w == ARGUMENTS_EVENT);
        for (range, text) in ranges {
            let Some(token) = bytes.get(range.clone()) else {
                continue;
            };
            if !token.contains(&b'<') && !token.contains(&b'\\') {
                continue;
            }
            let Some(value) = decode(token) else {
                continue;
            };
            let json_text = text
                .key
                .as_deref()
                .is_some_and(|k| JSON_TEXT_KEYS.contains(&k) || (arguments_event && k == "delta"));
            let Some(restored) = self.restore_text(&value, json_text) else {
                continue;
            };
            let Ok(encoded) = serde_json::to_vec(&restored) else {
                continue;
            };
            let o = out.get_or_insert_with(|| Vec::with_capacity(bytes.len()));
            o.extend_from_slice(bytes.get(at..range.start).unwrap_or_default());
            o.extend_from_slice(&encoded);
            at = range.end;
        }
        let mut o = out?;
        o.extend_from_slice(bytes.get(at..).unwrap_or_default());
        Some(o)
    }

    /// `s` with each placeholder replaced by its value (`json_text`: escaped for a JSON
    /// string); `None` when it holds none.
    fn restore_text(&mut self, s: &str, json_text: bool) -> Option<String> {
        if !s.contains('<') {
            return None;
        }
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        let mut any = false;
        while let Some(i) = rest.find('<') {
            out.push_str(rest.get(..i).unwrap_or_default());
            let tail = rest.get(i..).unwrap_or_default();
            let end = tail.bytes().take(48).position(|b| b == b'>');
            let found = end
                .and_then(|e| tail.get(..=e))
                .and_then(|p| Some((p.len(), self.placeholders.value(p)?)));
            match found {
                Some((len, v)) => {
                    if json_text {
                        let quoted = serde_json::to_string(v).unwrap_or_default();
                        out.push_str(
                            quoted
                                .get(1..quoted.len().saturating_sub(1))
                                .unwrap_or_default(),
                        );
                    } else {
                        out.push_str(v);
                    }
                    self.restored = self.restored.saturating_add(1);
                    any = true;
                    rest = tail.get(len..).unwrap_or_default();
                }
                None => {
                    out.push('<');
                    rest = tail.get(1..).unwrap_or_default();
                }
            }
        }
        out.push_str(rest);
        any.then_some(out)
    }
}

/// The end (exclusive) of the first whole event in `buf`: after its blank line.
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| i.saturating_add(2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i.saturating_add(4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The value strings of an event's `data:` lines.
fn data_strings(event: &[u8]) -> Vec<(Range<usize>, Text)> {
    let mut out = Vec::new();
    let mut at: usize = 0;
    for line in event.split(|b| *b == b'\n') {
        let start = at;
        at = at.saturating_add(line.len()).saturating_add(1);
        if let Some(payload) = line.strip_prefix(b"data:") {
            let base = start.saturating_add(5);
            out.extend(value_strings(payload, base));
        }
    }
    out
}

/// The value strings (not keys) of the JSON text `json`, offset by `base`, with the key each is
/// the value of and the text's index fields.
fn value_strings(json: &[u8], base: usize) -> Vec<(Range<usize>, Text)> {
    let mut values: Vec<(Range<usize>, Option<String>)> = Vec::new();
    let mut indexes: Vec<(String, String)> = Vec::new();
    let mut key: Option<String> = None;
    for token in super::strings(json) {
        let after = json
            .get(token.end..)
            .unwrap_or_default()
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .map(|i| token.end.saturating_add(i));
        let is_key = after.and_then(|i| json.get(i)) == Some(&b':');
        let decoded = json.get(token.clone()).and_then(decode);
        if is_key {
            let k = decoded.map(|d| d.into_owned());
            if let (Some(k), Some(colon)) = (&k, after) {
                if INDEX_KEYS.contains(&k.as_str()) {
                    let value: Vec<u8> = json
                        .get(colon.saturating_add(1)..)
                        .unwrap_or_default()
                        .iter()
                        .copied()
                        .skip_while(u8::is_ascii_whitespace)
                        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'"' || *b == b'_')
                        .collect();
                    indexes.push((k.clone(), String::from_utf8_lossy(&value).into_owned()));
                }
            }
            key = k;
        } else {
            values.push((
                token.start.saturating_add(base)..token.end.saturating_add(base),
                key.clone(),
            ));
        }
    }
    values
        .into_iter()
        .map(|(r, key)| {
            (
                r,
                Text {
                    key,
                    indexes: indexes.clone(),
                },
            )
        })
        .collect()
}
