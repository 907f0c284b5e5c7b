"""`make bench-redis`: what Redis costs a check, and what replicas buy, on this machine, one run.

`loadgen check` calls Envoy's ext_authz `Check` over gRPC (8 KB chat bodies, closed loop) on
`llm-policy serve` with one policy whose rule charges a global request counter on every request
(never reached), so every check asks the counter store. Light load (4 in flight: latency is the
check's own) and saturation (48 in flight: throughput):

  1. one server, counters in memory;
  2. one server, counters in a real redis-server (started here on loopback);
  3. three servers sharing that Redis, each driven by its own loadgen at a third of the
     concurrency (the same total in flight as 2; saturation only).

The machine has 2 cores that the servers, Redis and the load generators all share: the replica
figure says what three processes cost or gain here, not what three machines would do. Results:
a Markdown table on stdout and `tools/bench-redis.json`.
"""

import concurrent.futures
import os
import tempfile
from pathlib import Path

from benchkit import loadgen, save
from stack import ROOT, Replicas, Server

SECS = int(os.environ.get("BENCH_SECS", "5"))
LIGHT, SATURATED = 4, 48

# One rule that charges a global request counter on every request (also the criterion bench's).
COUNTED = (ROOT / "benches" / "policies" / "counted.yaml").read_text()


def run(servers, concurrency):
    """Concurrent loadgens, one per server, `concurrency` split between them: summed rps, the
    worst p50 / p99."""
    share = max(1, concurrency // len(servers))
    with concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
        runs = list(pool.map(lambda s: loadgen("check", "--grpc", f"127.0.0.1:{s.grpc}", "--concurrency", share,
                                               "--connections", 4, "--duration", SECS), servers))
    return {"rps": sum(r["rps"] for r in runs), "p50_ms": max(r["p50_ms"] for r in runs),
            "p99_ms": max(r["p99_ms"] for r in runs), "errors": sum(r["errors"] for r in runs), "runs": runs}


def main():
    results = {}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        bundle = tmp / "bundle"
        bundle.mkdir()
        (bundle / "counted.yaml").write_text(COUNTED)
        procs = []
        try:
            (tmp / "memory").mkdir()
            memory = Server(tmp / "memory", bundle, log_dir=tmp, name="memory")
            results["memory_light"] = run([memory], LIGHT)
            results["memory_1"] = run([memory], SATURATED)
            memory.proc.stop()

            replicas = Replicas(tmp, bundle, 3, cache={"enabled": False})  # the default: L4 off
            procs.append(replicas)
            servers = replicas.servers
            results["redis_light"] = run(servers[:1], LIGHT)
            results["redis_1"] = run(servers[:1], SATURATED)
            results["redis_3"] = run(servers, SATURATED)
            allowed = sum(s.metric('llm_policy_decisions_total{decision="allow",namespace="default",rule="default"}')
                          for s in servers)
            results["checks_answered"] = allowed
        finally:
            for p in reversed(procs):
                p.stop()
    save("bench-redis", results)
    ml, rl = results["memory_light"], results["redis_light"]
    m, r1, r3 = results["memory_1"], results["redis_1"], results["redis_3"]
    print("| set-up | in flight | checks/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|")
    for name, n, x in [("1 server, counters in memory", LIGHT, ml), ("1 server, counters in Redis", LIGHT, rl),
                       ("1 server, counters in memory", SATURATED, m), ("1 server, counters in Redis", SATURATED, r1),
                       ("3 servers, one Redis", SATURATED, r3)]:
        print(f"| {name} | {n} | {x['rps']:.0f} | {x['p50_ms']:.3f} | {x['p99_ms']:.3f} | {x['errors']} |")
    print(f"Redis counter added to a check at {LIGHT} in flight: p50 +{(rl['p50_ms'] - ml['p50_ms']) * 1000:.0f} us, "
          f"p99 +{(rl['p99_ms'] - ml['p99_ms']) * 1000:.0f} us; saturated checks/s Redis / memory: "
          f"{r1['rps'] / m['rps']:.2f}x; 3 replicas / 1: {r3['rps'] / r1['rps']:.2f}x on this 2-core machine")

if __name__ == "__main__":
    main()
