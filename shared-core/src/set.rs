//! The compiled form: an immutable [`PolicySet`] of namespaces and rules, apart from the compiler
//! that builds it (`compile`) and the evaluator that reads it (`eval`). Every rule keeps where it
//! was written ([`Origin`]), for audit records and reload errors.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use hashbrown::HashMap;

use crate::condition::Cond;
use crate::context::{ContextConfig, Needs};
use crate::decision::{ChargeSource, CounterKind, Verdict};
use crate::diagnostic::{Diagnostic, Position};
use crate::index::RuleIndex;
use crate::model::{Alert, OnError, PluginRef, Scope};
use crate::model_table::ModelTable;
use crate::schema::FieldRef;

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
    /// The plugins enabled rules call, by name (sorted, once each).
    pub plugins: Vec<String>,
    pub models: Arc<ModelTable>,
}

pub(crate) struct PolicyInfo {
    pub name: String,
    pub version: String,
}

/// The rules of every policy in one namespace, evaluated together.
pub(crate) struct Namespace {
    pub name: String,
    pub policies: Vec<PolicyInfo>,
    /// Every policy name, comma-separated (what a default decision reports), and their versions.
    pub policy_names: String,
    pub policy_versions: String,
    pub default: Verdict,
    /// Enabled rules, by descending priority (file order within a priority).
    pub rules: Vec<CompiledRule>,
    /// Disabled rules (id, priority), reported by explain.
    pub disabled: Vec<(String, i64)>,
    pub index: RuleIndex,
    /// Every field any rule of the namespace reads (cache key input), sorted.
    pub reads: Vec<FieldRef>,
    /// The fields its interpreted CEL programs read (what the CEL activation must hold).
    #[cfg_attr(
        not(feature = "cel"),
        allow(dead_code, reason = "only the CEL activation reads it")
    )]
    pub cel_reads: Vec<FieldRef>,
    /// Tag → bitset over `rules`.
    pub tags: HashMap<String, Vec<u64>>,
    /// The model table token and cost charges are priced with.
    pub models: Arc<ModelTable>,
    /// Some rule counts tokens or cost.
    pub counts_tokens: bool,
    /// A decision cache pays ([`PolicySet::caching_pays`]).
    pub caching_pays: bool,
    /// Some enforcing rule sets a fixed `transform.maxTokens`.
    pub caps: bool,
    /// The `phase: response` rules, by descending priority (file order within a priority).
    pub answer_rules: Vec<CompiledRule>,
    /// What they read: the fields their interpreted CEL programs read, the headers they name,
    /// and whether they read `response.entities`.
    pub answer_reads: AnswerReads,
}

/// What the `phase: response` rules of a namespace read.
#[derive(Default)]
pub(crate) struct AnswerReads {
    #[cfg_attr(
        not(feature = "cel"),
        allow(dead_code, reason = "only the CEL activation reads it")
    )]
    pub cel: Vec<FieldRef>,
    /// Every field they read (what [`crate::context::RequestContext::for_answer`] keeps).
    pub fields: Vec<FieldRef>,
    pub entities: bool,
}

/// Where a rule was written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    /// The file (as given to the loader).
    pub file: String,
    /// Line and column of the rule's `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<Position>,
    /// The policy (`metadata.name`).
    pub policy: String,
}

impl Origin {
    /// A diagnostic placed at this rule.
    pub(crate) fn locate(&self, d: Diagnostic, rule: &str) -> Diagnostic {
        d.at(&self.file, self.position).rule(Some(rule))
    }
}

pub(crate) struct CompiledRule {
    pub id: String,
    pub origin: Origin,
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
    /// Reads time or uses a plugin: decisions it was run for are not cached. (A rate limit or
    /// budget makes a decision uncacheable only when its condition matched: only then is the
    /// counter consulted.)
    pub volatile: bool,
}

impl CompiledRule {
    /// The condition the index selects this rule by (`None`: always a candidate).
    pub(crate) fn index_cond(&self) -> Option<&Cond> {
        if self.plugin.is_some() {
            return None;
        }
        Some(self.index_hint.as_ref().unwrap_or(&self.cond))
    }

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

pub(crate) struct CompiledAction {
    pub decision: Verdict,
    pub reason: String,
    pub status: Option<u16>,
    pub headers: BTreeMap<String, String>,
    pub audit: bool,
    pub alert: Option<Alert>,
    pub limit: Option<Limit>,
    /// `transform: {maxTokens: N}`: the output cap of every request this rule allows.
    pub cap: Option<u64>,
    /// `transform: {maxTokens: fitBudget}`: the smallest output the budget may lower a request
    /// to, instead of throttling it.
    pub fit: Option<u64>,
    /// `transform: {redact: [...], restore}`: the kinds replaced in the requests this rule allows.
    pub redact: Option<Redact>,
}

/// A rule's `transform.redact`: what is replaced by placeholders, and whether put back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Redact {
    /// The kinds replaced.
    pub kinds: crate::detect::Entities,
    /// `restore: true`.
    pub restore: bool,
}

