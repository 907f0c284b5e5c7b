//! Compiled conditions: the native condition tree that DSL conditions, and the CEL subset that maps
//! onto it, are compiled into at load time. Field paths are resolved, literals typed, regexes
//! built; evaluating a leaf is a field access and a comparison.
//!
//! Two null semantics share the tree. DSL leaves are *lenient*: a comparison against a null or
//! missing value is false. Leaves translated from CEL are *strict*: they give exactly what the
//! `cel` crate gives on the same context (a missing map key or an ordering on null is an error),
//! so a CEL expression decides the same whether it runs here or in the interpreter. `all`/`any`
//! follow CEL's commutative error rules (`false && error` is false, `true || error` is true).

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::cmp::Ordering;

use regex::Regex;

use crate::context::{FieldValue, View};
use crate::schema::{ElemField, FieldRef};
use crate::truth::{CondError, Elem, Scratch, Truth};

/// A literal operand.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Lit {
    /// Only CEL can write a null literal (the DSL rejects it).
    #[cfg_attr(
        not(feature = "cel"),
        allow(dead_code, reason = "only CEL produces it")
    )]
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

/// Ordering operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OrdOp {
    Gt,
    Gte,
    Lt,
    Lte,
}

/// What a leaf tests.
#[derive(Debug, Clone)]
pub(crate) enum Test {
    /// Equality (numbers compare across int / double).
    Eq(Lit),
    /// Equality with one of the literals.
    In(Vec<Lit>),
    /// Ordering: numbers across int and double, strings, bools (CEL's orderings).
    Ord(OrdOp, Lit),
    /// Substring.
    Contains(String),
    /// Prefix.
    StartsWith(String),
    /// Suffix.
    EndsWith(String),
    /// Regex search (also case-insensitive and any-of string tests).
    Matches(Regex),
    /// A list has an element equal to one of these / a map has one of these keys.
    Has(Vec<Lit>),
    /// Not null and not empty (DSL `exists`).
    Exists,
    /// The key is there, even if null (CEL `has()`).
    #[cfg_attr(
        not(feature = "cel"),
        allow(dead_code, reason = "only CEL produces it")
    )]
    Present,
}

impl Test {
    /// The test with its string literals folded ([`crate::fold::fold`]), for a leaf on a folded
    /// field (`request.prompt_folded`, `request.tools`): a policy's plain phrase then matches
    /// every disguise of it. A
    /// regex is left as written (it is matched against the folded text). (The DSL folds its
    /// values before it builds tests: several needles become one regex.)
    #[cfg_attr(
        not(feature = "cel"),
        allow(dead_code, reason = "only CEL's translation uses it")
    )]
    pub(crate) fn folded(self) -> Test {
        let lit = |l: Lit| match l {
            Lit::Str(s) => Lit::Str(crate::fold::fold_phrase(&s)),
            other => other,
        };
        match self {
            Test::Eq(l) => Test::Eq(lit(l)),
            Test::In(ls) => Test::In(ls.into_iter().map(lit).collect()),
            Test::Has(ls) => Test::Has(ls.into_iter().map(lit).collect()),
            Test::Contains(s) => Test::Contains(crate::fold::fold_phrase(&s)),
            Test::StartsWith(s) => Test::StartsWith(crate::fold::fold_phrase(&s)),
            Test::EndsWith(s) => Test::EndsWith(crate::fold::fold_phrase(&s)),
            other => other,
        }
    }
}

/// One leaf: a field, a test, and how nulls behave.
#[derive(Debug, Clone)]
pub(crate) struct Leaf {
    pub field: FieldRef,
    pub test: Test,
    /// DSL `ne` / `not_in` / `not_contains` / `exists: false`: negates a non-null result.
    pub negate: bool,
    /// CEL semantics (errors) rather than DSL semantics (false).
    pub strict: bool,
    /// Case-insensitive equality for `Eq` / `In` / `Has` string literals.
    pub ignore_case: bool,
    /// Test the field's CEL `size()` (code points of a string, entries of a list or map).
    pub size: bool,
}

