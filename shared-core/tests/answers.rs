//! Response rules: load-time checks of what a `phase: response` rule may do and read, JSON
//! answers checked whole, streams of each provider checked through the held-back window (a
//! secret split over 2, 3 and 10 chunks at any byte is cut before any of it is sent), clean
//! streams passing byte for byte, and what a cut reports.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;

use common::{compile, ctx_at, policy};
use llm_policy_core::answer::{AnswerGuard, Pass};
use llm_policy_core::PolicySet;

const RULES: &str = r#"    - id: no-keys-out
      phase: response
      when: {match: {field: response.entities, op: contains, value: [api_key, private_key]}}
      action: {decision: deny, reason: the answer holds a secret}
    - id: no-codename
      phase: response
      when: {match: {field: response.text, op: contains, value: "project bluebird", ignore_case: true}}
      action: {decision: deny, reason: the answer names the project, status: 451}
    - id: no-shell
      phase: response
      when: {match: {field: response.tool_calls, op: contains, value: bash}}
      action: {decision: deny, reason: the model may not run a shell}
    - id: no-truncated
      phase: response
      when: {match: {field: response.finish_reason, op: eq, value: length}}
      action: {decision: deny, reason: cut short}
    - id: admins-may
      phase: response
      priority: 10
      when: {match: {field: principal.tier, op: eq, value: admin}}
      action: {decision: allow}
    - id: all
      when: {match: {field: request.method, op: eq, value: POST}}
      action: {decision: allow}
"#;

const SECRET: &str = "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb7cDe0fGh";

fn set() -> PolicySet {
    compile(&policy("deny", RULES)).expect("valid policy")
}

fn guard(set: &PolicySet, path: &str, tier: &str, ct: &str) -> AnswerGuard {
    let ctx = ctx_at(
        path,
        &[("x-user-tier", tier)],
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
    );
    let kept = set.answer_context(&ctx);
    AnswerGuard::new(set, kept, 200, ct, None).expect("answers are checked")
}

/// An OpenAI chat stream of `text` in deltas of `n` characters.
fn openai_stream(text: &str, n: usize) -> String {
    let mut out = String::from(
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
    );
    let chars: Vec<char> = text.chars().collect();
    for piece in chars.chunks(n) {
        let piece: String = piece.iter().collect();
        out.push_str(&format!(
            "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{}}},\"finish_reason\":null}}]}}\n\n",
            serde_json::to_string(&piece).unwrap()
        ));
    }
    out.push_str("data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n");
    out
}

/// An Anthropic stream of `text` in deltas of `n` characters.
fn anthropic_stream(text: &str, n: usize) -> String {
    let mut out = String::from(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n\
         event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    );
    let chars: Vec<char> = text.chars().collect();
    for piece in chars.chunks(n) {
        let piece: String = piece.iter().collect();
        out.push_str(&format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":{}}}}}\n\n",
            serde_json::to_string(&piece).unwrap()
        ));
    }
    out.push_str(
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
         event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":30}}\n\n\
         event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    out
}

/// A Responses API stream of `text` in deltas of `n` characters (the final events repeat it).
fn responses_stream(text: &str, n: usize) -> String {
    let mut out = String::from(
        "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"status\":\"in_progress\",\"output\":[]}}\n\n",
    );
    let chars: Vec<char> = text.chars().collect();
    for piece in chars.chunks(n) {
        let piece: String = piece.iter().collect();
        out.push_str(&format!(
            "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"output_index\":0,\"content_index\":0,\"delta\":{}}}\n\n",
            serde_json::to_string(&piece).unwrap()
        ));
    }
    out.push_str(&format!(
        "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"r\",\"status\":\"completed\",\"output\":[{{\"type\":\"message\",\"content\":[{{\"type\":\"output_text\",\"text\":{}}}]}}],\"usage\":{{\"input_tokens\":3,\"output_tokens\":9}}}}}}\n\n",
        serde_json::to_string(text).unwrap()
    ));
    out
}

