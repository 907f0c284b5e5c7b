//! CEL values and interpreter errors written the way CEL writes them (`256u`, `b"\xff"`,
//! `duration('1.5s')`, `timestamp('2009-02-13T23:31:30Z')`), never as Rust debug text
//! (`UInt(256)`, `Bytes([255])`, `TimeDelta { secs: 1, .. }`). Bounded: long strings, lists and
//! maps are cut, nesting is cut, and callers format through `truth::clip_display`.

use core::fmt::{self, Display, Formatter, Write};

use cel::objects::{Key, OptionalValue};
use cel::{ExecutionError, Value};

/// Characters of a string (bytes of a bytes value) shown before `…`.
const MAX_TEXT: usize = 48;
/// Elements of a list or entries of a map shown before `…`.
const MAX_ITEMS: usize = 6;
/// Nesting shown before `…`.
const MAX_NEST: usize = 3;

/// A value as a CEL literal (or the nearest CEL expression).
pub(crate) struct ShowValue<'a>(pub &'a Value);

/// An interpreter error, with its values written as CEL.
pub(crate) struct ShowError<'a>(pub &'a ExecutionError);

impl Display for ShowValue<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        value(f, self.0, 0)
    }
}

fn string(f: &mut Formatter<'_>, s: &str) -> fmt::Result {
    f.write_char('"')?;
    for (i, c) in s.chars().enumerate() {
        if i == MAX_TEXT {
            f.write_char('…')?;
            break;
        }
        match c {
            '\\' => f.write_str("\\\\")?,
            '"' => f.write_str("\\\"")?,
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            c if c.is_control() => write!(f, "\\u{:04x}", u32::from(c))?,
            c => f.write_char(c)?,
        }
    }
    f.write_char('"')
}

fn bytes(f: &mut Formatter<'_>, b: &[u8]) -> fmt::Result {
    f.write_str("b\"")?;
    for (i, &x) in b.iter().enumerate() {
        if i == MAX_TEXT {
            f.write_char('…')?;
            break;
        }
        match x {
            b'\\' => f.write_str("\\\\")?,
            b'"' => f.write_str("\\\"")?,
            b' '..=b'~' => f.write_char(char::from(x))?,
            _ => write!(f, "\\x{x:02x}")?,
        }
    }
    f.write_char('"')
}

fn double(f: &mut Formatter<'_>, d: f64) -> fmt::Result {
    if d.is_nan() {
        f.write_str("double('NaN')")
    } else if d.is_infinite() {
        f.write_str(if d > 0.0 {
            "double('inf')"
        } else {
            "double('-inf')"
        })
    } else {
        // `{:?}` of an f64 is a CEL double literal (`1.0`, `1e300`, `-0.5`).
        write!(f, "{d:?}")
    }
}

fn key(f: &mut Formatter<'_>, k: &Key) -> fmt::Result {
    match k {
        Key::Int(i) => write!(f, "{i}"),
        Key::Uint(u) => write!(f, "{u}u"),
        Key::Bool(b) => write!(f, "{b}"),
        Key::String(s) => string(f, s),
    }
}

/// `duration('…s')`: seconds with the fraction CEL's `string()` would show (`nanos` has the sign
/// of `secs`, or its own when `secs` is 0).
fn duration(f: &mut Formatter<'_>, secs: i64, nanos: i32) -> fmt::Result {
    f.write_str("duration('")?;
    if secs == 0 && nanos < 0 {
        f.write_char('-')?;
    }
    write!(f, "{secs}")?;
    fraction(f, nanos.unsigned_abs())?;
    f.write_str("s')")
}

/// `.5`, `.000000001`: a fraction of a second without trailing zeros (nothing for 0).
fn fraction(f: &mut Formatter<'_>, nanos: u32) -> fmt::Result {
    if nanos == 0 {
        return Ok(());
    }
    let mut digits: usize = 9;
    let mut n = nanos;
    while n.is_multiple_of(10) {
        n /= 10;
        digits = digits.saturating_sub(1);
    }
    write!(f, ".{n:0digits$}")
}

