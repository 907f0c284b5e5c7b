"""Envoy 1.40 with the llm-policy proxy-wasm filter (`llm-policy envoy-config --mode
filter+fallback`, `--concurrency 2`) in front of the mock upstream, `llm-policy serve` behind it
for what the filter cannot decide alone. Clients: curl, the official `openai` and `anthropic`
SDKs, and a raw HTTP/2 client for requests with trailers."""

import base64
import json
import socket
import subprocess
import uuid

import anthropic
import h2.config
import h2.connection
import h2.events
import openai
import pytest

from clients import PRO, assert_spellings_and_repeats_change_nothing, assert_throttled_after, chat, claude, curl, oai
from stack import ROOT, Envoy, binary, envoy_config, free_port, wait_for, wasm_file

def audit_records(server):
    if not server.audit.exists():
        return []
    return [json.loads(line) for line in server.audit.read_text().splitlines() if line.strip()]


def test_allowed_requests_reach_the_upstream_unchanged_and_denied_never(fstack):
    fstack.upstream.reset()
    body = chat("gpt-4o-mini", "What is the capital of France?", temperature=0.2)
    status, _, out = curl(fstack.envoy.url("/v1/chat/completions"), body,
                          {"x-custom": "kept", "x-llm-policy-decision": "forged"})
    assert status == 200, out
    seen = fstack.upstream.requests()
    assert len(seen) == 1
    assert base64.b64decode(seen[0]["body"]) == body
    assert seen[0]["headers"]["x-custom"] == "kept"
    assert seen[0]["headers"]["x-llm-policy-decision"] == "allow"

    fstack.upstream.reset()
    status, headers, out = curl(fstack.envoy.url("/v1/chat/completions"), chat("gpt-3.5-turbo"))
    assert status == 403
    assert headers["x-llm-policy-decision"] == "deny"
    assert headers["x-policy-note"] == "model-not-approved"
    assert json.loads(out)["error"] == {"message": "model is not approved", "type": "permission_denied",
                                        "param": None, "code": "policy_denied"}
    assert fstack.upstream.requests() == []


