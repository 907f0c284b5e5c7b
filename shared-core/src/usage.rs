//! Token usage read from LLM responses as they stream through, without holding them back: the
//! `usage` object of a JSON answer (OpenAI chat / completions / embeddings / responses, Anthropic
//! messages) or the usage events of a server-sent-event stream (OpenAI chunks with
//! `stream_options.include_usage`, the Responses API's `response.completed`, Anthropic's
//! `message_start` and `message_delta`). Used by the filter and by the server's ext_proc edge.
//!
//! Memory is bounded and small whatever the answer: the provider puts `usage` at the end of a
//! JSON answer and in short SSE events, so only the last [`TAIL_BYTES`] of the JSON body, and of
//! each SSE line, are kept; at the end the last `"usage":` object in them is parsed. A large
//! answer therefore costs a few KiB, not a copy (thousands of streams at once must not run the
//! filter's VM out of memory).
//!
//! A stream also has its generated text counted as it passes ([`Reading::streamed_output`]):
//! when the usage never comes (a stream cut by the client or the upstream, a provider that does
//! not report it) the text that did stream is still charged.

use alloc::vec::Vec;

use memchr::memmem;
use serde::Deserialize;
use serde_json::Value;

/// Bytes kept from the end of a JSON answer, or of one SSE line: enough for what follows
/// `usage` in the providers' answers (the Responses API echoes `user` and `metadata` after it,
/// at most 16 pairs of 64 + 512 characters).
pub const TAIL_BYTES: usize = 16 * 1024;

/// Token counts of one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Every prompt / input token, cached ones included (Anthropic: input plus cache reads
    /// and writes).
    pub input: f64,
    /// The part of `input` read from the provider's prompt cache.
    pub cached_input: f64,
    /// The part of `input` written to the prompt cache (Anthropic `cache_creation_input_tokens`).
    pub cache_write: f64,
    /// Completion / output tokens (reasoning tokens included).
    pub output: f64,
    /// The provider's total, when it gives one.
    pub total: Option<f64>,
}

impl Usage {
    /// Every token of the answer.
    pub fn tokens(&self) -> f64 {
        self.total.unwrap_or(self.input + self.output)
    }
}

#[derive(Debug, Default, Deserialize)]
struct Details {
    cached_tokens: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
struct Fields {
    prompt_tokens: Option<f64>,
    completion_tokens: Option<f64>,
    total_tokens: Option<f64>,
    input_tokens: Option<f64>,
    output_tokens: Option<f64>,
    cache_creation_input_tokens: Option<f64>,
    cache_read_input_tokens: Option<f64>,
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
}

impl Fields {
    /// No count at all (`{}`, or an object of other keys): not a usage object.
    fn is_empty(&self) -> bool {
        [
            self.prompt_tokens,
            self.completion_tokens,
            self.total_tokens,
            self.input_tokens,
            self.output_tokens,
            self.cache_creation_input_tokens,
            self.cache_read_input_tokens,
        ]
        .iter()
        .all(Option::is_none)
    }
}

/// The last [`TAIL_BYTES`] of a byte stream.
#[derive(Debug, Default)]
pub struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        if bytes.len() >= TAIL_BYTES {
            self.0.clear();
            self.0.extend_from_slice(
                bytes
                    .get(bytes.len().saturating_sub(TAIL_BYTES)..)
                    .unwrap_or_default(),
            );
            return;
        }
        let keep = TAIL_BYTES.saturating_sub(bytes.len());
        if self.0.len() > keep {
            self.0.drain(..self.0.len().saturating_sub(keep));
        }
        self.0.extend_from_slice(bytes);
    }

    /// The bytes kept.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// What an answer said once it ended (or was cut).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reading {
    /// The provider's usage, if it gave one.
    pub usage: Option<Usage>,
    /// Output tokens counted from a stream's generated text (`None`: not a stream).
    pub streamed_output: Option<f64>,
    /// A stream reached its end event (OpenAI `[DONE]`, Anthropic `message_stop`, the Responses
    /// API's `response.completed`): its usage is final. A stream cut before it has reported only
    /// part of its usage (Anthropic's `message_start` counts one output token).
    pub complete: bool,
}

