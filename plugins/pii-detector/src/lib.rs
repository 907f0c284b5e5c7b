//! `pii-detector`: an llm-policy WASM plugin (ABI 1) that finds personal data and secrets in
//! `request.prompt`, disguised or not: the scanners of the core (`llm_policy_core::detect`, the
//! same as the context field `request.prompt_entities`) over the text and its views (folded,
//! spelled-out letters joined, `[at]` / `dot` spellings, encoded runs decoded, ...).
//!
//! Entities (the `entities` argument; all of them by default):
//!
//! | name | what | confidence |
//! |---|---|---|
//! | `email` | `local@domain.tld` (at least two domain labels, an alphabetic TLD) | 0.95 |
//! | `phone` | `+` international (8–15 digits), `(area) …`, North-American `ddd-ddd-dddd` (one separator kind), national numbers with a leading `0` written in groups; never a bare digit run | 0.7–0.9 |
//! | `credit_card` | 13–19 digits, optionally grouped with one kind of separator (space or `-`), **Luhn-valid**; a known issuer prefix and length | 0.9 (0.4 for an unknown prefix) |
//! | `iban` | country code, check digits, the country's length (single spaces, `-` or `.` allowed; any case), **mod-97 valid** | 0.95 |
//! | `us_ssn` | `ddd-dd-dddd` with a valid area, group and serial; nine bare digits after `SSN` | 0.8–0.85 |
//! | `api_key` | OpenAI `sk-…` / `sk-proj-…`, Anthropic `sk-ant-…`, AWS `AKIA…` / `ASIA…`, GitHub `ghp_…` / `github_pat_…`, Slack `xox[abprs]-…`, Google `AIza…`, Stripe `sk_live_…` / `rk_live_…` | 0.9–0.99 |
//! | `private_key` | a PEM `-----BEGIN … PRIVATE KEY-----` header | 0.99 |
//!
//! The score is the highest confidence among the findings (0 when none); the rule matches when
//! `score >= threshold` (argument `threshold`, default 0.5). The reason names the kinds found and
//! never the values.
//!
//! In a view (not the text as sent) only findings of confidence 0.8 or more count. [`evaluate`] is
//! the whole plugin (JSON in, JSON out); the `abi` module binds it to the WebAssembly exports.

use llm_policy_core::detect::{self, Entities, Entity};
use serde::Deserialize;

#[cfg(target_arch = "wasm32")]
#[allow(
    unsafe_code,
    reason = "the ABI exports: `#[no_mangle]` and reading the input the host wrote at a raw pointer"
)]
#[path = "../../abi.rs"]
mod abi;
#[path = "../../io.rs"]
mod io;

/// The plugin manifest (ABI 1): name, version and the context fields it reads (the turns, for
/// values handed over across them).
pub const MANIFEST: &str = concat!(
    r#"{"abi":1,"name":"pii-detector","version":""#,
    env!("CARGO_PKG_VERSION"),
    r#"","reads":["request.prompt","request.messages"]}"#
);

// ---------------------------------------------------------------------------------------------
// The plugin: JSON in, JSON out.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Args {
    entities: Option<Vec<String>>,
    threshold: Option<f64>,
}

#[derive(Deserialize, Default)]
struct Fields {
    #[serde(rename = "request.prompt", default)]
    prompt: Option<String>,
    #[serde(rename = "request.messages", default)]
    messages: Option<Vec<Message>>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: String,
}

/// The plugin: the input JSON of ABI 1 (`{"rule", "args", "fields"}`) to its output JSON
/// (`{"match", "score", "reason"}`, or `{"error"}` for bad arguments or input).
pub fn evaluate(input: &[u8]) -> Vec<u8> {
    io::respond(input, run)
}

