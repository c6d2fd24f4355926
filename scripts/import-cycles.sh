#!/usr/bin/env bash
# Lists the file-level import edges between the library's modules and reports every 2-cycle
# (then every longer loop, A -> B -> C -> A, that is not just two 2-cycles chained):
# module A names something in module B (`use crate::..`, `use super::..`, `use self::..`, a
# child's name, or the same paths written inline in code) and B names something in A.
#
#   scripts/import-cycles.sh [--edges] [SRC_DIR]    (SRC_DIR defaults to src/)
#
# A file is one node (`mod.rs` is its folder's module; inline `mod x { .. }` blocks, test modules
# included, belong to their file). A path resolves to the deepest module file it names, so
# `use super::config::X` from engine/worker.rs is an edge to engine/config.rs, while
# `use super::X` is an edge to engine/mod.rs itself. A `mod child;` declaration is not an edge;
# a parent naming its child's items (`pub use child::X`, `child::f()`) is, so a child that also
# uses its parent's items makes a cycle. src/bin/ is left out (separate crates).
# `--edges` prints every edge first. Exit status: 0 when there is no cycle, 1 when there is one.
set -euo pipefail
exec python3 - "$@" <<'PY'
import os, re, sys

args = [a for a in sys.argv[1:]]
show_edges = "--edges" in args
args = [a for a in args if a != "--edges"]
src = args[0] if args else os.path.join(os.path.dirname(os.path.abspath(os.environ.get("PWD", "."))), "src")
if not args:
    src = "src"
src = src.rstrip("/")

# module path (tuple) -> file, for every library file.
modules = {}
for root, dirs, files in os.walk(src):
    rel_root = os.path.relpath(root, src)
    if rel_root.split(os.sep)[0] == "bin":
        continue
    for f in files:
        if not f.endswith(".rs"):
            continue
        rel = os.path.normpath(os.path.join(rel_root, f))
        parts = rel[:-3].split(os.sep)
        if parts == ["lib"] or parts == ["main"]:
            mod = ()
        elif parts[-1] == "mod":
            mod = tuple(parts[:-1])
        else:
            mod = tuple(parts)
        modules[mod] = os.path.join(src, rel)

def name(mod):
    return "crate" if not mod else "::".join(mod)

