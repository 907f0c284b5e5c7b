//! # llm-policy-server
//!
//! The ext_authz policy server of llm-policy (ROADMAP step 2) and, for now, the `llm-policy`
//! command-line tool built on the shared core:
//!
//! - [`request`]: the request-file format of `llm-policy eval` and of test cases;
//! - [`suite`]: policy test suites (`kind: PolicyTest`), run by `llm-policy test`;
//! - [`report`]: human-readable rendering of decisions and diagnostics.

pub mod report;
pub mod request;
pub mod suite;
