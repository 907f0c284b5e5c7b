"""Identity a client cannot fake (docs/identity.md), through real Envoy 1.40 with the
configurations `llm-policy envoy-config --identity …` generates, in both deployment modes (the
filter deciding in Envoy, and ext_authz asking `llm-policy serve`), with the official SDKs:

- the default (no `--identity`): the client's identity, namespace and shield headers are removed;
- `jwt`: Envoy's jwt_authn verifies tokens signed here with a local RSA key (JWKS file); claims
  decide tier, team and namespace; every kind of bad token gets a 401 the SDKs understand;
- `api-keys`: virtual keys made with `llm-policy keys`, looked up by hash; the provider's real key
  replaces them upstream; unknown, revoked and expired keys get a 401; a revocation on one
  replica reaches the others and the filter's sync;
- spoofing: the client's own `x-user-*`, `x-team-id`, `x-llm-policy-namespace` and
  `x-llm-shield-*` change no decision and no counter key;
- the server's read token.
"""

import json
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import anthropic
import jwt
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from clients import chat, curl
from stack import TOKEN, Envoy, Replicas, Server, Upstream, binary, http_get, wait_for

PROVIDER_KEY = "sk-provider-real-0123456789"
ISSUER = "https://idp.llm-policy.test"
AUDIENCE = "llm-gateway"

# The rules the tests read decisions from: premium models need `tier: pro`; a shield score that
# reaches a rule denies (none should: nothing in front of Envoy scans); three requests an hour per
# principal (local scope: counted by the filter in filter mode, by the server in ext_authz mode);
# the `restricted` namespace admits the research team only.
BUNDLE = {
    "identity.yaml": """
apiVersion: llm-policy/v1
kind: Policy
metadata: {name: identity-default, namespace: default, version: "1"}
spec:
  defaultDecision: allow
  rules:
    - id: premium-needs-pro
      priority: 100
      when: { cel: "request.model == 'gpt-4o' && !(principal.tier in ['pro'])" }
      action: { decision: deny, status: 402, reason: "gpt-4o needs the pro tier" }
    - id: shield-scores-never-reach-rules
      priority: 90
      when: { match: { field: shield.pii, op: exists } }
      action: { decision: deny, reason: "a client-sent shield score reached the rules" }
    - id: three-an-hour
      priority: 10
      when: { match: { field: principal.id, op: exists } }
      action:
        decision: throttle
        reason: "more than 3 requests an hour"
        rateLimit: { key: "{principal.id}", requests: 3, per: hour, scope: local }
---
apiVersion: llm-policy/v1
kind: Policy
metadata: {name: identity-restricted, namespace: restricted, version: "1"}
spec:
  defaultDecision: deny
  rules:
    - id: research-only
      priority: 10
      when: { match: { field: principal.team, op: eq, value: research } }
      action: { decision: allow, reason: "the research team" }
""",
}

# What a client would send to become someone else.
SPOOF = {
    "x-user-id": "mallory",
    "x-user-tier": "pro",
    "x-team-id": "research",
    "x-org-id": "acme",
    "x-llm-policy-namespace": "restricted",
    "x-llm-shield-pii": "0.0",
}


