"""What the proxy benchmarks (`bench_proxy.py`, `bench_filter.py`) share: the Rust load generator,
the fast upstream, and where results go. Binaries come from `BENCH_BIN_DIR` (default
`target/release`)."""

import json
import os
import subprocess
from pathlib import Path

from stack import ROOT, Proc, free_port, wait_for

BIN = Path(os.environ.get("BENCH_BIN_DIR") or ROOT / "target" / "release")


def loadgen(*args, cpu=None):
    """Runs `loadgen` (pinned to `cpu` if given) and returns its JSON summary."""
    cmd = [str(BIN / "loadgen"), *map(str, args)]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_upstream(tmp):
    """Starts `bench-upstream` on a free port: (process, port)."""
    port = free_port()
    proc = Proc("bench-upstream", [str(BIN / "bench-upstream"), f"127.0.0.1:{port}"], tmp)
    wait_for(lambda: subprocess.run(["curl", "-sf", "-XPOST", f"http://127.0.0.1:{port}/"],
                                    capture_output=True).returncode == 0, "bench-upstream")
    return proc, port


def non_200(run):
    """Failed requests of one loadgen run: transport errors and statuses other than 200."""
    return run["errors"] + sum(n for s, n in run["statuses"].items() if s != "200")


def save(name, results):
    """Writes `tools/<name>.json`."""
    out = ROOT / "tools" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
