//! The load generator of the proxy benchmarks (`make bench-proxy`): bounded in requests and
//! time, loopback only, one JSON line of results on stdout.
//!
//! - `loadgen http --url URL --rate 1000 --duration 10`: open loop at a fixed rate; latency is
//!   measured from each request's scheduled start, so a stall counts against it (no coordinated
//!   omission).
//! - `loadgen http --url URL --concurrency 64 --duration 10`: closed loop, as fast as answers
//!   come (saturation).
//! - `loadgen check --grpc ADDR --concurrency 64 --duration 5`: Envoy's ext_authz `Check` called
//!   directly over gRPC.
//!
//! Requests carry an 8 KB OpenAI chat body unless `--body-file` says otherwise.
//! With `--unique`, each request's body differs (a nonce in its text), so nothing is served from a
//! decision or scan cache.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use llm_policy_bench::{write_nonce, NONCE};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// HTTP POSTs (through Envoy).
    Http {
        /// Target URL.
        #[arg(long)]
        url: String,
        /// Requests per second (open loop); without it, closed loop at `--concurrency`.
        #[arg(long)]
        rate: Option<u64>,
        /// Closed-loop workers, or the most requests in flight in open loop.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Seconds.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Body file (default: an 8 KB chat completion request).
        #[arg(long)]
        body_file: Option<std::path::PathBuf>,
        /// Extra header `name: value` (repeatable).
        #[arg(long)]
        header: Vec<String>,
        /// Make every request's body unique: the body must hold [`NONCE`], whose letters are
        /// replaced by a per-request count (so no decision or scan is served from a cache).
        #[arg(long)]
        unique: bool,
    },
    /// Print the 100 rules of `make bench-filter` ([`llm_policy_bench::hundred_rules_yaml`]).
    HundredRules,
    /// Print the chat body of `make bench-filter` of about `bytes` bytes, holding the nonce
    /// `--unique` rewrites ([`llm_policy_bench::nonce_chat_body`]).
    ChatBody {
        /// Size in bytes.
        #[arg(long)]
        bytes: usize,
    },
    /// Print a policy of N generated rules (DSL, CEL and rate limits mixed), for reload tests.
    GenPolicy {
        /// Rules.
        #[arg(long, default_value_t = 10_000)]
        rules: usize,
    },
    /// ext_authz Check over gRPC.
    Check {
        /// host:port of the ext_authz server.
        #[arg(long)]
        grpc: String,
        /// Concurrent callers.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// HTTP/2 connections they share.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Seconds.
        #[arg(long, default_value_t = 5)]
        duration: u64,
    },
}

/// The bodies a run sends: the same one, or one made unique per request.
#[derive(Clone)]
struct Bodies {
    body: axum::body::Bytes,
    /// Where the letters of [`NONCE`] after `nonce` are, with `--unique`.
    nonce: Option<usize>,
    sent: Arc<AtomicU64>,
}

impl Bodies {
    fn new(body: Vec<u8>, unique: bool) -> Result<Bodies, String> {
        let nonce = if unique {
            Some(
                llm_policy_bench::nonce_at(&body)
                    .ok_or_else(|| format!("--unique: the body holds no `{NONCE}` marker"))?,
            )
        } else {
            None
        };
        Ok(Bodies {
            body: bytes_of(body),
            nonce,
            sent: Arc::new(AtomicU64::new(0)),
        })
    }

    fn next(&self) -> reqwest::Body {
        let Some(at) = self.nonce else {
            return reqwest::Body::from(self.body.clone());
        };
        let n = self.sent.fetch_add(1, Ordering::Relaxed);
        let mut b = self.body.to_vec();
        write_nonce(&mut b, at, n);
        reqwest::Body::from(b)
    }
}

/// An 8 KB chat completion request.
fn chat_body() -> Vec<u8> {
    let sentence =
        "Please review the following paragraph about distributed systems and summarise it. ";
    let mut text = String::new();
    while text.len() < 8000 {
        text.push_str(sentence);
    }
    serde_json::json!({
        "model": "gpt-4o-mini",
        "max_tokens": 256,
        "messages": [
            {"role": "system", "content": "You are a careful technical editor."},
            {"role": "user", "content": text},
        ],
    })
    .to_string()
    .into_bytes()
}

/// Latencies (µs) and outcomes.
#[derive(Default)]
struct Tally {
    latencies_us: Mutex<Vec<u64>>,
    statuses: Mutex<std::collections::BTreeMap<String, u64>>,
    errors: AtomicU64,
}

impl Tally {
    fn record(&self, status: &str, latency: Duration) {
        if let Ok(mut l) = self.latencies_us.lock() {
            l.push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
        }
        if let Ok(mut s) = self.statuses.lock() {
            *s.entry(status.to_string()).or_default() += 1;
        }
    }

    fn report(&self, mode: &str, elapsed: Duration) -> serde_json::Value {
        let mut l = self
            .latencies_us
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        l.sort_unstable();
        let pct = |p: f64| -> f64 {
            if l.is_empty() {
                return 0.0;
            }
            let i = ((l.len() as f64 - 1.0) * p).round() as usize;
            l.get(i).copied().unwrap_or(0) as f64 / 1000.0
        };
        let n = l.len() as f64;
        serde_json::json!({
            "mode": mode,
            "requests": l.len(),
            "errors": self.errors.load(Ordering::Relaxed),
            "statuses": self.statuses.lock().map(|s| s.clone()).unwrap_or_default(),
            "rps": n / elapsed.as_secs_f64(),
            "p50_ms": pct(0.50),
            "p90_ms": pct(0.90),
            "p99_ms": pct(0.99),
            "max_ms": pct(1.0),
        })
    }
}

