//! Load-time checks of a parsed CEL expression: names, types, functions, regexes, constants,
//! cost, and guards against null or absent values.
//!
//! The checker walks the tree once (recursion bounded by [`super::MAX_DEPTH`]) and infers a
//! coarse type for every node. Only definite conflicts are errors (`dyn` silences them), so a
//! valid CEL program is never rejected for what the checker cannot know.

use cel::common::ast::{
    operators as op, CallExpr, ComprehensionExpr, Expr, IdedExpr, LiteralValue,
};
use cel::{Context, ExecutionError, Value};

use super::{env, field_of, issue, show, string_lit, CelIssue, Scope};

mod library;
use crate::cel_text::ShowError;
use crate::diagnostic::Code;
use crate::pattern::build_regex;
use crate::schema::{check_shield_name, root_fields, FieldRef, FieldType, ROOTS};

/// How many request sizes a value built by an expression may reach (`a + b` of two prompts is
/// 2). Above this, building it could take memory out of proportion to the request.
const MAX_GROWTH: u32 = 8;

/// What the checks found.
pub(super) struct Checked {
    /// Every context field the expression reads, sorted.
    pub reads: Vec<FieldRef>,
    /// The fields read that may be null or absent (named in runtime errors).
    pub nullable: Vec<FieldRef>,
    /// Findings that do not reject the expression.
    pub warnings: Vec<CelIssue>,
}

/// A coarse CEL type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Bool,
    Int,
    Uint,
    Double,
    Str,
    Bytes,
    Null,
    Timestamp,
    Duration,
    List,
    Map,
    /// An element of `request.messages` (a map with `role` and `content`).
    Message,
    Type,
    Dyn,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Bool => "a bool",
            Ty::Int => "an int",
            Ty::Uint => "a uint",
            Ty::Double => "a double",
            Ty::Str => "a string",
            Ty::Bytes => "bytes",
            Ty::Null => "null",
            Ty::Timestamp => "a timestamp",
            Ty::Duration => "a duration",
            Ty::List => "a list",
            Ty::Map | Ty::Message => "a map",
            Ty::Type => "a type",
            Ty::Dyn => "dyn",
        }
    }
    fn numeric(self) -> bool {
        matches!(self, Ty::Int | Ty::Uint | Ty::Double)
    }
    fn known(self) -> bool {
        self != Ty::Dyn
    }
}

/// The inferred facts of one node.
#[derive(Debug, Clone)]
struct T {
    ty: Ty,
    /// For lists: the element type.
    elem: Ty,
    /// The context field this node reads directly, if any.
    field: Option<FieldRef>,
    /// The value may be null (a nullable field).
    nullable: bool,
    /// Growth: how many request sizes the value may reach (0 for constants and scalars).
    size: u32,
    /// The value depends on the request (a field, or something computed from one).
    request: bool,
    /// For a list literal: how many elements it has.
    count: Option<usize>,
    /// Bytes of literal text the value may hold (`'abc'` holds 3; a `map` over a literal list
    /// holds the list's length times what each step adds): built on every evaluation.
    lits: u64,
    /// For a list literal: an element holds request data that is not text ([`T::wide`]).
    wide_items: bool,
}

impl T {
    fn of(ty: Ty) -> T {
        T {
            ty,
            elem: Ty::Dyn,
            field: None,
            nullable: false,
            size: 0,
            request: false,
            count: None,
            lits: 0,
            wide_items: false,
        }
    }
    /// Request-sized data that is not known to be text (a list or map from the request, a
    /// value of unknown type): written as text, each number in it could take hundreds of
    /// characters (`-5e-324` prints 327), far more than it took in the request.
    fn wide(&self) -> bool {
        self.size > 0
            && match self.ty {
                Ty::Str | Ty::Bytes | Ty::Message => false,
                Ty::List | Ty::Map => !matches!(self.elem, Ty::Str | Ty::Message),
                _ => true,
            }
    }

    fn derived(ty: Ty, size: u32, request: bool) -> T {
        T {
            size,
            request,
            ..T::of(ty)
        }
    }
}

/// How a root member is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Its value (an absent key is an error).
    Read,
    /// `has()`: presence only.
    Test,
    /// `.?member`, `[?'member']`: an optional value (absent is an empty optional).
    Optional,
}

/// A fact that holds where an expression is known to be true (or false).
#[derive(Debug, Clone, PartialEq)]
enum Fact {
    NotNull(FieldRef),
    Present(FieldRef),
}

/// A comprehension variable in scope.
struct Binding {
    name: String,
    t: T,
    /// The iteration variable of a comprehension over request data.
    request_elem: bool,
}

struct Checker<'a> {
    attrs: &'a [String],
    reads: Vec<FieldRef>,
    nullable: Vec<FieldRef>,
    warnings: Vec<CelIssue>,
    warned: Vec<FieldRef>,
    bound: Vec<Binding>,
    facts: Vec<Fact>,
    /// Set inside the body of a comprehension over request data.
    in_request_loop: bool,
    comprehensions: usize,
    /// Passes over request text so far (see [`MAX_TEXT_PASSES`]).
    passes: u64,
    /// How many times the node being checked runs per evaluation: the product of the lengths of
    /// the literal lists the enclosing macros range over (a macro over request data runs its
    /// body once per element, and the elements share the request: 1).
    repeat: u64,
}

/// Checks an expression; `Err` is the first error found.
pub(super) fn check(e: &IdedExpr, attrs: &[String]) -> Result<Checked, CelIssue> {
    let mut c = Checker {
        attrs,
        reads: Vec::new(),
        nullable: Vec::new(),
        warnings: Vec::new(),
        warned: Vec::new(),
        bound: Vec::new(),
        facts: Vec::new(),
        in_request_loop: false,
        comprehensions: 0,
        passes: 0,
        repeat: 1,
    };
    let t = c.expr(e)?;
    if t.ty.known() && t.ty != Ty::Bool {
        return Err(type_err(format!(
            "the condition is {}, not a bool: `{}`",
            t.ty.name(),
            show(e)
        )));
    }
    fold_constants(e, &mut Vec::new())?;
    c.reads.sort();
    c.reads.dedup();
    c.nullable.sort();
    c.nullable.dedup();
    Ok(Checked {
        reads: c.reads,
        nullable: c.nullable,
        warnings: c.warnings,
    })
}

fn type_err(message: String) -> CelIssue {
    issue(Code::CelType, message, None)
}

