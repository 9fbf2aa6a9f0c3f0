"""Changing the project: ``write_file``, ``edit_file`` and the per-turn undo journal.

Edits keep every byte the model did not mean to change: the BOM, the encoding
and each line's ending (a model writes ``\\n``; in a CRLF file its text is
matched and written with ``\\r\\n``). An existing file must have been read
first and must not have changed on disk since (its read stamp), so the model
never overwrites a change it has not seen. Writes are atomic (temp file in the
same folder, fsync, rename) and keep the file's permission bits, and one file's
writes are serialised (a lock per path in this process, ``flock`` on its folder
across processes) with the bytes re-checked under the lock, so of two edits
racing on one file the second is refused instead of silently lost. The journal
holds each file's bytes from before the turn and after the agent's last edit,
so ``/undo`` needs no git and restores only files that are still the agent's.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from .base import Tool, ToolContext, ToolRefused, ToolResult, resolve_in_root
from .files import TextCodec, relative, sniff, stamp

MAX_DIFF_LINES = 400
MAX_UNDO_TURNS = 100


def replace_bytes(path: Path, data: bytes) -> None:
    """Atomically make ``path`` hold ``data``, keeping an existing file's permission bits."""
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.magnetar-{os.getpid()}-{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask applies to new files
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


_path_locks: dict[Path, threading.Lock] = {}
_path_locks_guard = threading.Lock()


@contextlib.contextmanager
def locked_file(path: Path) -> Iterator[None]:
    """Hold the write lock of ``path``: a lock per path for this process's threads, then ``flock`` on
    its folder (which a rename does not replace, unlike the file) for other processes."""
    with _path_locks_guard:
        lock = _path_locks.setdefault(path, threading.Lock())
    with lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            yield
        finally:
            os.close(folder)  # closing the descriptor releases the flock


def read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


@dataclass
class UndoOutcome:
    """What ``/undo`` did: the files restored, and those left alone with why (a diff of the user's change)."""

    restored: list[Path] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)


class UndoJournal:
    """Per turn, each changed file's bytes from before the turn and after the agent's last write of it
    (None: the file did not exist)."""

    def __init__(self) -> None:
        self._turns: list[dict[Path, tuple[bytes | None, bytes]]] = []

    def begin_turn(self) -> None:
        self._turns.append({})
        del self._turns[:-MAX_UNDO_TURNS]

    def record(self, path: Path, before: bytes | None, after: bytes) -> None:
        if not self._turns:
            self.begin_turn()
        first = self._turns[-1].get(path, (before, after))[0]  # the first change of the turn holds the original
        self._turns[-1][path] = (first, after)

    def undo_last_turn(self) -> UndoOutcome:
        """Restore the files the latest turn that changed anything changed, each only while it still holds
        what the agent wrote; a file the user changed since is left as it is and reported with a diff."""
        while self._turns and not self._turns[-1]:
            self._turns.pop()
        outcome = UndoOutcome()
        if not self._turns:
            return outcome
        for path, (before, agents) in sorted(self._turns.pop().items()):
            with locked_file(path):
                now = read_or_none(path)
                if now != agents:
                    outcome.refused.append((path, _undo_refusal(path, agents, now)))
                    continue
                if before is None:
                    path.unlink()
                else:
                    replace_bytes(path, before)
            outcome.restored.append(path)
        return outcome


def _undo_refusal(path: Path, agents: bytes, now: bytes | None) -> str:
    if now is None:
        return f"{path} was deleted after the agent changed it; not recreated"
    diff = unified_diff(path.name, agents.decode("utf-8", "surrogateescape"), now.decode("utf-8", "surrogateescape"))
    return f"{path} changed since the agent's edit; left as it is. Changes since the agent's edit:\n{diff}"


def unified_diff(rel: str, before: str, after: str) -> str:
    lines = list(difflib.unified_diff(_shown(before).splitlines(keepends=True),
                                      _shown(after).splitlines(keepends=True), f"a/{rel}", f"b/{rel}"))
    if len(lines) > MAX_DIFF_LINES:
        lines = lines[:MAX_DIFF_LINES] + [f"... [{len(lines) - MAX_DIFF_LINES} more diff lines]\n"]
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def _shown(text: str) -> str:
    """Text as a diff shows it: a byte that is not UTF-8 (kept as a surrogate) spelled ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def uses_crlf(text: str) -> bool:
    """Whether most line ends are CRLF (then text the model writes with LF gets CRLF)."""
    crlf = text.count("\r\n")
    return crlf > 0 and crlf >= text.count("\n") - crlf


def _current(ctx: ToolContext, path: Path, shown: str) -> tuple[bytes, TextCodec]:
    """An existing file's bytes and codec, refused when the model has not read it or it changed since."""
    seen = ctx.read_stamps.get(path)
    if seen is None:
        raise ToolRefused(f"read {shown} with read_file before changing it")
    data = path.read_bytes()
    now = stamp(path, data)
    if now[2] != seen[2]:
        raise ToolRefused(f"{shown} changed on disk since you read it; read it again before editing")
    codec = sniff(data)
    if codec is None:
        raise ToolRefused(f"{shown} is a binary file; it cannot be edited as text")
    return data, codec


