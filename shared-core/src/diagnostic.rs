//! Validation findings with the file, line, column and rule they concern, and the one table of
//! their stable codes ([`Code`]); the table of codes in `docs/policy-language.md` is generated
//! from it (`llm-policy codes`).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use serde::{Deserialize, Serialize};

/// A 1-based line and column in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    /// Line, from 1.
    pub line: u32,
    /// Column, from 1.
    pub column: u32,
}

/// How serious a finding is. Errors reject the policy set; warnings are reported only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The policy set is not used.
    Error,
    /// Probably a mistake, but the policy set is valid.
    Warning,
}

macro_rules! codes {
    ($($(#[$doc:meta])* $variant:ident = $text:literal, $summary:literal;)*) => {
        /// The stable code of a finding, rendered in kebab case (`unknown-field`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[non_exhaustive]
        pub enum Code {
            $($(#[$doc])* #[serde(rename = $text)] $variant,)*
        }

        impl Code {
            /// Every code, in documentation order.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// The code as written in diagnostics and JSON.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Code::$variant => $text,)*
                }
            }

            /// What the code means (one line, for the documentation table).
            pub fn summary(self) -> &'static str {
                match self {
                    $(Code::$variant => $summary,)*
                }
            }
        }
    };
}

codes! {
    /// A file or directory cannot be read.
    Io = "io", "a file or directory cannot be read (missing, permissions, a dangling link, not a regular file, not UTF-8, over 100,000 directory entries)";
    /// A file is over the size limit.
    FileTooLarge = "file-too-large", "a policy file is over 16 MiB";
    /// YAML / JSON syntax.
    Syntax = "syntax", "YAML/JSON syntax error, duplicate map key, alias used as a key";
    /// Nesting over the document depth limit.
    DocumentTooDeep = "document-too-deep", "maps and lists nested deeper than 64 levels";
    /// YAML aliases expanding past the limit.
    DocumentTooLarge = "document-too-large", "YAML aliases would add more than 16 MiB (or four times the file), more than 10,000 documents in a file, or map keys so long and deep that their locations outgrow the file";
    /// Nothing to load.
    NoPolicies = "no-policies", "the paths hold no `kind: Policy` document (names the paths)";
    /// A document that is not a map.
    InvalidDocument = "invalid-document", "a document is not a map (a YAML list or scalar at the top)";
    /// An unknown key.
    UnknownField = "unknown-field", "an unknown key in the policy, or an unknown field or variable in a condition (with a suggestion)";
    /// A required key is missing.
    MissingField = "missing-field", "a required key is missing";
    /// A value of the wrong type or an unknown enum value.
    InvalidType = "invalid-type", "a value of the wrong type, or an unknown enum value";
    /// Wrong `apiVersion`.
    ApiVersion = "api-version", "`apiVersion` is not `llm-policy/v1`";
    /// Wrong `kind`.
    Kind = "kind", "`kind` is not `Policy` (test suites are `PolicyTest`)";
    /// Empty policy name.
    InvalidName = "invalid-name", "`metadata.name` is empty";
    /// Empty or malformed namespace.
    InvalidNamespace = "invalid-namespace", "`metadata.namespace` is empty or has control characters";
    /// Empty rule id.
    InvalidId = "invalid-id", "a rule id is empty or has control characters";
    /// Two policies with one name in a namespace.
    DuplicatePolicy = "duplicate-policy", "two policies share a name in one namespace (names the first)";
    /// Two rules with one id in a namespace.
    DuplicateId = "duplicate-id", "two rules share an id in one namespace (names the first)";
    /// `when` without exactly one condition.
    InvalidCondition = "invalid-condition", "`when` without exactly one of `cel`, `match`, `plugin`";
    /// A DSL error.
    InvalidMatch = "invalid-match", "DSL: unknown field (with a suggestion), wrong value type, bad regex, bad shape, nesting deeper than 32";
    /// A plugin reference error.
    InvalidPlugin = "invalid-plugin", "a plugin condition without a name";
    /// A plugin the host has not loaded.
    UnknownPlugin = "unknown-plugin", "a plugin condition names a plugin the server has not loaded (`llm-policy serve` only)";
    /// CEL syntax.
    CelSyntax = "cel-syntax", "CEL syntax error (the parser's message and its column)";
    /// CEL source too long.
    CelTooLarge = "cel-too-large", "a CEL expression over 16 KiB";
    /// CEL nesting or operator chains too deep.
    CelTooDeep = "cel-too-deep", "a CEL expression nests brackets deeper than 32 levels or its syntax tree deeper than 64 (long operator chains count)";
    /// A CEL construct whose cost grows too fast.
    CelTooComplex = "cel-too-complex", "a construct whose cost could outgrow the request: a list macro inside another (except over a list literal of at most 32 items, one level deep), one over request data (or over more than 32 literals) whose body reads request text, a value more than 8 times the request or with more than 64 KiB of literal text (a number written as text counts 420 characters), more than 64 passes over request text in one condition; `indexOf` / `lastIndexOf` unless the text or what it looks for is a literal of at most 64 characters, `split` of request text without a literal limit (at most 1000), `join` with a separator that is not a literal, `format` of anything but a list literal or of lists and maps from the request, `replace` with a replacement that is neither a literal nor limited by a literal count";
    /// Unknown CEL function.
    CelUnknownFunction = "cel-unknown-function", "a CEL function that does not exist (also behind `&&` / `||`)";
    /// Unsupported CEL construct.
    CelUnsupported = "cel-unsupported", "CEL that the engine does not run: message construction, two-variable comprehensions (`exists(i, v, ...)`), `transformList` / `transformMap`, `optMap` / `optFlatMap`, time zone names from the IANA database (`getHours('Europe/Paris')`; fixed offsets and UTC are supported)";
    /// CEL without the `cel` feature.
    CelUnavailable = "cel-unavailable", "a CEL condition in a build of the core without the `cel` feature";
    /// A CEL type error.
    CelType = "cel-type", "a CEL condition that is not a bool, or an operator on operands that cannot go together (`request.model > 3`)";
    /// A constant CEL sub-expression that always fails.
    CelConstant = "cel-constant", "a constant CEL sub-expression that always fails (`9223372036854775807 + 1`, `1 / 0`)";
    /// A bad regular expression in CEL.
    CelRegex = "cel-regex", "`matches()` with an invalid regex, one over the size limit (128 KiB compiled), or a pattern that is not a literal";
    /// Header names written with capitals.
    HeaderCase = "header-case", "a header name with capitals in a condition or the context configuration (headers are lower-case)";
    /// A shield score name that can never match.
    InvalidShieldName = "invalid-shield-name", "a shield score name with capitals or `-` (scores are named in lower case, `-` becomes `_`)";
    /// A bad rate limit or budget.
    InvalidLimit = "invalid-limit", "`rateLimit` / `budget` without exactly one amount, or both on one rule";
    /// A `transform` that cannot apply.
    InvalidTransform = "invalid-transform", "a `transform` that cannot apply: a fixed `maxTokens` on a rule that does not allow, or with a plugin, rate limit or budget; `fitBudget` without a token or USD budget; `minTokens` without `fitBudget`; `redact` on a rule that does not allow, or naming an unknown kind; `restore` without `redact`; a transform with neither `maxTokens` nor `redact`";
    /// A bad virtual API key record.
    InvalidApiKey = "invalid-api-key", "a virtual API key record (`llm-policy keys`) with an empty or repeated id, a `hash` that is not 64 lower-case hex digits, or the same key as an earlier record";
    /// A bad model table.
    InvalidModelTable = "invalid-model-table", "a model table (`models.yaml`) with a negative or non-finite price, a `maxOutput` or `contextWindow` of 0, or a name with a `*` anywhere but at its end";
    /// A rule whose phase does not fit what it does.
    InvalidPhase = "invalid-phase", "a `phase: response` rule with a plugin, rate limit, budget, transform or throttle, or reading what is not kept for the answer (the request's text, `request.headers` whole); a request rule reading `response.*`";
    /// A bad counter key template.
    InvalidKey = "invalid-key", "a counter key template with an unknown field, request text (`request.prompt`, lists, maps), fields without text between them, `%`, more than 8 fields or more than 256 bytes";
    /// A bad window.
    InvalidWindow = "invalid-window", "a window that is not a unit name or a duration like `30s`";
    /// A bad HTTP status.
    InvalidStatus = "invalid-status", "`status` outside 400-599 on deny / throttle, or set on allow";
    /// A bad header name or value.
    InvalidHeader = "invalid-header", "a header name that is not a lower-case token, a header a rule may not set (`content-length`, `transfer-encoding`, `host`, `x-llm-policy-decision`, ...), or a value with control characters (CR, LF, ...)";
    /// Contradictory rules.
    ConflictingRules = "conflicting-rules", "equal priority, identical condition, contradictory decisions";
    /// (warning) A rule that can never decide.
    ShadowedRule = "shadowed-rule", "(warning) a higher-priority enforcing rule matches every request";
    /// (warning) One namespace's policies disagree on `defaultDecision`.
    MixedDefaultDecision = "mixed-default-decision", "(warning) the policies of one namespace disagree on `defaultDecision` (one leaves it out, which means deny): the namespace denies every request no rule allows";
    /// (warning) A CEL test on a value that may be null or absent, without a guard.
    CelUnguarded = "cel-unguarded", "(warning) a CEL method call or ordering on a field that may be null or absent without a guard in the same conjunction: it errors (and fails closed) when the value is missing";
}

impl PartialEq<&str> for Code {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for Code {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// Stable code, e.g. `unknown-field`, `cel-syntax`, `duplicate-id`.
    pub code: Code,
    /// What is wrong.
    pub message: String,
    /// File.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Line and column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<Position>,
    /// Rule id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// How to fix it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
}

impl Diagnostic {
    /// A new error.
    pub fn error(code: Code, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            code,
            message: message.into(),
            file: None,
            position: None,
            rule: None,
            help: None,
        }
    }

    /// A new warning.
    pub fn warning(code: Code, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(code, message)
        }
    }

    /// Sets the file and position.
    pub fn at(mut self, file: &str, position: Option<Position>) -> Diagnostic {
        self.file = Some(file.into());
        self.position = position;
        self
    }

    /// Sets the rule id.
    pub fn rule(mut self, rule: Option<&str>) -> Diagnostic {
        self.rule = rule.map(String::from);
        self
    }

    /// Sets the help text.
    pub fn help(mut self, help: Option<String>) -> Diagnostic {
        self.help = help;
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}")?;
            if let Some(p) = self.position {
                write!(f, ":{}:{}", p.line, p.column)?;
            }
            write!(f, ": ")?;
        }
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{sev}[{}]: {}", self.code, self.message)?;
        if let Some(rule) = &self.rule {
            write!(f, " (rule `{rule}`)")?;
        }
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// A list of findings; as an error, the reasons a policy set was rejected.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl core::error::Error for Diagnostics {}
