//! Workloads shared by the benchmarks: the same N-rule semantics written for llm-policy (CEL and
//! DSL), Rego (regorus), Cedar (cedar-policy) and as separate `cel` programs, plus realistic chat
//! bodies of a given size.
//!
//! Rule `i` of N matches when `model == "m{i}"` and `max_tokens > 10 i`; the benchmark request
//! (`model: gpt-4o-mini`, `max_tokens: 500`) misses all of them, so every engine must look at every rule
//! unless it indexes.

use std::fmt::Write as _;

use llm_policy_core::RequestInput;

/// Owned header pairs.
pub fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A `POST /v1/chat/completions` request over `body`.
pub fn chat_input<'a>(headers: &'a [(String, String)], body: &'a str) -> RequestInput<'a> {
    RequestInput {
        method: "POST",
        path: "/v1/chat/completions",
        headers,
        body: body.as_bytes(),
        now_unix: 0,
    }
}

/// llm-policy YAML with `n` rules whose `when` is `condition(i)`.
fn policy(n: usize, condition: impl Fn(usize) -> String) -> String {
    let mut s = String::from(
        "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: bench}\nspec:\n  defaultDecision: allow\n  rules:\n",
    );
    for i in 0..n {
        let _ = write!(
            s,
            "    - id: r{i}\n      priority: {i}\n      when: {}\n      action: {{ decision: deny }}\n",
            condition(i)
        );
    }
    s
}

/// `n` CEL rules (translated to native conditions at load).
pub fn policy_cel(n: usize) -> String {
    policy(n, |i| {
        format!(
            "{{ cel: \"request.model == 'm{i}' && request.max_tokens > {}\" }}",
            10 * i
        )
    })
}

/// The same rules in the YAML DSL.
pub fn policy_dsl(n: usize) -> String {
    policy(n, |i| {
        format!(
            "{{ match: {{ all: [{{ field: request.model, op: eq, value: m{i} }}, {{ field: request.max_tokens, op: gt, value: {} }}] }} }}",
            10 * i
        )
    })
}

/// Rules the index cannot select (prefix tests): every rule is evaluated natively.
pub fn policy_unindexed(n: usize) -> String {
    policy(n, |i| {
        format!(
            "{{ cel: \"request.model.startsWith('m{i}-') && request.max_tokens > {}\" }}",
            10 * i
        )
    })
}

/// Rego with the same semantics: every matching rule id is collected (as llm-policy does).
pub fn rego(n: usize) -> String {
    let mut s = String::from("package bench\n\nimport rego.v1\n\n");
    for i in 0..n {
        let _ = writeln!(s, "matched contains \"r{i}\" if {{\n\tinput.model == \"m{i}\"\n\tinput.max_tokens > {}\n}}\n", 10 * i);
    }
    s
}

/// Cedar with the same semantics (one `forbid` per rule; context carries the request fields).
pub fn cedar(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        let _ = writeln!(
            s,
            "@id(\"r{i}\")\nforbid(principal, action, resource) when {{ context.model == \"m{i}\" && context.max_tokens > {} }};",
            10 * i
        );
    }
    s.push_str("permit(principal, action, resource);\n");
    s
}

/// The CEL source of rule `i`, over a `request` map.
pub fn cel_rule(i: usize) -> String {
    format!("request.model == 'm{i}' && request.max_tokens > {}", 10 * i)
}

