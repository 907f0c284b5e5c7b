//! Alert delivery: every `alert` a rule raises (on this server, or in a filter that reported it)
//! is sent to webhooks and Alertmanager, not only counted and logged (docs/server.md "Alerts").
//!
//! Each sink has its own bounded queue and task, so a slow or dead receiver delays nothing else:
//! a full queue drops the alert (counted, `llm_policy_alert_deliveries_total{result="dropped"}`),
//! a failed delivery is retried with exponential back-off and jitter up to `maxAttempts`, then
//! counted `failed`. A delivery is never on a check's path.
//!
//! - **Webhook**: `POST` of the alert record as the audit log writes it (its `context` left out),
//!   with `x-llm-policy-delivery: <record id>` (the same on every retry: receivers drop
//!   duplicates) and, with a secret, `x-llm-policy-signature: t=<unix seconds>,v1=<hex
//!   HMAC-SHA256(secret, "<t>.<body>")>` (the receiver checks it and rejects old timestamps).
//! - **Alertmanager**: `POST <url>/api/v2/alerts` with one alert, labels `alertname`
//!   (`LLMPolicyRuleAlert`), `severity`, `rule`, `namespace`, `decision`, `service`, the reason as
//!   its summary, ending after `resolveAfterSecs`.

use std::sync::Arc;
use std::time::Duration;

use hmac::Mac as _;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::metrics::Metrics;

/// One alert to deliver: what the sinks read of its record, and the record itself (the
/// webhook's body).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertEvent {
    /// The record's id (the delivery id).
    pub id: String,
    /// When (RFC 3339).
    pub time: String,
    /// `low`, `medium`, `high`, `critical`.
    pub severity: String,
    /// The deciding rule.
    pub rule: String,
    /// The namespace.
    pub namespace: String,
    /// The verdict.
    pub decision: String,
    /// The status the client got.
    pub status: u16,
    /// The rule's reason.
    pub reason: String,
    /// The requested model.
    pub model: Option<String>,
    /// The client's `x-request-id`.
    pub request_id: Option<String>,
    /// The alert record as JSON (the audit log's form, without its context).
    pub body: Vec<u8>,
}

/// `alerts:` in the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct AlertsConfig {
    /// Webhooks every alert is posted to.
    pub webhooks: Vec<WebhookConfig>,
    /// Alertmanager instances (their base URL, e.g. `http://alertmanager:9093`).
    pub alertmanagers: Vec<String>,
    /// Alerts waiting per sink; past it new ones are dropped and counted (default 1,000).
    pub queue: usize,
    /// Tries per alert and sink (default 5), with back-off from 250 ms doubling to 10 s.
    pub max_attempts: u32,
    /// One try's time, in milliseconds (default 2,000).
    pub timeout_ms: u64,
    /// Alertmanager: the alert resolves after this many seconds (default 300).
    pub resolve_after_secs: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            webhooks: Vec::new(),
            alertmanagers: Vec::new(),
            queue: 1_000,
            max_attempts: 5,
            timeout_ms: 2_000,
            resolve_after_secs: 300,
        }
    }
}

/// One webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WebhookConfig {
    /// Where alerts are posted.
    pub url: String,
    /// A file holding the HMAC secret (at least 16 bytes); without one, deliveries are unsigned.
    #[serde(default)]
    pub secret_file: Option<std::path::PathBuf>,
}

/// The signature header of a webhook delivery.
pub const SIGNATURE_HEADER: &str = "x-llm-policy-signature";
/// The delivery id header (the alert record's id).
pub const DELIVERY_HEADER: &str = "x-llm-policy-delivery";

