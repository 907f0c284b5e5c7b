//! Building a [`RequestContext`] from a raw request: headers, path classification, and one typed
//! serde pass over OpenAI and Anthropic request bodies.
//!
//! Unknown body fields are skipped without being built, strings are borrowed where the JSON has
//! no escapes, and when no rule reads message text the text is not collected at all (the
//! `S: Sink` parameter). Handles Chat Completions, Completions, Embeddings, Responses, Anthropic
//! Messages and Anthropic message batches. Which text goes into `request.prompt` is listed in
//! `docs/policy-language.md` ("What `request.prompt` holds") and tested in `tests/extraction.rs`.

use alloc::borrow::Cow;
use alloc::boxed::Box;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

mod skim;

use crate::context::{
    cmp_header, find_header, Api, ContextConfig, ContextError, Message, Needs, Provider,
    RequestContext, RequestInfo, RequestInput, ShieldValue, TimeInfo,
};

impl RequestContext {
    /// Builds the context of one request, extracting everything.
    pub fn from_request(
        input: &RequestInput<'_>,
        config: &ContextConfig,
    ) -> Result<RequestContext, ContextError> {
        Self::from_request_with(input, config, Needs::ALL)
    }

    /// Builds the context, skipping what `needs` says no rule reads (see [`crate::PolicySet::needs`]).
    pub fn from_request_with(
        input: &RequestInput<'_>,
        config: &ContextConfig,
        needs: Needs,
    ) -> Result<RequestContext, ContextError> {
        Ok(Self::unscanned(input, config, needs)?.scan())
    }

    /// [`RequestContext::from_request_with`] without running the prompt scanners yet: a host
    /// with a decision cache looks the key up first
    /// ([`crate::PolicySet::cache_key_before_scans`]) and scans only on a miss.
    pub fn unscanned(
        input: &RequestInput<'_>,
        config: &ContextConfig,
        needs: Needs,
    ) -> Result<crate::prompt_scan::Unscanned, ContextError> {
        Ok(crate::prompt_scan::Unscanned::new(Self::extract(
            input, config, needs,
        )?))
    }

    fn extract(
        input: &RequestInput<'_>,
        config: &ContextConfig,
        needs: Needs,
    ) -> Result<RequestContext, ContextError> {
        if input.body.len() > config.max_body_bytes {
            return Err(ContextError::BodyTooLarge {
                size: input.body.len(),
                limit: config.max_body_bytes,
            });
        }
        let mut headers: Vec<(String, String)> = input
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        // Stable: a name sent twice keeps its arrival order, and its values are joined with `,`
        // (RFC 9110, 5.3), so which value a rule sees never depends on sorting.
        headers.sort_by(|a, b| a.0.cmp(&b.0));
        headers.dedup_by(|next, kept| {
            if next.0 == kept.0 {
                kept.1.push(',');
                kept.1.push_str(&next.1);
                true
            } else {
                false
            }
        });
        let header = |name: &str| find_header(&headers, name);
        let path = normalize_path(input.path);
        let host = header(":authority")
            .or_else(|| header("host"))
            .unwrap_or_default()
            .to_string();
        // Who is asking and where: one value each. The same value sent twice is that value;
        // different values are refused rather than joined into a value no rule expects.
        let single = |name: &str| -> Result<Option<String>, ContextError> {
            let Some(v) = header(name) else {
                return Ok(None);
            };
            let mut parts = v.split(',').map(str::trim);
            let first = parts.next().unwrap_or_default();
            if parts.any(|p| p != first) {
                return Err(ContextError::AmbiguousHeader {
                    header: name.to_string(),
                });
            }
            Ok(Some(first.to_string()))
        };
        let namespace = single(&config.namespace_header)?
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| String::from("default"));
        let principal = config
            .principal_headers
            .iter()
            .map(|(attr, h)| Ok((attr.clone(), single(h)?)))
            .collect::<Result<_, ContextError>>()?;
        let prefix = config.shield_prefix.as_str();
        let mut shield: Vec<(String, ShieldValue)> = headers
            .iter()
            .filter_map(|(k, v)| {
                let head = k.get(..prefix.len())?;
                if cmp_header(head, prefix) != core::cmp::Ordering::Equal {
                    return None;
                }
                let name = k.get(prefix.len()..)?;
                if name.contains('_') {
                    // `x-llm-shield-pii_score` would alias `x-llm-shield-pii-score`: scores are
                    // named with `-` in headers, and a client must not shadow one with `_`.
                    return None;
                }
                // A score sent more than once arrives joined with `,`: the scores are risks
                // (higher is riskier), so the highest counts, and one copy cannot lower another.
                let mut highest: Option<f64> = None;
                for part in v.split(',') {
                    match part.trim().parse::<f64>() {
                        Ok(n) if n.is_finite() => {
                            highest = Some(highest.map_or(n, |h: f64| h.max(n)));
                        }
                        _ => {
                            highest = None;
                            break;
                        }
                    }
                }
                let value = match highest {
                    Some(n) => ShieldValue::Number(n),
                    None => ShieldValue::Text(v.clone()),
                };
                Some((name.replace('-', "_"), value))
            })
            .collect();
        shield.sort_by(|a, b| a.0.cmp(&b.0));
        let (provider, api) = classify(&path, |h| header(h).is_some());
        // Reads and deletes without a body (`GET /v1/chat/completions` lists stored
        // completions) are no model calls; one that carries a body is read as the call it
        // would be, so a method cannot carry a prompt past the API's rules.
        let api = if input.body.iter().all(u8::is_ascii_whitespace)
            && ["GET", "HEAD", "DELETE", "OPTIONS"]
                .iter()
                .any(|m| input.method.eq_ignore_ascii_case(m))
        {
            Api::Other
        } else {
            api
        };
        let mut request = RequestInfo {
            method: input.method.to_ascii_uppercase(),
            path: path.into_owned(),
            host,
            headers: Vec::new(),
            provider,
            api,
            body_bytes: i64::try_from(input.body.len()).unwrap_or(i64::MAX),
            ..RequestInfo::default()
        };
        let mut batch = Vec::new();
        // Multipart uploads (audio, files) carry no JSON prompt; everything else must be JSON. The
        // JSON APIs are parsed whatever the content type says: a client cannot skip screening by
        // calling its JSON body multipart.
        let multipart = header("content-type").is_some_and(|ct| {
            ct.trim_start()
                .get(..10)
                .is_some_and(|t| t.eq_ignore_ascii_case("multipart/"))
        });
        if !(multipart && api == Api::Other) {
            if api == Api::Batch && provider == Provider::Anthropic {
                batch = batch_items(input.body, needs, config.max_batch_items)?;
            } else {
                body(input.body, &mut request, needs)?;
            }
        }
        if let Some(deployment) = azure_deployment(&request.path) {
            // The deployment is the model Azure runs, whatever the body names.
            request.model = Some(deployment);
        }
        request.headers = headers;
        Ok(RequestContext {
            namespace,
            request,
            principal,
            shield,
            time: TimeInfo::from_unix(input.now_unix),
            batch,
            response: crate::context::ResponseInfo::default(),
        })
    }
}

