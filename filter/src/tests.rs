//! The request path against the fake proxy.

use std::rc::Rc;

use prost::Message as _;

use crate::config::FilterConfig;
use crate::fake::{chat, FakeHost};
use crate::host::Metric;
use crate::outbox::Outbox;
use crate::request::{Flow, RequestFlow};
use crate::vm::Vm;

const POLICY: &str = r#"
apiVersion: llm-policy/v1
kind: Policy
metadata: {name: p, version: "1"}
spec:
  defaultDecision: allow
  rules:
    - id: no-gpt-3
      priority: 100
      when: {cel: "request.model == 'gpt-3.5-turbo'"}
      action: {decision: deny, reason: "model is not approved", headers: {x-policy-note: model-not-approved}}
    - id: tag-claude
      priority: 60
      when: {cel: "request.model.startsWith('claude')"}
      action: {decision: allow, reason: "claude", headers: {x-routed: claude}}
    - id: three-per-minute
      priority: 50
      when: {match: {field: principal.id, op: exists}}
      action:
        decision: throttle
        reason: "more than 3 requests per minute"
        rateLimit: {key: "{principal.id}", requests: 3, per: minute, scope: local}
    - id: metered-tokens
      priority: 45
      when: {match: {field: principal.tier, op: eq, value: metered}}
      action:
        decision: throttle
        reason: "token limit"
        rateLimit: {key: "{principal.id}", tokens: 100, per: minute, scope: local}
    - id: team-budget
      priority: 40
      when: {match: {field: principal.team, op: eq, value: research}}
      action:
        decision: throttle
        reason: "budget spent"
        budget: {key: "{principal.team}", tokens: 1000, per: day}
"#;

fn plugin(extra: &str) -> Rc<Vm> {
    with_policy(POLICY, extra)
}

/// A filter with `policy` (YAML) and `extra` configuration.
fn with_policy(policy: &str, extra: &str) -> Rc<Vm> {
    let config = format!(
        "policies: |\n{}\n{extra}",
        policy
            .lines()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Rc::new(Vm::configure(&config).unwrap())
}

/// Runs a request through headers and one body chunk.
fn run(p: &Rc<Vm>, host: &mut FakeHost) -> (RequestFlow, Flow) {
    run_into(p, host, &Rc::default())
}

/// [`run`], with usage reports going to `outbox`.
fn run_into(p: &Rc<Vm>, host: &mut FakeHost, outbox: &Rc<Outbox>) -> (RequestFlow, Flow) {
    let mut flow = RequestFlow::new(Rc::clone(p), Rc::clone(outbox));
    let eos = host.body.is_empty();
    let first = flow.on_request_headers(host, eos);
    if eos || first == Flow::Continue || host.reply.is_some() {
        return (flow, first);
    }
    let len = host.body.len();
    let f = flow.on_request_body(host, len, true);
    (flow, f)
}

#[test]
fn allowed_requests_go_on_with_the_decision_headers_and_no_forged_ones() {
    let p = plugin("");
    let mut host = FakeHost::request(
        "POST",
        "/v1/messages",
        &[
            ("x-llm-policy-decision", "forged"),
            ("x-llm-policy-reservation", "stolen"),
        ],
        &chat("claude-sonnet-4-5"),
    );
    let (_, flow) = run(&p, &mut host);
    assert_eq!(flow, Flow::Continue);
    assert!(host.reply.is_none());
    assert_eq!(host.header("x-llm-policy-decision"), Some("allow"));
    assert_eq!(host.header("x-routed"), Some("claude"));
    assert_eq!(host.header("x-llm-policy-reservation"), None);
    assert_eq!(host.count(Metric::Allowed), 1);
}

#[test]
fn denials_answer_in_the_provider_format() {
    let p = plugin("");
    let mut host = FakeHost::request("POST", "/v1/chat/completions", &[], &chat("gpt-3.5-turbo"));
    let (_, flow) = run(&p, &mut host);
    assert_eq!(flow, Flow::Pause);
    let r = host.reply.clone().unwrap();
    assert_eq!(r.status, 403);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["error"]["message"], "model is not approved");
    assert_eq!(v["error"]["type"], "permission_denied");
    assert!(r
        .headers
        .contains(&("x-policy-note".into(), "model-not-approved".into())));
    assert!(r
        .headers
        .contains(&("x-llm-policy-decision".into(), "deny".into())));

    // The same model on the Anthropic API: Anthropic's error shape.
    let mut host = FakeHost::request("POST", "/v1/messages", &[], &chat("gpt-3.5-turbo"));
    run(&p, &mut host);
    let v: serde_json::Value = serde_json::from_str(&host.reply.unwrap().body).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "permission_error");
}

#[test]
fn other_routes_pass_untouched_and_unbuffered() {
    let p = plugin("");
    let mut host = FakeHost::request("POST", "/upload", &[], "not json at all");
    let mut flow = RequestFlow::new(Rc::clone(&p), Rc::default());
    assert_eq!(flow.on_request_headers(&mut host, false), Flow::Continue);
    assert_eq!(flow.on_request_body(&mut host, 15, true), Flow::Continue);
    assert!(host.reply.is_none());
    assert_eq!(host.header("x-llm-policy-decision"), None);
}

