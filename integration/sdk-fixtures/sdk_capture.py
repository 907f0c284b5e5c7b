"""Run an official SDK call against an httpx MockTransport and return the HTTP request it built.

Nothing leaves the process: the transport's handler records the request and aborts the call.
Shared by generate.py (the request-shape fixtures) and text_fields.py (the text-field canaries).
"""

import json

import anthropic
import httpx2 as httpx
import openai

# Headers that depend on the machine or SDK build are dropped so the files are reproducible.
KEEP_HEADERS = {"content-type", "anthropic-version", "x-user-id", "x-user-tier", "x-team-id"}


class Captured(Exception):
    pass


def capture_request(make_client, call) -> httpx.Request:
    """The httpx.Request the SDK sends for `call(client)`, all headers and the URL included."""
    seen = {}

    def handler(request: httpx.Request):
        seen["request"] = request
        raise Captured()

    client = make_client(httpx.Client(transport=httpx.MockTransport(handler)))
    try:
        call(client)
    except (Captured, openai.APIConnectionError, anthropic.APIConnectionError):
        pass
    return seen["request"]


def as_fixture(req: httpx.Request) -> dict:
    """A captured request in the `llm-policy eval` request-file format."""
    headers = {k: v for k, v in req.headers.items() if k.lower() in KEEP_HEADERS}
    return {
        "method": req.method,
        "path": req.url.path,
        "headers": headers,
        "body": json.loads(req.content) if req.content else None,
    }


def capture(make_client, call):
    return as_fixture(capture_request(make_client, call))


def oai(http_client):
    return openai.OpenAI(
        api_key="sk-test",
        base_url="http://llm.test/v1",
        http_client=http_client,
        max_retries=0,
        default_headers={"x-user-id": "u-1", "x-user-tier": "pro"},
    )


def ant(http_client):
    return anthropic.Anthropic(
        api_key="sk-ant-test",
        base_url="http://llm.test",
        http_client=http_client,
        max_retries=0,
        default_headers={"x-user-id": "u-2", "x-team-id": "research"},
    )
