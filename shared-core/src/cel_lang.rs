//! CEL conditions (feature `cel`).
//!
//! An expression goes through four stages, each in its own module:
//!
//! 1. [`guard`]: size, bracket nesting and an upper bound of the syntax tree's depth, checked on
//!    the text before parsing, then the exact depth of the parsed tree. Every recursion over the
//!    tree (checks, translation, the interpreter, the evaluator) is bounded by [`MAX_DEPTH`].
//! 2. [`check`]: every variable, field, function and regex resolved and typed at load time, so
//!    what CEL would only find on a request (an unknown function behind `&&`, `request.model > 3`,
//!    a non-bool condition, `1 / 0`, an invalid regex) is a located load error; unguarded reads of
//!    values that may be null or absent are warnings; constructs whose cost grows faster than the
//!    request (a list macro inside another, value-growing string functions) are rejected.
//! 3. [`translate`]: the common subset becomes the native condition tree (CEL semantics, errors
//!    included, proven by a differential property test against the interpreter).
//! 4. The rest becomes a [`CelProgram`] (module `cel_program`) that the `cel` interpreter runs,
//!    with regexes compiled once at load.
//!
//! Parsing uses the `cel` crate's own Pratt parser (23× faster than its ANTLR parser on policy
//! expressions, the same syntax trees; a test compares them).

use std::sync::Arc;

use cel::common::ast::{Expr, IdedExpr, LiteralValue, SelectExpr};
use cel::Value;

use crate::cel_program::{env, CelProgram};
use crate::cel_text::ShowValue;
use crate::condition::{Cond, Lit};
use crate::diagnostic::Code;
use crate::schema::{ElemField, FieldRef, FieldType};

mod check;
pub(crate) mod guard;
mod translate;

/// Longest accepted expression, in bytes.
pub(crate) const MAX_EXPR_LEN: usize = 16 * 1024;
/// Deepest accepted bracket nesting (`(`, `[`, `{`).
pub(crate) const MAX_NESTING: usize = 32;
/// Most nodes a parsed expression may have.
pub(crate) const MAX_NODES: usize = 8192;
/// Deepest accepted syntax tree (a chain of `n` binary operators is `n` deep, except `&&` and
/// `||`, which the parser balances).
pub(crate) const MAX_DEPTH: usize = 64;

/// A finding in a CEL expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CelIssue {
    pub code: Code,
    pub message: String,
    pub help: Option<String>,
}

pub(crate) fn issue(code: Code, message: impl Into<String>, help: Option<String>) -> CelIssue {
    CelIssue {
        code,
        message: message.into(),
        help,
    }
}

/// A compiled CEL condition.
pub(crate) struct CelCompiled {
    /// The condition: native tree when translatable, else the interpreter.
    pub cond: Cond,
    /// For interpreted programs: the translatable top-level `&&` conjuncts, for indexing.
    pub index_hint: Option<Cond>,
    /// Whether the whole expression was translated.
    #[cfg_attr(not(test), allow(dead_code, reason = "asserted by tests"))]
    pub native: bool,
    /// Findings that do not reject the expression.
    pub warnings: Vec<CelIssue>,
}

/// Parses without any check (the guard runs first in [`compile`]). Backtick-quoted field names
/// (`` request.headers.`x-api-key` ``, `` m.`content-type` ``) are CEL syntax and accepted.
pub(crate) fn parse(src: &str) -> Result<IdedExpr, CelIssue> {
    cel::parser::PrattParser::new()
        .enable_optional_syntax(true)
        .enable_ident_escape_syntax(true)
        .max_recursion_depth(u16::try_from(MAX_DEPTH).unwrap_or(u16::MAX))
        // Stop at the first error: recovery would keep building a tree from broken text.
        .error_recovery_limit(0)
        .max_expression_node_count(MAX_NODES)
        .parse(src)
        .map_err(|e| syntax_error(src, &e.errors))
}