/// Feeds `stream` in `pieces` chunks split at byte offsets spread over it (any byte: inside
/// events, inside escapes); returns what was sent and whether the guard cut.
fn feed(g: &mut AnswerGuard, stream: &[u8], pieces: usize, offset: usize) -> Vec<u8> {
    let mut cuts: Vec<usize> = (1..pieces)
        .map(|i| (i * stream.len() / pieces + offset).min(stream.len()))
        .collect();
    cuts.push(stream.len());
    let mut out = Vec::new();
    let mut from = 0;
    for (i, to) in cuts.iter().enumerate() {
        let chunk = &stream[from..*to];
        match g.push(chunk, i + 1 == cuts.len()) {
            Pass::Bytes(b) => out.extend(b),
            other => panic!("a stream is never answered whole: {other:?}"),
        }
        from = *to;
    }
    out
}

/// A stream of a text in deltas of so many characters.
type MakeStream = fn(&str, usize) -> String;

const STREAMS: [(&str, &str, MakeStream); 3] = [
    ("/v1/chat/completions", "openai", openai_stream),
    ("/v1/messages", "anthropic", anthropic_stream),
    ("/v1/responses", "openai", responses_stream),
];

#[test]
fn a_secret_split_over_2_3_and_10_chunks_is_cut_before_any_of_it_is_sent() {
    let set = set();
    let text = format!(
        "Sure. Here is the key you asked for: {SECRET} — keep it safe. {}",
        "More words follow here. ".repeat(20)
    );
    for (path, provider, make) in STREAMS {
        for delta in [1, 3, 7] {
            let stream = make(&text, delta);
            for pieces in [2, 3, 10] {
                for offset in [0, 1, 5, 17] {
                    let mut g = guard(&set, path, "free", "text/event-stream");
                    let out = feed(&mut g, stream.as_bytes(), pieces, offset);
                    let sent = String::from_utf8_lossy(&out);
                    let cut = g
                        .cut()
                        .unwrap_or_else(|| panic!("{path} delta {delta} in {pieces}: not cut"));
                    assert_eq!(cut.deny.rule, "no-keys-out");
                    // Not even the key's distinctive prefix reached the client.
                    assert!(
                        !sent.contains("sk-proj"),
                        "{path} {delta}/{pieces}/{offset}: {sent}"
                    );
                    assert!(!sent.contains("Ab3dEf"), "{path}: {sent}");
                    assert!(
                        cut.text_sent < text.find(SECRET).unwrap(),
                        "{path}: {cut:?}"
                    );
                    // The stream ends with the provider's error event, nothing after it.
                    let last = sent.trim_end().rsplit("\n\n").next().unwrap();
                    let data = last.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                    let v: serde_json::Value = serde_json::from_str(data).unwrap();
                    assert_eq!(v["error"]["message"], "the answer holds a secret");
                    if provider == "anthropic" {
                        assert!(last.starts_with("event: error\n"));
                        assert_eq!(v["type"], "error");
                        assert_eq!(v["error"]["type"], "permission_error");
                    } else {
                        assert_eq!(v["error"]["code"], "response_denied");
                    }
                    assert!(!sent.contains("[DONE]") && !sent.contains("message_stop"));
                    assert!(
                        matches!(g.push(b"data: more\n\n", true), Pass::Bytes(b) if b.is_empty())
                    );
                }
            }
        }
    }
}

