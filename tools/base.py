"""What every tool is: a name, a description, a pydantic argument model (whose
JSON schema goes into the DSML tools block) and ``run(args, ctx)``.

``tools`` never imports ``runtime``: the agent turns ``Tool.spec()`` into a
``runtime.chat.ToolSpec`` itself. A tool never raises for a bad call: it
returns ``ToolResult(ok=False, text=...)`` with a message the model can act on
(``ToolRefused`` is the short way to say that from inside ``run``), and an
``OSError`` becomes one too. Whatever a tool returns is valid UTF-8 text: file
names that are not UTF-8 are shown with ``\\xNN`` escapes (``utf8_safe``), and
``resolve_in_root`` takes that escaped spelling back.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ValidationError

Permissions = Literal["ask", "auto-edit", "yolo", "read-only"]  # what tools may do without asking
PERMISSIONS: tuple[str, ...] = ("ask", "auto-edit", "yolo", "read-only")
Access = Literal["read", "edit", "shell", "commit"]
Verdict = Literal["yes", "declined", "read-only"]


class ToolRefused(Exception):
    """Raised inside ``run``: the call cannot be done; the message goes to the model."""


@dataclass
class ToolResult:
    text: str  # what the model reads
    ok: bool = True
    summary: str = ""  # one line for a tool card
    diff: str | None = None  # unified diff of an edit, for the UI


@dataclass
class ToolContext:
    """Per-session state the tools share."""

    root: Path  # the project; every path must resolve inside it
    permissions: Permissions = "ask"
    # Asked before a write/shell/commit the permissions do not allow outright:
    # ``confirm(title, detail) -> bool``. None (headless) means "no".
    confirm: Callable[[str, str], bool] | None = None
    data_dir: Path | None = None  # logs (full shell output) and caches live here
    # Files the model has read: resolved path -> (mtime_ns, size, sha256 hex), so an
    # edit of a file changed on disk since is refused.
    read_stamps: dict[Path, tuple[int, int, str]] = field(default_factory=dict)
    undo: Any = None  # the per-turn undo journal (tools/files.py)
    cancel: threading.Event | None = None  # set by the agent's interrupt: a running command stops
    plan: list[dict] = field(default_factory=list)  # update_plan's steps, each {"step", "status"}
    findings: list[dict] = field(default_factory=list)  # report_finding's findings, in report order
    # Shell commands run in an OS sandbox (tools/sandbox.py); the network is off inside it
    # unless allowed, and only --dangerously-no-sandbox turns the sandbox off.
    allow_network: bool = False
    sandbox: bool = True

    def permit(self, access: Access, title: str, detail: str = "", *, always_ask: bool = False) -> Verdict:
        """The one permission check: may ``access`` go ahead now? Reads always may. In
        read-only mode nothing else may, except a shell command inside the sandbox (which
        keeps the project read-only) once the user agrees. ``always_ask`` (git's own files,
        a risky command) takes the user's yes in every mode. Otherwise yolo allows all,
        auto-edit allows edits, and the rest is asked (``confirm``; no one to ask: no)."""
        if access == "read":
            return "yes"
        if self.permissions == "read-only" and not (access == "shell" and self.sandbox):
            return "read-only"
        if not always_ask and (self.permissions == "yolo" or (self.permissions == "auto-edit" and access == "edit")):
            return "yes"
        return "yes" if self.confirm and self.confirm(title, detail) else "declined"


class Tool:
    name: ClassVar[str]
    description: ClassVar[str]
    Args: ClassVar[type[BaseModel]]
    access: ClassVar[Access] = "read"

    def run(self, args: BaseModel, ctx: ToolContext) -> ToolResult:
        raise NotImplementedError

    @classmethod
    def spec(cls) -> dict[str, Any]:
        """``{"name", "description", "parameters"}``: the function schema the model sees."""
        schema = cls.Args.model_json_schema()
        return {"name": cls.name, "description": cls.description,
                "parameters": _plain(schema, schema.pop("$defs", {}))}

    def call(self, arguments: dict[str, Any], ctx: ToolContext) -> ToolResult:
        """Validate ``arguments`` and run; every failure becomes a result the model can read."""
        try:
            args = self.Args.model_validate(arguments)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in err.errors())
            return _utf8_result(ToolResult(f"error: invalid arguments for {self.name}: {problems}", ok=False,
                                           summary="invalid arguments"))
        try:
            result = self.run(args, ctx)
        except ToolRefused as refusal:
            result = ToolResult(f"error: {refusal}", ok=False, summary=str(refusal).split("\n")[0][:120])
        except OSError as err:  # the file system said no (permissions, a file gone meanwhile...): say so, in one line
            where = "" if err.filename is None else f"{_shown_filename(ctx, err.filename)}: "
            reason = where + (err.strerror or str(err))
            result = ToolResult(f"error: {reason}", ok=False, summary=reason[:120])
        # The one door every result passes: a lone surrogate here would crash the tokenizer.
        return _utf8_result(result)


def _utf8_result(result: ToolResult) -> ToolResult:
    return dataclasses.replace(result, text=utf8_safe(result.text), summary=utf8_safe(result.summary),
                               diff=None if result.diff is None else utf8_safe(result.diff))


def _shown_filename(ctx: ToolContext, filename: str | bytes) -> str:
    """An OSError's file as the model knows it: relative to the root when inside it."""
    full = Path(os.fsdecode(filename))
    root = ctx.root.resolve()
    return utf8_safe(full.relative_to(root).as_posix() if full.is_relative_to(root) else str(full))


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# A non-UTF-8 byte as utf8_safe shows it (\xff), or as git quotes it in its output (\377).
_BYTE_ESCAPE = re.compile(r"\\x([89a-fA-F][0-9a-fA-F])|\\([23][0-7][0-7])")
NAME_MAX = 255  # bytes in one file name, on Linux and macOS file systems alike


