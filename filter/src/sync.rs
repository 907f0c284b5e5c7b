//! Bundle sync: on its tick the root context asks the policy server's `GET /v1/bundle` (with
//! `If-None-Match`) for the bundle serving; a new one is compiled and swapped in for new
//! requests (requests in flight keep theirs). A bundle that does not compile here is logged and
//! counted, and the last good one keeps serving; a server that does not answer changes nothing.

use std::time::Duration;

use llm_policy_core::identity::{KeyRecord, KeyTable};
use llm_policy_core::model::KIND_POLICY_TEST;
use llm_policy_core::wire::{self, BundleAnswer, BundleFile};
use llm_policy_core::{source, ContextConfig, Diagnostic, Diagnostics, PolicySet};

use crate::config::SyncConfig;
use crate::host::{Host, Level, Metric};

/// Largest bundle answer accepted.
pub const MAX_BUNDLE_BYTES: usize = 32 * 1024 * 1024;

/// A canary's candidate, compiled: decided beside the bundle, never enforced.
#[derive(Debug)]
pub struct Candidate {
    /// The candidate.
    pub set: PolicySet,
    /// Its digest as the server names it (the counts reported name it).
    pub bundle: String,
    /// The share of requests decided again.
    pub sample: f64,
}

/// What a filter says about itself with each sync (the server's fleet view).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Its Envoy node id.
    pub node: Option<String>,
    /// The bundle it runs.
    pub running: Option<String>,
    /// Its canary's counts ([`llm_policy_core::wire::canary_counts`]).
    pub canary: Option<String>,
}

/// Longest sync error reported.
const MAX_REPORTED_ERROR: usize = 200;

/// What a fetch brought.
#[derive(Debug)]
pub enum Fetched {
    /// A new bundle, compiled, the server's keys (when it holds any, and they are valid), and
    /// the canary's candidate when one runs there (and compiles here).
    New(PolicySet, Option<KeyTable>, Option<Candidate>),
    /// New keys only: the bundle did not compile here (the last good one keeps serving).
    Keys(KeyTable),
    /// The same bundle, or no usable answer (nothing changes).
    Nothing,
}

/// The sync state of one VM.
#[derive(Debug)]
pub struct BundleSync {
    config: SyncConfig,
    etag: Option<String>,
    in_flight: Option<u32>,
    last: Option<Duration>,
    /// Failures in a row (only the first of a run, then every 100th, is logged).
    failures: u64,
    /// The last failure's message, reported with the next syncs until one succeeds.
    last_error: Option<String>,
}

impl BundleSync {
    /// A sync as configured.
    pub fn new(config: SyncConfig) -> BundleSync {
        BundleSync {
            config,
            etag: None,
            in_flight: None,
            last: None,
            failures: 0,
            last_error: None,
        }
    }

    /// Starts a fetch if one is due and none is running; the request says who this filter is
    /// and what it runs (`report`), and its last sync error.
    pub fn tick(&mut self, host: &mut dyn Host, report: &SyncReport) {
        let now = host.now();
        let every = Duration::from_millis(self.config.interval_ms.max(100));
        let due = self.last.is_none_or(|t| now.saturating_sub(t) >= every);
        if self.in_flight.is_some() || !due {
            return;
        }
        self.last = Some(now);
        let authority = self
            .config
            .authority
            .clone()
            .unwrap_or_else(|| self.config.cluster.clone());
        let mut headers = vec![
            (":method", "GET".to_string()),
            (":path", self.config.path.clone()),
            (":authority", authority),
            ("accept", "application/json".to_string()),
        ];
        if let Some(etag) = &self.etag {
            headers.push(("if-none-match", etag.clone()));
        }
        if let Some(token) = &self.config.token {
            headers.push(("authorization", format!("Bearer {token}")));
        }
        let printable = |v: &str| -> String {
            v.chars()
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .take(MAX_REPORTED_ERROR)
                .collect()
        };
        if let Some(node) = &report.node {
            headers.push((wire::SYNC_NODE_HEADER, printable(node)));
        }
        if let Some(running) = &report.running {
            headers.push((wire::SYNC_RUNNING_HEADER, printable(running)));
        }
        if let Some(canary) = &report.canary {
            headers.push((wire::SYNC_CANARY_HEADER, printable(canary)));
        }
        if let Some(error) = &self.last_error {
            headers.push((wire::SYNC_ERROR_HEADER, printable(error)));
        }
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let timeout = Duration::from_millis(self.config.timeout_ms.clamp(100, 60_000));
        match host.http_call(&self.config.cluster, &headers, timeout) {
            Ok(token) => self.in_flight = Some(token),
            Err(e) => {
                host.metric(Metric::SyncFailed, 1);
                host.log(
                    Level::Warn,
                    &format!("bundle sync: cannot call {}: {e}", self.config.cluster),
                );
            }
        }
    }

