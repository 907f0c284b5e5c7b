//! Context extraction from real request shapes: OpenAI Chat Completions, Completions, Embeddings,
//! Responses; Anthropic Messages; unknown providers; and the errors a proxy turns into 4xx.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;

use common::{ctx, ctx_at, try_ctx};
use llm_policy_core::context::{Api, Needs, Provider};
use llm_policy_core::ContextError;
use llm_policy_core::{ContextConfig, RequestContext, RequestInput};

#[test]
fn openai_chat_with_parts_tools_and_options() {
    let body = r#"{
      "model": "gpt-4o",
      "messages": [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [
          {"type": "text", "text": "What is in this image?"},
          {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}
        ]},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":\"x\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "lookup result"}
      ],
      "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
      "max_completion_tokens": 300, "temperature": 0.2, "stream": true,
      "stream_options": {"include_usage": true}, "user": "end-user-9", "n": 1,
      "response_format": {"type": "json_object"}
    }"#;
    let c = ctx_at(
        "/v1/chat/completions?api-version=1",
        &[("Host", "api.openai.com"), ("X-User-Tier", "pro")],
        body,
    );
    let r = &c.request;
    assert_eq!((r.provider, r.api), (Provider::Openai, Api::Chat));
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(r.host, "api.openai.com");
    assert_eq!(r.model.as_deref(), Some("gpt-4o"));
    assert_eq!(r.max_tokens, Some(300));
    assert_eq!(r.temperature, Some(0.2));
    assert!(r.stream);
    assert_eq!(r.user.as_deref(), Some("end-user-9"));
    assert_eq!(r.tools, vec!["lookup"]);
    let roles: Vec<&str> = r.messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, vec!["developer", "user", "assistant", "tool"]);
    assert_eq!(r.messages[1].content, "What is in this image?");
    assert_eq!(
        r.prompt,
        "Answer in French.\nWhat is in this image?\nlookup\n{\"q\":\"x\"}\nlookup result\nlookup\ntype\nobject\nend-user-9\ntype\njson_object"
    );
    assert_eq!(
        r.estimated_tokens,
        llm_policy_core::tokens::estimate(&r.prompt) as i64
    );
    assert_eq!(c.principal("tier"), Some("pro"));
    assert_eq!(c.header("x-user-tier"), Some("pro"));
    assert_eq!(r.body_bytes, body.len() as i64);
}

#[test]
fn anthropic_messages_with_system_blocks_and_tool_blocks() {
    let body = r#"{
      "model": "claude-sonnet-4-5", "max_tokens": 1024,
      "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
      "metadata": {"user_id": "u-77"},
      "tools": [{"name": "get_weather", "description": "w", "input_schema": {"type": "object"}}],
      "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "18C"}]},
                                      {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}
      ]
    }"#;
    let c = ctx_at(
        "/v1/messages",
        &[("anthropic-version", "2023-06-01"), ("x-api-key", "k")],
        body,
    );
    let r = &c.request;
    assert_eq!((r.provider, r.api), (Provider::Anthropic, Api::Messages));
    assert_eq!(r.max_tokens, Some(1024));
    assert_eq!(r.user.as_deref(), Some("u-77"));
    assert_eq!(r.tools, vec!["get_weather"]);
    assert_eq!(r.messages[0].role, "system");
    // The tool call's input is text the model reads (a secret in it must be caught).
    assert_eq!(
        r.prompt,
        "You are terse.\nWeather in Paris?\nget_weather\ncity\nParis\n18C\nget_weather\nw\ntype\nobject\nu-77"
    );
    // The turns hold the messages only; the tool definitions and metadata are in the prompt.
    assert_eq!(r.messages.last().unwrap().content, "18C");
    assert_eq!(r.tool_types, vec!["function"]);
}

