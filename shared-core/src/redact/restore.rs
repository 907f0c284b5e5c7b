//! `restore: true`: the redacted values put back where the answer repeats their placeholders,
//! in a JSON answer (read whole) and in an event stream (event by event). A placeholder the
//! provider splits across two events of one text (`<EMA` … `IL_1>`) is restored whole: when an
//! event's text ends with the start of a placeholder, that start (at most
//! [`MAX_PLACEHOLDER`] bytes) is taken off it and carried to the front of the next event of the
//! same text (the same key and index fields); if that text has no next event, the start is sent
//! on its own (a copy of its event) before whatever comes next. Only what a placeholder can be
//! is ever held, and every event is sent as soon as it is read.
//!
//! Restoring is for the client's convenience, not a guard: anything it cannot read (a compressed
//! or oversized answer, a placeholder split across texts the provider interleaves) passes with
//! the placeholder, never with another value.

use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;

use super::{decode, Placeholders};

/// The longest placeholder start carried to the next event (`<PRIVATE_KEY_4294967295>` is 24).
pub const MAX_PLACEHOLDER: usize = 40;

/// The keys of index fields that tell the texts of one answer apart (choices, content blocks,
/// output items, tool calls).
const INDEX_KEYS: &[&str] = &["index", "output_index", "content_index", "item_id"];

/// Keys whose string value is JSON text (tool-call arguments): a value restored into it is
/// escaped as a JSON string's content.
const JSON_TEXT_KEYS: &[&str] = &["arguments", "partial_json"];

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

/// The strings of one JSON text: each value string's range and key, and the text's index fields
/// (which text of the answer it is).
#[derive(Debug, Default)]
struct Strings {
    values: Vec<Value>,
    indexes: Vec<(String, String)>,
}

/// One value string.
#[derive(Debug)]
struct Value {
    range: Range<usize>,
    key: Option<String>,
    /// Its content is JSON (tool-call arguments).
    json_text: bool,
}

/// A placeholder's start taken off the end of an event's text, for the next event of that text.
#[derive(Debug)]
struct Carry {
    /// The event it was taken from, and the string's range in it (to send the start on its own
    /// if the text has no next event).
    event: Vec<u8>,
    range: Range<usize>,
    key: Option<String>,
    indexes: Vec<(String, String)>,
    /// The placeholder's start.
    start: String,
}