/// The state of an SSE stream being read.
#[derive(Debug, Default)]
pub struct SseState {
    /// The tail of the unfinished last line.
    line: Tail,
    /// The unfinished last line's full length.
    line_len: usize,
    /// Its first bytes (whether it is a `data:` line, however long it grows).
    head: Vec<u8>,
    /// What the usage events said so far.
    seen: Option<Usage>,
    /// Output tokens counted from the deltas so far.
    counted: u64,
    /// The stream's end event was seen.
    complete: bool,
}

/// Reads usage from one response body, chunk by chunk.
#[derive(Debug)]
pub enum UsageReader {
    /// A JSON answer: its tail.
    Json(Tail),
    /// A server-sent-event stream.
    Sse(SseState),
    /// Nothing to read (another content type).
    Off,
}

impl UsageReader {
    /// Whether a `content-type` is a server-sent-event stream.
    pub fn is_event_stream(content_type: &str) -> bool {
        let ct = content_type.trim_start();
        let p = "text/event-stream";
        ct.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p))
    }

    /// A reader for a response with these `content-type` and `content-encoding` headers: a
    /// compressed body cannot be read (the engine asks for none: it removes `accept-encoding`
    /// from a request that waits for its usage), and is left [`UsageReader::Off`].
    pub fn for_response(content_type: &str, content_encoding: Option<&str>) -> UsageReader {
        match content_encoding.map(str::trim) {
            Some(e) if !e.is_empty() && !e.eq_ignore_ascii_case("identity") => UsageReader::Off,
            _ => UsageReader::new(content_type),
        }
    }

    /// A reader for a response of this `content-type`.
    pub fn new(content_type: &str) -> UsageReader {
        let ct = content_type.trim_start();
        let starts = |p: &str| ct.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p));
        if UsageReader::is_event_stream(ct) {
            UsageReader::Sse(SseState::default())
        } else if starts("application/json") || ct.is_empty() {
            UsageReader::Json(Tail::default())
        } else {
            UsageReader::Off
        }
    }

    /// The next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        match self {
            UsageReader::Json(tail) => tail.push(chunk),
            UsageReader::Sse(s) => {
                for piece in chunk.split_inclusive(|b| *b == b'\n') {
                    s.line.push(piece);
                    if s.head.len() < 5 {
                        let room = 5usize.saturating_sub(s.head.len());
                        s.head.extend_from_slice(
                            piece.get(..room.min(piece.len())).unwrap_or_default(),
                        );
                    }
                    s.line_len = s.line_len.saturating_add(piece.len());
                    if piece.last() == Some(&b'\n') {
                        s.end_line();
                    }
                }
            }
            UsageReader::Off => {}
        }
    }

    /// What the answer said, once the body has ended or was cut.
    pub fn finish(self) -> Reading {
        match self {
            UsageReader::Json(tail) => {
                let mut seen = None;
                merge(&mut seen, &tail.0);
                Reading {
                    complete: seen.is_some(),
                    usage: seen,
                    streamed_output: None,
                }
            }
            UsageReader::Sse(mut s) => {
                s.end_line();
                Reading {
                    usage: s.seen,
                    streamed_output: Some(s.counted as f64),
                    complete: s.complete,
                }
            }
            UsageReader::Off => Reading::default(),
        }
    }
}

impl SseState {
    /// One whole line (its tail) has arrived.
    fn end_line(&mut self) {
        let full = self.line_len;
        self.line_len = 0;
        if self.head.as_slice() == b"data:" {
            let line = self.line.bytes();
            let data = line.strip_prefix(b"data:").unwrap_or(line);
            merge(&mut self.seen, data);
            self.counted = self.counted.saturating_add(delta_tokens(data, full));
            let trimmed = trim_start(data);
            self.complete |= trimmed.starts_with(b"[DONE]")
                || memmem::find(data, b"\"type\":\"message_stop\"").is_some()
                || memmem::find(data, b"\"type\":\"response.completed\"").is_some();
        }
        self.head.clear();
        self.line.0.clear();
    }
}

