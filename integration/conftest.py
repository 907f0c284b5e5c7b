"""pytest fixtures over `stack.py`: one upstream + server + Envoy for the session."""

import shutil

import pytest

from stack import E2E_LIMITS, ROOT, Envoy, Server, Upstream, envoy_config


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """Upstream, server and Envoy, shared by the tests that do not restart anything."""
    tmp = tmp_path_factory.mktemp("stack")
    procs = []
    try:
        upstream = Upstream(tmp)
        procs.append(upstream.proc)
        server = Server(tmp, ROOT / "policies", {"e2e-limits.yaml": E2E_LIMITS, "e2e-answers.yaml": E2E_ANSWERS,
                                                        "e2e-redact.yaml": E2E_REDACT},
                        log_dir=tmp)
        procs.append(server.proc)
        envoy = Envoy(tmp, server, upstream.port, tmp)
        procs.append(envoy.proc)
        yield type("Stack", (), {"upstream": upstream, "server": server, "envoy": envoy, "tmp": tmp})
    finally:
        for p in reversed(procs):
            p.stop()


# A local-scope limit: counted by the filter in Envoy's shared data, across its workers.
E2E_LOCAL = """
apiVersion: llm-policy/v1
kind: Policy
metadata: {name: e2e-local, namespace: e2e-local, version: "1"}
spec:
  defaultDecision: allow
  rules:
    - id: five-per-hour-here
      priority: 10
      when: { match: { field: principal.id, op: exists } }
      action:
        decision: throttle
        reason: "more than 5 requests per hour on this proxy"
        rateLimit: { key: "{principal.id}", requests: 5, per: hour, scope: local }
"""


# A global token budget: reserved by the server, reconciled with the usage the filter reports.
E2E_BUDGET = """
apiVersion: llm-policy/v1
kind: Policy
metadata: {name: e2e-budget, namespace: e2e-budget, version: "1"}
spec:
  defaultDecision: allow
  rules:
    - id: team-tokens
      priority: 10
      when: { match: { field: principal.team, op: exists } }
      action:
        decision: throttle
        reason: "the team's daily token budget is spent"
        budget: { key: "{principal.team}", tokens: 100000, per: day }
"""


# Response rules over OpenAI and Anthropic answers (the restricted namespace checks Claude's only),
# with a token budget whose usage shows what a cut answer is charged.
E2E_ANSWERS = """
apiVersion: llm-policy/v1
kind: Policy
metadata: {name: e2e-answers, namespace: e2e-answers, version: "1"}
spec:
  defaultDecision: allow
  rules:
    - id: no-secrets-out
      phase: response
      priority: 100
      when: { match: { field: response.entities, op: contains, value: [api_key, private_key] } }
      action: { decision: deny, reason: "the answer holds a secret", audit: true }
    - id: no-codename-out
      phase: response
      when: { match: { field: response.text, op: contains, value: "project bluebird", ignore_case: true } }
      action: { decision: deny, reason: "the answer names an internal project", status: 451 }
    - id: no-shell-calls
      phase: response
      when: { match: { field: response.tool_calls, op: contains, value: bash } }
      action: { decision: deny, reason: "the model may not call a shell" }
    - id: team-tokens
      priority: 10
      when: { match: { field: principal.team, op: exists } }
      action:
        decision: throttle
        reason: "the team's daily token budget is spent"
        budget: { key: "{principal.team}", tokens: 10000000, per: day }
"""


# Redact instead of deny: personal data and secrets replaced by placeholders on the way up; the
# support and budgeted teams get their e-mail addresses back in the answer, after the response
# rules read it. The budgeted team's budget is the server's (the filter asks it).
E2E_REDACT = """
apiVersion: llm-policy/v1
kind: Policy
metadata: {name: e2e-redact, namespace: e2e-redact, version: "1"}
spec:
  defaultDecision: allow
  rules:
    - id: redact-personal-data
      when: { match: { field: request.method, op: eq, value: POST } }
      action: { decision: allow, audit: true, transform: { redact: [email, phone, card, iban, secret] } }
    - id: support-sees-its-own
      when: { match: { field: principal.team, op: eq, value: support } }
      action: { decision: allow, transform: { redact: [email], restore: true } }
    - id: budgeted-sees-its-own
      when: { match: { field: principal.team, op: eq, value: budgeted } }
      action: { decision: allow, transform: { redact: [email], restore: true } }
    - id: no-emails-out
      phase: response
      when: { match: { field: response.entities, op: contains, value: email } }
      action: { decision: deny, reason: "the answer holds an e-mail address" }
    - id: team-budget
      priority: 10
      when: { match: { field: principal.team, op: eq, value: budgeted } }
      action:
        decision: throttle
        reason: "the team's daily token budget is spent"
        budget: { key: "{principal.team}", tokens: 10000000, per: day }
"""


@pytest.fixture(scope="session")
def fstack(tmp_path_factory):
    """Upstream, server and Envoy with the filter (filter+fallback, bundle sync), shared by the
    filter tests."""
    tmp = tmp_path_factory.mktemp("filter")
    policies = tmp / "bundle"
    shutil.copytree(ROOT / "policies", policies, ignore=shutil.ignore_patterns("tests"))
    (policies / "e2e-local.yaml").write_text(E2E_LOCAL)
    (policies / "e2e-budget.yaml").write_text(E2E_BUDGET)
    (policies / "e2e-answers.yaml").write_text(E2E_ANSWERS)
    (policies / "e2e-redact.yaml").write_text(E2E_REDACT)
    procs = []
    try:
        upstream = Upstream(tmp)
        procs.append(upstream.proc)
        (tmp / "server").mkdir()
        server = Server(tmp / "server", policies, log_dir=tmp)
        procs.append(server.proc)
        text = envoy_config("filter+fallback", policies, server=f"127.0.0.1:{server.grpc}",
                            sync_from=f"127.0.0.1:{server.http}", sync_interval_ms=300,
                            usage_token_file=server.usage_token_file)
        envoy = Envoy(tmp, None, upstream.port, tmp, text=text, concurrency=2)
        procs.append(envoy.proc)
        yield type("FilterStack", (), {"upstream": upstream, "server": server, "envoy": envoy, "tmp": tmp,
                                       "policies": policies})
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, show the tail of each process log."""
    outcome = yield
    report = outcome.get_result()
    for name in ("stack", "fstack"):
        if not report.failed or name not in item.funcargs:
            continue
        s = item.funcargs[name]
        for p in (s.upstream.proc, s.server.proc, s.envoy.proc):
            tail = "\n".join(p.text().splitlines()[-30:])
            report.sections.append((f"{p.name} log (tail)", tail))