fn t_of_field(f: FieldRef, ty: FieldType) -> T {
    let (t, elem) = match ty {
        FieldType::Str => (Ty::Str, Ty::Dyn),
        FieldType::OptStr => (Ty::Str, Ty::Dyn),
        FieldType::Int | FieldType::OptInt => (Ty::Int, Ty::Dyn),
        FieldType::OptFloat => (Ty::Double, Ty::Dyn),
        FieldType::Bool => (Ty::Bool, Ty::Dyn),
        FieldType::StrList => (Ty::List, Ty::Str),
        FieldType::StrMap => (Ty::Map, Ty::Str),
        FieldType::Messages => (Ty::List, Ty::Message),
        FieldType::Dynamic => (Ty::Dyn, Ty::Dyn),
    };
    // Request text can be as large as the request (the method too: it is the client's, as
    // sent); numbers, bools and the names the engine gives (provider, api) cannot. Those names
    // still hold text: at most `NAME_TEXT` bytes of it, built into what derives from them.
    let name = matches!(f, FieldRef::Provider | FieldRef::Api);
    let small = name
        || matches!(f, FieldRef::Hour | FieldRef::Weekday)
        || matches!(t, Ty::Int | Ty::Double | Ty::Bool);
    T {
        ty: t,
        elem,
        nullable: matches!(
            ty,
            FieldType::OptStr | FieldType::OptInt | FieldType::OptFloat
        ) || matches!(f, FieldRef::Principal(_)),
        size: u32::from(!small),
        request: true,
        field: Some(f),
        count: None,
        lits: if name { NAME_TEXT } else { 0 },
        wide_items: false,
    }
}

/// The longest name the engine gives a provider or an API (`anthropic`, `chat`, ...), with room.
const NAME_TEXT: u64 = 32;

fn lit_ty(l: &LiteralValue) -> Ty {
    match l {
        LiteralValue::Boolean(_) => Ty::Bool,
        LiteralValue::Bytes(_) => Ty::Bytes,
        LiteralValue::Double(_) => Ty::Double,
        LiteralValue::Int(_) => Ty::Int,
        LiteralValue::Null => Ty::Null,
        LiteralValue::String(_) => Ty::Str,
        LiteralValue::UInt(_) => Ty::Uint,
    }
}

/// Whether two known types can be compared with `==` (numbers across kinds, null with anything
/// nullable is handled by the caller).
fn comparable(a: Ty, b: Ty) -> bool {
    !a.known()
        || !b.known()
        || a == b
        || (a.numeric() && b.numeric())
        || matches!((a, b), (Ty::Map, Ty::Message) | (Ty::Message, Ty::Map))
}

fn orderable(a: Ty, b: Ty) -> bool {
    let ordered = |t: Ty| {
        matches!(
            t,
            Ty::Int
                | Ty::Uint
                | Ty::Double
                | Ty::Str
                | Ty::Bool
                | Ty::Bytes
                | Ty::Timestamp
                | Ty::Duration
                | Ty::Dyn
        )
    };
    ordered(a) && ordered(b) && (a == b || !a.known() || !b.known() || (a.numeric() && b.numeric()))
}

