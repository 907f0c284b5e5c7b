//! TLS on the gRPC and REST listeners: real certificates (rcgen), real clients (tonic over
//! rustls, a raw rustls HTTP/1 client), mutual TLS, certificate rotation without a restart, and
//! connections that never finish their handshake or their headers.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check_request, policy, Harness};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use llm_policy_server::server::listen::{TlsConfig, CERT_RECHECK};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::{self, RootCertStore};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf for `localhost`: (certificate PEM, key PEM).
    fn leaf(&self) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

const ALLOW: &str =
    "    - id: ok\n      priority: 1\n      when: {cel: 'true'}\n      action: {decision: allow}\n";

/// Writes the server's certificate files and starts a server with TLS on both listeners.
async fn start_tls(
    ca: &Ca,
    client_ca: Option<&Ca>,
) -> (Harness, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap().keep();
    let (cert, key) = ca.leaf();
    let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let client_ca_file = client_ca.map(|c| {
        let p = dir.join("clients.crt");
        std::fs::write(&p, c.pem()).unwrap();
        p
    });
    let tls = TlsConfig {
        cert_file: cert_file.clone(),
        key_file: key_file.clone(),
        client_ca_file,
        grpc: true,
        http: true,
    };
    let p = policy("p", "deny", ALLOW);
    let h = Harness::start(&[("p.yaml", &p)], |c| c.tls = Some(tls)).await;
    (h, cert_file, key_file)
}

async fn grpc_tls(
    h: &Harness,
    ca: &Ca,
    identity: Option<(String, String)>,
) -> Result<AuthorizationClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://{}", h.running.grpc))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(AuthorizationClient::new(channel))
}

/// One HTTP/1.1 GET over TLS: (the server's leaf certificate, the response text).
async fn https_get(
    addr: std::net::SocketAddr,
    ca: &Ca,
    path: &str,
) -> std::io::Result<(CertificateDer<'static>, String)> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut text = String::new();
    tls.read_to_string(&mut text).await?;
    Ok((leaf, text))
}

fn der_of(pem_file: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(pem_file).unwrap()
}

