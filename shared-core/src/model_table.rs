//! The model table (`models/models.yaml`, docs/budgets.md): per model, its context window, its
//! largest output and its prices. It answers what a request reserves when it sets no
//! `max_tokens`, what a request is estimated to cost before it runs, and what it cost once its
//! usage is known.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::usage::Usage;

/// The table `llm-policy` ships (dated; see its `asOf`).
pub const SHIPPED_YAML: &str = include_str!("../../models/models.yaml");

/// What one model can spend and costs. Prices are US dollars per million tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ModelInfo {
    /// `openai`, `anthropic`, … (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Tokens of prompt and output together.
    pub context_window: u64,
    /// The most output tokens one request can produce: what a request without `max_tokens`
    /// reserves.
    pub max_output: u64,
    /// Input tokens.
    pub input: f64,
    /// Input tokens read from the prompt cache (default: `input`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input: Option<f64>,
    /// Input tokens written to the prompt cache (default: `input`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write: Option<f64>,
    /// Output tokens (reasoning tokens included, unless `reasoning` prices them).
    pub output: f64,
    /// Reasoning tokens, where the provider prices them apart (informational: usage reports
    /// count them as output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<f64>,
    /// The batch API's price as a fraction of the above (0.5: half price; informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_discount: Option<f64>,
}

/// The model table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ModelTable {
    /// When the prices were last checked (`YYYY-MM-DD`).
    #[serde(default)]
    pub as_of: String,
    /// Caps the output a request without `max_tokens` reserves (none: the model's
    /// `maxOutput`).
    #[serde(default)]
    pub default_output_tokens: Option<u64>,
    /// For models the table does not name.
    pub fallback: ModelInfo,
    /// By model name; a name ending in `*` is a prefix (the longest matching prefix wins).
    #[serde(default)]
    pub models: BTreeMap<String, ModelInfo>,
}

impl Default for ModelTable {
    /// The shipped table (`std`), or only a conservative fallback without `std`.
    fn default() -> ModelTable {
        #[cfg(feature = "std")]
        if let Ok(table) = ModelTable::parse("models.yaml", SHIPPED_YAML) {
            return table;
        }
        ModelTable {
            as_of: String::new(),
            default_output_tokens: None,
            fallback: ModelInfo {
                provider: None,
                context_window: 200_000,
                max_output: 32_000,
                input: 15.0,
                cached_input: None,
                cache_write: None,
                output: 75.0,
                reasoning: None,
                batch_discount: None,
            },
            models: BTreeMap::new(),
        }
    }
}

/// Prices are per million tokens.
pub const PER_MILLION: f64 = 1_000_000.0;

impl ModelTable {
    /// Parses and checks a table (YAML or JSON); errors name the file and the line.
    #[cfg(feature = "std")]
    pub fn parse(file: &str, text: &str) -> Result<ModelTable, crate::Diagnostics> {
        use crate::diagnostic::{Code, Diagnostic, Diagnostics};
        let docs = crate::source::parse_str(file, text).map_err(|d| Diagnostics(alloc::vec![d]))?;
        let [doc] = docs.as_slice() else {
            return Err(Diagnostics(alloc::vec![Diagnostic::error(
                Code::InvalidModelTable,
                "a model table is one document",
            )
            .at(file, None)]));
        };
        let table: ModelTable = doc.parse().map_err(|d| Diagnostics(alloc::vec![d]))?;
        let errors: Vec<Diagnostic> = table
            .problems()
            .into_iter()
            .map(|(pointer, message)| {
                Diagnostic::error(Code::InvalidModelTable, message).at(file, doc.position(&pointer))
            })
            .collect();
        if errors.is_empty() {
            Ok(table)
        } else {
            Err(Diagnostics(errors))
        }
    }

    /// Loads a table from a file.
    #[cfg(feature = "std")]
    pub fn load(path: &std::path::Path) -> Result<ModelTable, crate::Diagnostics> {
        let name = path.display().to_string();
        let text =
            crate::source::read_file(path).map_err(|d| crate::Diagnostics(alloc::vec![d]))?;
        ModelTable::parse(&name, &text)
    }

