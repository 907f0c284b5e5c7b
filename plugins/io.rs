//! The JSON of ABI 1 (docs/plugins.md): the input a call gets and the output it answers. Shared by
//! every plugin here (`#[path = "../../io.rs"] mod io;`); a plugin of your own copies it with
//! `abi.rs`.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What a plugin found.
pub struct Verdict {
    /// Whether the rule's condition holds.
    pub matched: bool,
    /// A score in 0..1, when the plugin has one.
    pub score: Option<f64>,
    /// Why, in one line; never the request's text.
    pub reason: String,
}

/// `{"rule", "args", "fields"}`: the rule's arguments and the fields the manifest names.
#[derive(Deserialize)]
#[serde(bound(deserialize = "A: Deserialize<'de> + Default, F: Deserialize<'de> + Default"))]
struct Input<A, F> {
    #[serde(default)]
    args: A,
    #[serde(default)]
    fields: F,
}

/// `{"match", "score", "reason"}`, or `{"error"}` (the rule's `onError` applies).
#[derive(Serialize)]
#[serde(untagged)]
enum Output {
    Result {
        #[serde(rename = "match")]
        matched: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        score: Option<f64>,
        reason: String,
    },
    Error {
        error: String,
    },
}

/// Runs `plugin` on the input JSON with the rule's `args` as `A` (a type that denies unknown
/// fields makes a misspelt argument an error) and the declared `fields` as `F`; answers the output
/// JSON. An input that does not parse, or an `Err` from the plugin, is an `{"error"}` output.
pub fn respond<A, F>(input: &[u8], plugin: impl FnOnce(A, F) -> Result<Verdict, String>) -> Vec<u8>
where
    A: DeserializeOwned + Default,
    F: DeserializeOwned + Default,
{
    let out = match serde_json::from_slice::<Input<A, F>>(input) {
        Err(e) => Err(format!("invalid input or arguments: {e}")),
        Ok(i) => plugin(i.args, i.fields),
    };
    let out = match out {
        Ok(v) => Output::Result {
            matched: v.matched,
            score: v.score,
            reason: v.reason,
        },
        Err(error) => Output::Error { error },
    };
    serde_json::to_vec(&out).unwrap_or_default()
}
