"""`make bench-vm`: the filter's .wasm alone in V8 (Node.js, `vm_host.mjs`), µs per request inside
the VM for the 100 rules and the example bundle at 1 / 8 / 64 KB, same body and unique bodies,
beside the no-op floor's module.

`make bench-filter` measures the whole path through Envoy, and on a shared machine its rounds
disagree by up to 0.2× the floor. This measures only what the module does (the host here is a few
lines of JavaScript, not Envoy's C++ side of the calls), in one process, without sockets or a load
generator competing for the cores: the way to compare builds of the filter
(`BENCH_WASM_VARIANTS=name=file.wasm,...`), each run alternately in R rounds (BENCH_ROUNDS,
default 5; the table gives the median and the range, which shows how noisy the machine was). Node's V8 is not Envoy's: compare the
builds and bundles of one run, not these µs with Envoy's. Results: a table on stdout and
`tools/bench-vm.json`.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench_filter import NOOP, VARIANTS, hundred_rules
from benchkit import chat_body, save
from stack import ROOT, envoy_config, wasm_file

SIZES_KB = [int(s) for s in os.environ.get("BENCH_SIZES_KB", "1,8,64").split(",")]
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
REQUESTS = {1: 4000, 8: 2000, 64: 400}


def filter_configuration(policies):
    """The filter's JSON configuration as `llm-policy envoy-config --mode filter` writes it."""
    doc = yaml.safe_load(envoy_config("filter", policies))
    for listener in doc["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                for h in f["typed_config"].get("http_filters", []):
                    if h["name"] == "envoy.filters.http.wasm":
                        return h["typed_config"]["config"]["configuration"]["value"]
    raise SystemExit("envoy-config printed no wasm filter")


def main():
    builds = {"filter": str(wasm_file()), **{name: path for name, path in VARIANTS}, "noop_floor": str(NOOP),
              "noop_boundary": f"{NOOP}#boundary"}
    results = {"rounds": ROUNDS, "builds": {n: Path(p.split("#")[0]).stat().st_size for n, p in builds.items()},
               "runs": {}, "host_calls": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "hundred").mkdir()
        (tmp / "hundred" / "hundred.yaml").write_text(hundred_rules())
        bodies = {}
        for kb in SIZES_KB:
            bodies[kb] = tmp / f"body-{kb}.json"
            bodies[kb].write_bytes(chat_body(kb * 1024))
        for bundle, policies in (("100_rules", tmp / "hundred"), ("example_bundle", ROOT / "policies")):
            rows = []
            for kb in SIZES_KB:
                spec = tmp / "spec.json"
                spec.write_text(json.dumps({"builds": builds, "configuration": filter_configuration(policies),
                                            "bodies": {str(kb): str(bodies[kb])}, "requests": REQUESTS.get(kb, 400),
                                            "rounds": ROUNDS}))
                out = subprocess.run(["node", str(Path(__file__).with_name("vm_host.mjs")), str(spec)],
                                     capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"vm_host.mjs ({bundle}, {kb} KB) failed:\n{out.stderr[-3000:]}")
                for line in out.stdout.splitlines():
                    row = json.loads(line)
                    if "calls" in row:
                        results["host_calls"].setdefault(bundle, {}).setdefault(row["build"], {})[
                            f"{kb} KB {row['mode']}"] = row["calls"]
                    else:
                        rows.append(row)
            results["runs"][bundle] = rows
    save("bench-vm", results)
    print_table(results)


def print_table(r):
    names = list(r["builds"])
    print(f"µs per request in V8 (Node.js), median of {r['rounds']} alternating rounds (min–max)\n")
    print("| bundle | body | mode | " + " | ".join(names) + " |")
    print("|---|---:|---|" + "---:|" * len(names))
    for bundle, rows in r["runs"].items():
        for kb in sorted({x["kb"] for x in rows}):
            for mode in ("same", "unique"):
                cells = []
                for n in names:
                    v = [x["us"] for x in rows if x["build"] == n and x["kb"] == kb and x["mode"] == mode]
                    cells.append(f"{statistics.median(v):.2f} ({min(v):.2f}–{max(v):.2f})")
                print(f"| {bundle} | {kb} KB | {mode} | " + " | ".join(cells) + " |")
    print("\nHost calls of one request, by callback (the same for every body and mode unless shown):")
    for bundle, by_build in r.get("host_calls", {}).items():
        for build, by_body in by_build.items():
            seen = set()
            for body, calls in by_body.items():
                text = "; ".join(f"{cb.removeprefix('proxy_on_')}: " + ", ".join(f"{k} ×{v}" for k, v in c.items())
                                 for cb, c in calls.items()) or "none"
                if text not in seen:
                    seen.add(text)
                    print(f"- {bundle}, {build}{'' if len(seen) == 1 else f' ({body})'}: {text}")
    print()
    for n, size in r["builds"].items():
        print(f".wasm {n}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    sys.exit(main())
