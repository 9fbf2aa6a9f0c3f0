"""``magnetar bench distributed``: what a layer split costs and gains, on this machine.

One engine in this process, then the same model split over ``ranks`` local processes
(runtime/distributed.py, MLX ring over 127.0.0.1). For each prompt length: prefill
(chunked, pipelined with the window) timed, then ``tokens`` greedy decode steps timed;
the split's logits are checked against the single engine's. Decode is split into rank
0's own span and the round trip (hidden state out, the other spans, logits back).
Bytes on the wire per token follow from the message layout (runtime/pipeline.py): a
1 KiB header per message, the token id, hc x D f32 per hop, f32 logits back.

All ranks share this machine's cores, so on a small CPU a split cannot gain: every rank
competes for the same cores. What it shows is the overhead: per-hop latency and bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..distributed import start_pipeline
from ..engine import Engine
from ..gguf_read import open_model
from ..layer_balance import Calibration
from ..pipeline import HEADER_BYTES


@dataclass
class Case:
    n_tokens: int
    prefill_1: float  # seconds, one process
    prefill_n: float
    decode_1: float  # seconds per token
    decode_n: float
    rank0_span: float  # of decode_n: rank 0's own layers
    round_trip: float  # of decode_n: from the hidden state's send to the logits' arrival
    same_logits: bool


def wire_bytes(model, ranks: int) -> tuple[int, int]:
    """(decode bytes per token over the whole ring, prefill bytes per token on one hop)."""
    cfg = open_model(model).config
    hidden = cfg.hc * cfg.d_model * 4
    per_hop = HEADER_BYTES + 4 + hidden
    return (ranks - 1) * per_hop + HEADER_BYTES + cfg.vocab_size * 4, hidden


def _prompt(n: int, vocab: int) -> list[int]:
    return [0] + np.random.default_rng(n).integers(2, vocab, n - 1).tolist()


def _measure(engine, prompt: list[int], tokens: int) -> tuple[float, float, np.ndarray]:
    engine.reset()
    t0 = time.perf_counter()
    engine.prefill(prompt)
    prefill = time.perf_counter() - t0
    rows = [engine.next_logits()]
    t0 = time.perf_counter()
    for _ in engine.generate(max_tokens=tokens, temperature=0, ignore_eos=True):
        pass
    rows.append(engine.next_logits())  # runs the last token handed out
    return prefill, (time.perf_counter() - t0) / tokens, np.stack(rows)


def run(model, lengths: Sequence[int], ranks: int = 2, layers: str = "auto", tokens: int = 8, reps: int = 2,
        chunk: int = 512, progress: Callable[[str], None] = lambda line: None
        ) -> tuple[list[Case], str, Calibration | None]:
    """Both engines live at once and take turns, ``reps`` times per length, best of each kept:
    other load on the machine then falls on both alike. With ``layers`` auto, also what the
    split's calibration measured (runtime/layer_balance.py)."""
    ctx = max(lengths) + tokens + 8
    single = Engine.load(model, ctx=ctx, prefill_chunk=chunk)
    split = start_pipeline(model, ranks=ranks, layers=layers, ctx=ctx, prefill_chunk=chunk)
    try:
        vocab = single.config.vocab_size
        for engine in (single, split):  # compile and warm up
            _measure(engine, _prompt(64, vocab), 2)
        cases = []
        for n in lengths:
            ones, splits = [], []  # (prefill s, decode s/token, logits rows[, rank-0 share, trip share])
            for rep in range(reps):
                ones.append(_measure(single, _prompt(n, vocab), tokens))
                before = list(split.model.decode_timing)
                splits.append(_measure(split, _prompt(n, vocab), tokens))
                steps, local, trip = (a - b for a, b in zip(split.model.decode_timing, before))
                splits[-1] += (local / steps, trip / steps)
                progress(f"{n} tokens: rep {rep + 1} of {reps}")
            fastest = min(splits, key=lambda m: m[1])
            cases.append(Case(n, min(m[0] for m in ones), min(m[0] for m in splits), min(m[1] for m in ones),
                              fastest[1], fastest[3], fastest[4], bool(np.array_equal(ones[0][2], splits[0][2]))))
        note = f"{split.pipeline_note}; prefill chunks of {chunk}, {tokens} decode tokens, best of {reps}"
        return cases, note, split.calibration
    finally:
        split.close()


def render(cases: list[Case], ranks: int, note: str, model, calibration: Calibration | None = None) -> str:
    decode_bytes, hop_bytes = wire_bytes(model, ranks)
    lines = [f"{ranks} local ranks ({note})",
             f"{'tokens':>7} {'prefill 1':>10} {'prefill N':>10} {'speedup':>8} {'decode 1':>9} {'decode N':>9} "
             f"{'hop cost':>9} {'ratio':>6} {'rank-0':>7} {'trip':>7} {'same':>5}"]
    for c in cases:
        lines.append(f"{c.n_tokens:>7} {c.prefill_1:>9.2f}s {c.prefill_n:>9.2f}s {c.prefill_1 / c.prefill_n:>7.2f}x "
                     f"{c.decode_1 * 1e3:>7.1f}ms {c.decode_n * 1e3:>7.1f}ms {(c.decode_n - c.decode_1) * 1e3:>7.1f}ms "
                     f"{c.decode_n / c.decode_1:>5.2f}x {c.rank0_span * 1e3:>5.1f}ms {c.round_trip * 1e3:>5.1f}ms "
                     f"{'yes' if c.same_logits else 'NO':>5}")
    lines.append(f"wire: decode {decode_bytes / 1024:.1f} KiB per token over the ring (hidden state f32 on "
                 f"{ranks - 1} hop(s) + logits back); prefill {hop_bytes / 1024:.1f} KiB per token per hop")
    return "\n".join(lines + (calibration.table() if calibration else []))
