//! The fleet: every Envoy filter that syncs its bundle from this server, as its syncs report it
//! (`GET /v1/bundle` with the `wire::SYNC_*_HEADER`s): node id, the bundle it runs, when it was last seen, its last sync error, what its
//! canary counted. `GET /v1/fleet` lists it; `llm_policy_fleet_proxies{bundle}` counts the
//! proxies running each bundle, so a rollout converging (or a proxy stuck on an old bundle) shows.
//! Nodes not seen for `stale` age out. The table is bounded: a report beyond [`MAX_NODES`]
//! replaces the node seen longest ago.
//!
//! What a report says is the proxy's word (anyone who can reach the REST API, or holds the read
//! token when one is set, can report): it is shown and bounded, never trusted for a decision; its
//! canary counts are kept only for the candidate running here, and the gauge names only bundles
//! this server knows (`other` for the rest), so a report cannot make series.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::metrics::Metrics;

/// Most nodes kept.
pub const MAX_NODES: usize = 10_000;
/// Most VMs (Envoy workers) whose canary counts a node may report.
const MAX_VMS: usize = 64;
/// Longest node id, bundle digest or error kept.
const MAX_FIELD: usize = 256;

use llm_policy_core::wire::{
    parse_canary_counts, SYNC_CANARY_HEADER as CANARY_HEADER, SYNC_ERROR_HEADER as ERROR_HEADER,
    SYNC_NODE_HEADER as NODE_HEADER, SYNC_RUNNING_HEADER as RUNNING_HEADER,
};

/// One sync's report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The Envoy node id.
    pub node: String,
    /// The bundle digest it runs (none yet).
    pub running: Option<String>,
    /// Its last sync error (none: its last sync was good).
    pub error: Option<String>,
    /// Its canary's counts: (VM id, candidate bundle, evaluated, disagreements).
    pub canary: Option<(String, String, u64, u64)>,
}

impl Report {
    /// Reads a report from request headers (`None` without a node id). Values are cut to
    /// printable ASCII and bounded.
    pub fn from_headers(get: impl Fn(&str) -> Option<String>) -> Option<Report> {
        let clean = |v: String| -> Option<String> {
            let v: String = v
                .chars()
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .take(MAX_FIELD)
                .collect();
            (!v.trim().is_empty()).then_some(v)
        };
        let node = get(NODE_HEADER).and_then(clean)?;
        let canary = get(CANARY_HEADER)
            .and_then(clean)
            .and_then(|c| parse_canary_counts(&c));
        Some(Report {
            node,
            running: get(RUNNING_HEADER).and_then(clean),
            error: get(ERROR_HEADER).and_then(clean),
            canary,
        })
    }
}

#[derive(Debug, Clone)]
struct Node {
    running: Option<String>,
    error: Option<String>,
    seen: SystemTime,
    /// Per VM (each Envoy worker syncs on its own): candidate bundle, evaluated, disagreements.
    canary: HashMap<String, (String, u64, u64)>,
}

/// One node as `GET /v1/fleet` lists it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// The Envoy node id.
    pub node: String,
    /// The bundle it runs.
    pub running: Option<String>,
    /// Whether that is the bundle this server serves.
    pub current: bool,
    /// When it last synced (RFC 3339).
    pub last_seen: String,
    /// Its last sync error.
    pub last_error: Option<String>,
}

/// The fleet table.
pub struct Fleet {
    nodes: Mutex<HashMap<String, Node>>,
    stale: Duration,
    metrics: Metrics,
}

impl Fleet {
    /// An empty table whose nodes age out after `stale`.
    pub fn new(stale: Duration, metrics: Metrics) -> Fleet {
        Fleet {
            nodes: Mutex::new(HashMap::new()),
            stale,
            metrics,
        }
    }

