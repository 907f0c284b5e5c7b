//! Personal data and secrets in text: e-mail addresses, phone numbers, payment cards (Luhn),
//! IBANs (mod 97), US social security numbers, the API keys of the major clouds and AI vendors,
//! PEM private keys.
//!
//! | name | what | confidence |
//! |---|---|---|
//! | `email` | `local@domain.tld` (at least two domain labels, an alphabetic TLD) | 0.95 |
//! | `phone` | `+` international (8–15 digits), `(area) …`, North-American `ddd-ddd-dddd` (one separator kind), national numbers with a leading `0` written in groups; never a bare digit run | 0.7–0.9 |
//! | `credit_card` | 13–19 digits, optionally grouped with one kind of separator (space, `-`, `.`, `/`, `_`), **Luhn-valid**; a known issuer prefix and length | 0.9 (0.4 for an unknown prefix) |
//! | `iban` | country code, check digits, the country's length (single spaces, `-` or `.` between groups; any case), **mod-97 valid** | 0.95 |
//! | `us_ssn` | `ddd-dd-dddd` (or spaces or dots) with a valid area, group and serial; nine bare digits only after `SSN` or `social security` | 0.85 (0.8 bare) |
//! | `api_key` | OpenAI `sk-…` / `sk-proj-…`, Anthropic `sk-ant-…`, AWS `AKIA…` / `ASIA…`, GitHub `ghp_…` / `github_pat_…`, GitLab `glpat-…`, Slack `xox[abprs]-…` / `xapp-…`, Google `AIza…`, Stripe `sk_live_…` / `rk_live_…`, Hugging Face `hf_…`, Groq `gsk_…`, xAI `xai-…`, Perplexity `pplx-…`, Replicate `r8_…`, npm `npm_…`, DigitalOcean `dop_v1_…`; a distinctive prefix with at least 6 random characters is a key cut short | 0.9–0.99 (0.8 cut short) |
//! | `private_key` | a PEM `-----BEGIN … PRIVATE KEY-----` header, in any case | 0.99 |
//!
//! The scanners work on bytes (every pattern is ASCII), run in one pass each and allocate only
//! the findings. They see one text; [`crate::detect`] runs them over the text's views (folded,
//! compacted, decoded, reversed), so a disguise does not hide a value.

use alloc::vec::Vec;

/// A kind of personal data or secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Entity {
    /// An email address.
    Email,
    /// A phone number.
    Phone,
    /// A payment card number.
    CreditCard,
    /// An international bank account number.
    Iban,
    /// A US social security number.
    UsSsn,
    /// A provider API key or access token.
    ApiKey,
    /// A PEM private key.
    PrivateKey,
}

impl Entity {
    /// Every entity, in reporting order.
    pub const ALL: [Entity; 7] = [
        Entity::Email,
        Entity::Phone,
        Entity::CreditCard,
        Entity::Iban,
        Entity::UsSsn,
        Entity::ApiKey,
        Entity::PrivateKey,
    ];

