"""Reading and searching the project: ``read_file``, ``list_dir``, ``glob``, ``grep``.

Every path resolves (symlinks followed) inside the project root or is refused.
Listing and searching honour ``.gitignore`` by asking git which files the work
tree holds; outside a git repository the usual build and cache folders are
skipped. Reading a file records a stamp (mtime, size, SHA-256) so the edit
tools can refuse to change a file that changed on disk after the model read it.
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from .base import Tool, ToolContext, ToolRefused, ToolResult, resolve_in_root, utf8_safe
from .safegit import run_git

MAX_READ_LINES = 1000
MAX_LINE_CHARS = 2000
MAX_READ_BYTES = 100_000
SKIP_DIRS = {"node_modules", "venv", "__pycache__", "dist", "build", "target", "out", "site-packages"}  # and hidden ones
BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


# -- text files: encoding, BOM, stamps --------------------------------------------------------


@dataclass(frozen=True)
class TextCodec:
    """How a file's bytes become text and back, byte for byte: its BOM and body encoding."""

    bom: bytes
    encoding: str
    errors: str = "strict"  # "surrogateescape": UTF-8 with a few stray bytes, each written back as it was

    def decode(self, data: bytes) -> str:
        return data[len(self.bom):].decode(self.encoding, self.errors)

    def encode(self, text: str) -> bytes:
        return self.bom + text.encode(self.encoding, self.errors)

    def show(self, data: bytes) -> str:
        """The text as the model reads it: a stray byte spelled ``\\xNN``."""
        return data[len(self.bom):].decode(self.encoding, "backslashreplace")


def sniff(data: bytes) -> TextCodec | None:
    """The file's codec, or None for a binary file."""
    for bom, encoding in BOMS:
        if data.startswith(bom):
            try:
                data[len(bom):].decode(encoding)
                return TextCodec(bom, encoding)
            except UnicodeDecodeError:
                return None
    if b"\x00" in data[:8192]:
        return None
    try:
        data.decode("utf-8")
        return TextCodec(b"", "utf-8")
    except UnicodeDecodeError:
        pass
    # Mostly real UTF-8 characters and a few stray bytes: UTF-8, so new text is UTF-8 and the strays survive.
    escaped = data.decode("utf-8", "surrogateescape")
    stray = len(re.findall("[\udc80-\udcff]", escaped))
    if len(re.findall("[^\x00-\x7f]", escaped)) - stray > stray:
        return TextCodec(b"", "utf-8", "surrogateescape")
    # Not UTF-8: a legacy 8-bit text decodes losslessly as latin-1, unless it is mostly control bytes.
    sample = data[:8192]
    controls = sum(b < 32 and b not in (9, 10, 12, 13) for b in sample)
    return TextCodec(b"", "latin-1") if controls <= len(sample) // 20 else None


def stamp(path: Path, data: bytes) -> tuple[int, int, str]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size, hashlib.sha256(data).hexdigest()


def relative(ctx: ToolContext, path: Path) -> str:
    """``path`` as the model sees it and names it back: relative to the root, non-UTF-8 bytes escaped."""
    root = ctx.root.resolve()
    return "." if path == root else utf8_safe(path.relative_to(root).as_posix())


# -- the project's files ----------------------------------------------------------------------


def project_files(ctx: ToolContext, base: Path) -> list[Path]:
    """Files under ``base`` the project holds (tracked or untracked, not ignored), sorted."""
    listed = _git_files(base)
    if listed is None:
        listed = []
        for folder, dirs, files in os.walk(base):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
            listed.extend(Path(folder) / f for f in files)
    root = ctx.root.resolve()
    kept = []
    for path in listed:
        if not path.is_file():  # deleted but still tracked, or a dangling link
            continue
        real = path.resolve()
        if real == root or root in real.parents:  # a symlink out of the project is not the project's
            kept.append(path)
    return sorted(kept)


