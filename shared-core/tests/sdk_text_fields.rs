//! Every string a client can put in a request, by the official SDKs' own request types: the
//! text the model reads is in `request.prompt`, and what is not text is listed here with its
//! reason. `integration/sdk-fixtures/text_fields.py` walks the `openai` and `anthropic` SDKs'
//! parameter types and captures, per string field, the request the SDK sends with a canary in
//! that field (`tests/fixtures/sdk/text-fields.json`, checked current by `make test`). A field a
//! new SDK adds therefore fails this test until it is either extracted or listed below.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use llm_policy_core::{ContextConfig, RequestContext, RequestInput};
use regex::Regex;

/// Fields whose strings are not text a model reads, each with why. Matched against the field
/// path (`messages[role=user].content[type=image_url].image_url.url`) as a regex.
const NOT_TEXT: &[(&str, &str)] = &[
    (
        r"(.*\.)?model|moderation\..*",
        "a model name (`request.model`)",
    ),
    (
        r"(.*[.\]])?(id|call_id|tool_call_id|tool_use_id|tool_id|caller_id|file_id|download_id|tab_id|skill_id|container_id|approval_request_id|assistant_id|previous_message_id|previous_response_id|conversation(\.id)?)",
        "an identifier the provider issued",
    ),
    (
        r".*(file_ids|vector_store_ids)\[\]",
        "identifiers the provider issued",
    ),
    (
        r".*\.(signature|encrypted_content|encrypted_index|encrypted_stdout|fingerprint)",
        "opaque data the provider issued and checks",
    ),
    (
        r".*source\[type=base64\]\.data|.*\[type=redacted_thinking\]\.data|.*\.file_data|.*input_audio\.data|input\[type=image_generation_call\]\.result",
        "base64 media (images, PDFs, audio) or an encrypted thought",
    ),
    (
        r".*\.logprobs\[\].*",
        "log probabilities of an earlier answer",
    ),
    (
        r".*\.(retrieved_at|version)|prompt\.version|reasoning\..*|audio\.voice.*|context_management\[\]\.type",
        "a timestamp, version or enumeration",
    ),
    (r"logit_bias\{key\}", "token ids"),
    (
        r"tool_choice.*",
        "names a tool offered in `tools` (`request.tools`)",
    ),
    (
        r"(thread\.)?tool_resources\..*",
        "file and vector store identifiers and their labels",
    ),
    (
        r"container(\..*)?",
        "a code-execution container and its skills, by identifier",
    ),
    (
        r"(.*\.)?(headers|authorization|authorization_token)(\{key\})?",
        "credentials the provider uses to reach a remote tool server",
    ),
    (
        r".*\.error(\[type=[a-z_]+\])?\.(type|content\{key\})",
        "an error's type and structured details",
    ),
    (
        r".*\[type=fallback\]\.trigger\{key\}",
        "the structure of a fallback trigger",
    ),
    (
        r"requests\[\]\.custom_id",
        "a batch item's identifier, returned with its result",
    ),
];

#[test]
fn every_sdk_text_field_reaches_the_prompt() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdk/text-fields.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(cases.len() > 1000, "{} cases", cases.len());
    let not_text: Vec<(Regex, &str)> = NOT_TEXT
        .iter()
        .map(|(p, why)| (Regex::new(&format!("^(?:{p})$")).unwrap(), *why))
        .collect();
    let mut missed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut listed_but_read = Vec::new();
    for case in &cases {
        let api = case["api"].as_str().unwrap();
        let field = case["field"].as_str().unwrap();
        let canary = case["canary"].as_str().unwrap();
        let req = &case["request"];
        let headers: Vec<(String, String)> = req["headers"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let body = serde_json::to_vec(&req["body"]).unwrap();
        let input = RequestInput {
            method: req["method"].as_str().unwrap(),
            path: req["path"].as_str().unwrap(),
            headers: &headers,
            body: &body,
            now_unix: 0,
        };
        let c = RequestContext::from_request(&input, &ContextConfig::default())
            .unwrap_or_else(|e| panic!("{api} {field}: {e}"));
        let read =
            c.request.prompt.contains(canary) || c.batch.iter().any(|b| b.prompt.contains(canary));
        // A batch item's `params` is a Messages request: the same fields, the same reasons.
        let inner = field.strip_prefix("requests[].params.").unwrap_or(field);
        let excused = not_text
            .iter()
            .any(|(re, _)| re.is_match(field) || re.is_match(inner));
        if !read && !excused {
            missed
                .entry(api.to_string())
                .or_default()
                .push(field.to_string());
        }
        if read && excused {
            listed_but_read.push(format!("{api} {field}"));
        }
    }
    let report: Vec<String> = missed
        .iter()
        .map(|(api, fields)| format!("## {api} ({})\n{}", fields.len(), fields.join("\n")))
        .collect();
    assert!(
        missed.is_empty(),
        "string fields neither in the prompt nor listed as not text:\n{}",
        report.join("\n")
    );
    assert!(
        listed_but_read.len() < 50,
        "fields listed as not text that reach the prompt: the list is too wide:\n{}",
        listed_but_read.join("\n")
    );
}
