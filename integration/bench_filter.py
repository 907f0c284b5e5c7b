"""`make bench-filter`: the proxy-wasm filter under load, all on loopback, one run, one machine.

Envoy 1.40 with one worker (`--concurrency 1`, pinned to CPU 0; the load generator and the
upstream share CPU 1) in front of `bench-upstream`, four set-ups:

  1. passthrough: Envoy alone (`envoy/passthrough.yaml`);
  2. floor: Envoy + a no-op wasm filter that only buffers the request body (`benches/noop-filter`);
     with it, the same module making the host calls the filter makes for an allowed request and
     nothing else (`noop_boundary`), and the same with the headers read by name in place of the
     map (`noop_boundary_by_name`): what the boundary costs, apart from the filter's own work;
  3. llm-policy (a): the filter with 100 rules on model / max_tokens / headers;
  4. llm-policy (b): the filter with the example bundle (`policies/`, which also scans prompts);
  5. (a) with `--identity jwt` (Envoy's jwt_authn verifies an RS256 token on every request) and
     (a) with `--identity api-keys` (the filter looks up a virtual key; Envoy's credential_injector
     sets the provider's key): the cost of identity, next to (a) in the same run.

Each with 1 KB, 8 KB and 64 KB chat bodies: throughput at saturation (closed loop) with the same
body every time (the filter's decision cache hits) and with a unique body per request (a nonce in
the prompt: every request is extracted, scanned and decided), and the unloaded p50 (100 rps).
Then unique bodies through (a) (about 250,000) and (b) with Envoy's allocated memory before and
after, and the size of the release `.wasm`. The machine is shared and noisy: compare the ratios
of one run. BENCH_ROUNDS (default 1) repeats the set-ups in alternating order (the identity
set-ups and the memory runs only in the first round); each ratio is then taken against the floor
of its own round, and the table gives the median and, in brackets, the best. Results: a Markdown
table on stdout and `tools/bench-filter.json` (a subset chosen with BENCH_SETUPS / BENCH_SIZES_KB,
or with variants: `tools/bench-filter-partial.json`).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchkit import BIN, bench_upstream, chat_body, identity_material, loadgen, non_200, pin, save
from stack import ROOT, Envoy, envoy_config, http_get, wasm_file

NOOP = Path(os.environ.get("NOOP_WASM") or wasm_file().with_name("llm_policy_noop_filter.wasm"))
SECS = int(os.environ.get("BENCH_SECS", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "1"))
SIZES = tuple(int(s) * 1024 for s in os.environ.get("BENCH_SIZES_KB", "1,8,64").split(","))
# A subset of the set-ups by name (comma-separated), for a quicker look; all by default.
ONLY = [s for s in os.environ.get("BENCH_SETUPS", "").split(",") if s]
# Envoy's allocated memory before and after this many seconds of unique bodies (at the smallest
# size): about 250,000 requests through the 100 rules.
MEMORY_SECS = {"filter_100_rules": 18, "filter_example_bundle": 12}
# Other builds of the filter to measure in the same run, as `name=path` (comma-separated): each adds
# (a) and (b) with that .wasm, named `filter_100_rules@name` and `filter_example_bundle@name` (to
# compare build settings or post-link optimisation against the floor of the same run).
VARIANTS = [v.split("=", 1) for v in os.environ.get("BENCH_WASM_VARIANTS", "").split(",") if v]




def hundred_rules():
    """The 100 rules on model / max_tokens / headers (the `filter` criterion bench reads the same)."""
    return subprocess.run([str(BIN / "loadgen"), "hundred-rules"], capture_output=True, text=True,
                          check=True).stdout


def measure(url, files, headers=()):
    extra = [a for h in headers for a in ("--header", h)]
    out = {}
    for size, f in files.items():
        sat = loadgen("http", "--url", url, "--concurrency", 32, "--duration", SECS, "--body-file", f, *extra, cpu=1)
        unique = loadgen("http", "--url", url, "--concurrency", 32, "--duration", SECS, "--body-file", f, "--unique",
                         *extra, cpu=1)
        idle = loadgen("http", "--url", url, "--rate", 100, "--duration", 3, "--concurrency", 4, "--body-file", f,
                       *extra, cpu=1)
        out[str(size)] = {"saturation": sat, "saturation_unique": unique, "unloaded": idle}
    return out


def identity_setups(tmp, policies):
    """(name, config, headers) for the 100-rule bundle behind `--identity jwt` and `api-keys`."""
    token, secret = identity_material(tmp)
    return [
        ("filter_100_rules_jwt", envoy_config("filter", policies, identity="jwt", jwt_issuer="https://idp.bench",
                                              jwt_audience="llm", jwks_file=tmp / "jwks.json",
                                              provider_key_file=tmp / "provider.key"),
         [f"authorization: Bearer {token}"]),
        ("filter_100_rules_api_keys", envoy_config("filter", policies, identity="api-keys",
                                                   keys_file=tmp / "keys.json", provider_key_file=tmp / "provider.key"),
         [f"authorization: Bearer {secret}"]),
    ]


def allocated(envoy):
    _, text = http_get(f"http://127.0.0.1:{envoy.admin}/memory")
    return int(json.loads(text)["allocated"])


def noop(root_id):
    """The no-op module's Envoy configuration, doing what `root_id` names (`benches/noop-filter`)."""
    text = envoy_config("filter", ROOT / "policies", wasm=NOOP)
    assert text.count("root_id: llm_policy") == 1
    return text.replace("root_id: llm_policy", f"root_id: {root_id}")