fn value(f: &mut Formatter<'_>, v: &Value, depth: usize) -> fmt::Result {
    match v {
        Value::Null => f.write_str("null"),
        Value::Bool(b) => write!(f, "{b}"),
        Value::Int(i) => write!(f, "{i}"),
        Value::UInt(u) => write!(f, "{u}u"),
        Value::Float(d) => double(f, *d),
        Value::String(s) => string(f, s),
        Value::Bytes(b) => bytes(f, b),
        Value::Duration(d) => duration(f, d.num_seconds(), d.subsec_nanos()),
        Value::Timestamp(t) => {
            write!(
                f,
                "timestamp('{}",
                t.naive_utc().format("%Y-%m-%dT%H:%M:%S")
            )?;
            fraction(f, t.timestamp_subsec_nanos())?;
            f.write_str("Z')")
        }
        Value::List(_) | Value::Map(_) if depth >= MAX_NEST => f.write_str("…"),
        Value::List(l) => {
            f.write_char('[')?;
            for (i, x) in l.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                if i == MAX_ITEMS {
                    f.write_char('…')?;
                    break;
                }
                value(f, x, depth.saturating_add(1))?;
            }
            f.write_char(']')
        }
        Value::Map(m) => {
            f.write_char('{')?;
            for (i, (k, x)) in m.map.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                if i == MAX_ITEMS {
                    f.write_char('…')?;
                    break;
                }
                key(f, k)?;
                f.write_str(": ")?;
                value(f, x, depth.saturating_add(1))?;
            }
            f.write_char('}')
        }
        Value::Function(name, _) => write!(f, "{name}"),
        Value::Opaque(o) => match o.downcast_ref::<OptionalValue>() {
            Some(opt) => match opt.value() {
                None => f.write_str("optional.none()"),
                Some(_) if depth >= MAX_NEST => f.write_str("optional.of(…)"),
                Some(x) => {
                    f.write_str("optional.of(")?;
                    value(f, x, depth.saturating_add(1))?;
                    f.write_char(')')
                }
            },
            None => write!(f, "a {} value", o.runtime_type_name()),
        },
        Value::Struct(s) => write!(f, "{}{{…}}", s.name()),
    }
}

/// The zero of a number's type.
fn zero(v: &Value) -> &'static str {
    match v {
        Value::UInt(_) => "0u",
        Value::Float(_) => "0.0",
        _ => "0",
    }
}

/// The CEL operator of the interpreter's operator names.
fn operator(op: &str) -> &str {
    match op {
        "add" => "+",
        "sub" => "-",
        "mul" => "*",
        "div" => "/",
        "rem" => "%",
        "negate" => "-",
        other => other,
    }
}