def strip(text):
    """Removes comments, string and char literals (keeps line structure)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    if text[i] == "\n":
                        out.append("\n")
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not (text[i-1].isalnum() or text[i-1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            end = text.find('"' + m.group(1), i + len(m.group(0)))
            end = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'":
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:])
            if m:
                out.append("' '")
                i += len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)

def expand_use(tree):
    """`a::{b, c::{d, e}}` -> [[a, b], [a, c, d], [a, c, e]] (segments only, `as` dropped)."""
    tree = re.sub(r"\s+", "", tree)
    def split_top(s):
        parts, depth, cur = [], 0, ""
        for ch in s:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        if cur:
            parts.append(cur)
        return parts
    def rec(s):
        s = re.sub(r"as\w+$", "", s) if "{" not in s else s
        if "{" in s:
            k = s.index("{")
            prefix = [p for p in s[:k].split("::") if p]
            inner = s[k + 1 : s.rindex("}")]
            res = []
            for part in split_top(inner):
                for tail in rec(part):
                    res.append(prefix + tail)
            return res
        return [[p for p in s.split("::") if p]]
    return rec(tree)

edges = {}  # (from, to) -> first "file:line"

def resolve(cur, segs, children):
    """Absolute module path named by `segs` written in module `cur` (None when external)."""
    if not segs:
        return None
    if segs[0] == "crate":
        base, rest = (), segs[1:]
    elif segs[0] in ("super", "self"):
        base, rest = cur, segs
        while rest and rest[0] in ("super", "self"):
            if rest[0] == "super":
                base = base[:-1]
            rest = rest[1:]
    elif segs[0] in children:
        base, rest = cur, segs
    else:
        return None
    best = base
    path = base
    for s in rest:
        path = path + (s,)
        if path in modules:
            best = path
        else:
            break
    return best

PATH_RE = re.compile(r"(?<![\w:])((?:crate|super|self)(?:::\w+)+|\w+(?:::\w+)+)")
USE_RE = re.compile(r"\b(?:pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", re.S)

for mod, path in sorted(modules.items()):
    text = strip(open(path, encoding="utf-8").read())
    # children declared with `mod x;` (files) -- relative paths starting with them are edges.
    children = set(re.findall(r"\bmod\s+(\w+)\s*;", text))
    # inline modules: track `mod x {` blocks so that `super::` inside them is read correctly.
    lines = text.split("\n")
    stack = []  # (name, depth at open)
    depth = 0
    pending = None
    # Join `use` statements spanning lines: process per statement with its start line.
    offsets = []
    pos = 0
    for ln in lines:
        offsets.append(pos)
        pos += len(ln) + 1
    def line_of(off):
        lo, hi = 0, len(offsets) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if offsets[mid] <= off:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1
    # Module context per character offset: compute from braces.
    ctx_at = []  # list of (offset, inline-module tuple)
    inline = []
    i = 0
    for m in re.finditer(r"\bmod\s+(\w+)\s*\{|\{|\}", text):
        tok = m.group(0)
        if tok.startswith("mod"):
            depth += 1
            inline.append((m.group(1), depth))
            ctx_at.append((m.end(), tuple(n for n, _ in inline)))
        elif tok == "{":
            depth += 1
        else:
            if inline and inline[-1][1] == depth:
                inline.pop()
                ctx_at.append((m.end(), tuple(n for n, _ in inline)))
            depth -= 1
    def ctx(off):
        cur = ()
        for o, c in ctx_at:
            if o <= off:
                cur = c
            else:
                break
        return cur
    def add(off, segs):
        inner = ctx(off)
        cur = mod + inner
        kids = children if not inner else set()
        target = resolve(cur, segs, kids)
        if target is None:
            return
        # Inline modules belong to their file.
        while target not in modules and target:
            target = target[:-1]
        if target != mod:
            edges.setdefault((mod, target), f"{path}:{line_of(off)}")
    used = []
    for m in USE_RE.finditer(text):
        for segs in expand_use(m.group(1)):
            add(m.start(), segs)
        used.append((m.start(), m.end()))
    # Inline paths outside `use` statements.
    masked = list(text)
    for a, b in used:
        for k in range(a, b):
            if masked[k] != "\n":
                masked[k] = " "
    masked = "".join(masked)
    for m in PATH_RE.finditer(masked):
        segs = m.group(1).split("::")
        add(m.start(), segs)

if show_edges:
    for (a, b), where in sorted(edges.items()):
        print(f"{name(a)} -> {name(b)}    ({where})")

cycles = sorted({tuple(sorted((a, b))) for (a, b) in edges if (b, a) in edges})
for a, b in cycles:
    print(f"cycle: {name(a)} <-> {name(b)}")
    print(f"    {name(a)} -> {name(b)} at {edges[(a, b)]}")
    print(f"    {name(b)} -> {name(a)} at {edges[(b, a)]}")

# Longer cycles (A -> B -> C -> A): strongly connected components of more than two modules, or
# of two that the 2-cycle list above already names but that hold a longer loop as well.
succ = {}
for a, b in edges:
    succ.setdefault(a, set()).add(b)
index, low, on, stack, sccs, counter = {}, {}, set(), [], [], [0]
def strongconnect(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(succ.get(v, ())):
        if w not in index:
            strongconnect(w)
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
        if len(comp) > 1:
            sccs.append(sorted(comp))
sys.setrecursionlimit(10000)
for v in sorted(set(a for a, _ in edges) | set(b for _, b in edges)):
    if v not in index:
        strongconnect(v)
def shortest_loop(comp):
    """A shortest cycle through the component's first module that has length >= 3, if any."""
    members = set(comp)
    best = None
    for start in comp:
        # BFS over paths; keep those that return to start with length >= 3.
        frontier = [[start]]
        for _ in range(len(comp)):
            nxt = []
            for path in frontier:
                for w in sorted(succ.get(path[-1], ())):
                    if w not in members:
                        continue
                    if w == start and len(path) >= 3:
                        if best is None or len(path) < len(best):
                            best = path
                    elif w not in path:
                        nxt.append(path + [w])
            frontier = nxt
        if best:
            return best
    return None
longer = 0
for comp in sccs:
    loop = shortest_loop(comp)
    if loop is None:
        continue
    longer += 1
    print("loop: " + " -> ".join(name(m) for m in loop + [loop[0]]))
    for a, b in zip(loop, loop[1:] + [loop[0]]):
        print(f"    {name(a)} -> {name(b)} at {edges[(a, b)]}")
print(f"{len(cycles)} import cycle(s) and {longer} longer loop(s) among {len(modules)} modules, {len(edges)} edges")
sys.exit(1 if cycles or longer else 0)
PY
