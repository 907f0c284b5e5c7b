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


def chat_body(size):
    """An OpenAI chat body of about `size` bytes that the example bundle allows, with the nonce
    `loadgen --unique` rewrites (the `filter` criterion bench sends the same)."""
    return subprocess.run([str(BIN / "loadgen"), "chat-body", "--bytes", str(size)], capture_output=True,
                          check=True).stdout


def pin(proc, cpu):
    """Pins every thread of `proc` (a `stack.Proc`) to `cpu` (a core, or a list such as `0,1`):
    `taskset -a`, since a process's threads started before the call (Envoy's workers, a server's
    runtime) keep their own mask."""
    subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(proc.p.pid)], capture_output=True, check=True)


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


def identity_material(tmp, keys=1000):
    """What the identity set-ups need, written into `tmp`: a JWKS (`jwks.json`) and an RS256 token
    it verifies (issuer `https://idp.bench`, audience `llm`, tier pro), the provider's key
    (`provider.key`), and a key table of `keys` virtual keys (`keys.json`, made with `llm-policy
    keys`; principals with a tier and no id). Returns (token, one virtual key)."""
    import time

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    from stack import binary

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="bench", alg="RS256")
    (tmp / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    token = jwt.encode({"iss": "https://idp.bench", "aud": "llm", "sub": "bench-user", "tier": "pro",
                        "exp": int(time.time()) + 3600}, key, algorithm="RS256", headers={"kid": "bench"})
    (tmp / "provider.key").write_text("sk-provider")
    cli = str(binary("LLM_POLICY_BIN", "target/release/llm-policy"))
    secret = None
    for i in range(keys):  # a realistic table: the lookup is by hash, whatever its size
        secret = subprocess.run([cli, "keys", "create", "--file", str(tmp / "keys.json"), "--id", f"k{i}",
                                 "--principal", "tier=pro"], capture_output=True, text=True, check=True).stdout.strip()
    return token, secret
