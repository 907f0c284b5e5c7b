"""Real processes on loopback for the end-to-end tests and `make demo`: the mock LLM upstream,
`llm-policy serve` and Envoy 1.40 with ext_authz in front of it. Ports are picked free at start.
Standard library only.

Binaries: `LLM_POLICY_BIN` (default `target/release/llm-policy`), `ENVOY_BIN` (default
`tools/envoy/_bin/envoy`, fetched by `make envoy`) and `REDIS_SERVER` (default `redis-server` on
the `PATH`); `LLM_POLICY_PLUGINS`: the WASM plugin directory servers load (`make plugins`).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "e2e-admin-token-0123456789abcdef"
# The token usage reports carry (the server's `usageTokenFile`, the filter's `--usage-token-file`).
USAGE_TOKEN = "e2e-usage-token-0123456789abcdef"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary(env, default):
    path = Path(os.environ.get(env) or ROOT / default)
    if not path.exists():
        raise SystemExit(f"{path} is missing (set {env}, or run `make build envoy`)")
    return path


def wait_for(check, what, timeout=20.0):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception as e:  # noqa: BLE001 - still starting
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"{what} not up after {timeout}s ({last})")


def http_get(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


class Proc:
    """A child process whose output goes to a log file (shown when a test fails)."""

    def __init__(self, name, args, log_dir, **kw):
        self.name = name
        self.log = log_dir / f"{name}.log"
        self.out = open(self.log, "wb")
        self.p = subprocess.Popen(args, stdout=self.out, stderr=subprocess.STDOUT, **kw)

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.out.close()
        return self.p.returncode

    def text(self):
        return self.log.read_text(errors="replace")


class Server:
    """`llm-policy serve` with a config file, its own policy directory and audit file."""

    def __init__(self, tmp, policies_src, extra_policies=None, audit_queue=10000, log_dir=None, tls=None,
                 redis=None, name="llm-policy", config_extra=None):
        self.dir = tmp
        self.policies = tmp / "policies"
        shutil.copytree(policies_src, self.policies, ignore=shutil.ignore_patterns("tests"))
        for name, text in (extra_policies or {}).items():
            (self.policies / name).write_text(text)
        (tmp / "token").write_text(TOKEN)
        self.usage_token_file = tmp / "usage-token"
        self.usage_token_file.write_text(USAGE_TOKEN)
        self.audit = tmp / "audit.log"
        self.grpc, self.http, self.metrics = free_port(), free_port(), free_port()
        config = {
            "policies": str(self.policies),
            "grpcListen": f"127.0.0.1:{self.grpc}",
            "httpListen": f"127.0.0.1:{self.http}",
            "metricsListen": f"127.0.0.1:{self.metrics}",
            "adminTokenFile": str(tmp / "token"),
            "usageTokenFile": str(self.usage_token_file),
            "reload": {"debounceMs": 100},
            "audit": {"stdout": False, "queue": audit_queue, "file": {"path": str(self.audit)}},
        }
        if tls:
            config["tls"] = tls
        if os.environ.get("LLM_POLICY_PLUGINS"):
            # The WASM plugins the example bundle's `restricted` namespace uses (`make plugins`).
            config["plugins"] = {"dir": os.environ["LLM_POLICY_PLUGINS"]}
        if redis:
            # Replicas: counters, L4 cache, registry and an audit stream in the shared Redis.
            config["redis"] = {"url": redis.url, "registry": True, "audit": {}, "cache": {"enabled": True}, **redis.extra}
        config.update(config_extra or {})
        (tmp / "server.yaml").write_text(json.dumps(config))
        self.proc = Proc(
            name,
            [str(binary("LLM_POLICY_BIN", "target/release/llm-policy")), "serve", "--config", str(tmp / "server.yaml")],
            log_dir or tmp,
            env={**os.environ, "RUST_LOG": "info"},
        )
        wait_for(lambda: http_get(self.url("/readyz"))[0] == 200, "llm-policy serve")

    def url(self, path):
        return f"http://127.0.0.1:{self.http}{path}"

    def metric(self, sample):
        _, text = http_get(f"http://127.0.0.1:{self.metrics}/metrics")
        for line in text.decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def bundle(self):
        return json.loads(http_get(self.url("/readyz"))[1])["bundle"]

    def counter(self, key):
        """`GET /v1/budgets/{key}`: what a counter holds now (None: nothing counts)."""
        try:
            return json.loads(http_get(self.url("/v1/budgets/" + urllib.parse.quote(key, safe="/")))[1])
        except urllib.error.HTTPError as e:
            assert e.code == 404, e
            return None

    def settled(self, key, spent_before, timeout=10):
        """Waits until counter `key` holds no reservation and more than `spent_before` (an answer's
        usage was recorded); returns what it holds."""
        state = {}

        def done():
            state["c"] = self.counter(key)
            return state["c"] is not None and state["c"]["reserved"] == 0 and state["c"]["spent"] > spent_before

        wait_for(done, f"the usage recorded in {key}", timeout=timeout)
        return state["c"]


class Redis:
    """A real `redis-server` on a free loopback port, nothing persisted; `kill` and `restart` (same
    port) for outages."""

    def __init__(self, log_dir, **extra):
        self.port = free_port()
        self.log_dir = log_dir
        self.extra = extra
        self.proc = None
        self.start()

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}"

    def start(self):
        self.proc = Proc(f"redis-{self.port}", [os.environ.get("REDIS_SERVER", "redis-server"), "--port", str(self.port),
                                                "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                         self.log_dir)
        wait_for(lambda: self.command("PING") == "PONG", "redis-server")

    def kill(self):
        self.proc.stop(signal.SIGKILL)

    def restart(self):
        self.kill()
        self.start()

    def command(self, *args):
        """One command over RESP (standard library only): its reply (str, int, list or None);
        None also when Redis is unreachable."""
        return _command(self.port, *args)


class RedisCluster:
    """A real three-node Redis Cluster (three primaries, no replicas) on free loopback ports,
    nothing persisted; `url` is its first node, and servers given it run with `cluster: true`."""

    SLOTS = [(0, 5460), (5461, 10922), (10923, 16383)]

    def __init__(self, log_dir, **extra):
        self.log_dir = Path(log_dir) / f"redis-cluster-{free_port()}"
        self.log_dir.mkdir()
        self.extra = {"cluster": True, **extra}
        self.nodes = []
        self.proc = self
        try:
            for _ in range(3):
                port, bus = free_port(), free_port()
                proc = Proc(f"redis-cluster-{port}", [
                    os.environ.get("REDIS_SERVER", "redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--cluster-enabled", "yes", "--cluster-port", str(bus),
                    "--cluster-node-timeout", "5000", "--cluster-config-file", str(self.log_dir / f"nodes-{port}.conf"),
                    "--dir", str(self.log_dir)], self.log_dir)
                self.nodes.append((port, bus, proc))
                wait_for(lambda: _command(port, "PING") == "PONG", "redis-server (cluster node)")
            first, first_bus, _ = self.nodes[0]
            for i, (port, _, _) in enumerate(self.nodes):
                assert _command(port, "CLUSTER", "ADDSLOTSRANGE", *self.SLOTS[i]) == "OK"
                if i:
                    assert _command(port, "CLUSTER", "MEET", "127.0.0.1", first, first_bus) == "OK"

            def formed():
                infos = [_command(port, "CLUSTER", "INFO") or "" for port, _, _ in self.nodes]
                return all("cluster_state:ok" in i and "cluster_known_nodes:3" in i for i in infos)

            wait_for(formed, "the Redis Cluster to form", timeout=20)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.nodes[0][0]}"

    def keys(self, pattern):
        """Per node, the keys matching `pattern`."""
        return [_command(port, "KEYS", pattern) or [] for port, _, _ in self.nodes]

    def stop(self, *_):
        for _, _, proc in self.nodes:
            proc.stop()


def _command(port, *args):
    """One command to the redis-server on `port` over RESP (standard library only): its reply
    (str, int, list or None); None also when it is unreachable."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(("*%d\r\n" % len(args) + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in map(str, args))).encode())
            return _resp(s.makefile("rb"))
    except OSError:
        return None


