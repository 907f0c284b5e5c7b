//! Token usage read from LLM responses as they stream through, without holding them back: the
//! `usage` object of a JSON answer (OpenAI chat / completions / embeddings / responses, Anthropic
//! messages) or the usage events of a server-sent-event stream (OpenAI chunks with
//! `stream_options.include_usage`, the Responses API's `response.completed`, Anthropic's
//! `message_start` and `message_delta`).
//!
//! Memory is bounded: a JSON answer is copied up to [`MAX_JSON_BYTES`] (past that its usage is
//! unknown), an SSE line up to [`MAX_LINE_BYTES`] (a longer line is skipped), and only lines that
//! mention `usage` are parsed.

use serde::Deserialize;

/// Largest JSON answer whose usage is read.
pub const MAX_JSON_BYTES: usize = 8 * 1024 * 1024;

/// Longest SSE line kept while it arrives.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

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

#[derive(Debug, Default, Deserialize)]
struct Holder {
    usage: Option<Fields>,
}

/// What carries usage: the answer or event itself, or its `message` (Anthropic `message_start`)
/// or `response` (OpenAI Responses events).
#[derive(Debug, Default, Deserialize)]
struct Carrier {
    usage: Option<Fields>,
    message: Option<Holder>,
    response: Option<Holder>,
}

/// Reads usage from one response body, chunk by chunk.
#[derive(Debug)]
pub enum UsageReader {
    /// A JSON answer (copied until it ends).
    Json {
        /// The bytes so far.
        body: Vec<u8>,
        /// Over the limit: usage unknown.
        overflow: bool,
    },
    /// A server-sent-event stream.
    Sse {
        /// The unfinished last line.
        line: Vec<u8>,
        /// The line is over the limit and skipped until its end.
        skipping: bool,
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
                line: Vec::new(),
                skipping: false,
                seen: None,
            }
        } else if ct.starts_with("application/json") || ct.is_empty() {
            UsageReader::Json {
                body: Vec::new(),
                overflow: false,
            }
        } else {
            UsageReader::Off
        }
    }

    /// The next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        match self {
            UsageReader::Json { body, overflow } => {
                if *overflow || body.len().saturating_add(chunk.len()) > MAX_JSON_BYTES {
                    *overflow = true;
                    body.clear();
                } else {
                    body.extend_from_slice(chunk);
                }
            }
            UsageReader::Sse {
                line,
                skipping,
                seen,
            } => {
                for piece in chunk.split_inclusive(|b| *b == b'\n') {
                    let complete = piece.last() == Some(&b'\n');
                    if !*skipping {
                        if line.len().saturating_add(piece.len()) > MAX_LINE_BYTES {
                            *skipping = true;
                            line.clear();
                        } else {
                            line.extend_from_slice(piece);
                        }
                    }
                    if complete {
                        if !*skipping {
                            sse_line(line, seen);
                        }
                        line.clear();
                        *skipping = false;
                    }
                }
            }
            UsageReader::Off => {}
        }
    }

    /// The usage, once the body has ended (`None`: the answer did not say).
    pub fn finish(self) -> Option<Usage> {
        match self {
            UsageReader::Json { body, overflow } => {
                if overflow {
                    return None;
                }
                let c: Carrier = serde_json::from_slice(&body).ok()?;
                let mut seen = None;
                merge(&mut seen, &c);
                seen
            }
            UsageReader::Sse {
                line,
                skipping,
                mut seen,
            } => {
                if !skipping {
                    sse_line(&line, &mut seen);
                }
                seen
            }
            UsageReader::Off => None,
        }
    }
}

/// One SSE line: `data: {json}` lines that mention usage are read.
fn sse_line(line: &[u8], seen: &mut Option<Usage>) {
    let text = line.strip_suffix(b"\n").unwrap_or(line);
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    let Some(data) = text.strip_prefix(b"data:") else {
        return;
    };
    if !contains(data, b"usage") {
        return;
    }
    if let Ok(c) = serde_json::from_slice::<Carrier>(data) {
        merge(seen, &c);
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Adds what one answer or event says. Counts are cumulative in every provider's stream, so the
/// largest value seen wins.
fn merge(seen: &mut Option<Usage>, c: &Carrier) {
    for f in [
        c.usage.as_ref(),
        c.message.as_ref().and_then(|m| m.usage.as_ref()),
        c.response.as_ref().and_then(|r| r.usage.as_ref()),
    ]
    .into_iter()
    .flatten()
    {
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
        // A huge JSON answer: not kept, usage unknown.
        let mut r = UsageReader::new("application/json");
        let chunk = vec![b' '; 1024 * 1024];
        for _ in 0..9 {
            r.feed(&chunk);
        }
        assert!(matches!(&r, UsageReader::Json { body, overflow: true } if body.is_empty()));
        assert_eq!(r.finish(), None);
        // An endless SSE line: skipped, the next lines still read.
        let mut r = UsageReader::new("text/event-stream");
        r.feed(b"data: ");
        for _ in 0..3 {
            r.feed(&chunk);
        }
        r.feed(b"\ndata: {\"usage\":{\"input_tokens\":1,\"output_tokens\":2}}\n");
        assert_eq!(r.finish().map(|u| u.tokens()), Some(3.0));
        // Negative numbers count as nothing; out-of-range ones make the answer unreadable.
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
