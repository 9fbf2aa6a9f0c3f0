"""The CPU backend: the native C expert kernels, else MLX ops and numpy's BLAS.

What is fastest here was measured (``magnetar bench kernels``; numbers in
README). The routed-expert step goes to ``native`` (C on the raw blocks,
compiled at first use) whenever a C compiler is present: 35-47x faster than
expanding the experts to f32, for one token and for many, so the decode graph
is cut around it (``host_moe``). Without a compiler the fallback keeps one
token inside MLX's compiled decode graph and sends many tokens through
numpy's OpenBLAS (the ``mlx[cpu]`` wheel links the reference BLAS, 20-50x
slower on products with many rows), expanding weights to f32 only for the
experts a batch uses, a bounded group at a time.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

from . import native
from .base import BackendUnavailable, QTensor
from .dequant import dequantize
from .host import HOST_BLAS_MIN_ROWS, HostBackend

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


class CpuBackend(HostBackend):
    name = "cpu"

    def __init__(self, use_native: bool | None = None):
        """``use_native``: None picks the native kernels when they build here and
        ``$MAGNETAR_NATIVE`` is not ``0`` (the escape hatch if a build misbehaves)."""
        if use_native is None:
            use_native = os.environ.get("MAGNETAR_NATIVE", "1") != "0" and native.available()
        elif use_native and not native.available():
            raise BackendUnavailable(f"native CPU kernels unavailable: {native.unavailable_reason()}")
        self.native = use_native
        self.host_moe = self.native

    @property
    def streams_experts(self) -> bool:
        return self.native

    def dequantize(self, w: QTensor, experts: mx.array | None = None) -> mx.array:
        return _expand(w, experts)

    def matmul(self, x: mx.array, w: QTensor) -> mx.array:
        """``x @ W.T``; with many rows it evaluates its inputs (host-paced code only)."""
        if x.shape[0] >= HOST_BLAS_MIN_ROWS:
            return mx.array(np.asarray(x) @ np.asarray(_expand(w)).T)
        return x @ _expand(w).T

    def moe(self, x, ids, weights, gate, up, down, limit):
        if self.native:
            stacks = [(np.asarray(m.data), m.ggml_type) for m in (gate, up, down)]
            return mx.array(native.moe(np.asarray(x), np.asarray(ids), np.asarray(weights), *stacks, limit))
        if x.shape[0] == 1:
            return self._moe_token(x, ids, weights, gate, up, down, limit)
        return mx.array(self._moe_batch(np.asarray(x), np.asarray(ids), np.asarray(weights),
                                        gate, up, down, limit))

    def moe_slots(self, x, ids, weights, gate, up, down, limit, slot_of, out):
        stacks = [(m.data, m.ggml_type) for m in (gate, up, down)]
        return native.moe(x, ids, weights, *stacks, limit, slot_of=slot_of, out=out)

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
