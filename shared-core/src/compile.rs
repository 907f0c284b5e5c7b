//! Validation and compilation of policy documents into an immutable [`PolicySet`].
//!
//! The driver reads documents into pending rules (`read_doc`), compiles each rule's condition
//! and action ([`rule`], [`action`]), groups rules by namespace and finishes each namespace
//! ([`lint`] for shadowed and conflicting rules, then the index, read sets and tag bitsets).
//! Every step is linear (or `n log n`) in the number of rules.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use hashbrown::HashMap;
use serde_json::Value;

use crate::context::{ContextConfig, Needs};
use crate::decision::{CounterKind, Verdict};
use crate::diagnostic::{Code, Diagnostic, Diagnostics};
use crate::document::Document;
use crate::index::RuleIndex;
use crate::model::{DefaultDecision, Phase, PolicyDoc, Rule, API_VERSION, KIND_POLICY};
use crate::schema::FieldRef;
use crate::set::{
    CompileOutput, CompiledRule, Inner, KeyPart, Namespace, Origin, PolicyInfo, PolicySet,
};

mod action;
mod lint;
mod rule;

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
}

struct PolicyMeta {
    namespace: String,
    name: String,
    version: String,
    default: DefaultDecision,
    /// The policy's file.
    file: String,
    /// Where its default comes from: `defaultDecision` when written, else the policy's name.
    default_at: Option<crate::diagnostic::Position>,
    /// `defaultDecision` is written (not left to its default, deny).
    default_written: bool,
}

/// A rule read from its document, waiting to be compiled.
pub(crate) struct Pending {
    ns: String,
    policy_name: String,
    /// Index of the document in the compiled list (a file may hold several documents).
    doc: usize,
    file: String,
    /// JSON pointer of the rule in its document.
    pointer: String,
    rule: Rule,
}

