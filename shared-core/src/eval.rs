//! Evaluation: select candidate rules ([`select`]), run them ([`run`]), resolve every match into
//! one decision ([`resolve`]). Highest-priority enforcing match decides (ties: deny > throttle >
//! allow); headers, audit and alert of all enforcing matches merge; shadow matches are reported
//! only; the namespace default applies when nothing enforcing matched.
//!
//! What the core cannot do alone (WASM plugins, counters for rate limits and budgets) is asked
//! of the host, in one of two forms that decide the same:
//!
//! - **Two-phase** ([`PolicySet::start`] → [`Step::Pending`] → [`Pending::answer`] →
//!   [`Pending::resume`]): synchronous and `no_std`, for hosts whose answers arrive later (an
//!   async server awaiting Redis, a proxy-wasm filter waiting for a callout). The pending state
//!   lists exactly what is needed and keeps the policy set it started with.
//! - **Callbacks** ([`PolicySet::evaluate`] with [`Hooks`]): the host answers on the spot;
//!   [`LocalOnly`] answers "unavailable", and the decision then names the rules the server must
//!   finish (`metadata.needs_remote`).
//!
//! A batch request (`request.api == "batch"`) is evaluated once for the batch and once per item;
//! the strictest verdict wins.

use alloc::borrow::Cow;
use alloc::string::String;
use alloc::vec::Vec;

use crate::context::RequestContext;
use crate::decision::{Charge, Decision};
use crate::model::PluginRef;
use crate::set::PolicySet;

mod key;
mod resolve;
mod run;
mod select;

/// Options of one evaluation.
#[derive(Debug, Clone, Copy, Default)]
pub struct EvalOptions<'a> {
    /// Only rules carrying at least one of these tags (all rules when empty).
    pub tags: &'a [String],
    /// Report every rule's outcome in `explain`.
    pub explain: bool,
    /// What `metadata.cache_key` holds.
    pub cache_key: DecisionKey<'a>,
    /// Whether the clock is read for `metadata.evaluation_time_us`.
    pub timing: Timing,
}

/// Whether an evaluation reads the clock for its decision's `metadata.evaluation_time_us`
/// ([`EvalOptions::timing`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Timing {
    /// Read at the start and at the end of each evaluation (and of each resumption).
    #[default]
    Measured,
    /// Never read; `evaluation_time_us` is 0. For a host that times decisions itself, or only a
    /// sample of them: in the filter each reading of the clock is a call out of the VM.
    Skipped,
}

/// What a decision's `metadata.cache_key` holds ([`EvalOptions::cache_key`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DecisionKey<'a> {
    /// The key, computed.
    #[default]
    Computed,
    /// The key the host computed for this request with the same options
    /// ([`PolicySet::cache_key_before_scans`]): written as it is, not hashed again.
    Known(&'a str),
    /// Nothing (an empty string), not computed, and the decision is not `cacheable`: the host
    /// caches no decision of this request's namespace ([`PolicySet::caching_pays`]).
    Unwanted,
}

impl<'a> DecisionKey<'a> {
    /// The key to write as it is (`None`: to compute).
    pub(crate) fn given(self) -> Option<&'a str> {
        match self {
            DecisionKey::Computed => None,
            DecisionKey::Known(k) => Some(k),
            DecisionKey::Unwanted => Some(""),
        }
    }
}

/// A plugin condition's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginCheck {
    /// The plugin ran.
    Matched(bool),
    /// The plugin failed (the rule's `onError` applies).
    Error(String),
    /// Plugins cannot run here; the server must evaluate the rule.
    Unavailable,
}

/// The state of a counter after a match charged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterCheck {
    /// Within the limit: the rule's action does not apply.
    Under,
    /// Over the limit: the rule's action applies.
    Over,
    /// Within the limit once the request's output cap is lowered to this many tokens (a
    /// `fitBudget` rule): the rule's action does not apply, the request goes ahead lowered.
    Fit(u64),
    /// Not counted here (a global counter then needs the server; a local one counts as under).
    Unknown,
}

/// What the core asks of its host, answered on the spot.
pub trait Hooks {
    /// Evaluates a plugin condition (`ctx` is the request, or the batch item the rule runs on).
    fn plugin(&mut self, rule: &str, plugin: &PluginRef, ctx: &RequestContext) -> PluginCheck;
    /// Checks (and, for a server, reserves) a counter.
    fn counter(&mut self, charge: &Charge) -> CounterCheck;
}