def main():
    results = {"wasm_bytes": wasm_file().stat().st_size, "noop_wasm_bytes": NOOP.stat().st_size, "rounds": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {}
        for size in SIZES:
            f = tmp / f"body-{size}.json"
            f.write_bytes(chat_body(size))
            files[size] = f
        hundred = tmp / "hundred"
        hundred.mkdir()
        (hundred / "hundred.yaml").write_text(hundred_rules())
        procs = []
        try:
            upstream, up_port = bench_upstream(tmp)
            procs.append(upstream)
            pin(upstream, 1)
            setups = [
                ("passthrough", None, []),
                ("noop_floor", noop("floor"), []),
                ("noop_boundary", noop("boundary"), []),
                ("noop_boundary_by_name", noop("boundary-by-name"), []),
                ("filter_100_rules", envoy_config("filter", hundred), []),
                ("filter_example_bundle", envoy_config("filter", ROOT / "policies"), []),
                *identity_setups(tmp, hundred),
            ]
            for variant, path in VARIANTS:
                results[f"wasm_bytes@{variant}"] = Path(path).stat().st_size
                setups += [(f"filter_100_rules@{variant}", envoy_config("filter", hundred, wasm=Path(path)), []),
                           (f"filter_example_bundle@{variant}",
                            envoy_config("filter", ROOT / "policies", wasm=Path(path)), [])]
            runs = [(0, setup) for setup in setups]
            for round_ in range(1, ROUNDS):
                again = [s for s in setups if not s[0].endswith(("_jwt", "_api_keys"))]
                runs += [(round_, s) for s in (again[::-1] if round_ % 2 else again)]
            for round_, (name, text, headers) in runs:
                if ONLY and name not in ONLY:
                    continue
                if text is None:
                    e = Envoy(tmp, None, up_port, tmp, config="passthrough.yaml", concurrency=1)
                else:
                    e = Envoy(tmp, None, up_port, tmp, text=text, concurrency=1)
                pin(e.proc, 0)
                url = e.url("/v1/chat/completions")
                # The example bundle allows the benchmark request: check before measuring.
                status = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary",
                                         f"@{files[SIZES[0]]}", "-H", "content-type: application/json",
                                         *[a for h in headers for a in ("-H", h)], url],
                                        capture_output=True, text=True).stdout
                assert status == "200", f"{name}: the benchmark request got {status}"
                while len(results["rounds"]) <= round_:
                    results["rounds"].append({})
                results["rounds"][round_][name] = measure(url, files, headers)
                if name.startswith("filter") and round_ == 0:
                    _, h = http_get(f"http://127.0.0.1:{e.admin}/stats?filter=evaluation_us")
                    results["rounds"][0][name]["evaluation_us_histogram"] = h.decode().strip()
                if name in MEMORY_SECS and round_ == 0:
                    # Unique bodies: every request is decided and fills the decision cache.
                    before = allocated(e)
                    run = loadgen("http", "--url", url, "--concurrency", 32, "--duration", MEMORY_SECS[name],
                                  "--body-file", files[SIZES[0]], "--unique", cpu=1)
                    after = allocated(e)
                    results.setdefault("memory", {})[name] = {
                        "requests": run["requests"], "body_bytes": SIZES[0], "allocated_before": before,
                        "allocated_after": after}
                e.proc.stop()
        finally:
            for p in reversed(procs):
                p.stop()
    # A subset is a quick look: it does not replace the full run's results.
    save("bench-filter-partial" if ONLY or VARIANTS or len(SIZES) < 3 else "bench-filter", results)
    print_table(results)


