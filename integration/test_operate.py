"""Operating it, through a real Envoy in both deployment modes: the fleet view (each filter says
what it runs with its syncs), a canary decided beside the bundle and never enforced (in the
filter and on the server), and `llm-policy replay` of what the server recorded."""

import json
import subprocess
import time
import urllib.request

import pytest

from clients import chat, curl
from stack import TOKEN, Envoy, Server, Upstream, binary, envoy_config, http_get, wait_for

POLICY = """
apiVersion: llm-policy/v1
kind: Policy
metadata: {{name: operate, namespace: e2e-operate, version: "{version}"}}
spec:
  defaultDecision: allow
  rules:
{rules}
"""


ALARM = ("    - {id: alarm, priority: 100, when: {match: {field: request.model, op: eq, value: gpt-alarm}}, "
         "action: {decision: deny, reason: \"gpt-alarm raises an alarm\", alert: critical}}\n")


def policy(models, version="1"):
    rules = "".join(
        f"    - {{id: deny-{m}, when: {{match: {{field: request.model, op: eq, value: {m}}}}}, "
        f"action: {{decision: deny, reason: \"{m} is not approved\"}}}}\n" for m in models)
    return POLICY.format(version=version, rules=ALARM + rules)


HEADERS = {"x-llm-policy-namespace": "e2e-operate", "x-user-id": "ops", "authorization": "Bearer sk-live-secret-0123456789"}


def api(server, method, path, body=None):
    req = urllib.request.Request(server.url(path), method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def get(server, path):
    return json.loads(http_get(server.url(path))[1])


class Webhook:
    """A webhook receiver on loopback that keeps what it is sent (path, headers, body)."""

    SECRET = "e2e-webhook-secret-0123456789"

    def __init__(self):
        import http.server
        import threading
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def verified(self):
        """The bodies whose `x-llm-policy-signature` is the HMAC of `t.body` with the secret."""
        import hashlib
        import hmac
        out = []
        for _, headers, body in self.received:
            sig = dict(p.split("=", 1) for p in headers.get("x-llm-policy-signature", "").split(","))
            mac = hmac.new(self.SECRET.encode(), f"{sig.get('t')}.".encode() + body, hashlib.sha256).hexdigest()
            if hmac.compare_digest(mac, sig.get("v1", "")) and abs(time.time() - int(sig["t"])) < 300:
                out.append(json.loads(body))
        return out


def make_stack(tmp, mode, webhook=None):
    """Upstream, a server recording contexts (and delivering alerts to `webhook`), Envoy in `mode`
    (the filter syncing every 300 ms)."""
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "operate.yaml").write_text(policy(["gpt-banned"]))
    procs = []
    upstream = Upstream(tmp)
    procs.append(upstream.proc)
    (tmp / "server").mkdir()
    extra = {"audit": {"stdout": False, "file": {"path": str(tmp / "server" / "audit.log")}, "context": True}}
    if webhook:
        (tmp / "hook-secret").write_text(Webhook.SECRET)
        extra["alerts"] = {"webhooks": [{"url": webhook.url, "secretFile": str(tmp / "hook-secret")}]}
    server = Server(tmp / "server", policies, log_dir=tmp, config_extra=extra)
    procs.append(server.proc)
    if mode == "filter":
        text = envoy_config("filter+fallback", policies, server=f"127.0.0.1:{server.grpc}",
                            sync_from=f"127.0.0.1:{server.http}", sync_interval_ms=300,
                            usage_token_file=server.usage_token_file)
        envoy = Envoy(tmp, None, upstream.port, tmp, text=text, concurrency=2)
    else:
        envoy = Envoy(tmp, server, upstream.port, tmp)
    procs.append(envoy.proc)
    return upstream, server, envoy, procs


@pytest.fixture(params=["filter", "ext-authz"])
def ops(request, tmp_path):
    webhook = Webhook()
    upstream, server, envoy, procs = make_stack(tmp_path, request.param, webhook)
    try:
        yield type("Ops", (), {"mode": request.param, "upstream": upstream, "server": server, "envoy": envoy,
                               "tmp": tmp_path, "webhook": webhook})
    finally:
        for p in reversed(procs):
            p.stop()
        webhook.server.shutdown()


def test_alerts_reach_a_signed_webhook_in_both_modes(ops):
    """An `alert` rule denies through Envoy; the server delivers the alert record to the webhook,
    signed; in filter mode the filter decided alone and reported the alert with its reports."""
    status, _ = send(ops, "gpt-alarm")
    assert status == 403
    wait_for(lambda: ops.webhook.verified(), "the signed alert at the webhook", timeout=15)
    alert = ops.webhook.verified()[0]
    assert alert["kind"] == "alert" and alert["alert"] == "critical", alert
    assert alert["deciding_rule"] == "alarm" and alert["principal"]["id"] == "ops", alert
    assert alert["identity"]["via"] == ("filter" if ops.mode == "filter" else "trusted-header"), alert
    assert "sk-live-secret" not in json.dumps(alert)
    # A forged signature would not pass: the receiver's check is real.
    path, headers, body = ops.webhook.received[0]
    ops.webhook.received.append((path, {**headers, "x-llm-policy-signature": "t=1,v1=00"}, body))
    assert len(ops.webhook.verified()) == 1


