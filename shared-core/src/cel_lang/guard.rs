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
const LEXICAL_BOUND: usize = 256;

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
    /// A `{...}` group: `:` separates a key from its value.
    brace: bool,
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
/// safely. Runs on the parser's own tokens (so strings, raw strings, comments and escapes are
/// read exactly as the parser reads them); a text the lexer rejects is a syntax error here,
/// before the parser (and its error recovery) sees it.
pub(crate) fn lexical(src: &str) -> Result<(), CelIssue> {
    use cel::parser::pratt_parser::{Lexer, TokenKind as K};
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
    let mut lexer = Lexer::new(src);
    loop {
        let token = lexer.lex();
        match token.kind {
            K::TokEnd => break,
            K::TokError => {
                let (at, what) = lexer
                    .get_error()
                    .map_or((token.start, "invalid token"), |e| {
                        (e.start, e.message.as_str())
                    });
                // The column in characters, from 1, on the line where the token starts.
                let before = src.get(..at).unwrap_or(src);
                let line = before.matches('\n').count().saturating_add(1);
                let column = before
                    .rsplit('\n')
                    .next()
                    .map_or(0, |l| l.chars().count())
                    .saturating_add(1);
                let place = if src.contains('\n') {
                    format!("line {line}, column {column}")
                } else {
                    format!("column {column}")
                };
                return Err(issue(
                    Code::CelSyntax,
                    format!("CEL syntax error at {place}: {what}"),
                    None,
                ));
            }
            K::TokLeftParen | K::TokLeftBracket | K::TokLeftBrace => {
                if stack.len() > MAX_NESTING {
                    return Err(too_deep(&format!(
                        "expression nests brackets deeper than {MAX_NESTING} levels"
                    )));
                }
                if let Some(g) = stack.last_mut() {
                    // Calling, indexing or building a list is a node of the enclosing segment.
                    g.ops = g.ops.saturating_add(1);
                }
                stack.push(Group {
                    brace: token.kind == K::TokLeftBrace,
                    ..Group::default()
                });
            }
            K::TokRightParen | K::TokRightBracket | K::TokRightBrace if stack.len() > 1 => {
                if let Some(g) = stack.pop() {
                    let b = g.bound();
                    if let Some(parent) = stack.last_mut() {
                        parent.child = parent.child.max(b);
                    }
                }
            }
            K::TokComma => {
                if let Some(g) = stack.last_mut() {
                    g.finish_segment();
                }
            }
            K::TokColon => {
                if let Some(g) = stack.last_mut() {
                    if g.brace {
                        g.finish_segment();
                    } else {
                        g.ops = g.ops.saturating_add(1);
                    }
                }
            }
            K::TokWhitespace | K::TokComment => {}
            K::TokNull
            | K::TokFalse
            | K::TokTrue
            | K::TokReservedWord
            | K::TokInt
            | K::TokUint
            | K::TokFloat
            | K::TokString
            | K::TokBytes
            | K::TokIdent
            | K::TokRightParen
            | K::TokRightBracket
            | K::TokRightBrace => {}
            // Every operator (`.`, `-`, `!`, `?`, `in`, binary operators) is a possible level.
            _ => {
                if let Some(g) = stack.last_mut() {
                    g.ops = g.ops.saturating_add(1);
                }
            }
        }
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
