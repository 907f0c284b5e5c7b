//! The REST edge (axum): evaluation, usage reports, the policy registry, the bundle for filters
//! and replicas to sync, health. Writes need `Authorization: Bearer <admin token>`; without a
//! configured token they are refused (403), never open. JSON in, JSON out; errors are
//! `{"error": {"code", "message", "status"}}` (with `diagnostics` for a rejected policy).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::handler::Handler as _;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use llm_policy_core::wire::{BundleAnswer, BundleFile};
use llm_policy_core::Diagnostics;
use serde::Deserialize;
use serde_json::{json, Value};

use super::engine::{CheckInput, Engine, Usage};
use super::registry::{RegistryError, Version};
use crate::request::RequestFile;

/// What the REST handlers share.
#[derive(Clone)]
pub struct RestState {
    /// The check engine.
    pub engine: Arc<Engine>,
    /// The admin token (`None`: writes disabled).
    pub admin_token: Option<Arc<str>>,
    /// The read token (`None`: reads are open); the admin token also reads.
    pub read_token: Option<Arc<str>>,
    /// The usage token (usage reports; the admin token also reports; neither: refused).
    pub usage_token: Option<Arc<str>>,
    /// The signed bundle store followed, if any (`GET /v1/bundle/source`).
    pub bundle_source: Option<Arc<super::bundle_source::BundleSource>>,
    /// The filters syncing from this server (`GET /v1/fleet`).
    pub fleet: Arc<super::fleet::Fleet>,
}

/// Largest policy a `PUT` accepts.
const MAX_POLICY_BYTES: usize = 4 * 1024 * 1024;

/// Largest canary request (its files).
const MAX_CANARY_BYTES: usize = 16 * 1024 * 1024;

/// Requests the REST API serves at once; more wait.
const MAX_CONCURRENT: usize = 256;

/// Longest a REST request may take, body upload included.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The REST routes. `max_body` bounds request bodies (the evaluate body is a JSON request file
/// whose own body may be up to the context's `maxBodyBytes`); a policy write is at most 4 MiB,
/// and its token is checked before its body is read.
pub fn router(state: RestState, max_body: usize) -> Router {
    Router::new()
        .route("/v1/evaluate", post(evaluate))
        .route("/v1/usage", post(usage))
        .route("/v1/policies", get(list_policies))
        .route(
            "/v1/policies/{name}",
            get(get_policy).put(put_policy.layer(DefaultBodyLimit::max(MAX_POLICY_BYTES))),
        )
        .route("/v1/policies/{name}/versions", get(policy_versions))
        .route("/v1/policies/{name}/rollback", post(rollback))
        .route("/v1/reload", post(reload))
        .route("/v1/bundle", get(bundle))
        .route("/v1/bundle/source", get(bundle_source))
        .route("/v1/fleet", get(fleet))
        .route(
            "/v1/canary",
            get(canary_status).put(put_canary.layer(DefaultBodyLimit::max(MAX_CANARY_BYTES))),
        )
        .route("/v1/canary/promote", post(promote_canary))
        .route("/v1/canary/abort", post(abort_canary))
        .route("/v1/budgets/{*key}", get(budget))
        .route("/v1/keys", get(list_keys).post(create_key))
        .route("/v1/keys/{id}", axum::routing::delete(revoke_key))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(tower::limit::ConcurrencyLimitLayer::new(MAX_CONCURRENT))
        .with_state(state)
}

/// Whether a request writes (or spends counters) and so needs the admin token.
fn is_write(method: &axum::http::Method, uri: &axum::http::Uri) -> bool {
    let path = uri.path();
    method == axum::http::Method::PUT
        || method == axum::http::Method::DELETE
        || (method == axum::http::Method::POST && path == "/v1/keys")
        || path.ends_with("/rollback")
        || path == "/v1/canary/promote"
        || path == "/v1/canary/abort"
        || path == "/v1/reload"
        || (path == "/v1/evaluate"
            && uri
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == "charge=true")))
}

/// Whether a request reads what reveals the rules or the keys (policies, the bundle, keys, an
/// evaluation), and so needs the read token when one is configured. Health, readiness and usage
/// reports are not reads.
fn is_read(uri: &axum::http::Uri) -> bool {
    let path = uri.path();
    path.starts_with("/v1/policies")
        || path == "/v1/bundle"
        || path == "/v1/bundle/source"
        || path == "/v1/canary"
        || path == "/v1/fleet"
        || path.starts_with("/v1/keys")
        || path.starts_with("/v1/budgets/")
        || path == "/v1/evaluate"
}

