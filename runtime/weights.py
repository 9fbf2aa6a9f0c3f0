"""Model weights as MLX arrays over the GGUF's own bytes.

Every matrix keeps its stored encoding: F32 stays f32, F16 stays half (widened
to f32 inside the graph, so the math is f32 like the reference), and blocked
types (Q8_0, Q2_K, Q4_K, IQ2_XXS) stay raw uint8 blocks that
``kernels.dequantize`` expands inside the graph at the point of use, unless
the kernel backend re-lays a matrix once at load (``Backend.pack``: the CPU
keeps Q8_0 as MLX's 8-bit codes, kernels/affine.py, multiplied without
widening). Nothing keeps a dequantized copy of the model; routed experts go to
the kernel backend as raw blocks (``kernels.backend.QTensor``), which the CPU's
native kernels read in place from the file's mapping (``Backend.expert_stack``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from magnetar.kernels import dequantize
from magnetar.kernels.backend import Backend, QTensor

from .gguf_read import ModelFile, TensorInfo
from .layout import GGMLType

_PLAIN = {GGMLType.F32: mx.float32, GGMLType.F16: mx.float16}


def _rows(info: TensorInfo, leading: tuple[int, ...]) -> mx.array:
    """The tensor's bytes as an MLX array shaped ``leading + (row_bytes,)``, or typed for F32/F16."""
    data = np.ascontiguousarray(info.data).reshape(-1)
    if info.ggml_type in _PLAIN:
        return mx.array(data.reshape(*leading, info.shape[0]))
    return mx.array(_stored_bytes(info, leading))


def _stored_bytes(info: TensorInfo, leading: tuple[int, ...]) -> np.ndarray:
    """The tensor's bytes, every type as uint8 rows ``leading + (row_bytes,)``: a view of the
    file's mapping, no copy."""
    return np.ascontiguousarray(info.data).reshape(-1).view(np.uint8).reshape(*leading, -1)


@dataclass(frozen=True)
class Matrix:
    """A weight ``[out, in]``: ``x @ W.T`` without materializing an f32 copy between calls.
    A backend may keep it re-laid instead of as stored (``packed``; then ``data`` is None)."""

    data: mx.array | None
    ggml_type: GGMLType
    kernels: Backend  # multiplies it: the stored encoding, or f32 through the backend's dense product
    packed: Any = None  # what ``kernels.pack`` made of it
    raw: mx.array | None = None  # F16 ``data`` viewed as bytes once at load: no view node per product

    @classmethod
    def load(cls, info: TensorInfo, kernels: Backend, pack: bool = True) -> "Matrix":
        out = int(np.prod(info.shape[1:]))
        if pack and info.ggml_type not in _PLAIN:
            packed = kernels.pack(QTensor(_stored_bytes(info, (out,)), info.ggml_type))
            if packed is not None:
                return cls(None, info.ggml_type, kernels, packed)
        data = _rows(info, (out,))
        if info.ggml_type != GGMLType.F16:
            return cls(data, info.ggml_type, kernels)
        raw = mx.view(data, mx.uint8)
        mx.eval(raw)  # shares data's buffer
        return cls(data, info.ggml_type, kernels, raw=raw)

    def dense(self) -> mx.array:
        if self.packed is not None:
            return self.packed.dequantize()
        if self.ggml_type == GGMLType.F32:
            return self.data
        if self.ggml_type == GGMLType.F16:
            return self.data.astype(mx.float32)
        return dequantize(self.data, int(self.ggml_type))

    def __call__(self, x: mx.array) -> mx.array:
        """``x @ W.T``; x is [T, in] (T = 1 inside the compiled decode step)."""
        if self.packed is not None:
            return self.kernels.matmul(x, self.packed)
        if self.ggml_type == GGMLType.F32:
            return self.kernels.dense(x, self.data.T)
        raw = self.raw if self.raw is not None else mx.view(self.data, mx.uint8)
        return self.kernels.matmul(x, QTensor(raw, self.ggml_type))

    def grouped(self, x: mx.array, groups: int) -> mx.array:
        """``x [T, ...]``, its trailing elements G = ``groups`` slices of ``in / G``: group g's rows
        of W (``out / G`` of them) times slice g -> [T, out]."""
        return self.kernels.grouped_matmul(x, self, groups)

    def dense_product(self, x: mx.array) -> mx.array:
        """``x @ W.T`` with W widened to f32 first, whatever its encoding (small matrices)."""
        return self.kernels.dense(x, self.dense().T)


class Weights:
    """Typed access to a ModelFile's tensors by ds4 name.

    ``expand_budget`` (bytes) lets non-expert matrices be widened to f32 once at load,
    first come first served, until the budget is spent. On the CPU this trades memory
    for speed: an in-graph dequantize is a dozen extra graph nodes per matrix per token,
    and node dispatch is what a decode step costs there. A small model fits in any
    sensible budget; Flash's non-expert weights (29 GB as f32) do not, and stay as stored.
    """

    def __init__(self, model: ModelFile, kernels: Backend, expand_budget: int = 0):
        self.file = model
        self.cfg = model.config
        self.kernels = kernels
        self.expand_left = expand_budget

    def vector(self, name: str) -> mx.array:
        """A small F32/F16 tensor (norm weight, bias, scale, sink, ape) as f32, torch shape."""
        return mx.array(np.asarray(self.file.array(name), dtype=np.float32))

    def matrix(self, name: str) -> Matrix:
        info = self.file.tensors[name]
        wide = int(np.prod(info.shape)) * 4  # bytes as f32
        if info.ggml_type == GGMLType.F32 or wide > self.expand_left or not self.kernels.widens(info.ggml_type):
            return Matrix.load(info, self.kernels)
        self.expand_left -= wide
        m = Matrix(Matrix.load(info, self.kernels, pack=False).dense(), GGMLType.F32, self.kernels)
        mx.eval(m.data)
        return m

    def experts(self, name: str) -> QTensor:
        """A routed-expert stack ``[n_expert, out, in]`` in its stored encoding."""
        info = self.file.tensors[name]
        return QTensor(self.kernels.expert_stack(_stored_bytes(info, (info.shape[2], info.shape[1]))),
                       info.ggml_type)

    def int_table(self, name: str) -> mx.array:
        return mx.array(np.asarray(self.file.array(name), dtype=np.int32))

    def has(self, name: str) -> bool:
        return name in self.file.tensors
