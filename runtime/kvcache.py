"""The prefix cache: checkpoints of token prefixes on disk, reused by any request
that starts with one of them (the agent's system prompt and tool schemas, a
server's shared preambles).

Entries live in ``<folder>/<model fingerprint>/`` as ``<N>-<sha256 of the N ids>.ckpt``
(checkpoint.py files), so a lookup reads no file: it hashes the request's first
N ids for each entry's N and takes the longest match. Only a restore reads the
file, and it verifies the checksum; a damaged entry is deleted and the request
falls back to a shorter prefix or a plain prefill. Recency is the file's mtime
(touched on every hit); past the byte budget the least recently used go first.

When to save (after ds4's policy, docs/spec/v4-model.md §5.3):

* ``cold``: a prompt that hit nothing is saved at its length minus ``trim``
  tail tokens (the tail is usually the turn's own text), rounded down to a
  multiple of the prefill chunk, if that leaves ``min_tokens``; the saved prefix
  ends on a chunk boundary and a restore + prefill runs the very same chunks
  as an uncached prefill (bit-identical logits);
* ``continued``: the same, when the aligned point lies ``continued_interval``
  or more tokens past the prefix that was reused;
* ``evict``: a live sequence that is about to be replaced by an unrelated one;
* ``shutdown``: the live sequence when the program exits (the caller's call).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .checkpoint import CheckpointError
from .fileio import sweep_stale_temps

if TYPE_CHECKING:
    from .engine import Engine

DEFAULT_BUDGET = 16 << 30
REASONS = ("cold", "continued", "evict", "shutdown")


@dataclass(frozen=True)
class Entry:
    path: Path
    n_tokens: int
    key: str
    size: int
    last_used: float


def prefix_key(ids) -> str:
    return hashlib.sha256(np.asarray(ids, "<u4").tobytes()).hexdigest()[:40]


class PrefixCache:
    def __init__(self, folder: str | os.PathLike, budget_bytes: int = DEFAULT_BUDGET, min_tokens: int = 512,
                 trim: int = 32, continued_interval: int = 10_000):
        self.root = Path(folder)
        sweep_stale_temps(self.root)  # checkpoints whose writer was killed mid-write
        self.budget, self.min_tokens, self.trim = budget_bytes, min_tokens, trim
        self.continued_interval = continued_interval

    def _folder(self, engine: "Engine") -> Path:
        ident = engine.identity
        return self.root / hashlib.sha256(repr(sorted(ident.items())).encode()).hexdigest()[:16]

    def entries(self, engine: "Engine") -> list[Entry]:
        """This model's entries, most recently used first."""
        out = []
        folder = self._folder(engine)
        for path in folder.glob("*.ckpt") if folder.is_dir() else ():
            n, _, key = path.stem.partition("-")
            try:
                st = path.stat()
                out.append(Entry(path, int(n), key, st.st_size, st.st_mtime))
            except (OSError, ValueError):
                continue  # removed meanwhile, or not ours
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    def lookup(self, engine: "Engine", ids) -> Entry | None:
        """The entry holding the longest prefix of ``ids`` (at most ``len(ids) - 1``
        tokens, so the last token always runs and yields fresh logits)."""
        best = None
        for e in self.entries(engine):
            if e.n_tokens < len(ids) and (best is None or e.n_tokens > best.n_tokens) \
                    and prefix_key(ids[:e.n_tokens]) == e.key:
                best = e
        return best

    def save(self, engine: "Engine", reason: str) -> Entry | None:
        """Checkpoint the engine's live sequence as an entry (if it has ``min_tokens``)."""
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {REASONS}, not {reason!r}")
        ids = engine.tokens
        if len(ids) < self.min_tokens:
            return None
        path = self._folder(engine) / f"{len(ids)}-{prefix_key(ids)}.ckpt"
        if not path.exists():
            engine.checkpoint(path, note=reason)
            self.prune(engine)
        return self._touch(path)

    def prune(self, engine: "Engine") -> None:
        """Delete the least recently used entries until the folder fits the budget
        (the most recent one always stays)."""
        entries = self.entries(engine)
        total = entries[0].size if entries else 0
        for e in entries[1:]:
            total += e.size
            if total > self.budget:
                e.path.unlink(missing_ok=True)

    def _touch(self, path: Path) -> Entry | None:
        try:
            os.utime(path)
            st = path.stat()
        except OSError:
            return None
        n, _, key = path.stem.partition("-")
        return Entry(path, int(n), key, st.st_size, st.st_mtime)

    def aligned(self, n: int, chunk: int) -> int:
        """Where to cut a prompt of ``n`` tokens for a save: trimmed, on a chunk boundary."""
        return max(0, n - self.trim) // chunk * chunk

    def sync(self, engine: "Engine", ids, progress=None) -> int:
        """Make ``ids`` the engine's live sequence, reusing what it can; returns the
        tokens reused (from the live sequence or the cache) rather than prefilled."""
        ids = list(ids)
        live = engine.tokens
        if live and ids[:len(live)] == live:
            reused = len(live)  # a continuation of what is live
        else:
            if len(live) >= self.min_tokens:
                self.save(engine, "evict")
            reused = self._restore_longest(engine, ids)
        hit = reused > 0
        chunk = engine.prefill_chunk
        cut = self.aligned(len(ids), chunk)
        due = not hit or cut - reused >= self.continued_interval
        if due and cut >= self.min_tokens and reused < cut < len(ids):
            engine.prefill(ids[reused:cut], progress)
            self.save(engine, "continued" if hit else "cold")
            engine.prefill(ids[cut:], progress)
        else:
            engine.prefill(ids[reused:], progress)
        return reused

    def _restore_longest(self, engine: "Engine", ids) -> int:
        while (entry := self.lookup(engine, ids)) is not None:
            try:
                engine.restore(entry.path)
            except CheckpointError:
                entry.path.unlink(missing_ok=True)  # damaged: never offered again
                continue
            self._touch(entry.path)
            engine.stats.cache_hits += 1
            return entry.n_tokens
        engine.reset()
        return 0
