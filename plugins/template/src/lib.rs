//! The llm-policy plugin template (ABI 1): copy this crate to start a plugin.
//!
//! It matches when `request.prompt` contains any of the words in argument `words` (compared in
//! lower case), e.g.
//!
//! ```yaml
//! when:
//!   plugin: { name: keywords, args: { words: [confidential, "internal only"] } }
//! ```
//!
//! A plugin is three things: [`MANIFEST`] (its name and the context fields it reads), an
//! [`evaluate`] function from the input JSON to the output JSON (plain Rust, unit-tested natively),
//! and the `abi` module that exports both to the host (copy it unchanged). See docs/plugins.md.

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

/// The manifest: ABI version, the plugin's name (what policies write), its version and the
/// context fields it reads (only these are sent to it).
pub const MANIFEST: &str = concat!(
    r#"{"abi":1,"name":"keywords","version":""#,
    env!("CARGO_PKG_VERSION"),
    r#"","reads":["request.prompt"]}"#
);

/// The rule's `args`. Unknown arguments are errors, so a typo is not silently ignored.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Args {
    #[serde(default)]
    words: Vec<String>,
}

/// The fields read, by path; null (`None`) when the request does not carry them.
#[derive(Deserialize, Default)]
struct Fields {
    #[serde(rename = "request.prompt", default)]
    prompt: Option<String>,
}

/// The plugin: input JSON to output JSON (`io::respond` parses the input, so a bad argument or
/// input is an `{"error"}` output, and writes the output).
pub fn evaluate(input: &[u8]) -> Vec<u8> {
    io::respond(input, |args: Args, fields: Fields| {
        let prompt = fields.prompt.unwrap_or_default().to_lowercase();
        let hits = args
            .words
            .iter()
            .filter(|w| !w.is_empty() && prompt.contains(&w.to_lowercase()))
            .count();
        Ok(io::Verdict {
            matched: hits > 0,
            score: None,
            // Say what matched, never the request's text.
            reason: format!("{hits} keyword(s) found"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(json: &str) -> serde_json::Value {
        serde_json::from_slice(&evaluate(json.as_bytes())).unwrap()
    }

    #[test]
    fn matches_keywords_in_any_case() {
        let input =
            r#"{"rule":"r","args":{"words":["secret"]},"fields":{"request.prompt":"Top SECRET"}}"#;
        assert_eq!(eval(input)["match"], true);
        let input = r#"{"rule":"r","args":{"words":["secret"]},"fields":{"request.prompt":null}}"#;
        assert_eq!(eval(input)["match"], false);
        assert!(eval(r#"{"args":{"word":"x"}}"#)["error"].is_string());
    }

    #[test]
    fn manifest_is_valid_json() {
        let m: serde_json::Value = serde_json::from_str(MANIFEST).unwrap();
        assert_eq!(m["name"], "keywords");
    }
}