#[test]
fn a_clean_stream_passes_byte_for_byte_and_holds_back_at_most_the_window() {
    let set = set();
    let text =
        "The capital of France is Paris. Prices: 10.50 EUR, call +33 1 23 45 67 89. ".repeat(10);
    for (path, _, make) in STREAMS {
        let stream = make(&text, 4);
        let mut g = guard(&set, path, "free", "text/event-stream");
        let out = feed(&mut g, stream.as_bytes(), 10, 3);
        assert!(g.cut().is_none(), "{path}: {:?}", g.cut());
        assert_eq!(String::from_utf8(out).unwrap(), stream, "{path}");
        // Event by event: once 128 bytes of text came, every event but the last 128 bytes'
        // worth has been sent.
        let mut g = guard(&set, path, "free", "text/event-stream");
        let (mut sent, mut came, mut text_in) = (0usize, 0usize, 0usize);
        let events: Vec<&str> = stream.split_inclusive("\n\n").collect();
        for e in &events[..events.len() - 1] {
            if let Pass::Bytes(b) = g.push(e.as_bytes(), false) {
                sent += b.len();
            }
            came += e.len();
            if e.contains("\"content\":\"")
                || e.contains("text_delta")
                || e.contains("output_text.delta")
            {
                text_in += 4;
            }
            // 128 bytes of text are 32 deltas of 4, one more that may go once the next is checked,
            // and the one being checked: their events' bytes at most are held.
            if text_in > 128 + 8 {
                let held = came - sent;
                let longest = events.iter().map(|e| e.len()).max().unwrap();
                assert!(
                    held <= 34 * longest,
                    "{path}: {held} bytes held after {text_in} bytes of text"
                );
            }
        }
    }
}

#[test]
fn a_phrase_across_deltas_is_caught_and_a_higher_priority_allow_exempts() {
    let set = set();
    let text = format!(
        "{}The launch of Project Bluebird is next week.",
        "Intro. ".repeat(40)
    );
    for (path, _, make) in STREAMS {
        let stream = make(&text, 3);
        let mut g = guard(&set, path, "free", "text/event-stream");
        let sent = String::from_utf8(feed(&mut g, stream.as_bytes(), 3, 0)).unwrap();
        assert_eq!(g.cut().unwrap().deny.rule, "no-codename", "{path}");
        assert!(!sent.to_lowercase().contains("project b"), "{path}");
        // An admin's answer is let through whole.
        let mut g = guard(&set, path, "admin", "text/event-stream");
        let out = feed(&mut g, stream.as_bytes(), 3, 0);
        assert!(g.cut().is_none());
        assert_eq!(String::from_utf8(out).unwrap(), stream);
    }
}

#[test]
fn tool_calls_and_finish_reasons_in_streams() {
    let set = set();
    let stream = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"tool_calls\":[{\"index\":0,\"id\":\"c\",\"type\":\"function\",\"function\":{\"name\":\"Bash\",\"arguments\":\"\"}}]}}]}\n\n\
                  data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"cmd\\\":\\\"ls\\\"}\"}}]}}]}\n\n\
                  data: [DONE]\n\n";
    let mut g = guard(&set, "/v1/chat/completions", "free", "text/event-stream");
    let out = feed(&mut g, stream.as_bytes(), 2, 0);
    assert_eq!(g.cut().unwrap().deny.rule, "no-shell");
    assert!(!String::from_utf8_lossy(&out).contains("Bash"));
    // Cut short: known at the end only, the stream ends with the error instead of its end.
    let text = "word ".repeat(100);
    let stream = openai_stream(&text, 5)
        .replace("\"finish_reason\":\"stop\"", "\"finish_reason\":\"length\"");
    let mut g = guard(&set, "/v1/chat/completions", "free", "text/event-stream");
    let sent = String::from_utf8(feed(&mut g, stream.as_bytes(), 4, 0)).unwrap();
    assert_eq!(g.cut().unwrap().deny.rule, "no-truncated");
    let last = sent.trim_end().rsplit("\n\n").next().unwrap();
    assert!(
        last.starts_with("data: {\"error\"") && last.contains("cut short"),
        "{sent}"
    );
    assert!(sent.contains("\"content\":\"word \"") && !sent.contains("[DONE]"));
}

