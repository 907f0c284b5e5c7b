//! The server end to end, in process: real listeners, real gRPC (tonic) and REST (reqwest)
//! clients, real files for hot reload and audit.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{chat, check, check_request, policy, Harness, TOKEN};
use llm_policy_core::decision::{Charge, CounterKind};
use llm_policy_server::server::config::FailureMode;
use llm_policy_server::server::limits::{
    CounterState, CounterStore, Held, ReservationId, Reserved, StoreError, StoreFuture,
};
use llm_policy_server::server::redis::RedisError;
use serde_json::{json, Value};

const RULES: &str = r#"
    - id: block-unapproved
      priority: 100
      when: { cel: "request.model != null && !(request.model in ['gpt-4o', 'gpt-4o-mini', 'claude-sonnet-4-5'])" }
      action: { decision: deny, reason: "model is not approved", headers: { x-policy-note: model-not-approved } }
    - id: secrets
      priority: 200
      when: { match: { field: request.prompt, op: contains, value: "AKIA" } }
      action: { decision: deny, reason: "credential in prompt", status: 400, audit: true, alert: high }
    - id: tag-ok
      priority: 10
      when: { match: { field: request.model, op: eq, value: gpt-4o } }
      action: { decision: allow, reason: "approved", headers: { x-policy-route: primary } }
    - id: per-user-rate
      priority: 50
      when: { match: { field: principal.id, op: exists } }
      action:
        decision: throttle
        reason: "too many requests"
        rateLimit: { key: "{principal.id}", requests: 3, per: minute }
"#;

