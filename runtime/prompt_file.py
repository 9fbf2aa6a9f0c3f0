"""Prompt files for ``magnetar imatrix`` (and other batch commands).

Plain text, prompts separated by lines holding only ``---`` (so a prompt can be
many lines of code), or ``.jsonl`` with one ``{"text": ...}`` object per line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import UsageError


def read_prompts(path: str | os.PathLike) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise UsageError(f"cannot read prompts file {path}: {err.strerror or err}") from None
    if str(path).endswith(".jsonl"):
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                raise UsageError(f"{path}:{n}: expected a JSON object with a \"text\" string") from None
            if not isinstance(value, str):
                raise UsageError(f"{path}:{n}: \"text\" must be a string")
            prompts.append(value)
    else:
        prompts, current = [], []
        for line in text.splitlines():
            if line.strip() == "---":
                prompts.append("\n".join(current))
                current = []
            else:
                current.append(line)
        prompts.append("\n".join(current))
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise UsageError(f"prompts file {path} holds no prompts")
    return prompts