/// Refuses writes without the admin token, and reads without the read token (when one is
/// configured), before their body is read.
async fn guard(
    State(s): State<RestState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let allowed = if is_write(req.method(), req.uri()) {
        authorize(&s, req.headers())
    } else if is_read(req.uri()) {
        authorize_read(&s, req.headers())
    } else {
        Ok(())
    };
    match allowed {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Checks `Authorization: Bearer <read token>` (or the admin token) when a read token is set.
fn authorize_read(state: &RestState, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    super::auth::check_read(
        state.read_token.as_deref(),
        state.admin_token.as_deref(),
        given,
    )
    .map_err(|_| {
        error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            super::auth::READ_REFUSED,
        )
    })
}

/// An error answer: `{"error": {"code", "message", "status"}}`, plus `diagnostics` for a
/// rejected policy.
struct ApiError {
    status: StatusCode,
    body: Value,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
    let message = message.into();
    ApiError {
        status,
        body: json!({"error": {"code": code, "message": message, "status": status.as_u16()}}),
    }
}

fn invalid(d: &Diagnostics) -> ApiError {
    let message =
        d.0.first()
            .map_or_else(|| String::from("invalid policy"), ToString::to_string);
    ApiError {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        body: json!({
            "error": {"code": "invalid_policy", "message": message, "status": 422},
            "diagnostics": d.0,
        }),
    }
}

fn registry_error(e: RegistryError) -> ApiError {
    match e {
        RegistryError::Invalid(d) => invalid(&d),
        RegistryError::Malformed(m) => error(StatusCode::BAD_REQUEST, "invalid_request", m),
        RegistryError::NotFound(m) => error(StatusCode::NOT_FOUND, "not_found", m),
        RegistryError::Conflict(m) => error(StatusCode::CONFLICT, "conflict", m),
        RegistryError::Unavailable(m) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
    }
}

/// Checks `Authorization: Bearer <admin token>`.
fn authorize(state: &RestState, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    super::auth::check(state.admin_token.as_deref(), given).map_err(|d| match d {
        super::auth::Denied::Disabled => {
            error(StatusCode::FORBIDDEN, "writes_disabled", d.message())
        }
        super::auth::Denied::Unauthorized => {
            error(StatusCode::UNAUTHORIZED, "unauthorized", d.message())
        }
    })
}

fn json_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("invalid request body: {e}"),
        )
    })
}

#[derive(Deserialize)]
struct EvaluateQuery {
    #[serde(default)]
    explain: bool,
    /// Spend counters as a real check would (admin token needed).
    #[serde(default)]
    charge: bool,
}

/// `POST /v1/evaluate`: a request file in, the decision out (as `llm-policy eval` prints it).
/// Counters are read, not spent, unless `?charge=true` (with the admin token).
async fn evaluate(
    State(s): State<RestState>,
    Query(q): Query<EvaluateQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    if q.charge {
        authorize(&s, &headers)?;
    }
    let req: RequestFile = json_body(&body)?;
    let now = req
        .now
        .or_else(|| req.time.map(|t| pinned_time(t.hour, t.weekday)));
    let checked = s
        .engine
        .check(CheckInput {
            body: req.body_bytes(),
            method: req.method,
            path: req.path,
            headers: req.headers.into_iter().collect(),
            partial_body: false,
            now,
            explain: q.explain,
            charge: q.charge,
            local_counted: None,
            identity: None,
        })
        .await;
    match (checked.decision, checked.error) {
        (Some(d), _) => Ok(Json(d).into_response()),
        (None, Some(e)) => Err(error(
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
            &e.code,
            e.message,
        )),
        (None, None) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no decision and no error",
        )),
    }
}

/// A Unix time with this UTC hour and weekday (0 = Sunday), for request files that pin `time`.
fn pinned_time(hour: i64, weekday: i64) -> i64 {
    // 1970-01-04 was a Sunday.
    const SUNDAY: i64 = 3 * 86_400;
    SUNDAY + weekday.clamp(0, 6) * 86_400 + hour.clamp(0, 23) * 3600
}