impl Display for ShowError<'_> {
    #[allow(
        deprecated,
        reason = "the interpreter still defines (and may return) the deprecated variants"
    )]
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let v = |x| ShowValue(x);
        match self.0 {
            ExecutionError::UnsupportedTargetType { target } => {
                write!(f, "invalid argument: {}", v(target))
            }
            ExecutionError::NotSupportedAsMethod { method, target } => {
                write!(f, "`{method}` is not a method of {}", v(target))
            }
            ExecutionError::UnsupportedKeyType(k) => {
                write!(f, "{} cannot be a map key", v(k))
            }
            ExecutionError::ValuesNotComparable(a, b) => {
                write!(f, "{} cannot be compared with {}", v(a), v(b))
            }
            ExecutionError::UnsupportedUnaryOperator(op, a) => {
                write!(f, "no operator `{}` for {}", operator(op), v(a))
            }
            ExecutionError::UnsupportedBinaryOperator(op, a, b) => {
                write!(
                    f,
                    "no operator `{}` for {} and {}",
                    operator(op),
                    v(a),
                    v(b)
                )
            }
            ExecutionError::UnsupportedMapIndex(k) => {
                write!(f, "{} cannot index a map", v(k))
            }
            ExecutionError::UnsupportedListIndex(i) => {
                write!(f, "{} cannot index a list", v(i))
            }
            ExecutionError::UnsupportedIndex(i, target) => {
                write!(f, "{} cannot index {}", v(i), v(target))
            }
            ExecutionError::DivisionByZero(a) => {
                write!(f, "division by zero: {} / {}", v(a), zero(a))
            }
            ExecutionError::RemainderByZero(a) => {
                write!(f, "modulus by zero: {} % {}", v(a), zero(a))
            }
            ExecutionError::Overflow(op, a, Value::Null) if *op == "negate" => {
                write!(f, "overflow: -({}) is out of range", v(a))
            }
            ExecutionError::Overflow(op, a, b) => {
                write!(
                    f,
                    "overflow: {} {} {} is out of range",
                    v(a),
                    operator(op),
                    v(b)
                )
            }
            ExecutionError::IndexOutOfBounds(i) => write!(f, "index {} out of range", v(i)),
            ExecutionError::DuplicateKey(k) => write!(f, "repeated map key {}", v(k)),
            ExecutionError::InternalError(m) => write!(f, "internal error: {m}"),
            ExecutionError::UnsupportedFunctionCallIdentifierType(_) => {
                f.write_str("unsupported function call")
            }
            ExecutionError::UnsupportedFieldsConstruction(_) => {
                f.write_str("message construction is not supported")
            }
            // The rest carry names and messages, not values.
            other => write!(f, "{other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::sync::Arc;
    use alloc::vec;

    /// The value of a constant expression.
    fn eval(expr: &str) -> Value {
        let e = cel::parser::PrattParser::new().parse(expr).unwrap();
        let ctx = cel::Context::with_env(Arc::clone(crate::cel_program::env()));
        Value::resolve(&e, &ctx).unwrap()
    }

    #[test]
    fn values_are_written_as_cel() {
        let s = |x: Value| ShowValue(&x).to_string();
        assert_eq!(s(Value::UInt(256)), "256u");
        assert_eq!(s(Value::Int(-3)), "-3");
        assert_eq!(s(Value::Float(1.5)), "1.5");
        assert_eq!(s(Value::Float(f64::NEG_INFINITY)), "double('-inf')");
        assert_eq!(
            s(Value::Bytes(Arc::new(vec![0, 255, b'a']))),
            r#"b"\x00\xffa""#
        );
        assert_eq!(s(Value::String(Arc::new("a\"\n".into()))), r#""a\"\n""#);
        assert_eq!(
            s(Value::List(Arc::new(vec![Value::Null, Value::Bool(true)]))),
            "[null, true]"
        );
        assert_eq!(s(eval("duration('-1ns')")), "duration('-0.000000001s')");
        assert_eq!(s(eval("duration('-1.5s')")), "duration('-1.5s')");
        assert_eq!(s(eval("duration('1500ms')")), "duration('1.5s')");
        assert_eq!(s(eval("duration('0s')")), "duration('0s')");
        assert_eq!(
            s(eval("timestamp(1234567890)")),
            "timestamp('2009-02-13T23:31:30Z')"
        );
        assert_eq!(
            s(eval("timestamp('2009-02-13T23:31:30.120+01:00')")),
            "timestamp('2009-02-13T22:31:30.12Z')"
        );
        assert_eq!(s(eval("optional.of(1u)")), "optional.of(1u)");
        let long = "x".repeat(1000);
        assert!(s(Value::String(Arc::new(long))).len() < 60);
    }

    #[test]
    fn errors_carry_no_rust_debug_text() {
        let e = ExecutionError::Overflow("add", Value::UInt(u64::MAX), Value::UInt(1));
        assert_eq!(
            ShowError(&e).to_string(),
            "overflow: 18446744073709551615u + 1u is out of range"
        );
        let e = ExecutionError::DivisionByZero(Value::Int(1));
        assert_eq!(ShowError(&e).to_string(), "division by zero: 1 / 0");
    }
}
