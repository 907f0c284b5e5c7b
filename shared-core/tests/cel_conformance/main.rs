//! CEL measured against the official conformance suite: the simple tests of google/cel-spec
//! (`tests/simple/testdata`, vendored in `tests/cel-spec/` with their licence and provenance),
//! each expression run as a policy condition, through exactly what a condition goes through:
//! loaded with `PolicySet::compile` (the checks the CLI and the server run), evaluated through
//! `PolicySet::evaluate` (the native tree or the interpreter).
//!
//! A test expecting a value `v` becomes the condition a user would write: `EXPR` for `true`,
//! `!(EXPR)` for `false`, `(EXPR) == v` otherwise, plus `&& type(EXPR) == T` when `v` is a number
//! (CEL's `==` compares numbers across `int`, `uint` and `double`, so `1u == 1` alone would pass
//! an `int` test; inside an expected list or map, numbers still compare across kinds, as CEL's
//! `==` does), and `type(EXPR) == double && (EXPR) != (EXPR)` for NaN (only NaN differs from
//! itself; a NaN inside an expected list or map has no literal: not applicable). Parentheses
//! around the whole expression are dropped before it is wrapped, so the condition nests no
//! deeper than the test (`parse.textproto` tests the 32-level limit). A test expecting an
//! error becomes `type(EXPR) == type`, true for every value: the rule must report an error, or
//! the policy must be refused at load with a code that means the expression always fails
//! ([`CAUGHT_AT_LOAD`]).
//!
//! Each test is then one of: pass; wrong (a value other than the expected one, a runtime error
//! instead of a value, a value instead of an error); refused at load (with its code); not
//! applicable (it needs what a policy condition cannot have: variable bindings or declarations,
//! a protobuf container, message types, type-check-only or unknown results).
//!
//! `cargo test -p llm-policy-core --test cel_conformance -- --nocapture` prints the per-file
//! table; `CEL_CONFORMANCE_VERBOSE=1` also lists every test that does not pass, with why, and
//! `CEL_CONFORMANCE_MESSAGES=1` every load and runtime error message.
//!
//! The expressions read no request field, so they run in the interpreter (after the load-time
//! checks, which evaluate constant sub-expressions once); the native translation is held to the
//! interpreter by the differential property test in `cel_lang/tests.rs`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

mod textproto;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use llm_policy_core::decision::Verdict;
use llm_policy_core::source::parse_str;
use llm_policy_core::{
    ContextConfig, EvalOptions, LocalOnly, PolicySet, RequestContext, RequestInput, Severity,
};
use textproto::{Msg, Value as Tp};

/// The vendored files, with the fewest tests each must pass (a regression fails the test).
const FILES: &[(&str, usize)] = &[
    ("basic", 35),
    ("comparisons", 324),
    ("conversions", 109),
    ("fields", 48),
    ("fp_math", 30),
    ("integer_math", 64),
    ("lists", 39),
    ("logic", 26),
    ("macros", 44),
    ("macros2", 0),
    ("optionals", 52),
    ("parse", 175),
    ("plumbing", 4),
    ("string", 51),
    ("string_ext", 206),
    ("timestamps", 72),
];

/// Load-time codes that mean "this expression always fails": a test expecting an evaluation
/// error passes when the policy is refused with one of them. (`unknown-field` and
/// `cel-unknown-function` are not among them: a name the engine does not know is not the error
/// a test expects.)
const CAUGHT_AT_LOAD: &[&str] = &["cel-constant", "cel-type", "cel-regex"];

/// An expected value (`cel.expr.Value`), as far as a CEL literal can write it.
#[derive(Debug, Clone)]
enum V {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Double(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<V>),
    Map(Vec<(V, V)>),
    Type(String),
    Duration(i64, i64),
}

/// What a test expects.
enum Expect {
    Value(V),
    Error,
    /// Not applicable, and why.
    NotApplicable(String),
}