impl Checker<'_> {
    fn scope(&self) -> Scope<'_> {
        Scope {
            attrs: self.attrs,
            elem: None,
        }
    }

    fn binding(&self, name: &str) -> Option<&Binding> {
        self.bound.iter().rev().find(|b| b.name == name)
    }

    fn read(&mut self, f: &FieldRef) {
        self.reads.push(f.clone());
    }

    /// Counts `n` passes over request text at `e`, times [`Checker::repeat`]: each read of a
    /// request-sized value is one (whatever consumes it scans it a bounded number of times), a
    /// search for a literal of `k` characters `k`. Past [`MAX_TEXT_PASSES`] in one condition the
    /// expression is refused: each construct is linear in the request, but their number and the
    /// literal lists that repeat them multiply.
    fn pass(&mut self, n: u64, e: &IdedExpr) -> Result<(), CelIssue> {
        self.passes = self.passes.saturating_add(n.saturating_mul(self.repeat));
        if self.passes > MAX_TEXT_PASSES {
            return Err(issue(
                Code::CelTooComplex,
                format!(
                    "`{}`: the condition goes over request text more than {MAX_TEXT_PASSES} times per evaluation (each read of request text counts once, a search for a literal of n characters n times, and a macro over a literal list of k items repeats its body k times)",
                    show(e)
                ),
                Some(String::from(
                    "split it into several rules, or test the text once with `matches` and one regex",
                )),
            ));
        }
        Ok(())
    }

    /// Counts a read of `t` ([`Checker::pass`] when it is request text), and rejects reading
    /// request text inside a list macro over request data (its cost would be the product of the
    /// two sizes).
    fn loop_read(&mut self, t: &T, e: &IdedExpr) -> Result<(), CelIssue> {
        if t.size > 0 {
            self.pass(1, e)?;
        }
        if self.in_request_loop && t.size > 0 {
            return Err(issue(
                Code::CelTooComplex,
                format!(
                    "`{}` is read inside a list macro over request data: the cost would grow with the product of the two sizes",
                    show(e)
                ),
                Some(String::from(
                    "test it outside the macro (`principal.tier == 'free' && request.messages.exists(m, ...)`), or compare the element with literals",
                )),
            ));
        }
        Ok(())
    }

    fn warn_unguarded(&mut self, field: &FieldRef, use_text: String) {
        if self.warned.contains(field) {
            return;
        }
        let path = field.path();
        let (message, help) = match field {
            FieldRef::Header(h) => (
                format!("`{use_text}` errors when the request has no `{h}` header, and the rule's `onError` then applies (default: deny)"),
                format!("guard it in the same condition: `'{h}' in request.headers && ...`"),
            ),
            FieldRef::Shield(s) => (
                format!("`{use_text}` errors when the request carries no `{s}` shield score, and the rule's `onError` then applies (default: deny)"),
                format!("guard it in the same condition: `has(shield.{s}) && ...`"),
            ),
            _ => (
                format!("`{use_text}` errors when `{path}` is null, and the rule's `onError` then applies (default: deny)"),
                format!("guard it in the same condition: `{path} != null && ...`"),
            ),
        };
        self.warned.push(field.clone());
        self.warnings
            .push(issue(Code::CelUnguarded, message, Some(help)));
    }

    /// A value that errors when null is used (method call, ordering, arithmetic).
    fn use_nullable(&mut self, t: &T, e: &IdedExpr) {
        if let (true, Some(f)) = (t.nullable, &t.field) {
            if !self.facts.contains(&Fact::NotNull(f.clone())) {
                self.warn_unguarded(&f.clone(), show(e));
            }
        }
    }

    /// A header or shield key that errors when absent.
    fn access_absent(&mut self, f: &FieldRef, e: &IdedExpr) {
        if !self.facts.contains(&Fact::Present(f.clone())) {
            self.warn_unguarded(f, show(e));
        }
    }

    /// Checks `e` with `facts` known to hold while it is evaluated.
    fn expr_with(&mut self, facts: Vec<Fact>, e: &IdedExpr) -> Result<T, CelIssue> {
        let n = self.facts.len();
        self.facts.extend(facts);
        let t = self.expr(e);
        self.facts.truncate(n);
        t
    }

    fn expr(&mut self, e: &IdedExpr) -> Result<T, CelIssue> {
        match &e.expr {
            Expr::Literal(l) => Ok(T {
                lits: match l {
                    LiteralValue::String(x) => x.inner().len() as u64,
                    LiteralValue::Bytes(x) => x.inner().len() as u64,
                    _ => 0,
                },
                ..T::of(lit_ty(l))
            }),
            Expr::Ident(name) => self.ident(name, e),
            Expr::Select(s) => self.select(s, e),
            Expr::Call(c) => self.call(c, e),
            Expr::Comprehension(c) => self.comprehension(c, e),
            Expr::List(l) => {
                let mut elem: Option<Ty> = None;
                let (mut size, mut request, mut lits) = (0u32, false, 0u64);
                let mut wide_items = false;
                for x in &l.elements {
                    let t = self.expr(x)?;
                    elem = Some(match elem {
                        None => t.ty,
                        Some(p) if p == t.ty => p,
                        Some(_) => Ty::Dyn,
                    });
                    size = size.saturating_add(t.size);
                    request |= t.request;
                    lits = lits.saturating_add(t.lits);
                    wide_items |= t.wide() || t.wide_items;
                }
                self.grow(size, e)?;
                Ok(T {
                    elem: elem.unwrap_or(Ty::Dyn),
                    count: Some(l.elements.len()),
                    lits,
                    wide_items,
                    ..T::derived(Ty::List, size, request)
                })
            }
            Expr::Map(_) | Expr::Struct(_) => {
                if let Expr::Struct(_) = &e.expr {
                    return Err(issue(
                        Code::CelUnsupported,
                        "message construction is not supported",
                        None,
                    ));
                }
                let (mut size, mut request, mut lits) = (0u32, false, 0u64);
                for x in super::children(e) {
                    let t = self.expr(x)?;
                    size = size.saturating_add(t.size);
                    request |= t.request;
                    lits = lits.saturating_add(t.lits);
                }
                self.grow(size, e)?;
                Ok(T {
                    lits,
                    ..T::derived(Ty::Map, size, request)
                })
            }
            Expr::Unspecified => Ok(T::of(Ty::Dyn)),
        }
    }

    /// Rejects a value holding more than [`MAX_LITERAL_BYTES`] of literal text: a constant
    /// multiplied by a list is rebuilt on every evaluation.
    fn literal_bytes(&self, t: &T, e: &IdedExpr) -> Result<(), CelIssue> {
        if t.lits > MAX_LITERAL_BYTES {
            return Err(issue(
                Code::CelTooComplex,
                format!(
                    "`{}` builds {} bytes of literal text on every evaluation (the limit is {MAX_LITERAL_BYTES})",
                    show(e),
                    t.lits
                ),
                Some(String::from("test the parts separately instead of building a large value")),
            ));
        }
        Ok(())
    }

    fn grow(&self, size: u32, e: &IdedExpr) -> Result<(), CelIssue> {
        if size > MAX_GROWTH {
            return Err(issue(
                Code::CelTooComplex,
                format!(
                    "`{}` can build a value {size} times the size of the request (the limit is {MAX_GROWTH})",
                    show(e)
                ),
                Some(String::from("test the parts separately instead of joining them")),
            ));
        }
        Ok(())
    }

    fn ident(&mut self, name: &str, e: &IdedExpr) -> Result<T, CelIssue> {
        if let Some(b) = self.binding(name) {
            let t = b.t.clone();
            if b.request_elem {
                return Ok(t);
            }
            self.loop_read(&t, e)?;
            return Ok(t);
        }
        if TYPE_NAMES.contains(&name) {
            return Ok(T::of(Ty::Type));
        }
        if !ROOTS.contains(&name) {
            let u = FieldRef::resolve(name, Some(""), &[]).err();
            return Err(issue(
                Code::UnknownField,
                format!("unknown variable `{name}`"),
                u.and_then(|u| u.suggestion)
                    .map(|s| format!("did you mean `{}`?", s.trim_end_matches('.'))),
            ));
        }
        let fields = root_fields(name);
        for f in &fields {
            self.read(f);
        }
        let t = T::derived(Ty::Map, 1, true);
        self.loop_read(&t, e)?;
        Ok(t)
    }

    fn select(&mut self, s: &cel::common::ast::SelectExpr, e: &IdedExpr) -> Result<T, CelIssue> {
        // `google.protobuf.Timestamp`: a type name.
        if let Some(segments) = qualified_name(e) {
            let unbound = segments.first().is_some_and(|r| self.binding(r).is_none());
            if unbound && QUALIFIED_TYPE_NAMES.contains(&segments.join(".").as_str()) {
                return Ok(T::of(Ty::Type));
            }
        }
        // `m.role` / `m.content` of a message element.
        if let Expr::Ident(v) = &s.operand.expr {
            if let Some(b) = self.binding(v) {
                if b.t.ty == Ty::Message {
                    if s.test {
                        return Ok(T::of(Ty::Bool));
                    }
                    return match s.field.as_str() {
                        "role" | "content" => Ok(T {
                            size: b.t.size,
                            request: true,
                            ..T::of(Ty::Str)
                        }),
                        other => Err(issue(
                            Code::UnknownField,
                            format!("a message has no field `{other}`"),
                            Some(String::from("a message has `role` and `content`")),
                        )),
                    };
                }
            } else if ROOTS.contains(&v.as_str()) {
                let access = if s.test { Access::Test } else { Access::Read };
                return self.root_member(v, &s.field, access, e);
            }
        }
        // `request.headers.name`.
        if let Expr::Select(inner) = &s.operand.expr {
            if super::is_headers(inner) && self.binding("request").is_none() {
                let f = self.header(&s.field)?;
                self.read(&FieldRef::Headers);
                if s.test {
                    return Ok(T::of(Ty::Bool));
                }
                self.access_absent(&f, e);
                let t = T {
                    field: Some(f),
                    ..T::derived(Ty::Str, 1, true)
                };
                self.loop_read(&t, e)?;
                return Ok(t);
            }
        }
        let operand = self.expr(&s.operand)?;
        if s.test {
            return Ok(T::of(Ty::Bool));
        }
        if operand.ty == Ty::Message && !matches!(s.field.as_str(), "role" | "content") {
            return Err(issue(
                Code::UnknownField,
                format!("`{}`: a message has no field `{}`", show(e), s.field),
                Some(String::from("a message has `role` and `content`")),
            ));
        }
        if operand.ty == Ty::Message {
            // One pass over every message's text, whatever the macro's length.
            if operand.size > 0 {
                self.pass(1, e)?;
            }
            return Ok(T::derived(Ty::Str, operand.size, operand.request));
        }
        if operand.ty.known() && !matches!(operand.ty, Ty::Map | Ty::Message) {
            return Err(type_err(format!(
                "`{}` selects a field of {}",
                show(e),
                operand.ty.name()
            )));
        }
        Ok(T::derived(Ty::Dyn, operand.size, operand.request))
    }

    /// A header name written in a condition: lower case, or a load error.
    fn header(&self, name: &str) -> Result<FieldRef, CelIssue> {
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(issue(
                Code::HeaderCase,
                format!(
                    "header names are lower-case in `request.headers`, so `{name}` never matches"
                ),
                Some(format!("write `{}`", name.to_ascii_lowercase())),
            ));
        }
        Ok(FieldRef::Header(name.to_string()))
    }

    /// `root.member`, read as `access` says.
    fn root_member(
        &mut self,
        root: &str,
        member: &str,
        access: Access,
        e: &IdedExpr,
    ) -> Result<T, CelIssue> {
        let (f, ty) = FieldRef::resolve(root, Some(member), self.attrs).map_err(|u| {
            let code = if root == "shield" {
                Code::InvalidShieldName
            } else {
                Code::UnknownField
            };
            issue(
                code,
                u.message,
                u.suggestion.map(|s| format!("did you mean `{s}`?")),
            )
        })?;
        self.read(&f);
        if access == Access::Test {
            return Ok(T::derived(Ty::Bool, 0, true));
        }
        if access == Access::Read && matches!(f, FieldRef::Shield(_)) {
            self.access_absent(&f, e);
        }
        let mut t = t_of_field(f, ty);
        if access == Access::Optional {
            // An optional, whatever the field's type; as large as the field.
            t.ty = Ty::Dyn;
            t.nullable = false;
        }
        self.loop_read(&t, e)?;
        Ok(t)
    }

    fn call(&mut self, c: &CallExpr, e: &IdedExpr) -> Result<T, CelIssue> {
        let name = c.func_name.as_str();
        match (name, c.target.as_deref(), c.args.as_slice()) {
            (op::LOGICAL_AND | op::LOGICAL_OR, None, [a, b]) => {
                let and = name == op::LOGICAL_AND;
                let facts = |x: &IdedExpr, sc: &Scope<'_>| {
                    if and {
                        positive(x, sc)
                    } else {
                        negative(x, sc)
                    }
                };
                let sc = self.scope();
                let (fa, fb) = (facts(a, &sc), facts(b, &sc));
                // Each side is checked knowing what the other establishes (CEL's `&&` and `||`
                // are commutative for errors).
                let ta = self.expr_with(fb, a)?;
                let tb = self.expr_with(fa, b)?;
                for (t, x) in [(&ta, a), (&tb, b)] {
                    if t.ty.known() && t.ty != Ty::Bool {
                        return Err(type_err(format!(
                            "`{}` is {}, and `{}` needs bools",
                            show(x),
                            t.ty.name(),
                            if and { "&&" } else { "||" }
                        )));
                    }
                }
                Ok(T::of(Ty::Bool))
            }
            (op::LOGICAL_NOT, None, [a]) => {
                let t = self.expr(a)?;
                if t.ty.known() && t.ty != Ty::Bool {
                    return Err(type_err(format!(
                        "`!` needs a bool, and `{}` is {}",
                        show(a),
                        t.ty.name()
                    )));
                }
                Ok(T::of(Ty::Bool))
            }
            (op::NOT_STRICTLY_FALSE, None, [a]) => {
                self.expr(a)?;
                Ok(T::of(Ty::Bool))
            }
            (op::CONDITIONAL, None, [cond, yes, no]) => {
                let tc = self.expr(cond)?;
                if tc.ty.known() && tc.ty != Ty::Bool {
                    return Err(type_err(format!(
                        "the condition of `? :` is {}, not a bool: `{}`",
                        tc.ty.name(),
                        show(cond)
                    )));
                }
                let sc = self.scope();
                let (pos, neg) = (positive(cond, &sc), negative(cond, &sc));
                let ty = self.expr_with(pos, yes)?;
                let tn = self.expr_with(neg, no)?;
                let size = ty.size.max(tn.size);
                Ok(T {
                    lits: ty.lits.max(tn.lits),
                    ..T::derived(
                        if ty.ty == tn.ty { ty.ty } else { Ty::Dyn },
                        size,
                        ty.request || tn.request,
                    )
                })
            }
            (op::NEGATE, None, [a]) => {
                let t = self.expr(a)?;
                if t.ty.known() && !matches!(t.ty, Ty::Int | Ty::Double) {
                    return Err(type_err(format!(
                        "`-` needs a number, and `{}` is {}",
                        show(a),
                        t.ty.name()
                    )));
                }
                self.use_nullable(&t, a);
                Ok(T::derived(t.ty, 0, t.request))
            }
            (op::EQUALS | op::NOT_EQUALS, None, [a, b]) => {
                let (ta, tb) = (self.expr(a)?, self.expr(b)?);
                for (x, y, tx) in [(&ta, &tb, a), (&tb, &ta, b)] {
                    if y.ty == Ty::Null
                        && x.ty.known()
                        && x.ty != Ty::Null
                        && !x.nullable
                        && x.field.is_some()
                    {
                        return Err(type_err(format!(
                            "`{}` is never null, so `{}` is always {}",
                            show(tx),
                            show(e),
                            name == op::NOT_EQUALS
                        )));
                    }
                }
                if ta.ty != Ty::Null && tb.ty != Ty::Null && !comparable(ta.ty, tb.ty) {
                    return Err(type_err(format!(
                        "`{}` compares {} with {}: it is always {}",
                        show(e),
                        ta.ty.name(),
                        tb.ty.name(),
                        name == op::NOT_EQUALS
                    )));
                }
                Ok(T::derived(Ty::Bool, 0, ta.request || tb.request))
            }
            (op::LESS | op::LESS_EQUALS | op::GREATER | op::GREATER_EQUALS, None, [a, b]) => {
                let (ta, tb) = (self.expr(a)?, self.expr(b)?);
                if !orderable(ta.ty, tb.ty) {
                    return Err(type_err(format!(
                        "`{}` orders {} and {}, which have no ordering (it fails on every request)",
                        show(e),
                        ta.ty.name(),
                        tb.ty.name()
                    )));
                }
                self.use_nullable(&ta, a);
                self.use_nullable(&tb, b);
                Ok(T::derived(Ty::Bool, 0, ta.request || tb.request))
            }
            (op::ADD | op::SUBSTRACT | op::MULTIPLY | op::DIVIDE | op::MODULO, None, [a, b]) => {
                let (ta, tb) = (self.expr(a)?, self.expr(b)?);
                self.use_nullable(&ta, a);
                self.use_nullable(&tb, b);
                if let Some(ty) = time_arithmetic(name, ta.ty, tb.ty) {
                    return match ty {
                        Some(ty) => Ok(T::derived(ty, 0, ta.request || tb.request)),
                        None => Err(type_err(format!(
                            "`{}` applies `{}` to {} and {} (a timestamp takes `+` and `-` of a duration, `-` of a timestamp gives a duration, durations add and subtract)",
                            show(e),
                            op_symbol(name),
                            ta.ty.name(),
                            tb.ty.name()
                        ))),
                    };
                }
                let add = name == op::ADD;
                let ok_kind = |t: Ty| {
                    !t.known()
                        || t.numeric()
                        || (add && matches!(t, Ty::Str | Ty::Bytes | Ty::List))
                };
                let same = !ta.ty.known() || !tb.ty.known() || ta.ty == tb.ty;
                if !(ok_kind(ta.ty) && ok_kind(tb.ty) && same) {
                    return Err(type_err(format!(
                        "`{}` applies `{}` to {} and {} (CEL does not convert between types; use `double(x)` or `int(x)`)",
                        show(e),
                        op_symbol(name),
                        ta.ty.name(),
                        tb.ty.name()
                    )));
                }
                let ty = if ta.ty.known() { ta.ty } else { tb.ty };
                let size = if add {
                    ta.size.saturating_add(tb.size)
                } else {
                    0
                };
                self.grow(size, e)?;
                let t = T {
                    elem: if ta.elem == tb.elem { ta.elem } else { Ty::Dyn },
                    lits: if add {
                        ta.lits.saturating_add(tb.lits)
                    } else {
                        0
                    },
                    ..T::derived(ty, size, ta.request || tb.request)
                };
                self.literal_bytes(&t, e)?;
                Ok(t)
            }
            (op::IN, None, [needle, hay]) => self.in_op(needle, hay, e),
            (op::INDEX, None, [target, key]) => self.index(target, key, e),
            (op::OPT_INDEX | op::OPT_SELECT, None, [target, key]) => {
                // `a[?k]` / `a.?k`: absent is an empty optional, not an error; a literal key is
                // still checked as the field it names.
                if let Some(k) = string_lit(key) {
                    if let Some(t) = self.named_access(target, &k, true, e)? {
                        return Ok(T { ty: Ty::Dyn, ..t });
                    }
                }
                let t = self.expr(target)?;
                self.expr(key)?;
                Ok(T::derived(Ty::Dyn, t.size, t.request))
            }
            _ => self.function(c, e),
        }
    }

    fn in_op(&mut self, needle: &IdedExpr, hay: &IdedExpr, e: &IdedExpr) -> Result<T, CelIssue> {
        // `'name' in request.headers` tests presence; the name must be lower case.
        if let Expr::Select(inner) = &hay.expr {
            if super::is_headers(inner) {
                if let Some(name) = string_lit(needle) {
                    self.header(&name)?;
                }
            }
        }
        if let (Expr::Ident(root), Some(name)) = (&hay.expr, string_lit(needle)) {
            if root == "shield" && self.binding("shield").is_none() {
                if let Err(fixed) = check_shield_name(&name) {
                    return Err(issue(
                        Code::InvalidShieldName,
                        format!("shield scores are named in lower case with `_` for `-`, so `'{name}' in shield` is always false"),
                        Some(format!("write `'{fixed}' in shield`, or `has(shield.{fixed})`")),
                    ));
                }
            }
        }
        let tn = self.expr(needle)?;
        let th = self.expr(hay)?;
        if th.ty.known() && !matches!(th.ty, Ty::List | Ty::Map | Ty::Message) {
            return Err(type_err(format!(
                "`{}`: `in` needs a list or a map on the right, and `{}` is {}",
                show(e),
                show(hay),
                th.ty.name()
            )));
        }
        if th.ty == Ty::List
            && th.elem.known()
            && tn.ty.known()
            && tn.ty != Ty::Null
            && !comparable(tn.ty, th.elem)
        {
            return Err(type_err(format!(
                "`{}` looks for {} in a list of {}s: it is always false",
                show(e),
                tn.ty.name(),
                th.elem
                    .name()
                    .trim_start_matches("a ")
                    .trim_start_matches("an ")
            )));
        }
        Ok(T::derived(Ty::Bool, 0, tn.request || th.request))
    }

    /// `root[k]`, `root[?k]`, `root.?k` and the same on `request.headers`, with a literal key:
    /// checked as the field it names (`principal['tierr']` is an unknown field).
    fn named_access(
        &mut self,
        target: &IdedExpr,
        key: &str,
        optional: bool,
        e: &IdedExpr,
    ) -> Result<Option<T>, CelIssue> {
        if let Expr::Select(inner) = &target.expr {
            if super::is_headers(inner) && self.binding("request").is_none() {
                let f = self.header(key)?;
                self.read(&FieldRef::Headers);
                if !optional {
                    self.access_absent(&f, e);
                }
                let t = T {
                    field: Some(f),
                    ..T::derived(Ty::Str, 1, true)
                };
                self.loop_read(&t, e)?;
                return Ok(Some(t));
            }
        }
        if let Expr::Ident(root) = &target.expr {
            if self.binding(root).is_none() && ROOTS.contains(&root.as_str()) {
                let access = if optional {
                    Access::Optional
                } else {
                    Access::Read
                };
                return self.root_member(root, key, access, e).map(Some);
            }
        }
        Ok(None)
    }

    fn index(&mut self, target: &IdedExpr, key: &IdedExpr, e: &IdedExpr) -> Result<T, CelIssue> {
        if let (Some(k), Expr::Ident(root)) = (string_lit(key), &target.expr) {
            if root != "shield" {
                if let Some(t) = self.named_access(target, &k, false, e)? {
                    return Ok(t);
                }
            }
        }
        if let Some((f, _)) = field_of(e, &self.scope()) {
            match &f {
                FieldRef::Header(h) => {
                    self.header(h)?;
                    self.read(&FieldRef::Headers);
                }
                FieldRef::Shield(s) => {
                    if let Err(fixed) = check_shield_name(s) {
                        return Err(issue(
                            Code::InvalidShieldName,
                            format!("shield scores are named in lower case with `_` for `-`, so `shield['{s}']` never matches"),
                            Some(format!("write `shield.{fixed}`")),
                        ));
                    }
                    self.read(&f);
                }
                _ => {}
            }
            self.access_absent(&f, e);
            let ty = if matches!(f, FieldRef::Header(_)) {
                Ty::Str
            } else {
                Ty::Dyn
            };
            let t = T {
                field: Some(f),
                ..T::derived(ty, 1, true)
            };
            self.loop_read(&t, e)?;
            return Ok(t);
        }
        let tt = self.expr(target)?;
        let tk = self.expr(key)?;
        match tt.ty {
            Ty::List => {
                if tk.ty.known() && !matches!(tk.ty, Ty::Int | Ty::Uint) {
                    return Err(type_err(format!(
                        "`{}` indexes a list with {}",
                        show(e),
                        tk.ty.name()
                    )));
                }
                Ok(T::derived(tt.elem, tt.size, tt.request))
            }
            Ty::Map | Ty::Message | Ty::Dyn => Ok(T::derived(Ty::Dyn, tt.size, tt.request)),
            other => Err(type_err(format!("`{}` indexes {}", show(e), other.name()))),
        }
    }

    fn comprehension(&mut self, c: &ComprehensionExpr, e: &IdedExpr) -> Result<T, CelIssue> {
        // Inside another macro, only a short list written out (`['a', 'b'].exists(p, ...)`) may
        // be ranged over: the inner macro then costs at most that many steps per outer step.
        let short_list =
            matches!(&c.iter_range.expr, Expr::List(l) if l.elements.len() <= MAX_LITERAL_RANGE);
        let nested = self.comprehensions > 0;
        if self.comprehensions > 1 || (self.comprehensions == 1 && !short_list) {
            return Err(issue(
                Code::CelTooComplex,
                format!(
                    "`{}` runs a list macro inside another one: the cost grows with the product of the list sizes",
                    show(e)
                ),
                Some(format!("split it into two conditions or two rules (a macro may run inside another only over a list literal of at most {MAX_LITERAL_RANGE} items, one level deep)")),
            ));
        }
        let range = self.expr(&c.iter_range)?;
        if self.comprehensions == 1 && range.request {
            return Err(issue(
                Code::CelTooComplex,
                format!(
                    "`{}` runs a list macro over request data inside another one: the cost grows with the product of the list sizes",
                    show(e)
                ),
                Some(String::from("split it into two conditions, or into two rules")),
            ));
        }
        if range.ty.known() && !matches!(range.ty, Ty::List | Ty::Map) {
            return Err(type_err(format!(
                "`{}` ranges over {}: `exists`, `all`, `map` and `filter` need a list or a map",
                show(&c.iter_range),
                range.ty.name()
            )));
        }
        let elem = if range.ty == Ty::List {
            range.elem
        } else {
            Ty::Dyn
        };
        let accu = self.expr(&c.accu_init)?;
        let n = self.bound.len();
        self.bound.push(Binding {
            name: c.iter_var.clone(),
            t: T {
                size: range.size,
                ..T::derived(elem, range.size, range.request)
            },
            request_elem: range.request,
        });
        if let Some(v2) = &c.iter_var2 {
            self.bound.push(Binding {
                name: v2.clone(),
                t: T::derived(Ty::Dyn, range.size, range.request),
                request_elem: range.request,
            });
        }
        self.bound.push(Binding {
            name: c.accu_var.clone(),
            t: accu.clone(),
            request_elem: true,
        });
        self.comprehensions = self.comprehensions.saturating_add(1);
        let outer = self.in_request_loop;
        // Only a short literal list may run a body that reads request text: its cost is a small
        // multiple of the text. Over request data, or a long list, it would be the product.
        let short_literal = !range.request && range.count.is_some_and(|n| n <= MAX_LITERAL_RANGE);
        // Inside another macro, the body may read no request text but the elements (the two
        // loops' steps multiply).
        self.in_request_loop = outer || nested || !short_literal;
        let outer_repeat = self.repeat;
        if short_literal {
            let n = range
                .count
                .map_or(1, |n| u64::try_from(n).unwrap_or(u64::MAX));
            self.repeat = self.repeat.saturating_mul(n.max(1));
        }
        let result = (|| {
            self.expr(&c.loop_cond)?;
            let step = self.expr(&c.loop_step)?;
            let result = self.expr(&c.result)?;
            Ok::<_, CelIssue>((step, result))
        })();
        self.repeat = outer_repeat;
        self.in_request_loop = outer;
        self.comprehensions = self.comprehensions.saturating_sub(1);
        self.bound.truncate(n);
        let (step, result) = result?;
        // `map` / `filter` accumulate a list as large as the range times what each step adds.
        let builds = result.ty == Ty::List || accu.ty == Ty::List;
        let count = u32::try_from(range.count.unwrap_or(0)).unwrap_or(u32::MAX);
        let size = match (builds, short_literal, range.count) {
            (false, _, _) => 0,
            (true, true, _) | (true, false, Some(_)) => count.saturating_mul(step.size),
            // Over request data: one step per element, and each element takes at least 12 bytes
            // of the request (`{"role":""}`), so literal text added per step is a multiple of
            // the request's size.
            (true, false, None) => range
                .size
                .max(1)
                .saturating_mul(step.size.max(1))
                .saturating_add(u32::try_from(step.lits.div_ceil(12)).unwrap_or(u32::MAX)),
        };
        self.grow(size, e)?;
        let lits = match (builds, range.count) {
            (false, _) => 0,
            (true, Some(n)) => (n as u64).saturating_mul(step.lits),
            (true, None) => step.lits,
        };
        let t = T {
            lits,
            ..T::derived(
                if result.ty.known() {
                    result.ty
                } else {
                    accu.ty
                },
                size,
                range.request,
            )
        };
        self.literal_bytes(&t, e)?;
        Ok(t)
    }

    /// `optional.of(x)`, `strings.quote(x)`: a call whose target spells a name that is not a
    /// variable is a call of the qualified function (as the interpreter resolves it). `None`
    /// when the target is not such a name (or is a misspelt variable, for its suggestion).
    fn qualified_function(&mut self, c: &CallExpr, e: &IdedExpr) -> Option<Result<T, CelIssue>> {
        let segments = qualified_name(c.target.as_deref()?)?;
        let root = segments.first()?;
        if ROOTS.contains(&root.as_str()) || self.binding(root).is_some() {
            return None;
        }
        let name = format!("{}.{}", segments.join("."), c.func_name);
        if !function_exists(&name, false) {
            // `reqest.model.startsWith('x')`: a misspelt variable, or a method called on an
            // unknown one, is reported as the unknown variable.
            let misspelt_variable = FieldRef::resolve(root, Some(""), &[])
                .err()
                .is_some_and(|u| u.suggestion.is_some());
            if misspelt_variable || function_exists(&c.func_name, true) {
                return None;
            }
            return Some(Err(issue(
                Code::CelUnknownFunction,
                format!("unknown function `{name}` (and `{root}` is not a variable)"),
                None,
            )));
        }
        let call = CallExpr {
            func_name: name,
            target: None,
            args: c.args.clone(),
        };
        Some(self.function(&call, e))
    }

    fn function(&mut self, c: &CallExpr, e: &IdedExpr) -> Result<T, CelIssue> {
        unexpanded_macro(c, e)?;
        if let Some(t) = self.qualified_function(c, e) {
            return t;
        }
        let name = c.func_name.as_str();
        let target = match &c.target {
            Some(t) => Some(self.expr(t)?),
            None => None,
        };
        let mut args = Vec::with_capacity(c.args.len());
        for a in &c.args {
            args.push(self.expr(a)?);
        }
        let request = target.as_ref().is_some_and(|t| t.request) || args.iter().any(|a| a.request);
        // The receiver: `x.f()`, or the first argument of a global call.
        let recv = target.as_ref().or(args.first());
        let recv_expr = c.target.as_deref().or(c.args.first());
        let want_str = |t: Option<&T>| -> Result<(), CelIssue> {
            match t {
                Some(t) if t.ty.known() && t.ty != Ty::Str => Err(type_err(format!(
                    "`{}` calls `{name}` on {}, which needs a string",
                    show(e),
                    t.ty.name()
                ))),
                _ => Ok(()),
            }
        };
        if let (Some(r), Some(x)) = (recv, recv_expr) {
            if !matches!(
                name,
                "string" | "dyn" | "type" | "bool" | "int" | "uint" | "double" | "bytes"
            ) {
                let r = r.clone();
                self.use_nullable(&r, x);
            }
        }
        if let Some(t) = self.library(c, e, target.as_ref(), &args)? {
            return Ok(t);
        }
        let size_of_recv = recv.map_or(0, |t| t.size);
        let t = match name {
            "size" => {
                if let Some(r) = recv {
                    if r.ty.known()
                        && !matches!(r.ty, Ty::Str | Ty::Bytes | Ty::List | Ty::Map | Ty::Message)
                    {
                        return Err(type_err(format!(
                            "`{}`: `size` does not apply to {}",
                            show(e),
                            r.ty.name()
                        )));
                    }
                }
                T::derived(Ty::Int, 0, request)
            }
            "contains" | "startsWith" | "endsWith" => {
                want_str(recv)?;
                let arg = if c.target.is_some() {
                    args.first()
                } else {
                    args.get(1)
                };
                if let Some(a) = arg.filter(|a| a.ty.known() && a.ty != Ty::Str) {
                    return Err(type_err(format!(
                        "`{}`: `{name}` takes a string, not {}",
                        show(e),
                        a.ty.name()
                    )));
                }
                T::derived(Ty::Bool, 0, request)
            }
            "matches" => {
                want_str(recv)?;
                let pattern_arg = if c.target.is_some() {
                    c.args.first()
                } else {
                    c.args.get(1)
                };
                let Some(pattern) = pattern_arg.and_then(string_lit) else {
                    return Err(issue(
                        Code::CelRegex,
                        format!("`{}`: the pattern of `matches` must be a string literal", show(e)),
                        Some(String::from(
                            "a pattern computed from the request would be compiled on every request",
                        )),
                    ));
                };
                build_regex(&pattern, false)
                    .map_err(|msg| issue(Code::CelRegex, format!("`{}`: {msg}", show(e)), None))?;
                T::derived(Ty::Bool, 0, request)
            }
            "lowerAscii" | "upperAscii" | "trim" | "reverse" | "substring" | "charAt" => {
                want_str(recv)?;
                T {
                    lits: recv.map_or(0, |r| r.lits),
                    ..T::derived(Ty::Str, size_of_recv, request)
                }
            }
            "int" => T::derived(Ty::Int, 0, request),
            "uint" => T::derived(Ty::Uint, 0, request),
            "double" => T::derived(Ty::Double, 0, request),
            // The text of a number, bool, timestamp or duration is bounded, but not by its
            // size in the request (`-5e-324` prints 327 characters).
            "string" => T {
                lits: recv.map_or(0, |r| {
                    if matches!(r.ty, Ty::Str | Ty::Bytes) {
                        r.lits
                    } else {
                        r.lits.saturating_add(MAX_SCALAR_TEXT)
                    }
                }),
                ..T::derived(Ty::Str, size_of_recv, request)
            },
            "bool" => T::derived(Ty::Bool, 0, request),
            "bytes" => T {
                lits: recv.map_or(0, |r| r.lits),
                ..T::derived(Ty::Bytes, size_of_recv, request)
            },
            "type" => T::derived(Ty::Type, 0, request),
            "dyn" => match recv {
                Some(r) => T {
                    ty: Ty::Dyn,
                    ..r.clone()
                },
                None => T::of(Ty::Dyn),
            },
            _ => {
                if !function_exists(name, c.target.is_some()) {
                    return Err(issue(
                        Code::CelUnknownFunction,
                        format!("unknown function `{name}`"),
                        crate::suggest::closest(
                            name,
                            KNOWN_FUNCTIONS.iter().copied().chain(library::functions()),
                        )
                        .map(|s| format!("did you mean `{s}`?")),
                    ));
                }
                // Untyped here (`orValue`, `value`, ...): as large as all its inputs together.
                let size = target
                    .iter()
                    .chain(args.iter())
                    .fold(0u32, |acc, t| acc.saturating_add(t.size));
                let lits = target
                    .iter()
                    .chain(args.iter())
                    .fold(0u64, |acc, t| acc.saturating_add(t.lits));
                self.grow(size, e)?;
                T {
                    lits,
                    ..T::derived(Ty::Dyn, size, request)
                }
            }
        };
        Ok(t)
    }
}

