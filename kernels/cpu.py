"""The CPU backend: MLX ops for one token, numpy's BLAS for many.

What is fastest here was measured (``magnetar bench kernels``; numbers in
README): the ``mlx[cpu]`` wheel links the reference BLAS, so a product with
many rows runs 20-50x faster through numpy's OpenBLAS, while a single token
is cheapest left inside MLX's compiled decode graph, where a host hand-off
per layer would cost more than the product. Weights are expanded to f32 only
for the experts a batch uses, a bounded group at a time.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .backend import Backend, QTensor
from .dequant import dequantize

HOST_BLAS_MIN_ROWS = 16  # below this the product stays in MLX (and may sit in a compiled graph)
EXPERT_GROUP_BYTES = 256 << 20  # f32 expert weights expanded at once in the many-token path


def _expand(w: QTensor, experts: mx.array | None = None) -> mx.array:
    data = w.data if isinstance(w.data, mx.array) else mx.array(w.data)
    if experts is not None:
        data = mx.take(data, experts, axis=0)
    return dequantize(data, int(w.ggml_type))


def _silu_clamped(g: np.ndarray, u: np.ndarray, limit: float) -> np.ndarray:
    g = np.minimum(g, limit)
    return g * (0.5 + 0.5 * np.tanh(0.5 * g)) * np.clip(u, -limit, limit)  # tanh form: no exp overflow


def _scatter_add(out: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
    """``out[rows] += values`` where a row may repeat (a token listing an expert twice gets both)."""
    if len(np.unique(rows)) == len(rows):
        out[rows] += values  # the usual case, and ~15x faster than np.add.at
    else:
        np.add.at(out, rows, values)


class CpuBackend(Backend):
    name = "cpu"

    def dequantize(self, w: QTensor, experts: mx.array | None = None) -> mx.array:
        return _expand(w, experts)

    def matmul(self, x: mx.array, w: QTensor) -> mx.array:
        """``x @ W.T``; with many rows it evaluates its inputs (host-paced code only)."""
        if x.shape[0] >= HOST_BLAS_MIN_ROWS:
            return mx.array(np.asarray(x) @ np.asarray(_expand(w)).T)
        return x @ _expand(w).T

    def moe(self, x, ids, weights, gate, up, down, limit):
        if x.shape[0] == 1:
            return self._moe_token(x, ids, weights, gate, up, down, limit)
        return mx.array(self._moe_batch(np.asarray(x), np.asarray(ids), np.asarray(weights),
                                        gate, up, down, limit))

    @staticmethod
    def _moe_token(x, ids, weights, gate, up, down, limit):
        """One token, traceable: expand only its K experts."""
        sel, col = ids[0], x.T  # [K], [D, 1]
        g = mx.minimum(_expand(gate, sel) @ col, limit)
        mid = g * mx.sigmoid(g) * mx.clip(_expand(up, sel) @ col, -limit, limit)  # [K, F, 1]
        mid = mid * weights[0][:, None, None]
        return mx.sum(_expand(down, sel) @ mid, axis=0).T  # [1, D]

    @staticmethod
    def _moe_batch(x, ids, weights, gate, up, down, limit) -> np.ndarray:
        """Many tokens: group the (token, slot) pairs by expert; expand each used expert once."""
        tok, slot = np.nonzero(ids >= 0)
        expert = ids[tok, slot]
        order = np.argsort(expert, kind="stable")
        tok, slot, expert = tok[order], slot[order], expert[order]
        used, starts = np.unique(expert, return_index=True)
        bounds = np.append(starts, len(expert))
        per_expert = 4 * (gate.rows * gate.cols + up.rows * up.cols + down.rows * down.cols)
        group = max(1, EXPERT_GROUP_BYTES // per_expert)
        out = np.zeros(x.shape, np.float32)
        for g0 in range(0, len(used), group):
            sel = mx.array(used[g0:g0 + group].astype(np.int32))
            wg, wu, wd = (np.asarray(_expand(m, sel)) for m in (gate, up, down))
            for j in range(len(sel)):
                lo, hi = bounds[g0 + j], bounds[g0 + j + 1]
                t = tok[lo:hi]
                mid = _silu_clamped(x[t] @ wg[j].T, x[t] @ wu[j].T, limit) * weights[t, slot[lo:hi]][:, None]
                _scatter_add(out, t, mid @ wd[j].T)
        return out
