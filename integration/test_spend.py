"""Spend a client cannot dodge (docs/budgets.md), through real Envoy 1.40 in both deployment
modes — the filter deciding in Envoy and asking `llm-policy serve` for global budgets
(filter+fallback), and ext_authz with the server's ext_proc edge reading every answer — with the
official SDKs and a loopback provider that reports the usage each test asks of it:

- a token budget admits what the answers' usage allows and not one request more;
- a stream whose client did not ask for usage: the filter (in ext_authz deployments the
  server's ext_proc edge) asks on its behalf and removes the extra chunk (the SDK sees the stream
  it would have seen);
- a cut stream is charged at least its reservation;
- a request without `max_tokens` reserves the model's output cap;
- a USD budget with the shipped prices stops at the right request;
- a sliding limit admits no more than its limit in any minute across a boundary;
- clamp instead of throttle: a budget that cannot pay for a request's `max_tokens` lowers it to
  what it can pay for (`transform: {maxTokens: fitBudget}`), a fixed cap lowers every request a
  rule allows; the provider receives the lowered body, the client the header that says so;
- allowed answers say what is left (`x-ratelimit-*-tokens`, `-requests`) when a rule asks;
- the reservation handle never reaches the provider, and usage reports need the usage token.
"""

import base64
import json
import re
import time
import urllib.error
import urllib.request
import uuid

import openai
import pytest

from clients import PRO, curl
from stack import USAGE_TOKEN, Envoy, Server, Upstream, envoy_config, http_get, wait_for

SPEND = """
apiVersion: llm-policy/v1
kind: Policy
metadata: {name: spend, namespace: spend, version: "1"}
spec:
  defaultDecision: allow
  rules:
    - id: user-tokens
      priority: 20
      when: { match: { field: principal.id, op: starts_with, value: "tok-" } }
      action:
        decision: throttle
        reason: "the user's daily token budget is spent"
        budget: { key: "{principal.id}", tokens: 1000, per: day }
    - id: user-usd
      priority: 20
      when: { match: { field: principal.id, op: starts_with, value: "usd-" } }
      action:
        decision: throttle
        reason: "the user's daily spend is used up"
        budget: { key: "{principal.id}", usd: 0.05, per: day }
    - id: hier-user
      priority: 20
      when: { match: { field: principal.id, op: starts_with, value: "h-" } }
      action:
        decision: throttle
        reason: "the user's daily token budget is spent"
        budget: { key: "{principal.id}", tokens: 1000, per: day }
    - id: hier-team
      priority: 20
      when: { match: { field: principal.team, op: starts_with, value: "hteam-" } }
      action:
        decision: throttle
        reason: "the team's daily token budget is spent"
        budget: { key: "{principal.team}", tokens: 1500, per: day }
    - id: fit-tokens
      priority: 20
      when: { match: { field: principal.id, op: starts_with, value: "fit-" } }
      action:
        decision: throttle
        reason: "the user's daily token budget is spent"
        budget: { key: "{principal.id}", tokens: 1000, per: day }
        transform: { maxTokens: fitBudget, minTokens: 50 }
    - id: cap-64
      priority: 20
      when: { match: { field: principal.id, op: starts_with, value: "cap-" } }
      action: { decision: allow, transform: { maxTokens: 64 } }
    - id: cap-tokens
      priority: 20
      when: { match: { field: principal.id, op: starts_with, value: "cap-" } }
      action:
        decision: throttle
        reason: "the user's daily token budget is spent"
        budget: { key: "{principal.id}", tokens: 1000, per: day }
    - id: left-tokens
      priority: 20
      when: { match: { field: principal.id, op: starts_with, value: "left-" } }
      action:
        decision: throttle
        budget: { key: "{principal.id}", tokens: 1000, per: day, remainingHeaders: true }
    - id: left-requests
      priority: 20
      when: { match: { field: principal.id, op: starts_with, value: "left-" } }
      action:
        decision: throttle
        rateLimit: { key: "{principal.id}", requests: 10, per: minute, scope: local, remainingHeaders: true }
    - id: five-a-minute
      priority: 20
      when: { match: { field: principal.id, op: starts_with, value: "rate-" } }
      action:
        decision: throttle
        reason: "five requests a minute"
        rateLimit: { key: "{principal.id}", requests: 5, per: minute }
"""

