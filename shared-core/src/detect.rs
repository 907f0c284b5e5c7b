//! Personal data, secrets and prompt injection in text, however the client disguises them: the
//! scanners of [`pii`] and [`injection`] read the text and its views ([`views`]): the text folded
//! ([`crate::fold`]: fullwidth, zero-width, look-alike letters), letters spelled one by one
//! joined, spelled-out `[at]` / `dot`, keys written in groups, mixed digit separators, base64 /
//! hex / percent-encoded runs decoded, the text reversed, digit groups of nearby numbers side by
//! side (a card handed over in two turns), an SSN's two pieces and an address's labelled parts
//! joined, and, for phrases, leetspeak.
//!
//! A view that rewrites the text may join what was apart, so in a view only confident findings
//! count ([`VIEW_CONFIDENCE`]: a Luhn-valid number must have a known issuer's prefix). Both
//! plugins and the context fields `request.prompt_entities` and `request.prompt_injection` are
//! this module; the filter and the server compute the same.

pub mod injection;
pub mod pii;
pub mod views;

use alloc::borrow::Cow;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::OnceCell;

pub use injection::Signal;
pub use pii::{Entities, Entity, Finding};

/// The least confidence a finding in a view (not the text as sent) needs to count.
pub const VIEW_CONFIDENCE: f64 = 0.8;

/// The most confident finding of each kind of personal data or secret.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Found {
    best: [f64; Entity::ALL.len()],
}

impl Found {
    /// The highest confidence a finding of `e` had (0 when none).
    pub fn confidence(&self, e: Entity) -> f64 {
        self.best.get(e as usize).copied().unwrap_or(0.0)
    }

    /// The kinds found with at least `min` confidence, in [`Entity::ALL`] order.
    pub fn kinds(&self, min: f64) -> impl Iterator<Item = Entity> + '_ {
        Entity::ALL
            .into_iter()
            .filter(move |e| self.confidence(*e) >= min && self.confidence(*e) > 0.0)
    }

    /// The highest confidence of any kind.
    pub fn score(&self) -> f64 {
        self.best.iter().copied().fold(0.0, f64::max)
    }

    fn add(&mut self, f: &Finding, view: bool) {
        if view && f.confidence < VIEW_CONFIDENCE {
            return;
        }
        if let Some(slot) = self.best.get_mut(f.entity as usize) {
            *slot = slot.max(f.confidence);
        }
    }
}

/// A text and the views both scanners read, each built once, when first asked for: a context
/// that reads both `request.prompt_entities` and `request.prompt_injection` folds, compacts and
/// decodes its prompt once, not once per scanner.
#[derive(Debug)]
pub struct Scanned<'t> {
    text: &'t str,
    folded: OnceCell<String>,
    compact: OnceCell<String>,
    folded_compact: OnceCell<String>,
    decoded: OnceCell<String>,
    backwards: OnceCell<bool>,
}

impl<'t> Scanned<'t> {
    /// `text`, no view built yet.
    pub fn new(text: &'t str) -> Scanned<'t> {
        Scanned {
            text,
            folded: OnceCell::new(),
            compact: OnceCell::new(),
            folded_compact: OnceCell::new(),
            decoded: OnceCell::new(),
            backwards: OnceCell::new(),
        }
    }

    /// The text as sent.
    pub fn text(&self) -> &'t str {
        self.text
    }

    /// The text folded ([`crate::fold::fold`]).
    pub fn folded(&self) -> &str {
        self.folded.get_or_init(|| crate::fold::fold(self.text))
    }

    /// The text compacted ([`views::compact`]).
    pub fn compact(&self) -> &str {
        self.compact.get_or_init(|| views::compact(self.text))
    }

    /// The compacted text folded (the folded text when compacting changed nothing).
    pub fn folded_compact(&self) -> &str {
        if self.compact() == self.text {
            return self.folded();
        }
        self.folded_compact
            .get_or_init(|| crate::fold::fold(self.compact()))
    }

    /// The text's encoded runs decoded ([`views::decoded`]; empty when there are none).
    pub fn decoded(&self) -> &str {
        self.decoded.get_or_init(|| views::decoded(self.text))
    }

    /// Whether the text asks for something to be read backwards ([`asks_backwards`]).
    pub fn backwards(&self) -> bool {
        *self.backwards.get_or_init(|| asks_backwards(self.text))
    }
}

/// The personal data and secrets of the kinds in `wanted` found in `text` or any of its views.
pub fn entities(text: &str, wanted: Entities) -> Found {
    entities_in(&Scanned::new(text), wanted)
}