def test_the_sdks_raise_the_right_exceptions_and_stream(fstack):
    client = oai(fstack.envoy)
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.chat.completions.create(model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 403 and "model is not approved" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "my key is AKIAABCDEFGHIJKLMNOP"}])
    assert "contains a credential" in str(e.value)
    stream = client.chat.completions.create(model="gpt-4o", stream=True, messages=[{"role": "user", "content": "hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello from the mock upstream."

    c = claude(fstack.envoy)
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        c.messages.create(model="claude-2.1", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"] == {"type": "permission_error", "message": "model is not approved"}
    with c.messages.stream(model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "hi"}]) as s:
        assert "".join(s.text_stream) == "Hello from the mock upstream."


def test_413_400_and_other_routes(fstack):
    fstack.upstream.reset()
    status, _, out = curl(fstack.envoy.url("/v1/chat/completions"), chat("gpt-4o-mini", "x" * (2 * 1024 * 1024)))
    assert status == 413, out[:200]
    assert json.loads(out)["error"]["code"] == "body_too_large"
    status, _, out = curl(fstack.envoy.url("/v1/messages"), b'{"model": "claude-sonnet-4-5", "messages": [')
    assert status == 400
    assert json.loads(out)["type"] == "error"
    assert json.loads(out)["error"]["type"] == "invalid_request_error"
    assert fstack.upstream.requests() == []
    # Not an LLM API call: untouched, unbuffered, no verdict.
    status, _, _ = curl(fstack.envoy.url("/v1/models"), method="GET")
    assert status == 200
    status, _, _ = curl(fstack.envoy.url("/internal/uploads/part"), b"\x00 not json \xff")
    assert status != 400
    seen = fstack.upstream.requests()
    assert [r["path"] for r in seen] == ["/internal/uploads/part"]
    assert base64.b64decode(seen[0]["body"]) == b"\x00 not json \xff"
    assert "x-llm-policy-decision" not in seen[0]["headers"]


def test_local_limits_throttle_after_n_across_workers(fstack):
    fstack.upstream.reset()
    user = f"user-{uuid.uuid4().hex[:8]}"
    assert_throttled_after(lambda: oai(fstack.envoy, **{"x-llm-policy-namespace": "e2e-local", "x-user-id": user}),
                           5, 20, "more than 5 requests per hour on this proxy")
    assert len(fstack.upstream.requests()) == 5


def h2_post(port, path, headers, body, trailers):
    """One HTTP/2 (prior knowledge) POST whose body ends with trailers: (status, body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "POST"), (":path", path), (":scheme", "http"),
                            (":authority", "localhost"), ("content-type", "application/json"), *headers])
    conn.send_data(sid, body)
    conn.send_headers(sid, trailers, end_stream=True)
    sock.sendall(conn.data_to_send())
    status, data, done = None, b"", False
    while not done:
        chunk = sock.recv(65536)
        if not chunk:
            break
        for ev in conn.receive_data(chunk):
            if isinstance(ev, h2.events.ResponseReceived):
                status = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived):
                data += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                done = True
        sock.sendall(conn.data_to_send())
    sock.close()
    return status, data


def test_an_http2_request_with_trailers_is_decided(fstack):
    fstack.upstream.reset()
    status, data = h2_post(fstack.envoy.port, "/v1/chat/completions", [], chat("gpt-3.5-turbo"), [("x-checksum", "abc")])
    assert status == 403, data
    assert json.loads(data)["error"]["message"] == "model is not approved"
    status, _ = h2_post(fstack.envoy.port, "/v1/chat/completions", [], chat("gpt-4o-mini"), [("x-checksum", "abc")])
    assert status == 200
    assert len(fstack.upstream.requests()) == 1


def test_only_requests_that_need_the_server_reach_it(fstack):
    before = len(audit_records(fstack.server))
    # No user id: the filter decides alone.
    status, _, _ = curl(fstack.envoy.url("/v1/chat/completions"), chat("gpt-4o-mini"))
    assert status == 200
    # A user id: the global per-user rate limit is the server's, so the filter asks it.
    user = f"u-{uuid.uuid4().hex[:6]}"
    status, _, _ = curl(fstack.envoy.url("/v1/chat/completions"), chat("gpt-4o-mini"), {"x-user-id": user})
    assert status == 200
    wait_for(lambda: len(audit_records(fstack.server)) > before, "the server's audit record")
    new = audit_records(fstack.server)[before:]
    assert len(new) == 1, new
    assert new[0]["principal"]["id"] == user
    assert new[0]["decision"] == "allow"


def test_with_the_server_down_requests_that_need_it_fail_closed(fstack, tmp_path):
    text = envoy_config("filter+fallback", fstack.policies, server=f"127.0.0.1:{free_port()}")
    envoy = Envoy(tmp_path, None, fstack.upstream.port, tmp_path, text=text)
    try:
        status, headers, out = curl(envoy.url("/v1/chat/completions"), chat("gpt-4o-mini"), {"x-user-id": "someone"})
        assert status == 503, out
        assert headers["x-llm-policy-decision"] == "error"
        assert json.loads(out)["error"]["code"] == "policy_unavailable"
        # What the filter decides alone still flows.
        status, _, _ = curl(envoy.url("/v1/chat/completions"), chat("gpt-4o-mini"))
        assert status == 200
        status, _, _ = curl(envoy.url("/v1/chat/completions"), chat("gpt-3.5-turbo"))
        assert status == 403
    finally:
        envoy.proc.stop()


def test_a_broken_filter_configuration_is_rejected_with_its_location(tmp_path):
    text = envoy_config("filter", ROOT / "policies").replace('"defaultDecision": "allow"', '"defaultDecision": "maybe"', 1)
    assert '"maybe"' in text
    path = tmp_path / "broken.yaml"
    path.write_text(text.replace("target/wasm32-wasip1/wasm/llm_policy_filter.wasm", str(wasm_file())))
    r = subprocess.run([str(binary("ENVOY_BIN", "tools/envoy/_bin/envoy")), "--mode", "validate", "-c", str(path),
                        "--base-id", str(free_port())], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "llm-policy: invalid configuration" in out, out[-2000:]
    assert "filter configuration: policies[0]" in out
    assert "maybe" in out


def test_hostile_headers_do_not_crash_the_vm(fstack):
    # A header value that is not UTF-8 (Envoy allows obs-text): the SDK's string API would panic.
    args = [b"curl", b"-sS", b"-o", b"/dev/null", b"-w", b"%{http_code}", b"--max-time", b"10",
            b"-H", b"content-type: application/json", b"-H", b"x-user-tier: \xff\xfe",
            b"--data-binary", chat("gpt-4o-mini"), fstack.envoy.url("/v1/chat/completions").encode()]
    out = subprocess.run(args, capture_output=True, check=True).stdout
    assert out in (b"200", b"403")
    for _ in range(4):
        status, _, _ = curl(fstack.envoy.url("/v1/chat/completions"), chat("gpt-4o-mini"))
        assert status == 200


def test_usage_of_a_streamed_answer_is_reported_to_the_server(fstack):
    """A team's request: the server's token budget reserves an estimate (the filter asks it), the answer streams through the filter untouched, and the usage in its SSE events is
    reported back under the reservation (RecordUsage) — never sent to the provider."""
    fstack.upstream.reset()
    before = fstack.server.metric('llm_policy_usage_reports_total{result="recorded"}')
    c = claude(fstack.envoy, **{"x-llm-policy-namespace": "e2e-budget", "x-team-id": "research"})
    with c.messages.stream(model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "hi"}]) as s:
        assert "".join(s.text_stream) == "Hello from the mock upstream."
    seen = fstack.upstream.requests()
    assert len(seen) == 1
    assert "x-llm-policy-reservation" not in seen[0]["headers"]
    wait_for(lambda: fstack.server.metric('llm_policy_usage_reports_total{result="recorded"}') == before + 1,
             "the usage report", timeout=5)
    # A JSON answer too.
    r = c.messages.create(model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    assert r.usage.output_tokens > 0
    wait_for(lambda: fstack.server.metric('llm_policy_usage_reports_total{result="recorded"}') == before + 2,
             "the second usage report", timeout=5)
    assert fstack.server.metric('llm_policy_usage_reports_total{result="unknown"}') == 0


NEW_RULE = """
apiVersion: llm-policy/v1
kind: Policy
metadata: {name: late-addition, version: "2"}
spec:
  defaultDecision: allow
  rules:
    - id: no-mini-after-all
      priority: 500
      when: { match: { field: request.model, op: eq, value: gpt-4o-mini } }
      action: { decision: deny, reason: "gpt-4o-mini was withdrawn" }
"""


def test_bundle_sync_swaps_a_new_policy_while_traffic_flows(fstack):
    """The server reloads a new policy file; the filter's workers fetch it (GET /v1/bundle with
    If-None-Match) and decide with it, while requests keep flowing without a failure."""
    import threading
    old = fstack.server.bundle()
    failures, sent, stop = [], [0], threading.Event()

    def traffic():
        while not stop.is_set():
            status, _, out = curl(fstack.envoy.url("/v1/chat/completions"), chat("gpt-4o"), PRO)
            sent[0] += 1
            if status != 200:
                failures.append((status, out[:200]))

    t = threading.Thread(target=traffic)
    t.start()
    try:
        (fstack.server.policies / "late.yaml").write_text(NEW_RULE)
        wait_for(lambda: fstack.server.bundle() != old, "the server's reload")

        def denied():
            status, _, out = curl(fstack.envoy.url("/v1/chat/completions"), chat("gpt-4o-mini"))
            return status == 403 and b"withdrawn" in out

        # Both workers must have it: several answers in a row on fresh connections.
        wait_for(lambda: all(denied() for _ in range(6)), "the filter deciding with the new bundle", timeout=10)
    finally:
        stop.set()
        t.join()
        (fstack.server.policies / "late.yaml").unlink(missing_ok=True)
        # Back to the original bundle, everywhere, for the tests that follow.
        wait_for(lambda: fstack.server.bundle() == old, "the server's reload")
        wait_for(lambda: all(curl(fstack.envoy.url("/v1/chat/completions"), chat("gpt-4o-mini"))[0] == 200
                             for _ in range(6)), "the filter back on the original bundle", timeout=10)
    assert sent[0] > 0
    assert failures == []


def test_path_spellings_and_repeated_identity_headers_do_not_get_around_the_policy(fstack):
    """Found by a hostile review: spellings of an API path a lenient upstream may accept, and a
    principal header sent twice (joined, `free,free` matched no free-tier rule)."""
    assert_spellings_and_repeats_change_nothing(fstack)
