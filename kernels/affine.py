"""Q8_0 matrices as MLX's own 8-bit quantization, for quantized products on the CPU.

A Q8_0 block is 32 int8 codes ``q`` and an f16 scale ``d``: ``w = d * q``. MLX's
affine quantization (``bits=8, group_size=32``) stores unsigned codes ``u`` with a
scale and a bias per group: ``w = scale * u + bias``. With ``u = q + 128``,
``scale = d`` and ``bias = -128 d``, both f32, every weight comes back exactly:
``d * (q + 128)`` has at most 11 + 8 significant bits, so it is exact in f32, and
adding ``-128 d`` leaves ``d * q``, representable, so exact too. ``mx.quantized_matmul``
then multiplies by the codes without widening the matrix: on the CPU the decode
step's dense products stop dequantizing whole matrices every token (issue 16: at
Flash widths that was 409-440 ms per layer). It costs 1.25 bytes per weight against
Q8_0's 1.0625 (f32 scale and bias per 32 codes).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .formats import GGMLType

GROUP = 32
BLOCK_BYTES = 34  # f16 scale + 32 int8 codes


@dataclass(frozen=True)
class AffineQ8:
    """A Q8_0 weight ``[rows, cols]`` laid out for ``mx.quantized_matmul``."""

    codes: mx.array  # uint32 [rows, cols / 4]: four unsigned 8-bit codes each, the first in the low byte
    scales: mx.array  # f32 [rows, cols / 32]
    biases: mx.array  # f32 [rows, cols / 32] = -128 * scales

    ggml_type = GGMLType.Q8_0

    @classmethod
    def of(cls, blocks: np.ndarray) -> "AffineQ8":
        """From Q8_0 rows ``[rows, cols / 32 * 34]`` (uint8, as stored in the GGUF)."""
        rows = blocks.shape[0]
        b = np.ascontiguousarray(blocks).reshape(rows, -1, BLOCK_BYTES)
        d = b[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)
        codes = b[:, :, 2:] ^ np.uint8(0x80)  # int8 q as uint8 q + 128: flip the sign bit, no wider copy
        return cls(mx.array(codes.reshape(rows, -1).view(np.uint32)), mx.array(d), mx.array(d * np.float32(-128)))

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def cols(self) -> int:
        return self.scales.shape[1] * GROUP

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self.biases.nbytes

    def dequantize(self) -> mx.array:
        """The f32 matrix, bit for bit what ``kernels.dequantize`` makes of the Q8_0 blocks."""
        return mx.dequantize(self.codes, self.scales, self.biases, group_size=GROUP, bits=8)

    def matmul(self, x: mx.array) -> mx.array:
        """``x @ W.T`` straight from the codes."""
        return mx.quantized_matmul(x.astype(mx.float32), self.codes, self.scales, self.biases, transpose=True,
                                   group_size=GROUP, bits=8)
