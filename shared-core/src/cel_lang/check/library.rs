//! Types and static cost bounds of the library functions whose cost or output depends on their
//! arguments: the strings extension (`indexOf`, `lastIndexOf`, `replace`, `split`, `join`,
//! `format`, `strings.quote`) and the time functions (`timestamp`, `duration` and their
//! getters).
//!
//! Each string function is accepted where a bound on its work and on the value it builds, in
//! multiples of the request's size, follows from its arguments (cel-go's cost estimator reasons
//! the same way): a search is linear when its needle (or its text) is a short literal; `replace`
//! grows the text by a factor its literals give; `split` builds a bounded number of parts when
//! given a literal limit; `join`'s literal separator adds at most its length per element;
//! `format`'s arguments are a literal list, each formatted at most once. What cannot be bounded
//! is a `cel-too-complex` error that says why and what to write instead.

use cel::common::ast::{operators as op, CallExpr, Expr, IdedExpr, LiteralValue};
use cel::{Context, Value};

use super::{show, string_lit, type_err, Checker, Ty, T};
use crate::cel_lang::{issue, CelIssue};
use crate::cel_text::ShowError;
use crate::diagnostic::Code;

/// Longest literal (in characters) that bounds a search: `indexOf` / `lastIndexOf` compare the
/// needle at every position of the text.
pub(super) const MAX_NEEDLE: usize = 64;

/// Most parts a `split` of request text may be asked for (each part is a separate string).
pub(super) const MAX_SPLIT_PARTS: i64 = 1000;

/// The longest text one `format` clause writes for a number (`%.100f` of `1e308`, `%s` of
/// `5e-324`).
const MAX_NUMBER_TEXT: u64 = super::MAX_SCALAR_TEXT;

/// How many times its size an argument of `format` may become (`%x` of bytes writes two digits
/// per byte; `%s` of bytes writes U+FFFD, three bytes, for an invalid one).
const FORMAT_FACTOR: u32 = 3;

/// Bytes each part of a `split` takes besides its text (the string and its place in the list).
const PART_BYTES: u64 = 64;

/// Getters of a timestamp (each takes an optional time zone).
const TIMESTAMP_GETTERS: &[&str] = &[
    "getFullYear",
    "getMonth",
    "getDate",
    "getDayOfMonth",
    "getDayOfWeek",
    "getDayOfYear",
    "getHours",
    "getMinutes",
    "getSeconds",
    "getMilliseconds",
];

/// Getters of a duration (no time zone).
const DURATION_GETTERS: &[&str] = &["getHours", "getMinutes", "getSeconds", "getMilliseconds"];

/// The functions this module types besides the getters ([`functions`] is every one).
const OWN_FUNCTIONS: &[&str] = &[
    "indexOf",
    "lastIndexOf",
    "replace",
    "split",
    "join",
    "format",
    "strings.quote",
    "timestamp",
    "duration",
];

/// Every function this module types (the duration getters are a subset of the timestamp's).
pub(super) fn functions() -> impl Iterator<Item = &'static str> {
    OWN_FUNCTIONS.iter().chain(TIMESTAMP_GETTERS).copied()
}

fn too_complex(e: &IdedExpr, why: &str, help: &str) -> CelIssue {
    issue(
        Code::CelTooComplex,
        format!("`{}` {why}", show(e)),
        Some(help.to_string()),
    )
}

/// An int literal (`3`, `-1`).
fn int_lit(e: &IdedExpr) -> Option<i64> {
    match &e.expr {
        Expr::Literal(LiteralValue::Int(i)) => Some(*i.inner()),
        Expr::Call(c) if c.func_name == op::NEGATE && c.target.is_none() => match c.args.as_slice()
        {
            [x] => int_lit(x).and_then(i64::checked_neg),
            _ => None,
        },
        _ => None,
    }
}

/// The length in characters of a string literal.
fn lit_chars(e: &IdedExpr) -> Option<usize> {
    string_lit(e).map(|s| s.chars().count())
}