    /// The answer to fetch `token`: HTTP status (`None`: no answer), `ETag`, body.
    pub fn on_answer(
        &mut self,
        host: &mut dyn Host,
        token: u32,
        status: Option<u16>,
        etag: Option<String>,
        body: Option<Vec<u8>>,
        context: &ContextConfig,
    ) -> Fetched {
        if self.in_flight != Some(token) {
            return Fetched::Nothing;
        }
        self.in_flight = None;
        match status {
            Some(304) => Fetched::Nothing,
            Some(200) => {
                let answer = match parse(body.as_deref().unwrap_or_default()) {
                    Ok(answer) => answer,
                    Err(e) => {
                        let msg = format!("llm-policy: synced bundle rejected, the last good one keeps serving: {e}");
                        self.failed(host, Level::Error, &msg);
                        return Fetched::Nothing;
                    }
                };
                // The keys apply on their own: a bundle that does not compile here must not
                // keep a revoked key working.
                let keys = match keys_of(answer.keys.clone()) {
                    Ok(keys) => keys,
                    Err(e) => {
                        let msg = format!("llm-policy: synced keys rejected, the last good ones keep serving: {e}");
                        self.failed(host, Level::Error, &msg);
                        None
                    }
                };
                match compile(&answer.files, answer.models.as_deref(), context) {
                    Ok(set) => {
                        self.failures = 0;
                        self.last_error = None;
                        let candidate = answer.canary.as_ref().and_then(|c| {
                            let models = c.models.as_deref().or(answer.models.as_deref());
                            match compile(&c.files, models, context) {
                                Ok(set) => Some(Candidate {
                                    set,
                                    bundle: c.bundle.clone(),
                                    sample: c.sample.clamp(f64::MIN_POSITIVE, 1.0),
                                }),
                                Err(e) => {
                                    host.log(
                                        Level::Warn,
                                        &format!(
                                            "llm-policy: the canary's candidate {} does not compile here, not decided: {e}",
                                            c.bundle
                                        ),
                                    );
                                    None
                                }
                            }
                        });
                        self.etag = etag.or(Some(format!("\"{}\"", answer.bundle)));
                        host.metric(Metric::SyncOk, 1);
                        host.log(
                            Level::Info,
                            &format!(
                                "llm-policy: bundle {} synced from {}: {} rules",
                                answer.bundle,
                                self.config.cluster,
                                set.rule_count()
                            ),
                        );
                        Fetched::New(set, keys, candidate)
                    }
                    Err(e) => {
                        let msg = format!(
                            "llm-policy: synced bundle rejected, the last good one keeps serving: {e}"
                        );
                        self.failed(host, Level::Error, &msg);
                        match keys {
                            Some(keys) => Fetched::Keys(keys),
                            None => Fetched::Nothing,
                        }
                    }
                }
            }
            other => {
                let msg = format!(
                    "bundle sync: {} answered {}",
                    self.config.cluster,
                    other.map_or_else(|| String::from("nothing"), |s| s.to_string())
                );
                self.failed(host, Level::Warn, &msg);
                Fetched::Nothing
            }
        }
    }

    /// Counts a failure; logs the first of a run and every 100th after it.
    fn failed(&mut self, host: &mut dyn Host, level: Level, message: &str) {
        host.metric(Metric::SyncFailed, 1);
        self.last_error = Some(message.chars().take(MAX_REPORTED_ERROR).collect());
        if self.failures.is_multiple_of(100) {
            host.log(
                level,
                &format!("{message} (failures in a row: {})", self.failures + 1),
            );
        }
        self.failures = self.failures.saturating_add(1);
    }
}

/// Why a synced bundle was not taken (the last good one keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The answer is larger than [`MAX_BUNDLE_BYTES`].
    #[error("the answer is over {MAX_BUNDLE_BYTES} bytes")]
    TooLarge,
    /// The answer is not a `GET /v1/bundle` answer.
    #[error("not a bundle answer: {0}")]
    NotABundle(serde_json::Error),
    /// A file of the bundle cannot be parsed.
    #[error("{0}")]
    Unreadable(Diagnostic),
    /// The bundle holds no policy (test suites only, or nothing).
    #[error("the bundle holds no policy")]
    Empty,
    /// The bundle does not compile here.
    #[error("{0}")]
    Invalid(Diagnostics),
    /// The answer's virtual keys are not a valid key table.
    #[error("the keys: {0}")]
    BadKeys(String),
}

/// Reads a bundle answer.
fn parse(body: &[u8]) -> Result<BundleAnswer, SyncError> {
    if body.len() > MAX_BUNDLE_BYTES {
        return Err(SyncError::TooLarge);
    }
    serde_json::from_slice(body).map_err(SyncError::NotABundle)
}

