//! A rule's action: verdict, status, headers, rate limit or budget, counter key templates and
//! windows.

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// Headers a rule may not set: they frame the HTTP message (a wrong `content-length` or
/// `transfer-encoding` hangs or splits it) or route it; nor may it set the engine's own
/// ([`crate::wire::SERVER_ONLY_HEADERS`]: the verdict and the reservation handle).
const FRAMING_HEADERS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
    "host",
    "content-encoding",
];

use super::{has_control, Compiler, RuleSite};
use crate::decision::{ChargeSource, CounterKind, Verdict};
use crate::detect::{Entities, Entity};
use crate::diagnostic::Code;
use crate::model::{Action, ActionDecision, MaxTokens, Scope};
use crate::schema::{FieldRef, FieldType};
use crate::set::{CompiledAction, KeyPart, Limit, Redact};

impl Compiler {
    pub(super) fn compile_action(
        &mut self,
        a: &Action,
        plugin: bool,
        site: &RuleSite<'_>,
    ) -> Option<CompiledAction> {
        let before = self.errors.len();
        let decision = match a.decision {
            ActionDecision::Allow => Verdict::Allow,
            ActionDecision::Deny => Verdict::Deny,
            ActionDecision::Throttle => Verdict::Throttle,
        };
        if let Some(st) = a.status {
            let problem = match decision {
                Verdict::Allow => Some(String::from(
                    "`status` applies to deny and throttle replies; an allowed request gets the upstream's status",
                )),
                _ if !(400..=599).contains(&st) => Some(format!(
                    "status {st} cannot reject a request: use a 4xx or 5xx status"
                )),
                _ => None,
            };
            if let Some(msg) = problem {
                self.errors
                    .push(site.error(Code::InvalidStatus, "/action/status", msg));
            }
        }
        for (name, value) in &a.headers {
            let valid = !name.is_empty()
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b)
                });
            if !valid {
                self.errors.push(site.error(
                    Code::InvalidHeader,
                    "/action/headers",
                    format!(
                        "`{}` is not a valid lower-case header name",
                        name.escape_debug()
                    ),
                ));
            }
            if valid
                && (FRAMING_HEADERS.contains(&name.as_str())
                    || crate::wire::SERVER_ONLY_HEADERS.contains(&name.as_str()))
            {
                self.errors.push(site.error(
                    Code::InvalidHeader,
                    &format!("/action/headers/{}", crate::document::escape_segment(name)),
                    format!(
                        "header `{name}` cannot be set by a rule: it frames the HTTP message or carries the verdict"
                    ),
                ));
            }
            if has_control(value) {
                self.errors.push(site.error(
                    Code::InvalidHeader,
                    &format!("/action/headers/{}", crate::document::escape_segment(name)),
                    format!(
                        "the value of header `{name}` holds control characters (`{}`): CR and LF would split the header",
                        value.escape_debug()
                    ),
                ));
            }
        }
        let mut limit = None;
        if a.rate_limit.is_some() && a.budget.is_some() {
            self.errors.push(site.error(
                Code::InvalidLimit,
                "/action",
                "a rule takes either `rateLimit` or `budget`, not both",
            ));
        }
        if let Some(rl) = &a.rate_limit {
            let amount = match (rl.requests, rl.tokens) {
                (Some(n), None) => Some((CounterKind::Requests, n as f64)),
                (None, Some(n)) => Some((CounterKind::Tokens, n as f64)),
                _ => {
                    self.errors.push(site.error(
                        Code::InvalidLimit,
                        "/action/rateLimit",
                        "`rateLimit` needs exactly one of `requests`, `tokens`",
                    ));
                    None
                }
            };
            let key = self.key_or_error(&rl.key, site, "/action/rateLimit/key");
            let window = window_or_error(self, &rl.per, site, "/action/rateLimit/per");
            if let (Some((kind, amount)), Some(key), Some(window_secs)) = (amount, key, window) {
                limit = Some(Limit {
                    source: ChargeSource::RateLimit,
                    key,
                    kind,
                    limit: amount,
                    window_secs,
                    scope: rl.scope,
                    headers: rl.remaining_headers,
                });
            }
        }
        if let Some(b) = &a.budget {
            let amount = match (b.tokens, b.usd) {
                (Some(n), None) => Some((CounterKind::Tokens, n as f64)),
                (None, Some(u)) if u.is_finite() && u > 0.0 => Some((CounterKind::Usd, u)),
                _ => {
                    self.errors.push(site.error(
                        Code::InvalidLimit,
                        "/action/budget",
                        "`budget` needs exactly one of `tokens`, `usd` (positive)",
                    ));
                    None
                }
            };
            let key = self.key_or_error(&b.key, site, "/action/budget/key");
            let window = window_or_error(self, &b.per, site, "/action/budget/per");
            if let (Some((kind, amount)), Some(key), Some(window_secs)) = (amount, key, window) {
                limit = Some(Limit {
                    source: ChargeSource::Budget,
                    key,
                    kind,
                    limit: amount,
                    window_secs,
                    scope: Scope::Global,
                    headers: b.remaining_headers,
                });
            }
        }
        let (cap, fit) = self.compile_transform(a, decision, limit.as_ref(), plugin, site);
        let redact = self.compile_redact(a, decision, site);
        if self.errors.len() > before {
            return None;
        }
        Some(CompiledAction {
            decision,
            reason: a.reason.clone().unwrap_or_default(),
            status: a.status,
            headers: a.headers.clone(),
            audit: a.audit,
            alert: a.alert,
            limit,
            cap,
            fit,
            redact,
        })
    }

    /// `transform.redact` (and `restore`): the kinds named, on a rule that allows.
    fn compile_redact(
        &mut self,
        a: &Action,
        decision: Verdict,
        site: &RuleSite<'_>,
    ) -> Option<Redact> {
        let t = a.transform.as_ref()?;
        if t.redact.is_empty() {
            if t.restore {
                self.errors.push(site.error(
                    Code::InvalidTransform,
                    "/action/transform/restore",
                    "`restore` goes with `redact`: name the kinds to replace",
                ));
            }
            return None;
        }
        if decision != Verdict::Allow {
            self.errors.push(site.error(
                Code::InvalidTransform,
                "/action/transform/redact",
                "`redact` changes the requests a rule allows: write it on an allow rule",
            ));
            return None;
        }
        let mut kinds = Entities::none();
        for (i, name) in t.redact.iter().enumerate() {
            match crate::redact::kinds_named(name) {
                Some(k) => kinds = kinds.union(k),
                None => {
                    let known = Entity::ALL.map(Entity::name).join("`, `");
                    self.errors.push(site.error(
                        Code::InvalidTransform,
                        &alloc::format!("/action/transform/redact/{i}"),
                        alloc::format!("unknown kind `{name}` to redact: one of `{known}`, or the groups `card`, `secret`"),
                    ));
                }
            }
        }
        Some(Redact {
            kinds,
            restore: t.restore,
        })
    }

    /// `transform`: a fixed cap (allow rules, decided without plugin or counter, so the core
    /// knows it before any counter is charged) or `fitBudget` (rules with a token or USD budget).
    fn compile_transform(
        &mut self,
        a: &Action,
        decision: Verdict,
        limit: Option<&Limit>,
        plugin: bool,
        site: &RuleSite<'_>,
    ) -> (Option<u64>, Option<u64>) {
        let Some(t) = &a.transform else {
            return (None, None);
        };
        let problem = |c: &mut Compiler, ptr: &str, msg: &str| {
            c.errors.push(site.error(Code::InvalidTransform, ptr, msg));
        };
        let Some(max_tokens) = t.max_tokens else {
            if t.min_tokens.is_some() {
                problem(
                    self,
                    "/action/transform/minTokens",
                    "`minTokens` goes with `maxTokens: fitBudget`",
                );
            }
            if t.redact.is_empty() {
                problem(
                    self,
                    "/action/transform",
                    "a `transform` needs `maxTokens` or `redact`",
                );
            }
            return (None, None);
        };
        match max_tokens {
            MaxTokens::Cap(n) => {
                if t.min_tokens.is_some() {
                    problem(
                        self,
                        "/action/transform/minTokens",
                        "`minTokens` goes with `maxTokens: fitBudget`",
                    );
                }
                if n == 0 {
                    problem(
                        self,
                        "/action/transform/maxTokens",
                        "`maxTokens` must be at least 1",
                    );
                } else if decision != Verdict::Allow {
                    problem(self, "/action/transform/maxTokens", "a fixed `maxTokens` caps the requests a rule allows: write it on an allow rule");
                } else if limit.is_some() || plugin {
                    problem(self, "/action/transform/maxTokens", "a fixed `maxTokens` must be known before counters are charged: its rule cannot use a plugin, `rateLimit` or `budget`");
                } else {
                    return (Some(n), None);
                }
                (None, None)
            }
            MaxTokens::FitBudget => {
                let budget = limit.filter(|l| {
                    l.source == ChargeSource::Budget && l.kind != CounterKind::Requests
                });
                if budget.is_none() {
                    problem(self, "/action/transform/maxTokens", "`maxTokens: fitBudget` needs a `budget` of `tokens` or `usd` on the same rule");
                    return (None, None);
                }
                match t.min_tokens {
                    Some(0) => {
                        problem(
                            self,
                            "/action/transform/minTokens",
                            "`minTokens` must be at least 1",
                        );
                        (None, None)
                    }
                    min => (None, Some(min.unwrap_or(1))),
                }
            }
        }
    }

    fn key_or_error(&mut self, t: &str, site: &RuleSite<'_>, ptr: &str) -> Option<Vec<KeyPart>> {
        match key_template(t, &self.attrs) {
            Ok(k) => Some(k),
            Err(m) => {
                self.errors.push(site.error(Code::InvalidKey, ptr, m));
                None
            }
        }
    }
}