fn u32_of(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Checker<'_> {
    /// Types a call of a function this module knows (`None` for the others). `target` and
    /// `args` are the checked receiver and arguments of `c` as written (`x.f(a)` or `f(x, a)`).
    pub(super) fn library(
        &mut self,
        c: &CallExpr,
        e: &IdedExpr,
        target: Option<&T>,
        args: &[T],
    ) -> Result<Option<T>, CelIssue> {
        let name = c.func_name.as_str();
        if !functions().any(|f| f == name) {
            return Ok(None);
        }
        let request = target.is_some_and(|t| t.request) || args.iter().any(|a| a.request);
        // Receiver and arguments, for both `x.f(a)` and `f(x, a)`.
        let (recv, rest, recv_expr, rest_expr): (Option<&T>, &[T], Option<&IdedExpr>, &[IdedExpr]) =
            match (target, c.target.as_deref()) {
                (Some(t), Some(te)) => (Some(t), args, Some(te), c.args.as_slice()),
                _ => (
                    args.first(),
                    args.get(1..).unwrap_or_default(),
                    c.args.first(),
                    c.args.get(1..).unwrap_or_default(),
                ),
            };
        let arity = |lo: usize, hi: usize| -> Result<(), CelIssue> {
            let n = rest.len();
            if n < lo || n > hi {
                let takes = match (lo, hi) {
                    (0, 0) => String::from("no arguments"),
                    (l, h) if l == h => format!("{l} argument{}", if l == 1 { "" } else { "s" }),
                    (l, h) => format!("{l} to {h} arguments"),
                };
                return Err(type_err(format!("`{}`: `{name}` takes {takes}", show(e))));
            }
            Ok(())
        };
        let want = |t: Option<&T>, ty: Ty, what: &str| -> Result<(), CelIssue> {
            match t {
                Some(t) if t.ty.known() && t.ty != ty => Err(type_err(format!(
                    "`{}`: `{name}` takes {what}, not {}",
                    show(e),
                    t.ty.name()
                ))),
                _ => Ok(()),
            }
        };
        let t = match name {
            "timestamp" | "duration" => {
                if c.target.is_some() {
                    return Err(type_err(format!(
                        "`{}`: `{name}()` is a function, not a method",
                        show(e)
                    )));
                }
                if args.len() != 1 {
                    return Err(type_err(format!(
                        "`{}`: `{name}` takes one argument",
                        show(e)
                    )));
                }
                let (ty, accepts): (Ty, &[Ty]) = if name == "timestamp" {
                    (Ty::Timestamp, &[Ty::Str, Ty::Int, Ty::Timestamp])
                } else {
                    (Ty::Duration, &[Ty::Str, Ty::Duration])
                };
                if let Some(a) = args
                    .first()
                    .filter(|a| a.ty.known() && !accepts.contains(&a.ty))
                {
                    return Err(type_err(format!(
                        "`{}`: `{name}` takes {}, not {}",
                        show(e),
                        if name == "timestamp" {
                            "a string, an int or a timestamp"
                        } else {
                            "a string or a duration"
                        },
                        a.ty.name()
                    )));
                }
                T::derived(ty, 0, request)
            }
            _ if TIMESTAMP_GETTERS.contains(&name) => {
                let Some(r) = target else {
                    return Err(type_err(format!(
                        "`{}`: `{name}` is a method of timestamps and durations (`t.{name}()`)",
                        show(e)
                    )));
                };
                match r.ty {
                    Ty::Timestamp => {
                        arity(0, 1)?;
                        want(rest.first(), Ty::Str, "a time zone (a string)")?;
                        if let Some(zone) = rest_expr.first().and_then(string_lit) {
                            time_zone(&zone, e)?;
                        }
                    }
                    Ty::Duration => {
                        if !DURATION_GETTERS.contains(&name) {
                            return Err(type_err(format!(
                                "`{}`: a duration has no `{name}` (it has {})",
                                show(e),
                                DURATION_GETTERS.join(", ")
                            )));
                        }
                        arity(0, 0)?;
                    }
                    Ty::Dyn => arity(0, 1)?,
                    other => {
                        return Err(type_err(format!(
                            "`{}`: `{name}` is a method of {}, and `{}` is {}",
                            show(e),
                            if DURATION_GETTERS.contains(&name) {
                                "timestamps and durations"
                            } else {
                                "timestamps"
                            },
                            recv_expr.map(show).unwrap_or_default(),
                            other.name()
                        )))
                    }
                }
                T::derived(Ty::Int, 0, request)
            }
            "indexOf" | "lastIndexOf" => {
                want(recv, Ty::Str, "a string receiver")?;
                arity(1, 2)?;
                want(rest.first(), Ty::Str, "a string to look for")?;
                want(rest.get(1), Ty::Int, "an int offset")?;
                let short =
                    |x: Option<&IdedExpr>| x.and_then(lit_chars).is_some_and(|n| n <= MAX_NEEDLE);
                if !(short(rest_expr.first()) || short(recv_expr)) {
                    return Err(too_complex(
                        e,
                        &format!("compares the text with what it looks for at every position: its time is the product of their lengths unless one is a string literal of at most {MAX_NEEDLE} characters"),
                        "look for a literal (`request.prompt.indexOf('secret')`), or use `contains` / `matches`",
                    ));
                }
                // The search compares the literal at every position: as many passes over the
                // text as the literal has characters (the read itself counted one).
                let chars = rest_expr
                    .first()
                    .and_then(lit_chars)
                    .or_else(|| recv_expr.and_then(lit_chars))
                    .unwrap_or(1);
                if recv.is_some_and(|r| r.size > 0) || rest.first().is_some_and(|r| r.size > 0) {
                    self.pass(
                        u64::try_from(chars.saturating_sub(1)).unwrap_or(u64::MAX),
                        e,
                    )?;
                }
                T::derived(Ty::Int, 0, request)
            }
            "replace" => self.replace(e, recv, rest, rest_expr, request)?,
            "split" => {
                want(recv, Ty::Str, "a string receiver")?;
                arity(1, 2)?;
                want(rest.first(), Ty::Str, "a separator (a string)")?;
                want(rest.get(1), Ty::Int, "a limit (an int)")?;
                let recv = recv.cloned().unwrap_or_else(|| T::of(Ty::Dyn));
                let limit = rest_expr.get(1).and_then(int_lit);
                let overhead = match limit {
                    Some(n) if (0..=MAX_SPLIT_PARTS).contains(&n) => {
                        u64::try_from(n).unwrap_or(0).saturating_mul(PART_BYTES)
                    }
                    _ if !recv.request => recv.lits.saturating_add(1).saturating_mul(PART_BYTES),
                    _ => {
                        return Err(too_complex(
                            e,
                            "splits request text into as many strings as it has separators (or characters): each part costs far more than its text",
                            &format!("give `split` a literal limit of at most {MAX_SPLIT_PARTS} parts: `.split(',', 16)`"),
                        ))
                    }
                };
                let t = T {
                    elem: Ty::Str,
                    lits: recv.lits.saturating_add(overhead),
                    ..T::derived(Ty::List, recv.size, request)
                };
                self.literal_bytes(&t, e)?;
                t
            }
            "join" => {
                match recv {
                    Some(r) if r.ty.known() && r.ty != Ty::List => {
                        return Err(type_err(format!(
                            "`{}`: `join` is a method of lists, not of {}",
                            show(e),
                            r.ty.name()
                        )))
                    }
                    Some(r) if r.ty == Ty::List && r.elem.known() && r.elem != Ty::Str => {
                        return Err(type_err(format!(
                            "`{}`: `join` joins strings, and the list holds {}",
                            show(e),
                            r.elem.name()
                        )))
                    }
                    _ => {}
                }
                arity(0, 1)?;
                want(rest.first(), Ty::Str, "a separator (a string)")?;
                let sep = match rest_expr.first() {
                    None => 0,
                    Some(x) => match string_lit(x) {
                        Some(s) => s.len(),
                        None => {
                            return Err(too_complex(
                                e,
                                "joins with a separator that is not a literal: it is repeated once per element",
                                "write the separator as a string literal (`.join(', ')`)",
                            ))
                        }
                    },
                };
                let list = recv.cloned().unwrap_or_else(|| T::of(Ty::Dyn));
                let sep_bytes = u64::try_from(sep).unwrap_or(u64::MAX);
                let t = match list.count {
                    // A literal list: the separator is literal text, once per element.
                    Some(n) => T {
                        lits: list.lits.saturating_add(
                            u64::try_from(n)
                                .unwrap_or(u64::MAX)
                                .saturating_mul(sep_bytes),
                        ),
                        ..T::derived(Ty::Str, list.size, request)
                    },
                    // A list from the request has at most one element per byte of it (a
                    // `split` of `',,,'` included), so the separators add at most their length
                    // in request sizes.
                    None if list.request => T {
                        lits: list.lits,
                        ..T::derived(Ty::Str, list.size.saturating_add(u32_of(sep)), request)
                    },
                    // A constant list (`'a,b'.split(',')`): at most one element per byte of its
                    // literal text, and one more.
                    None => T {
                        lits: list
                            .lits
                            .saturating_add(list.lits.saturating_add(1).saturating_mul(sep_bytes)),
                        ..T::derived(Ty::Str, list.size, request)
                    },
                };
                self.grow(t.size, e)?;
                self.literal_bytes(&t, e)?;
                t
            }
            "format" => {
                want(recv, Ty::Str, "a string receiver (the template)")?;
                arity(1, 1)?;
                let (Some(list_expr), Some(list)) = (rest_expr.first(), rest.first()) else {
                    return Err(type_err(format!("`{}`: `format` takes a list", show(e))));
                };
                let Expr::List(items) = &list_expr.expr else {
                    return Err(too_complex(
                        e,
                        "formats a list that is not written out: its elements could each be formatted into far more text than they hold",
                        "write the arguments as a list literal: `'%s: %d'.format([request.model, request.max_tokens])`",
                    ));
                };
                if list.wide_items {
                    return Err(too_complex(
                        e,
                        "formats request data that is not text (a list or map from the request): each number in it could print as hundreds of characters, far more than it took in the request",
                        "format scalars and strings (`'%s: %d'.format([request.model, request.max_tokens])`), or test the data itself",
                    ));
                }
                let recv = recv.cloned().unwrap_or_else(|| T::of(Ty::Dyn));
                let count = u64::try_from(items.elements.len()).unwrap_or(u64::MAX);
                let t = T {
                    lits: recv
                        .lits
                        .saturating_add(list.lits.saturating_mul(u64::from(FORMAT_FACTOR)))
                        .saturating_add(count.saturating_mul(MAX_NUMBER_TEXT)),
                    ..T::derived(
                        Ty::Str,
                        recv.size
                            .saturating_add(list.size.saturating_mul(FORMAT_FACTOR)),
                        request,
                    )
                };
                self.grow(t.size, e)?;
                self.literal_bytes(&t, e)?;
                t
            }
            "strings.quote" => {
                if c.target.is_some() || args.len() != 1 {
                    return Err(type_err(format!(
                        "`{}`: `strings.quote` takes one string: `strings.quote(x)`",
                        show(e)
                    )));
                }
                want(args.first(), Ty::Str, "a string")?;
                let x = args.first().cloned().unwrap_or_else(|| T::of(Ty::Dyn));
                // Each character is escaped into at most two.
                let t = T {
                    lits: x.lits.saturating_mul(2).saturating_add(2),
                    ..T::derived(Ty::Str, x.size.saturating_mul(2), request)
                };
                self.grow(t.size, e)?;
                self.literal_bytes(&t, e)?;
                t
            }
            _ => return Ok(None),
        };
        Ok(Some(t))
    }

    /// `x.replace(from, to)` / `x.replace(from, to, n)`: the text grows by a factor the literals
    /// give (`to` no longer than a non-empty `from` does not grow it), or by at most `n` copies
    /// of `to`.
    fn replace(
        &mut self,
        e: &IdedExpr,
        recv: Option<&T>,
        rest: &[T],
        rest_expr: &[IdedExpr],
        request: bool,
    ) -> Result<T, CelIssue> {
        let want_str = |t: Option<&T>, what: &str| match t {
            Some(t) if t.ty.known() && t.ty != Ty::Str => Err(type_err(format!(
                "`{}`: `replace` takes {what}, not {}",
                show(e),
                t.ty.name()
            ))),
            _ => Ok(()),
        };
        want_str(recv, "a string receiver")?;
        if !(2..=3).contains(&rest.len()) {
            return Err(type_err(format!(
                "`{}`: `replace` takes 2 or 3 arguments",
                show(e)
            )));
        }
        want_str(rest.first(), "a string to replace")?;
        want_str(rest.get(1), "a replacement (a string)")?;
        if let Some(n) = rest.get(2).filter(|n| n.ty.known() && n.ty != Ty::Int) {
            return Err(type_err(format!(
                "`{}`: `replace` takes an int limit, not {}",
                show(e),
                n.ty.name()
            )));
        }
        let recv = recv.cloned().unwrap_or_else(|| T::of(Ty::Dyn));
        let from = rest_expr.first().and_then(string_lit);
        let to_lit = rest_expr.get(1).and_then(string_lit);
        let to = rest.get(1).cloned().unwrap_or_else(|| T::of(Ty::Dyn));
        let limit = rest_expr
            .get(2)
            .and_then(int_lit)
            .filter(|n| *n >= 0)
            .and_then(|n| u32::try_from(n).ok());
        let t = match (limit, &to_lit) {
            // At most `n` copies of the replacement.
            (Some(n), _) => T {
                lits: recv.lits.saturating_add(to.lits.saturating_mul(u64::from(n))),
                ..T::derived(
                    Ty::Str,
                    recv.size.saturating_add(to.size.saturating_mul(n)),
                    request,
                )
            },
            (None, Some(to_lit)) => {
                // Every occurrence of a non-empty `from` becomes `to`; an empty (or unknown)
                // `from` matches between every two characters.
                let factor = match from.as_deref() {
                    Some(f) if !f.is_empty() => to_lit.len().div_ceil(f.len()).max(1),
                    _ => to_lit.len().saturating_add(1),
                };
                let factor = u32_of(factor);
                T {
                    lits: recv.lits.saturating_mul(u64::from(factor)),
                    ..T::derived(Ty::Str, recv.size.saturating_mul(factor), request)
                }
            }
            (None, None) if !to.request && !recv.request => T {
                lits: recv.lits.saturating_mul(to.lits.saturating_add(1)),
                ..T::derived(Ty::Str, 0, request)
            },
            (None, None) => {
                return Err(too_complex(
                    e,
                    "replaces with a value that is not a literal: every occurrence could copy it, so the result could be the product of the two sizes",
                    "write the replacement as a string literal, or give a literal limit: `.replace(x, y, 1)`",
                ))
            }
        };
        self.grow(t.size, e)?;
        self.literal_bytes(&t, e)?;
        Ok(t)
    }
}