/// `POST /v1/usage` body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct UsageReport {
    /// The `x-llm-policy-reservation` handle the check added upstream.
    request_id: String,
    /// Total tokens (or give `usage`).
    #[serde(default)]
    tokens: Option<f64>,
    /// Cost in US dollars.
    #[serde(default)]
    cost_usd: Option<f64>,
    /// The provider's `usage` object as it came in the response (OpenAI `prompt_tokens` /
    /// `completion_tokens` / `total_tokens`, or Anthropic `input_tokens` / `output_tokens`).
    #[serde(default)]
    usage: Option<Value>,
}

/// Tokens of a provider `usage` object.
fn usage_tokens(u: &Value) -> Option<f64> {
    let n = |k: &str| u.get(k).and_then(Value::as_f64);
    n("total_tokens").or_else(|| {
        let parts = [
            n("prompt_tokens"),
            n("completion_tokens"),
            n("input_tokens"),
            n("output_tokens"),
            n("cache_creation_input_tokens"),
            n("cache_read_input_tokens"),
        ];
        parts
            .iter()
            .any(Option::is_some)
            .then(|| parts.iter().flatten().sum())
    })
}

async fn usage(State(s): State<RestState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    super::auth::check_usage(s.usage_token.as_deref(), s.admin_token.as_deref(), given).map_err(
        |d| match d {
            super::auth::Denied::Disabled => error(
                StatusCode::FORBIDDEN,
                "usage_reports_disabled",
                super::auth::USAGE_DISABLED,
            ),
            super::auth::Denied::Unauthorized => error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                super::auth::USAGE_REFUSED,
            ),
        },
    )?;
    let r: UsageReport = json_body(&body)?;
    let tokens = r.tokens.or_else(|| r.usage.as_ref().and_then(usage_tokens));
    let found = s
        .engine
        .record_usage(
            &r.request_id,
            Usage {
                tokens,
                usd: r.cost_usd,
                gen_ai: None,
            },
        )
        .await;
    let found = found.map_err(|e| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("the counter store is unavailable: {}", e),
        )
    })?;
    if found {
        Ok(Json(json!({"recorded": true})).into_response())
    } else {
        Err(error(
            StatusCode::NOT_FOUND,
            "unknown_request",
            "no reservation waits for this request (unknown, already reported, or expired)",
        ))
    }
}

fn current(s: &RestState) -> Result<Arc<Version>, ApiError> {
    s.engine.registry().current().ok_or_else(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no policy loaded yet",
        )
    })
}

async fn list_policies(State(s): State<RestState>) -> ApiResult {
    let v = current(&s)?;
    Ok(Json(json!({
        "version": v.number,
        "bundle": v.set.bundle(),
        "policies": v.policies(),
    }))
    .into_response())
}

async fn get_policy(State(s): State<RestState>, Path(name): Path<String>) -> ApiResult {
    let v = current(&s)?;
    let Some(entry) = v.policies().into_iter().find(|p| p.name == name) else {
        return Err(error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no policy `{name}`"),
        ));
    };
    let text = v.policy_text(&name).unwrap_or_default();
    Ok(Json(json!({"version": v.number, "policy": entry, "text": text})).into_response())
}

async fn policy_versions(State(s): State<RestState>, Path(name): Path<String>) -> ApiResult {
    let versions = s
        .engine
        .registry()
        .policy_versions(&name)
        .map_err(registry_error)?;
    Ok(Json(json!({"policy": name, "versions": versions})).into_response())
}

fn version_json(v: &Version) -> Value {
    json!({
        "version": v.number,
        "bundle": v.set.bundle(),
        "warnings": v.warnings,
    })
}

async fn put_policy(
    State(s): State<RestState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    authorize(&s, &headers)?;
    if body.len() > MAX_POLICY_BYTES {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "a policy is at most 4 MiB",
        ));
    }
    let Ok(text) = std::str::from_utf8(&body) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_text",
            "the policy is not UTF-8 text",
        ));
    };
    let registry = Arc::clone(s.engine.registry());
    let (name2, text) = (name.clone(), text.to_string());
    // Compiling a large bundle is CPU work: off the async workers.
    let result = tokio::task::spawn_blocking(move || registry.put_policy(&name2, &text)).await;
    match result {
        Ok(written) => {
            super::report_write(&s.engine, "written", &name, &written);
            written
                .map(|v| Json(version_json(&v)).into_response())
                .map_err(registry_error)
        }
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e.to_string(),
        )),
    }
}