/// The type of `a <op> b` when a timestamp or a duration is involved: `None` when neither is,
/// `Some(None)` when the operator does not apply to them.
fn time_arithmetic(name: &str, a: Ty, b: Ty) -> Option<Option<Ty>> {
    use Ty::{Duration as D, Dyn, Timestamp as Ts};
    if !matches!(a, Ts | D) && !matches!(b, Ts | D) {
        return None;
    }
    Some(match (name, a, b) {
        (op::ADD, Ts, D) | (op::ADD, D, Ts) | (op::SUBSTRACT, Ts, D) => Some(Ts),
        (op::ADD | op::SUBSTRACT, D, D) | (op::SUBSTRACT, Ts, Ts) => Some(D),
        (op::ADD | op::SUBSTRACT, Ts | D, Dyn) | (op::ADD | op::SUBSTRACT, Dyn, Ts | D) => {
            Some(Dyn)
        }
        _ => None,
    })
}

fn op_symbol(name: &str) -> &'static str {
    match name {
        op::ADD => "+",
        op::SUBSTRACT => "-",
        op::MULTIPLY => "*",
        op::DIVIDE => "/",
        _ => "%",
    }
}

/// Most passes over request text one condition may make per evaluation ([`Checker::pass`]): at
/// the filter's 1 MiB body limit, tens of milliseconds of scanning at worst.
const MAX_TEXT_PASSES: u64 = 64;

