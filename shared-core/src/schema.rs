//! The request-context schema: every field a condition can read, its type and what it holds when
//! the request does not say. [`FIELDS`] is the single source of this table: path resolution, the
//! CEL activation, whole-root read sets and the docs (`llm-policy schema`) are all driven by it.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::suggest::closest;

/// A resolved field of the request context. Paths are resolved once, at load time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FieldRef {
    /// `request.method`
    Method,
    /// `request.path`
    Path,
    /// `request.host`
    Host,
    /// `request.headers` (the whole map)
    Headers,
    /// `request.headers.<name>` (lower-case name)
    Header(String),
    /// `request.provider`
    Provider,
    /// `request.api`
    Api,
    /// `request.model`
    Model,
    /// `request.stream`
    Stream,
    /// `request.max_tokens`
    MaxTokens,
    /// `request.temperature`
    Temperature,
    /// `request.user`
    User,
    /// `request.messages`
    Messages,
    /// `request.prompt`
    Prompt,
    /// `request.prompt_folded`
    PromptFolded,
    /// `request.prompt_entities`
    PromptEntities,
    /// `request.prompt_injection`
    PromptInjection,
    /// `request.estimated_tokens`
    EstimatedTokens,
    /// `request.tools`
    Tools,
    /// `request.tool_types`
    ToolTypes,
    /// `request.body_bytes`
    BodyBytes,
    /// `principal` (the whole map)
    PrincipalAll,
    /// `principal.<attribute>`
    Principal(String),
    /// `shield` (the whole map)
    ShieldAll,
    /// `shield.<name>`
    Shield(String),
    /// `response.text`
    ResponseText,
    /// `response.entities`
    ResponseEntities,
    /// `response.tool_calls`
    ResponseToolCalls,
    /// `response.finish_reason`
    ResponseFinishReason,
    /// `response.output_tokens`
    ResponseOutputTokens,
    /// `time.hour`
    Hour,
    /// `time.weekday`
    Weekday,
    /// A field of the current element inside a CEL `exists` / `all` over a list.
    Elem(ElemField),
}

impl FieldRef {
    /// Whether the field's text is folded ([`crate::fold::fold`]), so that a policy's strings
    /// compared with it are folded the same way when the policy loads.
    pub fn folds(&self) -> bool {
        matches!(
            self,
            FieldRef::PromptFolded | FieldRef::Tools | FieldRef::ResponseToolCalls
        )
    }

    /// Whether the field is part of the model's answer: only `phase: response` rules read it.
    pub fn is_response(&self) -> bool {
        matches!(
            self,
            FieldRef::ResponseText
                | FieldRef::ResponseEntities
                | FieldRef::ResponseToolCalls
                | FieldRef::ResponseFinishReason
                | FieldRef::ResponseOutputTokens
        )
    }

    /// Whether the field is not kept for the answer, so a `phase: response` rule cannot read
    /// it: the request's text (an answer's check would hold a copy of every prompt for as long
    /// as the answer streams) and the whole header map (it holds the client's credentials).
    pub fn dropped_for_answer(&self) -> bool {
        matches!(
            self,
            FieldRef::Prompt
                | FieldRef::PromptFolded
                | FieldRef::PromptEntities
                | FieldRef::PromptInjection
                | FieldRef::Messages
                | FieldRef::EstimatedTokens
                | FieldRef::Headers
        )
    }
}

/// What an element field of a list comprehension reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ElemField {
    /// `m.role` of a message.
    Role,
    /// `m.content` of a message.
    Content,
    /// The element itself (a string of `request.tools`).
    Value,
}

/// The static type of a field, used to check DSL operands and CEL translations at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// Always a string (possibly empty).
    Str,
    /// A string or null.
    OptStr,
    /// Always an integer.
    Int,
    /// An integer or null.
    OptInt,
    /// A number or null.
    OptFloat,
    /// Always a boolean.
    Bool,
    /// A list of strings.
    StrList,
    /// A map from string to string.
    StrMap,
    /// The message list.
    Messages,
    /// A number, a string or absent (shield scores).
    Dynamic,
}

