//! # llm-policy-core
//!
//! The shared rule core of llm-policy. The same crate is compiled into the Envoy proxy-wasm filter
//! (`wasm32-wasip1`, features `std,cel`) and into the ext_authz server, so one policy file gives the
//! same decision in both places.
//!
//! The pipeline:
//!
//! 1. **Load** ([`source`], `std` only): YAML or JSON policy files become [`Document`]s that remember
//!    the line and column of every node, so validation errors point at the file.
//! 2. **Compile** ([`PolicySet::compile`]): validate every rule (schema, CEL syntax, DSL fields and
//!    types, regexes, duplicates, conflicts), compile DSL conditions and the CEL subset that maps onto
//!    them into a native condition tree, keep the `cel` crate for the rest, and index rules by their
//!    literal tests. The result is an immutable, cheaply cloned [`PolicySet`].
//! 3. **Extract** ([`RequestContext::from_request`]): build the typed request context from method,
//!    path, headers and body of an OpenAI / Anthropic style request.
//! 4. **Evaluate** ([`PolicySet::start`] / [`Pending::resume`], or [`PolicySet::evaluate`] with
//!    [`Hooks`]): select candidate rules through the index, evaluate them, resolve all matches into
//!    one [`Decision`] with its cache key, cacheability and counter charges. What only the host can
//!    answer (plugins, counters) is asked for, either in a second phase or through callbacks.
//!
//! Without default features the crate is `#![no_std]` + `alloc` (model, DSL, matcher, resolver,
//! context); `std` adds file loading with locations, `cel` adds CEL conditions.
#![cfg_attr(not(feature = "std"), no_std)]
#![allow(
    clippy::result_large_err,
    reason = "diagnostics are returned on the load path only, never per request"
)]
// Request data is hostile: no arithmetic that can overflow, no indexing that can panic.
#![cfg_attr(
    not(test),
    deny(
        clippy::arithmetic_side_effects,
        clippy::indexing_slicing,
        clippy::string_slice
    )
)]

extern crate alloc;

pub mod answer;
mod cache_key;
#[cfg(feature = "cel")]
mod cel_lang;
#[cfg(feature = "cel")]
mod cel_program;
#[cfg(feature = "cel")]
mod cel_text;
mod compile;
mod condition;
pub mod context;
pub mod decision;
pub mod detect;
mod diagnostic;
mod document;
mod dsl;
mod eval;
mod extract;
#[cfg(all(test, feature = "cel"))]
mod field_table_tests;
pub mod fold;
pub mod gen_ai;
#[cfg(test)]
mod generated_texts;
pub mod identity;
mod index;
pub mod model;
pub mod model_table;
mod pattern;
pub mod prompt_scan;
pub mod redact;
pub mod reply;
pub mod rewrite;
pub mod schema;
mod set;
#[cfg(feature = "std")]
pub mod source;
mod suggest;
pub mod tokens;
mod truth;
pub mod usage;
pub mod window;
pub mod wire;

pub use context::{ContextConfig, ContextError, RequestContext, RequestInput};
pub use decision::{Decision, ErrorBody, Verdict};
pub use diagnostic::{Code, Diagnostic, Diagnostics, Position, Severity};
pub use document::Document;
pub use eval::{
    Answer, CounterCheck, DecisionKey, EvalOptions, Hooks, LocalOnly, Need, NeedId, NeedKind,
    Pending, PluginCheck, Step, Timing,
};
pub use set::{CompileOutput, Origin, PolicySet, RuleInfo, Stats};