/// The longest text of a number, a bool, a timestamp or a duration written as a string (a double
/// prints every digit: `5e-324` is 327 characters): what `string(x)` of one builds.
pub(super) const MAX_SCALAR_TEXT: u64 = 420;

/// Most literal text an expression may build on one evaluation.
const MAX_LITERAL_BYTES: u64 = 64 * 1024;

/// Longest literal list a list macro may range over while reading request text in its body.
const MAX_LITERAL_RANGE: usize = 32;

/// Type names CEL has as identifiers (`type(x) == string`).
const TYPE_NAMES: &[&str] = &[
    "int",
    "uint",
    "double",
    "string",
    "bool",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
    "dyn",
    "optional_type",
];

/// Macros the parser does not expand: CEL's two-variable comprehensions and the optional
/// library's `optMap` / `optFlatMap` (left as calls, their variables would be reported as
/// unknown).
fn unexpanded_macro(c: &CallExpr, e: &IdedExpr) -> Result<(), CelIssue> {
    let name = c.func_name.as_str();
    let why = match (name, c.target.is_some(), c.args.len()) {
        ("all" | "exists" | "exists_one" | "existsOne", true, 3) => {
            "two-variable comprehensions (`list.exists(i, v, ...)`, `map.all(k, v, ...)`) are not supported"
        }
        ("transformList" | "transformMap" | "transformMapEntry", true, 3 | 4) => {
            "`transformList`, `transformMap` and `transformMapEntry` are not supported"
        }
        ("optMap" | "optFlatMap", true, 2) => {
            "`optMap` and `optFlatMap` are not supported"
        }
        _ => return Ok(()),
    };
    Err(issue(
        Code::CelUnsupported,
        format!("`{}`: {why}", show(e)),
        Some(String::from(
            "write it with the one-variable macros (`exists`, `all`, `exists_one`, `map`, `filter`) or with `hasValue()` / `value()` / `orValue()`",
        )),
    ))
}