/// A rate limit or budget of a rule.
pub(crate) struct Limit {
    pub source: ChargeSource,
    pub key: Vec<KeyPart>,
    pub kind: CounterKind,
    pub limit: f64,
    pub window_secs: u64,
    pub scope: Scope,
    /// `remainingHeaders`: allowed requests are told what is left.
    pub headers: bool,
}

pub(crate) enum KeyPart {
    Text(String),
    Field(FieldRef),
}

impl Namespace {
    pub(crate) fn new(name: &str, models: Arc<ModelTable>) -> Namespace {
        Namespace {
            name: String::from(name),
            policies: Vec::new(),
            policy_names: String::new(),
            policy_versions: String::new(),
            default: Verdict::Allow,
            rules: Vec::new(),
            disabled: Vec::new(),
            index: RuleIndex::default(),
            reads: Vec::new(),
            cel_reads: Vec::new(),
            tags: HashMap::new(),
            models,
            counts_tokens: false,
            caching_pays: false,
            caps: false,
            answer_rules: Vec::new(),
            answer_reads: AnswerReads::default(),
        }
    }
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

/// A rule as the set holds it (for listings and audit records).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    /// Namespace.
    pub namespace: String,
    /// Rule id.
    pub id: String,
    /// Priority.
    pub priority: i64,
    /// Where it was written.
    pub origin: Origin,
}

impl PolicySet {
    /// The context configuration the set was compiled against (use it to build contexts).
    pub fn config(&self) -> &ContextConfig {
        &self.0.config
    }

    /// The model table charges are priced with: the context configuration's `models`, else the
    /// shipped table.
    pub fn models(&self) -> Arc<ModelTable> {
        self.0.models.clone()
    }

    /// Which expensive context parts some rule reads (pass to
    /// [`crate::RequestContext::from_request_with`]).
    pub fn needs(&self) -> Needs {
        self.0.needs
    }

    /// The plugins enabled rules call, by name (sorted, once each). [`PolicySet::needs`] holds
    /// the text a plugin may read, but not the scans: the host adds those its plugins' manifests
    /// read ([`Needs::reading`]), since only it knows what the plugins it loaded declare.
    pub fn plugins(&self) -> &[String] {
        &self.0.plugins
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

    /// Every field `namespace`'s rules read (sorted; empty for a namespace the bundle lacks):
    /// what a decision there can depend on.
    pub fn reads(&self, namespace: &str) -> &[FieldRef] {
        self.0
            .namespaces
            .get(namespace)
            .map_or(&[], |ns| ns.reads.as_slice())
    }

    /// Whether the bundle has a policy for `namespace`.
    pub fn has_namespace(&self, namespace: &str) -> bool {
        self.0.namespaces.contains_key(namespace)
    }

    /// Whether some rule of `namespace` counts tokens or cost (a token rate limit or budget):
    /// only its requests need a prompt estimate, a reservation's model and an answer's usage.
    pub fn counts_tokens(&self, namespace: &str) -> bool {
        self.0
            .namespaces
            .get(namespace)
            .is_some_and(|ns| ns.counts_tokens)
    }

    /// Whether caching the namespace's decisions pays: its rules read the prompt's text
    /// (`request.prompt`, `prompt_folded`, `messages`) or the prompt scanners' findings, whose
    /// evaluation costs per byte of the prompt. A decision over other fields (model, tokens,
    /// headers, principal, ...) costs less than its key, a BLAKE3 of them: `make bench-filter`
    /// measured a cache hit there no faster than a miss, so the filter keys and caches only
    /// these namespaces. (The server caches every namespace: its cache also spares plugin calls
    /// and Redis round trips, and is shared through Redis.)
    pub fn caching_pays(&self, namespace: &str) -> bool {
        self.0
            .namespaces
            .get(namespace)
            .is_some_and(|ns| ns.caching_pays)
    }

    /// Number of enabled rules over all namespaces.
    pub fn rule_count(&self) -> usize {
        self.0.namespaces.values().map(|n| n.rules.len()).sum()
    }

    /// An enabled rule of a namespace, with where it was written.
    pub fn rule(&self, namespace: &str, id: &str) -> Option<RuleInfo> {
        let ns = self.0.namespaces.get(namespace)?;
        let r = ns.rules.iter().find(|r| r.id == id)?;
        Some(RuleInfo {
            namespace: ns.name.clone(),
            id: r.id.clone(),
            priority: r.priority,
            origin: r.origin.clone(),
        })
    }

    /// Every enabled rule with a plugin condition, with its plugin reference (a host checks
    /// them against the plugins it has loaded).
    pub fn plugin_rules(&self) -> Vec<(RuleInfo, PluginRef)> {
        let mut out = Vec::new();
        for ns in self.0.namespaces.values() {
            for r in &ns.rules {
                if let Some(p) = &r.plugin {
                    out.push((
                        RuleInfo {
                            namespace: ns.name.clone(),
                            id: r.id.clone(),
                            priority: r.priority,
                            origin: r.origin.clone(),
                        },
                        p.clone(),
                    ));
                }
            }
        }
        out
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
