//! Edits of a request body on its way upstream, the same in the filter and the server: the
//! output cap lowered (`transform.maxTokens`), and the usage report an OpenAI stream is asked
//! for ([`add_include_usage`]; [`crate::usage::UsageChunkStripper`] removes the extra chunk on
//! the way back). Every byte the edit does not concern is kept.

use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;

use serde::de::IgnoredAny;
use serde_json::Value;

use crate::context::{Api, Provider};

/// The API a request path addresses, as extraction classifies it (after the same path
/// normalization: a query string or another spelling cannot change it).
pub fn api_of(path: &str) -> Api {
    crate::extract::classify(&crate::extract::normalize_path(path), |_| false).1
}

/// Whether a request of `api` can have its output cap lowered: only those are charged lowered.
pub fn lowers(api: Api) -> bool {
    api.output_cap_fields().is_some()
}

/// What [`lower_max_tokens`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lowered {
    /// The body to send instead.
    Body(Vec<u8>),
    /// Every cap the body holds is already at or below the one asked for.
    Within,
}

/// `body` with its output cap lowered to `max` (each field of `api` that caps output and holds
/// more, or anything but a number; the cap written in front when none is present). `None`: it
/// cannot be lowered (not an API that answers with output, not a JSON object): the request must
/// not go ahead as it is.
///
/// Keys are compared decoded (`"max\u005ftokens"` is `max_tokens`), and every occurrence is
/// lowered: a body that names a field twice cannot keep a larger value in the copy the provider
/// reads.
pub fn lower_max_tokens(body: &[u8], api: Api, max: u64) -> Option<Lowered> {
    let (fields, written) = api.output_cap_fields()?;
    let members = top_level_members(body)?;
    let mut edits: Vec<Range<usize>> = Vec::new();
    let mut present = false;
    for (key, value) in members {
        if !fields.contains(&key.as_str()) {
            continue;
        }
        present = true;
        let holds = body
            .get(value.clone())
            .and_then(|v| serde_json::from_slice::<u64>(v).ok());
        if holds.is_none_or(|n| n > max) {
            edits.push(value);
        }
    }
    let digits = max_digits(max);
    let mut out = Vec::with_capacity(body.len().saturating_add(32));
    if !present {
        let open = body.iter().position(|b| *b == b'{')?;
        let rest = body.get(open.saturating_add(1)..)?;
        let empty = trim_start(rest).first() == Some(&b'}');
        out.extend_from_slice(body.get(..=open)?);
        out.push(b'"');
        out.extend_from_slice(written.as_bytes());
        out.extend_from_slice(b"\":");
        out.extend_from_slice(digits.as_bytes());
        if !empty {
            out.push(b',');
        }
        out.extend_from_slice(rest);
        return Some(Lowered::Body(out));
    }
    if edits.is_empty() {
        return Some(Lowered::Within);
    }
    let mut at = 0;
    for span in edits {
        out.extend_from_slice(body.get(at..span.start)?);
        out.extend_from_slice(digits.as_bytes());
        at = span.end;
    }
    out.extend_from_slice(body.get(at..)?);
    Some(Lowered::Body(out))
}

fn max_digits(n: u64) -> String {
    use core::fmt::Write as _;
    let mut s = String::new();
    let _ = write!(s, "{n}");
    s
}

