//! A canary on a real server: a candidate decided beside the bundle serving, never enforced,
//! its disagreements counted, recorded with both decisions, aborted at a threshold, promoted
//! through the API; bad candidates and callers without the admin token refused.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;

use std::time::{Duration, Instant};

use common::{chat, check, check_request, policy, Harness, TOKEN};
use serde_json::{json, Value};

fn rules(models: &[&str]) -> String {
    models
        .iter()
        .map(|m| format!("    - {{id: deny-{m}, when: {{cel: \"request.model == '{m}'\"}}, action: {{decision: deny}}}}\n"))
        .collect()
}

async fn put(h: &Harness, body: Value, token: Option<&str>) -> (u16, Value) {
    let mut r = h.client.put(h.url("/v1/canary")).json(&body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn post(h: &Harness, path: &str) -> (u16, Value) {
    let r = h
        .client
        .post(h.url(path))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Waits until the canary's status satisfies `ok` (its decisions run after each check answers).
async fn until(h: &Harness, ok: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let s = h.get_json("/v1/canary").await;
        if ok(&s) {
            return s;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_counts_disagreements_aborts_at_its_threshold_and_promotes() {
    let h = Harness::start(
        &[("base.yaml", &policy("base", "allow", &rules(&["gpt-bad"])))],
        |_| {},
    )
    .await;
    let mut grpc = h.grpc().await;
    let send = |model: &'static str| {
        check_request("POST", "/v1/chat/completions", &[], &chat(model, "hi"))
    };

    // Nothing yet; writes need the admin token; a broken candidate is refused with where.
    assert_eq!(
        h.client
            .get(h.url("/v1/canary"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let candidate = policy("base", "allow", &rules(&["gpt-bad", "gpt-new"]));
    let (status, _) = put(&h, json!({"files": {"base.yaml": candidate}}), None).await;
    assert_eq!(status, 401);
    let broken = policy(
        "base",
        "allow",
        "    - {id: x, when: {cel: \"request.model ==\"}, action: {decision: deny}}\n",
    );
    let (status, body) = put(&h, json!({"files": {"base.yaml": broken}}), Some(TOKEN)).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["diagnostics"][0]["file"]
            .as_str()
            .unwrap()
            .ends_with("base.yaml"),
        "{body}"
    );
    let (status, _) = put(&h, json!({"files": {"../escape.yaml": "x"}}), Some(TOKEN)).await;
    assert_eq!(status, 400);
    let (status, _) = put(
        &h,
        json!({"files": {"base.yaml": candidate}, "sample": 0}),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 400);

    // Only live traffic is decided again: an evaluation through the API is the caller's choice.
    let (status, _) = put(&h, json!({"files": {"base.yaml": candidate}}), Some(TOKEN)).await;
    assert_eq!(status, 200);
    for _ in 0..3 {
        let r = h
            .client
            .post(h.url("/v1/evaluate"))
            .json(&json!({"method": "POST", "path": "/v1/chat/completions", "headers": {}, "body": {"model": "gpt-new", "messages": [{"role": "user", "content": "hi"}]}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.get_json("/v1/canary").await["evaluated"], 0);
    let (status, _) = post(&h, "/v1/canary/abort").await;
    assert_eq!(status, 200);

    // A candidate reading what the bundle serving does not (the prompt's findings) is decided
    // on a context that holds it.
    let scanning = policy(
        "base",
        "allow",
        &format!("{}    - {{id: no-emails, when: {{match: {{field: request.prompt_entities, op: contains, value: email}}}}, action: {{decision: deny}}}}\n", rules(&["gpt-bad"])),
    );
    let (status, _) = put(&h, json!({"files": {"base.yaml": scanning}}), Some(TOKEN)).await;
    assert_eq!(status, 200);
    let mailing = check_request(
        "POST",
        "/v1/chat/completions",
        &[],
        &chat("gpt-ok", "write to bob@example.com"),
    );
    assert!(check(&mut grpc, mailing).await.allowed);
    let s = until(&h, |s| s["evaluated"] == 1).await;
    assert_eq!(s["byRule"][0]["rule"], "no-emails", "{s}");
    let (status, _) = post(&h, "/v1/canary/abort").await;
    assert_eq!(status, 200);

    // The candidate denies gpt-new as well; it aborts itself at 3 disagreements.
    let (status, body) = put(
        &h,
        json!({"files": {"base.yaml": candidate}, "maxDisagreements": 3}),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "running");
    for _ in 0..2 {
        // Never enforced: the bundle serving allows it.
        assert!(check(&mut grpc, send("gpt-new")).await.allowed);
    }
    assert!(!check(&mut grpc, send("gpt-bad")).await.allowed);
    assert!(check(&mut grpc, send("gpt-ok")).await.allowed);
    let s = until(&h, |s| s["evaluated"] == 4).await;
    assert_eq!(s["disagreements"], 2, "{s}");
    assert_eq!(
        s["byRule"][0],
        json!({"from": "allow", "to": "deny", "rule": "deny-gpt-new", "count": 2})
    );
    assert_eq!(
        h.metric("llm_policy_canary_disagreements_total{from=\"allow\",rule=\"deny-gpt-new\",to=\"deny\"}").await,
        2.0
    );
    assert_eq!(
        h.metric("llm_policy_canary_evaluations_total{result=\"agree\"}")
            .await,
        2.0
    );
    // The third disagreement aborts it; later checks are not decided again.
    assert!(check(&mut grpc, send("gpt-new")).await.allowed);
    let s = until(&h, |s| s["state"] == "aborted").await;
    assert!(
        s["reason"].as_str().unwrap().contains("maxDisagreements"),
        "{s}"
    );
    assert!(check(&mut grpc, send("gpt-new")).await.allowed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.get_json("/v1/canary").await["evaluated"], 5);
    let (status, _) = post(&h, "/v1/canary/promote").await;
    assert_eq!(status, 404, "an aborted canary is not promoted");

    // Again, sampled at half: every second check is decided again; then promoted.
    let (status, _) = put(
        &h,
        json!({"files": {"base.yaml": candidate}, "sample": 0.5}),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200);
    for _ in 0..4 {
        assert!(check(&mut grpc, send("gpt-ok")).await.allowed);
    }
    until(&h, |s| s["evaluated"] == 2).await;
    // A file changed on disk since the canary started: what would be promoted is not what was
    // measured.
    let extra = h.policies.join("zz-extra.yaml");
    std::fs::write(
        &extra,
        policy("extra", "allow", "    []\n")
            .replace("name: extra", "name: extra, namespace: other"),
    )
    .unwrap();
    let (status, body) = post(&h, "/v1/canary/promote").await;
    assert_eq!(status, 409, "{body}");
    std::fs::remove_file(&extra).unwrap();
    let base = h.get_json("/v1/canary").await["base"]
        .as_str()
        .unwrap()
        .to_string();
    let start = Instant::now();
    while h.bundle().await != base {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the reload without the extra file"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let old = h.bundle().await;
    let (status, body) = post(&h, "/v1/canary/promote").await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["bundle"], old);
    assert_eq!(h.get_json("/v1/canary").await["state"], "promoted");
    // Written where the policies are: a reload keeps it, and it is enforced now.
    let on_disk = std::fs::read_to_string(h.policies.join("base.yaml")).unwrap();
    assert!(on_disk.contains("deny-gpt-new"));
    assert!(!check(&mut grpc, send("gpt-new")).await.allowed);
    let (status, _) = post(&h, "/v1/canary/abort").await;
    assert_eq!(status, 404, "nothing running");

    // The audit log holds each disagreement with both decisions.
    let log = h.stop().await;
    let canary: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == "canary")
        .collect();
    assert_eq!(canary.len(), 4, "{log}");
    assert_eq!(canary[1]["decision"], "allow");
    assert_eq!(canary[1]["model"], "gpt-new");
    assert_eq!(canary[1]["canary"]["decision"], "deny");
    assert_eq!(canary[1]["canary"]["decidingRule"], "deny-gpt-new");
    assert_ne!(canary[1]["canary"]["bundle"], canary[1]["bundle"]);
}
