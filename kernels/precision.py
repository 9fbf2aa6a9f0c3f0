"""The official model's low-precision round trips (docs/spec/v4-model.md §3.1).

DeepSeek V4 was trained with its KV cache stored as FP8 and its indexer
activations as FP4, so the "official" precision simulates both: values are
rounded to what those formats can hold and kept in float32. All functions are
pure MLX ops on any leading dims, so they trace inside ``mx.compile``; every
fused decode-attention kernel must reproduce them. ``runtime/precision.py``
names the precisions a model loads with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

_E4M3_MAX = 448.0
_E2M1_MAX = 6.0
_F32_EXPONENT = 0x7F800000
_F32_MANTISSA = 0x007FFFFF
_F32_MIN_NORMAL = 2.0**-126


def _pow2_ceil(y: mx.array) -> mx.array:
    """Smallest power of two >= y, for positive normal float32 y.

    Adding a full mantissa carries into the exponent unless the mantissa was
    already zero (y a power of two). Exact, unlike float ceil(log2f(y)): for y
    a few ulps above 2^k, log2f rounds to k and gives a scale below y.
    """
    bits = mx.view(y, mx.uint32)
    return mx.view((bits + _F32_MANTISSA) & _F32_EXPONENT, mx.float32)


def _round_e2m1(t: mx.array) -> mx.array:
    """Round |t| <= 6 to E2M1 {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to even code.

    Within a binade the codes are evenly spaced by 2^(exponent - 1), with the
    subnormal step 0.5 below 1; rounding t/step half-to-even picks the even
    code on ties, also across binade edges.
    """
    exponent = mx.view(t, mx.uint32) & _F32_EXPONENT
    step_bits = mx.maximum(exponent, 127 << 23) - (1 << 23)  # 2^(max(e, 0) - 1)
    step = mx.view(step_bits, mx.float32)
    return mx.round(t / step) * step


def _blockwise(
    x: mx.array, block: int, limit: float, floor: float, round_fn: Callable[[mx.array], mx.array]
) -> mx.array:
    """Per block of ``block`` values along the last axis: scale so the block's
    max magnitude fits ``limit`` with a power-of-two scale, round, rescale."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = mx.maximum(mx.abs(blocks).max(axis=-1, keepdims=True), floor)
    scale = _pow2_ceil(amax / limit)
    # The spec clamps blocks/scale to +-limit first. Skipped: scale >= amax/limit
    # up to float32 rounding, and both rounders map values a hair above the
    # limit to the limit, so the clamp can never change a result.
    return (round_fn(blocks / scale) * scale).reshape(x.shape)


def _round_e4m3(t: mx.array) -> mx.array:
    # mx.to_fp8 rounds float32 to nearest E4M3FN, ties to even, subnormals
    # included (checked against an enumeration of all codes in the tests).
    return mx.from_fp8(mx.to_fp8(t), mx.float32)


def fp8_kv_round_trip(x: mx.array, nope: int, block: int = 64) -> mx.array:
    """FP8 (E4M3FN) round trip of the first ``nope`` dims of the last axis,
    per block of ``block`` values; the remaining (RoPE) dims are untouched."""
    if nope % block:
        raise ValueError(f"nope dims ({nope}) must be a multiple of the FP8 block ({block})")
    head = _blockwise(x[..., :nope], block, _E4M3_MAX, 1e-4, _round_e4m3)
    if nope == x.shape[-1]:
        return head
    return mx.concatenate([head, x[..., nope:]], axis=-1)


def indexer_round_trip(x: mx.array, block: int = 32) -> mx.array:
    """Indexer QAT: Walsh-Hadamard over the last axis (a power of two), then an
    FP4 (E2M1) round trip per block of ``block`` values.

    ``mx.hadamard_transform`` on the CPU runs the pairwise butterflies with
    strides 1, 2, 4, ... and then multiplies by float32(1/sqrt(D)): exactly
    ds4's CPU order (spec §3.1 writes the scale as a division). MLX's GPU
    kernels may group the butterflies differently (unverified), which can move
    a value by an ulp before the FP4 rounding.
    """
    rotated = mx.hadamard_transform(x)
    return _blockwise(rotated, block, _E2M1_MAX, _E2M1_MAX * _F32_MIN_NORMAL, _round_e2m1)


def f16_round(x: mx.array) -> mx.array:
    """Round to the nearest float16 and widen back to float32."""
    return x.astype(mx.float16).astype(mx.float32)


@dataclass(frozen=True)
class Rounding:
    """The official inference graph's rounding steps (spec §3.1, §4.3); all off when not ``official``."""

    official: bool
    nope: int  # leading head dims that get the FP8 round trip

    def kv_row(self, x: mx.array) -> mx.array:
        """FP8 on the nope dims, then f16 storage: raw and compressed attention rows."""
        if not self.official:
            return x
        return f16_round(fp8_kv_round_trip(x, self.nope))

    def index_key(self, x: mx.array) -> mx.array:
        return f16_round(indexer_round_trip(x)) if self.official else x

    def index_query(self, x: mx.array) -> mx.array:
        return indexer_round_trip(x) if self.official else x