def _git_dirs(root: Path) -> list[Path]:
    """The git folders of the repository around ``root``: where a ``.git`` file (a worktree, a
    separate git dir) points, and the common folder a worktree shares with its main repository."""
    for folder in (root, *root.parents):
        dot_git = folder / ".git"
        try:
            if dot_git.is_dir():
                return [dot_git]
            if not dot_git.is_file():
                continue
            text = dot_git.read_text(errors="replace").strip()
            if not text.startswith("gitdir:"):
                return []
            git_dir = (folder / text[len("gitdir:"):].strip()).resolve()
            common = git_dir / "commondir"
            if common.is_file():
                return [git_dir, (git_dir / common.read_text(errors="replace").strip()).resolve()]
            return [git_dir]
        except OSError:  # an unreadable folder above the project: nothing of it to protect
            continue
    return []


def _is_git_name(part: str) -> bool:
    """``.git`` as a case-insensitive file system (or Windows' trailing-dot rule, or its 8.3 name) sees it."""
    name = part.casefold().rstrip(". ")
    return name in (".git", "git~1")


def inside_git_internals(ctx: ToolContext, path: Path) -> bool:
    """Whether ``path`` (resolved) is, or is inside, a ``.git`` of the project or the repository's git folder:
    its config and hooks name programs git runs, so writing there is running a command."""
    root = ctx.root.resolve()
    if any(_is_git_name(part) for part in path.relative_to(root).parts):
        return True
    git_ids = set()
    for git_dir in _git_dirs(root):
        try:
            st = git_dir.stat()
        except OSError:
            continue
        git_ids.add((st.st_dev, st.st_ino))
    for folder in (path, *path.parents):  # by identity, so another spelling of the same folder matches too
        try:
            st = folder.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in git_ids:
            return True
    return False


def _commit(ctx: ToolContext, path: Path, before: bytes | None, after: bytes, rel: str, diff: str) -> None:
    """Ask where the mode says so, journal the old bytes, write, and re-stamp (the model knows this content)."""
    verb = "create" if before is None else "edit"
    if inside_git_internals(ctx, path):
        # Never auto-approved, in any mode: the user is asked, and headless (no one to ask) means no.
        title = f"{verb} {rel}: git's own files (config, hooks) can make git run programs"
        if ctx.permit("edit", title, diff, always_ask=True) != "yes":
            raise ToolRefused(f"{rel} is inside git's own folder, where config and hooks can run programs; it is "
                              "changed only when the user confirms it, and they did not (or could not be asked)")
    elif (verdict := ctx.permit("edit", f"{verb} {rel}", diff)) != "yes":
        if verdict == "read-only":
            raise ToolRefused(f"read-only mode: {rel} was not changed")
        raise ToolRefused(f"the user declined the change to {rel}; ask them what they want instead")
    with locked_file(path):
        if read_or_none(path) != before:  # another edit landed while this one was prepared (or asked)
            raise ToolRefused(f"{rel} changed on disk while this change was being made; read it again and redo it")
        if ctx.undo is not None:
            ctx.undo.record(path, before, after)
        replace_bytes(path, after)
        ctx.read_stamps[path] = stamp(path, after)


class WriteFile(Tool):
    name = "write_file"
    description = ("Create a file, or replace a whole file you have read, with the given content. "
                   "For changes to part of a file use edit_file.")
    access = "edit"

    class Args(BaseModel):
        path: str = Field(description="file path, relative to the project root")
        content: str = Field(description="the complete new content")

    def run(self, args: Args, ctx: ToolContext) -> ToolResult:
        path = resolve_in_root(ctx, args.path)
        rel = relative(ctx, path)
        if path.is_dir():
            raise ToolRefused(f"{rel} is a folder")
        if path.exists():
            before, codec = _current(ctx, path, rel)
            old_text = codec.decode(before)
        else:
            before, codec, old_text = None, TextCodec(b"", "utf-8"), ""
        content = args.content
        if uses_crlf(old_text) and "\r\n" not in content:
            content = content.replace("\n", "\r\n")
        try:
            after = codec.encode(content)
        except UnicodeEncodeError as err:
            raise ToolRefused(f"{rel} is {codec.encoding}; the new content has a character it cannot hold "
                              f"({err.object[err.start:err.end]!r})") from None
        if after == before:
            return ToolResult(f"{rel} already has this content; nothing written", summary=f"{rel}: unchanged")
        diff = unified_diff(rel, old_text, content)
        _commit(ctx, path, before, after, rel, diff)
        lines = content.count("\n") + (not content.endswith("\n") and bool(content))
        verb = "created" if before is None else "wrote"
        return ToolResult(f"{verb} {rel} ({lines} lines, {len(after)} bytes)", summary=f"{verb} {rel}", diff=diff)