struct Case {
    section: String,
    name: String,
    expr: String,
    expect: Expect,
}

enum Outcome {
    Pass,
    /// An expected error, found at load with this code.
    /// An expected error, found at load with this message.
    PassAtLoad(String),
    /// An expected error, found at evaluation with this message.
    PassWithError(String),
    Wrong(String),
    Refused(String, String),
    NotApplicable(String),
}

fn word<'a>(m: &'a Msg, name: &str) -> Option<&'a str> {
    match m.get(name) {
        Some(Tp::Word(w)) => Some(w),
        _ => None,
    }
}

fn parse_double(w: &str) -> Option<f64> {
    match w.to_ascii_lowercase().as_str() {
        "inf" | "infinity" => Some(f64::INFINITY),
        "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
        "nan" => Some(f64::NAN),
        other => other.trim_end_matches('f').parse().ok(),
    }
}

/// A `cel.expr.Value` message as a [`V`], or why a literal cannot express it.
fn value(m: &Msg) -> Result<V, String> {
    let Some((kind, v)) = m.0.first() else {
        return Err("an empty expected value".into());
    };
    let w = || match v {
        Tp::Word(w) => Ok(w.as_str()),
        _ => Err(format!("`{kind}` is not a scalar")),
    };
    let bytes = || match v {
        Tp::Str(b) => Ok(b.clone()),
        _ => Err(format!("`{kind}` is not a string")),
    };
    let sub = || match v {
        Tp::Msg(m) => Ok(m),
        _ => Err(format!("`{kind}` is not a message")),
    };
    Ok(match kind.as_str() {
        "null_value" => V::Null,
        "bool_value" => V::Bool(w()? == "true"),
        "int64_value" => V::Int(w()?.parse().map_err(|e| format!("int64_value: {e}"))?),
        "uint64_value" => V::Uint(w()?.parse().map_err(|e| format!("uint64_value: {e}"))?),
        "double_value" => V::Double(parse_double(w()?).ok_or("a bad double_value")?),
        "string_value" => V::Str(String::from_utf8(bytes()?).map_err(|e| e.to_string())?),
        "bytes_value" => V::Bytes(bytes()?),
        "type_value" => V::Type(String::from_utf8_lossy(&bytes()?).into_owned()),
        "list_value" => V::List(
            sub()?
                .all("values")
                .map(|x| match x {
                    Tp::Msg(x) => value(x),
                    _ => Err("a list value that is not a message".into()),
                })
                .collect::<Result<_, _>>()?,
        ),
        "map_value" => V::Map(
            sub()?
                .all("entries")
                .map(|e| match e {
                    Tp::Msg(e) => Ok((
                        value(e.msg("key").ok_or("a map entry without a key")?)?,
                        value(e.msg("value").ok_or("a map entry without a value")?)?,
                    )),
                    _ => Err("a map entry that is not a message".into()),
                })
                .collect::<Result<_, String>>()?,
        ),
        "object_value" => {
            let any = sub()?;
            match any.0.first() {
                Some((t, Tp::Msg(d))) if t == "[type.googleapis.com/google.protobuf.Duration]" => {
                    let n = |f: &str| word(d, f).map_or(Ok(0), str::parse::<i64>);
                    V::Duration(
                        n("seconds").map_err(|e| e.to_string())?,
                        n("nanos").map_err(|e| e.to_string())?,
                    )
                }
                Some((t, _)) => return Err(format!("expects a protobuf message ({t})")),
                None => return Err("an empty object_value".into()),
            }
        }
        "enum_value" => return Err("expects a protobuf enum".into()),
        other => return Err(format!("expects a `{other}`")),
    })
}

