"""Small numeric building blocks of the V4 graph (docs/spec/v4-model.md §3.1, §3.3).

RMS norms and RoPE live with the kernels (``kernels/rowops.py``, the fused decode
attention reproduces them); they are re-exported here with the model's own blocks.

All math is f32. Every function works on any leading dims, so the same code
serves a prefill chunk ``[T, ...]`` and a single decode token ``[1, ...]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from magnetar.kernels import hyper
from magnetar.kernels.hyper import HcParams
from magnetar.kernels.rowops import rms, rmsnorm, rope, rope_angles

from .config import ModelConfig


# ---------------------------------------------------------------------------
# RoPE: interleaved pairs on the last `rope_dim` dims of a head (spec §3.1).

def rope_inv_freq(cfg: ModelConfig, compressed: bool) -> mx.array:
    """Per-pair inverse frequencies; compressed layers use the YaRN-scaled base (no magnitude scaling)."""
    dim = cfg.rope_dim
    base = cfg.compress_rope_base if compressed else cfg.rope_base
    inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if compressed:
        def correction_dim(rotations: float) -> float:
            return dim * math.log(cfg.yarn_orig_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(correction_dim(cfg.yarn_beta_fast)), 0)
        high = min(math.ceil(correction_dim(cfg.yarn_beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0.0, 1.0)
        keep = 1.0 - ramp  # 1: original frequency (fast pairs), 0: fully interpolated
        inv = inv * keep + inv / cfg.yarn_factor * (1.0 - keep)
    return mx.array(inv.astype(np.float32))


# ---------------------------------------------------------------------------
# Hyper-connections (spec §3.3): the residual is `hc` streams mixed around
# each sublayer by weights computed from the streams themselves. The MLX math
# lives with the kernels (the backends' default ``hc_pre``); these are the
# model-config forms of it, the oracle every fused ``hc_pre`` is tested against.

def hc_params(cfg: ModelConfig) -> HcParams:
    return HcParams(cfg.rms_eps, cfg.hc_eps, cfg.sinkhorn_iters)


def hc_pre(X: mx.array, mix: Callable[[mx.array], mx.array], scale: mx.array, base: mx.array, cfg: ModelConfig
           ) -> tuple[mx.array, mx.array, mx.array]:
    """X [T, hc, D] -> (sublayer input [T, D], post [T, hc], comb [T, hc, hc]).

    ``mix`` is the product with the hyper-connection's fn matrix: [T, hc*D] -> [T, (2+hc)*hc]."""
    return hyper.hc_pre(X, mix, scale, base, hc_params(cfg))


sinkhorn = hyper.sinkhorn
hc_post = hyper.hc_post
