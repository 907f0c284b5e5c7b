"""`make bench-proxy`: the proxy path under load, all on loopback, one run, one machine.

Three Envoy 1.40 set-ups in front of the same fast upstream (`bench-upstream`), each driven by
`loadgen` with 8 KB chat bodies, at a fixed 1,000 rps and at saturation:

  1. passthrough: Envoy alone (`envoy/passthrough.yaml`);
  2. floor: Envoy + ext_authz → `allow-authz`, a gRPC server that allows without looking;
  3. llm-policy: Envoy + ext_authz → `llm-policy serve` on the example bundle (`policies/`);
     then the same with `--identity jwt` (Envoy's jwt_authn verifies an RS256 token) and with
     `--identity api-keys` (the server looks up a virtual key among 1,000; Envoy's
     credential_injector sets the provider's key): the cost of identity in the same run;
     and the response path: the same without Envoy's ext_proc filter (what reading usage costs
     for requests no budget applies to: the stream ends after the response headers), and a
     namespace whose requests all reserve from a token budget, with and without ext_proc (the
     answer's body read by the server and its usage committed).

Then `Check` called directly over gRPC against `llm-policy serve` pinned to one core (cached
decisions), and a 10,000-rule bundle written into the policy directory while 500 rps flow
through Envoy: failed requests and the time until the new version serves.

First, the example bundle by deployment and body size on one core: Envoy (one worker) with the
filter, or Envoy with ext_authz to `llm-policy serve` beside it, against passthrough and the
ext_authz floor, with unique 1 / 8 / 64 KB bodies (`BENCH_SIZES_KB`) at saturation: which
deployment serves more on the same CPU. `BENCH_PARTS=main` or `=sizes` runs one part.

The machine is shared and noisy: compare the ratios of one run, not absolute numbers across
runs. Results: a Markdown table on stdout and `tools/bench-proxy.json`.
"""

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchkit import BIN, bench_upstream, chat_body, identity_material, loadgen, non_200, pin, save
from stack import ROOT, Envoy, Proc, Server, free_port

RATE_SECS = int(os.environ.get("BENCH_SECS", "10"))
# The body sizes of the by-size comparison (`BENCH_SIZES_KB`), and which parts run
# (`BENCH_PARTS`: `main` for everything above, `sizes` for the comparison; default both).
SIZES_KB = [int(k) for k in os.environ.get("BENCH_SIZES_KB", "1,8,64").split(",")]
PARTS = set(os.environ.get("BENCH_PARTS", "main,sizes").split(","))
assert PARTS and PARTS <= {"main", "sizes"}, f"BENCH_PARTS: main, sizes or both, not {PARTS}"

# A namespace whose every request reserves from a token budget that never runs out.
BENCH_SPEND = """
apiVersion: llm-policy/v1
kind: Policy
metadata: {name: bench-spend, namespace: bench-spend, version: "1"}
spec:
  defaultDecision: allow
  rules:
    - id: everyone-tokens
      priority: 10
      when: { match: { field: request.model, op: exists } }
      action:
        decision: throttle
        budget: { key: "all", tokens: 1000000000000000, per: day }
"""


def ext_authz_without_ext_proc():
    """`envoy/ext-authz.yaml` without its ext_proc filter: the floor's configuration (an
    allow-everything server serves no ext_proc), and `llm-policy serve` without its response path."""
    return without_ext_proc((ROOT / "envoy" / "ext-authz.yaml").read_text())


def without_ext_proc(text):
    """The generated ext_authz configuration without its ext_proc filter (the response path)."""
    start = text.index("                  # Every answer's usage")
    end = text.index("\n", text.index("untyped: [", start)) + 1
    return text[:start] + text[end:]




def http_scenarios(url, headers=()):
    extra = [a for h in headers for a in ("--header", h)]
    fixed = loadgen("http", "--url", url, "--rate", 1000, "--duration", RATE_SECS, "--concurrency", 64, *extra)
    sat = loadgen("http", "--url", url, "--concurrency", 32, "--duration", RATE_SECS, *extra)
    return {"fixed_1000": fixed, "saturation": sat}