/// [`entities`] of a text whose views may be shared with [`injection_score_in`].
pub fn entities_in(scanned: &Scanned<'_>, wanted: Entities) -> Found {
    let text = scanned.text();
    let mut found = Found::default();
    for f in pii::scan(text, wanted) {
        found.add(&f, false);
    }
    each_view(scanned, |view, only| {
        let kinds = match only {
            Some(e) if !wanted.contains(e) => return,
            Some(e) => Entities::none().with(e),
            None => wanted,
        };
        for f in pii::scan_any_case(view, kinds) {
            found.add(&f, true);
        }
    });
    found
}

/// The prompt-injection score of `text`: the highest of the text's and its views' scores
/// ([`injection::score`]), with the signals of that view.
pub fn injection_score(text: &str) -> (f64, Vec<Signal>) {
    injection_score_in(&Scanned::new(text))
}

/// [`injection_score`] of a text whose views may be shared with [`entities_in`].
pub fn injection_score_in(scanned: &Scanned<'_>) -> (f64, Vec<Signal>) {
    let text = scanned.text();
    let mut best = injection::score(text);
    let mut consider = |view: &str| {
        let s = injection::score(view);
        if s.0 > best.0 {
            best = s;
        }
    };
    let folded = scanned.folded();
    // ASCII folds to its lower case with white space collapsed: the words the scorer reads are
    // those of the text, already scored.
    if !text.is_ascii() {
        consider(folded);
    }
    let compact = scanned.folded_compact();
    let unleet = views::unleet(compact);
    if unleet != folded {
        consider(&unleet);
    }
    if compact != folded && compact != unleet {
        consider(compact);
    }
    if scanned.backwards() {
        consider(&views::reversed(folded));
    }
    let decoded = scanned.decoded();
    if !decoded.is_empty() {
        consider(&crate::fold::fold(decoded));
    }
    best
}

/// The most bytes on each side of a seam between two user turns that [`seams`] keeps.
pub const SEAM: usize = 256;

/// What the user said across turns, without the turns of others between: around each seam
/// between two user turns (with an assistant or tool turn between them), the last [`SEAM`] bytes
/// of the user's text before it and the first [`SEAM`] bytes after, one window per line. A value
/// or a phrase handed over in pieces over several turns (`my card is 4163 3238` … `the rest is
/// 0705 8996`) is whole in a window; the scanners read the windows with the text.
pub fn seams<'a>(turns: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut user = String::new();
    let mut cuts: Vec<usize> = Vec::new();
    let mut others_since = false;
    for (role, text) in turns {
        if role != "user" {
            others_since = true;
            continue;
        }
        if !user.is_empty() {
            if others_since {
                cuts.push(user.len());
            }
            user.push('\n');
        }
        user.push_str(text);
        others_since = false;
    }
    let mut out = String::new();
    let mut covered = 0usize;
    for cut in cuts {
        let mut from = cut.saturating_sub(SEAM).max(covered);
        while !user.is_char_boundary(from) {
            from = from.saturating_add(1);
        }
        let mut to = cut.saturating_add(1).saturating_add(SEAM).min(user.len());
        while !user.is_char_boundary(to) {
            to = to.saturating_sub(1);
        }
        if let Some(window) = user.get(from..to) {
            if !out.is_empty() && from > covered {
                out.push('\n');
            }
            out.push_str(window);
        }
        covered = to.max(covered);
    }
    out
}

/// `text` with the [`seams`] of `turns` after it, when there are any: what the scanners read so
/// that a value or phrase handed over across user turns is whole.
pub fn with_seams<'a, 't>(
    text: &'t str,
    turns: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Cow<'t, str> {
    joined_with_seams(text, &seams(turns))
}

/// `text` with `seams` (the [`seams`] of its turns) after it, when there are any: the text
/// [`with_seams`] gives.
pub fn joined_with_seams<'t>(text: &'t str, seams: &str) -> Cow<'t, str> {
    if seams.is_empty() {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(alloc::format!("{text}\n{seams}"))
    }
}

/// Words that ask for text to be read backwards, in the languages the scanners know: without
/// one, the reversed view is not read (backwards, a long number is another number that passes the
/// Luhn check one time in ten).
const BACKWARDS: &[&str] = &[
    "revers",
    "backward",
    "flip",
    "mirror",
    "envers",
    "rückwärts",
    "ruckwarts",
    "umgekehrt",
    "al revés",
    "al reves",
    "invert",
    "contrario",
    "задом",
    "наоборот",
    "反",
    "逆",
];

/// Whether `text` asks for something to be read backwards.
pub fn asks_backwards(text: &str) -> bool {
    let lower = text.to_lowercase();
    BACKWARDS.iter().any(|w| views::has(&lower, w))
}

