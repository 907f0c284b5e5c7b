//! Tools as rules see them: names folded (a rule for `bash` holds for `Bash`, `ＢＡＳＨ` and a
//! Cyrillic look-alike), built-in and server tools of both providers under one type each
//! (`request.tool_types`), tools added by input items and MCP servers counted, and credentials in
//! tool definitions kept out of the prompt.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;

use common::{compile, ctx, ctx_at, eval, policy};
use llm_policy_core::decision::Verdict;

const ANTHROPIC: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":10,
  "messages":[{"role":"user","content":"hi"}],
  "tools":[
    {"type":"bash_20250124","name":"bash"},
    {"type":"code_execution_20250825","name":"code_execution"},
    {"type":"web_search_20250305","name":"web_search","max_uses":3},
    {"type":"computer_20250124","name":"computer","display_width_px":1024,"display_height_px":768},
    {"type":"text_editor_20250728","name":"str_replace_based_edit_tool"},
    {"type":"web_fetch_20250910","name":"web_fetch"},
    {"name":"Run_Shell","description":"runs a command","input_schema":{"type":"object"}}],
  "mcp_servers":[{"type":"url","url":"https://mcp.example/sse","name":"GitHub","authorization_token":"ghp_000000000000000000000000000000000000"}]}"#;

const RESPONSES: &str = r#"{"model":"gpt-4o","input":[
    {"role":"user","content":"hi"},
    {"type":"additional_tools","tools":[{"type":"code_interpreter","container":{"type":"auto"}}]}],
  "tools":[
    {"type":"web_search_preview_2025_03_11"},
    {"type":"local_shell"},
    {"type":"computer_use_preview","display_width":1024,"display_height":768,"environment":"browser"},
    {"type":"mcp","server_label":"Deepwiki","server_url":"https://mcp.example/mcp","headers":{"Authorization":"Bearer sk-proj-000000000000000000000000"}},
    {"type":"function","name":"ＢＡＳＨ","parameters":{}}]}"#;

#[test]
fn server_tools_of_both_providers_have_one_type_each() {
    let c = ctx_at(
        "/v1/messages",
        &[("anthropic-version", "2023-06-01")],
        ANTHROPIC,
    );
    let r = &c.request;
    assert_eq!(
        r.tools,
        vec![
            "bash",
            "code_execution",
            "web_search",
            "computer",
            "str_replace_based_edit_tool",
            "web_fetch",
            "run_shell",
            "github"
        ]
    );
    assert_eq!(
        r.tool_types,
        vec![
            "bash",
            "code_execution",
            "web_search",
            "computer_use",
            "text_editor",
            "web_fetch",
            "function",
            "mcp"
        ]
    );
    assert!(r.prompt.contains("runs a command"));
    assert!(r.prompt.contains("https://mcp.example/sse"));
    assert!(!r.prompt.contains("ghp_"), "{}", r.prompt);

    let c = ctx_at("/v1/responses", &[], RESPONSES);
    let r = &c.request;
    assert_eq!(
        r.tools,
        vec![
            "web_search_preview_2025_03_11",
            "local_shell",
            "computer_use_preview",
            "deepwiki",
            "bash",
            "code_interpreter"
        ]
    );
    assert_eq!(
        r.tool_types,
        vec![
            "web_search",
            "bash",
            "computer_use",
            "mcp",
            "function",
            "code_execution"
        ]
    );
    assert!(!r.prompt.contains("sk-proj"), "{}", r.prompt);
}

#[test]
fn tool_rules_hold_whatever_the_case_or_script_of_the_name() {
    let rules = [
        "    - id: r\n      when: { match: { field: request.tools, op: contains, value: [Bash] } }\n      action: { decision: deny }\n",
        "    - id: r\n      when: { cel: \"'Bash' in request.tools\" }\n      action: { decision: deny }\n",
        "    - id: r\n      when: { cel: \"request.tools.exists(t, t == 'BASH' || (t.startsWith('Ba') && t.endsWith('SH')))\" }\n      action: { decision: deny }\n",
        "    - id: r\n      when: { match: { field: request.tool_types, op: contains, value: [code_execution] } }\n      action: { decision: deny }\n",
    ];
    let body = |tool: &str| {
        format!(
            r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"hi"}}],"tools":[{{"type":"function","function":{{"name":"{tool}"}}}}]}}"#
        )
    };
    for (i, rule) in rules.iter().enumerate() {
        let set = compile(&policy("allow", rule)).unwrap_or_else(|e| panic!("{rule}: {e}"));
        if i < 3 {
            for name in [
                "bash",
                "Bash",
                "BASH",
                "ＢＡＳＨ",
                "bаsh", /* Cyrillic а */
            ] {
                let d = eval(&set, &ctx(&[], &body(name)));
                assert_eq!(d.decision, Verdict::Deny, "{rule} {name}");
            }
            let d = eval(&set, &ctx(&[], &body("bashful")));
            assert_eq!(d.decision, Verdict::Allow, "{rule}");
        } else {
            for (b, want) in [
                (
                    r#"{"model":"claude-sonnet-4-5","max_tokens":1,"messages":[],"tools":[{"type":"code_execution_20260120","name":"code_execution"}]}"#,
                    Verdict::Deny,
                ),
                (
                    r#"{"model":"gpt-4o","input":"x","tools":[{"type":"code_interpreter","container":{"type":"auto"}}]}"#,
                    Verdict::Deny,
                ),
                (
                    r#"{"model":"gpt-4o","input":"x","tools":[{"type":"function","name":"code_execution"}]}"#,
                    Verdict::Allow,
                ),
            ] {
                let path = if b.contains("claude") {
                    "/v1/messages"
                } else {
                    "/v1/responses"
                };
                let d = eval(&set, &ctx_at(path, &[], b));
                assert_eq!(d.decision, want, "{b}");
            }
        }
    }
}
