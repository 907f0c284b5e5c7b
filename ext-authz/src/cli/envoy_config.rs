//! `llm-policy envoy-config`: a complete Envoy 1.40 configuration that puts the policies in front
//! of an LLM provider, so nobody hand-writes Envoy YAML. Three modes:
//!
//! - `filter`: the proxy-wasm filter decides in Envoy, with the bundle inline;
//! - `ext-authz`: Envoy's ext_authz filter asks `llm-policy serve` for every request;
//! - `filter+fallback`: the filter decides, and asks the server only for what it cannot decide
//!   alone (global limits, budgets, plugin rules).
//!
//! The bundle is validated first (a broken one is refused with its errors) and embedded as JSON.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::io::Write as _;

use clap::{Args, ValueEnum};
use llm_policy_core::identity::{IdentityMode, API_KEY_HEADER};
use llm_policy_core::wire::{self, IDENTITY_EXTENSION};
use llm_policy_core::{source, ContextConfig, Diagnostics, PolicySet};
use serde_json::json;

/// Where Envoy runs the filter from when `--wasm` is not given (what `make filter` builds).
pub const DEFAULT_WASM: &str = "target/wasm32-wasip1/wasm/llm_policy_filter.wasm";

/// What is routed when the provider's key is injected: the inference endpoints the policies
/// decide (method, exact path; a query string does not change the match).
const INFERENCE_ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("GET", "/v1/models"),
];

/// The filter's default body limit (bodies are buffered in the proxy).
const FILTER_MAX_BODY: usize = 1024 * 1024;

/// Which filters check the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The proxy-wasm filter alone.
    Filter,
    /// Envoy's ext_authz filter and the policy server.
    #[value(name = "ext-authz")]
    ExtAuthz,
    /// The filter, falling back to the server for what it cannot decide alone.
    #[value(name = "filter+fallback")]
    FilterFallback,
}

/// Failure mode for the generated filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Failure {
    /// No decision: 503.
    Closed,
    /// No decision: let through, marked.
    Open,
}

/// How the generated configuration establishes who a request is (docs/identity.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Identity {
    /// Client identity, namespace and shield headers are removed: every request is anonymous
    /// in the default namespace (the default).
    None,
    /// The identity headers are trusted as sent: only behind a gateway that sets them itself.
    #[value(name = "trusted-headers")]
    TrustedHeaders,
    /// Envoy's jwt_authn verifies `Authorization: Bearer <jwt>`; claims become the principal.
    Jwt,
    /// Virtual API keys (hashed in a key table); the provider's key is injected upstream.
    #[value(name = "api-keys")]
    ApiKeys,
}

impl Identity {
    fn mode(self) -> IdentityMode {
        match self {
            Identity::None => IdentityMode::Anonymous,
            Identity::TrustedHeaders => IdentityMode::TrustedHeaders,
            Identity::Jwt => IdentityMode::Jwt,
            Identity::ApiKeys => IdentityMode::ApiKeys,
        }
    }
}

/// The header the provider's key goes upstream in (api-keys identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProviderKeyHeader {
    /// `Authorization: Bearer <key>` (OpenAI, Azure OpenAI with a bearer token).
    Authorization,
    /// `x-api-key: <key>` (Anthropic).
    #[value(name = "x-api-key")]
    XApiKey,
}

/// `llm-policy envoy-config` arguments.
#[derive(Debug, Clone, Args)]
pub struct EnvoyConfigArgs {
    /// Which filters check the traffic.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Policy files or directories, embedded in the filter (filter modes).
    #[arg(long)]
    pub policies: Vec<PathBuf>,
    /// Envoy's listener.
    #[arg(long, default_value = "0.0.0.0:10000")]
    pub listen: SocketAddr,
    /// The LLM provider, e.g. `https://api.openai.com` (TLS with SNI for https).
    #[arg(long)]
    pub upstream: String,
    /// The filter's .wasm file.
    #[arg(long, default_value = DEFAULT_WASM)]
    pub wasm: String,
    /// The policy server's gRPC address, `host:port` (ext-authz and filter+fallback).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub server: String,
    /// Envoy's admin listener.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin: SocketAddr,
    /// What happens when no decision can be made.
    #[arg(long, value_enum, default_value = "closed")]
    pub failure_mode: Failure,
    /// Also fetch the bundle from the server's REST API (`host:port`) and swap in new versions
    /// (filter modes).
    #[arg(long)]
    pub sync_from: Option<String>,
    /// A file holding the server's read token, for the filter's bundle fetches (when the server
    /// has `readTokenFile`).
    #[arg(long)]
    pub sync_token_file: Option<PathBuf>,
    /// filter+fallback: a file holding the server's usage token (`usageTokenFile`), sent with the
    /// filter's usage reports (a server refuses reports without it).
    #[arg(long)]
    pub usage_token_file: Option<PathBuf>,
    /// How often the filter asks for a new bundle, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub sync_interval_ms: u64,
    /// CA bundle that verifies an https upstream.
    #[arg(long, default_value = "/etc/ssl/certs/ca-certificates.crt")]
    pub upstream_ca: String,
    /// Most client connections the listener holds at once; more are closed as they arrive.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: u64,
    /// Longest a client may take to send its request headers, in milliseconds (then 408 and the
    /// connection is closed: slow-header connections cannot pile up).
    #[arg(long, default_value_t = 10_000)]
    pub request_headers_timeout_ms: u64,
    /// Who a request is (docs/identity.md). Without it, every identity, namespace and shield
    /// header a client sends is removed and requests are anonymous.
    #[arg(long, value_enum, default_value = "none")]
    pub identity: Identity,
    /// `--identity jwt`: the issuer (`iss`) tokens must carry.
    #[arg(long)]
    pub jwt_issuer: Option<String>,
    /// `--identity jwt`: an audience (`aud`) tokens must carry (repeat for several).
    #[arg(long)]
    pub jwt_audience: Vec<String>,
    /// `--identity jwt`: the issuer's public keys as a JWKS file (re-read by Envoy on start).
    #[arg(long)]
    pub jwks_file: Option<PathBuf>,
    /// `--identity jwt`: the issuer's JWKS URL (fetched and cached by Envoy; https).
    #[arg(long)]
    pub jwks_uri: Option<String>,
    /// `--identity api-keys`: the key table (`llm-policy keys create`), embedded in the filter.
    /// In ext-authz mode the server holds the keys (`keysFile` in its configuration).
    #[arg(long)]
    pub keys_file: Option<PathBuf>,
    /// `--identity api-keys`: a file holding the provider's real API key, injected upstream in
    /// place of the virtual key (Envoy's credential_injector; the key stays out of the config).
    #[arg(long)]
    pub provider_key_file: Option<PathBuf>,
    /// The header the provider key goes in (default: `x-api-key` for an upstream on
    /// anthropic.com, else `authorization` with `Bearer`).
    #[arg(long, value_enum)]
    pub provider_key_header: Option<ProviderKeyHeader>,
}