#[test]
fn json_answers_are_checked_whole() {
    let set = set();
    let openai = format!(
        r#"{{"id":"c","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"the key is {SECRET}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":3,"completion_tokens":9}}}}"#
    );
    let mut g = guard(&set, "/v1/chat/completions", "free", "application/json");
    assert!(g.reads_whole());
    let half = openai.len() / 2;
    assert_eq!(g.push(&openai.as_bytes()[..half], false), Pass::Wait);
    let Pass::Reply(reply) = g.push(&openai.as_bytes()[half..], true) else {
        panic!("denied");
    };
    assert_eq!(reply.status, 403);
    let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(body["error"]["code"], "response_denied");
    assert!(!reply.body.contains("sk-proj"));
    let cut = g.cut().unwrap();
    assert!(!cut.stream && cut.text_sent == 0);
    // Anthropic, with the rule's status.
    let anthropic = r#"{"id":"m","type":"message","role":"assistant","content":[{"type":"text","text":"About PROJECT   Bluebird"}],"stop_reason":"end_turn","usage":{"input_tokens":1,"output_tokens":5}}"#;
    let mut g = guard(&set, "/v1/messages", "free", "application/json");
    // `contains` does not collapse spaces: this one is not the phrase.
    assert!(matches!(g.push(anthropic.as_bytes(), true), Pass::Bytes(_)));
    let anthropic = anthropic.replace("PROJECT   Bluebird", "PROJECT Bluebird");
    let mut g = guard(&set, "/v1/messages", "free", "application/json");
    let Pass::Reply(reply) = g.push(anthropic.as_bytes(), true) else {
        panic!("denied");
    };
    assert_eq!(reply.status, 451);
    let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(body["type"], "error");
    // A clean answer passes as it came.
    let clean = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Paris"},"finish_reason":"stop"}]}"#;
    let mut g = guard(&set, "/v1/chat/completions", "free", "application/json");
    assert_eq!(
        g.push(clean.as_bytes(), true),
        Pass::Bytes(clean.as_bytes().to_vec())
    );
}

#[test]
fn answers_that_cannot_be_checked_are_refused() {
    let set = set();
    let ctx = ctx_at(
        "/v1/chat/completions",
        &[],
        r#"{"model":"m","messages":[]}"#,
    );
    let mut g = AnswerGuard::new(
        &set,
        set.answer_context(&ctx),
        200,
        "text/event-stream",
        Some("gzip"),
    )
    .unwrap();
    assert!(g.reads_whole());
    let Pass::Reply(reply) = g.push(b"\x1f\x8b\x08", false) else {
        panic!("refused");
    };
    assert_eq!(reply.status, 502);
    // Provider errors and other content types pass unchecked; namespaces without response
    // rules are not guarded.
    assert!(AnswerGuard::new(
        &set,
        set.answer_context(&ctx),
        429,
        "application/json",
        None
    )
    .is_none());
    assert!(AnswerGuard::new(&set, set.answer_context(&ctx), 200, "audio/mpeg", None).is_none());
    let plain = compile(&policy("allow", "    - id: a\n      when: {match: {field: request.method, op: eq, value: POST}}\n      action: {decision: allow}\n")).unwrap();
    assert!(AnswerGuard::new(
        &plain,
        plain.answer_context(&ctx),
        200,
        "application/json",
        None
    )
    .is_none());
}

