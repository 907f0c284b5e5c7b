//! A fake proxy for the unit tests: it holds one request, records what the filter did to it, and
//! keeps shared data like Envoy does (values with compare-and-swap tokens).

use std::collections::HashMap;
use std::time::Duration;

use crate::host::{CallRefused, Host, Level, Metric, SharedWrite};

/// A chat completion body for `model`.
pub fn chat(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
}

/// What the filter answered locally.
#[derive(Debug, Clone, PartialEq)]
pub struct SentReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// A gRPC call the filter made.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpcCall {
    pub cluster: String,
    pub service: String,
    pub method: String,
    pub metadata: Vec<(String, String)>,
    pub message: Vec<u8>,
    pub timeout: Duration,
}

/// An HTTP call the filter made.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpCall {
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
}

#[derive(Debug, Default)]
pub struct FakeHost {
    pub http_calls: Vec<HttpCall>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub response_headers: Vec<(String, String)>,
    /// The response chunk the proxy is passing on.
    pub response_chunk: Vec<u8>,
    pub reply: Option<SentReply>,
    pub resumed: bool,
    pub now: Duration,
    pub shared: HashMap<String, (Vec<u8>, u32)>,
    pub next_cas: u32,
    /// Compare-and-swap writes that fail as if another worker wrote first (every other one).
    pub cas_conflicts: u32,
    pub calls: Vec<GrpcCall>,
    pub refuse_calls: bool,
    pub logs: Vec<(Level, String)>,
    pub metrics: HashMap<Metric, u64>,
    pub writes: u32,
}

impl FakeHost {
    /// A request with these headers and body.
    pub fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> FakeHost {
        let mut h = vec![
            (":method".to_string(), method.to_string()),
            (":path".to_string(), path.to_string()),
            (":authority".to_string(), "api.example.com".to_string()),
            (":scheme".to_string(), "https".to_string()),
        ];
        h.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        FakeHost {
            headers: h,
            body: body.as_bytes().to_vec(),
            now: Duration::from_secs(1_700_000_000),
            ..FakeHost::default()
        }
    }

    /// The same proxy (shared data, metrics) with a new request.
    pub fn next(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) {
        let fresh = FakeHost::request(method, path, headers, body);
        self.headers = fresh.headers;
        self.body = fresh.body;
        self.reply = None;
        self.resumed = false;
        self.calls.clear();
        self.response_headers.clear();
        self.response_chunk.clear();
    }

    /// The same proxy with a new chat completion request for `model`.
    pub fn next_chat(&mut self, headers: &[(&str, &str)], model: &str) {
        let body =
            format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
        self.next("POST", "/v1/chat/completions", headers, &body);
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn count(&self, m: Metric) -> u64 {
        self.metrics.get(&m).copied().unwrap_or(0)
    }
}

impl Host for FakeHost {
    fn request_headers(&mut self) -> Vec<(String, String)> {
        self.headers.clone()
    }

    fn request_body(&mut self, len: usize) -> Option<Vec<u8>> {
        self.body
            .get(..len.min(self.body.len()))
            .map(<[u8]>::to_vec)
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        if let Some(v) = value {
            self.headers.push((name.to_string(), v.to_string()));
        }
    }

    fn send_reply(&mut self, status: u16, headers: &[(String, String)], body: &[u8]) {
        assert!(self.reply.is_none(), "replied twice");
        self.reply = Some(SentReply {
            status,
            headers: headers.to_vec(),
            body: String::from_utf8_lossy(body).into_owned(),
        });
    }

    fn response_header(&mut self, name: &str) -> Option<String> {
        self.response_headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    fn response_body(&mut self, len: usize) -> Option<Vec<u8>> {
        self.response_chunk
            .get(..len.min(self.response_chunk.len()))
            .map(<[u8]>::to_vec)
    }

    fn set_response_body(&mut self, len: usize, bytes: &[u8]) {
        let len = len.min(self.response_chunk.len());
        self.response_chunk.splice(..len, bytes.iter().copied());
    }

    fn set_response_header(&mut self, name: &str, value: Option<&str>) {
        self.response_headers
            .retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        if let Some(v) = value {
            self.response_headers
                .push((name.to_string(), v.to_string()));
        }
    }

    fn set_request_body(&mut self, len: usize, body: &[u8]) {
        let len = len.min(self.body.len());
        self.body.splice(..len, body.iter().copied());
    }

    fn resume_request(&mut self) {
        self.resumed = true;
    }

    fn now(&self) -> Duration {
        self.now
    }

    fn shared_get(&mut self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.shared.get(key).cloned()
    }

    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> SharedWrite {
        if let (Some(cas), Some((_, current))) = (cas, self.shared.get(key)) {
            if cas != *current {
                return SharedWrite::CasMismatch;
            }
            self.writes += 1;
            if self.cas_conflicts > 0 && self.writes.is_multiple_of(2) {
                // Another worker wrote the same value first.
                self.cas_conflicts -= 1;
                self.next_cas += 1;
                let bumped = self.next_cas;
                if let Some(entry) = self.shared.get_mut(key) {
                    entry.1 = bumped;
                }
                return SharedWrite::CasMismatch;
            }
        }
        self.next_cas += 1;
        self.shared
            .insert(key.to_string(), (value.to_vec(), self.next_cas));
        SharedWrite::Ok
    }

    fn grpc_call(
        &mut self,
        cluster: &str,
        service: &str,
        method: &str,
        metadata: &[(&str, &str)],
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, CallRefused> {
        if self.refuse_calls {
            return Err(CallRefused("bad argument (is the cluster defined?)"));
        }
        self.calls.push(GrpcCall {
            cluster: cluster.into(),
            service: service.into(),
            method: method.into(),
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            message: message.to_vec(),
            timeout,
        });
        Ok(u32::try_from(self.calls.len()).unwrap_or(u32::MAX))
    }

    fn http_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<u32, CallRefused> {
        self.http_calls.push(HttpCall {
            cluster: cluster.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            timeout,
        });
        Ok(u32::try_from(self.http_calls.len()).unwrap_or(u32::MAX))
    }

    fn log(&mut self, level: Level, message: &str) {
        self.logs.push((level, message.to_string()));
    }

    fn metric(&mut self, metric: Metric, value: u64) {
        *self.metrics.entry(metric).or_default() += value;
    }
}
