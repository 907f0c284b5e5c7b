//! Bounds checked on the text before parsing, and on the tree right after.
//!
//! The text check keeps the parser (and the drop of what it builds) within a small, fixed stack:
//! bracket nesting is at most [`MAX_NESTING`], and an upper bound of the tree depth computed
//! from the operator tokens of each bracket group is at most [`LEXICAL_BOUND`]. The exact depth
//! of the parsed tree is then held to [`MAX_DEPTH`], which bounds every later recursion.

use cel::common::ast::IdedExpr;

use super::{children, issue, CelIssue, MAX_DEPTH, MAX_EXPR_LEN, MAX_NESTING};
use crate::diagnostic::Code;

/// Largest upper bound of the tree depth estimated from the text; well inside what the parser
/// handles on a 256 KiB stack, and far above [`MAX_DEPTH`] for anything a person writes.
const LEXICAL_BOUND: usize = 512;

fn too_deep(what: &str) -> CelIssue {
    issue(
        Code::CelTooDeep,
        what.to_string(),
        Some(String::from(
            "split the condition into several rules, use `x in [...]` instead of long `==` chains, or use the match DSL",
        )),
    )
}

/// One bracket group while scanning: the largest bound of its finished segments (separated by
/// `,` or a map's `:`), the operator tokens of the current segment, and the deepest child group
/// in it.
#[derive(Default)]
struct Group {
    closer: char,
    done: usize,
    ops: usize,
    child: usize,
}

impl Group {
    fn finish_segment(&mut self) {
        self.done = self.done.max(self.ops.saturating_add(self.child));
        self.ops = 0;
        self.child = 0;
    }
    fn bound(mut self) -> usize {
        self.finish_segment();
        self.done.saturating_add(1)
    }
}

/// Rejects expressions too long, too deeply nested, or with operator chains too long to parse
/// safely. Strings (all CEL quote forms) are skipped.
pub(super) fn lexical(src: &str) -> Result<(), CelIssue> {
    if src.len() > MAX_EXPR_LEN {
        return Err(issue(
            Code::CelTooLarge,
            format!(
                "expression is {} bytes, over the limit of {MAX_EXPR_LEN}",
                src.len()
            ),
            None,
        ));
    }
    let mut stack: Vec<Group> = vec![Group::default()];
    let mut chars = src.chars().peekable();
    // Inside a number, `.` is a decimal point, not a member access.
    let mut in_number = false;
    let mut in_ident = false;
    let mut prev: char = ' ';
    while let Some(c) = chars.next() {
        let word = c.is_alphanumeric() || c == '_';
        let decimal_point = c == '.' && in_number;
        in_number = if word {
            in_number || (!in_ident && c.is_ascii_digit())
        } else {
            decimal_point
        };
        in_ident = word && !in_number;
        match c {
            '"' | '\'' => {
                // `'...'`, `"..."`, `'''...'''`, `"""..."""`; raw / bytes prefixes are letters
                // before the quote and need nothing here (a raw string has no escapes, and a `\`
                // before the closing quote cannot occur in a valid raw string).
                let triple = {
                    let mut look = chars.clone();
                    look.next() == Some(c) && look.next() == Some(c)
                };
                if triple {
                    chars.next();
                    chars.next();
                }
                let mut run = 0usize;
                let mut escaped = false;
                for ch in chars.by_ref() {
                    if escaped {
                        escaped = false;
                        run = 0;
                        continue;
                    }
                    if ch == '\\' {
                        escaped = true;
                        run = 0;
                        continue;
                    }
                    if ch == c {
                        run = run.saturating_add(1);
                        if !triple || run == 3 {
                            break;
                        }
                    } else {
                        run = 0;
                    }
                }
            }
            '(' | '[' | '{' => {
                if stack.len() > MAX_NESTING {
                    return Err(too_deep(&format!(
                        "expression nests brackets deeper than {MAX_NESTING} levels"
                    )));
                }
                let closer = match c {
                    '(' => ')',
                    '[' => ']',
                    _ => '}',
                };
                if let Some(g) = stack.last_mut() {
                    // Calling or indexing is an operator of the enclosing segment.
                    g.ops = g.ops.saturating_add(1);
                }
                stack.push(Group {
                    closer,
                    ..Group::default()
                });
            }
            ')' | ']' | '}' if stack.len() > 1 => {
                if let Some(g) = stack.pop() {
                    let b = g.bound();
                    if let Some(parent) = stack.last_mut() {
                        parent.child = parent.child.max(b);
                    }
                }
            }
            ',' => {
                if let Some(g) = stack.last_mut() {
                    g.finish_segment();
                }
            }
            ':' => {
                if let Some(g) = stack.last_mut() {
                    if g.closer == '}' {
                        g.finish_segment();
                    } else {
                        g.ops = g.ops.saturating_add(1);
                    }
                }
            }
            '.' if decimal_point => {}
            '!' | '-' | '.' | '?' => {
                if let Some(g) = stack.last_mut() {
                    g.ops = g.ops.saturating_add(1);
                }
            }
            '+' | '*' | '/' | '%' | '<' | '>' | '=' | '&' | '|' => {
                // A run of these is one operator (`==`, `<=`, `&&`, ...).
                while chars.next_if(|n| "=&|<>".contains(*n)).is_some() {}
                if let Some(g) = stack.last_mut() {
                    g.ops = g.ops.saturating_add(1);
                }
            }
            // The `in` operator.
            'i' if !(prev.is_alphanumeric() || prev == '_') && chars.peek() == Some(&'n') => {
                let mut look = chars.clone();
                look.next();
                if !look
                    .peek()
                    .is_some_and(|n| n.is_alphanumeric() || *n == '_')
                {
                    if let Some(g) = stack.last_mut() {
                        g.ops = g.ops.saturating_add(1);
                    }
                }
            }
            _ => {}
        }
        prev = c;
        let bound: usize = stack
            .iter()
            .map(|g| g.done.max(g.ops.saturating_add(g.child)).saturating_add(1))
            .sum();
        if bound > LEXICAL_BOUND {
            return Err(too_deep(&format!(
                "expression is too deep: its operator chains and nesting exceed {MAX_DEPTH} levels"
            )));
        }
    }
    Ok(())
}

/// The exact depth of a parsed tree, computed without recursion.
pub(super) fn depth(e: &IdedExpr) -> Result<(), CelIssue> {
    let mut max = 0usize;
    let mut stack = vec![(e, 1usize)];
    while let Some((node, d)) = stack.pop() {
        max = max.max(d);
        if max > MAX_DEPTH {
            return Err(too_deep(&format!(
                "expression is nested {max}+ levels deep (operator chains count), over the limit of {MAX_DEPTH}"
            )));
        }
        stack.extend(children(node).into_iter().map(|c| (c, d.saturating_add(1))));
    }
    Ok(())
}