/// No plugins, no counters: what the CLI and a filter without a server can do.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalOnly;

impl Hooks for LocalOnly {
    fn plugin(&mut self, _: &str, _: &PluginRef, _: &RequestContext) -> PluginCheck {
        PluginCheck::Unavailable
    }
    fn counter(&mut self, _: &Charge) -> CounterCheck {
        CounterCheck::Unknown
    }
}

/// One thing the evaluation needs from the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Need {
    /// Pass back to [`Pending::answer`].
    pub id: NeedId,
    /// The rule asking.
    pub rule: String,
    /// `None`: the request itself; `Some(i)`: batch item `i` (see
    /// [`RequestContext::batch_item`]).
    pub batch_item: Option<usize>,
    /// What is needed.
    pub kind: NeedKind,
}

/// The id of a [`Need`] within its evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NeedId(pub(crate) u32);

/// What a [`Need`] asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum NeedKind {
    /// Run this plugin condition on the request (or batch item).
    Plugin(PluginRef),
    /// Check (and reserve) this counter: the rule's condition matched and the rule is limited.
    Counter(Charge),
}

/// The answer to a [`Need`].
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// For [`NeedKind::Plugin`].
    Plugin(PluginCheck),
    /// For [`NeedKind::Counter`].
    Counter(CounterCheck),
}

/// How one rule fared.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Left out by the requested tags.
    NotSelected,
    /// Matched; with the charge when a counter was over its limit.
    Matched(Option<Charge>),
    NotMatched,
    /// The condition failed (the rule's `onError` applies).
    Error(String),
    /// Left to the server: a plugin that could not run here, or a global counter not counted
    /// here (with its charge).
    Remote(Option<Charge>),
    /// Matched, but its counter is within the limit: the action does not apply.
    UnderLimit(Charge),
    /// Waiting for the host to run the rule's plugin.
    WaitPlugin(NeedId),
    /// Waiting for the host to check the rule's counter.
    WaitCounter(NeedId, Charge),
    /// Matched (or a plugin rule), but below a rule that already denied or throttled without
    /// the host: its plugin or counter could not change the verdict, so it was not asked for.
    Skipped,
}

/// The outcomes of the rules run on one view (the request, or one batch item).
#[derive(Debug)]
pub(crate) struct Part {
    /// Rule positions with their outcomes, ascending; rules that did not match are left out
    /// (unless explaining).
    pub outcomes: Vec<(u32, Outcome)>,
    /// No rule run reads time, uses a plugin or a counter.
    pub cacheable: bool,
    /// The lowest fixed `transform.maxTokens` of the enforcing rules that matched (known before
    /// any counter is charged: such rules use no plugin or counter).
    pub cap: Option<u64>,
    /// The lowest output cap a `fitBudget` counter was answered with.
    pub fitted: Option<u64>,
}

impl Part {
    /// The output cap this part's request goes ahead with, if lowered.
    pub(crate) fn lowered(&self) -> Option<u64> {
        match (self.cap, self.fitted) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The result of [`PolicySet::start`] or [`Pending::resume`].
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "moved once per request; boxing would add an allocation to every decision"
)]
pub enum Step {
    /// The decision.
    Done(Decision),
    /// The host must answer [`Pending::needs`], then [`Pending::resume`].
    Pending(Pending),
}

/// An evaluation waiting for its host's answers. `Send`, so an async host can hold it across
/// awaits; it keeps the [`PolicySet`] it started with (a reload in between does not change it).
#[derive(Debug)]
pub struct Pending {
    pub(crate) set: PolicySet,
    pub(crate) namespace: String,
    pub(crate) tags: Vec<String>,
    pub(crate) explain: bool,
    /// The key the host computed ([`EvalOptions::cache_key`]).
    pub(crate) cache_key: Option<String>,
    /// Whether the resumption reads the clock ([`EvalOptions::timing`]).
    pub(crate) timing: Timing,
    /// One per view: the request, then each batch item.
    pub(crate) parts: Vec<Part>,
    pub(crate) needs: Vec<Need>,
    pub(crate) answers: Vec<Option<Answer>>,
    /// Time spent in the core so far (not waiting for the host).
    pub(crate) elapsed_us: u64,
}

