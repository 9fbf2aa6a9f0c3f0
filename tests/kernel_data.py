"""Random but realistic weights and activations for kernel tests.

Random bytes are valid blocks of every type once the f16 scale fields are
finite; scales are drawn so decoded weights have an RMS near ``1/sqrt(cols)``,
like a trained layer, which keeps products in a range where a relative error
means something.
"""

from __future__ import annotations

import numpy as np

from magnetar.kernels import BLOCK, GGMLType, reference
from magnetar.kernels.backend import QTensor

# Byte offsets of each block's f16 scale fields (d, and dmin for K-quants).
SCALE_FIELDS = {
    GGMLType.Q8_0: (0,),
    GGMLType.Q2_K: (80, 82),
    GGMLType.Q4_K: (0, 2),
    GGMLType.IQ2_XXS: (0,),
}


def random_weight(rng: np.random.Generator, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """Raw rows ``shape[:-1] + (row_bytes,)`` for logical ``shape = (..., rows, cols)``."""
    qtype = GGMLType(ggml_type)
    cols = shape[-1]
    if qtype in (GGMLType.F32, GGMLType.F16):
        values = rng.standard_normal(shape).astype(np.float32) * cols ** -0.5
        return values.astype(np.float32 if qtype == GGMLType.F32 else np.float16).view(np.uint8)
    per_block, block_bytes = BLOCK[qtype]
    lead = (*shape[:-1], cols // per_block)
    blocks = rng.integers(0, 256, size=(*lead, block_bytes), dtype=np.uint8)
    jitter = rng.uniform(0.5, 1.5, size=(*lead, 1))
    # Decoded values scale with the scale fields together: calibrate on unit scales.
    _set_scales(blocks, qtype, jitter)
    rms = float(np.sqrt(np.mean(reference.dequantize(blocks.reshape(-1, block_bytes), qtype) ** 2)))
    _set_scales(blocks, qtype, jitter * (cols ** -0.5 / rms))
    return blocks.reshape(*shape[:-1], -1)


def _set_scales(blocks: np.ndarray, qtype: GGMLType, scale: np.ndarray) -> None:
    for offset in SCALE_FIELDS[qtype]:
        blocks[..., offset:offset + 2] = scale.astype(np.float16).view(np.uint8)


def random_qtensor(rng: np.random.Generator, ggml_type: int, shape: tuple[int, ...]) -> QTensor:
    return QTensor(random_weight(rng, ggml_type, shape), GGMLType(ggml_type))


def random_routing(rng: np.random.Generator, n_tokens: int, n_experts: int, k: int,
                   repeats: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Expert ids [T, k] (distinct per token unless ``repeats``) and route weights summing to 1.5."""
    if repeats:
        ids = rng.integers(0, n_experts, size=(n_tokens, k))
    else:
        ids = np.argsort(rng.random((n_tokens, n_experts)), axis=1)[:, :k]
    w = rng.random((n_tokens, k)) + 0.1
    return ids.astype(np.int32), (1.5 * w / w.sum(axis=1, keepdims=True)).astype(np.float32)


WEIGHT_TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.Q8_0, GGMLType.Q2_K, GGMLType.Q4_K, GGMLType.IQ2_XXS]
EXPERT_TRIPLES = {  # (gate, up, down) as the recipes store them
    "q2": (GGMLType.IQ2_XXS, GGMLType.IQ2_XXS, GGMLType.Q2_K),
    "q4": (GGMLType.Q4_K, GGMLType.Q4_K, GGMLType.Q4_K),
    "q8": (GGMLType.Q8_0, GGMLType.Q8_0, GGMLType.Q8_0),
    "f16": (GGMLType.F16, GGMLType.F16, GGMLType.F16),
    "f32": (GGMLType.F32, GGMLType.F32, GGMLType.F32),
}


def rel_err(actual, expected) -> float:
    """Largest absolute error over the largest expected magnitude."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def random_moe_case(rng: np.random.Generator, recipe: str, n_tokens: int, k: int, n_experts: int, d_model: int,
                    ffn: int, repeats: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[QTensor]]:
    """Activations, routing and (gate, up, down) experts of ``recipe`` for one expert step."""
    g, u, d = EXPERT_TRIPLES[recipe]
    mats = [random_qtensor(rng, g, (n_experts, ffn, d_model)), random_qtensor(rng, u, (n_experts, ffn, d_model)),
            random_qtensor(rng, d, (n_experts, d_model, ffn))]
    x = (rng.standard_normal((n_tokens, d_model)) * 6).astype(np.float32)  # large: the clamp at 10 bites
    ids, w = random_routing(rng, n_tokens, n_experts, k, repeats)
    return x, ids, w, mats


def reference_moe(x: np.ndarray, ids: np.ndarray, w: np.ndarray, mats: list[QTensor], limit: float) -> np.ndarray:
    return reference.moe(x, ids, w, *[(m.data, m.ggml_type) for m in mats], limit)


def weighted_rel_err(x: np.ndarray, q: np.ndarray, imp: np.ndarray) -> float:
    """docs/spec/quant-kernels.md §3.4's metric: sum imp (x - q)^2 / sum imp x^2."""
    x = x.astype(np.float64)
    return float((imp * (x - q) ** 2).sum() / (imp * x * x).sum())
