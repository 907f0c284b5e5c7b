//! The YAML DSL (`when.match`): `all` / `any` / `not` over `{field, op, value}` leaves, checked
//! against the context schema and compiled into the native condition tree.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use regex::Regex;
use serde_json::Value;

use crate::condition::{Cond, Leaf, Lit, OrdOp, Test};
use crate::diagnostic::Code;
use crate::model::{Leaf as LeafDoc, Op};
use crate::pattern::build_regex;
use crate::schema::{FieldRef, FieldType};

/// Deepest `all` / `any` / `not` nesting.
pub(crate) const MAX_MATCH_DEPTH: usize = 32;

/// A DSL error: JSON pointer below the `match` node, message, optional help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DslError {
    pub code: Code,
    pub pointer: String,
    pub message: String,
    pub help: Option<String>,
}

fn err(pointer: &str, message: String, help: Option<String>) -> DslError {
    DslError {
        code: Code::InvalidMatch,
        pointer: pointer.to_string(),
        message,
        help,
    }
}

/// Compiles a `match` tree. Collects every error rather than stopping at the first.
pub(crate) fn compile(
    v: &Value,
    attrs: &[String],
    ptr: &str,
    errors: &mut Vec<DslError>,
) -> Option<Cond> {
    compile_at(v, attrs, ptr, errors, 0)
}

fn compile_at(
    v: &Value,
    attrs: &[String],
    ptr: &str,
    errors: &mut Vec<DslError>,
    depth: usize,
) -> Option<Cond> {
    if depth >= MAX_MATCH_DEPTH {
        errors.push(err(
            ptr,
            format!("`all` / `any` / `not` nest deeper than {MAX_MATCH_DEPTH} levels"),
            Some(String::from("split the condition into several rules")),
        ));
        return None;
    }
    let next = depth.saturating_add(1);
    let Value::Object(map) = v else {
        errors.push(err(
            ptr,
            String::from("a match node must be a map"),
            Some(shape_help()),
        ));
        return None;
    };
    for (key, ctor) in [("all", true), ("any", false)] {
        if let Some(children) = map.get(key) {
            if map.len() != 1 {
                errors.push(err(
                    ptr,
                    format!("`{key}` must be the only key of its node"),
                    Some(shape_help()),
                ));
                return None;
            }
            let Value::Array(items) = children else {
                errors.push(err(
                    &format!("{ptr}/{key}"),
                    format!("`{key}` takes a list"),
                    None,
                ));
                return None;
            };
            let before = errors.len();
            let compiled: Vec<Cond> = items
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    compile_at(c, attrs, &format!("{ptr}/{key}/{i}"), errors, next)
                })
                .collect();
            if errors.len() > before {
                return None;
            }
            return Some(if ctor {
                Cond::All(compiled)
            } else {
                Cond::Any(compiled)
            });
        }
    }
    if let Some(child) = map.get("not") {
        if map.len() != 1 {
            errors.push(err(
                ptr,
                String::from("`not` must be the only key of its node"),
                Some(shape_help()),
            ));
            return None;
        }
        return compile_at(child, attrs, &format!("{ptr}/not"), errors, next)
            .map(|c| Cond::Not(Box::new(c)));
    }
    if !map.contains_key("field") {
        errors.push(err(
            ptr,
            String::from("a match node needs `all`, `any`, `not` or `field`"),
            Some(shape_help()),
        ));
        return None;
    }
    let leaf: LeafDoc = match serde_path_to_error::deserialize::<_, LeafDoc>(v) {
        // serde reads `value: null` as "no value"; keep it, to explain why it cannot work.
        Ok(l) if l.value.is_none() && map.get("value") == Some(&Value::Null) => LeafDoc {
            value: Some(Value::Null),
            ..l
        },
        Ok(l) => l,
        Err(e) => {
            let path = e.path().to_string();
            let sub = if path == "." {
                String::new()
            } else {
                format!("/{}", path.replace('.', "/"))
            };
            errors.push(err(
                &format!("{ptr}{sub}"),
                e.into_inner().to_string(),
                None,
            ));
            return None;
        }
    };
    match compile_leaf(&leaf, attrs) {
        Ok(c) => Some(c),
        Err((sub, message, help)) => {
            let mut e = err(&format!("{ptr}/{sub}"), message, help);
            if sub == "field" && leaf.field.starts_with("shield.") {
                e.code = Code::InvalidShieldName;
            }
            errors.push(e);
            None
        }
    }
}