fn case(section: &str, t: &Msg) -> Case {
    let name = t.text("name").unwrap_or_default();
    let expr = t.text("expr").unwrap_or_default();
    let na = |why: &str| Expect::NotApplicable(why.to_string());
    let expect = if t.get("bindings").is_some() {
        na("binds variables")
    } else if t.get("type_env").is_some() {
        na("declares variables or functions")
    } else if t.text("container").is_some_and(|c| !c.is_empty()) {
        na("resolves names in a protobuf package")
    } else if t.flag("check_only") || t.get("typed_result").is_some() {
        na("checks types only")
    } else if t.get("unknown").is_some() || t.get("any_unknowns").is_some() {
        na("expects unknowns")
    } else if t.flag("disable_macros") {
        na("disables macros")
    } else if builds_message(&expr) {
        na("builds a protobuf message")
    } else if t.get("eval_error").is_some() || t.get("any_eval_errors").is_some() {
        Expect::Error
    } else {
        match t.msg("value") {
            None if t.get("value").is_none() => Expect::Value(V::Bool(true)),
            None => na("a malformed expected value"),
            Some(v) => match value(v) {
                Ok(v) => Expect::Value(v),
                Err(why) => Expect::NotApplicable(why),
            },
        }
    };
    Case {
        section: section.to_string(),
        name,
        expr,
        expect,
    }
}

/// Whether the expression constructs a protobuf message (`TestAllTypes{...}`,
/// `google.protobuf.Int32Value{...}`), which needs message types a policy does not have.
fn builds_message(expr: &str) -> bool {
    use cel::common::ast::Expr;
    let Ok(e) = cel::parser::PrattParser::new()
        .enable_optional_syntax(true)
        .parse(expr)
    else {
        return false;
    };
    let mut stack = vec![&e];
    while let Some(x) = stack.pop() {
        match &x.expr {
            Expr::Struct(_) => return true,
            Expr::Call(c) => {
                stack.extend(c.target.iter().map(|t| &**t));
                stack.extend(c.args.iter());
            }
            Expr::Comprehension(c) => stack.extend([
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ]),
            Expr::List(l) => stack.extend(l.elements.iter()),
            Expr::Map(m) => {
                for entry in &m.entries {
                    match &entry.expr {
                        cel::common::ast::EntryExpr::MapEntry(me) => {
                            stack.push(&me.key);
                            stack.push(&me.value);
                        }
                        cel::common::ast::EntryExpr::StructField(sf) => stack.push(&sf.value),
                    }
                }
            }
            Expr::Select(s) => stack.push(&s.operand),
            Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
        }
    }
    false
}