/// A compiled condition.
#[derive(Debug, Clone)]
pub(crate) enum Cond {
    Const(bool),
    All(Vec<Cond>),
    Any(Vec<Cond>),
    Not(Box<Cond>),
    Leaf(Leaf),
    /// CEL `list.exists(x, pred)` (`any`) or `list.all(x, pred)` over `request.messages` or
    /// `request.tools`; `pred` reads the element through `FieldRef::Elem`.
    #[cfg_attr(
        not(feature = "cel"),
        allow(dead_code, reason = "only CEL produces it")
    )]
    Each {
        range: FieldRef,
        any: bool,
        pred: Box<Cond>,
    },
    /// A CEL program the native tree cannot express; run by the `cel` interpreter.
    #[cfg(feature = "cel")]
    Cel(alloc::sync::Arc<crate::cel_program::CelProgram>),
}

impl Cond {
    /// The condition with the tests on a list's element folded, for a comprehension over a
    /// folded list (`request.tools`).
    #[cfg(feature = "cel")]
    pub(crate) fn fold_elements(self) -> Cond {
        match self {
            Cond::All(v) => Cond::All(v.into_iter().map(Cond::fold_elements).collect()),
            Cond::Any(v) => Cond::Any(v.into_iter().map(Cond::fold_elements).collect()),
            Cond::Not(c) => Cond::Not(Box::new(c.fold_elements())),
            Cond::Leaf(mut l) if l.field == FieldRef::Elem(ElemField::Value) && !l.size => {
                l.test = l.test.folded();
                Cond::Leaf(l)
            }
            other => other,
        }
    }

    #[cfg_attr(
        not(feature = "cel"),
        allow(
            clippy::only_used_in_recursion,
            reason = "without CEL the scratch space is empty and only passed down"
        )
    )]
    pub(crate) fn eval<'a>(&self, v: View<'a>, scratch: &mut Scratch<'a>) -> Truth {
        match self {
            Cond::Const(b) => Ok(*b),
            Cond::All(children) => {
                let mut err = None;
                for c in children {
                    match c.eval(v, scratch) {
                        Ok(false) => return Ok(false),
                        Ok(true) => {}
                        Err(e) => {
                            err.get_or_insert(e);
                        }
                    }
                }
                err.map_or(Ok(true), Err)
            }
            Cond::Any(children) => {
                let mut err = None;
                for c in children {
                    match c.eval(v, scratch) {
                        Ok(true) => return Ok(true),
                        Ok(false) => {}
                        Err(e) => {
                            err.get_or_insert(e);
                        }
                    }
                }
                err.map_or(Ok(false), Err)
            }
            Cond::Not(c) => c.eval(v, scratch).map(|b| !b),
            Cond::Leaf(leaf) => leaf.eval(v, scratch.elem),
            Cond::Each { range, any, pred } => {
                let outer = scratch.elem;
                let result = match v.get(range) {
                    FieldValue::Messages(ms) => {
                        each(ms.iter().map(Elem::Message), *any, pred, v, scratch)
                    }
                    FieldValue::StrList(l) => {
                        each(l.iter().map(|s| Elem::Str(s)), *any, pred, v, scratch)
                    }
                    other => Err(no_overload(
                        if *any { "exists" } else { "all" },
                        range,
                        &other,
                    )),
                };
                scratch.elem = outer;
                result
            }
            #[cfg(feature = "cel")]
            Cond::Cel(program) => program.eval(v, scratch),
        }
    }

    /// Calls `f` for every field the condition reads.
    pub(crate) fn visit_fields(&self, f: &mut dyn FnMut(&FieldRef)) {
        match self {
            Cond::Const(_) => {}
            Cond::All(c) | Cond::Any(c) => c.iter().for_each(|c| c.visit_fields(f)),
            Cond::Not(c) => c.visit_fields(f),
            Cond::Leaf(l) if matches!(l.field, FieldRef::Elem(_)) => {}
            Cond::Leaf(l) => f(&l.field),
            Cond::Each { range, pred, .. } => {
                f(range);
                pred.visit_fields(f);
            }
            #[cfg(feature = "cel")]
            Cond::Cel(p) => p.reads().iter().for_each(f),
        }
    }

    /// Structural fingerprint used to detect identical conditions (conflict check): a 128-bit
    /// hash of the tree's debug form and `extra` (a plugin reference), written straight into the
    /// hasher.
    pub(crate) fn fingerprint(&self, extra: &dyn core::fmt::Debug) -> u128 {
        struct H(xxhash_rust::xxh3::Xxh3);
        impl core::fmt::Write for H {
            fn write_str(&mut self, s: &str) -> core::fmt::Result {
                self.0.update(s.as_bytes());
                Ok(())
            }
        }
        let mut h = H(xxhash_rust::xxh3::Xxh3::new());
        let _ = core::fmt::Write::write_fmt(&mut h, format_args!("{self:?}|{extra:?}"));
        h.0.digest128()
    }
}

