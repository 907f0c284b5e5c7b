//! The Envoy edge: `envoy.service.auth.v3.Authorization/Check`. Converts the `CheckRequest` into
//! a [`CheckInput`] and the [`Checked`] back into a `CheckResponse`; nothing else here knows
//! Envoy's types.

use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction,
    HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

use llm_policy_core::identity::IdentityMode;
use llm_policy_core::wire::{self, LocalCounted, PARTIAL_BODY_HEADER};

use super::engine::{CheckInput, Checked, Engine};

/// The ext_authz service.
pub struct EnvoyAuthz {
    engine: Arc<Engine>,
}

impl EnvoyAuthz {
    /// A service checking with `engine`.
    pub fn new(engine: Arc<Engine>) -> EnvoyAuthz {
        EnvoyAuthz { engine }
    }
}

/// `CheckRequest` → [`CheckInput`].
pub fn input(req: CheckRequest) -> CheckInput {
    let Some(attributes) = req.attributes else {
        return CheckInput::default();
    };
    let extensions = &attributes.context_extensions;
    let local_counted = LocalCounted::from_extensions(|k| extensions.get(k).map(String::as_str));
    // A value this server does not know is taken as the strictest mode (a key is required),
    // never as "trust the headers".
    let identity = extensions.get(wire::IDENTITY_EXTENSION).map(|via| {
        IdentityMode::from_via(via).unwrap_or_else(|| {
            tracing::warn!(identity = %via, "unknown identity mode from the proxy: requiring a virtual key");
            IdentityMode::ApiKeys
        })
    });
    let Some(http) = attributes.request.and_then(|r| r.http) else {
        return CheckInput::default();
    };
    // `header_map` (with `encode_raw_headers`) carries every value, raw; `headers` joins repeated
    // names with `,`.
    let mut headers: Vec<(String, String)> = match http.header_map {
        Some(map) if !map.headers.is_empty() => map
            .headers
            .into_iter()
            .map(|h| {
                let value = if h.raw_value.is_empty() {
                    h.value
                } else {
                    String::from_utf8_lossy(&h.raw_value).into_owned()
                };
                (h.key, value)
            })
            .collect(),
        _ => http.headers.into_iter().collect(),
    };
    let body = if http.raw_body.is_empty() {
        http.body.into_bytes()
    } else {
        http.raw_body
    };
    // Envoy flags a body it cut at `max_request_bytes`, but not in every case (a body that
    // arrives whole in one read is cut unflagged): a declared length above what arrived says
    // the same.
    let declared = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok());
    let partial_body = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case(PARTIAL_BODY_HEADER) && v == "true")
        || declared.is_some_and(|n| n > body.len());
    headers.retain(|(k, _)| wire::is_request_data(k));
    if !http.host.is_empty()
        && !headers
            .iter()
            .any(|(k, _)| k == ":authority" || k == "host")
    {
        headers.push((String::from(":authority"), http.host));
    }
    CheckInput {
        method: http.method,
        path: http.path,
        headers,
        body,
        partial_body,
        now: None,
        explain: false,
        // Envoy forwards what is allowed: counters are spent.
        charge: true,
        local_counted,
        identity,
    }
}

fn header(key: String, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key,
            value,
            raw_value: Vec::new(),
        }),
        // Ours, whatever the client sent under the same name.
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..HeaderValueOption::default()
    }
}

/// gRPC codes Envoy reads (`google.rpc.Code`).
mod code {
    pub const OK: i32 = 0;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const UNAVAILABLE: i32 = 14;
}

/// A grant as Envoy dynamic metadata (under the ext_authz filter's namespace, which the
/// generated configuration forwards to the server's ext_proc edge).
fn metadata(r: &wire::Grant) -> Struct {
    Struct {
        fields: r
            .fields()
            .into_iter()
            .map(|(k, v)| {
                let kind = match v {
                    wire::MetadataValue::Text(t) => Kind::StringValue(t),
                    wire::MetadataValue::Number(n) => Kind::NumberValue(n),
                };
                (k.to_string(), Value { kind: Some(kind) })
            })
            .collect(),
    }
}

