//! The body read shallowly, for bundles whose rules read no text (no `request.prompt`, no
//! `request.messages`): the top-level fields rules read are found and every other value, the
//! messages' text above all, is passed over with a validating byte scanner, without serde's
//! visitors and without allocating.
//!
//! It decides nothing alone. It answers only bodies whose shape it fully understands, with the
//! result serde's [`super::Body`]`<Skip>` pass gives; anything else (a parse error, a type error,
//! a duplicate key, a key or value it does not follow, nesting deeper than it tracks) returns
//! `None` and the caller runs that serde pass, which answers, or names the error. So it is at
//! least as strict as serde on everything it passes over itself (strings: UTF-8, escapes, paired
//! surrogates, no control characters; numbers by the JSON grammar), and the typed values it keeps
//! are read by serde from their own bytes. A test compares the two on generated and mutated
//! bodies (`tests` below).
//!
//! A body the skim declines is read again by serde (a client can cause that with, say, a
//! non-null `thread`): at most one more pass over a body already within `max_body_bytes`.

use alloc::string::String;
use alloc::vec::Vec;

use serde::de::DeserializeOwned;

use super::{Body, Meta, Skip, ToolDef};

/// Containers open at once below the body's object (serde_json stops at 128 in all). Far below
/// serde's limit on purpose: a value the skim passes to serde alone (`typed`) gets a fresh
/// budget there, which inside the body it would not.
const MAX_DEPTH: u32 = 64;
// What the skim accepts, the body's object and the containers below it, serde accepts too (its
// limit is 128); a value passed to `typed` is within it as well, with a fresh budget there.
const _: () = assert!(MAX_DEPTH + 1 < 128);

/// The body (trimmed, starting with `{`) as serde would read it without its text, or `None`:
/// ask serde.
pub(super) fn body(bytes: &[u8]) -> Option<Body<Skip>> {
    let mut c = Cursor { b: bytes, i: 0 };
    let b = c.top()?;
    c.ws();
    (c.i == bytes.len()).then_some(b)
}

/// Top-level keys with a slot in [`super::BodyVisitor`] (set once: a repeated one is an error).
const TAKEN: &[&[u8]] = &[
    b"model",
    b"stream",
    b"max_tokens",
    b"max_completion_tokens",
    b"max_output_tokens",
    b"n",
    b"best_of",
    b"temperature",
    b"user",
    b"safety_identifier",
    b"metadata",
    b"messages",
    b"additional_messages",
    b"thread",
    b"role",
    b"content",
    b"system",
    b"instructions",
    b"additional_instructions",
    b"prompt",
    b"suffix",
    b"input",
    b"tools",
    b"functions",
    b"mcp_servers",
];

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

