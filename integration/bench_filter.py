"""`make bench-filter`: the proxy-wasm filter under load, all on loopback, one run, one machine.

Envoy 1.40 with one worker (`--concurrency 1`, pinned to CPU 0; the load generator and the
upstream share CPU 1) in front of `bench-upstream`, four set-ups:

  1. passthrough: Envoy alone (`envoy/passthrough.yaml`);
  2. floor: Envoy + a no-op wasm filter that only buffers the request body (`benches/noop-filter`);
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
of one run. Results: a Markdown table on stdout and `tools/bench-filter.json` (a subset chosen
with BENCH_SETUPS / BENCH_SIZES_KB: `tools/bench-filter-partial.json`).
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchkit import BIN, bench_upstream, chat_body, identity_material, loadgen, non_200, pin, save
from stack import ROOT, Envoy, envoy_config, http_get, wasm_file

NOOP = Path(os.environ.get("NOOP_WASM") or wasm_file().with_name("llm_policy_noop_filter.wasm"))
SECS = int(os.environ.get("BENCH_SECS", "5"))
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


def main():
    results = {"wasm_bytes": wasm_file().stat().st_size, "noop_wasm_bytes": NOOP.stat().st_size}
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
                ("noop_floor", envoy_config("filter", ROOT / "policies", wasm=NOOP), []),
                ("filter_100_rules", envoy_config("filter", hundred), []),
                ("filter_example_bundle", envoy_config("filter", ROOT / "policies"), []),
                *identity_setups(tmp, hundred),
            ]
            for variant, path in VARIANTS:
                results[f"wasm_bytes@{variant}"] = Path(path).stat().st_size
                setups += [(f"filter_100_rules@{variant}", envoy_config("filter", hundred, wasm=Path(path)), []),
                           (f"filter_example_bundle@{variant}",
                            envoy_config("filter", ROOT / "policies", wasm=Path(path)), [])]
            for name, text, headers in setups:
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
                results[name] = measure(url, files, headers)
                if name.startswith("filter"):
                    _, h = http_get(f"http://127.0.0.1:{e.admin}/stats?filter=evaluation_us")
                    results[name]["evaluation_us_histogram"] = h.decode().strip()
                if name in MEMORY_SECS:
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


def print_table(r):
    names = [n for n in ("passthrough", "noop_floor", "filter_100_rules", "filter_example_bundle",
                         "filter_100_rules_jwt", "filter_100_rules_api_keys") if n in r]
    names += [f"{n}@{v}" for v, _ in VARIANTS for n in ("filter_100_rules", "filter_example_bundle")
              if f"{n}@{v}" in r]
    print("| set-up | body | rps, same body | × floor | rps, unique bodies | × floor | p50 ms unloaded | "
          "p99 ms saturation | non-200 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in map(str, SIZES):
        floor = r.get("noop_floor", {}).get(size)
        for name in names:
            x = r[name][size]
            sat, uniq = x["saturation"], x["saturation_unique"]
            bad = sum(non_200(v) for v in x.values())
            ratio = (lambda v, k: f"{v['rps'] / floor[k]['rps']:.2f}") if floor else (lambda v, k: "—")
            print(f"| {name} | {int(size) // 1024} KB | {sat['rps']:.0f} | {ratio(sat, 'saturation')} | "
                  f"{uniq['rps']:.0f} | {ratio(uniq, 'saturation_unique')} | {x['unloaded']['p50_ms']:.3f} | "
                  f"{sat['p99_ms']:.2f} | {bad} |")
    print()
    for size in map(str, SIZES):
        if "passthrough" not in r or "noop_floor" not in r:
            break
        t, n = r["passthrough"][size], r["noop_floor"][size]
        for name in ("filter_100_rules", "filter_example_bundle"):
            if name not in r:
                continue
            f = r[name][size]
            print(f"{int(size) // 1024} KB {name}: {f['saturation']['rps'] / n['saturation']['rps']:.2f}x the floor "
                  f"(unique bodies {f['saturation_unique']['rps'] / n['saturation_unique']['rps']:.2f}x; "
                  f"floor {n['saturation']['rps'] / t['saturation']['rps']:.2f}x passthrough); unloaded p50 "
                  f"{f['unloaded']['p50_ms']:.3f} ms vs floor {n['unloaded']['p50_ms']:.3f} ms vs passthrough "
                  f"{t['unloaded']['p50_ms']:.3f} ms")
    for size in map(str, SIZES):
        if "filter_100_rules" not in r:
            break
        base = r["filter_100_rules"][size]
        for name in ("filter_100_rules_jwt", "filter_100_rules_api_keys"):
            if name not in r:
                continue
            x = r[name][size]
            print(f"{int(size) // 1024} KB {name}: {x['saturation']['rps'] / base['saturation']['rps']:.2f}x "
                  f"filter_100_rules at saturation; unloaded p50 {x['unloaded']['p50_ms']:.3f} ms vs "
                  f"{base['unloaded']['p50_ms']:.3f} ms")
    for name, m in r.get("memory", {}).items():
        print(f"memory over {m['requests']} unique requests ({name}, {m['body_bytes'] // 1024} KB): allocated "
              f"{m['allocated_before'] / 1e6:.1f} MB -> {m['allocated_after'] / 1e6:.1f} MB")
    print(f".wasm: {r['wasm_bytes'] / 1e6:.2f} MB (target <= 3 MB); no-op floor {r['noop_wasm_bytes'] / 1e6:.2f} MB")
    for v, _ in VARIANTS:
        print(f".wasm@{v}: {r[f'wasm_bytes@{v}'] / 1e6:.2f} MB")


if __name__ == "__main__":
    sys.exit(main())