/// The keys whose string values are generated text in a stream's events: OpenAI chat deltas
/// (`content`, `reasoning_content`, `refusal`, tool calls' `arguments`), completions' `text`,
/// the Responses API's `delta`, Anthropic's `text`, `thinking` and `partial_json` deltas.
const TEXT_KEYS: &[&[u8]] = &[
    b"content",
    b"text",
    b"arguments",
    b"partial_json",
    b"thinking",
    b"reasoning_content",
    b"refusal",
    b"delta",
];

/// Output tokens of one SSE `data:` payload: the generated text it carries, estimated like a
/// prompt. One pass over the line finds each `"key":` whose key is a text key and whose value
/// is a string (a key inside a string value has escaped quotes, so text cannot forge one); the
/// string is decoded (escapes, `\u` sequences) before it is estimated. A line too long to keep
/// whole counts a token per 4 bytes of it.
fn delta_tokens(data: &[u8], full_len: usize) -> u64 {
    if full_len > TAIL_BYTES {
        return u64::try_from(full_len.div_ceil(4)).unwrap_or(u64::MAX);
    }
    let mut tokens = 0u64;
    let mut from = 0usize;
    while let Some(rel) = data.get(from..).and_then(|rest| memchr::memchr(b':', rest)) {
        let colon = from.saturating_add(rel);
        from = colon.saturating_add(1);
        if colon == 0 || data.get(colon.saturating_sub(1)) != Some(&b'"') {
            continue;
        }
        // The key: back from its closing quote to its opening one.
        let before = data.get(..colon.saturating_sub(1)).unwrap_or_default();
        let Some(open) = before.iter().rposition(|b| *b == b'"') else {
            continue;
        };
        let key = before.get(open.saturating_add(1)..).unwrap_or_default();
        if !TEXT_KEYS.contains(&key) {
            continue;
        }
        let value = trim_start(data.get(colon.saturating_add(1)..).unwrap_or_default());
        let Some(len) = string_literal_len(value) else {
            continue;
        };
        let literal = value.get(..len).unwrap_or_default();
        if let Ok(text) = serde_json::from_slice::<alloc::borrow::Cow<'_, str>>(literal) {
            tokens = tokens.saturating_add(crate::tokens::estimate(&text));
        }
        from = colon.saturating_add(len);
    }
    tokens
}

/// The length of the JSON string literal `b` starts with (quotes included), if it is one.
fn string_literal_len(b: &[u8]) -> Option<usize> {
    if b.first() != Some(&b'"') {
        return None;
    }
    let mut i = 1usize;
    while let Some(c) = b.get(i) {
        match c {
            b'\\' => i = i.saturating_add(2),
            b'"' => return Some(i.saturating_add(1)),
            _ => i = i.saturating_add(1),
        }
    }
    None
}

/// Whether one SSE event (its lines, without the blank line that ends it) is an OpenAI
/// chat-completion chunk that carries only usage (`"choices": []` and a `usage` object): the
/// chunk `stream_options.include_usage` adds at the end of a stream.
pub fn is_usage_only_chunk(event: &[u8]) -> bool {
    let mut data = None;
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(d) = line.strip_prefix(b"data:") {
            if data.is_some() {
                return false;
            }
            data = Some(trim_start(d));
        }
    }
    let Some(data) = data else {
        return false;
    };
    // Most events carry text, not a usage object: no parse for them.
    let has = |pat: &[u8]| memmem::find(data, pat).is_some();
    if !has(b"\"usage\"") || !has(b"\"choices\"") || has(b"\"usage\":null") {
        return false;
    }
    #[derive(Deserialize)]
    struct Chunk {
        choices: Vec<Value>,
        usage: Option<Value>,
    }
    matches!(
        serde_json::from_slice::<Chunk>(data),
        Ok(Chunk { choices, usage: Some(Value::Object(_)) }) if choices.is_empty()
    )
}