class EditFile(Tool):
    name = "edit_file"
    description = ("Replace an exact passage of a file you have read: old_text must match the file exactly "
                   "(whitespace included) and only once, unless replace_all is set. Include enough "
                   "surrounding lines to make it unique.")
    access = "edit"

    class Args(BaseModel):
        path: str = Field(description="file path, relative to the project root")
        old_text: str = Field(description="the exact text to replace (without read_file's line numbers)")
        new_text: str = Field(description="the text to put in its place")
        replace_all: bool = Field(False, description="replace every occurrence instead of exactly one")

    def run(self, args: Args, ctx: ToolContext) -> ToolResult:
        path = resolve_in_root(ctx, args.path)
        rel = relative(ctx, path)
        if not path.is_file():
            raise ToolRefused(f"{rel} does not exist; create it with write_file")
        if not args.old_text:
            raise ToolRefused("old_text is empty; to write a whole file use write_file")
        if args.old_text == args.new_text:
            raise ToolRefused("old_text and new_text are the same; nothing would change")
        before, codec = _current(ctx, path, rel)
        text = codec.decode(before)
        old, new = args.old_text, args.new_text
        starts = _starts(text, old)
        if not starts and "\r\n" in text and "\r\n" not in old:  # the model's LF text against CRLF lines
            old, new = old.replace("\n", "\r\n"), new.replace("\n", "\r\n")
            starts = _starts(text, old)
        count = len(starts)
        if count == 0:
            raise ToolRefused(_not_found(text, args.old_text, rel))
        if count > 1 and not args.replace_all:
            at = _lines_of(text, starts[:10])
            raise ToolRefused(f"old_text occurs {count} times in {rel} (lines {', '.join(map(str, at[:10]))}); "
                              "add surrounding lines to make it unique, or set replace_all")
        if any(b - a < len(old) for a, b in zip(starts, starts[1:])):
            raise ToolRefused(f"occurrences of old_text overlap in {rel} (e.g. 'aa' in 'aaa'), so replace_all is "
                              "ambiguous; include the surrounding text")
        after_text = text.replace(old, new) if args.replace_all else text.replace(old, new, 1)
        try:
            after = codec.encode(after_text)
        except UnicodeEncodeError as err:
            raise ToolRefused(f"{rel} is {codec.encoding}; new_text has a character it cannot hold "
                              f"({err.object[err.start:err.end]!r})") from None
        diff = unified_diff(rel, text, after_text)
        _commit(ctx, path, before, after, rel, diff)
        first = _lines_of(text, starts)[0]
        n = count if args.replace_all else 1
        return ToolResult(f"edited {rel}: {n} replacement{'s' * (n > 1)} (first at line {first})",
                          summary=f"edited {rel}", diff=diff)


def _starts(text: str, needle: str) -> list[int]:
    """Every offset where ``needle`` starts, overlapping ones too ('aa' is twice in 'aaa')."""
    at, start = [], text.find(needle)
    while start >= 0:
        at.append(start)
        start = text.find(needle, start + 1)
    return at


def _lines_of(text: str, starts: list[int]) -> list[int]:
    return [text.count("\n", 0, start) + 1 for start in starts]


def _not_found(text: str, old: str, rel: str) -> str:
    """Why old_text did not match, pointing at a passage that differs only in whitespace when there is one."""
    wanted = [line.strip() for line in old.strip("\r\n").splitlines()]
    lines = [line.strip() for line in text.splitlines()]
    for i in range(len(lines) - len(wanted) + 1):
        if wanted and lines[i:i + len(wanted)] == wanted:
            return (f"old_text was not found in {rel} exactly, but lines {i + 1}-{i + len(wanted)} match it "
                    "apart from whitespace or indentation; copy them exactly from read_file")
    return f"old_text was not found in {rel}; read the file again and copy the passage exactly"


EDIT_TOOLS: tuple[type[Tool], ...] = (WriteFile, EditFile)