fn trim_start(b: &[u8]) -> &[u8] {
    let n = b
        .iter()
        .take_while(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        .count();
    b.get(n..).unwrap_or_default()
}

/// The decoded key and the byte range of the value of each member of the top-level object in
/// `body`; `None` when `body` is not one JSON object.
fn top_level_members(body: &[u8]) -> Option<Vec<(String, Range<usize>)>> {
    let mut members = Vec::new();
    let mut at = skip_space(body, 0);
    if body.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_space(body, at.saturating_add(1));
    if body.get(at) == Some(&b'}') {
        return Some(members);
    }
    loop {
        let (key, end) = next_value::<String>(body, at)?;
        at = skip_space(body, end);
        if body.get(at) != Some(&b':') {
            return None;
        }
        let start = skip_space(body, at.saturating_add(1));
        let (_, end) = next_value::<IgnoredAny>(body, start)?;
        members.push((key, start..end));
        at = skip_space(body, end);
        match body.get(at) {
            Some(b',') => at = skip_space(body, at.saturating_add(1)),
            Some(b'}') => return Some(members),
            _ => return None,
        }
    }
}

fn skip_space(body: &[u8], at: usize) -> usize {
    let rest = body.get(at..).unwrap_or_default();
    at.saturating_add(rest.len().saturating_sub(trim_start(rest).len()))
}

/// The JSON value starting at `at`, and where it ends.
fn next_value<T: serde::de::DeserializeOwned>(body: &[u8], at: usize) -> Option<(T, usize)> {
    let rest = body.get(at..)?;
    let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<T>();
    let value = values.next()?.ok()?;
    Some((value, at.saturating_add(values.byte_offset())))
}

/// Whether a request's stream reports its usage only when asked: OpenAI chat and completions
/// streams (`stream_options.include_usage`). The Responses API reports it in
/// `response.completed` and has other `stream_options`; Anthropic's streams always carry it.
/// The filter and the server's ext_proc edge ask on the client's behalf ([`add_include_usage`])
/// and remove the extra chunk on the way back ([`crate::usage::UsageChunkStripper`]).
pub fn usage_needs_asking(provider: Provider, api: Api, stream: bool) -> bool {
    provider == Provider::Openai && stream && matches!(api, Api::Chat | Api::Completions)
}

/// Adds `stream_options.include_usage: true` to an OpenAI chat or completions request body
/// that streams without it. Returns the new body, or `None` when nothing is to be done (not a
/// stream, usage already asked for, or not a JSON object). A body without `stream_options`
/// keeps every byte and gains the field in front; one with other stream options is written
/// anew from its parsed value.
pub fn add_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let obj = value.as_object()?;
    if obj.get("stream") != Some(&Value::Bool(true)) {
        return None;
    }
    match obj.get("stream_options") {
        None => {
            let at = body.iter().position(|b| *b == b'{')?;
            let rest = body.get(at.saturating_add(1)..)?;
            let empty = trim_start(rest).first() == Some(&b'}');
            let mut out = Vec::with_capacity(body.len().saturating_add(40));
            out.extend_from_slice(body.get(..=at)?);
            out.extend_from_slice(b"\"stream_options\":{\"include_usage\":true}");
            if !empty {
                out.push(b',');
            }
            out.extend_from_slice(rest);
            Some(out)
        }
        Some(Value::Object(o)) if o.get("include_usage") == Some(&Value::Bool(true)) => None,
        Some(_) => {
            let mut value = value;
            let obj = value.as_object_mut()?;
            let mut options = match obj.remove("stream_options") {
                Some(Value::Object(o)) => o,
                _ => serde_json::Map::new(),
            };
            options.insert(String::from("include_usage"), Value::Bool(true));
            obj.insert(String::from("stream_options"), Value::Object(options));
            serde_json::to_vec(&value).ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lowered(body: &str, api: Api, max: u64) -> Option<String> {
        match lower_max_tokens(body.as_bytes(), api, max)? {
            Lowered::Body(b) => Some(String::from_utf8(b).unwrap()),
            Lowered::Within => Some(String::from("within")),
        }
    }

    #[test]
    fn a_larger_cap_is_lowered_in_place() {
        assert_eq!(
            lowered(
                r#"{"model":"m", "max_tokens": 4000 ,"x":1}"#,
                Api::Messages,
                100
            )
            .as_deref(),
            Some(r#"{"model":"m", "max_tokens": 100 ,"x":1}"#)
        );
        assert_eq!(
            lowered(r#"{"max_output_tokens":9e9}"#, Api::Responses, 7).as_deref(),
            Some(r#"{"max_output_tokens":7}"#)
        );
    }

    #[test]
    fn a_smaller_cap_is_kept() {
        assert_eq!(
            lowered(r#"{"max_tokens":50}"#, Api::Messages, 100).as_deref(),
            Some("within")
        );
    }

    #[test]
    fn a_missing_cap_is_written_in_front() {
        assert_eq!(
            lowered(r#" {"model":"gpt-4o"}"#, Api::Chat, 64).as_deref(),
            Some(r#" {"max_completion_tokens":64,"model":"gpt-4o"}"#)
        );
        assert_eq!(
            lowered("{ }", Api::Completions, 64).as_deref(),
            Some(r#"{"max_tokens":64 }"#)
        );
    }

    #[test]
    fn every_spelling_and_copy_is_lowered() {
        let body = r#"{"max\u005ftokens":900,"messages":[{"max_tokens":5}],"max_completion_tokens":null,"max_tokens":"x"}"#;
        assert_eq!(
            lowered(body, Api::Chat, 10).as_deref(),
            Some(
                r#"{"max\u005ftokens":10,"messages":[{"max_tokens":5}],"max_completion_tokens":10,"max_tokens":10}"#
            )
        );
    }

    #[test]
    fn not_an_object_or_no_output_is_left_alone() {
        assert_eq!(lowered("[1]", Api::Chat, 10), None);
        assert_eq!(lowered(r#"{"a":1"#, Api::Chat, 10), None);
        assert_eq!(lowered(r#"{"input":"x"}"#, Api::Embeddings, 10), None);
    }

    #[test]
    fn the_api_is_read_from_the_path_as_extraction_reads_it() {
        assert_eq!(
            api_of("/v1/chat/completions?api-version=2024-10-21"),
            Api::Chat
        );
        assert_eq!(api_of("/v1/messages?beta=true"), Api::Messages);
        assert_eq!(api_of("//v1/./responses#x"), Api::Responses);
        assert_eq!(api_of("/v1/embeddings"), Api::Embeddings);
    }

    #[test]
    fn include_usage_is_added_where_it_is_missing() {
        let body = br#" {"model":"m","stream":true,"messages":[]}"#;
        let out = add_include_usage(body).unwrap();
        assert_eq!(
            out,
            br#" {"stream_options":{"include_usage":true},"model":"m","stream":true,"messages":[]}"#
        );
        assert_eq!(add_include_usage(br#"{"stream":false}"#), None);
        assert_eq!(
            add_include_usage(br#"{"stream":true,"stream_options":{"include_usage":true}}"#),
            None
        );
        let v: Value = serde_json::from_slice(
            &add_include_usage(
                br#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#,
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true));
        assert_eq!(v["stream_options"]["x"], 1);
        assert_eq!(add_include_usage(b"[1]"), None);
    }
}
