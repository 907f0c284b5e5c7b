"""`make demo`, parts 2 and 3: the example bundle in front of the mock LLM upstream, through a real
Envoy 1.40 —

- with the llm-policy proxy-wasm filter deciding inside Envoy and `llm-policy serve` behind it for
  what the filter cannot decide alone (`llm-policy envoy-config --mode filter+fallback`);
- with Envoy's ext_authz filter asking `llm-policy serve` for every request.

Each sample request (`examples/requests/`) goes through Envoy with curl; the demo shows the answer,
whether it reached the upstream (and, for the filter, whether it needed the server), Envoy's stats,
the server's audit records and metrics. Everything runs on loopback and is stopped at the end."""

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stack import ROOT, Envoy, Server, Upstream, envoy_config, http_get

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


def show(envoy, upstream, server):
    """Sends every sample request through `envoy` and prints what happened."""
    for path in sorted((ROOT / "examples" / "requests").glob("*.json")):
        req = json.loads(path.read_text())
        before = len(upstream.requests())
        asked = audit_lines(server)
        status, headers, body = curl(envoy.url(req.get("path", "/v1/chat/completions")), req)
        reached = len(upstream.requests()) > before
        print(f"\n== {path.name}: {req.get('method', 'POST')} {req.get('path')} through Envoy")
        print(f"   {status}")
        for h in SHOWN_HEADERS:
            if h in headers:
                print(f"   {h}: {headers[h]}")
        print(f"   body: {body[:300]}")
        print(f"   reached the upstream: {'yes' if reached else 'no'}")
        if server is not None:
            time.sleep(0.2)
            print(f"   decided by: {'the server (the filter asked it)' if audit_lines(server) > asked else 'the filter, in Envoy'}")


def audit_lines(server):
    if server is None or not server.audit.exists():
        return 0
    return len(server.audit.read_text().splitlines())


@contextlib.contextmanager
def topology(filter_mode):
    """The mock upstream, `llm-policy serve` on the example bundle, and Envoy in front: with the
    filter (the server behind it) or with ext_authz. Everything is stopped on the way out."""
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            upstream = Upstream(tmp)
            procs.append(upstream.proc)
            server = Server(tmp, ROOT / "policies")
            procs.append(server.proc)
            if filter_mode:
                text = envoy_config("filter+fallback", ROOT / "policies", server=f"127.0.0.1:{server.grpc}",
                                    sync_from=f"127.0.0.1:{server.http}")
                envoy = Envoy(tmp, None, upstream.port, tmp, text=text)
            else:
                envoy = Envoy(tmp, server, upstream.port, tmp)
            procs.append(envoy.proc)
            yield upstream, server, envoy
        finally:
            for p in reversed(procs):
                p.stop()
    print("\n== stopped: upstream, server, Envoy")


def stats(envoy, query):
    _, text = http_get(f"http://127.0.0.1:{envoy.admin}/stats?filter={query}")
    return text.decode().splitlines()


def filter_tour():
    with topology(filter_mode=True) as (upstream, server, envoy):
        print("\n== part 2: Envoy + the llm-policy filter (proxy-wasm), llm-policy serve behind it for global "
              "limits, budgets and plugin rules")
        print(f"   mock upstream 127.0.0.1:{upstream.port}, server gRPC :{server.grpc} REST :{server.http}, "
              f"Envoy :{envoy.port} (config: llm-policy envoy-config --mode filter+fallback)")
        show(envoy, upstream, server)
        print("\n== Envoy's stats of the filter (llm_policy.*, non-zero)")
        for line in stats(envoy, "^wasmcustom%5C.llm_policy"):
            name, _, value = line.partition(":")
            if value.strip() not in ("0", "") and "evaluation_us" not in name:
                print(f"   {line.removeprefix('wasmcustom.')}")
        print("\n== Envoy's view of the policy server (health checks, calls)")
        for line in stats(envoy, "^cluster%5C.llm_policy%5C.(health_check%5C.(success|failure)|upstream_rq_200)$"):
            print(f"   {line}")


def ext_authz_tour():
    print("\n== part 3: Envoy + ext_authz → llm-policy serve (every request checked by the server)")
    with topology(filter_mode=False) as (upstream, server, envoy):
        print(f"   mock upstream 127.0.0.1:{upstream.port}, llm-policy serve gRPC :{server.grpc} REST :{server.http} "
              f"metrics :{server.metrics}, Envoy :{envoy.port}")
        show(envoy, upstream, None)
        print("\n== Prometheus metrics (llm_policy_*)")
        _, text = http_get(f"http://127.0.0.1:{server.metrics}/metrics")
        for line in text.decode().splitlines():
            if line.startswith(("llm_policy_decisions_total", "llm_policy_check_duration_seconds_count",
                                "llm_policy_bundle_info", "llm_policy_alerts_total", "llm_policy_reloads_total")):
                print(f"   {line}")
        # Stop the server (SIGTERM drains it and flushes the audit queue; stopping twice is harmless).
        server.proc.stop()
        print("\n== audit records (one JSON line per decision, written by the server)")
        for line in server.audit.read_text().splitlines():
            r = json.loads(line)
            print(f"   {r['kind']:8} {r['decision']:8} {r['status']} ns={r['namespace']} rules={r['matched_rules']} "
                  f"reason={r['reason'][:70]!r}")
        print("\n== the server's log (structured, stderr)")
        for line in server.proc.text().splitlines()[:3]:
            print(f"   {line[:160]}")
        print("\n== Envoy's view: ext_authz stats")
        for line in stats(envoy, "ext_authz"):
            if line.split(":")[1].strip() != "0":
                print(f"   {line}")


def main():
    filter_tour()
    ext_authz_tour()


if __name__ == "__main__":
    sys.exit(main())
