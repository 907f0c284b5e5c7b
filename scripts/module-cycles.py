#!/usr/bin/env python3
"""Fails when modules of a crate import each other (directly or around a longer loop).

    scripts/module-cycles.py shared-core/src ext-authz/src filter/src ...
    scripts/module-cycles.py --self-test

Every module is a node: a `.rs` file (`a/b.rs` is `a::b`, `#[path]` honoured) or an inline
`mod x { ... }` in one. Every path a module names is an edge to the deepest module it reaches:
`crate::`, `super::`, `self::` paths, bare paths through a child module, an imported name or a
glob import (in `use` trees and in code, macros included; comments, strings and `#[cfg(test)]`
code are left out). A name a module imports or re-exports (`pub(crate) use run::Outcome`) is
followed to the module it comes from, so an item reached through a parent counts as its own
module's. An edge between a module and one of its ancestors or descendants is not counted (a
parent declares its children; a child may use its parent's own items); other edges are lifted to
the two siblings under their common parent, and every strongly connected set of siblings larger
than one is reported with the lines that make it. Exit status 1 when there is one, 0 otherwise.

Binaries (`main.rs` beside a `lib.rs`, `src/bin/`) are crates of their own and are left out.
"""
import os
import re
import sys
import tempfile
from collections import defaultdict

IDENT = r"(?:r#)?[A-Za-z_]\w*"


