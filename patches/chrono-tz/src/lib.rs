//! llm-policy's stand-in for [`chrono-tz`](https://crates.io/crates/chrono-tz), patched in for
//! the `cel` crate (see `Cargo.toml`): the same `Tz` / `UTC` names, but only the zones whose
//! offset from UTC never changes — `UTC` and its aliases (`Etc/UTC`, `GMT`, `Zulu`, …) and
//! `Etc/GMT+N` / `Etc/GMT-N` (POSIX signs: `Etc/GMT+5` is five hours *behind* UTC). Every other
//! name fails to parse, as an unknown zone does with the real crate.
#![cfg_attr(not(test), no_std)]

use core::fmt;
use core::str::FromStr;

use chrono::{FixedOffset, MappedLocalTime, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc};

/// A time zone with a fixed offset from UTC.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tz {
    /// Seconds east of UTC (within ±14 hours).
    east: i32,
    name: &'static str,
}

/// Coordinated Universal Time.
pub const UTC: Tz = Tz {
    east: 0,
    name: "UTC",
};

/// The names of UTC in the IANA database.
const UTC_NAMES: &[&str] = &[
    "UTC",
    "Etc/UTC",
    "Etc/UCT",
    "UCT",
    "Etc/Universal",
    "Universal",
    "Etc/Zulu",
    "Zulu",
    "GMT",
    "Etc/GMT",
    "Etc/GMT0",
    "Etc/GMT+0",
    "Etc/GMT-0",
    "GMT0",
    "GMT+0",
    "GMT-0",
    "Greenwich",
    "Etc/Greenwich",
];

/// `Etc/GMT-14` … `Etc/GMT+12`, with the hours east of UTC (the sign is the POSIX one).
const ETC_GMT: &[(&str, i32)] = &[
    ("Etc/GMT-14", 14),
    ("Etc/GMT-13", 13),
    ("Etc/GMT-12", 12),
    ("Etc/GMT-11", 11),
    ("Etc/GMT-10", 10),
    ("Etc/GMT-9", 9),
    ("Etc/GMT-8", 8),
    ("Etc/GMT-7", 7),
    ("Etc/GMT-6", 6),
    ("Etc/GMT-5", 5),
    ("Etc/GMT-4", 4),
    ("Etc/GMT-3", 3),
    ("Etc/GMT-2", 2),
    ("Etc/GMT-1", 1),
    ("Etc/GMT+1", -1),
    ("Etc/GMT+2", -2),
    ("Etc/GMT+3", -3),
    ("Etc/GMT+4", -4),
    ("Etc/GMT+5", -5),
    ("Etc/GMT+6", -6),
    ("Etc/GMT+7", -7),
    ("Etc/GMT+8", -8),
    ("Etc/GMT+9", -9),
    ("Etc/GMT+10", -10),
    ("Etc/GMT+11", -11),
    ("Etc/GMT+12", -12),
];

impl Tz {
    /// The zone's IANA name.
    pub fn name(self) -> &'static str {
        self.name
    }

    fn offset(self) -> FixedOffset {
        // `east` is within ±14 hours by construction, so this is never the fallback.
        FixedOffset::east_opt(self.east).unwrap_or_else(|| Utc.fix())
    }
}

/// A name that is not a fixed-offset zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError;

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a fixed-offset time zone (UTC, Etc/GMT±N)")
    }
}

impl FromStr for Tz {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Tz, ParseError> {
        if let Some(name) = UTC_NAMES.iter().find(|n| **n == s) {
            return Ok(Tz { east: 0, name });
        }
        ETC_GMT
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(name, hours)| Tz {
                east: hours.saturating_mul(3600),
                name,
            })
            .ok_or(ParseError)
    }
}

impl fmt::Debug for Tz {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

impl fmt::Display for Tz {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

impl TimeZone for Tz {
    type Offset = FixedOffset;

    fn from_offset(offset: &FixedOffset) -> Tz {
        let east = offset.local_minus_utc();
        let name = if east == 0 {
            "UTC"
        } else {
            ETC_GMT
                .iter()
                .find(|(_, h)| h.saturating_mul(3600) == east)
                .map_or("", |(n, _)| n)
        };
        Tz { east, name }
    }

    fn offset_from_local_date(&self, _local: &NaiveDate) -> MappedLocalTime<FixedOffset> {
        MappedLocalTime::Single(self.offset())
    }

    fn offset_from_local_datetime(&self, _local: &NaiveDateTime) -> MappedLocalTime<FixedOffset> {
        MappedLocalTime::Single(self.offset())
    }

    fn offset_from_utc_date(&self, _utc: &NaiveDate) -> FixedOffset {
        self.offset()
    }

    fn offset_from_utc_datetime(&self, _utc: &NaiveDateTime) -> FixedOffset {
        self.offset()
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    reason = "test code: a failed expectation is a failed test"
)]
mod tests {
    use super::*;

    #[test]
    fn fixed_zones_parse_and_others_do_not() {
        assert_eq!("UTC".parse::<Tz>(), Ok(UTC));
        assert_eq!("Etc/Zulu".parse::<Tz>().map(|t| t.offset()), Ok(Utc.fix()));
        let five_behind = "Etc/GMT+5"
            .parse::<Tz>()
            .map(|t| t.offset().local_minus_utc());
        assert_eq!(five_behind, Ok(-5 * 3600));
        assert_eq!("Europe/Paris".parse::<Tz>(), Err(ParseError));
        assert_eq!("utc".parse::<Tz>(), Err(ParseError));
    }

    #[test]
    fn converts_like_a_fixed_offset() {
        let t = chrono::DateTime::from_timestamp(1_234_567_890, 0).unwrap();
        let tz: Tz = "Etc/GMT-14".parse().unwrap();
        let local = tz.from_utc_datetime(&t.naive_utc());
        assert_eq!(local.to_string(), "2009-02-14 13:31:30 +14:00");
    }
}