/// [`Checked`] → `CheckResponse`.
pub fn response(checked: Checked) -> CheckResponse {
    match checked.reply {
        None => {
            // Headers only the server may set upstream: a client's copy is removed.
            let mut headers_to_remove: Vec<String> = wire::SERVER_ONLY_HEADERS
                .iter()
                .filter(|h| !checked.upstream.iter().any(|(k, _)| k == *h))
                .map(|h| (*h).to_string())
                .collect();
            // An answer whose usage is read, or that response rules check (the ext_proc edge),
            // must come uncompressed.
            let redact = checked
                .decision
                .as_ref()
                .and_then(|d| d.actions.redact.clone())
                // Nothing found at the check: the body the rewrite stream gets holds nothing
                // to replace either.
                .filter(|r| !r.counts.is_empty())
                .map(|mut r| {
                    r.counts.clear();
                    r
                });
            if checked.reservation.is_some()
                || checked.answer.is_some()
                || redact.as_ref().is_some_and(|r| r.restore)
            {
                headers_to_remove.push(String::from("accept-encoding"));
            }
            let grant = wire::Grant {
                max_tokens: checked.decision.as_ref().and_then(|d| d.actions.max_tokens),
                include_usage: checked.include_usage && checked.reservation.is_some(),
                reservation: checked.reservation,
                answer: checked.answer,
                stream: checked.stream && redact.is_some(),
                redact,
            };
            let mut upstream = checked.upstream;
            if grant.gates() {
                // The ext_proc filters that rewrite the body and change the answer run for this
                // request only.
                headers_to_remove.retain(|h| h != wire::REWRITE_HEADER);
                upstream.push((wire::REWRITE_HEADER.to_string(), String::from("1")));
            }
            let response_headers_to_add = checked
                .respond
                .into_iter()
                .map(|(k, v)| header(k, v))
                .collect();
            CheckResponse {
                status: Some(rpc::Status {
                    code: code::OK,
                    ..rpc::Status::default()
                }),
                dynamic_metadata: (!grant.is_empty()).then(|| metadata(&grant)),
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                    headers: upstream.into_iter().map(|(k, v)| header(k, v)).collect(),
                    headers_to_remove,
                    response_headers_to_add,
                    ..OkHttpResponse::default()
                })),
            }
        }
        Some(reply) => {
            let code = match reply.status {
                429 => code::RESOURCE_EXHAUSTED,
                400 | 413 => code::INVALID_ARGUMENT,
                s if s >= 500 => code::UNAVAILABLE,
                _ => code::PERMISSION_DENIED,
            };
            CheckResponse {
                status: Some(rpc::Status {
                    code,
                    ..rpc::Status::default()
                }),
                http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                    status: Some(HttpStatus {
                        code: i32::from(reply.status),
                    }),
                    headers: reply
                        .headers
                        .into_iter()
                        .map(|(k, v)| header(k, v))
                        .collect(),
                    body: reply.body,
                })),
                ..CheckResponse::default()
            }
        }
    }
}

#[tonic::async_trait]
impl Authorization for EnvoyAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let checked = self.engine.check(input(request.into_inner())).await;
        Ok(Response::new(response(checked)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::HeaderMap;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;

    fn request(http: HttpRequest) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(http),
                    ..Request::default()
                }),
                ..AttributeContext::default()
            }),
        }
    }

    fn raw(key: &str, value: &str) -> HeaderValue {
        HeaderValue {
            key: key.into(),
            value: String::new(),
            raw_value: value.as_bytes().to_vec(),
        }
    }

    #[test]
    fn raw_headers_pseudo_headers_and_cut_bodies() {
        let i = input(request(HttpRequest {
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            host: "api.openai.com".into(),
            header_map: Some(HeaderMap {
                headers: vec![
                    raw(":method", "POST"),
                    raw(":authority", "api.openai.com"),
                    raw("x-user-id", "a"),
                    raw("x-user-id", "b"),
                    raw("content-length", "10"),
                ],
            }),
            raw_body: b"{\"a\":1}".to_vec(),
            ..HttpRequest::default()
        }));
        assert_eq!(
            i.headers,
            [
                (":authority".to_string(), "api.openai.com".to_string()),
                ("x-user-id".into(), "a".into()),
                ("x-user-id".into(), "b".into()),
                ("content-length".into(), "10".into()),
            ]
        );
        // 7 bytes arrived of 10 declared.
        assert!(i.partial_body);
        let i = input(request(HttpRequest {
            headers: [
                ("x-envoy-auth-partial-body".to_string(), "true".to_string()),
                ("content-length".into(), "4".into()),
            ]
            .into_iter()
            .collect(),
            body: "{}{}".into(),
            host: "h".into(),
            ..HttpRequest::default()
        }));
        assert!(i.partial_body);
        assert!(i.headers.iter().any(|(k, v)| k == ":authority" && v == "h"));
        assert!(!i
            .headers
            .iter()
            .any(|(k, _)| k == "x-envoy-auth-partial-body"));
        assert!(!input(CheckRequest::default()).partial_body);
    }
}