def _resp(f):
    line = f.readline().decode().rstrip("\r\n")
    kind, rest = line[:1], line[1:]
    if kind in "+-":
        return rest
    if kind == ":":
        return int(rest)
    if kind == "$":
        return None if rest == "-1" else f.read(int(rest) + 2)[:-2].decode()
    if kind == "*":
        return None if rest == "-1" else [_resp(f) for _ in range(int(rest))]
    raise ValueError(f"unexpected RESP reply {line!r}")


class Replicas:
    """`n` `llm-policy serve` replicas on `bundle` sharing one real redis-server, or a real Redis
    Cluster with `cluster=True` (counters, registry, audit stream), each in its own directory under `tmp`; `ext_authz_config()` is
    Envoy's ext_authz configuration over all of them (round robin). `stop()` stops them all (also
    when one fails to start)."""

    def __init__(self, tmp, bundle, n, name="replica", config_extra=None, cluster=False, **redis_extra):
        self.procs = []
        try:
            self.redis = (RedisCluster if cluster else Redis)(tmp, **redis_extra)
            self.procs.append(self.redis.proc)
            self.servers = []
            for i in range(n):
                home = Path(tmp) / f"{name}-{i}"
                home.mkdir()
                self.servers.append(Server(home, bundle, log_dir=tmp, redis=self.redis, name=f"{name}-{i}",
                                           config_extra=config_extra))
                self.procs.append(self.servers[-1].proc)
        except BaseException:
            self.stop()
            raise

    def ext_authz_config(self):
        """`envoy/ext-authz.yaml` with one endpoint per replica."""
        return with_endpoints((ROOT / "envoy" / "ext-authz.yaml").read_text(), [s.grpc for s in self.servers])

    def stop(self):
        for p in reversed(self.procs):
            p.stop()
        # A restarted Redis runs under a process started after ours.
        if getattr(self, "redis", None) is not None and self.redis.proc is not None:
            self.redis.proc.stop()


