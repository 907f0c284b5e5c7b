//! Validation and compilation of policy documents into an immutable [`PolicySet`].

use alloc::borrow::ToOwned;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;

use hashbrown::HashMap;
use serde_json::Value;

use crate::condition::Cond;
use crate::context::{ContextConfig, Needs};
use crate::decision::{ChargeSource, CounterKind, Verdict};
use crate::diagnostic::{Diagnostic, Diagnostics};
use crate::document::Document;
use crate::dsl;
use crate::index::RuleIndex;
use crate::model::{
    Action, ActionDecision, Alert, DefaultDecision, Mode, OnError, PluginRef, PolicyDoc, Rule,
    Scope, API_VERSION, KIND_POLICY,
};
use crate::schema::{FieldRef, FieldType};

/// A compiled, validated, immutable set of policies. Cloning is cheap (one reference count), so a
/// server can swap the current set atomically and keep old ones alive for in-flight requests.
#[derive(Clone)]
pub struct PolicySet(pub(crate) Arc<Inner>);

// A policy set is shared across threads (server workers) and swapped atomically.
const _: () = {
    fn is_send_sync<T: Send + Sync>() {}
    fn check() {
        is_send_sync::<PolicySet>();
    }
    let _ = check;
};

pub(crate) struct Inner {
    pub namespaces: HashMap<String, Namespace>,
    pub bundle: String,
    pub config: ContextConfig,
    pub needs: Needs,
}

pub(crate) struct PolicyInfo {
    pub name: String,
    pub version: String,
}

/// The rules of every policy in one namespace, evaluated together.
pub(crate) struct Namespace {
    pub name: String,
    pub policies: Vec<PolicyInfo>,
    pub default: Verdict,
    /// Enabled rules, by descending priority (file order within a priority).
    pub rules: Vec<CompiledRule>,
    /// Disabled rules (id, priority), reported by explain.
    pub disabled: Vec<(String, i64)>,
    pub index: RuleIndex,
    /// Every field any rule of the namespace reads (cache key input), sorted.
    pub reads: Vec<FieldRef>,
    /// The fields its interpreted CEL programs read (what the CEL activation must hold).
    #[cfg_attr(not(feature = "cel"), allow(dead_code))]
    pub cel_reads: Vec<FieldRef>,
    /// Tag → bitset over `rules`.
    pub tags: HashMap<String, Vec<u64>>,
}

pub(crate) struct CompiledRule {
    pub id: String,
    pub policy: usize,
    pub priority: i64,
    pub shadow: bool,
    pub on_error: OnError,
    pub tags: Vec<String>,
    pub cond: Cond,
    /// For interpreted CEL: the translatable conjuncts, used only to index the rule.
    pub index_hint: Option<Cond>,
    pub plugin: Option<PluginRef>,
    pub action: CompiledAction,
    /// Reads time, uses a plugin, a rate limit or a budget: decisions involving it are not cached.
    pub volatile: bool,
}

pub(crate) struct CompiledAction {
    pub decision: Verdict,
    pub reason: String,
    pub status: Option<u16>,
    pub headers: BTreeMap<String, String>,
    pub audit: bool,
    pub alert: Option<Alert>,
    pub limit: Option<Limit>,
}

impl Namespace {
    fn new(name: &str) -> Namespace {
        Namespace {
            name: name.to_string(),
            policies: Vec::new(),
            default: Verdict::Allow,
            rules: Vec::new(),
            disabled: Vec::new(),
            index: RuleIndex::default(),
            reads: Vec::new(),
            cel_reads: Vec::new(),
            tags: HashMap::new(),
        }
    }
}

/// A rate limit or budget of a rule.
pub(crate) struct Limit {
    pub source: ChargeSource,
    pub key: Vec<KeyPart>,
    pub kind: CounterKind,
    pub limit: f64,
    pub window_secs: u64,
    pub scope: Scope,
}

pub(crate) enum KeyPart {
    Text(String),
    Field(FieldRef),
}