    /// What is wrong with the table: (JSON pointer, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let check = |out: &mut Vec<(String, String)>, pointer: String, m: &ModelInfo| {
            let prices = [
                ("input", Some(m.input)),
                ("cachedInput", m.cached_input),
                ("cacheWrite", m.cache_write),
                ("output", Some(m.output)),
                ("reasoning", m.reasoning),
                ("batchDiscount", m.batch_discount),
            ];
            for (name, p) in prices {
                if let Some(p) = p {
                    if !p.is_finite() || p < 0.0 {
                        out.push((
                            format!("{pointer}/{name}"),
                            format!("`{name}` must be a price of at least 0, not {p}"),
                        ));
                    }
                }
            }
            if m.max_output == 0 || m.context_window == 0 {
                out.push((
                    pointer.clone(),
                    String::from("`maxOutput` and `contextWindow` must be at least 1"),
                ));
            }
        };
        check(&mut out, String::from("/fallback"), &self.fallback);
        for (name, m) in &self.models {
            let stem = name.strip_suffix('*').unwrap_or(name);
            if stem.is_empty() || stem.contains('*') {
                out.push((
                    format!("/models/{}", escape_pointer(name)),
                    format!("`{name}`: a model name, or a prefix ending in one `*`"),
                ));
            }
            check(&mut out, format!("/models/{}", escape_pointer(name)), m);
        }
        out
    }

    /// The entry for `model`: its exact name, else the longest prefix entry it starts with,
    /// else the fallback.
    pub fn lookup(&self, model: Option<&str>) -> &ModelInfo {
        let Some(model) = model else {
            return &self.fallback;
        };
        if let Some(m) = self.models.get(model) {
            return m;
        }
        self.models
            .iter()
            .filter_map(|(name, m)| {
                let stem = name.strip_suffix('*')?;
                model.starts_with(stem).then_some((stem.len(), m))
            })
            .max_by_key(|(len, _)| *len)
            .map_or(&self.fallback, |(_, m)| m)
    }

    /// The name of `model`'s entry (a prefix entry without its `*`), else `other`: a metric label
    /// with no more values than the table has entries, whatever clients name.
    pub fn label(&self, model: Option<&str>) -> &str {
        let Some(model) = model else {
            return "other";
        };
        if let Some((name, _)) = self.models.get_key_value(model) {
            // A client naming a prefix entry itself (`gpt-4o*`) gets the entry's label too.
            return name.strip_suffix('*').unwrap_or(name);
        }
        self.models
            .keys()
            .filter_map(|name| {
                let stem = name.strip_suffix('*')?;
                model.starts_with(stem).then_some(stem)
            })
            .max_by_key(|stem| stem.len())
            .unwrap_or("other")
    }

    /// The output tokens a request reserves: its `max_tokens` when it sets one (at least 0),
    /// else the model's largest output (capped by `defaultOutputTokens`).
    pub fn output_reservation(&self, model: Option<&str>, max_tokens: Option<i64>) -> u64 {
        match max_tokens {
            Some(n) => u64::try_from(n).unwrap_or(0),
            None => {
                let max = self.lookup(model).max_output;
                self.default_output_tokens.map_or(max, |cap| cap.min(max))
            }
        }
    }

    /// The cost in US dollars of `input` prompt tokens and `output` output tokens, before the
    /// request runs.
    pub fn estimate_usd(&self, model: Option<&str>, input: u64, output: u64) -> f64 {
        let m = self.lookup(model);
        (input as f64 * m.input + output as f64 * m.output) / PER_MILLION
    }

    /// What an answer's usage cost, in US dollars.
    pub fn cost(&self, model: Option<&str>, usage: &Usage) -> f64 {
        let m = self.lookup(model);
        let cached = usage.cached_input.min(usage.input);
        let written = usage.cache_write.min(usage.input - cached);
        let plain = (usage.input - cached - written).max(0.0);
        let output = usage
            .output
            .max(usage.total.map_or(0.0, |t| t - usage.input));
        (plain * m.input
            + cached * m.cached_input.unwrap_or(m.input)
            + written * m.cache_write.unwrap_or(m.input)
            + output.max(0.0) * m.output)
            / PER_MILLION
    }
}

