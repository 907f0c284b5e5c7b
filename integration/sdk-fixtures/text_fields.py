"""Every free-text string leaf of the SDKs' request parameter types, each captured with a canary.

Why: the policy engine puts every string the model reads into `request.prompt`. Hand-written
fixtures only cover the fields someone thought of; when an SDK release adds a text field (a new
content block, a new tool with a description, ...), extraction would silently miss it. This module
walks the official SDKs' request parameter TypedDicts (the `*Params` types behind the `create()`
methods), finds every leaf that can hold an arbitrary string, and for each one captures the request
the real SDK sends with a unique canary at that leaf. The Rust side (shared-core tests) loads
text-fields.json and checks, per leaf, that the canary reaches `request.prompt` — or that the leaf is
on its list of fields classified as "not text, because ...". A field new to the SDK has no
classification and fails that test.

What counts as a leaf:
  * kind "str": a value typed `str` (also `Union[str, <Literal alias>]`, e.g. model names).
    `Literal` values, bool/int/float, bytes/file types, datetimes are not free text.
  * kind "json": a value typed as arbitrary JSON (`object`, `Dict[str, object]`, `Dict[str, str]`,
    function parameters / JSON schemas, metadata maps). The canary goes in as a string value
    (`{"canary_key": CANARY}`); a second entry with field suffix `{key}` puts it in as a key
    (`{CANARY: "x"}`). Maps whose values cannot hold a string (`Dict[str, int]`) get only `{key}`;
    maps with typed values (`Dict[str, Union[str, SomeParam]]`) get `{key}` and their values are
    walked under `{}`.

Field paths: `.` between keys, `[]` for a list item, and where a value is a union of TypedDicts
told apart by a Literal key, that key in brackets instead (`messages[role=user].content[type=text]
.text`, `tools[type=web_search_20250305].name`); wire names (aliases) are used, not Python names.

The request around a leaf is minimal: the required keys of every enclosing TypedDict with minimal
values, the method's own required arguments (model, messages, input, ...), and the canary at the
target (one element where it sits in a list). Path parameters (thread_id) go to the URL, header
parameters (betas, workspace_id, ...) are not body leaves and are reported, not emitted.

`cases()` returns the entries sorted by (api, field, kind); canaries are numbered in that order, so
the output is the same on every run for the same SDK versions.
"""

import collections.abc
import datetime
import json
import os
import sys
import types
import typing

import openai.resources.beta
import pydantic
import typing_extensions as te
from anthropic.types import message_count_tokens_params as ant_count_params
from anthropic.types import message_create_params as ant_create_params
from anthropic.types.beta import message_create_params as ant_beta_create_params
from anthropic.types.messages import batch_create_params as ant_batch_params
from openai.types import completion_create_params as oai_completion_params
from openai.types import embedding_create_params as oai_embedding_params
from openai.types.chat import completion_create_params as oai_chat_params
from openai.types.responses import response_create_params as oai_responses_params

from sdk_capture import ant, as_fixture, capture_request, oai

MAX_DEPTH = 10  # keys on a path; also what keeps the walk finite besides the cycle guard
BATCH_DEPTH = 7  # anthropic batches repeat messages.create under requests[].params: walk it less deep

# Keyword arguments of the create() methods that configure the HTTP call, not the body.
TRANSPORT_ARGS = {"extra_headers", "extra_query", "extra_body", "timeout", "betas", "stream"}

# Discriminator keys tried first when naming the members of a union of TypedDicts.
DISCRIMINATORS = ("type", "role")

OAI_MODEL = "gpt-4o"
ANT_MODEL = "claude-sonnet-4-5"

# Values used for required keys of these names wherever they are filled in (instead of "x" / 1).
OAI_FILL = {"model": OAI_MODEL, "messages": [{"role": "user", "content": "x"}]}
ANT_FILL = {"model": ANT_MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "x"}]}


