"""magnetar.kernels: operations on raw GGUF weight blocks.

``formats`` holds the one table of GGML types and block sizes (``runtime.layout``
re-exports it); ``reference`` is the numpy oracle; ``dequantize`` here is the
MLX version used at run time; ``backend`` picks an implementation of the kernel
interface in ``base``.

Imports inside the package point one way: implementations import ``formats``
and ``base`` (never this file or the ``backend`` registry), and the registry
imports an implementation only when it is asked for.
"""

from __future__ import annotations

from .dequant import dequantize
from .formats import BLOCK, DEQUANT_TYPES, GGMLType, row_blocks, row_bytes

__all__ = ["BLOCK", "DEQUANT_TYPES", "GGMLType", "dequantize", "row_blocks", "row_bytes"]
