"""Numpy dequantization of raw GGUF rows: the readable oracle.

Block layouts follow docs/spec/v4-model.md §2.4 and docs/spec/quant-kernels.md §1.
Arithmetic is float32 in gguf-py's order, though the order cannot matter: a
scale is an f16 (at most 11 significant bits) times small integers, so every
product here is exact in float32 and only the final K-quant subtraction
rounds. That is why this, the MLX kernels and ``gguf.quants.dequantize``
agree bit for bit.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from gguf.quants import IQ2_XXS as _GGUF_IQ2_XXS

from .host import HostBackend
from .formats import BLOCK, GGMLType, row_blocks


def _iq2xxs_grid() -> np.ndarray:
    """The 256 IQ2_XXS patterns of 8 magnitudes (each 8, 25 or 43), as uint8
    [256, 8]; decoded by the gguf package from its packed copy of ggml's table."""
    _GGUF_IQ2_XXS.init_grid()
    return _GGUF_IQ2_XXS.grid.reshape(256, 8).astype(np.uint8)


def _iq2xxs_signs() -> np.ndarray:
    """Sign bytes for the 128 stored 7-bit indices: the 8th bit is implied and
    makes the number of set bits (negative lanes) even."""
    index = np.arange(128, dtype=np.uint8)
    parity = np.unpackbits(index[:, None], axis=1).sum(axis=1) & 1
    return index | (parity.astype(np.uint8) << 7)


IQ2XXS_GRID = _iq2xxs_grid()
IQ2XXS_SIGNS = _iq2xxs_signs()


def _f16(two_bytes: np.ndarray) -> np.ndarray:
    """Little-endian f16 fields (last axis of 2k bytes) widened to float32."""
    return np.ascontiguousarray(two_bytes).view("<f2").astype(np.float32)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, :2])
    q = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).astype(np.float32)
    return d * q


def _q2_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    # Sub-block s (16 values): low nibble is its scale, high nibble its min.
    dl = (d * (scales & 15).astype(np.float32))[:, :, None]
    ml = (dmin * (scales >> 4).astype(np.float32))[:, :, None]
    # Byte l of half h holds, at shifts 0/2/4/6, values 128h + 32j + l.
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    q = (qs.reshape(n, 2, 1, 32) >> shifts) & 3
    q = q.reshape(n, 16, 16).astype(np.float32)
    return (dl * q - ml).reshape(n, 256)


def _q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins packed in 12 bytes (spec §2.4)."""
    sc = np.empty((len(packed), 8), dtype=np.uint8)
    mn = np.empty_like(sc)
    for j in range(4):
        sc[:, j] = packed[:, j] & 63
        mn[:, j] = packed[:, j + 4] & 63
    for j in range(4, 8):
        sc[:, j] = (packed[:, j + 4] & 15) | ((packed[:, j - 4] >> 6) << 4)
        mn[:, j] = (packed[:, j + 4] >> 4) | ((packed[:, j] >> 6) << 4)
    return sc, mn


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = _q4_k_scales(blocks[:, 4:16])
    dl = (d * sc.astype(np.float32))[:, :, None]
    ml = (dmin * mn.astype(np.float32))[:, :, None]
    # Chunk c (32 bytes): low nibbles are sub-block 2c, high nibbles 2c+1.
    qs = blocks[:, 16:].reshape(n, 4, 1, 32)
    q = (qs >> np.array([0, 4], dtype=np.uint8)[:, None]) & 15
    q = q.reshape(n, 8, 32).astype(np.float32)
    return (dl * q - ml).reshape(n, 256)


def _iq2_xxs_parts(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """d [n, 1], each group's 4-bit scale ls [n, 8], and the signed grid values [n, 8, 4, 8]."""
    n = len(blocks)
    d = _f16(blocks[:, :2])
    # 8 groups of 32 values, each two u32: grid indices, then signs + scale.
    words = np.ascontiguousarray(blocks[:, 2:]).view("<u4").reshape(n, 8, 2)
    grid_words, sign_words = words[..., 0], words[..., 1]
    grid_index = (grid_words[..., None] >> np.array([0, 8, 16, 24], dtype=np.uint32)) & 255
    sign_index = (sign_words[..., None] >> np.array([0, 7, 14, 21], dtype=np.uint32)) & 127
    magnitudes = IQ2XXS_GRID[grid_index].astype(np.int32)  # [n, 8, 4, 8]
    negative = (IQ2XXS_SIGNS[sign_index][..., None] >> np.arange(8, dtype=np.uint8)) & 1
    return d, sign_words >> 28, np.where(negative == 1, -magnitudes, magnitudes)


def _iq2_xxs(blocks: np.ndarray) -> np.ndarray:
    d, ls, signed = _iq2_xxs_parts(blocks)
    db = d * (np.float32(0.5) + ls.astype(np.float32)) * np.float32(0.25)
    return (db[..., None, None] * signed.astype(np.float32)).reshape(len(blocks), 256)