#[derive(Deserialize, Default)]
struct RollbackQuery {
    #[serde(default)]
    to: Option<u64>,
}

async fn rollback(
    State(s): State<RestState>,
    Path(name): Path<String>,
    Query(q): Query<RollbackQuery>,
    headers: HeaderMap,
) -> ApiResult {
    authorize(&s, &headers)?;
    let registry = Arc::clone(s.engine.registry());
    let name2 = name.clone();
    match tokio::task::spawn_blocking(move || registry.rollback_policy(&name2, q.to)).await {
        Ok(rolled) => {
            super::report_write(&s.engine, "rolled back", &name, &rolled);
            rolled
                .map(|v| Json(version_json(&v)).into_response())
                .map_err(registry_error)
        }
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e.to_string(),
        )),
    }
}

async fn reload(State(s): State<RestState>, headers: HeaderMap) -> ApiResult {
    authorize(&s, &headers)?;
    let engine = Arc::clone(&s.engine);
    match tokio::task::spawn_blocking(move || super::reload(&engine)).await {
        Ok(Ok(v)) => Ok(Json(version_json(&v)).into_response()),
        Ok(Err(d)) => Err(invalid(&d)),
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e.to_string(),
        )),
    }
}

/// `GET /v1/bundle`: the active bundle's files, with the bundle digest as ETag
/// (`If-None-Match` → 304).
async fn bundle(State(s): State<RestState>, headers: HeaderMap) -> ApiResult {
    // A filter's sync says who it is and what it runs (the fleet view).
    let header_text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if let Some(report) = super::fleet::Report::from_headers(header_text) {
        let canary = s.engine.canary();
        s.fleet
            .observe(report, canary.as_ref().map(|c| c.version.set.bundle()));
    }
    let v = current(&s)?;
    let store = s.engine.keys();
    let keys = store.snapshot();
    let canary = s.engine.canary();
    let mut etag = v.set.bundle().to_string();
    if store.configured() {
        etag = format!("{etag}.{}", keys.digest);
    }
    if let Some(c) = &canary {
        etag = format!("{etag}.c{}-{}", c.version.set.bundle(), c.sample);
    }
    let etag = format!("\"{etag}\"");
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let etag_value = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"\""));
    if matches {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    let files = |v: &Version| -> Vec<BundleFile> {
        v.relative_files(s.engine.registry().path())
            .into_iter()
            .map(|(path, text)| BundleFile {
                path,
                text: text.to_string(),
            })
            .collect()
    };
    let answer = BundleAnswer {
        version: v.number,
        bundle: v.set.bundle().to_string(),
        files: files(&v),
        keys: store.configured().then(|| keys.records.clone()),
        models: s.engine.registry().models_text(),
        canary: canary.map(|c| llm_policy_core::wire::CanaryBundle {
            bundle: c.version.set.bundle().to_string(),
            files: files(&c.version),
            models: c.models.clone(),
            sample: c.sample,
        }),
    };
    Ok(([(header::ETAG, etag_value)], Json(answer)).into_response())
}

/// `GET /v1/fleet`: the filters syncing from this server (node, bundle running, whether it is
/// the one serving here, last seen, last sync error), stale ones aged out.
async fn fleet(State(s): State<RestState>) -> ApiResult {
    let serving = s.engine.registry().current();
    let nodes = s.fleet.list(serving.as_ref().map(|v| v.set.bundle()));
    let current = nodes.iter().filter(|n| n.current).count();
    Ok(Json(json!({
        "bundle": serving.as_ref().map(|v| v.set.bundle()),
        "proxies": nodes.len(),
        "current": current,
        "nodes": nodes,
    }))
    .into_response())
}

/// `GET /v1/keys`: the virtual keys' records (hashes, never keys).
/// `GET /v1/budgets/{key}`: what a rate limit's or budget's counter holds now (its full key,
/// `namespace/rule/value`, as decisions and audit records name it): spent and reserved in its
/// sliding window, and when the oldest of it stops counting.
async fn budget(State(s): State<RestState>, Path(key): Path<String>) -> ApiResult {
    let state = s.engine.counter(&key).await.map_err(|e| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("the counter store is unavailable: {e}"),
        )
    })?;
    let Some(c) = state else {
        return Err(error(
            StatusCode::NOT_FOUND,
            "unknown_counter",
            "no counter holds anything under this key now",
        ));
    };
    Ok(Json(json!({
        "key": key,
        "spent": c.spent,
        "reserved": c.reserved,
        "windowSecs": c.window_secs,
        "resetSecs": c.reset_secs,
    }))
    .into_response())
}