#[test]
fn anthropic_string_system() {
    let c = ctx_at(
        "/v1/messages",
        &[],
        r#"{"model":"claude-3-5-haiku-latest","max_tokens":5,"system":"Be kind.","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(c.request.prompt, "Be kind.\nhi");
}

#[test]
fn responses_api_input_forms() {
    let c = ctx_at(
        "/v1/responses",
        &[],
        r#"{"model":"gpt-4o","input":"Tell me a joke","instructions":"Be funny","max_output_tokens":50}"#,
    );
    assert_eq!(c.request.api, Api::Responses);
    assert_eq!(c.request.max_tokens, Some(50));
    assert_eq!(c.request.prompt, "Be funny\nTell me a joke");
    let body = r#"{"model":"o3-mini","input":[
        {"role":"user","content":[{"type":"input_text","text":"look"},{"type":"input_image","image_url":"https://x/y.png"}]},
        {"type":"function_call","call_id":"c","name":"f","arguments":"{}"},
        {"type":"function_call_output","call_id":"c","output":"tool says hi"},
        {"type":"reasoning","id":"r","summary":[]}],
      "tools":[{"type":"web_search_preview"},{"type":"function","name":"f","parameters":{}}]}"#;
    let c = ctx_at("/v1/responses", &[], body);
    assert_eq!(
        c.request.prompt,
        "look\nhttps://x/y.png\nf\n{}\ntool says hi\nf"
    );
    assert_eq!(c.request.tools, vec!["web_search_preview", "f"]);
    assert_eq!(c.request.tool_types, vec!["web_search", "function"]);
    assert!(c
        .request
        .messages
        .iter()
        .any(|m| m.role == "tool" && m.content == "tool says hi"));
}

#[test]
fn completions_and_embeddings() {
    let c = ctx_at(
        "/v1/completions",
        &[],
        r#"{"model":"gpt-3.5-turbo-instruct","prompt":["one","two"],"max_tokens":7}"#,
    );
    assert_eq!(
        (c.request.api, c.request.max_tokens),
        (Api::Completions, Some(7))
    );
    assert_eq!(c.request.prompt, "one\ntwo");
    let c = ctx_at(
        "/v1/embeddings",
        &[],
        r#"{"model":"text-embedding-3-small","input":"embed me"}"#,
    );
    assert_eq!(
        (c.request.api, c.request.prompt.as_str()),
        (Api::Embeddings, "embed me")
    );
    // Token-array inputs carry no text.
    let c = ctx_at(
        "/v1/embeddings",
        &[],
        r#"{"model":"text-embedding-3-small","input":[[1,2,3],[4]]}"#,
    );
    assert_eq!(c.request.prompt, "");
}

#[test]
fn azure_and_unknown_providers() {
    let c = ctx_at(
        "/openai/deployments/gpt4o-prod/chat/completions",
        &[],
        r#"{"messages":[{"role":"user","content":"x"}]}"#,
    );
    assert_eq!(c.request.provider, Provider::Openai);
    assert_eq!(c.request.model.as_deref(), Some("gpt4o-prod"));
    let c = ctx_at(
        "/api/generate",
        &[],
        r#"{"model":"llama3","prompt":"hello","stream":false}"#,
    );
    assert_eq!(
        (c.request.provider, c.request.api),
        (Provider::Unknown, Api::Other)
    );
    assert_eq!(c.request.model.as_deref(), Some("llama3"));
    assert_eq!(c.request.prompt, "hello");
}

#[test]
fn missing_headers_and_body_give_documented_defaults() {
    let c = ctx_at("/v1/models", &[], "");
    assert_eq!(c.namespace, "default");
    assert_eq!(c.request.model, None);
    assert!(!c.request.stream);
    assert_eq!(c.request.max_tokens, None);
    assert_eq!(c.request.prompt, "");
    assert_eq!(c.principal("id"), None);
    assert!(c.shield.is_empty());
}

#[test]
fn shield_headers_become_scores() {
    let c = ctx_at(
        "/v1/chat/completions",
        &[
            ("x-llm-shield-pii-score", "0.93"),
            ("x-llm-shield-verdict", "block"),
        ],
        "{}",
    );
    let s = serde_json::to_value(&c.shield).unwrap();
    assert_eq!(
        s,
        serde_json::json!([["pii_score", 0.93], ["verdict", "block"]])
    );
}

