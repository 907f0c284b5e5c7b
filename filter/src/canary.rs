//! A canary's candidate in the filter: the server's canary (`PUT /v1/canary`) comes with the
//! bundle sync; every sampled request the filter decides alone is decided again with it, after
//! the real decision and never enforced (no counter charged, plugin and global-counter rules not
//! compared: those decisions belong to the server, whose own canary sees them). A different
//! verdict is counted (`llm_policy.canary.disagreements`); the counts go back to the server with
//! the next syncs (`wire::SYNC_CANARY_HEADER`), which adds them to `GET /v1/canary`.

use std::cell::Cell;

use llm_policy_core::context::Needs;
use llm_policy_core::decision::Verdict;
use llm_policy_core::{
    wire, DecisionKey, EvalOptions, LocalOnly, PolicySet, RequestContext, Timing,
};

use crate::host::{Host, Metric};
use crate::sync::Candidate;

/// A candidate and what it counted in this VM.
#[derive(Debug)]
pub struct CanaryRun {
    set: PolicySet,
    bundle: String,
    sample: f64,
    vm: String,
    seen: Cell<u64>,
    evaluated: Cell<u64>,
    disagreements: Cell<u64>,
}

impl CanaryRun {
    /// A run of `candidate` in the VM `vm` (an id unique enough among a node's workers).
    pub fn new(candidate: Candidate, vm: String) -> CanaryRun {
        CanaryRun {
            set: candidate.set,
            bundle: candidate.bundle,
            sample: candidate.sample,
            vm,
            seen: Cell::new(0),
            evaluated: Cell::new(0),
            disagreements: Cell::new(0),
        }
    }

    /// Whether `candidate` is this run's (same bundle, same share): its counts carry on.
    pub fn runs(&self, candidate: &Candidate) -> bool {
        self.bundle == candidate.bundle && self.sample.to_bits() == candidate.sample.to_bits()
    }

    /// What the request context must hold for the bundle and the candidate both.
    pub fn needs(&self, bundle: Needs) -> Needs {
        bundle.union(self.set.needs())
    }

    /// Whether this request is decided again: every 1/sample-th, evenly (asked once per
    /// request, before its context is extracted: only a sampled request pays for what the
    /// candidate reads).
    pub fn sampled(&self) -> bool {
        let n = self.seen.get();
        self.seen.set(n.saturating_add(1));
        llm_policy_core::wire::canary_sampled(n, self.sample)
    }

    /// Decides a sampled request's `ctx` again and counts whether the candidate agrees with
    /// `active`.
    pub fn decide(&self, host: &mut dyn Host, ctx: &RequestContext, active: Verdict) {
        // (Only its verdict counts: no key, no clock.)
        let opts = EvalOptions {
            cache_key: DecisionKey::Unwanted,
            timing: Timing::Skipped,
            ..EvalOptions::default()
        };
        let d = self.set.evaluate(ctx, &opts, &mut LocalOnly);
        if d.metadata.needs_remote {
            return;
        }
        self.evaluated.set(self.evaluated.get().saturating_add(1));
        host.metric(Metric::CanaryEvaluations, 1);
        if d.decision != active {
            self.disagreements
                .set(self.disagreements.get().saturating_add(1));
            host.metric(Metric::CanaryDisagreements, 1);
        }
    }

    /// The counts, as the sync reports them.
    pub fn report(&self) -> String {
        wire::canary_counts(
            &self.vm,
            &self.bundle,
            self.evaluated.get(),
            self.disagreements.get(),
        )
    }
}