/// Most bytes of one unfinished SSE event [`UsageChunkStripper`] holds back; an event larger
/// than this passes as it is (and the stripper stops looking).
pub const MAX_HELD_EVENT: usize = 64 * 1024;

/// Removes the usage-only chunk from an OpenAI stream whose client did not ask for usage (the
/// filter added `stream_options.include_usage` on the way up): every other byte passes as it
/// came, in order. Whole events pass at once; only the unfinished last event of a chunk is held
/// back until the next chunk completes it (at most [`MAX_HELD_EVENT`] bytes).
#[derive(Debug, Default)]
pub struct UsageChunkStripper {
    held: Vec<u8>,
    off: bool,
    /// Whether a usage chunk was removed.
    pub stripped: bool,
}

impl UsageChunkStripper {
    /// The bytes to pass on for this chunk (`end`: the body ends with it).
    pub fn pass(&mut self, chunk: &[u8], end: bool) -> Vec<u8> {
        if self.off {
            let mut out = core::mem::take(&mut self.held);
            out.extend_from_slice(chunk);
            return out;
        }
        self.held.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(self.held.len());
        let mut start = 0;
        while let Some((event_end, next)) = event_end(self.held.get(start..).unwrap_or_default()) {
            let event = self
                .held
                .get(start..start.saturating_add(event_end))
                .unwrap_or_default();
            if is_usage_only_chunk(event) {
                self.stripped = true;
            } else {
                let whole = self.held.get(start..start.saturating_add(next));
                out.extend_from_slice(whole.unwrap_or_default());
            }
            start = start.saturating_add(next);
        }
        self.held.drain(..start);
        if end || self.held.len() > MAX_HELD_EVENT {
            self.off = !end;
            out.append(&mut self.held);
        }
        out
    }
}

/// Where the first SSE event of `bytes` ends: (end of its lines, start of the next event).
pub(crate) fn event_end(bytes: &[u8]) -> Option<(usize, usize)> {
    let lf = memmem::find(bytes, b"\n\n");
    let crlf = memmem::find(bytes, b"\r\n\r\n");
    match (lf, crlf) {
        (Some(a), Some(b)) if b < a => Some((b, b.saturating_add(4))),
        (Some(a), _) => Some((a, a.saturating_add(2))),
        (None, Some(b)) => Some((b, b.saturating_add(4))),
        (None, None) => None,
    }
}

/// Finds the last `"usage"` key in `text` whose value is a usage object and adds it (a
/// `"usage"` key the client put in echoed fields, `metadata` say, with another value is passed
/// over). Counts are cumulative in every provider's stream, so the largest value seen wins.
fn merge(seen: &mut Option<Usage>, text: &[u8]) {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = text.len();
    while let Some(at) = text.get(..end).and_then(|t| memmem::rfind(t, KEY)) {
        end = at;
        let rest = trim_start(text.get(at.saturating_add(KEY.len())..).unwrap_or_default());
        let Some(rest) = rest.strip_prefix(b":") else {
            continue;
        };
        // The object that follows, up to wherever it ends (the rest of the line is ignored).
        let mut values =
            serde_json::Deserializer::from_slice(trim_start(rest)).into_iter::<Fields>();
        let Some(Ok(f)) = values.next() else {
            continue;
        };
        if f.is_empty() {
            continue;
        }
        add(seen, &f);
        return;
    }
}

/// Adds one usage object to what was seen.
fn add(seen: &mut Option<Usage>, f: &Fields) {
    let u = seen.get_or_insert_with(Usage::default);
    let read = f.cache_read_input_tokens.unwrap_or(0.0);
    let write = f.cache_creation_input_tokens.unwrap_or(0.0);
    let input = f.prompt_tokens.unwrap_or(0.0) + f.input_tokens.unwrap_or(0.0) + write + read;
    let cached = read
        + [&f.prompt_tokens_details, &f.input_tokens_details]
            .into_iter()
            .flatten()
            .filter_map(|d| d.cached_tokens)
            .sum::<f64>();
    let output = f.completion_tokens.unwrap_or(0.0) + f.output_tokens.unwrap_or(0.0);
    u.input = u.input.max(finite(input));
    u.cached_input = u.cached_input.max(finite(cached)).min(u.input);
    u.cache_write = u.cache_write.max(finite(write)).min(u.input);
    u.output = u.output.max(finite(output));
    if let Some(t) = f.total_tokens {
        u.total = Some(u.total.unwrap_or(0.0).max(finite(t)));
    }
}

