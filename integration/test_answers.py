"""Response rules (issue #16): the model's answers checked through real Envoy 1.40 in both
deployment modes — the filter checking answers in Envoy (`filter+fallback`) and the server's
ext_proc edge (`ext_authz`) — with the official SDKs and raw HTTP, for OpenAI chat, the Responses
API and Anthropic messages, JSON and streamed:

- a secret in the answer, split across 2, 3 and 10 stream chunks (or base64-encoded by the model)
  ends the stream with an error event in the provider's format that the SDK raises; not one byte
  of the secret (not even its prefix) reaches the client;
- a JSON answer with a secret, a named project or a shell call is replaced by an error in the
  provider's format (the rule's status);
- clean answers pass unchanged, JSON and streamed;
- every cut is in the server's audit log (`response` record: rule, where it was cut) and the
  usage of a cut answer is still charged to the budget;
- holding back the window costs the first token at most the window's worth of text (measured).
"""

import base64
import json
import time

import http.client
import urllib.parse

import anthropic
import openai
import pytest

from clients import claude, oai

NS = {"x-llm-policy-namespace": "e2e-answers", "x-team-id": "answers"}
RESEARCH = {"x-llm-policy-namespace": "restricted", "x-team-id": "research", "x-user-id": "r-16"}
# An AWS access key id shape that is no example key (scanners skip the documented one).
SECRET = "AKIA" + "QX7ZB2MLK4RT9VWP"
FILLER = "The weather in Lisbon is mild in spring, with light rain on some afternoons. "


def answer(pieces, **knobs):
    """Headers that make the mock provider answer with `pieces` (one stream event each)."""
    h = {"x-mock-answer": base64.b64encode(json.dumps(pieces).encode()).decode()}
    h.update({f"x-mock-{k.replace('_', '-')}": str(v) for k, v in knobs.items()})
    return h


def split(text, n):
    """`text` in `n` pieces of nearly equal length."""
    step = -(-len(text) // n)
    return [text[i:i + step] for i in range(0, len(text), step)]


def pieces_of(text, size):
    """`text` in pieces of `size` characters (as a model streams it)."""
    return [text[i:i + size] for i in range(0, len(text), size)]


def secret_pieces(n):
    """An answer whose secret comes in `n` pieces, after and before ordinary text in small pieces."""
    return (pieces_of(FILLER * 3, 8) + ["Here is the key you asked for: "] + split(SECRET, n)
            + [" — keep it safe. "] + pieces_of(FILLER * 3, 8))


def streamed_text(raw):
    """The generated text of a raw stream, as the client's SDK would assemble it."""
    out = []
    for event in raw.decode().split("\n\n"):
        for line in event.splitlines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            d = json.loads(line[5:])
            for c in d.get("choices") or []:
                out.append((c.get("delta") or {}).get("content") or "")
            if d.get("type") == "content_block_delta":
                out.append(d["delta"].get("text", ""))
            if d.get("type") == "response.output_text.delta":
                out.append(d["delta"])
    return "".join(out)


def raw_stream(envoy, path, body, headers):
    """POSTs and reads the whole stream as the client receives it (bytes)."""
    url = urllib.parse.urlsplit(envoy.url(path))
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=20)
    try:
        conn.request("POST", url.path, body=json.dumps(body),
                     headers={"content-type": "application/json", "x-user-tier": "pro", **headers})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


CHAT = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "the key?"}]}
MESSAGES = {"model": "claude-sonnet-4-5", "max_tokens": 200, "stream": True,
            "messages": [{"role": "user", "content": "the key?"}]}
RESPONSES = {"model": "gpt-4o", "stream": True, "input": "the key?"}