def utf8_safe(text: str) -> str:
    """``text`` with each lone surrogate spelled as an ASCII escape, so it always encodes as UTF-8.

    A file name byte that is not UTF-8 reaches Python as a surrogate (``os.fsdecode``'s
    surrogateescape: 0xff becomes U+DCFF); it is shown as ``\\xff``, which ``resolve_in_root``
    reads back. Any other surrogate is shown as ``\\udXXX``. Text without one is unchanged."""
    return _LONE_SURROGATE.sub(_surrogate_escape, text)


def _surrogate_escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code - 0xdc00:02x}" if 0xdc80 <= code <= 0xdcff else f"\\u{code:04x}"


def _plain(node: Any, defs: dict[str, Any]) -> Any:
    """The schema as a model reads it best: ``$ref``s inlined, pydantic's titles dropped."""
    if isinstance(node, list):
        return [_plain(v, defs) for v in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _plain(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
    return {k: _plain(v, defs) for k, v in node.items() if k != "title" or not isinstance(v, str)}


def resolve_in_root(ctx: ToolContext, path: str) -> Path:
    """``path`` (relative to the root, or absolute) resolved with symlinks followed;
    refused unless it lies inside the project root, and refused in one line where the
    OS could not take it (a NUL, a name too long, a symlink loop, a file for a folder).

    ``\\xNN`` escapes, as ``utf8_safe`` shows a name's non-UTF-8 bytes (and git's octal
    ``\\NNN``), name those bytes when no file is spelled literally so (the literal name wins)."""
    shown = utf8_safe(path)
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        raise ToolRefused(f"{shown} is not a valid file name") from None
    if b"\0" in raw:
        raise ToolRefused(f"{shown!r} contains a NUL byte, which no file name can")
    if any(len(part) > NAME_MAX for part in raw.split(b"/")):
        raise ToolRefused(f"{shown[:80]}...: {os.strerror(errno.ENAMETOOLONG)}")
    root = ctx.root.resolve()
    try:
        full = _in_root(root, path)
        if not os.path.lexists(full) and (unescaped := _BYTE_ESCAPE.sub(_escaped_byte, path)) != path:
            if os.path.lexists(escaped := _in_root(root, unescaped)):
                full = escaped
        full = full.resolve()
    except RuntimeError:  # Python before 3.13 reports a symlink loop so
        raise ToolRefused(f"{shown}: {os.strerror(errno.ELOOP)}") from None
    except OSError as err:  # a whole path past PATH_MAX...
        raise ToolRefused(f"{shown[:80]}: {err.strerror}") from None
    if full != root and root not in full.parents:
        raise ToolRefused(f"{shown} is outside the project ({root}); only files inside it can be used")
    try:
        full.stat()
    except FileNotFoundError:  # a file to create, or one the tool says is missing
        pass
    except OSError as err:  # a symlink loop, a file as a folder, no permission...
        raise ToolRefused(f"{shown}: {err.strerror}") from None
    return full


def _in_root(root: Path, path: str) -> Path:
    try:
        candidate = Path(path).expanduser()
    except RuntimeError:  # ~name of no such user
        raise ToolRefused(f"{utf8_safe(path)}: no such user, so no home folder") from None
    return candidate if candidate.is_absolute() else root / candidate


def _escaped_byte(match: re.Match[str]) -> str:
    byte = int(match.group(1), 16) if match.group(1) else int(match.group(2), 8)
    return chr(0xdc00 + byte)  # the surrogate os.fsencode turns into that byte
