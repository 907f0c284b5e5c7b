//! What evaluating a condition gives ([`Truth`]: a bool or a [`CondError`]), the bounded text of
//! an error ([`clip`]), and the per-evaluation [`Scratch`] space. A leaf: the native condition
//! tree, the CEL program and the evaluator all use it, and it uses none of them.

use alloc::string::String;

/// A runtime condition error (reported in `metadata.errors`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CondError(pub String);

/// Longest error message kept: messages may quote request values (a whole prompt).
pub(crate) const MAX_ERROR_LEN: usize = 300;

/// `msg` cut to [`MAX_ERROR_LEN`] bytes at a character boundary, marked with `…` (the cut string
/// does not keep the original's allocation).
pub(crate) fn clip(msg: String) -> String {
    if msg.len() <= MAX_ERROR_LEN {
        return msg;
    }
    clip_display(&msg)
}

/// Formats `value` into at most [`MAX_ERROR_LEN`] bytes, marked with `…` when cut; formatting
/// stops there (an error quoting a 4 MB prompt never becomes a 4 MB string).
pub(crate) fn clip_display(value: &dyn core::fmt::Display) -> String {
    struct Bounded(String, bool);
    impl core::fmt::Write for Bounded {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let room = MAX_ERROR_LEN.saturating_sub(self.0.len());
            if s.len() <= room {
                self.0.push_str(s);
                return Ok(());
            }
            let mut end = room;
            while !s.is_char_boundary(end) {
                end = end.saturating_sub(1);
            }
            self.0.push_str(s.get(..end).unwrap_or_default());
            self.1 = true;
            Err(core::fmt::Error)
        }
    }
    let mut out = Bounded(String::new(), false);
    let _ = core::fmt::write(&mut out, format_args!("{value}"));
    if out.1 {
        out.0.push('…');
    }
    out.0
}

pub(crate) type Truth = Result<bool, CondError>;

/// The current element of a list comprehension.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Elem<'a> {
    Message(&'a crate::context::Message),
    Str(&'a str),
}

/// Per-evaluation scratch space (the CEL activation, built at most once per request; the current
/// comprehension element).
#[derive(Default)]
pub(crate) struct Scratch<'a> {
    /// The element `FieldRef::Elem` leaves read.
    pub elem: Option<Elem<'a>>,
    /// The fields the namespace's interpreted CEL programs read.
    #[cfg(feature = "cel")]
    pub cel_reads: &'a [crate::schema::FieldRef],
    #[cfg(feature = "cel")]
    pub cel: Option<cel::Context<'a, 'a>>,
    #[cfg(not(feature = "cel"))]
    pub _unused: core::marker::PhantomData<&'a ()>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_error_messages_are_cut_without_keeping_their_size() {
        let long = "é".repeat(10_000);
        let cut = clip(long.clone());
        assert!(cut.len() <= MAX_ERROR_LEN + 3 && cut.ends_with('…'));
        assert!(cut.capacity() < 1000);
        assert_eq!(clip_display(&long), cut);
        assert_eq!(clip(String::from("short")), "short");
    }
}