def strip(src):
    """Source without comments and string/char literal contents (lines kept)."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if src.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif src.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    if src[i] == "\n":
                        out.append("\n")
                    i += 1
        elif re.match(r'b?r(#*)"', src[i:i + 40]) and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            m = re.match(r'b?r(#*)"', src[i:])
            end = '"' + m.group(1)
            j = src.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append('""' + "\n" * src.count("\n", i, j))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append('""' + "\n" * src.count("\n", i, j))
            i = j + 1
        elif c == "'":
            m = re.match(r"'(\\.[^']*|[^\\'])'", src[i:])
            if m:
                out.append("' '")
                i += m.end()
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def matching_brace(src, open_at):
    depth = 0
    for k in range(open_at, len(src)):
        if src[k] == "{":
            depth += 1
        elif src[k] == "}":
            depth -= 1
            if depth == 0:
                return k
    return len(src) - 1


def without_test_code(src):
    """Drops `#[cfg(test)]` / `#[cfg(all(test, ...))]` items with a body (inline modules,
    functions, impls); a `mod tests;` file is left out where it is declared."""
    out, pos = [], 0
    for m in re.finditer(r"#\[cfg\((?:all\()?test\b[^\]]*\]", src):
        if m.start() < pos:
            continue
        brace, semi = src.find("{", m.end()), src.find(";", m.end())
        if brace < 0 or (0 <= semi < brace):
            continue
        end = matching_brace(src, brace)
        out.append(src[pos:m.start()])
        out.append("\n" * src.count("\n", m.start(), end + 1))
        pos = end + 1
    out.append(src[pos:])
    return "".join(out)


def expand_use(tree):
    """`a::{b, c::{d as e, self}}` -> [('a::b', 'b'), ('a::c::d', 'e'), ('a::c', 'c')]: each
    imported path with the name it is known by ('*' for a glob)."""
    tree = re.sub(r"\s+as\s+", " as ", tree.strip())
    tree = re.sub(r"\s*(::|,|\{|\})\s*", r"\1", tree)
    depth, start = 0, None
    for i, ch in enumerate(tree):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                prefix, inner = tree[:start], tree[start + 1:i]
                parts, d, cur = [], 0, ""
                for c in inner:
                    if c == "," and d == 0:
                        parts.append(cur)
                        cur = ""
                        continue
                    d += c == "{"
                    d -= c == "}"
                    cur += c
                parts.append(cur)
                res = []
                for p in parts:
                    if p == "self":
                        path = prefix.rstrip(":")
                        res.append((path, path.split("::")[-1]))
                    elif p.startswith("self as "):
                        res.append((prefix.rstrip(":"), p.split(" as ")[1]))
                    elif p:
                        res.extend(expand_use(prefix + p))
                return res
    path, _, alias = tree.partition(" as ")
    path = path.strip()
    return [(path, alias.strip() or path.split("::")[-1])]


def plain(seg):
    return seg[2:] if seg.startswith("r#") else seg


class Crate:
    def __init__(self, root):
        self.root = root
        self.files = {}        # module path -> file
        self.text = {}         # file -> stripped source
        self.inline = {}       # file -> [(start, end, module path)]
        self.imports = defaultdict(dict)   # module -> name -> (path, from module, line)
        self.globs = defaultdict(list)     # module -> [(path, from module)]
        self.defines = defaultdict(set)    # module -> names of the items it defines
        self.load()

    def add_file(self, mod, path, test_only):
        if mod in self.files or not os.path.isfile(path):
            return
        self.files[mod] = path
        raw = open(path, encoding="utf-8").read()
        # `#[path = "x.rs"] mod name;` (read before strings are blanked out).
        path_attrs = {plain(m.group(2)): m.group(1) for m in re.finditer(
            r"#\[path\s*=\s*\"([^\"]*)\"\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;", raw)}
        src = strip(raw)
        for m in re.finditer(r"#\[cfg\((?:all\()?test\b[^\]]*\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;", src):
            test_only.add(mod + (plain(m.group(1)),))
        src = without_test_code(src)
        src = re.sub(r"\s*::\s*", "::", src)
        self.text[path] = src
        for d in re.finditer(r"\b(?:fn|struct|enum|union|trait|type|const|static|macro_rules!)\s+(" + IDENT + r")", src):
            self.defines[mod].add(plain(d.group(1)))
        spans = []
        for m in re.finditer(r"\bmod\s+(" + IDENT + r")\s*\{", src):
            spans.append((m.start(), matching_brace(src, m.end() - 1), plain(m.group(1))))
        self.inline[path] = []
        for start, end, name in spans:
            outer = [n for s, e, n in spans if s < start and end <= e]
            inner_mod = mod + tuple(outer) + (name,)
            self.inline[path].append((start, end, inner_mod))
            self.files.setdefault(inner_mod, path)
        # Child files: `mod x;` (with `#[path = "..."]`), unless test-only.
        for m in re.finditer(r"\bmod\s+(" + IDENT + r")\s*;", src):
            name = plain(m.group(1))
            here = self.module_at(path, mod, m.start())
            child = here + (name,)
            if child in test_only:
                continue
            if name in path_attrs:
                target = os.path.normpath(os.path.join(os.path.dirname(path), path_attrs[name]))
            else:
                base = os.path.dirname(path) if os.path.basename(path) in ("lib.rs", "main.rs", "mod.rs") \
                    else os.path.splitext(path)[0]
                base = os.path.join(base, *here[len(mod):])
                target = os.path.join(base, name + ".rs")
                if not os.path.isfile(target):
                    target = os.path.join(base, name, "mod.rs")
            self.add_file(child, target, test_only)

    def load(self):
        lib = os.path.join(self.root, "lib.rs")
        main = os.path.join(self.root, "main.rs")
        self.add_file((), lib if os.path.isfile(lib) else main, set())
        for path, src in self.text.items():
            file_mod = next(m for m, p in self.files.items() if p == path and not self.is_inline(m, path))
            for m in re.finditer(r"\b(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", src):
                mod = self.module_at(path, file_mod, m.start())
                line = src.count("\n", 0, m.start()) + 1
                for p, name in expand_use(m.group(2)):
                    if name == "*":
                        self.globs[mod].append((p[:-3] if p.endswith("::*") else p, line))
                    elif p.endswith("::*"):
                        self.globs[mod].append((p[:-3], line))
                    else:
                        self.imports[mod][plain(name)] = (p, line)

    def is_inline(self, mod, path):
        return any(m == mod for _, _, m in self.inline.get(path, []))

    def module_at(self, path, file_mod, pos):
        best = file_mod
        for start, end, mod in self.inline.get(path, []):
            if start < pos <= end and len(mod) > len(best):
                best = mod
        return best

    def resolve(self, mod, path, depth=0):
        """The deepest module of this crate `path` (named from `mod`) reaches, or None."""
        if depth > 8:
            return None
        segs = [plain(s) for s in path.split("::") if s]
        if not segs:
            return None
        if segs[0] == "crate":
            base, segs = (), segs[1:]
        elif segs[0] in ("super", "self"):
            base = mod
            while segs and segs[0] in ("super", "self"):
                if segs[0] == "super":
                    base = base[:-1]
                segs = segs[1:]
        elif mod + (segs[0],) in self.files:
            base = mod
        elif segs[0] in self.imports.get(mod, {}):
            target = self.resolve(mod, self.imports[mod][segs[0]][0], depth + 1)
            if target is None:
                return None
            return self.walk(target, segs[1:], depth)
        else:
            for g, _ in self.globs.get(mod, []):
                gm = self.resolve(mod, g, depth + 1)
                if gm is not None and gm + (segs[0],) in self.files:
                    return self.walk(gm + (segs[0],), segs[1:], depth)
            return None
        return self.walk(base, segs, depth)

    def walk(self, target, segs, depth):
        for i, s in enumerate(segs):
            if target + (s,) in self.files:
                target = target + (s,)
                continue
            # A name the module imports (a re-export, or a private `use` its children see):
            # the item is that module's.
            imported = self.imports.get(target, {}).get(s)
            if imported is not None and s not in self.defines.get(target, ()):
                followed = self.resolve(target, imported[0], depth + 1)
                if followed is not None:
                    return self.walk(followed, segs[i + 1:], depth + 1)
            break
        return target

    def edges(self):
        for path, src in self.text.items():
            file_mods = [m for m, p in self.files.items() if p == path and not self.is_inline(m, path)]
            if not file_mods:
                continue
            file_mod = file_mods[0]
            found = []
            for m in re.finditer(r"\b(?:pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", src):
                line = src.count("\n", 0, m.start()) + 1
                for p, _ in expand_use(m.group(1)):
                    found.append((p[:-3] if p.endswith("::*") else p, m.start(), line))
            code = re.sub(r"\buse\s+[^;]+;", lambda m: "\n" * m.group(0).count("\n"), src)
            for m in re.finditer(r"(?<![\w:])(" + IDENT + r"(?:::" + IDENT + r")+)", code):
                found.append((m.group(1), m.start(), code.count("\n", 0, m.start()) + 1))
            for p, pos, line in found:
                mod = self.module_at(path, file_mod, pos)
                t = self.resolve(mod, p)
                if t is None or t[:len(mod)] == mod or mod[:len(t)] == t:
                    continue
                yield mod, t, f"{os.path.relpath(path)}:{line} uses {'::'.join(t) or 'crate root'}"


def sccs(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def check(root):
    crate = Crate(root)
    graph, why = defaultdict(set), defaultdict(list)
    for mod, target, reason in crate.edges():
        i = 0
        while i < min(len(mod), len(target)) and mod[i] == target[i]:
            i += 1
        a, b = mod[:i + 1], target[:i + 1]
        graph[a].add(b)
        why[(a, b)].append(reason)
    problems = []
    for comp in sccs(graph):
        if len(comp) > 1:
            names = sorted("::".join(c) for c in comp)
            lines = [w for a in comp for b in comp if (a, b) in why for w in why[(a, b)][:3]]
            problems.append(f"{root}: modules import each other: {', '.join(names)}\n    " + "\n    ".join(lines))
    return problems


# Shapes the check must see (each a crate: file -> text) and one it must not report.
CIRCLES = {
    "direct": {"lib.rs": "mod a;\nmod b;\n", "a.rs": "use crate::b::fb;\n", "b.rs": "use crate::a::fa;\n"},
    "glob then bare path": {"lib.rs": "mod a;\nmod b;\n", "a.rs": "use super::*;\npub fn fa() { b::fb() }\n",
                            "b.rs": "use crate::a::fa;\n"},
    "re-export at the root": {"lib.rs": "mod a;\nmod b;\npub(crate) use a::A;\n", "a.rs": "pub fn fa() { crate::b::fb() }\n",
                              "b.rs": "use crate::A;\n"},
    "super::super in an inline module": {"lib.rs": "mod p;\n", "p.rs": "mod x;\nmod y;\n",
                                         "p/x.rs": "mod inner {\n pub use super::super::y::fy;\n}\n",
                                         "p/y.rs": "use super::x::fx;\n"},
    "raw identifier": {"lib.rs": "mod r#type;\nmod b;\n", "type.rs": "pub fn ft() { crate::b::fb() }\n",
                       "b.rs": "use crate::r#type::ft;\n"},
    "path across lines": {"lib.rs": "mod a;\nmod b;\n", "a.rs": "pub fn fa() { crate::b::fb() }\n",
                          "b.rs": "pub fn fb() { crate::\n    a::fa() }\n"},
    "#[path]": {"lib.rs": "#[path = \"impl_a.rs\"]\nmod a;\nmod b;\n", "impl_a.rs": "pub fn fa() { crate::b::fb() }\n",
                "b.rs": "pub fn fb() { crate::a::fa() }\n"},
    "inline module": {"lib.rs": "mod a;\nmod b { pub fn fb() { crate::a::fa() } }\n", "a.rs": "pub fn fa() { crate::b::fb() }\n"},
    "alias": {"lib.rs": "mod a;\nmod b;\n", "a.rs": "use super::b as bb;\npub fn fa() { bb::fb() }\n",
              "b.rs": "pub fn fb() { super::a::fa() }\n"},
    "lifetimes and raw strings": {"lib.rs": "mod a;\nmod b;\n",
                                  "a.rs": "pub fn fa<'a>(x: &'a str) -> &'a str { let _c = '\"'; crate::b::fb(); x }\n",
                                  "b.rs": "pub fn fb() { let _s = r\"\\\"; crate::a::fa(\"\"); }\n"},
    "through a parent's re-export": {"lib.rs": "mod eval;\n", "eval.rs": "mod resolve;\nmod run;\npub(crate) use run::Outcome;\n",
                                     "eval/resolve.rs": "use super::Outcome;\n",
                                     "eval/run.rs": "use super::resolve;\npub(crate) enum Outcome { A }\n"},
    "three in a ring": {"lib.rs": "mod a;\nmod b;\nmod c;\n", "a.rs": "pub fn ax() {}\nuse crate::b::bx;\n",
                        "b.rs": "pub fn bx() {}\nuse crate::c::cx;\n", "c.rs": "pub fn cx() {}\nuse crate::a::ax;\n"},
}
NO_CIRCLE = {
    "super in an inline module is the file's module": {
        "lib.rs": "mod a;\nmod b;\n",
        "a.rs": "mod b;\nmod inner {\n    use super::b::x;\n    pub fn f() { x() }\n}\n",
        "a/b.rs": "pub fn x() {}\n",
        "b.rs": "pub fn z() { crate::a::g() }\n"},
    "a child using its parent": {"lib.rs": "mod a;\npub fn f() {}\n", "a.rs": "mod c;\n", "a/c.rs": "use super::super::f;\n"},
    "test code": {"lib.rs": "mod a;\nmod b;\n", "a.rs": "use crate::b::x;\n",
                  "b.rs": "#[cfg(test)]\nmod tests {\n    use crate::a::y;\n}\n"},
}


def self_test():
    failures = []
    for cases, want in ((CIRCLES, True), (NO_CIRCLE, False)):
        for name, files in cases.items():
            with tempfile.TemporaryDirectory() as d:
                for f, text in files.items():
                    os.makedirs(os.path.dirname(os.path.join(d, f)), exist_ok=True)
                    with open(os.path.join(d, f), "w", encoding="utf-8") as out:
                        out.write(text)
                got = bool(check(d))
            if got != want:
                failures.append(f"{name}: {'missed' if want else 'reported a circle that is not there'}")
    for f in failures:
        print(f"module-cycles self-test: {f}")
    if not failures:
        print(f"module-cycles self-test: {len(CIRCLES)} circles found, {len(NO_CIRCLE)} non-circles left alone")
    return 1 if failures else 0


def main(args):
    if args == ["--self-test"]:
        return self_test()
    roots = args or ["src"]
    problems = [p for r in roots for p in check(r)]
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} import circle(s); a shared item belongs in a module both can use")
        return 1
    print(f"no import circles in {', '.join(roots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
