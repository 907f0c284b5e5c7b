"""pytest fixtures over `stack.py`: one upstream + server + Envoy for the session."""

import pytest

from stack import E2E_LIMITS, ROOT, Envoy, Server, Upstream


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """Upstream, server and Envoy, shared by the tests that do not restart anything."""
    tmp = tmp_path_factory.mktemp("stack")
    procs = []
    try:
        upstream = Upstream(tmp)
        procs.append(upstream.proc)
        server = Server(tmp, ROOT / "policies", {"e2e-limits.yaml": E2E_LIMITS}, log_dir=tmp)
        procs.append(server.proc)
        envoy = Envoy(tmp, server, upstream.port, tmp)
        procs.append(envoy.proc)
        yield type("Stack", (), {"upstream": upstream, "server": server, "envoy": envoy, "tmp": tmp})
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, show the tail of each process log."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "stack" in item.funcargs:
        s = item.funcargs["stack"]
        for p in (s.upstream.proc, s.server.proc, s.envoy.proc):
            tail = "\n".join(p.text().splitlines()[-30:])
            report.sections.append((f"{p.name} log (tail)", tail))
