//! `llm-policy serve`: the policy server.
//!
//! - [`config`]: the YAML configuration and the flags that override it.
//! - [`registry`]: versioned, validated policy bundles (hot reload, rollback).
//! - [`engine`]: one check, whatever the protocol: caches ([`cache`]), counters ([`limits`]),
//!   replies, [`metrics`] and the [`audit`] log.
//! - Edges, the only modules that know a protocol: [`envoy`] (ext_authz gRPC), [`api`] (our own
//!   `llmpolicy.v1` gRPC API), [`rest`] (axum); [`auth`] guards their writes.
//!
//! [`start`] binds the listeners and returns a [`Running`] server; [`Running::shutdown`] drains
//! it: stop accepting, finish in-flight checks, flush the audit queue.

pub mod alerts;
pub mod api;
pub mod audit;
pub mod auth;
pub mod bundle_source;
pub mod cache;
pub mod canary;
pub mod config;
pub mod engine;
pub mod envoy;
pub mod ext_proc;
pub mod fleet;
pub mod key_store;
pub mod limits;
pub mod listen;
pub mod metrics;
pub mod plugins;
pub mod redis;
pub mod registry;
pub mod registry_sync;
pub mod rest;
pub mod telemetry;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use llm_policy_core::Diagnostics;
use tokio::sync::watch as signal;
use tokio::task::JoinSet;
use tokio_stream::StreamExt as _;

use config::Config;
use engine::Engine;
use registry::{Registry, Version};

/// Reloads the policy path and reports the outcome (log, `llm_policy_reloads_total`, bundle
/// gauge). The last good version keeps serving on error.
pub fn reload(engine: &Engine) -> Result<Arc<Version>, Diagnostics> {
    report_reload(engine, engine.registry().reload())
}

/// What the watcher runs: a reload when the files differ from those serving and from those last
/// rejected; `None` otherwise (nothing logged or counted).
fn reload_if_changed(engine: &Engine) -> Option<Result<Arc<Version>, Diagnostics>> {
    engine
        .registry()
        .reload_if_changed()
        .map(|r| report_reload(engine, r))
}

/// Counts and logs a policy write or rollback through an API (REST or gRPC): the version now
/// serving and its warnings, or a rejected bundle.
pub(crate) fn report_write(
    engine: &Engine,
    action: &str,
    policy: &str,
    result: &Result<Arc<Version>, registry::RegistryError>,
) {
    let metrics = engine.metrics();
    match result {
        Ok(v) => {
            metrics.reloads.with_label_values(&["ok"]).inc();
            metrics.serving(v.set.bundle(), v.number);
            tracing::info!(policy = %policy, version = v.number, bundle = v.set.bundle(), "policy {action} through the API");
            v.log_warnings();
        }
        Err(registry::RegistryError::Invalid(_)) => {
            metrics.reloads.with_label_values(&["error"]).inc();
        }
        Err(_) => {}
    }
}

