//! Token usage read from LLM responses as they stream through, without holding them back: the
//! `usage` object of a JSON answer (OpenAI chat / completions / embeddings / responses, Anthropic
//! messages) or the usage events of a server-sent-event stream (OpenAI chunks with
//! `stream_options.include_usage`, the Responses API's `response.completed`, Anthropic's
//! `message_start` and `message_delta`).
//!
//! Memory is bounded and small whatever the answer: the provider puts `usage` at the end of a
//! JSON answer and in short SSE events, so only the last [`TAIL_BYTES`] of the JSON body, and of
//! each SSE line, are kept; at the end the last `"usage":` object in them is parsed. A large
//! answer therefore costs the filter a few KiB, not a copy (thousands of streams at once must not
//! run the VM out of memory).

use serde::Deserialize;

/// Bytes kept from the end of a JSON answer, or of one SSE line.
pub const TAIL_BYTES: usize = 4 * 1024;

/// Token counts of one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Prompt / input tokens (Anthropic: cache reads and writes included).
    pub input: f64,
    /// Completion / output tokens.
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
struct Fields {
    prompt_tokens: Option<f64>,
    completion_tokens: Option<f64>,
    total_tokens: Option<f64>,
    input_tokens: Option<f64>,
    output_tokens: Option<f64>,
    cache_creation_input_tokens: Option<f64>,
    cache_read_input_tokens: Option<f64>,
}

/// The last [`TAIL_BYTES`] of a byte stream.
#[derive(Debug, Default)]
pub struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        if bytes.len() >= TAIL_BYTES {
            self.0.clear();
            self.0
                .extend_from_slice(bytes.get(bytes.len() - TAIL_BYTES..).unwrap_or_default());
            return;
        }
        let keep = TAIL_BYTES - bytes.len();
        if self.0.len() > keep {
            self.0.drain(..self.0.len() - keep);
        }
        self.0.extend_from_slice(bytes);
    }
}

/// Reads usage from one response body, chunk by chunk.
#[derive(Debug)]
pub enum UsageReader {
    /// A JSON answer: its tail.
    Json(Tail),
    /// A server-sent-event stream.
    Sse {
        /// The tail of the unfinished last line.
        line: Tail,
        /// What the events said so far.
        seen: Option<Usage>,
    },
    /// Nothing to read (another content type).
    Off,
}

impl UsageReader {
    /// A reader for a response of this `content-type`.
    pub fn new(content_type: &str) -> UsageReader {
        let ct = content_type.to_ascii_lowercase();
        if ct.starts_with("text/event-stream") {
            UsageReader::Sse {
                line: Tail::default(),
                seen: None,
            }
        } else if ct.starts_with("application/json") || ct.is_empty() {
            UsageReader::Json(Tail::default())
        } else {
            UsageReader::Off
        }
    }

    /// The next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        match self {
            UsageReader::Json(tail) => tail.push(chunk),
            UsageReader::Sse { line, seen } => {
                for piece in chunk.split_inclusive(|b| *b == b'\n') {
                    line.push(piece);
                    if piece.last() == Some(&b'\n') {
                        merge(seen, &line.0);
                        line.0.clear();
                    }
                }
            }
            UsageReader::Off => {}
        }
    }

    /// The usage, once the body has ended (`None`: the answer did not say).
    pub fn finish(self) -> Option<Usage> {
        match self {
            UsageReader::Json(tail) => {
                let mut seen = None;
                merge(&mut seen, &tail.0);
                seen
            }
            UsageReader::Sse { line, mut seen } => {
                merge(&mut seen, &line.0);
                seen
            }
            UsageReader::Off => None,
        }
    }
}

/// Finds the last `"usage"` key in `text` and adds its object. Counts are cumulative in every
/// provider's stream, so the largest value seen wins.
fn merge(seen: &mut Option<Usage>, text: &[u8]) {
    const KEY: &[u8] = b"\"usage\"";
    let Some(at) = text.windows(KEY.len()).rposition(|w| w == KEY) else {
        return;
    };
    let rest = text.get(at + KEY.len()..).unwrap_or_default();
    let rest = trim_start(rest);
    let Some(rest) = rest.strip_prefix(b":") else {
        return;
    };
    // The object that follows, up to wherever it ends (the rest of the line is ignored).
    let mut values = serde_json::Deserializer::from_slice(trim_start(rest)).into_iter::<Fields>();
    let Some(Ok(f)) = values.next() else {
        return;
    };
    let u = seen.get_or_insert_with(Usage::default);
    let input = f.prompt_tokens.unwrap_or(0.0)
        + f.input_tokens.unwrap_or(0.0)
        + f.cache_creation_input_tokens.unwrap_or(0.0)
        + f.cache_read_input_tokens.unwrap_or(0.0);
    let output = f.completion_tokens.unwrap_or(0.0) + f.output_tokens.unwrap_or(0.0);
    u.input = u.input.max(finite(input));
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

    fn read(content_type: &str, chunks: &[&[u8]]) -> Option<Usage> {
        let mut r = UsageReader::new(content_type);
        for c in chunks {
            r.feed(c);
        }
        r.finish()
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
        assert_eq!(r.finish().map(|u| u.tokens()), Some(3.0));
        // An endless SSE line: bounded too; the next lines still read.
        let mut r = UsageReader::new("text/event-stream");
        r.feed(b"data: ");
        for _ in 0..3 {
            r.feed(&chunk);
            assert!(matches!(&r, UsageReader::Sse { line, .. } if line.0.len() <= TAIL_BYTES));
        }
        r.feed(b"\ndata: {\"usage\":{\"input_tokens\":1,\"output_tokens\":2}}\n");
        assert_eq!(r.finish().map(|u| u.tokens()), Some(3.0));
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
}