def with_endpoints(text, ports, old=50051):
    """`text` (an Envoy config) with the endpoint on port `old` replaced by one per port (a cluster
    of replicas, round robin)."""
    lines = text.splitlines(keepends=True)
    i = next(n for n, l in enumerate(lines) if f"port_value: {old} " in l or f"port_value: {old}}}" in l)
    start = i - 2
    assert "- endpoint:" in lines[start], lines[start]
    block = "".join(lines[start:i + 1])
    return "".join(lines[:start]) + "".join(block.replace(f"port_value: {old}", f"port_value: {p}") for p in ports) \
        + "".join(lines[i + 1:])


class Envoy:
    """Envoy running one of `envoy/*.yaml` with its ports replaced: `authz_port` is the ext_authz
    server's gRPC port (`server.grpc` by default; unused by configs without ext_authz)."""

    def __init__(self, tmp, server, upstream_port, log_dir, config="ext-authz.yaml", authz_port=None, concurrency=2,
                 cert_dir=None, text=None):
        self.port, self.admin = free_port(), free_port()
        text = text or (ROOT / "envoy" / config).read_text()
        text = text.replace(DEFAULT_WASM, str(wasm_file()))
        authz = authz_port or (server.grpc if server else None)
        for old, new, required in [
            ("port_value: 10000", f"port_value: {self.port}", True),
            ("port_value: 9901", f"port_value: {self.admin}", True),
            ("port_value: 50051", f"port_value: {authz}", False),
            ("port_value: 18000", f"port_value: {upstream_port}", True),
            ("address: 0.0.0.0", "address: 127.0.0.1", True),
        ]:
            assert old in text or not required, old
            text = text.replace(old, new)
        if cert_dir:
            text = text.replace("/etc/llm-policy/tls/", f"{cert_dir}/")
        path = Path(tmp) / f"envoy-{self.port}.yaml"
        path.write_text(text)
        self.proc = Proc(
            f"envoy-{config.removesuffix('.yaml') if not text else 'generated'}-{self.port}",
            [str(binary("ENVOY_BIN", "tools/envoy/_bin/envoy")), "-c", str(path), "--concurrency", str(concurrency),
             "--base-id", str(self.port), "-l", os.environ.get("ENVOY_LOG_LEVEL", "warning"),
             "--service-node", f"envoy-{self.port}"],
            log_dir,
        )
        wait_for(lambda: http_get(f"http://127.0.0.1:{self.admin}/ready")[1].strip() == b"LIVE", "envoy")
        self.node = f"envoy-{self.port}"

    def url(self, path=""):
        return f"http://127.0.0.1:{self.port}{path}"