def send(ops, model):
    status, _, body = curl(ops.envoy.url("/v1/chat/completions"), chat(model), HEADERS)
    return status, body


def test_the_fleet_view_shows_each_filter_and_what_it_runs(ops):
    if ops.mode != "filter":
        pytest.skip("only filters sync their bundle")
    server = ops.server
    bundle = server.bundle()

    def listed():
        fleet = get(server, "/v1/fleet")
        nodes = {n["node"]: n for n in fleet["nodes"]}
        return ops.envoy.node in nodes and nodes[ops.envoy.node]["current"] and fleet["current"] == 1
    wait_for(listed, "the filter in the fleet view", timeout=10)
    node = {n["node"]: n for n in get(server, "/v1/fleet")["nodes"]}[ops.envoy.node]
    assert node["running"] == bundle and node["lastError"] is None
    # The gauge is exported every 5 s.
    wait_for(lambda: server.metric(f'llm_policy_fleet_proxies{{bundle="{bundle}"}}') == 1.0, "the fleet gauge",
             timeout=10)

    # A new bundle: the fleet converges on it (the filter reports it with its next sync).
    (server.policies / "operate.yaml").write_text(policy(["gpt-banned", "gpt-other"], version="2"))
    wait_for(lambda: server.bundle() != bundle, "the server's reload")
    new = server.bundle()
    wait_for(lambda: {n["node"]: n for n in get(server, "/v1/fleet")["nodes"]}[ops.envoy.node]["running"] == new,
             "the filter running the new bundle", timeout=10)
    assert send(ops, "gpt-other")[0] == 403


def test_a_canary_counts_disagreements_without_enforcing_them_and_replay_sees_them_too(ops):
    server = ops.server
    candidate = policy(["gpt-banned", "gpt-next"], version="2")
    status, body = api(server, "PUT", "/v1/canary", {"files": {"operate.yaml": candidate}})
    assert status == 200, body
    # Until the filter has synced the candidate its requests are not decided again: send until
    # the disagreements show (the filter's come back with its syncs, the server's at once).
    where = "filters" if ops.mode == "filter" else None
    sent = 0
    deadline = time.time() + 15
    while True:
        status, _ = send(ops, "gpt-next")
        sent += 1
        assert status == 200, "a canary never enforces"
        s = get(server, "/v1/canary")
        counts = s[where] if where else s
        if counts["disagreements"] >= 3:
            break
        assert time.time() < deadline, s
        time.sleep(0.1)
    assert send(ops, "gpt-banned")[0] == 403
    s = get(server, "/v1/canary")
    if ops.mode == "filter":
        # Envoy's own stats count them too.
        stats = http_get(f"http://127.0.0.1:{ops.envoy.admin}/stats?filter=canary")[1].decode()
        assert "llm_policy.canary.disagreements" in stats, stats
    else:
        assert s["byRule"][0]["rule"] == "deny-gpt-next" and s["byRule"][0]["from"] == "allow", s
        assert server.metric('llm_policy_canary_disagreements_total{from="allow",rule="deny-gpt-next",to="deny"}') >= 3
    status, body = api(server, "POST", "/v1/canary/abort")
    assert status == 200 and body["state"] == "aborted", body

    # Replay: what the server recorded (ext_authz: every request; filter: what it asked the
    # server, none here), re-decided with the candidate.
    if ops.mode != "ext-authz":
        return
    wait_for(lambda: server.audit.exists() and "gpt-banned" in server.audit.read_text(), "the audit records")
    text = server.audit.read_text()
    assert "sk-live-secret" not in text, "a credential in the audit log"
    records = [json.loads(line) for line in text.splitlines()]
    canaries = [r for r in records if r["kind"] == "canary"]
    assert canaries and canaries[0]["canary"]["decidingRule"] == "deny-gpt-next", canaries[:1]
    cand = ops.tmp / "candidate"
    cand.mkdir()
    (cand / "operate.yaml").write_text(candidate)
    out = subprocess.run([str(binary("LLM_POLICY_BIN", "target/release/llm-policy")), "replay", "--audit",
                          str(server.audit), "--policy", str(cand), "--format", "json", "--fail-on-change"],
                         capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    changed = [c for c in report["byRule"] if c["to"] == "deny"]
    assert changed and changed[0]["rule"].startswith("deny-gpt-next (") and changed[0]["count"] == sent, report
    assert report["replayed"] == sent + 1 and report["changed"] == sent, report