#[test]
fn the_body_is_buffered_until_its_end_or_its_trailers() {
    let p = plugin("");
    let body = chat("gpt-3.5-turbo");
    let mut host = FakeHost::request("POST", "/v1/chat/completions", &[], &body);
    let mut flow = RequestFlow::new(Rc::clone(&p), Rc::default());
    assert_eq!(flow.on_request_headers(&mut host, false), Flow::Pause);
    assert_eq!(flow.on_request_body(&mut host, 10, false), Flow::Pause);
    assert!(host.reply.is_none());
    assert_eq!(
        flow.on_request_body(&mut host, body.len(), false),
        Flow::Pause
    );
    // HTTP/2 with trailers: no end of stream in the body callback.
    assert_eq!(flow.on_request_trailers(&mut host), Flow::Pause);
    assert_eq!(host.reply.unwrap().status, 403);
}

#[test]
fn oversized_and_malformed_bodies_get_413_and_400_in_the_provider_format() {
    let p = plugin("context: {maxBodyBytes: 100}\n");
    // Declared too large: answered before any byte is buffered.
    let mut host = FakeHost::request("POST", "/v1/messages", &[("content-length", "5000")], "x");
    let mut flow = RequestFlow::new(Rc::clone(&p), Rc::default());
    assert_eq!(flow.on_request_headers(&mut host, false), Flow::Pause);
    let r = host.reply.clone().unwrap();
    assert_eq!(r.status, 413);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["error"]["type"], "request_too_large");

    // Undeclared (chunked) and growing past the limit.
    let mut host = FakeHost::request("POST", "/v1/chat/completions", &[], "x");
    let mut flow = RequestFlow::new(Rc::clone(&p), Rc::default());
    flow.on_request_headers(&mut host, false);
    assert_eq!(flow.on_request_body(&mut host, 64, false), Flow::Pause);
    assert!(host.reply.is_none());
    assert_eq!(flow.on_request_body(&mut host, 101, false), Flow::Pause);
    assert_eq!(host.reply.clone().unwrap().status, 413);
    assert_eq!(host.count(Metric::BodyTooLarge), 1);

    for bad in ["{\"model\": ", "[1,2]", "{\"model\": 5}", "\u{0}\u{1}"] {
        let mut host = FakeHost::request("POST", "/v1/chat/completions", &[], bad);
        run(&p, &mut host);
        let r = host.reply.unwrap();
        assert_eq!(r.status, 400, "{bad:?}");
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
}

#[test]
fn local_rate_limits_throttle_after_n_and_a_denied_request_costs_nothing() {
    let p = plugin("");
    let mut host = FakeHost::request(
        "POST",
        "/v1/chat/completions",
        &[("x-user-id", "u1")],
        &chat("gpt-4o"),
    );
    for i in 0..3 {
        let (_, flow) = run(&p, &mut host);
        assert_eq!(flow, Flow::Continue, "request {i}");
        host.next_chat(&[("x-user-id", "u1")], "gpt-4o");
    }
    let (_, flow) = run(&p, &mut host);
    assert_eq!(flow, Flow::Pause);
    let r = host.reply.clone().unwrap();
    assert_eq!(r.status, 429);
    let get = |n: &str| {
        r.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("x-ratelimit-limit").as_deref(), Some("3"));
    assert_eq!(get("x-ratelimit-remaining").as_deref(), Some("0"));
    assert!(get("retry-after").is_some());

    // Another user: own counter. A denied request (higher-priority deny) gives its charge back.
    for _ in 0..5 {
        host.next_chat(&[("x-user-id", "u2")], "gpt-3.5-turbo");
        run(&p, &mut host);
        assert_eq!(host.reply.clone().unwrap().status, 403);
    }
    host.next_chat(&[("x-user-id", "u2")], "gpt-4o");
    assert_eq!(run(&p, &mut host).1, Flow::Continue);
}

/// [`POLICY`] with a rule that reads the prompt: a decision cache pays there.
fn reading_the_prompt() -> Rc<Vm> {
    let rule = "    - id: no-passwords\n      priority: 10\n      when: {match: {field: request.prompt, op: contains, value: password}}\n      action: {decision: deny}\n";
    with_policy(&format!("{POLICY}{rule}"), "")
}

#[test]
fn decisions_over_fields_other_than_the_prompt_are_neither_keyed_nor_cached() {
    let p = plugin("");
    let mut host = FakeHost::request("POST", "/v1/chat/completions", &[], &chat("gpt-3.5-turbo"));
    run(&p, &mut host);
    host.next_chat(&[], "gpt-3.5-turbo");
    run(&p, &mut host);
    assert_eq!(host.reply.clone().unwrap().status, 403);
    assert_eq!(host.count(Metric::CacheMiss), 0);
    assert_eq!(host.count(Metric::CacheHit), 0);
}

#[test]
fn cacheable_decisions_are_served_from_the_vm_cache() {
    let p = reading_the_prompt();
    let mut host = FakeHost::request("POST", "/v1/chat/completions", &[], &chat("gpt-3.5-turbo"));
    run(&p, &mut host);
    host.next_chat(&[], "gpt-3.5-turbo");
    run(&p, &mut host);
    assert_eq!(host.count(Metric::CacheMiss), 1);
    assert_eq!(host.count(Metric::CacheHit), 1);
    assert_eq!(host.reply.clone().unwrap().status, 403);
    // Limited requests are not cached: each one counts.
    host.next_chat(&[("x-user-id", "c")], "gpt-4o");
    run(&p, &mut host);
    host.next_chat(&[("x-user-id", "c")], "gpt-4o");
    run(&p, &mut host);
    assert_eq!(host.count(Metric::CacheHit), 1);
}

