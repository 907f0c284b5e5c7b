//! A canary: a candidate bundle decided beside the one serving, on live traffic, never enforced
//! (`PUT /v1/canary`, docs/server.md "Canary and replay").
//!
//! Every sampled check is decided again with the candidate after its answer is given (off the
//! request's time, on the same context: plugins run, counters are read but never charged). A
//! different verdict is a disagreement: counted in
//! `llm_policy_canary_disagreements_total{from,to,rule}` (`rule`: the candidate's deciding rule)
//! and written to the audit log with both decisions. `maxDisagreements` aborts the canary by
//! itself; `POST /v1/canary/promote` makes the candidate serve, `POST /v1/canary/abort` drops it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::registry::Version;

/// What `PUT /v1/canary` asks for.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CanaryRequest {
    /// Policy files (path relative to the policy root, as `GET /v1/bundle` names them → text)
    /// written over the files serving: the candidate.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Or: a revision of the signed bundle store (`bundle.store`), verified as the server
    /// verifies what it serves.
    #[serde(default)]
    pub revision: Option<String>,
    /// The share of checks decided again, 0 < sample ≤ 1 (default 1: every check).
    #[serde(default)]
    pub sample: Option<f64>,
    /// Abort by itself after this many disagreements.
    #[serde(default)]
    pub max_disagreements: Option<u64>,
}

/// Where a candidate came from (what a promotion writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CandidateSource {
    /// Files written over the ones serving.
    Files(Vec<(String, String)>),
    /// A revision of the signed bundle store.
    Revision(String),
}

/// A running canary.
#[derive(Debug)]
pub struct Canary {
    /// The candidate, compiled.
    pub version: Arc<Version>,
    /// Where it came from.
    pub source: CandidateSource,
    /// The share of checks decided again.
    pub sample: f64,
    /// Abort after this many disagreements.
    pub max_disagreements: Option<u64>,
    /// The model table's text the candidate brought (a store revision with its own).
    pub models: Option<String>,
    /// The bundle serving when it started: a promotion writes the candidate over that one only.
    pub base: String,
    started: SystemTime,
    seen: AtomicU64,
    evaluated: AtomicU64,
    disagreements: AtomicU64,
    by_rule: Mutex<BTreeMap<(String, String, String), u64>>,
    ended: Mutex<Option<String>>,
}

/// What `GET /v1/canary` answers.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStatus {
    /// `running`, `promoted`, `aborted`.
    pub state: String,
    /// Why it ended, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The candidate's bundle digest.
    pub candidate: String,
    /// The bundle serving when it started (what it is compared with).
    pub base: String,
    /// The store revision it is, if it is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The files it writes over the ones serving, if it is files.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// The share of checks decided again.
    pub sample: f64,
    /// Checks decided again.
    pub evaluated: u64,
    /// Of them, with another verdict.
    pub disagreements: u64,
    /// The abort threshold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_disagreements: Option<u64>,
    /// Disagreements by (from, to, rule).
    pub by_rule: Vec<Disagreements>,
    /// What the Envoy filters syncing from this server counted for it (their canary decides
    /// requests they decide alone), as their syncs report it.
    pub filters: FilterCounts,
    /// When it started (RFC 3339).
    pub started: String,
}

/// What the filters' canaries counted.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct FilterCounts {
    /// Requests decided again.
    pub evaluated: u64,
    /// Of them, with another verdict.
    pub disagreements: u64,
}

/// Disagreements with one (from, to, rule).
#[derive(Debug, Clone, Serialize)]
pub struct Disagreements {
    /// The verdict serving.
    pub from: String,
    /// The candidate's.
    pub to: String,
    /// The candidate's deciding rule (`default`).
    pub rule: String,
    /// How many.
    pub count: u64,
}

impl Canary {
    /// A canary of `version`.
    pub fn new(
        version: Version,
        source: CandidateSource,
        sample: f64,
        max_disagreements: Option<u64>,
    ) -> Canary {
        Canary {
            version: Arc::new(version),
            source,
            sample: sample.clamp(f64::MIN_POSITIVE, 1.0),
            max_disagreements,
            models: None,
            base: String::new(),
            started: SystemTime::now(),
            seen: AtomicU64::new(0),
            evaluated: AtomicU64::new(0),
            disagreements: AtomicU64::new(0),
            by_rule: Mutex::new(BTreeMap::new()),
            ended: Mutex::new(None),
        }
    }

