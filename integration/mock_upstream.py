"""A loopback stand-in for the OpenAI and Anthropic APIs: the one fake in the end-to-end tests.

It answers chat completions (`/v1/chat/completions`), Anthropic messages (`/v1/messages`) and
embeddings, plain or streamed (server-sent events, as the real APIs stream), and records every
request that reaches it, byte for byte, so tests can prove what Envoy let through and what it
did not.

    python3 mock_upstream.py PORT

Test hooks: `GET /__requests` lists what arrived (base64 bodies), `POST /__reset` forgets it.
Request headers shape an answer (the provider's behaviour a test needs; a real provider ignores
them): `x-mock-prompt-tokens` / `x-mock-completion-tokens` set the usage it reports (default 9 /
6; the completion never above the request's `max_tokens`, as a real provider answers), `x-mock-cached-tokens` the cached part of the prompt, `x-mock-no-usage: 1` leaves usage out
(as some providers and proxies do), `x-mock-pieces: N` streams N text pieces, and
`x-mock-cut-after: K` drops the connection after K stream events (a cut stream). An OpenAI stream
carries its usage chunk only when the request asks (`stream_options.include_usage`), as the real
API does. What the model answers: `x-mock-answer` is the base64 of a JSON list of text pieces
(the answer's text, one stream event per piece, each written and flushed on its own),
`x-mock-tool` names a tool the model calls, `x-mock-finish` is the finish reason, and
`x-mock-delay-ms` waits before each stream event (time to first token). `x-mock-echo: N` answers
with the last user text as it arrived, in pieces of N characters (a model repeating what it was
told). The Responses API (`/v1/responses`) is answered too, JSON and streamed.
"""

import base64
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
SEEN = []


def usage_of(knobs, req):
    """(prompt, completion, cached) tokens the answer reports: the completion never above the
    request's output cap, as a real provider answers."""
    completion = int(knobs.get("x-mock-completion-tokens", 6))
    caps = [req.get(k) for k in ("max_tokens", "max_completion_tokens", "max_output_tokens")]
    caps = [c for c in caps if isinstance(c, int) and not isinstance(c, bool)]
    if caps:
        completion = min([completion] + caps)
    return (int(knobs.get("x-mock-prompt-tokens", 9)), completion, int(knobs.get("x-mock-cached-tokens", 0)))


def pieces_of(knobs, default):
    answer = knobs.get("x-mock-answer")
    if answer is not None:
        return json.loads(base64.b64decode(answer))
    n = knobs.get("x-mock-pieces")
    return default if n is None else [f" word{i}" for i in range(int(n))]