#[test]
fn without_a_server_rules_that_need_one_follow_the_failure_mode() {
    let research = [("x-team-id", "research")];
    let closed = plugin("");
    let mut host = FakeHost::request("POST", "/v1/chat/completions", &research, &chat("gpt-4o"));
    assert_eq!(run(&closed, &mut host).1, Flow::Pause);
    let r = host.reply.clone().unwrap();
    assert_eq!(r.status, 503);
    assert!(r
        .headers
        .contains(&("x-llm-policy-decision".into(), "error".into())));

    let open = plugin("failureMode: open\n");
    let mut host = FakeHost::request("POST", "/v1/chat/completions", &research, &chat("gpt-4o"));
    assert_eq!(run(&open, &mut host).1, Flow::Continue);
    assert_eq!(host.header("x-llm-policy-decision"), Some("error"));
    // A request no server rule applies to makes no call and needs no server.
    let mut host = FakeHost::request("POST", "/v1/chat/completions", &[], &chat("gpt-4o"));
    assert_eq!(run(&closed, &mut host).1, Flow::Continue);
}

/// The first `Check` the filter sent the policy server, read with Envoy's own types.
fn first_check(host: &FakeHost) -> envoy_types::ext_authz::v3::pb::CheckRequest {
    let call = host.calls.first().expect("a call to the server");
    envoy_types::ext_authz::v3::pb::CheckRequest::decode(call.message.as_slice()).unwrap()
}

fn server_plugin() -> Rc<Vm> {
    plugin("server: {cluster: llm_policy, timeoutMs: 300}\n")
}