fn window_or_error(c: &mut Compiler, per: &str, site: &RuleSite<'_>, ptr: &str) -> Option<u64> {
    match window(per) {
        Ok(w) => Some(w),
        Err(m) => {
            c.errors.push(site.error(Code::InvalidWindow, ptr, m));
            None
        }
    }
}

/// Longest counter key template, in bytes.
const MAX_KEY_TEMPLATE: usize = 256;
/// Most fields in a counter key template.
const MAX_KEY_FIELDS: usize = 8;

/// `"{principal.id}:{request.model}"` → parts. Literal text outside braces is kept. Only short
/// scalar fields may be part of a key: a key holds who or what is counted, never request text.
fn key_template(t: &str, attrs: &[String]) -> Result<Vec<KeyPart>, String> {
    if t.len() > MAX_KEY_TEMPLATE {
        return Err(format!(
            "counter key template is {} bytes, over the limit of {MAX_KEY_TEMPLATE}",
            t.len()
        ));
    }
    let mut parts = Vec::new();
    let mut rest = t;
    while let Some((before, after)) = rest.split_once('{') {
        if !before.is_empty() {
            parts.push(KeyPart::Text(before.to_owned()));
        } else if matches!(parts.last(), Some(KeyPart::Field(_))) {
            // `{a}{b}` would render `ab` + `c` and `a` + `bc` alike.
            return Err(format!(
                "fields in key `{t}` need a separator between them (e.g. `{{principal.id}}:{{request.model}}`)"
            ));
        }
        let (inner, tail) = after
            .split_once('}')
            .ok_or_else(|| format!("unclosed `{{` in key `{t}`"))?;
        let path = inner.trim();
        let (field, ty) = FieldRef::parse_path(path, attrs).map_err(|e| match e.suggestion {
            Some(s) => format!("{} (did you mean `{s}`?)", e.message),
            None => e.message,
        })?;
        if matches!(
            ty,
            FieldType::Messages | FieldType::StrList | FieldType::StrMap
        ) || matches!(
            field,
            FieldRef::Prompt | FieldRef::PromptFolded | FieldRef::PromptInjection
        ) {
            return Err(format!(
                "`{path}` cannot be part of a counter key (use a field that names who or what is counted, e.g. `principal.id`, `request.model`)"
            ));
        }
        parts.push(KeyPart::Field(field));
        if parts
            .iter()
            .filter(|p| matches!(p, KeyPart::Field(_)))
            .count()
            > MAX_KEY_FIELDS
        {
            return Err(format!(
                "a counter key template takes at most {MAX_KEY_FIELDS} fields"
            ));
        }
        rest = tail;
    }
    if !rest.is_empty() {
        parts.push(KeyPart::Text(rest.to_owned()));
    }
    if parts
        .iter()
        .any(|p| matches!(p, KeyPart::Text(text) if text.contains('%')))
    {
        return Err(format!(
            "`%` is reserved in counter keys (request values are percent-encoded): `{t}`"
        ));
    }
    if parts.is_empty() {
        return Err(String::from("counter key must not be empty"));
    }
    Ok(parts)
}

/// Window length in seconds: a unit name or a duration like `30s`, `5m`, `2h`, `1d`.
fn window(per: &str) -> Result<u64, String> {
    let named = match per {
        "second" => Some(1),
        "minute" => Some(60),
        "hour" => Some(3600),
        "day" => Some(86_400),
        "week" => Some(7 * 86_400),
        "month" => Some(30 * 86_400),
        _ => None,
    };
    if let Some(s) = named {
        return Ok(s);
    }
    let bad = || {
        format!("`{per}` is not a window: use second, minute, hour, day, week, month or e.g. 30s, 5m, 2h, 1d")
    };
    let split = per.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = (
        per.get(..split).unwrap_or_default(),
        per.get(split..).unwrap_or_default(),
    );
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(bad());
    }
    n.checked_mul(mult).ok_or_else(bad)
}