/// Type names written with a package (`type(t) == google.protobuf.Timestamp`).
const QUALIFIED_TYPE_NAMES: &[&str] = &["google.protobuf.Timestamp", "google.protobuf.Duration"];

/// The names of `a.b.c` (an identifier and the fields selected from it), if `e` is one.
fn qualified_name(e: &IdedExpr) -> Option<Vec<String>> {
    let mut names = Vec::new();
    let mut at = e;
    loop {
        match &at.expr {
            Expr::Ident(n) => {
                names.push(n.clone());
                names.reverse();
                return Some(names);
            }
            Expr::Select(s) if !s.test => {
                names.push(s.field.clone());
                at = &s.operand;
            }
            _ => return None,
        }
    }
}

/// Functions the checker types itself (the rest are looked up in the interpreter).
pub(super) const KNOWN_FUNCTIONS: &[&str] = &[
    "size",
    "contains",
    "startsWith",
    "endsWith",
    "matches",
    "lowerAscii",
    "upperAscii",
    "trim",
    "reverse",
    "substring",
    "charAt",
    "int",
    "uint",
    "double",
    "string",
    "bool",
    "bytes",
    "type",
    "dyn",
];

/// Asks the interpreter whether a function exists: calling it with no arguments fails with
/// "undeclared reference" only when nothing by that name is declared.
fn function_exists(name: &str, member: bool) -> bool {
    let call = IdedExpr {
        id: 1,
        expr: Expr::Call(CallExpr {
            func_name: name.to_string(),
            target: member.then(|| {
                Box::new(IdedExpr {
                    id: 2,
                    expr: Expr::Literal(LiteralValue::String(String::new().into())),
                })
            }),
            args: Vec::new(),
        }),
    };
    let ctx = Context::with_env(std::sync::Arc::clone(env()));
    !matches!(Value::resolve(&call, &ctx), Err(ExecutionError::UndeclaredReference(n)) if n.as_str() == name)
}

