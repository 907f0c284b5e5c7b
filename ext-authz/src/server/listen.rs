//! Listeners: accepting connections (plain TCP or TLS) and serving HTTP on them.
//!
//! One accept loop per listener hands finished connections to the protocol server through a
//! bounded channel: tonic takes them as its incoming stream, the REST and metrics routers are
//! served by [`serve_http`]. TLS handshakes run in their own tasks with a deadline, so a client
//! that opens a connection and says nothing holds neither the accept loop nor more than one
//! handshake slot.
//!
//! TLS (rustls, ring): the certificate and key are PEM files, re-read when they change on disk
//! (checked at most every [`CERT_RECHECK`]), so a rotated certificate (cert-manager, a Kubernetes
//! secret) is served without a restart; a rotation that does not load (a half-written file, a key
//! that does not match) is logged and the previous certificate keeps serving. With a client CA,
//! clients must present a certificate it signed (mTLS).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How often a handshake may look at the certificate files for a rotation.
pub const CERT_RECHECK: Duration = Duration::from_secs(5);

/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS handshakes in progress per listener; connections past this are closed at once.
const MAX_HANDSHAKES: usize = 1024;

/// Longest an HTTP/1 client may take to send a request's headers (also the idle keep-alive
/// limit between requests).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS for the gRPC and REST listeners (`tls:` in the configuration). The metrics listener
/// stays plain HTTP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate one of them signed.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Serve the gRPC listener over TLS (default true).
    #[serde(default = "yes")]
    pub grpc: bool,
    /// Serve the REST listener over TLS (default true).
    #[serde(default = "yes")]
    pub http: bool,
}

fn yes() -> bool {
    true
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}

/// Why TLS could not be set up. `Display` names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file cannot be read as PEM.
    #[error("{}: cannot read {what}: {reason}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What it should hold.
        what: &'static str,
        /// Why it could not be read.
        reason: String,
    },
    /// A file was read but its content cannot be used (no certificate in it, a key that does
    /// not fit the certificate, an unusable CA).
    #[error("{}: {reason}", path.display())]
    Unusable {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The TLS library refused the configuration.
    #[error("TLS: {0}")]
    Config(#[from] tokio_rustls::rustls::Error),
}

/// Builds a TLS acceptor offering `alpn` (e.g. `h2` for gRPC). Fails, with the file and the
/// reason, when the certificate, the key or the client CA does not load.
pub fn acceptor(config: &TlsConfig, alpn: &[&[u8]]) -> Result<TlsAcceptor, TlsError> {
    let provider = provider();
    let cert = ReloadingCert::new(config, Arc::clone(&provider))?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match &config.client_ca_file {
        Some(path) => {
            let unusable = |reason: String| TlsError::Unusable {
                path: path.clone(),
                reason,
            };
            let mut roots = RootCertStore::empty();
            for ca in read_certs(path)? {
                roots
                    .add(ca)
                    .map_err(|e| unusable(format!("not a usable CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| unusable(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder.with_cert_resolver(Arc::new(cert));
    server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(server)))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Read {
            path: path.to_path_buf(),
            what: "PEM certificates",
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Unusable {
            path: path.to_path_buf(),
            reason: String::from("no PEM certificate in the file"),
        });
    }
    Ok(certs)
}

fn load_key(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain = read_certs(cert)?;
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Read {
        path: key.to_path_buf(),
        what: "a PEM private key",
        reason: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, der, provider).map_err(|e| TlsError::Unusable {
        path: key.to_path_buf(),
        reason: format!(
            "the key does not fit the certificate {}: {e}",
            cert.display()
        ),
    })
}

/// When and what the certificate files were when last read.
type Stamp = Option<(SystemTime, u64, SystemTime, u64)>;

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let c = std::fs::metadata(cert).ok()?;
    let k = std::fs::metadata(key).ok()?;
    Some((c.modified().ok()?, c.len(), k.modified().ok()?, k.len()))
}

/// The serving certificate, re-read from its files when they change.
#[derive(Debug)]
struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    /// When the files were last looked at, and what they were then.
    checked: Mutex<(Instant, Stamp)>,
}

impl ReloadingCert {
    fn new(config: &TlsConfig, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let stamp = stamp(&config.cert_file, &config.key_file);
        let key = load_key(&config.cert_file, &config.key_file, &provider)?;
        Ok(ReloadingCert {
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
            provider,
            current: ArcSwap::from_pointee(key),
            checked: Mutex::new((Instant::now(), stamp)),
        })
    }

    fn refresh(&self) {
        // One handshake looks; the others serve what is there.
        let Ok(mut checked) = self.checked.try_lock() else {
            return;
        };
        if checked.0.elapsed() < CERT_RECHECK {
            return;
        }
        checked.0 = Instant::now();
        let now = stamp(&self.cert_file, &self.key_file);
        if now.is_none() || now == checked.1 {
            return;
        }
        match load_key(&self.cert_file, &self.key_file, &self.provider) {
            Ok(key) => {
                self.current.store(Arc::new(key));
                checked.1 = now;
                tracing::info!(cert = %self.cert_file.display(), "TLS certificate reloaded");
            }
            // Not recorded as seen: a half-written rotation is retried at the next check.
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate not reloaded; the previous one keeps serving")
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.refresh();
        Some(self.current.load_full())
    }
}

/// An accepted connection, plain or TLS.
#[derive(Debug)]
pub enum Conn {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (boxed: the TLS state is large).
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.tcp().local_addr().ok(),
            remote_addr: self.tcp().peer_addr().ok(),
        }
    }
}

/// Accepts connections on `listener` until `stop` turns true, completing TLS handshakes when
/// `tls` is set. The receiver yields ready connections; it ends when the listener stops.
pub fn accept(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) -> mpsc::Receiver<Conn> {
    let (tx, rx) = mpsc::channel(256);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = super::stopped_signal(&mut stop) => break,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            match &tls {
                None => {
                    if tx.send(Conn::Plain(tcp)).await.is_err() {
                        break;
                    }
                }
                Some(acceptor) => {
                    let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
                        tracing::warn!("too many TLS handshakes in progress; connection closed");
                        continue;
                    };
                    let (acceptor, tx) = (acceptor.clone(), tx.clone());
                    tokio::spawn(async move {
                        let done =
                            tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                        drop(permit);
                        match done {
                            Ok(Ok(stream)) => {
                                let _ = tx.send(Conn::Tls(Box::new(stream))).await;
                            }
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    rx
}

/// Serves `router` over HTTP/1 and HTTP/2 on the connections `incoming` yields, until `stop`
/// turns true; then stops accepting and lets open requests finish. Unlike `axum::serve`, a
/// client must send its request headers within 10 s.
pub async fn serve_http(
    mut incoming: mpsc::Receiver<Conn>,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let graceful = GracefulShutdown::new();
    loop {
        let conn = tokio::select! {
            c = incoming.recv() => c,
            _ = super::stopped_signal(&mut stop) => None,
        };
        let Some(conn) = conn else { break };
        let service = TowerToHyperService::new(router.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(conn), service)
            .into_owned();
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = watched.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(incoming);
    graceful.shutdown().await;
}
