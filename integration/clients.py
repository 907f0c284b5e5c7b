"""The clients the demo, the tests and the benchmarks send requests with: curl, the official
`openai` and `anthropic` SDKs pointed at an Envoy, and what checking their answers takes."""

import concurrent.futures
import json
import subprocess


def curl(url, body=None, headers=None, method="POST"):
    """Runs curl; returns (status, headers dict with lower-case names, body bytes). `body` is
    bytes, text, or a JSON value (sent as JSON)."""
    args = ["curl", "-sS", "-X", method, "-D", "-", "-o", "-", url, "--max-time", "10", "-H", "expect:"]
    for k, v in (headers or {}).items():
        args += ["-H", f"{k}: {v}"]
    if body is not None:
        if not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        if not any(k.lower() == "content-type" for k in (headers or {})):
            args += ["-H", "content-type: application/json"]
        args += ["--data-binary", "@-"]
    raw = subprocess.run(args, input=body, capture_output=True, check=True).stdout
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return status, hdrs, rest


def chat(model, prompt="Say hello", **extra):
    """An OpenAI chat completion body (bytes)."""
    return json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], **extra}).encode()


# The tests' clients are pro-tier users of the example bundle (whose tier rules allow-list the paid
# tiers: no tier is the free tier), sent as a header through the test configurations (`--identity
# trusted-headers`); a test about tiers says otherwise.
PRO = {"x-user-tier": "pro"}


def oai(envoy, **headers):
    """The official OpenAI client through `envoy` as a pro-tier user, no retries."""
    import openai
    return openai.OpenAI(base_url=envoy.url("/v1"), api_key="sk-test", max_retries=0,
                         default_headers={**PRO, **headers})


def claude(envoy, **headers):
    """The official Anthropic client through `envoy` as a pro-tier user, no retries."""
    import anthropic
    return anthropic.Anthropic(base_url=envoy.url(), api_key="sk-ant-test", max_retries=0,
                               default_headers={**PRO, **headers})


def many(fn, n, threads=16):
    """`fn(i)` for i in range(n), on `threads` threads; the results in order."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, range(n)))


def assert_throttled_after(make_client, allowed, total, reason):
    """`total` chat requests from 8 threads (separate connections): exactly `allowed` pass, the
    rest get `RateLimitError` with the counter's headers and the rule's reason."""
    import openai

    def one(_):
        try:
            make_client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            return "ok", None
        except openai.RateLimitError as e:
            return "limited", e

    results = many(one, total, threads=8)
    assert sum(1 for r, _ in results if r == "ok") == allowed
    limited = [e for r, e in results if r == "limited"]
    assert len(limited) == total - allowed
    e = limited[0]
    assert e.status_code == 429
    assert e.response.headers["x-ratelimit-limit"] == str(allowed)
    assert e.response.headers["x-ratelimit-remaining"] == "0"
    # Sliding windows free up a slot (a tenth of the window) at a time: up to an hour and a slot.
    assert 1 <= int(e.response.headers["retry-after"]) <= 3600 + 360 + 1
    assert reason in str(e)


def assert_spellings_and_repeats_change_nothing(stack):
    """Spellings of an API path a lenient upstream may accept are decided as the path they spell,
    and a principal header sent twice is that value once or refused, through `stack`'s Envoy
    (either deployment; the example bundle: gpt-3.5-turbo denied, gpt-4o 402 on the free tier)."""
    stack.upstream.reset()
    for path in ["/v1/chat%2Fcompletions", "/v1/Chat/Completions", "/v1/chat/completions;x=1",
                 "/v1//chat/./completions", "/v1/chat%2fcompletions?x=1"]:
        status, headers, out = curl(stack.envoy.url(path), chat("gpt-3.5-turbo"))
        assert status == 403, f"{path}: {status} {out[:200]}"
        assert json.loads(out)["error"]["message"] == "model is not approved"
    assert stack.upstream.requests() == []
    # The same tier twice is that tier (402 for gpt-4o on the free tier); two tiers are refused.
    args = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", "content-type: application/json",
            "--data-binary", chat("gpt-4o").decode(), stack.envoy.url("/v1/chat/completions")]
    same = subprocess.run(args + ["-H", "x-user-tier: free", "-H", "x-user-tier: free"], capture_output=True, text=True)
    assert same.stdout == "402"
    both = subprocess.run(args + ["-H", "x-user-tier: free", "-H", "x-user-tier: enterprise"], capture_output=True,
                          text=True)
    assert both.stdout == "400"
    assert stack.upstream.requests() == []