/// What a request that reserved `prompt` + `output` tokens is charged once its answer is read
/// (the filter and the server's ext_proc edge both settle with this):
/// - an answer that reported its usage and ended (a JSON answer; a stream that reached its end
///   event): that usage, at the table's prices;
/// - a stream cut before its end, or one that never reported usage: the largest of the usage it
///   reported so far, the prompt estimate plus the text that streamed, and the reservation (a
///   client that cuts a stream early cannot pay less than it reserved);
/// - nothing known (a JSON answer without usage, an unreadable body): `None`, the reservation
///   stands.
pub fn charge_for(
    models: &ModelTable,
    model: Option<&str>,
    prompt: u64,
    output: u64,
    reading: &crate::usage::Reading,
) -> (Option<f64>, Option<f64>) {
    let Some(counted) = reading.streamed_output else {
        return match (&reading.usage, reading.complete) {
            (Some(u), true) => (Some(u.tokens()), Some(models.cost(model, u))),
            _ => (None, None),
        };
    };
    if let (Some(u), true) = (&reading.usage, reading.complete) {
        return (Some(u.tokens()), Some(models.cost(model, u)));
    }
    let streamed = if counted.is_finite() && counted > 0.0 {
        counted as u64
    } else {
        0
    };
    let reserved = prompt.saturating_add(output);
    let mut tokens = reserved.max(prompt.saturating_add(streamed)) as f64;
    let mut usd = models
        .estimate_usd(model, prompt, output)
        .max(models.estimate_usd(model, prompt, streamed));
    if let Some(u) = &reading.usage {
        tokens = tokens.max(u.tokens());
        usd = usd.max(models.cost(model, u));
    }
    (Some(tokens), Some(usd))
}