def rest(method, url, token=None, body=None):
    """(status, JSON body) of a REST call."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def llm_policy(*args):
    return subprocess.run([str(binary("LLM_POLICY_BIN", "target/release/llm-policy")), *map(str, args)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One upstream, the bundle, a JWKS, a provider key, and a key file made with `llm-policy
    keys`; `envoy(mode, identity, **flags)` starts Envoy (and, for ext-authz, a server) once per
    combination."""
    tmp = tmp_path_factory.mktemp("identity")
    bundle = tmp / "bundle"
    bundle.mkdir()
    for name, text in BUNDLE.items():
        (bundle / name).write_text(text)
    signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(signing.public_key()))
    jwk.update(kid="k1", alg="RS256", use="sig")
    (tmp / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    (tmp / "provider-key").write_text(PROVIDER_KEY)
    # Claims → principal: the defaults (id ← sub, tier, team, org) and a namespace claim.
    (tmp / "context.json").write_text(json.dumps({"namespaceClaim": "llm_namespace"}))

    keys = tmp / "keys.json"
    secrets = {}
    for name, flags in [("alice", ["--principal", "id=alice", "--principal", "tier=pro", "--principal", "team=research",
                                   "--namespace", "restricted"]),
                        ("bob", ["--principal", "id=bob", "--principal", "tier=free"]),
                        ("carol", ["--principal", "id=carol", "--principal", "tier=pro"]),
                        ("dave", ["--principal", "id=dave", "--principal", "tier=pro", "--expires-in", "1s"])]:
        r = llm_policy("keys", "create", "--file", keys, "--id", name, *flags)
        assert r.returncode == 0, r.stderr
        secrets[name] = r.stdout.strip()
    assert llm_policy("keys", "revoke", "carol", "--file", keys).returncode == 0
    listed = llm_policy("keys", "list", "--file", keys).stdout
    assert "carol" in listed and "revoked" in listed and secrets["alice"] not in listed
    assert all(s not in keys.read_text() for s in secrets.values())

    procs = []
    started = {}
    upstream = Upstream(tmp)
    procs.append(upstream.proc)

    def envoy(mode, identity, **flags):
        key = (mode, identity)
        if key in started:
            return started[key]
        home = tmp / f"{mode}-{identity}"
        home.mkdir()
        server = None
        extra = {}
        if identity == "jwt":
            extra = dict(jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwks_file=tmp / "jwks.json",
                         provider_key_file=tmp / "provider-key")
        if identity == "api-keys":
            extra = dict(provider_key_file=tmp / "provider-key")
            if mode == "filter":
                extra["keys_file"] = keys
        if mode == "ext-authz":
            server = Server(home, bundle, log_dir=home, config_extra={"keysFile": str(keys)})
            procs.append(server.proc)
        args = ["--context-config", str(tmp / "context.json")] if identity == "jwt" else []
        text = generate(mode, bundle if mode == "filter" else None, identity, args, **extra, **flags)
        e = Envoy(home, server, upstream.port, home, text=text)
        procs.append(e.proc)
        started[key] = type("Deployment", (), {"envoy": e, "server": server, "mode": mode})
        return started[key]

    def token(claims=None, key=None, alg="RS256", kid="k1", **overrides):
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": f"u-{uuid.uuid4().hex[:8]}", "iat": now, "exp": now + 600,
                **(claims or {}), **overrides}
        return jwt.encode(body, key or signing, algorithm=alg, headers={"kid": kid})

    try:
        yield type("World", (), {"upstream": upstream, "envoy": staticmethod(envoy), "secrets": secrets,
                                 "token": staticmethod(token), "stranger": stranger, "tmp": tmp, "keys": keys,
                                 "bundle": bundle})
    finally:
        for p in reversed(procs):
            p.stop()


def generate(mode, policies, identity, global_args=(), **flags):
    """`llm-policy envoy-config` with `--identity IDENTITY` (none: the default) and its warning."""
    args = [str(binary("LLM_POLICY_BIN", "target/release/llm-policy")), *global_args, "envoy-config", "--mode", mode,
            "--upstream", "http://127.0.0.1:18000", "--listen", "0.0.0.0:10000"]
    if policies:
        args += ["--policies", str(policies)]
    if identity != "none":
        args += ["--identity", identity]
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if identity == "none":
        assert "every request is anonymous" in r.stderr
    return r.stdout


def upstream_saw(world, since):
    """The requests that reached the upstream after the first `since`."""
    return world.upstream.requests()[since:]


def gpt(client, model="gpt-4o-mini"):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])


def oai(deployment, api_key, **headers):
    return openai.OpenAI(base_url=deployment.envoy.url("/v1"), api_key=api_key, max_retries=0,
                         default_headers=headers or None)


MODES = ["filter", "ext-authz"]


@pytest.mark.parametrize("mode", MODES)
def test_by_default_client_identity_headers_are_removed(world, mode):
    d = world.envoy(mode, "none")
    before = len(world.upstream.requests())
    # Spoofing a pro tier: still anonymous, so no gpt-4o.
    with pytest.raises(openai.APIStatusError) as e:
        gpt(oai(d, "sk-anything", **SPOOF), "gpt-4o")
    assert e.value.status_code == 402 and "pro tier" in str(e.value)
    # The restricted namespace cannot be chosen, a shield score never reaches the rules, and no
    # identity counter is kept for a principal the client names.
    for _ in range(5):
        assert gpt(oai(d, "sk-anything", **SPOOF)).choices[0].message.content
    seen = upstream_saw(world, before)
    assert len(seen) == 5
    for r in seen:
        assert not set(SPOOF) & set(r["headers"]), r["headers"]
        # Without jwt or api-keys, the client's own provider key is passed on as sent.
        assert r["headers"]["authorization"] == "Bearer sk-anything"