#[test]
fn what_a_rule_may_do_and_read_in_each_phase() {
    let cases = [
        (
            "      when: {match: {field: response.text, op: contains, value: x}}\n      action: {decision: deny}\n",
            "is known only once the model answers",
        ),
        (
            "      phase: response\n      when: {match: {field: request.prompt, op: contains, value: x}}\n      action: {decision: deny}\n",
            "cannot read `request.prompt`",
        ),
        (
            "      phase: response\n      when: {cel: \"request.headers['authorization'] != ''\"}\n      action: {decision: deny}\n",
            "",
        ),
        (
            "      phase: response\n      when: {match: {field: response.text, op: contains, value: x}}\n      action: {decision: throttle}\n",
            "cannot have `throttle`",
        ),
        (
            "      phase: response\n      when: {match: {field: response.text, op: contains, value: x}}\n      action: {decision: deny, budget: {key: k, tokens: 10, per: day}}\n",
            "cannot have a budget",
        ),
        (
            "      phase: response\n      when: {plugin: {name: pii-detector}}\n      action: {decision: deny}\n",
            "cannot have a plugin",
        ),
    ];
    for (rule, message) in cases {
        let yaml = policy("allow", &format!("    - id: r\n{rule}"));
        match compile(&yaml) {
            Ok(_) if message.is_empty() => {}
            Ok(_) => panic!("accepted: {rule}"),
            Err(d) => {
                let text = format!("{d:?}");
                assert!(!message.is_empty(), "refused: {text}");
                assert!(
                    text.contains("invalid-phase") || text.contains("InvalidPhase"),
                    "{text}"
                );
                assert!(text.contains(message), "{text}");
            }
        }
    }
}

#[test]
fn interleaved_choices_are_each_read_as_their_own_text() {
    // `n: 2`: the provider interleaves the choices' deltas; the key in choice 0 is whole only
    // when each choice is read apart.
    let set = set();
    let zero = format!("{}then {SECRET} end", "Choice zero talks. ".repeat(10));
    let one = "Choice one says other things entirely. ".repeat(10);
    let mut stream = String::new();
    let (a, b): (Vec<char>, Vec<char>) = (zero.chars().collect(), one.chars().collect());
    for i in 0..a.len().max(b.len()).div_ceil(3) {
        for (index, text) in [(0, &a), (1, &b)] {
            let piece: String = text.iter().skip(i * 3).take(3).collect();
            if !piece.is_empty() {
                stream.push_str(&format!(
                    "data: {{\"choices\":[{{\"index\":{index},\"delta\":{{\"content\":{}}}}}]}}\n\n",
                    serde_json::to_string(&piece).unwrap()
                ));
            }
        }
    }
    stream.push_str("data: [DONE]\n\n");
    let mut g = guard(&set, "/v1/chat/completions", "free", "text/event-stream");
    let sent = String::from_utf8(feed(&mut g, stream.as_bytes(), 10, 0)).unwrap();
    assert_eq!(g.cut().map(|c| c.deny.rule.as_str()), Some("no-keys-out"));
    // Not one piece of the key went out on choice 0.
    let zero_sent: String = sent
        .split("\n\n")
        .filter(|e| e.contains("\"index\":0"))
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e.strip_prefix("data: ")?).ok())
        .map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(
        zero.starts_with(&zero_sent) && zero_sent.len() < zero.find(SECRET).unwrap(),
        "{zero_sent}"
    );
}

