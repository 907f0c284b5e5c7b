//! Running the candidate rules: each rule's condition (or plugin), then its counter, as far as
//! the core can go; what only the host can answer becomes a [`Need`].

use alloc::string::String;
use alloc::vec::Vec;

use super::key::charge;
use super::resolve;
use super::select;
use super::{
    Answer, CounterCheck, EvalOptions, Hooks, Need, NeedId, NeedKind, Outcome, Part, Pending,
    PluginCheck, Step, Timing,
};
use crate::context::{RequestContext, View};
use crate::decision::{Charge, Verdict};
use crate::model::{OnError, PluginRef, Scope};
use crate::set::{CompiledRule, Namespace, PolicySet};
use crate::truth::Scratch;

/// A clock for `evaluation_time_us` (none without `std`, or when [`Timing::Skipped`]).
struct Timer {
    #[cfg(feature = "std")]
    start: Option<std::time::Instant>,
}

impl Timer {
    fn start(timing: Timing) -> Timer {
        #[cfg(not(feature = "std"))]
        let _ = timing;
        Timer {
            #[cfg(feature = "std")]
            start: (timing == Timing::Measured).then(std::time::Instant::now),
        }
    }
    fn micros(&self) -> u64 {
        #[cfg(feature = "std")]
        {
            self.start.map_or(0, |start| {
                u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
            })
        }
        #[cfg(not(feature = "std"))]
        {
            0
        }
    }
}

/// Who answers plugins and counters while rules run.
pub(super) enum Host<'h> {
    /// The host answers later: needs are collected (two-phase form).
    Later(Vec<Need>),
    /// The host answers at once (callback form); `ctx` is the request evaluated.
    Now {
        hooks: &'h mut dyn Hooks,
        ctx: &'h RequestContext,
    },
}

impl Host<'_> {
    /// Asks the host: at once (`Ok`), or later (`Err` with the need's id).
    fn ask<T>(
        &mut self,
        rule: &CompiledRule,
        part: usize,
        need: impl FnOnce() -> NeedKind,
        now: impl FnOnce(&mut dyn Hooks, &RequestContext) -> T,
    ) -> Result<T, NeedId> {
        match self {
            Host::Later(needs) => Err(push_need(needs, rule, part, need())),
            Host::Now { hooks, ctx } => Ok(now(&mut **hooks, ctx)),
        }
    }

    fn plugin(
        &mut self,
        rule: &CompiledRule,
        plugin: &PluginRef,
        part: usize,
    ) -> Result<PluginCheck, NeedId> {
        let need = || NeedKind::Plugin(plugin.clone());
        self.ask(rule, part, need, |hooks, ctx| {
            match part.checked_sub(1).and_then(|i| ctx.batch_item(i)) {
                Some(item) => hooks.plugin(&rule.id, plugin, &item),
                None => hooks.plugin(&rule.id, plugin, ctx),
            }
        })
    }

    fn counter(
        &mut self,
        rule: &CompiledRule,
        charge: &Charge,
        part: usize,
    ) -> Result<CounterCheck, NeedId> {
        let need = || NeedKind::Counter(charge.clone());
        self.ask(rule, part, need, |hooks, _| hooks.counter(charge))
    }

    fn into_needs(self) -> Vec<Need> {
        match self {
            Host::Later(needs) => needs,
            Host::Now { .. } => Vec::new(),
        }
    }
}

