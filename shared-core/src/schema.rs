//! The request-context schema: every field a condition can read, its type and what it holds when
//! the request does not say. [`FIELDS`] is the single source of this table (the docs are generated
//! from it by `llm-policy schema`).

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
    /// `request.estimated_tokens`
    EstimatedTokens,
    /// `request.tools`
    Tools,
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
    /// `time.hour`
    Hour,
    /// `time.weekday`
    Weekday,
    /// A field of the current element inside a CEL `exists` / `all` over a list.
    Elem(ElemField),
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
}

/// A documented schema entry.
#[derive(Debug, Clone, Copy)]
pub struct FieldDoc {
    /// Dotted path.
    pub path: &'static str,
    /// Type as written in the docs.
    pub ty: &'static str,
    /// Value when the request does not carry it.
    pub absent: &'static str,
    /// What it holds.
    pub doc: &'static str,
}

/// The schema, in documentation order.
pub const FIELDS: &[FieldDoc] = &[
    FieldDoc { path: "request.method", ty: "string", absent: "\"\"", doc: "HTTP method, upper-case (`POST`)." },
    FieldDoc { path: "request.path", ty: "string", absent: "\"\"", doc: "Request path without the query string." },
    FieldDoc { path: "request.host", ty: "string", absent: "\"\"", doc: "`:authority` / `host` header." },
    FieldDoc { path: "request.headers", ty: "map<string, string>", absent: "{}", doc: "All request headers, names lower-cased. `request.headers.<name>` in the DSL; `request.headers['<name>']` in CEL (missing key is a CEL error: test with `'<name>' in request.headers`)." },
    FieldDoc { path: "request.provider", ty: "string", absent: "\"unknown\"", doc: "`openai`, `anthropic` or `unknown`, from the path and provider headers." },
    FieldDoc { path: "request.api", ty: "string", absent: "\"other\"", doc: "`chat`, `completions`, `embeddings`, `responses`, `messages` or `other`." },
    FieldDoc { path: "request.model", ty: "string | null", absent: "null", doc: "Body `model` (Azure OpenAI: the deployment in the path when the body has none)." },
    FieldDoc { path: "request.stream", ty: "bool", absent: "false", doc: "Body `stream`." },
    FieldDoc { path: "request.max_tokens", ty: "int | null", absent: "null", doc: "`max_tokens`, else `max_completion_tokens` (OpenAI chat), else `max_output_tokens` (Responses)." },
    FieldDoc { path: "request.temperature", ty: "double | null", absent: "null", doc: "Body `temperature`." },
    FieldDoc { path: "request.user", ty: "string | null", absent: "null", doc: "Body `user`, else `safety_identifier` (OpenAI), else `metadata.user_id` (Anthropic)." },
    FieldDoc { path: "request.messages", ty: "list<{role: string, content: string}>", absent: "[]", doc: "Conversation turns with their text joined (system / instructions first as role `system`); image and other non-text parts are skipped." },
    FieldDoc { path: "request.prompt", ty: "string", absent: "\"\"", doc: "All prompt text joined with newlines: messages, system, instructions, completion prompt, embedding input, tool results." },
    FieldDoc { path: "request.estimated_tokens", ty: "int", absent: "0", doc: "Prompt token estimate: ceil(UTF-8 bytes of `prompt` / 4)." },
    FieldDoc { path: "request.tools", ty: "list<string>", absent: "[]", doc: "Names of the tools / functions offered to the model." },
    FieldDoc { path: "request.body_bytes", ty: "int", absent: "0", doc: "Size of the request body in bytes." },
    FieldDoc { path: "principal.id", ty: "string | null", absent: "null", doc: "From header `x-user-id` (configurable)." },
    FieldDoc { path: "principal.tier", ty: "string | null", absent: "null", doc: "From header `x-user-tier` (configurable)." },
    FieldDoc { path: "principal.team", ty: "string | null", absent: "null", doc: "From header `x-team-id` (configurable). More attributes can be configured." },
    FieldDoc { path: "shield.<name>", ty: "double | string (may be absent)", absent: "absent", doc: "From headers `x-llm-shield-<name>` (dashes become underscores); numeric values are numbers. DSL: absent is null; CEL: a missing key is an error, test with `has(shield.<name>)`." },
    FieldDoc { path: "time.hour", ty: "int", absent: "-", doc: "Hour of the evaluation time, UTC, 0-23. Rules reading time are never cached." },
    FieldDoc { path: "time.weekday", ty: "int", absent: "-", doc: "Day of week of the evaluation time, UTC, 0 = Sunday … 6 = Saturday." },
];