    /// The name used in the `entities` argument and in reasons.
    pub fn name(self) -> &'static str {
        match self {
            Entity::Email => "email",
            Entity::Phone => "phone",
            Entity::CreditCard => "credit_card",
            Entity::Iban => "iban",
            Entity::UsSsn => "us_ssn",
            Entity::ApiKey => "api_key",
            Entity::PrivateKey => "private_key",
        }
    }

    /// The entity with this name.
    pub fn from_name(name: &str) -> Option<Entity> {
        Entity::ALL.into_iter().find(|e| e.name() == name)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of entities to look for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entities(u8);

impl Entities {
    /// Every entity.
    pub fn all() -> Entities {
        Entities(Entity::ALL.iter().fold(0, |acc, e| acc | e.bit()))
    }

    /// No entity.
    pub fn none() -> Entities {
        Entities(0)
    }

    /// This set with `e`.
    pub fn with(self, e: Entity) -> Entities {
        Entities(self.0 | e.bit())
    }

    /// Whether `e` is in the set.
    pub fn contains(self, e: Entity) -> bool {
        self.0 & e.bit() != 0
    }

    /// Every entity of this set or `other`.
    pub fn union(self, other: Entities) -> Entities {
        Entities(self.0 | other.0)
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The entities of the set, in [`Entity::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Entity> {
        Entity::ALL.into_iter().filter(move |e| self.contains(*e))
    }
}

/// One thing found: its kind, the scanner's confidence and where (byte offsets; never reported).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finding {
    /// What was found.
    pub entity: Entity,
    /// How sure the scanner is, 0..1.
    pub confidence: f64,
    /// Start byte offset.
    pub start: usize,
    /// End byte offset (exclusive).
    pub end: usize,
}

/// Every finding of the selected entities in `text`, in scanner order.
pub fn scan(text: &str, entities: Entities) -> Vec<Finding> {
    scan_with(text, entities, false)
}

/// [`scan`] for a view whose case is not the text's (folded to lower case): key prefixes and
/// bodies match in any case.
pub fn scan_any_case(text: &str, entities: Entities) -> Vec<Finding> {
    scan_with(text, entities, true)
}

fn scan_with(text: &str, entities: Entities, any_case: bool) -> Vec<Finding> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    if entities.contains(Entity::Email) {
        scan_emails(b, &mut out);
    }
    if entities.contains(Entity::CreditCard) {
        scan_cards(b, &mut out);
    }
    if entities.contains(Entity::Phone) {
        scan_phones(b, &mut out);
    }
    if entities.contains(Entity::Iban) {
        scan_ibans(b, &mut out);
    }
    if entities.contains(Entity::UsSsn) {
        scan_ssns(b, &mut out);
    }
    if entities.contains(Entity::ApiKey) || entities.contains(Entity::PrivateKey) {
        scan_keys(b, entities, any_case, &mut out);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Scanners. `b` is the prompt's bytes; every pattern is ASCII, so a multi-byte character is just
// a non-matching byte and offsets always fall on character boundaries of the patterns.

fn at(b: &[u8], i: usize) -> u8 {
    b.get(i).copied().unwrap_or(0)
}

fn before(b: &[u8], i: usize) -> u8 {
    i.checked_sub(1).map_or(0, |j| at(b, j))
}

fn push(out: &mut Vec<Finding>, entity: Entity, confidence: f64, start: usize, end: usize) {
    out.push(Finding {
        entity,
        confidence,
        start,
        end,
    });
}

fn scan_emails(b: &[u8], out: &mut Vec<Finding>) {
    let local = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'%' | b'+' | b'-');
    let label = |c: u8| c.is_ascii_alphanumeric() || c == b'-';
    for i in memchr::memchr_iter(b'@', b) {
        // Local part, leftwards (at most 64 bytes), without leading dots.
        let mut s = i;
        while s > 0 && i.saturating_sub(s) < 64 && local(before(b, s)) {
            s = s.saturating_sub(1);
        }
        while s < i && at(b, s) == b'.' {
            s = s.saturating_add(1);
        }
        if s == i || before(b, i) == b'.' {
            continue;
        }
        // Domain: labels separated by single dots; a final dot is punctuation.
        let mut j = i.saturating_add(1);
        let mut labels = 0usize;
        let mut tld = (j, j);
        loop {
            let start = j;
            while j < b.len() && j.saturating_sub(i) <= 253 && label(at(b, j)) {
                j = j.saturating_add(1);
            }
            if j == start {
                break;
            }
            labels = labels.saturating_add(1);
            tld = (start, j);
            if at(b, j) == b'.' && label(at(b, j.saturating_add(1))) {
                j = j.saturating_add(1);
            } else {
                break;
            }
        }
        let tld_text = b.get(tld.0..tld.1).unwrap_or_default();
        let tld_ok = tld_text.len() >= 2 && tld_text.iter().all(u8::is_ascii_alphabetic);
        // `git@github.com:org/repo` and `ssh -T git@host`: a Git host's SSH login, not a mailbox.
        let ssh =
            at(b, tld.1) == b':' || b.get(s..i).unwrap_or_default().eq_ignore_ascii_case(b"git");
        if labels >= 2 && tld_ok && !ssh {
            push(out, Entity::Email, 0.95, s, tld.1);
        }
    }
}

/// Most digit groups a number is split into (a longer run is cut; cards and phones have at most
/// five groups).
const MAX_GROUPS: usize = 16;

/// The digit groups of a number, on the stack: `(start, end)` of each run of digits, and the
/// separator before each group after the first.
struct Groups {
    spans: [(usize, usize); MAX_GROUPS],
    seps: [u8; MAX_GROUPS],
    n: usize,
}

impl Groups {
    fn spans(&self) -> &[(usize, usize)] {
        self.spans.get(..self.n).unwrap_or_default()
    }

    fn seps(&self) -> &[u8] {
        self.seps
            .get(..self.n.saturating_sub(1))
            .unwrap_or_default()
    }
}

/// The groups of the number starting at `i` (a digit): digits with single separators from
/// `seps` between them. Returns the groups and the index after the last digit.
fn groups(b: &[u8], i: usize, seps: &[u8]) -> (Groups, usize) {
    let mut g = Groups {
        spans: [(0, 0); MAX_GROUPS],
        seps: [0; MAX_GROUPS],
        n: 0,
    };
    let mut j = i;
    // Group `n` fills `spans[n]` and, when a separator follows it, `seps[n]`; at most
    // `MAX_GROUPS` groups.
    for (span, slot) in g.spans.iter_mut().zip(g.seps.iter_mut()) {
        let s = j;
        while at(b, j).is_ascii_digit() {
            j = j.saturating_add(1);
        }
        *span = (s, j);
        g.n = g.n.saturating_add(1);
        let sep = at(b, j);
        if g.n < MAX_GROUPS && seps.contains(&sep) && at(b, j.saturating_add(1)).is_ascii_digit() {
            *slot = sep;
            j = j.saturating_add(1);
        } else {
            break;
        }
    }
    (g, j)
}

/// The digits of a window of at most 19 digits, as numbers.
fn digits_of(b: &[u8], spans: &[(usize, usize)]) -> ([u8; 19], usize) {
    let mut d = [0u8; 19];
    let mut n = 0usize;
    let digits = spans
        .iter()
        .flat_map(|&(s, e)| b.get(s..e).unwrap_or_default());
    for (slot, &c) in d.iter_mut().zip(digits) {
        *slot = c.wrapping_sub(b'0');
        n = n.saturating_add(1);
    }
    (d, n)
}

/// The position of the first digit at or after `from` (`b.len()` when there is none).
fn next_digit(b: &[u8], from: usize) -> usize {
    next_where(b, from, |c| c.is_ascii_digit())
}

/// The position of the first byte at or after `from` for which `wanted` holds (`b.len()` when
/// there is none). Sixteen bytes are tested at once before they are looked at one by one: the
/// test has no early exit, so the compiler makes it one SIMD comparison in the filter, and prose,
/// where the bytes looked for are rare, is passed over sixteen bytes a step.
pub(crate) fn next_where(b: &[u8], from: usize, wanted: impl Fn(u8) -> bool) -> usize {
    let rest = b.get(from..).unwrap_or_default();
    let mut chunks = rest.chunks_exact(16);
    let mut base = from;
    for chunk in chunks.by_ref() {
        if chunk.iter().fold(false, |any, &c| any | wanted(c)) {
            if let Some(p) = chunk.iter().position(|&c| wanted(c)) {
                return base.saturating_add(p);
            }
        }
        base = base.saturating_add(16);
    }
    chunks
        .remainder()
        .iter()
        .position(|&c| wanted(c))
        .map_or(b.len(), |p| base.saturating_add(p))
}

/// Whether `b[i]` starts a number: a digit not preceded by a letter, digit or joining punctuation.
fn number_start(b: &[u8], i: usize) -> bool {
    let p = before(b, i);
    at(b, i).is_ascii_digit()
        && !p.is_ascii_alphanumeric()
        && !matches!(p, b'_' | b'.' | b',' | b'/' | b'-')
}

/// Whether `c` may follow a number (not a letter, digit or `_`).
fn number_end(c: u8) -> bool {
    !c.is_ascii_alphanumeric() && c != b'_'
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(k, &d)| {
            let d = u32::from(d);
            if k % 2 == 1 {
                let x = d.saturating_mul(2);
                if x > 9 {
                    x.saturating_sub(9)
                } else {
                    x
                }
            } else {
                d
            }
        })
        .fold(0, u32::saturating_add);
    sum.is_multiple_of(10)
}

/// Whether a card number has a known issuer's prefix and a length that issuer uses.
fn known_issuer(d: &[u8]) -> bool {
    let n = d.len();
    let prefix = |k: usize| {
        d.iter().take(k).fold(0u32, |acc, &x| {
            acc.saturating_mul(10).saturating_add(u32::from(x))
        })
    };
    let (p1, p2, p3, p4) = (prefix(1), prefix(2), prefix(3), prefix(4));
    match p1 {
        4 => matches!(n, 13 | 16 | 19),              // Visa
        2 => (2221..=2720).contains(&p4) && n == 16, // Mastercard
        3 => {
            ((p2 == 34 || p2 == 37) && n == 15)                                   // Amex
                || ((3528..=3589).contains(&p4) && (16..=19).contains(&n))        // JCB
                || (((300..=305).contains(&p3) || matches!(p2, 36 | 38 | 39)) && (14..=19).contains(&n))
            // Diners
        }
        5 => {
            ((51..=55).contains(&p2) && n == 16) || (p2 == 50 || p2 >= 56) && (12..=19).contains(&n)
        } // Mastercard, Maestro
        6 => (12..=19).contains(&n), // Discover, UnionPay, Maestro
        _ => false,
    }
}

fn scan_cards(b: &[u8], out: &mut Vec<Finding>) {
    let mut i = next_digit(b, 0);
    while i < b.len() {
        if !number_start(b, i) {
            i = next_digit(b, i.saturating_add(1));
            continue;
        }
        let (g, end) = groups(b, i, b" -./_:");
        i = end.max(i.saturating_add(1));
        let (spans, gseps) = (g.spans(), g.seps());
        let n = spans.len();
        // Windows of up to 5 groups with one kind of separator; a window inside the number must
        // be delimited by spaces (a dash joins it to its neighbours).
        for s in 0..n {
            let sep_before = s.checked_sub(1).and_then(|p| gseps.get(p));
            if sep_before.is_some_and(|c| *c != b' ') {
                continue;
            }
            for e in s..n.min(s.saturating_add(5)) {
                let window = spans.get(s..=e).unwrap_or_default();
                let seps = gseps.get(s..e).unwrap_or_default();
                if seps.iter().any(|c| Some(c) != seps.first()) {
                    break;
                }
                let count: usize = window.iter().map(|(a, z)| z.saturating_sub(*a)).sum();
                if count > 19 {
                    break;
                }
                let start = window.first().map_or(0, |w| w.0);
                let last = window.last().map_or(0, |w| w.1);
                let closed = if e.saturating_add(1) < n {
                    gseps.get(e) == Some(&b' ')
                } else {
                    number_end(at(b, last))
                };
                if count < 13 || !closed {
                    continue;
                }
                let (d, len) = digits_of(b, window);
                let d = d.get(..len).unwrap_or_default();
                if luhn(d) {
                    let conf = if known_issuer(d) { 0.9 } else { 0.4 };
                    push(out, Entity::CreditCard, conf, start, last);
                }
            }
        }
    }
}

fn scan_phones(b: &[u8], out: &mut Vec<Finding>) {
    // A phone number starts at `+`, `(` or a digit: the bytes between are not looked at.
    let next =
        |from: usize| next_where(b, from, |c| c.is_ascii_digit() || matches!(c, b'+' | b'('));
    let mut i = next(0);
    while i < b.len() {
        let c = at(b, i);
        let free = || {
            let p = before(b, i);
            !p.is_ascii_alphanumeric() && !matches!(p, b'_' | b'.' | b',' | b'/' | b'-' | b'+')
        };
        let found = if c == b'+' && at(b, i.saturating_add(1)).is_ascii_digit() && free() {
            international(b, i)
        } else if c == b'(' && at(b, i.saturating_add(1)).is_ascii_digit() && free() {
            parenthesised(b, i)
        } else if number_start(b, i) {
            national(b, i)
        } else {
            None
        };
        match found {
            Some((conf, end)) => {
                push(out, Entity::Phone, conf, i, end);
                i = end;
            }
            None => {
                // Skip the rest of a number so no suffix of it is taken for a phone number.
                i = i.saturating_add(1);
                while c.is_ascii_digit() && at(b, i).is_ascii_digit() {
                    i = i.saturating_add(1);
                }
                i = next(i);
            }
        }
    }
}

/// `+CC …`: 8–15 digits, single separators (space, `-`, `.`), an optional `(0)` trunk prefix.
fn international(b: &[u8], i: usize) -> Option<(f64, usize)> {
    let mut j = i.saturating_add(1);
    let mut digits = 0usize;
    let mut end = j;
    loop {
        let c = at(b, j);
        let next = j.saturating_add(1);
        if c.is_ascii_digit() {
            digits = digits.saturating_add(1);
            j = next;
            end = j;
        } else if b" -.".contains(&c) && at(b, next).is_ascii_digit() && digits > 0 {
            j = next;
        } else if c == b' ' && b.get(next..).unwrap_or_default().starts_with(b"(0)") && digits > 0 {
            // `+44 (0)20 …` or `+44 (0) 20 …`: the trunk prefix, then the number goes on.
            j = j.saturating_add(4);
            if at(b, j) == b' ' {
                j = j.saturating_add(1);
            }
            if !at(b, j).is_ascii_digit() {
                break;
            }
        } else {
            break;
        }
        if digits > 15 {
            return None;
        }
    }
    ((8..=15).contains(&digits) && number_end(at(b, end))).then_some((0.9, end))
}

/// `(area) rest`: 2–5 digits in parentheses, then digit groups; 9–11 digits in all.
fn parenthesised(b: &[u8], i: usize) -> Option<(f64, usize)> {
    let mut j = i.saturating_add(1);
    while at(b, j).is_ascii_digit() {
        j = j.saturating_add(1);
    }
    let area = j.saturating_sub(i).saturating_sub(1);
    if !(2..=5).contains(&area) || at(b, j) != b')' {
        return None;
    }
    j = j.saturating_add(1);
    if at(b, j) == b' ' {
        j = j.saturating_add(1);
    }
    if !at(b, j).is_ascii_digit() {
        return None;
    }
    let (g, end) = groups(b, j, b" -.");
    let rest: usize = g.spans().iter().map(|(s, e)| e.saturating_sub(*s)).sum();
    let count = area.saturating_add(rest);
    ((9..=11).contains(&count) && g.n <= 3 && number_end(at(b, end))).then_some((0.85, end))
}

/// National formats written in groups with one kind of separator: North-American
/// `ddd-ddd-dddd` (optionally `1-` first), or a leading `0` and 9–11 digits in 2–5 groups.
fn national(b: &[u8], i: usize) -> Option<(f64, usize)> {
    let (g, end) = groups(b, i, b" -.");
    let seps = g.seps();
    let &sep = seps.first()?;
    if !number_end(at(b, end)) || seps.iter().any(|c| *c != sep) {
        return None;
    }
    let mut sizes = [0usize; MAX_GROUPS];
    for (size, (s, e)) in sizes.iter_mut().zip(g.spans()) {
        *size = e.saturating_sub(*s);
    }
    let sizes = sizes.get(..g.n).unwrap_or_default();
    let count: usize = sizes.iter().sum();
    if sizes == [3, 3, 4] || (sizes == [1, 3, 3, 4] && at(b, i) == b'1') {
        return Some((0.8, end));
    }
    let leading_zero = at(b, i) == b'0' && at(b, i.saturating_add(1)) != b'0';
    let grouped = (2..=5).contains(&sizes.len())
        && sizes.first().is_some_and(|s| (2..=5).contains(s))
        && sizes.iter().all(|s| (2..=8).contains(s));
    // Dots only in the French way: five pairs (`06.12.34.56.78`).
    let dots_ok = sep != b'.' || sizes.iter().all(|s| *s == 2);
    (leading_zero && grouped && (9..=11).contains(&count) && dots_ok).then_some((0.7, end))
}

/// IBAN lengths by country (SWIFT registry).
const IBAN_LENGTHS: &[(&[u8; 2], usize)] = &[
    (b"AD", 24),
    (b"AE", 23),
    (b"AL", 28),
    (b"AT", 20),
    (b"AZ", 28),
    (b"BA", 20),
    (b"BE", 16),
    (b"BG", 22),
    (b"BH", 22),
    (b"BI", 27),
    (b"BR", 29),
    (b"BY", 28),
    (b"CH", 21),
    (b"CR", 22),
    (b"CY", 28),
    (b"CZ", 24),
    (b"DE", 22),
    (b"DJ", 27),
    (b"DK", 18),
    (b"DO", 28),
    (b"EE", 20),
    (b"EG", 29),
    (b"ES", 24),
    (b"FI", 18),
    (b"FK", 18),
    (b"FO", 18),
    (b"FR", 27),
    (b"GB", 22),
    (b"GE", 22),
    (b"GI", 23),
    (b"GL", 18),
    (b"GR", 27),
    (b"GT", 28),
    (b"HR", 21),
    (b"HU", 28),
    (b"IE", 22),
    (b"IL", 23),
    (b"IQ", 23),
    (b"IS", 26),
    (b"IT", 27),
    (b"JO", 30),
    (b"KW", 30),
    (b"KZ", 20),
    (b"LB", 28),
    (b"LC", 32),
    (b"LI", 21),
    (b"LT", 20),
    (b"LU", 20),
    (b"LV", 21),
    (b"LY", 25),
    (b"MC", 27),
    (b"MD", 24),
    (b"ME", 22),
    (b"MK", 19),
    (b"MN", 20),
    (b"MR", 27),
    (b"MT", 31),
    (b"MU", 30),
    (b"NI", 28),
    (b"NL", 18),
    (b"NO", 15),
    (b"OM", 23),
    (b"PK", 24),
    (b"PL", 28),
    (b"PS", 29),
    (b"PT", 25),
    (b"QA", 29),
    (b"RO", 24),
    (b"RS", 22),
    (b"RU", 33),
    (b"SA", 24),
    (b"SC", 31),
    (b"SD", 18),
    (b"SE", 24),
    (b"SI", 19),
    (b"SK", 24),
    (b"SM", 27),
    (b"SO", 23),
    (b"ST", 25),
    (b"SV", 28),
    (b"TL", 23),
    (b"TN", 24),
    (b"TR", 26),
    (b"UA", 29),
    (b"VA", 22),
    (b"VG", 24),
    (b"XK", 20),
    (b"YE", 30),
];

fn scan_ibans(b: &[u8], out: &mut Vec<Finding>) {
    // An IBAN's third byte is a digit: only the positions two before a digit are looked at.
    let mut d = next_digit(b, 2);
    while d.saturating_add(1) < b.len() {
        let i = d.saturating_sub(2);
        d = next_digit(b, d.saturating_add(1));
        let from = |k: usize| at(b, i.saturating_add(k));
        if !(from(0).is_ascii_alphabetic()
            && from(1).is_ascii_alphabetic()
            && from(2).is_ascii_digit()
            && from(3).is_ascii_digit()
            && !before(b, i).is_ascii_alphanumeric())
        {
            continue;
        }
        let cc = [from(0).to_ascii_uppercase(), from(1).to_ascii_uppercase()];
        let Some(&(_, len)) = IBAN_LENGTHS.iter().find(|(c, _)| **c == cc) else {
            continue;
        };
        // `len` letters (any case) or digits, one kind of single separator (space, `-`, `.`)
        // allowed between them.
        let mut chars = Vec::with_capacity(len);
        let mut j = i;
        let mut sep = 0u8;
        while chars.len() < len {
            let c = at(b, j);
            if c.is_ascii_alphanumeric() {
                chars.push(c.to_ascii_uppercase());
                j = j.saturating_add(1);
            } else if b" -.".contains(&c)
                && (sep == 0 || sep == c)
                && !chars.is_empty()
                && at(b, j.saturating_add(1)).is_ascii_alphanumeric()
            {
                sep = c;
                j = j.saturating_add(1);
            } else {
                break;
            }
        }
        if chars.len() == len && !at(b, j).is_ascii_alphanumeric() && mod97(&chars) == 1 {
            push(out, Entity::Iban, 0.95, i, j);
        }
    }
}

/// US social security numbers: `ddd-dd-dddd` with one kind of separator (`-`, space, `.`), or
/// nine bare digits right after `SSN` / `social security` (number); area not 000, 666 or 9xx,
/// group not 00, serial not 0000.
fn scan_ssns(b: &[u8], out: &mut Vec<Finding>) {
    let mut i = next_digit(b, 0);
    while i < b.len() {
        if !number_start(b, i) {
            i = next_digit(b, i.saturating_add(1));
            continue;
        }
        let (g, end) = groups(b, i, b"- .");
        let spans = g.spans();
        let seps = g.seps();
        let sizes: Vec<usize> = spans.iter().map(|(s, e)| e.saturating_sub(*s)).collect();
        let (d, n) = digits_of(b, spans);
        // The digits `d[range]` as a decimal number.
        let number = |range: core::ops::Range<usize>| {
            d.get(range).unwrap_or_default().iter().fold(0u32, |a, &x| {
                a.saturating_mul(10).saturating_add(u32::from(x))
            })
        };
        let valid = n == 9 && {
            let area = number(0..3);
            let group = number(3..5);
            let serial = number(5..9);
            area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
        };
        if valid && number_end(at(b, end)) {
            if sizes == [3, 2, 4] && seps.first() == seps.get(1) {
                push(out, Entity::UsSsn, 0.85, i, end);
            } else if sizes == [9] && ssn_label_before(b, i) {
                push(out, Entity::UsSsn, 0.8, i, end);
            }
        }
        i = end.max(i.saturating_add(1));
    }
}

/// Whether `SSN` or `social security` ends at most 24 bytes before `i`.
fn ssn_label_before(b: &[u8], i: usize) -> bool {
    let from = i.saturating_sub(24 + 15);
    let window = b.get(from..i).unwrap_or_default();
    let lower: Vec<u8> = window.iter().map(u8::to_ascii_lowercase).collect();
    [&b"ssn"[..], b"social security"].iter().any(|label| {
        lower
            .windows(label.len())
            .rposition(|w| w == *label)
            .is_some_and(|p| lower.len().saturating_sub(p.saturating_add(label.len())) <= 24)
    })
}

/// The IBAN check: the first four characters moved to the end, letters as 10..35, mod 97.
fn mod97(chars: &[u8]) -> u32 {
    let (head, tail) = chars.split_at(4.min(chars.len()));
    tail.iter().chain(head).fold(0u32, |acc, &c| {
        // `acc` < 97, so neither step comes near `u32::MAX`.
        if c.is_ascii_digit() {
            acc.saturating_mul(10)
                .saturating_add(u32::from(c.wrapping_sub(b'0')))
                % 97
        } else {
            acc.saturating_mul(100)
                .saturating_add(u32::from(c.wrapping_sub(b'A')))
                .saturating_add(10)
                % 97
        }
    })
}

/// How a key body may be spelled.
#[derive(Clone, Copy)]
enum Body {
    /// Letters and digits.
    Alnum,
    /// Letters, digits, `-` and `_`.
    Token,
    /// Upper-case letters and digits.
    Upper,
}

impl Body {
    fn allows(self, c: u8, any_case: bool) -> bool {
        match self {
            Body::Alnum => c.is_ascii_alphanumeric(),
            Body::Token => c.is_ascii_alphanumeric() || c == b'-' || c == b'_',
            Body::Upper if any_case => c.is_ascii_alphanumeric(),
            Body::Upper => c.is_ascii_uppercase() || c.is_ascii_digit(),
        }
    }
}

/// The fewest random characters after a distinctive prefix (not `sk-`) that make a key cut short
/// (letters and digits both):
/// a key handed over in pieces is still a key.
const CUT_SHORT: usize = 6;

/// Key shapes: prefix, body spelling, body length range, confidence. The first prefix that
/// matches at a position decides (longer prefixes first).
const KEYS: &[(&[u8], Body, usize, usize, f64)] = &[
    (b"sk-ant-", Body::Token, 32, 200, 0.99),
    (b"sk-proj-", Body::Token, 32, 200, 0.99),
    (b"sk-svcacct-", Body::Token, 32, 200, 0.99),
    (b"sk-admin-", Body::Token, 32, 200, 0.99),
    (b"sk-", Body::Token, 20, 200, 0.9),
    (b"sk_live_", Body::Alnum, 20, 200, 0.99),
    (b"rk_live_", Body::Alnum, 20, 200, 0.99),
    (b"hf_", Body::Alnum, 30, 40, 0.95),
    (b"gsk_", Body::Alnum, 40, 60, 0.95),
    (b"xai-", Body::Alnum, 40, 120, 0.95),
    (b"pplx-", Body::Alnum, 40, 60, 0.95),
    (b"glpat-", Body::Token, 20, 64, 0.95),
    (b"npm_", Body::Alnum, 36, 36, 0.95),
    (b"r8_", Body::Alnum, 30, 40, 0.9),
    (b"dop_v1_", Body::Alnum, 64, 64, 0.95),
    (b"xapp-", Body::Token, 10, 255, 0.95),
    (b"AKIA", Body::Upper, 16, 16, 0.95),
    (b"ASIA", Body::Upper, 16, 16, 0.95),
    (b"AIza", Body::Token, 35, 35, 0.95),
    (b"github_pat_", Body::Token, 22, 255, 0.99),
    (b"ghp_", Body::Alnum, 36, 36, 0.99),
    (b"gho_", Body::Alnum, 36, 36, 0.99),
    (b"ghu_", Body::Alnum, 36, 36, 0.99),
    (b"ghs_", Body::Alnum, 36, 36, 0.99),
    (b"ghr_", Body::Alnum, 36, 36, 0.99),
    (b"xoxb-", Body::Token, 10, 255, 0.95),
    (b"xoxa-", Body::Token, 10, 255, 0.95),
    (b"xoxp-", Body::Token, 10, 255, 0.95),
    (b"xoxr-", Body::Token, 10, 255, 0.95),
    (b"xoxs-", Body::Token, 10, 255, 0.95),
];

/// For each lower-case first byte of a [`KEYS`] prefix, the lower-case second bytes that follow
/// it in some prefix (bit `d` for byte `d`), built at compile time: a position whose first two
/// bytes start no prefix is passed without comparing prefixes.
#[allow(
    clippy::indexing_slicing,
    reason = "evaluated at compile time only: both bytes are checked `< 128` before indexing, and \
              an index out of bounds would fail const evaluation (the build), never panic at run \
              time"
)]
const KEY_PAIRS: [u128; 128] = {
    let mut table = [0u128; 128];
    let mut keys = KEYS;
    while let [(prefix, ..), more @ ..] = keys {
        if let [first, second, ..] = prefix {
            let (c, d) = (first.to_ascii_lowercase(), second.to_ascii_lowercase());
            if c < 128 && d < 128 {
                table[c as usize] |= 1 << d;
            }
        }
        keys = more;
    }
    table
};

/// Whether some [`KEYS`] prefix starts with `c`, `d` (in any case).
fn key_pair(c: u8, d: u8) -> bool {
    let d = d.to_ascii_lowercase();
    d < 128
        && KEY_PAIRS
            .get(usize::from(c.to_ascii_lowercase()))
            .is_some_and(|m| (m >> d) & 1 == 1)
}

fn scan_keys(b: &[u8], entities: Entities, any_case: bool, out: &mut Vec<Finding>) {
    let token = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
    let mut i = 0;
    while i < b.len() {
        let c = at(b, i);
        if c == b'-'
            && entities.contains(Entity::PrivateKey)
            && b.get(i..i.saturating_add(11))
                .is_some_and(|h| h.eq_ignore_ascii_case(b"-----BEGIN "))
        {
            // The header line: `-----BEGIN [RSA |EC |OPENSSH |ENCRYPTED ]PRIVATE KEY-----`.
            let line = b
                .get(i..b.len().min(i.saturating_add(80)))
                .unwrap_or_default();
            let header_end = line
                .iter()
                .skip(11)
                .position(|&c| c == b'-' || c == b'\n')
                .map_or(line.len(), |p| p.saturating_add(11));
            let header = line.get(11..header_end).unwrap_or_default();
            let private = header
                .len()
                .checked_sub(11)
                .and_then(|k| header.get(k..))
                .is_some_and(|tail| tail.eq_ignore_ascii_case(b"PRIVATE KEY"));
            let closed = line
                .get(header_end..)
                .is_some_and(|rest| rest.starts_with(b"-----"));
            if private && closed {
                let end = i.saturating_add(header_end).saturating_add(5);
                push(out, Entity::PrivateKey, 0.99, i, end);
                i = end;
                continue;
            }
        }
        if !entities.contains(Entity::ApiKey)
            || !matches!(
                c.to_ascii_lowercase(),
                b's' | b'r' | b'a' | b'g' | b'x' | b'h' | b'p' | b'n' | b'd'
            )
            // Inside a longer word is no key; after `_` or `-` (`__AKIA…__` in Markdown, `KEY-…`)
            // it may be, except the generic `sk-` (`task-…`, `risk-…` are words).
            || before(b, i).is_ascii_alphanumeric()
            || !key_pair(c, at(b, i.saturating_add(1)))
        {
            i = i.saturating_add(1);
            // The rest of a word starts no key (a letter or digit is before each of its
            // bytes): passed at once.
            if c.is_ascii_alphanumeric() {
                while at(b, i).is_ascii_alphanumeric() {
                    i = i.saturating_add(1);
                }
            }
            continue;
        }
        let joined_before = token(before(b, i));
        let mut next = i.saturating_add(1);
        for &(prefix, body, min, max, conf) in KEYS {
            // (The first byte first: most prefixes are ruled out without comparing slices.)
            if !prefix.first().is_some_and(|p| p.eq_ignore_ascii_case(&c)) {
                continue;
            }
            let s = i.saturating_add(prefix.len());
            let at_prefix = b.get(i..s).is_some_and(|h| {
                if any_case {
                    h.eq_ignore_ascii_case(prefix)
                } else {
                    h == prefix
                }
            });
            if !at_prefix {
                continue;
            }
            let mut e = s;
            while e < b.len() && body.allows(at(b, e), any_case) {
                e = e.saturating_add(1);
            }
            let len = e.saturating_sub(s);
            // A key body is random: letters and digits, or upper and lower case mixed in a long
            // body, or exactly the length of a fixed-length key (`AKIA` + 16, `ghp_` + 36); a
            // hyphenated word is not a key.
            let body_text = b.get(s..e).unwrap_or_default();
            let has = |f: fn(&u8) -> bool| body_text.iter().any(f);
            let random = (has(u8::is_ascii_digit) && has(u8::is_ascii_alphabetic))
                || (len >= 16 && has(u8::is_ascii_uppercase) && has(u8::is_ascii_lowercase))
                || (min == max && len == min);
            // A distinctive prefix (all but the generic `sk-`) with a random body shorter than
            // the key's is a piece of one; `sk-` needs 12 characters.
            let short = if prefix == b"sk-" { 12 } else { CUT_SHORT };
            // A key ends where its body does: a letter or digit after it means a longer word,
            // `_` or `-` after an alphanumeric body is punctuation.
            let inside = at(b, e).is_ascii_alphanumeric() || (joined_before && prefix == b"sk-");
            let ends = !inside;
            if (min..=max).contains(&len) && ends && random {
                push(out, Entity::ApiKey, conf, i, e);
                next = e;
            } else if (short..min).contains(&len) && ends && random {
                push(out, Entity::ApiKey, 0.8, i, e);
                next = e;
            }
            break;
        }
        i = next;
    }
}

/// [`scan_keys`] as it was before its first-two-bytes filter and word skipping (issue #18): the
/// oracle they are compared with.
#[cfg(test)]
mod before_fast_paths {
    use super::{at, before, push, Entities, Entity, Finding, Vec, CUT_SHORT, KEYS};

    pub(super) fn scan_keys(b: &[u8], entities: Entities, any_case: bool, out: &mut Vec<Finding>) {
        let token = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
        let mut i = 0;
        while i < b.len() {
            let c = at(b, i);
            if c == b'-'
                && entities.contains(Entity::PrivateKey)
                && b.get(i..i.saturating_add(11))
                    .is_some_and(|h| h.eq_ignore_ascii_case(b"-----BEGIN "))
            {
                // The header line: `-----BEGIN [RSA |EC |OPENSSH |ENCRYPTED ]PRIVATE KEY-----`.
                let line = b
                    .get(i..b.len().min(i.saturating_add(80)))
                    .unwrap_or_default();
                let header_end = line
                    .iter()
                    .skip(11)
                    .position(|&c| c == b'-' || c == b'\n')
                    .map_or(line.len(), |p| p.saturating_add(11));
                let header = line.get(11..header_end).unwrap_or_default();
                let private = header
                    .len()
                    .checked_sub(11)
                    .and_then(|k| header.get(k..))
                    .is_some_and(|tail| tail.eq_ignore_ascii_case(b"PRIVATE KEY"));
                let closed = line
                    .get(header_end..)
                    .is_some_and(|rest| rest.starts_with(b"-----"));
                if private && closed {
                    let end = i.saturating_add(header_end).saturating_add(5);
                    push(out, Entity::PrivateKey, 0.99, i, end);
                    i = end;
                    continue;
                }
            }
            if !entities.contains(Entity::ApiKey)
                || !matches!(
                    c.to_ascii_lowercase(),
                    b's' | b'r' | b'a' | b'g' | b'x' | b'h' | b'p' | b'n' | b'd'
                )
                // Inside a longer word is no key; after `_` or `-` (`__AKIA…__` in Markdown, `KEY-…`)
                // it may be, except the generic `sk-` (`task-…`, `risk-…` are words).
                || before(b, i).is_ascii_alphanumeric()
            {
                i = i.saturating_add(1);
                continue;
            }
            let joined_before = token(before(b, i));
            let mut next = i.saturating_add(1);
            for &(prefix, body, min, max, conf) in KEYS {
                // (The first byte first: most prefixes are ruled out without comparing slices.)
                if !prefix.first().is_some_and(|p| p.eq_ignore_ascii_case(&c)) {
                    continue;
                }
                let s = i.saturating_add(prefix.len());
                let at_prefix = b.get(i..s).is_some_and(|h| {
                    if any_case {
                        h.eq_ignore_ascii_case(prefix)
                    } else {
                        h == prefix
                    }
                });
                if !at_prefix {
                    continue;
                }
                let mut e = s;
                while e < b.len() && body.allows(at(b, e), any_case) {
                    e = e.saturating_add(1);
                }
                let len = e.saturating_sub(s);
                // A key body is random: letters and digits, or upper and lower case mixed in a long
                // body, or exactly the length of a fixed-length key (`AKIA` + 16, `ghp_` + 36); a
                // hyphenated word is not a key.
                let body_text = b.get(s..e).unwrap_or_default();
                let has = |f: fn(&u8) -> bool| body_text.iter().any(f);
                let random = (has(u8::is_ascii_digit) && has(u8::is_ascii_alphabetic))
                    || (len >= 16 && has(u8::is_ascii_uppercase) && has(u8::is_ascii_lowercase))
                    || (min == max && len == min);
                // A distinctive prefix (all but the generic `sk-`) with a random body shorter than
                // the key's is a piece of one; `sk-` needs 12 characters.
                let short = if prefix == b"sk-" { 12 } else { CUT_SHORT };
                // A key ends where its body does: a letter or digit after it means a longer word,
                // `_` or `-` after an alphanumeric body is punctuation.
                let inside =
                    at(b, e).is_ascii_alphanumeric() || (joined_before && prefix == b"sk-");
                let ends = !inside;
                if (min..=max).contains(&len) && ends && random {
                    push(out, Entity::ApiKey, conf, i, e);
                    next = e;
                } else if (short..min).contains(&len) && ends && random {
                    push(out, Entity::ApiKey, 0.8, i, e);
                    next = e;
                }
                break;
            }
            i = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_where_finds_what_a_plain_search_finds() {
        let texts = [
            String::new(),
            String::from("7"),
            String::from("no digits in this text at all, thirty-one bytes."),
            "a".repeat(15) + "9",
            "a".repeat(16) + "9",
            "a".repeat(17) + "9" + &"b".repeat(40) + "+(",
            "é".repeat(20) + "1",
        ];
        let wanted = |c: u8| c.is_ascii_digit() || matches!(c, b'+' | b'(');
        for t in &texts {
            let b = t.as_bytes();
            for from in 0..=b.len().saturating_add(2) {
                let plain = b
                    .get(from..)
                    .and_then(|r| r.iter().position(|&c| wanted(c)))
                    .map_or(b.len(), |p| from.saturating_add(p));
                assert_eq!(next_where(b, from, wanted), plain, "{t:?} from {from}");
            }
        }
    }

    fn kinds(text: &str) -> Vec<Entity> {
        let mut k: Vec<Entity> = scan(text, Entities::all())
            .iter()
            .map(|f| f.entity)
            .collect();
        k.sort();
        k.dedup();
        k
    }

    /// Found at the default threshold.
    fn found(text: &str, e: Entity) -> bool {
        scan(text, Entities::all())
            .iter()
            .any(|f| f.entity == e && f.confidence >= 0.5)
    }

    #[test]
    fn keys_are_found_as_before_the_fast_paths() {
        const PIECES: &[&str] = &[
            " ",
            "\n",
            "-",
            "_",
            "x",
            "task",
            "risk-",
            "Sk-",
            "sk-",
            "SK-",
            "sk-proj-",
            "sk-ant-",
            "sk_live_",
            "rk_live_",
            "AKIA",
            "akia",
            "ASIA",
            "AIza",
            "ghp_",
            "GHP_",
            "github_pat_",
            "xoxb-",
            "hf_",
            "gsk_",
            "xai-",
            "pplx-",
            "glpat-",
            "npm_",
            "r8_",
            "dop_v1_",
            "xapp-",
            "a1B2c3D4e5",
            "F6g7H8i9J0",
            "KLMNOPQRST",
            "0123456789",
            "abcdefghij",
            "é",
            "__",
            "-----BEGIN ",
            "RSA ",
            "PRIVATE KEY",
            "-----",
            "key=",
            "(",
            ".",
        ];
        let mut found = 0usize;
        for t in crate::generated_texts::generated(PIECES, 0x2545_f491_4f6c_dd1d, 14) {
            let b = t.as_bytes();
            for any_case in [false, true] {
                for entities in [
                    Entities::all(),
                    Entities::none().with(Entity::ApiKey),
                    Entities::none().with(Entity::PrivateKey),
                ] {
                    let (mut new, mut old) = (Vec::new(), Vec::new());
                    scan_keys(b, entities, any_case, &mut new);
                    before_fast_paths::scan_keys(b, entities, any_case, &mut old);
                    assert_eq!(new, old, "{t:?} {any_case}");
                    found = found.saturating_add(new.len());
                }
            }
        }
        // The texts exercise the scanner: thousands of keys are found.
        assert!(found > 1000, "{found}");
    }

    #[test]
    fn every_key_prefix_passes_the_first_two_bytes_filter() {
        // The filter only skips positions where no prefix can match: each prefix has two bytes
        // or more, and its first two, in any case, pass.
        for (prefix, ..) in KEYS {
            let [c, d, ..] = prefix else {
                panic!("{prefix:?} is shorter than two bytes")
            };
            for (x, y) in [
                (*c, *d),
                (c.to_ascii_lowercase(), d.to_ascii_lowercase()),
                (c.to_ascii_uppercase(), d.to_ascii_uppercase()),
                (c.to_ascii_uppercase(), d.to_ascii_lowercase()),
            ] {
                assert!(key_pair(x, y), "{prefix:?}");
            }
        }
        assert!(!key_pair(b's', b'u'));
        assert!(!key_pair(b'q', b'k'));
    }

    #[test]
    fn emails() {
        assert!(found("mail me: jane.doe+llm@example.co.uk.", Entity::Email));
        assert!(found("<a.b@c-d.io>", Entity::Email));
        let f = scan("x jane@example.com.", Entities::all());
        assert_eq!(f.len(), 1);
        assert_eq!(
            &"x jane@example.com."[f[0].start..f[0].end],
            "jane@example.com"
        );
        for no in [
            "user@localhost",
            "git remote add origin git@github.com:acme/api.git",
            "ssh -T git@gitlab.com",
            "@example.com",
            "a@b.c",
            "foo@ bar.com",
            "x@1.23",
            "2@3",
        ] {
            assert!(!found(no, Entity::Email), "{no}");
        }
    }

    #[test]
    fn cards_are_luhn_checked() {
        for yes in [
            "4111 1111 1111 1111",
            "card: 4111-1111-1111-1111, exp 12/27",
            "5500005555555559",
            "amex 3782 822463 10005",
            "6011111111111117",
            "ref 77 4111 1111 1111 1111 thanks",
        ] {
            assert!(found(yes, Entity::CreditCard), "{yes}");
        }
        for no in [
            "4111 1111 1111 1112",      // Luhn fails
            "4111-1111 1111-1111",      // mixed separators
            "41111111111111111111111",  // too long
            "order 4111111111111111-3", // part of a longer number
            "v4111111111111111",        // part of a word
            "1234 5678 9012 3456",      // Luhn fails
        ] {
            assert!(!found(no, Entity::CreditCard), "{no}");
        }
        // Luhn-valid, unknown issuer: low confidence.
        let f = scan("9999 9999 9999 9995", Entities::all());
        assert!(
            f.iter()
                .all(|f| f.entity != Entity::CreditCard || f.confidence < 0.5),
            "{f:?}"
        );
    }

    #[test]
    fn phones_need_a_phone_shape() {
        for yes in [
            "call +44 20 7946 0958 today",
            "+4915112345678",
            "+1 (0) 415 555 2671",
            "+44 (0)20 7946 0958",
            "(415) 555-2671",
            "415-555-2671",
            "1-800-555-0199",
            "415.555.2671",
            "020 7946 0958",
            "01 23 45 67 89",
        ] {
            assert!(found(yes, Entity::Phone), "{yes}");
        }
        for no in [
            "4155552671",
            "123456789012",
            "2024-01-15",
            "192.168.100.200",
            "v1.2.3",
            "+123",
            "version 12 345 6789",
            "4111 1111 1111 1111",
            "id-415-555-2671",
            "$1,234,567.89",
        ] {
            assert!(!found(no, Entity::Phone), "{no}");
        }
    }

    #[test]
    fn ibans_are_mod97_checked() {
        for yes in [
            "DE89370400440532013000",
            "IBAN: DE89 3704 0044 0532 0130 00, thanks",
            "GB82 WEST 1234 5698 7654 32",
            "FR1420041010050500013M02606",
        ] {
            assert!(found(yes, Entity::Iban), "{yes}");
        }
        for no in [
            "DE89370400440532013001",  // checksum
            "DE8937040044053201300",   // length
            "XX89370400440532013000",  // country
            "DE893704004405320130001", // longer
        ] {
            assert!(!found(no, Entity::Iban), "{no}");
        }
    }

    #[test]
    fn api_keys_and_private_keys() {
        let ant = "sk-ant-api03-Zx8kQ2mN4pR7sT1vW3yB5cD9fG0hJ6kL2nP4qR8sT0uV2wX4yZ6aB8cD0eF2gH4iJ6k-AbCdEfAA";
        for yes in [
            ant,
            "key=sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb7cDe0f",
            "sk-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb7cDe0fGh3i",
            "AKIAIOSFODNN7EXAMPLE",
            // Cut short: a distinctive prefix and 6 or more random characters.
            "AKIAIOSFODNN7EXAMPL",
            "first half: AKIA2UQCYD",
            "token ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789 ok",
            "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
            "xoxb-1234567890-abcdefghij",
            "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q",
            "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
            "HF_TOKEN=hf_aB3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb7c",
            "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",
            "glpat-xY3dEf6hIj9kLm2nOp5q",
            "bold __AKIAIOSFODNN7EXAMPLE__ here",
            "ghp_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "AWS_KEY=AKIAIOSFODNN7EXAMPLE_",
        ] {
            assert!(found(yes, Entity::ApiKey), "{yes}");
        }
        for no in [
            "sk-learn is a library",
            "task-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb7cDe0f",
            "sk-this-is-a-long-hyphenated-sentence-fragment",
            "AKIAIOSFODNN7EXAMPLEX",
            "ghp_abc1",
        ] {
            assert!(!found(no, Entity::ApiKey), "{no}");
        }
        let pem = "here:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow...";
        assert_eq!(kinds(pem), vec![Entity::PrivateKey]);
        assert!(found(
            "-----BEGIN OPENSSH PRIVATE KEY-----",
            Entity::PrivateKey
        ));
        assert!(!found("-----BEGIN CERTIFICATE-----", Entity::PrivateKey));
        assert!(!found("-----BEGIN PUBLIC KEY-----", Entity::PrivateKey));
    }

    #[test]
    fn plain_text_finds_nothing() {
        let text =
            "Please summarise this paper about 2024 results: revenue grew 12% to $1,234,567 \
                    in Q3 (see table 4.1, rows 10-20). Call it v2.3.1; ISBN 978-3-16-148410-0.";
        assert_eq!(kinds(text), vec![]);
        assert_eq!(kinds(""), vec![]);
        assert_eq!(kinds("ünïcödé @ ë.ü 😀 4111"), vec![]);
    }

    #[test]
    fn large_and_hostile_text_is_linear() {
        let big = "4111 ".repeat(50_000) + &"@".repeat(100_000) + &"+1 ".repeat(50_000);
        let _ = scan(&big, Entities::all());
        let digits = "1".repeat(200_000);
        assert!(scan(&digits, Entities::all()).is_empty());
    }
}
