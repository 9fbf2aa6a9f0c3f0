"""Hyper-connections in MLX ops (docs/spec/v4-model.md §3.3): the math every
backend's fused ``hc_pre`` must reproduce, and the default ``Backend.hc_pre``.

The residual is ``hc`` streams ``X [T, hc, D]`` mixed around each sublayer by
weights computed from the streams themselves. ``runtime/ops.py`` re-exports
these functions with the model config (the oracle the tests compare against).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class HcParams:
    """The config constants of ``hc_pre``: the RMS-norm epsilon, the epsilon added to
    ``pre`` and inside Sinkhorn, and the number of Sinkhorn passes."""

    rms_eps: float
    hc_eps: float
    sinkhorn_iters: int


def hc_pre(X: mx.array, mix: Callable[[mx.array], mx.array], scale: mx.array, base: mx.array, p: HcParams
           ) -> tuple[mx.array, mx.array, mx.array]:
    """X [T, hc, D] -> (sublayer input [T, D], post [T, hc], comb [T, hc, hc]).

    ``mix`` is the product with the hyper-connection's fn matrix: [T, hc*D] -> [T, (2+hc)*hc]."""
    T, hc, D = X.shape
    flat = X.reshape(T, hc * D)
    m = mix(flat * mx.rsqrt(mx.mean(flat * flat, axis=-1, keepdims=True) + p.rms_eps))  # unweighted RMS norm
    pre = mx.sigmoid(m[:, :hc] * scale[0] + base[:hc]) + p.hc_eps
    post = 2.0 * mx.sigmoid(m[:, hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = (m[:, 2 * hc:] * scale[2] + base[2 * hc:]).reshape(T, hc, hc)
    comb = sinkhorn(mx.softmax(comb, axis=-1) + p.hc_eps, p.sinkhorn_iters, p.hc_eps)
    x_in = mx.sum(pre[:, :, None] * X, axis=1)
    return x_in, post, comb


def sinkhorn(c: mx.array, iters: int, eps: float) -> mx.array:
    """Columns first, then `iters - 1` row/column passes (the order matters: C is not symmetric)."""
    c = c / (mx.sum(c, axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (mx.sum(c, axis=-1, keepdims=True) + eps)
        c = c / (mx.sum(c, axis=-2, keepdims=True) + eps)
    return c


def hc_post(y: mx.array, X: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """X' = post ⊗ y + Cᵀ X: stream j takes sum_i C[i, j] X[i]."""
    return post[:, :, None] * y[:, None, :] + mx.swapaxes(comb, -1, -2) @ X
