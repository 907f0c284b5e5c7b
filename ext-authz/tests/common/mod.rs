//! A real server on loopback (ports chosen by the OS), real clients: tonic for gRPC, reqwest
//! for REST.
#![allow(dead_code, reason = "each test binary uses part of the harness")]

use std::path::PathBuf;
use std::time::Duration;

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use llm_policy_server::server::config::{Config, FileSinkConfig};
use llm_policy_server::server::{self, Running};

/// A running server with its policy directory and audit file.
pub struct Harness {
    pub running: Running,
    pub dir: tempfile::TempDir,
    pub policies: PathBuf,
    pub audit: PathBuf,
    pub http: String,
    pub client: reqwest::Client,
}

pub const TOKEN: &str = "test-admin-token-0123456789";

/// A policy document in namespace `default`.
pub fn policy(name: &str, default: &str, rules: &str) -> String {
    format!(
        "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {{name: {name}, version: \"1\"}}\nspec:\n  defaultDecision: {default}\n  rules:\n{rules}"
    )
}

impl Harness {
    /// Starts a server on `files` (name, text) with the admin token set and audit to a file.
    pub async fn start(files: &[(&str, &str)], tweak: impl FnOnce(&mut Config)) -> Harness {
        llm_policy_server::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).unwrap();
        for (name, text) in files {
            std::fs::write(policies.join(name), text).unwrap();
        }
        let token = dir.path().join("token");
        std::fs::write(&token, TOKEN).unwrap();
        let audit = dir.path().join("audit.log");
        let mut config = Config {
            policies: policies.clone(),
            grpc_listen: "127.0.0.1:0".parse().unwrap(),
            http_listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            admin_token_file: Some(token),
            ..Config::default()
        };
        config.audit.stdout = false;
        config.audit.file = Some(FileSinkConfig {
            path: audit.clone(),
            max_bytes: 1 << 30,
            keep: 1,
        });
        config.reload.debounce_ms = 50;
        tweak(&mut config);
        let running = server::start(config).await.unwrap();
        let http = format!("http://{}", running.http);
        Harness {
            running,
            dir,
            policies,
            audit,
            http,
            client: reqwest::Client::new(),
        }
    }

    pub async fn grpc(&self) -> AuthorizationClient<tonic::transport::Channel> {
        AuthorizationClient::connect(format!("http://{}", self.running.grpc))
            .await
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.http)
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.running.metrics))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one metric sample line (`name{labels}`), 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// `GET path` on the REST API, as JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Polls `/readyz` until the bundle serving is not `old` (at most 5 s).
    pub async fn wait_for_new_bundle(&self, old: &str) -> serde_json::Value {
        for _ in 0..100 {
            let v = self.get_json("/readyz").await;
            if v["bundle"].is_string() && v["bundle"] != old {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the bundle did not change within 5 s");
    }

    pub async fn bundle(&self) -> String {
        let v = self.get_json("/readyz").await;
        v["bundle"].as_str().unwrap().to_string()
    }

    pub async fn stop(self) -> String {
        self.running.shutdown(Duration::from_secs(5)).await;
        std::fs::read_to_string(&self.audit).unwrap_or_default()
    }
}

/// A CheckRequest as Envoy sends it (`with_request_body`, `pack_as_bytes`).
pub fn check_request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> CheckRequest {
    let mut h: std::collections::HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    h.insert(":authority".into(), "api.openai.com".into());
    h.insert(":method".into(), method.into());
    h.insert(":path".into(), path.into());
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    host: "api.openai.com".into(),
                    headers: h,
                    raw_body: body.as_bytes().to_vec(),
                    size: body.len() as i64,
                    ..HttpRequest::default()
                }),
                ..Request::default()
            }),
            ..AttributeContext::default()
        }),
    }
}

/// A chat request body.
pub fn chat(model: &str, prompt: &str) -> String {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": prompt}]})
        .to_string()
}