pub(crate) fn report_reload(
    engine: &Engine,
    result: Result<(Arc<Version>, bool), Diagnostics>,
) -> Result<Arc<Version>, Diagnostics> {
    let metrics = engine.metrics();
    match result {
        Ok((v, changed)) => {
            metrics
                .reloads
                .with_label_values(&[if changed { "ok" } else { "unchanged" }])
                .inc();
            if changed {
                metrics.serving(v.set.bundle(), v.number);
                v.log_warnings();
                let stats = v.set.stats();
                tracing::info!(
                    version = v.number,
                    bundle = v.set.bundle(),
                    policies = stats.policies,
                    rules = stats.rules,
                    namespaces = stats.namespaces,
                    path = %engine.registry().path().display(),
                    "policies loaded"
                );
            }
            Ok(v)
        }
        Err(d) => {
            metrics.reloads.with_label_values(&["error"]).inc();
            for diag in &d.0 {
                tracing::error!(diagnostic = %diag, "policy rejected");
            }
            let serving = engine.registry().current().map(|v| v.number);
            tracing::error!(
                errors = d.0.len(),
                serving = ?serving,
                "reload rejected: the last good version keeps serving"
            );
            Err(d)
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration or admin token is invalid.
    #[error("invalid configuration:\n{0}")]
    Config(Diagnostics),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A TLS certificate, key or client CA cannot be used.
    #[error("{0}")]
    Tls(#[from] listen::TlsError),
    /// The audit file cannot be opened, or metrics cannot be registered.
    #[error("{0}")]
    Setup(String),
}

/// A running server.
pub struct Running {
    /// The bound gRPC address (ext_authz, health).
    pub grpc: SocketAddr,
    /// The bound REST address.
    pub http: SocketAddr,
    /// The bound Prometheus address.
    pub metrics: SocketAddr,
    /// The engine (for in-process callers and tests).
    pub engine: Arc<Engine>,
    stop: signal::Sender<bool>,
    tasks: JoinSet<()>,
    audit: audit::Writer,
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Loads the policies, binds the listeners and serves until [`Running::shutdown`]. A policy
/// path that does not load yet is not fatal: the server runs, not ready, and reloads when the
/// files change.
pub async fn start(mut config: Config) -> Result<Running, StartError> {
    let mut models_text = None;
    if let Some(path) = &config.models_file {
        let text = llm_policy_core::source::read_file(path)
            .map_err(|d| StartError::Config(Diagnostics(vec![d])))?;
        let table =
            llm_policy_core::model_table::ModelTable::parse(&path.display().to_string(), &text)
                .map_err(StartError::Config)?;
        config.context.models = Some(table);
        models_text = Some(text);
    }
    let admin_token = config.admin_token().map_err(StartError::Config)?;
    let read_token = config.read_token().map_err(StartError::Config)?;
    let usage_token = config.usage_token().map_err(StartError::Config)?;
    let metrics = metrics::Metrics::new().map_err(|e| StartError::Setup(e.to_string()))?;
    // Plugins are compiled once, before any bundle: a bad module stops the start, named.
    let plugins = match &config.plugins.dir {
        Some(dir) => {
            let dir = dir.clone();
            let limits = config.plugins.limits();
            let attrs = config.context.principal_attributes();
            let loaded = tokio::task::spawn_blocking(move || {
                plugins::Plugins::load_dir(&dir, limits, &attrs)
            })
            .await
            .map_err(|e| StartError::Setup(e.to_string()))?
            .map_err(|e| StartError::Setup(e.to_string()))?;
            for name in loaded.names() {
                tracing::info!(plugin = name, "WASM plugin loaded");
            }
            Some(loaded)
        }
        None => None,
    };
    let mut registry = Registry::new(
        config.policies.clone(),
        config.context.clone(),
        config.reload.history,
    )
    .with_plugins(
        plugins
            .as_ref()
            .map(|p| p.names().map(str::to_string).collect()),
    );
    if let (Some(path), Some(text)) = (config.models_file.clone(), models_text) {
        registry = registry.with_models_file(path, text);
    }
    let registry = Arc::new(registry);
    let redis = redis::Redis::connect(&config.redis, metrics.clone()).map_err(|e| {
        StartError::Config(Diagnostics(vec![llm_policy_core::Diagnostic::error(
            llm_policy_core::Code::Io,
            e,
        )]))
    })?;
    let stream = redis
        .as_ref()
        .zip(config.redis.audit.as_ref())
        .map(|(r, c)| audit::StreamSink::new(r.clone(), c));
    let (audit, writer) = audit::start(&config.audit, metrics.clone(), stream)
        .map_err(|e| StartError::Setup(format!("cannot open the audit log: {e}")))?;
    let audit = audit.with_alerts(
        alerts::Alerts::start(&config.alerts, metrics.clone()).map_err(StartError::Setup)?,
    );
    let store: Arc<dyn limits::CounterStore> = match &redis {
        Some(r) if config.redis.counters => Arc::new(limits::redis_store::RedisStore::new(
            r.clone(),
            config.limits.reservation_timeout_secs,
        )),
        _ => Arc::new(limits::MemoryStore::default()),
    };
    // The keys: from the key file, shared through Redis when there is one (a connection of its
    // own, off the traffic path).
    let key_redis = match &redis {
        Some(_) => redis::Redis::connect(&config.redis, metrics.clone())
            .ok()
            .flatten(),
        None => None,
    };
    let keys = Arc::new(
        key_store::KeyStore::load(config.keys_file.clone(), key_redis)
            .map_err(StartError::Config)?,
    );
    if let Err(e) = keys.seed().await {
        tracing::warn!(error = %e, "cannot seed the shared keys yet (retrying every poll)");
    }
    let engine = Arc::new(
        Engine::new(
            registry,
            store,
            cache::Caches::new(&config.cache),
            metrics.clone(),
            audit,
            config.check.clone(),
            config.limits.clone(),
        )
        .with_plugins(plugins)
        .with_keys(Arc::clone(&keys))
        .with_remote_cache(
            redis
                .as_ref()
                .filter(|_| config.redis.cache.enabled)
                .map(|r| cache::RemoteCache::new(r.clone(), config.redis.cache.ttl_secs)),
        ),
    );
    engine.bind();
    // Signed bundles from object storage: the only source of policies when configured.
    let bundle_source = match &config.bundle.store {
        Some(_) => {
            let source = Arc::new(
                bundle_source::BundleSource::new(&config.bundle)
                    .map_err(|e| StartError::Setup(e.to_string()))?,
            );
            engine
                .registry()
                .share(Arc::clone(&source) as Arc<dyn registry::SharedBundle>);
            Some(source)
        }
        None => None,
    };
    let mut first = match &bundle_source {
        Some(source) => bundle_source::poll_once(&engine, source).await,
        None => {
            let e = Arc::clone(&engine);
            tokio::task::spawn_blocking(move || reload(&e).is_ok())
                .await
                .unwrap_or(false)
        }
    };
    // Replicas sharing the bundle start from the shared head (or seed an empty store).
    let shared = match &redis {
        Some(_) if config.redis.registry && bundle_source.is_none() => {
            // A connection of its own: bundles can be megabytes, and must never queue in front
            // of counter calls.
            let own = redis::Redis::connect(&config.redis, metrics.clone())
                .ok()
                .flatten()
                .ok_or_else(|| StartError::Setup(String::from("cannot configure Redis")))?;
            let bundle = Arc::new(registry_sync::RedisBundle::new(own));
            engine
                .registry()
                .share(Arc::clone(&bundle) as Arc<dyn registry::SharedBundle>);
            first = registry_sync::sync_once(&engine, &bundle).await;
            Some(bundle)
        }
        _ => None,
    };

    let grpc = bind(config.grpc_listen).await?;
    let http = bind(config.http_listen).await?;
    let prom = bind(config.metrics_listen).await?;
    let addr = |l: &tokio::net::TcpListener, fallback| l.local_addr().unwrap_or(fallback);
    let (grpc_addr, http_addr, metrics_addr) = (
        addr(&grpc, config.grpc_listen),
        addr(&http, config.http_listen),
        addr(&prom, config.metrics_listen),
    );
    let tls = |on: bool, alpn: &[&[u8]]| -> Result<_, StartError> {
        match &config.tls {
            Some(t) if on => Ok(Some(listen::acceptor(t, alpn)?)),
            _ => Ok(None),
        }
    };
    let grpc_tls = tls(config.tls.as_ref().is_some_and(|t| t.grpc), &[b"h2"])?;
    let http_tls = tls(
        config.tls.as_ref().is_some_and(|t| t.http),
        &[b"h2", b"http/1.1"],
    )?;
    let (stop, stopped) = signal::channel(false);
    let until_stopped =
        |mut rx: signal::Receiver<bool>| async move { stopped_signal(&mut rx).await };
    let mut tasks = JoinSet::new();

    // gRPC: ext_authz + health.
    let (health, health_service) = tonic_health::server::health_reporter();
    let health = Arc::new(health);
    if first {
        health
            .set_serving::<AuthorizationServer<envoy::EnvoyAuthz>>()
            .await;
    } else {
        health
            .set_not_serving::<AuthorizationServer<envoy::EnvoyAuthz>>()
            .await;
    }
    let authz = AuthorizationServer::new(envoy::EnvoyAuthz::new(Arc::clone(&engine)))
        .max_decoding_message_size(grpc_message_limit(&config));
    let api = api::pb::policy_service_server::PolicyServiceServer::new(api::PolicyApi::new(
        Arc::clone(&engine),
        admin_token.clone().map(Arc::from),
        read_token.clone().map(Arc::from),
        usage_token.clone().map(Arc::from),
        stopped.clone(),
    ))
    .max_decoding_message_size(grpc_message_limit(&config));
    let usage_edge =
        envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer::new(
            ext_proc::EnvoyUsage::new(Arc::clone(&engine)),
        )
        .max_decoding_message_size(grpc_message_limit(&config));
    let grpc_server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(authz)
        .add_service(usage_edge)
        .add_service(api)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(listen::accept(
                grpc,
                grpc_tls,
                stopped.clone(),
            ))
            .map(Ok::<_, std::io::Error>),
            until_stopped(stopped.clone()),
        );
    tasks.spawn(async move {
        if let Err(e) = grpc_server.await {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });

    // REST.
    // The filters syncing from this server: stale ones age out every few seconds.
    let fleet = Arc::new(fleet::Fleet::new(
        Duration::from_secs(config.fleet.stale_secs.max(1)),
        metrics.clone(),
    ));
    {
        let fleet = Arc::clone(&fleet);
        let e = Arc::clone(&engine);
        let mut rx = stopped.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        // The bundles this server knows name the gauge's series.
                        let mut known: Vec<String> = e
                            .registry()
                            .versions()
                            .iter()
                            .map(|v| v.set.bundle().to_string())
                            .collect();
                        if let Some(c) = e.canary() {
                            known.push(c.version.set.bundle().to_string());
                        }
                        fleet.age_out(&known);
                    }
                    _ = stopped_signal(&mut rx) => break,
                }
            }
        });
    }
    let state = rest::RestState {
        engine: Arc::clone(&engine),
        admin_token: admin_token.map(Arc::from),
        read_token: read_token.map(Arc::from),
        usage_token: usage_token.map(Arc::from),
        bundle_source: bundle_source.clone(),
        fleet: Arc::clone(&fleet),
    };
    // Replicas follow the shared keys; a key file is followed when it changes.
    if keys.configured() {
        let keys = Arc::clone(&keys);
        let mut stopped = stopped.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(key_store::POLL);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = keys.seed_or_refresh().await {
                            tracing::debug!(error = %e, "cannot read the shared keys");
                        }
                    }
                    _ = stopped_signal(&mut stopped) => return,
                }
            }
        });
    }
    let app = rest::router(state, rest_body_limit(&config));
    let incoming = listen::accept(http, http_tls, stopped.clone());
    tasks.spawn(listen::serve_http(incoming, app, stopped.clone()));

    // Prometheus.
    let m = metrics.clone();
    let metrics_app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = m.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    m.render(),
                )
            }
        }),
    );
    let incoming = listen::accept(prom, None, stopped.clone());
    tasks.spawn(listen::serve_http(incoming, metrics_app, stopped.clone()));

    // Hot reload: of the directory, (shared) of the revisions other replicas publish, or of the
    // signed bundle store.
    // What a follower of a store runs once a version serves: gRPC health says SERVING.
    let serving = {
        let h = Arc::clone(&health);
        move || {
            let h = Arc::clone(&h);
            async move {
                h.set_serving::<AuthorizationServer<envoy::EnvoyAuthz>>()
                    .await;
            }
        }
    };
    if let Some(source) = bundle_source {
        bundle_source::spawn(
            Arc::clone(&engine),
            source,
            serving,
            stopped.clone(),
            &mut tasks,
        );
    } else if let Some(bundle) = shared {
        registry_sync::spawn(
            Arc::clone(&engine),
            bundle,
            serving,
            stopped.clone(),
            &mut tasks,
        );
    } else if config.reload.watch {
        let e = Arc::clone(&engine);
        let h = Arc::clone(&health);
        let on_change = move || {
            let e = Arc::clone(&e);
            let h = Arc::clone(&h);
            async move {
                let ok = {
                    let e = Arc::clone(&e);
                    tokio::task::spawn_blocking(move || {
                        matches!(reload_if_changed(&e), Some(Ok(_)))
                    })
                    .await
                    .unwrap_or(false)
                };
                if ok {
                    h.set_serving::<AuthorizationServer<envoy::EnvoyAuthz>>()
                        .await;
                }
            }
        };
        if let Some(models) = &config.models_file {
            // The model table reloads with the policies: its changes call the same reload.
            watch::spawn(
                models.clone(),
                Duration::from_millis(config.reload.debounce_ms),
                None,
                on_change.clone(),
                stopped.clone(),
                &mut tasks,
            );
        }
        watch::spawn(
            config.policies.clone(),
            Duration::from_millis(config.reload.debounce_ms),
            (config.reload.poll_ms > 0).then(|| Duration::from_millis(config.reload.poll_ms)),
            on_change,
            stopped.clone(),
            &mut tasks,
        );
    }

    // Reservations nobody reports usage for.
    let e = Arc::clone(&engine);
    let mut rx = stopped.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => e.expire().await,
                _ = stopped_signal(&mut rx) => break,
            }
        }
    });

    tracing::info!(
        grpc = %grpc_addr,
        http = %http_addr,
        metrics = %metrics_addr,
        ready = first,
        "llm-policy server listening"
    );
    Ok(Running {
        grpc: grpc_addr,
        http: http_addr,
        metrics: metrics_addr,
        engine,
        stop,
        tasks,
        audit: writer,
    })
}

