"""Decision parity: every request of the example bundle's test suites (`policies/tests/`) gets the
same answer through Envoy with the filter (filter+fallback), through Envoy with ext_authz and the
server, and from `llm-policy eval`: the same verdict, status, reply body (byte for byte) and, for
requests that go ahead, the same headers upstream."""

import json
import subprocess

import yaml

from stack import ROOT, binary
from clients import curl


def cases():
    for suite in sorted((ROOT / "policies" / "tests").glob("*.yaml")):
        for case in yaml.safe_load(suite.read_text())["cases"]:
            yield suite.name, case


def send(envoy_url, upstream, req):
    """(status, verdict header, body, upstream headers or None) of one request through Envoy."""
    upstream.reset()
    body = req.get("body")
    raw = body.encode() if isinstance(body, str) else (json.dumps(body).encode() if body is not None else None)
    headers = {k: str(v) for k, v in (req.get("headers") or {}).items()}
    status, got, out = curl(envoy_url(req.get("path", "/v1/chat/completions")), raw, headers,
                            method=req.get("method", "POST"))
    seen = upstream.requests()
    up = seen[0]["headers"] if seen else None
    # The verdict: on the reply, or (allowed) on the request upstream.
    verdict = got.get("x-llm-policy-decision") or (up or {}).get("x-llm-policy-decision")
    return status, verdict, out, up


def evaluate(req, tmp_path):
    """`llm-policy eval` on the request (at the current time, as the proxies decide)."""
    req = {k: v for k, v in req.items() if k not in ("time", "now")}
    path = tmp_path / "request.json"
    path.write_text(json.dumps(req))
    r = subprocess.run([str(binary("LLM_POLICY_BIN", "target/release/llm-policy")), "eval", "--policy",
                        str(ROOT / "policies"), "--request", str(path)], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else None


def test_filter_server_and_cli_decide_the_example_suites_alike(stack, fstack, tmp_path):
    compared, with_cli = 0, 0
    for suite, case in cases():
        req = case["request"]
        name = f"{suite}: {case['name']}"
        f = send(fstack.envoy.url, fstack.upstream, req)
        s = send(stack.envoy.url, stack.upstream, req)
        assert f[0] == s[0], f"{name}: status {f[0]} through the filter, {s[0]} through the server"
        assert f[1] == s[1], f"{name}: verdict {f[1]} vs {s[1]}"
        if f[0] == 200:
            assert f[3] is not None and s[3] is not None, name
            # Per-request values: Envoy's request id, and the (random) handle a budget's reservation
            # waits under (the filter keeps it for its own usage report; with ext_authz it goes
            # upstream for whoever reports usage).
            varying = ("x-request-id", "x-forwarded-proto", "x-llm-policy-reservation")
            ours = {k: v for k, v in f[3].items() if k.startswith("x-") and k not in varying}
            theirs = {k: v for k, v in s[3].items() if k.startswith("x-") and k not in varying}
            assert ours == theirs, f"{name}: upstream headers differ"
        else:
            assert f[2] == s[2], f"{name}: reply bodies differ:\n{f[2]}\n{s[2]}"
        compared += 1
        d = evaluate(req, tmp_path)
        if d is None:
            # Rejected before evaluation (400 / 413): both proxies said so.
            assert f[0] in (400, 413), f"{name}: eval rejected it, the proxies answered {f[0]}"
            continue
        if d["metadata"]["needs_remote"]:
            continue  # eval alone cannot finish it; the server did, for both proxies
        with_cli += 1
        assert f[1] == d["decision"], f"{name}: eval says {d['decision']}, the proxies {f[1]}"
        if d["decision"] != "allow":
            want = d["actions"].get("status") or (429 if d["decision"] == "throttle" else 403)
            assert f[0] == want, f"{name}: eval's status {want}, the proxies' {f[0]}"
            assert json.loads(f[2])["error"]["message"] == d["reason"], name
        else:
            for k, v in d["actions"]["headers"].items():
                assert f[3].get(k) == v, f"{name}: upstream header {k}"
    print(f"parity: {compared} requests compared, {with_cli} also with llm-policy eval")
    assert compared >= 25
    assert with_cli >= 15
