"""GGML weight types and block sizes: the project's one table of them.

Type ids equal GGML's; plain ints work wherever a type is expected.
``runtime.layout`` and the package's ``__init__`` re-export it.
"""

from __future__ import annotations

from enum import IntEnum


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q8_0 = 8
    Q2_K = 10
    Q4_K = 12
    IQ2_XXS = 16
    I32 = 26  # the hash-routing table; integers, never dequantized


# type -> (elements per block, bytes per block)
BLOCK = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q2_K: (256, 84),
    GGMLType.Q4_K: (256, 144),
    GGMLType.IQ2_XXS: (256, 66),
    GGMLType.I32: (1, 4),
}

# The weight encodings ``dequantize`` expands to float32.
DEQUANT_TYPES = tuple(t for t in GGMLType if t != GGMLType.I32)


def row_bytes(ggml_type: int, n_elems: int) -> int:
    """Bytes of one row of ``n_elems`` values stored as ``ggml_type``."""
    per_block, block_bytes = BLOCK[GGMLType(ggml_type)]
    if n_elems % per_block:
        raise ValueError(f"a {GGMLType(ggml_type).name} row needs a multiple of {per_block} values, got {n_elems}")
    return n_elems // per_block * block_bytes


def row_blocks(ggml_type: int, n_bytes: int) -> tuple[GGMLType, int]:
    """The type and block count of a row of ``n_bytes``; ValueError unless a whole number of weight blocks."""
    qtype = GGMLType(ggml_type)
    if qtype not in DEQUANT_TYPES:
        raise ValueError(f"{qtype.name} holds integers, not weights to dequantize")
    block_bytes = BLOCK[qtype][1]
    if n_bytes % block_bytes:
        raise ValueError(f"{qtype.name} rows must be a multiple of {block_bytes} bytes, got {n_bytes}")
    return qtype, n_bytes // block_bytes
