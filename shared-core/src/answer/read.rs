//! What an answer says, in every provider's format: the text the client reads, the tools the
//! model called, why it stopped and the output tokens reported. From a whole JSON answer, or
//! from one server-sent event of a stream (OpenAI chat and completions chunks, the Responses
//! API's events, Anthropic's events).
//!
//! Only what the model generated is read: the Responses API echoes the request (`instructions`,
//! tool definitions, `metadata`) in its answers and in `response.created`, and repeats the
//! whole text in its `.done` and `response.completed` events; none of that is read twice or
//! taken for the answer.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde_json::{Map, Value};

/// What one answer (JSON) or one event (stream) says.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Said {
    /// The text, its pieces joined with newlines (a whole answer) or as they come (deltas).
    pub text: String,
    /// The text of each channel it came on, in order: a stream interleaves the text of several
    /// choices (OpenAI `n`), content blocks or output items, and each is read as its own text
    /// (`(channel, text)`; a whole answer is one channel).
    pub pieces: Vec<(u32, String)>,
    /// Names of the tools called.
    pub tools: Vec<String>,
    /// Why the model stopped.
    pub finish: Option<String>,
    /// Output tokens reported.
    pub output_tokens: Option<i64>,
    /// The event is an error the provider reported (it passes as it is).
    pub error: bool,
    /// Pieces of a whole answer are separated by newlines; deltas are joined as they come.
    whole: bool,
}

/// Keys whose strings are never text the client reads as the answer: ids, enumerations,
/// opaque provider data and media.
const NOT_TEXT: &[&str] = &[
    "id",
    "type",
    "status",
    "call_id",
    "tool_use_id",
    "role",
    "name",
    "encrypted_content",
    "encrypted_index",
    "signature",
    "data",
    "result",
    "partial_image_b64",
    "server_label",
    "approval_request_id",
    "media_type",
    "mime_type",
    "file_id",
    "container_id",
];

/// How deep a tool result's strings are followed (the JSON parser bounds nesting anyway).
const MAX_DEPTH: usize = 32;

/// Channels of one choice or output item (its text, its tool calls or content parts).
const CHANNELS_PER_PART: u32 = 1024;

/// A channel number from an index the provider sent (bounded: an index past the last channel
/// shares it).
fn channel(index: u64) -> u32 {
    u32::try_from(index.min(u64::from(CHANNELS_PER_PART.saturating_sub(2)))).unwrap_or(0)
}

/// The `index` of an object (a choice, a content block), as a channel.
fn index_of(v: &Value, key: &str) -> u32 {
    channel(v.get(key).and_then(Value::as_u64).unwrap_or(0))
}

impl Said {
    /// What a piece that is not JSON says: all of it is text.
    pub(super) fn raw(bytes: &[u8]) -> Said {
        let mut said = Said::default();
        said.piece(&String::from_utf8_lossy(bytes));
        said
    }

    fn piece(&mut self, s: &str) {
        self.piece_on(0, s);
    }

    fn piece_on(&mut self, channel: u32, s: &str) {
        if s.is_empty() {
            return;
        }
        if self.whole && !self.text.is_empty() {
            self.text.push('\n');
        }
        self.text.push_str(s);
        match self.pieces.last_mut() {
            Some((c, t)) if *c == channel => t.push_str(s),
            _ => self.pieces.push((channel, String::from(s))),
        }
    }

    fn tool(&mut self, name: Option<&Value>) {
        if let Some(n) = name.and_then(Value::as_str).filter(|n| !n.is_empty()) {
            self.tools.push(crate::fold::fold(n));
        }
    }

    fn usage(&mut self, usage: Option<&Value>) {
        let Some(u) = usage else {
            return;
        };
        let n = u
            .get("completion_tokens")
            .or_else(|| u.get("output_tokens"))
            .and_then(Value::as_i64);
        if n.is_some() {
            self.output_tokens = n;
        }
    }

    fn finish(&mut self, reason: Option<&Value>) {
        if let Some(r) = reason.and_then(Value::as_str) {
            self.finish = Some(r.to_string());
        }
    }

    /// Every string under `v` but those of [`NOT_TEXT`] keys (tool results, unknown blocks).
    fn strings(&mut self, v: &Value, depth: usize) {
        if depth > MAX_DEPTH {
            return;
        }
        match v {
            Value::String(s) => self.piece(s),
            Value::Array(a) => a
                .iter()
                .for_each(|x| self.strings(x, depth.saturating_add(1))),
            Value::Object(m) => {
                for (k, x) in m {
                    if !NOT_TEXT.contains(&k.as_str()) {
                        self.strings(x, depth.saturating_add(1));
                    }
                }
            }
            _ => {}
        }
    }

