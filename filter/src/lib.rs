//! The Envoy proxy-wasm filter of llm-policy.
//!
//! The shared core, compiled to `wasm32-wasip1`, decides LLM API calls inside Envoy: it buffers
//! their bodies, evaluates the bundle, lets the request go with the decision's headers or answers
//! it in the provider's own error format, counts local rate limits in shared data, and sends what
//! it cannot decide alone (global limits, budgets, plugin rules) to the policy server as an
//! ext_authz `Check`.
//!
//! The logic knows nothing of proxy-wasm: it talks to its proxy through [`host::Host`], which the
//! wasm build implements with host calls (`wasm.rs`, the only file that makes them) and the tests
//! with a fake proxy.
//!
//! - [`config`]: the filter configuration (located errors).
//! - [`vm`]: one worker VM's configured state (bundle, routes, counters, cache).
//! - [`request`]: one request's path through the filter.
//! - [`route`]: which requests are LLM API calls.
//! - [`counters`]: local rate limits in shared data (compare-and-swap).
//! - [`cache`]: the per-VM decision cache.
//! - [`ext_authz`]: the `Check` call to the policy server.
//! - token usage is read from responses with the core's `usage` module (shared with the server's
//!   ext_proc edge), in [`request`].
//! - [`answer`]: response rules over the answer (the core's answer guard), cuts reported.
//! - [`outbox`]: usage reports (and cut answers) queued for the server, sent from the root
//!   context.
//! - [`sync`]: the bundle fetched from the server and swapped in; the filter's report of
//!   itself (node, bundle running, canary counts) rides on its requests.
//! - [`canary`]: a canary's candidate decided beside the bundle, never enforced.

pub mod answer;
pub mod cache;
pub mod canary;
pub mod config;
pub mod counters;
pub mod ext_authz;
pub mod host;
pub mod outbox;
pub mod request;
pub mod route;
pub mod sync;
pub mod vm;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

#[cfg(target_arch = "wasm32")]
mod wasm;