/// `t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn sign(secret: &[u8], unix: u64, body: &[u8]) -> String {
    let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(unix.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    format!(
        "t={unix},v1={}",
        tag.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

#[derive(Debug, Clone)]
enum Sink {
    Webhook {
        url: String,
        secret: Option<Arc<[u8]>>,
    },
    Alertmanager {
        url: String,
    },
}

impl Sink {
    fn label(&self) -> &'static str {
        match self {
            Sink::Webhook { .. } => "webhook",
            Sink::Alertmanager { .. } => "alertmanager",
        }
    }
}

/// The sinks' queues.
#[derive(Clone, Default)]
pub struct Alerts {
    queues: Vec<(mpsc::Sender<Arc<AlertEvent>>, &'static str)>,
    metrics: Option<Metrics>,
}

impl Alerts {
    /// Starts a task per configured sink. A secret file that cannot be read, or is shorter than
    /// 16 bytes, or a URL that does not parse, stops the start with its message.
    pub fn start(config: &AlertsConfig, metrics: Metrics) -> Result<Alerts, String> {
        crate::install_crypto_provider();
        let mut sinks = Vec::new();
        for w in &config.webhooks {
            url::Url::parse(&w.url).map_err(|e| format!("alerts.webhooks: `{}`: {e}", w.url))?;
            let secret = match &w.secret_file {
                Some(p) => {
                    let s = std::fs::read(p).map_err(|e| {
                        format!("alerts.webhooks: cannot read {}: {e}", p.display())
                    })?;
                    let s = s.trim_ascii().to_vec();
                    if s.len() < 16 {
                        return Err(format!(
                            "alerts.webhooks: the secret in {} must be at least 16 bytes",
                            p.display()
                        ));
                    }
                    Some(Arc::from(s))
                }
                None => None,
            };
            sinks.push(Sink::Webhook {
                url: w.url.clone(),
                secret,
            });
        }
        for a in &config.alertmanagers {
            url::Url::parse(a).map_err(|e| format!("alerts.alertmanagers: `{a}`: {e}"))?;
            sinks.push(Sink::Alertmanager {
                url: format!("{}/api/v2/alerts", a.trim_end_matches('/')),
            });
        }
        if sinks.is_empty() {
            return Ok(Alerts::default());
        }
        if config.resolve_after_secs == 0 || config.resolve_after_secs > 7 * 24 * 3600 {
            return Err(String::from(
                "alerts.resolveAfterSecs: between 1 second and 7 days",
            ));
        }
        // Redirects are not followed: a delivery (and its signature) goes where it was told.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_millis(config.timeout_ms.max(1)))
            .connect_timeout(Duration::from_millis(config.timeout_ms.clamp(1, 5_000)))
            .build()
            .map_err(|e| format!("alerts: cannot make the HTTP client: {e}"))?;
        let mut queues = Vec::new();
        for sink in sinks {
            let (tx, rx) = mpsc::channel(config.queue.max(1));
            let label = sink.label();
            tokio::spawn(deliver_loop(
                sink,
                rx,
                client.clone(),
                metrics.clone(),
                config.max_attempts.max(1),
                config.resolve_after_secs,
            ));
            queues.push((tx, label));
        }
        Ok(Alerts {
            queues,
            metrics: Some(metrics),
        })
    }

    /// Whether any sink is configured.
    pub fn enabled(&self) -> bool {
        !self.queues.is_empty()
    }

    /// Queues an alert for every sink (never waits; a full queue drops it, counted).
    pub fn deliver(&self, event: AlertEvent) {
        if self.queues.is_empty() {
            return;
        }
        let record = Arc::new(event);
        for (tx, label) in &self.queues {
            if tx.try_send(Arc::clone(&record)).is_err() {
                if let Some(m) = &self.metrics {
                    m.alert_deliveries
                        .with_label_values(&[label, "dropped"])
                        .inc();
                }
            }
        }
    }
}

async fn deliver_loop(
    sink: Sink,
    mut rx: mpsc::Receiver<Arc<AlertEvent>>,
    client: reqwest::Client,
    metrics: Metrics,
    attempts: u32,
    resolve_after: u64,
) {
    while let Some(record) = rx.recv().await {
        let mut backoff = Duration::from_millis(250);
        let mut outcome = "failed";
        for attempt in 1..=attempts {
            match send(&client, &sink, &record, resolve_after).await {
                Ok(()) => {
                    outcome = "delivered";
                    break;
                }
                Err(Retry::No(e)) => {
                    tracing::warn!(sink = sink.label(), error = %e, alert = %record.id, "alert refused by its receiver (not retried)");
                    break;
                }
                Err(Retry::Yes(e)) => {
                    tracing::warn!(sink = sink.label(), error = %e, alert = %record.id, attempt, "alert delivery failed");
                    if attempt < attempts {
                        tokio::time::sleep(backoff + jitter(backoff)).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        }
        metrics
            .alert_deliveries
            .with_label_values(&[sink.label(), outcome])
            .inc();
    }
}

/// Up to a quarter of `d`, from the OS's randomness.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    d / 4 * u32::from(u16::from_le_bytes(b)) / u32::from(u16::MAX)
}

enum Retry {
    Yes(String),
    No(String),
}

async fn send(
    client: &reqwest::Client,
    sink: &Sink,
    record: &AlertEvent,
    resolve_after: u64,
) -> Result<(), Retry> {
    let (url, body, signature) = match sink {
        Sink::Webhook { url, secret } => {
            let body = record.body.clone();
            let signature = secret.as_ref().map(|s| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                sign(s, now, &body)
            });
            (url, body, signature)
        }
        Sink::Alertmanager { url } => {
            let body = serde_json::to_vec(&alertmanager_alert(record, resolve_after))
                .map_err(|e| Retry::No(e.to_string()))?;
            (url, body, None)
        }
    };
    let mut req = client
        .post(url.as_str())
        .header("content-type", "application/json")
        .header(DELIVERY_HEADER, record.id.as_str())
        .body(body);
    if let Some(s) = signature {
        req = req.header(SIGNATURE_HEADER, s);
    }
    let resp = req.send().await.map_err(|e| Retry::Yes(e.to_string()))?;
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
        Err(Retry::Yes(format!("{url} answered {status}")))
    } else {
        Err(Retry::No(format!("{url} answered {status}")))
    }
}

/// The Alertmanager v2 API's alert for an event.
fn alertmanager_alert(record: &AlertEvent, resolve_after: u64) -> serde_json::Value {
    let starts = chrono::DateTime::parse_from_rfc3339(&record.time)
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_else(|_| chrono::Utc::now());
    let ends = starts
        + chrono::Duration::seconds(i64::try_from(resolve_after.max(1)).unwrap_or(i64::MAX / 2));
    let severity = &record.severity;
    let rule = &record.rule;
    serde_json::json!([{
        "labels": {
            "alertname": "LLMPolicyRuleAlert",
            "service": "llm-policy",
            "severity": severity,
            "rule": rule,
            "namespace": record.namespace,
            "decision": record.decision,
        },
        "annotations": {
            "summary": record.reason,
            "description": format!("rule {rule} in namespace {} decided {} (status {}) for model {}", record.namespace, record.decision, record.status, record.model.as_deref().unwrap_or("-")),
            "record_id": record.id,
            "request_id": record.request_id.clone().unwrap_or_default(),
        },
        "startsAt": starts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "endsAt": ends.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_an_hmac_of_the_time_and_the_body() {
        let s = sign(b"0123456789abcdef", 1_800_000_000, b"{}");
        assert!(s.starts_with("t=1800000000,v1="), "{s}");
        assert_eq!(s.len(), "t=1800000000,v1=".len() + 64);
        assert_ne!(s, sign(b"0123456789abcdeX", 1_800_000_000, b"{}"));
        assert_ne!(s, sign(b"0123456789abcdef", 1_800_000_001, b"{}"));
    }

    #[test]
    fn an_alertmanager_alert_names_the_rule_and_resolves() {
        let r = AlertEvent {
            id: String::from("a-1"),
            time: String::from("2026-12-07T10:00:00.000Z"),
            namespace: String::from("default"),
            decision: String::from("deny"),
            status: 400,
            reason: String::from("a key in the prompt"),
            rule: String::from("block-secrets"),
            severity: String::from("high"),
            ..AlertEvent::default()
        };
        let v = alertmanager_alert(&r, 300);
        assert_eq!(v[0]["labels"]["severity"], "high");
        assert_eq!(v[0]["labels"]["rule"], "block-secrets");
        assert_eq!(v[0]["annotations"]["summary"], "a key in the prompt");
        assert_eq!(v[0]["startsAt"], "2026-12-07T10:00:00.000Z");
        assert_eq!(v[0]["endsAt"], "2026-12-07T10:05:00.000Z");
    }
}