MODES = ["filter", "ext-authz"]


@pytest.fixture(scope="module")
def spend(tmp_path_factory):
    """One provider, one server, and an Envoy per mode."""
    tmp = tmp_path_factory.mktemp("spend")
    bundle = tmp / "bundle"
    bundle.mkdir()
    (bundle / "spend.yaml").write_text(SPEND)
    procs = []
    try:
        upstream = Upstream(tmp)
        procs.append(upstream.proc)
        (tmp / "server").mkdir()
        server = Server(tmp / "server", bundle, log_dir=tmp)
        procs.append(server.proc)
        envoys = {}
        text = envoy_config("filter+fallback", bundle, server=f"127.0.0.1:{server.grpc}",
                            usage_token_file=server.usage_token_file)
        envoys["filter"] = Envoy(tmp, server, upstream.port, tmp, text=text)
        envoys["ext-authz"] = Envoy(tmp, server, upstream.port, tmp,
                                    text=envoy_config("ext-authz", server=f"127.0.0.1:{server.grpc}"))
        procs += [e.proc for e in envoys.values()]
        yield type("Spend", (), {"upstream": upstream, "server": server, "envoys": envoys})
    finally:
        for p in reversed(procs):
            p.stop()


def client(envoy, user, **headers):
    return openai.OpenAI(base_url=envoy.url("/v1"), api_key="sk-test", max_retries=0,
                         default_headers={**PRO, "x-llm-policy-namespace": "spend", "x-user-id": user, **headers})


def counter(server, rule, user):
    """What the user's counter of `rule` holds (None: nothing counts)."""
    return server.counter(f"spend/{rule}/{user}")


def settled(server, rule, user, spent_before):
    """Waits until the answer's usage is recorded in the user's counter of `rule`."""
    return server.settled(f"spend/{rule}/{user}", spent_before)


def send(c, stream=False, **kw):
    """One chat completion; returns (status, the parsed stream chunks or answer)."""
    try:
        if stream:
            chunks = list(c.chat.completions.create(model=kw.pop("model", "gpt-4o-mini"), stream=True,
                                                    messages=[{"role": "user", "content": "hi"}], **kw))
            return 200, chunks
        r = c.chat.completions.create(model=kw.pop("model", "gpt-4o-mini"),
                                      messages=[{"role": "user", "content": "hi"}], **kw)
        return 200, r
    except openai.RateLimitError as e:
        return 429, e
    except openai.APIConnectionError as e:
        return 0, e
    except openai.InternalServerError as e:
        return e.status_code, e


GEN_AI = 'gen_ai_operation_name="chat",gen_ai_provider_name="openai",gen_ai_request_model="gpt-4o-mini"'


def gen_ai(server):
    """The server's OpenTelemetry GenAI metrics of gpt-4o-mini chats: the token usage sum and
    count by token type, and the request duration's count and sum."""
    return {
        "input": server.metric(f'gen_ai_client_token_usage_sum{{{GEN_AI},gen_ai_token_type="input"}}'),
        "output": server.metric(f'gen_ai_client_token_usage_sum{{{GEN_AI},gen_ai_token_type="output"}}'),
        "answers": server.metric(f'gen_ai_client_token_usage_count{{{GEN_AI},gen_ai_token_type="output"}}'),
        "timed": server.metric(f"gen_ai_server_request_duration_seconds_count{{{GEN_AI}}}"),
        "seconds": server.metric(f"gen_ai_server_request_duration_seconds_sum{{{GEN_AI}}}"),
    }