/// The path as a server resolves it, so a spelling cannot change which API a request is
/// classified as: query and fragment removed, percent-encoded unreserved characters decoded
/// (`%73` is `s`), repeated slashes merged, `.` and `..` segments resolved (RFC 3986, 6.2.2 and
/// 5.2.4). Case is kept. Other escapes (`%2F`) stay as they are.
pub(crate) fn normalize_path(raw: &str) -> Cow<'_, str> {
    // Most paths are normal already (`/v1/chat/completions`): no escape, query or fragment, no
    // empty, `.` or `..` segment but a trailing slash's.
    let normal = raw.starts_with('/') && !raw.bytes().any(|b| matches!(b, b'%' | b'?' | b'#')) && {
        let mut segments = raw.split('/').skip(1).peekable();
        let mut ok = true;
        while let Some(seg) = segments.next() {
            let last = segments.peek().is_none();
            if (seg.is_empty() && !last) || seg == "." || seg == ".." {
                ok = false;
                break;
            }
        }
        ok
    };
    if normal {
        return Cow::Borrowed(raw);
    }
    Cow::Owned(normalize_any_path(raw))
}

/// [`normalize_path`] of any path (without looking first whether it is normal already).
fn normalize_any_path(raw: &str) -> String {
    let raw = raw.split(['?', '#']).next().unwrap_or_default();
    let mut decoded = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            let mut look = chars.clone();
            let hex: String = look.by_ref().take(2).collect();
            if let Ok(b) = u8::from_str_radix(&hex, 16) {
                if hex.len() == 2 && (b.is_ascii_alphanumeric() || b"-._~".contains(&b)) {
                    decoded.push(char::from(b));
                    chars = look;
                    continue;
                }
            }
        }
        decoded.push(c);
    }
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out = String::with_capacity(decoded.len().saturating_add(1));
    for seg in &segments {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() || (trailing && !segments.is_empty()) {
        out.push('/');
    }
    out
}

/// The form of a normalized path that API classification reads: lower case, `\\`, `%2F` and
/// `%5C` as `/`, `;parameters` dropped from segments, repeated slashes merged. Servers differ in
/// which of these spellings they accept as the same path; classification takes the widest
/// reading, so a spelling cannot make an API call look like something else.
pub(crate) fn api_path(path: &str) -> Cow<'_, str> {
    // Most paths are in this form already: lower case, nothing to replace or drop, no empty
    // segment, no trailing slash.
    // (One pass over the bytes: `str::contains("//")` builds a substring searcher per call.)
    let wide = path == "/"
        || (path.starts_with('/')
            && !path.ends_with('/')
            && !path.as_bytes().windows(2).any(|w| w == b"//")
            && !path
                .bytes()
                .any(|b| b.is_ascii_uppercase() || matches!(b, b'%' | b'\\' | b';')));
    if wide {
        return Cow::Borrowed(path);
    }
    Cow::Owned(api_path_any(path))
}