#[test]
fn bad_bodies_are_clear_errors() {
    let e = try_ctx("/v1/chat/completions", &[], "{\"model\": \"gpt-4o\",").unwrap_err();
    assert!(matches!(e, ContextError::InvalidBody(_)));
    assert_eq!(e.status(), 400);
    let e = try_ctx("/v1/chat/completions", &[], "[1,2]").unwrap_err();
    assert_eq!(
        e,
        ContextError::InvalidBody("the body must be a JSON object".into())
    );
    let e = try_ctx("/v1/chat/completions", &[], "hello").unwrap_err();
    assert_eq!(e.code(), "invalid_body");
    let e = try_ctx("/v1/chat/completions", &[], r#"{"model": 5}"#).unwrap_err();
    assert!(
        matches!(&e, ContextError::InvalidField { field, .. } if field == "model"),
        "{e}"
    );
    let e = try_ctx(
        "/v1/chat/completions",
        &[],
        r#"{"messages": [{"role": "user", "content": 5}], "max_tokens": "x"}"#,
    )
    .unwrap_err();
    assert!(
        matches!(&e, ContextError::InvalidField { field, .. } if field == "max_tokens"),
        "{e}"
    );
    let e = try_ctx("/v1/chat/completions", &[], "{} trailing").unwrap_err();
    assert_eq!(e.code(), "invalid_body");
    let big = format!("{{\"model\":\"{}\"}}", "a".repeat(5 * 1024 * 1024));
    let e = try_ctx("/v1/chat/completions", &[], &big).unwrap_err();
    assert_eq!(e.status(), 413);
}

#[test]
fn multipart_uploads_are_not_parsed() {
    let c = try_ctx(
        "/v1/audio/transcriptions",
        &[("content-type", "multipart/form-data; boundary=x")],
        "--x\r\n...",
    )
    .unwrap();
    assert_eq!(c.request.body_bytes, 8);
    assert_eq!(c.request.model, None);
}

#[test]
fn deeply_nested_json_is_an_error_not_a_crash() {
    // Valid but absurd: an item that is a deeply nested array is skipped like a token array.
    let body = format!(
        "{{\"messages\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let c = try_ctx("/v1/chat/completions", &[], &body).unwrap();
    assert!(c.request.messages.is_empty());
    // Nesting in content hits serde_json's recursion limit: a 400, not a stack overflow.
    let body = format!(
        "{{\"messages\":[{{\"role\":\"user\",\"content\":{}{}}}]}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert_eq!(
        try_ctx("/v1/chat/completions", &[], &body)
            .unwrap_err()
            .status(),
        400
    );
    // Unknown fields are text the provider receives: when a rule reads the prompt, nesting in them
    // is refused the same way; when none does, they are skipped without recursion, however deep.
    let body = format!(
        "{{\"x\":{}1{}}}",
        "{\"a\":".repeat(100_000),
        "}".repeat(100_000)
    );
    assert_eq!(
        try_ctx("/v1/chat/completions", &[], &body)
            .unwrap_err()
            .status(),
        400
    );
    let input = RequestInput {
        method: "POST",
        path: "/v1/chat/completions",
        headers: &[],
        body: body.as_bytes(),
        now_unix: 0,
    };
    assert!(
        RequestContext::from_request_with(&input, &ContextConfig::default(), Needs::NONE).is_ok()
    );
}

#[test]
fn multipart_is_recognised_in_any_case() {
    for ct in [
        "Multipart/form-data; boundary=x",
        "MULTIPART/FORM-DATA; boundary=x",
        " multipart/form-data",
    ] {
        let c = try_ctx(
            "/v1/audio/transcriptions",
            &[("Content-Type", ct)],
            "--x\r\n...",
        );
        assert!(c.is_ok(), "{ct}: {c:?}");
    }
}

/// Every piece of text the model reads reaches `request.prompt`: what a secret or jailbreak rule
/// scans. Each case hides the marker where an earlier version did not look.
#[test]
fn prompt_holds_every_text_the_model_reads() {
    let marker = "sk-HIDDEN0123456789";
    type Case = (
        &'static str,
        &'static [(&'static str, &'static str)],
        String,
    );
    let cases: Vec<Case> = vec![
        // Anthropic document block with a plain-text source.
        (
            "/v1/messages",
            &[],
            format!(
                r#"{{"model":"c","max_tokens":5,"messages":[{{"role":"user","content":[
                {{"type":"document","source":{{"type":"text","media_type":"text/plain","data":"{marker}"}}}}]}}]}}"#
            ),
        ),
        // Anthropic document block: title and context are read too.
        (
            "/v1/messages",
            &[],
            format!(
                r#"{{"model":"c","max_tokens":5,"messages":[{{"role":"user","content":[
                {{"type":"document","title":"{marker}","source":{{"type":"url","url":"https://x"}}}}]}}]}}"#
            ),
        ),
        // Anthropic document block with a content source.
        (
            "/v1/messages",
            &[],
            format!(
                r#"{{"model":"c","max_tokens":5,"messages":[{{"role":"user","content":[
                {{"type":"document","source":{{"type":"content","content":[{{"type":"text","text":"{marker}"}}]}}}}]}}]}}"#
            ),
        ),
        // Anthropic tool_use input (nested strings).
        (
            "/v1/messages",
            &[],
            format!(
                r#"{{"model":"c","max_tokens":5,"messages":[{{"role":"assistant","content":[
                {{"type":"tool_use","id":"t","name":"sh","input":{{"cmd":["export", {{"k":"{marker}"}}]}}}}]}}]}}"#
            ),
        ),
        // Anthropic thinking block.
        (
            "/v1/messages",
            &[],
            format!(
                r#"{{"model":"c","max_tokens":5,"messages":[{{"role":"assistant","content":[
                {{"type":"thinking","thinking":"{marker}","signature":"s"}}]}}]}}"#
            ),
        ),
        // OpenAI chat tool_calls arguments.
        (
            "/v1/chat/completions",
            &[],
            format!(
                r#"{{"model":"m","messages":[{{"role":"assistant","content":null,"tool_calls":[
                {{"id":"c","type":"function","function":{{"name":"f","arguments":"{{\"key\":\"{marker}\"}}"}}}}]}}]}}"#
            ),
        ),
        // OpenAI legacy function_call arguments.
        (
            "/v1/chat/completions",
            &[],
            format!(
                r#"{{"model":"m","messages":[{{"role":"assistant","content":null,
                "function_call":{{"name":"f","arguments":"{marker}"}}}}]}}"#
            ),
        ),
        // Responses function_call and custom_tool_call items.
        (
            "/v1/responses",
            &[],
            format!(
                r#"{{"model":"m","input":[{{"type":"function_call","call_id":"c","name":"f","arguments":"{marker}"}}]}}"#
            ),
        ),
        (
            "/v1/responses",
            &[],
            format!(
                r#"{{"model":"m","input":[{{"type":"custom_tool_call","call_id":"c","name":"f","input":"{marker}"}}]}}"#
            ),
        ),
        // Responses prompt-template variables.
        (
            "/v1/responses",
            &[],
            format!(
                r#"{{"model":"m","prompt":{{"id":"pmpt_1","variables":{{"customer":"{marker}"}}}},"input":"hi"}}"#
            ),
        ),
        // Completions suffix.
        (
            "/v1/completions",
            &[],
            format!(r#"{{"model":"m","prompt":"def f():","suffix":"{marker}"}}"#),
        ),
        // A key of a tool call's input.
        (
            "/v1/messages",
            &[],
            format!(
                r#"{{"model":"c","max_tokens":5,"messages":[{{"role":"assistant","content":[
                {{"type":"tool_use","id":"t","name":"sh","input":{{"{marker}":1}}}}]}}]}}"#
            ),
        ),
        // A chat participant's name.
        (
            "/v1/chat/completions",
            &[],
            format!(
                r#"{{"model":"m","messages":[{{"role":"user","name":"{marker}","content":"hi"}}]}}"#
            ),
        ),
        // A search result's title.
        (
            "/v1/messages",
            &[],
            format!(
                r#"{{"model":"c","max_tokens":5,"messages":[{{"role":"user","content":[
                {{"type":"search_result","source":"https://x","title":"{marker}","content":[{{"type":"text","text":"r"}}]}}]}}]}}"#
            ),
        ),
        // A JSON API called with a multipart content type is still read as JSON.
        (
            "/v1/chat/completions",
            &[("content-type", "multipart/form-data; boundary=x")],
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{marker}"}}]}}"#),
        ),
        // Refusal parts.
        (
            "/v1/chat/completions",
            &[],
            format!(
                r#"{{"model":"m","messages":[{{"role":"assistant","content":[{{"type":"refusal","refusal":"{marker}"}}]}}]}}"#
            ),
        ),
    ];
    for (path, headers, body) in cases {
        let c = ctx_at(path, headers, &body);
        assert!(
            c.request.prompt.contains(marker),
            "{path}: marker missing from prompt {:?} for {body}",
            c.request.prompt
        );
    }
}