def test_trusted_headers_are_trusted_and_say_so(world):
    """The contrast that shows the other tests can fail: here the same spoof works."""
    r = subprocess.run([str(binary("LLM_POLICY_BIN", "target/release/llm-policy")), "envoy-config", "--mode", "filter",
                        "--policies", str(world.bundle), "--upstream", "http://127.0.0.1:18000",
                        "--identity", "trusted-headers"], capture_output=True, text=True)
    assert r.returncode == 0 and "warning: --identity trusted-headers" in r.stderr
    assert "trusted as sent" in r.stdout
    d = world.envoy("filter", "trusted-headers")
    assert gpt(oai(d, "sk-anything", **{"x-user-tier": "pro"}), "gpt-4o").choices


@pytest.mark.parametrize("mode", MODES)
def test_jwt_claims_decide_and_spoofed_headers_do_not(world, mode):
    d = world.envoy(mode, "jwt")
    before = len(world.upstream.requests())
    pro = world.token({"tier": "pro", "team": "research", "llm_namespace": "restricted"})
    # The restricted namespace admits the research team: the claims put the request there.
    assert gpt(oai(d, pro), "gpt-4o").choices
    free = world.token({"tier": "free", "team": "sales"})
    with pytest.raises(openai.APIStatusError) as e:
        gpt(oai(d, free, **SPOOF), "gpt-4o")
    assert e.value.status_code == 402
    # A free user cannot move into the restricted namespace (the claim is absent: default).
    seen = upstream_saw(world, before)
    assert len(seen) == 1
    h = seen[0]["headers"]
    # The token and the principal stay in Envoy; the provider gets its own key.
    assert not set(SPOOF) & set(h), h
    assert h["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert pro not in json.dumps(seen)

    # Counters are keyed by the token's subject, whatever x-user-id says.
    sub = f"counted-{uuid.uuid4().hex[:6]}"
    counted = world.token({"tier": "pro"}, sub=sub)
    for i in range(3):
        assert gpt(oai(d, counted, **{"x-user-id": f"someone-else-{i}"})).choices
    with pytest.raises(openai.RateLimitError):
        gpt(oai(d, counted, **{"x-user-id": "yet-another"}))
    # Another subject has its own counter.
    assert gpt(oai(d, world.token({"tier": "pro"}))).choices


@pytest.mark.parametrize("mode", MODES)
def test_bad_tokens_get_a_401_the_sdks_understand_before_any_rule(world, mode):
    d = world.envoy(mode, "jwt")
    now = int(time.time())
    bad = {
        "expired": world.token(exp=now - 120, iat=now - 600),
        "not yet valid": world.token(nbf=now + 600),
        "wrong issuer": world.token(iss="https://evil.example"),
        "wrong audience": world.token(aud="someone-else"),
        "bad signature": world.token(key=world.stranger),
        "unknown key id": world.token(kid="k9"),
        "alg none": jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": now + 600}, None, algorithm="none"),
        "not a jwt": "sk-plain-provider-key",
    }
    before = len(world.upstream.requests())
    for why, tok in bad.items():
        with pytest.raises(openai.AuthenticationError) as e:
            gpt(oai(d, tok, **SPOOF), "gpt-4o")
        assert e.value.status_code == 401, why
        body = e.value.response.json()
        assert body["error"]["type"] == "authentication_error", (why, body)
        # Anthropic's SDK (a bearer token) raises its own error type on the same answer.
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=d.envoy.url(), auth_token=tok, max_retries=0).messages.create(
                model="claude-3-5-haiku-latest", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    # No token at all; a valid one in the URL is not taken (it would travel on to the provider).
    status, _, body = curl(d.envoy.url("/v1/chat/completions"), chat("gpt-4o-mini"), SPOOF)
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    status, _, _ = curl(d.envoy.url(f"/v1/chat/completions?access_token={world.token()}"), chat("gpt-4o-mini"))
    assert status == 401
    # Every path needs a token, not only the LLM calls the rules check.
    assert curl(d.envoy.url("/v1/models"), method="GET")[0] == 401
    assert len(world.upstream.requests()) == before, "a refused token reached the upstream"


@pytest.mark.parametrize("mode", MODES)
def test_virtual_keys_are_who_the_client_is_and_never_reach_the_provider(world, mode):
    d = world.envoy(mode, "api-keys")
    s = world.secrets
    before = len(world.upstream.requests())
    # alice: pro, research, restricted namespace (from her key's record).
    assert gpt(oai(d, s["alice"]), "gpt-4o").choices
    # Anthropic's SDK sends the key in x-api-key.
    msg = anthropic.Anthropic(base_url=d.envoy.url(), api_key=s["alice"], max_retries=0).messages.create(
        model="claude-3-5-haiku-latest", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    assert msg.content
    # bob is free, whatever he claims.
    with pytest.raises(openai.APIStatusError) as e:
        gpt(oai(d, s["bob"], **SPOOF), "gpt-4o")
    assert e.value.status_code == 402
    seen = upstream_saw(world, before)
    assert len(seen) == 2
    for r in seen:
        h = r["headers"]
        assert h["authorization"] == f"Bearer {PROVIDER_KEY}", h
        assert "x-api-key" not in h
        assert not set(SPOOF) & set(h), h
    assert not any(secret in json.dumps(seen) for secret in s.values())

    # With the provider's key injected, only the inference endpoints are routed: a key holder
    # cannot list or fetch the organisation's files, batches or stored responses.
    before = len(world.upstream.requests())
    for method, path, body in [("GET", "/v1/files", None), ("POST", "/v1/batches", b'{"input_file_id": "f"}'),
                               ("GET", "/v1/responses/resp_123", None), ("GET", "/v1/chat/completions", None)]:
        status, _, out = curl(d.envoy.url(path), body, {"authorization": f"Bearer {s['alice']}"}, method=method)
        assert status == 404 and json.loads(out)["error"]["code"] == "not_routed", (path, status, out)
    assert len(world.upstream.requests()) == before

    # Counters are the key's principal's, whatever x-user-id says.
    bob = oai(d, s["bob"])
    done = 0
    for i in range(4):
        try:
            gpt(oai(d, s["bob"], **{"x-user-id": f"not-bob-{i}"}))
            done += 1
        except openai.RateLimitError:
            break
    assert done == 3, done
    with pytest.raises(openai.RateLimitError):
        gpt(bob)


@pytest.mark.parametrize("mode", MODES)
def test_unknown_revoked_and_expired_keys_get_a_401(world, mode):
    d = world.envoy(mode, "api-keys")
    time.sleep(max(0.0, 1.2 - (time.time() - world.keys.stat().st_mtime)))  # dave's key has expired
    before = len(world.upstream.requests())
    cases = {
        "unknown": "lpk_" + "0" * 48,
        "revoked": world.secrets["carol"],
        "expired": world.secrets["dave"],
        "a provider key": "sk-proj-" + "a" * 40,
    }
    for why, key in cases.items():
        with pytest.raises(openai.AuthenticationError) as e:
            gpt(oai(d, key, **SPOOF))
        assert e.value.status_code == 401, why
        assert e.value.response.json()["error"]["type"] == "authentication_error"
        with pytest.raises(anthropic.AuthenticationError) as ae:
            anthropic.Anthropic(base_url=d.envoy.url(), api_key=key, max_retries=0).messages.create(
                model="claude-3-5-haiku-latest", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
        assert ae.value.response.json()["type"] == "error"
    assert json.loads(curl(d.envoy.url("/v1/chat/completions"), chat("gpt-4o-mini"))[2])["error"]["code"] \
        == "missing_api_key"
    # Every path needs a key, not only the LLM calls the rules check: Envoy would put the
    # provider's key on it.
    assert curl(d.envoy.url("/v1/models"), method="GET")[0] == 401
    assert curl(d.envoy.url("/v1/files"), b"x", {"authorization": "Bearer lpk_nope"})[0] == 401
    # Two different keys at once: refused, not one of them picked.
    status, _, _ = curl(d.envoy.url("/v1/chat/completions"), chat("gpt-4o-mini"),
                        {"authorization": f"Bearer {world.secrets['bob']}", "x-api-key": world.secrets["alice"]})
    assert status == 401
    assert len(world.upstream.requests()) == before
    if d.server is not None:
        with pytest.raises(openai.APIStatusError):
            gpt(oai(d, world.secrets["bob"]), "gpt-4o")
        # The audit record names the key and how identity was established, never the key itself.
        wait_for(lambda: "has been revoked" in d.server.audit.read_text(), "audit records")
        text = d.server.audit.read_text()
        assert not any(secret in text for secret in world.secrets.values())
        records = [json.loads(line) for line in text.splitlines()]
        refused = [r for r in records if "has been revoked" in r["reason"]]
        assert refused[0]["status"] == 401 and refused[0]["identity"] == {"via": "api-key"}
        # bob's 402 (the tests above): his key, how it was established, his principal.
        bobs = [r for r in records if r["identity"].get("key") == "bob"]
        assert bobs and bobs[0]["identity"]["via"] == "api-key" and bobs[0]["principal"]["tier"] == "free"


def test_a_key_file_revoked_with_the_cli_applies_to_a_running_server(tmp_path, world):
    """Without Redis the server follows its key file: `llm-policy keys revoke --file` on it
    takes effect without a restart, and an API write does not undo it."""
    keys = tmp_path / "keys.json"
    made = llm_policy("keys", "create", "--file", keys, "--id", "frank", "--principal", "tier=pro")
    assert made.returncode == 0
    secret = made.stdout.strip()
    server = Server(tmp_path, world.bundle, config_extra={"keysFile": str(keys)})
    procs = [server.proc]
    try:
        e = Envoy(tmp_path, server, world.upstream.port, tmp_path,
                  text=generate("ext-authz", None, "api-keys", provider_key_file=world.tmp / "provider-key"))
        procs.append(e.proc)
        d = type("D", (), {"envoy": e})
        assert gpt(oai(d, secret)).choices
        assert llm_policy("keys", "revoke", "frank", "--file", keys).returncode == 0

        def refused():
            try:
                gpt(oai(d, secret))
                return False
            except openai.AuthenticationError:
                return True

        wait_for(refused, "the revocation in the key file", timeout=5)
        # A key made through the API keeps the revocation made with the CLI.
        status, _ = rest("POST", server.url("/v1/keys"), TOKEN, {"id": "grace"})
        assert status == 201
        records = {r["id"]: r for r in json.loads(keys.read_text())["keys"]}
        assert records["frank"]["revoked"] is True and "grace" in records
        assert refused()
    finally:
        for p in reversed(procs):
            p.stop()


def test_a_revoked_key_is_refused_by_every_replica_and_the_filter(tmp_path, world):
    """Keys made and revoked through one replica's API (Redis-shared) apply on the other and in
    a filter that syncs from it, within the sync intervals."""
    replicas = Replicas(tmp_path, world.bundle, 2)
    procs = []
    try:
        a, b = replicas.servers
        status, made = rest("POST", a.url("/v1/keys"), TOKEN, {"id": "erin", "principal": {"id": "erin", "tier": "pro"}})
        assert status == 201, made
        secret = made["key"]
        assert secret not in json.dumps(made["record"])
        # Writes need the admin token.
        assert rest("POST", a.url("/v1/keys"), None, {"id": "x"})[0] == 401
        assert rest("DELETE", a.url("/v1/keys/erin"), "wrong-token-0123456789")[0] == 401

        filt = Envoy(tmp_path, None, world.upstream.port, tmp_path, text=generate(
            "filter+fallback", world.bundle, "api-keys", server=f"127.0.0.1:{b.grpc}",
            sync_from=f"127.0.0.1:{b.http}", sync_interval_ms=300, provider_key_file=world.tmp / "provider-key"))
        procs.append(filt.proc)
        authz = Envoy(tmp_path, b, world.upstream.port, tmp_path, text=generate(
            "ext-authz", None, "api-keys", provider_key_file=world.tmp / "provider-key"))
        procs.append(authz.proc)
        deployments = [type("D", (), {"envoy": e}) for e in (filt, authz)]

        def works(d):
            try:
                gpt(oai(d, secret), "gpt-4o")
                return True
            except openai.AuthenticationError:
                return False

        for d in deployments:
            wait_for(lambda: works(d), "the new key on the other replica", timeout=10)
        status, revoked = rest("DELETE", a.url("/v1/keys/erin"), TOKEN)
        assert status == 200 and revoked["record"]["revoked"]
        t0 = time.time()
        for d in deployments:
            wait_for(lambda: not works(d), "the revocation on the other replica", timeout=10)
        took = time.time() - t0
        assert took < 5, took
        assert rest("GET", b.url("/v1/keys"))[1]["keys"][0]["revoked"] is True
        assert rest("DELETE", a.url("/v1/keys/nobody"), TOKEN)[0] == 404
    finally:
        for p in reversed(procs):
            p.stop()
        replicas.stop()


def test_reads_can_be_put_behind_a_read_token(tmp_path, world):
    read = "read-token-0123456789abcdef"
    (tmp_path / "read-token").write_text(read)
    server = Server(tmp_path, world.bundle, config_extra={"readTokenFile": str(tmp_path / "read-token")})
    try:
        for path in ["/v1/policies", "/v1/bundle", "/v1/keys"]:
            assert rest("GET", server.url(path))[0] == 401, path
            assert rest("GET", server.url(path), "wrong-token-0123456789")[0] == 401, path
            assert rest("GET", server.url(path), read)[0] == 200, path
            assert rest("GET", server.url(path), TOKEN)[0] == 200, path
        body = {"method": "POST", "path": "/v1/chat/completions", "headers": {}, "body": {"model": "gpt-4o"}}
        assert rest("POST", server.url("/v1/evaluate"), None, body)[0] == 401
        assert rest("POST", server.url("/v1/evaluate"), read, body)[0] == 200
        # The read token does not write; health stays open.
        assert rest("POST", server.url("/v1/keys"), read, {"id": "x"})[0] == 401
        assert rest("GET", server.url("/readyz"))[0] == 200
        # A filter syncing from it sends the token (and one without it is refused).
        synced = {}
        for name, flags in [("with", {"sync_token_file": tmp_path / "read-token"}), ("without", {})]:
            text = generate("filter", world.bundle, "none", sync_from=f"127.0.0.1:{server.http}",
                            sync_interval_ms=200, **flags)
            home = tmp_path / name
            home.mkdir()
            synced[name] = Envoy(home, None, world.upstream.port, home, text=text)

        def stat(envoy, name):
            _, text = http_get(f"http://127.0.0.1:{envoy.admin}/stats?filter=llm_policy.sync")
            return sum(int(line.rsplit(" ", 1)[1]) for line in text.decode().splitlines()
                       if line.split(":")[0].endswith(name))

        wait_for(lambda: stat(synced["with"], "sync.ok") > 0, "a sync with the read token")
        wait_for(lambda: stat(synced["without"], "sync.failed") > 0, "a refused sync without it")
        assert stat(synced["without"], "sync.ok") == 0
        for e in synced.values():
            e.proc.stop()
    finally:
        server.proc.stop()


def test_identity_flags_are_checked(world):
    base = ["envoy-config", "--mode", "ext-authz", "--upstream", "http://127.0.0.1:18000"]
    for flags, message in [
        (["--identity", "jwt", "--jwt-audience", "a", "--jwks-file", "x"], "--jwt-issuer"),
        (["--identity", "jwt", "--jwt-issuer", "i", "--jwks-file", "x"], "--jwt-audience"),
        (["--identity", "jwt", "--jwt-issuer", "i", "--jwt-audience", "a"], "--jwks-file"),
        (["--jwt-issuer", "i"], "need --identity jwt"),
        (["--identity", "api-keys", "--keys-file", "k"], "server holds the keys"),
        (["--provider-key-file", "p"], "--identity jwt or --identity api-keys"),
        (["--identity", "api-keys", "--failure-mode", "open"], "needs --failure-mode closed"),
        (["--identity", "jwt", "--jwt-issuer", "i", "--jwt-audience", "a", "--jwks-uri", "http://idp.example/jwks"],
         "use https"),
    ]:
        r = llm_policy(*base, *flags)
        assert r.returncode == 2 and message in r.stderr, (flags, r.stderr)
    r = llm_policy("envoy-config", "--mode", "filter", "--policies", world.bundle, "--upstream",
                   "http://127.0.0.1:18000", "--identity", "api-keys")
    assert r.returncode == 2 and "--keys-file or --sync-from" in r.stderr
    # Nothing from a flag can end a YAML scalar in the configuration.
    r = llm_policy("envoy-config", "--mode", "ext-authz", "--upstream", 'http://ev"il:80')
    assert r.returncode == 2 and "bad host" in r.stderr
    broken = world.tmp / "broken-keys.json"
    broken.write_text('{"keys": [{"id": "a", "hash": "nothex"}]}\n')
    r = llm_policy("envoy-config", "--mode", "filter", "--policies", world.bundle, "--upstream",
                   "http://127.0.0.1:18000", "--identity", "api-keys", "--keys-file", broken)
    assert r.returncode == 2 and "broken-keys.json:1" in r.stderr and "invalid-api-key" in r.stderr, r.stderr