/// An `http(s)://host[:port]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Upstream {
    tls: bool,
    host: String,
    port: u16,
}

/// Why no configuration could be generated.
#[derive(Debug, thiserror::Error)]
pub enum EnvoyConfigError {
    /// A flag is missing or its value cannot be used (the message names the flag).
    #[error("{0}")]
    Argument(String),
    /// The bundle does not load or compile (its located diagnostics).
    #[error("{}", render(.0))]
    Bundle(Diagnostics),
}

fn parse_upstream(url: &str) -> Result<Upstream, EnvoyConfigError> {
    let bad = |why: &str| EnvoyConfigError::Argument(format!("--upstream {url}: {why}"));
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(bad("expected http://host[:port] or https://host[:port]"));
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(bad(
            "give the provider's origin only (no path); requests keep their own paths",
        ));
    }
    let (host, port) = split_host_port(authority, if tls { 443 } else { 80 })
        .ok_or_else(|| bad("bad host or port"))?;
    Ok(Upstream { tls, host, port })
}

/// Whether `host` is a DNS name or an IP address (nothing that could end a YAML scalar).
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'))
}

fn split_host_port(authority: &str, default: u16) -> Option<(String, u16)> {
    let (host, port) = split_any_host_port(authority, default)?;
    valid_host(&host).then_some((host, port))
}

fn split_any_host_port(authority: &str, default: u16) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((authority.to_string(), default)),
    }
}

