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
    /// Channels whose text is over (`[from, to)`): a content block stopped, an output item
    /// done, a choice finished. Their text is checked whole, so what is held of it may go.
    pub ends: Vec<(u32, u32)>,
    /// Text an event repeats whole (a Responses `.done` event, a finished item, the completed
    /// response), by channel: read only for a channel that has had no text, as when a stream is
    /// resumed after its deltas (`starting_after`).
    pub repeats: Vec<(u32, String)>,
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
    "item_id",
    "b64_json",
    "embedding",
];

/// How deep a tool result's strings are followed (the JSON parser bounds nesting anyway).
const MAX_DEPTH: usize = 32;

/// Channels of one choice or output item (its text, its tool calls or content parts).
const CHANNELS_PER_PART: u32 = 1024;

/// The channel of text past the indices kept apart ([`CHANNELS_PER_PART`] less two): a guard
/// refuses a stream that uses it rather than read several texts as one.
pub const TOO_MANY: u32 = u32::MAX;

/// A channel number from an index the provider sent ([`TOO_MANY`] past the last one; every
/// channel computed from it saturates to it).
fn channel(index: u64) -> u32 {
    if index > u64::from(CHANNELS_PER_PART.saturating_sub(2)) {
        return TOO_MANY;
    }
    u32::try_from(index).unwrap_or(TOO_MANY)
}

/// Every string under `v` but those of [`NOT_TEXT`] keys, joined with newlines.
fn text_of(v: &Value) -> String {
    let mut inner = Said {
        whole: true,
        ..Said::default()
    };
    inner.strings(v, 0);
    inner.text
}

/// The channel of a Responses API event's content part (`output_index`, `content_index`).
fn part_channel(v: &Value) -> u32 {
    index_of(v, "output_index")
        .saturating_mul(CHANNELS_PER_PART)
        .saturating_add(index_of(v, "content_index"))
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
                // A text source's `data` is text (Anthropic's web fetch: the page it fetched);
                // other sources' `data` is media.
                let text_source = m.get("type").and_then(Value::as_str) == Some("text");
                for (k, x) in m {
                    if !NOT_TEXT.contains(&k.as_str()) || (text_source && k == "data") {
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
            // A tool call starts: the choice's text and earlier calls are over.
            self.ends.push((ch, tool_ch));
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
            "text" => match b.get("text") {
                Some(Value::String(t)) => self.piece_on(ch, t),
                // Assistants messages: `{"text": {"value": ..., "annotations": [...]}}`.
                Some(t) => self.piece_on(ch, &text_of(t)),
                None => {}
            },
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
            _ => self.piece_on(ch, &text_of(b)),
        }
    }

    /// A Responses API output item (a tool call without a name is named by its type: a
    /// `shell_call` is the `shell` tool).
    fn item(&mut self, item: &Value) {
        let kind = item.get("type").and_then(Value::as_str).unwrap_or_default();
        if let Some(tool) = kind.strip_suffix("_call") {
            match item.get("name") {
                Some(name) => self.tool(Some(name)),
                None => self.tools.push(String::from(tool)),
            }
        }
        self.strings(item, 0);
    }

    /// OpenAI chat or completions choices (a whole answer's `message`, or a chunk's `delta`).
    fn choices(&mut self, choices: &[Value], key: &str) {
        for c in choices {
            let choice = index_of(c, "index");
            let ch = choice.saturating_mul(CHANNELS_PER_PART);
            if let Some(m) = c.get(key).and_then(Value::as_object) {
                self.chat_message(m, choice);
            }
            self.piece_on(
                ch,
                c.get("text").and_then(Value::as_str).unwrap_or_default(),
            );
            // The alternatives a client asked for (`top_logprobs`) are text it reads too.
            if let Some(l) = c.get("logprobs").filter(|l| !l.is_null()) {
                let alternatives = ch.saturating_add(CHANNELS_PER_PART.saturating_sub(1));
                self.piece_on(alternatives, &text_of(l));
            }
            if let Some(r) = c
                .get("finish_reason")
                .filter(|r| r.as_str().is_some_and(|s| !s.is_empty()))
            {
                self.finish(Some(r));
                // The choice is over: its text is checked whole.
                self.ends.push((ch, ch.saturating_add(CHANNELS_PER_PART)));
            }
        }
    }
}

