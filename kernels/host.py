"""The host-BLAS side of the CPU backends (``cpu`` and the ``reference`` oracle).

On the CPU, MLX (the ``mlx[cpu]`` wheel links the reference BLAS) multiplies a
prefill chunk 20-50x slower than numpy's OpenBLAS (docs/spec/quant-kernels.md
§5.2), and numpy's elementwise passes are fast too. So the host-paced work of
``base.Backend`` (a product with many rows, a prefill attention block, the
output projection) moves to numpy here; the compiled decode step, which has one
row per token and cannot leave MLX, stays on MLX.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import numpy as np

from .base import Backend, DenseWeight

HOST_BLAS_MIN_ROWS = 16  # below this a product stays in MLX (and may sit in a compiled graph)
CPU_EXPAND_BUDGET = 1 << 30  # bytes of non-expert weights widened to f32 on the CPU


def attend(q: np.ndarray, keys: np.ndarray, bias: np.ndarray, sinks: np.ndarray) -> np.ndarray:
    """``base.attend`` in numpy (OpenBLAS, and fast elementwise passes). The score tensor is
    updated in place: the same operations in the same order as out of place (the same bits),
    without a fresh [T, H, N] array per step (1.2-1.4x faster at ``small``'s and Flash's shapes)."""
    T, H, hd = q.shape
    s = (q.reshape(T * H, hd) @ keys.T).reshape(T, H, -1)
    s *= np.float32(hd ** -0.5)
    s += bias[:, None, :]
    sink = sinks[None, :, None]
    m = np.maximum(s.max(axis=-1, keepdims=True), sink)
    s -= m
    e = np.exp(s, out=s)
    denom = e.sum(axis=-1, keepdims=True) + np.exp(sink - m)
    out = (e.reshape(T * H, -1) @ keys).reshape(T, H, hd)
    out /= denom
    return out


class HostBackend(Backend):
    """A backend whose MLX runs on the CPU: host-paced f32 work goes through numpy."""

    expand_budget = CPU_EXPAND_BUDGET
    device = mx.cpu

    def dense(self, a: mx.array, b: mx.array) -> mx.array:
        if a.shape[0] >= HOST_BLAS_MIN_ROWS:
            return mx.array(np.asarray(a) @ np.asarray(b))
        return a @ b

    def attend_chunk(self, q, keys, bias, sinks):
        return mx.array(attend(*(np.asarray(a) for a in (q, keys, bias, sinks))))

    def logits_head(self, output: DenseWeight):
        """One f32 numpy copy of the output matrix (a view when it is f32 already), made at
        first use: the [D -> vocab] product is the largest of a small model, 3-20x slower
        in MLX's bundled BLAS."""
        weight = cache(lambda: np.asarray(output.dense()))
        return lambda y: np.array(y, dtype=np.float32) @ weight().T