#[test]
fn binary_sources_are_not_text() {
    let c = ctx_at(
        "/v1/messages",
        &[],
        r#"{"model":"c","max_tokens":5,"messages":[{"role":"user","content":[
            {"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBORw0KGgo"}},
            {"type":"document","source":{"type":"base64","media_type":"application/pdf","data":"JVBERi0x"}},
            {"type":"text","text":"describe"}]}]}"#,
    );
    assert_eq!(c.request.prompt, "describe");
}

#[test]
fn azure_deployment_is_the_model_whatever_the_body_says() {
    let c = ctx_at(
        "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-06-01",
        &[],
        r#"{"model":"gpt-4o-mini","messages":[]}"#,
    );
    assert_eq!(c.request.model.as_deref(), Some("gpt-4o-prod"));
    assert_eq!(c.request.provider, Provider::Openai);
}

#[test]
fn anthropic_batches_are_read_item_by_item() {
    let body = r#"{"requests":[
        {"custom_id":"a","params":{"model":"claude-sonnet-4-5","max_tokens":10,"messages":[{"role":"user","content":"hello"}]}},
        {"custom_id":"b","params":{"model":"claude-opus-4","max_tokens":99,"messages":[{"role":"user","content":"sk-SECRET"}]}}]}"#;
    let c = ctx_at(
        "/v1/messages/batches",
        &[("anthropic-version", "2023-06-01")],
        body,
    );
    assert_eq!(
        (c.request.provider, c.request.api),
        (Provider::Anthropic, Api::Batch)
    );
    assert_eq!(c.request.model, None);
    assert_eq!(c.batch.len(), 2);
    let b = &c.batch[1];
    assert_eq!(b.api, Api::Messages);
    assert_eq!(b.model.as_deref(), Some("claude-opus-4"));
    assert_eq!(b.max_tokens, Some(99));
    assert_eq!(b.prompt, "sk-SECRET");
    let item = c.batch_item(1).unwrap();
    assert_eq!(item.request.path, "/v1/messages/batches");
    assert_eq!(item.request.model.as_deref(), Some("claude-opus-4"));
    // Retrieving or cancelling a batch is not a batch body.
    let c = ctx_at("/v1/messages/batches/msgbatch_1/cancel", &[], "");
    assert_eq!(c.request.api, Api::Other);
}

