"""Prompt files for batch commands (``magnetar quality``, ``magnetar imatrix``).

Two formats, chosen by the file name:

* ``*.jsonl``: one JSON object per line with a ``"text"`` string (other keys are
  ignored, so files made for other tools work); blank lines are skipped.
* anything else: plain text, prompts separated by lines that hold only ``---``
  (surrounding spaces allowed), so a prompt can be many lines of code. Blank
  lines at the edges of a prompt are dropped (they are there to make the file
  readable); lines inside it, and indentation, are kept as written.

Prompts that are empty or only whitespace are dropped. Problems raise
``UsageError`` with one line naming the file (and the line where one applies).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UsageError

SEPARATOR = "---"
_FIX = "separate prompts with '---' lines, or use a .jsonl file of {\"text\": ...} objects"
_JSONL_FIX = "each non-blank line must be an object like {\"text\": \"...\"}"


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The non-empty prompts of ``path``, in file order."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UsageError(f"cannot read prompts file {path}: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8-sig")  # -sig: a BOM from a Windows editor is not prompt text
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text (byte {err.start})", "save the file as UTF-8") from None
    jsonl = Path(path).suffix.lower() == ".jsonl"
    prompts = parse_jsonl(text, str(path)) if jsonl else split_text(text)
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise UsageError(f"prompts file {path} holds no prompts", _FIX)
    return prompts


def split_text(text: str) -> list[str]:
    """Plain-text prompts between ``---`` lines (empty ones included; the caller drops them)."""
    prompts, current = [], []
    for line in text.splitlines() + [SEPARATOR]:  # the sentinel closes the last prompt
        if line.strip() != SEPARATOR:
            current.append(line)
            continue
        while current and not current[-1].strip():
            current.pop()
        start = next((i for i, ln in enumerate(current) if ln.strip()), len(current))
        prompts.append("\n".join(current[start:]))
        current = []
    return prompts


def parse_jsonl(text: str, name: str = "<jsonl>") -> list[str]:
    """The ``"text"`` of every object line; ``name`` is used in error messages."""
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise UsageError(f"{name}:{n}: invalid JSON ({getattr(err, 'msg', err)})", _JSONL_FIX) from None
        if not isinstance(obj, dict) or "text" not in obj:
            raise UsageError(f"{name}:{n}: expected a JSON object with a \"text\" string", _JSONL_FIX)
        if not isinstance(obj["text"], str):
            raise UsageError(f"{name}:{n}: \"text\" must be a string, not {type(obj['text']).__name__}", _JSONL_FIX)
        prompts.append(obj["text"])
    return prompts
