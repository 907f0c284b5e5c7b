//! Signed bundles on a real S3-compatible server (s3s-fs, on loopback, started here): the CLI
//! builds, signs and pushes; the server follows the store — a new revision within the poll
//! interval, tampered, unsigned, foreign-signed and broken revisions refused with where, the
//! store unreachable and back, API writes refused, history and rollback.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{policy, Harness};
use llm_policy_server::bundle::store::{Limits, Store};
use llm_policy_server::bundle::{Bundle, SigningKey};
use serde_json::{json, Value};

const ACCESS_KEY: &str = "AKIALLMPOLICYTEST";
const SECRET_KEY: &str = "llm-policy-test-secret-key";
const BUCKET: &str = "policies";

/// An s3s-fs server on its own runtime (stopping the runtime closes the listener and every
/// connection: the store is unreachable).
struct S3 {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl S3 {
    fn start(root: &Path, port: u16) -> S3 {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let fs = s3s_fs::FileSystem::new(root).unwrap();
        let service = {
            let mut b = s3s::service::S3ServiceBuilder::new(fs);
            b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            b.build()
        };
        // Bound here, on the runtime (SO_REUSEADDR: a restart takes the same port back while
        // the old connections wait in TIME_WAIT).
        let listener = {
            let _context = runtime.enter();
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_reuseaddr(true).unwrap();
            socket.bind(([127, 0, 0, 1], port).into()).unwrap();
            socket.listen(128).unwrap()
        };
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(conn);
            }
        });
        S3 {
            addr,
            runtime: Some(runtime),
        }
    }

    fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    fn options(&self) -> Vec<(String, String)> {
        vec![
            (
                String::from("aws_endpoint"),
                format!("http://{}", self.addr),
            ),
            (String::from("aws_allow_http"), String::from("true")),
            (String::from("aws_region"), String::from("us-east-1")),
            (String::from("aws_access_key_id"), String::from(ACCESS_KEY)),
            (
                String::from("aws_secret_access_key"),
                String::from(SECRET_KEY),
            ),
        ]
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.stop();
    }
}

const STORE: &str = "s3://policies/llm-policy";

fn cli(args: &[&str], s3: &S3) -> (bool, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_llm-policy"));
    c.args(args);
    // Credentials from the environment, as a CI job would pass them; the endpoint as options.
    c.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", "us-east-1");
    if args.contains(&"--store") {
        c.args([
            "--option",
            &format!("aws_endpoint=http://{}", s3.addr),
            "--option",
            "aws_allow_http=true",
        ]);
    }
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A policy directory denying `models` (one rule each), with a test suite beside it.
fn policies(dir: &Path, name: &str, models: &[&str]) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(&p).unwrap();
    let rules: String = models
        .iter()
        .map(|m| format!("    - {{id: deny-{m}, when: {{cel: \"request.model == '{m}'\"}}, action: {{decision: deny}}}}\n"))
        .collect();
    std::fs::write(p.join("base.yaml"), policy("base", "allow", &rules)).unwrap();
    p
}

