"""`make bench-sidecar`: the engine's resource budget, measured against the seed's sidecar budget
(0.5 core, 256 MB, p99 <= 5 ms), one run, one machine, all on loopback.

`llm-policy serve` runs the example bundle with the WASM plugins, confined to half a core (a
cgroup v1 or v2 CPU quota of 50 ms per 100 ms when this machine lets us make one; else pinned to
one core with `taskset`, which is said), behind Envoy 1.40 and in front of the fast upstream
(`bench-upstream`); `loadgen` sends 8 KB chats for `BENCH_SECS` (default 10) in each of:

  1. ext_authz at a fixed 1,000 rps: Envoy asks the engine for every request;
  2. ext_authz, closed loop (32 in flight): the most the confined engine decides;
  3. the same in the namespace `restricted`: both WASM plugins run on every request too;
  4. the sidecar shape at 1,000 rps (Envoy with the filter, the engine behind it): the filter
     decides what it can alone, the engine gets the rest. Envoy runs as the sidecar manifest
     runs it (`--concurrency 1`, confined to half a core of its own: its container's limit), and
     its CPU, memory and start-up time (from exec to `/ready` answering LIVE, the filter loaded)
     are measured too, beside the engine's start-up (exec to `/readyz` ready);
  5. ext_authz at 1,000 rps with 100 rules that read no prompt (what the budget holds for a
     bundle that does not scan text).

For each: the engine's CPU (its own user + system time over the run, in cores), its resident
memory at the end and at its peak (VmHWM), the quota's throttled periods, the client's p50/p99
through Envoy (loadgen) and the engine's own check p99 (its histogram), failed requests.
Results: a Markdown table on stdout and `tools/bench-sidecar.json`."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import bench_upstream, loadgen, non_200, save
from stack import ROOT, Envoy, Server, envoy_config, http_get

SECS = int(os.environ.get("BENCH_SECS", "10"))
RATE = 1000
CPU_QUOTA_US, CPU_PERIOD_US = 50_000, 100_000
BUDGET = {"cores": 0.5, "rss_mb": 256, "p99_ms": 5.0}


class Confinement:
    """Half a core for one process: a cgroup CPU quota (v2, else v1), else `taskset` to one core."""

    def __init__(self, name="engine"):
        self.path = None
        self.how = None
        for root, quota in [("/sys/fs/cgroup", "cpu.max"), ("/sys/fs/cgroup/cpu", "cpu.cfs_quota_us")]:
            if not os.path.exists(os.path.join(root, quota if quota == "cpu.max" else "cpu.cfs_period_us")):
                continue
            path = os.path.join(root, f"llm-policy-bench-{os.getpid()}-{name}")
            try:
                os.mkdir(path)
                if quota == "cpu.max":
                    Path(path, "cpu.max").write_text(f"{CPU_QUOTA_US} {CPU_PERIOD_US}")
                else:
                    Path(path, "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
                    Path(path, "cpu.cfs_quota_us").write_text(str(CPU_QUOTA_US))
                self.path, self.how = path, f"cgroup CPU quota {CPU_QUOTA_US // 1000} ms / {CPU_PERIOD_US // 1000} ms ({root})"
                return
            except OSError:
                try:
                    os.rmdir(path)
                except OSError:
                    pass
        self.how = "taskset to one core (no cgroup could be made here: this is a whole core, not half)"

    def add(self, pid):
        if self.path:
            Path(self.path, "cgroup.procs").write_text(str(pid))
        else:
            subprocess.run(["taskset", "-a", "-p", "-c", "0", str(pid)], check=True, capture_output=True)

    def throttled(self):
        if not self.path:
            return None
        stat = dict(line.split() for line in Path(self.path, "cpu.stat").read_text().splitlines())
        return int(stat.get("nr_throttled", 0)), int(stat.get("nr_periods", 0))

    def close(self):
        if self.path:
            try:
                os.rmdir(self.path)
            except OSError:
                pass


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid):
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    kb = lambda k: int(status[k].split()[0])  # noqa: E731
    return kb("VmRSS") / 1024, kb("VmHWM") / 1024


def check_buckets(server):
    """The engine's check-duration histogram now: {upper bound in seconds: count}."""
    _, text = http_get(f"http://127.0.0.1:{server.metrics}/metrics")
    out = {}
    for line in text.decode().splitlines():
        if line.startswith("llm_policy_check_duration_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def check_p99_ms(server, before):
    """The engine's own check p99 over the run (the bucket bound), from its histogram."""
    delta = sorted((le, n - before.get(le, 0.0)) for le, n in check_buckets(server).items())
    total = delta[-1][1] if delta else 0
    for le, n in delta:
        if total and n >= 0.99 * total:
            return round(le * 1000, 3)
    return None


def run(name, server, confinement, url, headers=(), envoy=None, rate=RATE):
    """One fixed-rate run; `envoy` (its process and confinement): Envoy's CPU and memory too."""
    pid = server.proc.p.pid
    extra = [a for h in headers for a in ("--header", h)]
    loadgen("http", "--url", url, "--rate", 200, "--duration", 2, "--concurrency", 64, *extra)  # warm up
    before = check_buckets(server)
    throttled0 = confinement.throttled()
    envoy_throttled0 = envoy[1].throttled() if envoy else None
    envoy_cpu0 = cpu_seconds(envoy[0]) if envoy else 0.0
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    result = loadgen("http", "--url", url, "--rate", rate, "--duration", SECS, "--concurrency", 256, *extra)
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    envoy_cpu1 = cpu_seconds(envoy[0]) if envoy else 0.0
    rss, peak = memory_mb(pid)
    throttled1 = confinement.throttled()
    row = {
        "requests": result["requests"],
        "failed": non_200(result),
        "statuses": result.get("statuses"),
        "rps": result.get("rps"),
        "client_p50_ms": result["p50_ms"],
        "client_p99_ms": result["p99_ms"],
        "engine_check_p99_ms": check_p99_ms(server, before),
        "engine_cores": round((cpu1 - cpu0) / (t1 - t0), 3),
        "engine_rss_mb": round(rss, 1),
        "engine_peak_rss_mb": round(peak, 1),
    }
    if throttled0 and throttled1:
        row["throttled_periods"] = f"{throttled1[0] - throttled0[0]} of {throttled1[1] - throttled0[1]}"
    if envoy:
        e_rss, e_peak = memory_mb(envoy[0])
        row["envoy_cores"] = round((envoy_cpu1 - envoy_cpu0) / (t1 - t0), 3)
        row["envoy_cpu_ms_per_request"] = round((envoy_cpu1 - envoy_cpu0) * 1000 / max(result["requests"], 1), 3)
        row["envoy_rss_mb"] = round(e_rss, 1)
        row["envoy_peak_rss_mb"] = round(e_peak, 1)
        e1 = envoy[1].throttled()
        if envoy_throttled0 and e1:
            row["envoy_throttled_periods"] = f"{e1[0] - envoy_throttled0[0]} of {e1[1] - envoy_throttled0[1]}"
    print(f"   {name}: {json.dumps(row)}", flush=True)
    return row


def saturation(name, server, confinement, url, headers=()):
    """The most the confined engine decides: closed loop, 32 in flight."""
    pid = server.proc.p.pid
    extra = [a for h in headers for a in ("--header", h)]
    before = check_buckets(server)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    result = loadgen("http", "--url", url, "--concurrency", 32, "--duration", SECS, *extra)
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    row = {
        "requests": result["requests"],
        "failed": non_200(result),
        "statuses": result.get("statuses"),
        "rps": round(result["rps"], 1),
        "client_p50_ms": result["p50_ms"],
        "client_p99_ms": result["p99_ms"],
        "engine_check_p99_ms": check_p99_ms(server, before),
        "engine_cores": round((cpu1 - cpu0) / (t1 - t0), 3),
        "engine_rss_mb": round(memory_mb(pid)[0], 1),
        "engine_peak_rss_mb": round(memory_mb(pid)[1], 1),
    }
    print(f"   {name}: {json.dumps(row)}", flush=True)
    return row


def main():
    from bench_filter import hundred_rules

    results = {"rate": RATE, "seconds": SECS, "budget": BUDGET}
    confinement = Confinement()
    results["confinement"] = confinement.how
    print(f"== the engine confined by {confinement.how}; 8 KB chats, {SECS} s a run")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        procs = []
        try:
            upstream, up_port = bench_upstream(tmp)
            procs.append(upstream)
            bundle = tmp / "bundle"
            bundle.mkdir()
            # The example bundle, its per-user rate limit raised out of the load's way.
            for f in (ROOT / "policies").glob("*.yaml"):
                (bundle / f.name).write_text(f.read_text().replace("requests: 120, per: minute",
                                                                   "requests: 100000000, per: minute"))
            (tmp / "s").mkdir()
            started = time.monotonic()
            server = Server(tmp / "s", bundle, config_extra={"audit": {"stdout": False, "decisions": "flagged"}})
            results["engine_start_s"] = round(time.monotonic() - started, 3)
            procs.append(server.proc)
            confinement.add(server.proc.p.pid)
            authz = Envoy(tmp, server, up_port, tmp)
            procs.append(authz.proc)
            url = authz.url("/v1/chat/completions")
            pro = ["x-user-tier: pro"]
            print("   -- the example bundle (its baseline scans every prompt for personal data, secrets and "
                  "injection: text and views)")
            results["ext_authz_1000"] = run("ext_authz at 1,000 rps", server, confinement, url, pro)
            results["ext_authz_capacity"] = saturation("ext_authz, capacity (closed loop)", server, confinement,
                                                       url, pro)
            results["ext_authz_plugins_capacity"] = saturation(
                "ext_authz, restricted (both plugins too), capacity", server, confinement, url,
                pro + ["x-llm-policy-namespace: restricted"])
            authz.proc.stop()
            text = envoy_config("filter+fallback", bundle, server=f"127.0.0.1:{server.grpc}",
                                sync_from=f"127.0.0.1:{server.http}", usage_token_file=server.usage_token_file)
            started = time.monotonic()
            sidecar = Envoy(tmp, None, up_port, tmp, text=text, concurrency=1)
            results["sidecar_envoy_start_s"] = round(time.monotonic() - started, 3)
            procs.append(sidecar.proc)
            envoy_confinement = Confinement("envoy")
            try:
                envoy_confinement.add(sidecar.proc.p.pid)
                results["sidecar_envoy_confinement"] = envoy_confinement.how
                results["sidecar_envoy_idle_rss_mb"] = round(memory_mb(sidecar.proc.p.pid)[0], 1)
                results["sidecar_200"] = run(
                    "sidecar shape at 200 rps (within what half a core of Envoy decides)", server, confinement,
                    sidecar.url("/v1/chat/completions"), pro, envoy=(sidecar.proc.p.pid, envoy_confinement), rate=200)
                results["sidecar_1000"] = run(
                    "sidecar shape (the filter decides, the engine behind it) at 1,000 rps", server, confinement,
                    sidecar.url("/v1/chat/completions"), pro, envoy=(sidecar.proc.p.pid, envoy_confinement))
            finally:
                sidecar.proc.stop()
                envoy_confinement.close()
            server.proc.stop()
            # A bundle whose rules do not read the prompt: 100 rules on model, tokens, headers.
            hundred = tmp / "hundred"
            hundred.mkdir()
            (hundred / "hundred.yaml").write_text(hundred_rules())
            (tmp / "h").mkdir()
            plain = Server(tmp / "h", hundred, config_extra={"audit": {"stdout": False, "decisions": "flagged"}})
            procs.append(plain.proc)
            confinement.add(plain.proc.p.pid)
            authz = Envoy(tmp, plain, up_port, tmp)
            procs.append(authz.proc)
            print("   -- 100 rules on model, max_tokens and headers (no rule reads the prompt)")
            results["hundred_1000"] = run("ext_authz at 1,000 rps", plain, confinement,
                                          authz.url("/v1/chat/completions"))
        finally:
            for p in reversed(procs):
                p.stop()
            confinement.close()
    save("bench-sidecar", results)
    print(f"\n| set-up (engine: {confinement.how.split(' (')[0]}) | rps | statuses | engine cores "
          f"| engine RSS (peak) MB | client p50 / p99 ms | engine check p99 ms (bucket) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    names = {"ext_authz_1000": "example bundle, ext_authz, 1,000 rps offered",
             "ext_authz_capacity": "example bundle, ext_authz, closed loop",
             "ext_authz_plugins_capacity": "example bundle + both plugins, closed loop",
             "sidecar_200": "example bundle, sidecar shape, 200 rps",
             "sidecar_1000": "example bundle, sidecar shape, 1,000 rps",
             "hundred_1000": "100 rules (no prompt read), ext_authz, 1,000 rps"}
    for key, name in names.items():
        r = results[key]
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted((r.get("statuses") or {}).items()))
        print(f"| {name} | {r['rps']:.0f} | {statuses} | {r['engine_cores']} | "
              f"{r['engine_rss_mb']} ({r['engine_peak_rss_mb']}) | {r['client_p50_ms']:.2f} / "
              f"{r['client_p99_ms']:.2f} | {r['engine_check_p99_ms']} |")
    print(f"budget: <= {BUDGET['cores']} core, <= {BUDGET['rss_mb']} MB, p99 <= {BUDGET['p99_ms']} ms")
    print(f"\nThe sidecar pod's Envoy (--concurrency 1, {results['sidecar_envoy_confinement'].split(' (')[0]}): "
          f"RSS {results['sidecar_envoy_idle_rss_mb']} MB idle; started (exec to LIVE, filter loaded) in "
          f"{results['sidecar_envoy_start_s']} s. The engine started (exec to ready) in {results['engine_start_s']} s.")
    print("| sidecar Envoy | rps | Envoy cores | Envoy CPU ms / request | Envoy RSS (peak) MB | client p50 / p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for key in ("sidecar_200", "sidecar_1000"):
        s = results[key]
        print(f"| {names[key]} | {s['rps']:.0f} | {s['envoy_cores']} | {s['envoy_cpu_ms_per_request']} | "
              f"{s['envoy_rss_mb']} ({s['envoy_peak_rss_mb']}) | {s['client_p50_ms']:.2f} / {s['client_p99_ms']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