def _apis():
    """(api name, client factory, params TypedDict, call(client, kwargs), fill, top-level extras, depth)."""
    from openai.types.beta import thread_create_and_run_params, thread_create_params
    from openai.types.beta.threads import message_create_params, run_create_params

    try:
        from openai.types.beta import assistant_create_params
    except ImportError:
        assistant_create_params = None

    apis = [
        ("openai.chat.completions", oai, oai_chat_params.CompletionCreateParamsBase,
         lambda c, kw: c.chat.completions.create(**kw), OAI_FILL, {}, MAX_DEPTH),
        ("openai.completions", oai, oai_completion_params.CompletionCreateParamsBase,
         lambda c, kw: c.completions.create(**kw), OAI_FILL, {"prompt": "x"}, MAX_DEPTH),
        ("openai.embeddings", oai, oai_embedding_params.EmbeddingCreateParams,
         lambda c, kw: c.embeddings.create(**kw), OAI_FILL, {"input": "x"}, MAX_DEPTH),
        ("openai.responses", oai, oai_responses_params.ResponseCreateParamsBase,
         lambda c, kw: c.responses.create(**kw), OAI_FILL, {"model": OAI_MODEL, "input": "x"}, MAX_DEPTH),
        ("openai.beta.threads.messages", oai, message_create_params.MessageCreateParams,
         lambda c, kw: c.beta.threads.messages.create("thread_1", **kw), OAI_FILL,
         {"role": "user", "content": "x"}, MAX_DEPTH),
        ("openai.beta.threads.runs", oai, run_create_params.RunCreateParamsBase,
         lambda c, kw: c.beta.threads.runs.create("thread_1", **kw), OAI_FILL,
         {"assistant_id": "asst_1"}, MAX_DEPTH),
        ("openai.beta.threads", oai, thread_create_params.ThreadCreateParams,
         lambda c, kw: c.beta.threads.create(**kw), OAI_FILL, {}, MAX_DEPTH),
        ("openai.beta.threads.create_and_run", oai, thread_create_and_run_params.ThreadCreateAndRunParamsBase,
         lambda c, kw: c.beta.threads.create_and_run(**kw), OAI_FILL, {"assistant_id": "asst_1"}, MAX_DEPTH),
    ]
    if assistant_create_params is not None and hasattr(openai.resources.beta.Beta, "assistants"):
        apis.append(("openai.beta.assistants", oai, assistant_create_params.AssistantCreateParams,
                     lambda c, kw: c.beta.assistants.create(**kw), OAI_FILL, {"model": OAI_MODEL}, MAX_DEPTH))
    else:
        print("note: openai.beta.assistants.create is not in this SDK version; skipped", file=sys.stderr)
    ant_base = {"model": ANT_MODEL, "max_tokens": 16, "messages": ANT_FILL["messages"]}
    apis += [
        ("anthropic.messages", ant, ant_create_params.MessageCreateParamsBase,
         lambda c, kw: c.messages.create(**kw), ANT_FILL, ant_base, MAX_DEPTH),
        ("anthropic.messages.count_tokens", ant, ant_count_params.MessageCountTokensParams,
         lambda c, kw: c.messages.count_tokens(**kw), ANT_FILL,
         {"model": ANT_MODEL, "messages": ANT_FILL["messages"]}, MAX_DEPTH),
        ("anthropic.messages.batches", ant, ant_batch_params.BatchCreateParams,
         lambda c, kw: c.messages.batches.create(**kw), ANT_FILL, {}, BATCH_DEPTH),
        ("anthropic.beta.messages", ant, ant_beta_create_params.MessageCreateParamsBase,
         lambda c, kw: c.beta.messages.create(**kw), ANT_FILL, ant_base, MAX_DEPTH),
    ]
    return apis


# ---------------------------------------------------------------------------------------------
# Types


