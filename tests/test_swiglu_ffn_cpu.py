"""The shared expert (``Backend.swiglu_ffn``, docs/spec/v4-model.md §3.8) as one MLX
primitive with a C++ CPU kernel (kernels/native/mlx_q8.cpp): its three products are the
codes products' own (``q8_matmul`` / ``f16_matmul``, the matrices read as stored) and its
gating is ``rowops.swiglu``'s, so it equals the five-node composition to float32 rounding
and the float64 product of the dequantized matrices to the products' rounding; one node of
a compiled graph; a clear error for bad input. That a whole model decodes the same with it
is tests/test_hc_cpu_primitives.py's model test."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from kernel_data import rel_err
from magnetar.kernels import GGMLType, dequantize, mlx_ext
from magnetar.kernels.base import Backend, QTensor
from magnetar.kernels.cpu import CpuBackend
from magnetar.kernels.quantize import quantize
from magnetar.runtime.lab.graph_nodes import graph_nodes

pytestmark = pytest.mark.usefixtures("on_the_cpu")  # conftest.py


class Stored:
    """A model matrix as the runtime holds it (``runtime.weights.Matrix``'s fields the backend reads)."""

    def __init__(self, rng, rows: int, cols: int, ggml_type: GGMLType, kernels: CpuBackend):
        w = (rng.standard_normal((rows, cols)) * cols ** -0.5).astype(np.float32)
        self.ggml_type, self.kernels = ggml_type, kernels
        if ggml_type == GGMLType.Q8_0:
            self.data = mx.array(quantize(w, GGMLType.Q8_0))
            self.wide = np.asarray(dequantize(self.data, int(GGMLType.Q8_0)), np.float64)
        else:
            self.data = mx.array(w.astype(np.float16))
            self.wide = w.astype(np.float16).astype(np.float64)

    def __call__(self, x):
        return self.kernels.matmul(x, QTensor(mx.view(self.data, mx.uint8), self.ggml_type))


def swiglu64(g, u, limit):
    g = np.minimum(g, limit)
    return g / (1.0 + np.exp(-g)) * np.clip(u, -limit, limit)


@pytest.mark.parametrize("T,D,F,types,strided", [
    (1, 256, 256, "q8_0 q8_0 q8_0", False),  # small's decode step
    (3, 4096, 2048, "q8_0 q8_0 q8_0", False),  # Flash widths, a few prompt rows
    (2, 512, 768, "f16 q8_0 f16", True),  # mixed encodings; x a strided view
], ids=str)
def test_fused_shared_expert_equals_the_composition_as_one_node(T, D, F, types, strided):
    rng = np.random.default_rng([T, D, F])
    kernels = CpuBackend(q8_codes=True, f16_codes=True)
    g_type, u_type, d_type = (GGMLType.Q8_0 if t == "q8_0" else GGMLType.F16 for t in types.split())
    gate, up, down = Stored(rng, F, D, g_type, kernels), Stored(rng, F, D, u_type, kernels), Stored(rng, D, F, d_type,
                                                                                                     kernels)
    x = rng.standard_normal((D, T) if strided else (T, D)).astype(np.float32) * 3
    x = mx.array(x).T if strided else mx.array(x)
    mx.eval(x)  # a transpose stays a strided view: the kernel packs it
    limit = 1.5  # low enough that the clamps bite
    fused = mx.compile(lambda a: kernels.swiglu_ffn(a, gate, up, down, limit))(x)
    assert graph_nodes(fused) == 1 and fused.shape == (T, D)
    composed = Backend.swiglu_ffn(kernels, x, gate, up, down, limit)
    assert rel_err(fused, composed) < 1e-6
    x64 = np.array(x, np.float64)
    want = swiglu64(x64 @ gate.wide.T, x64 @ up.wide.T, limit) @ down.wide.T
    assert rel_err(fused, want) < 1e-5
    clamped = np.abs(x64 @ up.wide.T) > limit
    assert clamped.any() and not clamped.all()
    routed = mx.array(rng.standard_normal((T, D)).astype(np.float32))  # the routed experts' sum
    summed = kernels.swiglu_ffn(x, gate, up, down, limit, plus=routed)
    assert graph_nodes(summed) == 1
    assert np.array_equal(np.array(summed), np.array(routed + fused))


def test_bad_shapes_and_names_are_one_line():
    rng = np.random.default_rng(0)
    q8 = lambda r, c: mx.array(quantize(rng.standard_normal((r, c)).astype(np.float32), GGMLType.Q8_0))
    x = mx.zeros((1, 64))
    with pytest.raises(ValueError, match=r"gate and up must be \[F, D\] and down \[D, F\]"):
        mlx_ext.swiglu_ffn(x, *(QTensor(q8(*s), GGMLType.Q8_0) for s in ((32, 64), (32, 64), (64, 64))), 1.0)
    with pytest.raises(ValueError, match="gate must be Q8_0 blocks"):
        mlx_ext._need().swiglu_ffn(x, q8(32, 64), "q4_k", q8(32, 64), "q8_0", q8(64, 32), "q8_0", 1.0)


def test_matrices_the_codes_products_do_not_read_take_the_composition():
    """Without the Q8_0 codes products the matrices are packed (MLX 8-bit): no fused node."""
    kernels = CpuBackend(q8_codes=False)
    rng = np.random.default_rng(1)
    gate = Stored(rng, 64, 64, GGMLType.Q8_0, CpuBackend(q8_codes=True))
    assert kernels._stored(gate) is None
