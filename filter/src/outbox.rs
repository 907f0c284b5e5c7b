//! Usage reports on their way to the policy server. A request queues its report when its
//! response ends; the VM's root context sends the queue on its tick (`RecordUsage` over gRPC on
//! the server cluster), so a report never depends on the request's own context still existing.
//! The queue is bounded: past [`MAX_QUEUED`] reports are dropped and counted.

use std::cell::RefCell;
use std::collections::VecDeque;

use crate::config::ServerConfig;
use crate::host::{Host, Level, Metric};

/// Reports waiting at most.
pub const MAX_QUEUED: usize = 10_000;

/// Reports sent per tick at most (the rest wait for the next tick).
const PER_TICK: usize = 1_000;

/// The gRPC service of our own API.
pub const SERVICE: &str = "llmpolicy.v1.PolicyService";
/// Its usage method.
pub const METHOD: &str = "RecordUsage";

/// `llmpolicy.v1.RecordUsageRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RecordUsageRequest {
    /// The reservation handle the server's check answer carried.
    #[prost(string, tag = "1")]
    pub request_id: String,
    /// Tokens the answer used.
    #[prost(double, optional, tag = "2")]
    pub tokens: Option<f64>,
    /// Cost in US dollars, when known.
    #[prost(double, optional, tag = "3")]
    pub cost_usd: Option<f64>,
}

/// One request's usage.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageReport {
    /// The server's reservation handle.
    pub handle: String,
    /// Tokens used; `None`: unknown (the answer did not say, or was cut off), so the server
    /// counts its estimate as spent.
    pub tokens: Option<f64>,
}

/// The VM's queue of reports.
#[derive(Debug, Default)]
pub struct Outbox {
    queue: RefCell<VecDeque<UsageReport>>,
}

impl Outbox {
    /// Queues a report; `false` when the queue is full (the report is dropped).
    pub fn push(&self, report: UsageReport) -> bool {
        match self.queue.try_borrow_mut() {
            Ok(mut q) if q.len() < MAX_QUEUED => {
                q.push_back(report);
                true
            }
            _ => false,
        }
    }

    /// Reports waiting.
    pub fn len(&self) -> usize {
        self.queue.try_borrow().map_or(0, |q| q.len())
    }

    /// Whether none wait.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sends waiting reports to the server (at most 1,000 per call).
    pub fn flush(&self, host: &mut dyn Host, server: &ServerConfig) {
        use prost::Message as _;
        let batch: Vec<UsageReport> = match self.queue.try_borrow_mut() {
            Ok(mut q) => {
                let n = q.len().min(PER_TICK);
                q.drain(..n).collect()
            }
            Err(_) => return,
        };
        for r in batch {
            let message = RecordUsageRequest {
                request_id: r.handle,
                tokens: r.tokens,
                cost_usd: None,
            }
            .encode_to_vec();
            match host.grpc_call(&server.cluster, SERVICE, METHOD, &message, server.timeout()) {
                Ok(_) => host.metric(Metric::UsageReports, 1),
                Err(e) => {
                    host.metric(Metric::UsageReportFailures, 1);
                    host.log(Level::Warn, &format!("cannot send a usage report: {e}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeHost;
    use prost::Message as _;

    #[test]
    fn reports_are_sent_in_bounded_batches_and_the_queue_is_bounded() {
        let outbox = Outbox::default();
        for i in 0..MAX_QUEUED + 5 {
            let queued = outbox.push(UsageReport {
                handle: format!("h{i}"),
                tokens: Some(10.0),
            });
            assert_eq!(queued, i < MAX_QUEUED);
        }
        let mut host = FakeHost::default();
        let server = ServerConfig {
            cluster: "llm_policy".into(),
            timeout_ms: 200,
        };
        outbox.flush(&mut host, &server);
        assert_eq!(host.calls.len(), PER_TICK);
        assert_eq!(outbox.len(), MAX_QUEUED - PER_TICK);
        let first = &host.calls[0];
        assert_eq!(
            (first.service.as_str(), first.method.as_str()),
            (SERVICE, METHOD)
        );
        let m = RecordUsageRequest::decode(first.message.as_slice()).unwrap();
        assert_eq!(m.request_id, "h0");
        assert_eq!(m.tokens, Some(10.0));
    }
}
