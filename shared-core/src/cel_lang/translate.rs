//! Translation of the common CEL subset into the native condition tree: comparisons (numbers,
//! strings, bools), `in`, `&&`, `||`, `!`, `has()`, `size()` comparisons, `contains` /
//! `startsWith` / `endsWith` / `matches` with literal arguments, and `exists` / `all` over
//! `request.messages` / `request.tools`. Leaves keep CEL's semantics, errors included.

use cel::common::ast::{
    operators, CallExpr, ComprehensionExpr, Expr, IdedExpr, LiteralValue, SelectExpr,
};

pub(super) use super::Scope;
use super::{field_of, literal, string_lit};
use crate::condition::{Cond, Leaf, Lit, OrdOp, Test};
use crate::pattern::build_regex;
use crate::schema::{FieldRef, FieldType, ROOTS};

/// A CEL-semantics leaf on the field's value (`size: false`) or its `size()`.
fn strict_leaf(field: FieldRef, test: Test, size: bool) -> Cond {
    let test = if field.folds() && !size {
        test.folded()
    } else {
        test
    };
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
pub(super) fn translate(e: &IdedExpr, sc: &Scope<'_>) -> Option<Cond> {
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

/// For an expression the interpreter runs: its translatable top-level `&&` conjuncts, which
/// the index can select the rule by.
pub(super) fn index_hint(e: &IdedExpr, sc: &Scope<'_>) -> Option<Cond> {
    let mut conjuncts = Vec::new();
    flatten_and(e, &mut conjuncts);
    let hints: Vec<Cond> = conjuncts
        .into_iter()
        .filter_map(|c| translate(c, sc))
        .collect();
    (!hints.is_empty()).then_some(Cond::All(hints))
}

fn flatten_and<'a>(e: &'a IdedExpr, out: &mut Vec<&'a IdedExpr>) {
    // Iterative: the operand chain of `&&` may be as long as the depth limit allows.
    let mut stack = vec![e];
    while let Some(x) = stack.pop() {
        match &x.expr {
            Expr::Call(c) if c.func_name == operators::LOGICAL_AND && c.target.is_none() => {
                stack.extend(c.args.iter().rev());
            }
            _ => out.push(x),
        }
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
    let mut pred = translate(pred, &inner)?;
    if range.folds() {
        // Tool names are folded: so are the strings the element is compared with.
        pred = pred.fold_elements();
    }
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
            "matches" => Test::Matches(build_regex(&arg, false).ok()?),
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