async fn decision(h: &Harness, model: &str) -> String {
    let req = json!({"method": "POST", "path": "/v1/chat/completions", "headers": {},
        "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]}});
    let v: Value = h
        .client
        .post(h.url("/v1/evaluate"))
        .json(&req)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["decision"].as_str().unwrap_or_default().to_string()
}

async fn source(h: &Harness) -> Value {
    h.get_json("/v1/bundle/source").await
}

/// Waits (at most `within`) until the source's status satisfies `ok`; returns it and the time.
async fn until(h: &Harness, within: Duration, ok: impl Fn(&Value) -> bool) -> (Value, Duration) {
    let start = Instant::now();
    loop {
        let s = source(h).await;
        if ok(&s) {
            return (s, start.elapsed());
        }
        assert!(start.elapsed() < within, "not within {within:?}: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn store(s3: &S3) -> Store {
    Store::open(
        STORE,
        &s3.options().into_iter().collect(),
        Limits {
            request: Duration::from_secs(2),
            retries: 0,
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_bundles_from_s3_are_followed_and_bad_ones_refused() {
    llm_policy_server::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s3");
    std::fs::create_dir_all(root.join(BUCKET)).unwrap();
    let mut s3 = S3::start(&root, 0);
    let d = |p: &str| dir.path().join(p).display().to_string();

    // Keys and the first revision, through the CLI.
    let (ok, out) = cli(&["bundle", "keygen", "--out", &d("signer")], &s3);
    assert!(ok, "{out}");
    let (ok, out) = cli(&["bundle", "keygen", "--out", &d("stranger")], &s3);
    assert!(ok, "{out}");
    let r1 = policies(dir.path(), "p1", &["gpt-bad"]);
    let (ok, out) = cli(
        &[
            "bundle",
            "build",
            "--policies",
            &r1.display().to_string(),
            "--models",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../models/models.yaml"),
            "--revision",
            "r1",
            "--key",
            &d("signer.pem"),
            "--out",
            &d("r1.tar.gz"),
        ],
        &s3,
    );
    assert!(ok, "{out}");
    assert!(out.contains("signed by"), "{out}");
    let (ok, out) = cli(
        &[
            "bundle",
            "verify",
            "--public-key",
            &d("signer.pub"),
            &d("r1.tar.gz"),
        ],
        &s3,
    );
    assert!(ok && out.contains("verified"), "{out}");
    let (ok, out) = cli(
        &[
            "bundle",
            "verify",
            "--public-key",
            &d("stranger.pub"),
            &d("r1.tar.gz"),
        ],
        &s3,
    );
    assert!(!ok && out.contains("none of them a trusted key"), "{out}");
    let (ok, out) = cli(
        &[
            "bundle",
            "push",
            "--store",
            STORE,
            "--public-key",
            &d("signer.pub"),
            &d("r1.tar.gz"),
        ],
        &s3,
    );
    assert!(ok && out.contains("current: r1 (was none)"), "{out}");

    // The server follows the store: r1 serves.
    let options = s3.options().into_iter().collect();
    let public = PathBuf::from(d("signer.pub"));
    let h = Harness::start(&[], move |c| {
        c.bundle.store = Some(String::from(STORE));
        c.bundle.options = options;
        c.bundle.public_key_files = vec![public];
        c.bundle.poll_ms = 200;
        c.bundle.timeout_ms = 1000;
    })
    .await;
    let (s, _) = until(&h, Duration::from_secs(5), |s| s["revision"] == "r1").await;
    assert!(s["signedBy"].is_string(), "{s}");
    assert_eq!(decision(&h, "gpt-bad").await, "deny");
    assert_eq!(decision(&h, "gpt-worse").await, "allow");
    // The bundle's model table is the one the filters sync.
    let b = h.get_json("/v1/bundle").await;
    assert!(
        b["models"].as_str().is_some_and(|m| m.contains("gpt-4o")),
        "{b}"
    );
    assert!(b["files"][0]["path"] == "policies/base.yaml", "{b}");

    // API writes are refused: the bundle is the only source.
    let put = h
        .client
        .put(h.url("/v1/policies/base"))
        .bearer_auth(common::TOKEN)
        .body(policy("base", "allow", "    []\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 409);
    assert!(put.text().await.unwrap().contains("signed bundles"));

    // A new revision is picked up within the poll interval (200 ms; a few polls of slack).
    let r2 = policies(dir.path(), "p2", &["gpt-bad", "gpt-worse"]);
    let (ok, out) = cli(
        &[
            "bundle",
            "build",
            "--policies",
            &r2.display().to_string(),
            "--revision",
            "r2",
            "--key",
            &d("signer.pem"),
            "--out",
            &d("r2.tar.gz"),
        ],
        &s3,
    );
    assert!(ok, "{out}");
    let (ok, out) = cli(
        &[
            "bundle",
            "push",
            "--store",
            STORE,
            "--public-key",
            &d("signer.pub"),
            &d("r2.tar.gz"),
        ],
        &s3,
    );
    assert!(ok && out.contains("current: r2 (was r1)"), "{out}");
    let (_, took) = until(&h, Duration::from_secs(5), |s| s["revision"] == "r2").await;
    assert!(took < Duration::from_secs(2), "picked up after {took:?}");
    assert_eq!(decision(&h, "gpt-worse").await, "deny");

    // Revisions are never overwritten: the same name with other content is a conflict.
    let (ok, out) = cli(
        &[
            "bundle",
            "build",
            "--policies",
            &r1.display().to_string(),
            "--revision",
            "r2",
            "--key",
            &d("signer.pem"),
            "--out",
            &d("r2-again.tar.gz"),
        ],
        &s3,
    );
    assert!(ok, "{out}");
    let (ok, out) = cli(
        &[
            "bundle",
            "push",
            "--store",
            STORE,
            "--public-key",
            &d("signer.pub"),
            &d("r2-again.tar.gz"),
        ],
        &s3,
    );
    assert!(
        !ok && out.contains("already in the store with other content"),
        "{out}"
    );

    // Refused revisions, written straight into the store (as an attacker with bucket access
    // would), each with where it went wrong; r2 keeps serving.
    let st = store(&s3);
    let signer = SigningKey::from_file(&dir.path().join("signer.pem")).unwrap();
    let stranger = SigningKey::from_file(&dir.path().join("stranger.pem")).unwrap();
    let build = |revision: &str, models: &[&str]| {
        let p = policies(dir.path(), revision, models);
        let files = llm_policy_server::bundle::archive::read_policy_dir(&p).unwrap();
        Bundle::new(files, None, Some(revision), chrono::Utc::now()).unwrap()
    };
    let tampered = {
        let mut b = build("r3", &["gpt-bad"]);
        signer.sign(&mut b);
        // The policy loosened after signing: its digest no longer matches the manifest.
        b.files[0].1 = b.files[0].1.replace("gpt-bad", "gpt-none");
        b
    };
    let unsigned = build("r4", &["gpt-bad"]);
    let foreign = {
        let mut b = build("r5", &["gpt-bad"]);
        stranger.sign(&mut b);
        b
    };
    let broken = {
        let p = dir.path().join("r6");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(
            p.join("bad.yaml"),
            "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {name: bad}\nspec:\n  defaultDecision: allow\n  rules:\n    - {id: x, when: {cel: \"request.model ==\"}, action: {decision: deny}}\n",
        )
        .unwrap();
        let files = llm_policy_server::bundle::archive::read_policy_dir(&p).unwrap();
        let mut b = Bundle::new(files, None, Some("r6"), chrono::Utc::now()).unwrap();
        signer.sign(&mut b);
        b
    };
    let cases = [
        (
            &tampered,
            "policies/base.yaml: its content differs from the manifest's digest",
        ),
        (&unsigned, "unsigned"),
        (&foreign, "none of them a trusted key"),
        (&broken, "policies/bad.yaml:7"),
    ];
    for (b, want) in cases {
        let bytes = b.to_archive().unwrap();
        st.put_revision(&b.manifest, &bytes).await.unwrap();
        let was = st.current(None).await.unwrap();
        st.move_pointer(&b.manifest.revision, &b.manifest.digest, was.as_ref())
            .await
            .unwrap();
        let revision = b.manifest.revision.clone();
        let (s, _) = until(&h, Duration::from_secs(5), |s| {
            s["refused"] == revision.as_str()
        })
        .await;
        let error = s["lastError"].as_str().unwrap_or_default();
        assert!(
            error.contains(want),
            "{revision}: want {want:?} in {error:?}"
        );
        assert_eq!(s["revision"], "r2", "{s}");
        assert_eq!(decision(&h, "gpt-worse").await, "deny", "r2 keeps serving");
        // And the CLI refuses to push or activate it.
        let path = dir.path().join(format!("{revision}.tar.gz"));
        std::fs::write(&path, &bytes).unwrap();
        let (ok, out) = cli(
            &[
                "bundle",
                "push",
                "--store",
                STORE,
                "--public-key",
                &d("signer.pub"),
                &path.display().to_string(),
            ],
            &s3,
        );
        assert!(!ok, "{revision} pushed: {out}");
    }
    assert!(
        h.metric("llm_policy_bundle_fetches_total{result=\"refused\"}")
            .await
            >= 4.0
    );
    assert_eq!(h.metric("llm_policy_bundle_store_up").await, 1.0);

    // The pointer written again with a revision refused before: still refused, never "serving".
    let was = st.current(None).await.unwrap();
    st.move_pointer("r4", &unsigned.manifest.digest, was.as_ref())
        .await
        .unwrap();
    let (s, _) = until(&h, Duration::from_secs(5), |s| s["refused"] == "r4").await;
    assert_eq!(s["revision"], "r2", "{s}");

    // A pointer moved by someone else between read and write is a conflict, not a lost write.
    let stale = st.current(None).await.unwrap();
    let b7 = {
        let mut b = build("r7", &["gpt-bad", "gpt-worse", "gpt-other"]);
        signer.sign(&mut b);
        b
    };
    st.put_revision(&b7.manifest, &b7.to_archive().unwrap())
        .await
        .unwrap();
    st.move_pointer("r2", &cases_digest(&dir, "r2.tar.gz"), stale.as_ref())
        .await
        .unwrap();
    let e = st
        .move_pointer("r7", &b7.manifest.digest, stale.as_ref())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("moved the pointer first"), "{e}");

    // The store unreachable: counted, said, the last good keeps serving; back, and followed.
    let port = s3.addr.port();
    s3.stop();
    let (s, _) = until(&h, Duration::from_secs(10), |s| {
        s["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("llm-policy/current.json"))
    })
    .await;
    assert!(
        h.metric("llm_policy_bundle_fetches_total{result=\"unavailable\"}")
            .await
            >= 1.0,
        "{s}"
    );
    assert_eq!(h.metric("llm_policy_bundle_store_up").await, 0.0);
    assert_eq!(decision(&h, "gpt-worse").await, "deny");
    assert!(h.get_json("/readyz").await["ready"] == true);
    let s3 = S3::start(&root, port);
    let (ok, out) = cli(
        &[
            "bundle",
            "activate",
            "--store",
            STORE,
            "--revision",
            "r7",
            "--public-key",
            &d("signer.pub"),
        ],
        &s3,
    );
    assert!(ok && out.contains("current: r7"), "{out}");
    until(&h, Duration::from_secs(10), |s| {
        s["revision"] == "r7" && s["lastError"].is_null()
    })
    .await;
    assert_eq!(decision(&h, "gpt-other").await, "deny");
    assert_eq!(h.metric("llm_policy_bundle_store_up").await, 1.0);

    // History and rollback: r1 again, through the CLI.
    let (ok, out) = cli(&["bundle", "history", "--store", STORE], &s3);
    assert!(ok, "{out}");
    for r in ["r1", "r2", "r3", "r7"] {
        assert!(out.contains(r), "{r} in {out}");
    }
    assert!(out.lines().any(|l| l.starts_with("* r7")), "{out}");
    let (ok, out) = cli(
        &[
            "bundle",
            "activate",
            "--store",
            STORE,
            "--revision",
            "r1",
            "--public-key",
            &d("signer.pub"),
        ],
        &s3,
    );
    assert!(ok && out.contains("current: r1 (was r7)"), "{out}");
    until(&h, Duration::from_secs(5), |s| s["revision"] == "r1").await;
    assert_eq!(decision(&h, "gpt-worse").await, "allow");
    // A refused revision cannot be activated.
    let (ok, out) = cli(
        &[
            "bundle",
            "activate",
            "--store",
            STORE,
            "--revision",
            "r3",
            "--public-key",
            &d("signer.pub"),
        ],
        &s3,
    );
    assert!(!ok && out.contains("differs from the manifest"), "{out}");
    h.stop().await;
}

/// The digest of a bundle the CLI wrote.
fn cases_digest(dir: &tempfile::TempDir, name: &str) -> String {
    let bytes = std::fs::read(dir.path().join(name)).unwrap();
    Bundle::read(name, &bytes).unwrap().manifest.digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_store_has_no_revision_is_not_ready_and_says_why() {
    llm_policy_server::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s3");
    std::fs::create_dir_all(root.join(BUCKET)).unwrap();
    let s3 = S3::start(&root, 0);
    let (key, _) = SigningKey::generate().unwrap();
    let public = dir.path().join("k.pub");
    std::fs::write(&public, key.public().to_pem()).unwrap();
    let options = s3.options().into_iter().collect();
    let h = Harness::start(
        &[("base.yaml", &policy("base", "deny", "    []\n"))],
        move |c| {
            c.bundle.store = Some(String::from(STORE));
            c.bundle.options = options;
            c.bundle.public_key_files = vec![public];
            c.bundle.poll_ms = 200;
        },
    )
    .await;
    // The policy directory is not a fallback: nothing serves until a signed revision does.
    let r = h.client.get(h.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let s = source(&h).await;
    assert!(
        s["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("current.json: not found")),
        "{s}"
    );
    let reload = h
        .client
        .post(h.url("/v1/reload"))
        .bearer_auth(common::TOKEN)
        .send()
        .await
        .unwrap();
    assert_ne!(reload.status(), 200);
    assert_eq!(
        h.client
            .get(h.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    h.stop().await;
}

#[test]
fn a_store_option_it_does_not_know_is_an_error() {
    llm_policy_server::install_crypto_provider();
    let e = Store::open(
        STORE,
        &[(String::from("aws_endpiont"), String::from("x"))]
            .into_iter()
            .collect(),
        Limits::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("unknown option `aws_endpiont`"),
        "{e}"
    );
    assert!(Store::open("ftp://x/y", &Default::default(), Limits::default()).is_err());
}
