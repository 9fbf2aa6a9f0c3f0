"""``magnetar bench resume``: how much faster a checkpoint brings a sequence
back than prefilling its tokens again, and what it costs on disk.

For each length N: prefill N seeded random tokens once (timed), checkpoint
(timed, with its size), then restore into a fresh engine ``reps`` times, each
read once with the file dropped from the page cache first (``cold``: a resume
the next day reads from the disk) and once right after (``warm``). Every
restore is checked to give the very logits the prefill gave.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine import Engine


@dataclass
class Case:
    n_tokens: int
    prefill_s: float
    checkpoint_s: float
    restore_cold_s: float
    restore_warm_s: float
    nbytes: int

    @property
    def speedup(self) -> float:
        return self.prefill_s / self.restore_cold_s


def drop_page_cache(path: Path) -> bool:
    """Ask the kernel to forget the file's cached pages (False where it cannot)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    finally:
        os.close(fd)


def _timed_restore(model: str, ctx: int, path: Path, expected: np.ndarray, load: dict) -> float:
    engine = Engine.load(model, ctx=ctx, **load)
    t0 = time.perf_counter()
    engine.restore(path)
    seconds = time.perf_counter() - t0
    if engine.stats.prefill_tokens or not np.array_equal(engine.next_logits(), expected):
        raise RuntimeError("a restored checkpoint did not give the prefill's logits")
    return seconds


def run(model: str, lengths: Sequence[int], reps: int = 3, folder: str | None = None,
        progress: Callable[[str], None] | None = None, load: dict | None = None) -> list[Case]:
    """``load``: more ``Engine.load`` keywords (``--expert-cache``, ``--hotlist``)."""
    load = load or {}
    cases = []
    with tempfile.TemporaryDirectory(dir=folder, prefix="magnetar-bench-resume-") as tmp:
        for n in lengths:
            ctx = n + 1
            engine = Engine.load(model, ctx=ctx, **load)
            ids = [0] + np.random.default_rng(n).integers(2, engine.config.vocab_size, n - 1).tolist()
            if progress:
                progress(f"prefilling {n} tokens")
            t0 = time.perf_counter()
            engine.prefill(ids)
            prefill_s = time.perf_counter() - t0
            path = Path(tmp) / f"{n}.ckpt"
            t0 = time.perf_counter()
            nbytes = engine.checkpoint(path)
            checkpoint_s = time.perf_counter() - t0
            expected = engine.next_logits()
            del engine
            cold, warm = [], []
            for _ in range(reps):
                if progress:
                    progress(f"restoring {n} tokens")
                drop_page_cache(path)
                cold.append(_timed_restore(model, ctx, path, expected, load))
                warm.append(_timed_restore(model, ctx, path, expected, load))
            cases.append(Case(n, prefill_s, checkpoint_s, statistics.median(cold), statistics.median(warm), nbytes))
    return cases


def render(cases: Sequence[Case], model: str) -> str:
    lines = [f"resume vs re-prefill, {model} (restore: median of reps; cold = page cache dropped first)",
             f"{'tokens':>8}{'prefill s':>11}{'save s':>9}{'restore cold s':>16}{'warm s':>9}"
             f"{'MB':>9}{'KB/token':>10}{'speedup':>10}"]
    for c in cases:
        lines.append(f"{c.n_tokens:>8}{c.prefill_s:>11.2f}{c.checkpoint_s:>9.3f}{c.restore_cold_s:>16.3f}"
                     f"{c.restore_warm_s:>9.3f}{c.nbytes / 1e6:>9.1f}{c.nbytes / c.n_tokens / 1e3:>10.2f}"
                     f"{c.speedup:>9.0f}x")
    return "\n".join(lines)