impl FieldType {
    /// Whether string operators apply.
    pub fn is_string(self) -> bool {
        matches!(
            self,
            FieldType::Str | FieldType::OptStr | FieldType::Dynamic
        )
    }
    /// Whether ordering operators apply.
    pub fn is_numeric(self) -> bool {
        matches!(
            self,
            FieldType::Int | FieldType::OptInt | FieldType::OptFloat | FieldType::Dynamic
        )
    }
    /// Whether the value may be null (or, for shield scores, absent).
    pub fn is_nullable(self) -> bool {
        matches!(
            self,
            FieldType::OptStr | FieldType::OptInt | FieldType::OptFloat | FieldType::Dynamic
        )
    }
}

/// One row of the schema: a field conditions can read, its type, its value when the request does
/// not carry it, and what it holds. [`FIELDS`] is the one table every consumer reads: path
/// resolution (DSL, CEL, counter keys), the CEL activation, the cache key's read set of a whole
/// root and the generated documentation.
#[derive(Debug, Clone)]
pub struct Field {
    /// Dotted path; `<name>` / `<attribute>` mark a family of fields.
    pub path: &'static str,
    /// The resolved field, for fixed paths (`None` for the `<name>` families).
    pub field: Option<FieldRef>,
    /// Static type (load-time checks).
    pub ty: FieldType,
    /// Type as written in the docs.
    pub ty_doc: &'static str,
    /// Value when the request does not carry it.
    pub absent: &'static str,
    /// What it holds.
    pub doc: &'static str,
}

macro_rules! field {
    ($path:literal, $field:expr, $ty:ident, $ty_doc:literal, $absent:literal, $doc:literal) => {
        Field {
            path: $path,
            field: $field,
            ty: FieldType::$ty,
            ty_doc: $ty_doc,
            absent: $absent,
            doc: $doc,
        }
    };
}