/// [`api_path`] of any path (without looking first whether it is in that form already).
fn api_path_any(path: &str) -> String {
    let lowered = path
        .to_ascii_lowercase()
        .replace("%2f", "/")
        .replace("%5c", "/")
        .replace('\\', "/");
    let mut out = String::with_capacity(lowered.len());
    for seg in lowered.split('/') {
        let seg = seg.split(';').next().unwrap_or_default();
        if seg.is_empty() {
            continue;
        }
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Provider and API from the path and the provider-specific headers. The API is read from the
/// path's shape; `anthropic-version` (or an OpenAI-only header or prefix) names the provider only
/// when the path does not.
pub(crate) fn classify(path: &str, has_header: impl Fn(&str) -> bool) -> (Provider, Api) {
    classify_wide(&api_path(path), has_header)
}

/// [`classify`] for a path already in [`api_path`] form.
pub(crate) fn classify_wide(wide: &str, has_header: impl Fn(&str) -> bool) -> (Provider, Api) {
    let p = wide.trim_end_matches('/');
    let (mut provider, api) = if p.ends_with("/chat/completions") {
        (Provider::Openai, Api::Chat)
    } else if p.ends_with("/v1/messages") || p == "/messages" {
        (Provider::Anthropic, Api::Messages)
    } else if p.ends_with("/v1/messages/batches") {
        (Provider::Anthropic, Api::Batch)
    } else if p.ends_with("/completions") {
        (Provider::Openai, Api::Completions)
    } else if p.ends_with("/embeddings") {
        (Provider::Openai, Api::Embeddings)
    } else if p.ends_with("/responses") {
        (Provider::Openai, Api::Responses)
    } else if p.ends_with("/v1/batches") || p.ends_with("/openai/batches") {
        (Provider::Openai, Api::Batch)
    } else if p
        .split('/')
        .any(|seg| seg == "assistants" || seg == "threads")
    {
        (Provider::Openai, Api::Assistants)
    } else {
        (Provider::Unknown, Api::Other)
    };
    if provider == Provider::Unknown && has_header("anthropic-version") {
        provider = Provider::Anthropic;
    } else if provider == Provider::Unknown
        && (p.starts_with("/openai/") || has_header("openai-organization"))
    {
        provider = Provider::Openai;
    }
    (provider, api)
}

/// Azure OpenAI addresses the model by deployment: `/openai/deployments/{name}/…`.
pub(crate) fn azure_deployment(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/openai/deployments/")?;
    let name = rest.split('/').next()?;
    (!name.is_empty()).then(|| name.to_string())
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e.saturating_add(1));
    b.get(start..end).unwrap_or_default()
}

/// The trimmed body, checked to be a JSON object; `None` for an empty body.
fn object_body(bytes: &[u8]) -> Result<Option<&[u8]>, ContextError> {
    let trimmed = trim_ascii(bytes);
    if trimmed.is_empty() {
        return Ok(None);
    }
    if trimmed.first() != Some(&b'{') {
        // Distinguish "not JSON at all" from "JSON, but not an object" for a clearer message.
        return Err(match serde_json::from_slice::<IgnoredAny>(trimmed) {
            Ok(_) => ContextError::InvalidBody(String::from("the body must be a JSON object")),
            Err(e) => ContextError::InvalidBody(e.to_string()),
        });
    }
    Ok(Some(trimmed))
}

/// Parses the body. Without tracking where the parser is first (tracking allocates a path
/// segment for every key it passes, most of a small body's parsing cost); a body that fails is
/// parsed again with it, for an error that names the field ([`parse_located`]).
fn parse<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, ContextError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match T::deserialize(&mut de) {
        Ok(parsed) => {
            de.end()
                .map_err(|e| ContextError::InvalidBody(e.to_string()))?;
            Ok(parsed)
        }
        Err(plain) => Err(parse_located::<T>(bytes)
            .err()
            .unwrap_or_else(|| ContextError::InvalidBody(plain.to_string()))),
    }
}

/// [`parse`] tracking the path of the value being parsed, so that an invalid field is named.
fn parse_located<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, ContextError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_data() && path != "." {
            ContextError::InvalidField {
                field: path,
                message: inner.to_string(),
            }
        } else {
            ContextError::InvalidBody(inner.to_string())
        }
    })?;
    de.end()
        .map_err(|e| ContextError::InvalidBody(e.to_string()))?;
    Ok(parsed)
}

/// Fills the body-derived fields of `request`.
pub(crate) fn body(
    bytes: &[u8],
    request: &mut RequestInfo,
    needs: Needs,
) -> Result<(), ContextError> {
    let Some(bytes) = object_body(bytes)? else {
        return Ok(());
    };
    if needs.messages || needs.prompt {
        parse::<Body<Text>>(bytes)?.fill(request, needs);
    } else {
        // No rule reads the text: the skim passes over it, and asks serde when in doubt.
        let body = match skim::body(bytes) {
            Some(b) => b,
            None => parse::<Body<Skip>>(bytes)?,
        };
        body.fill(request, needs);
    }
    Ok(())
}

/// The requests of an Anthropic message batch, each as an Anthropic Messages request.
fn batch_items(bytes: &[u8], needs: Needs, limit: usize) -> Result<Vec<RequestInfo>, ContextError> {
    let Some(bytes) = object_body(bytes)? else {
        return Ok(Vec::new());
    };
    // Counted first, without building anything: a body of many tiny items must not cost memory
    // before it is refused.
    if parse::<BatchCount>(bytes)?.0 > limit {
        return Err(ContextError::BatchTooLarge { limit });
    }
    if needs.messages || needs.prompt {
        let b: Batch<Text> = parse(bytes)?;
        Ok(b.requests
            .into_iter()
            .flatten()
            .map(|i| item(i.params, needs))
            .collect())
    } else {
        let b: Batch<Skip> = parse(bytes)?;
        Ok(b.requests
            .into_iter()
            .flatten()
            .map(|i| item(i.params, needs))
            .collect())
    }
}

fn item<S: Sink>(params: Option<Body<S>>, needs: Needs) -> RequestInfo {
    let mut r = RequestInfo {
        provider: Provider::Anthropic,
        api: Api::Messages,
        ..RequestInfo::default()
    };
    if let Some(p) = params {
        p.fill(&mut r, needs);
    }
    r
}

/// The number of items in a batch body's `requests`.
struct BatchCount(usize);

impl<'de> Deserialize<'de> for BatchCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Top;
        impl<'de> Visitor<'de> for Top {
            type Value = BatchCount;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a batch body")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BatchCount, A::Error> {
                let mut n = 0;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "requests" {
                        // A repeated key counts twice: whatever the parser builds is counted.
                        n = map.next_value::<Count>()?.0.saturating_add(n);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(BatchCount(n))
            }
        }
        struct Count(usize);
        impl<'de> Deserialize<'de> for Count {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Items;
                impl<'de> Visitor<'de> for Items {
                    type Value = Count;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a list of requests")
                    }
                    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
                        let mut n = 0usize;
                        while seq.next_element::<IgnoredAny>()?.is_some() {
                            n = n.saturating_add(1);
                        }
                        Ok(Count(n))
                    }
                    fn visit_unit<E: de::Error>(self) -> Result<Count, E> {
                        Ok(Count(0))
                    }
                }
                d.deserialize_any(Items)
            }
        }
        d.deserialize_map(Top)
    }
}

/// `{"requests": [{"custom_id", "params": {...a Messages body...}}]}`.
#[derive(Deserialize)]
#[serde(bound = "S: Sink")]
struct Batch<S> {
    #[serde(default)]
    requests: Option<Vec<BatchItem<S>>>,
}

