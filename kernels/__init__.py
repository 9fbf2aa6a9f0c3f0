"""magnetar.kernels: operations on raw GGUF weight blocks.

Type ids equal GGML's, so ``magnetar.runtime.layout.GGMLType`` members (or
plain ints) can be passed wherever a type is expected. ``reference`` is the
numpy oracle; ``dequantize`` here is the MLX version used at run time.
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


# type -> (elements per block, bytes per block)
BLOCK = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q2_K: (256, 84),
    GGMLType.Q4_K: (256, 144),
    GGMLType.IQ2_XXS: (256, 66),
}


def row_bytes(ggml_type: int, n_elems: int) -> int:
    """Bytes of one row of ``n_elems`` values stored as ``ggml_type``."""
    per_block, block_bytes = BLOCK[GGMLType(ggml_type)]
    if n_elems % per_block:
        raise ValueError(f"a {GGMLType(ggml_type).name} row needs a multiple of {per_block} values, got {n_elems}")
    return n_elems // per_block * block_bytes


from .dequant import dequantize  # noqa: E402  (dequant reads BLOCK above)

__all__ = ["BLOCK", "GGMLType", "dequantize", "row_bytes"]