#[tokio::test]
async fn grpc_and_rest_serve_over_tls_and_refuse_plaintext() {
    let ca = Ca::new("test CA");
    let (h, _, _) = start_tls(&ca, None).await;

    let mut client = grpc_tls(&h, &ca, None).await.unwrap();
    let resp = client
        .check(check_request(
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.status.unwrap().code, 0, "allowed over TLS");

    // A plaintext gRPC client gets no answer.
    let plain = AuthorizationClient::connect(format!("http://{}", h.running.grpc)).await;
    match plain {
        Err(_) => {}
        Ok(mut c) => {
            let r = c.check(check_request("GET", "/v1/models", &[], "")).await;
            assert!(r.is_err(), "plaintext gRPC must not be served: {r:?}");
        }
    }

    // REST over TLS; plain HTTP to the same port is not served.
    let (_, text) = https_get(h.running.http, &ca, "/healthz").await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("ok"), "{text}");
    let plain = h.client.get(h.url("/healthz")).send().await;
    assert!(plain.is_err(), "plain HTTP must not be served: {plain:?}");

    // A client that does not trust the server's CA fails the handshake.
    let other = Ca::new("other CA");
    assert!(https_get(h.running.http, &other, "/healthz").await.is_err());
    // Metrics stay plain HTTP.
    assert!(h.metrics().await.contains("llm_policy_"));
    h.stop().await;
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_client_ca() {
    let ca = Ca::new("server CA");
    let clients = Ca::new("client CA");
    let (h, _, _) = start_tls(&ca, Some(&clients)).await;

    let ok = grpc_tls(&h, &ca, Some(clients.leaf())).await.unwrap();
    let resp = ok
        .clone()
        .check(check_request("GET", "/v1/models", &[], ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.status.unwrap().code, 0);

    // No client certificate, or one from another CA: no answer.
    let stranger = Ca::new("stranger");
    for identity in [None, Some(stranger.leaf())] {
        let refused = match grpc_tls(&h, &ca, identity).await {
            Err(_) => true,
            Ok(mut c) => c
                .check(check_request("GET", "/v1/models", &[], ""))
                .await
                .is_err(),
        };
        assert!(refused, "a client without a trusted certificate was served");
    }
    h.stop().await;
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart_and_a_broken_one_is_not() {
    let ca = Ca::new("rotating CA");
    let (h, cert_file, key_file) = start_tls(&ca, None).await;
    let first = der_of(&cert_file);
    let (served, _) = https_get(h.running.http, &ca, "/healthz").await.unwrap();
    assert_eq!(served, first);

    // A broken rotation (the key does not match the certificate): the old one keeps serving.
    let (cert2, key2) = ca.leaf();
    let (_, other_key) = ca.leaf();
    std::fs::write(&cert_file, &cert2).unwrap();
    std::fs::write(&key_file, &other_key).unwrap();
    tokio::time::sleep(CERT_RECHECK + Duration::from_millis(500)).await;
    let (served, text) = https_get(h.running.http, &ca, "/healthz").await.unwrap();
    assert_eq!(
        served, first,
        "a mismatched key must not replace the serving certificate"
    );
    assert!(text.starts_with("HTTP/1.1 200"));

    // The rotation completes: the new certificate is served on new connections.
    std::fs::write(&key_file, &key2).unwrap();
    let second = der_of(&cert_file);
    let deadline = Instant::now() + CERT_RECHECK * 3;
    loop {
        let (served, _) = https_get(h.running.http, &ca, "/healthz").await.unwrap();
        if served == second {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    h.stop().await;
}

#[tokio::test]
async fn a_bad_certificate_stops_the_start_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_file, "not a certificate").unwrap();
    std::fs::write(&key_file, "not a key").unwrap();
    let p = policy("p", "deny", ALLOW);
    let tls = TlsConfig {
        cert_file: cert_file.clone(),
        key_file,
        client_ca_file: None,
        grpc: true,
        http: false,
    };
    let dir2 = tempfile::tempdir().unwrap();
    std::fs::write(dir2.path().join("p.yaml"), p).unwrap();
    let config = llm_policy_server::server::config::Config {
        policies: dir2.path().to_path_buf(),
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        tls: Some(tls),
        ..Default::default()
    };
    let err = match llm_policy_server::server::start(config).await {
        Ok(_) => panic!("started with a broken certificate"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("tls.crt"), "{err}");
    assert!(err.contains("no PEM certificate"), "{err}");
}

#[tokio::test]
async fn silent_clients_are_cut_off_on_both_plain_and_tls_listeners() {
    let ca = Ca::new("slow CA");
    let (tls, _, _) = start_tls(&ca, None).await;
    let plain = Harness::start(&[("p.yaml", &policy("p", "deny", ALLOW))], |_| {}).await;

    // Each opens a connection and sends part of a request (or of a handshake), then waits.
    let started = Instant::now();
    let mut open = Vec::new();
    for (addr, partial) in [
        (
            plain.running.http,
            &b"GET /healthz HTTP/1.1\r\nhost: x\r\n"[..],
        ),
        (plain.running.metrics, &b"GET /metrics HTTP/1.1\r\n"[..]),
        (tls.running.http, &b"\x16\x03\x01"[..]),
        (tls.running.grpc, &b""[..]),
    ] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(partial).await.unwrap();
        open.push(tokio::spawn(async move {
            let mut buf = Vec::new();
            // Ends when the server closes the connection.
            let _ = s.read_to_end(&mut buf).await;
            (started.elapsed(), buf)
        }));
    }
    for task in open {
        let (after, _) = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("a silent client was never cut off")
            .unwrap();
        assert!(
            after >= Duration::from_secs(5),
            "cut off too early: {after:?}"
        );
    }
    // The servers still serve.
    assert!(plain
        .client
        .get(plain.url("/healthz"))
        .send()
        .await
        .unwrap()
        .status()
        .is_success());
    assert!(https_get(tls.running.http, &ca, "/healthz").await.is_ok());
    tls.stop().await;
    plain.stop().await;
}
