"""`make demo`, part 2: the example bundle served by `llm-policy serve` behind a real Envoy, in
front of the mock LLM upstream. Sends each sample request (`examples/requests/`) through Envoy
with curl and shows the answer, what reached the upstream, the audit records and the metrics.
Everything runs on loopback and is stopped at the end."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from stack import ROOT, Envoy, Server, Upstream, http_get

SHOWN_HEADERS = ("x-llm-policy-decision", "retry-after", "x-ratelimit-limit", "x-ratelimit-remaining",
                 "x-policy-violation", "x-policy-note", "content-type")


def curl(url, req):
    args = ["curl", "-sS", "-X", req.get("method", "POST"), "-D", "-", "-o", "-", url, "--max-time", "10", "-H", "expect:"]
    for k, v in req.get("headers", {}).items():
        args += ["-H", f"{k}: {v}"]
    body = req.get("body")
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    args += ["--data-binary", "@-"]
    raw = subprocess.run(args, input=data, capture_output=True, check=True).stdout
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return lines[0], headers, rest.decode(errors="replace")


def main():
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            upstream = Upstream(tmp)
            procs.append(upstream.proc)
            server = Server(tmp, ROOT / "policies")
            procs.append(server.proc)
            envoy = Envoy(tmp, server, upstream.port, tmp)
            procs.append(envoy.proc)
            print(f"== mock upstream 127.0.0.1:{upstream.port}, llm-policy serve gRPC :{server.grpc} REST :{server.http} "
                  f"metrics :{server.metrics}, Envoy :{envoy.port}")
            for path in sorted((ROOT / "examples" / "requests").glob("*.json")):
                req = json.loads(path.read_text())
                before = len(upstream.requests())
                status, headers, body = curl(envoy.url(req.get("path", "/v1/chat/completions")), req)
                reached = len(upstream.requests()) > before
                print(f"\n== {path.name}: {req.get('method', 'POST')} {req.get('path')} through Envoy")
                print(f"   {status}")
                for h in SHOWN_HEADERS:
                    if h in headers:
                        print(f"   {h}: {headers[h]}")
                print(f"   body: {body[:300]}")
                print(f"   reached the upstream: {'yes' if reached else 'no'}")
            print("\n== Prometheus metrics (llm_policy_*)")
            _, text = http_get(f"http://127.0.0.1:{server.metrics}/metrics")
            for line in text.decode().splitlines():
                if line.startswith(("llm_policy_decisions_total", "llm_policy_check_duration_seconds_count",
                                    "llm_policy_bundle_info", "llm_policy_alerts_total", "llm_policy_reloads_total")):
                    print(f"   {line}")
            # Stop the server (SIGTERM drains it and flushes the audit queue).
            server.proc.stop()
            procs.remove(server.proc)
            print("\n== audit records (one JSON line per decision, written by the server)")
            for line in server.audit.read_text().splitlines():
                r = json.loads(line)
                print(f"   {r['kind']:8} {r['decision']:8} {r['status']} ns={r['namespace']} rules={r['matched_rules']} "
                      f"reason={r['reason'][:70]!r}")
            print("\n== the server's log (structured, stderr)")
            for line in server.proc.text().splitlines()[:3]:
                print(f"   {line[:160]}")
            print("\n== Envoy's view: ext_authz stats")
            _, stats = http_get(f"http://127.0.0.1:{envoy.admin}/stats?filter=ext_authz")
            for line in stats.decode().splitlines():
                if line.split(":")[1].strip() != "0":
                    print(f"   {line}")
        finally:
            for p in reversed(procs):
                p.stop()
    print("\n== stopped: upstream, server, Envoy")


if __name__ == "__main__":
    sys.exit(main())
