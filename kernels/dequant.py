"""MLX dequantization of raw GGUF rows, built from plain array ops.

Same contract and bits as ``reference.dequantize``. No numpy, Python loops
over blocks or evaluation at call time, so it traces inside ``mx.compile``
and works on gathered expert slices (``mx.take(raw, ids, axis=0)``). It runs
every decode step, so each type is a handful of reshapes, shifts and one
broadcast multiply; constant tables are built once at import.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .formats import BLOCK, GGMLType, row_blocks
from .reference import IQ2XXS_GRID, IQ2XXS_SIGNS


def _signed_iq2_table() -> mx.array:
    """IQ2_XXS lanes for every (grid index, sign index) pair: row 128*g + s
    holds 0.25 * grid[g] with the signs of sign byte s applied. Folding the
    0.25 and the signs in keeps the result exact (see reference's note)."""
    negative = (IQ2XXS_SIGNS[:, None] >> np.arange(8, dtype=np.uint8)) & 1
    signs = np.where(negative == 1, -1.0, 1.0)  # [128, 8]
    table = 0.25 * IQ2XXS_GRID[:, None, :] * signs[None, :, :]  # [256, 128, 8]
    return mx.array(table.reshape(256 * 128, 8).astype(np.float32))


_IQ2_TABLE = _signed_iq2_table()
_NIBBLE_SHIFTS = mx.array([[0], [4]], dtype=mx.uint8)  # [2, 1]
_CRUMB_SHIFTS = mx.array([[0], [2], [4], [6]], dtype=mx.uint8)  # [4, 1]
_IQ2_SIGN_SHIFTS = mx.array([0, 7, 14, 21], dtype=mx.uint32)


def _f16(two_bytes: mx.array) -> mx.array:
    """Little-endian f16 fields (last axis of 2k bytes) widened to float32."""
    return mx.view(two_bytes, mx.float16).astype(mx.float32)


def _q8_0(blocks: mx.array) -> mx.array:
    d = _f16(blocks[..., :2])
    return d * mx.view(blocks[..., 2:], mx.int8).astype(mx.float32)


def _q2_k(blocks: mx.array) -> mx.array:
    lead = blocks.shape[:-1]
    # [..., 2, 16]: row 0 the scale nibbles, row 1 the min nibbles, times
    # (d, dmin) -> per-sub-block d*sc and dmin*m in one multiply.
    nibbles = (blocks[..., None, :16] >> _NIBBLE_SHIFTS) & 15
    coef = _f16(blocks[..., 80:84])[..., None] * nibbles.astype(mx.float32)
    # Byte l of half h holds, at shifts 0/2/4/6, values 128h + 32j + l.
    q = (blocks[..., 16:80].reshape(*lead, 2, 1, 32) >> _CRUMB_SHIFTS) & 3
    q = q.reshape(*lead, 16, 16).astype(mx.float32)
    return coef[..., 0, :, None] * q - coef[..., 1, :, None]


def _q4_k(blocks: mx.array) -> mx.array:
    lead = blocks.shape[:-1]
    # Bytes 4..11 as [2, 4]: low 6 bits are sc0-3 (row 0) and m0-3 (row 1);
    # their top 2 bits extend the 4-bit halves of bytes 12..15 into
    # sc4-7 (low nibbles) and m4-7 (high nibbles).
    low = blocks[..., 4:12].reshape(*lead, 2, 4)
    high = ((blocks[..., None, 12:16] >> _NIBBLE_SHIFTS) & 15) | ((low >> 6) << 4)
    packed = mx.concatenate([low & 63, high], axis=-1)  # [..., 2, 8]
    coef = _f16(blocks[..., 0:4])[..., None] * packed.astype(mx.float32)
    # Chunk c (32 bytes): low nibbles are sub-block 2c, high nibbles 2c+1.
    q = (blocks[..., 16:].reshape(*lead, 4, 1, 32) >> _NIBBLE_SHIFTS) & 15
    q = q.reshape(*lead, 8, 32).astype(mx.float32)
    return coef[..., 0, :, None] * q - coef[..., 1, :, None]


def _iq2_xxs(blocks: mx.array) -> mx.array:
    lead = blocks.shape[:-1]
    groups = blocks[..., 2:].reshape(*lead, 8, 8)  # 4 grid bytes, then a u32
    sign_word = mx.view(groups[..., 4:], mx.uint32)  # [..., 8, 1]
    # d * (0.5 + scale nibble); the table carries the 0.25.
    db = _f16(blocks[..., :2])[..., None] * ((sign_word >> 28).astype(mx.float32) + 0.5)
    sign_index = (sign_word >> _IQ2_SIGN_SHIFTS) & 127  # [..., 8, 4]
    row = (groups[..., :4].astype(mx.uint32) << 7) | sign_index
    lanes = mx.take(_IQ2_TABLE, row, axis=0)  # [..., 8, 4, 8]
    return db[..., None] * lanes


_DEQUANT = {
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q4_K: _q4_k,
    GGMLType.IQ2_XXS: _iq2_xxs,
}


def dequantize(raw: mx.array, ggml_type: int) -> mx.array:
    """uint8 rows [..., row_bytes] -> float32 values [..., row_elems]."""
    lead = raw.shape[:-1]
    qtype, n_blocks = row_blocks(ggml_type, raw.shape[-1])
    per_block, block_bytes = BLOCK[qtype]
    if qtype == GGMLType.F32:
        return mx.view(raw, mx.float32)
    if qtype == GGMLType.F16:
        return _f16(raw)
    values = _DEQUANT[qtype](raw.reshape(*lead, n_blocks, block_bytes))
    return values.reshape(*lead, n_blocks * per_block)