@pytest.mark.parametrize("mode", MODES)
def test_a_token_budget_admits_what_the_usage_allows_and_not_one_more(spend, mode):
    """1,000 tokens a day; each answer reports 330 (230 prompt + 100 output) against a reservation
    of a few prompt tokens + max_tokens 100. Three answers spend 990; the fourth would reserve at
    least 100 more: throttled, and so is every one after it. The OpenTelemetry GenAI metrics
    count the three answers' tokens by type, and time them."""
    user = f"tok-{uuid.uuid4().hex[:8]}"
    c = client(spend.envoys[mode], user, **{"x-mock-prompt-tokens": "230", "x-mock-completion-tokens": "100"})
    before = gen_ai(spend.server)
    statuses, spent = [], 0.0
    for _ in range(8):
        status, _ = send(c, max_tokens=100)
        statuses.append(status)
        if status == 200:
            spent = settled(spend.server, "user-tokens", user, spent)["spent"]
    assert statuses == [200, 200, 200] + [429] * 5, statuses
    assert spent == 990
    after = gen_ai(spend.server)
    delta = {k: after[k] - before[k] for k in after}
    assert (delta["input"], delta["output"], delta["answers"], delta["timed"]) == (690, 300, 3, 3), delta
    # From the check's answer to the answer's end: a loopback round trip, not 0, never minutes.
    assert 0 < delta["seconds"] < 3 * 5, delta


@pytest.mark.parametrize("mode", MODES)
def test_a_stream_without_usage_cannot_dodge_the_budget(spend, mode):
    """OpenAI streams whose client did not ask for usage. The filter (ext_authz mode: the server's
    ext_proc edge) adds `stream_options.include_usage` upstream, the reported usage (330) is
    charged and the usage chunk removed, so the SDK sees exactly the chunks it would have seen.
    The budget admits exactly what the charges allow."""
    user = f"tok-{uuid.uuid4().hex[:8]}"
    c = client(spend.envoys[mode], user, **{"x-mock-prompt-tokens": "230", "x-mock-completion-tokens": "100"})
    spend.upstream.reset()
    statuses, charges, spent = [], [], 0.0
    for _ in range(8):
        status, chunks = send(c, stream=True, max_tokens=300)
        statuses.append(status)
        if status != 200:
            continue
        # The SDK parsed every chunk, none of them a usage-only chunk.
        assert [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content] == \
            ["Hello", " from", " the", " mock", " upstream."]
        assert all(ch.choices for ch in chunks) and all(ch.usage is None for ch in chunks)
        now = settled(spend.server, "user-tokens", user, spent)["spent"]
        charges.append(now - spent)
        spent = now
    assert charges == [330] * len(charges)
    sent = [json.loads(base64.b64decode(r["body"])) for r in spend.upstream.requests()]
    assert all(b["stream_options"] == {"include_usage": True} for b in sent)
    # 330 a request against 1,000, the next one's reservation (~305) counted: 2 spent, the
    # third fits (660 + 305), the fourth does not.
    admitted = statuses.count(200)
    assert statuses == [200] * admitted + [429] * (8 - admitted), (statuses, charges)
    assert admitted * 330 <= 1000 < admitted * 330 + 305, (statuses, charges)