def last_user_text(req):
    """The last user text of a chat, messages or responses request, as it arrived."""
    def text(content):
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(b.get("text", "") for b in content if isinstance(b, dict))
        return ""
    turns = [m for m in req.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    if turns:
        return text(turns[-1].get("content"))
    given = req.get("input")
    if isinstance(given, list):
        turns = [m for m in given if isinstance(m, dict) and m.get("role", "user") == "user"]
        return text(turns[-1].get("content")) if turns else ""
    return text(given)


def openai_responses(req, stream, knobs):
    model = req.get("model", "gpt-4o")
    prompt, completion, _ = usage_of(knobs, req)
    pieces = pieces_of(knobs, ["Hello", " from", " the", " mock", " upstream."])
    text = "".join(pieces)
    tool = knobs.get("x-mock-tool")
    output = [{"type": "message", "id": "msg_mock", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}]
    if tool:
        output.append({"type": "function_call", "id": "fc_mock", "call_id": "call_mock", "name": tool,
                       "arguments": "{}", "status": "completed"})
    response = {"id": "resp_mock", "object": "response", "created_at": int(time.time()), "model": model,
                "status": "completed", "error": None, "incomplete_details": None,
                "instructions": req.get("instructions"), "output": output,
                "usage": {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion}}
    if not stream:
        return response
    created = {**response, "status": "in_progress", "output": [], "usage": None}
    events = [("response.created", {"type": "response.created", "sequence_number": 0, "response": created})]
    for piece in pieces:
        events.append(("response.output_text.delta", {"type": "response.output_text.delta", "item_id": "msg_mock",
                                                      "output_index": 0, "content_index": 0, "delta": piece,
                                                      "sequence_number": len(events), "logprobs": []}))
    events.append(("response.completed", {"type": "response.completed", "sequence_number": len(events),
                                           "response": response}))
    return events


def openai_chat(req, stream, knobs):
    model = req.get("model", "gpt-4o")
    created = int(time.time())
    prompt, completion, cached = usage_of(knobs, req)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    no_usage = knobs.get("x-mock-no-usage") == "1"
    if not stream:
        return {
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant",
                                "content": "".join(pieces_of(knobs, ["Hello from the mock upstream."])),
                                **tool_calls(knobs)},
                    "finish_reason": knobs.get("x-mock-finish", "stop"),
                    "logprobs": None,
                }
            ],
            **({} if no_usage else {"usage": usage}),
        }
    include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
    chunks = []
    for i, piece in enumerate(pieces_of(knobs, ["Hello", " from", " the", " mock", " upstream."])):
        delta = {"content": piece}
        if i == 0:
            delta["role"] = "assistant"
        chunks.append(
            {
                "id": "chatcmpl-mock",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}],
            }
        )
    if knobs.get("x-mock-tool"):
        chunks.append({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": 0, "delta": tool_calls(knobs), "finish_reason": None, "logprobs": None}]})
    chunks.append(
        {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": knobs.get("x-mock-finish", "stop"), "logprobs": None}],
        }
    )
    if include_usage:
        for c in chunks:
            c["usage"] = None
        if not no_usage:
            chunks.append({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": created,
                           "model": model, "choices": [], "usage": usage})
    return [("", c) for c in chunks] + [("", "[DONE]")]


def tool_calls(knobs):
    """The OpenAI `tool_calls` of a message or delta calling `x-mock-tool`, if asked."""
    tool = knobs.get("x-mock-tool")
    if not tool:
        return {}
    return {"tool_calls": [{"index": 0, "id": "call_mock", "type": "function",
                            "function": {"name": tool, "arguments": "{}"}}]}


def anthropic_message(req, stream, knobs):
    model = req.get("model", "claude-sonnet-4-5")
    text = "".join(pieces_of(knobs, ["Hello from the mock upstream."]))
    prompt, completion, cached = usage_of(knobs, req)
    no_usage = knobs.get("x-mock-no-usage") == "1"
    usage = {"input_tokens": prompt - cached, "output_tokens": completion}
    if cached:
        usage["cache_read_input_tokens"] = cached
    if not stream:
        return {
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}]
            + ([{"type": "tool_use", "id": "toolu_mock", "name": knobs["x-mock-tool"], "input": {}}]
               if knobs.get("x-mock-tool") else []),
            "stop_reason": knobs.get("x-mock-finish", "end_turn"),
            "stop_sequence": None,
            **({} if no_usage else {"usage": usage}),
        }
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            **({} if no_usage else {"usage": {**usage, "output_tokens": 1}}),
        },
    }
    events = [("message_start", start)]
    events.append(("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}))
    for piece in pieces_of(knobs, ["Hello", " from the", " mock upstream."]):
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}))
    events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
    if knobs.get("x-mock-tool"):
        block = {"type": "tool_use", "id": "toolu_mock", "name": knobs["x-mock-tool"], "input": {}}
        events.append(("content_block_start", {"type": "content_block_start", "index": 1, "content_block": block}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": 1}))
    events.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": knobs.get("x-mock-finish", "end_turn"), "stop_sequence": None}, **({} if no_usage else {"usage": {"output_tokens": completion}})}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, status, value):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_events(self, events, cut_after=None, delay=0.0):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i, (name, data) in enumerate(events):
            if delay:
                time.sleep(delay)
            if cut_after is not None and i >= cut_after:
                # A cut stream: the connection drops mid-answer, no terminating chunk.
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            payload = data if isinstance(data, str) else json.dumps(data)
            frame = (f"event: {name}\n" if name else "") + f"data: {payload}\n\n"
            raw = frame.encode()
            self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def do_GET(self):
        if self.path == "/__requests":
            with LOCK:
                self.send_json(200, list(SEEN))
            return
        if self.path.startswith("/v1/models"):
            self.send_json(200, {"object": "list", "data": []})
            return
        self.send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path == "/__reset":
            with LOCK:
                SEEN.clear()
            self.send_json(200, {"reset": True})
            return
        with LOCK:
            SEEN.append(
                {
                    "method": "POST",
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": base64.b64encode(body).decode(),
                }
            )
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            req = {}
        stream = bool(req.get("stream"))
        path = self.path.split("?")[0]
        knobs = {k.lower(): v for k, v in self.headers.items() if k.lower().startswith("x-mock-")}
        if knobs.get("x-mock-echo"):
            said, n = last_user_text(req), int(knobs["x-mock-echo"])
            pieces = [said[i:i + n] for i in range(0, len(said), n)] or [""]
            knobs["x-mock-answer"] = base64.b64encode(json.dumps(pieces).encode()).decode()
        if path.endswith("/chat/completions"):
            out = openai_chat(req, stream, knobs)
        elif path.endswith("/messages"):
            out = anthropic_message(req, stream, knobs)
        elif path.endswith("/responses"):
            out = openai_responses(req, stream, knobs)
        elif path.endswith("/embeddings"):
            out = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.1]}], "model": req.get("model"), "usage": {"prompt_tokens": 2, "total_tokens": 2}}
            stream = False
        else:
            self.send_json(404, {"error": {"message": f"no route {path}", "type": "invalid_request_error"}})
            return
        if stream:
            cut = knobs.get("x-mock-cut-after")
            delay = float(knobs.get("x-mock-delay-ms", 0)) / 1000
            self.send_events(out, int(cut) if cut is not None else None, delay)
        else:
            self.send_json(200, out)


def main():
    port = int(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"mock upstream on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
