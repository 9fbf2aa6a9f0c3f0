"""Row-wise f32 building blocks of the V4 graph (docs/spec/v4-model.md §3.1, §3.8): RMS
norms, interleaved RoPE, the router's softplus and the shared expert's gating, as MLX ops on any leading dims. The model uses them through
``runtime/ops.py``; the fused decode attention kernels reproduce them.
"""

from __future__ import annotations

import mlx.core as mx


def rms(x: mx.array, eps: float) -> mx.array:
    """Unweighted RMS normalization over the last axis."""
    return x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps)


def softplus(x: mx.array) -> mx.array:
    return mx.where(x > 20.0, x, mx.log1p(mx.exp(mx.minimum(x, 20.0))))


def swiglu(gate: mx.array, up: mx.array, limit: float) -> mx.array:
    """SiLU(gate) * up with V4's clamp: the gate from above only, the up both ways."""
    gate = mx.minimum(gate, limit)
    return gate * mx.sigmoid(gate) * mx.clip(up, -limit, limit)


def rmsnorm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    return weight * rms(x, eps)  # a plain multiply by w (no 1 + w)


def rope_angles(positions: mx.array, inv_freq: mx.array) -> tuple[mx.array, mx.array]:
    """cos, sin of shape ``positions.shape + (rope_dim/2,)``."""
    theta = positions.astype(mx.float32)[..., None] * inv_freq
    return mx.cos(theta), mx.sin(theta)


def rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate the trailing ``2*cos.shape[-1]`` dims of ``x`` pairwise; ``-sin`` undoes it."""
    half = cos.shape[-1]
    nope = x[..., : x.shape[-1] - 2 * half]
    pairs = x[..., x.shape[-1] - 2 * half:].reshape(*x.shape[:-1], half, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return mx.concatenate([nope, rotated.reshape(*x.shape[:-1], 2 * half)], axis=-1)


__all__ = ["rms", "rmsnorm", "rope", "rope_angles"]