const REQUEST_FIELDS: &[(&str, FieldRef, FieldType)] = &[
    ("method", FieldRef::Method, FieldType::Str),
    ("path", FieldRef::Path, FieldType::Str),
    ("host", FieldRef::Host, FieldType::Str),
    ("headers", FieldRef::Headers, FieldType::StrMap),
    ("provider", FieldRef::Provider, FieldType::Str),
    ("api", FieldRef::Api, FieldType::Str),
    ("model", FieldRef::Model, FieldType::OptStr),
    ("stream", FieldRef::Stream, FieldType::Bool),
    ("max_tokens", FieldRef::MaxTokens, FieldType::OptInt),
    ("temperature", FieldRef::Temperature, FieldType::OptFloat),
    ("user", FieldRef::User, FieldType::OptStr),
    ("messages", FieldRef::Messages, FieldType::Messages),
    ("prompt", FieldRef::Prompt, FieldType::Str),
    (
        "estimated_tokens",
        FieldRef::EstimatedTokens,
        FieldType::Int,
    ),
    ("tools", FieldRef::Tools, FieldType::StrList),
    ("body_bytes", FieldRef::BodyBytes, FieldType::Int),
];

/// The root variables conditions can read.
pub const ROOTS: &[&str] = &["request", "principal", "shield", "time"];

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
            ("request", Some(m)) => REQUEST_FIELDS
                .iter()
                .find(|(name, _, _)| *name == m)
                .map(|(_, f, t)| (f.clone(), *t))
                .ok_or_else(|| unknown(root, m, REQUEST_FIELDS.iter().map(|(n, _, _)| *n))),
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
            ("shield", Some(m)) => Ok((FieldRef::Shield(m.to_string()), FieldType::Dynamic)),
            ("time", Some("hour")) => Ok((FieldRef::Hour, FieldType::Int)),
            ("time", Some("weekday")) => Ok((FieldRef::Weekday, FieldType::Int)),
            ("time", Some(m)) => Err(unknown(root, m, ["hour", "weekday"].into_iter())),
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

    /// Resolves a dotted DSL path such as `request.model`, `request.headers.x-api-key`,
    /// `principal.tier` or `shield.pii_score`.
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
                let full = unknown_path(path, principal_attrs);
                return Err(full);
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
            FieldRef::Hour => String::from("time.hour"),
            FieldRef::Weekday => String::from("time.weekday"),
            FieldRef::Elem(ElemField::Role) => String::from("<message>.role"),
            FieldRef::Elem(ElemField::Content) => String::from("<message>.content"),
            FieldRef::Elem(ElemField::Value) => String::from("<element>"),
            other => REQUEST_FIELDS
                .iter()
                .find(|(_, f, _)| f == other)
                .map(|(n, _, _)| format!("request.{n}"))
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
    let mut all: Vec<String> = REQUEST_FIELDS
        .iter()
        .map(|(n, _, _)| format!("request.{n}"))
        .collect();
    all.extend(principal_attrs.iter().map(|a| format!("principal.{a}")));
    all.push(String::from("time.hour"));
    all.push(String::from("time.weekday"));
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
    }

    #[test]
    fn typo_gets_a_suggestion() {
        let e = FieldRef::parse_path("request.modle", &attrs()).unwrap_err();
        assert_eq!(e.suggestion.as_deref(), Some("request.model"));
        let e = FieldRef::parse_path("principal.teir", &attrs()).unwrap_err();
        assert_eq!(e.suggestion.as_deref(), Some("principal.tier"));
        let e = FieldRef::parse_path("reqest.model", &attrs()).unwrap_err();
        assert!(e.message.contains("reqest"), "{}", e.message);
    }

    #[test]
    fn every_documented_path_resolves() {
        for f in FIELDS {
            let path = f.path.replace("<name>", "x");
            assert!(FieldRef::parse_path(&path, &attrs()).is_ok(), "{path}");
        }
    }
}
