//! CEL at evaluation time: the compiled [`CelProgram`] the `cel` interpreter runs for conditions
//! the native tree cannot express, the environment it runs in ([`env`]), and the CEL activation
//! (the variables a program reads), built from the schema table. Compiling CEL (checks,
//! translation) is `cel_lang`'s; this module knows nothing of it.
//!
//! The interpreter's own `matches()` compiles its regex on every call; a policy's `matches()`
//! calls are rewritten at load to `__llmp_matches`, which looks the regex up in a process-wide
//! table. Each compiled program holds its regexes, the table only weak references: a regex lives
//! exactly as long as a loaded policy uses it, however many patterns there are, and no request
//! ever compiles one.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};

use cel::common::ast::{CallExpr, Expr, IdedExpr};
use cel::common::types::{
    self, CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString,
};
use cel::common::value::CowVal;
use cel::{Context, Env, ExecutionError, Value};
use regex::Regex;

use crate::cel_text::{ShowError, ShowValue};
use crate::context::{FieldValue, ShieldValue, View};
use crate::pattern::build_regex;
use crate::schema::{members, FieldRef};
use crate::truth::{clip, clip_display, CondError, Scratch, Truth};

/// The CEL environment: the standard library, the strings extension and the regex function the
/// interpreter calls for `matches()`.
pub(crate) fn env() -> &'static Arc<Env> {
    static ENV: std::sync::OnceLock<Arc<Env>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Env::stdlib();
        // lowerAscii, upperAscii, trim, indexOf, … are useful on prompts.
        let _ = env.add_extension(cel::extensions::strings);
        register(&mut env);
        Arc::new(env)
    })
}

/// The text of a string literal.
fn string_lit(e: &IdedExpr) -> Option<String> {
    match &e.expr {
        Expr::Literal(cel::common::ast::LiteralValue::String(s)) => Some(s.inner().to_string()),
        _ => None,
    }
}

/// The function `matches()` calls are rewritten to.
const MATCHES: &str = "__llmp_matches";

/// Patterns → the compiled regexes loaded programs hold.
struct Table {
    map: HashMap<String, Weak<Regex>>,
    /// Past this many entries, entries no program holds any more are dropped.
    prune_at: usize,
}

fn table() -> &'static RwLock<Table> {
    static TABLE: std::sync::OnceLock<RwLock<Table>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        RwLock::new(Table {
            map: HashMap::new(),
            prune_at: 1024,
        })
    })
}

/// The compiled regex of a pattern: the one a loaded program holds, or a new one (size-limited,
/// as the checker validated it) that the caller must keep alive.
fn regex(pattern: &str) -> Result<Arc<Regex>, String> {
    if let Ok(t) = table().read() {
        if let Some(re) = t.map.get(pattern).and_then(Weak::upgrade) {
            return Ok(re);
        }
    }
    let re = Arc::new(build_regex(pattern, false)?);
    if let Ok(mut t) = table().write() {
        if t.map.len() >= t.prune_at {
            t.map.retain(|_, w| w.strong_count() > 0);
            t.prune_at = t.map.len().saturating_mul(2).max(1024);
        }
        t.map.insert(pattern.to_string(), Arc::downgrade(&re));
    }
    Ok(re)
}

fn matches_fn<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let text = args.first().and_then(|a| a.downcast_ref::<CelString>());
    let pattern = args.get(1).and_then(|a| a.downcast_ref::<CelString>());
    let (Some(text), Some(pattern)) = (text, pattern) else {
        return Err(ExecutionError::function_error(
            "matches",
            "matches() needs two strings",
        ));
    };
    let re = regex(pattern.inner()).map_err(|m| ExecutionError::function_error("matches", m))?;
    Ok(CowVal::owned(CelBool::from(re.is_match(text.inner()))))
}

/// Adds `__llmp_matches(string, string)` to the environment.
fn register(env: &mut Env) {
    let _ = env.add_overload(
        MATCHES,
        "llmp_matches_string_string",
        vec![types::STRING_TYPE, types::STRING_TYPE],
        matches_fn,
    );
}

