#!/usr/bin/env python3
"""Fails when modules of a crate import each other (directly or around a longer loop).

    scripts/module-cycles.py shared-core/src ext-authz/src filter/src ...

Each `.rs` file is a module (`a/b.rs` is `a::b`). Every path a file names through `crate::`,
`super::` or `self::` (in `use` trees and in code; comments, strings and `#[cfg(test)]` code are
left out) is an edge to the deepest module it reaches. An edge between a module and one of its
ancestors or descendants is not counted (a parent declares its children; a child may use its
parent's items). Other edges are lifted to the two siblings under their common parent, and every
strongly connected set of siblings larger than one is reported with the lines that make it.
Exit status 1 when there is one, 0 otherwise.
"""
import os
import re
import sys
from collections import defaultdict


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


def without_test_code(src):
    """Drops `#[cfg(test)]` / `#[cfg(all(test, ...))]` items that are inline modules or functions."""
    out, pos = [], 0
    for m in re.finditer(r"#\[cfg\((?:all\()?test\b[^\]]*\]", src):
        if m.start() < pos:
            continue
        j = m.end()
        brace = src.find("{", j)
        semi = src.find(";", j)
        if brace < 0 or (0 <= semi < brace):
            continue  # `mod tests;` or a `use`: the file itself is skipped elsewhere
        depth, k = 0, brace
        while k < len(src):
            if src[k] == "{":
                depth += 1
            elif src[k] == "}":
                depth -= 1
                if depth == 0:
                    break
            k += 1
        out.append(src[pos:m.start()])
        out.append("\n" * src.count("\n", m.start(), k + 1))
        pos = k + 1
    out.append(src[pos:])
    return "".join(out)


def expand_use(tree):
    """`a::{b, c::{d, e}}` -> ['a::b', 'a::c::d', 'a::c::e']."""
    tree = re.sub(r"\s+", "", tree)
    depth, start = 0, None
    for i, ch in enumerate(tree):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                prefix, inner, rest = tree[:start], tree[start + 1:i], tree[i + 1:]
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
                    if p:
                        res.extend(expand_use(prefix + p + rest))
                return res
    return [re.sub(r"\bas\w+$", "", tree)]


def module_of(root, path):
    rel = os.path.relpath(path, root)[:-3].split(os.sep)
    if rel[-1] in ("lib", "main", "mod"):
        rel = rel[:-1]
    return tuple(rel)


def crate_modules(root):
    files = {}
    for d, _, names in os.walk(root):
        for f in names:
            if f.endswith(".rs"):
                p = os.path.join(d, f)
                files[module_of(root, p)] = p
    # Modules declared test-only by their parent are left out with everything under them.
    test_only = set()
    for mod, p in files.items():
        src = open(p, encoding="utf-8").read()
        for m in re.finditer(r"#\[cfg\((?:all\()?test\b[^\]]*\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", src):
            test_only.add(mod + (m.group(1),))
    return {m: p for m, p in files.items() if not any(m[:len(t)] == t for t in test_only)}


def resolve(mod, path, modules):
    segs = path.split("::")
    if segs[0] == "crate":
        base, segs = (), segs[1:]
    elif segs[0] in ("super", "self"):
        base = mod
        while segs and segs[0] in ("super", "self"):
            if segs[0] == "super":
                base = base[:-1]
            segs = segs[1:]
    else:
        return None
    target = base
    for s in segs:
        if target + (s,) in modules:
            target = target + (s,)
        else:
            break
    return target


def edges_of(mod, path, modules):
    src = without_test_code(strip(open(path, encoding="utf-8").read()))
    found = []
    for m in re.finditer(r"\buse\s+([^;]+);", src):
        line = src.count("\n", 0, m.start()) + 1
        for p in expand_use(m.group(1)):
            found.append((p, line))
    code = re.sub(r"\buse\s+[^;]+;", lambda m: "\n" * m.group(0).count("\n"), src)
    for m in re.finditer(r"\b(?:crate|super|self)(?:::\w+)+", code):
        found.append((m.group(0), code.count("\n", 0, m.start()) + 1))
    for p, line in found:
        t = resolve(mod, p, modules)
        if t is None or t[:len(mod)] == mod or mod[:len(t)] == t:
            continue
        yield t, line


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
    modules = crate_modules(root)
    graph, why = defaultdict(set), defaultdict(list)
    for mod, path in sorted(modules.items()):
        for target, line in edges_of(mod, path, modules):
            i = 0
            while i < min(len(mod), len(target)) and mod[i] == target[i]:
                i += 1
            a, b = mod[:i + 1], target[:i + 1]
            graph[a].add(b)
            why[(a, b)].append(f"{os.path.relpath(path)}:{line} uses {'::'.join(target) or 'crate root'}")
    problems = []
    for comp in sccs(graph):
        if len(comp) > 1:
            names = sorted("::".join(c) for c in comp)
            lines = [w for a in comp for b in comp if (a, b) in why for w in why[(a, b)][:3]]
            problems.append(f"{root}: modules import each other: {', '.join(names)}\n    " + "\n    ".join(lines))
    return problems


def main(roots):
    problems = [p for r in roots for p in check(r)]
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} import circle(s); a shared item belongs in a module both can use")
        return 1
    print(f"no import circles in {', '.join(roots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["src"]))