    /// An OpenAI chat message or delta of choice `choice`: its text on one channel, each tool
    /// call's arguments on their own.
    fn chat_message(&mut self, m: &Map<String, Value>, choice: u32) {
        let ch = choice.saturating_mul(CHANNELS_PER_PART);
        let text = |key: &str| m.get(key).and_then(Value::as_str).unwrap_or_default();
        match m.get("content") {
            Some(Value::String(s)) => self.piece_on(ch, s),
            Some(Value::Array(parts)) => {
                for p in parts {
                    self.piece_on(
                        ch,
                        p.get("text").and_then(Value::as_str).unwrap_or_default(),
                    );
                }
            }
            _ => {}
        }
        for key in ["refusal", "reasoning_content", "reasoning"] {
            self.piece_on(ch, text(key));
        }
        if let Some(t) = m.get("audio").and_then(|a| a.get("transcript")) {
            self.piece_on(ch, t.as_str().unwrap_or_default());
        }
        let calls = m.get("tool_calls").and_then(Value::as_array);
        for (i, call) in calls.into_iter().flatten().enumerate() {
            let index = call
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(i as u64);
            let tool_ch = ch.saturating_add(channel(index).saturating_add(1));
            for inner in ["function", "custom"] {
                if let Some(f) = call.get(inner) {
                    self.tool(f.get("name"));
                    for key in ["arguments", "input"] {
                        let arg = f.get(key).and_then(Value::as_str).unwrap_or_default();
                        self.piece_on(tool_ch, arg);
                    }
                }
            }
        }
        if let Some(f) = m.get("function_call") {
            self.tool(f.get("name"));
            let args = f
                .get("arguments")
                .and_then(Value::as_str)
                .unwrap_or_default();
            self.piece_on(ch.saturating_add(1), args);
        }
    }

    /// An Anthropic content block (on channel `ch`, its index).
    fn block(&mut self, b: &Value, ch: u32) {
        let text = |key: &str| b.get(key).and_then(Value::as_str).unwrap_or_default();
        match b.get("type").and_then(Value::as_str).unwrap_or_default() {
            "text" => self.piece_on(ch, text("text")),
            "thinking" => self.piece_on(ch, text("thinking")),
            "redacted_thinking" => {}
            "tool_use" | "server_tool_use" | "mcp_tool_use" => {
                self.tool(b.get("name"));
                match b.get("input") {
                    Some(Value::Object(m)) if m.is_empty() => {}
                    Some(input @ Value::Object(_)) => {
                        self.piece_on(ch, &serde_json::to_string(input).unwrap_or_default());
                    }
                    _ => {}
                }
            }
            _ => {
                let mut inner = Said {
                    whole: self.whole,
                    ..Said::default()
                };
                inner.strings(b, 0);
                self.piece_on(ch, &inner.text);
            }
        }
    }

    /// A Responses API output item.
    fn item(&mut self, item: &Value) {
        let kind = item.get("type").and_then(Value::as_str).unwrap_or_default();
        if kind.ends_with("_call") {
            self.tool(item.get("name"));
        }
        self.strings(item, 0);
    }
}

/// What a whole JSON answer says.
pub fn answer(v: &Value) -> Said {
    let mut said = Said {
        whole: true,
        ..Said::default()
    };
    let Some(o) = v.as_object() else {
        return said;
    };
    if let Some(choices) = o.get("choices").and_then(Value::as_array) {
        for c in choices {
            if let Some(m) = c.get("message").and_then(Value::as_object) {
                said.chat_message(m, 0);
            }
            said.piece(c.get("text").and_then(Value::as_str).unwrap_or_default());
            said.finish(c.get("finish_reason"));
        }
    } else if let Some(content) = o.get("content").and_then(Value::as_array) {
        content.iter().for_each(|b| said.block(b, 0));
        said.finish(o.get("stop_reason"));
    } else if let Some(output) = o.get("output").and_then(Value::as_array) {
        output.iter().for_each(|item| said.item(item));
        responses_end(&mut said, v);
    }
    said.usage(o.get("usage"));
    said.error = o.contains_key("error") && !o.contains_key("choices");
    said
}

/// Why a Responses API answer ended: the reason it is incomplete, else its status.
fn responses_end(said: &mut Said, response: &Value) {
    let reason = response
        .get("incomplete_details")
        .and_then(|d| d.get("reason"))
        .filter(|r| r.is_string())
        .or_else(|| response.get("status"));
    said.finish(reason);
}