/// `exists` (`any`) / `all` of `pred` over elements, with CEL's error rules (as `Any` / `All`).
fn each<'a>(
    elems: impl Iterator<Item = Elem<'a>>,
    any: bool,
    pred: &Cond,
    v: View<'a>,
    scratch: &mut Scratch<'a>,
) -> Truth {
    let mut err = None;
    for e in elems {
        scratch.elem = Some(e);
        match pred.eval(v, scratch) {
            Ok(b) if b == any => return Ok(any),
            Ok(_) => {}
            Err(e) => {
                err.get_or_insert(e);
            }
        }
    }
    err.map_or(Ok(!any), Err)
}

fn no_such_key(field: &FieldRef) -> CondError {
    CondError(format!("no such key: {}", field.path()))
}

fn no_overload(op: &str, field: &FieldRef, v: &FieldValue<'_>) -> CondError {
    let path = field.path();
    if matches!(v, FieldValue::Null) {
        return CondError(format!(
            "`{path}` is null, and '{op}' does not apply to null (write `{path} != null && ...` to test only requests that carry it)"
        ));
    }
    CondError(format!(
        "found no matching overload for '{op}' applied to {path} ({})",
        type_name(v)
    ))
}

fn type_name(v: &FieldValue<'_>) -> &'static str {
    match v {
        FieldValue::Missing => "missing",
        FieldValue::Null => "null",
        FieldValue::Bool(_) => "bool",
        FieldValue::Int(_) => "int",
        FieldValue::Float(_) => "double",
        FieldValue::Str(_) => "string",
        FieldValue::StrList(_) | FieldValue::Messages(_) => "list",
        FieldValue::StrMap(_) | FieldValue::Principal(_) | FieldValue::Shield(_) => "map",
    }
}

fn str_eq(a: &str, b: &str, ignore_case: bool) -> bool {
    if ignore_case {
        a.chars()
            .flat_map(char::to_lowercase)
            .eq(b.chars().flat_map(char::to_lowercase))
    } else {
        a == b
    }
}

/// CEL-style heterogeneous equality; numbers compare by value across int and double.
fn value_eq(v: &FieldValue<'_>, lit: &Lit, ignore_case: bool) -> bool {
    match (v, lit) {
        (FieldValue::Null, Lit::Null) => true,
        (FieldValue::Bool(a), Lit::Bool(b)) => a == b,
        (FieldValue::Str(a), Lit::Str(b)) => str_eq(a, b, ignore_case),
        (FieldValue::Int(_) | FieldValue::Float(_), Lit::Int(_) | Lit::Float(_)) => {
            num_cmp(v, lit) == Some(Ordering::Equal)
        }
        _ => false,
    }
}

/// CEL's orderings: numbers by value across int and double (NaN orders with nothing), strings
/// by code points, `false < true`. Anything else has no ordering (an error in CEL).
fn ord_cmp(v: &FieldValue<'_>, lit: &Lit) -> Option<Ordering> {
    match (v, lit) {
        (FieldValue::Str(a), Lit::Str(b)) => Some((*a).cmp(b.as_str())),
        (FieldValue::Bool(a), Lit::Bool(b)) => Some(a.cmp(b)),
        _ => num_cmp(v, lit),
    }
}

fn num_cmp(v: &FieldValue<'_>, lit: &Lit) -> Option<Ordering> {
    match (v, lit) {
        (FieldValue::Int(a), Lit::Int(b)) => Some(a.cmp(b)),
        (FieldValue::Int(a), Lit::Float(b)) => (*a as f64).partial_cmp(b),
        (FieldValue::Float(a), Lit::Int(b)) => a.partial_cmp(&(*b as f64)),
        (FieldValue::Float(a), Lit::Float(b)) => a.partial_cmp(b),
        _ => None,
    }
}

fn is_empty(v: &FieldValue<'_>) -> bool {
    match v {
        FieldValue::Missing | FieldValue::Null => true,
        FieldValue::Str(s) => s.is_empty(),
        FieldValue::StrList(l) => l.is_empty(),
        FieldValue::StrMap(m) => m.is_empty(),
        FieldValue::Messages(m) => m.is_empty(),
        FieldValue::Principal(p) => p.iter().all(|(_, v)| v.is_none()),
        FieldValue::Shield(s) => s.is_empty(),
        FieldValue::Bool(_) | FieldValue::Int(_) | FieldValue::Float(_) => false,
    }
}

impl Leaf {
    fn eval(&self, view: View<'_>, elem: Option<Elem<'_>>) -> Truth {
        let v = match (elem, &self.field) {
            (Some(e), FieldRef::Elem(f)) => elem_value(*f, e),
            _ => view.get(&self.field),
        };
        match self.test {
            Test::Present => return Ok(!matches!(v, FieldValue::Missing) != self.negate),
            Test::Exists => return Ok(is_empty(&v) == self.negate),
            _ => {}
        }
        if self.size {
            return self.eval_size(&v);
        }
        self.eval_value(v)
    }

    /// CEL `size(field) <op> n`.
    #[inline(never)]
    fn eval_size(&self, v: &FieldValue<'_>) -> Truth {
        match size_of(v) {
            Some(n) => self.eval_value(FieldValue::Int(n)),
            None if self.strict && matches!(v, FieldValue::Missing) => {
                Err(no_such_key(&self.field))
            }
            None if self.strict => Err(no_overload("size", &self.field, v)),
            None => Ok(false),
        }
    }

    #[inline]
    fn eval_value(&self, v: FieldValue<'_>) -> Truth {
        if self.strict {
            if matches!(v, FieldValue::Missing) {
                return Err(no_such_key(&self.field));
            }
            self.test_value(&v)
        } else if matches!(v, FieldValue::Missing | FieldValue::Null) {
            Ok(false)
        } else {
            // Lenient: a type mismatch is simply false.
            Ok(self.test_value(&v).unwrap_or(false) != self.negate)
        }
    }

    fn test_value(&self, v: &FieldValue<'_>) -> Truth {
        let ic = self.ignore_case;
        match &self.test {
            Test::Eq(lit) => Ok(value_eq(v, lit, ic)),
            Test::In(lits) => Ok(lits.iter().any(|l| value_eq(v, l, ic))),
            Test::Ord(op, lit) => {
                let ord =
                    ord_cmp(v, lit).ok_or_else(|| no_overload(ord_name(*op), &self.field, v))?;
                Ok(match op {
                    OrdOp::Gt => ord == Ordering::Greater,
                    OrdOp::Gte => ord != Ordering::Less,
                    OrdOp::Lt => ord == Ordering::Less,
                    OrdOp::Lte => ord != Ordering::Greater,
                })
            }
            Test::Contains(s) => str_of(v, "contains", &self.field).map(|x| x.contains(s.as_str())),
            Test::StartsWith(s) => {
                str_of(v, "startsWith", &self.field).map(|x| x.starts_with(s.as_str()))
            }
            Test::EndsWith(s) => {
                str_of(v, "endsWith", &self.field).map(|x| x.ends_with(s.as_str()))
            }
            Test::Matches(re) => str_of(v, "matches", &self.field).map(|x| re.is_match(x)),
            Test::Has(lits) => match v {
                FieldValue::StrList(list) => Ok(list
                    .iter()
                    .any(|e| lits.iter().any(|l| value_eq(&FieldValue::Str(e), l, ic)))),
                FieldValue::StrMap(map) => Ok(map
                    .iter()
                    .any(|(k, _)| lits.iter().any(|l| value_eq(&FieldValue::Str(k), l, ic)))),
                _ => Err(no_overload("@in", &self.field, v)),
            },
            Test::Exists | Test::Present => Ok(true),
        }
    }
}

fn elem_value(f: ElemField, e: Elem<'_>) -> FieldValue<'_> {
    match (f, e) {
        (ElemField::Role, Elem::Message(m)) => FieldValue::Str(&m.role),
        (ElemField::Content, Elem::Message(m)) => FieldValue::Str(&m.content),
        (ElemField::Value, Elem::Str(s)) => FieldValue::Str(s),
        _ => FieldValue::Missing,
    }
}

/// CEL `size()`: code points of a string, entries of a list or map.
fn size_of(v: &FieldValue<'_>) -> Option<i64> {
    let n = match v {
        FieldValue::Str(s) => s.chars().count(),
        FieldValue::StrList(l) => l.len(),
        FieldValue::StrMap(m) => m.len(),
        FieldValue::Messages(m) => m.len(),
        FieldValue::Principal(p) => p.len(),
        FieldValue::Shield(s) => s.len(),
        _ => return None,
    };
    i64::try_from(n).ok()
}

fn ord_name(op: OrdOp) -> &'static str {
    match op {
        OrdOp::Gt => "_>_",
        OrdOp::Gte => "_>=_",
        OrdOp::Lt => "_<_",
        OrdOp::Lte => "_<=_",
    }
}

fn str_of<'a>(v: &FieldValue<'a>, op: &str, field: &FieldRef) -> Result<&'a str, CondError> {
    match v {
        FieldValue::Str(s) => Ok(s),
        other => Err(no_overload(op, field, other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::RequestContext;
    use alloc::string::ToString;

    fn ctx() -> RequestContext {
        let mut c = RequestContext::default();
        c.request.model = Some("gpt-4o".into());
        c.request.max_tokens = Some(2000);
        c.principal = alloc::vec![("tier".to_string(), None)];
        c
    }

    fn leaf(field: FieldRef, test: Test, strict: bool) -> Cond {
        Cond::Leaf(Leaf {
            field,
            test,
            negate: false,
            strict,
            ignore_case: false,
            size: false,
        })
    }

    #[test]
    fn lenient_null_is_false_strict_null_errors() {
        let c = ctx();
        let mut s = Scratch::default();
        let t = leaf(
            FieldRef::Temperature,
            Test::Ord(OrdOp::Gt, Lit::Int(1)),
            false,
        );
        assert_eq!(t.eval(c.view(), &mut s), Ok(false));
        let t = leaf(
            FieldRef::Temperature,
            Test::Ord(OrdOp::Gt, Lit::Int(1)),
            true,
        );
        assert!(t.eval(c.view(), &mut s).is_err());
        let t = leaf(
            FieldRef::Principal("tier".into()),
            Test::Eq(Lit::Str("free".into())),
            true,
        );
        assert_eq!(t.eval(c.view(), &mut s), Ok(false));
    }

    #[test]
    fn cel_error_rules_for_and_or() {
        let c = ctx();
        let mut s = Scratch::default();
        let err = leaf(
            FieldRef::Temperature,
            Test::Ord(OrdOp::Gt, Lit::Int(1)),
            true,
        );
        let f = Cond::Const(false);
        let t = Cond::Const(true);
        assert_eq!(
            Cond::All(alloc::vec![err.clone(), f.clone()]).eval(c.view(), &mut s),
            Ok(false)
        );
        assert!(Cond::All(alloc::vec![err.clone(), t.clone()])
            .eval(c.view(), &mut s)
            .is_err());
        assert_eq!(
            Cond::Any(alloc::vec![err.clone(), t]).eval(c.view(), &mut s),
            Ok(true)
        );
        assert!(Cond::Any(alloc::vec![err, f])
            .eval(c.view(), &mut s)
            .is_err());
    }

    #[test]
    fn numbers_compare_across_int_and_double() {
        let c = ctx();
        let mut s = Scratch::default();
        let t = leaf(
            FieldRef::MaxTokens,
            Test::Ord(OrdOp::Gte, Lit::Float(1999.5)),
            true,
        );
        assert_eq!(t.eval(c.view(), &mut s), Ok(true));
        let t = leaf(FieldRef::MaxTokens, Test::Eq(Lit::Float(2000.0)), true);
        assert_eq!(t.eval(c.view(), &mut s), Ok(true));
    }

    #[test]
    fn strings_and_bools_are_ordered_as_cel_orders_them() {
        let mut c = ctx();
        c.request.model = Some("zz".into());
        let mut s = Scratch::default();
        let lt = |f: FieldRef, lit: Lit| leaf(f, Test::Ord(OrdOp::Lt, lit), true);
        assert_eq!(
            lt(FieldRef::Model, Lit::Str("h".into())).eval(c.view(), &mut s),
            Ok(false)
        );
        assert_eq!(
            lt(FieldRef::Model, Lit::Str("zzz".into())).eval(c.view(), &mut s),
            Ok(true)
        );
        assert_eq!(
            lt(FieldRef::Stream, Lit::Bool(true)).eval(c.view(), &mut s),
            Ok(true)
        );
        // Across types there is no ordering: an error, as in CEL.
        assert!(lt(FieldRef::Model, Lit::Int(3))
            .eval(c.view(), &mut s)
            .is_err());
    }

    #[test]
    fn a_null_field_is_named_in_the_error() {
        let c = ctx();
        let mut s = Scratch::default();
        let t = leaf(
            FieldRef::Principal("tier".into()),
            Test::StartsWith("x".into()),
            true,
        );
        let e = t.eval(c.view(), &mut s).unwrap_err();
        assert!(e.0.contains("`principal.tier` is null"), "{}", e.0);
    }
}
