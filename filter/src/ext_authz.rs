//! The ext_authz `Check` call to the policy server, as the filter makes it: the part of Envoy's
//! `envoy.service.auth.v3` messages it needs, with their field numbers (prost; the full Envoy
//! types would not fit a proxy plugin). A test checks the wire format against `envoy-types`.
//!
//! The filter has already counted the local-scope limits: it says so in the request's
//! `context_extensions` (which a client cannot set), with the rules whose local counter was over
//! ([`LocalCounted`], the core's wire contract), so the server neither counts them again nor
//! counts them differently.

use std::collections::HashMap;

use llm_policy_core::identity::IdentityMode;
use llm_policy_core::wire::{self, LocalCounted};

/// The gRPC service.
pub const SERVICE: &str = "envoy.service.auth.v3.Authorization";
/// The gRPC method.
pub const METHOD: &str = "Check";

/// `CheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckRequest {
    /// `attributes`.
    #[prost(message, optional, tag = "1")]
    pub attributes: Option<AttributeContext>,
}

/// `AttributeContext`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeContext {
    /// `request`.
    #[prost(message, optional, tag = "4")]
    pub request: Option<Request>,
    /// `context_extensions`.
    #[prost(map = "string, string", tag = "10")]
    pub context_extensions: HashMap<String, String>,
}

/// `AttributeContext.Request`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    /// `http`.
    #[prost(message, optional, tag = "2")]
    pub http: Option<HttpRequest>,
}

/// `AttributeContext.HttpRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpRequest {
    /// `method`.
    #[prost(string, tag = "2")]
    pub method: String,
    /// `headers` (lower-case names; repeated names joined with `,`).
    #[prost(map = "string, string", tag = "3")]
    pub headers: HashMap<String, String>,
    /// `path` (with query).
    #[prost(string, tag = "4")]
    pub path: String,
    /// `host`.
    #[prost(string, tag = "5")]
    pub host: String,
    /// `scheme`.
    #[prost(string, tag = "6")]
    pub scheme: String,
    /// `size`.
    #[prost(int64, tag = "9")]
    pub size: i64,
    /// `protocol`.
    #[prost(string, tag = "10")]
    pub protocol: String,
    /// `raw_body`.
    #[prost(bytes = "vec", tag = "12")]
    pub raw_body: Vec<u8>,
}

/// `CheckResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckResponse {
    /// `status` (google.rpc.Status).
    #[prost(message, optional, tag = "1")]
    pub status: Option<RpcStatus>,
    /// `denied_response`.
    #[prost(message, optional, tag = "2")]
    pub denied_response: Option<DeniedHttpResponse>,
    /// `ok_response`.
    #[prost(message, optional, tag = "3")]
    pub ok_response: Option<OkHttpResponse>,
    /// `dynamic_metadata` (google.protobuf.Struct): the reservation ([`wire::Reservation`]).
    #[prost(message, optional, tag = "4")]
    pub dynamic_metadata: Option<PbStruct>,
}

/// `google.protobuf.Struct`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PbStruct {
    /// `fields`.
    #[prost(btree_map = "string, message", tag = "1")]
    pub fields: std::collections::BTreeMap<String, PbValue>,
}

/// `google.protobuf.Value`: the kinds the reservation uses (a `oneof` on the wire, read as
/// optional fields).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PbValue {
    /// `number_value`.
    #[prost(double, optional, tag = "2")]
    pub number_value: Option<f64>,
    /// `string_value`.
    #[prost(string, optional, tag = "3")]
    pub string_value: Option<String>,
}

/// `google.rpc.Status`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    /// `code`.
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// `message`.
    #[prost(string, tag = "2")]
    pub message: String,
}

/// `DeniedHttpResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeniedHttpResponse {
    /// `status`.
    #[prost(message, optional, tag = "1")]
    pub status: Option<HttpStatus>,
    /// `headers`.
    #[prost(message, repeated, tag = "2")]
    pub headers: Vec<HeaderValueOption>,
    /// `body`.
    #[prost(string, tag = "3")]
    pub body: String,
}