def _unwrap(t):
    """Strip Required/NotRequired/ReadOnly/Annotated/TypeAliasType/NewType; return (type, metadata)."""
    meta = []
    while True:
        if isinstance(t, te.TypeAliasType):
            t = t.__value__
            continue
        if isinstance(t, typing.NewType):
            t = t.__supertype__
            continue
        origin = te.get_origin(t)
        if origin in (te.Required, te.NotRequired, te.ReadOnly, typing.Required, typing.NotRequired):
            t = te.get_args(t)[0]
            continue
        if origin is te.Annotated:
            meta.extend(t.__metadata__)
            t = t.__origin__
            continue
        return t, meta


def _members(t):
    """The alternatives of a (possibly nested, possibly Optional) union, wrappers stripped."""
    t, _ = _unwrap(t)
    if te.get_origin(t) in (typing.Union, types.UnionType):
        return [m for a in te.get_args(t) for m in _members(a)]
    return [t]


_LIST_ORIGINS = (list, collections.abc.Iterable, collections.abc.Sequence, collections.abc.Collection)
_MAP_ORIGINS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def _not_json(t):
    """Types a create() method accepts that are not JSON text: response models passed back (the SDK
    dumps them; their Param twins are walked), file inputs (base64-encoded by the SDK), type[...]."""
    origin = te.get_origin(t)
    if isinstance(t, type) and issubclass(t, pydantic.BaseModel):
        return True
    return t in (os.PathLike, typing.IO, type) or origin in (os.PathLike, typing.IO, type, collections.abc.Callable)


def _classify(t):
    """One union member: "none", "literal", "str", "scalar", "json", "typeddict", "list", "map",
    "skip" (known not to be JSON text) or "unknown" (reported, so a new kind of type is not lost)."""
    if t is type(None) or t is None:
        return "none"
    origin = te.get_origin(t)
    if origin is typing.Literal or origin is te.Literal:
        return "literal"
    if t is str:
        return "str"
    if t in (bool, int, float, bytes, datetime.datetime, datetime.date):
        return "scalar"
    if t is object or t is typing.Any:
        return "json"
    if te.is_typeddict(t):
        return "typeddict"
    if origin in _LIST_ORIGINS or getattr(origin, "__name__", "") == "SequenceNotStr":
        return "list"
    if origin in _MAP_ORIGINS or t in (dict,):
        return "map"
    return "skip" if _not_json(t) else "unknown"


_HINTS = {}


def _hints(td):
    if td not in _HINTS:
        _HINTS[td] = typing.get_type_hints(td, include_extras=True)
    return _HINTS[td]


def _totality(td):
    """key -> total flag of the TypedDict class that declares it (bases first)."""
    out = {}
    for base in getattr(td, "__orig_bases__", ()):
        base = te.get_origin(base) or base
        if te.is_typeddict(base):
            out.update(_totality(base))
    for key in td.__annotations__:
        out.setdefault(key, td.__total__)
    return out


def _required_keys(td):
    """Required keys in declaration order. The SDK modules use `from __future__ import annotations`,
    so `__required_keys__` cannot see `Required[...]`; read it from the resolved hints instead."""
    total = _totality(td)
    out = []
    for key, hint in _hints(td).items():
        origin = te.get_origin(hint)
        if origin in (te.Required, typing.Required) or (
            origin not in (te.NotRequired, typing.NotRequired) and total.get(key, True)
        ):
            out.append(key)
    return out


def _wire_name(key, hint):
    for m in _unwrap(hint)[1]:
        alias = getattr(m, "alias", None)
        if type(m).__name__ == "PropertyInfo" and alias:
            return alias
    return key


def _literal_values(td, key):
    """The Literal values a TypedDict key can take, or None if the key is missing or not a Literal."""
    hint = _hints(td).get(key)
    if hint is None:
        return None
    values = []
    for m in _members(hint):
        kind = _classify(m)
        if kind == "literal":
            values.extend(te.get_args(m))
        elif kind != "none":
            return None
    return values or None


