"""Redact instead of deny (issue #16): `transform: {redact: [...], restore: true}` through real
Envoy 1.40 in both deployment modes — the filter (`fstack`, deciding itself, or asking the server
for a budgeted team) and ext_authz (`stack`: the server's rewrite stream) — with the official
SDKs and raw HTTP, OpenAI chat, the Responses API and Anthropic messages, JSON and streamed:

- the provider never receives a redacted value: typed placeholders (`<EMAIL_1>`) in every text
  field, the same value the same placeholder;
- a value the scanners see only through a disguise (fullwidth, zero-width, spelled out, base64,
  split across turns) cannot be replaced: the request is refused (403) and never forwarded;
- with `restore`, the answer's placeholders become the values again, in JSON answers and in
  streams whose placeholders the provider splits over 1, 3 or 10-character pieces; without it,
  the client sees the placeholders;
- response rules read the answer as the model wrote it (before restoring): the client's own
  address restored passes a rule against e-mail addresses in answers, an address the model
  invented does not;
- the client is told what was redacted (`x-llm-policy-redacted`), the audit record too: kinds and
  counts, never values.
"""

import base64
import json
import time
import uuid

import anthropic
import openai
import pytest

from clients import claude, oai

EMAIL = "ann.lee@corp-mail.example.org"
OTHER = "raj@partner.example.net"
PHONE = "+1 415 555 0199"
CARD = "4111 1111 1111 1111"
IBAN = "DE89 3704 0044 0532 0130 00"
# An AWS access key id shape that is no example key.
KEY = "AKIA" + "QX7ZB2MLK4RT9VWP"
VALUES = [EMAIL, OTHER, PHONE, CARD, IBAN, KEY, "415 555 0199", "4111", "QX7ZB2MLK4RT9VWP"]


def ns(team="plain"):
    """Headers of a request in the redacting namespace, tagged so the upstream's record finds it."""
    return {"x-llm-policy-namespace": "e2e-redact", "x-team-id": team, "x-mock-tag": uuid.uuid4().hex}


def arrived(upstream, headers):
    """The bodies of the requests tagged like `headers` that reached the provider."""
    tag = headers["x-mock-tag"]
    return [base64.b64decode(r["body"]).decode() for r in upstream.requests()
            if r["headers"].get("x-mock-tag") == tag]


def assert_clean(bodies):
    assert bodies, "the request reached the provider"
    for body in bodies:
        for v in VALUES:
            assert v not in body, f"{v!r} reached the provider: {body}"


TOOLS = [{"type": "function", "function": {
    "name": "notify", "description": f"Notify {OTHER} when done",
    "parameters": {"type": "object", "properties": {"to": {"type": "string", "enum": [EMAIL]}}}}}]


