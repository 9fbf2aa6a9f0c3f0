"""``magnetar bench kernels``: the routed-expert step against its bandwidth floor.

The step reads the selected experts' weights once, so its speed is best
stated as weight bytes per second. Each repetition times, back to back:

* ``copy``: ``np.copyto`` of as many bytes as the step's weights, between
  pre-touched buffers at a rotating offset (so from RAM, not cache): the floor;
* ``kernels``: the chosen backend's ``moe`` as the decode step runs it (compiled,
  unless the backend runs it on the host);
* ``dequant+matmul``: the simple path, each used expert expanded to f32 by the
  numpy reference dequantizer, then multiplied by numpy's BLAS. It needs no warm-up,
  and once one call has taken over SLOW_SIMPLE_S it is not timed again (at Flash
  widths a 128-token call takes ~90 s; five of them made the run 10 minutes long).

The kernels read the stacks as the backend keeps a model's (``Backend.expert_stack``:
the CPU reads them in place, as numpy arrays here), not a second copy beside them.

Shapes are mini-flash's (D 4096, F 2048, 256 experts, 6 per token): decode is
one token; prefill is a batch of tokens routed uniformly, so nearly every
expert is used. Experts are random valid blocks; their values do not matter.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from magnetar.kernels import GGMLType, reference
from magnetar.kernels.backend import QTensor, backend

from ..layout import EXPERT_TRIPLES
from .make_model import random_blocks

LIMIT = 10.0
SLOW_SIMPLE_S = 5.0  # a simple-path call slower than this is timed once


@dataclass
class Case:
    name: str
    n_tokens: int
    bytes_read: int  # weight bytes of the experts this step uses
    seconds: dict[str, list[float]]


def _stack(rng, ggml_type: GGMLType, n_experts: int, rows: int, cols: int) -> np.ndarray:
    blocks = random_blocks(ggml_type, (cols, rows, n_experts), cols ** -0.5, rng)
    return blocks.reshape(n_experts, rows, -1)


def _simple(x, ids, w, stacks) -> np.ndarray:
    """Dequantize each used expert with the numpy reference, multiply with numpy's BLAS."""
    out = np.zeros(x.shape, np.float32)
    for e in np.unique(ids):
        t, slot = np.nonzero(ids == e)
        gate, up, down = (reference.dequantize(raw[e], qt) for raw, qt in stacks)
        g = np.minimum(x[t] @ gate.T, LIMIT)
        mid = g * (0.5 + 0.5 * np.tanh(0.5 * g)) * np.clip(x[t] @ up.T, -LIMIT, LIMIT)
        out[t] += (mid * w[t, slot][:, None]) @ down.T
    return out


class _CopyFloor:
    """Copies ``n`` bytes between buffers touched in advance (so no page faults are timed),
    alternating between two offsets SHIFT apart so consecutive copies do not find their
    bytes in cache (a decode-sized copy, 42.5 MB, is already larger than L3).

    Each buffer is ``capacity`` + SHIFT bytes. It was 4x capacity (7.2 GB for the two at
    256 Flash experts, beside 3.6 GB of expert stacks), which on a 23 GB machine shared
    with other work pushed this process into page reclaim and slowed both columns."""

    SHIFT = 64 << 20

    def __init__(self, capacity: int):
        size = capacity + self.SHIFT
        self.src, self.dst = np.ones(size, np.uint8), np.full(size, 2, np.uint8)  # both touched
        self.at = 0

    def copy(self, n: int) -> None:
        self.at = self.SHIFT - self.at
        np.copyto(self.dst[self.at:self.at + n], self.src[self.at:self.at + n])


def _expert_bytes(stacks) -> int:
    return sum(raw[0].nbytes for raw, _ in stacks)


def run(recipe: str = "q2", backend_name: str = "cpu", n_experts: int = 256, d_model: int = 4096,
        ffn: int = 2048, k: int = 6, prefill_tokens: int = 128, reps: int = 5,
        progress: Callable[[str], None] | None = None) -> list[Case]:
    if recipe not in ("q2", "q4"):
        raise ValueError("bench kernels runs the q2 or q4 expert encodings")
    rng = np.random.default_rng(0)
    types = EXPERT_TRIPLES[recipe]
    shapes = [(ffn, d_model), (ffn, d_model), (d_model, ffn)]
    stacks = [(_stack(rng, t, n_experts, r, c), t) for t, (r, c) in zip(types, shapes)]
    kern = backend(backend_name)
    mats = [QTensor(kern.expert_stack(raw), t) for raw, t in stacks]

    def step(x, i, r):
        return kern.moe(x, i, r, *mats, LIMIT)

    decode_step = step if kern.host_moe or not kern.traceable else mx.compile(step)
    per_expert = _expert_bytes(stacks)
    floor = _CopyFloor(per_expert * min(n_experts, prefill_tokens * k))
    cases = []
    for name, n_tokens in (("decode", 1), ("prefill", prefill_tokens)):
        if progress:
            progress(name)
        case = Case(name, n_tokens, 0, {"copy": [], "kernels": [], "dequant+matmul": []})
        for rep in range(reps + 1):  # rep 0 warms up (compiles, faults pages in) and is dropped
            ids = np.argsort(rng.random((n_tokens, n_experts)), axis=1)[:, :k].astype(np.int32)
            w = rng.random((n_tokens, k)).astype(np.float32)
            x = rng.standard_normal((n_tokens, d_model)).astype(np.float32)
            case.bytes_read = per_expert * len(np.unique(ids))
            timings = {
                "copy": lambda: floor.copy(case.bytes_read),
                "kernels": lambda: mx.eval((decode_step if n_tokens == 1 else
                                            lambda a, b, c: kern.moe(a, b, c, *mats, LIMIT))(
                                                mx.array(x), mx.array(ids), mx.array(w))),
                "dequant+matmul": lambda: _simple(x, ids, w, stacks),
            }
            order = list(timings)
            order = order[rep % 3:] + order[:rep % 3]  # rotate who goes first
            for label in order:
                simple = case.seconds["dequant+matmul"]
                if label == "dequant+matmul" and (not rep or (simple and simple[0] > SLOW_SIMPLE_S)):
                    continue
                t0 = time.perf_counter()
                timings[label]()
                if rep:
                    case.seconds[label].append(time.perf_counter() - t0)
        cases.append(case)
    return cases


def render(cases: list[Case], recipe: str, backend_name: str) -> str:
    lines = [f"routed-expert step, {recipe} experts, backend {backend_name} (median of reps; GB/s of weight bytes)",
             f"{'shape':<16}{'MB read':>9}{'copy GB/s':>11}{'kernels':>10}{'GB/s':>8}{'simple':>10}"
             f"{'GB/s':>8}{'of floor':>10}{'vs simple':>11}"]
    for c in cases:
        med = {k: statistics.median(v) for k, v in c.seconds.items()}
        gbs = {k: c.bytes_read / s / 1e9 for k, s in med.items()}
        lines.append(
            f"{c.name + f' T={c.n_tokens}':<16}{c.bytes_read / 1e6:>9.1f}{gbs['copy']:>11.1f}"
            f"{med['kernels'] * 1e3:>8.1f}ms{gbs['kernels']:>8.2f}{med['dequant+matmul'] * 1e3:>8.1f}ms"
            f"{gbs['dequant+matmul']:>8.2f}{gbs['kernels'] / gbs['copy']:>10.3f}"
            f"{med['dequant+matmul'] / med['kernels']:>10.2f}x")
    return "\n".join(lines)