async fn list_keys(State(s): State<RestState>) -> ApiResult {
    Ok(Json(json!({"keys": s.engine.keys().list()})).into_response())
}

/// `POST /v1/keys` `{id?, principal?, namespace?, expires?}`: a new key. 201 with the key itself
/// (shown this once) and its record.
async fn create_key(State(s): State<RestState>, body: Bytes) -> ApiResult {
    let spec: crate::keys::NewKey = json_body(&body)?;
    let (record, secret) = s.engine.keys().create(&spec).await.map_err(key_error)?;
    tracing::info!(key = %record.id, "virtual key created");
    Ok((
        StatusCode::CREATED,
        Json(json!({"key": secret, "record": record})),
    )
        .into_response())
}

/// `DELETE /v1/keys/{id}`: revokes a key (its record stays, refused as revoked).
async fn revoke_key(State(s): State<RestState>, Path(id): Path<String>) -> ApiResult {
    let record = s.engine.keys().revoke(&id).await.map_err(key_error)?;
    tracing::info!(key = %record.id, "virtual key revoked");
    Ok(Json(json!({"record": record})).into_response())
}

fn key_error(e: super::key_store::KeyStoreError) -> ApiError {
    use super::key_store::KeyStoreError as E;
    match &e {
        E::Invalid(_) => error(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()),
        E::NotFound(_) => error(StatusCode::NOT_FOUND, "not_found", e.to_string()),
        E::Conflict(_) => error(StatusCode::CONFLICT, "conflict", e.to_string()),
        E::Unavailable(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}

/// `GET /v1/bundle/source`: the signed bundle store followed (revision serving, signer, last
/// good read, last error), 404 without one.
async fn bundle_source(State(s): State<RestState>) -> ApiResult {
    match &s.bundle_source {
        Some(source) => Ok(Json(source.status()).into_response()),
        None => Err(error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no bundle store configured (`bundle.store`)",
        )),
    }
}

/// `PUT /v1/canary`: a candidate (files over the ones serving, or a store revision) decided
/// beside the bundle serving on live traffic, never enforced.
async fn put_canary(State(s): State<RestState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    use super::canary::{Canary, CanaryRequest, CandidateSource};
    authorize(&s, &headers)?;
    let req: CanaryRequest = serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()))?;
    let sample = req.sample.unwrap_or(1.0);
    if !(sample > 0.0 && sample <= 1.0) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "sample is a share of checks: 0 < sample <= 1",
        ));
    }
    if req.max_disagreements == Some(0) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "maxDisagreements is at least 1",
        ));
    }
    let registry = Arc::clone(s.engine.registry());
    let internal = |e: tokio::task::JoinError| {
        error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    };
    let (version, source, models) = match (req.revision, req.files.is_empty()) {
        (Some(revision), true) => {
            let Some(store) = &s.bundle_source else {
                return Err(error(
                    StatusCode::CONFLICT,
                    "conflict",
                    "a revision names a signed bundle store, and this server has none (`bundle.store`): give files",
                ));
            };
            let b = store.fetch_verified(&revision).await.map_err(|e| match e {
                crate::bundle::BundleError::NotFound(m) => {
                    error(StatusCode::NOT_FOUND, "not_found", m)
                }
                crate::bundle::BundleError::Unavailable(m) => {
                    error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
                }
                other => error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_bundle",
                    other.to_string(),
                ),
            })?;
            let models_text = b.models().map(str::to_string);
            let v = tokio::task::spawn_blocking(move || {
                let models = b.models().map(|t| (crate::bundle::archive::MODELS, t));
                registry.candidate_bundle(b.policy_files(), models)
            })
            .await
            .map_err(internal)?
            .map_err(registry_error)?;
            (v, CandidateSource::Revision(revision), models_text)
        }
        (None, false) => {
            let overlay: Vec<(String, String)> = req.files.into_iter().collect();
            let files = overlay.clone();
            let v = tokio::task::spawn_blocking(move || registry.candidate(&files))
                .await
                .map_err(internal)?
                .map_err(registry_error)?;
            (v, CandidateSource::Files(overlay), None)
        }
        _ => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "give the candidate as `files` (path → text, written over the files serving) or as a store `revision`, one of them",
            ))
        }
    };
    let mut canary = Canary::new(version, source, sample, req.max_disagreements);
    canary.models = models;
    canary.base = s
        .engine
        .registry()
        .current()
        .map(|v| v.set.bundle().to_string())
        .unwrap_or_default();
    let status = s.engine.start_canary(canary);
    Ok(Json(status).into_response())
}

