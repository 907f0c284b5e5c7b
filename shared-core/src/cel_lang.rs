//! CEL conditions (feature `cel`): parsing with a nesting guard, load-time checks of every
//! variable and field reference against the context schema, translation of the common subset
//! (comparisons, `in`, `&&`, `||`, `!`, `has()`, `contains` / `startsWith` / `endsWith` /
//! `matches` with literal arguments) into the native condition tree, and the `cel` interpreter
//! for everything else.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cel::common::ast::{operators, CallExpr, ComprehensionExpr, Expr, LiteralValue, SelectExpr};
use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString,
};
use cel::{Context, Env, ExecutionError, IdedExpr, Program, Value};

use crate::condition::{Cond, CondError, Leaf, Lit, OrdOp, Scratch, Test, Truth};
use crate::context::{RequestContext, ShieldValue};
use crate::schema::{ElemField, FieldRef, FieldType, ROOTS};

/// Longest accepted expression, in bytes.
pub(crate) const MAX_EXPR_LEN: usize = 16 * 1024;
/// Deepest accepted bracket nesting (cel-rust #212: the parser's stack overflows on deep nesting).
pub(crate) const MAX_NESTING: usize = 32;

/// A CEL expression kept for the interpreter.
#[derive(Debug)]
pub(crate) struct CelProgram {
    program: Program,
    reads: Vec<FieldRef>,
}

/// A compile error in a CEL expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CelError {
    pub code: &'static str,
    pub message: String,
    pub help: Option<String>,
}

/// A compiled CEL condition.
pub(crate) struct CelCompiled {
    /// The condition: native tree when translatable, else the interpreter.
    pub cond: Cond,
    /// For interpreted programs: the translatable top-level `&&` conjuncts, for indexing.
    pub index_hint: Option<Cond>,
    /// Whether the whole expression was translated.
    #[cfg_attr(not(test), allow(dead_code))]
    pub native: bool,
}

fn env() -> &'static Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Env::stdlib();
        // lowerAscii, upperAscii, trim, replace, split, indexOf, … are useful on prompts.
        let _ = env.add_extension(cel::extensions::strings);
        Arc::new(env)
    })
}

fn cel_err(code: &'static str, message: String, help: Option<String>) -> CelError {
    CelError {
        code,
        message,
        help,
    }
}

/// Rejects expressions too long or too deeply nested for the parser.
fn guard(src: &str) -> Result<(), CelError> {
    if src.len() > MAX_EXPR_LEN {
        return Err(cel_err(
            "cel-too-large",
            format!(
                "expression is {} bytes, over the limit of {MAX_EXPR_LEN}",
                src.len()
            ),
            None,
        ));
    }
    let (mut depth, mut max, mut unary) = (0usize, 0usize, 0usize);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in src.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => quote = Some(c),
            '(' | '[' | '{' => {
                depth += 1;
                max = max.max(depth);
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if c == '!' || c == '-' {
            unary += 1;
        } else if !c.is_whitespace() {
            unary = 0;
        }
        if max > MAX_NESTING || unary > MAX_NESTING {
            return Err(cel_err(
                "cel-too-deep",
                format!("expression nests deeper than {MAX_NESTING} levels"),
                Some(String::from(
                    "split the condition into several rules or use the match DSL",
                )),
            ));
        }
    }
    Ok(())
}

/// Compiles one CEL condition.
pub(crate) fn compile(src: &str, attrs: &[String]) -> Result<CelCompiled, CelError> {
    guard(src)?;
    let program = env().compile(src).map_err(|e| {
        cel_err(
            "cel-syntax",
            format!("CEL syntax error: {}", e.to_string().trim()),
            None,
        )
    })?;
    let mut reads = Vec::new();
    check_refs(program.expression(), attrs, &mut Vec::new(), &mut reads)?;
    reads.sort();
    reads.dedup();
    // Catch misspelt functions now rather than on every request.
    if let Err(ExecutionError::UndeclaredReference(name)) =
        program.execute(&activation(&sample(attrs), None))
    {
        if !ROOTS.contains(&name.as_str()) {
            return Err(cel_err(
                "cel-unknown-function",
                format!("unknown function or variable `{name}`"),
                None,
            ));
        }
    }
    let sc = Scope { attrs, elem: None };
    if let Some(cond) = translate(program.expression(), &sc) {
        return Ok(CelCompiled {
            cond,
            index_hint: None,
            native: true,
        });
    }
    let mut conjuncts = Vec::new();
    flatten_and(program.expression(), &mut conjuncts);
    let hints: Vec<Cond> = conjuncts
        .into_iter()
        .filter_map(|c| translate(c, &sc))
        .collect();
    let index_hint = (!hints.is_empty()).then_some(Cond::All(hints));
    Ok(CelCompiled {
        cond: Cond::Cel(Arc::new(CelProgram { program, reads })),
        index_hint,
        native: false,
    })
}