fn base() -> String {
    policy("base", "allow", RULES)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_check_allows_denies_in_provider_formats_and_rejects_bad_bodies() {
    let h = Harness::start(&[("base.yaml", &base())], |_| {}).await;
    let mut c = h.grpc().await;

    // Allow: OK with the verdict and the rule's headers for the upstream.
    let a = check(
        &mut c,
        check_request("POST", "/v1/chat/completions", &[], &chat("gpt-4o", "hi")),
    )
    .await;
    assert!(a.allowed, "{a:?}");
    assert_eq!(a.header("x-llm-policy-decision"), Some("allow"));
    assert_eq!(a.header("x-policy-route"), Some("primary"));

    // Deny on an OpenAI path: OpenAI's error format, the rule's status and headers.
    let a = check(
        &mut c,
        check_request(
            "POST",
            "/v1/chat/completions",
            &[],
            &chat("gpt-5-preview", "hi"),
        ),
    )
    .await;
    assert!(!a.allowed);
    assert_eq!(a.status, 403);
    assert_eq!(a.header("x-policy-note"), Some("model-not-approved"));
    assert_eq!(a.header("content-type"), Some("application/json"));
    let v = a.json();
    assert_eq!(v["error"]["message"], "model is not approved");
    assert_eq!(v["error"]["type"], "permission_denied");
    assert_eq!(v["error"]["code"], "policy_denied");

    // The same on Anthropic's path: Anthropic's format.
    let body = json!({"model": "claude-2", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let a = check(&mut c, check_request("POST", "/v1/messages", &[], &body)).await;
    let v = a.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "permission_error");
    assert_eq!(v["error"]["message"], "model is not approved");

    // A rule's own status.
    let a = check(
        &mut c,
        check_request(
            "POST",
            "/v1/chat/completions",
            &[],
            &chat("gpt-4o", "key AKIAXXXX"),
        ),
    )
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"]["type"], "invalid_request_error");

    // Bodies the core rejects: 400, and 413 for a body Envoy only partly buffered.
    let a = check(
        &mut c,
        check_request("POST", "/v1/chat/completions", &[], "{not json"),
    )
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"]["code"], "invalid_body");
    let a = check(
        &mut c,
        check_request(
            "POST",
            "/v1/chat/completions",
            &[
                ("x-envoy-auth-partial-body", "true"),
                ("content-length", "99999999"),
            ],
            "{\"model\":",
        ),
    )
    .await;
    assert_eq!(a.status, 413);
    assert_eq!(a.json()["error"]["code"], "body_too_large");
    // Invalid UTF-8 in the raw body is a 400, not a failed RPC.
    let mut req = check_request("POST", "/v1/chat/completions", &[], "");
    if let Some(http) = req
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    {
        http.raw_body = vec![b'{', 0xff, 0xfe, b'}'];
    }
    assert_eq!(check(&mut c, req).await.status, 400);

    // Metrics saw it all.
    assert_eq!(
        h.metric(r#"llm_policy_decisions_total{decision="deny",namespace="default",rule="block-unapproved"}"#).await,
        2.0
    );
    assert_eq!(
        h.metric(r#"llm_policy_alerts_total{rule="secrets",severity="high"}"#)
            .await,
        1.0
    );
    let audit = h.stop().await;
    let lines: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // 4 decisions + 1 alert + 3 rejected requests.
    assert_eq!(lines.len(), 8, "{audit}");
    assert!(lines
        .iter()
        .any(|l| l["status"] == 413 && l["reason"].as_str().unwrap().contains("over the limit")));
    assert!(lines
        .iter()
        .any(|l| l["kind"] == "alert" && l["matched_rules"][0] == "secrets"));
    assert!(
        !audit.contains("AKIA"),
        "prompts are never logged by default"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_after_n_across_connections_with_rate_limit_headers() {
    let h = Harness::start(&[("base.yaml", &base())], |_| {}).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = h.grpc().await;
        tasks.push(tokio::spawn(async move {
            check(
                &mut c,
                check_request(
                    "POST",
                    "/v1/chat/completions",
                    &[("x-user-id", "alice")],
                    &chat("gpt-4o", "hi"),
                ),
            )
            .await
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    assert_eq!(answers.iter().filter(|a| a.allowed).count(), 3);
    let throttled: Vec<_> = answers.iter().filter(|a| !a.allowed).collect();
    assert_eq!(throttled.len(), 5);
    for a in throttled {
        assert_eq!(a.status, 429);
        assert_eq!(a.header("x-llm-policy-decision"), Some("throttle"));
        assert_eq!(a.header("x-ratelimit-limit"), Some("3"));
        assert_eq!(a.header("x-ratelimit-remaining"), Some("0"));
        let retry: u64 = a.header("retry-after").unwrap().parse().unwrap();
        // A minute's sliding window frees its oldest 6-second slot within a minute and a slot.
        assert!((1..=67).contains(&retry), "{retry}");
        assert_eq!(a.json()["error"]["type"], "rate_limit_exceeded");
    }
    // Another user has their own counter.
    let mut c = h.grpc().await;
    assert!(
        check(
            &mut c,
            check_request(
                "POST",
                "/v1/chat/completions",
                &[("x-user-id", "bob")],
                &chat("gpt-4o", "hi")
            )
        )
        .await
        .allowed
    );
    assert_eq!(
        h.metric(r#"llm_policy_limit_rejections_total{kind="rate_limit"}"#)
            .await,
        5.0
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_checks_never_overshoot_a_budget() {
    let rules = r#"
    - id: team-budget
      priority: 10
      when: { match: { field: principal.team, op: exists } }
      action:
        decision: throttle
        reason: "budget spent"
        budget: { key: "{principal.team}", tokens: 5000, per: day }
"#;
    let h = Harness::start(&[("b.yaml", &policy("b", "allow", rules))], |_| {}).await;
    let body = json!({"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    // What each request reserves: the core's token estimate plus max_tokens.
    let set = llm_policy_core::PolicySet::load(std::slice::from_ref(&h.policies))
        .unwrap()
        .set;
    let ctx = llm_policy_server::request::RequestFile {
        body: Some(serde_json::from_str(&body).unwrap()),
        ..Default::default()
    }
    .context(&set)
    .unwrap();
    let charge = (ctx.request.prompt_tokens() + 100) as usize;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = h.grpc().await;
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            check(
                &mut c,
                check_request(
                    "POST",
                    "/v1/chat/completions",
                    &[
                        ("x-team-id", "research"),
                        ("x-request-id", &format!("req-{i}")),
                    ],
                    &body,
                ),
            )
            .await
        }));
    }
    let mut allowed = Vec::new();
    for t in tasks {
        let a = t.await.unwrap();
        if a.allowed {
            allowed.push(a);
        }
    }
    assert_eq!(
        allowed.len(),
        5000 / charge,
        "overshoot or undershoot (charge {charge})"
    );
    // Each allowed request holds a reservation until its usage is reported: its handle is in
    // Envoy's dynamic metadata, never a header that would reach the provider.
    assert!(allowed.iter().all(|a| a.reservation.is_some()));
    assert!(allowed
        .iter()
        .all(|a| a.header("x-llm-policy-reservation").is_none()));
    // Reporting less usage than reserved frees budget for more requests.
    for a in &allowed {
        let r = h
            .client
            .post(h.url("/v1/usage"))
            .bearer_auth(TOKEN)
            .json(&json!({"requestId": a.reservation.as_deref().unwrap(), "usage": {"prompt_tokens": 1, "completion_tokens": 1}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Reported twice: unknown.
    let r = h
        .client
        .post(h.url("/v1/usage"))
        .bearer_auth(TOKEN)
        .json(&json!({"requestId": "req-0", "tokens": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let mut c = h.grpc().await;
    let a = check(
        &mut c,
        check_request(
            "POST",
            "/v1/chat/completions",
            &[("x-team-id", "research")],
            &body,
        ),
    )
    .await;
    assert!(a.allowed, "budget freed by the usage reports: {a:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_evaluate_answers_what_the_cli_answers() {
    let h = Harness::start(&[("base.yaml", &base())], |_| {}).await;
    let req = json!({"method": "POST", "path": "/v1/chat/completions", "headers": {}, "body": {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hello"}]}});
    let got: Value = h
        .client
        .post(h.url("/v1/evaluate"))
        .json(&req)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The core, as `llm-policy eval` runs it.
    let set = llm_policy_core::PolicySet::load(std::slice::from_ref(&h.policies))
        .unwrap()
        .set;
    let file: llm_policy_server::request::RequestFile =
        serde_json::from_value(req.clone()).unwrap();
    let mut want = serde_json::to_value(set.evaluate(
        &file.context(&set).unwrap(),
        &Default::default(),
        &mut llm_policy_core::LocalOnly,
    ))
    .unwrap();
    let mut got_cmp = got.clone();
    for v in [&mut want, &mut got_cmp] {
        v["evaluation_time_us"] = json!(0);
    }
    assert_eq!(got_cmp, want);
    assert_eq!(got["decision"], "deny");
    // Explain.
    let got: Value = h
        .client
        .post(h.url("/v1/evaluate?explain=true"))
        .json(&req)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(got["explain"].as_array().is_some_and(|e| !e.is_empty()));
    // Bad input: clear 400s.
    let r = h
        .client
        .post(h.url("/v1/evaluate"))
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = h
        .client
        .post(h.url("/v1/evaluate"))
        .json(&json!({"body": "{oops"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_body"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_writes_need_the_token_validate_first_and_roll_back() {
    let h = Harness::start(&[("base.yaml", &base())], |_| {}).await;
    let v1 = h.bundle().await;
    let new = policy("extra", "allow", "    - { id: no-o1, when: { match: { field: request.model, op: eq, value: o1 } }, action: { decision: deny, reason: no o1 } }\n");
    // No token, wrong token.
    let r = h
        .client
        .put(h.url("/v1/policies/extra"))
        .body(new.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = h
        .client
        .put(h.url("/v1/policies/extra"))
        .bearer_auth("wrong-token-wrong-token")
        .body(new.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Good write: a new version serves at once.
    let r = h
        .client
        .put(h.url("/v1/policies/extra"))
        .bearer_auth(TOKEN)
        .body(new.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v2 = h.bundle().await;
    assert_ne!(v1, v2);
    assert!(h.policies.join("extra.yaml").exists());
    // Bad write: 422 with located diagnostics; nothing written; v2 keeps serving.
    let bad = new.replace("request.model", "request.modle");
    let r = h
        .client
        .put(h.url("/v1/policies/extra"))
        .bearer_auth(TOKEN)
        .body(bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["diagnostics"][0]["message"]
            .as_str()
            .unwrap()
            .contains("modle"),
        "{e}"
    );
    assert!(e["diagnostics"][0]["file"]
        .as_str()
        .unwrap()
        .ends_with("extra.yaml"));
    assert_eq!(e["diagnostics"][0]["position"]["line"], 7);
    assert_eq!(h.bundle().await, v2);
    assert_eq!(
        std::fs::read_to_string(h.policies.join("extra.yaml")).unwrap(),
        new
    );
    // Listing, versions, bundle with ETag.
    let list: Value = h.get_json("/v1/policies").await;
    assert_eq!(list["policies"].as_array().unwrap().len(), 2);
    let versions: Value = h.get_json("/v1/policies/base/versions").await;
    assert_eq!(versions["versions"].as_array().unwrap().len(), 2);
    let r = h.client.get(h.url("/v1/bundle")).send().await.unwrap();
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(etag, format!("\"{v2}\""));
    let files: Value = r.json().await.unwrap();
    assert_eq!(files["files"].as_array().unwrap().len(), 2);
    let r = h
        .client
        .get(h.url("/v1/bundle"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    // Rollback of base (never changed): nothing earlier. Change it, then roll it back.
    let r = h
        .client
        .post(h.url("/v1/policies/base/rollback"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let changed = base().replace("too many requests", "slow down");
    let r = h
        .client
        .put(h.url("/v1/policies/base"))
        .bearer_auth(TOKEN)
        .body(changed)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = h
        .client
        .post(h.url("/v1/policies/base/rollback"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(h.bundle().await, v2, "rolling back restores the bundle");
    assert!(std::fs::read_to_string(h.policies.join("base.yaml"))
        .unwrap()
        .contains("too many requests"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_refused_without_a_configured_token() {
    let h = Harness::start(&[("base.yaml", &base())], |c| c.admin_token_file = None).await;
    let r = h
        .client
        .put(h.url("/v1/policies/base"))
        .bearer_auth(TOKEN)
        .body(base())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = h.client.post(h.url("/v1/reload")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_swaps_good_bundles_and_keeps_serving_through_bad_ones() {
    let h = Harness::start(&[("base.yaml", &base())], |_| {}).await;
    let mut c = h.grpc().await;
    let v1 = h.bundle().await;
    let req = || {
        check_request(
            "POST",
            "/v1/chat/completions",
            &[],
            &chat("gpt-4o-mini", "hi"),
        )
    };
    assert!(check(&mut c, req()).await.allowed);
    // Good change: picked up by the watcher.
    std::fs::write(
        h.policies.join("base.yaml"),
        base().replace("'gpt-4o-mini', ", ""),
    )
    .unwrap();
    let v2 = h.wait_for_new_bundle(&v1).await;
    assert_eq!(v2["version"], 2);
    assert!(!check(&mut c, req()).await.allowed);
    // Bad change: rejected, counted, v2 keeps serving.
    std::fs::write(h.policies.join("base.yaml"), "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: base}\nspec:\n  rules: [{id: x, when: {cel: 'request.model =='}, action: {decision: deny}}]\n").unwrap();
    for _ in 0..100 {
        if h.metric(r#"llm_policy_reloads_total{result="error"}"#)
            .await
            >= 1.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        h.metric(r#"llm_policy_reloads_total{result="error"}"#)
            .await,
        1.0
    );
    assert_eq!(h.bundle().await, v2["bundle"].as_str().unwrap());
    assert!(!check(&mut c, req()).await.allowed);
    // The API reports the rejection with its location.
    let r = h
        .client
        .post(h.url("/v1/reload"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let e: Value = r.json().await.unwrap();
    assert!(e["diagnostics"][0]["file"]
        .as_str()
        .unwrap()
        .ends_with("base.yaml"));
    assert_eq!(e["diagnostics"][0]["position"]["line"], 5);
    h.stop().await;
}

/// A counter store that never answers in time.
struct SlowStore;

type StoreResult<T> = Result<T, StoreError>;

impl CounterStore for SlowStore {
    fn peek<'a>(&'a self, c: &'a Charge, now: u64) -> StoreFuture<'a, StoreResult<Reserved>> {
        self.reserve(c, now)
    }
    fn reserve<'a>(&'a self, _: &'a Charge, _: u64) -> StoreFuture<'a, StoreResult<Reserved>> {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Err(StoreError::Redis(RedisError::Timeout(30_000)))
        })
    }
    fn reserve_all<'a>(
        &'a self,
        _: &'a [Charge],
        _: u64,
    ) -> StoreFuture<'a, StoreResult<Vec<Reserved>>> {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Err(StoreError::Redis(RedisError::Timeout(30_000)))
        })
    }
    fn commit(&self, _: ReservationId, _: Option<f64>) -> StoreFuture<'_, StoreResult<()>> {
        Box::pin(async { Ok(()) })
    }
    fn release(&self, _: ReservationId) -> StoreFuture<'_, StoreResult<()>> {
        Box::pin(async { Ok(()) })
    }
    fn hold<'a>(
        &'a self,
        _: &'a str,
        _: &'a [(ReservationId, CounterKind)],
    ) -> StoreFuture<'a, Result<bool, StoreError>> {
        Box::pin(async { Ok(false) })
    }
    fn held<'a>(&'a self, _: &'a str) -> StoreFuture<'a, Result<Option<Held>, StoreError>> {
        Box::pin(async { Ok(None) })
    }
    fn forget<'a>(&'a self, _: &'a str) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }
    fn expire(&self, _: u64, _: u64, _: bool) -> StoreFuture<'_, usize> {
        Box::pin(async { 0 })
    }
    fn state<'a>(
        &'a self,
        _: &'a str,
        _: u64,
    ) -> StoreFuture<'a, Result<Option<CounterState>, StoreError>> {
        Box::pin(async { Ok(None) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_never_outlives_its_deadline_and_follows_the_failure_mode() {
    use llm_policy_server::server::{audit, cache, config, engine, metrics, registry};
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.yaml"), base()).unwrap();
    for mode in [FailureMode::Closed, FailureMode::Open] {
        let reg = Arc::new(registry::Registry::new(
            dir.path().to_path_buf(),
            Default::default(),
            3,
        ));
        reg.reload().unwrap();
        let m = metrics::Metrics::new().unwrap();
        let audit_config = config::AuditConfig {
            stdout: false,
            ..Default::default()
        };
        let (a, writer) = audit::start(&audit_config, m.clone(), None).unwrap();
        let e = engine::Engine::new(
            reg,
            Arc::new(SlowStore),
            cache::Caches::new(&Default::default()),
            m.clone(),
            a,
            config::CheckConfig {
                deadline_ms: 100,
                failure_mode: mode,
            },
            Default::default(),
        );
        let started = std::time::Instant::now();
        let out = e
            .check(engine::CheckInput {
                method: "POST".into(),
                path: "/v1/chat/completions".into(),
                headers: vec![("x-user-id".into(), "u".into())],
                body: chat("gpt-4o", "hi").into_bytes(),
                charge: true,
                ..Default::default()
            })
            .await;
        assert!(started.elapsed() < Duration::from_secs(2));
        match mode {
            FailureMode::Closed => {
                let r = out.reply.unwrap();
                assert_eq!(r.status, 503);
                assert!(r.body.contains("did not finish in time"));
            }
            FailureMode::Open => {
                assert!(out.reply.is_none());
                assert!(out
                    .upstream
                    .contains(&("x-llm-policy-decision".into(), "error".into())));
            }
        }
        assert_eq!(m.check_errors.with_label_values(&["deadline"]).get(), 1);
        // Requests no rule limits never touch the store.
        let out = e
            .check(engine::CheckInput {
                method: "POST".into(),
                path: "/v1/chat/completions".into(),
                body: chat("gpt-4o", "hi").into_bytes(),
                ..Default::default()
            })
            .await;
        assert!(out.reply.is_none() && out.decision.is_some());
        drop(e);
        writer.shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_first_good_load_then_health_serves() {
    let bad = "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: base}\nspec: {rules: [{id: x, when: {cel: 'nope('}, action: {decision: deny}}]}\n";
    let h = Harness::start(&[("base.yaml", bad)], |_| {}).await;
    let r = h.client.get(h.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let mut c = h.grpc().await;
    let a = check(
        &mut c,
        check_request("POST", "/v1/chat/completions", &[], &chat("gpt-4o", "hi")),
    )
    .await;
    assert_eq!(a.status, 503, "closed by default while nothing is loaded");
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", h.running.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let svc = "envoy.service.auth.v3.Authorization";
    let status =
        |s: i32| tonic_health::pb::health_check_response::ServingStatus::try_from(s).unwrap();
    let got = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: svc.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status(got.status),
        tonic_health::pb::health_check_response::ServingStatus::NotServing
    );
    std::fs::write(h.policies.join("base.yaml"), base()).unwrap();
    h.wait_for_new_bundle("").await;
    let mut serving = false;
    for _ in 0..50 {
        let got = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: svc.into(),
            })
            .await
            .unwrap()
            .into_inner();
        if status(got.status) == tonic_health::pb::health_check_response::ServingStatus::Serving {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(serving);
    assert!(
        check(
            &mut c,
            check_request("POST", "/v1/chat/completions", &[], &chat("gpt-4o", "hi"))
        )
        .await
        .allowed
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_spend_nothing_and_a_pinned_time_never_resets_a_counter() {
    let h = Harness::start(&[("base.yaml", &base())], |_| {}).await;
    let eval = |q: &'static str, token: bool, now: Option<i64>| {
        let mut body = json!({"headers": {"x-user-id": "carol"}, "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}});
        if let Some(n) = now {
            body["now"] = json!(n);
        }
        let mut r = h
            .client
            .post(h.url(&format!("/v1/evaluate{q}")))
            .json(&body);
        if token {
            r = r.bearer_auth(TOKEN);
        }
        r.send()
    };
    // Dry runs read the counter and spend nothing.
    for _ in 0..5 {
        let d: Value = eval("", false, None).await.unwrap().json().await.unwrap();
        assert_eq!(d["decision"], "allow");
    }
    let mut c = h.grpc().await;
    let user = [("x-user-id", "carol")];
    for _ in 0..3 {
        assert!(
            check(
                &mut c,
                check_request("POST", "/v1/chat/completions", &user, &chat("gpt-4o", "hi"))
            )
            .await
            .allowed
        );
    }
    let d: Value = eval("", false, None).await.unwrap().json().await.unwrap();
    assert_eq!(
        d["decision"], "throttle",
        "the dry run sees the spent counter"
    );
    // Spending through the API needs the token.
    assert_eq!(
        eval("?charge=true", false, None).await.unwrap().status(),
        401
    );
    // A request pinned to 1970 is evaluated then, but counted now: no fresh window.
    let d: Value = eval("?charge=true", true, Some(0))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(d["decision"], "throttle");
    assert!(
        !check(
            &mut c,
            check_request("POST", "/v1/chat/completions", &user, &chat("gpt-4o", "hi"))
        )
        .await
        .allowed
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_evaluation_is_answered_by_the_failure_mode_and_charges_nothing() {
    let h = Harness::start(&[("base.yaml", &base())], |c| c.check.deadline_ms = 1).await;
    let mut c = h.grpc().await;
    // Parsing and scanning 3 MB takes longer than 1 ms (on the blocking pool).
    let big = chat("gpt-4o", &"lorem ipsum dolor sit amet ".repeat(110_000));
    let a = check(
        &mut c,
        check_request(
            "POST",
            "/v1/chat/completions",
            &[("x-user-id", "dave")],
            &big,
        ),
    )
    .await;
    assert_eq!(a.status, 503, "{a:?}");
    assert_eq!(a.json()["error"]["code"], "policy_unavailable");
    assert_eq!(
        h.metric(r#"llm_policy_check_errors_total{kind="deadline"}"#)
            .await,
        1.0
    );
    h.stop().await;
}

/// The llm-policy filter counts `scope: local` limits itself and says so in the Check's context
/// extensions (which only the proxy's configuration sets): the server answers those rules from
/// what the filter reported and counts only the global ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_limits_counted_by_the_filter_are_not_counted_again() {
    let rules = r#"
    - id: local-two
      priority: 50
      when: { match: { field: principal.id, op: exists } }
      action:
        decision: throttle
        reason: "local limit"
        rateLimit: { key: "{principal.id}", requests: 2, per: minute, scope: local }
"#;
    let h = Harness::start(&[("p.yaml", &policy("p", "allow", rules))], |_| {}).await;
    let mut c = h.grpc().await;
    let req = |over: Option<&str>| {
        let mut r = check_request(
            "POST",
            "/v1/chat/completions",
            &[("x-user-id", "carol")],
            &chat("gpt-4o", "hi"),
        );
        if let (Some(over), Some(a)) = (over, r.attributes.as_mut()) {
            a.context_extensions
                .insert("llm-policy.local-counters".into(), "proxy".into());
            a.context_extensions
                .insert("llm-policy.local-over".into(), over.into());
        }
        r
    };
    // Counted by the filter, under: allowed however many times.
    for _ in 0..5 {
        assert!(check(&mut c, req(Some("{}"))).await.allowed);
    }
    // The filter says the counter is over: throttled with the filter's counter state.
    let a = check(&mut c, req(Some(r#"{"local-two": [2, 0, 42]}"#))).await;
    assert!(!a.allowed);
    assert_eq!(a.status, 429);
    assert_eq!(a.header("retry-after"), Some("42"));
    assert_eq!(a.header("x-ratelimit-limit"), Some("2"));
    // Without the extension (ext_authz alone) the server counts: two, then throttled.
    assert!(check(&mut c, req(None)).await.allowed);
    assert!(check(&mut c, req(None)).await.allowed);
    assert!(!check(&mut c, req(None)).await.allowed);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_turns_a_namespace_to_default_deny_is_served_with_a_warning() {
    let h = Harness::start(&[("base.yaml", &base())], |_| {}).await;
    // The new policy leaves `defaultDecision` out: deny, for the whole namespace.
    let silent = "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: extra}\nspec:\n  rules:\n    - { id: no-o1, when: { match: { field: request.model, op: eq, value: o1 } }, action: { decision: deny } }\n";
    let r = h
        .client
        .put(h.url("/v1/policies/extra"))
        .bearer_auth(TOKEN)
        .body(silent)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let warnings = v["warnings"].as_array().unwrap();
    let w = warnings
        .iter()
        .find(|w| w["code"] == "mixed-default-decision")
        .unwrap_or_else(|| panic!("no warning in {v}"));
    assert!(w["file"].as_str().unwrap().ends_with("extra.yaml"), "{w}");
    assert!(w["message"].as_str().unwrap().contains("base.yaml"), "{w}");
    h.stop().await;
}
