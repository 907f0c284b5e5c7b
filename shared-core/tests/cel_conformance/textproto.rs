//! A reader for the subset of the protobuf text format the cel-spec test files use: messages
//! (`name { ... }`, `name: { ... }`, `name < ... >`), scalars (`name: 12`, `name: true`,
//! `name: NULL_VALUE`, `name: "text" 'more'`), extension / `Any` field names
//! (`[type.googleapis.com/google.protobuf.Duration] { ... }`), `#` comments, and `,` / `;`
//! between fields. No schema: every field is kept in order, with its raw value.
//!
//! Bounded: messages nest at most [`MAX_DEPTH`] deep, and every loop consumes input.

/// Deepest accepted message nesting.
const MAX_DEPTH: usize = 32;

/// A field's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A quoted string (its bytes, escapes decoded; adjacent strings are joined).
    Str(Vec<u8>),
    /// An unquoted scalar: a number, `true` / `false`, an enum name.
    Word(String),
    /// A nested message.
    Msg(Msg),
}

/// A message: its fields in order (repeated fields appear once per value).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Msg(pub Vec<(String, Value)>);

impl Msg {
    /// The first value of a field.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Every value of a (repeated) field.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.0
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// A nested message field.
    pub fn msg(&self, name: &str) -> Option<&Msg> {
        match self.get(name) {
            Some(Value::Msg(m)) => Some(m),
            _ => None,
        }
    }

    /// A string field, as UTF-8 (lossy: the test files are UTF-8).
    pub fn text(&self, name: &str) -> Option<String> {
        match self.get(name) {
            Some(Value::Str(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            Some(Value::Word(w)) => Some(w.clone()),
            _ => None,
        }
    }

    /// A `true` / `false` field (absent is false).
    pub fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some(Value::Word(w)) if w == "true" || w == "1")
    }
}

/// Parses a whole file.
pub fn parse(text: &str) -> Result<Msg, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        at: 0,
    };
    let m = p.fields(None, 0)?;
    p.skip();
    if p.at < p.s.len() {
        return Err(p.err("unexpected text after the last field"));
    }
    Ok(m)
}