async fn http(
    url: String,
    rate: Option<u64>,
    concurrency: usize,
    duration: Duration,
    body: Bodies,
    headers: Vec<(String, String)>,
) -> serde_json::Value {
    llm_policy_server::install_crypto_provider();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    let tally = Arc::new(Tally::default());
    let send = {
        let client = client.clone();
        let url = url.clone();
        let headers = headers.clone();
        move |body: reqwest::Body| {
            let mut req = client.post(&url).header("content-type", "application/json");
            for (k, v) in &headers {
                req = req.header(k, v);
            }
            req.body(body).send()
        }
    };
    let start = Instant::now();
    match rate {
        Some(rate) => {
            let in_flight = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1) * 16));
            let total = rate.saturating_mul(duration.as_secs());
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..total {
                let at = start + Duration::from_secs_f64(i as f64 / rate as f64);
                tokio::time::sleep_until(at.into()).await;
                let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
                    break;
                };
                let fut = send(body.next());
                let tally = Arc::clone(&tally);
                tasks.spawn(async move {
                    let r = fut.await;
                    finish(&tally, r, at).await;
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        }
        None => {
            let deadline = start + duration;
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..concurrency.max(1) {
                let send = send.clone();
                let tally = Arc::clone(&tally);
                let body = body.clone();
                tasks.spawn(async move {
                    while Instant::now() < deadline {
                        let at = Instant::now();
                        let r = send(body.next()).await;
                        finish(&tally, r, at).await;
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        }
    }
    tally.report(
        if rate.is_some() {
            "http-rate"
        } else {
            "http-saturation"
        },
        start.elapsed(),
    )
}

fn bytes_of(v: Vec<u8>) -> axum::body::Bytes {
    axum::body::Bytes::from(v)
}

async fn finish(tally: &Tally, r: reqwest::Result<reqwest::Response>, at: Instant) {
    match r {
        Ok(resp) => {
            let status = resp.status().as_u16().to_string();
            // Read the whole answer: the latency is the client's.
            let _ = resp.bytes().await;
            tally.record(&status, at.elapsed());
        }
        Err(_) => {
            tally.errors.fetch_add(1, Ordering::Relaxed);
            tally.record("error", at.elapsed());
        }
    }
}

async fn check(
    grpc: String,
    concurrency: usize,
    connections: usize,
    duration: Duration,
) -> serde_json::Value {
    let body = chat_body();
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path: "/v1/chat/completions".into(),
                    host: "api.openai.com".into(),
                    headers: [("content-type".to_string(), "application/json".to_string())]
                        .into_iter()
                        .collect(),
                    size: body.len() as i64,
                    raw_body: body,
                    ..HttpRequest::default()
                }),
                ..Request::default()
            }),
            ..AttributeContext::default()
        }),
    };
    let mut clients = Vec::new();
    for _ in 0..connections.max(1) {
        match AuthorizationClient::connect(format!("http://{grpc}")).await {
            Ok(c) => clients.push(c),
            Err(e) => return serde_json::json!({"error": e.to_string()}),
        }
    }
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..concurrency.max(1) {
        let mut client = clients[i % clients.len()].clone();
        let tally = Arc::clone(&tally);
        let request = request.clone();
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let at = Instant::now();
                match client.check(request.clone()).await {
                    Ok(r) => {
                        let code = r.into_inner().status.map_or(-1, |s| s.code);
                        tally.record(&format!("grpc-{code}"), at.elapsed());
                    }
                    Err(_) => {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                        tally.record("error", at.elapsed());
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    tally.report("grpc-check", start.elapsed())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let out = match cli.mode {
        Mode::Http {
            url,
            rate,
            concurrency,
            duration,
            body_file,
            header,
            unique,
        } => {
            let body = match body_file {
                Some(p) => std::fs::read(&p).unwrap_or_else(|e| {
                    eprintln!("{}: {e}", p.display());
                    std::process::exit(2)
                }),
                None => chat_body(),
            };
            let body = Bodies::new(body, unique).unwrap_or_else(|e| {
                eprintln!("{e}");
                std::process::exit(2)
            });
            let headers = header
                .iter()
                .filter_map(|h| {
                    let (k, v) = h.split_once(':')?;
                    Some((k.trim().to_string(), v.trim().to_string()))
                })
                .collect();
            http(
                url,
                rate,
                concurrency,
                Duration::from_secs(duration),
                body,
                headers,
            )
            .await
        }
        Mode::HundredRules => {
            print!("{}", llm_policy_bench::hundred_rules_yaml());
            return;
        }
        Mode::ChatBody { bytes } => {
            print!("{}", llm_policy_bench::nonce_chat_body(bytes));
            return;
        }
        Mode::GenPolicy { rules } => {
            print!(
                "{}",
                llm_policy_bench::load_policy(rules, llm_policy_bench::LoadKind::Mixed)
            );
            return;
        }
        Mode::Check {
            grpc,
            concurrency,
            connections,
            duration,
        } => {
            check(
                grpc,
                concurrency,
                connections,
                Duration::from_secs(duration),
            )
            .await
        }
    };
    println!("{out}");
}