fn shape_help() -> String {
    String::from("write `{all: [...]}`, `{any: [...]}`, `{not: {...}}` or `{field: request.model, op: eq, value: gpt-4o}`")
}

type LeafError = (&'static str, String, Option<String>);

fn compile_leaf(doc: &LeafDoc, attrs: &[String]) -> Result<Cond, LeafError> {
    let (field, ty) = FieldRef::parse_path(&doc.field, attrs).map_err(|e| {
        (
            "field",
            e.message,
            e.suggestion.map(|s| format!("did you mean `{s}`?")),
        )
    })?;
    // Values compared with a folded field (the folded prompt, tool names) are folded the same
    // way (a regex stays as written).
    let folded = (field.folds() && doc.op != Op::Matches)
        .then(|| doc.value.as_ref().map(fold_value))
        .flatten();
    if folded.as_ref().is_some_and(folds_to_nothing) {
        return Err((
            "value",
            String::from(
                "a value folds to nothing (only spaces, invisible characters or marks): it would match every prompt",
            ),
            None,
        ));
    }
    let value = folded.as_ref().or(doc.value.as_ref());
    let op = doc.op;
    let ic = doc.ignore_case;
    let mut negate = false;
    let test = match op {
        Op::Eq | Op::Ne => {
            negate = op == Op::Ne;
            Test::Eq(scalar(value, ty, &doc.field)?)
        }
        Op::In | Op::NotIn => {
            negate = op == Op::NotIn;
            let Some(Value::Array(items)) = value else {
                return Err((
                    "value",
                    format!("`{}` takes a list of values", op_name(op)),
                    None,
                ));
            };
            Test::In(
                items
                    .iter()
                    .map(|i| scalar(Some(i), ty, &doc.field))
                    .collect::<Result<_, _>>()?,
            )
        }
        Op::Gt | Op::Gte | Op::Lt | Op::Lte => {
            if !ty.is_numeric() {
                return Err((
                    "op",
                    format!(
                        "`{}` compares numbers, and `{}` is not a number",
                        op_name(op),
                        doc.field
                    ),
                    None,
                ));
            }
            let lit = match value {
                Some(Value::Number(n)) => number(n),
                _ => return Err(("value", format!("`{}` needs a number", op_name(op)), None)),
            };
            let o = match op {
                Op::Gt => OrdOp::Gt,
                Op::Gte => OrdOp::Gte,
                Op::Lt => OrdOp::Lt,
                _ => OrdOp::Lte,
            };
            Test::Ord(o, lit)
        }
        Op::Contains | Op::NotContains => {
            negate = op == Op::NotContains;
            let needles = strings(value, op)?;
            match ty {
                FieldType::StrList => Test::Has(needles.into_iter().map(Lit::Str).collect()),
                // Header names match in any case.
                FieldType::StrMap => Test::Has(
                    needles
                        .into_iter()
                        .map(|n| Lit::Str(n.to_ascii_lowercase()))
                        .collect(),
                ),
                t if t.is_string() => match (needles.as_slice(), ic) {
                    ([one], false) => Test::Contains(one.clone()),
                    _ => Test::Matches(literal_regex(&needles, ic, "", "")?),
                },
                _ => {
                    return Err((
                        "op",
                        format!("`{}` does not apply to `{}`", op_name(op), doc.field),
                        None,
                    ))
                }
            }
        }
        Op::StartsWith | Op::EndsWith => {
            if !ty.is_string() {
                return Err((
                    "op",
                    format!(
                        "`{}` needs a string field, and `{}` is not one",
                        op_name(op),
                        doc.field
                    ),
                    None,
                ));
            }
            let needles = strings(value, op)?;
            let start = op == Op::StartsWith;
            match (needles.as_slice(), ic) {
                ([one], false) if start => Test::StartsWith(one.clone()),
                ([one], false) => Test::EndsWith(one.clone()),
                _ if start => Test::Matches(literal_regex(&needles, ic, "^", "")?),
                _ => Test::Matches(literal_regex(&needles, ic, "", "$")?),
            }
        }
        Op::Matches => {
            if !ty.is_string() {
                return Err((
                    "op",
                    format!(
                        "`matches` needs a string field, and `{}` is not one",
                        doc.field
                    ),
                    None,
                ));
            }
            let Some(Value::String(p)) = value else {
                return Err((
                    "value",
                    String::from("`matches` needs a regular expression string"),
                    None,
                ));
            };
            Test::Matches(build_regex(p, ic).map_err(|m| ("value", m, None))?)
        }
        Op::Exists => {
            negate = match value {
                None | Some(Value::Bool(true)) => false,
                Some(Value::Bool(false)) => true,
                Some(_) => {
                    return Err(("value", String::from("`exists` takes true or false"), None))
                }
            };
            Test::Exists
        }
    };
    Ok(Cond::Leaf(Leaf {
        field,
        test,
        negate,
        strict: false,
        ignore_case: ic,
        size: false,
    }))
}

/// Whether a folded DSL value holds a string that folded to nothing.
fn folds_to_nothing(v: &Value) -> bool {
    match v {
        Value::String(s) => s.trim().is_empty(),
        Value::Array(items) => items.iter().any(folds_to_nothing),
        _ => false,
    }
}

/// A DSL value with its strings folded ([`crate::fold::fold_phrase`]).
fn fold_value(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(crate::fold::fold_phrase(s)),
        Value::Array(items) => Value::Array(items.iter().map(fold_value).collect()),
        other => other.clone(),
    }
}