@pytest.mark.parametrize("proxy", ["stack", "fstack"])
@pytest.mark.parametrize("chunks", [2, 3, 10])
def test_a_secret_split_across_stream_chunks_never_reaches_the_client(proxy, chunks, request):
    s = request.getfixturevalue(proxy)
    knobs = answer(secret_pieces(chunks), delay_ms=2)
    for path, body, headers in [("/v1/chat/completions", CHAT, NS), ("/v1/responses", RESPONSES, NS),
                                ("/v1/messages", MESSAGES, NS), ("/v1/messages", MESSAGES, RESEARCH)]:
        status, raw = raw_stream(s.envoy, path, body, {**headers, **knobs})
        text = raw.decode()
        assert status == 200, text
        assert "AKIA" not in text and SECRET[4:10] not in text, f"{path}: {text}"
        last = text.strip().split("\n\n")[-1]
        data = json.loads(next(line[5:] for line in last.splitlines() if line.startswith("data:")))
        assert "response_denied" in json.dumps(data) or data["error"]["type"] == "permission_error", last
        assert "Lisbon" in streamed_text(raw), "the text before the secret streamed"
    # The SDKs raise the error event, after the text before it.
    got = []
    with pytest.raises(openai.APIError, match="secret"):
        for chunk in oai(s.envoy, **NS, **knobs).chat.completions.create(
                model="gpt-4o", stream=True, messages=[{"role": "user", "content": "the key?"}]):
            got.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert "Lisbon" in "".join(got) and "AKIA" not in "".join(got)
    with pytest.raises(anthropic.APIStatusError, match="personal data or a secret"):
        with claude(s.envoy, **RESEARCH, **knobs).messages.stream(
                model="claude-sonnet-4-5", max_tokens=200, messages=[{"role": "user", "content": "k?"}]) as st:
            for _ in st.text_stream:
                pass
    with pytest.raises(openai.APIError, match="secret"):
        for _ in oai(s.envoy, **NS, **knobs).responses.create(model="gpt-4o", input="k?", stream=True):
            pass


@pytest.mark.parametrize("proxy", ["stack", "fstack"])
def test_a_secret_the_model_encodes_is_still_caught(proxy, request):
    s = request.getfixturevalue(proxy)
    encoded = base64.b64encode(f"aws_access_key_id = {SECRET}".encode()).decode()
    knobs = answer(pieces_of(FILLER * 2, 8) + ["Encoded as you asked: "] + split(encoded, 3) + [". ", FILLER],
                   delay_ms=2)
    _, raw = raw_stream(s.envoy, "/v1/chat/completions", CHAT, {**NS, **knobs})
    assert encoded[:12] not in raw.decode() and b"response_denied" in raw, raw


@pytest.mark.parametrize("proxy", ["stack", "fstack"])
def test_json_answers_are_checked_whole_and_replaced_on_a_deny(proxy, request):
    s = request.getfixturevalue(proxy)
    with pytest.raises(openai.PermissionDeniedError) as e:
        oai(s.envoy, **NS, **answer([f"Sure: {SECRET}"])).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "k?"}])
    assert e.value.body["code"] == "response_denied" and SECRET not in str(e.value.response.text)
    with pytest.raises(openai.APIStatusError) as e:
        oai(s.envoy, **NS, **answer(["The launch of Project  Bluebird", " is next week", " — Project Bluebird."])
            ).responses.create(model="gpt-4o", input="news?")
    assert e.value.status_code == 451, e.value
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        claude(s.envoy, **NS, **answer(["ok"], tool="Bash")).messages.create(
            model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "ls"}])
    assert "shell" in str(e.value)
    with pytest.raises(anthropic.PermissionDeniedError):
        claude(s.envoy, **RESEARCH, **answer(["Card on file: 4111 1111 1111 1111."])).messages.create(
            model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "card?"}])


@pytest.mark.parametrize("proxy", ["stack", "fstack"])
def test_clean_answers_pass_unchanged(proxy, request):
    s = request.getfixturevalue(proxy)
    pieces = [FILLER[i:i + 7] for i in range(0, len(FILLER), 7)] * 4
    text = "".join(pieces)
    knobs = answer(pieces)
    r = oai(s.envoy, **NS, **knobs).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "w"}])
    assert r.choices[0].message.content == text
    streamed = "".join(c.choices[0].delta.content or "" for c in oai(s.envoy, **NS, **knobs).chat.completions.create(
        model="gpt-4o", stream=True, messages=[{"role": "user", "content": "w"}]) if c.choices)
    assert streamed == text
    with claude(s.envoy, **RESEARCH, **knobs).messages.stream(
            model="claude-sonnet-4-5", max_tokens=200, messages=[{"role": "user", "content": "w"}]) as st:
        assert "".join(st.text_stream) == text
    events = [e for e in oai(s.envoy, **NS, **knobs).responses.create(model="gpt-4o", input="w", stream=True)]
    assert events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text


def audit_records(server, kind):
    if not server.audit.exists():
        return []
    return [r for r in map(json.loads, server.audit.read_text().splitlines()) if r.get("kind") == kind]


