//! The `llmpolicy.v1.PolicyService` gRPC API with a real tonic client.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;

use std::time::Duration;

use common::{chat, policy, Harness, TOKEN};
use llm_policy_server::server::api::pb;
use llm_policy_server::server::api::pb::policy_service_client::PolicyServiceClient;
use tonic::transport::Channel;

const RULES: &str = r#"
    - id: no-gpt-3
      priority: 10
      when: { match: { field: request.model, op: starts_with, value: gpt-3 } }
      action: { decision: deny, reason: "retired model", headers: { x-why: retired } }
"#;

async fn client(h: &Harness) -> PolicyServiceClient<Channel> {
    PolicyServiceClient::connect(format!("http://{}", h.running.grpc))
        .await
        .unwrap()
}

fn eval_req(model: &str) -> pb::EvaluateRequest {
    pb::EvaluateRequest {
        request: Some(pb::HttpRequest {
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            headers: Default::default(),
            body: chat(model, "hi").into_bytes(),
            now: None,
        }),
        explain: false,
        charge: false,
    }
}

fn authed<T>(t: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(t);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluate_and_batch_evaluate() {
    let h = Harness::start(&[("p.yaml", &policy("p", "allow", RULES))], |_| {}).await;
    let mut c = client(&h).await;
    let r = c.evaluate(eval_req("gpt-4o")).await.unwrap().into_inner();
    let d = r.decision.unwrap();
    assert_eq!(d.decision, "allow");
    assert!(r.reply.is_none());
    assert_eq!(r.upstream_headers["x-llm-policy-decision"], "allow");
    assert_eq!(r.version, 1);

    let r = c
        .evaluate(eval_req("gpt-3.5-turbo"))
        .await
        .unwrap()
        .into_inner();
    let d = r.decision.unwrap();
    assert_eq!(d.decision, "deny");
    assert_eq!(d.matched_rules, ["no-gpt-3"]);
    assert_eq!(d.actions.unwrap().headers["x-why"], "retired");
    assert_eq!(d.metadata.unwrap().policy, "p");
    let reply = r.reply.unwrap();
    assert_eq!(reply.status, 403);
    assert!(reply.body.contains("retired model"));

    let mut bad = eval_req("x");
    bad.request.as_mut().unwrap().body = b"{".to_vec();
    let r = c.evaluate(bad.clone()).await.unwrap().into_inner();
    assert!(r.decision.is_none());
    assert_eq!(r.error.unwrap().code, "invalid_body");
    assert_eq!(r.reply.unwrap().status, 400);

    let r = c
        .batch_evaluate(pb::BatchEvaluateRequest {
            requests: vec![eval_req("gpt-4o"), eval_req("gpt-3"), bad],
        })
        .await
        .unwrap()
        .into_inner();
    let verdicts: Vec<String> = r
        .results
        .iter()
        .map(|x| {
            x.decision
                .as_ref()
                .map_or("error".into(), |d| d.decision.clone())
        })
        .collect();
    assert_eq!(verdicts, ["allow", "deny", "error"]);
    // Spending counters needs the token.
    let mut charged = eval_req("gpt-4o");
    charged.charge = true;
    let e = c.evaluate(charged.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(c.evaluate(authed(charged)).await.is_ok());
    let e = c
        .batch_evaluate(pb::BatchEvaluateRequest {
            requests: vec![eval_req("gpt-4o"); 1001],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_reads_writes_and_bundle_watch() {
    let h = Harness::start(&[("p.yaml", &policy("p", "allow", RULES))], |_| {}).await;
    let mut c = client(&h).await;
    let list = c
        .list_policies(pb::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.policies.len(), 1);
    assert_eq!(list.policies[0].name, "p");
    assert_eq!(list.policies[0].rules, 1);
    let got = c
        .get_policy(pb::GetPolicyRequest { name: "p".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.text, policy("p", "allow", RULES));
    assert_eq!(
        c.get_policy(pb::GetPolicyRequest {
            name: "nope".into()
        })
        .await
        .unwrap_err()
        .code(),
        tonic::Code::NotFound
    );

    // The watch starts with the bundle serving.
    let mut watch = c
        .watch_bundle(pb::WatchBundleRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.bundle, list.bundle);
    assert_eq!(first.files.len(), 1);
    assert_eq!(first.files[0].path, "p.yaml");

    // Writes need the token.
    let put = pb::PutPolicyRequest {
        name: "p".into(),
        text: policy("p", "deny", RULES),
    };
    let e = c.put_policy(put.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let v2 = c.put_policy(authed(put)).await.unwrap().into_inner();
    assert_eq!(v2.version, 2);
    // The watcher sees the new bundle.
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.bundle, v2.bundle);
    assert!(next.files[0].text.contains("defaultDecision: deny"));

    // A broken policy: INVALID_ARGUMENT with located diagnostics; v2 keeps serving.
    let e = c
        .put_policy(authed(pb::PutPolicyRequest {
            name: "p".into(),
            text: policy(
                "p",
                "allow",
                &RULES.replace("request.model", "request.modle"),
            ),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("p.yaml:10:24"), "{}", e.message());
    assert!(e.message().contains("did you mean `request.model`"));
    assert_eq!(h.bundle().await, v2.bundle);

    let versions = c
        .list_versions(pb::ListVersionsRequest { name: "p".into() })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(versions.len(), 2);
    assert!(versions[1].active && versions[1].origin == "api");

    let back = c
        .rollback(authed(pb::RollbackRequest {
            name: "p".into(),
            to: Some(1),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.bundle, list.bundle);
    // A watcher that already has the bundle gets nothing until another serves.
    let mut quiet = c
        .watch_bundle(pb::WatchBundleRequest {
            known_bundle: back.bundle.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), quiet.message())
            .await
            .is_err()
    );

    // A usage report needs the usage token (or, as here, the admin token).
    let report = || pb::RecordUsageRequest {
        request_id: "unknown".into(),
        tokens: Some(5.0),
        ..pb::RecordUsageRequest::default()
    };
    let refused = c.record_usage(report()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let r = c.record_usage(authed(report())).await.unwrap().into_inner();
    assert!(!r.recorded);
    // Open watch streams do not hold up shutdown.
    let started = std::time::Instant::now();
    h.stop().await;
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_keys_and_the_read_token_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    let read = dir.path().join("read-token");
    std::fs::write(&read, "read-token-0123456789").unwrap();
    let (k, r) = (keys.clone(), read.clone());
    let h = Harness::start(&[("p.yaml", &policy("p", "allow", RULES))], move |c| {
        c.keys_file = Some(k);
        c.read_token_file = Some(r);
    })
    .await;
    let mut c = client(&h).await;
    // Writes need the admin token; reads the read token (or the admin token).
    let spec = pb::CreateKeyRequest {
        id: Some("alice".into()),
        principal: [("tier".to_string(), "pro".to_string())].into(),
        namespace: None,
        expires: None,
    };
    let e = c.create_key(spec.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let made = c
        .create_key(authed(spec.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(made.key.starts_with("lpk_"));
    let record = made.record.unwrap();
    assert_eq!(record.hash.len(), 64);
    assert!(!record.hash.contains(&made.key[4..]));
    let e = c.create_key(authed(spec)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    let e = c.list_keys(pb::ListKeysRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = c
        .list_policies(pb::ListPoliciesRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut reader = tonic::Request::new(pb::ListKeysRequest {});
    reader.metadata_mut().insert(
        "authorization",
        "Bearer read-token-0123456789".parse().unwrap(),
    );
    let listed = c.list_keys(reader).await.unwrap().into_inner().keys;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].principal["tier"], "pro");
    // The read token does not write.
    let mut writer = tonic::Request::new(pb::RevokeKeyRequest { id: "alice".into() });
    writer.metadata_mut().insert(
        "authorization",
        "Bearer read-token-0123456789".parse().unwrap(),
    );
    assert_eq!(
        c.revoke_key(writer).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    let revoked = c
        .revoke_key(authed(pb::RevokeKeyRequest { id: "alice".into() }))
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked);
    let e = c
        .revoke_key(authed(pb::RevokeKeyRequest {
            id: "nobody".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    // The key file holds the records (hashes, never keys).
    let text = std::fs::read_to_string(&keys).unwrap();
    assert!(text.contains("\"revoked\": true") && !text.contains(&made.key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_lowers_as_the_check_would() {
    let rules = r#"
    - id: fit
      when: { cel: "true" }
      action:
        decision: throttle
        budget: { key: "all", tokens: 100, per: day }
        transform: { maxTokens: fitBudget, minTokens: 10 }
"#;
    let h = Harness::start(&[("p.yaml", &policy("p", "allow", rules))], |_| {}).await;
    let mut c = client(&h).await;
    let mut req = eval_req("gpt-4o");
    req.request.as_mut().unwrap().body =
        br#"{"model":"gpt-4o","max_tokens":500,"messages":[{"role":"user","content":"hi"}]}"#
            .to_vec();
    let d = c
        .evaluate(req)
        .await
        .unwrap()
        .into_inner()
        .decision
        .unwrap();
    assert_eq!(d.decision, "allow");
    let lowered = d.actions.unwrap().max_tokens.unwrap();
    assert!((80..100).contains(&lowered), "{lowered}");
}