/// `envoy.type.v3.HttpStatus`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpStatus {
    /// `code`.
    #[prost(int32, tag = "1")]
    pub code: i32,
}

/// `OkHttpResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OkHttpResponse {
    /// `headers` (added to the upstream request).
    #[prost(message, repeated, tag = "2")]
    pub headers: Vec<HeaderValueOption>,
    /// `headers_to_remove`.
    #[prost(string, repeated, tag = "5")]
    pub headers_to_remove: Vec<String>,
    /// `response_headers_to_add` (added to the answer sent to the client).
    #[prost(message, repeated, tag = "6")]
    pub response_headers_to_add: Vec<HeaderValueOption>,
}

/// `HeaderValueOption`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValueOption {
    /// `header`.
    #[prost(message, optional, tag = "1")]
    pub header: Option<HeaderValue>,
}

/// `HeaderValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValue {
    /// `key`.
    #[prost(string, tag = "1")]
    pub key: String,
    /// `value`.
    #[prost(string, tag = "2")]
    pub value: String,
    /// `raw_value`.
    #[prost(bytes = "vec", tag = "3")]
    pub raw_value: Vec<u8>,
}

impl HeaderValue {
    fn pair(&self) -> (String, String) {
        let value = if self.raw_value.is_empty() {
            self.value.clone()
        } else {
            String::from_utf8_lossy(&self.raw_value).into_owned()
        };
        (self.key.to_ascii_lowercase(), value)
    }
}

/// The encoded `CheckRequest` for a buffered request, with the local limits the filter counted.
pub fn check_request(
    headers: &[(String, String)],
    body: &[u8],
    local: &LocalCounted,
    identity: IdentityMode,
) -> Vec<u8> {
    use prost::Message as _;
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    // The headers rules read, as Envoy's own ext_authz filter sends them: not the server's
    // (reservation, verdict) nor Envoy's partial-body flag, which a client could have sent.
    let mut joined: HashMap<String, String> = HashMap::new();
    for (k, v) in headers.iter().filter(|(k, _)| {
        wire::is_request_data(k)
            && !wire::SERVER_ONLY_HEADERS.contains(&k.to_ascii_lowercase().as_str())
    }) {
        let k = k.to_ascii_lowercase();
        joined
            .entry(k)
            .and_modify(|old| {
                old.push(',');
                old.push_str(v);
            })
            .or_insert_with(|| v.clone());
    }
    let mut extensions: HashMap<String, String> = local
        .extensions()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    extensions.insert(
        wire::IDENTITY_EXTENSION.to_string(),
        identity.via().to_string(),
    );
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: get(":method"),
                    path: get(":path"),
                    host: get(":authority"),
                    scheme: get(":scheme"),
                    size: i64::try_from(body.len()).unwrap_or(i64::MAX),
                    protocol: String::from("HTTP/1.1"),
                    headers: joined,
                    raw_body: body.to_vec(),
                }),
            }),
            context_extensions: extensions,
        }),
    }
    .encode_to_vec()
}

/// What the server decided.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerAnswer {
    /// Let the request go: set these headers, remove those.
    Allow {
        /// Headers to set (replace) on the upstream request.
        set: Vec<(String, String)>,
        /// Headers to remove.
        remove: Vec<String>,
        /// Headers to add to the answer sent to the client.
        respond: Vec<(String, String)>,
        /// The token and cost reservations waiting for the answer's usage, and the output cap
        /// the body is lowered to (what response rules read of the request is not read: the
        /// filter keeps its own).
        grant: Box<wire::Grant>,
    },
    /// Answer the client.
    Deny {
        /// HTTP status (403 when the server gave none).
        status: u16,
        /// Reply headers.
        headers: Vec<(String, String)>,
        /// Reply body.
        body: String,
    },
}