#[test]
fn openai_batches_reference_an_uploaded_file() {
    let c = ctx_at(
        "/v1/batches",
        &[],
        r#"{"input_file_id":"file-1","endpoint":"/v1/chat/completions","completion_window":"24h"}"#,
    );
    assert_eq!(
        (c.request.provider, c.request.api),
        (Provider::Openai, Api::Batch)
    );
    assert!(c.batch.is_empty());
    assert_eq!(c.request.model, None);
}

#[test]
fn the_largest_token_cap_a_body_names_is_the_one_rules_see() {
    let c = ctx_at(
        "/v1/chat/completions",
        &[],
        r#"{"model":"m","max_tokens":100,"max_completion_tokens":100000,"messages":[]}"#,
    );
    assert_eq!(c.request.max_tokens, Some(100_000));
}

#[test]
fn huge_max_tokens_saturate_instead_of_overflowing() {
    let c = ctx_at(
        "/v1/chat/completions",
        &[],
        r#"{"model":"m","max_tokens":9223372036854775807,"messages":[{"role":"user","content":"hi there"}]}"#,
    );
    assert_eq!(c.request.max_tokens, Some(i64::MAX));
}

#[test]
fn paths_are_classified_as_a_server_resolves_them() {
    for path in [
        "/v1/chat/completion%73",
        "/v1/chat/completions/.",
        "//v1//chat/completions",
        "/v1/x/../chat/completions",
        "/v1/chat/%63ompletions?x=1#f",
    ] {
        let c = ctx_at(path, &[], r#"{"model":"m","messages":[]}"#);
        assert_eq!(c.request.api, Api::Chat, "{path}");
        assert_eq!(
            c.request.path.trim_end_matches('/'),
            "/v1/chat/completions",
            "{path}"
        );
    }
    // Spellings servers disagree on (escaped slashes, case, `;` parameters, `\\`) are read
    // the widest way for classification; the path itself keeps them.
    for path in [
        "/v1/chat%2Fcompletions",
        "/v1/Chat/Completions",
        "/v1/chat/completions;x=1",
        "/v1\\chat\\completions",
    ] {
        let c = ctx_at(path, &[], "{}");
        assert_eq!(c.request.api, Api::Chat, "{path}");
    }
    assert_eq!(
        ctx_at("/v1/chat%2Fcompletions", &[], "{}").request.path,
        "/v1/chat%2Fcompletions"
    );
    assert_eq!(ctx_at("", &[], "").request.path, "/");
}

#[test]
fn a_header_sent_twice_has_both_values_in_arrival_order() {
    let c = ctx(&[("x-a", "1"), ("X-A", "2"), ("x-user-tier", "pro")], "{}");
    assert_eq!(c.header("x-a"), Some("1,2"));
    // Principal and namespace headers: the same value twice is that value; different values
    // are refused (joined, `free,pro` would slip past every rule on `free`).
    let c = ctx(&[("x-user-tier", "free"), ("X-User-Tier", "free")], "{}");
    assert_eq!(c.principal("tier"), Some("free"));
    for dup in [("x-user-tier", "pro"), ("x-user-id", "u2")] {
        let mut headers = vec![("x-user-tier", "free"), ("x-user-id", "u1")];
        headers.push(dup);
        let h: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let input = llm_policy_core::RequestInput {
            method: "POST",
            path: "/v1/chat/completions",
            headers: &h,
            body: b"{}",
            now_unix: 0,
        };
        let e = llm_policy_core::RequestContext::from_request(
            &input,
            &llm_policy_core::ContextConfig::default(),
        )
        .unwrap_err();
        assert_eq!(e.code(), "ambiguous_header");
        assert_eq!(e.status(), 400);
    }
}

#[test]
fn a_shield_header_spelled_with_underscores_cannot_shadow_a_score() {
    let c = ctx(
        &[
            ("x-llm-shield-pii-score", "0.99"),
            ("x-llm-shield-pii_score", "0"),
        ],
        "{}",
    );
    assert_eq!(c.shield.len(), 1);
    assert_eq!(c.shield[0].0, "pii_score");
    assert_eq!(
        c.shield[0].1,
        llm_policy_core::context::ShieldValue::Number(0.99)
    );
}

#[test]
fn a_repeated_requests_key_counts_every_item() {
    let items = vec!["{}"; 6000].join(",");
    let e = try_ctx(
        "/v1/messages/batches",
        &[],
        &format!(r#"{{"requests":[{items}],"requests":[{items}]}}"#),
    )
    .unwrap_err();
    assert_eq!(e.code(), "batch_too_large");
}

#[test]
fn a_batch_over_the_item_limit_is_refused_before_it_is_built() {
    let items = vec![r#"{"params":{}}"#; 10_001].join(",");
    let e = try_ctx(
        "/v1/messages/batches",
        &[],
        &format!(r#"{{"requests":[{items}]}}"#),
    )
    .unwrap_err();
    assert_eq!((e.status(), e.code()), (413, "batch_too_large"));
}

#[test]
fn a_score_sent_twice_counts_at_its_highest() {
    let c = ctx_at(
        "/v1/chat/completions",
        &[
            ("X-LLM-SHIELD-JAILBREAK", "0"),
            ("x-llm-shield-jailbreak", "0.95"),
            ("x-llm-shield-label", "a"),
            ("x-llm-shield-label", "0.5"),
        ],
        "{}",
    );
    let s = serde_json::to_value(&c.shield).unwrap();
    assert_eq!(
        s,
        serde_json::json!([["jailbreak", 0.95], ["label", "a,0.5"]])
    );
}

#[test]
fn reads_without_a_body_are_no_model_calls_but_a_body_makes_one() {
    let read = |method: &str, body: &str| {
        let h: Vec<(String, String)> = Vec::new();
        let input = llm_policy_core::RequestInput {
            method,
            path: "/v1/chat/completions",
            headers: &h,
            body: body.as_bytes(),
            now_unix: 0,
        };
        llm_policy_core::RequestContext::from_request(
            &input,
            &llm_policy_core::ContextConfig::default(),
        )
        .unwrap()
        .request
        .api
    };
    // `GET /v1/chat/completions` lists stored completions.
    assert_eq!(read("GET", ""), Api::Other);
    assert_eq!(read("delete", " \n"), Api::Other);
    // A prompt sent with another method is still read as the call it would be.
    assert_eq!(read("GET", r#"{"model":"m","messages":[]}"#), Api::Chat);
    assert_eq!(read("POST", ""), Api::Chat);
}