fn trim_start(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    b.get(n..).unwrap_or_default()
}

fn finite(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 {
        x
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn read(content_type: &str, chunks: &[&[u8]]) -> Option<Usage> {
        let mut r = UsageReader::new(content_type);
        for c in chunks {
            r.feed(c);
        }
        r.finish().usage
    }

    #[test]
    fn json_answers_of_each_api() {
        let openai = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
        let (a, b) = openai.split_at(20);
        assert_eq!(read("application/json", &[a, b]).unwrap().tokens(), 42.0);
        let anthropic = br#"{"content":[{"type":"text","text":"usage"}],"usage":{"input_tokens":10,"cache_read_input_tokens":5,"output_tokens":7}}"#;
        assert_eq!(
            read("application/json; charset=utf-8", &[anthropic])
                .unwrap()
                .tokens(),
            22.0
        );
        let responses =
            br#"{"output":[],"usage":{"input_tokens":3,"output_tokens":4,"total_tokens":7}}"#;
        assert_eq!(
            read("application/json", &[responses]).unwrap().tokens(),
            7.0
        );
        assert_eq!(read("application/json", &[b"{\"choices\":[]}"]), None);
        assert_eq!(read("application/json", &[b"{not json"]), None);
        assert_eq!(read("text/html", &[openai]), None);
    }

    #[test]
    fn sse_streams_of_each_provider_split_anywhere() {
        let openai = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n\
data: [DONE]\n\n";
        let anthropic = b"event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\r\n\r\n\
event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"usage\"}}\r\n\r\n\
event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\r\n\r\n";
        let responses = b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":6,\"total_tokens\":11}}}\n\n";
        for (stream, want) in [
            (&openai[..], 11.0),
            (&anthropic[..], 40.0),
            (&responses[..], 11.0),
        ] {
            for cut in [1, 7, 64, stream.len()] {
                let chunks: Vec<&[u8]> = stream.chunks(cut).collect();
                let got = read("text/event-stream", &chunks).map(|u| u.tokens());
                assert_eq!(got, Some(want), "cut {cut}");
            }
        }
        // No usage events (include_usage not asked): unknown.
        assert_eq!(
            read(
                "text/event-stream",
                &[b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n"]
            ),
            None
        );
    }

    #[test]
    fn hostile_bodies_are_bounded() {
        // A huge JSON answer: only its tail is kept, and its usage at the end is still read.
        let mut r = UsageReader::new("application/json");
        let chunk = vec![b' '; 1024 * 1024];
        r.feed(b"{\"choices\":[{\"text\":\"");
        for _ in 0..9 {
            r.feed(&chunk);
            assert!(matches!(&r, UsageReader::Json(t) if t.0.len() <= TAIL_BYTES));
        }
        r.feed(br#""}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#);
        assert_eq!(r.finish().usage.map(|u| u.tokens()), Some(3.0));
        // An endless SSE line: bounded too; the next lines still read.
        let mut r = UsageReader::new("text/event-stream");
        r.feed(b"data: ");
        for _ in 0..3 {
            r.feed(&chunk);
            assert!(matches!(&r, UsageReader::Sse(s) if s.line.0.len() <= TAIL_BYTES));
        }
        r.feed(b"\ndata: {\"usage\":{\"input_tokens\":1,\"output_tokens\":2}}\n");
        assert_eq!(r.finish().usage.map(|u| u.tokens()), Some(3.0));
        // A usage key inside the text is escaped, so only the real one counts.
        let tricky = br#"{"content":"say \"usage\": {\"total_tokens\": 1}","usage":{"input_tokens":4,"output_tokens":5}}"#;
        assert_eq!(
            read("application/json", &[tricky]).map(|u| u.tokens()),
            Some(9.0)
        );
        // Negative numbers count as nothing; out-of-range ones make the object unreadable.
        let u = read(
            "application/json",
            &[br#"{"usage":{"input_tokens":-5,"output_tokens":2}}"#],
        );
        assert_eq!(u.map(|u| u.tokens()), Some(2.0));
        assert_eq!(
            read(
                "application/json",
                &[br#"{"usage":{"output_tokens":1e400}}"#]
            ),
            None
        );
    }

    #[test]
    fn cached_input_is_read_from_each_provider() {
        let openai = br#"{"usage":{"prompt_tokens":100,"completion_tokens":5,"total_tokens":105,"prompt_tokens_details":{"cached_tokens":60}}}"#;
        let u = read("application/json", &[openai]).unwrap();
        assert_eq!((u.input, u.cached_input, u.output), (100.0, 60.0, 5.0));
        let anthropic = br#"{"usage":{"input_tokens":10,"cache_read_input_tokens":50,"cache_creation_input_tokens":20,"output_tokens":7}}"#;
        let u = read("application/json", &[anthropic]).unwrap();
        assert_eq!(
            (u.input, u.cached_input, u.cache_write, u.output),
            (80.0, 50.0, 20.0, 7.0)
        );
    }

    #[test]
    fn streamed_text_is_counted_when_usage_never_comes() {
        let openai = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hello there\"}}]}\n\n\
data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"function\":{\"arguments\":\"{}\"}}]}}]}\n\n";
        let mut r = UsageReader::new("text/event-stream");
        for c in openai.chunks(5) {
            r.feed(c);
        }
        let got = r.finish();
        assert_eq!(got.usage, None);
        assert_eq!(got.streamed_output, Some(5.0));
        let anthropic = b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"\xe6\x97\xa5\xe6\x9c\xac\"}}\n";
        let mut r = UsageReader::new("text/event-stream; charset=utf-8");
        r.feed(anthropic);
        assert_eq!(r.finish().streamed_output, Some(2.0));
        // A line too long to keep counts by its length.
        let mut r = UsageReader::new("text/event-stream");
        let long: Vec<u8> = [b"data: {\"x\":\"".as_slice(), &[b'a'; 20000], b"\"}\n"].concat();
        r.feed(&long);
        assert_eq!(r.finish().streamed_output, Some(5004.0));
    }

    #[test]
    fn the_usage_only_chunk_is_recognised() {
        assert!(is_usage_only_chunk(
            b"data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":1}}"
        ));
        assert!(!is_usage_only_chunk(
            b"data: {\"choices\":[{\"delta\":{}}],\"usage\":null}"
        ));
        assert!(!is_usage_only_chunk(
            b"data: {\"choices\":[],\"usage\":null}"
        ));
        assert!(!is_usage_only_chunk(b"data: [DONE]"));
        assert!(!is_usage_only_chunk(b"event: x"));
    }

    #[test]
    fn the_usage_chunk_is_removed_wherever_the_stream_is_cut() {
        let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n\
data: [DONE]\n\n";
        let want = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\ndata: [DONE]\n\n";
        for cut in [1, 3, 17, 64, stream.len()] {
            let mut s = UsageChunkStripper::default();
            let chunks: Vec<&[u8]> = stream.chunks(cut).collect();
            let mut out = Vec::new();
            for (i, c) in chunks.iter().enumerate() {
                out.extend(s.pass(c, i + 1 == chunks.len()));
            }
            assert_eq!(out, want.to_vec(), "cut {cut}");
            assert!(s.stripped);
        }
        // A cut stream: what was held passes at the end.
        let mut s = UsageChunkStripper::default();
        let mut out = s.pass(b"data: {\"choices\":[]}\n\ndata: {\"cho", false);
        out.extend(s.pass(b"", true));
        assert_eq!(out, b"data: {\"choices\":[]}\n\ndata: {\"cho".to_vec());
    }
}