    /// Whether this check is decided again: every 1/sample-th check, evenly.
    pub fn sampled(&self) -> bool {
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        llm_policy_core::wire::canary_sampled(n, self.sample)
    }

    /// Counts one check decided again; on a disagreement, returns whether the threshold is now
    /// reached (the canary is to abort).
    pub fn count(&self, from: &str, to: &str, rule: &str) -> bool {
        self.evaluated.fetch_add(1, Ordering::Relaxed);
        if from == to {
            return false;
        }
        let n = self
            .disagreements
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if let Ok(mut m) = self.by_rule.lock() {
            let c = m
                .entry((from.to_string(), to.to_string(), rule.to_string()))
                .or_default();
            *c = c.saturating_add(1);
        }
        self.max_disagreements.is_some_and(|max| n >= max)
    }

    /// Marks it ended (`promoted`, `aborted`) with a reason; false when it had ended already.
    pub fn end(&self, state: &str, reason: String) -> bool {
        match self.ended.lock() {
            Ok(mut e) if e.is_none() => {
                tracing::info!(
                    candidate = self.version.set.bundle(),
                    state,
                    reason,
                    "canary ended"
                );
                *e = Some(format!("{state}\u{0}{reason}"));
                true
            }
            _ => false,
        }
    }

    /// Its status now.
    pub fn status(&self) -> CanaryStatus {
        let ended = self.ended.lock().ok().and_then(|e| e.clone());
        let (state, reason) = match ended.as_deref().and_then(|e| e.split_once('\u{0}')) {
            Some((s, r)) => (s.to_string(), Some(r.to_string())),
            None => (String::from("running"), None),
        };
        let mut by_rule: Vec<Disagreements> = self
            .by_rule
            .lock()
            .map(|m| {
                m.iter()
                    .map(|((from, to, rule), count)| Disagreements {
                        from: from.clone(),
                        to: to.clone(),
                        rule: rule.clone(),
                        count: *count,
                    })
                    .collect()
            })
            .unwrap_or_default();
        by_rule.sort_by_key(|d| std::cmp::Reverse(d.count));
        CanaryStatus {
            state,
            reason,
            candidate: self.version.set.bundle().to_string(),
            base: self.base.clone(),
            revision: match &self.source {
                CandidateSource::Revision(r) => Some(r.clone()),
                CandidateSource::Files(_) => None,
            },
            files: match &self.source {
                CandidateSource::Files(f) => f.iter().map(|(p, _)| p.clone()).collect(),
                CandidateSource::Revision(_) => Vec::new(),
            },
            sample: self.sample,
            evaluated: self.evaluated.load(Ordering::Relaxed),
            disagreements: self.disagreements.load(Ordering::Relaxed),
            max_disagreements: self.max_disagreements,
            by_rule,
            filters: FilterCounts::default(),
            started: super::audit::rfc3339(self.started),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_takes_the_share_asked_evenly() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.yaml"),
            "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: p}\nspec: {defaultDecision: allow, rules: []}\n",
        )
        .unwrap();
        for (sample, want) in [(1.0, 1000), (0.25, 250), (0.001, 1)] {
            let c = Canary::new(
                super::super::registry::Registry::new(
                    dir.path().to_path_buf(),
                    llm_policy_core::ContextConfig::default(),
                    2,
                )
                .candidate(&[])
                .unwrap(),
                CandidateSource::Files(Vec::new()),
                sample,
                Some(3),
            );
            let n = (0..1000).filter(|_| c.sampled()).count();
            assert_eq!(n, want, "sample {sample}");
            assert!(!c.count("allow", "allow", "r"));
            assert!(!c.count("allow", "deny", "r"));
            assert!(!c.count("allow", "deny", "r"));
            assert!(c.count("deny", "allow", "default"));
            let s = c.status();
            assert_eq!((s.evaluated, s.disagreements), (4, 3));
            assert_eq!(s.by_rule[0].count, 2);
            assert!(c.end("aborted", String::from("threshold")));
            assert!(!c.end("promoted", String::new()));
            assert_eq!(c.status().state, "aborted");
        }
    }
}