/// The schema, in documentation order.
#[rustfmt::skip]
pub const FIELDS: &[Field] = &[
    field!("request.method", Some(FieldRef::Method), Str, "string", "\"\"", "HTTP method, upper-case (`POST`)."),
    field!("request.path", Some(FieldRef::Path), Str, "string", "\"\"", "Request path as a server resolves it: without query and fragment, `%XX` of letters, digits and `-._~` decoded, `//` merged, `.` and `..` resolved (so `/v1/chat/completion%73` is `/v1/chat/completions`)."),
    field!("request.host", Some(FieldRef::Host), Str, "string", "\"\"", "`:authority` / `host` header."),
    field!("request.headers", Some(FieldRef::Headers), StrMap, "map<string, string>", "{}", "All request headers, names lower-cased; a name sent twice has its values joined with `,` in arrival order. `request.headers.<name>` in the DSL (any case); `request.headers['<name>']` in CEL, lower-case (capitals are a load error; a missing key is a CEL error: test with `'<name>' in request.headers`)."),
    field!("request.provider", Some(FieldRef::Provider), Str, "string", "\"unknown\"", "`openai`, `anthropic` or `unknown`, from the path and provider headers."),
    field!("request.api", Some(FieldRef::Api), Str, "string", "\"other\"", "`chat`, `completions`, `embeddings`, `responses`, `messages`, `batch`, `assistants` (OpenAI's Assistants API: `/v1/assistants`, `/v1/threads/...`, with a body) or `other`. A batch body (`/v1/messages/batches`) is also evaluated item by item: see the policy language."),
    field!("request.model", Some(FieldRef::Model), OptStr, "string | null", "null", "Body `model`; on Azure OpenAI (`/openai/deployments/{name}/...`) the deployment in the path, whatever the body says (the deployment is what runs)."),
    field!("request.stream", Some(FieldRef::Stream), Bool, "bool", "false", "Body `stream`."),
    field!("request.max_tokens", Some(FieldRef::MaxTokens), OptInt, "int | null", "null", "The output cap the API reads: `max_tokens` or `max_completion_tokens` (OpenAI chat, the larger), `max_tokens` (completions, Anthropic messages), `max_output_tokens` (Responses); any of them for other APIs."),
    field!("request.temperature", Some(FieldRef::Temperature), OptFloat, "double | null", "null", "Body `temperature`."),
    field!("request.user", Some(FieldRef::User), OptStr, "string | null", "null", "Body `user`, else `safety_identifier` (OpenAI), else `metadata.user_id` (Anthropic)."),
    field!("request.messages", Some(FieldRef::Messages), Messages, "list<{role: string, content: string}>", "[]", "Conversation turns with their text joined (system / instructions first as role `system`); what counts as text is listed under `request.prompt`."),
    field!("request.prompt", Some(FieldRef::Prompt), Str, "string", "\"\"", "All text the model reads, joined with newlines: see \"What `request.prompt` holds\" in the policy language."),
    field!("request.prompt_folded", Some(FieldRef::PromptFolded), Str, "string", "\"\"", "`request.prompt` folded so that Unicode disguises coincide with the plain text: compatibility forms (fullwidth, mathematical letters, ligatures), accents, zero-width and other invisible characters, case, and look-alike letters of other scripts (Unicode TS #39 confusables) mapped to their Latin look-alikes, in lower case; whitespace runs collapsed. In the DSL (and CEL's `==`, `in`, `contains`, `startsWith`, `endsWith` on it, where CEL compiles to native tests) string values are folded the same way when the policy loads: write the plain phrase. See \"Disguised text\" in the policy language."),
    field!("request.prompt_entities", Some(FieldRef::PromptEntities), StrList, "list<string>", "[]", "The kinds of personal data and secrets in `request.prompt`, disguised or not: `email`, `phone`, `credit_card` (Luhn-valid, a known issuer), `iban` (mod-97 valid), `us_ssn`, `api_key` (OpenAI, Anthropic, AWS, Google, GitHub, Slack, Stripe; also cut short), `private_key` (PEM). The same scanners as the `pii-detector` plugin, over the text and its views: folded, spelled-out letters joined, `[at]` / `dot` spellings, base64 / hex / `\\uXXXX` / percent-encoded runs decoded, reversed when the text asks for it, a card or IBAN handed over in pieces. Never the values. See \"Personal data, secrets and injection\" in the policy language."),
    field!("request.prompt_injection", Some(FieldRef::PromptInjection), OptFloat, "double", "0.0", "Prompt-injection score of `request.prompt` and its views, 0..1: phrases that set instructions aside, reveal the system prompt or ask for an unrestricted persona, in English and 12 other languages, with leetspeak, spelled-out, reversed and encoded forms; chat-template tokens, fake role headers, hidden characters. The same scorer as the `prompt-injection` plugin; 0.7 is a good threshold."),
    field!("request.estimated_tokens", Some(FieldRef::EstimatedTokens), Int, "int", "0", "Prompt token estimate (docs/budgets.md): a bound calibrated per script that undercounts the providers' tokenizers by at most 10%."),
    field!("request.tools", Some(FieldRef::Tools), StrList, "list<string>", "[]", "Names of the tools offered to the model (functions, built-in and server tools, MCP servers), folded like `request.prompt_folded` (lower case, look-alike letters as Latin): a rule's names are folded the same way, so `Bash` and `bash` are one tool."),
    field!("request.tool_types", Some(FieldRef::ToolTypes), StrList, "list<string>", "[]", "The type of each tool in `request.tools`, same order, the same for both providers: `function` (defined and run by the client), or the built-in / server tool without its version: `code_execution` (Anthropic `code_execution_*`, OpenAI `code_interpreter`), `bash` (`bash_*`, `local_shell`, `shell`), `computer_use`, `text_editor` (`text_editor_*`, `apply_patch`), `web_search`, `web_fetch`, `file_search`, `image_generation`, `mcp` (OpenAI `mcp`, Anthropic `mcp_toolset` and `mcp_servers`), `memory`, `tool_search`; another type as sent, lower case, without a date suffix."),
    field!("request.body_bytes", Some(FieldRef::BodyBytes), Int, "int", "0", "Size of the request body in bytes."),
    field!("principal.<attribute>", None, OptStr, "string | null", "null", "One per configured attribute, from its header (defaults: `id` from `x-user-id`, `tier` from `x-user-tier`, `team` from `x-team-id`, `org` from `x-org-id`); null when the header is missing, so guard CEL calls: `principal.id != null && principal.id.startsWith('svc-')`."),
    field!("shield.<name>", None, Dynamic, "double | string (may be absent)", "absent", "From headers `x-llm-shield-<name>` (lower-case, dashes become underscores: write `shield.pii_score`; a header name with `_` is ignored); numeric values are numbers; a score sent more than once counts at its highest (scores are risks). DSL: absent is null; CEL: a missing key is an error, test with `has(shield.<name>)`."),
    field!("response.text", Some(FieldRef::ResponseText), Str, "string", "\"\"", "`phase: response` rules only. What the model answered: message text, refusals, reasoning, tool calls' arguments and tool results shown to the client, as the client reads them. A JSON answer whole (up to `maxResponseBytes`); a stream through a window: the text not checked yet plus the last `responseHoldBackBytes` bytes checked before it, so a match of up to that many bytes is caught whole whatever chunks it arrives in. See \"Response rules\" in the policy language."),
    field!("response.entities", Some(FieldRef::ResponseEntities), StrList, "list<string>", "[]", "`phase: response` rules only. The kinds of personal data and secrets in `response.text`, disguised or not: the scanners of `request.prompt_entities`."),
    field!("response.tool_calls", Some(FieldRef::ResponseToolCalls), StrList, "list<string>", "[]", "`phase: response` rules only. Names of the tools the model called so far (functions, server tools), folded like `request.tools`."),
    field!("response.finish_reason", Some(FieldRef::ResponseFinishReason), OptStr, "string | null", "null", "`phase: response` rules only. Why the model stopped, as the provider says it: `stop`, `length`, `tool_calls`, `content_filter` (OpenAI chat and completions), `end_turn`, `max_tokens`, `tool_use`, `stop_sequence`, `refusal` (Anthropic), `completed` or the reason it is `incomplete` (Responses); null until a stream says it."),
    field!("response.output_tokens", Some(FieldRef::ResponseOutputTokens), OptInt, "int | null", "null", "`phase: response` rules only. The output tokens the provider reported (a JSON answer's usage, a stream's last usage event); null until reported."),
    field!("time.hour", Some(FieldRef::Hour), Int, "int", "-", "Hour of the evaluation time, UTC, 0-23. Rules reading time are never cached."),
    field!("time.weekday", Some(FieldRef::Weekday), Int, "int", "-", "Day of week of the evaluation time, UTC, 0 = Sunday … 6 = Saturday."),
];