#[test]
fn a_private_key_is_cut_at_its_header_and_a_tool_calls_arguments_are_their_own_text() {
    let set = set();
    let pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\nQyNTUxOQAAACDJ1yZ8bR0x4Qh9gX8X8a0m5Jw0n9m4a6n2r9u1o7h2mQAAAJhfYv4dX2L+\n-----END OPENSSH PRIVATE KEY-----\n";
    let text = format!("{}Here it is:\n{pem}", "Some preamble text. ".repeat(10));
    let stream = anthropic_stream(&text, 4);
    let mut g = guard(&set, "/v1/messages", "free", "text/event-stream");
    let sent = String::from_utf8(feed(&mut g, stream.as_bytes(), 10, 0)).unwrap();
    assert_eq!(g.cut().map(|c| c.deny.rule.as_str()), Some("no-keys-out"));
    let streamed: String = sent
        .split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .map(|v| v["delta"]["text"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(streamed.starts_with("Some preamble"), "{streamed}");
    assert!(!streamed.contains("-----BEGIN"), "{streamed}");
}

/// Whether the guard cut the stream (or refused it) after feeding it whole in 7 chunks.
fn cuts(path: &str, stream: &str) -> (bool, String) {
    let set = set();
    let mut g = guard(&set, path, "free", "text/event-stream");
    let sent = String::from_utf8(feed(&mut g, stream.as_bytes(), 7, 0)).unwrap();
    (g.cut().is_some(), sent)
}

#[test]
fn every_answer_shape_is_read() {
    // A Responses API answer carries `"error": null`: it is an answer, checked.
    let set = set();
    let responses = format!(
        r#"{{"id":"r","object":"response","status":"completed","error":null,"incomplete_details":null,"output":[{{"type":"message","content":[{{"type":"output_text","text":"k {SECRET}"}}]}}]}}"#
    );
    let mut g = guard(&set, "/v1/responses", "free", "application/json");
    assert!(matches!(g.push(responses.as_bytes(), true), Pass::Reply(_)));
    // A list of stored completions, and a shape the reader does not know: read whole.
    for body in [
        format!(
            r#"{{"object":"list","data":[{{"choices":[{{"index":0,"message":{{"role":"assistant","content":"{SECRET}"}}}}]}}]}}"#
        ),
        format!(r#"{{"object":"something.new","result_text":{{"value":"{SECRET}"}}}}"#),
        format!(
            r#"{{"object":"list","data":[{{"object":"thread.message","content":[{{"type":"text","text":{{"value":"{SECRET}","annotations":[]}}}}]}}]}}"#
        ),
    ] {
        let mut g = guard(&set, "/v1/chat/completions", "free", "application/json");
        assert!(
            matches!(g.push(body.as_bytes(), true), Pass::Reply(_)),
            "{body}"
        );
    }
    // A provider's error passes as it is.
    let error = r#"{"error":{"message":"rate limited","type":"rate_limit_error"}}"#;
    let mut g = guard(&set, "/v1/chat/completions", "free", "application/json");
    assert_eq!(
        g.push(error.as_bytes(), true),
        Pass::Bytes(error.as_bytes().to_vec())
    );

    let filler = "All fine here. ".repeat(12);
    // The Assistants API's deltas, a Responses tool's output that never streams as deltas, an
    // event type the reader does not know, an Anthropic citation.
    let streams = [
        format!("event: thread.message.delta\ndata: {{\"id\":\"m\",\"object\":\"thread.message.delta\",\"delta\":{{\"content\":[{{\"index\":0,\"type\":\"text\",\"text\":{{\"value\":\"{filler}{SECRET}\"}}}}]}}}}\n\ndata: [DONE]\n\n"),
        format!("event: response.output_item.done\ndata: {{\"type\":\"response.output_item.done\",\"output_index\":1,\"item\":{{\"type\":\"code_interpreter_call\",\"id\":\"ci\",\"code\":\"print('AK'+'IA')\",\"outputs\":[{{\"type\":\"logs\",\"logs\":\"{SECRET}\"}}]}}}}\n\n"),
        format!("event: response.brand_new\ndata: {{\"type\":\"response.brand_new\",\"payload\":{{\"words\":\"{SECRET}\"}}}}\n\n"),
        format!("event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"citations_delta\",\"citation\":{{\"type\":\"char_location\",\"cited_text\":\"{SECRET}\"}}}}}}\n\n"),
    ];
    for stream in streams {
        let (cut, sent) = cuts("/v1/responses", &stream);
        assert!(cut && !sent.contains(SECRET), "{stream}");
    }
}

#[test]
fn a_finished_block_is_released_without_waiting_for_the_end() {
    // Thinking, then text: the thinking block's last events go once it stops, not at the end.
    let mut stream = String::from("event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\"}}\n\n");
    for _ in 0..5 {
        stream.push_str("event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"hmm, \"}}\n\n");
    }
    stream.push_str(
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    );
    stream.push_str("event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n");
    let set = set();
    let mut g = guard(&set, "/v1/messages", "free", "text/event-stream");
    let Pass::Bytes(sent) = g.push(stream.as_bytes(), false) else {
        panic!("a stream");
    };
    let sent = String::from_utf8(sent).unwrap();
    assert!(
        sent.contains("content_block_stop") && sent.contains("\"index\":1"),
        "{sent}"
    );
    // An OpenAI choice that starts a tool call ends its text: it goes.
    let text = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Let me check.\"}}]}\n\n\
                data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"lookup\",\"arguments\":\"\"}}]}}]}\n\n";
    let mut g = guard(&set, "/v1/chat/completions", "free", "text/event-stream");
    let Pass::Bytes(sent) = g.push(text.as_bytes(), false) else {
        panic!("a stream");
    };
    assert!(String::from_utf8(sent).unwrap().contains("Let me check."));
}

#[test]
fn streams_that_cannot_be_checked_are_refused() {
    // More interleaved texts than are kept apart.
    let mut stream = String::new();
    for i in 0..1100 {
        stream.push_str(&format!(
            "data: {{\"choices\":[{{\"index\":{i},\"delta\":{{\"content\":\"x\"}}}}]}}\n\n"
        ));
    }
    let (cut, sent) = cuts("/v1/chat/completions", &stream);
    assert!(
        cut && sent.contains("too many texts"),
        "{}",
        &sent[sent.len().saturating_sub(300)..]
    );
    // More held back than `maxResponseBytes`: one choice that never ends, one that talks on.
    let docs = llm_policy_core::source::parse_str("t.yaml", &policy("deny", RULES)).unwrap();
    let config = llm_policy_core::ContextConfig {
        max_response_bytes: 4096,
        ..Default::default()
    };
    let set = PolicySet::compile(&docs, &config).unwrap().set;
    let ctx = ctx_at(
        "/v1/chat/completions",
        &[],
        r#"{"model":"m","messages":[]}"#,
    );
    let mut g = AnswerGuard::new(
        &set,
        set.answer_context(&ctx),
        200,
        "text/event-stream",
        None,
    )
    .unwrap();
    let mut stream =
        String::from("data: {\"choices\":[{\"index\":1,\"delta\":{\"content\":\"x\"}}]}\n\n");
    for _ in 0..100 {
        stream.push_str(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"more words\"}}]}\n\n",
        );
    }
    let Pass::Bytes(sent) = g.push(stream.as_bytes(), false) else {
        panic!("a stream");
    };
    assert!(
        g.cut().is_some()
            && String::from_utf8(sent)
                .unwrap()
                .contains("holds back too much")
    );
}

#[test]
fn only_what_response_rules_read_is_kept_for_the_answer() {
    let set = set();
    let ctx = ctx_at(
        "/v1/chat/completions",
        &[
            ("authorization", "Bearer sk-client-secret"),
            ("x-user-tier", "admin"),
        ],
        r#"{"model":"m","user":"u-1","messages":[{"role":"user","content":"my prompt"}],"tools":[{"type":"function","function":{"name":"t"}}]}"#,
    );
    let kept = set.answer_context(&ctx);
    let json = serde_json::to_string(&kept).unwrap();
    for gone in ["sk-client-secret", "my prompt", "u-1", "\"t\""] {
        assert!(!json.contains(gone), "{gone} kept: {json}");
    }
    // The rules read the tier (the admins' exemption), so it is kept.
    assert_eq!(kept.principal("tier"), Some("admin"));
    assert!(json.len() < 1024, "{json}");
}

#[test]
fn a_resumed_stream_is_read_from_the_events_that_repeat_its_text() {
    // `GET /v1/responses/{id}?stream=true&starting_after=N` after the deltas: only the events
    // that repeat the text whole come. They are read.
    let stream = format!(
        "event: response.output_text.done\ndata: {{\"type\":\"response.output_text.done\",\"item_id\":\"m\",\"output_index\":0,\"content_index\":0,\"text\":\"the key {SECRET}\"}}\n\n\
         event: response.content_part.done\ndata: {{\"type\":\"response.content_part.done\",\"output_index\":0,\"content_index\":0,\"part\":{{\"type\":\"output_text\",\"text\":\"the key {SECRET}\"}}}}\n\n\
         event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"status\":\"completed\",\"output\":[{{\"type\":\"message\",\"content\":[{{\"type\":\"output_text\",\"text\":\"the key {SECRET}\"}}]}}]}}}}\n\n"
    );
    let (cut, sent) = cuts("/v1/responses", &stream);
    assert!(cut && !sent.contains(SECRET), "{sent}");
    // A whole stream reads each text once (the repeats of a channel that had deltas are not
    // read again): a clean one passes byte for byte.
    let clean = responses_stream(&"plain words ".repeat(30), 5);
    let (cut, sent) = cuts("/v1/responses", &clean);
    assert!(!cut);
    assert_eq!(sent, clean);
}

#[test]
fn built_in_tool_events_do_not_stall_the_stream_and_assistants_tool_calls_are_named() {
    // Reasoning at output 0 (done), a web search at output 1 (events the reader does not know),
    // the message at output 2: the message's deltas flow once 128 bytes of it follow them.
    let mut stream = String::from(
        "event: response.output_item.done\ndata: {\"type\":\"response.output_item.done\",\"output_index\":0,\"item\":{\"type\":\"reasoning\",\"id\":\"rs\",\"summary\":[]}}\n\n\
         event: response.web_search_call.in_progress\ndata: {\"type\":\"response.web_search_call.in_progress\",\"output_index\":1,\"item_id\":\"ws_123\"}\n\n\
         event: response.web_search_call.completed\ndata: {\"type\":\"response.web_search_call.completed\",\"output_index\":1,\"item_id\":\"ws_123\"}\n\n",
    );
    for _ in 0..60 {
        stream.push_str("event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"output_index\":2,\"content_index\":0,\"delta\":\"word \"}\n\n");
    }
    let set = set();
    let mut g = guard(&set, "/v1/responses", "free", "text/event-stream");
    let Pass::Bytes(sent) = g.push(stream.as_bytes(), false) else {
        panic!("a stream");
    };
    let sent = String::from_utf8(sent).unwrap();
    assert!(sent.matches("output_text.delta").count() >= 30, "{sent}");
    // An Assistants run step calling a function named like a shell.
    let step = "event: thread.run.step.delta\ndata: {\"id\":\"s\",\"object\":\"thread.run.step.delta\",\"delta\":{\"step_details\":{\"type\":\"tool_calls\",\"tool_calls\":[{\"index\":0,\"id\":\"c\",\"type\":\"function\",\"function\":{\"name\":\"Bash\",\"arguments\":\"\"}}]}}}\n\n";
    let mut g = guard(&set, "/v1/threads/t/runs", "free", "text/event-stream");
    let _ = g.push(step.as_bytes(), false);
    assert_eq!(g.cut().map(|c| c.deny.rule.as_str()), Some("no-shell"));
}

#[test]
fn a_key_written_with_json_escapes_in_a_tools_arguments_is_caught() {
    // The model writes the key as `\uXXXX` escapes inside the tool's JSON arguments: the client
    // decodes them, so the scanners do too.
    let escaped: String = SECRET
        .chars()
        .map(|c| format!("\\u{:04x}", c as u32))
        .collect();
    let args = format!("{{\"note\": \"{escaped}\"}}");
    let mut stream = String::from("data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"save\",\"arguments\":\"\"}}]}}]}\n\n");
    for piece in args.as_bytes().chunks(7) {
        let piece = std::str::from_utf8(piece).unwrap();
        stream.push_str(&format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"tool_calls\":[{{\"index\":0,\"function\":{{\"arguments\":{}}}}}]}}}}]}}\n\n",
            serde_json::to_string(piece).unwrap()
        ));
    }
    let (cut, sent) = cuts("/v1/chat/completions", &stream);
    assert!(cut, "not cut");
    assert!(!sent.contains("0041\\\\u004b"), "{sent}");
}