#[derive(Deserialize)]
#[serde(bound = "S: Sink")]
struct BatchItem<S> {
    #[serde(default)]
    params: Option<Body<S>>,
}

/// The body fields policies read. Keys this type does not name are not skipped: their strings
/// are text the provider receives (tool and schema descriptions, `stop`, `metadata`, fields added
/// by a later API version), collected into `declared` when a rule reads the prompt, unless the key
/// is in [`NOT_TEXT`].
struct Body<S> {
    model: Option<String>,
    stream: Option<bool>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    max_output_tokens: Option<i64>,
    /// OpenAI: completions generated per request (each up to `max_tokens`).
    n: Option<i64>,
    /// OpenAI completions: candidates generated server-side.
    best_of: Option<i64>,
    temperature: Option<f64>,
    user: Option<String>,
    /// OpenAI's successor of `user`.
    safety_identifier: Option<String>,
    /// Anthropic `metadata.user_id`.
    metadata_user: Option<String>,
    /// `system`, `instructions` and the Assistants API's `additional_instructions`.
    system: Vec<S>,
    /// `messages`, the Assistants API's `additional_messages`, a thread's `messages` and a
    /// thread message's own `role` and `content`.
    messages: Vec<Item<S>>,
    /// `prompt` and Completions' `suffix`.
    prompt: Vec<S>,
    tools: Vec<ToolDef<S>>,
    /// The text of every other field.
    declared: String,
}

impl<S> Default for Body<S> {
    fn default() -> Self {
        Body {
            model: None,
            stream: None,
            max_tokens: None,
            max_completion_tokens: None,
            max_output_tokens: None,
            n: None,
            best_of: None,
            temperature: None,
            user: None,
            safety_identifier: None,
            metadata_user: None,
            system: Vec::new(),
            messages: Vec::new(),
            prompt: Vec::new(),
            tools: Vec::new(),
            declared: String::new(),
        }
    }
}

/// Top-level keys whose strings are identifiers, enumerations or credentials meant for the
/// provider, never text a model reads: `model`, `tool_choice`, `reasoning_effort`, file and
/// thread ids, `logit_bias` token ids, ... Every other key's strings are text.
const NOT_TEXT: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "tool_choice",
    "service_tier",
    "reasoning_effort",
    "reasoning",
    "verbosity",
    "modalities",
    "include",
    "previous_response_id",
    "conversation",
    "truncation",
    "encoding_format",
    "logit_bias",
    "audio",
    "container",
    "thinking",
    "assistant_id",
    "thread_id",
    "file_ids",
    "attachments",
    "tool_resources",
    "input_file_id",
    "endpoint",
    "completion_window",
    "background",
    "prompt_cache_retention",
    "role",
];

/// Keys inside a tool definition that are not text: its type, and credentials the provider uses
/// to reach a remote (MCP) server.
const TOOL_NOT_TEXT: &[&str] = &[
    "type",
    "headers",
    "authorization",
    "authorization_token",
    "cache_control",
];

impl<S: Sink> Body<S> {
    fn fill(self, request: &mut RequestInfo, needs: Needs) {
        request.model = self.model;
        request.stream = self.stream.unwrap_or(false);
        // The fields the API reads (a field it ignores caps nothing: the answer may run to the
        // model's output cap); when a body names several, the largest is what a cap must see.
        // An API without a known field: any of them.
        let field = |name: &str| match name {
            "max_tokens" => self.max_tokens,
            "max_completion_tokens" => self.max_completion_tokens,
            "max_output_tokens" => self.max_output_tokens,
            _ => None,
        };
        request.max_tokens = match request.api.output_cap_fields() {
            Some((fields, _)) => fields.iter().filter_map(|f| field(f)).max(),
            None => [
                self.max_tokens,
                self.max_completion_tokens,
                self.max_output_tokens,
            ]
            .into_iter()
            .flatten()
            .max(),
        };
        request.choices = [self.n, self.best_of]
            .into_iter()
            .flatten()
            .max()
            .map_or(1, |n| u32::try_from(n.clamp(1, 10_000)).unwrap_or(1));
        request.temperature = self.temperature;
        request.user = self.user.or(self.safety_identifier).or(self.metadata_user);
        let mut tools = Vec::with_capacity(self.tools.len());
        let mut tool_types = Vec::with_capacity(self.tools.len());
        let mut tool_text = String::new();
        for t in self.tools {
            let (name, kind, text) = t.into_parts();
            if let Some(name) = name {
                tools.push(crate::fold::fold(&name));
                tool_types.push(kind);
            }
            push_joined(&mut tool_text, &text);
        }
        request.tools = tools;
        request.tool_types = tool_types;
        if !(needs.messages || needs.prompt) {
            return;
        }
        let mut messages: Vec<Message> = Vec::new();
        for system in self.system {
            let text = system.into_text();
            if !text.is_empty() {
                messages.push(Message {
                    role: String::from("system"),
                    content: text,
                });
            }
        }
        for item in self.messages {
            if let Some(m) = item.0 {
                messages.push(m);
            }
        }
        for prompt in self.prompt {
            let text = prompt.into_text();
            if !text.is_empty() {
                messages.push(Message {
                    role: String::from("user"),
                    content: text,
                });
            }
        }
        if needs.prompt {
            let mut prompt = String::with_capacity(
                messages
                    .iter()
                    .map(|m| m.content.len().saturating_add(1))
                    .sum::<usize>()
                    .saturating_add(tool_text.len())
                    .saturating_add(self.declared.len()),
            );
            for m in &messages {
                push_joined(&mut prompt, &m.content);
            }
            push_joined(&mut prompt, &tool_text);
            push_joined(&mut prompt, &self.declared);
            if needs.estimate {
                request.estimated_tokens =
                    i64::try_from(crate::tokens::estimate(&prompt)).unwrap_or(i64::MAX);
            }
            // The scans, and the folding of `request.prompt_folded`, run later
            // (`RequestContext::scan`): only when the decision cache misses. Values and phrases
            // handed over across user turns are whole in the seams.
            if needs.entities || needs.injection || needs.folded {
                let seams = if needs.entities || needs.injection {
                    crate::detect::seams(
                        messages
                            .iter()
                            .map(|m| (m.role.as_str(), m.content.as_str())),
                    )
                } else {
                    String::new()
                };
                request.scan = crate::context::ScanInput::pending(
                    needs.entities,
                    needs.injection,
                    needs.folded,
                    seams,
                );
            }
            request.prompt = prompt;
        }
        if needs.messages {
            request.messages = messages;
        }
    }
}