/// The root variables conditions can read.
pub const ROOTS: &[&str] = &["request", "response", "principal", "shield", "time"];

/// The fixed fields under `root` (`request`, `response` or `time`), with their member names.
pub fn members(root: &str) -> impl Iterator<Item = (&'static str, &'static Field)> + '_ {
    FIELDS.iter().filter_map(move |f| {
        let (r, m) = f.path.split_once('.')?;
        (r == root && f.field.is_some()).then_some((m, f))
    })
}

/// Every field a condition that reads the whole root variable `root` depends on.
pub fn root_fields(root: &str) -> Vec<FieldRef> {
    match root {
        "principal" => alloc::vec![FieldRef::PrincipalAll],
        "shield" => alloc::vec![FieldRef::ShieldAll],
        _ => members(root).filter_map(|(_, f)| f.field.clone()).collect(),
    }
}

/// A shield score name as headers produce it: lower case, `_` for `-`. `Err` carries the name to
/// write instead.
pub fn check_shield_name(name: &str) -> Result<(), String> {
    if name.bytes().any(|b| b.is_ascii_uppercase() || b == b'-') {
        Err(name.to_ascii_lowercase().replace('-', "_"))
    } else {
        Ok(())
    }
}

/// A field path that is not in the schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownField {
    /// What is wrong.
    pub message: String,
    /// A close, valid path, if any.
    pub suggestion: Option<String>,
}