/// A realistic OpenAI chat body of about `bytes` bytes (several turns, a content-part array,
/// tools, and options).
pub fn chat_body(bytes: usize) -> String {
    let para = "The quarterly report shows revenue growth in all regions, with EMEA leading at 14 percent. \
                Please check the numbers against the attached table and flag anything inconsistent. ";
    let mut messages = vec![
        serde_json::json!({"role": "system", "content": "You are a careful financial analyst. Answer concisely."}),
    ];
    let mut size = 600;
    let mut turn = 0;
    while size < bytes {
        let text: String = para.repeat(((bytes - size) / para.len()).clamp(1, 4));
        size += text.len() + 60;
        let msg = if turn % 2 == 0 {
            serde_json::json!({"role": "user", "content": [{"type": "text", "text": text}]})
        } else {
            serde_json::json!({"role": "assistant", "content": text})
        };
        messages.push(msg);
        turn += 1;
    }
    serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": messages,
        "max_tokens": 500,
        "temperature": 0.3,
        "stream": false,
        "tools": [{"type": "function", "function": {"name": "lookup_account", "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}}],
        "user": "user-1234"
    })
    .to_string()
}

/// What the rules of a load benchmark are written in.
#[derive(Debug, Clone, Copy)]
pub enum LoadKind {
    /// YAML DSL conditions.
    Dsl,
    /// CEL conditions the compiler translates into native conditions.
    Cel,
    /// A realistic mix: DSL, native CEL, interpreted CEL, rate limits, tags, a few priorities.
    Mixed,
}

/// `n` distinct rules in one policy document, for load + compile benchmarks. DSL and CEL rules all
/// share one priority (the case that was quadratic); the mix spreads over four.
pub fn load_policy(n: usize, kind: LoadKind) -> String {
    let mut s = String::with_capacity(n * 160);
    s.push_str(
        "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: load}\nspec:\n  defaultDecision: allow\n  rules:\n",
    );
    for i in 0..n {
        let (when, extra, priority) = match (kind, i % 4) {
            (LoadKind::Dsl, _) | (LoadKind::Mixed, 0) => (
                format!("{{ match: {{ all: [{{ field: request.model, op: eq, value: m{i} }}, {{ field: principal.tier, op: in, value: [free, t{i}] }}] }} }}"),
                String::new(),
                0,
            ),
            (LoadKind::Cel, _) | (LoadKind::Mixed, 1) => (
                format!("{{ cel: \"request.model == 'm{i}' && request.max_tokens != null && request.max_tokens > {i}\" }}"),
                String::new(),
                if matches!(kind, LoadKind::Mixed) { 1 } else { 0 },
            ),
            (LoadKind::Mixed, 2) => (
                format!("{{ cel: \"request.model == 'm{i}' && request.prompt.lowerAscii().contains('w{i}')\" }}"),
                String::new(),
                2,
            ),
            (LoadKind::Mixed, _) => (
                format!("{{ match: {{ field: request.path, op: starts_with, value: /v{i}/ }} }}"),
                format!(", rateLimit: {{ key: \"{{principal.id}}\", requests: {i}, per: minute }}"),
                3,
            ),
        };
        let _ = write!(
            s,
            "    - id: r{i}\n      priority: {priority}\n      tags: [t{}]\n      when: {when}\n      action: {{ decision: deny{extra} }}\n",
            i % 10
        );
    }
    s
}

/// The 100 rules of `make bench-filter` (`loadgen hundred-rules`) and of the `filter` bench: on
/// model, `max_tokens` and a header, a third each in CEL, the DSL and DSL `all`, none matching
/// the benchmark request.
pub fn hundred_rules_yaml() -> String {
    let mut rules = String::new();
    for i in 0..100 {
        let when = match i % 3 {
            0 => format!(
                "{{ cel: \"request.model == 'm{i}' && request.max_tokens != null && request.max_tokens > {}\" }}",
                10 * i
            ),
            1 => format!("{{ match: {{ field: request.headers.x-team, op: eq, value: t{i} }} }}"),
            _ => format!(
                "{{ match: {{ all: [{{ field: request.model, op: eq, value: m{i} }}, {{ field: request.max_tokens, op: gt, value: {i} }}] }} }}"
            ),
        };
        rules.push_str(&format!(
            "    - id: r{i}\n      priority: {i}\n      when: {when}\n      action: {{ decision: deny }}\n"
        ));
    }
    format!(
        "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {{name: hundred}}\nspec:\n  defaultDecision: allow\n  rules:\n{rules}"
    )
}

/// The nonce word of a benchmark body (`loadgen --unique` rewrites its letters per request).
pub const NONCE: &str = "nonceaaaaaaaaaa";

/// The chat body of `make bench-filter` (`loadgen chat-body`) and of the `filter` bench: about
/// `size` bytes that the example bundle allows, its text starting with [`NONCE`].
pub fn nonce_chat_body(size: usize) -> String {
    let text = "Please summarise the following notes about the quarterly planning meeting. ";
    let filler: String = text
        .repeat(size / text.len() + 1)
        .chars()
        .take(size.saturating_sub(136).max(10))
        .collect();
    serde_json::json!({
        "model": "gpt-4o-mini",
        "max_tokens": 256,
        "messages": [
            {"role": "system", "content": "You are concise."},
            {"role": "user", "content": format!("{NONCE} {filler}")},
        ],
    })
    .to_string()
}

/// Where the letters of the body's [`NONCE`] start (`None`: the body has no nonce).
pub fn nonce_at(body: &[u8]) -> Option<usize> {
    body.windows(NONCE.len())
        .position(|w| w == NONCE.as_bytes())
        .map(|p| p + 5)
}

/// Writes `n` into the nonce's letters at `at` (base 26, `a`–`z`).
pub fn write_nonce(body: &mut [u8], at: usize, mut n: u64) {
    for slot in body.iter_mut().skip(at).take(NONCE.len() - 5) {
        *slot = b'a' + (n % 26) as u8;
        n /= 26;
    }
}
