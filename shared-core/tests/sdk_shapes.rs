//! Extraction on requests captured from the official `openai` and `anthropic` Python SDKs
//! (`integration/sdk-fixtures/generate.py`; `make test` checks the files are current).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

use std::path::PathBuf;

use llm_policy_core::context::{Api, Provider};
use llm_policy_core::{ContextConfig, RequestContext, RequestInput};

fn load(name: &str) -> RequestContext {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sdk")
        .join(format!("{name}.json"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let headers: Vec<(String, String)> = v["headers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let body = serde_json::to_vec(&v["body"]).unwrap();
    let input = RequestInput {
        method: v["method"].as_str().unwrap(),
        path: v["path"].as_str().unwrap(),
        headers: &headers,
        body: &body,
        now_unix: 0,
    };
    RequestContext::from_request(&input, &ContextConfig::default()).unwrap()
}

#[test]
fn openai_chat_with_parts_tools_and_stream() {
    let c = load("openai-chat-parts-tools-stream");
    let r = &c.request;
    assert_eq!((r.provider, r.api), (Provider::Openai, Api::Chat));
    assert_eq!(r.model.as_deref(), Some("gpt-4o"));
    assert!(r.stream);
    assert_eq!(r.max_tokens, Some(300));
    assert_eq!(r.temperature, Some(0.2));
    assert_eq!(r.user.as_deref(), Some("end-user-9"));
    assert_eq!(r.tools, vec!["lookup"]);
    assert_eq!(
        r.prompt,
        "Answer in French.\nWhat is in this image?\n{\"q\": \"x\"}\nlookup\nlookup result\nlookup\nproperties\ntype\nobject\nend-user-9"
    );
    assert_eq!(c.principal("tier"), Some("pro"));
}

#[test]
fn openai_chat_plain_with_safety_identifier() {
    let c = load("openai-chat-plain");
    assert_eq!(c.request.max_tokens, Some(50));
    assert_eq!(c.request.user.as_deref(), Some("hashed-user-5"));
    assert_eq!(c.request.messages.len(), 2);
    assert!(!c.request.stream);
}

#[test]
fn openai_completions_and_embeddings() {
    let c = load("openai-completions");
    assert_eq!(
        (c.request.api, c.request.prompt.as_str()),
        (Api::Completions, "one\ntwo")
    );
    let c = load("openai-embeddings");
    assert_eq!(
        (c.request.api, c.request.prompt.as_str()),
        (Api::Embeddings, "embed me\nand me")
    );
    assert_eq!(c.request.model.as_deref(), Some("text-embedding-3-small"));
}

#[test]
fn openai_responses() {
    let c = load("openai-responses-items");
    let r = &c.request;
    assert_eq!(r.api, Api::Responses);
    assert_eq!(r.max_tokens, Some(200));
    assert_eq!(
        r.prompt,
        "You are a support bot.\nlook at this\n{}\nget_weather\ntool says hi\nget_weather"
    );
    let roles: Vec<&str> = r.messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, vec!["system", "user", "assistant", "tool"]);
    assert_eq!(r.tools, vec!["web_search_preview", "get_weather"]);
    let c = load("openai-responses-string");
    assert!(c.request.stream);
    assert_eq!(c.request.prompt, "Tell me a joke");
}

#[test]
fn anthropic_messages() {
    let c = load("anthropic-messages-blocks");
    let r = &c.request;
    assert_eq!((r.provider, r.api), (Provider::Anthropic, Api::Messages));
    assert_eq!(r.max_tokens, Some(1024));
    assert_eq!(r.user.as_deref(), Some("u-77"));
    assert_eq!(r.tools, vec!["get_weather"]);
    assert_eq!(
        r.prompt,
        "You are terse.\nWeather in Paris?\ncity\nParis\nget_weather\n18C\nweather\nproperties\ntype\nobject\nget_weather\nu-77"
    );
    assert_eq!(c.principal("team"), Some("research"));
    let c = load("anthropic-messages-stream");
    assert!(c.request.stream);
    assert_eq!(c.request.prompt, "Be kind.\nhi");
}