impl FieldRef {
    /// Resolves one member of a root (`root.member`), or the root itself when `member` is `None`.
    /// `principal_attrs` are the configured principal attributes.
    pub fn resolve(
        root: &str,
        member: Option<&str>,
        principal_attrs: &[String],
    ) -> Result<(FieldRef, FieldType), UnknownField> {
        match (root, member) {
            ("request" | "response" | "time", Some(m)) => members(root)
                .find(|(name, _)| *name == m)
                .and_then(|(_, f)| Some((f.field.clone()?, f.ty)))
                .ok_or_else(|| unknown(root, m, members(root).map(|(n, _)| n))),
            ("principal", None) => Ok((FieldRef::PrincipalAll, FieldType::StrMap)),
            ("principal", Some(m)) => {
                if principal_attrs.iter().any(|a| a == m) {
                    Ok((FieldRef::Principal(m.to_string()), FieldType::OptStr))
                } else {
                    let mut e = unknown(root, m, principal_attrs.iter().map(String::as_str));
                    e.message = format!(
                        "{} (configured principal attributes: {})",
                        e.message,
                        principal_attrs.join(", ")
                    );
                    Err(e)
                }
            }
            ("shield", None) => Ok((FieldRef::ShieldAll, FieldType::StrMap)),
            ("shield", Some(m)) => match check_shield_name(m) {
                Ok(()) => Ok((FieldRef::Shield(m.to_string()), FieldType::Dynamic)),
                Err(fixed) => Err(UnknownField {
                    message: format!(
                        "`shield.{m}` can never match: shield scores are named in lower case with `_` for `-`"
                    ),
                    suggestion: Some(format!("shield.{fixed}")),
                }),
            },
            (_, None) if ROOTS.contains(&root) => Err(UnknownField {
                message: format!("`{root}` is not a field; name one of its members"),
                suggestion: None,
            }),
            _ => Err(UnknownField {
                message: format!("unknown variable `{root}`"),
                suggestion: closest(root, ROOTS.iter().copied()).map(|r| match member {
                    Some(m) => format!("{r}.{m}"),
                    None => r.to_string(),
                }),
            }),
        }
    }

    /// Resolves a dotted DSL path such as `request.model`, `request.headers.x-api-key` (header
    /// names in any case), `principal.tier` or `shield.pii_score`.
    pub fn parse_path(
        path: &str,
        principal_attrs: &[String],
    ) -> Result<(FieldRef, FieldType), UnknownField> {
        if let Some(name) = path.strip_prefix("request.headers.") {
            if name.is_empty() {
                return Err(UnknownField {
                    message: String::from("empty header name"),
                    suggestion: None,
                });
            }
            return Ok((
                FieldRef::Header(name.to_ascii_lowercase()),
                FieldType::OptStr,
            ));
        }
        let (root, member) = match path.split_once('.') {
            Some((r, m)) => (r, Some(m)),
            None => (path, None),
        };
        if let Some(m) = member {
            if m.contains('.') && root != "shield" {
                return Err(unknown_path(path, principal_attrs));
            }
        }
        FieldRef::resolve(root, member, principal_attrs)
    }

    /// Whether evaluating this field makes a decision time-dependent (never cacheable).
    pub fn is_time(&self) -> bool {
        matches!(self, FieldRef::Hour | FieldRef::Weekday)
    }

