//! Typed extraction of the fields policies read from OpenAI and Anthropic request bodies.
//!
//! One serde pass over the body: unknown fields are skipped without being built, strings are
//! borrowed where the JSON has no escapes, and when no rule reads message text the text is not
//! collected at all (the `S: Sink` parameter). Handles Chat Completions, Completions, Embeddings,
//! Responses and Anthropic Messages bodies, with string content and content-part arrays
//! (text, image, tool_use, tool_result, input_text, function_call_output, …).

use alloc::borrow::Cow;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::context::{Api, ContextError, Message, Needs, Provider, RequestInfo};

/// Provider and API from the path and the provider-specific headers.
pub(crate) fn classify(path: &str, has_header: impl Fn(&str) -> bool) -> (Provider, Api) {
    let p = path.trim_end_matches('/');
    let (mut provider, api) = if p.ends_with("/chat/completions") {
        (Provider::Openai, Api::Chat)
    } else if p.ends_with("/v1/messages") || p == "/messages" {
        (Provider::Anthropic, Api::Messages)
    } else if p.ends_with("/completions") {
        (Provider::Openai, Api::Completions)
    } else if p.ends_with("/embeddings") {
        (Provider::Openai, Api::Embeddings)
    } else if p.ends_with("/responses") {
        (Provider::Openai, Api::Responses)
    } else {
        (Provider::Unknown, Api::Other)
    };
    if has_header("anthropic-version") {
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

/// Fills the body-derived fields of `request`.
pub(crate) fn body(
    bytes: &[u8],
    request: &mut RequestInfo,
    needs: Needs,
) -> Result<(), ContextError> {
    let trimmed = trim_ascii(bytes);
    if trimmed.is_empty() {
        return Ok(());
    }
    if trimmed.first() != Some(&b'{') {
        // Distinguish "not JSON at all" from "JSON, but not an object" for a clearer message.
        return Err(match serde_json::from_slice::<IgnoredAny>(trimmed) {
            Ok(_) => ContextError::InvalidBody(String::from("the body must be a JSON object")),
            Err(e) => ContextError::InvalidBody(e.to_string()),
        });
    }
    if needs.messages || needs.prompt {
        fill::<Text>(trimmed, request, needs)
    } else {
        fill::<Skip>(trimmed, request, needs)
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    b.get(start..end).unwrap_or_default()
}

fn fill<S: Sink>(
    bytes: &[u8],
    request: &mut RequestInfo,
    needs: Needs,
) -> Result<(), ContextError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed: Body<'_, S> = serde_path_to_error::deserialize(&mut de).map_err(|e| {
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

    request.model = parsed.model.map(Cow::into_owned);
    request.stream = parsed.stream.unwrap_or(false);
    request.max_tokens = parsed
        .max_tokens
        .or(parsed.max_completion_tokens)
        .or(parsed.max_output_tokens);
    request.temperature = parsed.temperature;
    request.user = parsed
        .user
        .or(parsed.safety_identifier)
        .map(Cow::into_owned)
        .or_else(|| parsed.metadata.and_then(|m| m.user_id).map(Cow::into_owned));
    request.tools = parsed
        .tools
        .into_iter()
        .flatten()
        .chain(parsed.functions.into_iter().flatten())
        .filter_map(Tool::name)
        .collect();

    if !(needs.messages || needs.prompt) {
        return Ok(());
    }
    let mut messages: Vec<Message> = Vec::new();
    for system in [parsed.system, parsed.instructions].into_iter().flatten() {
        let text = system.into_text();
        if !text.is_empty() {
            messages.push(Message {
                role: String::from("system"),
                content: text,
            });
        }
    }
    for item in parsed
        .messages
        .into_iter()
        .flatten()
        .chain(parsed.input.into_iter().flat_map(|i| i.0))
    {
        if let Some(m) = item.0 {
            messages.push(m);
        }
    }
    if let Some(prompt) = parsed.prompt {
        let text = prompt.into_text();
        if !text.is_empty() {
            messages.push(Message {
                role: String::from("user"),
                content: text,
            });
        }
    }
    if needs.prompt {
        let mut prompt = String::with_capacity(messages.iter().map(|m| m.content.len() + 1).sum());
        for m in &messages {
            if m.content.is_empty() {
                continue;
            }
            if !prompt.is_empty() {
                prompt.push('\n');
            }
            prompt.push_str(&m.content);
        }
        request.estimated_tokens = i64::try_from(prompt.len().div_ceil(4)).unwrap_or(i64::MAX);
        request.prompt = prompt;
    }
    if needs.messages {
        request.messages = messages;
    }
    Ok(())
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
    #[serde(default)]
    input: Option<Items<S>>,
    #[serde(default, borrow)]
    tools: Option<Vec<Tool<'a>>>,
    #[serde(default, borrow)]
    functions: Option<Vec<Tool<'a>>>,
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

/// Collects text: a string, or the `text` / `content` / `output` of content parts, joined.
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
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                // text parts, tool_result / Responses message content, function_call_output
                "text" | "content" | "output" => {
                    let Text(part) = map.next_value::<Text>()?;
                    push_joined(&mut acc, &part);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Text(acc))
    }
}

/// One message / input item; `None` for items without text (token arrays, reasoning items).
struct Item<S>(Option<Message>, PhantomData<S>);

/// `input`: a string, or an array of strings / items / token arrays.
struct Items<S>(Vec<Item<S>>);

#[derive(Deserialize)]
#[serde(bound = "S: Sink")]
struct ItemFields<'a, S> {
    #[serde(default, borrow)]
    role: Option<Cow<'a, str>>,
    #[serde(default)]
    content: Option<S>,
    #[serde(default)]
    output: Option<S>,
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
        if f.role.is_none() && f.content.is_none() && f.output.is_none() {
            // function_call, reasoning and other items that are not turns and carry no text.
            return Ok(Item(None, PhantomData));
        }
        let role = match (&f.role, f.kind.as_deref()) {
            (Some(r), _) => r.as_ref(),
            (None, Some("function_call_output")) => "tool",
            (None, _) => "user",
        };
        let mut text = f.content.map(Sink::into_text).unwrap_or_default();
        if let Some(out) = f.output {
            push_joined(&mut text, &out.into_text());
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