@pytest.mark.parametrize("proxy", ["stack", "fstack"])
def test_cuts_are_audited_and_the_usage_up_to_the_cut_is_charged(proxy, request):
    s = request.getfixturevalue(proxy)
    team = f"cut{proxy}"
    key = f"e2e-answers/team-tokens/{team}"
    before = (s.server.counter(key) or {}).get("spent", 0)
    rid = f"rid-{proxy}-{time.time_ns()}"
    knobs = answer(secret_pieces(3), delay_ms=2, completion_tokens=40, prompt_tokens=11)
    status, raw = raw_stream(s.envoy, "/v1/chat/completions", CHAT,
                             {**NS, "x-team-id": team, "x-request-id": rid, **knobs})
    assert status == 200 and b"response_denied" in raw
    # The stream ran to its end upstream: its usage (11 + 40) is charged, cut or not.
    spent = s.server.settled(key, before)["spent"]
    assert spent - before == pytest.approx(51, abs=1), spent - before
    deadline = time.time() + 10
    while time.time() < deadline:
        mine = [r for r in audit_records(s.server, "response") if r.get("request_id") == rid]
        if mine:
            break
        time.sleep(0.2)
    assert mine, "no response record"
    r = mine[0]
    assert r["matched_rules"] == ["no-secrets-out"] and r["decision"] == "deny"
    assert r["namespace"] == "e2e-answers" and r["cut"]["stream"] is True
    assert r["cut"]["by"] == ("filter" if proxy == "fstack" else "server")
    sent_before_secret = len((FILLER * 3 + "Here is the key you asked for: ").encode())
    assert 0 < r["cut"]["text_sent"] < sent_before_secret < r["cut"]["text_read"], r["cut"]
    assert SECRET not in json.dumps(r)


@pytest.mark.parametrize("proxy", ["stack", "fstack"])
def test_holding_back_costs_the_first_token_at_most_the_window(proxy, request):
    """Time to the first token through Envoy, with response rules (a 128-byte window) and without
    (the default namespace), the provider streaming 4-byte pieces every 10 ms."""
    s = request.getfixturevalue(proxy)
    pieces = ["abcd"] * 80
    knobs = answer(pieces, delay_ms=10)

    def ttft(headers):
        best = None
        for _ in range(3):
            t0 = time.perf_counter()
            stream = oai(s.envoy, **headers, **knobs).chat.completions.create(
                model="gpt-4o", stream=True, messages=[{"role": "user", "content": "w"}])
            for c in stream:
                if c.choices and c.choices[0].delta.content:
                    t = time.perf_counter() - t0
                    break
            stream.close()
            best = t if best is None else min(best, t)
        return best

    plain = ttft({})
    held = ttft(NS)
    window_events = 128 // 4
    print(f"\n[{proxy}] TTFT without response rules {plain * 1000:.0f} ms, with a 128-byte window "
          f"{held * 1000:.0f} ms (+{(held - plain) * 1000:.0f} ms; the window is {window_events} pieces "
          f"of 10 ms = {window_events * 10} ms)")
    # At most the window's pieces (and one being checked) later, with scheduling slack.
    assert held - plain <= (window_events + 2) * 0.010 + 0.25
    assert held - plain >= (window_events - 4) * 0.010, "the window is held back"


def test_both_modes_send_the_same_bytes(stack, fstack):
    """Parity: the filter and the server's ext_proc edge run the same guard, so a client receives
    the same bytes from either, cut or clean (the mock's timestamps aside)."""
    import re

    def norm(raw):
        return re.sub(rb'"created(_at)?": ?\d+', b'"created": 0', raw)

    cases = [("/v1/chat/completions", CHAT, answer(secret_pieces(3), delay_ms=2)),
             ("/v1/messages", MESSAGES, answer(secret_pieces(10), delay_ms=2)),
             ("/v1/responses", RESPONSES, answer(secret_pieces(2), delay_ms=2)),
             ("/v1/chat/completions", CHAT, answer(pieces_of(FILLER * 4, 5), delay_ms=1)),
             ("/v1/chat/completions", {**CHAT, "stream": False}, answer([f"k={SECRET}"]))]
    for path, body, knobs in cases:
        a = raw_stream(stack.envoy, path, body, {**NS, **knobs})
        b = raw_stream(fstack.envoy, path, body, {**NS, **knobs})
        assert a[0] == b[0] and norm(a[1]) == norm(b[1]), (path, a, b)