fn op_name(op: Op) -> String {
    serde_json::to_value(op)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn number(n: &serde_json::Number) -> Lit {
    match n.as_i64() {
        Some(i) => Lit::Int(i),
        None => Lit::Float(n.as_f64().unwrap_or(f64::NAN)),
    }
}

/// A scalar literal of the field's type.
fn scalar(v: Option<&Value>, ty: FieldType, field: &str) -> Result<Lit, LeafError> {
    let lit = match v {
        None => return Err(("value", String::from("this operator needs a `value`"), None)),
        Some(Value::Null) => {
            return Err((
                "value",
                String::from("comparing with null is always false"),
                Some(String::from(
                    "test presence with `op: exists` (or `value: false` for absence)",
                )),
            ))
        }
        Some(Value::Bool(b)) => Lit::Bool(*b),
        Some(Value::Number(n)) => number(n),
        Some(Value::String(s)) => Lit::Str(s.clone()),
        Some(_) => {
            return Err((
                "value",
                String::from("expected a string, number or bool"),
                None,
            ))
        }
    };
    let ok = match (&lit, ty) {
        (_, FieldType::Dynamic) => !matches!(lit, Lit::Bool(_)),
        (Lit::Str(_), t) => matches!(t, FieldType::Str | FieldType::OptStr),
        (Lit::Int(_) | Lit::Float(_), t) => {
            matches!(t, FieldType::Int | FieldType::OptInt | FieldType::OptFloat)
        }
        (Lit::Bool(_), t) => t == FieldType::Bool,
        (Lit::Null, _) => false,
    };
    if ok {
        Ok(lit)
    } else {
        Err((
            "value",
            format!(
                "`{field}` is {}, but the value is {}",
                type_word(ty),
                lit_word(&lit)
            ),
            None,
        ))
    }
}

fn type_word(t: FieldType) -> &'static str {
    match t {
        FieldType::Str | FieldType::OptStr => "a string",
        FieldType::Int | FieldType::OptInt => "an integer",
        FieldType::OptFloat => "a number",
        FieldType::Bool => "a bool",
        FieldType::StrList => "a list of strings",
        FieldType::StrMap => "a map",
        FieldType::Messages => "a list of messages",
        FieldType::Dynamic => "a number or string",
    }
}

fn lit_word(l: &Lit) -> &'static str {
    match l {
        Lit::Null => "null",
        Lit::Bool(_) => "a bool",
        Lit::Int(_) | Lit::Float(_) => "a number",
        Lit::Str(_) => "a string",
    }
}

fn strings(v: Option<&Value>, op: Op) -> Result<Vec<String>, LeafError> {
    let bad = || {
        (
            "value",
            format!("`{}` takes a string or a list of strings", op_name(op)),
            None,
        )
    };
    match v {
        Some(Value::String(s)) => Ok(alloc::vec![s.clone()]),
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|i| i.as_str().map(str::to_string).ok_or_else(bad))
            .collect(),
        _ => Err(bad()),
    }
}

/// Any of `needles` as literal text (case-insensitive if asked), optionally anchored.
fn literal_regex(needles: &[String], ic: bool, pre: &str, post: &str) -> Result<Regex, LeafError> {
    let alternation: Vec<String> = needles.iter().map(|n| regex::escape(n)).collect();
    build_regex(&format!("{pre}(?:{}){post}", alternation.join("|")), ic)
        .map_err(|m| ("value", m, None))
}