/// The channel of an output item's text that comes whole in one event (a tool's output, a
/// built-in tool's action, an event the reader does not know): checked with its event, and
/// over with it.
fn whole_channel(output: u32) -> u32 {
    output
        .saturating_mul(CHANNELS_PER_PART)
        .saturating_add(CHANNELS_PER_PART.saturating_sub(1))
}

impl Said {
    /// Text that comes whole in this event, on `ch`: read, and its channel over with it.
    fn whole_text(&mut self, ch: u32, v: &Value) {
        self.piece_on(ch, &text_of(v));
        self.ends.push((ch, ch.saturating_add(1)));
    }

    /// Text this event repeats whole, on `ch`.
    fn repeat(&mut self, ch: u32, v: Option<&Value>) {
        let Some(v) = v else {
            return;
        };
        let text = text_of(v);
        if !text.is_empty() {
            self.repeats.push((ch, text));
        }
    }

    /// The names of the tools an Assistants run step or required action calls (functions by
    /// name, built-in tools by type).
    fn assistant_tools(&mut self, v: &Value) {
        let calls = v
            .pointer("/step_details/tool_calls")
            .or_else(|| v.pointer("/delta/step_details/tool_calls"))
            .or_else(|| v.pointer("/required_action/submit_tool_outputs/tool_calls"))
            .and_then(Value::as_array);
        for call in calls.into_iter().flatten() {
            match call.pointer("/function/name") {
                Some(name) => self.tool(Some(name)),
                None => self.tool(call.get("type")),
            }
        }
    }
}