def identity_runs(tmp, up_port, procs, results):
    """`llm_policy` again behind `--identity jwt` and `--identity api-keys`. The JWT principal
    carries a tier and no id; a key is its own principal id, so its requests are counted by the
    example bundle's per-user limit, raised here (a copy of `policies/`) out of the load's way:
    the api-keys rows include that counter."""
    from stack import binary, envoy_config

    cli = str(binary("LLM_POLICY_BIN", "target/release/llm-policy"))
    token, secret = identity_material(tmp)
    (tmp / "claims.json").write_text('{"principalClaims": {"tier": "tier"}}')
    keys = tmp / "keys.json"
    home = tmp / "keyed"
    home.mkdir()
    bundle = tmp / "bundle"
    bundle.mkdir()
    for f in (ROOT / "policies").glob("*.yaml"):
        (bundle / f.name).write_text(f.read_text().replace("requests: 120, per: minute", "requests: 100000000, per: minute"))
    server = Server(home, bundle, config_extra={"keysFile": str(keys)})
    procs.append(server.proc)
    jwt_config = subprocess.run([cli, "--context-config", str(tmp / "claims.json"), "envoy-config", "--mode",
                                 "ext-authz", "--upstream", "http://127.0.0.1:18000", "--listen", "0.0.0.0:10000",
                                 "--identity", "jwt", "--jwt-issuer", "https://idp.bench", "--jwt-audience", "llm",
                                 "--jwks-file", str(tmp / "jwks.json"), "--provider-key-file",
                                 str(tmp / "provider.key")], capture_output=True, text=True, check=True).stdout
    keys_config = envoy_config("ext-authz", identity="api-keys", provider_key_file=tmp / "provider.key")
    for name, text, header in [("llm_policy_jwt", jwt_config, f"authorization: Bearer {token}"),
                               ("llm_policy_api_keys", keys_config, f"authorization: Bearer {secret}")]:
        e = Envoy(tmp, server, up_port, tmp, text=text)
        results[name] = http_scenarios(e.url("/v1/chat/completions"), [header])
        e.proc.stop()
    server.proc.stop()
    procs.remove(server.proc)


def by_size(tmp, up_port, procs):
    """The example bundle in each deployment on the same CPU, by body size: Envoy with one worker
    (and, with ext_authz, `llm-policy serve` beside it) on core 0; the load generator and the
    upstream on core 1. Unique bodies (a nonce per request: no decision is reused), closed loop at
    saturation. Also the floor of each deployment: passthrough, and ext_authz to `allow-authz`."""
    from stack import envoy_config

    files = {}
    for kb in SIZES_KB:
        f = tmp / f"size-{kb}.json"
        f.write_bytes(chat_body(kb * 1024))
        files[kb] = f
    out = {}

    def run(name, envoy, *others):
        try:
            pin(envoy.proc, 0)
            for p in others:
                pin(p, 0)
            url = envoy.url("/v1/chat/completions")
            out[name] = {}
            for kb, f in files.items():
                out[name][str(kb)] = loadgen("http", "--url", url, "--concurrency", 32, "--duration", RATE_SECS,
                                             "--body-file", f, "--unique", cpu=1)
        finally:
            envoy.proc.stop()

    e = Envoy(tmp, None, up_port, tmp, config="passthrough.yaml", concurrency=1)
    run("passthrough", e)
    floor_port = free_port()
    floor = Proc("allow-authz-sizes", [str(BIN / "allow-authz"), f"127.0.0.1:{floor_port}"], tmp)
    procs.append(floor)
    time.sleep(0.5)
    run("ext_authz_floor", Envoy(tmp, None, up_port, tmp, authz_port=floor_port, concurrency=1,
                                 text=ext_authz_without_ext_proc()), floor)
    floor.stop()
    procs.remove(floor)
    (tmp / "sizes").mkdir()
    # One runtime worker, as on the one core it gets.
    os.environ["TOKIO_WORKER_THREADS"] = "1"
    server = Server(tmp / "sizes", ROOT / "policies")
    del os.environ["TOKIO_WORKER_THREADS"]
    procs.append(server.proc)
    run("ext_authz_example_bundle", Envoy(tmp, server, up_port, tmp, concurrency=1), server.proc)
    server.proc.stop()
    procs.remove(server.proc)
    run("filter_example_bundle", Envoy(tmp, None, up_port, tmp, text=envoy_config("filter", ROOT / "policies"),
                                       concurrency=1))
    return out