/// A CEL string literal.
fn str_lit(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A CEL literal for a value (`None` for what has none: NaN inside a list or map).
fn lit(v: &V) -> Option<String> {
    Some(match v {
        V::Null => "null".into(),
        V::Bool(b) => b.to_string(),
        V::Int(i64::MIN) => "-9223372036854775808".into(),
        V::Int(i) => i.to_string(),
        V::Uint(u) => format!("{u}u"),
        V::Double(d) if d.is_nan() => return None,
        V::Double(d) if d.is_infinite() => {
            format!("double('{}')", if *d > 0.0 { "inf" } else { "-inf" })
        }
        V::Double(d) => format!("{d:?}"),
        V::Str(s) => str_lit(s),
        V::Bytes(b) => {
            let mut out = String::from("b\"");
            for &x in b {
                if x.is_ascii_graphic() && x != b'\\' && x != b'"' || x == b' ' {
                    out.push(char::from(x));
                } else {
                    let _ = write!(out, "\\x{x:02x}");
                }
            }
            out.push('"');
            out
        }
        V::List(xs) => format!(
            "[{}]",
            xs.iter().map(lit).collect::<Option<Vec<_>>>()?.join(", ")
        ),
        V::Map(es) => format!(
            "{{{}}}",
            es.iter()
                .map(|(k, v)| Some(format!("{}: {}", lit(k)?, lit(v)?)))
                .collect::<Option<Vec<_>>>()?
                .join(", ")
        ),
        V::Type(t) => t.clone(),
        V::Duration(s, n) => {
            let total = i128::from(*s) * 1_000_000_000 + i128::from(*n);
            format!("duration('{total}ns')")
        }
    })
}

/// The expression without parentheses around all of it (`((7))` is `(7)`), so that wrapping it
/// again does not nest it deeper than the test does.
fn unwrapped(expr: &str) -> &str {
    use cel::parser::pratt_parser::{Lexer, TokenKind as K};
    let mut lexer = Lexer::new(expr);
    let mut tokens = Vec::new();
    loop {
        let t = lexer.lex();
        match t.kind {
            K::TokEnd | K::TokError => break,
            K::TokWhitespace | K::TokComment => {}
            _ => tokens.push(t),
        }
    }
    let (Some(first), Some(last)) = (tokens.first(), tokens.last()) else {
        return expr;
    };
    if first.kind != K::TokLeftParen || last.kind != K::TokRightParen {
        return expr;
    }
    // The first `(` must close at the last token.
    let mut depth = 0usize;
    for (i, t) in tokens.iter().enumerate() {
        match t.kind {
            K::TokLeftParen => depth += 1,
            K::TokRightParen => {
                depth -= 1;
                if depth == 0 && i + 1 < tokens.len() {
                    return expr;
                }
            }
            _ => {}
        }
    }
    expr.get(first.end..last.start).unwrap_or(expr)
}

/// The policy condition for a test, or why there is none.
fn condition(expr: &str, expect: &V) -> Result<String, String> {
    let expr = unwrapped(expr);
    Ok(match expect {
        V::Bool(true) => expr.to_string(),
        V::Bool(false) => format!("!({expr})"),
        V::Double(d) if d.is_nan() => format!("type({expr}) == double && ({expr}) != ({expr})"),
        V::Int(_) | V::Uint(_) | V::Double(_) => {
            let ty = match expect {
                V::Int(_) => "int",
                V::Uint(_) => "uint",
                _ => "double",
            };
            let l = lit(expect).ok_or("no literal")?;
            format!("({expr}) == {l} && type({expr}) == {ty}")
        }
        other => {
            let l = lit(other).ok_or_else(|| "expects NaN inside a list or map".to_string())?;
            format!("({expr}) == {l}")
        }
    })
}

fn context() -> RequestContext {
    let headers: Vec<(String, String)> = vec![("x-user-tier".into(), "free".into())];
    let input = RequestInput {
        method: "post",
        path: "/v1/chat/completions",
        headers: &headers,
        body: br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
        now_unix: 1_795_516_288,
    };
    RequestContext::from_request(&input, &ContextConfig::default()).expect("valid request")
}

/// Loads `cond` as a one-rule policy and evaluates it: `Ok(matched)`, `Err(Ok(error))` for a
/// runtime error, `Err(Err((code, message)))` when the policy is refused.
#[allow(
    clippy::type_complexity,
    reason = "a local helper: three outcomes, spelled out"
)]
fn run(cond: &str, ctx: &RequestContext) -> Result<bool, Result<String, (String, String)>> {
    let doc = serde_json::json!({
        "apiVersion": "llm-policy/v1",
        "kind": "Policy",
        "metadata": { "name": "conformance" },
        "spec": {
            "defaultDecision": "allow",
            "rules": [{
                "id": "test",
                "onError": "skip",
                "when": { "cel": cond },
                "action": { "decision": "deny", "reason": "matched" }
            }]
        }
    });
    let docs = parse_str("conformance.json", &doc.to_string())
        .map_err(|d| Err((d.code.as_str().to_string(), d.message.clone())))?;
    let set = match PolicySet::compile(&docs, &ContextConfig::default()) {
        Ok(out) => out.set,
        Err(ds) => {
            let d =
                ds.0.iter()
                    .find(|d| d.severity == Severity::Error)
                    .expect("a refusal has an error");
            return Err(Err((d.code.as_str().to_string(), d.message.clone())));
        }
    };
    let d = set.evaluate(ctx, &EvalOptions::default(), &mut LocalOnly);
    if let Some(e) = d.metadata.errors.first() {
        return Err(Ok(e.message.clone()));
    }
    Ok(d.decision == Verdict::Deny)
}

