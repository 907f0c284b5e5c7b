//! Replicas sharing one real redis-server (started per test on a free loopback port): counters
//! and budgets, usage reports, the L4 cache, the shared registry, the audit stream, and Redis
//! going away and coming back.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::redis_server::RedisServer;
use common::{chat, check, check_request, policy, Harness, TOKEN};
use llm_policy_core::decision::{Charge, ChargeSource, CounterKind};
use llm_policy_core::model::Scope;
use llm_policy_server::server::config::{Config, FailureMode};
use llm_policy_server::server::limits::redis_store::{tag_of, RedisStore};
use llm_policy_server::server::limits::{CounterStore, ReservationId, StoreError};
use llm_policy_server::server::metrics::Metrics;
use llm_policy_server::server::redis::{Redis, RedisConfig, StreamConfig};

/// `name(server)` run three times: on a standalone redis-server, on a three-node Redis Cluster,
/// and on a master found through Redis Sentinel.
macro_rules! both {
    ($name:ident) => {
        mod $name {
            use super::RedisServer;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn standalone() {
                super::$name(RedisServer::start()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn cluster() {
                super::$name(RedisServer::cluster()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sentinel() {
                super::$name(RedisServer::sentinel()).await;
            }
        }
    };
}

both!(a_hierarchy_is_charged_all_or_nothing_across_replicas);
both!(three_replicas_never_overshoot_a_shared_budget);
both!(a_request_limit_allows_exactly_n_and_peeks_reserve_nothing);
both!(usage_handles_are_taken_once_and_expiry_settles);
both!(a_rate_limit_of_n_allows_exactly_n_across_three_replicas);
both!(a_budget_holds_across_replicas_and_usage_is_reported_to_any_of_them);
both!(decisions_are_shared_through_the_l4_cache_and_records_reach_the_stream);
both!(a_write_on_one_replica_reaches_the_others_and_a_bad_one_reaches_none);

fn charge(key: &str, amount: f64, limit: f64) -> Charge {
    Charge {
        rule: "r".into(),
        source: ChargeSource::Budget,
        key: key.into(),
        kind: CounterKind::Tokens,
        limit,
        window_secs: 3600,
        amount,
        scope: Scope::Global,
        output: 0,
        per_output: 0.0,
        fit: None,
        headers: false,
    }
}

/// Failed counter calls, every kind.
fn counter_errors(metrics: &Metrics) -> u64 {
    ["timeout", "unavailable", "error"]
        .iter()
        .map(|k| {
            metrics
                .redis_errors
                .with_label_values(&["counters", k])
                .get()
        })
        .sum()
}

fn store(server: &RedisServer, timeout_ms: u64) -> (RedisStore, Metrics) {
    let metrics = Metrics::new().unwrap();
    let mut config = RedisConfig {
        timeout_ms,
        backoff_ms: 100,
        ..RedisConfig::default()
    };
    server.apply(&mut config);
    let redis = Redis::connect(&config, metrics.clone()).unwrap().unwrap();
    (RedisStore::new(redis, 300), metrics)
}

async fn a_hierarchy_is_charged_all_or_nothing_across_replicas(server: RedisServer) {
    // user 1,000 / team 1,500, 100 tokens a request; two users, three replicas, at once.
    let stores: Vec<Arc<RedisStore>> = (0..3).map(|_| Arc::new(store(&server, 1000).0)).collect();
    let of = |user: &str| {
        vec![
            charge(&format!("ns/user/{user}"), 100.0, 1000.0),
            charge("ns/team/t", 100.0, 1500.0),
        ]
    };
    let mut tasks = Vec::new();
    for i in 0..60 {
        let s = Arc::clone(&stores[i % 3]);
        let charges = of(if i % 2 == 0 { "a" } else { "b" });
        tasks.push(tokio::spawn(async move {
            let r = s.reserve_all(&charges, 0).await.unwrap();
            r.iter()
                .all(|r| r.reservation.is_some_and(|id| id != ReservationId::NONE))
        }));
    }
    let mut granted = 0;
    for t in tasks {
        if t.await.unwrap() {
            granted += 1;
        }
    }
    assert_eq!(granted, 15);
    let team = stores[0].usage("ns/team/t", 3600).await.unwrap();
    let a = stores[1].usage("ns/user/a", 3600).await.unwrap();
    let b = stores[2].usage("ns/user/b", 3600).await.unwrap();
    assert_eq!(team, (0.0, 1500.0));
    assert_eq!(a.1 + b.1, 1500.0);
    assert!(a.1 <= 1000.0 && b.1 <= 1000.0);
    // A stopped batch reserved nothing.
    let r = stores[0].reserve_all(&of("c"), 0).await.unwrap();
    assert_eq!(r[0].reservation, Some(ReservationId::NONE));
    assert_eq!(r[1].reservation, None);
    assert_eq!(
        stores[0].usage("ns/user/c", 3600).await.unwrap(),
        (0.0, 0.0)
    );
}

async fn three_replicas_never_overshoot_a_shared_budget(server: RedisServer) {
    // Three stores, three connections: what three server processes would hold.
    let replicas: Vec<Arc<RedisStore>> = (0..3).map(|_| Arc::new(store(&server, 1000).0)).collect();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let s = Arc::clone(&replicas[i % 3]);
        tasks.push(tokio::spawn(async move {
            s.reserve(&charge("t/budget", 7.0, 1000.0), 0)
                .await
                .unwrap()
                .reservation
        }));
    }
    let mut granted = Vec::new();
    for t in tasks {
        if let Some(id) = t.await.unwrap() {
            granted.push(id);
        }
    }
    // 142 × 7 = 994 ≤ 1000 < 143 × 7.
    assert_eq!(granted.len(), 142);
    let ids: std::collections::HashSet<_> = granted.iter().collect();
    assert_eq!(ids.len(), 142, "reservation ids are unique across replicas");
    assert_eq!(
        replicas[0].usage("t/budget", 3600).await.unwrap(),
        (0.0, 994.0)
    );
    // Settled on other replicas than the one that reserved.
    for (i, id) in granted.iter().enumerate() {
        let s = &replicas[(i + 1) % 3];
        if i % 2 == 0 {
            s.commit(*id, Some(1.0)).await.unwrap();
        } else {
            s.release(*id).await.unwrap();
        }
    }
    assert_eq!(
        replicas[2].usage("t/budget", 3600).await.unwrap(),
        (71.0, 0.0)
    );
    // Settling twice changes nothing.
    replicas[1].commit(granted[0], Some(500.0)).await.unwrap();
    assert_eq!(replicas[1].usage("t/budget", 3600).await.unwrap().0, 71.0);
}

async fn a_request_limit_allows_exactly_n_and_peeks_reserve_nothing(server: RedisServer) {
    let (s, _) = store(&server, 1000);
    let mut c = charge("t/rpm", 1.0, 5.0);
    c.kind = CounterKind::Requests;
    c.window_secs = 60;
    let p = s.peek(&c, 0).await.unwrap();
    assert!(p.reservation.is_some());
    assert_eq!(p.state.remaining, 4.0);
    let mut allowed = 0;
    for _ in 0..8 {
        if let Some(id) = s.reserve(&c, 0).await.unwrap().reservation {
            s.commit(id, None).await.unwrap();
            allowed += 1;
        }
    }
    assert_eq!(allowed, 5);
    let over = s.reserve(&c, 0).await.unwrap();
    assert!(over.reservation.is_none());
    assert_eq!(over.state.remaining, 0.0);
    // The sliding window frees up its oldest slot (6 s of the minute) within a minute and a slot.
    assert!(over.state.reset_secs <= 60 + 6 + 1 && over.state.reset_secs >= 1);
}

async fn usage_handles_are_taken_once_and_expiry_settles(server: RedisServer) {
    let (a, _) = store(&server, 1000);
    let (b, _) = store(&server, 1000);
    let r = a.reserve(&charge("t/u", 100.0, 1000.0), 0).await.unwrap();
    let id = r.reservation.unwrap();
    assert!(a.hold("h1", &[(id, CounterKind::Tokens)]).await.unwrap());
    // Another replica reads it; once forgotten, it is gone.
    assert_eq!(
        b.held("h1").await.unwrap(),
        Some(vec![(id, CounterKind::Tokens)])
    );
    b.forget("h1").await.unwrap();
    assert_eq!(b.held("h1").await.unwrap(), None);
    // Reservations older than the timeout are settled by whichever replica expires first.
    let r2 = a.reserve(&charge("t/u", 50.0, 1000.0), 0).await.unwrap();
    assert!(r2.reservation.is_some());
    assert_eq!(b.expire(0, 3600, true).await, 0, "not old yet");
    // A timeout of 0 s: everything made before this second.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(b.expire(0, 0, true).await, 2);
    assert_eq!(a.usage("t/u", 3600).await.unwrap(), (150.0, 0.0));
}

#[tokio::test]
async fn redis_down_fails_fast_and_recovers_by_itself() {
    let mut server = RedisServer::start();
    let (s, metrics) = store(&server, 50);
    assert!(s.reserve(&charge("t/d", 1.0, 10.0), 0).await.is_ok());
    server.kill();
    let started = std::time::Instant::now();
    for _ in 0..20 {
        assert!(s.reserve(&charge("t/d", 1.0, 10.0), 0).await.is_err());
    }
    // Each call is bounded by the deadline; after the first, calls fail at once.
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    let errors = counter_errors(&metrics);
    assert_eq!(errors, 20);
    server.restart();
    let back = async {
        loop {
            if s.reserve(&charge("t/d", 1.0, 10.0), 0).await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), back)
        .await
        .expect("the store works again once Redis is back");
}

const LIMITED: &str = r#"
    - id: per-team-rate
      priority: 50
      when: { match: { field: principal.team, op: eq, value: search } }
      action:
        decision: throttle
        reason: "the team's request rate is spent"
        rateLimit: { key: "{principal.team}", requests: 10, per: minute }
    - id: research-budget
      priority: 40
      when: { match: { field: principal.team, op: eq, value: research } }
      action:
        decision: throttle
        reason: "the research budget is spent"
        budget: { key: "{principal.team}", tokens: 1000, per: hour }
    - id: no-gpt-5
      priority: 100
      when: { match: { field: request.model, op: eq, value: gpt-5 } }
      action: { decision: deny, reason: "no gpt-5" }
"#;

/// `n` servers (their own engines and caches) sharing `server`'s Redis.
async fn replicas(server: &RedisServer, n: usize, tweak: fn(&mut Config)) -> Vec<Harness> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut redis = RedisConfig::default();
        server.apply(&mut redis);
        out.push(
            Harness::start(
                &[("base.yaml", &policy("base", "allow", LIMITED))],
                move |c| {
                    c.redis = redis;
                    // Room for a 2-core machine under a full test run: these tests count
                    // decisions, not latency (fail-closed answers would be miscounted).
                    c.redis.timeout_ms = 1000;
                    c.redis.audit = Some(StreamConfig::default());
                    c.redis.registry = true;
                    c.redis.cache.enabled = true;
                    tweak(c);
                },
            )
            .await,
        );
    }
    out
}

fn team(team: &str) -> Vec<(&'static str, String)> {
    vec![("x-team-id", team.to_string())]
}

async fn check_as(h: &Harness, team_id: &str, body: &str) -> common::Answer {
    let mut c = h.grpc().await;
    let headers = team(team_id);
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    check(
        &mut c,
        check_request("POST", "/v1/chat/completions", &headers, body),
    )
    .await
}

async fn a_rate_limit_of_n_allows_exactly_n_across_three_replicas(server: RedisServer) {
    let rs = replicas(&server, 3, |_| {}).await;
    let mut tasks = Vec::new();
    for i in 0..30 {
        let mut c = rs[i % 3].grpc().await;
        tasks.push(tokio::spawn(async move {
            check(
                &mut c,
                check_request(
                    "POST",
                    "/v1/chat/completions",
                    &[("x-team-id", "search")],
                    &chat("gpt-4o", "hi"),
                ),
            )
            .await
        }));
    }
    let mut allowed = 0;
    let mut throttled = 0;
    for t in tasks {
        let a = t.await.unwrap();
        if a.allowed {
            allowed += 1;
        } else {
            assert_eq!(a.status, 429, "{a:?}");
            throttled += 1;
        }
    }
    assert_eq!((allowed, throttled), (10, 20));
    for h in rs {
        h.stop().await;
    }
}

async fn a_budget_holds_across_replicas_and_usage_is_reported_to_any_of_them(server: RedisServer) {
    let rs = replicas(&server, 3, |_| {}).await;
    // Each request reserves its estimate: max_tokens 90 (+ the prompt's few tokens).
    let body = r#"{"model":"gpt-4o","max_tokens":90,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut tasks = Vec::new();
    for i in 0..60 {
        let mut c = rs[i % 3].grpc().await;
        tasks.push(tokio::spawn(async move {
            check(
                &mut c,
                check_request(
                    "POST",
                    "/v1/chat/completions",
                    &[("x-team-id", "research")],
                    body,
                ),
            )
            .await
        }));
    }
    let mut handles = Vec::new();
    let mut refused = Vec::new();
    for t in tasks {
        let a = t.await.unwrap();
        if a.allowed {
            handles.push(a.reservation.unwrap());
        } else {
            refused.push(a.status);
        }
    }
    // 1000 tokens / ~91 per request: at most 10 fit, never more, whichever replica asked.
    assert!(
        (9..=10).contains(&handles.len()) && refused.iter().all(|s| *s == 429),
        "allowed {}, refused with {refused:?}",
        handles.len()
    );
    // Usage reported to another replica than the one that reserved settles the reservation.
    for (i, h) in handles.iter().enumerate() {
        let r = rs[(i + 1) % 3]
            .client
            .post(rs[(i + 1) % 3].url("/v1/usage"))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({"requestId": h, "tokens": 10}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }
    // 10 tokens spent per request now: there is room again.
    let a = check_as(&rs[2], "research", body).await;
    assert!(a.allowed, "{a:?}");
    for h in rs {
        h.stop().await;
    }
}

async fn decisions_are_shared_through_the_l4_cache_and_records_reach_the_stream(
    server: RedisServer,
) {
    let rs = replicas(&server, 2, |_| {}).await;
    let a = check_as(&rs[0], "x", &chat("gpt-5", "hello")).await;
    assert_eq!(a.status, 403);
    // The write to L4 is in the background.
    let mut hit = false;
    for _ in 0..50 {
        let b = check_as(&rs[1], "x", &chat("gpt-5", "hello")).await;
        assert_eq!(b.status, 403);
        if rs[1]
            .metric(r#"llm_policy_cache_requests_total{level="l4",result="hit"}"#)
            .await
            >= 1.0
        {
            hit = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        // A later lookup on replica 1 would be an L1 hit: ask a fresh prompt-equal request
        // through replica 1's caches only after the first one missed.
    }
    assert!(hit, "replica 1 never saw replica 0's decision in L4");
    // Audit records of both replicas are in the stream.
    let mut conn = server.conn();
    let mut n = 0;
    for _ in 0..50 {
        n = redis::cmd("XLEN")
            .arg("llm-policy:audit")
            .query::<u64>(&mut *conn)
            .unwrap();
        if n >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(n >= 2, "stream length {n}");
    let entries: Vec<(String, Vec<(String, String)>)> = {
        let v: redis::Value = redis::cmd("XRANGE")
            .arg("llm-policy:audit")
            .arg("-")
            .arg("+")
            .query(&mut *conn)
            .unwrap();
        redis::FromRedisValue::from_redis_value(v).unwrap()
    };
    let record: serde_json::Value = serde_json::from_str(&entries[0].1[0].1).unwrap();
    assert_eq!(record["decision"], "deny");
    assert_eq!(record["matched_rules"][0], "no-gpt-5");
    for h in rs {
        h.stop().await;
    }
}

async fn a_write_on_one_replica_reaches_the_others_and_a_bad_one_reaches_none(server: RedisServer) {
    let rs = replicas(&server, 3, |_| {}).await;
    let before: Vec<String> = {
        let mut v = Vec::new();
        for h in &rs {
            v.push(h.bundle().await);
        }
        v
    };
    assert!(before.iter().all(|b| *b == before[0]));
    let new = policy(
        "base",
        "allow",
        &LIMITED.replace("value: gpt-5 }", "value: gpt-6 }"),
    );
    let put = |h: &Harness, text: String| {
        h.client
            .put(h.url("/v1/policies/base"))
            .bearer_auth(TOKEN)
            .body(text)
            .send()
    };
    let r = put(&rs[0], new.clone()).await.unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    for h in &rs {
        h.wait_for_new_bundle(&before[0]).await;
        let a = check_as(h, "x", &chat("gpt-6", "hello")).await;
        assert_eq!(a.status, 403, "the new rule serves on every replica");
    }
    let after = rs[1].bundle().await;
    // A broken policy is refused where it is written, and never published.
    let r = put(&rs[1], String::from("apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: base}\nspec: {rules: [{id: x, when: {cel: 'request.model =='}, action: {decision: deny}}]}\n"))
        .await
        .unwrap();
    assert_eq!(r.status(), 422, "{}", r.text().await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    for h in &rs {
        assert_eq!(h.bundle().await, after);
    }
    // A bad revision written straight into Redis (not through a replica) serves nowhere.
    let mut conn = server.conn();
    // The registry's keys: one hash tag on a cluster, the names of earlier releases otherwise.
    let bundle = if server.is_cluster() {
        "llm-policy:{bundle}"
    } else {
        "llm-policy:bundle"
    };
    let head: String = redis::cmd("GET")
        .arg(format!("{bundle}:head"))
        .query(&mut *conn)
        .unwrap();
    let n: u64 = head.split(':').next().unwrap().parse().unwrap();
    let bad_id = format!("{}:badbadbad", n + 100);
    let bad =
        serde_json::json!({"files": [["base.yaml", "spec: [oops"]], "origin": "api", "at": 0});
    let _: () = redis::cmd("SET")
        .arg(format!("{bundle}:rev:{bad_id}"))
        .arg(bad.to_string())
        .query(&mut *conn)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{bundle}:head"))
        .arg(&bad_id)
        .query(&mut *conn)
        .unwrap();
    let _: () = redis::cmd("PUBLISH")
        .arg("llm-policy:bundle")
        .arg(&bad_id)
        .query(&mut *conn)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for h in &rs {
        assert_eq!(
            h.bundle().await,
            after,
            "the last good version keeps serving"
        );
        assert!(
            h.metric(r#"llm_policy_reloads_total{result="error"}"#)
                .await
                >= 1.0
        );
    }
    for h in rs {
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_going_away_follows_the_failure_mode_and_service_comes_back() {
    let mut server = RedisServer::start();
    let open = replicas(&server, 1, |c| {
        c.limits.failure_mode = Some(FailureMode::Open);
        c.redis.timeout_ms = 50;
    })
    .await;
    let closed = replicas(&server, 1, |c| {
        c.limits.failure_mode = Some(FailureMode::Closed);
        c.redis.timeout_ms = 50;
    })
    .await;
    assert!(
        check_as(&open[0], "search", &chat("gpt-4o", "a"))
            .await
            .allowed
    );
    server.kill();
    let started = std::time::Instant::now();
    for i in 0..20 {
        // Fresh prompts: no cache answers.
        let body = chat("gpt-4o", &format!("p{i}"));
        let a = check_as(&open[0], "search", &body).await;
        assert!(a.allowed, "fail-open lets the limit pass: {a:?}");
        let b = check_as(&closed[0], "search", &body).await;
        assert_eq!(b.status, 503, "fail-closed: {b:?}");
        // Rules that need no counter still decide.
        let c = check_as(&closed[0], "x", &chat("gpt-5", &format!("p{i}"))).await;
        assert_eq!(c.status, 403);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "checks never wait long for a dead Redis: {:?}",
        started.elapsed()
    );
    assert!(
        open[0]
            .metric(r#"llm_policy_counter_errors_total{result="open"}"#)
            .await
            >= 20.0
    );
    let errors = open[0].metrics().await;
    assert!(
        errors.contains("llm_policy_redis_errors_total{feature=\"counters\""),
        "{errors}"
    );
    server.restart();
    let mut back = false;
    for _ in 0..100 {
        let a = check_as(&closed[0], "search", &chat("gpt-4o", "back")).await;
        if a.allowed {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "limits work again once Redis is back");
    // The restarted (empty) Redis is seeded again with the bundle serving.
    let mut conn = server.conn();
    let mut seeded = false;
    for _ in 0..50 {
        let head: Option<String> = redis::cmd("GET")
            .arg("llm-policy:bundle:head")
            .query(&mut *conn)
            .unwrap();
        if head.is_some() {
            seeded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seeded);
    for h in open.into_iter().chain(closed) {
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_never_answers_does_not_hold_up_the_other_audit_sinks() {
    use llm_policy_server::server::audit::{self, Record, StreamSink};
    use llm_policy_server::server::config::{AuditConfig, FileSinkConfig};
    // Accepts connections, never answers: a black-holed Redis.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let metrics = Metrics::new().unwrap();
    let redis = Redis::connect(
        &RedisConfig {
            url: Some(format!("redis://127.0.0.1:{port}")),
            ..RedisConfig::default()
        },
        metrics.clone(),
    )
    .unwrap()
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.log");
    let config = AuditConfig {
        stdout: false,
        file: Some(FileSinkConfig {
            path: file.clone(),
            max_bytes: 1 << 30,
            keep: 1,
        }),
        ..AuditConfig::default()
    };
    let stream = StreamSink::new(redis, &StreamConfig::default());
    let (a, writer) = audit::start(&config, metrics.clone(), Some(stream)).unwrap();
    let started = std::time::Instant::now();
    for i in 0..5000 {
        a.record(Record {
            kind: "decision",
            id: i.to_string(),
            ..Record::default()
        });
        if i % 500 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    tokio::time::timeout(
        Duration::from_secs(10),
        writer.shutdown(Duration::from_secs(5)),
    )
    .await
    .expect("the audit writer stops although Redis never answers");
    // The file has every record, whatever the stream could not take.
    let lines = std::fs::read_to_string(&file).unwrap().lines().count();
    assert_eq!(lines, 5000, "after {:?}", started.elapsed());
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_cluster_namespaces_spread_over_the_nodes_and_a_request_stays_on_one() {
    let server = RedisServer::cluster();
    let (s, _) = store(&server, 1000);
    for n in 0..32 {
        // A hierarchy of two counters per namespace, charged in one call.
        let charges = vec![
            charge(&format!("ns{n}/user/a"), 1.0, 10.0),
            charge(&format!("ns{n}/team/t"), 1.0, 10.0),
        ];
        let granted = s.reserve_all(&charges, 0).await.unwrap();
        for r in granted {
            let id = r.reservation.unwrap();
            assert_ne!(id, ReservationId::NONE);
            s.commit(id, Some(2.0)).await.unwrap();
        }
        assert_eq!(
            s.usage(&format!("ns{n}/team/t"), 3600).await.unwrap(),
            (2.0, 0.0)
        );
    }
    // Every node serves some of the namespaces' counters.
    let RedisServer::Cluster(cluster) = &server else {
        unreachable!()
    };
    let mut per_node = Vec::new();
    for url in cluster.urls() {
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("llm-policy:{c*}:c:*")
            .query(&mut conn)
            .unwrap();
        per_node.push(keys.len());
    }
    assert_eq!(per_node.iter().sum::<usize>(), 64, "{per_node:?}");
    assert!(per_node.iter().all(|n| *n > 0), "{per_node:?}");
    // Counters of two namespaces are never charged apart: refused as a whole.
    let other = (0..)
        .map(|n| format!("other{n}/x/1"))
        .find(|k| tag_of(k) != tag_of("ns0/x/1"))
        .unwrap();
    let mixed = vec![charge("ns0/x/1", 1.0, 10.0), charge(&other, 1.0, 10.0)];
    assert!(matches!(
        s.reserve_all(&mixed, 0).await,
        Err(StoreError::Spread(_))
    ));
    assert_eq!(s.usage("ns0/x/1", 3600).await.unwrap(), (0.0, 0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_node_down_fails_its_namespaces_fast_and_the_others_keep_counting() {
    let mut server = RedisServer::cluster();
    let (s, metrics) = store(&server, 100);
    let RedisServer::Cluster(cluster) = &mut server else {
        unreachable!()
    };
    let node = |key: &str| cluster.node_of(&format!("{{c{}}}", tag_of(key))).unwrap();
    let down = node("a/x/1");
    let up = (0..)
        .map(|n| format!("b{n}/x/1"))
        .find(|k| node(k) != down)
        .unwrap();
    assert!(s.reserve(&charge("a/x/1", 1.0, 100.0), 0).await.is_ok());
    assert!(s.reserve(&charge(&up, 1.0, 100.0), 0).await.is_ok());
    let up_url = cluster.urls()[node(&up)].clone();
    cluster.kill(down);
    let started = std::time::Instant::now();
    for _ in 0..5 {
        assert!(s.reserve(&charge("a/x/1", 1.0, 100.0), 0).await.is_err());
    }
    // Each call is bounded by its deadline (100 ms).
    assert!(
        started.elapsed() < Duration::from_millis(5 * 100 + 500),
        "{:?}",
        started.elapsed()
    );
    // A node that does not know the scripts (restarted, or a replica promoted in the failover)
    // learns them while another node is down: each call sends its script to its own node.
    let mut up_node = redis::Client::open(up_url.clone())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut up_node)
        .unwrap();
    // The namespaces on the other nodes are served all along.
    for _ in 0..10 {
        let r = s.reserve(&charge(&up, 1.0, 100.0), 0).await.unwrap();
        assert!(r.reservation.is_some());
        assert!(s.reserve(&charge("a/x/1", 1.0, 100.0), 0).await.is_err());
    }
    assert_eq!(s.usage(&up, 3600).await.unwrap(), (0.0, 11.0));
    let errors = counter_errors(&metrics);
    assert_eq!(errors, 15);
}

/// Allowed checks of team `search` (10 a minute) through `h` until `n` are allowed or one is
/// throttled, each within `within`; what each answer was.
async fn search_until(h: &Harness, n: usize, within: Duration) -> (usize, Vec<u16>) {
    let (mut allowed, mut statuses) = (0, Vec::new());
    let started = std::time::Instant::now();
    let mut i = 0;
    while allowed < n && started.elapsed() < within {
        i += 1;
        let a = check_as(h, "search", &chat("gpt-4o", &format!("s{i}"))).await;
        if a.allowed {
            allowed += 1;
        } else if a.status == 429 {
            statuses.push(429);
            break;
        } else {
            // Fail-closed (503) while the sentinels elect a new master.
            statuses.push(a.status);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    (allowed, statuses)
}

/// Waits until the master has sent its writes to the replica, so a failover keeps them (Redis
/// replicates asynchronously: writes of the last moments before a crash can be lost).
/// (`WAIT` waits for this connection's own writes: one is made, after every write before it.)
fn replicated(server: &RedisServer) {
    tokio::task::block_in_place(|| {
        let mut conn = server.conn();
        let _: () = redis::cmd("SET")
            .arg("llm-policy-test:mark")
            .arg(1)
            .query(&mut *conn)
            .unwrap();
        let acked: u64 = redis::cmd("WAIT")
            .arg(1)
            // After a failover, the old master becomes the new one's replica seconds later.
            .arg(30_000)
            .query(&mut *conn)
            .unwrap();
        assert_eq!(acked, 1, "the replica did not acknowledge the writes");
    })
}

async fn stream_len(server: &RedisServer) -> u64 {
    let mut conn = server.conn();
    redis::cmd("XLEN")
        .arg("llm-policy:audit")
        .query::<u64>(&mut *conn)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_sentinel_failover_counters_the_registry_and_audit_follow_the_new_master() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("llm_policy_server=info")
        .with_test_writer()
        .try_init();
    let mut server = RedisServer::sentinel();
    let rs = replicas(&server, 2, |c| c.redis.backoff_ms = 100).await;
    let RedisServer::Sentinel(sentinel) = &server else {
        unreachable!()
    };
    let first = sentinel.master_port().unwrap();
    let (allowed, statuses) = search_until(&rs[0], 4, Duration::from_secs(5)).await;
    assert_eq!((allowed, statuses.len()), (4, 0), "{statuses:?}");
    replicated(&server);

    // 1. A failover the sentinels are asked for: the old master lives on, writable, for
    //    seconds before the sentinels make it a replica.
    sentinel.failover().unwrap();
    let second = tokio::task::block_in_place(|| sentinel.wait_for_new_master(first)).unwrap();
    // The servers leave the old master within a few watch periods (250 ms each).
    tokio::time::sleep(Duration::from_millis(750)).await;
    // The count goes on where it was on the new master: 6 more, then the limit.
    let (allowed, statuses) = search_until(&rs[1], 10, Duration::from_secs(20)).await;
    assert_eq!(allowed, 6, "{statuses:?}");
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 429 || *s == 503),
        "{statuses:?}"
    );
    // Once the old master is a replica of the new one (what was written on it is gone), the
    // limit is still spent: those 6 were counted on the new master, not on the old one.
    replicated(&server);
    let (allowed, statuses) = search_until(&rs[0], 1, Duration::from_secs(10)).await;
    assert_eq!((allowed, statuses.last()), (0, Some(&429)), "{statuses:?}");
    let team: String = {
        let mut conn = server.conn();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("llm-policy:*search*")
            .query(&mut *conn)
            .unwrap();
        keys.join(",")
    };
    assert!(
        !team.is_empty(),
        "the counter is on the new master {second}"
    );

    // The registry: a write on one replica reaches the other through the new master.
    let before = rs[1].bundle().await;
    let r = rs[0]
        .client
        .put(rs[0].url("/v1/policies/base"))
        .bearer_auth(TOKEN)
        .body(policy(
            "base",
            "allow",
            &LIMITED.replace("value: gpt-5 }", "value: gpt-6 }"),
        ))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    rs[1].wait_for_new_bundle(&before).await;
    let a = check_as(&rs[1], "x", &chat("gpt-6", "after the failover")).await;
    assert_eq!(a.status, 403, "{a:?}");

    // The audit stream is written on the new master.
    let written = stream_len(&server).await;
    assert!(written >= 1);
    let _ = check_as(&rs[0], "x", &chat("gpt-6", "one more")).await;
    let mut grew = false;
    for _ in 0..50 {
        if stream_len(&server).await > written {
            grew = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(grew, "no audit record reached the new master");
    replicated(&server);

    // 2. The new master crashes: the sentinels promote the old one back.
    let RedisServer::Sentinel(sentinel) = &mut server else {
        unreachable!()
    };
    let crashed = sentinel.kill_master().unwrap();
    assert_eq!(crashed, second);
    // Meanwhile checks answer (fail-closed), each within its deadline (150 ms, with room for
    // a loaded machine): nothing hangs.
    for i in 0..10 {
        let started = std::time::Instant::now();
        let a = check_as(
            &rs[i % 2],
            "search",
            &chat("gpt-4o", &format!("during {i}")),
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(1), "{a:?}");
        assert!(!a.allowed, "{a:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let third = tokio::task::block_in_place(|| sentinel.wait_for_new_master(crashed)).unwrap();
    assert_eq!(third, first);
    // The limit is still spent on the promoted master: nothing more is allowed.
    let (allowed, statuses) = search_until(&rs[0], 1, Duration::from_secs(20)).await;
    assert_eq!((allowed, statuses.last()), (0, Some(&429)), "{statuses:?}");
    // And the other namespaces are served again.
    let a = check_as(&rs[1], "x", &chat("gpt-6", "after the crash")).await;
    assert_eq!(a.status, 403, "{a:?}");
    for h in rs {
        h.stop().await;
    }
}
