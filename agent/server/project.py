"""What every protocol's projection shares (docs/spec/server-api.md §2, §3): SSE framing,
ids, and a ``Reply`` that gathers one generation's ``Out`` events (for non-streaming
answers and for the totals that end a stream)."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field

from .worker import Out


def sse(data: dict | str, event: str | None = None) -> str:
    """One event: optional ``event:`` line, one ``data:`` line (JSON has no raw newline), blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def new_id(prefix: str, hex_chars: int = 24) -> str:
    return prefix + secrets.token_hex(hex_chars // 2)


def signature(reasoning: str) -> str:
    """Our opaque thinking signature: recognizable, and tied to the exact reasoning bytes."""
    return "ds4s1." + hashlib.sha256(reasoning.encode()).hexdigest()[:32]


@dataclass
class Reply:
    """One generation, gathered from its events."""

    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    reasoning: str = ""
    text: str = ""
    calls: list[dict] = field(default_factory=list)
    finish: str | None = None
    usage: dict = field(default_factory=lambda: {"prompt": 0, "cached": 0, "completion": 0, "reasoning": 0})
    stop_sequence: str | None = None
    error: str = ""

    def add(self, out: Out) -> None:
        if out.kind == "reasoning":
            self.reasoning += out.text
        elif out.kind == "text":
            self.text += out.text
        elif out.kind == "tool":
            self.calls.append(out.call)
        elif out.kind == "started":
            self.usage.update(out.usage)
        elif out.kind == "end":
            self.finish, self.stop_sequence = out.finish, out.stop_sequence
            self.usage.update(out.usage or {})
            self.error = out.text if out.finish == "error" else ""

    @property
    def total_tokens(self) -> int:
        return self.usage["prompt"] + self.usage["completion"]


class Projection:
    """Base of the per-protocol projections: ``opening`` (sent at once), ``keepalive``,
    ``event`` (one Out -> SSE text), ``body`` (the non-streaming JSON)."""

    def __init__(self, reply: Reply, request):
        self.reply, self.request = reply, request

    def opening(self) -> list[str]:
        return []

    def keepalive(self) -> str:
        return ": keepalive\n\n"

    def event(self, out: Out) -> list[str]:
        raise NotImplementedError

    def body(self) -> dict:
        raise NotImplementedError
