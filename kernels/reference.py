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


def _iq2_xxs(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    d = _f16(blocks[:, :2])
    # 8 groups of 32 values, each two u32: grid indices, then signs + scale.
    words = np.ascontiguousarray(blocks[:, 2:]).view("<u4").reshape(n, 8, 2)
    grid_words, sign_words = words[..., 0], words[..., 1]
    db = d * (np.float32(0.5) + (sign_words >> 28).astype(np.float32)) * np.float32(0.25)
    grid_index = (grid_words[..., None] >> np.array([0, 8, 16, 24], dtype=np.uint32)) & 255
    sign_index = (sign_words[..., None] >> np.array([0, 7, 14, 21], dtype=np.uint32)) & 127
    magnitudes = IQ2XXS_GRID[grid_index].astype(np.float32)  # [n, 8, 4, 8]
    negative = (IQ2XXS_SIGNS[sign_index][..., None] >> np.arange(8, dtype=np.uint8)) & 1
    signs = np.where(negative == 1, np.float32(-1), np.float32(1))
    return (db[..., None, None] * magnitudes * signs).reshape(n, 256)


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
        up: tuple[np.ndarray, int], down: tuple[np.ndarray, int], limit: float) -> np.ndarray:
    """The routed-expert step (see backend.py), one used expert at a time.

    ``gate``, ``up`` and ``down`` are (raw expert stack [E, rows, row_bytes], type).
    """
    x = np.asarray(x, np.float64)
    ids = np.asarray(ids)
    out = np.zeros(x.shape, np.float64)
    for e in np.unique(ids):
        t, slot = np.nonzero(ids == e)  # a token listing e twice appears twice
        g = np.minimum(x[t] @ _dense(gate[0][e], gate[1]).T, limit)
        u = np.clip(x[t] @ _dense(up[0][e], up[1]).T, -limit, limit)
        mid = g / (1.0 + np.exp(-g)) * u * np.asarray(weights, np.float64)[t, slot][:, None]
        np.add.at(out, t, mid @ _dense(down[0][e], down[1]).T)
    return out.astype(np.float32)


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