def _labels(tds):
    """Names for the TypedDict members of one union: {td: (label, {discriminator key: value})}."""
    if len(tds) < 2:
        return {td: ("", {}) for td in tds}
    keys = list(DISCRIMINATORS) + sorted({k for td in tds for k in _hints(td)} - set(DISCRIMINATORS))
    best = None
    for key in keys:
        have = [td for td in tds if _literal_values(td, key)]
        if best is None or len(have) > len(best[1]):
            best = (key, have)
        if len(have) == len(tds):
            break
    key = best[0]
    labels = {}
    for td in tds:
        values = _literal_values(td, key)
        labels[td] = (f"{key}={values[0]}", {key: values[0]}) if values else (td.__name__, {})
    # Members that share a label: add a second Literal key that tells them apart, else the class name.
    groups = {}
    for td in tds:
        groups.setdefault(labels[td][0], []).append(td)
    for label, group in groups.items():
        if len(group) < 2:
            continue
        for key2 in keys:
            if key2 == key:
                continue
            firsts = [(_literal_values(td, key2) or [None])[0] for td in group]
            if None not in firsts and len(set(firsts)) == len(group):
                for td, v in zip(group, firsts):
                    labels[td] = (f"{label},{key2}={v}", {**labels[td][1], key2: v})
                break
        else:
            for td in group:
                labels[td] = (f"{label},{td.__name__}", labels[td][1])
    return labels


# ---------------------------------------------------------------------------------------------
# Minimal values


def _minimal(t, fill, stack=()):
    order = ["literal", "str", "scalar", "typeddict", "list", "map", "json", "none"]
    ms = sorted((m for m in _members(t) if _classify(m) not in ("skip", "unknown")), key=lambda m: order.index(_classify(m)))
    if not ms:
        raise TypeError(f"no minimal value for {t!r}")
    m = ms[0]
    kind = _classify(m)
    if kind == "literal":
        return te.get_args(m)[0]
    if kind == "str":
        return "x"
    if kind == "scalar":
        return {bool: False, int: 1, float: 0.5}.get(m, "x")
    if kind == "typeddict":
        return _minimal_td(m, fill, stack)
    if kind == "list":
        return [_minimal(te.get_args(m)[0], fill, stack)] if te.get_args(m) else []
    if kind in ("map", "json"):
        return {}
    return None


def _minimal_td(td, fill, stack=()):
    if td in stack:
        return {}
    hints = _hints(td)
    out = {}
    for key in _required_keys(td):
        out[key] = fill[key] if key in fill else _minimal(hints[key], fill, stack + (td,))
    return out


# ---------------------------------------------------------------------------------------------
# Walk


class _Leaf:
    def __init__(self, field, kind, top, build):
        self.field, self.kind, self.top, self.build = field, kind, top, build


def _walk(t, path, in_list, stack, depth, build, ctx, top, out):
    """Collect the leaves of type `t` at `path`; `build(value)` wraps a value of `t` up to the params."""
    ms = _members(t)
    tds = [m for m in ms if _classify(m) == "typeddict"]
    labels = _labels(tds)
    for m in ms:
        kind = _classify(m)
        if kind == "str":
            out.append(_Leaf(path, "str", top, build))
        elif kind == "json":
            out.append(_Leaf(path, "json", top, lambda c, b=build: b({"canary_key": c})))
            out.append(_Leaf(path + "{key}", "json", top, lambda c, b=build: b({c: "x"})))
        elif kind == "list":
            args = te.get_args(m)
            if args:  # the item's union label, if any, replaces this `[]`
                _walk(args[0], path + "[]", True, stack, depth, lambda v, b=build: b([v]), ctx, top, out)
        elif kind == "map":
            args = te.get_args(m)
            value_t = args[1] if len(args) == 2 else object
            value_kinds = {_classify(v) for v in _members(value_t)} - {"none", "skip", "unknown"}
            structured = value_kinds & {"typeddict", "list", "map"}
            if value_kinds & {"str", "json"} and not structured:  # a JSON-ish map: metadata, headers, env
                out.append(_Leaf(path, "json", top, lambda c, b=build: b({"canary_key": c})))
            minimal_value = "x" if not value_kinds or value_kinds & {"str", "json"} else _minimal(value_t, ctx.fill)
            out.append(_Leaf(path + "{key}", "json", top, lambda c, b=build, v=minimal_value: b({c: v})))
            if structured:  # typed values: walk them, `{}` standing for the value under any key
                _walk(value_t, path + "{}", False, stack, depth, lambda v, b=build: b({"k": v}), ctx, top, out)
        elif kind == "unknown":
            ctx.notes.append(f"unhandled type at {path or '(top)'}: {m!r}")
        elif kind == "typeddict":
            if m in stack:
                continue
            if depth >= ctx.max_depth:
                ctx.cut += 1
                continue
            label, disc = labels[m]
            base = path[:-2] if in_list and path.endswith("[]") else path
            td_path = f"{base}[{label}]" if label else path
            hints = _hints(m)
            for key, hint in hints.items():
                if key in disc:
                    continue
                if not stack and key in TRANSPORT_ARGS:
                    continue
                wire = _wire_name(key, hint)
                child_path = f"{td_path}.{wire}" if td_path else wire

                def child_build(v, b=build, td=m, k=key, d=disc, s=stack):
                    return b({**_minimal_td(td, ctx.fill, s), **d, k: v})

                _walk(hint, child_path, False, stack + (m,), depth + 1, child_build, ctx,
                      top if stack else key, out)