/// Resolves when the server is told to stop.
pub(crate) async fn stopped_signal(rx: &mut signal::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, so callers' futures stay `Send`.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

/// The largest gRPC message Envoy may send: the body limit plus room for headers.
fn grpc_message_limit(config: &Config) -> usize {
    config
        .context
        .max_body_bytes
        .saturating_mul(2)
        .saturating_add(1024 * 1024)
}

/// The largest REST body: a request file holds the request body as JSON text (escaping can
/// double it) plus headers.
fn rest_body_limit(config: &Config) -> usize {
    config
        .context
        .max_body_bytes
        .saturating_mul(2)
        .saturating_add(256 * 1024)
}

impl Running {
    /// Drains: stops accepting, lets in-flight requests finish (at most `grace`), then writes
    /// every queued audit record.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        let drained = tokio::time::timeout(grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("in-flight requests did not finish within the grace period");
            self.tasks.abort_all();
        }
        drop(self.engine);
        self.audit.shutdown(grace).await;
        tracing::info!("llm-policy server stopped");
    }
}

/// Runs `llm-policy serve` to completion: exit 0 after a clean shutdown (SIGTERM, SIGINT), 2 on
/// a configuration it cannot start with.
pub fn main(args: &config::ServeArgs) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    runtime.block_on(async move {
        let config = Config::load(args);
        let telemetry = telemetry::init(config.as_ref().ok().map(|c| &c.tracing));
        let config = match config {
            Ok(c) => c,
            Err(d) => {
                for diag in &d.0 {
                    tracing::error!(diagnostic = %diag, "invalid configuration");
                }
                return std::process::ExitCode::from(2);
            }
        };
        let running = match start(config).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return std::process::ExitCode::from(2);
            }
        };
        wait_for_signal().await;
        tracing::info!("shutting down: draining in-flight checks and the audit queue");
        running.shutdown(Duration::from_secs(10)).await;
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        std::process::ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