DEFAULT_WASM = "target/wasm32-wasip1/wasm/llm_policy_filter.wasm"


def wasm_file():
    """The filter: `LLM_POLICY_WASM` (the Makefile passes it), else the default build output."""
    return Path(os.environ.get("LLM_POLICY_WASM", ROOT / DEFAULT_WASM))


def envoy_config(mode, policies=None, identity="trusted-headers", **flags):
    """`llm-policy envoy-config --mode MODE` with the default ports (the Envoy class replaces them).
    Most tests send their identity as headers (`--identity trusted-headers`); `identity=None` is
    the generator's default (identity headers removed). A list value repeats its flag."""
    args = [str(binary("LLM_POLICY_BIN", "target/release/llm-policy")), "envoy-config", "--mode", mode,
            "--upstream", "http://127.0.0.1:18000", "--listen", "0.0.0.0:10000"]
    if policies:
        args += ["--policies", str(policies)]
    if identity:
        args += ["--identity", identity]
    for k, v in flags.items():
        for one in v if isinstance(v, list) else [v]:
            args += [f"--{k.replace('_', '-')}", str(one)]
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def make_certs(directory):
    """A CA, a server certificate for `localhost` and a client certificate for Envoy, all signed
    by the CA (openssl): `ca.crt`, `server.crt/.key`, `envoy.crt/.key` in `directory`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", "/CN=llm-policy test CA", "-keyout", "ca.key", "-out", "ca.crt")
    for name, ext in [("server", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth"),
                      ("envoy", "subjectAltName=DNS:envoy\nextendedKeyUsage=clientAuth")]:
        (d / f"{name}.ext").write_text(ext + "\n")
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")
    return d


class Upstream:
    def __init__(self, log_dir):
        self.port = free_port()
        self.proc = Proc("upstream", [sys.executable, str(ROOT / "integration" / "mock_upstream.py"), str(self.port)], log_dir)
        wait_for(lambda: http_get(f"http://127.0.0.1:{self.port}/__requests")[0] == 200, "mock upstream")

    def requests(self):
        return json.loads(http_get(f"http://127.0.0.1:{self.port}/__requests")[1])

    def reset(self):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/__reset", data=b"", method="POST")
        urllib.request.urlopen(req, timeout=2).read()


E2E_LIMITS = """
apiVersion: llm-policy/v1
kind: Policy
metadata: {name: e2e-limits, namespace: e2e, version: "1"}
spec:
  defaultDecision: allow
  rules:
    - id: five-per-hour
      priority: 10
      when: { match: { field: principal.id, op: exists } }
      action:
        decision: throttle
        reason: "more than 5 requests per hour"
        rateLimit: { key: "{principal.id}", requests: 5, per: hour }
"""