/// What one stream event's `data` says.
pub fn event(v: &Value) -> Said {
    let mut said = Said::default();
    let Some(o) = v.as_object() else {
        return said;
    };
    if let Some(choices) = o.get("choices").and_then(Value::as_array) {
        // OpenAI chat (`delta`) and completions (`text`) chunks.
        for c in choices {
            let choice = index_of(c, "index");
            if let Some(m) = c.get("delta").and_then(Value::as_object) {
                said.chat_message(m, choice);
            }
            said.piece_on(
                choice.saturating_mul(CHANNELS_PER_PART),
                c.get("text").and_then(Value::as_str).unwrap_or_default(),
            );
            said.finish(c.get("finish_reason"));
        }
        said.usage(o.get("usage"));
        return said;
    }
    let kind = o.get("type").and_then(Value::as_str).unwrap_or_default();
    match kind {
        // Anthropic.
        "message_start" => {
            let m = o.get("message");
            if let Some(content) = m.and_then(|m| m.get("content")).and_then(Value::as_array) {
                for (i, b) in content.iter().enumerate() {
                    said.block(b, channel(i as u64));
                }
            }
            said.usage(m.and_then(|m| m.get("usage")));
        }
        "content_block_start" => {
            if let Some(b) = o.get("content_block") {
                said.block(b, index_of(v, "index"));
            }
        }
        "content_block_delta" => {
            let d = o.get("delta");
            for key in ["text", "partial_json", "thinking"] {
                said.piece_on(
                    index_of(v, "index"),
                    d.and_then(|d| d.get(key))
                        .and_then(Value::as_str)
                        .unwrap_or_default(),
                );
            }
        }
        "message_delta" => {
            said.finish(o.get("delta").and_then(|d| d.get("stop_reason")));
            said.usage(o.get("usage"));
        }
        "error" => said.error = true,
        // The Responses API: text comes in deltas (audio and images are not text); the
        // names of called tools when their item is added; the end with its usage.
        "response.audio.delta" => {}
        "response.output_item.added" => {
            let item = o.get("item");
            if item
                .and_then(|i| i.get("type"))
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with("_call"))
            {
                said.tool(item.and_then(|i| i.get("name")));
            }
        }
        "response.completed" | "response.incomplete" | "response.failed" => {
            if let Some(r) = o.get("response") {
                responses_end(&mut said, r);
                said.usage(r.get("usage"));
            }
        }
        k if k.ends_with(".delta") => {
            let ch = index_of(v, "output_index")
                .saturating_mul(CHANNELS_PER_PART)
                .saturating_add(index_of(v, "content_index"));
            said.piece_on(
                ch,
                o.get("delta").and_then(Value::as_str).unwrap_or_default(),
            );
        }
        _ => said.error = o.contains_key("error") && kind.is_empty(),
    }
    said
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn whole_answers_of_each_api() {
        let chat = json!({"choices": [{"message": {"role": "assistant", "content": "hello",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "Bash", "arguments": "{\"cmd\":\"ls\"}"}}]},
            "finish_reason": "tool_calls"}], "usage": {"completion_tokens": 9}});
        let s = answer(&chat);
        assert_eq!(s.text, "hello\n{\"cmd\":\"ls\"}");
        assert_eq!(s.tools, ["bash"]);
        assert_eq!(s.finish.as_deref(), Some("tool_calls"));
        assert_eq!(s.output_tokens, Some(9));
        let anthropic = json!({"type": "message", "content": [{"type": "text", "text": "hi"},
            {"type": "tool_use", "id": "t", "name": "get", "input": {"q": "x"}},
            {"type": "redacted_thinking", "data": "opaque"}], "stop_reason": "tool_use",
            "usage": {"input_tokens": 3, "output_tokens": 4}});
        let s = answer(&anthropic);
        assert_eq!(s.text, "hi\n{\"q\":\"x\"}");
        assert_eq!(s.tools, ["get"]);
        assert_eq!(s.finish.as_deref(), Some("tool_use"));
        assert_eq!(s.output_tokens, Some(4));
        // The Responses API echoes the request: only `output` is the answer.
        let responses = json!({"object": "response", "status": "completed",
            "instructions": "the system prompt", "metadata": {"k": "v"},
            "output": [{"type": "message", "id": "m", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": "answer", "annotations": []}]},
                {"type": "function_call", "id": "f", "call_id": "c", "name": "lookup", "arguments": "{}"}],
            "usage": {"input_tokens": 1, "output_tokens": 2}});
        let s = answer(&responses);
        assert_eq!(s.text, "answer\n{}");
        assert_eq!(s.tools, ["lookup"]);
        assert_eq!(s.finish.as_deref(), Some("completed"));
    }

    #[test]
    fn stream_events_of_each_api() {
        let s = event(&json!({"choices": [{"delta": {"content": "He"}, "finish_reason": null}]}));
        assert_eq!(s.text, "He");
        let s = event(
            &json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "run", "arguments": ""}}]}}]}),
        );
        assert_eq!(s.tools, ["run"]);
        let s = event(&json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": "{\"a\""}}));
        assert_eq!(s.text, "{\"a\"");
        let s = event(
            &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 12}}),
        );
        assert_eq!(
            (s.finish.as_deref(), s.output_tokens),
            (Some("end_turn"), Some(12))
        );
        let s = event(&json!({"type": "response.output_text.delta", "delta": "abc"}));
        assert_eq!(s.text, "abc");
        // The whole text again, and the request echoed: not read.
        for done in [
            json!({"type": "response.output_text.done", "text": "abc"}),
            json!({"type": "response.created", "response": {"instructions": "secret"}}),
            json!({"type": "response.audio.delta", "delta": "UklGRiQAAABXQVZF"}),
        ] {
            assert_eq!(event(&done).text, "");
        }
        let s = event(
            &json!({"type": "response.completed", "response": {"status": "completed",
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "abc"}]}],
            "usage": {"output_tokens": 5}}}),
        );
        assert_eq!(s.text, "");
        assert_eq!(
            (s.finish.as_deref(), s.output_tokens),
            (Some("completed"), Some(5))
        );
    }
}