/// Compiles a bundle answer's policy files (the bundle's, or a canary's candidate) with the
/// server's model table when it sent one.
fn compile(
    files: &[BundleFile],
    models: Option<&str>,
    context: &ContextConfig,
) -> Result<PolicySet, SyncError> {
    let mut docs = Vec::new();
    for f in files {
        docs.extend(source::parse_str(&f.path, &f.text).map_err(SyncError::Unreadable)?);
    }
    docs.retain(|d| d.kind() != Some(KIND_POLICY_TEST));
    if docs.is_empty() {
        return Err(SyncError::Empty);
    }
    // The server's model table, so the filter prices as the server does.
    let served;
    let context = match models {
        Some(text) => {
            let table =
                llm_policy_core::model_table::ModelTable::parse("models (from the server)", text)
                    .map_err(SyncError::Invalid)?;
            served = ContextConfig {
                models: Some(table),
                ..context.clone()
            };
            &served
        }
        None => context,
    };
    // Warnings were shown when the bundle was validated on the server.
    Ok(PolicySet::compile(&docs, context)
        .map_err(SyncError::Invalid)?
        .set)
}

/// The answer's keys as a table (none when the server holds no keys).
fn keys_of(records: Option<Vec<KeyRecord>>) -> Result<Option<KeyTable>, SyncError> {
    let Some(records) = records else {
        return Ok(None);
    };
    KeyTable::new(records)
        .map(Some)
        .map_err(|e| SyncError::BadKeys(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeHost;

    const POLICY: &str = "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  rules:\n    - id: r\n      when: {cel: \"request.model == 'x'\"}\n      action: {decision: deny}\n";

    fn answer(text: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "version": 3, "bundle": "abc", "files": [{"path": "p.yaml", "text": text}]
        }))
        .unwrap()
    }

    fn sync() -> BundleSync {
        BundleSync::new(SyncConfig {
            cluster: "llm_policy_rest".into(),
            path: "/v1/bundle".into(),
            authority: None,
            interval_ms: 1000,
            timeout_ms: 500,
            token: None,
        })
    }

    #[test]
    fn the_servers_model_table_prices_the_filters_bundle() {
        let table = "asOf: \"2026-01-01\"\nfallback: {contextWindow: 1000, maxOutput: 100, input: 1.0, output: 2.0}\nmodels:\n  x: {provider: openai, contextWindow: 1000, maxOutput: 100, input: 7.0, output: 9.0}\n";
        let files = [BundleFile {
            path: "p.yaml".into(),
            text: POLICY.into(),
        }];
        let set = compile(&files, Some(table), &ContextConfig::default()).unwrap();
        assert_eq!(set.models().lookup(Some("x")).input, 7.0);
        let shipped = compile(&files, None, &ContextConfig::default()).unwrap();
        assert_ne!(
            set.bundle(),
            shipped.bundle(),
            "the table is part of the bundle"
        );
        assert!(matches!(
            compile(
                &files,
                Some("asOf: 1\nmodels: {x: {input: -1}}\n"),
                &ContextConfig::default()
            ),
            Err(SyncError::Invalid(_))
        ));
    }

    #[test]
    fn fetches_when_due_with_the_etag_and_swaps_good_bundles_only() {
        let mut host = FakeHost::default();
        let mut s = sync();
        let ctx = ContextConfig::default();
        s.tick(&mut host, &SyncReport::default());
        s.tick(&mut host, &SyncReport::default());
        assert_eq!(host.http_calls.len(), 1, "one fetch at a time");
        let first = host.http_calls[0].clone();
        assert!(first
            .headers
            .contains(&(":path".into(), "/v1/bundle".into())));
        assert!(!first.headers.iter().any(|(k, _)| k == "if-none-match"));
        let got = s.on_answer(
            &mut host,
            1,
            Some(200),
            Some("\"abc\"".into()),
            Some(answer(POLICY)),
            &ctx,
        );
        assert!(matches!(got, Fetched::New(set, None, None) if set.rule_count() == 1));

        // Not due yet; then due, with If-None-Match; 304 changes nothing.
        s.tick(&mut host, &SyncReport::default());
        assert_eq!(host.http_calls.len(), 1);
        host.now += Duration::from_millis(1000);
        s.tick(&mut host, &SyncReport::default());
        assert!(host.http_calls[1]
            .headers
            .contains(&("if-none-match".into(), "\"abc\"".into())));
        assert!(matches!(
            s.on_answer(&mut host, 2, Some(304), None, None, &ctx),
            Fetched::Nothing
        ));

        // A broken bundle, garbage, a failed call: nothing changes, each is counted.
        for (token, status, body) in [
            (3, Some(200), Some(answer(&POLICY.replace("==", "===")))),
            (4, Some(200), Some(b"<html>".to_vec())),
            (5, None, None),
            (6, Some(503), None),
        ] {
            host.now += Duration::from_millis(1000);
            s.tick(&mut host, &SyncReport::default());
            assert!(matches!(
                s.on_answer(&mut host, token, status, None, body, &ctx),
                Fetched::Nothing
            ));
        }
        assert_eq!(host.count(Metric::SyncFailed), 4);
        assert_eq!(host.count(Metric::SyncOk), 1);
        // An answer to a call that is not running is ignored.
        assert!(matches!(
            s.on_answer(&mut host, 99, Some(200), None, Some(answer(POLICY)), &ctx),
            Fetched::Nothing
        ));
    }
}