def print_sizes(r):
    names = ("passthrough", "ext_authz_floor", "ext_authz_example_bundle", "filter_example_bundle")
    print("| body | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for kb in SIZES_KB:
        cells = []
        for n in names:
            x = r[n][str(kb)]
            bad = non_200(x)
            cells.append(f"{x['rps']:.0f} rps, p99 {x['p99_ms']:.1f} ms" + (f", {bad} non-200" if bad else ""))
        print(f"| {kb} KB | " + " | ".join(cells) + " |")


def main():
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        procs = []
        try:
            upstream, up_port = bench_upstream(tmp)
            procs.append(upstream)
            if "sizes" in PARTS:
                # 6. The example bundle by deployment and body size, on one core (first: the
                # upstream is pinned to the other core for it).
                cpus = ",".join(map(str, sorted(os.sched_getaffinity(upstream.p.pid))))
                pin(upstream, 1)
                results["by_size"] = by_size(tmp, up_port, procs)
                save("bench-proxy-sizes", results["by_size"])
                pin(upstream, cpus)
            if "main" not in PARTS:
                return finish(results)

            # 1. Passthrough.
            e = Envoy(tmp, None, up_port, tmp, config="passthrough.yaml")
            results["passthrough"] = http_scenarios(e.url("/v1/chat/completions"))
            e.proc.stop()

            # 2. Floor: ext_authz to a server that allows without looking (and no ext_proc
            # stream, which such a server does not serve).
            floor_port = free_port()
            floor = Proc("allow-authz", [str(BIN / "allow-authz"), f"127.0.0.1:{floor_port}"], tmp)
            procs.append(floor)
            time.sleep(0.5)
            e = Envoy(tmp, None, up_port, tmp, authz_port=floor_port, text=ext_authz_without_ext_proc())
            results["floor"] = http_scenarios(e.url("/v1/chat/completions"))
            e.proc.stop()
            floor.stop()

            # 3. llm-policy.
            (tmp / "s").mkdir()
            server = Server(tmp / "s", ROOT / "policies", {"bench-spend.yaml": BENCH_SPEND})
            procs.append(server.proc)
            e = Envoy(tmp, server, up_port, tmp)
            results["llm_policy"] = http_scenarios(e.url("/v1/chat/completions"))
            identity_runs(tmp, up_port, procs, results)
            # The response path (ext_proc), with and without, and with a budget on every request.
            bare = Envoy(tmp, server, up_port, tmp, text=ext_authz_without_ext_proc())
            results["llm_policy_no_ext_proc"] = http_scenarios(bare.url("/v1/chat/completions"))
            spend = ["x-llm-policy-namespace: bench-spend"]
            results["llm_policy_budget"] = http_scenarios(e.url("/v1/chat/completions"), spend)
            results["llm_policy_budget_no_ext_proc"] = http_scenarios(bare.url("/v1/chat/completions"), spend)
            bare.proc.stop()

            # 4. A 10k-rule bundle arrives while 500 rps flow.
            before = server.bundle()
            policy = subprocess.run([str(BIN / "loadgen"), "gen-policy", "--rules", "10000"],
                                    capture_output=True, text=True, check=True).stdout
            swap = {}

            def write_later():
                time.sleep(3)
                t0 = time.time()
                (server.policies / "load-10k.yaml").write_text(policy)
                while server.bundle() == before:
                    time.sleep(0.01)
                swap["seconds"] = time.time() - t0

            t = threading.Thread(target=write_later)
            t.start()
            during = loadgen("http", "--url", e.url("/v1/chat/completions"), "--rate", 500, "--duration", 10,
                             "--concurrency", 64)
            t.join()
            failed = non_200(during)
            results["reload_10k_under_load"] = {"load": during, "failed_requests": failed,
                                                "new_version_serving_after_s": swap.get("seconds")}
            e.proc.stop()
            server.proc.stop()
            procs.remove(server.proc)

            # 5. Check over gRPC, the server on one core, cached decisions.
            s1 = tmp / "one-core"
            s1.mkdir()
            os.environ["TOKIO_WORKER_THREADS"] = "1"
            one = Server(s1, ROOT / "policies")
            del os.environ["TOKIO_WORKER_THREADS"]
            procs.append(one.proc)
            pin(one.proc, 0)
            results["grpc_check_one_core"] = loadgen("check", "--grpc", f"127.0.0.1:{one.grpc}", "--concurrency", 64,
                                                     "--connections", 4, "--duration", 5, cpu=1)
            hits = one.metric('llm_policy_cache_requests_total{level="l1",result="hit"}')
            results["grpc_check_one_core"]["l1_hits"] = hits
        finally:
            for p in reversed(procs):
                p.stop()

    return finish(results)


def finish(results):
    """Saves the results (a partial run apart from the full one) and prints them."""
    full = PARTS >= {"main", "sizes"} and "BENCH_SIZES_KB" not in os.environ
    save("bench-proxy" if full else "bench-proxy-partial", results)
    if "main" in PARTS:
        print_table(results)
    if "by_size" in results:
        print()
        print_sizes(results["by_size"])


def print_table(r):
    print("| set-up | load | rps | p50 ms | p99 ms | non-200 |")
    print("|---|---|---:|---:|---:|---:|")
    for name in ("passthrough", "floor", "llm_policy", "llm_policy_jwt", "llm_policy_api_keys",
                 "llm_policy_no_ext_proc", "llm_policy_budget", "llm_policy_budget_no_ext_proc"):
        for load in ("fixed_1000", "saturation"):
            x = r[name][load]
            bad = non_200(x)
            print(f"| {name} | {load} | {x['rps']:.0f} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {bad} |")
    f, p, t = r["floor"], r["llm_policy"], r["passthrough"]
    print()
    print(f"p99 at 1k rps, llm-policy / floor: {p['fixed_1000']['p99_ms'] / f['fixed_1000']['p99_ms']:.2f}x "
          f"(target <= 1.2x); llm-policy / passthrough: {p['fixed_1000']['p99_ms'] / t['fixed_1000']['p99_ms']:.2f}x")
    print(f"saturation throughput, llm-policy / floor: {p['saturation']['rps'] / f['saturation']['rps']:.2f}; "
          f"llm-policy / passthrough: {p['saturation']['rps'] / t['saturation']['rps']:.2f}")
    for name in ("llm_policy_jwt", "llm_policy_api_keys"):
        x = r[name]
        print(f"{name} / llm_policy: p50 at 1k rps {x['fixed_1000']['p50_ms'] / p['fixed_1000']['p50_ms']:.2f}x, "
              f"p99 {x['fixed_1000']['p99_ms'] / p['fixed_1000']['p99_ms']:.2f}x, saturation "
              f"{x['saturation']['rps'] / p['saturation']['rps']:.2f}x")
    for with_, without in (("llm_policy", "llm_policy_no_ext_proc"),
                           ("llm_policy_budget", "llm_policy_budget_no_ext_proc")):
        a, b = r[with_], r[without]
        print(f"{with_} / {without} (ext_proc response path): p50 at 1k rps "
              f"{a['fixed_1000']['p50_ms'] / b['fixed_1000']['p50_ms']:.2f}x, p99 "
              f"{a['fixed_1000']['p99_ms'] / b['fixed_1000']['p99_ms']:.2f}x, saturation "
              f"{a['saturation']['rps'] / b['saturation']['rps']:.2f}x")
    g = r["grpc_check_one_core"]
    print(f"gRPC Check, server on one core, cached: {g['rps']:.0f} calls/s (target >= 20,000), p99 {g['p99_ms']:.2f} ms, "
          f"errors {g['errors']}")
    rl = r["reload_10k_under_load"]
    print(f"10k-rule bundle under 500 rps: {rl['failed_requests']} failed requests, new version serving after "
          f"{rl['new_version_serving_after_s']:.2f} s (target <= 1 s)")


if __name__ == "__main__":
    sys.exit(main())