/// A compiled set and the warnings found while compiling it.
#[derive(Debug)]
pub struct CompileOutput {
    /// The set.
    pub set: PolicySet,
    /// Findings that did not prevent compilation.
    pub warnings: Vec<Diagnostic>,
}

impl core::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PolicySet")
            .field("bundle", &self.0.bundle)
            .field("namespaces", &self.namespaces())
            .finish()
    }
}

impl PolicySet {
    /// Validates and compiles documents (`kind: Policy`) against a context configuration.
    /// Fails with every error found; never returns a partially valid set.
    pub fn compile(
        docs: &[Document],
        config: &ContextConfig,
    ) -> Result<CompileOutput, Diagnostics> {
        Compiler::new(config).run(docs)
    }

    /// Loads (file or directory paths) and compiles, with the default context configuration.
    #[cfg(feature = "std")]
    pub fn load<P: AsRef<std::path::Path>>(paths: &[P]) -> Result<CompileOutput, Diagnostics> {
        PolicySet::load_with(paths, &ContextConfig::default())
    }

    /// Loads (file or directory paths) and compiles against a context configuration.
    #[cfg(feature = "std")]
    pub fn load_with<P: AsRef<std::path::Path>>(
        paths: &[P],
        config: &ContextConfig,
    ) -> Result<CompileOutput, Diagnostics> {
        let docs = crate::source::load_policies(paths)?;
        PolicySet::compile(&docs, config)
    }

    /// The context configuration the set was compiled against (use it to build contexts).
    pub fn config(&self) -> &ContextConfig {
        &self.0.config
    }

    /// Which expensive context parts some rule reads (pass to
    /// [`crate::RequestContext::from_request_with`]).
    pub fn needs(&self) -> Needs {
        self.0.needs
    }

    /// Digest of the compiled bundle.
    pub fn bundle(&self) -> &str {
        &self.0.bundle
    }

    /// Namespace names, sorted.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v: Vec<String> = self.0.namespaces.keys().cloned().collect();
        v.sort();
        v
    }

    /// Number of enabled rules over all namespaces.
    pub fn rule_count(&self) -> usize {
        self.0.namespaces.values().map(|n| n.rules.len()).sum()
    }

    /// Counts of what the set holds.
    pub fn stats(&self) -> Stats {
        let ns = self.0.namespaces.values();
        let rules = || ns.clone().flat_map(|n| n.rules.iter());
        Stats {
            namespaces: self.0.namespaces.len(),
            policies: ns.clone().map(|n| n.policies.len()).sum(),
            rules: rules().count(),
            disabled: ns.clone().map(|n| n.disabled.len()).sum(),
            interpreted: rules().filter(|r| r.is_interpreted()).count(),
            remote: rules()
                .filter(|r| r.plugin.is_some() || r.action.limit.is_some())
                .count(),
        }
    }
}

/// What a policy set holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Namespaces.
    pub namespaces: usize,
    /// Policies.
    pub policies: usize,
    /// Enabled rules.
    pub rules: usize,
    /// Disabled rules.
    pub disabled: usize,
    /// Rules whose CEL condition runs in the interpreter (the rest are native).
    pub interpreted: usize,
    /// Rules with a plugin, rate limit or budget (finished by the filter or server).
    pub remote: usize,
}

impl CompiledRule {
    fn is_interpreted(&self) -> bool {
        #[cfg(feature = "cel")]
        {
            matches!(self.cond, Cond::Cel(_))
        }
        #[cfg(not(feature = "cel"))]
        {
            false
        }
    }
}

struct PolicyMeta {
    namespace: String,
    name: String,
    version: String,
    default: DefaultDecision,
    file: String,
}

struct Pending {
    ns: String,
    policy_name: String,
    /// Index of the document in the compiled list (a file may hold several documents).
    doc: usize,
    file: String,
    pointer: String,
    rule: Rule,
}