/// A time zone written as a literal: UTC, a fixed offset (`'+05:30'`) and the `Etc/GMT±N`
/// zones are supported; a name from the IANA database is not, unless the build was given it
/// (`CHRONO_TZ_TIMEZONE_FILTER`: the whole database would not fit the filter); anything else
/// always fails.
fn time_zone(zone: &str, e: &IdedExpr) -> Result<(), CelIssue> {
    // The interpreter's own check, on a timestamp known to be valid.
    let probe = |zone: &str| {
        let lit = |expr| IdedExpr { id: 0, expr };
        let call = lit(Expr::Call(CallExpr {
            func_name: String::from("getHours"),
            target: Some(Box::new(lit(Expr::Call(CallExpr {
                func_name: String::from("timestamp"),
                target: None,
                args: vec![lit(Expr::Literal(LiteralValue::Int(0.into())))],
            })))),
            args: vec![lit(Expr::Literal(LiteralValue::String(
                zone.to_string().into(),
            )))],
        }));
        let ctx = Context::with_env(std::sync::Arc::clone(crate::cel_program::env()));
        Value::resolve(&call, &ctx).err()
    };
    let Some(err) = probe(zone) else {
        return Ok(());
    };
    let text = ShowError(&err).to_string();
    if text.contains("unknown time zone") {
        return Err(issue(
            Code::CelUnsupported,
            format!(
                "`{}`: time zone `'{zone}'` is not in this build (names from the IANA database are left out by default)",
                show(e)
            ),
            Some(String::from(
                "use a fixed offset (`'+01:00'`, `'-05:30'`), `'UTC'` or `'Etc/GMT-1'`; the whole zone database would not fit the Envoy filter (a build can add zones: CHRONO_TZ_TIMEZONE_FILTER, docs/policy-language.md)",
            )),
        ));
    }
    Err(issue(
        Code::CelConstant,
        format!("`{}` always fails: {text}", show(e)),
        Some(String::from(
            "a time zone is `'UTC'`, a fixed offset such as `'+05:30'` or `'-08:00'`, or `'Etc/GMT+5'`",
        )),
    ))
}
