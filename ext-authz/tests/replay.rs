//! `llm-policy replay` on what a real server recorded: decision records with their context
//! (`audit.context`), credentials and text kept out of them, re-decided with a candidate bundle,
//! the difference by rule.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;

use std::process::Command;

use common::{chat, check, check_request, policy, Harness};
use serde_json::Value;

fn rules(models: &[&str]) -> String {
    models
        .iter()
        .map(|m| format!("    - {{id: deny-{m}, when: {{cel: \"request.model == '{m}'\"}}, action: {{decision: deny}}}}\n"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_shows_what_a_candidate_would_change_by_rule() {
    let h = Harness::start(
        &[("base.yaml", &policy("base", "allow", &rules(&["gpt-bad"])))],
        |c| {
            c.audit.context = true;
        },
    )
    .await;
    let mut grpc = h.grpc().await;
    let secret = "sk-live-1234567890abcdefghij";
    for (model, n) in [("gpt-bad", 2), ("gpt-ok", 3), ("gpt-new", 4)] {
        for _ in 0..n {
            let a = check(
                &mut grpc,
                check_request(
                    "POST",
                    "/v1/chat/completions",
                    &[
                        ("authorization", &format!("Bearer {secret}")),
                        ("x-user-tier", "free"),
                    ],
                    &chat(model, "my address is alice@example.com, open sesame"),
                ),
            )
            .await;
            assert_eq!(a.allowed, model != "gpt-bad");
        }
    }
    let log = h.stop().await;
    let keep = tempfile::tempdir().unwrap();
    let dir = keep.path().to_path_buf();
    let audit = dir.join("audit.log");
    std::fs::write(&audit, &log).unwrap();

    // The records hold the context, never the credentials or (prompts: off) the text.
    let records: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &Value| r["kind"] == "decision")
        .collect();
    assert_eq!(records.len(), 9);
    assert!(!log.contains(secret), "a credential in the audit log");
    assert!(
        !log.contains("alice@example.com"),
        "the prompt in the audit log"
    );
    let ctx = &records[0]["context"];
    assert_eq!(ctx["request"]["model"], "gpt-bad");
    assert_eq!(ctx["request"]["prompt"], "");
    assert!(
        ctx["request"]["headers"].get("authorization").is_none(),
        "{ctx}"
    );
    assert_eq!(ctx["request"]["headers"]["x-user-tier"], "free");
    // The scanners' findings are kept (kinds, never values): a replay can judge them.
    assert!(
        ctx["request"]["prompt_entities"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "email"),
        "{ctx}"
    );
    assert_eq!(records[0]["deciding_rule"], "deny-gpt-bad");

    // The candidate: gpt-new denied too, gpt-bad allowed again, and a rule on the prompt text.
    let candidate = dir.join("candidate");
    std::fs::create_dir_all(&candidate).unwrap();
    let text_rule = "    - {id: deny-sesame, when: {cel: \"request.prompt.contains('sesame')\"}, action: {decision: deny}}\n";
    std::fs::write(
        candidate.join("base.yaml"),
        policy(
            "base",
            "allow",
            &format!("{}{text_rule}", rules(&["gpt-new"])),
        ),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_llm-policy"))
            .args([
                "replay",
                "--audit",
                &audit.display().to_string(),
                "--policy",
                &candidate.display().to_string(),
            ])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, text, err) = run(&[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(text.contains("replayed 9 of 9 decision records"), "{text}");
    assert!(text.contains("3 unchanged, 6 changed"), "{text}");
    let (_, json, _) = run(&["--format", "json"]);
    let report: Value = serde_json::from_str(&json).unwrap();
    let by_rule = report["byRule"].as_array().unwrap();
    let find = |from: &str, to: &str| {
        by_rule
            .iter()
            .find(|c| c["from"] == from && c["to"] == to)
            .unwrap_or_else(|| panic!("no {from} → {to} in {report}"))
    };
    let newly_denied = find("allow", "deny");
    assert_eq!(newly_denied["count"], 4);
    assert!(
        newly_denied["rule"]
            .as_str()
            .unwrap()
            .starts_with("deny-gpt-new ("),
        "{newly_denied}"
    );
    assert!(
        newly_denied["rule"]
            .as_str()
            .unwrap()
            .contains("base.yaml:"),
        "{newly_denied}"
    );
    let freed = find("deny", "allow");
    assert_eq!(freed["count"], 2);
    assert_eq!(freed["rule"], "default");
    // The candidate reads the prompt, which the records do not hold: every change says so.
    assert_eq!(newly_denied["approximate"], 4);
    assert!(report["changes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["unseen"][0] == "text"));
    // A CI gate.
    let (code, _, _) = run(&["--fail-on-change"]);
    assert_eq!(code, Some(1));
    // A gate that saw nothing does not pass: records without their context.
    let bare = dir.join("bare.log");
    let without: String = log
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("context");
            format!("{v}\n")
        })
        .collect();
    std::fs::write(&bare, without).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_llm-policy"))
        .args([
            "replay",
            "--fail-on-change",
            "--audit",
            &bare.display().to_string(),
            "--policy",
            &candidate.display().to_string(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same policies replay with no change.
    let same = dir.join("policies");
    std::fs::create_dir_all(&same).unwrap();
    std::fs::write(
        same.join("base.yaml"),
        policy("base", "allow", &rules(&["gpt-bad"])),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_llm-policy"))
        .args([
            "replay",
            "--fail-on-change",
            "--audit",
            &audit.display().to_string(),
            "--policy",
            &same.display().to_string(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("9 unchanged, 0 changed"), "{text}");
}