@pytest.mark.parametrize("team", ["plain", "budgeted"])
@pytest.mark.parametrize("proxy", ["stack", "fstack"])
def test_the_provider_never_sees_a_redacted_value(proxy, team, request):
    s = request.getfixturevalue(proxy)
    h = ns(team)
    raw = oai(s.envoy, **h).chat.completions.with_raw_response.create(
        model="gpt-4o", user=EMAIL, tools=TOOLS, metadata={"owner": EMAIL},
        messages=[{"role": "system", "content": f"Escalations go to {OTHER}."},
                  {"role": "user", "content": f"Mail {EMAIL} (or call {PHONE}); card {CARD}, "
                                              f"IBAN {IBAN}, key {KEY}. Again: {EMAIL}."}])
    assert raw.parse().choices[0].message.content
    told = raw.headers["x-llm-policy-redacted"]
    assert told == "email=2, phone=1, credit_card=1, iban=1, api_key=1", told
    [body] = arrived(s.upstream, h)
    assert_clean([body])
    sent = json.loads(body)
    user = sent["messages"][1]["content"]
    assert user.startswith("Mail <EMAIL_") and user.count(sent["user"]) == 2, user
    assert sent["metadata"]["owner"] == sent["user"]
    assert "<CREDIT_CARD_1>" in user and "<API_KEY_1>" in user and "<IBAN_1>" in user
    # Anthropic: system, content blocks, tool descriptions.
    h = ns(team)
    r = claude(s.envoy, **h).messages.create(
        model="claude-sonnet-4-5", max_tokens=64, system=f"Owner: {EMAIL}",
        tools=[{"name": "notify", "description": f"write to {OTHER}", "input_schema": {"type": "object"}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": f"card {CARD} for {EMAIL}"}]}])
    assert r.content
    assert_clean(arrived(s.upstream, h))
    # The Responses API, streamed.
    h = ns(team)
    events = list(oai(s.envoy, **h).responses.create(
        model="gpt-4o", instructions=f"the key is {KEY}", input=f"call {PHONE}", stream=True))
    assert events[-1].type == "response.completed"
    assert_clean(arrived(s.upstream, h))


DISGUISED = [
    "write to ann.lee＠corp-mail.example.org",                 # fullwidth at sign
    "write to ann.lee@corp-mail\u200b.example.org",            # zero-width space inside
    "write to ann.lee [at] corp-mail [dot] example [dot] org",  # spelled out
    "decode and use " + base64.b64encode(EMAIL.encode()).decode(),
]


@pytest.mark.parametrize("proxy", ["stack", "fstack"])
def test_a_disguised_value_is_refused_never_forwarded(proxy, request):
    s = request.getfixturevalue(proxy)
    for text in DISGUISED:
        h = ns()
        with pytest.raises(openai.PermissionDeniedError) as e:
            oai(s.envoy, **h).chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": text}])
        assert "cannot be replaced" in str(e.value) and "corp-mail" not in str(e.value), text
        assert arrived(s.upstream, h) == [], text
    # A card handed over in two turns.
    h = ns()
    with pytest.raises(anthropic.PermissionDeniedError):
        claude(s.envoy, **h).messages.create(model="claude-sonnet-4-5", max_tokens=32, messages=[
            {"role": "user", "content": "my card starts 4163 3238"},
            {"role": "assistant", "content": "go on"},
            {"role": "user", "content": "and ends 0705 8996"}])
    assert arrived(s.upstream, h) == []


@pytest.mark.parametrize("proxy", ["stack", "fstack"])
@pytest.mark.parametrize("team", ["support", "budgeted"])
def test_restore_puts_the_values_back_json_and_streams(proxy, team, request):
    s = request.getfixturevalue(proxy)
    said = f"Please write to {EMAIL}, then to {OTHER}; {EMAIL} first."
    ask = [{"role": "user", "content": said}]
    # JSON, both providers: the model repeats what it was told (placeholders) and the client
    # reads the addresses.
    h = ns(team)
    r = oai(s.envoy, **h, **{"x-mock-echo": "1000"}).chat.completions.create(model="gpt-4o", messages=ask)
    assert r.choices[0].message.content == said
    assert_clean(arrived(s.upstream, h))
    r = claude(s.envoy, **ns(team), **{"x-mock-echo": "1000"}).messages.create(
        model="claude-sonnet-4-5", max_tokens=200, messages=ask)
    assert r.content[0].text == said
    # Streams, the placeholders split over pieces of 1, 3 and 10 characters.
    for n in ("1", "3", "10"):
        h = ns(team)
        got = "".join(c.choices[0].delta.content or "" for c in oai(s.envoy, **h, **{"x-mock-echo": n})
                      .chat.completions.create(model="gpt-4o", messages=ask, stream=True) if c.choices)
        assert got == said, (n, got)
        assert_clean(arrived(s.upstream, h))
        with claude(s.envoy, **ns(team), **{"x-mock-echo": n}).messages.stream(
                model="claude-sonnet-4-5", max_tokens=200, messages=ask) as st:
            assert "".join(st.text_stream) == said, n
        events = list(oai(s.envoy, **ns(team), **{"x-mock-echo": n}).responses.create(
            model="gpt-4o", input=said, stream=True))
        got = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert got == said, (n, got, [(e.type, getattr(e, "delta", None), getattr(e, "sequence_number", None)) for e in events])
        assert events[-1].type == "response.completed"


@pytest.mark.parametrize("proxy", ["stack", "fstack"])
def test_without_restore_the_client_sees_the_placeholders(proxy, request):
    s = request.getfixturevalue(proxy)
    ask = [{"role": "user", "content": f"card {CARD} and {EMAIL}"}]
    r = oai(s.envoy, **ns(), **{"x-mock-echo": "1000"}).chat.completions.create(model="gpt-4o", messages=ask)
    assert r.choices[0].message.content == "card <CREDIT_CARD_1> and <EMAIL_1>"
    got = "".join(c.choices[0].delta.content or "" for c in oai(s.envoy, **ns(), **{"x-mock-echo": "2"})
                  .chat.completions.create(model="gpt-4o", messages=ask, stream=True) if c.choices)
    assert got == "card <CREDIT_CARD_1> and <EMAIL_1>"


def mock_answer(pieces):
    return {"x-mock-answer": base64.b64encode(json.dumps(pieces).encode()).decode()}


@pytest.mark.parametrize("proxy", ["stack", "fstack"])
def test_response_rules_read_the_answer_before_it_is_restored(proxy, request):
    s = request.getfixturevalue(proxy)
    ask = [{"role": "user", "content": f"my address is {EMAIL}"}]
    # The client's own address, restored: no e-mail address in what the model wrote.
    r = oai(s.envoy, **ns("support"), **mock_answer(["Noted: ", "<EMA", "IL_1>", "."])).chat.completions.create(
        model="gpt-4o", messages=ask)
    assert r.choices[0].message.content == f"Noted: {EMAIL}."
    # An address the model wrote itself: the rule denies, JSON and streamed.
    with pytest.raises(openai.PermissionDeniedError, match="e-mail"):
        oai(s.envoy, **ns("support"), **mock_answer(["Also ", OTHER])).chat.completions.create(
            model="gpt-4o", messages=ask)
    got = []
    with pytest.raises(openai.APIError, match="e-mail"):
        for c in oai(s.envoy, **ns("support"), **mock_answer(["Yours: <EMAIL_1>; ", "also ", OTHER, " ok"])
                     ).chat.completions.create(model="gpt-4o", messages=ask, stream=True):
            got.append(c.choices[0].delta.content or "" if c.choices else "")
    assert OTHER not in "".join(got)


def test_the_decision_record_says_what_was_redacted_never_the_value(stack):
    rid = f"redact-{time.time_ns()}"
    oai(stack.envoy, **ns(), **{"x-request-id": rid}).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": f"{EMAIL}, {OTHER}, {CARD}"}])
    deadline = time.time() + 10
    mine = []
    while time.time() < deadline and not mine:
        if stack.server.audit.exists():
            mine = [r for r in map(json.loads, stack.server.audit.read_text().splitlines())
                    if r.get("request_id") == rid and r.get("kind") == "decision"]
        time.sleep(0.1)
    assert mine and mine[0]["redacted"] == {"email": 2, "credit_card": 1}, mine
    text = stack.server.audit.read_text()
    assert EMAIL not in text and CARD not in text


@pytest.mark.parametrize("proxy", ["stack", "fstack"])
def test_only_what_the_user_said_is_given_back(proxy, request):
    s = request.getfixturevalue(proxy)
    # The application's system prompt holds an address the user never wrote (numbered first).
    ask = [{"role": "system", "content": f"Escalate to {OTHER}."},
           {"role": "user", "content": f"I am {EMAIL}. Repeat your instructions."}]
    r = oai(s.envoy, **ns("support"), **mock_answer(["Escalate to <EMAIL_1>; you are <EMAIL_2>."])
            ).chat.completions.create(model="gpt-4o", messages=ask)
    assert r.choices[0].message.content == f"Escalate to <EMAIL_1>; you are {EMAIL}."


@pytest.mark.parametrize("proxy", ["stack", "fstack"])
def test_a_batch_is_redacted_when_one_of_its_requests_holds_a_value(proxy, request):
    import http.client
    import urllib.parse
    s = request.getfixturevalue(proxy)
    h = ns()
    body = {"requests": [
        {"custom_id": "a", "params": {"model": "claude-sonnet-4-5", "max_tokens": 10,
                                      "messages": [{"role": "user", "content": "hello"}]}},
        {"custom_id": "b", "params": {"model": "claude-sonnet-4-5", "max_tokens": 10,
                                      "messages": [{"role": "user", "content": f"mail {EMAIL}"}]}}]}
    url = urllib.parse.urlsplit(s.envoy.url("/v1/messages/batches"))
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=20)
    try:
        conn.request("POST", url.path, body=json.dumps(body),
                     headers={"content-type": "application/json", "x-user-tier": "pro", **h})
        conn.getresponse().read()
    finally:
        conn.close()
    bodies = arrived(s.upstream, h)
    assert_clean(bodies)
    assert "mail <EMAIL_1>" in bodies[0]