impl ServerAnswer {
    /// Decodes a `CheckResponse`.
    pub fn decode(bytes: &[u8]) -> Result<ServerAnswer, prost::DecodeError> {
        use prost::Message as _;
        let r = CheckResponse::decode(bytes)?;
        let code = r.status.as_ref().map_or(0, |s| s.code);
        if code == 0 {
            let ok = r.ok_response.unwrap_or_default();
            let grant = r.dynamic_metadata.map_or_else(wire::Grant::default, |m| {
                wire::Grant::from_fields(|k| {
                    if k == wire::Grant::ANSWER {
                        return None;
                    }
                    let v = m.fields.get(k)?;
                    match (&v.string_value, v.number_value) {
                        (Some(t), _) => Some(wire::MetadataValue::Text(t.clone())),
                        (None, Some(n)) => Some(wire::MetadataValue::Number(n)),
                        (None, None) => None,
                    }
                })
            });
            return Ok(ServerAnswer::Allow {
                grant: Box::new(grant),
                set: ok
                    .headers
                    .iter()
                    .filter_map(|h| h.header.as_ref().map(HeaderValue::pair))
                    .collect(),
                remove: ok.headers_to_remove,
                respond: ok
                    .response_headers_to_add
                    .iter()
                    .filter_map(|h| h.header.as_ref().map(HeaderValue::pair))
                    .collect(),
            });
        }
        let denied = r.denied_response.unwrap_or_default();
        let status = denied
            .status
            .and_then(|s| u16::try_from(s.code).ok())
            .filter(|s| (200..600).contains(s))
            .unwrap_or(403);
        Ok(ServerAnswer::Deny {
            status,
            headers: denied
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref().map(HeaderValue::pair))
                .collect(),
            body: denied.body,
        })
    }
}