/// Sets a field once: a key repeated in one object is refused, as serde's derive does, because
/// servers disagree about which copy counts.
fn once<T, E: de::Error>(slot: &mut Option<T>, value: T, key: &'static str) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::duplicate_field(key));
    }
    *slot = Some(value);
    Ok(())
}

impl<'de, S: Sink> Deserialize<'de> for Body<S> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(BodyVisitor(PhantomData))
    }
}

struct BodyVisitor<S>(PhantomData<S>);

impl<'de, S: Sink> Visitor<'de> for BodyVisitor<S> {
    type Value = Body<S>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a request body object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Body<S>, A::Error> {
        // Every field is kept until the object ends (keys come in any order); `Some(None)` is a
        // key sent as `null`.
        let (mut model, mut stream, mut temperature) = (None, None, None);
        let (mut max_tokens, mut max_completion, mut max_output, mut n, mut best_of) =
            (None, None, None, None, None);
        let (mut user, mut safety, mut metadata) = (None, None, None);
        let (mut system, mut instructions, mut additional) = (None, None, None);
        let (mut prompt, mut suffix, mut content, mut input) = (None, None, None, None);
        let (mut role, mut messages, mut extra_messages, mut thread) = (None, None, None, None);
        let (mut tools, mut functions, mut mcp) = (None, None, None);
        let mut declared = String::new();
        macro_rules! take {
            ($slot:ident, $key:literal, $ty:ty) => {
                once(&mut $slot, map.next_value::<Option<$ty>>()?, $key)?
            };
        }
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "model" => take!(model, "model", String),
                "stream" => take!(stream, "stream", bool),
                "max_tokens" => take!(max_tokens, "max_tokens", i64),
                "max_completion_tokens" => take!(max_completion, "max_completion_tokens", i64),
                "max_output_tokens" => take!(max_output, "max_output_tokens", i64),
                "n" => take!(n, "n", i64),
                "best_of" => take!(best_of, "best_of", i64),
                "temperature" => take!(temperature, "temperature", f64),
                "user" => take!(user, "user", String),
                "safety_identifier" => take!(safety, "safety_identifier", String),
                "metadata" => take!(metadata, "metadata", Meta<S>),
                "messages" => take!(messages, "messages", Vec<Item<S>>),
                "additional_messages" => take!(extra_messages, "additional_messages", Vec<Item<S>>),
                "thread" => take!(thread, "thread", Thread<S>),
                "role" => take!(role, "role", String),
                "content" => take!(content, "content", S),
                "system" => take!(system, "system", S),
                "instructions" => take!(instructions, "instructions", S),
                "additional_instructions" => take!(additional, "additional_instructions", S),
                "prompt" => take!(prompt, "prompt", S),
                "suffix" => take!(suffix, "suffix", S),
                "input" => take!(input, "input", Items<S>),
                "tools" => take!(tools, "tools", Vec<ToolDef<S>>),
                "functions" => take!(functions, "functions", Vec<ToolDef<S>>),
                "mcp_servers" => take!(mcp, "mcp_servers", Vec<ToolDef<S>>),
                k if !S::TEXT || NOT_TEXT.contains(&k) => {
                    map.next_value::<IgnoredAny>()?;
                }
                _ => {
                    let Strings(text) = map.next_value::<Strings>()?;
                    push_joined(&mut declared, &text);
                }
            }
        }
        let mut b = Body::<S> {
            model: model.flatten(),
            stream: stream.flatten(),
            max_tokens: max_tokens.flatten(),
            max_completion_tokens: max_completion.flatten(),
            max_output_tokens: max_output.flatten(),
            n: n.flatten(),
            best_of: best_of.flatten(),
            temperature: temperature.flatten(),
            user: user.flatten(),
            safety_identifier: safety.flatten(),
            ..Body::default()
        };
        b.system = [system, instructions, additional]
            .into_iter()
            .flatten()
            .flatten()
            .collect();
        b.prompt = [prompt, suffix].into_iter().flatten().flatten().collect();
        if let Some(t) = thread.flatten() {
            b.messages.extend(t.messages.into_iter().flatten());
            if let Some(m) = t.metadata {
                push_joined(&mut b.declared, &m.text);
            }
        }
        b.messages.extend(messages.flatten().into_iter().flatten());
        b.messages
            .extend(extra_messages.flatten().into_iter().flatten());
        b.messages
            .extend(input.flatten().into_iter().flat_map(|i| i.0));
        if let Some(content) = content.flatten() {
            // An Assistants thread message: `{role, content, ...}`.
            let role = role.flatten().unwrap_or_else(|| String::from("user"));
            b.messages.push(Item::text(&role, content.into_text()));
        }
        b.tools = [tools, functions]
            .into_iter()
            .flatten()
            .flatten()
            .flatten()
            .collect();
        for item in &mut b.messages {
            // Tools added by an input item are offered like those of `tools`.
            b.tools.append(&mut item.1);
        }
        for mut server in mcp.flatten().into_iter().flatten() {
            server.kind = Some(String::from("mcp"));
            b.tools.push(server);
        }
        for id in [&b.user, &b.safety_identifier].into_iter().flatten() {
            // Identifiers the client chose are sent to the provider with the request.
            push_joined(&mut b.declared, id);
        }
        if let Some(m) = metadata.flatten() {
            b.metadata_user = m.user_id;
            push_joined(&mut b.declared, &m.text);
        }
        push_joined(&mut b.declared, &declared);
        Ok(b)
    }
}