/// What a whole JSON answer says. Shapes the reader does not know are read whole (every string
/// but ids and enumerations), so an answer is never passed unread.
pub fn answer(v: &Value) -> Said {
    let mut said = Said {
        whole: true,
        ..Said::default()
    };
    let Some(o) = v.as_object() else {
        said.strings(v, 0);
        return said;
    };
    let answered = ["choices", "content", "output", "data"]
        .iter()
        .any(|k| o.get(*k).is_some_and(|x| !x.is_null()));
    if let Some(choices) = o.get("choices").and_then(Value::as_array) {
        said.choices(choices, "message");
    } else if let Some(content) = o.get("content").and_then(Value::as_array) {
        content.iter().for_each(|b| said.block(b, 0));
        said.finish(o.get("stop_reason"));
    } else if let Some(output) = o.get("output").and_then(Value::as_array) {
        output.iter().for_each(|item| said.item(item));
        responses_end(&mut said, v);
    } else if let Some(data) = o.get("data").and_then(Value::as_array) {
        // A list (stored completions, conversation items, thread messages): each one read.
        for x in data {
            let one = answer(x);
            said.piece(&one.text);
            said.tools.extend(one.tools);
        }
    } else if o.get("error").is_none_or(|e| e.is_null()) {
        said.strings(v, 0);
    }
    said.usage(o.get("usage"));
    // The provider's error (`"error": null` is in every Responses API answer).
    said.error = !answered && o.get("error").is_some_and(|e| !e.is_null());
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

/// Events that carry no new generated text: the request echoed (`response.created`, an
/// Assistants run), text already streamed in deltas repeated (`.done`, `content_part`), or
/// nothing at all.
const NO_NEW_TEXT: &[&str] = &[
    "response.created",
    "response.in_progress",
    "response.queued",
    "response.content_part.added",
    "content_block_stop",
    "message_stop",
    "ping",
];

/// Responses API items whose text streams in deltas (their `output_item.done` repeats it).
const STREAMED_ITEMS: &[&str] = &["message", "reasoning", "function_call", "custom_tool_call"];

/// What one stream event's `data` says. Events the reader does not know are read whole (every
/// string but ids and enumerations), so no generated text passes unread.
pub fn event(v: &Value) -> Said {
    let mut said = Said::default();
    let Some(o) = v.as_object() else {
        said.strings(v, 0);
        return said;
    };
    if let Some(choices) = o.get("choices").and_then(Value::as_array) {
        // OpenAI chat (`delta`) and completions (`text`) chunks.
        said.choices(choices, "delta");
        said.usage(o.get("usage"));
        return said;
    }
    // The Assistants API: objects, not typed events.
    match o.get("object").and_then(Value::as_str).unwrap_or_default() {
        "thread.message.delta" | "thread.run.step.delta" | "thread.run.step" => {
            said.assistant_tools(v);
            said.strings(o.get("delta").or(o.get("step_details")).unwrap_or(v), 0);
            return said;
        }
        // A run (its instructions echoed: only the tools it asks the client to run are read),
        // a thread, a whole message (its deltas streamed).
        "thread.run" => {
            said.assistant_tools(v);
            return said;
        }
        "thread" | "thread.message" => return said,
        _ => {}
    }
    let kind = o.get("type").and_then(Value::as_str).unwrap_or_default();
    let index = index_of(v, "index");
    match kind {
        k if NO_NEW_TEXT.contains(&k) => {
            if k == "content_block_stop" {
                said.ends.push((index, index.saturating_add(1)));
            }
        }
        "response.output_item.added" => {
            // The tool's name now; an item that comes whole (no deltas follow) read now.
            let output = index_of(v, "output_index");
            let item = o.get("item");
            let kind = item
                .and_then(|i| i.get("type"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            let mut named = Said::default();
            if let Some(item) = item {
                named.item(item);
            }
            said.tools = named.tools;
            if let Some(item) = item.filter(|_| !STREAMED_ITEMS.contains(&kind)) {
                said.whole_text(whole_channel(output), item);
            }
        }
        "response.content_part.done" => {
            let ch = part_channel(v);
            said.repeat(ch, o.get("part"));
        }
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
                said.block(b, index);
            }
        }
        "content_block_delta" => {
            // Text, a tool's JSON, thinking, citations: every string but its type and the
            // thinking's signature.
            if let Some(d) = o.get("delta") {
                said.piece_on(index, &text_of(d));
            }
        }
        "message_delta" => {
            said.finish(o.get("delta").and_then(|d| d.get("stop_reason")));
            said.usage(o.get("usage"));
        }
        "error" => said.error = true,
        // The Responses API.
        "response.audio.delta" => {}
        "response.completed" | "response.incomplete" | "response.failed" => {
            if let Some(r) = o.get("response") {
                responses_end(&mut said, r);
                said.usage(r.get("usage"));
                let output = r.get("output").and_then(Value::as_array);
                for (i, item) in output.into_iter().flatten().enumerate() {
                    let ch = channel(i as u64).saturating_mul(CHANNELS_PER_PART);
                    said.repeat(ch, Some(item));
                }
            }
        }
        "response.output_item.done" => {
            // Items whose content never streamed as deltas (tool outputs, built-in tools'
            // actions) are read now; the others' text was.
            let output = index_of(v, "output_index").saturating_mul(CHANNELS_PER_PART);
            let item = o.get("item");
            let kind = item
                .and_then(|i| i.get("type"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            match item {
                Some(item) if !STREAMED_ITEMS.contains(&kind) => {
                    let mut named = Said::default();
                    named.item(item);
                    said.tools = named.tools;
                    said.whole_text(whole_channel(index_of(v, "output_index")), item);
                }
                // Its text streamed in deltas, unless the stream was resumed after them.
                item => said.repeat(output, item),
            }
            said.ends
                .push((output, output.saturating_add(CHANNELS_PER_PART)));
        }
        k if k.ends_with(".done") => {
            let ch = part_channel(v);
            let repeated = ["text", "arguments", "refusal", "input", "code"]
                .iter()
                .find_map(|k| o.get(*k));
            said.repeat(ch, repeated);
        }
        k if k.ends_with(".delta") => {
            let ch = part_channel(v);
            said.piece_on(
                ch,
                o.get("delta").and_then(Value::as_str).unwrap_or_default(),
            );
        }
        _ if o.contains_key("error") && kind.is_empty() => said.error = true,
        // An event the reader does not know: read whole, on its output's own channel (or
        // one of its own), over with the event.
        _ => {
            let ch = match o.get("output_index") {
                Some(_) => whole_channel(index_of(v, "output_index")),
                None => UNKNOWN,
            };
            said.whole_text(ch, v);
        }
    }
    said
}

/// The channel of an event the reader does not know that names no output.
const UNKNOWN: u32 = TOO_MANY.saturating_sub(1);

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
    fn a_fetched_page_is_text_and_media_is_not() {
        let answer_json = json!({"type": "message", "content": [{"type": "web_fetch_tool_result",
            "tool_use_id": "t", "content": {"type": "web_fetch_result", "url": "https://x.example",
            "content": {"type": "document", "source": {"type": "text", "media_type": "text/plain",
            "data": "the page text"}}}}, {"type": "image", "source": {"type": "base64",
            "media_type": "image/png", "data": "iVBORw0KGgo="}}]});
        let s = answer(&answer_json);
        assert!(s.text.contains("the page text"), "{}", s.text);
        assert!(!s.text.contains("iVBOR"), "{}", s.text);
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
