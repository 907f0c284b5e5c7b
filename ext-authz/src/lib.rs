//! # llm-policy-server
//!
//! The `llm-policy` binary: the command-line tool and the policy server, in separate module
//! trees that share only the request-file format and the making of virtual keys.
//!
//! - [`cli`]: `validate`, `eval`, `test`, `context`, `schema`, `codes` and the `serve` entry;
//!   [`cli::suite`] runs policy test suites, [`cli::report`] renders decisions as text.
//! - [`server`]: `llm-policy serve`, the Envoy ext_authz server with its REST API, metrics, hot
//!   reload, limits and budgets, and audit log. Protocols are converted at its edges; the core
//!   never sees a tonic or axum type.
//! - [`bundle`]: signed policy bundles (archive, signatures, object storage), built and pushed
//!   by the CLI, followed by the server.
//! - [`keys`]: virtual API keys as the CLI and the server make and keep them.
//! - [`request`]: the request-file format of `llm-policy eval`, test cases and `POST
//!   /v1/evaluate`.

pub mod bundle;
pub mod cli;
pub mod keys;
pub mod request;
pub mod server;

/// Installs rustls's process-wide crypto provider (ring, as the listeners use) for the HTTP
/// clients (`reqwest`: the bundle store's client, tests, the load generator), which are built
/// without one of their own. Call before building a client; a second call changes nothing.
pub fn install_crypto_provider() {
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
}