fn sample(attrs: &[String]) -> RequestContext {
    RequestContext {
        principal: attrs.iter().map(|a| (a.clone(), None)).collect(),
        ..RequestContext::default()
    }
}

fn flatten_and<'a>(e: &'a IdedExpr, out: &mut Vec<&'a IdedExpr>) {
    match &e.expr {
        Expr::Call(c) if c.func_name == operators::LOGICAL_AND && c.target.is_none() => {
            c.args.iter().for_each(|a| flatten_and(a, out));
        }
        _ => out.push(e),
    }
}

/// Checks every variable and field reference; collects the fields the expression reads.
fn check_refs(
    e: &IdedExpr,
    attrs: &[String],
    bound: &mut Vec<String>,
    reads: &mut Vec<FieldRef>,
) -> Result<(), CelError> {
    match &e.expr {
        Expr::Ident(name) => {
            if bound.iter().any(|b| b == name) {
                return Ok(());
            }
            whole_root(name, reads).ok_or_else(|| unknown_var(name))?;
        }
        Expr::Select(SelectExpr { operand, field, .. }) => {
            if let Expr::Ident(root) = &operand.expr {
                if !bound.iter().any(|b| b == root) {
                    if !ROOTS.contains(&root.as_str()) {
                        return Err(unknown_var(root));
                    }
                    let (f, _) = FieldRef::resolve(root, Some(field), attrs).map_err(|u| {
                        cel_err(
                            "unknown-field",
                            u.message,
                            u.suggestion.map(|s| format!("did you mean `{s}`?")),
                        )
                    })?;
                    reads.push(f);
                    return Ok(());
                }
            }
            check_refs(operand, attrs, bound, reads)?;
        }
        Expr::Call(CallExpr { target, args, .. }) => {
            if let Some(t) = target {
                check_refs(t, attrs, bound, reads)?;
            }
            for a in args {
                check_refs(a, attrs, bound, reads)?;
            }
        }
        Expr::Comprehension(c) => {
            check_refs(&c.iter_range, attrs, bound, reads)?;
            let n = bound.len();
            bound.push(c.iter_var.clone());
            if let Some(v2) = &c.iter_var2 {
                bound.push(v2.clone());
            }
            bound.push(c.accu_var.clone());
            for part in [&c.accu_init, &c.loop_cond, &c.loop_step, &c.result] {
                check_refs(part, attrs, bound, reads)?;
            }
            bound.truncate(n);
        }
        Expr::List(l) => {
            for el in &l.elements {
                check_refs(el, attrs, bound, reads)?;
            }
        }
        Expr::Map(m) => {
            for entry in &m.entries {
                if let cel::common::ast::EntryExpr::MapEntry(me) = &entry.expr {
                    check_refs(&me.key, attrs, bound, reads)?;
                    check_refs(&me.value, attrs, bound, reads)?;
                }
            }
        }
        Expr::Struct(_) => {
            return Err(cel_err(
                "cel-unsupported",
                String::from("message construction is not supported"),
                None,
            ))
        }
        Expr::Literal(_) | Expr::Unspecified => {}
    }
    Ok(())
}

fn unknown_var(name: &str) -> CelError {
    let u = FieldRef::resolve(name, Some(""), &[]).err();
    cel_err(
        "unknown-field",
        format!("unknown variable `{name}`"),
        u.and_then(|u| u.suggestion)
            .map(|s| format!("did you mean `{}`?", s.trim_end_matches('.'))),
    )
}