    /// Records a report. Its canary counts are kept only when they name `canary`, the candidate
    /// running here (a report cannot invent counts for anything else).
    pub fn observe(&self, report: Report, canary: Option<&str>) {
        let Ok(mut nodes) = self.nodes.lock() else {
            return;
        };
        if !nodes.contains_key(&report.node) && nodes.len() >= MAX_NODES {
            let oldest = nodes
                .iter()
                .min_by_key(|(_, n)| n.seen)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                nodes.remove(&k);
            }
        }
        let node = nodes.entry(report.node).or_insert_with(|| Node {
            running: None,
            error: None,
            seen: SystemTime::now(),
            canary: HashMap::new(),
        });
        node.running = report.running;
        node.error = report.error;
        node.seen = SystemTime::now();
        match report.canary {
            Some((vm, bundle, evaluated, disagreements))
                if canary == Some(bundle.as_str())
                    && (node.canary.len() < MAX_VMS || node.canary.contains_key(&vm)) =>
            {
                node.canary.insert(vm, (bundle, evaluated, disagreements));
            }
            _ => {}
        }
        if canary.is_none() {
            node.canary.clear();
        }
    }

    /// Drops nodes not seen for `stale`.
    fn prune(nodes: &mut HashMap<String, Node>, stale: Duration) {
        let now = SystemTime::now();
        nodes.retain(|_, n| now.duration_since(n.seen).unwrap_or_default() <= stale);
    }

    /// Ages stale nodes out and exports the gauge: proxies by the bundle they run, a bundle this
    /// server does not know (`known`: its kept versions and its canary's candidate) as `other`,
    /// so a report cannot make series.
    pub fn age_out(&self, known: &[String]) {
        let Ok(mut nodes) = self.nodes.lock() else {
            return;
        };
        Fleet::prune(&mut nodes, self.stale);
        let mut by_bundle: HashMap<&str, i64> = HashMap::new();
        for n in nodes.values() {
            let b = match n.running.as_deref() {
                None => "none",
                Some(b) if known.iter().any(|k| k == b) => b,
                Some(_) => "other",
            };
            *by_bundle.entry(b).or_default() += 1;
        }
        self.metrics.fleet_proxies.reset();
        for (bundle, count) in by_bundle {
            self.metrics
                .fleet_proxies
                .with_label_values(&[bundle])
                .set(count);
        }
    }

    /// Every node not aged out, `serving` marking those on the bundle this server serves.
    pub fn list(&self, serving: Option<&str>) -> Vec<NodeStatus> {
        let Ok(mut nodes) = self.nodes.lock() else {
            return Vec::new();
        };
        Fleet::prune(&mut nodes, self.stale);
        drop(nodes);
        let Ok(nodes) = self.nodes.lock() else {
            return Vec::new();
        };
        let mut out: Vec<NodeStatus> = nodes
            .iter()
            .map(|(id, n)| NodeStatus {
                node: id.clone(),
                current: n.running.is_some() && n.running.as_deref() == serving,
                running: n.running.clone(),
                last_seen: super::audit::rfc3339(n.seen),
                last_error: n.error.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }

    /// What the filters' canaries counted for `bundle` (summed over nodes and their VMs):
    /// (evaluated, disagreements).
    pub fn canary_counts(&self, bundle: &str) -> (u64, u64) {
        let Ok(nodes) = self.nodes.lock() else {
            return (0, 0);
        };
        nodes
            .values()
            .flat_map(|n| n.canary.values())
            .filter(|(b, _, _)| b == bundle)
            .fold((0u64, 0u64), |(e, d), (_, e2, d2)| {
                (e.saturating_add(*e2), d.saturating_add(*d2))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node: &str, running: &str) -> Report {
        Report {
            node: node.to_string(),
            running: Some(running.to_string()),
            error: None,
            canary: None,
        }
    }

    #[test]
    fn nodes_are_listed_counted_by_bundle_and_age_out() {
        let metrics = Metrics::new().unwrap();
        let fleet = Fleet::new(Duration::from_millis(200), metrics.clone());
        fleet.observe(report("a", "b1"), None);
        fleet.observe(report("b", "b1"), None);
        fleet.observe(report("c", "b0"), None);
        fleet.observe(report("d", "made-up"), None);
        let list = fleet.list(Some("b1"));
        assert_eq!(list.len(), 4);
        assert!(list[0].current && !list[2].current);
        let known = [String::from("b1"), String::from("b0")];
        fleet.age_out(&known);
        let text = metrics.render();
        assert!(
            text.contains("llm_policy_fleet_proxies{bundle=\"b1\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("llm_policy_fleet_proxies{bundle=\"other\"} 1"),
            "{text}"
        );
        assert!(!text.contains("made-up"), "a report makes no series");
        std::thread::sleep(Duration::from_millis(300));
        fleet.observe(report("a", "b1"), None);
        assert_eq!(fleet.list(Some("b1")).len(), 1);
        fleet.age_out(&known);
        assert!(!metrics.render().contains("bundle=\"b0\""));
    }

    #[test]
    fn reports_are_read_bounded_and_canary_counts_summed_per_vm() {
        let headers = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(Report::from_headers(headers(&[(RUNNING_HEADER, "x")])).is_none());
        let r = Report::from_headers(headers(&[
            (NODE_HEADER, "envoy-1\u{7}"),
            (CANARY_HEADER, "vm1;cand;10;3"),
        ]))
        .unwrap();
        assert_eq!(r.node, "envoy-1");
        let fleet = Fleet::new(Duration::from_secs(60), Metrics::new().unwrap());
        let running = Some("cand");
        let canary = |value: &'static str| {
            Report::from_headers(move |k: &str| match k {
                NODE_HEADER => Some(String::from("envoy-1")),
                CANARY_HEADER => Some(String::from(value)),
                _ => None,
            })
            .unwrap()
        };
        fleet.observe(r, running);
        fleet.observe(canary("vm2;cand;5;1"), running);
        fleet.observe(canary("vm1;cand;12;4"), running);
        // Counts for a candidate that is not running here are not kept.
        fleet.observe(canary("vm3;forged;999;0"), running);
        assert_eq!(fleet.canary_counts("cand"), (17, 5));
        assert_eq!(fleet.canary_counts("forged"), (0, 0));
        let long = "x".repeat(1000);
        let node = Report::from_headers(|k| (k == NODE_HEADER).then(|| long.clone())).unwrap();
        assert_eq!(node.node.len(), MAX_FIELD);
    }
}
