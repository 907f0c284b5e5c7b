//! Alerts delivered, not only counted: to a webhook (signed, retried with back-off, the same
//! delivery id on every try) and to an Alertmanager receiver, both real HTTP servers on
//! loopback; alerts a filter reports are delivered as the server's own; a dead receiver is
//! counted as failed after its tries, never holding a check.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{chat, check, check_request, policy, Harness, TOKEN};
use llm_policy_server::server::alerts::{sign, AlertsConfig, WebhookConfig};
use serde_json::Value;

const SECRET: &str = "webhook-secret-0123456789";

/// One post: path, headers, body.
type Post = (String, axum::http::HeaderMap, Vec<u8>);

#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Post>>>);

/// A receiver on loopback: answers 503 to the first `fail` posts, then 200.
async fn receiver(fail: usize) -> (String, Received) {
    let got = Received::default();
    let seen = got.clone();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                let n = {
                    let mut v = seen.0.lock().unwrap();
                    v.push((uri.path().to_string(), headers, body.to_vec()));
                    v.len()
                };
                if n <= fail {
                    axum::http::StatusCode::SERVICE_UNAVAILABLE
                } else {
                    axum::http::StatusCode::OK
                }
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), got)
}

async fn until(what: &str, ok: impl Fn() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const RULES: &str = "    - {id: secret-model, when: {cel: \"request.model == 'gpt-secret'\"}, action: {decision: deny, reason: \"not this one\", alert: high}}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_webhooks_signed_and_retried_and_alertmanager() {
    let (hook, hooked) = receiver(1).await;
    let (am, managed) = receiver(0).await;
    // A port nothing listens on: every try fails.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hook-secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let h = Harness::start(
        &[("base.yaml", &policy("base", "allow", RULES))],
        move |c| {
            c.alerts = AlertsConfig {
                webhooks: vec![
                    WebhookConfig {
                        url: format!("{hook}/hooks/llm"),
                        secret_file: Some(secret),
                    },
                    WebhookConfig {
                        url: format!("{dead}/x"),
                        secret_file: None,
                    },
                ],
                alertmanagers: vec![am.clone()],
                max_attempts: 3,
                timeout_ms: 500,
                ..AlertsConfig::default()
            };
        },
    )
    .await;
    let mut grpc = h.grpc().await;
    let started = Instant::now();
    let a = check(
        &mut grpc,
        check_request(
            "POST",
            "/v1/chat/completions",
            &[("x-user-id", "mallory"), ("x-request-id", "req-1")],
            &chat("gpt-secret", "hi"),
        ),
    )
    .await;
    assert!(!a.allowed);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "a delivery never holds the check"
    );

    // The webhook: refused once (503), delivered on the retry, the same delivery id both times,
    // signed over the body with the shared secret.
    until("two posts to the webhook", || {
        hooked.0.lock().unwrap().len() == 2
    })
    .await;
    let posts = hooked.0.lock().unwrap().clone();
    assert_eq!(posts[0].0, "/hooks/llm");
    let id = |i: usize| {
        posts[i].1["x-llm-policy-delivery"]
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(id(0), id(1));
    let body = &posts[1].2;
    let record: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(record["kind"], "alert");
    assert_eq!(record["alert"], "high");
    assert_eq!(record["deciding_rule"], "secret-model");
    assert_eq!(record["principal"]["id"], "mallory");
    assert_eq!(record["request_id"], "req-1");
    let signature = posts[1].1["x-llm-policy-signature"].to_str().unwrap();
    let t: u64 = signature
        .strip_prefix("t=")
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        signature,
        sign(SECRET.as_bytes(), t, body),
        "the HMAC of t.body"
    );

    // Alertmanager's API: one alert, labels and summary.
    until("a post to Alertmanager", || {
        !managed.0.lock().unwrap().is_empty()
    })
    .await;
    let (path, _, body) = managed.0.lock().unwrap()[0].clone();
    assert_eq!(path, "/api/v2/alerts");
    let alerts: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(alerts[0]["labels"]["alertname"], "LLMPolicyRuleAlert");
    assert_eq!(alerts[0]["labels"]["rule"], "secret-model");
    assert_eq!(alerts[0]["labels"]["severity"], "high");
    assert_eq!(alerts[0]["annotations"]["summary"], "not this one");

    // An alert a filter raised and reported is delivered as the server's own.
    let mut api =
        llm_policy_server::server::api::pb::policy_service_client::PolicyServiceClient::connect(
            format!("http://{}", h.running.grpc),
        )
        .await
        .unwrap();
    let mut req = tonic::Request::new(llm_policy_server::server::api::pb::RecordUsageRequest {
        alert: Some(llm_policy_server::server::api::pb::RaisedAlert {
            namespace: "default".into(),
            rule: "secret-model".into(),
            severity: "critical".into(),
            decision: "deny".into(),
            reason: "raised in the filter".into(),
            status: 403,
            ..Default::default()
        }),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    api.record_usage(req).await.unwrap();
    until("the filter's alert at the webhook", || {
        hooked.0.lock().unwrap().len() == 3
    })
    .await;
    let third: Value = serde_json::from_slice(&hooked.0.lock().unwrap()[2].2).unwrap();
    assert_eq!(third["alert"], "critical");
    assert_eq!(third["identity"]["via"], "filter");

    // The dead receiver: every try failed, counted.
    let metric = |sample: &'static str| {
        let h = &h;
        async move { h.metric(sample).await }
    };
    let start = Instant::now();
    while metric("llm_policy_alert_deliveries_total{result=\"failed\",sink=\"webhook\"}").await
        < 2.0
    {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the dead webhook's failures"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric("llm_policy_alert_deliveries_total{result=\"delivered\",sink=\"webhook\"}").await,
        2.0
    );
    assert_eq!(
        metric("llm_policy_alert_deliveries_total{result=\"delivered\",sink=\"alertmanager\"}")
            .await,
        2.0
    );
    let log = h.stop().await;
    assert!(log.contains("\"kind\":\"alert\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_secret_too_short_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("s");
    std::fs::write(&secret, "short").unwrap();
    let mut config = llm_policy_server::server::config::Config {
        policies: dir.path().to_path_buf(),
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    config.alerts.webhooks.push(WebhookConfig {
        url: "http://127.0.0.1:9/x".into(),
        secret_file: Some(secret),
    });
    let e = match llm_policy_server::server::start(config).await {
        Ok(_) => panic!("started"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("at least 16 bytes"), "{e}");
}