/// Marks a whole root as read; `None` if `name` is not a root.
fn whole_root(name: &str, reads: &mut Vec<FieldRef>) -> Option<()> {
    match name {
        "request" => reads.extend([
            FieldRef::Method,
            FieldRef::Path,
            FieldRef::Host,
            FieldRef::Headers,
            FieldRef::Provider,
            FieldRef::Api,
            FieldRef::Model,
            FieldRef::Stream,
            FieldRef::MaxTokens,
            FieldRef::Temperature,
            FieldRef::User,
            FieldRef::Messages,
            FieldRef::Prompt,
            FieldRef::EstimatedTokens,
            FieldRef::Tools,
            FieldRef::BodyBytes,
        ]),
        "principal" => reads.push(FieldRef::PrincipalAll),
        "shield" => reads.push(FieldRef::ShieldAll),
        "time" => reads.extend([FieldRef::Hour, FieldRef::Weekday]),
        _ => return None,
    }
    Some(())
}

/// A field access: `root.member`, `request.headers.x`, `request.headers['x']`, `shield['x']`.
/// What a translation may refer to: the configured principal attributes and, inside an
/// `exists` / `all`, the iteration variable and the type of the list it ranges over.
struct Scope<'s> {
    attrs: &'s [String],
    elem: Option<(&'s str, FieldType)>,
}

impl Scope<'_> {
    fn elem_type(&self, name: &str) -> Option<FieldType> {
        self.elem.filter(|(v, _)| *v == name).map(|(_, t)| t)
    }
}