/// `GET /v1/canary`: the canary running (or the last one), 404 when there never was one.
async fn canary_status(State(s): State<RestState>) -> ApiResult {
    let mut status = s
        .engine
        .canary_status()
        .ok_or_else(|| error(StatusCode::NOT_FOUND, "not_found", "no canary has run"))?;
    let (evaluated, disagreements) = s.fleet.canary_counts(&status.candidate);
    status.filters = super::canary::FilterCounts {
        evaluated,
        disagreements,
    };
    Ok(Json(status).into_response())
}

/// `POST /v1/canary/promote`: the candidate serves (written as every write is); a store
/// revision is activated in the store instead (409 saying how).
async fn promote_canary(State(s): State<RestState>, headers: HeaderMap) -> ApiResult {
    use super::canary::CandidateSource;
    authorize(&s, &headers)?;
    let canary = s
        .engine
        .canary()
        .ok_or_else(|| error(StatusCode::NOT_FOUND, "not_found", "no canary is running"))?;
    let serving = s
        .engine
        .registry()
        .current()
        .map(|v| v.set.bundle().to_string())
        .unwrap_or_default();
    if serving != canary.base {
        return Err(error(
            StatusCode::CONFLICT,
            "conflict",
            format!("the bundle serving changed since the canary started (was {}, now {serving}): what was measured is not what would be promoted; start the canary again", canary.base),
        ));
    }
    let overlay = match &canary.source {
        CandidateSource::Files(f) => f.clone(),
        CandidateSource::Revision(r) => {
            let store = s.bundle_source.as_ref().map_or("the store", |b| b.url());
            return Err(error(
                StatusCode::CONFLICT,
                "conflict",
                format!("the candidate is revision {r} of {store}: make it current there (llm-policy bundle activate --revision {r}); every server follows"),
            ));
        }
    };
    let registry = Arc::clone(s.engine.registry());
    let expected = canary.version.set.bundle().to_string();
    let result = tokio::task::spawn_blocking(move || registry.promote(&overlay, &expected))
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    super::report_write(&s.engine, "promoted", "canary", &result);
    let v = result.map_err(registry_error)?;
    s.engine.end_this_canary(
        &canary,
        "promoted",
        &format!("serving as version {}", v.number),
    );
    Ok(Json(version_json(&v)).into_response())
}

/// `POST /v1/canary/abort`: drops the candidate.
async fn abort_canary(State(s): State<RestState>, headers: HeaderMap) -> ApiResult {
    authorize(&s, &headers)?;
    s.engine
        .end_canary("aborted", "through the API")
        .map(|c| Json(c.status()).into_response())
        .ok_or_else(|| error(StatusCode::NOT_FOUND, "not_found", "no canary is running"))
}

async fn ready(State(s): State<RestState>) -> ApiResult {
    match s.engine.registry().current() {
        Some(v) => Ok(
            Json(json!({"ready": true, "version": v.number, "bundle": v.set.bundle()}))
                .into_response(),
        ),
        None => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no policy loaded yet",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_times_have_their_hour_and_weekday() {
        let t = llm_policy_core::context::TimeInfo::from_unix(pinned_time(14, 3));
        assert_eq!((t.hour, t.weekday), (14, 3));
    }

    #[test]
    fn usage_objects_of_both_providers() {
        assert_eq!(
            usage_tokens(&json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})),
            Some(15.0)
        );
        assert_eq!(
            usage_tokens(&json!({"input_tokens": 10, "output_tokens": 7})),
            Some(17.0)
        );
        assert_eq!(usage_tokens(&json!({"other": 1})), None);
    }
}