/// The parser's first real error (not its note that recovery stopped), with the column.
fn syntax_error(src: &str, errors: &[cel::parser::ParseError]) -> CelIssue {
    let first = errors
        .iter()
        .find(|e| !e.msg.starts_with("error recovery attempt limit exceeded"))
        .or(errors.first());
    let Some(e) = first else {
        return issue(Code::CelSyntax, "CEL syntax error", None);
    };
    let mut msg = e.msg.trim_start_matches("Syntax error: ").to_string();
    if msg == "unexpected quoted identifier" {
        msg = String::from(
            "a backtick-quoted name may hold only letters, digits and `_ . - /` or spaces, and only after a `.` (`m.`content-type``)",
        );
    }
    // `pos` is (line, byte column), both from 1: shown as a column in characters.
    let line = usize::try_from(e.pos.0).unwrap_or(0);
    let byte = usize::try_from(e.pos.1).unwrap_or(0).saturating_sub(1);
    let text = src.lines().nth(line.saturating_sub(1)).unwrap_or_default();
    let column = text
        .get(..byte)
        .map_or(byte, |t| t.chars().count())
        .saturating_add(1);
    let at = if line > 1 || src.contains('\n') {
        format!(" at line {line}, column {column}")
    } else if line == 1 {
        format!(" at column {column}")
    } else {
        String::new()
    };
    issue(
        Code::CelSyntax,
        format!("CEL syntax error{at}: {msg}"),
        None,
    )
}

/// Compiles one CEL condition.
pub(crate) fn compile(src: &str, attrs: &[String]) -> Result<CelCompiled, CelIssue> {
    guard::lexical(src)?;
    let expr = parse(src)?;
    guard::depth(&expr)?;
    let checked = check::check(&expr, attrs)?;
    let sc = translate::Scope { attrs, elem: None };
    if let Some(cond) = translate::translate(&expr, &sc) {
        return Ok(CelCompiled {
            cond,
            index_hint: None,
            native: true,
            warnings: checked.warnings,
        });
    }
    let index_hint = translate::index_hint(&expr, &sc);
    let program = CelProgram::new(expr, checked.reads, checked.nullable);
    Ok(CelCompiled {
        cond: Cond::Cel(Arc::new(program)),
        index_hint,
        native: false,
        warnings: checked.warnings,
    })
}

/// What a translation or a check may refer to: the configured principal attributes and, inside
/// an `exists` / `all`, the iteration variable and the type of the list it ranges over.
pub(crate) struct Scope<'s> {
    pub attrs: &'s [String],
    pub elem: Option<(&'s str, FieldType)>,
}

impl Scope<'_> {
    fn elem_type(&self, name: &str) -> Option<FieldType> {
        self.elem.filter(|(v, _)| *v == name).map(|(_, t)| t)
    }
}

fn is_headers(s: &SelectExpr) -> bool {
    matches!(&s.operand.expr, Expr::Ident(r) if r == "request") && s.field == "headers" && !s.test
}