fn field_of(e: &IdedExpr, sc: &Scope<'_>) -> Option<(FieldRef, FieldType)> {
    match &e.expr {
        // The element of `request.tools.exists(t, ...)`.
        Expr::Ident(v) if sc.elem_type(v) == Some(FieldType::StrList) => {
            Some((FieldRef::Elem(ElemField::Value), FieldType::Str))
        }
        Expr::Select(SelectExpr {
            operand,
            field,
            test: false,
        }) => match &operand.expr {
            // `m.role` / `m.content` of `request.messages.exists(m, ...)`.
            Expr::Ident(v) if sc.elem_type(v) == Some(FieldType::Messages) => {
                match field.as_str() {
                    "role" => Some((FieldRef::Elem(ElemField::Role), FieldType::Str)),
                    "content" => Some((FieldRef::Elem(ElemField::Content), FieldType::Str)),
                    _ => None,
                }
            }
            Expr::Ident(root) => FieldRef::resolve(root, Some(field), sc.attrs).ok(),
            Expr::Select(inner) if is_headers(inner) => {
                Some((FieldRef::Header(field.clone()), FieldType::OptStr))
            }
            _ => None,
        },
        Expr::Call(c)
            if c.func_name == operators::INDEX && c.target.is_none() && c.args.len() == 2 =>
        {
            let key = string_lit(c.args.get(1)?)?;
            match &c.args.first()?.expr {
                Expr::Select(inner) if is_headers(inner) => {
                    Some((FieldRef::Header(key), FieldType::OptStr))
                }
                Expr::Ident(root) if root == "shield" => {
                    Some((FieldRef::Shield(key), FieldType::Dynamic))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

fn is_headers(s: &SelectExpr) -> bool {
    matches!(&s.operand.expr, Expr::Ident(r) if r == "request") && s.field == "headers" && !s.test
}

fn literal(e: &IdedExpr) -> Option<Lit> {
    match &e.expr {
        Expr::Literal(LiteralValue::Boolean(b)) => Some(Lit::Bool(*b.inner())),
        Expr::Literal(LiteralValue::Int(i)) => Some(Lit::Int(*i.inner())),
        Expr::Literal(LiteralValue::Double(d)) => Some(Lit::Float(*d.inner())),
        Expr::Literal(LiteralValue::String(s)) => Some(Lit::Str(s.inner().to_string())),
        Expr::Literal(LiteralValue::Null) => Some(Lit::Null),
        _ => None,
    }
}

fn string_lit(e: &IdedExpr) -> Option<String> {
    match literal(e)? {
        Lit::Str(s) => Some(s),
        _ => None,
    }
}

/// A CEL-semantics leaf on the field's value (`size: false`) or its `size()`.
fn strict_leaf(field: FieldRef, test: Test, size: bool) -> Cond {
    Cond::Leaf(Leaf {
        field,
        test,
        negate: false,
        strict: true,
        ignore_case: false,
        size,
    })
}

fn strict(field: FieldRef, test: Test) -> Cond {
    strict_leaf(field, test, false)
}

/// `field <op> literal`, or `literal <op> field` when `swapped`; on the field's `size()` when
/// `size`. `None` for operators the native tree does not have.
fn comparison(op: &str, swapped: bool, field: FieldRef, lit: Lit, size: bool) -> Option<Cond> {
    let leaf = |test| strict_leaf(field, test, size);
    let ord = match (op, swapped) {
        (operators::EQUALS, _) => return Some(leaf(Test::Eq(lit))),
        (operators::NOT_EQUALS, _) => return Some(Cond::Not(Box::new(leaf(Test::Eq(lit))))),
        (operators::GREATER, false) | (operators::LESS, true) => OrdOp::Gt,
        (operators::GREATER_EQUALS, false) | (operators::LESS_EQUALS, true) => OrdOp::Gte,
        (operators::LESS, false) | (operators::GREATER, true) => OrdOp::Lt,
        (operators::LESS_EQUALS, false) | (operators::GREATER_EQUALS, true) => OrdOp::Lte,
        _ => return None,
    };
    Some(leaf(Test::Ord(ord, lit)))
}

/// `size(x)` or `x.size()` of a field.
fn size_arg(e: &IdedExpr, sc: &Scope<'_>) -> Option<FieldRef> {
    match &e.expr {
        Expr::Call(c) if c.func_name == "size" => match (&c.target, c.args.as_slice()) {
            (None, [a]) => field_of(a, sc).map(|(f, _)| f),
            (Some(t), []) => field_of(t, sc).map(|(f, _)| f),
            _ => None,
        },
        _ => None,
    }
}

/// Translates the native subset; `None` means "keep the interpreter".
fn translate(e: &IdedExpr, sc: &Scope<'_>) -> Option<Cond> {
    match &e.expr {
        Expr::Literal(LiteralValue::Boolean(b)) => Some(Cond::Const(*b.inner())),
        Expr::Select(SelectExpr {
            operand,
            field,
            test: true,
        }) => {
            let (f, _) = field_of(
                &IdedExpr {
                    id: e.id,
                    expr: Expr::Select(SelectExpr {
                        operand: operand.clone(),
                        field: field.clone(),
                        test: false,
                    }),
                },
                sc,
            )?;
            Some(strict(f, Test::Present))
        }
        Expr::Select(_) | Expr::Call(_)
            if field_of(e, sc).is_some_and(|(_, t)| t == FieldType::Bool) =>
        {
            let (f, _) = field_of(e, sc)?;
            Some(strict(f, Test::Eq(Lit::Bool(true))))
        }
        Expr::Call(c) => translate_call(c, sc),
        Expr::Comprehension(c) => translate_each(c, sc),
        _ => None,
    }
}

/// `list.exists(x, pred)` / `list.all(x, pred)` as expanded by the `cel` parser, over
/// `request.messages` or `request.tools`, one level deep.
fn translate_each(c: &ComprehensionExpr, sc: &Scope<'_>) -> Option<Cond> {
    const ACCU: &str = "@result";
    if sc.elem.is_some()
        || c.iter_var2.is_some()
        || c.accu_var != ACCU
        || ROOTS.contains(&c.iter_var.as_str())
    {
        return None;
    }
    let is_accu = |e: &IdedExpr| matches!(&e.expr, Expr::Ident(a) if a == ACCU);
    let (Expr::Literal(LiteralValue::Boolean(init)), Expr::Call(step)) =
        (&c.accu_init.expr, &c.loop_step.expr)
    else {
        return None;
    };
    let any = match (*init.inner(), step.func_name.as_str()) {
        (false, operators::LOGICAL_OR) => true,
        (true, operators::LOGICAL_AND) => false,
        _ => return None,
    };
    let [acc, pred] = step.args.as_slice() else {
        return None;
    };
    if !is_accu(acc) || !is_accu(&c.result) {
        return None;
    }
    let (range, ty) = field_of(&c.iter_range, sc)?;
    if !matches!(ty, FieldType::Messages | FieldType::StrList) {
        return None;
    }
    let inner = Scope {
        attrs: sc.attrs,
        elem: Some((c.iter_var.as_str(), ty)),
    };
    let pred = translate(pred, &inner)?;
    Some(Cond::Each {
        range,
        any,
        pred: Box::new(pred),
    })
}

fn translate_call(c: &CallExpr, sc: &Scope<'_>) -> Option<Cond> {
    let name = c.func_name.as_str();
    if let Some(target) = &c.target {
        // Member functions with one literal string argument.
        let (f, ty) = field_of(target, sc)?;
        if !matches!(ty, FieldType::Str | FieldType::OptStr) || c.args.len() != 1 {
            return None;
        }
        let arg = string_lit(c.args.first()?)?;
        let test = match name {
            "contains" => Test::Contains(arg),
            "startsWith" => Test::StartsWith(arg),
            "endsWith" => Test::EndsWith(arg),
            "matches" => Test::Matches(regex::Regex::new(&arg).ok()?),
            _ => return None,
        };
        return Some(strict(f, test));
    }
    let args = &c.args;
    match (name, args.as_slice()) {
        (operators::LOGICAL_AND, [a, b]) => {
            Some(Cond::All(vec![translate(a, sc)?, translate(b, sc)?]))
        }
        (operators::LOGICAL_OR, [a, b]) => {
            Some(Cond::Any(vec![translate(a, sc)?, translate(b, sc)?]))
        }
        (operators::LOGICAL_NOT, [a]) => Some(Cond::Not(Box::new(translate(a, sc)?))),
        (operators::IN, [l, r]) => {
            if let (Some((f, ty)), Expr::List(list)) = (field_of(l, sc), &r.expr) {
                if ty == FieldType::Messages || ty == FieldType::StrList || ty == FieldType::StrMap
                {
                    return None;
                }
                let lits: Option<Vec<Lit>> = list.elements.iter().map(literal).collect();
                return Some(strict(f, Test::In(lits?)));
            }
            let (f, ty) = field_of(r, sc)?;
            let lit = literal(l)?;
            matches!(ty, FieldType::StrList | FieldType::StrMap)
                .then(|| strict(f, Test::Has(vec![lit])))
        }
        (op, [l, r]) if size_arg(l, sc).is_some() || size_arg(r, sc).is_some() => {
            let (f, lit, swapped) = match (size_arg(l, sc), size_arg(r, sc)) {
                (Some(f), None) => (f, literal(r)?, false),
                (None, Some(f)) => (f, literal(l)?, true),
                _ => return None,
            };
            if !matches!(lit, Lit::Int(_)) {
                return None;
            }
            comparison(op, swapped, f, lit, true)
        }
        (op, [l, r]) => {
            let ((f, ty), lit, swapped) = match (field_of(l, sc), field_of(r, sc)) {
                (Some(f), None) => (f, literal(r)?, false),
                (None, Some(f)) => (f, literal(l)?, true),
                _ => return None,
            };
            if matches!(
                ty,
                FieldType::StrList | FieldType::StrMap | FieldType::Messages
            ) {
                return None;
            }
            comparison(op, swapped, f, lit, false)
        }
        _ => None,
    }
}

impl CelProgram {
    pub(crate) fn reads(&self) -> &[FieldRef] {
        &self.reads
    }

    pub(crate) fn eval<'a>(&self, ctx: &'a RequestContext, scratch: &mut Scratch<'a>) -> Truth {
        let reads = scratch.cel_reads;
        let activation = scratch
            .cel
            .get_or_insert_with(|| activation(ctx, Some(reads)));
        match self.program.execute(activation) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(CondError(format!(
                "condition returned {:?}, not a bool",
                other.type_of()
            ))),
            Err(e) => Err(CondError(e.to_string())),
        }
    }
}

/// A CEL value borrowing from the request context.
type Val<'a> = Box<dyn cel::common::value::Val + 'a>;

fn s(v: &str) -> Val<'_> {
    Box::new(CelString::from(v))
}

fn opt_s(v: &Option<String>) -> Val<'_> {
    match v {
        Some(x) => s(x),
        None => Box::new(CelNull),
    }
}

fn int<'a>(v: i64) -> Val<'a> {
    Box::new(CelInt::from(v))
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

/// The CEL variables for one request: `request`, `principal`, `shield`, `time`, borrowing every
/// string from the context (no copies). Only the `request` fields in `reads` are built (all of
/// them with `None`): the interpreted programs of a namespace never read others.
pub(crate) fn activation<'a>(
    ctx: &'a RequestContext,
    reads: Option<&[FieldRef]>,
) -> Context<'a, 'a> {
    let r = &ctx.request;
    let want = |f: &FieldRef| {
        reads.is_none_or(|rs| {
            rs.contains(f)
                || (*f == FieldRef::Headers && rs.iter().any(|x| matches!(x, FieldRef::Header(_))))
        })
    };
    let fields: [(FieldRef, &str, &dyn Fn() -> Val<'a>); 16] = [
        (FieldRef::Method, "method", &|| s(&r.method)),
        (FieldRef::Path, "path", &|| s(&r.path)),
        (FieldRef::Host, "host", &|| s(&r.host)),
        (FieldRef::Headers, "headers", &|| {
            map(r.headers.iter().map(|(h, v)| (h.as_str(), s(v))))
        }),
        (FieldRef::Provider, "provider", &|| s(r.provider.as_str())),
        (FieldRef::Api, "api", &|| s(r.api.as_str())),
        (FieldRef::Model, "model", &|| opt_s(&r.model)),
        (FieldRef::Stream, "stream", &|| {
            Box::new(CelBool::from(r.stream))
        }),
        (FieldRef::MaxTokens, "max_tokens", &|| match r.max_tokens {
            Some(n) => int(n),
            None => Box::new(CelNull),
        }),
        (
            FieldRef::Temperature,
            "temperature",
            &|| match r.temperature {
                Some(t) => Box::new(CelDouble::from(t)),
                None => Box::new(CelNull),
            },
        ),
        (FieldRef::User, "user", &|| opt_s(&r.user)),
        (FieldRef::Messages, "messages", &|| {
            list(
                r.messages
                    .iter()
                    .map(|m| map([("role", s(&m.role)), ("content", s(&m.content))])),
            )
        }),
        (FieldRef::Prompt, "prompt", &|| s(&r.prompt)),
        (FieldRef::EstimatedTokens, "estimated_tokens", &|| {
            int(r.estimated_tokens)
        }),
        (FieldRef::Tools, "tools", &|| {
            list(r.tools.iter().map(|t| s(t)))
        }),
        (FieldRef::BodyBytes, "body_bytes", &|| int(r.body_bytes)),
    ];
    let request = map(fields
        .iter()
        .filter(|(f, _, _)| want(f))
        .map(|(_, name, v)| (*name, v())));
    let principal = map(ctx.principal.iter().map(|(a, v)| (a.as_str(), opt_s(v))));
    let shield = map(ctx.shield.iter().map(|(n, v)| {
        let v: Val<'a> = match v {
            ShieldValue::Number(f) => Box::new(CelDouble::from(*f)),
            ShieldValue::Text(t) => s(t),
        };
        (n.as_str(), v)
    }));
    let time = map([
        ("hour", int(ctx.time.hour)),
        ("weekday", int(ctx.time.weekday)),
    ]);
    let mut c = Context::with_env(Arc::clone(env()));
    c.add_variable_as_val("request", request);
    c.add_variable_as_val("principal", principal);
    c.add_variable_as_val("shield", shield);
    c.add_variable_as_val("time", time);
    c
}

/// Evaluates `src` with the interpreter only (no translation): the reference the native tree is
/// tested against.
#[cfg(test)]
pub(crate) fn interpret(src: &str, ctx: &RequestContext) -> Truth {
    let program = env().compile(src).map_err(|e| CondError(e.to_string()))?;
    match program.execute(&activation(ctx, None)) {
        Ok(Value::Bool(b)) => Ok(b),
        Ok(_) => Err(CondError(String::from("not a bool"))),
        Err(e) => Err(CondError(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs() -> Vec<String> {
        ["id", "tier", "team"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn common_expressions_are_translated() {
        for src in [
            "request.model == 'gpt-4o' && request.max_tokens > 100",
            "!(request.model in ['a', 'b'])",
            "principal.tier == 'free' || request.stream",
            "request.prompt.contains('ignore previous')",
            "request.prompt.matches('(?i)sk-[a-z0-9]{20}')",
            "'x-api-key' in request.headers",
            "has(shield.pii)",
            "shield.pii > 0.5",
            "'web_search' in request.tools",
            "1000 < request.max_tokens",
            "size(request.messages) > 40",
            "request.prompt.size() <= 10",
            "request.messages.exists(m, m.role == 'tool' && size(m.content) > 20000)",
            "request.tools.all(t, t in ['a', 'b'])",
        ] {
            let c = compile(src, &attrs()).unwrap();
            assert!(c.native, "{src}");
        }
    }

    #[test]
    fn others_use_the_interpreter_with_an_index_hint() {
        let c = compile(
            "request.model == 'x' && request.prompt.lowerAscii() == 'y'",
            &attrs(),
        )
        .unwrap();
        assert!(!c.native);
        assert!(c.index_hint.is_some());
    }

    #[test]
    fn load_time_errors() {
        let e = compile("request.modle == 'x'", &attrs()).err().unwrap();
        assert_eq!(e.code, "unknown-field");
        assert_eq!(e.help.as_deref(), Some("did you mean `request.model`?"));
        assert_eq!(
            compile("reqest.model == 'x'", &attrs()).err().unwrap().code,
            "unknown-field"
        );
        assert_eq!(
            compile("request.model ==", &attrs()).err().unwrap().code,
            "cel-syntax"
        );
        assert_eq!(
            compile("request.prompt.lowerAsci() == 'x'", &attrs())
                .err()
                .unwrap()
                .code,
            "cel-unknown-function"
        );
        let deep = format!("{}true{}", "(".repeat(5000), ")".repeat(5000));
        assert_eq!(compile(&deep, &attrs()).err().unwrap().code, "cel-too-deep");
        let bangs = format!("{}true", "!".repeat(5000));
        assert_eq!(
            compile(&bangs, &attrs()).err().unwrap().code,
            "cel-too-deep"
        );
        assert!(compile("[1,2].all(x, x > 0) && request.stream", &attrs()).is_ok());
    }

    mod differential {
        //! The native translation must decide exactly as the `cel` interpreter on every context.
        use super::*;
        use crate::condition::Scratch;
        use crate::context::{Message, ShieldValue};
        use proptest::prelude::*;

        fn atom() -> impl Strategy<Value = String> {
            let model = prop_oneof![Just("gpt-4o"), Just("gpt-4o-mini"), Just("claude")];
            let num = prop_oneof![
                Just("100"),
                Just("1000"),
                Just("1000.5"),
                Just("-1"),
                Just("0.5")
            ];
            let ord = prop_oneof![
                Just(">"),
                Just(">="),
                Just("<"),
                Just("<="),
                Just("=="),
                Just("!=")
            ];
            prop_oneof![
                (model.clone(), prop::bool::ANY).prop_map(|(m, eq)| format!(
                    "request.model {} '{m}'",
                    if eq { "==" } else { "!=" }
                )),
                (ord.clone(), num.clone()).prop_map(|(o, n)| format!("request.max_tokens {o} {n}")),
                (ord.clone(), num.clone())
                    .prop_map(|(o, n)| format!("{n} {o} request.temperature")),
                (ord, num).prop_map(|(o, n)| format!("shield.pii {o} {n}")),
                Just("principal.tier in ['free', 'trial']".to_string()),
                Just("request.model in ['gpt-4o', 1, null]".to_string()),
                Just("null == request.model".to_string()),
                Just("request.prompt.contains('key')".to_string()),
                Just("request.prompt.startsWith('ign')".to_string()),
                Just("request.user.endsWith('9')".to_string()),
                Just("request.prompt.matches('k[a-z]+')".to_string()),
                Just("'x-a' in request.headers".to_string()),
                Just("request.headers['x-a'] == 'v'".to_string()),
                Just("request.stream".to_string()),
                Just("has(shield.pii)".to_string()),
                Just("'bash' in request.tools".to_string()),
                Just("true".to_string()),
                Just("false".to_string()),
                Just("principal.team == 'red'".to_string()),
                Just("request.estimated_tokens > 3".to_string()),
                Just("size(request.prompt) > 4".to_string()),
                Just("size(request.messages) == 1".to_string()),
                Just("2 <= request.prompt.size()".to_string()),
                Just("size(request.tools) != 0".to_string()),
                Just("size(request.user) < 7".to_string()),
                Just("size(request.headers) >= 1".to_string()),
                Just("request.messages.exists(m, m.role == 'tool')".to_string()),
                Just("request.messages.all(m, size(m.content) < 10)".to_string()),
                Just(
                    "request.messages.exists(m, m.content.contains('key') && m.role == 'user')"
                        .to_string()
                ),
                Just(
                    "request.messages.exists(m, m.role == 'tool' && request.max_tokens > 1000)"
                        .to_string()
                ),
                Just(
                    "request.messages.all(m, m.content.matches('k') || request.temperature < 1.0)"
                        .to_string()
                ),
                Just("request.tools.exists(t, t == 'bash')".to_string()),
                Just(
                    "request.messages.exists(m, m.role == 'tool' || request.max_tokens > 1000)"
                        .to_string()
                ),
                Just(
                    "request.messages.all(m, m.role == 'user' && request.max_tokens > 1000)"
                        .to_string()
                ),
                Just("request.tools.all(t, t.startsWith('b'))".to_string()),
            ]
        }

        fn expr() -> impl Strategy<Value = String> {
            atom().prop_recursive(3, 16, 2, |inner| {
                prop_oneof![
                    (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} && {b})")),
                    (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} || {b})")),
                    inner.prop_map(|a| format!("!({a})")),
                ]
            })
        }

        fn context() -> impl Strategy<Value = RequestContext> {
            (
                prop::option::of(prop_oneof![
                    Just("gpt-4o"),
                    Just("gpt-4o-mini"),
                    Just("other")
                ]),
                prop::option::of(prop_oneof![
                    Just(100i64),
                    Just(1000),
                    Just(1001),
                    Just(5000),
                    Just(-3)
                ]),
                prop::option::of(prop_oneof![
                    Just(0.0f64),
                    Just(0.5),
                    Just(1000.5),
                    Just(2.0)
                ]),
                prop::option::of(prop_oneof![Just("free"), Just("pro")]),
                prop::option::of(prop_oneof![Just(0.1f64), Just(0.9), Just(1000.5)]),
                prop_oneof![Just(""), Just("ignore the key"), Just("kxyz")],
                prop::option::of(prop_oneof![Just("v"), Just("w")]),
                prop::bool::ANY,
                prop::option::of(Just("user-9")),
                (prop::bool::ANY, 0usize..3),
            )
                .prop_map(
                    |(model, max, temp, tier, pii, prompt, xa, stream, user, (bash, turns))| {
                        let mut c = RequestContext::default();
                        c.request.model = model.map(String::from);
                        c.request.max_tokens = max;
                        c.request.temperature = temp;
                        c.request.prompt = prompt.to_string();
                        c.request.estimated_tokens = (prompt.len() as i64).div_euclid(4);
                        c.request.messages = match turns {
                            0 => vec![],
                            1 => vec![Message {
                                role: "user".into(),
                                content: prompt.into(),
                            }],
                            _ => vec![
                                Message {
                                    role: "user".into(),
                                    content: prompt.into(),
                                },
                                Message {
                                    role: "tool".into(),
                                    content: "tool output with a key".into(),
                                },
                            ],
                        };
                        c.request.stream = stream;
                        c.request.user = user.map(String::from);
                        if bash {
                            c.request.tools = vec!["bash".into()];
                        }
                        if let Some(v) = xa {
                            c.request.headers = vec![("x-a".into(), v.into())];
                        }
                        c.principal = vec![
                            ("id".into(), None),
                            ("tier".into(), tier.map(String::from)),
                            ("team".into(), None),
                        ];
                        if let Some(p) = pii {
                            c.shield = vec![("pii".into(), ShieldValue::Number(p))];
                        }
                        c
                    },
                )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn native_equals_interpreter(src in expr(), ctx in context()) {
                let compiled = compile(&src, &["id".into(), "tier".into(), "team".into()]).unwrap();
                prop_assert!(compiled.native, "not translated: {}", src);
                let native = compiled.cond.eval(&ctx, &mut Scratch::default());
                let reference = interpret(&src, &ctx);
                match (&native, &reference) {
                    (Ok(a), Ok(b)) => prop_assert_eq!(a, b, "{}", src),
                    (Err(_), Err(_)) => {}
                    _ => prop_assert!(false, "{}: native {:?} vs interpreter {:?}", src, native, reference),
                }
            }
        }
    }
}