#[test]
fn requests_needing_the_server_are_sent_as_ext_authz_checks_and_its_answer_applied() {
    use envoy_types::ext_authz::v3::pb as envoy;
    let p = server_plugin();
    let body = chat("gpt-4o");
    let mut host = FakeHost::request(
        "POST",
        "/v1/chat/completions",
        &[("x-team-id", "research"), ("x-user-id", "u9")],
        &body,
    );
    let outbox = Rc::new(Outbox::default());
    let (mut flow, f) = run_into(&p, &mut host, &outbox);
    assert_eq!(f, Flow::Pause);
    assert!(host.reply.is_none());
    let call = host.calls.first().cloned().unwrap();
    assert_eq!(call.cluster, "llm_policy");
    assert_eq!(call.service, "envoy.service.auth.v3.Authorization");
    assert_eq!(call.method, "Check");
    assert_eq!(call.timeout.as_millis(), 300);
    // Envoy's own types read what the filter sent.
    let attrs = first_check(&host).attributes.unwrap();
    let http = attrs.request.unwrap().http.unwrap();
    assert_eq!(http.method, "POST");
    assert_eq!(http.path, "/v1/chat/completions");
    assert_eq!(http.raw_body, body.as_bytes());
    assert_eq!(http.headers["x-team-id"], "research");
    assert_eq!(
        attrs.context_extensions[llm_policy_core::wire::LOCAL_COUNTERS_EXTENSION],
        "proxy"
    );
    assert_eq!(
        attrs.context_extensions[llm_policy_core::wire::LOCAL_OVER_EXTENSION],
        "{}"
    );

    // The server allows, with headers: they are set upstream and the request resumes.
    let ok = envoy::CheckResponse {
        status: Some(envoy_types::pb::google::rpc::Status {
            code: 0,
            ..Default::default()
        }),
        http_response: Some(envoy::HttpResponse::OkResponse(envoy::OkHttpResponse {
            headers: vec![envoy::HeaderValueOption {
                header: Some(envoy::HeaderValue {
                    key: "x-llm-policy-reservation".into(),
                    value: "abc".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    };
    flow.on_server_answer(&mut host, 1, 0, Some(ok.encode_to_vec()));
    assert!(host.resumed);
    // The reservation handle is kept for the usage report, not sent to the provider.
    assert_eq!(host.header("x-llm-policy-reservation"), None);
    // The answer streams through; its usage goes to the server under the handle.
    host.response_headers = vec![("content-type".into(), "text/event-stream".into())];
    assert_eq!(flow.on_response_headers(&mut host, false), Flow::Continue);
    host.response_chunk = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\ndata: [DONE]\n\n".to_vec();
    let len = host.response_chunk.len();
    assert_eq!(flow.on_response_body(&mut host, len, true), Flow::Continue);
    let server = p.config.server.clone().unwrap();
    outbox.flush(&mut host, &server);
    let report = host.calls.last().cloned().unwrap();
    assert_eq!(report.method, "RecordUsage");
    let m = crate::outbox::RecordUsageRequest::decode(report.message.as_slice()).unwrap();
    assert_eq!((m.request_id.as_str(), m.tokens), ("abc", Some(12.0)));

    // The server throttles: its reply is the client's answer, and the local charge goes back.
    host.next_chat(&[("x-team-id", "research"), ("x-user-id", "u9")], "gpt-4o");
    let (mut flow, _) = run(&p, &mut host);
    let denied = envoy::CheckResponse {
        status: Some(envoy_types::pb::google::rpc::Status {
            code: 7,
            ..Default::default()
        }),
        http_response: Some(envoy::HttpResponse::DeniedResponse(
            envoy::DeniedHttpResponse {
                status: Some(envoy_types::pb::envoy::r#type::v3::HttpStatus { code: 429 }),
                headers: vec![envoy::HeaderValueOption {
                    header: Some(envoy::HeaderValue {
                        key: "retry-after".into(),
                        raw_value: b"30".to_vec(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                body: "{\"error\":{}}".into(),
            },
        )),
        ..Default::default()
    };
    flow.on_server_answer(&mut host, 1, 0, Some(denied.encode_to_vec()));
    let r = host.reply.clone().unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(
        r.headers,
        vec![("retry-after".to_string(), "30".to_string())]
    );
    assert_eq!(r.body, "{\"error\":{}}");
    // Two allowed so far for u9 (one local count each way): the throttled one was given back.
    for _ in 0..2 {
        host.next_chat(&[("x-user-id", "u9")], "gpt-4o");
        assert_eq!(run(&p, &mut host).1, Flow::Continue);
    }
    host.next_chat(&[("x-user-id", "u9")], "gpt-4o");
    assert_eq!(
        run(&p, &mut host).1,
        Flow::Pause,
        "the fourth counted request is over"
    );
}

#[test]
fn a_header_sent_twice_reaches_the_server_joined_in_arrival_order() {
    // The filter moves the headers rules read ahead of the others before deciding (it borrows
    // them rather than copy them): the copies of one name, in any case, keep their order, and
    // what only the server sets never reaches it from the client. (The team's budget is the
    // server's: the request is asked about.)
    let p = server_plugin();
    let body = chat("gpt-4o");
    let mut host = FakeHost::request(
        "POST",
        "/v1/chat/completions",
        &[
            ("x-tag", "first"),
            ("x-llm-policy-reservation", "forged"),
            ("x-envoy-auth-partial-body", "true"),
            ("X-Tag", "second"),
            ("x-team-id", "research"),
            ("x-tag", "third"),
        ],
        &body,
    );
    let outbox = Rc::new(Outbox::default());
    let (_flow, f) = run_into(&p, &mut host, &outbox);
    assert_eq!(f, Flow::Pause);
    let http = first_check(&host)
        .attributes
        .unwrap()
        .request
        .unwrap()
        .http
        .unwrap();
    assert_eq!(http.headers["x-tag"], "first,second,third");
    assert_eq!(http.headers["x-team-id"], "research");
    assert!(!http.headers.contains_key("x-llm-policy-reservation"));
    assert!(!http.headers.contains_key("x-envoy-auth-partial-body"));
}

#[test]
fn a_failed_or_late_server_follows_the_failure_mode_and_stale_answers_are_ignored() {
    let p = server_plugin();
    let research = [("x-team-id", "research")];
    let body = chat("gpt-4o");
    let mut host = FakeHost::request("POST", "/v1/chat/completions", &research, &body);
    let (mut flow, _) = run(&p, &mut host);
    flow.on_server_answer(&mut host, 99, 0, None);
    assert!(
        host.reply.is_none() && !host.resumed,
        "an answer to another call is ignored"
    );
    flow.on_server_answer(&mut host, 1, 4, None);
    assert_eq!(host.reply.clone().unwrap().status, 503);
    assert_eq!(host.count(Metric::FallbackTimeouts), 1);

    // Garbage from the server is a failure too, not a crash.
    host.next_chat(&research, "gpt-4o");
    let (mut flow, _) = run(&p, &mut host);
    flow.on_server_answer(&mut host, 1, 0, Some(vec![0xff; 10]));
    assert_eq!(host.reply.clone().unwrap().status, 503);

    // The cluster does not exist: failure at once.
    host.next_chat(&research, "gpt-4o");
    host.refuse_calls = true;
    let (_, f) = run(&p, &mut host);
    assert_eq!(f, Flow::Pause);
    assert_eq!(host.reply.clone().unwrap().status, 503);
    assert!(host.count(Metric::FallbackFailures) >= 2);

    // Open: the request goes on, marked.
    let open = plugin("server: {cluster: llm_policy}\nfailureMode: open\n");
    host.next_chat(&research, "gpt-4o");
    host.refuse_calls = false;
    let (mut flow, _) = run(&open, &mut host);
    flow.on_server_answer(&mut host, 1, 14, None);
    assert!(host.resumed);
    assert_eq!(host.header("x-llm-policy-decision"), Some("error"));
}

#[test]
fn configuration_errors_are_located() {
    let e = Vm::configure("routes: {paths: 5}\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("filter configuration:1"), "{e}");
    let e = Vm::configure("").unwrap_err().to_string();
    assert!(e.contains("no policies"), "{e}");
    let e = Vm::configure("policies: \"apiVersion: llm-policy/v1\\nkind: Policy\\nmetadata: {name: p}\\nspec: {rules: [{id: r, when: {cel: 'nope('}, action: {decision: deny}}]}\\n\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("filter configuration: policies:4"), "{e}");
    let _ = FilterConfig::default();
}

#[test]
fn local_token_limits_are_reconciled_with_the_answers_usage() {
    let p = plugin("");
    let who = [("x-user-id", "m1"), ("x-user-tier", "metered")];
    let body = r#"{"model":"gpt-4o","max_tokens":60,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut host = FakeHost::request("POST", "/v1/chat/completions", &who, body);
    let (mut flow, f) = run(&p, &mut host);
    assert_eq!(f, Flow::Continue);
    // The answer used 10 tokens, not the ~60 reserved.
    host.response_headers = vec![("content-type".into(), "application/json".into())];
    flow.on_response_headers(&mut host, false);
    host.response_chunk =
        br#"{"usage":{"prompt_tokens":4,"completion_tokens":6,"total_tokens":10}}"#.to_vec();
    let len = host.response_chunk.len();
    flow.on_response_body(&mut host, len, true);
    // So a second 60-token request fits in the 100-token window; a third does not.
    host.next("POST", "/v1/chat/completions", &who, body);
    assert_eq!(run(&p, &mut host).1, Flow::Continue);
    host.next("POST", "/v1/chat/completions", &who, body);
    assert_eq!(run(&p, &mut host).1, Flow::Pause);
    assert_eq!(host.reply.clone().unwrap().status, 429);
}

#[test]
fn until_the_first_sync_llm_calls_follow_the_failure_mode() {
    let p = Rc::new(Vm::configure("sync: {cluster: llm_policy_rest}\n").unwrap());
    assert!(p.set.is_none());
    let mut host = FakeHost::request("POST", "/v1/messages", &[], &chat("claude-sonnet-4-5"));
    assert_eq!(run(&p, &mut host).1, Flow::Pause);
    let r = host.reply.unwrap();
    assert_eq!(r.status, 503);
    assert!(
        r.body.contains("no policy bundle is loaded yet"),
        "{}",
        r.body
    );
    let open = Rc::new(Vm::configure("sync: {cluster: c}\nfailureMode: open\n").unwrap());
    let mut host = FakeHost::request("POST", "/v1/messages", &[], &chat("claude-sonnet-4-5"));
    assert_eq!(run(&open, &mut host).1, Flow::Continue);
    assert_eq!(host.header("x-llm-policy-decision"), Some("error"));
    // Let through undecided: not counted as an allow decision.
    assert_eq!(host.count(Metric::Allowed), 0);
    // Other routes are not affected.
    let mut host = FakeHost::request("GET", "/healthz", &[], "");
    assert_eq!(run(&p, &mut host).1, Flow::Continue);
}

#[test]
fn a_request_denied_in_the_filter_never_waits_for_the_server() {
    let p = server_plugin();
    // The team budget (the server's) sits below the deny: it could not change the verdict.
    let mut host = FakeHost::request(
        "POST",
        "/v1/chat/completions",
        &[("x-team-id", "research")],
        &chat("gpt-3.5-turbo"),
    );
    assert_eq!(run(&p, &mut host).1, Flow::Pause);
    assert_eq!(host.reply.clone().unwrap().status, 403);
    assert!(host.calls.is_empty(), "no Check was sent");
    assert_eq!(host.count(Metric::FallbackCalls), 0);
}

/// A research request the server allowed with reservation handle `h1`: (flow, host, outbox).
fn allowed_with_a_reservation() -> (RequestFlow, FakeHost, Rc<Outbox>) {
    use envoy_types::ext_authz::v3::pb as envoy;
    let p = server_plugin();
    let mut host = FakeHost::request(
        "POST",
        "/v1/chat/completions",
        &[("x-team-id", "research"), ("accept-encoding", "gzip, br")],
        &chat("gpt-4o"),
    );
    let outbox = Rc::new(Outbox::default());
    let (mut flow, _) = run_into(&p, &mut host, &outbox);
    let ok = envoy::CheckResponse {
        http_response: Some(envoy::HttpResponse::OkResponse(envoy::OkHttpResponse {
            headers: vec![envoy::HeaderValueOption {
                header: Some(envoy::HeaderValue {
                    key: "x-llm-policy-reservation".into(),
                    value: "h1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    };
    flow.on_server_answer(&mut host, 1, 0, Some(ok.encode_to_vec()));
    (flow, host, outbox)
}

fn reported(host: &mut FakeHost, outbox: &Outbox) -> Vec<Option<f64>> {
    let before = host.calls.len();
    outbox.flush(
        host,
        &crate::config::ServerConfig {
            cluster: "llm_policy".into(),
            timeout_ms: 200,
            usage_token: None,
        },
    );
    host.calls[before..]
        .iter()
        .map(|c| {
            crate::outbox::RecordUsageRequest::decode(c.message.as_slice())
                .unwrap()
                .tokens
        })
        .collect()
}

#[test]
fn answers_without_usage_cannot_dodge_a_budget() {
    // A stream without usage events (a provider that does not report it): the larger of the
    // reservation (the prompt estimate and gpt-4o's default output cap, 16,384, since the
    // request set no max_tokens) and what streamed counts.
    let (mut flow, mut host, outbox) = allowed_with_a_reservation();
    host.response_headers = vec![
        (":status".into(), "200".into()),
        ("content-type".into(), "text/event-stream".into()),
    ];
    flow.on_response_headers(&mut host, false);
    host.response_chunk =
        b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n".to_vec();
    let len = host.response_chunk.len();
    flow.on_response_body(&mut host, len, true);
    flow.on_done(&mut host);
    let reserved = Some(16_384.0 + 1.0);
    assert_eq!(reported(&mut host, &outbox), vec![reserved]);
    assert_eq!(host.count(Metric::UsageUnknown), 1);

    // Cut off mid-stream (the client went away): the same.
    let (mut flow, mut host, outbox) = allowed_with_a_reservation();
    host.response_headers = vec![("content-type".into(), "text/event-stream".into())];
    flow.on_response_headers(&mut host, false);
    host.response_chunk = b"data: {\"choices\":[]}\n\n".to_vec();
    let len = host.response_chunk.len();
    flow.on_response_body(&mut host, len, false);
    flow.on_done(&mut host);
    assert_eq!(reported(&mut host, &outbox), vec![reserved]);

    // The upstream never answered: the server's reservation counts.
    let (mut flow, mut host, outbox) = allowed_with_a_reservation();
    flow.on_done(&mut host);
    assert_eq!(reported(&mut host, &outbox), vec![None]);

    // The provider refused (429): nothing was spent.
    let (mut flow, mut host, outbox) = allowed_with_a_reservation();
    host.response_headers = vec![(":status".into(), "429".into())];
    flow.on_response_headers(&mut host, false);
    flow.on_done(&mut host);
    assert_eq!(reported(&mut host, &outbox), vec![Some(0.0)]);

    // A 5xx may be Envoy's own (an upstream timeout) after the provider spent: the
    // reservation stands.
    let (mut flow, mut host, outbox) = allowed_with_a_reservation();
    host.response_headers = vec![(":status".into(), "503".into())];
    flow.on_response_headers(&mut host, false);
    flow.on_done(&mut host);
    assert_eq!(reported(&mut host, &outbox), vec![None]);

    // An answer compressed despite the request: unread, the reservation stands.
    let (mut flow, mut host, outbox) = allowed_with_a_reservation();
    assert_eq!(host.header("accept-encoding"), None);
    host.response_headers = vec![
        ("content-type".into(), "application/json".into()),
        ("content-encoding".into(), "gzip".into()),
    ];
    flow.on_response_headers(&mut host, false);
    host.response_chunk = br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#.to_vec();
    let len = host.response_chunk.len();
    flow.on_response_body(&mut host, len, true);
    assert_eq!(reported(&mut host, &outbox), vec![None]);
}

#[test]
fn a_client_that_goes_away_while_the_server_is_asked_gets_its_local_counts_back() {
    let p = server_plugin();
    let mut host = FakeHost::request("POST", "/v1/chat/completions", &[], &chat("gpt-4o"));
    // Three requests that need the server (the team budget); each client leaves before the
    // answer: Envoy's log callback ends the stream, the request never went upstream.
    for _ in 0..3 {
        host.next_chat(&[("x-team-id", "research"), ("x-user-id", "u7")], "gpt-4o");
        let (mut flow, f) = run(&p, &mut host);
        assert_eq!(f, Flow::Pause);
        flow.on_done(&mut host);
    }
    // So u7 still has its three requests a minute.
    for _ in 0..3 {
        host.next_chat(&[("x-user-id", "u7")], "gpt-4o");
        assert_eq!(run(&p, &mut host).1, Flow::Continue);
    }
    host.next_chat(&[("x-user-id", "u7")], "gpt-4o");
    assert_eq!(run(&p, &mut host).1, Flow::Pause);
    assert_eq!(host.reply.clone().unwrap().status, 429);
}

/// A filter configured with `identity: api-keys` and one key each for alice (pro, research) and
/// a revoked one.
fn keyed() -> (Rc<Vm>, String, String) {
    use llm_policy_core::identity::{hash_key, KeyRecord};
    let record = |id: &str, key: &str, revoked: bool| KeyRecord {
        id: id.into(),
        hash: hash_key(key),
        principal: [("id", id), ("team", "research")]
            .iter()
            .map(|(a, v)| (a.to_string(), v.to_string()))
            .collect(),
        namespace: None,
        expires: None,
        revoked,
        created: None,
    };
    let keys = serde_json::to_string(&[
        record("alice", "lpk_alice", false),
        record("eve", "lpk_eve", true),
    ])
    .unwrap();
    (
        plugin(&format!("identity: {{mode: api-keys, keys: {keys}}}\n")),
        "Bearer lpk_alice".into(),
        "Bearer lpk_eve".into(),
    )
}

#[test]
fn api_keys_guard_every_request_and_their_record_is_the_principal() {
    let (p, alice, revoked) = keyed();
    // No key, a revoked key: 401 in the provider's format, before the body is read.
    for auth in [
        None,
        Some(revoked.as_str()),
        Some("Bearer sk-not-a-virtual-key"),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        let mut host = FakeHost::request("POST", "/v1/chat/completions", &headers, &chat("gpt-4o"));
        run(&p, &mut host);
        let reply = host.reply.as_ref().expect("a 401");
        assert_eq!(reply.status, 401);
        assert!(
            reply.body.contains("authentication_error"),
            "{}",
            reply.body
        );
    }
    // Also on paths the rules do not check: Envoy would put the provider's key on them.
    let mut host = FakeHost::request("GET", "/internal/status", &[], "");
    run(&p, &mut host);
    assert_eq!(host.reply.as_ref().map(|r| r.status), Some(401));
    let mut host = FakeHost::request("GET", "/internal/status", &[("authorization", &alice)], "");
    let (_, flow) = run(&p, &mut host);
    assert_eq!(
        (flow, host.reply.as_ref().map(|r| r.body.clone())),
        (Flow::Continue, None)
    );
    assert_eq!(host.count(Metric::Unauthenticated), 0);
    // alice's key: her principal decides (the research budget needs the server, which this
    // filter has not got: failure mode closed), whatever team the client claims.
    let mut host = FakeHost::request(
        "POST",
        "/v1/chat/completions",
        &[
            ("authorization", &alice),
            ("x-team-id", "other"),
            ("x-user-id", "mallory"),
        ],
        &chat("gpt-4o"),
    );
    run(&p, &mut host);
    assert_eq!(host.reply.as_ref().map(|r| r.status), Some(503));
}

#[test]
fn response_rules_replace_a_json_answer_and_cut_a_stream_and_report_it() {
    let policy = r#"
apiVersion: llm-policy/v1
kind: Policy
metadata: {name: answers}
spec:
  defaultDecision: allow
  rules:
    - id: no-keys-out
      phase: response
      when: {match: {field: response.entities, op: contains, value: api_key}}
      action: {decision: deny, reason: "the answer holds a secret"}
"#;
    let config = format!(
        "policies: |\n{}\nserver: {{cluster: llm_policy}}\n",
        policy
            .lines()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let p = Rc::new(Vm::configure(&config).unwrap());
    let outbox = Rc::new(Outbox::default());
    let secret = "AKIAIOSFODNN7EXAMPLE";
    // A JSON answer: headers held, the body buffered, then replaced whole.
    let mut host = FakeHost::request(
        "POST",
        "/v1/chat/completions",
        &[("accept-encoding", "gzip"), ("x-request-id", "r-1")],
        &chat("gpt-4o"),
    );
    let (mut flow, f) = run_into(&p, &mut host, &outbox);
    assert_eq!(f, Flow::Continue);
    assert_eq!(
        host.header("accept-encoding"),
        None,
        "checked answers come uncompressed"
    );
    host.response_headers = vec![
        (":status".into(), "200".into()),
        ("content-type".into(), "application/json".into()),
        ("content-length".into(), "999".into()),
    ];
    assert_eq!(flow.on_response_headers(&mut host, false), Flow::Pause);
    host.response_chunk = format!(
        r#"{{"choices":[{{"index":0,"message":{{"role":"assistant","content":"use {secret}"}},"finish_reason":"stop"}}]}}"#
    )
    .into_bytes();
    let half = host.response_chunk.len() / 2;
    assert_eq!(flow.on_response_body(&mut host, half, false), Flow::Pause);
    let len = host.response_chunk.len();
    assert_eq!(flow.on_response_body(&mut host, len, true), Flow::Continue);
    let status = host
        .response_headers
        .iter()
        .find(|(k, _)| k == ":status")
        .map(|(_, v)| v.clone());
    assert_eq!(status.as_deref(), Some("403"));
    assert!(!host
        .response_headers
        .iter()
        .any(|(k, _)| k == "content-length"));
    let body = String::from_utf8(host.response_chunk.clone()).unwrap();
    assert!(
        body.contains("response_denied") && !body.contains(secret),
        "{body}"
    );
    assert_eq!(host.count(Metric::AnswersCut), 1);
    // The cut goes to the server for its audit log.
    let server = p.config.server.clone().unwrap();
    outbox.flush(&mut host, &server);
    let m =
        crate::outbox::RecordUsageRequest::decode(host.calls.last().unwrap().message.as_slice())
            .unwrap();
    let cut = m.cut.unwrap();
    assert_eq!(
        (
            cut.rule.as_str(),
            cut.stream,
            cut.request_id.as_deref(),
            m.request_id.as_str()
        ),
        ("no-keys-out", false, Some("r-1"), "")
    );

    // A stream: chunks pass through the held-back window; the secret never does.
    host.next("POST", "/v1/chat/completions", &[], &chat("gpt-4o"));
    let (mut flow, _) = run_into(&p, &mut host, &outbox);
    host.response_headers = vec![
        (":status".into(), "200".into()),
        ("content-type".into(), "text/event-stream".into()),
    ];
    assert_eq!(flow.on_response_headers(&mut host, false), Flow::Continue);
    let text = format!(
        "{} the key is {secret} ok",
        "Some words before it. ".repeat(12)
    );
    let mut sent = Vec::new();
    for piece in text.as_bytes().chunks(5) {
        let piece = std::str::from_utf8(piece).unwrap();
        host.response_chunk = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{}}}}}]}}\n\n",
            serde_json::to_string(piece).unwrap()
        )
        .into_bytes();
        let len = host.response_chunk.len();
        assert_eq!(flow.on_response_body(&mut host, len, false), Flow::Continue);
        sent.extend_from_slice(&host.response_chunk);
    }
    let sent = String::from_utf8(sent).unwrap();
    assert!(
        sent.contains("\"content\":\"Some \""),
        "text before the secret streamed"
    );
    assert!(!sent.contains("AKIA"), "{sent}");
    let last = sent.trim_end().rsplit("\n\n").next().unwrap();
    let error: serde_json::Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "response_denied", "{sent}");
    assert_eq!(error["error"]["message"], "the answer holds a secret");
    assert_eq!(host.count(Metric::AnswersCut), 2);
}

#[test]
fn a_canary_candidate_is_decided_beside_the_bundle_counted_and_never_enforced() {
    let base = plugin("");
    let docs = llm_policy_core::source::parse_str(
        "candidate.yaml",
        &POLICY.replace("'gpt-3.5-turbo'", "'gpt-4o'"),
    )
    .unwrap();
    let candidate = llm_policy_core::PolicySet::compile(&docs, &base.config.context)
        .unwrap()
        .set;
    let run_of = |sample: f64| {
        std::rc::Rc::new(crate::canary::CanaryRun::new(
            crate::sync::Candidate {
                set: candidate.clone(),
                bundle: String::from("cand"),
                sample,
            },
            String::from("vm1"),
        ))
    };
    let mut vm = Vm::new(base.config.clone(), base.set.clone(), base.keys.clone());
    vm.canary = Some(run_of(1.0));
    let vm = Rc::new(vm);
    for (model, allowed) in [
        ("gpt-4o", true),
        ("gpt-4o", true),
        ("gpt-3.5-turbo", false),
        ("claude-x", true),
    ] {
        let mut host = FakeHost::request("POST", "/v1/chat/completions", &[], &chat(model));
        run(&vm, &mut host);
        // The bundle serving decides: the candidate never answers.
        assert_eq!(host.reply.is_none(), allowed, "{model}");
        if allowed {
            assert_eq!(host.header("x-llm-policy-decision"), Some("allow"));
        }
    }
    let c = vm.canary.as_ref().unwrap();
    // gpt-4o twice (deny there), gpt-3.5 (allow there): three disagreements of four.
    assert_eq!(c.report(), "vm1;cand;4;3");

    // Sampled at a quarter: one request in four is decided again.
    let mut vm = Vm::new(base.config.clone(), base.set.clone(), base.keys.clone());
    vm.canary = Some(run_of(0.25));
    let vm = Rc::new(vm);
    let mut evaluated = 0;
    for _ in 0..8 {
        let mut h = FakeHost::request("POST", "/v1/chat/completions", &[], &chat("gpt-4o"));
        run(&vm, &mut h);
        evaluated += h.count(Metric::CanaryEvaluations);
    }
    assert_eq!(evaluated, 2);
    assert_eq!(vm.canary.as_ref().unwrap().report(), "vm1;cand;2;2");
}

#[test]
fn the_sync_says_who_the_filter_is_what_it_runs_and_its_last_error() {
    use crate::config::SyncConfig;
    use crate::sync::{BundleSync, SyncReport};
    let mut host = FakeHost::default();
    let mut s = BundleSync::new(SyncConfig {
        cluster: "llm_policy_rest".into(),
        path: "/v1/bundle".into(),
        authority: None,
        interval_ms: 100,
        timeout_ms: 500,
        token: None,
    });
    let report = SyncReport {
        node: Some(String::from("envoy-7\n")),
        running: Some(String::from("abc")),
        canary: Some(String::from("vm1;cand;4;3")),
    };
    s.tick(&mut host, &report);
    let h = &host.http_calls[0].headers;
    let get = |k: &str| h.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(
        get(llm_policy_core::wire::SYNC_NODE_HEADER),
        Some("envoy-7")
    );
    assert_eq!(get(llm_policy_core::wire::SYNC_RUNNING_HEADER), Some("abc"));
    assert_eq!(
        get(llm_policy_core::wire::SYNC_CANARY_HEADER),
        Some("vm1;cand;4;3")
    );
    assert_eq!(get(llm_policy_core::wire::SYNC_ERROR_HEADER), None);
    // A failed sync is reported with the next ones, until one succeeds.
    s.on_answer(&mut host, 1, Some(500), None, None, &Default::default());
    host.now += std::time::Duration::from_secs(1);
    s.tick(&mut host, &report);
    let h = &host.http_calls[1].headers;
    let error = h
        .iter()
        .find(|(n, _)| n == llm_policy_core::wire::SYNC_ERROR_HEADER)
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert!(error.contains("answered 500"), "{error}");
}

#[test]
fn an_alert_raised_in_the_filter_goes_to_the_server_with_the_reports() {
    let p = plugin("");
    let alerting = POLICY.replace(
        "action: {decision: deny, reason: \"model is not approved\", headers: {x-policy-note: model-not-approved}}",
        "action: {decision: deny, reason: \"model is not approved\", alert: high}",
    );
    let docs = llm_policy_core::source::parse_str("p.yaml", &alerting).unwrap();
    let set = llm_policy_core::PolicySet::compile(&docs, &p.config.context)
        .unwrap()
        .set;
    let vm = Rc::new(Vm::new(p.config.clone(), Some(set), p.keys.clone()));
    let outbox: Rc<Outbox> = Rc::default();
    let mut host = FakeHost::request(
        "POST",
        "/v1/chat/completions",
        &[("x-request-id", "r-7"), ("x-user-id", "eve")],
        &chat("gpt-3.5-turbo"),
    );
    run_into(&vm, &mut host, &outbox);
    assert_eq!(host.reply.as_ref().map(|r| r.status), Some(403));
    assert_eq!(outbox.len(), 1);
    let mut sent = FakeHost::default();
    outbox.flush(
        &mut sent,
        &crate::config::ServerConfig {
            cluster: "llm_policy".into(),
            timeout_ms: 200,
            usage_token: None,
        },
    );
    let call = &sent.calls[0];
    let report = crate::outbox::RecordUsageRequest::decode(call.message.as_slice()).unwrap();
    let alert = report.alert.unwrap();
    assert_eq!(report.request_id, "");
    assert_eq!(
        (alert.rule.as_str(), alert.severity.as_str(), alert.status),
        ("no-gpt-3", "high", 403)
    );
    assert_eq!(alert.request_id.as_deref(), Some("r-7"));
    assert_eq!(alert.principal.get("id").map(String::as_str), Some("eve"));
}
