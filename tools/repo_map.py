"""``repo_map``: a compact, ranked outline of the project's code.

Each source file is parsed with tree-sitter into its definitions (line, nesting
depth, one-line signature) and the identifiers it uses; definitions are ranked by
how many *other* files use their name (see ``_rank``) and taken best first until
a token budget (estimated as characters / 4) is spent. Parses are cached on disk
keyed by the file's bytes, so an unchanged file is never parsed twice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, Field
from tree_sitter_language_pack import get_language, get_parser

from .base import Tool, ToolContext, ToolRefused, ToolResult, resolve_in_root
from .edit import replace_bytes
from .files import project_files, relative

FORMAT = 1  # bump whenever what _parse stores changes, so old cache entries stop matching
MAX_FILE_BYTES = 1 << 20
CHARS_PER_TOKEN = 4
FOCUS_BOOST = 1000  # more than any realistic reference count: focused things come first

# Candidate grammar names per extension; the pack's naming changed between releases.
EXTENSIONS: dict[str, tuple[str, ...]] = {
    ".py": ("python",), ".pyi": ("python",), ".js": ("javascript",), ".mjs": ("javascript",),
    ".cjs": ("javascript",), ".jsx": ("javascript",), ".ts": ("typescript",), ".tsx": ("tsx",),
    ".go": ("go",), ".rs": ("rust",), ".c": ("c",), ".h": ("c",), ".cc": ("cpp",), ".cpp": ("cpp",),
    ".cxx": ("cpp",), ".hpp": ("cpp",), ".hh": ("cpp",), ".java": ("java",), ".rb": ("ruby",),
    ".cs": ("csharp", "c_sharp"), ".kt": ("kotlin",), ".kts": ("kotlin",), ".swift": ("swift",),
    ".php": ("php",), ".lua": ("lua",), ".sh": ("bash",), ".bash": ("bash",), ".scala": ("scala",),
}

# Node types that define something, across the grammars above.
DEF_TYPES = {
    "class_definition", "function_definition", "class_declaration", "function_declaration",
    "generator_function_declaration", "method_definition", "method_declaration", "method_signature",
    "constructor_declaration", "interface_declaration", "type_alias_declaration", "enum_declaration",
    "abstract_class_declaration", "internal_module", "function_item", "function_signature_item",
    "struct_item", "enum_item", "union_item", "trait_item", "impl_item", "mod_item", "type_item",
    "macro_definition", "type_spec", "struct_specifier", "union_specifier", "enum_specifier",
    "class_specifier", "namespace_definition", "type_definition", "declaration", "record_declaration",
    "struct_declaration", "namespace_declaration", "trait_declaration", "protocol_declaration",
    "object_declaration", "object_definition", "trait_definition", "class", "module", "method",
    "singleton_method", "variable_declarator",
}
NEED_BODY = {"struct_specifier", "union_specifier", "enum_specifier", "class_specifier"}  # else a mere use
FUNCTION_VALUES = {"arrow_function", "function_expression", "function"}
TEST_PATH = re.compile(r"(^|/)(tests?|spec)/|(^|/)test_|_test\.|\.(test|spec)\.")
NAME_LEAVES = {"constant", "name", "word"}  # identifier-like leaves whose type lacks "identifier"


class RepoMap(Tool):
    name = "repo_map"
    description = ("A compact map of the project's code: source files with their classes, functions, "
                   "methods, structs, interfaces... as line number and one-line signature, the most used "
                   "first, cut to a token budget. Use it to find your way around before reading files; "
                   "pass focus to put the files or names you care about first.")
    access = "read"

    class Args(BaseModel):
        path: str = Field(".", description="folder (or file) to map, relative to the project root")
        max_tokens: int = Field(2000, ge=200, le=20000, description="size budget of the map, in tokens")
        focus: list[str] = Field(default_factory=list,
                                 description="file paths (relative to the root) or symbol names to rank first")

    def run(self, args: Args, ctx: ToolContext) -> ToolResult:
        base = resolve_in_root(ctx, args.path)
        if not base.exists():
            raise ToolRefused(f"{args.path} does not exist")
        cache_dir = ctx.data_dir / "repo_map" if ctx.data_dir is not None else None
        parsed: dict[str, dict] = {}
        no_grammar: Counter[str] = Counter()
        for path in _source_files(ctx, base):
            if (lang := _language(path.suffix.lower())) is None:
                no_grammar[path.suffix.lower()] += 1
                continue
            try:
                data = path.read_bytes()
            except OSError:  # vanished or unreadable since listed: map the rest
                continue
            if b"\0" not in data[:8192]:  # else binary, whatever its name says
                parsed[relative(ctx, path)] = _symbols(data, lang, cache_dir)
        ranked = _rank(parsed, _focus(ctx, args.focus))
        text, shown = _render(parsed, ranked, args.path, args.max_tokens * CHARS_PER_TOKEN, no_grammar)
        return ToolResult(text, summary=f"repo map: {shown} of {len(ranked)} definitions")


def _source_files(ctx: ToolContext, base: Path) -> list[Path]:
    """The project's files under ``base`` (see ``files.project_files``) with a known extension, at most 1 MB."""
    candidates = [base] if base.is_file() else project_files(ctx, base)
    return [path for path in candidates
            if path.suffix.lower() in EXTENSIONS and path.stat().st_size <= MAX_FILE_BYTES]