/// Rewrites `x.matches('p')` and `matches(x, 'p')` to `__llmp_matches(x, 'p')` and returns
/// their compiled regexes, for the program to hold (the checker has already validated the
/// patterns). Iterative.
fn rewrite_matches(e: &mut IdedExpr) -> Vec<Arc<Regex>> {
    let mut held = Vec::new();
    let mut stack: Vec<&mut IdedExpr> = vec![e];
    while let Some(node) = stack.pop() {
        if let Expr::Call(c) = &mut node.expr {
            if c.func_name == "matches" {
                let pattern = if c.target.is_some() {
                    c.args.first()
                } else {
                    c.args.get(1)
                };
                if let Some(p) = pattern.and_then(string_lit) {
                    if let Ok(re) = regex(&p) {
                        held.push(re);
                    }
                    if let Some(t) = c.target.take() {
                        c.args.insert(0, *t);
                    }
                    c.func_name = MATCHES.to_string();
                }
            }
        }
        match &mut node.expr {
            Expr::Call(CallExpr { target, args, .. }) => {
                stack.extend(target.iter_mut().map(|t| &mut **t));
                stack.extend(args.iter_mut());
            }
            Expr::Comprehension(c) => {
                let c = &mut **c;
                stack.extend([
                    &mut c.iter_range,
                    &mut c.accu_init,
                    &mut c.loop_cond,
                    &mut c.loop_step,
                    &mut c.result,
                ]);
            }
            Expr::List(l) => stack.extend(l.elements.iter_mut()),
            Expr::Map(m) => {
                for entry in &mut m.entries {
                    match &mut entry.expr {
                        cel::common::ast::EntryExpr::MapEntry(me) => {
                            stack.push(&mut me.key);
                            stack.push(&mut me.value);
                        }
                        cel::common::ast::EntryExpr::StructField(sf) => stack.push(&mut sf.value),
                    }
                }
            }
            Expr::Select(s) => stack.push(&mut s.operand),
            _ => {}
        }
    }
    held
}

/// A CEL expression kept for the interpreter.
#[derive(Debug)]
pub(crate) struct CelProgram {
    expr: IdedExpr,
    reads: Vec<FieldRef>,
    /// The fields it reads that may be null or absent (named when the program fails).
    nullable: Vec<FieldRef>,
    /// The regexes of its `matches()` calls, kept alive while the program is.
    _regexes: Vec<Arc<Regex>>,
}

impl CelProgram {
    pub(crate) fn new(
        mut expr: IdedExpr,
        reads: Vec<FieldRef>,
        nullable: Vec<FieldRef>,
    ) -> CelProgram {
        let regexes = rewrite_matches(&mut expr);
        CelProgram {
            expr,
            reads,
            nullable,
            _regexes: regexes,
        }
    }

    pub(crate) fn reads(&self) -> &[FieldRef] {
        &self.reads
    }

    pub(crate) fn eval<'a>(&self, v: View<'a>, scratch: &mut Scratch<'a>) -> Truth {
        let reads = scratch.cel_reads;
        let activation = scratch
            .cel
            .get_or_insert_with(|| activation(v, Some(reads)));
        match Value::resolve(&self.expr, activation) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(CondError(clip(format!(
                "the condition is {}, not a bool",
                ShowValue(&other)
            )))),
            Err(e) => {
                let mut msg = clip_display(&ShowError(&e));
                let missing: Vec<String> = self
                    .nullable
                    .iter()
                    .filter(|f| matches!(v.get(f), FieldValue::Null | FieldValue::Missing))
                    .map(|f| format!("`{}`", f.path()))
                    .collect();
                if !missing.is_empty() {
                    msg.push_str(&format!(
                        " (null or absent in this request: {})",
                        missing.join(", ")
                    ));
                }
                Err(CondError(clip(msg)))
            }
        }
    }
}

/// A CEL value borrowing from the request context.
type Val<'a> = Box<dyn cel::common::value::Val + 'a>;

fn s(v: &str) -> Val<'_> {
    Box::new(CelString::from(v))
}

fn map<'a>(entries: impl IntoIterator<Item = (&'a str, Val<'a>)>) -> Val<'a> {
    let m: HashMap<CelMapKey<'a>, Val<'a>> = entries
        .into_iter()
        .map(|(k, v)| (CelMapKey::from(k), v))
        .collect();
    Box::new(CelMap::from(m))
}

fn list<'a>(items: impl IntoIterator<Item = Val<'a>>) -> Val<'a> {
    Box::new(CelList::from(items.into_iter().collect::<Vec<_>>()))
}