fn outcome(c: &Case, ctx: &RequestContext) -> (Outcome, String) {
    let (cond, want) = match &c.expect {
        Expect::NotApplicable(why) => return (Outcome::NotApplicable(why.clone()), String::new()),
        Expect::Error => (format!("type({}) == type", unwrapped(&c.expr)), None),
        Expect::Value(v) => match condition(&c.expr, v) {
            Ok(cond) => (cond, Some(v)),
            Err(why) => return (Outcome::NotApplicable(why), String::new()),
        },
    };
    let o = match (run(&cond, ctx), want) {
        (Ok(true), Some(_)) => Outcome::Pass,
        (Err(Ok(e)), None) => Outcome::PassWithError(e),
        (Ok(false), Some(v)) => Outcome::Wrong(format!("the value is not {}", show(v))),
        (Ok(_), None) => Outcome::Wrong("a value, where an error was expected".into()),
        (Err(Ok(e)), Some(_)) => Outcome::Wrong(format!("runtime error: {e}")),
        (Err(Err((code, msg))), None) if CAUGHT_AT_LOAD.contains(&code.as_str()) => {
            Outcome::PassAtLoad(msg)
        }
        (Err(Err((code, msg))), _) => Outcome::Refused(code, msg),
    };
    (o, cond)
}

fn show(v: &V) -> String {
    lit(v).unwrap_or_else(|| "NaN".into())
}

#[derive(Default)]
struct Tally {
    tests: usize,
    pass: usize,
    at_load: usize,
    wrong: usize,
    refused: BTreeMap<String, usize>,
    na: usize,
}

