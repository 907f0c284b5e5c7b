// `make bench-vm`'s host: the filter's .wasm in V8 (Node.js), driven through the proxy-wasm ABI
// (0.2.1) the way Envoy drives it for one request, without Envoy, sockets or a second process.
// It measures the module alone: what a build setting or a change costs inside the VM, on a
// noisy machine, with far less spread than a load test through Envoy (`make bench-filter`), which
// stays the measure of the whole path.
//
//   node vm_host.mjs SPEC.json
//
// SPEC: {"builds": {"name": "file.wasm[#root_id]", ...}, "configuration": "<the filter's JSON>",
//        "bodies": {"1": "file", ...}, "requests": N, "rounds": R}
// Every build runs every body, same and unique (the nonce rewritten per request), in R rounds
// that alternate the builds; prints one JSON line per (build, body, mode, round) with µs per
// request (context created, request headers, body, response headers and body, log, done,
// deleted), and stops with an error when a request is not allowed or the module traps. Before the
// rounds it prints the host calls one request makes, by callback ({"calls": ...}); every import is
// wrapped for that count in every build alike, so compare µs within a run, not with older runs.

import { readFileSync } from "node:fs";
import { randomFillSync } from "node:crypto";

const OK = 0, NOT_FOUND = 1, CAS_MISMATCH = 8;
const enc = new TextEncoder(), dec = new TextDecoder();

