//! What the OpenTelemetry GenAI semantic conventions
//! (<https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-metrics/>) record of one answer:
//! `gen_ai.client.token.usage` by `gen_ai.token.type`, and `gen_ai.server.request.duration`.
//! The filter reports it with a usage report and the server's response edge reads it the same
//! way; the server exports it (metric names and label values bounded there).

use alloc::string::String;

use crate::context::{Api, Provider};
use crate::usage::Reading;

/// One answer, as the GenAI metrics record it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenAiUsage {
    /// `gen_ai.operation.name` ([`operation_name`]).
    pub operation: String,
    /// `gen_ai.provider.name` ([`provider_name`]).
    pub provider: String,
    /// The request's model (`gen_ai.request.model`), as the client named it.
    pub model: Option<String>,
    /// Input tokens the provider reported (cached ones included); `None`: it did not say.
    pub input: Option<f64>,
    /// Output tokens the provider reported; `None`: it did not say.
    pub output: Option<f64>,
    /// Seconds from the request to the answer's end, as measured where it was read.
    pub duration_secs: Option<f64>,
}

/// `gen_ai.operation.name` of an API the conventions name (`None`: another API, not recorded).
pub fn operation_name(api: Api) -> Option<&'static str> {
    match api {
        Api::Chat | Api::Messages | Api::Responses => Some("chat"),
        Api::Completions => Some("text_completion"),
        Api::Embeddings => Some("embeddings"),
        _ => None,
    }
}

/// `gen_ai.provider.name` of a provider (`None`: not one the conventions name).
pub fn provider_name(provider: Provider) -> Option<&'static str> {
    match provider {
        Provider::Openai => Some("openai"),
        Provider::Anthropic => Some("anthropic"),
        Provider::Unknown => None,
    }
}

impl GenAiUsage {
    /// What an answer of `api` from `provider` said (`None`: an API or provider the conventions
    /// do not name). Token counts only when the provider reported them whole: the conventions
    /// say not to report usage an instrumentation cannot count (a stream cut early, an answer
    /// without usage).
    pub fn of(
        provider: Provider,
        api: Api,
        model: Option<&str>,
        reading: &Reading,
        duration_secs: Option<f64>,
    ) -> Option<GenAiUsage> {
        Some(GenAiUsage::named(
            String::from(operation_name(api)?),
            String::from(provider_name(provider)?),
            model,
            reading,
            duration_secs,
        ))
    }

    /// [`GenAiUsage::of`] with the operation and provider already named.
    pub fn named(
        operation: String,
        provider: String,
        model: Option<&str>,
        reading: &Reading,
        duration_secs: Option<f64>,
    ) -> GenAiUsage {
        let usage = reading.usage.filter(|_| reading.complete);
        GenAiUsage {
            operation,
            provider,
            model: model.map(String::from),
            input: usage.map(|u| u.input),
            output: usage.map(|u| u.output),
            duration_secs: duration_secs.filter(|d| d.is_finite() && *d >= 0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::Usage;

    #[test]
    fn only_whole_usage_is_counted_and_only_named_apis_are_recorded() {
        let usage = Usage {
            input: 12.0,
            output: 30.0,
            ..Usage::default()
        };
        let whole = Reading {
            usage: Some(usage),
            streamed_output: None,
            complete: true,
        };
        let g = GenAiUsage::of(
            Provider::Anthropic,
            Api::Messages,
            Some("claude-x"),
            &whole,
            Some(0.5),
        )
        .unwrap();
        assert_eq!(
            (g.operation.as_str(), g.provider.as_str(), g.input, g.output),
            ("chat", "anthropic", Some(12.0), Some(30.0))
        );
        let cut = Reading {
            complete: false,
            ..whole
        };
        let g = GenAiUsage::of(Provider::Openai, Api::Chat, None, &cut, Some(f64::NAN)).unwrap();
        assert_eq!((g.input, g.output, g.duration_secs), (None, None, None));
        assert!(GenAiUsage::of(Provider::Unknown, Api::Chat, None, &whole, None).is_none());
        assert!(GenAiUsage::of(Provider::Openai, Api::Batch, None, &whole, None).is_none());
        assert_eq!(operation_name(Api::Embeddings), Some("embeddings"));
    }
}