/// Evaluates as far as `host` lets: with [`Host::Now`] always to a decision.
pub(super) fn start(
    set: &PolicySet,
    ctx: &RequestContext,
    opts: &EvalOptions<'_>,
    mut host: Host<'_>,
) -> Step {
    let timer = Timer::start(opts.timing);
    let mut tags: Vec<String> = opts.tags.to_vec();
    tags.sort();
    tags.dedup();
    let Some(ns) = set.0.namespaces.get(ctx.namespace.as_str()) else {
        let mut d = resolve::no_namespace(set, ctx, &tags, opts.explain, opts.cache_key.given());
        d.evaluation_time_us = timer.micros();
        return Step::Done(d);
    };
    let mut views = ctx.views();
    let Some(first) = views.next() else {
        return Step::Done(resolve::no_namespace(
            set,
            ctx,
            &tags,
            opts.explain,
            opts.cache_key.given(),
        ));
    };
    let first = run_part(ns, first, 0, &tags, opts.explain, &mut host);
    let needs_nothing = |host: &Host<'_>| !matches!(host, Host::Later(needs) if !needs.is_empty());
    if ctx.batch.is_empty() && needs_nothing(&host) {
        // The common case: one request, decided at once; nothing else to build.
        let mut d = resolve::decide(
            set,
            ns,
            ctx,
            core::slice::from_ref(&first),
            &tags,
            opts.explain,
            opts.cache_key.given(),
        );
        d.evaluation_time_us = timer.micros();
        return Step::Done(d);
    }
    let mut parts = Vec::with_capacity(ctx.batch.len().saturating_add(1));
    parts.push(first);
    for (i, view) in views.enumerate() {
        parts.push(run_part(
            ns,
            view,
            i.saturating_add(1),
            &tags,
            opts.explain,
            &mut host,
        ));
    }
    let needs = host.into_needs();
    if needs.is_empty() {
        let mut d = resolve::decide(
            set,
            ns,
            ctx,
            &parts,
            &tags,
            opts.explain,
            opts.cache_key.given(),
        );
        d.evaluation_time_us = timer.micros();
        return Step::Done(d);
    }
    Step::Pending(Pending {
        set: set.clone(),
        namespace: ns.name.clone(),
        tags,
        explain: opts.explain,
        cache_key: opts.cache_key.given().map(String::from),
        timing: opts.timing,
        parts,
        answers: alloc::vec![None; needs.len()],
        needs,
        elapsed_us: timer.micros(),
    })
}

pub(super) fn resume(mut p: Pending, ctx: &RequestContext) -> Step {
    let timer = Timer::start(p.timing);
    let set = p.set.clone();
    let Some(ns) = set.0.namespaces.get(p.namespace.as_str()) else {
        // A pending state always names a namespace of its own set; nothing to resume otherwise.
        let mut d = resolve::no_namespace(&set, ctx, &p.tags, p.explain, p.cache_key.as_deref());
        d.evaluation_time_us = p.elapsed_us.saturating_add(timer.micros());
        return Step::Done(d);
    };
    let answers = core::mem::take(&mut p.answers);
    let answer = |id: &NeedId| answers.get(id.0 as usize).cloned().flatten();
    let mut host = Host::Later(Vec::new());
    let views: Vec<View<'_>> = ctx.views().collect();
    for (
        part,
        Part {
            outcomes,
            cap,
            fitted,
            ..
        },
    ) in p.parts.iter_mut().enumerate()
    {
        let Some(view) = views.get(part).copied() else {
            continue;
        };
        for (pos, outcome) in outcomes.iter_mut() {
            let Some(rule) = ns.rules.get(*pos as usize) else {
                continue;
            };
            let next = match &*outcome {
                Outcome::WaitPlugin(id) => {
                    let check = match answer(id) {
                        Some(Answer::Plugin(c)) => c,
                        _ => PluginCheck::Unavailable,
                    };
                    let at = At {
                        part,
                        cap: *cap,
                        lowerable: part == 0 && crate::rewrite::lowers(view.req.api),
                    };
                    plugin_outcome(check, rule, ns, view, &mut host, at, fitted)
                }
                Outcome::WaitCounter(id, charge) => {
                    let state = match answer(id) {
                        Some(Answer::Counter(c)) => c,
                        _ => CounterCheck::Unknown,
                    };
                    counter_outcome(state, charge.clone(), fitted)
                }
                _ => continue,
            };
            *outcome = next;
        }
    }
    let needs = host.into_needs();
    p.answers = alloc::vec![None; needs.len()];
    p.needs = needs;
    finish(p, ctx, timer)
}

