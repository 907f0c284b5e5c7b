//! The decision cache key: a stable 128-bit hash (xxh3, unseeded, identical on every platform
//! and process) of the bundle digest, namespace, requested tags and the values of exactly the
//! context fields the namespace's rules read.

use alloc::string::String;
use xxhash_rust::xxh3::Xxh3;

use crate::context::{FieldValue, ShieldValue, View};
use crate::schema::FieldRef;

fn put(h: &mut Xxh3, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn put_value(h: &mut Xxh3, v: &FieldValue<'_>) {
    match v {
        FieldValue::Missing => h.update(&[0]),
        FieldValue::Null => h.update(&[1]),
        FieldValue::Bool(b) => h.update(&[2, u8::from(*b)]),
        FieldValue::Int(i) => {
            h.update(&[3]);
            h.update(&i.to_le_bytes());
        }
        FieldValue::Float(f) => {
            h.update(&[4]);
            h.update(&f.to_bits().to_le_bytes());
        }
        FieldValue::Str(s) => {
            h.update(&[5]);
            put(h, s.as_bytes());
        }
        FieldValue::StrList(l) => {
            h.update(&[6]);
            h.update(&(l.len() as u64).to_le_bytes());
            l.iter().for_each(|s| put(h, s.as_bytes()));
        }
        FieldValue::StrMap(m) => {
            h.update(&[7]);
            h.update(&(m.len() as u64).to_le_bytes());
            for (k, v) in m.iter() {
                put(h, k.as_bytes());
                put(h, v.as_bytes());
            }
        }
        // Every variant of every entry is tagged: `Number(0.0)` and `Text("")` (or `None` and
        // `Some`) must never hash the same.
        FieldValue::Principal(p) => {
            h.update(&[8]);
            h.update(&(p.len() as u64).to_le_bytes());
            for (k, v) in p.iter() {
                put(h, k.as_bytes());
                match v {
                    Some(v) => {
                        h.update(&[1]);
                        put(h, v.as_bytes());
                    }
                    None => h.update(&[0]),
                }
            }
        }
        FieldValue::Shield(s) => {
            h.update(&[9]);
            h.update(&(s.len() as u64).to_le_bytes());
            for (k, v) in s.iter() {
                put(h, k.as_bytes());
                match v {
                    ShieldValue::Number(n) => {
                        h.update(&[1]);
                        h.update(&n.to_bits().to_le_bytes());
                    }
                    ShieldValue::Text(t) => {
                        h.update(&[2]);
                        put(h, t.as_bytes());
                    }
                }
            }
        }
        FieldValue::Messages(ms) => {
            h.update(&[10]);
            h.update(&(ms.len() as u64).to_le_bytes());
            for m in ms.iter() {
                put(h, m.role.as_bytes());
                put(h, m.content.as_bytes());
            }
        }
    }
}

/// Hex cache key over the values `reads` take in every view (the request, then each batch item).
pub(crate) fn compute<'a>(
    bundle: &str,
    namespace: &str,
    tags: &[String],
    reads: &[FieldRef],
    views: impl Iterator<Item = View<'a>>,
) -> String {
    let mut h = Xxh3::new();
    put(&mut h, bundle.as_bytes());
    put(&mut h, namespace.as_bytes());
    h.update(&(tags.len() as u64).to_le_bytes());
    tags.iter().for_each(|t| put(&mut h, t.as_bytes()));
    for (i, view) in views.enumerate() {
        h.update(&(i as u64).to_le_bytes());
        for f in reads {
            put_value(&mut h, &view.get(f));
        }
    }
    hex128(h.digest128())
}

/// 32 lower-case hex digits (what `format!("{:032x}")` writes, several times faster).
pub(crate) fn hex128(v: u128) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    for (pair, byte) in out.chunks_exact_mut(2).zip(v.to_be_bytes()) {
        if let [hi, lo] = pair {
            *hi = HEX.get(usize::from(byte >> 4)).copied().unwrap_or(b'0');
            *lo = HEX.get(usize::from(byte & 0xf)).copied().unwrap_or(b'0');
        }
    }
    String::from_utf8(out.to_vec()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::RequestContext;

    #[test]
    fn hex_is_what_format_writes() {
        for v in [
            0u128,
            1,
            u128::MAX,
            0xdead_beef_0000_0001_2345_6789_abcd_ef00,
        ] {
            assert_eq!(hex128(v), alloc::format!("{v:032x}"));
        }
    }

    #[test]
    fn values_of_different_kinds_never_share_a_key() {
        let key = |shield: Vec<(String, ShieldValue)>, principal: Vec<(String, Option<String>)>| {
            let c = RequestContext {
                shield,
                principal,
                ..RequestContext::default()
            };
            compute(
                "b",
                "n",
                &[],
                &[FieldRef::ShieldAll, FieldRef::PrincipalAll],
                c.views(),
            )
        };
        let p = || vec![("id".to_string(), None)];
        assert_ne!(
            key(vec![("pii".into(), ShieldValue::Number(0.0))], p()),
            key(vec![("pii".into(), ShieldValue::Text(String::new()))], p())
        );
        assert_ne!(
            key(vec![], vec![("id".into(), None)]),
            key(vec![], vec![("id".into(), Some(String::new()))])
        );
    }
}