/** One instance of a build, with the host state Envoy would keep for it. */
class Host {
  constructor(file, configuration) {
    // `file.wasm#root_id`: the plugin's root_id (the `plugin_root_id` property), as Envoy's
    // `root_id` sets it; `llm_policy` otherwise, as `llm-policy envoy-config` writes it.
    const [path, rootId = "llm_policy"] = file.split("#");
    this.rootId = enc.encode(rootId);
    this.configuration = enc.encode(configuration);
    this.shared = new Map(); // key -> {value: Uint8Array, cas: number}
    this.metrics = 0;
    this.request = null; // {headers: Map, body: Uint8Array, reply: number|null, set: Map}
    const module = new WebAssembly.Module(readFileSync(path));
    this.calls = null; // when counting: {callback: {import: n}}
    this.phase = "";
    const count = (imports) => Object.fromEntries(Object.entries(imports).map(([name, f]) => [name, (...a) => {
      if (this.calls) {
        const c = (this.calls[this.phase] ??= {});
        c[name] = (c[name] ?? 0) + 1;
      }
      return f(...a);
    }]));
    this.instance = new WebAssembly.Instance(module,
      { env: count(this.env()), wasi_snapshot_preview1: count(this.wasi()) });
    this.x = this.instance.exports;
  }
  u8() { return new Uint8Array(this.x.memory.buffer); }
  dv() { return new DataView(this.x.memory.buffer); }
  str(p, n) { return dec.decode(this.u8().subarray(p, p + n)); }
  /** Copies `bytes` into memory the module allocates, as Envoy does; writes (ptr, size). */
  give(bytes, retPtr, retSize) {
    const p = bytes.length ? this.x.proxy_on_memory_allocate(bytes.length) : 0;
    if (bytes.length) this.u8().set(bytes, p);
    const dv = this.dv();
    dv.setUint32(retPtr, p, true);
    dv.setUint32(retSize, bytes.length, true);
    return OK;
  }
  map(type) {
    const r = this.request;
    if (!r) return null;
    return type === 0 ? r.headers : type === 2 ? r.responseHeaders : new Map();
  }
  env() {
    const h = this;
    const map = (t) => h.map(t);
    return {
      proxy_log: (level, p, n) => { if (level >= 4) console.error(`wasm log ${level}: ${h.str(p, n)}`); return OK; },
      proxy_set_tick_period_milliseconds: () => OK,
      proxy_get_buffer_bytes: (type, start, max, retPtr, retSize) => {
        const b = type === 7 ? h.configuration : type === 6 ? new Uint8Array(0)
          : type === 0 ? h.request.body : type === 1 ? h.request.responseBody : null;
        if (!b) return NOT_FOUND;
        return h.give(b.subarray(start, start + max), retPtr, retSize);
      },
      proxy_set_buffer_bytes: () => OK,
      proxy_set_property: () => OK,
      proxy_get_property: (p, n, retPtr, retSize) =>
        h.str(p, n).replace(/\0+$/, "") === "plugin_root_id" ? h.give(h.rootId, retPtr, retSize) : NOT_FOUND,
      proxy_get_shared_data: (kp, kn, retPtr, retSize, retCas) => {
        const e = h.shared.get(h.str(kp, kn));
        if (!e) return NOT_FOUND;
        h.give(e.value, retPtr, retSize);
        h.dv().setUint32(retCas, e.cas, true);
        return OK;
      },
      proxy_set_shared_data: (kp, kn, vp, vn, cas) => {
        const key = h.str(kp, kn), e = h.shared.get(key);
        if (cas !== 0 && (!e || e.cas !== cas)) return CAS_MISMATCH;
        h.shared.set(key, { value: h.u8().slice(vp, vp + vn), cas: (e ? e.cas : 0) + 1 });
        return OK;
      },
      proxy_register_shared_queue: (p, n, ret) => { h.dv().setUint32(ret, 1, true); return OK; },
      proxy_resolve_shared_queue: () => NOT_FOUND,
      proxy_enqueue_shared_queue: () => OK,
      proxy_dequeue_shared_queue: () => NOT_FOUND,
      proxy_get_current_time_nanoseconds: (ret) => {
        h.dv().setBigUint64(ret, BigInt(Date.now()) * 1000000n, true);
        return OK;
      },
      proxy_get_header_map_pairs: (type, retPtr, retSize) =>
        h.give(type === 0 && h.request ? h.request.headerBytes : pairs(map(type) ?? new Map()), retPtr, retSize),
      proxy_set_header_map_pairs: () => OK,
      proxy_get_header_map_value: (type, kp, kn, retPtr, retSize) => {
        const v = map(type)?.get(h.str(kp, kn));
        return v === undefined ? NOT_FOUND : h.give(enc.encode(v), retPtr, retSize);
      },
      proxy_replace_header_map_value: (type, kp, kn, vp, vn) => { map(type)?.set(h.str(kp, kn), h.str(vp, vn)); return OK; },
      proxy_add_header_map_value: (type, kp, kn, vp, vn) => { map(type)?.set(h.str(kp, kn), h.str(vp, vn)); return OK; },
      proxy_remove_header_map_value: (type, kp, kn) => { map(type)?.delete(h.str(kp, kn)); return OK; },
      proxy_send_local_response: (status) => { h.request.reply = status; return OK; },
      proxy_continue_stream: () => OK,
      proxy_close_stream: () => OK,
      proxy_get_status: () => NOT_FOUND,
      proxy_done: () => OK,
      proxy_set_effective_context: () => OK,
      proxy_define_metric: (type, p, n, ret) => { h.dv().setUint32(ret, ++h.metrics, true); return OK; },
      proxy_increment_metric: () => OK,
      proxy_record_metric: () => OK,
      proxy_http_call: () => NOT_FOUND,
      proxy_grpc_call: () => NOT_FOUND,
      proxy_grpc_stream: () => NOT_FOUND,
      proxy_grpc_send: () => NOT_FOUND,
      proxy_grpc_cancel: () => OK,
      proxy_grpc_close: () => OK,
      proxy_call_foreign_function: () => NOT_FOUND,
    };
  }
  wasi() {
    const h = this;
    return {
      random_get: (p, n) => { randomFillSync(h.u8().subarray(p, p + n)); return 0; },
      environ_sizes_get: (a, b) => { h.dv().setUint32(a, 0, true); h.dv().setUint32(b, 0, true); return 0; },
      environ_get: () => 0,
      clock_time_get: (id, precision, ret) => { h.dv().setBigUint64(ret, process.hrtime.bigint(), true); return 0; },
      fd_write: (fd, iovs, n, ret) => {
        const dv = h.dv();
        let total = 0;
        for (let i = 0; i < n; i++) total += dv.getUint32(iovs + i * 8 + 4, true);
        dv.setUint32(ret, total, true);
        return 0;
      },
      proc_exit: (code) => { throw new Error(`proc_exit(${code})`); },
    };
  }
  start() {
    this.x._initialize?.();
    this.x.proxy_on_context_create(1, 0);
    if (!this.x.proxy_on_vm_start(1, 0)) throw new Error("vm start refused");
    if (!this.x.proxy_on_configure(1, this.configuration.length)) throw new Error("configuration refused");
    this.next = 2;
  }
  /** One request through every callback Envoy makes; returns the status it would get. */
  one(body, headerBytes) {
    const ctx = this.next++;
    const headers = requestHeaders(body);
    this.request = {
      headers, headerBytes, body, reply: null,
      responseHeaders: new Map([[":status", "200"], ["content-type", "application/json"]]),
      responseBody: RESPONSE,
    };
    const x = this.x;
    const call = (name, ...a) => { this.phase = name; return x[name](...a); };
    call("proxy_on_context_create", ctx, 1);
    call("proxy_on_request_headers", ctx, headers.size, 0);
    if (this.request.reply === null) call("proxy_on_request_body", ctx, body.length, 1);
    const status = this.request.reply ?? 200;
    if (this.request.reply === null) {
      call("proxy_on_response_headers", ctx, 2, 0);
      call("proxy_on_response_body", ctx, RESPONSE.length, 1);
    }
    call("proxy_on_log", ctx);
    call("proxy_on_done", ctx);
    call("proxy_on_delete", ctx);
    this.request = null;
    return status;
  }
}