/// Runs the candidate rules of one view (`part` 0: the request; `i + 1`: batch item `i`).
fn run_part(
    ns: &Namespace,
    view: View<'_>,
    part: usize,
    tags: &[String],
    explain: bool,
    host: &mut Host<'_>,
) -> Part {
    let (candidates, left_out) = select::candidates(ns, view, tags, explain);
    let mut scratch = Scratch {
        #[cfg(feature = "cel")]
        cel_reads: &ns.cel_reads,
        ..Scratch::default()
    };
    let mut outcomes: Vec<(u32, Outcome)> = Vec::new();
    if explain {
        outcomes.extend(left_out.into_iter().map(|i| (i, Outcome::NotSelected)));
    }
    // Only the request itself, of an API whose body can be lowered, is charged lowered.
    let lowerable = part == 0 && crate::rewrite::lowers(view.req.api);
    let cap = fixed_cap(ns, &candidates, view, &mut scratch).filter(|_| lowerable);
    // Whether a cap lowers the request depends on its own cap, which the cache key does not
    // read: a capped decision is not cached.
    let mut cacheable = cap.is_none();
    let mut fitted = None;
    let at = At {
        part,
        cap,
        lowerable,
    };
    // The priority of the first (highest) rule that denied or throttled without the host: rules
    // below it cannot change the verdict, so their plugins and counters are not asked for.
    let mut floor: Option<i64> = None;
    for i in candidates {
        let Some(rule) = ns.rules.get(i as usize) else {
            continue;
        };
        cacheable &= !rule.volatile;
        let below = floor.is_some_and(|f| rule.priority < f);
        let outcome = run_rule(rule, ns, view, &mut scratch, host, at, below, &mut fitted);
        if floor.is_none() && stops(rule, &outcome) {
            floor = Some(rule.priority);
        }
        // A counter was (or would be) consulted: the next identical request may decide
        // differently.
        cacheable &= rule.action.limit.is_none()
            || matches!(outcome, Outcome::NotMatched | Outcome::Skipped);
        // Most candidates do not match: keeping them only costs memory (a batch has many
        // parts), unless they are to be explained.
        if outcome != Outcome::NotMatched || explain {
            outcomes.push((i, outcome));
        }
    }
    if explain {
        outcomes.sort_by_key(|(i, _)| *i);
    }
    Part {
        outcomes,
        cacheable,
        cap,
        fitted,
    }
}

/// The lowest fixed `transform.maxTokens` among the enforcing candidates that match: known
/// before any counter is charged, so counters charge for the lowered request.
fn fixed_cap<'a>(
    ns: &Namespace,
    candidates: &[u32],
    view: View<'a>,
    scratch: &mut Scratch<'a>,
) -> Option<u64> {
    if !ns.caps {
        return None;
    }
    candidates
        .iter()
        .filter_map(|i| ns.rules.get(*i as usize))
        .filter(|r| !r.shadow)
        .filter_map(|r| Some((r.action.cap?, r)))
        .filter(|(_, r)| matches!(r.cond.eval(view, scratch), Ok(true)))
        .map(|(cap, _)| cap)
        .min()
}

/// Where a rule runs: which part, with which fixed output cap, and whether its body can be
/// lowered (`fitBudget` applies).
#[derive(Clone, Copy)]
struct At {
    part: usize,
    cap: Option<u64>,
    lowerable: bool,
}

fn finish(mut p: Pending, ctx: &RequestContext, timer: Timer) -> Step {
    if !p.needs.is_empty() {
        p.elapsed_us = p.elapsed_us.saturating_add(timer.micros());
        return Step::Pending(p);
    }
    let set = p.set.clone();
    let mut d = match set.0.namespaces.get(p.namespace.as_str()) {
        Some(ns) => resolve::decide(
            &set,
            ns,
            ctx,
            &p.parts,
            &p.tags,
            p.explain,
            p.cache_key.as_deref(),
        ),
        None => resolve::no_namespace(&set, ctx, &p.tags, p.explain, p.cache_key.as_deref()),
    };
    d.evaluation_time_us = p.elapsed_us.saturating_add(timer.micros());
    Step::Done(d)
}

/// Whether an outcome denies or throttles the request whatever lower rules say, decided without
/// the host (so both evaluation forms skip the same rules).
fn stops(rule: &CompiledRule, outcome: &Outcome) -> bool {
    if rule.shadow {
        return false;
    }
    match outcome {
        Outcome::Matched(None) => rule.plugin.is_none() && rule.action.decision != Verdict::Allow,
        Outcome::Error(_) => rule.plugin.is_none() && rule.on_error == OnError::Deny,
        _ => false,
    }
}

