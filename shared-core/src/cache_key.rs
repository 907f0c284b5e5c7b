//! The decision cache key: 128 bits of a SHA-256 (identical on every platform and process) of
//! the bundle digest, namespace, requested tags and the values of exactly the context fields the
//! namespace's rules read.
//!
//! The prompt scanners' fields (`request.prompt_entities`, `request.prompt_injection`) are keyed
//! by the text the scanners read and the scanners' version, not by their results, so that a
//! host looks the key up before scanning ([`crate::prompt_scan`]). That is exact because the
//! scanners are pure functions of that text, and safe because the hash is collision-resistant: a
//! client cannot craft a prompt whose key is a cached benign prompt's (with a fast
//! non-cryptographic hash it could, and skip the scanners).

use alloc::string::String;
use sha2::{Digest, Sha256};

use crate::context::{FieldValue, ShieldValue, View};
use crate::schema::FieldRef;

/// The version of the scanners whose results a key stands for: a replica of another version
/// (a rolling upgrade sharing a Redis cache) does not serve this one's decisions.
const SCANNERS: &str = concat!("llm-policy-core ", env!("CARGO_PKG_VERSION"));

fn put(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn put_value(h: &mut Sha256, v: &FieldValue<'_>) {
    match v {
        FieldValue::Missing => h.update([0]),
        FieldValue::Null => h.update([1]),
        FieldValue::Bool(b) => h.update([2, u8::from(*b)]),
        FieldValue::Int(i) => {
            h.update([3]);
            h.update(i.to_le_bytes());
        }
        FieldValue::Float(f) => {
            h.update([4]);
            h.update(f.to_bits().to_le_bytes());
        }
        FieldValue::Str(s) => {
            h.update([5]);
            put(h, s.as_bytes());
        }
        FieldValue::StrList(l) => {
            h.update([6]);
            h.update((l.len() as u64).to_le_bytes());
            l.iter().for_each(|s| put(h, s.as_bytes()));
        }
        FieldValue::StrMap(m) => {
            h.update([7]);
            h.update((m.len() as u64).to_le_bytes());
            for (k, v) in m.iter() {
                put(h, k.as_bytes());
                put(h, v.as_bytes());
            }
        }
        // Every variant of every entry is tagged: `Number(0.0)` and `Text("")` (or `None` and
        // `Some`) must never hash the same.
        FieldValue::Principal(p) => {
            h.update([8]);
            h.update((p.len() as u64).to_le_bytes());
            for (k, v) in p.iter() {
                put(h, k.as_bytes());
                match v {
                    Some(v) => {
                        h.update([1]);
                        put(h, v.as_bytes());
                    }
                    None => h.update([0]),
                }
            }
        }
        FieldValue::Shield(s) => {
            h.update([9]);
            h.update((s.len() as u64).to_le_bytes());
            for (k, v) in s.iter() {
                put(h, k.as_bytes());
                match v {
                    ShieldValue::Number(n) => {
                        h.update([1]);
                        h.update(n.to_bits().to_le_bytes());
                    }
                    ShieldValue::Text(t) => {
                        h.update([2]);
                        put(h, t.as_bytes());
                    }
                }
            }
        }
        FieldValue::Messages(ms) => {
            h.update([10]);
            h.update((ms.len() as u64).to_le_bytes());
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
    let mut h = Sha256::new();
    put(&mut h, bundle.as_bytes());
    put(&mut h, namespace.as_bytes());
    h.update((tags.len() as u64).to_le_bytes());
    tags.iter().for_each(|t| put(&mut h, t.as_bytes()));
    for (i, view) in views.enumerate() {
        h.update((i as u64).to_le_bytes());
        let mut scanned_text = false;
        for f in reads {
            match (f, view.req.scan.seams()) {
                // The text the scanners read, once per view, whether they ran or not.
                (FieldRef::PromptEntities | FieldRef::PromptInjection, Some(seams)) => {
                    if !scanned_text {
                        scanned_text = true;
                        h.update([11]);
                        put(&mut h, SCANNERS.as_bytes());
                        put(&mut h, view.req.prompt.as_bytes());
                        put(&mut h, seams.as_bytes());
                    }
                }
                _ => put_value(&mut h, &view.get(f)),
            }
        }
    }
    let digest = h.finalize();
    let mut first = [0u8; 16];
    first.iter_mut().zip(digest).for_each(|(a, b)| *a = b);
    hex128(u128::from_be_bytes(first))
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