def _git_files(base: Path) -> list[Path] | None:
    try:
        out = run_git(base, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [base / name for name in sorted(set(out.stdout.decode("utf-8", "surrogateescape").split("\0"))) if name]


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over relative POSIX paths: ``*`` and ``?`` stay in one folder, ``**/`` spans any number."""
    parts, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            parts.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        elif pattern[i] == "*":
            parts.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            parts.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                parts.append(re.escape("["))
                i += 1
            else:
                parts.append(fnmatch.translate(pattern[i:end + 1])[4:-3])
                i = end + 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts) + r"\Z")


def matches_glob(rel: str, pattern: str) -> bool:
    """A pattern without a slash matches the file name in any folder (as in .gitignore); ``rel``
    is the name as shown (``utf8_safe``), so a pattern copied from a listing matches."""
    target = rel if "/" in pattern else rel.rsplit("/", 1)[-1]
    return glob_regex(pattern).match(target) is not None


# -- the tools --------------------------------------------------------------------------------


class ReadFile(Tool):
    name = "read_file"
    description = ("Read a text file of the project with numbered lines. Long files come in parts: pass "
                   "start_line (and end_line) to read further.")

    class Args(BaseModel):
        path: str = Field(description="file path, relative to the project root")
        start_line: int = Field(1, ge=1, description="first line to show (1-based)")
        end_line: int | None = Field(None, ge=1, description="last line to show (default: as many as fit)")

    def run(self, args: Args, ctx: ToolContext) -> ToolResult:
        path = resolve_in_root(ctx, args.path)
        if path.is_dir():
            raise ToolRefused(f"{args.path} is a folder; use list_dir")
        if not path.is_file():
            raise ToolRefused(f"{args.path} does not exist")
        data = path.read_bytes()
        codec = sniff(data)
        if codec is None:
            raise ToolRefused(f"{args.path} is a binary file ({len(data)} bytes); it cannot be shown as text")
        ctx.read_stamps[path] = stamp(path, data)
        lines = codec.show(data).splitlines()
        if args.end_line is not None and args.end_line < args.start_line:
            raise ToolRefused("end_line must be >= start_line")
        if lines and args.start_line > len(lines):
            raise ToolRefused(f"{args.path} has {len(lines)} lines; start_line {args.start_line} is past the end")
        last = min(len(lines), args.end_line or len(lines), args.start_line + MAX_READ_LINES - 1)
        shown, size = [], 0
        for n in range(args.start_line, last + 1):
            line = lines[n - 1]
            if len(line) > MAX_LINE_CHARS:
                line = line[:MAX_LINE_CHARS] + f" ... [line cut: {len(line)} characters]"
            size += len(line) + 8
            if shown and size > MAX_READ_BYTES:
                last = n - 1
                break
            shown.append(f"{n:>6}\t{line}")
        text = "\n".join(shown) if shown else "(empty file)"
        wanted_end = min(args.end_line or len(lines), len(lines))
        if last < wanted_end:
            text += (f"\n[showing lines {args.start_line}-{last} of {len(lines)}; "
                     f"call read_file with start_line={last + 1} for more]")
        rel = relative(ctx, path)
        return ToolResult(text, summary=f"{rel}: lines {args.start_line}-{last} of {len(lines)}")


class ListDir(Tool):
    name = "list_dir"
    description = "List a folder of the project: sub-folders (ending in /) and files with their sizes."

    class Args(BaseModel):
        path: str = Field(".", description="folder path, relative to the project root")

    def run(self, args: Args, ctx: ToolContext) -> ToolResult:
        path = resolve_in_root(ctx, args.path)
        if not path.is_dir():
            raise ToolRefused(f"{args.path} is not a folder")
        entries = sorted(path.iterdir(), key=lambda p: (not p.is_dir(), p.name))
        lines = []
        for entry in entries:
            if entry.name == ".git":
                continue
            name = utf8_safe(entry.name)
            if entry.is_dir():
                lines.append(f"{name}/")
            else:
                size = entry.lstat().st_size
                lines.append(f"{name}  ({size} bytes)" + ("  -> symlink" if entry.is_symlink() else ""))
        shown = lines[:1000]
        if len(lines) > len(shown):
            shown.append(f"[{len(lines) - len(shown)} more entries not shown]")
        rel = relative(ctx, path)
        return ToolResult("\n".join(shown) or "(empty folder)", summary=f"{rel}: {len(lines)} entries")


class Glob(Tool):
    name = "glob"
    description = ("Find project files whose path matches a glob (e.g. '**/*.py', 'src/*.ts'; a pattern "
                   "without '/' matches file names in any folder). Ignored files are skipped.")

    class Args(BaseModel):
        pattern: str = Field(description="glob pattern, relative to path")
        path: str = Field(".", description="folder to search in, relative to the project root")

    def run(self, args: Args, ctx: ToolContext) -> ToolResult:
        base = resolve_in_root(ctx, args.path)
        if not base.is_dir():
            raise ToolRefused(f"{args.path} is not a folder")
        found = [relative(ctx, p) for p in project_files(ctx, base)
                 if matches_glob(utf8_safe(p.relative_to(base).as_posix()), args.pattern)]
        shown = found[:500]
        text = "\n".join(shown) or f"no files match {args.pattern!r}"
        if len(found) > len(shown):
            text += f"\n[{len(found) - len(shown)} more matches not shown; narrow the pattern]"
        return ToolResult(text, summary=f"{len(found)} files match {args.pattern}")


class Grep(Tool):
    name = "grep"
    description = ("Search the project's text files for a regular expression (Python syntax); prints "
                   "path:line:text for each match. Ignored and binary files are skipped.")

    class Args(BaseModel):
        pattern: str = Field(description="regular expression")
        path: str = Field(".", description="file or folder to search, relative to the project root")
        glob: str | None = Field(None, description="only files matching this glob, e.g. '*.py'")
        ignore_case: bool = Field(False, description="case-insensitive match")
        context: int = Field(0, ge=0, le=5, description="lines of context around each match")
        max_matches: int = Field(100, ge=1, le=1000, description="stop after this many matches")

    def run(self, args: Args, ctx: ToolContext) -> ToolResult:
        try:
            regex = re.compile(args.pattern, re.IGNORECASE if args.ignore_case else 0)
        except re.error as err:
            raise ToolRefused(f"bad regular expression {args.pattern!r}: {err}") from None
        base = resolve_in_root(ctx, args.path)
        if base.is_file():
            files = [base]
        elif base.is_dir():
            files = project_files(ctx, base)
        else:
            raise ToolRefused(f"{args.path} does not exist")
        if args.glob and base.is_dir():
            files = [f for f in files if matches_glob(utf8_safe(f.relative_to(base).as_posix()), args.glob)]
        out, matches, truncated = [], 0, False
        for path in files:
            text = _text_of(path)
            if text is None:
                continue
            lines = text.splitlines()
            hits = [i for i, line in enumerate(lines) if regex.search(line)]
            rel, last = relative(ctx, path), -1
            for i in hits:
                if matches == args.max_matches:
                    truncated = True
                    break
                matches += 1
                lo, hi = max(i - args.context, last + 1), min(i + args.context, len(lines) - 1)
                if args.context and out and lo > last + 1:
                    out.append("--")
                for j in range(lo, hi + 1):
                    sep = ":" if j == i else "-"
                    out.append(f"{rel}{sep}{j + 1}{sep}{lines[j][:300]}")
                last = hi
            if truncated:
                break
        text = "\n".join(out) or f"no matches for {args.pattern!r}"
        if truncated:
            text += f"\n[stopped at {args.max_matches} matches; narrow the search]"
        return ToolResult(text, summary=f"{matches} matches for {args.pattern}")


def _text_of(path: Path) -> str | None:
    try:
        if path.stat().st_size > 5_000_000:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    codec = sniff(data)
    return codec.show(data) if codec else None


READ_TOOLS: tuple[type[Tool], ...] = (ReadFile, ListDir, Glob, Grep)