/// Runs one rule as far as the host lets: its condition (or its plugin), then its counter.
/// `below` a rule that already denied or throttled, nothing is asked of the host.
#[allow(
    clippy::too_many_arguments,
    reason = "one rule's run: the rule, where it runs, and what it may change"
)]
fn run_rule<'a>(
    rule: &CompiledRule,
    ns: &Namespace,
    view: View<'a>,
    scratch: &mut Scratch<'a>,
    host: &mut Host<'_>,
    at: At,
    below: bool,
    fitted: &mut Option<u64>,
) -> Outcome {
    if let Some(plugin) = &rule.plugin {
        if below {
            return Outcome::Skipped;
        }
        return match host.plugin(rule, plugin, at.part) {
            Ok(check) => plugin_outcome(check, rule, ns, view, host, at, fitted),
            Err(id) => Outcome::WaitPlugin(id),
        };
    }
    match rule.cond.eval(view, scratch) {
        Err(e) => Outcome::Error(crate::truth::clip(e.0)),
        Ok(false) => Outcome::NotMatched,
        Ok(true) if below && rule.action.limit.is_some() && !rule.shadow => Outcome::Skipped,
        Ok(true) => after_match(rule, ns, view, host, at, fitted),
    }
}

fn plugin_outcome(
    check: PluginCheck,
    rule: &CompiledRule,
    ns: &Namespace,
    view: View<'_>,
    host: &mut Host<'_>,
    at: At,
    fitted: &mut Option<u64>,
) -> Outcome {
    match check {
        PluginCheck::Matched(true) => after_match(rule, ns, view, host, at, fitted),
        PluginCheck::Matched(false) => Outcome::NotMatched,
        PluginCheck::Error(e) => Outcome::Error(crate::truth::clip(e)),
        PluginCheck::Unavailable => Outcome::Remote(None),
    }
}

fn push_need(needs: &mut Vec<Need>, rule: &CompiledRule, part: usize, kind: NeedKind) -> NeedId {
    let id = NeedId(u32::try_from(needs.len()).unwrap_or(u32::MAX));
    needs.push(Need {
        id,
        rule: rule.id.clone(),
        batch_item: part.checked_sub(1),
        kind,
    });
    id
}

/// A matched rule: done, unless it is limited (then its counter is needed).
fn after_match(
    rule: &CompiledRule,
    ns: &Namespace,
    view: View<'_>,
    host: &mut Host<'_>,
    at: At,
    fitted: &mut Option<u64>,
) -> Outcome {
    let Some(limit) = &rule.action.limit else {
        return Outcome::Matched(None);
    };
    if rule.shadow {
        return Outcome::Matched(None);
    }
    let charge = charge(rule, ns, limit, view, at.cap, at.lowerable);
    match host.counter(rule, &charge, at.part) {
        Ok(state) => counter_outcome(state, charge, fitted),
        Err(id) => Outcome::WaitCounter(id, charge),
    }
}

/// A counter's answer as the rule's outcome; a `fitBudget` answer lowers the part's output cap.
fn counter_outcome(state: CounterCheck, charge: Charge, fitted: &mut Option<u64>) -> Outcome {
    match state {
        CounterCheck::Over => Outcome::Matched(Some(charge)),
        CounterCheck::Under => Outcome::UnderLimit(charge),
        CounterCheck::Fit(output) if charge.fit.is_some() => {
            // Never raised above what was counted.
            let output = output.min(charge.output);
            *fitted = Some(fitted.map_or(output, |f| f.min(output)));
            let amount = charge.amount_with_output(output);
            Outcome::UnderLimit(Charge {
                amount,
                output,
                ..charge
            })
        }
        // A host that lowers a counter its rule does not let lower: over.
        CounterCheck::Fit(_) => Outcome::Matched(Some(charge)),
        CounterCheck::Unknown if charge.scope == Scope::Global => Outcome::Remote(Some(charge)),
        CounterCheck::Unknown => Outcome::UnderLimit(charge),
    }
}