/// Reads one value's bytes with serde (a value it refuses: `None`).
fn typed<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.i = self.i.saturating_add(1);
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        self.ws();
        (self.peek()? == byte).then(|| self.i = self.i.saturating_add(1))
    }

    /// The top-level object, the slots of [`super::BodyVisitor`] filled as it fills them.
    fn top(&mut self) -> Option<Body<Skip>> {
        let mut body = Body::<Skip>::default();
        let mut seen = [false; TAKEN.len()];
        let (mut tools, mut functions, mut mcp) = (None, None, None);
        let mut metadata: Option<Meta<Skip>> = None;
        self.object(0, |c, key| {
            let start = c.i;
            if let Some(slot) = TAKEN.iter().position(|k| *k == key) {
                let seen = seen.get_mut(slot)?;
                if *seen {
                    return None;
                }
                *seen = true;
            }
            match key {
                b"messages" | b"additional_messages" => c.items(false)?,
                b"input" => c.items(true)?,
                _ => c.skip(1)?,
            }
            let value = c.b.get(start..c.i)?;
            match key {
                b"model" => body.model = typed(value)?,
                b"stream" => body.stream = typed(value)?,
                b"max_tokens" => body.max_tokens = typed(value)?,
                b"max_completion_tokens" => body.max_completion_tokens = typed(value)?,
                b"max_output_tokens" => body.max_output_tokens = typed(value)?,
                b"n" => body.n = typed(value)?,
                b"best_of" => body.best_of = typed(value)?,
                b"temperature" => body.temperature = typed(value)?,
                b"user" => body.user = typed(value)?,
                b"safety_identifier" => body.safety_identifier = typed(value)?,
                b"role" => typed::<Option<String>>(value).map(drop)?,
                b"metadata" => metadata = typed::<Option<Meta<Skip>>>(value)?,
                b"tools" => tools = typed::<Option<Vec<ToolDef<Skip>>>>(value)?,
                b"functions" => functions = typed::<Option<Vec<ToolDef<Skip>>>>(value)?,
                b"mcp_servers" => mcp = typed::<Option<Vec<ToolDef<Skip>>>>(value)?,
                // An Assistants thread's messages may add tools: serde reads it.
                b"thread" if value != b"null" => return None,
                _ => {}
            }
            Some(())
        })?;
        // As `BodyVisitor` puts them together (the messages' tools: none, see `items`).
        body.tools = [tools, functions].into_iter().flatten().flatten().collect();
        for mut server in mcp.into_iter().flatten() {
            server.kind = Some(String::from("mcp"));
            body.tools.push(server);
        }
        body.metadata_user = metadata.and_then(|m| m.user_id);
        Some(body)
    }

    /// An object key without escapes (a key with one is left to serde), and the `:` after it.
    fn key(&mut self) -> Option<&'a [u8]> {
        self.ws();
        if self.peek()? != b'"' {
            return None;
        }
        let (start, end, escaped) = self.string()?;
        if escaped {
            return None;
        }
        self.b.get(start..end)
    }

    /// `messages`, `additional_messages` (`input`: also a string) as `Option<Vec<Item<Skip>>>`
    /// reads them: null, or an array of strings, objects, arrays and integers; an object's
    /// `role` and `type` strings or null. An item that adds tools (`tools` in an item) is left
    /// to serde.
    fn items(&mut self, string: bool) -> Option<()> {
        match self.peek()? {
            b'n' => return self.literal(b"null"),
            b'"' if string => return self.string().map(drop),
            b'[' => {}
            _ => return None,
        }
        self.list(2, |c| match c.peek()? {
            b'"' => c.string().map(drop),
            b'[' => c.skip(3),
            b'n' => c.literal(b"null"),
            // (Not a negative one: serde reads `-0` as a float, which an item cannot be.)
            b'0'..=b'9' => c.number().filter(|whole| *whole).map(drop),
            b'{' => c.object(3, |c, key| match key {
                b"role" | b"type" => match c.peek()? {
                    b'"' => c.string().map(drop),
                    _ => c.literal(b"null"),
                },
                b"tools" => None,
                _ => c.skip(4),
            }),
            _ => None,
        })
    }

    /// Opens a container at `depth` (at its `open`): whether it is empty (closed at once).
    fn open(&mut self, open: u8, close: u8, depth: u32) -> Option<bool> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.eat(open)?;
        self.ws();
        let empty = self.peek()? == close;
        if empty {
            self.i = self.i.saturating_add(1);
        }
        Some(empty)
    }

    /// After an element: whether its container ends here (`close`) or goes on (`,`).
    fn after(&mut self, close: u8) -> Option<bool> {
        self.ws();
        let next = self.peek()?;
        if next != b',' && next != close {
            return None;
        }
        self.i = self.i.saturating_add(1);
        Some(next == close)
    }

    /// An array at `depth`, each element read by `element` (at the element's first byte).
    fn list(&mut self, depth: u32, mut element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        let mut done = self.open(b'[', b']', depth)?;
        while !done {
            self.ws();
            element(self)?;
            done = self.after(b']')?;
        }
        Some(())
    }

    /// An object at `depth`, each value read by `value` (at its first byte, with its key).
    fn object(
        &mut self,
        depth: u32,
        mut value: impl FnMut(&mut Self, &'a [u8]) -> Option<()>,
    ) -> Option<()> {
        let mut done = self.open(b'{', b'}', depth)?;
        while !done {
            let key = self.key()?;
            self.eat(b':')?;
            self.ws();
            value(self, key)?;
            done = self.after(b'}')?;
        }
        Some(())
    }

    /// Any value at `depth` (as serde's `IgnoredAny`, at least as strictly).
    fn skip(&mut self, depth: u32) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => self.object(depth, |c, _| c.skip(depth.saturating_add(1))),
            b'[' => self.list(depth, |c| c.skip(depth.saturating_add(1))),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number().map(drop),
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i.checked_add(word.len())?;
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// A number by the JSON grammar; whether it is an integer serde reads as `i64` or `u64`
    /// (no fraction or exponent, at most 18 digits).
    fn number(&mut self) -> Option<bool> {
        if self.peek() == Some(b'-') {
            self.i = self.i.saturating_add(1);
        }
        let int_start = self.i;
        match self.peek()? {
            // `01`, `-01`: not JSON.
            b'0' => {
                self.i = self.i.saturating_add(1);
                if let Some(b'0'..=b'9') = self.peek() {
                    return None;
                }
            }
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        let int_digits = self.i.saturating_sub(int_start);
        let mut whole = true;
        if self.peek() == Some(b'.') {
            self.i = self.i.saturating_add(1);
            self.some_digits()?;
            whole = false;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i = self.i.saturating_add(1);
            if let Some(b'+' | b'-') = self.peek() {
                self.i = self.i.saturating_add(1);
            }
            self.some_digits()?;
            whole = false;
        }
        Some(whole && int_digits <= 18)
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i = self.i.saturating_add(1);
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.i;
        self.digits();
        (self.i > start).then_some(())
    }

    /// A string (at its `"`): the span of its contents and whether it has escapes. Strict: its
    /// text must be UTF-8 without control characters, its escapes JSON's, a `\u` surrogate one
    /// of a pair (what serde needs to read it into a `String`).
    fn string(&mut self) -> Option<(usize, usize, bool)> {
        let start = self.i.checked_add(1)?;
        let mut at = start;
        let mut escaped = false;
        loop {
            let rest = self.b.get(at..)?;
            let n = memchr::memchr2(b'"', b'\\', rest)?;
            let span = rest.get(..n)?;
            let (control, wide) = span.iter().fold((false, false), |(c, w), &b| {
                (c | (b < 0x20), w | (b >= 0x80))
            });
            if control || (wide && core::str::from_utf8(span).is_err()) {
                return None;
            }
            at = at.checked_add(n)?;
            if self.b.get(at) == Some(&b'"') {
                self.i = at.checked_add(1)?;
                return Some((start, at, escaped));
            }
            escaped = true;
            at = self.escape(at)?;
        }
    }

    /// The escape at `at` (its `\`); where the text goes on.
    fn escape(&self, at: usize) -> Option<usize> {
        match self.b.get(at.checked_add(1)?)? {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => at.checked_add(2),
            b'u' => {
                let unit = self.hex4(at.checked_add(2)?)?;
                let next = at.checked_add(6)?;
                match unit {
                    0xD800..=0xDBFF => {
                        if self.b.get(next..next.checked_add(2)?)? != b"\\u" {
                            return None;
                        }
                        let low = self.hex4(next.checked_add(2)?)?;
                        (0xDC00..=0xDFFF).contains(&low).then_some(())?;
                        next.checked_add(6)
                    }
                    0xDC00..=0xDFFF => None,
                    _ => Some(next),
                }
            }
            _ => None,
        }
    }

    fn hex4(&self, at: usize) -> Option<u32> {
        let digits = self.b.get(at..at.checked_add(4)?)?;
        digits.iter().try_fold(0u32, |acc, &d| {
            let v = char::from(d).to_digit(16)?;
            Some(acc << 4 | v)
        })
    }
}

#[cfg(test)]
mod tests {
    use alloc::format;
    use alloc::string::String;

    use super::super::{body as read_body, parse};
    use super::*;
    use crate::context::{Needs, RequestInfo};

    /// What serde's pass gives: the fields a request takes from the body, or the error.
    fn by_serde(bytes: &[u8]) -> Result<RequestInfo, crate::context::ContextError> {
        let mut r = RequestInfo::default();
        if let Some(b) = super::super::object_body(bytes)? {
            parse::<Body<Skip>>(b)?.fill(&mut r, Needs::NONE);
        }
        Ok(r)
    }

    /// What `extract::body` gives (skim first, serde when it declines).
    fn by_extract(bytes: &[u8]) -> Result<RequestInfo, crate::context::ContextError> {
        let mut r = RequestInfo::default();
        read_body(bytes, &mut r, Needs::NONE).map(|()| r)
    }

    /// Whether the skim answered alone.
    fn skimmed(bytes: &[u8]) -> bool {
        super::super::object_body(bytes)
            .ok()
            .flatten()
            .and_then(body)
            .is_some()
    }

    fn same(bytes: &[u8]) {
        let (a, b) = (by_serde(bytes), by_extract(bytes));
        assert_eq!(a, b, "{:?}", String::from_utf8_lossy(bytes));
        if skimmed(bytes) {
            assert!(
                a.is_ok(),
                "skimmed a body serde refuses: {:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    const FIXTURES: &[&str] = &[
        include_str!("../../tests/fixtures/sdk/anthropic-messages-blocks.json"),
        include_str!("../../tests/fixtures/sdk/anthropic-messages-stream.json"),
        include_str!("../../tests/fixtures/sdk/openai-chat-parts-tools-stream.json"),
        include_str!("../../tests/fixtures/sdk/openai-chat-plain.json"),
        include_str!("../../tests/fixtures/sdk/openai-completions.json"),
        include_str!("../../tests/fixtures/sdk/openai-embeddings.json"),
        include_str!("../../tests/fixtures/sdk/openai-responses-items.json"),
        include_str!("../../tests/fixtures/sdk/openai-responses-string.json"),
    ];

    /// The SDKs' request bodies (the fixtures' `body`).
    fn sdk_bodies() -> Vec<String> {
        FIXTURES
            .iter()
            .filter_map(|f| serde_json::from_str::<serde_json::Value>(f).ok())
            .filter_map(|v| v.get("body").map(serde_json::Value::to_string))
            .collect()
    }

    /// Top-level members, valid and not, of every kind the two passes read or pass over.
    const MEMBERS: &[&str] = &[
        r#""model":"gpt-4o-mini","#,
        r#""model":"gpt\u00e9-\ud83d\ude00","#,
        r#""model":null,"#,
        r#""model":5,"#,
        r#""mod\u0065l":"m2","#,
        r#""stream":true,"#,
        r#""stream":"yes","#,
        r#""max_tokens":256,"#,
        r#""max_tokens":1.5,"#,
        r#""max_tokens":-3,"#,
        r#""max_tokens":99999999999999999999,"#,
        r#""max_completion_tokens":12,"#,
        r#""max_output_tokens":7,"#,
        r#""n":3,"#,
        r#""best_of":2,"#,
        r#""temperature":0.5,"#,
        r#""temperature":1e400,"#,
        r#""temperature":"hot","#,
        r#""user":"u-1","#,
        r#""user":["x"],"#,
        r#""safety_identifier":"s","#,
        r#""metadata":{"user_id":"mu","k":"v"},"#,
        r#""metadata":{"user_id":7},"#,
        r#""metadata":null,"#,
        r#""messages":[{"role":"user","content":"hi there"}],"#,
        r#""messages":[{"role":"system","content":[{"type":"text","text":"a\nb \"q\" \u00e9"}]},{"role":"user","content":"x"}],"#,
        r#""messages":["plain", 12, null, [1,2], {"type":null}],"#,
        r#""messages":[1.5],"#,
        r#""messages":["\udc00 low"],"#,
        r#""messages":["\ud800 high"],"#,
        r#""messages":["\ud800\ud800"],"#,
        r#""messages":[-0],"#,
        r#""messages":[18446744073709551615, 18446744073709551616],"#,
        r#""messages":[true],"#,
        r#""messages":[{"role":5}],"#,
        r#""messages":[{"role":"user","tools":[{"type":"function","name":"t1"}]}],"#,
        r#""messages":"text","#,
        r#""messages":null,"#,
        r#""messages":{"role":"user"},"#,
        r#""additional_messages":[{"role":"user","content":"more"}],"#,
        r#""additional_messages":[{"role":"user","tools":[{"name":"extra"}]}],"#,
        r#""messages":[{"t\u006fols":[{"name":"hidden"}]}],"#,
        r#""messages":[{"r\u006fle":5}],"#,
        r#""input":[{"type":"additional_tools","tools":[{"type":"function","name":"late"}]}],"#,
        r#""input":[123456789012345678, 1234567890123456789, 12345678901234567890, 0, -1, 1e2],"#,
        r#""input":[-1],"#,
        r#""input":[0],"#,
        r#""input":[1234567890123456789],"#,
        "\"wide\":\"a\u{fffd}\u{4e2d}\u{1f600}\",",
        r#""input":"a string input","#,
        r#""input":[{"role":"user","content":[{"type":"input_text","text":"t"}]},{"type":"function_call","name":"f","arguments":"{}"}],"#,
        r#""input":[[1,2,3]],"#,
        r#""input":{"x":1},"#,
        r#""tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}],"#,
        r#""tools":[{"name":"calc","input_schema":{}},{"type":"web_search_20250305","name":"web_search"}],"#,
        r#""tools":[{"name":"a","name":"b"}],"#,
        r#""tools":{"name":"x"},"#,
        r#""functions":[{"name":"legacy"}],"#,
        r#""mcp_servers":[{"type":"url","url":"https://x","name":"srv"}],"#,
        r#""thread":{"messages":[{"role":"user","content":"t"}]},"#,
        r#""thread":null,"#,
        r#""role":"user","#,
        r#""role":3,"#,
        r#""content":"assistant thread message","#,
        r#""system":"be brief","#,
        r#""system":[{"type":"text","text":"s"}],"#,
        r#""instructions":"i","#,
        r#""prompt":["p1","p2"],"#,
        r#""suffix":"s","#,
        r#""stop":["\n"],"#,
        r#""logit_bias":{"50256":-100},"#,
        r#""unknown":{"deep":[[[{"a":[true,false,null,-0.5e-3]}]]]},"#,
        r#""bad_number":01,"#,
        r#""bad_number2":-,"#,
        r#""bad_number3":1.,"#,
        r#""bad_lit":nul,"#,
        r#""bad_esc":"\x","#,
        r#""lone":"\ud800","#,
        r#""lone_low":"\udc00x","#,
        r#""pair_bad":"\ud800\u0041","#,
        "\"ctrl\":\"a\u{1}b\",",
        "\"tab_raw\":\"a\tb\",",
        r#""trailing":[1,],"#,
        r#""emptyobj":{},"#,
        r#""emptyarr":[],"#,
        r#""ws" :  [ 1 , 2 ] ,"#,
        r#""nonascii_key_é":"v","#,
        r#""k\"q":1,"#,
    ];

    #[test]
    fn the_skim_reads_what_serde_reads() {
        let mut fast = 0usize;
        let mut total = 0usize;
        let mut check = |text: &str| {
            same(text.as_bytes());
            total += 1;
            fast += usize::from(skimmed(text.as_bytes()));
        };
        for b in sdk_bodies() {
            check(&b);
        }
        // (Every member ends with its comma.)
        for members in crate::generated_texts::generated(MEMBERS, 0x51ed_270b_a1c3_9e4d, 6) {
            check(&format!("{{{members}\"end\":0}}"));
            check(&format!(" {{ {members} \"end\" : [] }} \n"));
            check(&format!("{{{members}\"end\":0}}x"));
            // A trailing comma (or `{}`).
            check(&format!("{{{}}}", members.trim_end_matches(',')));
            check(&format!("{{{members}}}"));
        }
        assert!(total > 100_000, "{total}");
        // The fast path is the common one: many generated bodies hold no error.
        assert!(fast * 10 > total, "{fast} of {total} skimmed");
    }

    #[test]
    fn every_cut_and_changed_byte_of_an_sdk_body_reads_the_same() {
        for b in sdk_bodies() {
            let bytes = b.as_bytes();
            for cut in 0..bytes.len() {
                same(&bytes[..cut]);
            }
            for at in 0..bytes.len() {
                for byte in [
                    b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', 0x01, 0xff, b'0',
                ] {
                    let mut changed = bytes.to_vec();
                    changed[at] = byte;
                    same(&changed);
                }
            }
        }
    }

    #[test]
    fn invalid_utf8_anywhere_reads_as_serde_reads() {
        for bad in [
            &b"\xff"[..],
            b"\xc0\xaf",
            b"\xed\xa0\x80",
            b"\xe4\xb8",
            b"\xf4\x90\x80\x80",
        ] {
            for (before, after) in [
                (&br#"{"model":"m","x":""#[..], &br#""}"#[..]),
                (br#"{"model":""#, br#""}"#),
                (br#"{"model":"m","messages":[""#, br#""]}"#),
                (
                    br#"{"model":"m","messages":[{"role":"user","content":""#,
                    br#""}]}"#,
                ),
                (br#"{"model":"m",""#, br#"":1}"#),
            ] {
                let body = [before, bad, after].concat();
                same(&body);
                assert!(!skimmed(&body), "{body:?}");
            }
        }
    }

    #[test]
    fn nesting_past_what_the_skim_tracks_is_left_to_serde() {
        for depth in [10usize, 63, 64, 65, 126, 127, 128, 129, 200] {
            let body = format!(
                "{{\"model\":\"m\",\"x\":{}1{}}}",
                "[".repeat(depth),
                "]".repeat(depth)
            );
            same(body.as_bytes());
            let messages = format!(
                "{{\"model\":\"m\",\"messages\":[{{\"content\":{}1{}}}]}}",
                "[".repeat(depth),
                "]".repeat(depth)
            );
            same(messages.as_bytes());
        }
    }

    #[test]
    fn a_chat_is_skimmed() {
        let chat = br#"{"model":"gpt-4o-mini","max_tokens":256,"messages":[{"role":"system","content":"You are concise."},{"role":"user","content":"Please summarise \u00e9 the notes."}]}"#;
        assert!(skimmed(chat));
        let r = by_extract(chat).expect("valid");
        assert_eq!(r.model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(r.max_tokens, Some(256));
    }
}