_DEQUANT = {
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q4_K: _q4_k,
    GGMLType.IQ2_XXS: _iq2_xxs,
}


def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """uint8 rows [..., row_bytes] -> float32 values [..., row_elems]."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    lead = raw.shape[:-1]
    qtype, n_blocks = row_blocks(ggml_type, raw.shape[-1])
    per_block, block_bytes = BLOCK[qtype]
    n_elems = n_blocks * per_block
    if qtype == GGMLType.F32:
        return raw.view("<f4").astype(np.float32)
    if qtype == GGMLType.F16:
        return raw.view("<f2").astype(np.float32)
    values = _DEQUANT[qtype](raw.reshape(-1, block_bytes))
    return values.reshape(*lead, n_elems)


# ---------------------------------------------------------------------------
# The oracle's products: dequantize exactly, then multiply in float64.


def _dense(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    return dequantize(raw, ggml_type).astype(np.float64)


def matmul(x: np.ndarray, raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """``x [T, cols] @ W.T`` for raw rows ``W [rows, row_bytes]``: float32 [T, rows]."""
    return (np.asarray(x, np.float64) @ _dense(raw, ggml_type).T).astype(np.float32)


def moe(x: np.ndarray, ids: np.ndarray, weights: np.ndarray, gate: tuple[np.ndarray, int],
        up: tuple[np.ndarray, int], down: tuple[np.ndarray, int], limit: float,
        activations: str = "f32") -> np.ndarray:
    """The routed-expert step (see backend.py), one used expert at a time.

    ``gate``, ``up`` and ``down`` are (raw expert stack [E, rows, row_bytes], type).
    ``activations="q8k"``: the products with Q8K_TYPES weights take their activations
    (x, then each mid row as float32) quantized to Q8_K, as ``native.moe`` does.
    """
    if activations not in ("f32", "q8k"):
        raise ValueError(f"expert activations must be f32 or q8k, got {activations!r}")

    def product(a: np.ndarray, stack: tuple[np.ndarray, int], e: int) -> np.ndarray:
        if activations == "q8k" and row_blocks(stack[1], stack[0].shape[-1])[0] in Q8K_TYPES:
            return matmul_q8k(a.astype(np.float32), stack[0][e], stack[1])
        return a @ _dense(stack[0][e], stack[1]).T

    x = np.asarray(x, np.float64)
    ids = np.asarray(ids)
    out = np.zeros(x.shape, np.float64)
    for e in np.unique(ids):
        t, slot = np.nonzero(ids == e)  # a token listing e twice appears twice
        g = np.minimum(product(x[t], gate, e), limit)
        u = np.clip(product(x[t], up, e), -limit, limit)
        mid = g / (1.0 + np.exp(-g)) * u * np.asarray(weights, np.float64)[t, slot][:, None]
        np.add.at(out, t, product(mid, down, e))
    return out.astype(np.float32)


# ---------------------------------------------------------------------------
# 8-bit activations (Q8_K): the integer arithmetic of ds4's and llama.cpp's CPU expert
# products, and of native.moe(activations="q8k"). Only the activations round; the sums
# below are exact integers times each block's scales.

Q8K_TYPES = (GGMLType.Q2_K, GGMLType.Q4_K, GGMLType.IQ2_XXS)


def quantize_q8k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``x [T, n]`` -> (d float32 [T, n/256], codes int8 [T, n/256, 256]): per 256 values,
    the one of largest magnitude (the first, on ties) becomes -127, the rest round to nearest
    even in float32; a block of zeros gets d = 0, one holding inf or NaN d = NaN."""
    blocks = np.asarray(x, np.float32).reshape(len(x), -1, 256)
    biggest = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[..., None], axis=2)[..., 0]
    finite = np.isfinite(blocks).all(axis=2)
    live = finite & (biggest != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(live, np.float32(-127) / biggest, np.float32(0)).astype(np.float32)
        d = np.where(live, np.float32(1) / iscale, np.where(finite, np.float32(0), np.float32(np.nan)))
        codes = np.minimum(np.rint(iscale[..., None] * np.where(live[..., None], blocks, 0)), 127)
    return d.astype(np.float32), codes.astype(np.int8)


def _q8k_parts(raw: np.ndarray, ggml_type: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a Q8K_TYPES matrix as integers: (w, m [rows, nb, 256] int64, a, b [rows, nb])
    with value = a * w - b * m, so a dot with Q8_K codes q is a * (w . q) - b * (m . q) per block."""
    qtype, nb = row_blocks(ggml_type, raw.shape[-1])
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw, np.uint8).reshape(rows * nb, -1)
    if qtype == GGMLType.IQ2_XXS:
        d, ls, signed = _iq2_xxs_parts(blocks)
        w = (2 * ls.astype(np.int64) + 1)[:, :, None, None] * signed  # value = d/8 * (2 ls + 1) * grid * sign
        a, b, m = d.astype(np.float64) / 8, np.zeros(len(blocks)), np.zeros((len(blocks), 256), np.int64)
    elif qtype == GGMLType.Q2_K:
        scales = blocks[:, :16].astype(np.int64)
        q = ((blocks[:, 16:80].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]) & 3)
        w = (scales & 15)[:, :, None] * q.reshape(-1, 16, 16)
        m = np.repeat(scales >> 4, 16, axis=1)
        a, b = _f16(blocks[:, 80:82])[:, 0], _f16(blocks[:, 82:84])[:, 0]
    elif qtype == GGMLType.Q4_K:
        sc, mn = _q4_k_scales(blocks[:, 4:16])
        q = (blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]) & 15
        w = sc.astype(np.int64)[:, :, None] * q.reshape(-1, 8, 32)
        m = np.repeat(mn.astype(np.int64), 32, axis=1)
        a, b = _f16(blocks[:, 0:2])[:, 0], _f16(blocks[:, 2:4])[:, 0]
    else:
        raise ValueError(f"8-bit activations take {', '.join(t.name for t in Q8K_TYPES)} weights, not {qtype.name}")
    shape = (rows, nb, 256)
    return (w.reshape(shape).astype(np.int64), m.reshape(shape), np.asarray(a, np.float64).reshape(rows, nb),
            np.asarray(b, np.float64).reshape(rows, nb))


def matmul_q8k(x: np.ndarray, raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """``x [T, cols] @ W.T`` with ``x`` quantized to Q8_K first: float64 [T, rows]."""
    d, q = quantize_q8k(x)
    w, m, a, b = _q8k_parts(np.asarray(raw), ggml_type)
    q = q.astype(np.int64)
    wq = np.einsum("rbi,tbi->trb", w, q)  # exact integers
    mq = np.einsum("rbi,tbi->trb", m, q)
    return ((a[None] * wq - b[None] * mq) * d.astype(np.float64)[:, None, :]).sum(axis=2)


# 8-bit activations for Q8_0 matrices (Q8_0 codes, one scale per 32 values): llama.cpp's CPU
# arithmetic for its Q8_0 products, and mlx_ext.q8_matmul(activations="q8_0"). The scale stays
# f32 (llama.cpp rounds it to f16); the code pairs are summed in integers, exactly.

def quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``x [T, n]`` -> (d float32 [T, n/32], codes int8 [T, n/32, 32]): per 32 values
    d = max|x| / 127 and codes = x * (127 / max|x|) rounded to nearest even, in float32; a block
    of zeros gets d = 0, one holding inf or NaN d = NaN (its codes 0)."""
    blocks = np.asarray(x, np.float32).reshape(len(x), -1, 32)
    finite = np.isfinite(blocks).all(axis=2)
    amax = np.where(finite, np.abs(np.where(finite[..., None], blocks, 0)).max(axis=2), 0).astype(np.float32)
    live = amax != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = np.where(live, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        d = np.where(finite, amax / np.float32(127), np.float32(np.nan)).astype(np.float32)
        codes = np.rint(np.where(live[..., None], blocks, 0) * inverse[..., None])
    return d, codes.astype(np.int8)


def matmul_q8_0(x: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """``x [T, cols] @ W.T`` for a Q8_0 matrix as stored, ``x`` rounded by ``quantize_q8_0``
    first: float64 [T, rows], each block's integer sum exact."""
    d, q = quantize_q8_0(x)
    blocks = np.ascontiguousarray(raw, np.uint8).reshape(raw.shape[0], -1, 34)
    w_d = _f16(blocks[:, :, :2])[..., 0].astype(np.float64)
    w_q = blocks[:, :, 2:].view(np.int8).astype(np.int64)
    sums = np.einsum("rbi,tbi->trb", w_q, q.astype(np.int64))  # exact integers
    return (sums * w_d[None] * d.astype(np.float64)[:, None, :]).sum(axis=2)


class ReferenceBackend(HostBackend):
    """The numpy oracle behind the common interface (slow; for tests and checks)."""

    name = "reference"
    host_moe = True
    traceable = False

    def dequantize(self, w, experts=None):
        raw = np.asarray(w.data)
        if experts is not None:
            raw = raw[np.asarray(experts)]
        return mx.array(dequantize(raw, w.ggml_type))

    def matmul(self, x, w):
        return mx.array(matmul(np.asarray(x), np.asarray(w.data), w.ggml_type))

    def moe(self, x, ids, weights, gate, up, down, limit):
        stacks = [(np.asarray(m.data), m.ggml_type) for m in (gate, up, down)]
        return mx.array(moe(np.asarray(x), np.asarray(ids), np.asarray(weights), *stacks, limit))