@functools.cache
def _parser(lang: str):
    """The tree-sitter parser for ``lang``, or None where the installed pack lacks it."""
    try:  # the pack raises its own errors (lookup, download) for a grammar it cannot give
        get_language(lang)
        return get_parser(lang)
    except Exception:
        return None


def _language(ext: str) -> str | None:
    return next((lang for lang in EXTENSIONS.get(ext, ()) if _parser(lang) is not None), None)


def _symbols(data: bytes, lang: str, cache_dir: Path | None) -> dict:
    """``_parse``'s result for these bytes, from the disk cache when it has a sound entry."""
    key = hashlib.sha256(f"{FORMAT}\0{lang}\0".encode() + data).hexdigest()
    entry = cache_dir / f"{key}.json" if cache_dir is not None else None
    if entry is not None:
        try:
            cached = json.loads(entry.read_text())
            if (all(isinstance(s, list) and len(s) == 4 for s in cached["symbols"])
                    and all(isinstance(n, str) for n in cached["names"])):
                return cached
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # missing or damaged: parse again and overwrite it
    parsed = _parse(lang, data)
    if entry is not None:
        _write_atomic(entry, json.dumps(parsed))
    return parsed


def _write_atomic(path: Path, text: str) -> None:
    """A cache that cannot be written only costs speed, so failures are swallowed."""
    try:
        replace_bytes(path, text.encode())
    except OSError:
        pass


def _parse(lang: str, data: bytes) -> dict:
    """``{"symbols": [[line, depth, name, signature], ...], "names": [every identifier used]}``."""
    tree = _parser(lang).parse(data)
    symbols: list[list] = []
    names: set[str] = set()
    # (node, nesting depth, whether definitions here count): function bodies are not
    # searched for definitions, since local helpers are noise in a map.
    stack = [(child, 0, True) for child in reversed(tree.root_node.children)]
    while stack:
        node, depth, defs_here = stack.pop()
        if node.child_count == 0:
            if node.is_named and (node.type.endswith("identifier") or node.type in NAME_LEAVES):
                names.add(_text(node))
            continue
        inner = (depth, defs_here)
        if defs_here and _is_definition(node) and (name := _name(node)):
            symbols.append([node.start_point[0] + 1, depth, name, _signature(node, data, name)])
            inner = (depth + 1, not _is_function(node.type))
        stack.extend((child, *inner) for child in reversed(node.children))
    return {"symbols": symbols, "names": sorted(names)}


def _text(node) -> str:
    return node.text.decode("utf-8", errors="replace")


def _declarators(node):
    """``node``'s chain of C-style ``declarator`` fields, outermost first."""
    while (node := node.child_by_field_name("declarator")) is not None:
        yield node


def _is_function(kind: str) -> bool:
    """Definitions whose insides are not searched: functions, `const f = ...`, prototypes."""
    return kind in {"variable_declarator", "declaration"} or any(
        word in kind for word in ("function", "method", "constructor"))


def _is_definition(node) -> bool:
    kind = node.type
    if kind not in DEF_TYPES:
        return False
    if kind in NEED_BODY:
        return node.child_by_field_name("body") is not None
    if kind == "variable_declarator":  # only `const f = () => ...`, not every variable
        value = node.child_by_field_name("value")
        return value is not None and value.type in FUNCTION_VALUES
    if kind == "declaration":  # only function prototypes, as in C headers
        return any(d.type == "function_declarator" for d in _declarators(node))
    return True


def _name(node) -> str | None:
    target = node.child_by_field_name("name")
    if target is None:
        target = next(iter(reversed(list(_declarators(node)))), None) or node.child_by_field_name("type")
    if target is None:  # grammars without fields (kotlin...): the first identifier child
        target = next((c for c in node.named_children if c.type.endswith("identifier")), None)
    return _text(target).split("::")[-1] if target is not None else None


def _signature(node, data: bytes, name: str) -> str:
    """The definition's head on one line: from its line's start (after any earlier
    definition on that line) to its body or a comment, else to the line's end."""
    line_start = data.rfind(b"\n", 0, node.start_byte) + 1
    before = data[line_start:node.start_byte]  # keeps `export `, `pub `... but not `class A {`
    start = line_start + max(before.rfind(b"{"), before.rfind(b"}"), before.rfind(b";")) + 1
    body = node.child_by_field_name("body")
    stop = next((c for c in node.children if c.type == "comment" or c.type.endswith("body")
                 or body is not None and c == body), None)
    line_end = data.find(b"\n", node.start_byte)
    end = stop.start_byte if stop is not None else min(node.end_byte, line_end if line_end >= 0 else len(data))
    sig = " ".join(data[start:end].decode("utf-8", errors="replace").split()).rstrip("{}:;= ")
    if name not in sig:  # e.g. `typedef struct {` ... `} name;`
        sig += f" ... {name}"
    return sig if len(sig) <= 160 else sig[:157] + "..."