/// A field value as CEL sees it; `None` for a missing key (left out of its map).
fn val(v: FieldValue<'_>) -> Option<Val<'_>> {
    Some(match v {
        FieldValue::Missing => return None,
        FieldValue::Null => Box::new(CelNull),
        FieldValue::Bool(b) => Box::new(CelBool::from(b)),
        FieldValue::Int(i) => Box::new(CelInt::from(i)),
        FieldValue::Float(f) => Box::new(CelDouble::from(f)),
        FieldValue::Str(x) => s(x),
        FieldValue::StrList(l) => list(l.iter().map(|x| s(x))),
        FieldValue::StrMap(m) => map(m.iter().map(|(k, x)| (k.as_str(), s(x)))),
        FieldValue::Messages(ms) => list(
            ms.iter()
                .map(|m| map([("role", s(&m.role)), ("content", s(&m.content))])),
        ),
        FieldValue::Principal(p) => map(p.iter().map(|(a, x)| {
            let v: Val<'_> = match x {
                Some(x) => s(x),
                None => Box::new(CelNull),
            };
            (a.as_str(), v)
        })),
        FieldValue::Shield(sh) => map(sh.iter().map(|(n, x)| {
            let v: Val<'_> = match x {
                ShieldValue::Number(f) => Box::new(CelDouble::from(*f)),
                ShieldValue::Text(t) => s(t),
            };
            (n.as_str(), v)
        })),
    })
}

/// The fixed fields of a root variable with their member names, from the schema table (built
/// once: the activation is built per request).
fn members_of(root: &'static str) -> &'static [(&'static str, FieldRef)] {
    type Table = Vec<(&'static str, FieldRef)>;
    static REQUEST: std::sync::OnceLock<Table> = std::sync::OnceLock::new();
    static TIME: std::sync::OnceLock<Table> = std::sync::OnceLock::new();
    static RESPONSE: std::sync::OnceLock<Table> = std::sync::OnceLock::new();
    let cell = match root {
        "time" => &TIME,
        "response" => &RESPONSE,
        _ => &REQUEST,
    };
    cell.get_or_init(|| {
        members(root)
            .filter_map(|(m, f)| Some((m, f.field.clone()?)))
            .collect()
    })
}

/// The CEL variables for one evaluation: `request`, `response`, `principal`, `shield`, `time`, borrowing
/// every string from the context (no copies), built from the schema table. Only the `request`
/// and `response` fields in `reads` are built (all of them with `None`): the interpreted
/// programs of a namespace never read others.
pub(crate) fn activation<'a>(v: View<'a>, reads: Option<&[FieldRef]>) -> Context<'a, 'a> {
    let want = |f: &FieldRef| {
        reads.is_none_or(|rs| {
            rs.contains(f)
                || (*f == FieldRef::Headers && rs.iter().any(|x| matches!(x, FieldRef::Header(_))))
        })
    };
    let root = |fields: &'static [(&'static str, FieldRef)], all: bool| {
        map(fields.iter().filter_map(move |(member, field)| {
            if !all && !want(field) {
                return None;
            }
            Some((*member, val(v.get(field))?))
        }))
    };
    let mut c = Context::with_env(Arc::clone(env()));
    c.add_variable_as_val("request", root(members_of("request"), false));
    c.add_variable_as_val("response", root(members_of("response"), false));
    c.add_variable_as_val("time", root(members_of("time"), true));
    for (name, field) in [
        ("principal", FieldRef::PrincipalAll),
        ("shield", FieldRef::ShieldAll),
    ] {
        if let Some(x) = val(v.get(&field)) {
            c.add_variable_as_val(name, x);
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_hold_their_regexes_and_the_table_forgets_the_rest() {
        let pattern = "^held-[0-9]+$";
        let mut e = cel::parser::PrattParser::new()
            .parse(&format!("request.prompt.matches('{pattern}')"))
            .unwrap();
        let held = rewrite_matches(&mut e);
        assert_eq!(held.len(), 1);
        let live = |p: &str| {
            table()
                .read()
                .unwrap()
                .map
                .get(p)
                .is_some_and(|w| w.strong_count() > 0)
        };
        assert!(live(pattern));
        // Thousands of other patterns come and go: the held one stays, the table stays small.
        for i in 0..5000 {
            let _ = regex(&format!("^gone-{i}$")).unwrap();
        }
        assert!(live(pattern));
        assert!(table().read().unwrap().map.len() < 3000);
        drop(held);
        assert!(!live(pattern));
    }
}