def cell(values, fmt, best=max):
    """The median of the rounds' values and, when there are several, the best in brackets (the
    highest by default; `best=min` for latencies)."""
    if not values:
        return "—"
    text = format(statistics.median(values), fmt)
    return text if len(values) == 1 else f"{text} ({format(best(values), fmt)})"


def print_table(r):
    rounds = r["rounds"]
    seen = {n for one in rounds for n in one}
    names = [n for n in ("passthrough", "noop_floor", "noop_boundary", "noop_boundary_by_name", "filter_100_rules",
                         "filter_example_bundle", "filter_100_rules_jwt", "filter_100_rules_api_keys") if n in seen]
    names += [f"{n}@{v}" for v, _ in VARIANTS for n in ("filter_100_rules", "filter_example_bundle")
              if f"{n}@{v}" in seen]

    def rps(name, size, kind, per=None):
        """rps of `name` in each round that ran it, or its ratio to `per` of the same round."""
        return [one[name][size][kind]["rps"] / (one[per][size][kind]["rps"] if per else 1)
                for one in rounds if name in one and (per is None or per in one)]

    print(f"{len(rounds)} round(s); each cell the median" + (" (best)" if len(rounds) > 1 else "") +
          "; ratios against the floor of the same round\n")
    print("| set-up | body | rps, same body | × floor | rps, unique bodies | × floor | p50 ms unloaded | "
          "p99 ms saturation | non-200 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in map(str, SIZES):
        for name in names:
            ran = [one[name][size] for one in rounds if name in one]
            bad = sum(non_200(v) for x in ran for k, v in x.items() if k != "evaluation_us_histogram")
            print(f"| {name} | {int(size) // 1024} KB | {cell(rps(name, size, 'saturation'), '.0f')} | "
                  f"{cell(rps(name, size, 'saturation', 'noop_floor'), '.2f')} | "
                  f"{cell(rps(name, size, 'saturation_unique'), '.0f')} | "
                  f"{cell(rps(name, size, 'saturation_unique', 'noop_floor'), '.2f')} | "
                  f"{cell([x['unloaded']['p50_ms'] for x in ran], '.3f', min)} | "
                  f"{cell([x['saturation']['p99_ms'] for x in ran], '.2f', min)} | {bad} |")
    # At saturation the pinned worker is busy all the time: 1/rps is its time per request, and
    # the difference from the floor's is what a set-up adds to each request.
    print("\nµs of the worker per request over the floor's, unique bodies (median of the rounds' "
          "differences):")
    for size in map(str, SIZES):
        parts = []
        for name in names:
            over = [1e6 / one[name][size]["saturation_unique"]["rps"]
                    - 1e6 / one["noop_floor"][size]["saturation_unique"]["rps"]
                    for one in rounds if name in one and "noop_floor" in one and name != "noop_floor"]
            if over:
                parts.append(f"{name} {statistics.median(over):+.1f}")
        floor = [1e6 / x for x in rps("noop_floor", size, "saturation_unique")]
        if floor:
            print(f"- {int(size) // 1024} KB (the floor: {statistics.median(floor):.1f} µs): " + ", ".join(parts))
    for size in map(str, SIZES):
        for name in ("filter_100_rules_jwt", "filter_100_rules_api_keys"):
            x = rps(name, size, "saturation", "filter_100_rules")
            if x:
                print(f"{int(size) // 1024} KB {name}: {cell(x, '.2f')}x filter_100_rules at saturation")
    for name, m in r.get("memory", {}).items():
        print(f"memory over {m['requests']} unique requests ({name}, {m['body_bytes'] // 1024} KB): allocated "
              f"{m['allocated_before'] / 1e6:.1f} MB -> {m['allocated_after'] / 1e6:.1f} MB")
    print(f".wasm: {r['wasm_bytes'] / 1e6:.2f} MB (target <= 3 MB); no-op floor {r['noop_wasm_bytes'] / 1e6:.2f} MB")
    for v, _ in VARIANTS:
        print(f".wasm@{v}: {r[f'wasm_bytes@{v}'] / 1e6:.2f} MB")


if __name__ == "__main__":
    sys.exit(main())