/// The context field an expression reads directly: `root.member`, `request.headers.x`,
/// `request.headers['x']`, `shield['x']`, or an element field inside `exists` / `all`.
/// `None` for anything else (and for names the scope shadows).
pub(crate) fn field_of(e: &IdedExpr, sc: &Scope<'_>) -> Option<(FieldRef, FieldType)> {
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
            Expr::Ident(v) if sc.elem.is_some_and(|(name, _)| name == v) => None,
            Expr::Ident(root) => FieldRef::resolve(root, Some(field), sc.attrs).ok(),
            Expr::Select(inner) if is_headers(inner) => {
                Some((FieldRef::Header(field.clone()), FieldType::OptStr))
            }
            _ => None,
        },
        Expr::Call(c)
            if c.func_name == cel::common::ast::operators::INDEX
                && c.target.is_none()
                && c.args.len() == 2 =>
        {
            let key = string_lit(c.args.get(1)?)?;
            match &c.args.first()?.expr {
                Expr::Select(inner) if is_headers(inner) => {
                    Some((FieldRef::Header(key), FieldType::OptStr))
                }
                Expr::Ident(root) if root == "shield" && sc.elem_type(root).is_none() => {
                    Some((FieldRef::Shield(key), FieldType::Dynamic))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

pub(crate) fn literal(e: &IdedExpr) -> Option<Lit> {
    match &e.expr {
        Expr::Literal(LiteralValue::Boolean(b)) => Some(Lit::Bool(*b.inner())),
        Expr::Literal(LiteralValue::Int(i)) => Some(Lit::Int(*i.inner())),
        Expr::Literal(LiteralValue::Double(d)) => Some(Lit::Float(*d.inner())),
        Expr::Literal(LiteralValue::String(s)) => Some(Lit::Str(s.inner().to_string())),
        Expr::Literal(LiteralValue::Null) => Some(Lit::Null),
        _ => None,
    }
}

pub(crate) fn string_lit(e: &IdedExpr) -> Option<String> {
    match literal(e)? {
        Lit::Str(s) => Some(s),
        _ => None,
    }
}

/// The children of a node, in source order.
pub(crate) fn children(e: &IdedExpr) -> Vec<&IdedExpr> {
    match &e.expr {
        Expr::Call(c) => c.target.iter().map(|t| &**t).chain(c.args.iter()).collect(),
        Expr::Comprehension(c) => vec![
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ],
        Expr::List(l) => l.elements.iter().collect(),
        Expr::Map(m) => m
            .entries
            .iter()
            .flat_map(|entry| match &entry.expr {
                cel::common::ast::EntryExpr::MapEntry(me) => vec![&me.key, &me.value],
                cel::common::ast::EntryExpr::StructField(sf) => vec![&sf.value],
            })
            .collect(),
        Expr::Struct(s) => s
            .entries
            .iter()
            .map(|entry| match &entry.expr {
                cel::common::ast::EntryExpr::StructField(sf) => &sf.value,
                cel::common::ast::EntryExpr::MapEntry(me) => &me.value,
            })
            .collect(),
        Expr::Select(s) => vec![&*s.operand],
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => Vec::new(),
    }
}

/// A short rendering of an expression for messages (bounded: the tree is at most [`MAX_DEPTH`]
/// deep and the text is cut at 80 characters).
pub(crate) fn show(e: &IdedExpr) -> String {
    let mut s = String::new();
    render(e, &mut s);
    if s.chars().count() > 80 {
        s = s.chars().take(77).collect::<String>() + "...";
    }
    s
}

fn render(e: &IdedExpr, out: &mut String) {
    use cel::common::ast::operators as op;
    if out.len() > 200 {
        return;
    }
    match &e.expr {
        Expr::Literal(LiteralValue::String(s)) if !s.inner().contains(['\'', '\\']) => {
            out.push('\'');
            out.push_str(s.inner());
            out.push('\'');
        }
        Expr::Literal(l) => {
            let v = match l {
                LiteralValue::Boolean(b) => Value::Bool(*b.inner()),
                LiteralValue::Int(i) => Value::Int(*i.inner()),
                LiteralValue::UInt(u) => Value::UInt(*u.inner()),
                LiteralValue::Double(d) => Value::Float(*d.inner()),
                LiteralValue::String(s) => Value::String(Arc::new(s.inner().to_string())),
                LiteralValue::Bytes(b) => Value::Bytes(Arc::new(b.inner().to_vec())),
                LiteralValue::Null => Value::Null,
            };
            out.push_str(&ShowValue(&v).to_string());
        }
        Expr::Ident(n) => out.push_str(n),
        Expr::Select(s) => {
            if s.test {
                out.push_str("has(");
            }
            render(&s.operand, out);
            out.push('.');
            out.push_str(&s.field);
            if s.test {
                out.push(')');
            }
        }
        Expr::Call(c) => {
            let infix = match c.func_name.as_str() {
                op::ADD => Some("+"),
                op::SUBSTRACT => Some("-"),
                op::MULTIPLY => Some("*"),
                op::DIVIDE => Some("/"),
                op::MODULO => Some("%"),
                op::EQUALS => Some("=="),
                op::NOT_EQUALS => Some("!="),
                op::LESS => Some("<"),
                op::LESS_EQUALS => Some("<="),
                op::GREATER => Some(">"),
                op::GREATER_EQUALS => Some(">="),
                op::LOGICAL_AND => Some("&&"),
                op::LOGICAL_OR => Some("||"),
                op::IN => Some("in"),
                _ => None,
            };
            match (infix, c.args.as_slice(), c.func_name.as_str()) {
                (Some(sym), [a, b], _) => {
                    render(a, out);
                    out.push(' ');
                    out.push_str(sym);
                    out.push(' ');
                    render(b, out);
                }
                (_, [a], op::LOGICAL_NOT) => {
                    out.push('!');
                    render(a, out);
                }
                (_, [c, a, b], op::CONDITIONAL) => {
                    render(c, out);
                    out.push_str(" ? ");
                    render(a, out);
                    out.push_str(" : ");
                    render(b, out);
                }
                (_, [a], op::NEGATE) => {
                    out.push('-');
                    render(a, out);
                }
                (_, [a, b], op::INDEX) => {
                    render(a, out);
                    out.push('[');
                    render(b, out);
                    out.push(']');
                }
                _ => {
                    if let Some(t) = &c.target {
                        render(t, out);
                        out.push('.');
                    }
                    out.push_str(&c.func_name);
                    out.push('(');
                    for (i, a) in c.args.iter().enumerate() {
                        if i > 0 {
                            out.push_str(", ");
                        }
                        render(a, out);
                    }
                    out.push(')');
                }
            }
        }
        Expr::List(l) => {
            out.push('[');
            for (i, x) in l.elements.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                render(x, out);
            }
            out.push(']');
        }
        Expr::Comprehension(c) => {
            render(&c.iter_range, out);
            out.push_str(&format!(".{}({}, ...)", macro_name(c), c.iter_var));
        }
        Expr::Map(_) => out.push_str("{...}"),
        Expr::Struct(s) => out.push_str(&format!("{}{{...}}", s.type_name)),
        Expr::Unspecified => {}
    }
}

/// Which macro a comprehension was expanded from (as the `cel` parser expands them).
fn macro_name(c: &cel::common::ast::ComprehensionExpr) -> &'static str {
    use cel::common::ast::operators as op;
    let step = match &c.loop_step.expr {
        Expr::Call(s) => s.func_name.as_str(),
        _ => "",
    };
    match (&c.accu_init.expr, step) {
        (Expr::Literal(LiteralValue::Boolean(b)), op::LOGICAL_OR) if !*b.inner() => "exists",
        (Expr::Literal(LiteralValue::Boolean(b)), op::LOGICAL_AND) if *b.inner() => "all",
        (Expr::Literal(LiteralValue::Int(_)), _) => "exists_one",
        // `filter` adds the element itself; `map(x, pred, f)` adds `f`.
        (Expr::List(_), op::CONDITIONAL) if adds_iter_var(c) => "filter",
        (Expr::List(_), _) => "map",
        _ => "macro",
    }
}

/// Whether a comprehension's step is `pred ? accu + [iter_var] : accu`.
fn adds_iter_var(c: &cel::common::ast::ComprehensionExpr) -> bool {
    let Expr::Call(step) = &c.loop_step.expr else {
        return false;
    };
    let Some(Expr::Call(add)) = step.args.get(1).map(|a| &a.expr) else {
        return false;
    };
    matches!(
        add.args.get(1).map(|a| &a.expr),
        Some(Expr::List(l)) if matches!(
            l.elements.as_slice(),
            [x] if matches!(&x.expr, Expr::Ident(v) if *v == c.iter_var)
        )
    )
}

#[cfg(test)]
mod tests;