/// One line of the table: `decimals` digits of the pass rate.
fn row(table: &mut String, name: &str, t: &Tally, decimals: usize) {
    let run = t.tests - t.na;
    let refused = t
        .refused
        .iter()
        .map(|(code, n)| format!("`{code}` {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        table,
        "| {name} | {} | {} | {run} | {} ({:.decimals$}%) | {} | {} | {} |",
        t.tests,
        t.na,
        t.pass,
        percent(t.pass, run),
        t.at_load,
        t.wrong,
        if refused.is_empty() {
            "—".into()
        } else {
            refused
        }
    );
}

fn cases_of(file: &str) -> Vec<Case> {
    let path = format!(
        "{}/tests/cel-spec/{file}.textproto",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).expect("vendored file");
    let m = textproto::parse(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut out = Vec::new();
    for s in m.all("section") {
        let Tp::Msg(s) = s else { continue };
        let section = s.text("name").unwrap_or_default();
        for t in s.all("test") {
            if let Tp::Msg(t) = t {
                out.push(case(&section, t));
            }
        }
    }
    out
}

#[test]
fn cel_spec_simple_tests() {
    let verbose = std::env::var_os("CEL_CONFORMANCE_VERBOSE").is_some();
    let ctx = context();
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| file | tests | n/a | run | pass | of which errors found at load | wrong | refused at load |\n|---|--:|--:|--:|--:|--:|--:|---|"
    );
    let mut wrong = Vec::new();
    let mut below = Vec::new();
    let mut total = Tally::default();
    let mut na_reasons: BTreeMap<String, usize> = BTreeMap::new();
    // Every load error and runtime error message, checked for Rust debug text.
    let mut messages: Vec<(String, String)> = Vec::new();
    for &(file, floor) in FILES {
        let mut t = Tally::default();
        for c in cases_of(file) {
            t.tests += 1;
            let (o, cond) = outcome(&c, &ctx);
            let id = format!("{file}/{}/{}", c.section, c.name);
            match &o {
                Outcome::Pass | Outcome::PassWithError(_) => t.pass += 1,
                Outcome::PassAtLoad(_) => {
                    t.pass += 1;
                    t.at_load += 1;
                }
                Outcome::Wrong(why) => {
                    t.wrong += 1;
                    wrong.push(format!("{id}: `{}`: {why} (condition `{cond}`)", c.expr));
                }
                Outcome::Refused(code, _) => *t.refused.entry(code.clone()).or_default() += 1,
                Outcome::NotApplicable(_) => t.na += 1,
            }
            let detail = match &o {
                Outcome::Pass => None,
                Outcome::PassAtLoad(msg) | Outcome::PassWithError(msg) => {
                    messages.push((id.clone(), msg.clone()));
                    None
                }
                Outcome::Wrong(why) => Some(format!("WRONG: {why}")),
                Outcome::Refused(code, msg) => {
                    messages.push((id.clone(), msg.clone()));
                    Some(format!("refused, {code}: {msg}"))
                }
                Outcome::NotApplicable(why) => {
                    *na_reasons.entry(why.clone()).or_default() += 1;
                    Some(format!("n/a: {why}"))
                }
            };
            if let (true, Some(d)) = (verbose, detail) {
                println!("{id}: `{}` -> {d}", c.expr);
            }
        }
        if t.pass < floor {
            below.push(format!("{file}: {} pass, the floor is {floor}", t.pass));
        }
        row(&mut table, file, &t, 0);
        total.tests += t.tests;
        total.na += t.na;
        total.pass += t.pass;
        total.at_load += t.at_load;
        total.wrong += t.wrong;
        for (code, n) in t.refused {
            *total.refused.entry(code).or_default() += n;
        }
    }
    row(&mut table, "**all**", &total, 1);
    println!("{table}");
    let na: Vec<String> = na_reasons
        .iter()
        .map(|(why, n)| format!("{why} ({n})"))
        .collect();
    println!("not applicable: {}", na.join("; "));
    assert!(
        wrong.is_empty(),
        "{} wrong answers:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(below.is_empty(), "below the floor:\n{}", below.join("\n"));
    if std::env::var_os("CEL_CONFORMANCE_MESSAGES").is_some() {
        for (id, m) in &messages {
            println!("{id}: {m}");
        }
    }
    let debug: Vec<String> = messages
        .iter()
        .filter(|(_, m)| rust_debug_text(m))
        .map(|(id, m)| format!("{id}: {m}"))
        .collect();
    assert!(
        debug.is_empty(),
        "{} messages with Rust debug text:\n{}",
        debug.len(),
        debug.join("\n")
    );
}

/// Whether a message shows a value the way Rust's `Debug` does (`UInt(256)`, `Bytes([1, 2])`,
/// `TimeDelta { secs: 1, nanos: 0 }`) rather than the way CEL writes it.
fn rust_debug_text(m: &str) -> bool {
    const NAMES: &[&str] = &[
        "Int(",
        "UInt(",
        "Float(",
        "String(",
        "Bytes(",
        "Bool(",
        "List(",
        "Map(",
        "Duration(",
        "Timestamp(",
        "TimeDelta",
        "Null",
        "Key::",
        "Function(",
        "Opaque<",
        "Some(",
        "Arc(",
        "CelString",
        "CelInt",
        "CelUInt",
        "CelDouble",
        "CelBytes",
    ];
    NAMES.iter().any(|n| {
        m.match_indices(n).any(|(i, _)| {
            // A name inside a word (`isNull(`, `toString(`) is not a value.
            !m[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        })
    })
}

#[allow(
    clippy::cast_precision_loss,
    reason = "a percentage of a few hundred tests"
)]
fn percent(n: usize, of: usize) -> f64 {
    if of == 0 {
        return 100.0;
    }
    n as f64 * 100.0 / of as f64
}