/// `metadata`: Anthropic's `user_id`, and every value as text (OpenAI's string map).
struct Meta<S> {
    user_id: Option<String>,
    text: String,
    _sink: PhantomData<S>,
}

impl<'de, S: Sink> Deserialize<'de> for Meta<S> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<S>(PhantomData<S>);
        impl<'de, S: Sink> Visitor<'de> for V<S> {
            type Value = Meta<S>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a metadata object")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Meta<S>, E> {
                Ok(Meta {
                    user_id: None,
                    text: String::new(),
                    _sink: PhantomData,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Meta<S>, A::Error> {
                let mut m = self.visit_unit::<A::Error>()?;
                let mut user_id = None;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "user_id" {
                        let id = map.next_value::<Option<String>>()?;
                        if S::TEXT {
                            push_joined(&mut m.text, id.as_deref().unwrap_or_default());
                        }
                        once(&mut user_id, id, "user_id")?;
                    } else if S::TEXT {
                        push_joined(&mut m.text, &key);
                        let Strings(v) = map.next_value::<Strings>()?;
                        push_joined(&mut m.text, &v);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                m.user_id = user_id.flatten();
                Ok(m)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// An Assistants API thread created with its run: `{messages, metadata}`.
#[derive(Deserialize)]
#[serde(bound = "S: Sink")]
struct Thread<S> {
    #[serde(default)]
    messages: Option<Vec<Item<S>>>,
    #[serde(default)]
    metadata: Option<Meta<S>>,
}

/// A tool definition: OpenAI chat `{type, function: {name, description, parameters}}` (or
/// `custom: {...}`), Responses `{type, name, ...}` or a built-in `{type, ...}`, Anthropic
/// `{name, description, input_schema}` or a server tool `{type: "web_search_20250305", name}`,
/// legacy `functions: [{name, ...}]`, an Anthropic `mcp_servers` entry. Its text is every string
/// but the type and credentials ([`TOOL_NOT_TEXT`]).
struct ToolDef<S> {
    name: Option<String>,
    kind: Option<String>,
    /// `function` / `custom`: the definition one level down.
    inner: Option<Box<ToolDef<S>>>,
    text: String,
    _sink: PhantomData<S>,
}

impl<S> ToolDef<S> {
    /// The name (`None` for a definition without name or type), the canonical type
    /// ([`tool_type`]) and the text.
    fn into_parts(self) -> (Option<String>, String, String) {
        let mut text = self.text;
        let (inner_name, inner_kind) = match self.inner {
            Some(inner) => {
                push_joined(&mut text, &inner.text);
                (inner.name, inner.kind)
            }
            None => (None, None),
        };
        let kind = self.kind.or(inner_kind);
        let name = inner_name
            .or(self.name)
            .or_else(|| kind.clone().filter(|k| k != "function" && k != "custom"));
        (name, tool_type(kind.as_deref()), text)
    }
}

impl<'de, S: Sink> Deserialize<'de> for ToolDef<S> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<S>(PhantomData<S>);
        impl<'de, S: Sink> Visitor<'de> for V<S> {
            type Value = ToolDef<S>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a tool definition object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ToolDef<S>, A::Error> {
                let (mut name, mut kind, mut inner, mut server_label) = (None, None, None, None);
                let mut text = String::new();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "name" => {
                            let n = map.next_value::<Option<String>>()?;
                            if S::TEXT {
                                push_joined(&mut text, n.as_deref().unwrap_or_default());
                            }
                            once(&mut name, n, "name")?;
                        }
                        "type" => {
                            once(&mut kind, map.next_value::<Option<String>>()?, "type")?;
                        }
                        // An OpenAI MCP tool is named by its server's label.
                        "server_label" => {
                            let label = map.next_value::<Option<String>>()?;
                            if S::TEXT {
                                push_joined(&mut text, label.as_deref().unwrap_or_default());
                            }
                            once(&mut server_label, label, "server_label")?;
                        }
                        "function" | "custom" => {
                            let def = map.next_value::<Option<ToolDef<S>>>()?.map(Box::new);
                            once(&mut inner, def, "function")?;
                        }
                        k if TOOL_NOT_TEXT.contains(&k) || !S::TEXT => {
                            map.next_value::<IgnoredAny>()?;
                        }
                        _ => {
                            let Strings(v) = map.next_value::<Strings>()?;
                            push_joined(&mut text, &v);
                        }
                    }
                }
                Ok(ToolDef {
                    name: name.flatten().or(server_label.flatten()),
                    kind: kind.flatten(),
                    inner: inner.flatten(),
                    text,
                    _sink: PhantomData,
                })
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

/// The canonical type of a tool, the same for both providers: `function` for a tool the client
/// defines and runs (`function`, `custom`, no type), else the built-in or server tool's type
/// without its version (`web_search_20250305` and `web_search_preview` are `web_search`;
/// `code_execution_*` and `code_interpreter` are `code_execution`; `bash_*`, `local_shell` and
/// `shell` are `bash`; `computer_*` and `computer_use_preview` are `computer_use`;
/// `text_editor_*` and `apply_patch` are `text_editor`; `mcp_toolset` and an MCP server are
/// `mcp`; `tool_search_tool_*` is `tool_search`), lower case.
pub fn tool_type(kind: Option<&str>) -> String {
    let Some(kind) = kind else {
        return String::from("function");
    };
    let lower = kind.trim().to_ascii_lowercase();
    // Versions: `_20250305` (Anthropic) or `_2025_03_11` (OpenAI).
    let mut base = lower.as_str();
    while let Some((head, tail)) = base.rsplit_once('_') {
        if tail.is_empty() || !tail.bytes().all(|b| b.is_ascii_digit()) {
            break;
        }
        base = head;
    }
    let canonical = match base {
        "" | "function" | "custom" => "function",
        "code_execution" | "code_interpreter" => "code_execution",
        "bash" | "local_shell" | "shell" => "bash",
        "computer" | "computer_use" | "computer_use_preview" => "computer_use",
        "text_editor" | "apply_patch" => "text_editor",
        "web_search" | "web_search_preview" => "web_search",
        "mcp" | "mcp_toolset" => "mcp",
        b if b.starts_with("tool_search_tool") => "tool_search",
        other => other,
    };
    String::from(canonical)
}

/// Text collected from a content value, or nothing.
trait Sink: for<'de> Deserialize<'de> + Default {
    /// Whether text is collected at all.
    const TEXT: bool;
    fn into_text(self) -> String;
}

/// Collects the text the model reads from a content value: a string, or, in content parts and
/// blocks, `text`, `content`, `output`, `thinking`, `refusal`, tool-call `arguments` (OpenAI
/// `tool_calls[].function`, `function_call`, Responses `function_call` items), every string of a
/// tool call's `input` (Anthropic `tool_use`, Responses `custom_tool_call`), a text `source`'s
/// `data` and a `document`'s `title` and `context`. Images, audio, files and base64 data are
/// skipped.
#[derive(Default)]
struct Text(String);

/// Skips a content value without building anything.
#[derive(Default)]
struct Skip;

impl Sink for Text {
    const TEXT: bool = true;
    fn into_text(self) -> String {
        self.0
    }
}

impl Sink for Skip {
    const TEXT: bool = false;
    fn into_text(self) -> String {
        String::new()
    }
}

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(d).map(|_| Skip)
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextVisitor)
    }
}

struct TextVisitor;

fn push_joined(acc: &mut String, part: &str) {
    if part.is_empty() {
        return;
    }
    if !acc.is_empty() {
        acc.push('\n');
    }
    acc.push_str(part);
}

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Text;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("text content: a string or an array of content parts")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
        Ok(Text(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Text, E> {
        Ok(Text(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Text, E> {
        Ok(Text::default())
    }
    fn visit_none<E: de::Error>(self) -> Result<Text, E> {
        Ok(Text::default())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Text, E> {
        Ok(Text::default())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Text, E> {
        Ok(Text::default())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Text, E> {
        Ok(Text::default())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Text, E> {
        Ok(Text::default())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
        let mut acc = String::new();
        while let Some(Text(part)) = seq.next_element::<Text>()? {
            push_joined(&mut acc, &part);
        }
        Ok(Text(acc))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Text, A::Error> {
        let b = block::<A, Text>(map)?;
        let mut text = b.text;
        // Tool definitions inside content (a tool search result): their text is read too.
        for t in b.tools {
            push_joined(&mut text, &t.into_parts().2);
        }
        Ok(Text(text))
    }
}

/// Keys of messages, input items and content blocks whose values are not text: ids, types,
/// opaque provider data (signatures, encrypted content), media and log probabilities, and
/// credentials the provider uses. Every other key's strings are text (default in: a block type
/// added by a later API version is read, not skipped).
const CONTENT_NOT_TEXT: &[&str] = &[
    "id",
    "call_id",
    "tool_call_id",
    "tool_use_id",
    "tool_id",
    "caller_id",
    "file_id",
    "file_ids",
    "download_id",
    "tab_id",
    "skill_id",
    "container_id",
    "approval_request_id",
    "vector_store_ids",
    "signature",
    "encrypted_content",
    "encrypted_index",
    "encrypted_stdout",
    "media_type",
    "mime_type",
    "cache_control",
    "detail",
    "status",
    "version",
    "retrieved_at",
    "file_data",
    "input_audio",
    "audio",
    "logprobs",
    "top_logprobs",
    "fingerprint",
    "headers",
    "authorization",
    "authorization_token",
    "domain_secrets",
];

/// A message, input item or content block read as a map: its role and type, its text, and the
/// tools it adds (a Responses `additional_tools` item).
struct Block<S> {
    role: Option<String>,
    kind: Option<String>,
    text: String,
    tools: Vec<ToolDef<S>>,
}

/// Reads one map of a message, item or block ([`CONTENT_NOT_TEXT`] says what is not text).
fn block<'de, A: MapAccess<'de>, S: Sink>(mut map: A) -> Result<Block<S>, A::Error> {
    let mut b = Block {
        role: None,
        kind: None,
        text: String::new(),
        tools: Vec::new(),
    };
    // Kept until the block's `type` is known (keys come in any order).
    let (mut data, mut result) = (None, None);
    while let Some(key) = map.next_key::<Cow<'de, str>>()? {
        match key.as_ref() {
            "role" => b.role = map.next_value::<Option<String>>()?,
            "type" => b.kind = map.next_value::<Option<String>>()?,
            "tools" => {
                let tools = map.next_value::<Option<Vec<ToolDef<S>>>>()?;
                b.tools.extend(tools.into_iter().flatten());
            }
            _ if !S::TEXT => {
                map.next_value::<IgnoredAny>()?;
            }
            k if CONTENT_NOT_TEXT.contains(&k) => {
                map.next_value::<IgnoredAny>()?;
            }
            // A text document's source, or base64 of an image, a PDF, a redacted thought.
            "data" => data = map.next_value::<Option<Text>>()?,
            // An image generation call's base64 image, or a tool's result.
            "result" => result = map.next_value::<Option<Text>>()?,
            // A URL is text (a key in its query is a key sent); a `data:` URI is media.
            "url" | "image_url" | "file_url" => {
                let Text(url) = map.next_value::<Url>()?.0;
                push_joined(&mut b.text, &url);
            }
            // Tool call input and arguments (any JSON), template variables, a shell's
            // environment, metadata and JSON schemas: every key and string.
            "input" | "arguments" | "variables" | "env" | "metadata" | "attributes" | "schema"
            | "input_schema" | "output_schema" | "parameters" | "properties" | "configs"
            | "input_examples" => {
                let Strings(part) = map.next_value::<Strings>()?;
                push_joined(&mut b.text, &part);
            }
            _ => {
                let Text(part) = map.next_value::<Text>()?;
                push_joined(&mut b.text, &part);
            }
        }
    }
    let kind = b.kind.as_deref();
    if let (Some("text"), Some(Text(d))) = (kind, data) {
        // A plain-text document source: `{"type": "text", "media_type": "text/plain", "data"}`.
        push_joined(&mut b.text, &d);
    }
    if let (false, Some(Text(r))) = (kind == Some("image_generation_call"), result) {
        push_joined(&mut b.text, &r);
    }
    Ok(b)
}

/// A URL's text, or nothing for a `data:` URI (media); an object (`{"url", "detail"}`) is read
/// as a block.
struct Url(Text);

impl<'de> Deserialize<'de> for Url {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let Text(t) = Text::deserialize(d)?;
        let media = t
            .get(..5)
            .is_some_and(|head| head.eq_ignore_ascii_case("data:"));
        Ok(Url(Text(if media { String::new() } else { t })))
    }
}

/// Every string of any JSON value (map keys included), depth first, joined with newlines.
#[derive(Default)]
struct Strings(String);

impl<'de> Deserialize<'de> for Strings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StringsVisitor)
    }
}

struct StringsVisitor;

impl<'de> Visitor<'de> for StringsVisitor {
    type Value = Strings;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Strings, E> {
        Ok(Strings(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Strings, E> {
        Ok(Strings(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Strings, E> {
        Ok(Strings::default())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Strings, E> {
        Ok(Strings::default())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Strings, E> {
        Ok(Strings::default())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Strings, E> {
        Ok(Strings::default())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Strings, E> {
        Ok(Strings::default())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strings, A::Error> {
        let mut acc = String::new();
        while let Some(Strings(part)) = seq.next_element::<Strings>()? {
            push_joined(&mut acc, &part);
        }
        Ok(Strings(acc))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strings, A::Error> {
        let mut acc = String::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            // Keys are read too: `{"AKIA...": 1}` puts a secret in front of the model as well.
            push_joined(&mut acc, &key);
            let Strings(part) = map.next_value::<Strings>()?;
            push_joined(&mut acc, &part);
        }
        Ok(Strings(acc))
    }
}

/// One message / input item; `None` for items without text (token arrays, bare ids), with the
/// tools it adds.
struct Item<S>(Option<Message>, Vec<ToolDef<S>>);

/// `input`: a string, or an array of strings / items / token arrays.
struct Items<S>(Vec<Item<S>>);

impl<S> Item<S> {
    fn text(role: &str, text: String) -> Self {
        Item(
            Some(Message {
                role: role.to_string(),
                content: text,
            }),
            Vec::new(),
        )
    }
}

struct ItemVisitor<S>(PhantomData<S>);

impl<'de, S: Sink> Visitor<'de> for ItemVisitor<S> {
    type Value = Item<S>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message object or a string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Item<S>, E> {
        Ok(Item::text("user", v.to_string()))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Item<S>, A::Error> {
        let b = block::<A, S>(map)?;
        if b.role.is_none() && b.text.is_empty() {
            // An item without text (a bare reference, a reasoning item without a summary, a
            // call without arguments): no turn.
            return Ok(Item(None, b.tools));
        }
        let role = match (b.role.as_deref(), b.kind.as_deref()) {
            (Some(r), _) => r,
            (None, Some(k)) if k.ends_with("_output") => "tool",
            (None, Some(k)) if k.ends_with("_call") || k == "reasoning" => "assistant",
            (None, _) => "user",
        };
        Ok(Item(
            Some(Message {
                role: role.to_string(),
                content: b.text,
            }),
            b.tools,
        ))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item<S>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Item(None, Vec::new()))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Item<S>, E> {
        Ok(Item(None, Vec::new()))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Item<S>, E> {
        Ok(Item(None, Vec::new()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Item<S>, E> {
        Ok(Item(None, Vec::new()))
    }
}

impl<'de, S: Sink> Deserialize<'de> for Item<S> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ItemVisitor(PhantomData))
    }
}

struct ItemsVisitor<S>(PhantomData<S>);

impl<'de, S: Sink> Visitor<'de> for ItemsVisitor<S> {
    type Value = Items<S>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or an array")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Items<S>, E> {
        Ok(Items(alloc::vec![Item::text("user", v.to_string())]))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Items<S>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Item<S>>()? {
            items.push(item);
        }
        Ok(Items(items))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Items<S>, E> {
        Ok(Items(Vec::new()))
    }
}

impl<'de, S: Sink> Deserialize<'de> for Items<S> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ItemsVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paths of the pieces normalization looks at: slashes, dots, escapes, queries, case,
    /// parameters and backslashes.
    fn paths() -> impl Iterator<Item = String> {
        const PIECES: &[&str] = &[
            "/",
            "//",
            "v1",
            "chat",
            "completions",
            ".",
            "..",
            "%2F",
            "%2f",
            "%73",
            "%5C",
            "?a=b",
            "#f",
            ";x",
            "\\",
            "V1",
            "Chat",
            "a.b",
            "-",
            "_",
            "~",
            "%",
            "%zz",
            "é",
        ];
        crate::generated_texts::generated(PIECES, 0x9e37_79b9_7f4a_7c15, 9)
    }

    #[test]
    fn the_fast_paths_of_path_normalization_change_nothing() {
        let fixed = [
            "/v1/chat/completions",
            "/v1/chat/",
            "/",
            "",
            "/v1//chat",
            "/v1/./x",
        ];
        for p in paths().chain(fixed.iter().map(|p| String::from(*p))) {
            assert_eq!(normalize_path(&p), normalize_any_path(&p), "{p:?}");
            assert_eq!(api_path(&p), api_path_any(&p), "{p:?}");
        }
    }
}
