//! Regexes built from policies (DSL `matches` and string tests, CEL `matches()`): every one
//! size-limited and linear-time, built at load.

use alloc::format;
use alloc::string::String;

use regex::{Regex, RegexBuilder};

/// Compiled regexes may not grow beyond this. Past about this size the regex engine's lazy DFA
/// can thrash on adversarial text and fall back to an NFA simulation whose cost is the pattern
/// size times the text (`a[ab]{3000}c` would take seconds per megabyte); under it, matching stays
/// in the tens of milliseconds per megabyte at worst. Unicode classes are large: write
/// `[A-Za-z0-9_]` or `(?-u:\w)` rather than `\w{20}`.
pub(crate) const REGEX_SIZE_LIMIT: usize = 128 * 1024;

/// Builds a size-limited, linear-time regex; the error is a message for a diagnostic.
pub(crate) fn build_regex(pattern: &str, ignore_case: bool) -> Result<Regex, String> {
    RegexBuilder::new(pattern)
        .case_insensitive(ignore_case)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("invalid regular expression: {e}"))
}