/** The request headers Envoy would hand the filter for `body` (what `loadgen` sends, and Envoy adds). */
function requestHeaders(body) {
  return new Map([
    [":authority", "127.0.0.1:10000"], [":path", "/v1/chat/completions"], [":method", "POST"],
    [":scheme", "http"], ["content-type", "application/json"], ["content-length", String(body.length)],
    ["x-forwarded-proto", "http"], ["x-request-id", "6f1d1f5e-5d2a-4c1b-9b43-0c5e2f7d8a91"],
  ]);
}

/** A header map as proxy-wasm serializes it: count, (name, value) lengths, NUL-ended bytes. */
function pairs(map) {
  const entries = [...map].map(([k, v]) => [enc.encode(k), enc.encode(v)]);
  let size = 4 + entries.length * 8;
  for (const [k, v] of entries) size += k.length + v.length + 2;
  const out = new Uint8Array(size), dv = new DataView(out.buffer);
  dv.setUint32(0, entries.length, true);
  let at = 4 + entries.length * 8;
  entries.forEach(([k, v], i) => {
    dv.setUint32(4 + i * 8, k.length, true);
    dv.setUint32(8 + i * 8, v.length, true);
    out.set(k, at); at += k.length + 1;
    out.set(v, at); at += v.length + 1;
  });
  return out;
}

const RESPONSE = enc.encode(JSON.stringify({
  id: "chatcmpl-1", object: "chat.completion", model: "gpt-4o-mini",
  choices: [{ index: 0, message: { role: "assistant", content: "Noted." }, finish_reason: "stop" }],
  usage: { prompt_tokens: 12, completion_tokens: 2, total_tokens: 14 },
}));
const NONCE = enc.encode("nonceaaaaaaaaaa");

function nonceAt(b) {
  outer: for (let i = 0; i + NONCE.length <= b.length; i++) {
    for (let j = 0; j < NONCE.length; j++) if (b[i + j] !== NONCE[j]) continue outer;
    return i + 5;
  }
  throw new Error("the body has no nonce");
}

const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
const hosts = Object.entries(spec.builds).map(([name, file]) => {
  const h = new Host(file, spec.configuration);
  h.start();
  return [name, h];
});
// The nonce's place is found once: unique runs rewrite its letters.
const bodies = Object.entries(spec.bodies).map(([kb, f]) => {
  const b = new Uint8Array(readFileSync(f));
  // Serialized once: the host's own work per request should be as little as Envoy's.
  return [kb, { bytes: b, at: nonceAt(b), headerBytes: pairs(requestHeaders(b)) }];
});
let counter = 1;
function run(h, { bytes: body, at, headerBytes }, unique, n) {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) {
    if (unique) {
      let c = counter++;
      for (let j = 0; j < NONCE.length - 5; j++) { body[at + j] = 97 + (c % 26); c = Math.floor(c / 26); }
    }
    const status = h.one(body, headerBytes);
    if (status !== 200) throw new Error(`request ${i}: status ${status} (not allowed)`);
  }
  return Number(process.hrtime.bigint() - t0) / 1000 / n;
}
for (const [, h] of hosts) for (const [, b] of bodies) { run(h, b, false, 2000); run(h, b, true, 2000); } // warm up: TurboFan
// The host calls one request makes, by callback (after the warm-up: the steady state).
for (const [name, h] of hosts) {
  for (const [kb, body] of bodies) {
    for (const unique of [false, true]) {
      h.calls = {};
      run(h, body, unique, 1);
      console.log(JSON.stringify({ build: name, kb: Number(kb), mode: unique ? "unique" : "same", calls: h.calls }));
      h.calls = null;
    }
  }
}
for (let round = 0; round < spec.rounds; round++) {
  for (const [kb, body] of bodies) {
    for (const unique of [false, true]) {
      for (const [name, h] of round % 2 ? [...hosts].reverse() : hosts) {
        const us = run(h, body, unique, spec.requests);
        console.log(JSON.stringify({ build: name, kb: Number(kb), mode: unique ? "unique" : "same", round, us }));
      }
    }
  }
}