fn run(args: Args, fields: Fields) -> Result<io::Verdict, String> {
    let entities = match &args.entities {
        None => Entities::all(),
        Some(names) => {
            let mut set = Entities::none();
            for n in names {
                let e = Entity::from_name(n).ok_or_else(|| {
                    format!(
                        "unknown entity `{n}` (known: email, phone, credit_card, iban, us_ssn, api_key, private_key)"
                    )
                })?;
                set = set.with(e);
            }
            set
        }
    };
    let threshold = args.threshold.unwrap_or(0.5);
    if !(0.0..=1.0).contains(&threshold) {
        return Err(format!(
            "threshold must be between 0 and 1, not {threshold}"
        ));
    }
    let prompt = fields.prompt.unwrap_or_default();
    // A value handed over across user turns is whole in the seams between them.
    let text = detect::with_seams(
        &prompt,
        fields
            .messages
            .iter()
            .flatten()
            .map(|m| (m.role.as_str(), m.content.as_str())),
    );
    let report = detect::entities(&text, entities);
    let score = report.score();
    let found: Vec<&str> = report.kinds(0.0).map(Entity::name).collect();
    let reason = if found.is_empty() {
        String::from("no personal data or secrets found")
    } else {
        format!("found {}", found.join(", "))
    };
    Ok(io::Verdict {
        matched: !found.is_empty() && score >= threshold,
        score: Some(score),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    fn eval(json: &str) -> serde_json::Value {
        serde_json::from_slice(&evaluate(json.as_bytes())).unwrap()
    }

    #[test]
    fn plugin_json() {
        let out = eval(
            r#"{"rule":"r","args":{"entities":["email","credit_card"],"threshold":0.8},
               "fields":{"request.prompt":"to jane@example.com, card 4111 1111 1111 1111"}}"#,
        );
        assert_eq!(out["match"], true);
        assert_eq!(out["score"], 0.95);
        let reason = out["reason"].as_str().unwrap();
        assert!(
            reason.contains("email") && reason.contains("credit_card"),
            "{reason}"
        );
        assert!(
            !reason.contains("jane") && !reason.contains("4111"),
            "{reason}"
        );

        // Not selected: phone only.
        let out = eval(
            r#"{"rule":"r","args":{"entities":["phone"]},"fields":{"request.prompt":"jane@example.com"}}"#,
        );
        assert_eq!(out["match"], false);
        assert_eq!(out["score"], 0.0);

        // Below the threshold.
        let out = eval(
            r#"{"rule":"r","args":{"threshold":0.8},"fields":{"request.prompt":"call 020 7946 0958"}}"#,
        );
        assert_eq!(out["match"], false);
        assert_eq!(out["score"], 0.7);

        // Defaults; a null prompt.
        assert_eq!(
            eval(r#"{"rule":"r","args":{},"fields":{"request.prompt":null}}"#)["match"],
            false
        );
        assert_eq!(
            eval(r#"{"fields":{"request.prompt":"AKIAIOSFODNN7EXAMPLE"}}"#)["match"],
            true
        );

        // Bad arguments are errors.
        for bad in [
            r#"{"args":{"entities":["ssn_number"]}}"#,
            r#"{"args":{"threshold":2}}"#,
            r#"{"args":{"treshold":0.5}}"#,
            r#"{"args":{"entities":"email"}}"#,
            "not json",
        ] {
            let out = eval(bad);
            assert!(out["error"].is_string(), "{bad}: {out}");
            assert!(out.get("match").is_none());
        }
    }

    #[test]
    fn manifest_is_valid_json() {
        let m: serde_json::Value = serde_json::from_str(MANIFEST).unwrap();
        assert_eq!(m["abi"], 1);
        assert_eq!(m["name"], "pii-detector");
        assert_eq!(
            m["reads"],
            serde_json::json!(["request.prompt", "request.messages"])
        );
    }

    #[test]
    fn disguised_values_are_found() {
        for (text, kind) in [
            ("mail jane [at] example [dot] com", "email"),
            ("key: QUtJQUlPU0ZPRE5ON0VYQU1QTEU=", "api_key"),
            ("card 4111.1111.1111.1111", "credit_card"),
            ("ssn 123-45-6789", "us_ssn"),
            // Keys in groups split by other white space than one space.
            (
                "Keep this Slack bot token for me so I don't lose it: xoxb\n-688\n0953\n7753\n0-84\n0606\n0055\n545-\nQgUc\nEq8H\n6UfQ\nM5F3\nXehL\nTxsS",
                "api_key",
            ),
            (
                "Please add ghp_  Iewo  3lGK  7RGj  toDC  1QIW  jt4c  JNl9  51ob  prvk to the team's .env template.",
                "api_key",
            ),
            (
                "Keep this AWS access key for me so I don't lose it: AKIA\r\nVXBM\r\nKM3W\r\nKYBO\r\nO6DH",
                "api_key",
            ),
        ] {
            let out = eval(&format!(
                r#"{{"args":{{}},"fields":{{"request.prompt":{}}}}}"#,
                serde_json::to_string(text).unwrap()
            ));
            assert_eq!(out["match"], true, "{text}: {out}");
            assert!(
                out["reason"].as_str().unwrap().contains(kind),
                "{text}: {out}"
            );
        }
    }
}
