"""Capture real request shapes from the official OpenAI and Anthropic Python SDKs.

Each case calls the SDK's own `create()` method; an httpx MockTransport captures the HTTP request
the SDK would send (nothing leaves the process) and writes it as a request file in the
`llm-policy eval` format. The Rust tests in shared-core/tests/sdk_shapes.rs read these files, so
extraction is tested on what the SDKs really send, not on shapes written from memory.

It also writes text-fields.json: one captured request per free-text string leaf of the SDKs'
request parameter types, each with a canary at that leaf (see text_fields.py).

Usage: python generate.py OUT_DIR   (make sdk-fixtures; make test checks the committed files)
"""

import json
import pathlib
import sys
import warnings

import anthropic
import openai

from sdk_capture import ant, capture, oai
import text_fields


IMAGE = "data:image/png;base64,iVBORw0KGgo="

CASES = {
    "openai-chat-parts-tools-stream": (oai, lambda c: c.chat.completions.create(
        model="gpt-4o",
        messages=[
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}},
            ]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\": \"x\"}"}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "lookup result"},
        ],
        tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}],
        max_completion_tokens=300,
        temperature=0.2,
        stream=True,
        stream_options={"include_usage": True},
        user="end-user-9",
    )),
    "openai-chat-plain": (oai, lambda c: c.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=50,
        safety_identifier="hashed-user-5",
    )),
    "openai-completions": (oai, lambda c: c.completions.create(
        model="gpt-3.5-turbo-instruct", prompt=["one", "two"], max_tokens=7,
    )),
    "openai-embeddings": (oai, lambda c: c.embeddings.create(
        model="text-embedding-3-small", input=["embed me", "and me"],
    )),
    "openai-responses-items": (oai, lambda c: c.responses.create(
        model="o3-mini",
        instructions="You are a support bot.",
        input=[
            {"role": "user", "content": [
                {"type": "input_text", "text": "look at this"},
                {"type": "input_image", "image_url": IMAGE, "detail": "auto"},
            ]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "tool says hi"},
        ],
        tools=[{"type": "web_search_preview"}, {"type": "function", "name": "get_weather", "parameters": {}, "strict": False}],
        max_output_tokens=200,
    )),
    "openai-responses-string": (oai, lambda c: c.responses.create(model="gpt-4o", input="Tell me a joke", stream=True)),
    "anthropic-messages-blocks": (ant, lambda c: c.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=1024,
        system=[{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        metadata={"user_id": "u-77"},
        tools=[{"name": "get_weather", "description": "weather", "input_schema": {"type": "object", "properties": {}}}],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            ]},
        ],
    )),
    "anthropic-messages-stream": (ant, lambda c: c.messages.create(
        model="claude-3-5-haiku-latest",
        max_tokens=2048,
        system="Be kind.",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
    )),
}


def main():
    warnings.simplefilter("ignore", DeprecationWarning)  # model deprecation notices
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, (client, call) in CASES.items():
        req = capture(client, call)
        (out / f"{name}.json").write_text(json.dumps(req, indent=2, sort_keys=True) + "\n")
    tf = text_fields.cases()
    (out / "text-fields.json").write_text(json.dumps(tf, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(CASES)} fixtures and {len(tf)} text-field cases to {out} (openai {openai.__version__}, anthropic {anthropic.__version__})")


if __name__ == "__main__":
    main()