class _Ctx:
    def __init__(self, fill, max_depth):
        self.fill, self.max_depth = fill, max_depth
        self.cut, self.notes = 0, []


def _leaves(api, params, fill, max_depth):
    out = []
    ctx = _Ctx(fill, max_depth)
    _walk(params, "", False, (), 0, lambda v: v, ctx, None, out)
    if ctx.cut:
        print(f"note: {api}: depth budget {max_depth} reached, {ctx.cut} TypedDicts not entered", file=sys.stderr)
    for note in sorted(set(ctx.notes)):
        print(f"note: {api}: {note}", file=sys.stderr)
    seen, unique = set(), []
    for leaf in out:
        if (leaf.field, leaf.kind) not in seen:
            seen.add((leaf.field, leaf.kind))
            unique.append(leaf)
    return unique


# ---------------------------------------------------------------------------------------------
# Capture


def cases():
    """One entry per (api, text leaf, kind): the SDK's real request with a canary at that leaf."""
    planned = []
    for api, client, params, call, fill, extras, depth in _apis():
        for leaf in _leaves(api, params, fill, depth):
            planned.append((api, leaf.field, leaf.kind, leaf, client, call, extras))
    planned.sort(key=lambda p: (p[0], p[1], p[2]))

    entries, skipped, not_in_body = [], [], []
    width = max(4, len(str(len(planned))))  # fixed width: no canary is a prefix of another
    for n, (api, field, kind, leaf, client, call, extras) in enumerate(planned, 1):
        canary = f"CANARY{n:0{width}d}"
        try:
            kwargs = leaf.build(canary)
            kwargs = {**kwargs, **{k: v for k, v in extras.items() if k != leaf.top}}
            req = capture_request(client, lambda c, kw=kwargs: call(c, kw))
        except Exception as e:  # noqa: BLE001 - the SDK refused this combination; reported below
            skipped.append(f"{api} {field}: {type(e).__name__}: {e}")
            continue
        fixture = as_fixture(req)
        if canary not in json.dumps(fixture["body"]):
            where = [w for w, text in (("headers", str(dict(req.headers))), ("url", str(req.url)))
                     if canary in text]
            not_in_body.append(f"{api} {field}: canary not in body ({', '.join(where) or 'dropped'})")
            continue
        entries.append({"api": api, "field": field, "kind": kind, "canary": canary, "request": fixture})

    for line in not_in_body:
        print(f"not a body field: {line}", file=sys.stderr)
    for line in skipped:
        print(f"skipped: {line}", file=sys.stderr)
    return entries


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)
    result = cases()
    counts = {}
    for e in result:
        counts[e["api"]] = counts.get(e["api"], 0) + 1
    for api, count in sorted(counts.items()):
        print(f"{count:5d} {api}")
    print(f"{len(result):5d} total")