pub(crate) struct Compiler {
    config: ContextConfig,
    attrs: Vec<String>,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

/// Control characters other than tab (CR, LF, NUL, DEL, ...): never valid in names and header
/// values.
pub(crate) fn has_control(s: &str) -> bool {
    s.chars().any(|c| c.is_control() && c != '\t')
}

impl Compiler {
    fn new(config: &ContextConfig) -> Self {
        let config = config.normalized();
        Compiler {
            attrs: config.principal_attributes(),
            config,
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn run(mut self, docs: &[Document]) -> Result<CompileOutput, Diagnostics> {
        let mut pending: Vec<Pending> = Vec::new();
        let mut metas: Vec<PolicyMeta> = Vec::new();
        let mut first_policy: HashMap<(String, String), String> = HashMap::new();
        let mut digest = xxhash_rust::xxh3::Xxh3::new();
        for (index, doc) in docs.iter().enumerate() {
            // Content only: the same policies mounted at another path are the same bundle.
            digest.update(&doc.digest.to_le_bytes());
            self.read_doc(index, doc, &mut pending, &mut metas, &mut first_policy);
        }
        if docs.is_empty() {
            self.errors.push(Diagnostic::error(
                Code::NoPolicies,
                "no policy documents found",
            ));
        }
        let mut namespaces: HashMap<String, Namespace> = HashMap::new();
        // A table of the configuration's own prices is part of what the bundle decides with.
        if let Some(table) = &self.config.models {
            if let Ok(json) = serde_json::to_vec(table) {
                digest.update(&json);
            }
        }
        let models = Arc::new(self.config.models.clone().unwrap_or_default());
        let mut policy_index: HashMap<(String, String), usize> = HashMap::new();
        // Every policy, with or without rules, defines its namespace and contributes its default.
        for meta in &metas {
            let ns = namespaces
                .entry(meta.namespace.clone())
                .or_insert_with(|| Namespace::new(&meta.namespace, Arc::clone(&models)));
            policy_index.insert(
                (meta.namespace.clone(), meta.name.clone()),
                ns.policies.len(),
            );
            ns.policies.push(PolicyInfo {
                name: meta.name.clone(),
                version: meta.version.clone(),
            });
            if meta.default == DefaultDecision::Deny {
                ns.default = Verdict::Deny;
            }
        }
        self.warn_mixed_defaults(&metas);
        let mut seen_ids: HashMap<(String, String), String> = HashMap::new();
        for p in pending {
            let Some(doc) = docs.get(p.doc) else {
                continue;
            };
            let position = doc.position(&format!("{}/id", p.pointer));
            let id_key = (p.ns.clone(), p.rule.id.clone());
            if let Some(first) = seen_ids.get(&id_key) {
                self.errors.push(
                    Diagnostic::error(
                        Code::DuplicateId,
                        format!(
                            "rule id `{}` is already used in namespace `{}`",
                            p.rule.id, p.ns
                        ),
                    )
                    .at(&p.file, position)
                    .rule(Some(&p.rule.id))
                    .help(Some(format!("first defined at {first}"))),
                );
                continue;
            }
            let here = match position {
                Some(pos) => format!("{}:{}:{}", p.file, pos.line, pos.column),
                None => p.file.clone(),
            };
            seen_ids.insert(id_key, here);
            let Some(ns) = namespaces.get_mut(&p.ns) else {
                continue;
            };
            let policy = policy_index
                .get(&(p.ns.clone(), p.policy_name.clone()))
                .copied()
                .unwrap_or(0);
            let origin = Origin {
                file: p.file.clone(),
                position,
                policy: p.policy_name.clone(),
            };
            let compiled = self.compile_rule(&p, doc, policy, origin);
            if !p.rule.enabled {
                // Still validated, so a disabled rule cannot hide a broken condition.
                ns.disabled.push((p.rule.id.clone(), p.rule.priority));
                continue;
            }
            match compiled {
                Some(rule) if p.rule.phase == Phase::Response => ns.answer_rules.push(rule),
                Some(rule) => ns.rules.push(rule),
                None => {}
            }
        }
        for ns in namespaces.values_mut() {
            self.finish_namespace(ns);
            ns.counts_tokens = ns.rules.iter().any(|r| {
                r.action
                    .limit
                    .as_ref()
                    .is_some_and(|l| l.kind != CounterKind::Requests)
            });
            ns.caps = ns.rules.iter().any(|r| !r.shadow && r.action.cap.is_some());
            ns.caching_pays = ns.reads.iter().any(|f| {
                matches!(
                    f,
                    FieldRef::Prompt
                        | FieldRef::PromptFolded
                        | FieldRef::Messages
                        | FieldRef::PromptEntities
                        | FieldRef::PromptInjection
                )
            });
        }
        let needs = needs_of(namespaces.values());
        let mut plugins: Vec<String> = namespaces
            .values()
            .flat_map(|ns| ns.rules.iter().filter_map(|r| r.plugin.as_ref()))
            .map(|p| p.name.clone())
            .collect();
        plugins.sort();
        plugins.dedup();
        let by_place = |d: &Diagnostic| (d.file.clone(), d.position);
        self.errors.sort_by_key(by_place);
        self.warnings.sort_by_key(by_place);
        if !self.errors.is_empty() {
            let mut all = self.errors;
            all.extend(self.warnings);
            return Err(Diagnostics(all));
        }
        let bundle = crate::cache_key::hex128(digest.digest128());
        Ok(CompileOutput {
            set: PolicySet(Arc::new(Inner {
                namespaces,
                bundle,
                config: self.config,
                needs,
                plugins,
                models,
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
        first_policy: &mut HashMap<(String, String), String>,
    ) {
        let Value::Object(top) = &doc.value else {
            let found = match &doc.value {
                Value::Array(_) => "a list",
                Value::String(_) => "a string",
                _ => "a scalar",
            };
            self.errors.push(
                Diagnostic::error(
                    Code::InvalidDocument,
                    format!("a policy document must be a map, and this one is {found}"),
                )
                .at(&doc.file, doc.position(""))
                .help(Some(String::from(
                    "write one policy per YAML document (`apiVersion`, `kind`, `metadata`, `spec`), separated by `---`",
                ))),
            );
            return;
        };
        // The header without the rules (each rule is read on its own, for its own errors).
        let mut header = serde_json::Map::new();
        for (k, v) in top {
            if k == "spec" {
                if let Value::Object(spec) = v {
                    let rest: serde_json::Map<String, Value> = spec
                        .iter()
                        .filter(|(sk, _)| {
                            *sk != "rules" || !v.get("rules").is_some_and(Value::is_array)
                        })
                        .map(|(sk, sv)| (sk.clone(), sv.clone()))
                        .collect();
                    header.insert(k.clone(), Value::Object(rest));
                    continue;
                }
            }
            header.insert(k.clone(), v.clone());
        }
        let rules: &[Value] = match doc.value.pointer("/spec/rules") {
            Some(Value::Array(items)) => items,
            _ => &[],
        };
        let policy: PolicyDoc = match doc.parse_at("", &Value::Object(header), None) {
            Ok(p) => p,
            Err(d) => {
                self.errors.push(d);
                return;
            }
        };
        if policy.api_version != API_VERSION {
            self.errors.push(
                Diagnostic::error(
                    Code::ApiVersion,
                    format!("unsupported apiVersion `{}`", policy.api_version),
                )
                .at(&doc.file, doc.position("/apiVersion"))
                .help(Some(format!("use `apiVersion: {API_VERSION}`"))),
            );
        }
        if policy.kind != KIND_POLICY {
            self.errors.push(
                Diagnostic::error(Code::Kind, format!("unsupported kind `{}`", policy.kind))
                    .at(&doc.file, doc.position("/kind"))
                    .help(Some(String::from(
                        "use `kind: Policy` (test suites use `kind: PolicyTest`)",
                    ))),
            );
        }
        let meta = &policy.metadata;
        if meta.name.trim().is_empty() || has_control(&meta.name) {
            self.errors.push(
                Diagnostic::error(
                    Code::InvalidName,
                    "metadata.name must not be empty or hold control characters",
                )
                .at(&doc.file, doc.position("/metadata/name")),
            );
        }
        if meta.namespace.trim().is_empty() || has_control(&meta.namespace) {
            self.errors.push(
                Diagnostic::error(
                    Code::InvalidNamespace,
                    format!(
                        "metadata.namespace `{}` is empty or holds control characters",
                        meta.namespace.escape_debug()
                    ),
                )
                .at(&doc.file, doc.position("/metadata/namespace"))
                .help(Some(String::from(
                    "leave it out for the `default` namespace, or name one (it is selected by the namespace header)",
                ))),
            );
        }
        let key = (meta.namespace.clone(), meta.name.clone());
        if let Some(first) = first_policy.get(&key) {
            self.errors.push(
                Diagnostic::error(
                    Code::DuplicatePolicy,
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
        first_policy.insert(key, doc.file.clone());
        let written = doc.value.pointer("/spec/defaultDecision").is_some();
        let at = doc.position(if written {
            "/spec/defaultDecision"
        } else {
            "/metadata/name"
        });
        metas.push(PolicyMeta {
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
            version: meta.version.clone().unwrap_or_default(),
            default: policy.spec.default_decision,
            file: doc.file.clone(),
            default_at: at,
            default_written: written,
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
            if rule.id.trim().is_empty() || has_control(&rule.id) {
                self.errors.push(
                    Diagnostic::error(
                        Code::InvalidId,
                        "rule id must not be empty or hold control characters",
                    )
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

    /// One namespace's policies disagree on `defaultDecision`: the namespace denies what nothing
    /// allows (fail closed, as documented). A policy file added without `defaultDecision` turns a
    /// default-allow namespace into default-deny for every request, so say so, naming both.
    fn warn_mixed_defaults(&mut self, metas: &[PolicyMeta]) {
        let mut namespaces: Vec<&str> = metas.iter().map(|m| m.namespace.as_str()).collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        for ns in namespaces {
            let in_ns = || metas.iter().filter(move |m| m.namespace == ns);
            let (Some(allow), Some(deny)) = (
                in_ns().find(|m| m.default == DefaultDecision::Allow),
                in_ns().find(|m| m.default == DefaultDecision::Deny),
            ) else {
                continue;
            };
            let how = if deny.default_written {
                "says `defaultDecision: deny`"
            } else {
                "leaves `defaultDecision` out (deny)"
            };
            let allow_at = match allow.default_at {
                Some(p) => format!("{}:{}:{}", allow.file, p.line, p.column),
                None => allow.file.clone(),
            };
            self.warnings.push(
                Diagnostic::warning(
                    Code::MixedDefaultDecision,
                    format!(
                        "namespace `{ns}`: policy `{}` {how} while policy `{}` ({}) says `defaultDecision: allow`: the namespace denies every request no rule allows",
                        deny.name, allow.name, allow_at
                    ),
                )
                .at(&deny.file, deny.default_at)
                .help(Some(String::from(
                    "write the same `defaultDecision` in every policy of the namespace",
                ))),
            );
        }
    }

    fn finish_namespace(&mut self, ns: &mut Namespace) {
        let names: Vec<&str> = ns.policies.iter().map(|p| p.name.as_str()).collect();
        let versions: Vec<&str> = ns.policies.iter().map(|p| p.version.as_str()).collect();
        ns.policy_names = names.join(",");
        ns.policy_versions = versions.join(",");
        // Descending priority, stable (file order) within a priority.
        ns.rules.sort_by_key(|r| core::cmp::Reverse(r.priority));
        ns.answer_rules
            .sort_by_key(|r| core::cmp::Reverse(r.priority));
        let mut answer = crate::set::AnswerReads::default();
        for r in &ns.answer_rules {
            r.cond.visit_fields(&mut |f| {
                answer.entities |= *f == FieldRef::ResponseEntities;
                answer.fields.push(f.clone());
            });
            #[cfg(feature = "cel")]
            if let crate::condition::Cond::Cel(p) = &r.cond {
                answer.cel.extend(p.reads().iter().cloned());
            }
        }
        answer.fields.sort();
        answer.fields.dedup();
        answer.cel.sort();
        answer.cel.dedup();
        ns.answer_reads = answer;
        let (errors, warnings) = lint::lint(&ns.rules);
        self.errors.extend(errors);
        self.warnings.extend(warnings);
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
                if let crate::condition::Cond::Cel(p) = &r.cond {
                    cel_reads.extend(p.reads().iter().cloned());
                }
            }
            cel_reads.sort();
            cel_reads.dedup();
            ns.cel_reads = cel_reads;
        }
        ns.index = RuleIndex::build(ns.rules.iter().map(CompiledRule::index_cond));
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
    let mut needs = Needs::NONE;
    for ns in namespaces {
        needs = needs.union(Needs::reading(&ns.reads));
        for r in &ns.rules {
            let counts_tokens = r
                .action
                .limit
                .as_ref()
                .is_some_and(|l| l.kind != CounterKind::Requests);
            needs.prompt |= counts_tokens;
            // A plugin may read any text; its estimate is made on demand
            // (`RequestInfo::prompt_tokens`), never for every request. The scans a plugin's
            // manifest reads are the host's to add ([`PolicySet::plugins`]): the set does not
            // know what the plugins a host loads declare.
            if r.plugin.is_some() {
                needs.messages = true;
                needs.prompt = true;
                needs.folded = true;
            }
        }
    }
    needs
}

/// Diagnostics of one rule at JSON pointers below it.
pub(crate) struct RuleSite<'d> {
    pub doc: &'d Document,
    pub file: &'d str,
    pub pointer: &'d str,
    pub id: &'d str,
}

impl RuleSite<'_> {
    pub(crate) fn at(&self, ptr: &str) -> Option<crate::diagnostic::Position> {
        self.doc.position(&format!("{}{ptr}", self.pointer))
    }
    pub(crate) fn error(&self, code: Code, ptr: &str, message: impl Into<String>) -> Diagnostic {
        Diagnostic::error(code, message)
            .at(self.file, self.at(ptr))
            .rule(Some(self.id))
    }
    pub(crate) fn warning(&self, code: Code, ptr: &str, message: impl Into<String>) -> Diagnostic {
        Diagnostic::warning(code, message)
            .at(self.file, self.at(ptr))
            .rule(Some(self.id))
    }
}
