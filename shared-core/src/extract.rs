//! Building a [`RequestContext`] from a raw request: headers, path classification, and one typed
//! serde pass over OpenAI and Anthropic request bodies.
//!
//! Unknown body fields are skipped without being built, strings are borrowed where the JSON has
//! no escapes, and when no rule reads message text the text is not collected at all (the
//! `S: Sink` parameter). Handles Chat Completions, Completions, Embeddings, Responses, Anthropic
//! Messages and Anthropic message batches. Which text goes into `request.prompt` is listed in
//! `docs/policy-language.md` ("What `request.prompt` holds") and tested in `tests/extraction.rs`.

use alloc::borrow::Cow;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

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
            path,
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
        })
    }
}

/// The path as a server resolves it, so a spelling cannot change which API a request is
/// classified as: query and fragment removed, percent-encoded unreserved characters decoded
/// (`%73` is `s`), repeated slashes merged, `.` and `..` segments resolved (RFC 3986, 6.2.2 and
/// 5.2.4). Case is kept. Other escapes (`%2F`) stay as they are.
pub(crate) fn normalize_path(raw: &str) -> String {
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
pub(crate) fn api_path(path: &str) -> String {
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

fn parse<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, ContextError> {
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
        parse::<Body<'_, Text>>(bytes)?.fill(request, needs);
    } else {
        parse::<Body<'_, Skip>>(bytes)?.fill(request, needs);
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
        let b: Batch<'_, Text> = parse(bytes)?;
        Ok(b.requests
            .into_iter()
            .flatten()
            .map(|i| item(i.params, needs))
            .collect())
    } else {
        let b: Batch<'_, Skip> = parse(bytes)?;
        Ok(b.requests
            .into_iter()
            .flatten()
            .map(|i| item(i.params, needs))
            .collect())
    }
}

fn item<S: Sink>(params: Option<Body<'_, S>>, needs: Needs) -> RequestInfo {
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
struct Batch<'a, S> {
    #[serde(default, borrow)]
    requests: Option<Vec<BatchItem<'a, S>>>,
}

#[derive(Deserialize)]
#[serde(bound = "S: Sink")]
struct BatchItem<'a, S> {
    #[serde(default, borrow)]
    params: Option<Body<'a, S>>,
}

/// The body fields policies read; everything else is skipped by serde.
#[derive(Deserialize)]
#[serde(bound = "S: Sink")]
struct Body<'a, S> {
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    max_output_tokens: Option<i64>,
    /// OpenAI: completions generated per request (each up to `max_tokens`).
    #[serde(default)]
    n: Option<i64>,
    /// OpenAI completions: candidates generated server-side.
    #[serde(default)]
    best_of: Option<i64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default, borrow)]
    user: Option<Cow<'a, str>>,
    /// OpenAI's successor of `user`.
    #[serde(default, borrow)]
    safety_identifier: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    metadata: Option<Meta<'a>>,
    #[serde(default)]
    messages: Option<Vec<Item<S>>>,
    #[serde(default)]
    system: Option<S>,
    #[serde(default)]
    instructions: Option<S>,
    #[serde(default)]
    prompt: Option<S>,
    /// Completions: text after the insertion point.
    #[serde(default)]
    suffix: Option<S>,
    #[serde(default)]
    input: Option<Items<S>>,
    #[serde(default, borrow)]
    tools: Option<Vec<Tool<'a>>>,
    #[serde(default, borrow)]
    functions: Option<Vec<Tool<'a>>>,
}

impl<S: Sink> Body<'_, S> {
    fn fill(self, request: &mut RequestInfo, needs: Needs) {
        request.model = self.model.map(Cow::into_owned);
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
        request.user = self
            .user
            .or(self.safety_identifier)
            .map(Cow::into_owned)
            .or_else(|| self.metadata.and_then(|m| m.user_id).map(Cow::into_owned));
        request.tools = self
            .tools
            .into_iter()
            .flatten()
            .chain(self.functions.into_iter().flatten())
            .filter_map(Tool::name)
            .collect();
        if !(needs.messages || needs.prompt) {
            return;
        }
        let mut messages: Vec<Message> = Vec::new();
        for system in [self.system, self.instructions].into_iter().flatten() {
            let text = system.into_text();
            if !text.is_empty() {
                messages.push(Message {
                    role: String::from("system"),
                    content: text,
                });
            }
        }
        for item in self
            .messages
            .into_iter()
            .flatten()
            .chain(self.input.into_iter().flat_map(|i| i.0))
        {
            if let Some(m) = item.0 {
                messages.push(m);
            }
        }
        for prompt in [self.prompt, self.suffix].into_iter().flatten() {
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
                    .sum(),
            );
            for m in &messages {
                push_joined(&mut prompt, &m.content);
            }
            if needs.estimate {
                request.estimated_tokens =
                    i64::try_from(crate::tokens::estimate(&prompt)).unwrap_or(i64::MAX);
            }
            if needs.folded {
                request.prompt_folded = crate::fold::fold(&prompt);
            }
            request.prompt = prompt;
        }
        if needs.messages {
            request.messages = messages;
        }
    }
}

#[derive(Deserialize)]
struct Meta<'a> {
    #[serde(default, borrow)]
    user_id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Named<'a> {
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
}