/// The parts of a CheckResponse a test reads.
#[derive(Debug)]
pub struct Answer {
    pub allowed: bool,
    /// The reservation handle, from the answer's dynamic metadata (never a header).
    pub reservation: Option<String>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

pub fn answer(r: CheckResponse) -> Answer {
    let code = r.status.map_or(-1, |s| s.code);
    let reservation = r.dynamic_metadata.as_ref().and_then(|m| {
        match m
            .fields
            .get(llm_policy_core::wire::Reservation::HANDLE)?
            .kind
            .as_ref()?
        {
            envoy_types::pb::google::protobuf::value::Kind::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    });
    match r.http_response {
        Some(HttpResponse::OkResponse(ok)) => Answer {
            allowed: code == 0,
            reservation,
            status: 200,
            headers: ok
                .headers
                .into_iter()
                .filter_map(|h| h.header.map(|h| (h.key, h.value)))
                .collect(),
            body: String::new(),
        },
        Some(HttpResponse::DeniedResponse(d)) => Answer {
            allowed: false,
            reservation,
            status: d.status.map_or(0, |s| s.code as u16),
            headers: d
                .headers
                .into_iter()
                .filter_map(|h| h.header.map(|h| (h.key, h.value)))
                .collect(),
            body: d.body,
        },
        other => panic!("unexpected response {other:?}"),
    }
}

/// Sends one Check.
pub async fn check(
    client: &mut AuthorizationClient<tonic::transport::Channel>,
    req: CheckRequest,
) -> Answer {
    answer(client.check(req).await.unwrap().into_inner())
}

/// A real `redis-server` on a free loopback port, or a real three-node Redis Cluster (stopped
/// when dropped).
pub mod redis_server {
    pub use llm_policy_server::server::redis::local::{
        LocalCluster, LocalRedis, LocalSentinel, SENTINEL_MASTER,
    };
    use llm_policy_server::server::redis::sentinel::SentinelConfig;
    use llm_policy_server::server::redis::RedisConfig;

    /// A started redis-server, cluster or Sentinel deployment (the test fails when none can
    /// start).
    pub enum RedisServer {
        Single(LocalRedis),
        Cluster(LocalCluster),
        Sentinel(LocalSentinel),
    }

    impl RedisServer {
        pub fn start() -> RedisServer {
            RedisServer::Single(LocalRedis::start().unwrap())
        }
        pub fn cluster() -> RedisServer {
            RedisServer::Cluster(LocalCluster::start().unwrap())
        }
        pub fn sentinel() -> RedisServer {
            RedisServer::Sentinel(LocalSentinel::start().unwrap())
        }
        /// Its URL (a cluster's first node, a Sentinel deployment's current master).
        pub fn url(&self) -> String {
            match self {
                RedisServer::Single(r) => r.url(),
                RedisServer::Cluster(c) => c.urls()[0].clone(),
                RedisServer::Sentinel(s) => {
                    format!("redis://127.0.0.1:{}", s.master_port().unwrap())
                }
            }
        }
        pub fn is_cluster(&self) -> bool {
            matches!(self, RedisServer::Cluster(_))
        }
        /// `redis:` for the server: its URL and `cluster` when it is one, its sentinels when
        /// it is a Sentinel deployment.
        pub fn apply(&self, config: &mut RedisConfig) {
            if let RedisServer::Sentinel(s) = self {
                config.sentinel = Some(SentinelConfig {
                    master_name: SENTINEL_MASTER.to_string(),
                    nodes: s.sentinel_urls(),
                    db: 0,
                    username: None,
                    password_file: None,
                });
                return;
            }
            config.url = Some(self.url());
            config.cluster = self.is_cluster();
        }
        /// A connection for the test's own commands (routed by key on a cluster).
        pub fn conn(&self) -> Box<dyn redis::ConnectionLike> {
            match self {
                RedisServer::Sentinel(s) => Box::new(s.master().unwrap()),
                RedisServer::Single(r) => Box::new(
                    redis::Client::open(r.url())
                        .unwrap()
                        .get_connection()
                        .unwrap(),
                ),
                RedisServer::Cluster(c) => Box::new(
                    redis::cluster::ClusterClient::new(c.urls())
                        .unwrap()
                        .get_connection()
                        .unwrap(),
                ),
            }
        }
        fn single(&mut self) -> &mut LocalRedis {
            match self {
                RedisServer::Single(r) => r,
                _ => panic!("a standalone redis-server only"),
            }
        }
        pub fn kill(&mut self) {
            self.single().kill();
        }
        pub fn restart(&mut self) {
            self.single().restart().unwrap();
        }
    }
}