/// Facts that hold where `e` is true.
fn positive(e: &IdedExpr, sc: &Scope<'_>) -> Vec<Fact> {
    facts(e, sc, true)
}

/// Facts that hold where `e` is false.
fn negative(e: &IdedExpr, sc: &Scope<'_>) -> Vec<Fact> {
    facts(e, sc, false)
}

/// Facts that hold where `e` evaluates to `truth`: `x != null`, `x == 'lit'`, `x in ['lit']`,
/// `has(shield.x)`, `'h' in request.headers` when true; `x == null` when false; through `!`,
/// `&&` (when true) and `||` (when false).
fn facts(e: &IdedExpr, sc: &Scope<'_>, truth: bool) -> Vec<Fact> {
    let Expr::Call(c) = &e.expr else {
        if let (Expr::Select(s), true) = (&e.expr, truth) {
            if s.test {
                let plain = IdedExpr {
                    id: e.id,
                    expr: Expr::Select(cel::common::ast::SelectExpr {
                        test: false,
                        ..s.clone()
                    }),
                };
                return field_of(&plain, sc)
                    .map(|(f, _)| Fact::Present(f))
                    .into_iter()
                    .collect();
            }
        }
        return Vec::new();
    };
    let null_test = if truth { op::NOT_EQUALS } else { op::EQUALS };
    match (c.func_name.as_str(), c.args.as_slice()) {
        (op::LOGICAL_AND, [a, b]) if truth => [facts(a, sc, true), facts(b, sc, true)].concat(),
        (op::LOGICAL_OR, [a, b]) if !truth => [facts(a, sc, false), facts(b, sc, false)].concat(),
        (op::LOGICAL_NOT, [a]) => facts(a, sc, !truth),
        (name, [a, b]) if name == null_test && is_null(b) => not_null(a, sc),
        (name, [a, b]) if name == null_test && is_null(a) => not_null(b, sc),
        (op::EQUALS, [a, b]) if truth && is_non_null_lit(b) => not_null(a, sc),
        (op::EQUALS, [a, b]) if truth && is_non_null_lit(a) => not_null(b, sc),
        (op::IN, [needle, hay]) if truth => {
            if let Expr::List(l) = &hay.expr {
                if !l.elements.is_empty() && l.elements.iter().all(is_non_null_lit) {
                    return not_null(needle, sc);
                }
                return Vec::new();
            }
            let Some(key) = string_lit(needle) else {
                return Vec::new();
            };
            match &hay.expr {
                Expr::Select(s) if super::is_headers(s) => {
                    vec![Fact::Present(FieldRef::Header(key))]
                }
                Expr::Ident(r) if r == "shield" => vec![Fact::Present(FieldRef::Shield(key))],
                _ => Vec::new(),
            }
        }
        _ => Vec::new(),
    }
}