/// The hand-written subset above against Envoy's own types (`envoy-types`): every field the
/// filter writes is read back by Envoy's `CheckRequest`, and every field it reads from Envoy's
/// `CheckResponse` arrives, so the subset cannot drift from the real messages.
#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::ext_authz::v3::pb as envoy;
    use prost::Message as _;

    #[test]
    fn check_request_reads_back_as_envoys() {
        let local = LocalCounted {
            over: vec![(
                String::from("r"),
                llm_policy_core::reply::LimitState {
                    limit: 3.0,
                    remaining: 0.0,
                    reset_secs: 9,
                },
            )],
        };
        let headers = [
            (":method", "POST"),
            (":path", "/v1/chat/completions?x=1"),
            (":authority", "api.openai.com"),
            (":scheme", "https"),
            ("X-User-Id", "a"),
            ("x-user-id", "b"),
            // A client's copies of what only Envoy and the engine set are not sent.
            ("x-envoy-auth-partial-body", "true"),
            (
                "x-llm-policy-reservation",
                "0123456789abcdef0123456789abcdef",
            ),
            ("x-llm-policy-decision", "allow"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let bytes = check_request(
            &headers,
            b"\x00{\"a\":1}\xff",
            &local,
            IdentityMode::ApiKeys,
        );
        let sent = envoy::CheckRequest::decode(bytes.as_slice()).unwrap();
        let attrs = sent.attributes.unwrap();
        let http = attrs.request.unwrap().http.unwrap();
        assert_eq!(http.method, "POST");
        assert_eq!(http.path, "/v1/chat/completions?x=1");
        assert_eq!(http.host, "api.openai.com");
        assert_eq!(http.scheme, "https");
        assert_eq!(http.size, 9);
        assert_eq!(http.protocol, "HTTP/1.1");
        assert_eq!(http.raw_body, b"\x00{\"a\":1}\xff");
        assert_eq!(http.headers["x-user-id"], "a,b");
        for h in [
            "x-envoy-auth-partial-body",
            "x-llm-policy-reservation",
            "x-llm-policy-decision",
            ":path",
        ] {
            assert!(!http.headers.contains_key(h), "{h} was sent");
        }
        assert_eq!(http.headers[":authority"], "api.openai.com");
        let ext = &attrs.context_extensions;
        assert_eq!(
            LocalCounted::from_extensions(|k| ext.get(k).map(String::as_str)),
            Some(local)
        );
        // Ours decodes what Envoy's types encode of it (the same field numbers both ways).
        let back = envoy::CheckRequest {
            attributes: Some(
                envoy_types::pb::envoy::service::auth::v3::AttributeContext {
                    context_extensions: ext.clone(),
                    request: Some(
                        envoy_types::pb::envoy::service::auth::v3::attribute_context::Request {
                            http: Some(http),
                            ..Default::default()
                        },
                    ),
                    ..Default::default()
                },
            ),
        };
        let ours = CheckRequest::decode(back.encode_to_vec().as_slice()).unwrap();
        assert_eq!(ours, CheckRequest::decode(bytes.as_slice()).unwrap());
    }

    #[test]
    fn envoys_check_responses_read_as_ours() {
        let header = |k: &str, v: &str, raw: bool| envoy::HeaderValueOption {
            header: Some(envoy::HeaderValue {
                key: k.into(),
                value: if raw { String::new() } else { v.into() },
                raw_value: if raw {
                    v.as_bytes().to_vec()
                } else {
                    Vec::new()
                },
            }),
            ..Default::default()
        };
        use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
        let handle = "0123456789abcdef0123456789abcdef";
        let text = |t: &str| Value {
            kind: Some(Kind::StringValue(t.into())),
        };
        let number = |n: f64| Value {
            kind: Some(Kind::NumberValue(n)),
        };
        let metadata = Struct {
            fields: [
                (wire::Reservation::HANDLE.to_string(), text(handle)),
                (wire::Reservation::MODEL.to_string(), text("gpt-4o")),
                (wire::Reservation::PROMPT.to_string(), number(12.0)),
                (wire::Reservation::OUTPUT.to_string(), number(100.0)),
                (wire::Grant::MAX_TOKENS.to_string(), number(64.0)),
                (wire::Grant::INCLUDE_USAGE.to_string(), number(1.0)),
            ]
            .into_iter()
            .collect(),
        };
        let ok = envoy::CheckResponse {
            status: Some(envoy_types::pb::google::rpc::Status {
                code: 0,
                ..Default::default()
            }),
            http_response: Some(envoy::HttpResponse::OkResponse(envoy::OkHttpResponse {
                headers: vec![header("X-A", "1", false), header("x-b", "2", true)],
                headers_to_remove: vec!["x-c".into()],
                response_headers_to_add: vec![header("x-ratelimit-remaining-tokens", "70", false)],
                ..Default::default()
            })),
            dynamic_metadata: Some(metadata),
        };
        assert_eq!(
            ServerAnswer::decode(&ok.encode_to_vec()),
            Ok(ServerAnswer::Allow {
                set: vec![("x-a".into(), "1".into()), ("x-b".into(), "2".into())],
                remove: vec!["x-c".into()],
                respond: vec![("x-ratelimit-remaining-tokens".into(), "70".into())],
                grant: Box::new(wire::Grant {
                    reservation: Some(wire::Reservation {
                        handle: handle.into(),
                        model: Some("gpt-4o".into()),
                        prompt: 12,
                        output: 100,
                        gen_ai: None,
                        checked_at_ms: 0,
                    }),
                    max_tokens: Some(64),
                    include_usage: true,
                    answer: None,
                    redact: None,
                    stream: false,
                }),
            })
        );
        let denied = envoy::CheckResponse {
            status: Some(envoy_types::pb::google::rpc::Status {
                code: 8,
                ..Default::default()
            }),
            http_response: Some(envoy::HttpResponse::DeniedResponse(
                envoy::DeniedHttpResponse {
                    status: Some(envoy_types::pb::envoy::r#type::v3::HttpStatus { code: 429 }),
                    headers: vec![header("retry-after", "7", false)],
                    body: "{\"error\":{}}".into(),
                },
            )),
            ..Default::default()
        };
        assert_eq!(
            ServerAnswer::decode(&denied.encode_to_vec()),
            Ok(ServerAnswer::Deny {
                status: 429,
                headers: vec![("retry-after".into(), "7".into())],
                body: "{\"error\":{}}".into(),
            })
        );
        assert!(ServerAnswer::decode(b"\xff\xff").is_err());
    }
}
