//! The request file: `{"method", "path", "headers", "body", "time"?, "now"?}`, where `body` is a
//! JSON value (sent as its JSON text) or a string (sent verbatim, so non-JSON bodies can be
//! tested), and `time: {hour, weekday}` or `now` (Unix seconds) pins the evaluation time.

use std::collections::BTreeMap;

use llm_policy_core::context::{Needs, TimeInfo};
use llm_policy_core::{ContextConfig, ContextError, PolicySet, RequestContext, RequestInput};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A request as written in a request file or a test case.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestFile {
    /// HTTP method (default `POST`).
    #[serde(default = "post")]
    pub method: String,
    /// Path (default `/v1/chat/completions`).
    #[serde(default = "chat_path")]
    pub path: String,
    /// Headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Body: JSON, or a string sent as is.
    #[serde(default)]
    pub body: Option<Value>,
    /// Pinned hour and weekday (UTC).
    #[serde(default)]
    pub time: Option<TimeInfo>,
    /// Pinned evaluation time, Unix seconds.
    #[serde(default)]
    pub now: Option<i64>,
}

fn post() -> String {
    String::from("POST")
}

fn chat_path() -> String {
    String::from("/v1/chat/completions")
}

impl RequestFile {
    /// The raw body bytes.
    pub fn body_bytes(&self) -> Vec<u8> {
        match &self.body {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => s.clone().into_bytes(),
            Some(v) => serde_json::to_vec(v).unwrap_or_default(),
        }
    }

    /// Builds the context the way the filter and server will (including `needs` skipping).
    pub fn context(&self, set: &PolicySet) -> Result<RequestContext, ContextError> {
        self.context_with(set.config(), set.needs())
    }

    /// Applies `d`'s redaction (`transform.redact`) to this request as a proxy would: the counts
    /// written into the decision, or a deny when a value cannot be replaced.
    pub fn redact(&self, d: &mut llm_policy_core::Decision, config: &ContextConfig) {
        if d.actions.redact.is_none() {
            return;
        }
        let (headers, body) = (self.header_pairs(), self.body_bytes());
        let input = self.input(&headers, &body, self.now.unwrap_or(0));
        llm_policy_core::redact::apply(d, &input, config);
    }

    /// The headers as pairs.
    fn header_pairs(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The request as the core reads it, with these headers and body, at `now`.
    fn input<'a>(
        &'a self,
        headers: &'a [(String, String)],
        body: &'a [u8],
        now: i64,
    ) -> RequestInput<'a> {
        RequestInput {
            method: &self.method,
            path: &self.path,
            headers,
            body,
            now_unix: now,
        }
    }

    /// Builds the context with a configuration, extracting what `needs` says.
    pub fn context_with(
        &self,
        config: &ContextConfig,
        needs: Needs,
    ) -> Result<RequestContext, ContextError> {
        let (headers, body) = (self.header_pairs(), self.body_bytes());
        let now = self.now.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
                .unwrap_or(0)
        });
        let input = self.input(&headers, &body, now);
        let mut ctx = RequestContext::from_request_with(&input, config, needs)?;
        if let Some(t) = self.time {
            ctx.time = t;
        }
        Ok(ctx)
    }
}