struct Compiler<'a> {
    config: &'a ContextConfig,
    attrs: Vec<String>,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl<'a> Compiler<'a> {
    fn new(config: &'a ContextConfig) -> Self {
        Compiler {
            config,
            attrs: config.principal_attributes(),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn run(mut self, docs: &[Document]) -> Result<CompileOutput, Diagnostics> {
        let mut pending: Vec<Pending> = Vec::new();
        let mut metas: Vec<PolicyMeta> = Vec::new();
        let mut digest = xxhash_rust::xxh3::Xxh3::new();
        for (index, doc) in docs.iter().enumerate() {
            // Content only: the same policies mounted at another path are the same bundle.
            digest.update(doc.canonical.as_bytes());
            digest.update(&[0]);
            self.read_doc(index, doc, &mut pending, &mut metas);
        }
        if docs.is_empty() {
            self.errors.push(Diagnostic::error(
                "no-policies",
                "no policy documents found",
            ));
        }
        let mut namespaces: HashMap<String, Namespace> = HashMap::new();
        // Every policy, with or without rules, defines its namespace and contributes its default.
        for meta in &metas {
            let ns = namespaces
                .entry(meta.namespace.clone())
                .or_insert_with(|| Namespace::new(&meta.namespace));
            ns.policies.push(PolicyInfo {
                name: meta.name.clone(),
                version: meta.version.clone(),
            });
            if meta.default == DefaultDecision::Deny {
                ns.default = Verdict::Deny;
            }
        }
        let mut seen_ids: HashMap<(String, String), String> = HashMap::new();
        for p in pending {
            let loc = |ptr: &str| docs.get(p.doc).and_then(|d| d.position(ptr));
            let id_ptr = format!("{}/id", p.pointer);
            let id_key = (p.ns.clone(), p.rule.id.clone());
            if let Some(first) = seen_ids.get(&id_key) {
                self.errors.push(
                    Diagnostic::error(
                        "duplicate-id",
                        format!(
                            "rule id `{}` is already used in namespace `{}`",
                            p.rule.id, p.ns
                        ),
                    )
                    .at(&p.file, loc(&id_ptr))
                    .rule(Some(&p.rule.id))
                    .help(Some(format!("first defined at {first}"))),
                );
                continue;
            }
            let here = match loc(&id_ptr) {
                Some(pos) => format!("{}:{}:{}", p.file, pos.line, pos.column),
                None => p.file.clone(),
            };
            seen_ids.insert(id_key, here);
            let ns = namespaces
                .entry(p.ns.clone())
                .or_insert_with(|| Namespace::new(&p.ns));
            let policy = ns
                .policies
                .iter()
                .position(|x| x.name == p.policy_name)
                .unwrap_or(0);
            if !p.rule.enabled {
                // Still validated, so a disabled rule cannot hide a broken condition.
                let _ = self.compile_rule(&p, policy, docs);
                ns.disabled.push((p.rule.id.clone(), p.rule.priority));
                continue;
            }
            if let Some(rule) = self.compile_rule(&p, policy, docs) {
                ns.rules.push(rule);
            }
        }
        for ns in namespaces.values_mut() {
            self.finish_namespace(ns, docs);
        }
        let needs = needs_of(namespaces.values());
        let by_place = |d: &Diagnostic| (d.file.clone(), d.position);
        self.errors.sort_by_key(by_place);
        self.warnings.sort_by_key(by_place);
        if !self.errors.is_empty() {
            let mut all = self.errors;
            all.extend(self.warnings);
            return Err(Diagnostics(all));
        }
        let bundle = format!("{:032x}", digest.digest128());
        Ok(CompileOutput {
            set: PolicySet(Arc::new(Inner {
                namespaces,
                bundle,
                config: self.config.clone(),
                needs,
            })),
            warnings: self.warnings,
        })
    }

    fn read_doc(
        &mut self,
        index: usize,
        doc: &Document,
        pending: &mut Vec<Pending>,
        metas: &mut Vec<PolicyMeta>,
    ) {
        let mut header = doc.value.clone();
        let rules: Vec<Value> = match header.pointer_mut("/spec/rules") {
            Some(Value::Array(items)) => core::mem::take(items),
            _ => Vec::new(),
        };
        let policy: PolicyDoc = match doc.parse_at("", &header, None) {
            Ok(p) => p,
            Err(d) => {
                self.errors.push(d);
                return;
            }
        };
        if policy.api_version != API_VERSION {
            self.errors.push(
                Diagnostic::error(
                    "api-version",
                    format!("unsupported apiVersion `{}`", policy.api_version),
                )
                .at(&doc.file, doc.position("/apiVersion"))
                .help(Some(format!("use `apiVersion: {API_VERSION}`"))),
            );
        }
        if policy.kind != KIND_POLICY {
            self.errors.push(
                Diagnostic::error("kind", format!("unsupported kind `{}`", policy.kind))
                    .at(&doc.file, doc.position("/kind"))
                    .help(Some(String::from(
                        "use `kind: Policy` (test suites use `kind: PolicyTest`)",
                    ))),
            );
        }
        let meta = &policy.metadata;
        if meta.name.trim().is_empty() {
            self.errors.push(
                Diagnostic::error("invalid-name", "metadata.name must not be empty")
                    .at(&doc.file, doc.position("/metadata/name")),
            );
        }
        if let Some(first) = metas
            .iter()
            .find(|m| m.namespace == meta.namespace && m.name == meta.name)
        {
            let first = first.file.clone();
            self.errors.push(
                Diagnostic::error(
                    "duplicate-policy",
                    format!(
                        "policy `{}` is already defined in namespace `{}`",
                        meta.name, meta.namespace
                    ),
                )
                .at(&doc.file, doc.position("/metadata/name"))
                .help(Some(format!("first defined in {first}"))),
            );
            return;
        }
        metas.push(PolicyMeta {
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
            version: meta.version.clone().unwrap_or_default(),
            default: policy.spec.default_decision,
            file: doc.file.clone(),
        });
        for (i, raw) in rules.iter().enumerate() {
            let base = format!("/spec/rules/{i}");
            let id_hint = raw.get("id").and_then(Value::as_str);
            let rule: Rule = match doc.parse_at(&base, raw, id_hint) {
                Ok(r) => r,
                Err(d) => {
                    self.errors.push(d);
                    continue;
                }
            };
            if rule.id.trim().is_empty() {
                self.errors.push(
                    Diagnostic::error("invalid-id", "rule id must not be empty")
                        .at(&doc.file, doc.position(&format!("{base}/id"))),
                );
                continue;
            }
            pending.push(Pending {
                ns: meta.namespace.clone(),
                policy_name: meta.name.clone(),
                file: doc.file.clone(),
                doc: index,
                pointer: base,
                rule,
            });
        }
    }

    fn compile_rule(
        &mut self,
        p: &Pending,
        policy: usize,
        docs: &[Document],
    ) -> Option<CompiledRule> {
        let doc = docs.get(p.doc)?;
        let rule = &p.rule;
        let id = Some(rule.id.as_str());
        let at = |ptr: &str| doc.position(&format!("{}{ptr}", p.pointer));
        let before = self.errors.len();
        let w = &rule.when;
        let set = [w.cel.is_some(), w.matcher.is_some(), w.plugin.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if set != 1 {
            self.errors.push(
                Diagnostic::error(
                    "invalid-condition",
                    "`when` needs exactly one of `cel`, `match`, `plugin`",
                )
                .at(&p.file, at("/when"))
                .rule(id),
            );
            return None;
        }
        let (mut cond, mut index_hint, plugin) = (Cond::Const(false), None, w.plugin.clone());
        if let Some(src) = &w.cel {
            match self.compile_cel(src) {
                Ok((c, hint)) => {
                    cond = c;
                    index_hint = hint;
                }
                Err(d) => self.errors.push(d.at(&p.file, at("/when/cel")).rule(id)),
            }
        } else if let Some(m) = &w.matcher {
            let mut errs = Vec::new();
            match dsl::compile(m, &self.attrs, "", &mut errs) {
                Some(c) if errs.is_empty() => cond = c,
                _ => {
                    for e in errs {
                        self.errors.push(
                            Diagnostic::error("invalid-match", e.message)
                                .at(&p.file, at(&format!("/when/match{}", e.pointer)))
                                .rule(id)
                                .help(e.help),
                        );
                    }
                }
            }
        } else if let Some(pl) = &plugin {
            if pl.name.trim().is_empty() {
                self.errors.push(
                    Diagnostic::error("invalid-plugin", "plugin name must not be empty")
                        .at(&p.file, at("/when/plugin/name"))
                        .rule(id),
                );
            }
        }
        let action = self.compile_action(&rule.action, &p.file, &|ptr| at(ptr), id);
        if self.errors.len() > before {
            return None;
        }
        let action = action?;
        let mut volatile = plugin.is_some() || action.limit.is_some();
        cond.visit_fields(&mut |f| volatile |= f.is_time());
        Some(CompiledRule {
            id: rule.id.clone(),
            policy,
            priority: rule.priority,
            shadow: rule.mode == Mode::Shadow,
            on_error: rule.on_error,
            tags: rule.tags.clone(),
            cond,
            index_hint,
            plugin,
            action,
            volatile,
        })
    }

    #[cfg(feature = "cel")]
    fn compile_cel(&self, src: &str) -> Result<(Cond, Option<Cond>), Diagnostic> {
        crate::cel_lang::compile(src, &self.attrs)
            .map(|c| (c.cond, c.index_hint))
            .map_err(|e| Diagnostic::error(e.code, e.message).help(e.help))
    }

    #[cfg(not(feature = "cel"))]
    fn compile_cel(&self, _src: &str) -> Result<(Cond, Option<Cond>), Diagnostic> {
        Err(Diagnostic::error(
            "cel-unavailable",
            "CEL conditions need the `cel` feature of llm-policy-core",
        )
        .help(Some(String::from(
            "use a `match` condition, or build with `--features cel`",
        ))))
    }

    fn compile_action(
        &mut self,
        a: &Action,
        file: &str,
        at: &dyn Fn(&str) -> Option<crate::document::Position>,
        id: Option<&str>,
    ) -> Option<CompiledAction> {
        let mut ok = true;
        let mut fail = |s: &mut Self, ptr: &str, code: &str, msg: String| {
            s.errors
                .push(Diagnostic::error(code, msg).at(file, at(ptr)).rule(id));
            ok = false;
        };
        if let Some(st) = a.status {
            if !(100..=599).contains(&st) {
                fail(
                    self,
                    "/action/status",
                    "invalid-status",
                    format!("status {st} is not an HTTP status code"),
                );
            }
        }
        for name in a.headers.keys() {
            let valid = !name.is_empty()
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b)
                });
            if !valid {
                fail(
                    self,
                    "/action/headers",
                    "invalid-header",
                    format!("`{name}` is not a valid lower-case header name"),
                );
            }
        }
        let decision = match a.decision {
            ActionDecision::Allow => Verdict::Allow,
            ActionDecision::Deny => Verdict::Deny,
            ActionDecision::Throttle => Verdict::Throttle,
        };
        let mut limit = None;
        if a.rate_limit.is_some() && a.budget.is_some() {
            fail(
                self,
                "/action",
                "invalid-limit",
                String::from("a rule takes either `rateLimit` or `budget`, not both"),
            );
        }
        if let Some(rl) = &a.rate_limit {
            let (kind, amount) = match (rl.requests, rl.tokens) {
                (Some(n), None) => (CounterKind::Requests, n as f64),
                (None, Some(n)) => (CounterKind::Tokens, n as f64),
                _ => {
                    fail(
                        self,
                        "/action/rateLimit",
                        "invalid-limit",
                        String::from("`rateLimit` needs exactly one of `requests`, `tokens`"),
                    );
                    (CounterKind::Requests, 0.0)
                }
            };
            match (self.key_template(&rl.key), window(&rl.per)) {
                (Ok(key), Ok(window_secs)) => {
                    limit = Some(Limit {
                        source: ChargeSource::RateLimit,
                        key,
                        kind,
                        limit: amount,
                        window_secs,
                        scope: rl.scope,
                    })
                }
                (Err(m), _) => fail(self, "/action/rateLimit/key", "invalid-key", m),
                (_, Err(m)) => fail(self, "/action/rateLimit/per", "invalid-window", m),
            }
        }
        if let Some(b) = &a.budget {
            let (kind, amount) = match (b.tokens, b.usd) {
                (Some(n), None) => (CounterKind::Tokens, n as f64),
                (None, Some(u)) if u.is_finite() && u > 0.0 => (CounterKind::Usd, u),
                _ => {
                    fail(
                        self,
                        "/action/budget",
                        "invalid-limit",
                        String::from("`budget` needs exactly one of `tokens`, `usd` (positive)"),
                    );
                    (CounterKind::Tokens, 0.0)
                }
            };
            match (self.key_template(&b.key), window(&b.per)) {
                (Ok(key), Ok(window_secs)) => {
                    limit = Some(Limit {
                        source: ChargeSource::Budget,
                        key,
                        kind,
                        limit: amount,
                        window_secs,
                        scope: Scope::Global,
                    })
                }
                (Err(m), _) => fail(self, "/action/budget/key", "invalid-key", m),
                (_, Err(m)) => fail(self, "/action/budget/per", "invalid-window", m),
            }
        }
        if !ok {
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
        })
    }

    /// `"{principal.id}:{request.model}"` → parts. Literal text outside braces is kept.
    fn key_template(&self, t: &str) -> Result<Vec<KeyPart>, String> {
        let mut parts = Vec::new();
        let mut rest = t;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(KeyPart::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in key `{t}`"))?;
            let path = after[..close].trim();
            let (field, ty) =
                FieldRef::parse_path(path, &self.attrs).map_err(|e| match e.suggestion {
                    Some(s) => format!("{} (did you mean `{s}`?)", e.message),
                    None => e.message,
                })?;
            if matches!(
                ty,
                FieldType::Messages | FieldType::StrList | FieldType::StrMap
            ) {
                return Err(format!(
                    "`{path}` cannot be part of a counter key (use a scalar field)"
                ));
            }
            parts.push(KeyPart::Field(field));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(KeyPart::Text(rest.to_owned()));
        }
        if parts.is_empty() {
            return Err(String::from("counter key must not be empty"));
        }
        Ok(parts)
    }

    fn finish_namespace(&mut self, ns: &mut Namespace, docs: &[Document]) {
        // Descending priority, stable (file order) within a priority.
        ns.rules.sort_by_key(|r| core::cmp::Reverse(r.priority));
        let locate = |id: &str| -> (Option<String>, Option<crate::document::Position>) {
            for d in docs {
                if let Some(Value::Array(rules)) = d.value.pointer("/spec/rules") {
                    if d.value
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        .unwrap_or("default")
                        != ns.name
                    {
                        continue;
                    }
                    if let Some(i) = rules
                        .iter()
                        .position(|r| r.get("id").and_then(Value::as_str) == Some(id))
                    {
                        return (
                            Some(d.file.clone()),
                            d.position(&format!("/spec/rules/{i}/id")),
                        );
                    }
                }
            }
            (None, None)
        };
        let diag = |d: Diagnostic, id: &str| {
            let (file, pos) = locate(id);
            match file {
                Some(f) => d.at(&f, pos).rule(Some(id)),
                None => d.rule(Some(id)),
            }
        };
        // Shadowed rules: a higher-priority enforcing rule that matches every request.
        let unconditional: Option<(String, i64)> = ns
            .rules
            .iter()
            .find(|r| {
                !r.shadow && r.plugin.is_none() && r.action.limit.is_none() && is_always(&r.cond)
            })
            .map(|r| (r.id.clone(), r.priority));
        if let Some((uid, up)) = unconditional {
            for r in ns.rules.iter().filter(|r| r.priority < up) {
                self.warnings.push(diag(
                    Diagnostic::warning(
                        "shadowed-rule",
                        format!("rule `{}` can never decide: rule `{uid}` (priority {up}) matches every request", r.id),
                    )
                    .help(Some(String::from("raise its priority, or give the other rule a condition"))),
                    &r.id,
                ));
            }
        }
        // Conflicts: equal priority, same condition, contradictory decisions.
        for (i, a) in ns.rules.iter().enumerate() {
            for b in ns
                .rules
                .iter()
                .skip(i + 1)
                .take_while(|b| b.priority == a.priority)
            {
                if a.shadow
                    || b.shadow
                    || a.action.decision == b.action.decision
                    || a.plugin != b.plugin
                {
                    continue;
                }
                if a.action.limit.is_some() || b.action.limit.is_some() {
                    continue;
                }
                if a.cond.fingerprint() == b.cond.fingerprint() {
                    self.errors.push(diag(
                        Diagnostic::error(
                            "conflicting-rules",
                            format!(
                                "rules `{}` and `{}` have the same priority ({}) and condition but decide {} and {}",
                                a.id,
                                b.id,
                                a.priority,
                                a.action.decision.as_str(),
                                b.action.decision.as_str()
                            ),
                        )
                        .help(Some(String::from("give one of them a higher priority"))),
                        &b.id,
                    ));
                }
            }
        }
        let mut reads = Vec::new();
        for r in &ns.rules {
            r.cond.visit_fields(&mut |f| reads.push(f.clone()));
            if let Some(l) = &r.action.limit {
                for part in &l.key {
                    if let KeyPart::Field(f) = part {
                        reads.push(f.clone());
                    }
                }
            }
        }
        reads.sort();
        reads.dedup();
        ns.reads = reads;
        #[cfg(feature = "cel")]
        {
            let mut cel_reads: Vec<FieldRef> = Vec::new();
            for r in &ns.rules {
                if let Cond::Cel(p) = &r.cond {
                    cel_reads.extend(p.reads().iter().cloned());
                }
            }
            cel_reads.sort();
            cel_reads.dedup();
            ns.cel_reads = cel_reads;
        }
        ns.index = RuleIndex::build(&ns.rules);
        let words = ns.rules.len().div_ceil(64);
        for (i, r) in ns.rules.iter().enumerate() {
            for t in &r.tags {
                let bits = ns
                    .tags
                    .entry(t.clone())
                    .or_insert_with(|| alloc::vec![0u64; words]);
                if let Some(w) = bits.get_mut(i / 64) {
                    *w |= 1u64 << (i % 64);
                }
            }
        }
    }
}

/// What extraction must build for these namespaces: text only if some rule reads it, a token
/// counter estimates from it, or a plugin may inspect it.
fn needs_of<'n>(namespaces: impl Iterator<Item = &'n Namespace>) -> Needs {
    let mut needs = Needs {
        messages: false,
        prompt: false,
    };
    for ns in namespaces {
        for f in &ns.reads {
            needs.prompt |= matches!(f, FieldRef::Prompt | FieldRef::EstimatedTokens);
            needs.messages |= *f == FieldRef::Messages;
        }
        for r in &ns.rules {
            needs.prompt |= r
                .action
                .limit
                .as_ref()
                .is_some_and(|l| l.kind != CounterKind::Requests);
            if r.plugin.is_some() {
                needs = Needs::ALL;
            }
        }
    }
    needs
}

fn is_always(c: &Cond) -> bool {
    match c {
        Cond::Const(b) => *b,
        Cond::All(children) => children.iter().all(is_always),
        _ => false,
    }
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
    let (num, unit) = per.split_at(per.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
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