/// Calls `f` with each view of `text` that differs from it (folded, compacted and folded,
/// decoded, reversed when the text asks for it, card, IBAN and SSN pieces joined, an address's
/// labelled parts joined) and the one kind to read in it, if only one (card numbers in the
/// scattered digits, IBANs in the IBAN pieces, ...).
pub fn for_each_view(text: &str, f: impl FnMut(&str, Option<Entity>)) {
    each_view(&Scanned::new(text), f);
}

/// [`for_each_view`] with the views shared through `scanned`.
fn each_view(scanned: &Scanned<'_>, mut f: impl FnMut(&str, Option<Entity>)) {
    let text = scanned.text();
    // ASCII folds to its lower case with white space collapsed, which the scanners of the text
    // already see through (only a key's case differs, and a lower-case key is no key).
    if !text.is_ascii() && scanned.folded() != text {
        f(scanned.folded(), None);
    }
    let compact = scanned.compact();
    if compact != text {
        f(compact, None);
        let folded_compact = scanned.folded_compact();
        if folded_compact != compact && folded_compact != scanned.folded() {
            f(folded_compact, None);
        }
    }
    let decoded = scanned.decoded();
    if !decoded.is_empty() {
        f(decoded, None);
    }
    if scanned.backwards() {
        f(&views::reversed(text), None);
    }
    let scattered = views::scattered_digits(text);
    if !scattered.is_empty() {
        f(&scattered, Some(Entity::CreditCard));
    }
    let iban = views::scattered_iban(text);
    if !iban.is_empty() {
        f(&iban, Some(Entity::Iban));
    }
    let ssn = views::scattered_ssn(text);
    if !ssn.is_empty() {
        f(&ssn, Some(Entity::UsSsn));
    }
    let address = views::labelled_address(text);
    if !address.is_empty() {
        f(&address, Some(Entity::Email));
    }
}

/// The names of the kinds found with at least `min` confidence, e.g. for a reason; never values.
pub fn kind_names(found: &Found, min: f64) -> Vec<&'static str> {
    found.kinds(min).map(Entity::name).collect()
}

/// The names of every kind in `text` or its views with at least `min` confidence: what
/// `request.prompt_entities` and `response.entities` hold.
pub fn entity_names(text: &str, min: f64) -> Vec<String> {
    entity_names_in(&Scanned::new(text), min)
}

/// [`entity_names`] of a text whose views may be shared with [`injection_score_in`].
pub fn entity_names_in(scanned: &Scanned<'_>, min: f64) -> Vec<String> {
    entities_in(scanned, Entities::all())
        .kinds(min)
        .map(|e| String::from(e.name()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asking_backwards_is_found_with_memchr_as_it_was_with_str_contains() {
        // The oracle: [`asks_backwards`] before it searched with `memchr` (issue #18).
        let before = |text: &str| {
            let lower = text.to_lowercase();
            BACKWARDS.iter().any(|w| lower.contains(w))
        };
        const PIECES: &[&str] = &[
            "read it ",
            "REVERS",
            "Revers",
            "e",
            "back",
            "WARD",
            "Flip",
            "mIrRoR",
            "al rev",
            "és",
            "ES",
            "Rückwärts",
            "RÜCKWÄRTS",
            "ЗАДОМ",
            "наоборот",
            "反",
            "逆",
            "İ",
            "\u{212a}",
            " ",
            "x",
        ];
        let mut asked = 0usize;
        for t in crate::generated_texts::generated(PIECES, 0x9e37_79b9_7f4a_7c15, 8) {
            assert_eq!(asks_backwards(&t), before(&t), "{t:?}");
            asked = asked.saturating_add(usize::from(asks_backwards(&t)));
        }
        // Both answers are exercised.
        assert!(asked > 1000 && asked < 19_000, "{asked}");
    }

    #[test]
    fn seams_join_what_the_user_said_across_turns() {
        let turns = [
            ("system", "be brief"),
            ("user", "my card is 4163 3238"),
            ("assistant", "Noted."),
            ("user", "and the rest is 0705 8996"),
            ("user", "thanks"),
        ];
        assert_eq!(
            seams(turns),
            "my card is 4163 3238\nand the rest is 0705 8996\nthanks"
        );
        // Adjacent user turns are adjacent in the prompt already: no seam.
        assert_eq!(seams([("user", "a"), ("user", "b")]), "");
        let long = "x".repeat(1000);
        let s = seams([
            ("user", long.as_str()),
            ("assistant", "ok"),
            ("user", "tail"),
        ]);
        assert_eq!(s.len(), SEAM + 1 + 4);
    }
}