struct Parser<'s> {
    s: &'s [u8],
    at: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.at += 1;
        Some(c)
    }

    fn err(&self, what: &str) -> String {
        let line = self.s.iter().take(self.at).filter(|&&c| c == b'\n').count() + 1;
        format!("line {line}: {what}")
    }

    /// Skips whitespace and comments.
    fn skip(&mut self) {
        while let Some(c) = self.peek() {
            if c.is_ascii_whitespace() {
                self.at += 1;
            } else if c == b'#' {
                while let Some(c) = self.bump() {
                    if c == b'\n' {
                        break;
                    }
                }
            } else {
                break;
            }
        }
    }

    /// Fields until `close` (or the end of the text when `None`).
    fn fields(&mut self, close: Option<u8>, depth: usize) -> Result<Msg, String> {
        if depth > MAX_DEPTH {
            return Err(self.err("messages nested too deep"));
        }
        let mut out = Vec::new();
        loop {
            self.skip();
            match (self.peek(), close) {
                (None, None) => return Ok(Msg(out)),
                (None, Some(_)) => return Err(self.err("unclosed message")),
                (Some(c), Some(end)) if c == end => {
                    self.at += 1;
                    return Ok(Msg(out));
                }
                _ => {}
            }
            let name = self.name()?;
            self.skip();
            let colon = self.peek() == Some(b':');
            if colon {
                self.at += 1;
                self.skip();
            }
            let value = match self.peek() {
                Some(b'{') => {
                    self.at += 1;
                    Value::Msg(self.fields(Some(b'}'), depth + 1)?)
                }
                Some(b'<') => {
                    self.at += 1;
                    Value::Msg(self.fields(Some(b'>'), depth + 1)?)
                }
                _ if !colon => return Err(self.err(&format!("`{name}` has no value"))),
                Some(b'"' | b'\'') => Value::Str(self.strings()?),
                _ => Value::Word(self.word()?),
            };
            out.push((name, value));
            self.skip();
            if matches!(self.peek(), Some(b',' | b';')) {
                self.at += 1;
            }
        }
    }

    /// A field name, or an extension / `Any` type name in brackets.
    fn name(&mut self) -> Result<String, String> {
        if self.peek() == Some(b'[') {
            let start = self.at;
            while let Some(c) = self.bump() {
                if c == b']' {
                    return Ok(String::from_utf8_lossy(&self.s[start..self.at]).into_owned());
                }
            }
            return Err(self.err("unclosed `[`"));
        }
        let w = self.word()?;
        if w.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            Ok(w)
        } else {
            Err(self.err(&format!("`{w}` is not a field name")))
        }
    }

    fn word(&mut self) -> Result<String, String> {
        let start = self.at;
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b'+') {
                self.at += 1;
            } else {
                break;
            }
        }
        if self.at == start {
            return Err(self.err("expected a name or a value"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.at]).into_owned())
    }

    /// One or more adjacent quoted strings, joined.
    fn strings(&mut self) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        while let Some(q @ (b'"' | b'\'')) = self.peek() {
            self.at += 1;
            loop {
                match self.bump() {
                    None | Some(b'\n') => return Err(self.err("unterminated string")),
                    Some(c) if c == q => break,
                    Some(b'\\') => self.escape(&mut out)?,
                    Some(c) => out.push(c),
                }
            }
            self.skip();
        }
        Ok(out)
    }

    /// The escape after a `\`: C escapes, octal, `\x`, `\u`, `\U`.
    fn escape(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        let c = self.bump().ok_or_else(|| self.err("unterminated string"))?;
        let simple = match c {
            b'a' => Some(7),
            b'b' => Some(8),
            b'f' => Some(12),
            b'n' => Some(b'\n'),
            b'r' => Some(b'\r'),
            b't' => Some(b'\t'),
            b'v' => Some(11),
            b'\\' | b'\'' | b'"' | b'?' => Some(c),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            return Ok(());
        }
        match c {
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                for _ in 0..2 {
                    match self.peek() {
                        Some(d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            self.at += 1;
                        }
                        _ => break,
                    }
                }
                out.push(u8::try_from(v).map_err(|_| self.err("octal escape over 255"))?);
            }
            b'x' | b'X' => {
                let v = self.hex(1, 2)?;
                out.push(u8::try_from(v).map_err(|_| self.err("bad \\x escape"))?);
            }
            b'u' | b'U' => {
                let n = if c == b'u' { 4 } else { 8 };
                let v = self.hex(n, n)?;
                let ch = char::from_u32(v).ok_or_else(|| self.err("bad unicode escape"))?;
                out.extend_from_slice(ch.to_string().as_bytes());
            }
            _ => return Err(self.err(&format!("unknown escape `\\{}`", char::from(c)))),
        }
        Ok(())
    }

    fn hex(&mut self, min: usize, max: usize) -> Result<u32, String> {
        let mut v = 0u32;
        let mut n = 0;
        while n < max {
            match self.peek().and_then(|c| char::from(c).to_digit(16)) {
                Some(d) => {
                    v = v * 16 + d;
                    self.at += 1;
                    n += 1;
                }
                None => break,
            }
        }
        if n < min {
            return Err(self.err("bad hex escape"));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_shapes_the_files_use() {
        let m = parse(
            r#"
            # comment
            name: "x" 'y'
            section {
              test: {
                expr: "'\\x41' == \"A\""
                value: { int64_value: -3 }
                b: "\303\277\x41\n"
              }
              test < name: "two", flag: true >
            }
            object_value { [type.googleapis.com/google.protobuf.Duration] { seconds: 1 } }
            "#,
        )
        .unwrap();
        assert_eq!(m.text("name").as_deref(), Some("xy"));
        let section = m.msg("section").unwrap();
        let tests: Vec<&Value> = section.all("test").collect();
        assert_eq!(tests.len(), 2);
        let Value::Msg(t) = tests[0] else { panic!() };
        assert_eq!(t.text("expr").as_deref(), Some(r#"'\x41' == "A""#));
        assert_eq!(
            t.msg("value").unwrap().get("int64_value"),
            Some(&Value::Word("-3".into()))
        );
        assert_eq!(
            t.get("b"),
            Some(&Value::Str(vec![0o303, 0o277, 0x41, b'\n']))
        );
        let Value::Msg(t2) = tests[1] else { panic!() };
        assert!(t2.flag("flag"));
        let any = m.msg("object_value").unwrap();
        assert!(any
            .msg("[type.googleapis.com/google.protobuf.Duration]")
            .is_some());
    }

    #[test]
    fn rejects_broken_text() {
        assert!(parse("a {").is_err());
        assert!(parse("a: \"x").is_err());
        assert!(parse("a").is_err());
        assert!(parse(&"a {".repeat(40)).is_err());
    }
}