/// OpenAI chat `{type, function: {name}}`, Responses `{type, name}` or built-in `{type}`,
/// Anthropic `{name, input_schema}`, legacy `functions: [{name}]`.
#[derive(Deserialize)]
struct Tool<'a> {
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    function: Option<Named<'a>>,
    #[serde(default, borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
}

impl Tool<'_> {
    fn name(self) -> Option<String> {
        self.function
            .and_then(|f| f.name)
            .or(self.name)
            .or(self.kind.filter(|k| k != "function"))
            .map(Cow::into_owned)
    }
}

/// Text collected from a content value, or nothing.
trait Sink: for<'de> Deserialize<'de> + Default {
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
    fn into_text(self) -> String {
        self.0
    }
}

impl Sink for Skip {
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
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Text, A::Error> {
        let mut acc = String::new();
        let mut kind: Option<Cow<'de, str>> = None;
        // Kept until the block's `type` is known (keys come in any order).
        let (mut data, mut title, mut context) = (None, None, None);
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "text" | "content" | "output" | "thinking" | "refusal" | "arguments"
                | "function" | "function_call" | "tool_calls" | "summary" | "source" => {
                    let Text(part) = map.next_value::<Text>()?;
                    push_joined(&mut acc, &part);
                }
                // Tool call input (any JSON), prompt-template variables.
                "input" | "variables" => {
                    let Strings(part) = map.next_value::<Strings>()?;
                    push_joined(&mut acc, &part);
                }
                "type" => kind = map.next_value::<Option<Cow<'de, str>>>()?,
                "data" => data = map.next_value::<Option<Text>>()?,
                "title" => title = map.next_value::<Option<Text>>()?,
                "context" => context = map.next_value::<Option<Text>>()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        match kind.as_deref() {
            // A plain-text document source: `{"type": "text", "media_type": "text/plain", "data"}`.
            Some("text") => {
                if let Some(Text(d)) = data {
                    push_joined(&mut acc, &d);
                }
            }
            Some("document" | "search_result") => {
                for Text(t) in [title, context].into_iter().flatten() {
                    push_joined(&mut acc, &t);
                }
            }
            _ => {}
        }
        Ok(Text(acc))
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

/// One message / input item; `None` for items without text (token arrays, bare ids).
struct Item<S>(Option<Message>, PhantomData<S>);

/// `input`: a string, or an array of strings / items / token arrays.
struct Items<S>(Vec<Item<S>>);

#[derive(Deserialize)]
#[serde(bound = "S: Sink")]
struct ItemFields<'a, S> {
    #[serde(default, borrow)]
    role: Option<Cow<'a, str>>,
    /// OpenAI chat: the participant's name, which the model reads with the turn.
    #[serde(default)]
    name: Option<S>,
    #[serde(default)]
    content: Option<S>,
    #[serde(default)]
    output: Option<S>,
    /// OpenAI chat assistant turns: `tool_calls[].function.arguments`.
    #[serde(default)]
    tool_calls: Option<S>,
    /// Legacy OpenAI chat assistant turns: `function_call.arguments`.
    #[serde(default)]
    function_call: Option<S>,
    /// Responses `function_call` items.
    #[serde(default)]
    arguments: Option<S>,
    /// Responses `custom_tool_call` items.
    #[serde(default)]
    input: Option<S>,
    /// Responses `reasoning` items.
    #[serde(default)]
    summary: Option<S>,
    #[serde(default, borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
}

impl<S: Sink> Item<S> {
    fn text(role: &str, text: String) -> Self {
        Item(
            Some(Message {
                role: role.to_string(),
                content: text,
            }),
            PhantomData,
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
        let f: ItemFields<'_, S> =
            Deserialize::deserialize(de::value::MapAccessDeserializer::new(map))?;
        // A Responses `function_call` item's `name` is the tool's name, not text.
        let name = f.name.filter(|_| f.role.is_some());
        let parts = [
            name,
            f.content,
            f.output,
            f.tool_calls,
            f.function_call,
            f.arguments,
            f.input,
            f.summary,
        ];
        if f.role.is_none() && parts.iter().all(Option::is_none) {
            // Items that carry no text (a bare reference, a token array in a map, ...).
            return Ok(Item(None, PhantomData));
        }
        let role = match (&f.role, f.kind.as_deref()) {
            (Some(r), _) => r.as_ref(),
            (None, Some("function_call_output" | "custom_tool_call_output")) => "tool",
            (None, Some("function_call" | "custom_tool_call" | "reasoning")) => "assistant",
            (None, _) => "user",
        };
        let mut text = String::new();
        for part in parts.into_iter().flatten() {
            push_joined(&mut text, &part.into_text());
        }
        if f.role.is_none() && text.is_empty() {
            // A reasoning item without a summary, a call without arguments: no turn.
            return Ok(Item(None, PhantomData));
        }
        Ok(Item::text(role, text))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item<S>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Item(None, PhantomData))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Item<S>, E> {
        Ok(Item(None, PhantomData))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Item<S>, E> {
        Ok(Item(None, PhantomData))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Item<S>, E> {
        Ok(Item(None, PhantomData))
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