/// An ext_proc filter to `llm-policy serve` that Envoy runs only for requests whose `Check`
/// answer set [`wire::REWRITE_HEADER`], with the `Check`'s grant forwarded. `modes`: request
/// headers, response headers, request body, response body, request trailers, response trailers
/// (the edge overrides them per request).
///
/// Envoy's composite filter holds it, created only when the request's headers carry the mark:
/// every other request, and a local reply of an earlier filter (an ext_authz denial, a request
/// timeout) whose request never reached it, passes without it. (A filter skipped by a matcher
/// instead would still run for such a reply, and fail it when the server is down.)
fn gated_ext_proc(
    name: &str,
    comment: &str,
    failure_mode_allow: bool,
    modes: [&str; 6],
    early_body: bool,
) -> String {
    let comment = indent(comment, 18);
    // A body streamed from the request's headers on goes to the server as it comes: held until
    // the answer's headers are answered, a body that has fully arrived by then is lost (Envoy
    // 1.40, seen under load).
    let early = if early_body {
        "\n                                        # An answer streamed since the request's headers goes to the server as it comes.\n                                        send_body_without_waiting_for_header_response: true"
    } else {
        ""
    };
    let [rq_headers, rs_headers, rq_body, rs_body, rq_trailers, rs_trailers] = modes;
    // A processor that cannot answer: 503, as the ext_authz filter answers (Envoy's default is
    // 500).
    let on_error = if failure_mode_allow {
        String::new()
    } else {
        String::from("\n                                        status_on_error: { code: 503 }")
    };
    format!(
        "{comment}
                  - name: {name}
                    typed_config:
                      \"@type\": type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher
                      extension_config:
                        name: envoy.filters.http.composite
                        typed_config:
                          \"@type\": type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite
                      xds_matcher:
                        matcher_list:
                          matchers:
                            - predicate:
                                single_predicate:
                                  input:
                                    name: rewrite-header
                                    typed_config:
                                      \"@type\": type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput
                                      header_name: {REWRITE}
                                  value_match: {{ exact: \"1\" }}
                              on_match:
                                action:
                                  name: {name}
                                  typed_config:
                                    \"@type\": type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction
                                    typed_config:
                                      name: envoy.filters.http.ext_proc
                                      typed_config:
                                        \"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
                                        grpc_service:
                                          envoy_grpc: {{ cluster_name: llm_policy }}
                                        failure_mode_allow: {failure_mode_allow}{on_error}
                                        # A whole answer is checked at once (up to maxResponseBytes).
                                        message_timeout: 2s
                                        allow_mode_override: true{early}
                                        processing_mode:
                                          request_header_mode: {rq_headers}
                                          response_header_mode: {rs_headers}
                                          request_body_mode: {rq_body}
                                          response_body_mode: {rs_body}
                                          request_trailer_mode: {rq_trailers}
                                          response_trailer_mode: {rs_trailers}
                                        metadata_options:
                                          forwarding_namespaces:
                                            untyped: [ {EXT_AUTHZ_METADATA} ]
",
        EXT_AUTHZ_METADATA = wire::EXT_AUTHZ_METADATA,
        REWRITE = wire::REWRITE_HEADER,
    )
}

/// Indents every line of `text` by `n` spaces.
fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines()
        .map(|l| format!("{pad}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How a cluster resolves a host name.
#[derive(Clone, Copy)]
enum Dns {
    /// One address at a time (a provider's API behind many addresses).
    Logical,
    /// Every address is an endpoint (policy server replicas behind one name, e.g. a Kubernetes
    /// headless service or a Compose network alias).
    Strict,
}

/// A cluster's endpoint: STATIC for an IP address, LOGICAL_DNS or STRICT_DNS for a name.
fn cluster(name: &str, host: &str, port: u16, dns: Dns, extra: &str) -> String {
    let kind = match (host.parse::<std::net::IpAddr>().is_ok(), dns) {
        (true, _) => "STATIC",
        (false, Dns::Logical) => "LOGICAL_DNS\n      dns_lookup_family: V4_PREFERRED",
        (false, Dns::Strict) => "STRICT_DNS\n      dns_lookup_family: V4_PREFERRED",
    };
    format!(
        "    - name: {name}
      type: {kind}
      connect_timeout: 2s
{extra}      load_assignment:
        cluster_name: {name}
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {{ address: \"{host}\", port_value: {port} }}
"
    )
}

/// The identity parts of a configuration (docs/identity.md): filters before and after the
/// policy filter, the local replies, static secrets, the ext_authz route settings, and the
/// filter configuration's `identity` section.
#[derive(Default)]
struct IdentityParts {
    /// Filters before the policy filter: the client's identity headers removed, JWT verified.
    before: String,
    /// Filters after it: the client's credentials removed, the provider's key injected.
    after: String,
    /// The connection manager's `local_reply_config` (JWT failures in the provider's format).
    local_reply: String,
    /// `static_resources.secrets`.
    secrets: String,
    /// Extra clusters (a remote JWKS).
    clusters: String,
    /// Route settings: the identity headers kept from the provider.
    route: String,
    /// Only the inference endpoints are routed (the provider's key is injected: the file, batch
    /// and assistant APIs would hand one organisation's data to every key holder).
    inference_only: bool,
    /// The filter configuration's `identity`.
    filter: serde_json::Value,
}

/// `scheme://host[:port]/path` split for a JWKS URL.
fn parse_url(flag: &str, url: &str) -> Result<(Upstream, String), EnvoyConfigError> {
    let bad = |why: &str| EnvoyConfigError::Argument(format!("{flag} {url}: {why}"));
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(bad("expected an http:// or https:// URL"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let (host, port) = split_host_port(authority, if tls { 443 } else { 80 })
        .filter(|(h, _)| !h.is_empty())
        .ok_or_else(|| bad("bad host or port"))?;
    Ok((Upstream { tls, host, port }, path.to_string()))
}

/// A JSON string (file names, claim names, URLs) for YAML: JSON is YAML.
fn quoted(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

/// The TLS transport socket of a cluster that talks to `host` over https.
fn tls_socket(host: &str, ca: &str) -> String {
    let ca = quoted(ca);
    format!(
        "      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: {host}
          common_tls_context:
            validation_context:
              trusted_ca: {{ filename: {ca} }}
              match_typed_subject_alt_names:
                - san_type: DNS
                  matcher: {{ exact: {host} }}
"
    )
}

/// Writes a warning on stderr (the configuration goes to stdout).
fn warn(text: &str) {
    let _ = writeln!(std::io::stderr(), "warning: {text}");
}

fn identity_parts(
    args: &EnvoyConfigArgs,
    context: &ContextConfig,
    upstream: &Upstream,
) -> Result<IdentityParts, EnvoyConfigError> {
    let arg = |text: &str| EnvoyConfigError::Argument(text.to_string());
    let mut parts = IdentityParts {
        filter: json!({"mode": args.identity.mode()}),
        ..IdentityParts::default()
    };
    let jwt_flags = args.jwt_issuer.is_some()
        || !args.jwt_audience.is_empty()
        || args.jwks_file.is_some()
        || args.jwks_uri.is_some();
    if jwt_flags && args.identity != Identity::Jwt {
        return Err(arg(
            "--jwt-issuer, --jwt-audience, --jwks-file and --jwks-uri need --identity jwt",
        ));
    }
    if args.keys_file.is_some() && args.identity != Identity::ApiKeys {
        return Err(arg("--keys-file needs --identity api-keys"));
    }
    let injects = args.provider_key_file.is_some();
    if args.identity == Identity::ApiKeys
        && args.mode == Mode::ExtAuthz
        && args.failure_mode == Failure::Open
    {
        return Err(arg(
            "--identity api-keys with --mode ext-authz needs --failure-mode closed: with the server unreachable, \
             requests without a valid key would go upstream with the provider's key",
        ));
    }
    if injects && !matches!(args.identity, Identity::Jwt | Identity::ApiKeys) {
        return Err(arg(
            "--provider-key-file needs --identity jwt or --identity api-keys",
        ));
    }
    match args.identity {
        Identity::TrustedHeaders => {
            warn("--identity trusted-headers: the identity, namespace and shield headers are trusted as the client sends them; \
                  only run this behind a gateway that authenticates clients and sets those headers itself");
            parts.before.push_str(
                "                  # --identity trusted-headers: the identity, namespace and shield headers are
                  # trusted as sent. Only safe behind a gateway that authenticates clients and sets
                  # them itself (docs/identity.md).
",
            );
            return Ok(parts);
        }
        Identity::None => warn(
            "no --identity: every identity, namespace and shield header a client sends is removed, so every request \
             is anonymous in the default namespace; choose --identity jwt, api-keys or trusted-headers (docs/identity.md)",
        ),
        Identity::Jwt | Identity::ApiKeys => {}
    }

    // Every header the context reads identity from, removed before anything reads it.
    let mut owned: Vec<String> = vec![context.namespace_header.to_ascii_lowercase()];
    owned.extend(
        context
            .principal_headers
            .values()
            .map(|h| h.to_ascii_lowercase()),
    );
    owned.sort();
    owned.dedup();
    let mut removes: String = owned
        .iter()
        .map(|h| format!("                          - remove: {}\n", quoted(h)))
        .collect();
    removes.push_str(&format!(
        "                          - remove_on_match: {{ key_matcher: {{ prefix: {} }} }}\n",
        quoted(&context.shield_prefix.to_ascii_lowercase())
    ));
    // What Envoy established is for the policy, not for the provider: removed by the router,
    // after every filter has read it.
    parts.route = format!(
        "
                          # The principal and namespace stay here: the provider never sees them.
                          request_headers_to_remove: [{}]",
        owned
            .iter()
            .map(|h| quoted(h))
            .collect::<Vec<_>>()
            .join(", ")
    );
    parts.before.push_str(&format!(
        "                  # Identity ({mode}): the client's own identity, namespace and shield headers are
                  # removed before any filter reads them; only what Envoy establishes takes their place.
                  - name: envoy.filters.http.header_mutation
                    typed_config:
                      \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
                      mutations:
                        request_mutations:
{removes}",
        mode = args.identity.mode().via()
    ));

    if args.identity == Identity::Jwt {
        let issuer = args
            .jwt_issuer
            .as_deref()
            .ok_or_else(|| arg("--identity jwt needs --jwt-issuer"))?;
        if args.jwt_audience.is_empty() {
            return Err(arg(
                "--identity jwt needs --jwt-audience (tokens for another audience are refused)",
            ));
        }
        let jwks = match (&args.jwks_file, &args.jwks_uri) {
            (Some(file), None) => format!(
                "local_jwks: {{ filename: {} }}",
                quoted(&file.to_string_lossy())
            ),
            (None, Some(uri)) => {
                let (origin, _) = parse_url("--jwks-uri", uri)?;
                let loopback = origin
                    .host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
                    || origin.host == "localhost";
                if !origin.tls && !loopback {
                    return Err(arg(&format!(
                        "--jwks-uri {uri}: use https (whoever can change the keys on the way can sign any token)"
                    )));
                }
                let socket = if origin.tls {
                    tls_socket(&origin.host, &args.upstream_ca)
                } else {
                    String::new()
                };
                parts.clusters.push('\n');
                parts.clusters.push_str(&cluster(
                    "llm_jwks",
                    &origin.host,
                    origin.port,
                    Dns::Logical,
                    &socket,
                ));
                format!(
                    "remote_jwks:
                            http_uri: {{ uri: {}, cluster: llm_jwks, timeout: 5s }}
                            cache_duration: 600s
                            # Fetched at start and refreshed before the cache expires.
                            async_fetch: {{}}
                            retry_policy: {{ num_retries: 3 }}",
                    quoted(uri)
                )
            }
            _ => {
                return Err(arg(
                    "--identity jwt needs one of --jwks-file and --jwks-uri",
                ))
            }
        };
        let audiences = args
            .jwt_audience
            .iter()
            .map(|a| quoted(a))
            .collect::<Vec<_>>()
            .join(", ");
        let mut claims = String::new();
        let defaults = ContextConfig::default().principal_claims;
        for (attribute, claim) in &context.principal_claims {
            let Some(header) = context.principal_headers.get(attribute) else {
                // A default mapping for an attribute this deployment does not have is no mistake.
                if defaults.get(attribute) != Some(claim) {
                    warn(&format!(
                        "principalClaims maps claim `{claim}` to principal attribute `{attribute}`, which has no principal header: the claim is not used"
                    ));
                }
                continue;
            };
            claims.push_str(&format!(
                "                            - {{ claim_name: {}, header_name: {} }}\n",
                quoted(claim),
                quoted(&header.to_ascii_lowercase())
            ));
        }
        if let Some(claim) = &context.namespace_claim {
            claims.push_str(&format!(
                "                            - {{ claim_name: {}, header_name: {} }}\n",
                quoted(claim),
                quoted(&context.namespace_header.to_ascii_lowercase())
            ));
        }
        parts.before.push_str(&format!(
            "                  # Identity (jwt): `Authorization: Bearer <jwt>` verified (signature, exp/nbf, issuer,
                  # audience) before any policy runs; its claims become the principal (headers Envoy
                  # writes itself, after the client's were removed). Failures: 401.
                  - name: envoy.filters.http.jwt_authn
                    typed_config:
                      \"@type\": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
                      providers:
                        llm_policy:
                          issuer: {issuer}
                          audiences: [{audiences}]
                          {jwks}
                          # Only from the Authorization header (not the default `access_token`
                          # query parameter, which would travel on to the provider in the URL).
                          from_headers: [{{ name: authorization, value_prefix: \"Bearer \" }}]
                          # A token without `exp` would be good forever: refused.
                          require_expiration: true
                          # The token is not sent to the provider.
                          forward: false
                          claim_to_headers:
{claims}                      rules:
                        - match: {{ prefix: / }}
                          requires: {{ provider_name: llm_policy }}
",
            issuer = quoted(issuer),
        ));
        // jwt_authn answers in plain text; the SDKs expect their provider's error JSON.
        let cel = "                            - extension_filter:
                                name: envoy.access_loggers.extension_filters.cel
                                typed_config:
                                  \"@type\": type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter
                                  expression: \"response.code_details.startsWith('jwt_authn')\"
";
        parts.local_reply = format!(
            "                # JWT failures answered 401 in the provider's error format (the SDKs raise their
                # AuthenticationError): Anthropic for its paths and SDK, OpenAI otherwise.
                local_reply_config:
                  mappers:
                    - filter:
                        and_filter:
                          filters:
{cel}                            - or_filter:
                                filters:
                                  - header_filter: {{ header: {{ name: anthropic-version, present_match: true }} }}
                                  - header_filter: {{ header: {{ name: \":path\", string_match: {{ prefix: /v1/messages }} }} }}
                      # jwt_authn answers 403 for a token of another audience: still a token
                      # this gateway does not accept, so 401 like every other refused token.
                      status_code: 401
                      body_format_override:
                        json_format:
                          type: error
                          error: {{ type: authentication_error, message: \"%LOCAL_REPLY_BODY%\" }}
                        content_type: application/json
                    - filter:
                        and_filter:
                          filters:
{cel}                            - status_code_filter: {{ comparison: {{ op: GE, value: {{ default_value: 400, runtime_key: llm_policy.jwt_status }} }} }}
                      status_code: 401
                      body_format_override:
                        json_format:
                          error: {{ message: \"%LOCAL_REPLY_BODY%\", type: authentication_error, code: invalid_api_key }}
                        content_type: application/json
"
        );
    }

    if args.identity == Identity::ApiKeys {
        let uses_filter = args.mode != Mode::ExtAuthz;
        match (&args.keys_file, uses_filter) {
            (Some(_), false) => {
                return Err(arg(
                    "--keys-file: in ext-authz mode the server holds the keys (`keysFile` in its configuration, or `llm-policy keys create --server`)",
                ))
            }
            (None, true) if args.sync_from.is_none() => {
                return Err(arg("--identity api-keys in a filter mode needs --keys-file or --sync-from (the keys the filter checks)"))
            }
            _ => {}
        }
        if let Some(path) = &args.keys_file {
            let table =
                llm_policy_core::identity::load_keys(path).map_err(EnvoyConfigError::Bundle)?;
            parts.filter["keys"] = serde_json::to_value(table.records().collect::<Vec<_>>())
                .map_err(|e| arg(&format!("--keys-file: {e}")))?;
        }
    }

    if args.identity == Identity::ApiKeys || injects {
        parts.inference_only = true;
        let header =
            args.provider_key_header
                .unwrap_or(if upstream.host.ends_with("anthropic.com") {
                    ProviderKeyHeader::XApiKey
                } else {
                    ProviderKeyHeader::Authorization
                });
        parts.after.push_str(&format!(
            "                  # The client's credentials (a virtual key, a token) never reach the provider.
                  - name: envoy.filters.http.header_mutation
                    typed_config:
                      \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
                      mutations:
                        request_mutations:
                          - remove: authorization
                          - remove: {API_KEY_HEADER}
"
        ));
        match &args.provider_key_file {
            Some(file) => {
                let (name, prefix) = match header {
                    ProviderKeyHeader::Authorization => ("authorization", "\n                          header_value_prefix: \"Bearer \""),
                    ProviderKeyHeader::XApiKey => (API_KEY_HEADER, ""),
                };
                parts.after.push_str(&format!(
                    "                  # The provider's real key, from a file (a secret: not in config dumps).
                  - name: envoy.filters.http.credential_injector
                    typed_config:
                      \"@type\": type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector
                      overwrite: true
                      credential:
                        name: envoy.http.injected_credentials.generic
                        typed_config:
                          \"@type\": type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic
                          credential: {{ name: llm_provider_key }}
                          header: {name}{prefix}
"
                ));
                parts.secrets = format!(
                    "  secrets:
    - name: llm_provider_key
      generic_secret: {{ secret: {{ filename: {} }} }}
",
                    quoted(&file.to_string_lossy())
                );
            }
            None => warn(
                "no --provider-key-file: the client's key is removed and no provider key is sent upstream",
            ),
        }
    }
    Ok(parts)
}

/// Generates the configuration. Errors: a broken bundle (its diagnostics), bad arguments.
pub fn generate(
    args: &EnvoyConfigArgs,
    context: Option<&ContextConfig>,
) -> Result<String, EnvoyConfigError> {
    let upstream = parse_upstream(&args.upstream)?;
    let uses_filter = args.mode != Mode::ExtAuthz;
    let uses_server = args.mode != Mode::Filter;
    let mut context = context.cloned().unwrap_or_else(|| ContextConfig {
        max_body_bytes: if uses_filter {
            FILTER_MAX_BODY
        } else {
            ContextConfig::default().max_body_bytes
        },
        ..ContextConfig::default()
    });
    context.max_body_bytes = context.max_body_bytes.max(1);
    let max_body = context.max_body_bytes;
    let failure = match args.failure_mode {
        Failure::Closed => "closed",
        Failure::Open => "open",
    };

    let identity = identity_parts(args, &context, &upstream)?;
    // Envoy obeys `x-envoy-*` request headers from requests it takes as internal (retries,
    // per-try timeouts): a client could make the provider answer, and bill, several times for one
    // charged request. None of them is the client's to set.
    let mut filters = String::from(
        "                  # Envoy's own control headers (retries, timeouts) are never the client's:
                  # removed first, so one request is never answered (and billed) several times.
                  - name: envoy.filters.http.header_mutation
                    typed_config:
                      \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
                      mutations:
                        request_mutations:
                          - remove_on_match: { key_matcher: { prefix: \"x-envoy-\" } }
",
    );
    filters.push_str(&identity.before);
    if uses_filter {
        if args.policies.is_empty() {
            return Err(EnvoyConfigError::Argument(String::from(
                "--policies is required in the filter modes",
            )));
        }
        let docs = source::load_policies(&args.policies).map_err(EnvoyConfigError::Bundle)?;
        let out = PolicySet::compile(&docs, &context).map_err(EnvoyConfigError::Bundle)?;
        let remote = out.set.stats().remote;
        if args.mode == Mode::Filter && remote > 0 {
            let _ = writeln!(
                std::io::stderr(),
                "warning: {remote} rule(s) of the bundle need the policy server (global rate limits, budgets, plugins); \
                 with --mode filter, requests they apply to get the failure mode ({}). Use --mode filter+fallback.",
                if args.failure_mode == Failure::Open { "let through, marked" } else { "503" }
            );
        }
        let mut plugin = json!({
            "policies": docs.iter().map(|d| d.value.clone()).collect::<Vec<_>>(),
            "context": context,
            "failureMode": failure,
            "identity": identity.filter,
        });
        if uses_server {
            plugin["server"] = json!({"cluster": "llm_policy", "timeoutMs": 200});
            if let Some(path) = &args.usage_token_file {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    EnvoyConfigError::Argument(format!(
                        "--usage-token-file {}: {e}",
                        path.display()
                    ))
                })?;
                plugin["server"]["usageToken"] = json!(token.trim());
            }
        } else if args.usage_token_file.is_some() {
            return Err(EnvoyConfigError::Argument(String::from(
                "--usage-token-file is for --mode filter+fallback (the filter's usage reports)",
            )));
        }
        if args.sync_from.is_some() {
            plugin["sync"] = json!({
                "cluster": "llm_policy_rest",
                "authority": "llm-policy",
                "intervalMs": args.sync_interval_ms,
            });
            if let Some(path) = &args.sync_token_file {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    EnvoyConfigError::Argument(format!("--sync-token-file {}: {e}", path.display()))
                })?;
                plugin["sync"]["token"] = json!(token.trim());
            }
        } else if args.sync_token_file.is_some() {
            return Err(EnvoyConfigError::Argument(String::from(
                "--sync-token-file needs --sync-from",
            )));
        }
        // Serializing a JSON value or a path cannot fail; a failure would say which.
        let plugin = serde_json::to_string_pretty(&plugin)
            .map_err(|e| EnvoyConfigError::Argument(format!("the filter configuration: {e}")))?;
        let wasm = serde_json::to_string(&args.wasm)
            .map_err(|e| EnvoyConfigError::Argument(format!("--wasm: {e}")))?;
        filters.push_str(&format!(
            "                  # The llm-policy filter: decides LLM API calls in Envoy.
                  - name: envoy.filters.http.wasm
                    typed_config:
                      \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
                      config:
                        name: llm_policy
                        root_id: llm_policy
                        # Decide on the body before the headers go upstream (Envoy >= 1.35;
                        # without it the headers may leave before the decision).
                        allow_on_headers_stop_iteration: true
                        # A VM that cannot start or has crashed: requests fail, never pass unchecked.
                        failure_policy: FAIL_CLOSED
                        vm_config:
                          vm_id: llm_policy
                          runtime: envoy.wasm.runtime.v8
                          code: {{ local: {{ filename: {wasm} }} }}
                        # The filter configuration (docs/filter.md): the bundle inline, as JSON.
                        configuration:
                          \"@type\": type.googleapis.com/google.protobuf.StringValue
                          value: |
{}
",
            indent(&plugin, 30)
        ));
    } else {
        filters.push_str(&format!(
            "                  # Every request checked by `llm-policy serve` (docs/server.md).
                  - name: envoy.filters.http.ext_authz
                    typed_config:
                      \"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
                      transport_api_version: V3
                      grpc_service:
                        envoy_grpc: {{ cluster_name: llm_policy }}
                        # Above the server's own deadline (150 ms), so the answer is the server's.
                        timeout: 0.25s
                      with_request_body:
                        max_request_bytes: {max_body}
                        # A larger body is sent in part, flagged; the server answers 413 in the
                        # provider's error format.
                        allow_partial_message: true
                        # Bytes, not a string: bodies that are not UTF-8 reach the server intact.
                        pack_as_bytes: true
                      # Every value of repeated headers, as sent.
                      encode_raw_headers: true
                      # The policy server unreachable: {}.
                      failure_mode_allow: {}
                      status_on_error: {{ code: 503 }}
",
            if args.failure_mode == Failure::Open {
                "let through"
            } else {
                "deny (503), never let through unchecked"
            },
            args.failure_mode == Failure::Open,
        ));
        filters.push_str(&gated_ext_proc(
            "llm_policy.answer",
            &format!(
                "# An answer the server changes (docs/budgets.md, docs/policy-language.md): the
# usage chunk the rewrite below asked for on the client's behalf removed from an
# OpenAI stream; answers response rules check held back and checked (a JSON
# answer whole, a stream through its held-back window), a denied one replaced by
# the provider's error. Before the rewrite filter, so it still sees the header;
# answers reach the usage filter first.
# The server unreachable: {}.",
                if args.failure_mode == Failure::Open {
                    "the answer passes unchanged"
                } else {
                    "the answer fails, never passes unchecked"
                }
            ),
            args.failure_mode == Failure::Open,
            ["SKIP", "SEND", "NONE", "NONE", "SKIP", "SKIP"],
            false,
        ));
        filters.push_str(&gated_ext_proc(
            "llm_policy.rewrite",
            "# A request whose body the policies rewrite (docs/budgets.md): its output
# cap lowered (`transform.maxTokens`), or, for an OpenAI stream whose client did
# not ask for its usage, `stream_options.include_usage` added; its personal data
# replaced by placeholders (`transform.redact`), and with `restore` its answer
# read back here (response rules, then the values put back). ext_authz cannot
# rewrite a body, so the server's ext_proc edge does. Unrewritten, the request
# could spend more than its budget pays for, or send what the policy redacts:
# the server unreachable denies it.",
            false,
            ["SEND", "SKIP", "NONE", "NONE", "SKIP", "SKIP"],
            false,
        ));
        filters.push_str(&format!(
            "                  # Every answer's usage, read by `llm-policy serve` as it streams to the client
                  # (docs/budgets.md): observability mode, so Envoy never waits for the server.
                  # The reservation travels in the ext_authz filter's dynamic metadata, never
                  # to the provider. A server that cannot be reached loses no answer; the
                  # reservation is then settled by `limits.unreported` (default: commit).
                  - name: envoy.filters.http.ext_proc
                    typed_config:
                      \"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
                      grpc_service:
                        envoy_grpc: {{ cluster_name: llm_policy }}
                        timeout: 5s
                      observability_mode: true
                      failure_mode_allow: true
                      processing_mode:
                        request_header_mode: SKIP
                        response_header_mode: SEND
                        request_body_mode: NONE
                        response_body_mode: STREAMED
                        request_trailer_mode: SKIP
                        response_trailer_mode: SEND
                      metadata_options:
                        forwarding_namespaces:
                          untyped: [ {EXT_AUTHZ_METADATA} ]
",
            EXT_AUTHZ_METADATA = wire::EXT_AUTHZ_METADATA,
        ));
    }

    filters.push_str(&identity.after);
    // ext_authz learns how identity was established from the route, never from the client.
    let route_settings = if uses_filter {
        String::new()
    } else {
        format!(
            "
                          typed_per_filter_config:
                            envoy.filters.http.ext_authz:
                              \"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                              check_settings:
                                context_extensions: {{ {IDENTITY_EXTENSION}: {} }}",
            args.identity.mode().via()
        )
    };
    let host_rewrite = if upstream.tls {
        format!("host_rewrite_literal: {}, ", upstream.host)
    } else {
        String::new()
    };
    let upstream_tls = if upstream.tls {
        tls_socket(&upstream.host, &args.upstream_ca)
    } else {
        String::new()
    };
    let mut clusters = cluster(
        "llm_upstream",
        &upstream.host,
        upstream.port,
        Dns::Logical,
        &upstream_tls,
    );
    if uses_server {
        let (host, port) = split_host_port(&args.server, 50051).ok_or_else(|| {
            EnvoyConfigError::Argument(format!("--server {}: expected host:port", args.server))
        })?;
        let h2 = "      # gRPC: the cluster must speak HTTP/2.
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {}
      health_checks:
        - timeout: 2s
          interval: 5s
          # Also while no request flows (the default would wait 60 s after a failed first probe,
          # e.g. one made while the wasm VMs compile at start).
          no_traffic_interval: 5s
          unhealthy_threshold: 2
          healthy_threshold: 1
          grpc_health_check:
            service_name: envoy.service.auth.v3.Authorization
";
        clusters.push('\n');
        clusters.push_str(&cluster("llm_policy", &host, port, Dns::Strict, h2));
    }

    if let (true, Some(addr)) = (uses_filter, &args.sync_from) {
        let (host, port) = split_host_port(addr, 8080).ok_or_else(|| {
            EnvoyConfigError::Argument(format!("--sync-from {addr}: expected host:port"))
        })?;
        clusters.push('\n');
        clusters.push_str(&cluster(
            "llm_policy_rest",
            &host,
            port,
            Dns::Logical,
            "      # The server's REST API: the filter fetches the bundle (GET /v1/bundle).\n",
        ));
    }

    clusters.push_str(&identity.clusters);

    // Room for our own 413 before Envoy's: the filter answers when a body passes the limit.
    let buffer_limit = if uses_filter {
        max_body.saturating_mul(2).max(64 * 1024)
    } else {
        max_body
    };
    let what = match args.mode {
        Mode::Filter => "The llm-policy proxy-wasm filter decides every LLM API call in Envoy.",
        Mode::ExtAuthz => {
            "Every request is checked by `llm-policy serve` through ext_authz (gRPC)."
        }
        Mode::FilterFallback => {
            "The llm-policy filter decides in Envoy and asks `llm-policy serve` (ext_authz gRPC)\n\
             # only for global limits, budgets and plugin rules."
        }
    };
    let route = format!(
        "                          route: {{ cluster: llm_upstream, {host_rewrite}timeout: 0s }}{}{route_settings}\n",
        identity.route
    );
    let routes = if identity.inference_only {
        let mut routes = String::from(
            "                        # The provider's key is injected: only the inference endpoints are routed.\n",
        );
        for (method, path) in INFERENCE_ROUTES {
            routes.push_str(&format!(
                "                        - match: {{ path: \"{path}\", headers: [{{ name: \":method\", string_match: {{ exact: {method} }} }}] }}\n{route}"
            ));
        }
        routes.push_str(&format!(
            "                        # Files, batches, assistants, stored responses: shared by every key holder
                        # under one provider key, so not routed.
                        - match: {{ prefix: \"/\" }}
                          direct_response:
                            status: 404
                            body: {{ inline_string: {} }}
                          response_headers_to_add:
                            - header: {{ key: content-type, value: application/json }}{route_settings}
",
            quoted(&llm_policy_core::reply::error_body(
                llm_policy_core::context::Provider::Openai,
                404,
                "not_routed",
                "this gateway routes only the inference endpoints",
            ))
        ));
        routes
    } else {
        format!("                        - match: {{ prefix: \"/\" }}\n{route}")
    };
    let ms = args.request_headers_timeout_ms.max(1);
    let headers_timeout = format!("{}.{:03}s", ms / 1000, ms % 1000);
    Ok(format!(
        "# Generated by `llm-policy envoy-config --mode {mode} --identity {ident}` for Envoy 1.40.
# {what}
# Upstream: {url}. Validate with: envoy --mode validate -c <this file>
admin:
  address:
    socket_address: {{ address: {admin_ip}, port_value: {admin_port} }}

static_resources:
  listeners:
    - name: llm
      address:
        socket_address: {{ address: {listen_ip}, port_value: {listen_port} }}
      # Request bodies are buffered for the decision.
      per_connection_buffer_limit_bytes: {buffer_limit}
      filter_chains:
        - filters:
            # At most {max_connections} client connections at once: more are closed as they
            # arrive (a flood of idle or slow connections cannot take every file descriptor).
            - name: envoy.filters.network.connection_limit
              typed_config:
                \"@type\": type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit
                stat_prefix: llm_connections
                max_connections: {max_connections}
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: llm
                # One spelling per path before any filter sees it: RFC 3986 normalization, `//`
                # merged, `%2F` / `%5C` decoded (the filter and the server also classify the
                # wider spellings, so a lenient upstream cannot be reached around them).
                normalize_path: true
                merge_slashes: true
                path_with_escaped_slashes_action: UNESCAPE_AND_FORWARD
                # Streaming answers (SSE) may run long: no idle cut-off on the stream.
                stream_idle_timeout: 300s
                # A client that has not sent its headers by then gets 408 and loses the
                # connection (slow-header connections cannot hold the listener).
                request_headers_timeout: {headers_timeout}
                common_http_protocol_options:
                  # A connection without a request for this long is closed.
                  idle_timeout: 300s
                  max_headers_count: 100
                  # `x_user_id` is a different header here, but some upstreams (CGI, WSGI) read it
                  # as `x-user-id`: dropped, so no spelling of a header gets around a policy.
                  headers_with_underscores_action: DROP_HEADER
                http2_protocol_options:
                  max_concurrent_streams: 100
                  initial_stream_window_size: 65536
                  initial_connection_window_size: 1048576
                route_config:
                  virtual_hosts:
                    - name: llm
                      domains: [\"*\"]
                      routes:
{routes}{local_reply}                http_filters:
{filters}                  - name: envoy.filters.http.router
                    typed_config:
                      \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router

{secrets}  clusters:
{clusters}",
        mode = args.mode.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default(),
        url = args.upstream,
        ident = args.identity.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default(),
        admin_ip = args.admin.ip(),
        admin_port = args.admin.port(),
        listen_ip = args.listen.ip(),
        listen_port = args.listen.port(),
        max_connections = args.max_connections.max(1),
        headers_timeout = headers_timeout,
        local_reply = identity.local_reply,
        secrets = identity.secrets,
    ))
}

fn render(d: &Diagnostics) -> String {
    d.0.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        assert_eq!(
            parse_upstream("https://api.openai.com").unwrap(),
            Upstream {
                tls: true,
                host: "api.openai.com".into(),
                port: 443
            }
        );
        assert_eq!(
            parse_upstream("http://127.0.0.1:18000/").unwrap().port,
            18000
        );
        assert_eq!(parse_upstream("http://[::1]:8080").unwrap().host, "::1");
        assert!(parse_upstream("api.openai.com").is_err());
        assert!(parse_upstream("https://api.openai.com/v1").is_err());
        assert!(parse_upstream("http://h:notaport").is_err());
        assert!(parse_upstream("http://ev\"il:80").is_err());
        assert!(parse_upstream("http://a b").is_err());
        assert!(parse_url("--jwks-uri", "https://idp\n  x: 1/jwks").is_err());
        assert_eq!(
            parse_url("--jwks-uri", "https://login.example.com/a/jwks.json")
                .unwrap()
                .1,
            "/a/jwks.json"
        );
    }
}