impl Pending {
    /// What the host must answer before [`Pending::resume`].
    pub fn needs(&self) -> &[Need] {
        &self.needs
    }

    /// Records the answer to one need. An unanswered need counts as unavailable (a plugin rule
    /// or global counter is then left to the server, `metadata.needs_remote`); an answer of the
    /// wrong kind likewise.
    pub fn answer(&mut self, id: NeedId, answer: Answer) {
        if let Some(slot) = self.answers.get_mut(id.0 as usize) {
            *slot = Some(answer);
        }
    }

    /// Continues with the answers given; `ctx` must be the context the evaluation started with.
    /// Either decides, or (after a plugin matched on a rule with a rate limit or budget) asks
    /// for that counter.
    pub fn resume(self, ctx: &RequestContext) -> Step {
        run::resume(self, &scanned(ctx))
    }
}

/// `ctx` with its prompt scans run: a context taken from
/// [`crate::prompt_scan::Unscanned::before_scans`] is never evaluated with empty findings.
/// (Hosts scan before evaluating; this copies only when one did not.)
fn scanned(ctx: &RequestContext) -> Cow<'_, RequestContext> {
    if ctx.scans_pending() {
        Cow::Owned(crate::prompt_scan::Unscanned::new(ctx.clone()).scan())
    } else {
        Cow::Borrowed(ctx)
    }
}

impl PolicySet {
    /// Starts evaluating one request: decides at once when no rule needs the host, else returns
    /// what is needed. Never panics and never fails: condition errors follow each rule's
    /// `onError` and are reported in `metadata.errors`.
    pub fn start(&self, ctx: &RequestContext, opts: &EvalOptions<'_>) -> Step {
        run::start(self, &scanned(ctx), opts, run::Host::Later(Vec::new()))
    }

    /// The key [`Decision::metadata`]`.cache_key` of this request's decision will have, computed
    /// without evaluating and before the prompt scans ran (a hash of the bundle, namespace, tags
    /// and the values of the fields the namespace's rules read, the scanners' text in place of
    /// their results). A host caching decisions looks this up first and scans only on a miss;
    /// only decisions marked `cacheable` may be stored under it, and then the same key always
    /// gets the same decision.
    pub fn cache_key_before_scans(
        &self,
        ctx: &crate::prompt_scan::Unscanned,
        opts: &EvalOptions<'_>,
    ) -> String {
        self.cache_key(ctx.before_scans(), opts)
    }

    /// [`PolicySet::cache_key_before_scans`] of a context whose scans ran (the same key).
    pub fn cache_key(&self, ctx: &RequestContext, opts: &EvalOptions<'_>) -> String {
        let (name, reads): (&str, &[crate::schema::FieldRef]) =
            match self.0.namespaces.get(ctx.namespace.as_str()) {
                Some(ns) => (&ns.name, &ns.reads),
                None => (&ctx.namespace, &[]),
            };
        crate::cache_key::compute(&self.0.bundle, name, opts.tags, reads, ctx.views())
    }

    /// Evaluates one request, asking `hooks` for plugins and counters. Decides exactly as
    /// [`PolicySet::start`] / [`Pending::resume`] with the same answers.
    pub fn evaluate(
        &self,
        ctx: &RequestContext,
        opts: &EvalOptions<'_>,
        hooks: &mut dyn Hooks,
    ) -> Decision {
        let ctx = &*scanned(ctx);
        // The hooks answer as rules run: one pass, no pending state.
        let mut step = run::start(self, ctx, opts, run::Host::Now { hooks, ctx });
        loop {
            match step {
                Step::Done(d) => return d,
                Step::Pending(mut p) => {
                    let needs = p.needs.clone();
                    for need in needs {
                        let answer = match &need.kind {
                            NeedKind::Plugin(plugin) => {
                                let item;
                                let target = match need.batch_item.and_then(|i| ctx.batch_item(i)) {
                                    Some(c) => {
                                        item = c;
                                        &item
                                    }
                                    None => ctx,
                                };
                                Answer::Plugin(hooks.plugin(&need.rule, plugin, target))
                            }
                            NeedKind::Counter(charge) => Answer::Counter(hooks.counter(charge)),
                        };
                        p.answer(need.id, answer);
                    }
                    step = p.resume(ctx);
                }
            }
        }
    }
}