    /// The dotted path of this field.
    pub fn path(&self) -> String {
        match self {
            FieldRef::Header(h) => format!("request.headers.{h}"),
            FieldRef::Principal(p) => format!("principal.{p}"),
            FieldRef::PrincipalAll => String::from("principal"),
            FieldRef::Shield(s) => format!("shield.{s}"),
            FieldRef::ShieldAll => String::from("shield"),
            FieldRef::Elem(ElemField::Role) => String::from("<message>.role"),
            FieldRef::Elem(ElemField::Content) => String::from("<message>.content"),
            FieldRef::Elem(ElemField::Value) => String::from("<element>"),
            other => FIELDS
                .iter()
                .find(|f| f.field.as_ref() == Some(other))
                .map(|f| f.path.to_string())
                .unwrap_or_default(),
        }
    }
}

fn unknown<'a>(
    root: &str,
    member: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> UnknownField {
    let options: Vec<&str> = candidates.collect();
    UnknownField {
        message: format!("`{root}.{member}` is not a field of the request context"),
        suggestion: closest(member, options.iter().copied()).map(|s| format!("{root}.{s}")),
    }
}

fn unknown_path(path: &str, principal_attrs: &[String]) -> UnknownField {
    let mut all: Vec<String> = FIELDS
        .iter()
        .filter(|f| f.field.is_some())
        .map(|f| f.path.to_string())
        .collect();
    all.extend(principal_attrs.iter().map(|a| format!("principal.{a}")));
    UnknownField {
        message: format!("`{path}` is not a field of the request context"),
        suggestion: closest(path, all.iter().map(String::as_str)).map(|s| s.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs() -> Vec<String> {
        ["id", "tier", "team"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn resolves_known_paths() {
        let a = attrs();
        assert_eq!(
            FieldRef::parse_path("request.model", &a).unwrap().0,
            FieldRef::Model
        );
        assert_eq!(
            FieldRef::parse_path("request.headers.X-Api-Key", &a)
                .unwrap()
                .0,
            FieldRef::Header("x-api-key".into())
        );
        assert_eq!(
            FieldRef::parse_path("principal.tier", &a).unwrap().0,
            FieldRef::Principal("tier".into())
        );
        assert_eq!(
            FieldRef::parse_path("shield.pii_score", &a).unwrap().0,
            FieldRef::Shield("pii_score".into())
        );
        assert_eq!(
            FieldRef::parse_path("time.weekday", &a).unwrap().0,
            FieldRef::Weekday
        );
    }

    #[test]
    fn typo_gets_a_suggestion() {
        let e = FieldRef::parse_path("request.modle", &attrs()).unwrap_err();
        assert_eq!(e.suggestion.as_deref(), Some("request.model"));
        let e = FieldRef::parse_path("principal.teir", &attrs()).unwrap_err();
        assert_eq!(e.suggestion.as_deref(), Some("principal.tier"));
        let e = FieldRef::parse_path("reqest.model", &attrs()).unwrap_err();
        assert!(e.message.contains("reqest"), "{}", e.message);
        let e = FieldRef::parse_path("time.hours", &attrs()).unwrap_err();
        assert_eq!(e.suggestion.as_deref(), Some("time.hour"));
    }

    #[test]
    fn shield_names_that_never_match_are_rejected_with_the_right_name() {
        for (bad, good) in [
            ("pii-score", "shield.pii_score"),
            ("PII_SCORE", "shield.pii_score"),
        ] {
            let e = FieldRef::parse_path(&format!("shield.{bad}"), &attrs()).unwrap_err();
            assert_eq!(e.suggestion.as_deref(), Some(good), "{bad}");
        }
    }

    #[test]
    fn every_documented_path_resolves_and_every_fixed_field_has_its_path() {
        for f in FIELDS {
            let path = f.path.replace("<name>", "x").replace("<attribute>", "id");
            let (resolved, ty) = FieldRef::parse_path(&path, &attrs()).unwrap();
            assert_eq!(ty, f.ty, "{path}");
            if let Some(field) = &f.field {
                assert_eq!(&resolved, field);
                assert_eq!(field.path(), f.path);
            }
        }
    }
}