fn not_null(e: &IdedExpr, sc: &Scope<'_>) -> Vec<Fact> {
    field_of(e, sc)
        .map(|(f, _)| Fact::NotNull(f))
        .into_iter()
        .collect()
}

fn is_null(e: &IdedExpr) -> bool {
    matches!(e.expr, Expr::Literal(LiteralValue::Null))
}

fn is_non_null_lit(e: &IdedExpr) -> bool {
    matches!(&e.expr, Expr::Literal(l) if !matches!(l, LiteralValue::Null))
}

/// Evaluates every constant sub-expression (no variable in it) that is not a literal: one that
/// fails would fail on every request that reaches it.
fn fold_constants(e: &IdedExpr, bound: &mut Vec<String>) -> Result<(), CelIssue> {
    if matches!(e.expr, Expr::Literal(_)) {
        return Ok(());
    }
    if is_constant(e, bound) {
        let ctx = Context::with_env(std::sync::Arc::clone(env()));
        if let Err(err) = Value::resolve(e, &ctx) {
            return Err(issue(
                Code::CelConstant,
                format!("`{}` always fails: {}", show(e), ShowError(&err)),
                None,
            ));
        }
        return Ok(());
    }
    // `strings.quote(x)`: the target names a function, it is not a value.
    if let Expr::Call(c) = &e.expr {
        if c.target
            .as_deref()
            .and_then(qualified_name)
            .is_some_and(|n| {
                n.first()
                    .is_some_and(|r| !ROOTS.contains(&r.as_str()) && !bound.contains(r))
            })
        {
            return c.args.iter().try_for_each(|x| fold_constants(x, bound));
        }
    }
    if let Expr::Comprehension(c) = &e.expr {
        fold_constants(&c.iter_range, bound)?;
        let n = bound.len();
        bound.push(c.iter_var.clone());
        bound.extend(c.iter_var2.iter().cloned());
        bound.push(c.accu_var.clone());
        let r = [&c.accu_init, &c.loop_cond, &c.loop_step, &c.result]
            .into_iter()
            .try_for_each(|x| fold_constants(x, bound));
        bound.truncate(n);
        return r;
    }
    super::children(e)
        .into_iter()
        .try_for_each(|x| fold_constants(x, bound))
}

/// Whether `e` reads no variable (the root variables, or a comprehension variable bound
/// outside it).
fn is_constant(e: &IdedExpr, bound: &[String]) -> bool {
    match &e.expr {
        Expr::Ident(n) => !(ROOTS.contains(&n.as_str()) || bound.iter().any(|b| b == n)),
        Expr::Comprehension(c) => {
            is_constant(&c.iter_range, bound)
                && is_constant(&c.accu_init, bound)
                && [&c.loop_cond, &c.loop_step, &c.result]
                    .iter()
                    .all(|x| is_constant(x, bound))
        }
        _ => super::children(e)
            .into_iter()
            .all(|x| is_constant(x, bound)),
    }
}