/// `/` and `~` escaped for a JSON pointer segment.
fn escape_pointer(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_table_parses_and_prices() {
        let t = ModelTable::parse("models.yaml", SHIPPED_YAML).unwrap();
        assert!(!t.as_of.is_empty());
        assert_eq!(t.lookup(Some("gpt-4o-mini")).output, 0.6);
        // A dated snapshot finds its family; the longest prefix wins.
        assert_eq!(t.lookup(Some("gpt-4o-mini-2024-07-18")).input, 0.15);
        assert_eq!(t.lookup(Some("gpt-4o-2024-08-06")).input, 2.5);
        assert_eq!(t.lookup(Some("claude-sonnet-4-5-20250929")).output, 15.0);
        assert_eq!(t.label(Some("gpt-4o-mini-2024-07-18")), "gpt-4o-mini");
        assert_eq!(t.label(Some("a-model-nobody-priced")), "other");
        assert_eq!(t.label(None), "other");
        // Unknown models are priced high.
        assert_eq!(t.lookup(Some("mystery")).input, 15.0);
        assert_eq!(t.lookup(None).input, 15.0);
        assert_eq!(t.output_reservation(Some("gpt-4o-mini"), None), 16384);
        assert_eq!(t.output_reservation(Some("gpt-4o-mini"), Some(50)), 50);
        assert_eq!(t.output_reservation(Some("gpt-4o-mini"), Some(-5)), 0);
        // 1000 prompt + 1000 output tokens of gpt-4o-mini.
        let usd = t.estimate_usd(Some("gpt-4o-mini"), 1000, 1000);
        assert!((usd - 0.00075).abs() < 1e-12, "{usd}");
        let usage = Usage {
            input: 1000.0,
            cached_input: 400.0,
            output: 100.0,
            ..Usage::default()
        };
        let usd = t.cost(Some("gpt-4o-mini"), &usage);
        assert!((usd - (600.0 * 0.15 + 400.0 * 0.075 + 100.0 * 0.6) / 1e6).abs() < 1e-12);
    }

    #[test]
    fn the_anthropic_example_of_the_docs() {
        // docs/budgets.md: 500 input + 1,500 cache reads + 400 output on claude-sonnet-4-5.
        let t = ModelTable::default();
        let mut reader = crate::usage::UsageReader::new("application/json");
        reader.feed(
            br#"{"usage":{"input_tokens":500,"cache_read_input_tokens":1500,"output_tokens":400}}"#,
        );
        let usage = reader.finish().usage.unwrap();
        let usd = t.cost(Some("claude-sonnet-4-5-20250929"), &usage);
        assert!((usd - 0.00795).abs() < 1e-12, "{usd}");
    }

    #[test]
    fn a_stream_cut_before_its_end_pays_at_least_its_reservation() {
        use crate::usage::UsageReader;
        let t = ModelTable::default();
        let read = |ct: &str, body: &[u8]| {
            let mut r = UsageReader::new(ct);
            r.feed(body);
            r.finish()
        };
        // Anthropic: message_start reports 1 output token; the client cuts after the text.
        let cut = read(
            "text/event-stream",
            b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":50,\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
        );
        assert!(!cut.complete);
        let (tokens, usd) = charge_for(&t, Some("claude-sonnet-4-5"), 50, 1000, &cut);
        assert_eq!(tokens, Some(1050.0));
        assert!(usd.unwrap() >= t.estimate_usd(Some("claude-sonnet-4-5"), 50, 1000));
        // The same stream, whole: its final usage.
        let whole = read(
            "text/event-stream",
            b"data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":50,\"output_tokens\":1}}}\n\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        assert!(whole.complete);
        assert_eq!(charge_for(&t, None, 50, 1000, &whole).0, Some(57.0));
        // A JSON answer: its usage; none at all: the reservation stands.
        let json = read(
            "application/json",
            br#"{"usage":{"prompt_tokens":5,"completion_tokens":5}}"#,
        );
        assert_eq!(charge_for(&t, None, 50, 1000, &json).0, Some(10.0));
        let none = read("application/json", br#"{"choices":[]}"#);
        assert_eq!(charge_for(&t, None, 50, 1000, &none), (None, None));
    }

    #[test]
    fn a_usage_key_the_client_echoes_cannot_hide_the_real_one() {
        use crate::usage::UsageReader;
        // The Responses API echoes `metadata` after `usage`.
        let mut r = UsageReader::new("application/json");
        r.feed(br#"{"output":[],"usage":{"input_tokens":3,"output_tokens":4,"total_tokens":7},"user":null,"metadata":{"usage":"0"}}"#);
        assert_eq!(r.finish().usage.map(|u| u.tokens()), Some(7.0));
        let mut r = UsageReader::new("application/json");
        r.feed(br#"{"usage":{"input_tokens":3,"output_tokens":4},"metadata":{"usage":{"x":1}}}"#);
        assert_eq!(r.finish().usage.map(|u| u.tokens()), Some(7.0));
        // A compressed answer is not read (the reservation stands).
        assert!(matches!(
            UsageReader::for_response("application/json", Some("gzip")),
            UsageReader::Off
        ));
    }

    #[test]
    fn a_bad_table_is_rejected_with_its_line() {
        let text = "fallback: {contextWindow: 1, maxOutput: 1, input: 1, output: 1}\nmodels:\n  a*b: {contextWindow: 1, maxOutput: 0, input: -1, output: 1}\n";
        let e = ModelTable::parse("m.yaml", text).unwrap_err().to_string();
        assert!(e.contains("m.yaml:3"), "{e}");
        assert!(e.contains("`input` must be a price"), "{e}");
        assert!(e.contains("prefix ending in one `*`"), "{e}");
        let e = ModelTable::parse("m.yaml", "fallback: {}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.yaml"), "{e}");
    }
}