/// Puts a request's redacted values back into its answer.
#[derive(Debug)]
pub struct Restorer {
    placeholders: Placeholders,
    mode: Mode,
    buf: Vec<u8>,
    carry: Option<Carry>,
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
            carry: None,
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
                self.restore_strings(&body, &strings.values).unwrap_or(body)
            }
            Mode::Events => {
                // Where the next event is looked for: the unread bytes are never scanned twice.
                let scanned = self.buf.len().saturating_sub(3);
                self.buf.extend_from_slice(chunk);
                let mut out = Vec::new();
                let mut at = 0;
                let mut from = scanned;
                while let Some(n) = event_end(self.buf.get(from..).unwrap_or_default()) {
                    let end_at = from.saturating_add(n);
                    let event = self.buf.get(at..end_at).unwrap_or_default().to_vec();
                    self.event(event, &mut out);
                    at = end_at;
                    from = end_at;
                }
                self.buf.drain(..at.min(self.buf.len()));
                if self.buf.len() > self.max {
                    // An event this long is not one a provider sends: passed as it is.
                    self.flush(&mut out);
                    out.append(&mut self.buf);
                }
                if end {
                    let last = core::mem::take(&mut self.buf);
                    if !last.is_empty() {
                        self.event(last, &mut out);
                    }
                    self.flush(&mut out);
                }
                out
            }
        }
    }

    /// Sends a carried placeholder start on its own: a copy of its event with only it as text.
    fn flush(&mut self, out: &mut Vec<u8>) {
        let Some(c) = self.carry.take() else {
            return;
        };
        let Ok(encoded) = serde_json::to_vec(&c.start) else {
            return;
        };
        let mut event = c.event;
        if event.get(c.range.clone()).is_some() {
            event.splice(c.range, encoded);
            out.extend_from_slice(&event);
        }
    }

    /// One whole event: the carried start put in front of its text (or sent before it), then
    /// restored and sent, a new placeholder start at its end carried.
    fn event(&mut self, mut event: Vec<u8>, out: &mut Vec<u8>) {
        if let Some(c) = self.carry.take() {
            let strings = data_strings(&event);
            let same = (strings.indexes == c.indexes)
                .then(|| strings.values.iter().find(|v| v.key == c.key))
                .flatten();
            let joined = same.and_then(|v| {
                let text = decode(event.get(v.range.clone())?)?;
                let mut s = c.start.clone();
                s.push_str(&text);
                Some((v.range.clone(), serde_json::to_vec(&s).ok()?))
            });
            match joined {
                Some((range, encoded)) => {
                    event.splice(range, encoded);
                }
                None => {
                    self.carry = Some(c);
                    self.flush(out);
                }
            }
        }
        let strings = data_strings(&event);
        let mut carry = None;
        for v in &strings.values {
            let Some(text) = event.get(v.range.clone()).and_then(decode) else {
                continue;
            };
            if let Some(at) = self.partial_start(&text) {
                if let (Some(head), Some(start)) = (text.get(..at), text.get(at..)) {
                    if let Ok(encoded) = serde_json::to_vec(head) {
                        carry = Some((
                            v.range.clone(),
                            encoded,
                            Carry {
                                event: Vec::new(),
                                range: v.range.clone(),
                                key: v.key.clone(),
                                indexes: strings.indexes.clone(),
                                start: String::from(start),
                            },
                        ));
                    }
                }
                break;
            }
        }
        match carry {
            Some((range, head, mut c)) => {
                // The event is sent now without the start; the start goes with the next one.
                c.event = event.clone();
                event.splice(range, head);
                let strings = data_strings(&event);
                let restored = self.restore_strings(&event, &strings.values);
                out.extend_from_slice(&restored.unwrap_or(event));
                self.carry = Some(c);
            }
            None => {
                let restored = self.restore_strings(&event, &strings.values);
                out.extend_from_slice(&restored.unwrap_or(event));
            }
        }
    }

    /// Where `s` ends with the start (not the whole) of a placeholder: that start's offset.
    fn partial_start(&self, s: &str) -> Option<usize> {
        let tail = s.len().saturating_sub(MAX_PLACEHOLDER);
        let at = s.as_bytes().get(tail..)?.iter().rposition(|b| *b == b'<')?;
        let at = tail.saturating_add(at);
        s.get(at..)
            .is_some_and(|start| self.placeholders.starts_one(start))
            .then_some(at)
    }

    /// `bytes` with the placeholders of its strings (`values`) restored (`None`: nothing to
    /// restore).
    fn restore_strings(&mut self, bytes: &[u8], values: &[Value]) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        let mut at = 0;
        for v in values {
            let Some(token) = bytes.get(v.range.clone()) else {
                continue;
            };
            if !token.contains(&b'<') && !token.contains(&b'\\') {
                continue;
            }
            let Some(text) = decode(token) else {
                continue;
            };
            let Some(restored) = self.restore_text(&text, v.json_text) else {
                continue;
            };
            let Ok(encoded) = serde_json::to_vec(&restored) else {
                continue;
            };
            let o = out.get_or_insert_with(|| Vec::with_capacity(bytes.len()));
            o.extend_from_slice(bytes.get(at..v.range.start).unwrap_or_default());
            o.extend_from_slice(&encoded);
            at = v.range.end;
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
            let end = tail.bytes().take(MAX_PLACEHOLDER).position(|b| b == b'>');
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

/// The length of the first whole event in `buf`, its blank line included.
fn event_end(buf: &[u8]) -> Option<usize> {
    let at = buf.iter().position(|b| *b == b'\n')?;
    let mut i = at;
    // A blank line: `\n\n`, or `\r\n\r\n` (or a mix).
    loop {
        let next = buf.get(i.saturating_add(1)..)?;
        let skip = match next {
            [b'\n', ..] => 1,
            [b'\r', b'\n', ..] => 2,
            _ => {
                let more = next.iter().position(|b| *b == b'\n')?;
                i = i.saturating_add(1).saturating_add(more);
                continue;
            }
        };
        return Some(i.saturating_add(1).saturating_add(skip));
    }
}

/// The value strings of an event's `data:` lines.
fn data_strings(event: &[u8]) -> Strings {
    let mut out = Strings::default();
    let mut at: usize = 0;
    for line in event.split(|b| *b == b'\n') {
        let start = at;
        at = at.saturating_add(line.len()).saturating_add(1);
        if let Some(payload) = line.strip_prefix(b"data:") {
            let s = value_strings(payload, start.saturating_add(5));
            out.values.extend(s.values);
            out.indexes.extend(s.indexes);
        }
    }
    out
}

/// The value strings (not keys) of the JSON text `json`, offset by `base`, with the key each is
/// the value of, and the text's index fields.
fn value_strings(json: &[u8], base: usize) -> Strings {
    let mut out = Strings::default();
    let mut key: Option<String> = None;
    let mut kind: Option<String> = None;
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
            let k = decoded.map(alloc::borrow::Cow::into_owned);
            if let (Some(k), Some(colon)) = (&k, after) {
                if INDEX_KEYS.contains(&k.as_str()) {
                    let value: Vec<u8> = json
                        .get(colon.saturating_add(1)..)
                        .unwrap_or_default()
                        .iter()
                        .copied()
                        .skip_while(u8::is_ascii_whitespace)
                        .take(64)
                        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'"' || *b == b'_')
                        .collect();
                    out.indexes
                        .push((k.clone(), String::from_utf8_lossy(&value).into_owned()));
                }
            }
            key = k;
        } else {
            if kind.is_none() && key.as_deref() == Some("type") {
                kind = decoded.map(alloc::borrow::Cow::into_owned);
            }
            out.values.push(Value {
                range: token.start.saturating_add(base)..token.end.saturating_add(base),
                json_text: key.as_deref().is_some_and(|k| JSON_TEXT_KEYS.contains(&k)),
                key: key.clone(),
            });
        }
    }
    // The Responses API streams a tool call's arguments as the `delta` of an arguments event
    // (`response.function_call_arguments.delta`, `response.mcp_call_arguments.delta`).
    if kind
        .as_deref()
        .is_some_and(|t| t.ends_with("arguments.delta"))
    {
        for v in &mut out.values {
            if v.key.as_deref() == Some("delta") {
                v.json_text = true;
            }
        }
    }
    out
}