@pytest.mark.parametrize("mode", MODES)
def test_the_asked_usage_chunk_is_removed_byte_for_byte(spend, mode):
    """The raw stream a client without `include_usage` receives is the provider's stream without
    the usage-only chunk, every other byte as sent; a client that asked for usage keeps it."""
    user = f"tok-{uuid.uuid4().hex[:8]}"
    headers = {**PRO, "x-llm-policy-namespace": "spend", "x-user-id": user, "x-mock-prompt-tokens": "7",
               "x-mock-completion-tokens": "5"}
    body = {"model": "gpt-4o", "stream": True, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    status, _, raw = curl(spend.envoys[mode].url("/v1/chat/completions"), json.dumps(body), headers)
    assert status == 200, raw
    events = [e for e in raw.decode().split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]", events

    def usage_of(e):
        return None if e == "data: [DONE]" else json.loads(e[len("data: "):]).get("usage")

    assert all(usage_of(e) is None for e in events), events
    assert all(json.loads(e[len("data: "):])["choices"] for e in events[:-1]), events
    asked = {**body, "stream_options": {"include_usage": True}}
    status, _, raw_asked = curl(spend.envoys[mode].url("/v1/chat/completions"), json.dumps(asked), headers)
    assert status == 200, raw_asked
    asked_events = [e for e in raw_asked.decode().split("\n\n") if e.strip()]
    usage = [e for e in asked_events if usage_of(e) is not None]
    assert len(usage) == 1 and json.loads(usage[0][len("data: "):])["choices"] == [], asked_events
    assert usage_of(usage[0])["completion_tokens"] == 5
    # The same stream, but for the usage chunk the second client asked for (and the clock).
    def same(es):
        return [re.sub(r'"created":\s*\d+', '"created":0', e) for e in es]

    assert same(e for e in asked_events if e not in usage) == same(events)


@pytest.mark.parametrize("mode", MODES)
def test_a_cut_stream_is_charged_at_least_its_reservation(spend, mode):
    """The provider drops the connection mid-stream (usage never comes): charged the
    reservation; a long stream cut late: charged the text that streamed, above it."""
    user = f"tok-{uuid.uuid4().hex[:8]}"
    c = client(spend.envoys[mode], user, **{"x-mock-cut-after": "3"})
    status, _ = send(c, stream=True, max_tokens=200, stream_options={"include_usage": True})
    assert status in (0, 200)
    first = settled(spend.server, "user-tokens", user, 0.0)["spent"]
    assert 200 < first < 220, first
    user = f"tok-{uuid.uuid4().hex[:8]}"
    c = client(spend.envoys[mode], user, **{"x-mock-pieces": "600", "x-mock-cut-after": "500"})
    status, _ = send(c, stream=True, max_tokens=200)
    # Cut before its headers reached the client (ext_authz: while the usage-chunk filter held
    # them for its round trip), the client sees Envoy's 502; either way the text that streamed
    # is charged.
    assert status in (0, 200, 502), status
    long = settled(spend.server, "user-tokens", user, 0.0)["spent"]
    # 499 pieces of " wordN" streamed: two or three tokens each by the estimate.
    assert long > 900, long


@pytest.mark.parametrize("mode", MODES)
def test_a_request_without_max_tokens_reserves_the_models_output_cap(spend, mode):
    """gpt-4o-mini can answer 16,384 tokens: a request without max_tokens reserves that, which
    a 1,000-token budget cannot pay for; with max_tokens it goes through."""
    user = f"tok-{uuid.uuid4().hex[:8]}"
    c = client(spend.envoys[mode], user)
    status, err = send(c)
    assert status == 429, err
    assert "budget" in str(err)
    assert send(c, max_tokens=50)[0] == 200


@pytest.mark.parametrize("mode", MODES)
def test_a_usd_budget_stops_at_the_right_request(spend, mode):
    """$0.05 a day on gpt-4o at the shipped prices ($2.50 / $10 per million): each answer
    reports 1,000 + 1,000 tokens, $0.0125; each reservation is about $0.01 (max_tokens 1,000).
    After four answers $0.05 is spent: the fifth is throttled."""
    user = f"usd-{uuid.uuid4().hex[:8]}"
    c = client(spend.envoys[mode], user, **{"x-mock-prompt-tokens": "1000", "x-mock-completion-tokens": "1000"})
    before = spend.server.metric("llm_policy_spend_usd_total")
    statuses, spent = [], 0.0
    for _ in range(6):
        status, _ = send(c, model="gpt-4o", max_tokens=1000)
        statuses.append(status)
        if status == 200:
            spent = settled(spend.server, "user-usd", user, spent)["spent"]
    assert statuses == [200] * 4 + [429] * 2, statuses
    assert abs(spent - 0.05) < 1e-9, spent
    # The server's spend counter moved by these answers (and by the few micro-dollars of other
    # tests' answers whose reports land meanwhile).
    assert 0.05 - 1e-9 < spend.server.metric("llm_policy_spend_usd_total") - before < 0.0501


@pytest.mark.parametrize("mode", MODES)
def test_a_team_budget_stops_the_team_when_two_users_spend_it(spend, mode):
    """User budgets of 1,000 and a team budget of 1,500 tokens; each answer reports 300 tokens
    (within its reservation). Alice spends 900 (her fourth would pass 1,000); Bob then gets one
    answer (the team is at 1,200) and is stopped by the team budget, which is named. A throttled
    request charges no budget: Bob's own counter holds only his one answer."""
    team = f"hteam-{uuid.uuid4().hex[:6]}"
    knobs = {"x-team-id": team, "x-mock-prompt-tokens": "5", "x-mock-completion-tokens": "295"}
    alice, bob = f"h-{uuid.uuid4().hex[:8]}", f"h-{uuid.uuid4().hex[:8]}"
    results = {}
    for user in (alice, bob):
        c = client(spend.envoys[mode], user, **knobs)
        statuses, spent = [], 0.0
        for _ in range(5):
            status, err = send(c, max_tokens=300)
            statuses.append(status)
            if status == 200:
                spent = settled(spend.server, "hier-user", user, spent)["spent"]
            else:
                results.setdefault(user + "-reason", str(err))
        results[user] = statuses
    assert results[alice] == [200, 200, 200, 429, 429], results
    assert "user's daily token budget" in results[alice + "-reason"]
    assert results[bob] == [200, 429, 429, 429, 429], results
    assert "team's daily token budget" in results[bob + "-reason"]
    assert counter(spend.server, "hier-team", team)["spent"] == 1200
    bob_counter = counter(spend.server, "hier-user", bob)
    assert (bob_counter["spent"], bob_counter["reserved"]) == (300, 0)


def test_a_sliding_limit_admits_no_more_than_five_in_any_minute(spend):
    """Five requests at the end of a minute, then five at the start of the next: a clock-aligned
    window would admit all ten within seconds; the sliding window admits none of the second five."""
    user = f"rate-{uuid.uuid4().hex[:8]}"
    c = client(spend.envoys["ext-authz"], user)
    while time.time() % 60 < 50 or time.time() % 60 > 55:
        time.sleep(0.2)
    first = [send(c, max_tokens=5)[0] for _ in range(5)]
    assert first == [200] * 5
    while time.time() % 60 > 5:
        time.sleep(0.2)
    second = [send(c, max_tokens=5)[0] for _ in range(5)]
    assert second == [429] * 5


@pytest.mark.parametrize("mode", MODES)
def test_the_reservation_handle_never_reaches_the_provider(spend, mode):
    user = f"tok-{uuid.uuid4().hex[:8]}"
    spend.upstream.reset()
    assert send(client(spend.envoys[mode], user, **{"x-llm-policy-reservation": "f" * 32}), max_tokens=10)[0] == 200
    (seen,) = spend.upstream.requests()
    assert not any(k.startswith("x-llm-policy-reservation") for k in seen["headers"]), seen["headers"]
    settled(spend.server, "user-tokens", user, 0.0)


@pytest.mark.parametrize("mode", MODES)
def test_a_client_cannot_set_envoys_retries_or_timeouts(spend, mode):
    """`x-envoy-max-retries`, `x-envoy-retry-on`, per-try timeouts: a client that set them could
    have the provider answer (and bill) several times for one charged request."""
    user = f"tok-{uuid.uuid4().hex[:8]}"
    spend.upstream.reset()
    c = client(spend.envoys[mode], user, **{"x-envoy-max-retries": "5", "x-envoy-retry-on": "5xx,reset",
                                            "x-envoy-upstream-rq-per-try-timeout-ms": "1"})
    assert send(c, max_tokens=10)[0] == 200
    (seen,) = spend.upstream.requests()
    assert not any(k.startswith("x-envoy-") and k != "x-envoy-expected-rq-timeout-ms" for k in seen["headers"]), \
        seen["headers"]
    settled(spend.server, "user-tokens", user, 0.0)


def test_usage_reports_need_the_usage_token(spend):
    body = json.dumps({"requestId": "0" * 32, "tokens": 0}).encode()

    def post(headers):
        req = urllib.request.Request(spend.server.url("/v1/usage"), data=body, method="POST",
                                     headers={"content-type": "application/json", **headers})
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert post({}) == 401
    assert post({"authorization": "Bearer not-the-token-0123456789"}) == 401
    # The right token: the (unknown) handle is looked up.
    assert post({"authorization": f"Bearer {USAGE_TOKEN}"}) == 404


def raw_send(c, **kw):
    """One chat completion with its response headers: (status, headers, answer or error)."""
    try:
        raw = c.chat.completions.with_raw_response.create(
            model=kw.pop("model", "gpt-4o-mini"), messages=[{"role": "user", "content": "hi"}], **kw)
        return 200, raw.headers, raw.parse()
    except openai.RateLimitError as e:
        return 429, e.response.headers, e


def upstream_bodies(upstream):
    return [json.loads(base64.b64decode(r["body"])) for r in upstream.requests()]


@pytest.mark.parametrize("mode", MODES)
def test_a_budget_lowers_max_tokens_to_what_it_can_pay_for_instead_of_throttling(spend, mode):
    """1,000 tokens a day, `fitBudget` down to 50 tokens. Each answer uses 1 prompt token and its
    whole `max_tokens` of output (the provider answers up to the cap). Two requests of 400 go
    through as sent; the third would not fit: it goes through lowered to what is left (the
    provider receives the lowered body, the client `x-llm-policy-max-tokens`); the fourth finds
    less than 50 tokens: throttled. Never more than the budget."""
    user = f"fit-{uuid.uuid4().hex[:8]}"
    c = client(spend.envoys[mode], user, **{"x-mock-prompt-tokens": "1", "x-mock-completion-tokens": "100000"})
    spend.upstream.reset()
    results, spent = [], 0.0
    for _ in range(4):
        status, headers, answer = raw_send(c, max_tokens=400)
        results.append((status, headers.get("x-llm-policy-max-tokens")))
        if status == 200:
            spent = settled(spend.server, "fit-tokens", user, spent)["spent"]
    assert [r[0] for r in results] == [200, 200, 200, 429], results
    assert results[0][1] is None and results[1][1] is None, results
    lowered = int(results[2][1])
    assert 150 < lowered < 200, results
    bodies = upstream_bodies(spend.upstream)
    assert [b["max_tokens"] for b in bodies] == [400, 400, lowered], bodies
    assert 990 <= spent <= 1000, spent


@pytest.mark.parametrize("mode", MODES)
def test_a_lowered_stream_keeps_its_usage_report(spend, mode):
    """A stream lowered by its budget: the body gets both edits (the usage the client did not ask
    for, and the lower cap); the SDK sees the stream it asked for."""
    user = f"fit-{uuid.uuid4().hex[:8]}"
    c = client(spend.envoys[mode], user, **{"x-mock-prompt-tokens": "1", "x-mock-completion-tokens": "100000"})
    spend.upstream.reset()
    status, chunks = send(c, stream=True, max_completion_tokens=5000)
    assert status == 200, chunks
    assert all(ch.usage is None for ch in chunks)
    (body,) = upstream_bodies(spend.upstream)
    assert 950 < body["max_completion_tokens"] < 1000, body
    assert body["stream_options"] == {"include_usage": True}, body
    spent = settled(spend.server, "fit-tokens", user, 0.0)["spent"]
    assert spent <= 1000, spent


@pytest.mark.parametrize("mode", MODES)
def test_a_fixed_cap_lowers_every_request_its_rule_allows(spend, mode):
    """`maxTokens: 64` on the rule that allows `cap-` users: a request without max_tokens (which
    would reserve gpt-4o-mini's 16,384 and be throttled by the 1,000-token budget) goes through
    capped at 64, charged for 64; a request asking for less keeps its own."""
    user = f"cap-{uuid.uuid4().hex[:8]}"
    c = client(spend.envoys[mode], user, **{"x-mock-prompt-tokens": "1", "x-mock-completion-tokens": "100000"})
    spend.upstream.reset()
    status, headers, _ = raw_send(c)
    assert (status, headers.get("x-llm-policy-max-tokens")) == (200, "64")
    spent = settled(spend.server, "cap-tokens", user, 0.0)["spent"]
    assert spent == 65
    status, headers, _ = raw_send(c, max_tokens=10)
    assert (status, headers.get("x-llm-policy-max-tokens")) == (200, None)
    first, second = upstream_bodies(spend.upstream)
    assert first["max_completion_tokens"] == 64 and "max_tokens" not in first, first
    assert second["max_tokens"] == 10 and "max_completion_tokens" not in second, second


@pytest.mark.parametrize("mode", MODES)
def test_a_client_cannot_ask_for_a_rewrite_or_hide_a_second_cap(spend, mode):
    """The rewrite marker is the server's: a client that sends it changes nothing and it never
    reaches the provider. A body that names its cap twice (once escaped) is refused or lowered
    in every copy: never a larger cap upstream than the budget paid for."""
    user = f"tok-{uuid.uuid4().hex[:8]}"
    spend.upstream.reset()
    c = client(spend.envoys[mode], user, **{"x-llm-policy-rewrite": "1"})
    status, headers, _ = raw_send(c, max_tokens=20)
    assert (status, headers.get("x-llm-policy-max-tokens")) == (200, None)
    (seen,) = spend.upstream.requests()
    assert "x-llm-policy-rewrite" not in seen["headers"], seen["headers"]
    assert json.loads(base64.b64decode(seen["body"]))["max_tokens"] == 20
    settled(spend.server, "user-tokens", user, 0.0)

    user = f"fit-{uuid.uuid4().hex[:8]}"
    spend.upstream.reset()
    body = ('{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],'
            '"max_tokens":900,"max\\u005ftokens":100000}').encode()
    req = urllib.request.Request(spend.envoys[mode].url("/v1/chat/completions"), data=body, method="POST",
                                 headers={**PRO, "content-type": "application/json", "authorization": "Bearer sk-test",
                                          "x-llm-policy-namespace": "spend", "x-user-id": user})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    sent = spend.upstream.requests()
    if status == 200:
        (seen,) = sent
        raw = base64.b64decode(seen["body"]).decode()
        assert "100000" not in raw, raw
    else:
        assert status in (400, 429) and not sent, (status, sent)


@pytest.mark.parametrize("mode", MODES)
def test_allowed_answers_say_what_is_left_when_a_rule_asks(spend, mode):
    """`remainingHeaders: true` on a 1,000-token budget (the server's) and a 10-a-minute local
    limit (the filter's, in filter mode): each allowed answer carries what is left after it was
    charged; answers under limits that do not ask carry none."""
    user = f"left-{uuid.uuid4().hex[:8]}"
    c = client(spend.envoys[mode], user, **{"x-mock-prompt-tokens": "1", "x-mock-completion-tokens": "100000"})
    status, h, _ = raw_send(c, max_tokens=100)
    assert status == 200
    assert (h.get("x-ratelimit-limit-tokens"), h.get("x-ratelimit-limit-requests")) == ("1000", "10"), h
    first = int(h["x-ratelimit-remaining-tokens"])
    assert 890 < first < 900, h
    assert h["x-ratelimit-remaining-requests"] == "9"
    assert int(h["x-ratelimit-reset-tokens"]) > 0 and int(h["x-ratelimit-reset-requests"]) > 0
    settled(spend.server, "left-tokens", user, 0.0)
    status, h, _ = raw_send(c, max_tokens=100)
    assert status == 200 and h["x-ratelimit-remaining-requests"] == "8"
    # The first answer's usage (101) replaced its reservation; the second reserves as the first.
    assert int(h["x-ratelimit-remaining-tokens"]) == first - 101, h
    status, h, _ = raw_send(client(spend.envoys[mode], f"tok-{uuid.uuid4().hex[:8]}"), max_tokens=10)
    assert status == 200 and not any(k.startswith("x-ratelimit") for k in h), h


@pytest.mark.parametrize("mode", MODES)
def test_audit_records_carry_the_estimated_and_the_actual_cost(spend, mode):
    """The decision record of a request that reserved says what it was estimated to cost; a
    `usage` record, joined by the reservation's digest (never the handle), what its answer cost
    at the model table's prices: gpt-4o, 1,000 prompt and 1,000 output tokens, $0.0125."""
    user = f"usd-{uuid.uuid4().hex[:8]}"
    c = client(spend.envoys[mode], user, **{"x-mock-prompt-tokens": "1000", "x-mock-completion-tokens": "1000"})
    status, _, _ = raw_send(c, model="gpt-4o", max_tokens=1000)
    assert status == 200
    settled(spend.server, "user-usd", user, 0.0)

    def records():
        return [json.loads(line) for line in spend.server.audit.read_text().splitlines() if line.strip()]

    found = {}

    def joined():
        mine = [r for r in records() if r.get("principal", {}).get("id") == user and r.get("spend")]
        if not mine:
            return False
        found["decision"] = mine[-1]
        digest = mine[-1]["spend"]["reservation"]
        usage = [r for r in records() if r["kind"] == "usage" and r["spend"]["reservation"] == digest]
        found["usage"] = usage[-1] if usage else None
        return bool(usage)

    wait_for(joined, "the decision and usage records")
    decision, usage = found["decision"]["spend"], found["usage"]["spend"]
    assert len(decision["reservation"]) == 16
    assert 1000 < decision["estimated_tokens"] < 1020, decision
    assert 0.0100 < decision["estimated_usd"] < 0.0101, decision
    assert usage["tokens"] == 2000 and abs(usage["usd"] - 0.0125) < 1e-9, usage

    def handles(value, key=""):
        if isinstance(value, dict):
            return [h for k, v in value.items() for h in handles(v, k)]
        if isinstance(value, list):
            return [h for v in value for h in handles(v, key)]
        is_hex = isinstance(value, str) and len(value) == 32 and all(ch in "0123456789abcdef" for ch in value)
        return [(key, value)] if is_hex and key != "bundle" else []

    assert not [h for r in records() for h in handles(r)], "a reservation handle in the audit log"


@pytest.mark.parametrize("mode", MODES)
def test_a_query_string_does_not_skip_the_lowering(spend, mode):
    """Azure sends `?api-version=`, Anthropic's SDK `?beta=true`: the path is read as the check
    read it, and the body is lowered all the same."""
    user = f"cap-{uuid.uuid4().hex[:8]}"
    spend.upstream.reset()
    c = openai.OpenAI(base_url=spend.envoys[mode].url("/v1"), api_key="sk-test", max_retries=0,
                      default_query={"api-version": "2024-10-21"},
                      default_headers={**PRO, "x-llm-policy-namespace": "spend", "x-user-id": user})
    status, headers, _ = raw_send(c)
    assert (status, headers.get("x-llm-policy-max-tokens")) == (200, "64")
    (body,) = upstream_bodies(spend.upstream)
    assert body["max_completion_tokens"] == 64, body