def _focus(ctx: ToolContext, focus: list[str]) -> tuple[set[str], set[str]]:
    """Split ``focus`` into project-relative paths (those that exist, as ``relative`` shows
    them) and symbol names (everything else, however odd)."""
    paths = {}
    for item in focus:
        try:
            full = resolve_in_root(ctx, item)
        except ToolRefused:
            continue
        if full.exists():
            paths[item] = relative(ctx, full)
    return set(paths.values()), set(focus) - set(paths)


def _rank(parsed: dict[str, dict], focus: tuple[set[str], set[str]]) -> list[tuple[str, int]]:
    """Every definition as (file, index in its symbols), best first.

    A definition scores the number of other files using its name, split among the files
    defining that name (a name defined everywhere says little); nested definitions and
    test files count half, as method names and test helpers collide with everyday words.
    Focus adds FOCUS_BOOST. Ties go to the file with the better best definition."""
    focus_paths, focus_names = focus
    users: Counter[str] = Counter()
    definers: Counter[str] = Counter()
    for entry in parsed.values():
        users.update(entry["names"])
        definers.update({name for _, _, name, _ in entry["symbols"]})
    scored, file_best = [], Counter()
    for rel, entry in parsed.items():
        used_here = set(entry["names"])
        weight = 0.5 if TEST_PATH.search(rel) else 1.0
        boost = FOCUS_BOOST if any(rel == p or rel.startswith(p + "/") for p in focus_paths) else 0
        for index, (_, depth, name, _) in enumerate(entry["symbols"]):
            # dunders (__init__...) and one- or two-letter names are everywhere
            uses = 0 if name.startswith("__") or len(name) < 3 else users[name] - (name in used_here)
            score = weight * uses / definers[name] / (2 if depth else 1)
            score += boost + FOCUS_BOOST * (name in focus_names)
            scored.append((score, rel, index))
            file_best[rel] = max(file_best[rel], score)
    scored.sort(key=lambda s: (-s[0], -file_best[s[1]], s[1], s[2]))
    return [(rel, index) for _, rel, index in scored]


def _lineage(symbols: list, index: int) -> list[int]:
    """``index`` and its enclosing definitions (a method's class...), from the preorder depths."""
    chain = [index]
    for before in range(index - 1, -1, -1):
        if symbols[chain[-1]][1] == 0:
            break
        if symbols[before][1] < symbols[chain[-1]][1]:
            chain.append(before)
    return chain


def _render(parsed: dict[str, dict], ranked: list[tuple[str, int]], where: str, budget: int,
            no_grammar: Counter[str]) -> tuple[str, int]:
    """The map, cut to ``budget`` characters, and how many definitions it shows.

    Definitions are taken best first (each with its enclosing ones) until the next would
    not fit; files are shown in the order they were first taken, definitions in line order."""
    files = sum(1 for entry in parsed.values() if entry["symbols"])
    lines = [f"{files} files, {len(ranked)} definitions under {where}, the most used from other files "
             f"first (line, then signature; budget ~{budget // CHARS_PER_TOKEN} tokens at 4 chars each):"]
    if no_grammar:
        lines.append("not parsed (no grammar installed): " + ", ".join(
            f"{n} {ext} files" for ext, n in sorted(no_grammar.items())))
    used = sum(len(line) + 1 for line in lines) + 120  # room for the closing "left out" line
    chosen: dict[str, set[int]] = {}  # insertion order = file order
    for rel, index in ranked:
        symbols, have = parsed[rel]["symbols"], chosen.get(rel, set())
        new = [i for i in _lineage(symbols, index) if i not in have]
        cost = sum(len(_line(symbols[i])) + 1 for i in new) + (0 if have else len(rel) + 1)
        if used + cost > budget:
            break
        used += cost
        chosen.setdefault(rel, set()).update(new)
    for rel, taken in chosen.items():
        lines += [rel] + [_line(parsed[rel]["symbols"][i]) for i in sorted(taken)]
    shown = sum(len(taken) for taken in chosen.values())
    if shown < len(ranked):
        partial = sum(1 for rel, entry in parsed.items() if len(chosen.get(rel, ())) < len(entry["symbols"]))
        lines.append(f"[{len(ranked) - shown} more definitions in {partial} files left out to fit the "
                     "budget: raise max_tokens, map a subfolder or pass focus]")
    if not ranked:
        lines.append("(no definitions found in source files of a known language)")
    return "\n".join(lines), shown


def _line(symbol: list) -> str:
    line, depth, _, signature = symbol
    return f"  {line} {'  ' * depth}{signature}"
