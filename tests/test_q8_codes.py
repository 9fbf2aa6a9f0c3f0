"""Decode-sized Q8_0 products straight from the blocks as stored (``mlx_ext.q8_matmul``,
kernels/native/mlx_q8.cpp): one node of MLX's graph, within float32 rounding of the exact
product of the dequantized matrix, for plain and grouped (attention output) products;
and a whole model whose dense Q8_0 weights stay as stored gives the numpy oracle's logits
(issue 16: at Flash widths the dense products were 409-440 ms per layer)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from greedy_run import greedy_run
from magnetar.kernels import GGMLType, dequantize, mlx_ext
from magnetar.kernels.backend import backend
from magnetar.kernels.base import QTensor
from magnetar.kernels.cpu import CpuBackend
from magnetar.kernels.quantize import quantize
from magnetar.runtime import Engine
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.lab.graph_nodes import graph_nodes

RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("on_the_cpu")  # conftest.py


def _q8(rng, rows: int, cols: int) -> np.ndarray:
    """Q8_0 rows with scales over ~9 decades, a zero row (d = 0), codes at +-127, and f16
    subnormal scales (|w| ~ 1e-7 puts d below 2^-14)."""
    w = rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-12, 6, (rows, 1)))
    w[0] = 0.0
    w[1, ::2], w[1, 1::2] = 1e3, -1e3
    w[2] *= 1e-7 / np.abs(w[2]).max()
    return quantize(w.astype(np.float32), GGMLType.Q8_0)


def _grouped(x: np.ndarray, w: np.ndarray, groups: int) -> np.ndarray:
    xg = x.reshape(x.shape[0], groups, -1)
    wg = w.reshape(groups, -1, w.shape[1])
    return np.concatenate([xg[:, g] @ wg[g].T for g in range(groups)], axis=-1)


def _assert_product(got: mx.array, x: np.ndarray, blocks: np.ndarray, groups: int) -> None:
    """Within RTOL of the float64 product of the dequantized matrix (group g's rows against x's
    g-th slice), each output measured against the sum of its terms' magnitudes: float32
    rounding of a dot product is bounded by that, not by the (possibly cancelled) result."""
    w = np.asarray(dequantize(mx.array(blocks), int(GGMLType.Q8_0))).astype(np.float64)
    want = _grouped(x.astype(np.float64), w, groups)
    terms = _grouped(np.abs(x.astype(np.float64)), np.abs(w), groups)
    got = np.asarray(got)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.all(np.abs(got - want) <= RTOL * terms)


@pytest.mark.parametrize("rows,cols,n_tok,groups", [
    (8, 32, 1, 1),  # one block per row
    (96, 512, 3, 1),  # a partial group of tokens (4 share a pass over a row)
    (64, 256, 15, 1),  # the most rows a decode-sized product gets (16 go to the host BLAS)
    (1024, 4096, 1, 1),  # Flash's q_a: large enough to be split over threads
    (64, 512, 2, 8),  # grouped, as the attention output's low rank (8 groups)
    (2048, 1024, 1, 2),  # grouped and split over threads across a group boundary
])
def test_q8_matmul_equals_the_exact_product_of_the_dequantized_matrix(rows, cols, n_tok, groups):
    rng = np.random.default_rng(rows + n_tok)
    blocks = _q8(rng, rows, cols)
    x = rng.standard_normal((n_tok, groups * cols)).astype(np.float32)
    _assert_product(mlx_ext.q8_matmul(mx.array(x), mx.array(blocks), groups=groups), x, blocks, groups)


def test_q8_matmul_reads_strided_inputs():
    """x as a transposed view, and W as every other row of a larger block array."""
    rng = np.random.default_rng(3)
    blocks = _q8(rng, 128, 256)
    x = rng.standard_normal((256, 2)).astype(np.float32)
    _assert_product(mlx_ext.q8_matmul(mx.array(x).T, mx.array(blocks)[::2]), x.T, blocks[::2], 1)


def test_q8_matmul_takes_the_attention_output_as_heads():
    """x [T, heads, head_dim] as the attention leaves it, grouped by whole heads (the decode
    step passes it without a reshape node): the product of the flattened rows, bit for bit,
    also from a strided view of the heads."""
    rng = np.random.default_rng(5)
    blocks = mx.array(_q8(rng, 64, 256))
    heads = rng.standard_normal((2, 8, 64)).astype(np.float32)  # 8 heads of 64 = 2 groups of 256
    flat = mlx_ext.q8_matmul(mx.array(heads.reshape(2, 512)), blocks, groups=2)
    assert np.array_equal(np.array(mlx_ext.q8_matmul(mx.array(heads), blocks, groups=2)), np.array(flat))
    swapped = mx.swapaxes(mx.array(np.ascontiguousarray(heads.swapaxes(1, 2))), 1, 2)  # same values, strided
    mx.eval(swapped)
    assert np.array_equal(np.array(mlx_ext.q8_matmul(swapped, blocks, groups=2)), np.array(flat))


def test_several_products_of_one_x_are_one_node_with_each_products_bits():
    """``codes_matmuls``: the decode attention's projections of its input (Q8_0 and F16 as
    stored, different row counts) in one node, each output bit-equal to its own product."""
    rng = np.random.default_rng(6)
    q8s = [mx.array(_q8(rng, rows, 256)) for rows in (96, 32)]
    f16 = mx.array(rng.standard_normal((40, 256)).astype(np.float16))
    x = mx.array(rng.standard_normal((2, 256)).astype(np.float32))
    mx.eval(x, f16, *q8s)
    ws = [QTensor(q8s[0], GGMLType.Q8_0), QTensor(f16, GGMLType.F16), QTensor(q8s[1], GGMLType.Q8_0)]
    got = mx.compile(lambda v: mlx_ext.codes_matmuls(v, ws))(x)
    assert graph_nodes(*got) == 1
    want = [mlx_ext.q8_matmul(x, q8s[0]), mlx_ext.f16_matmul(x, f16), mlx_ext.q8_matmul(x, q8s[1])]
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.array_equal(np.array(g), np.array(w))
    with pytest.raises(ValueError, match="every matrix must have x's cols"):
        mlx_ext.codes_matmuls(mx.zeros((1, 128)), ws)


def test_q8_matmul_is_one_node_of_a_compiled_graph():
    rng = np.random.default_rng(4)
    blocks = mx.array(_q8(rng, 64, 256))
    x = mx.array(rng.standard_normal((1, 256)).astype(np.float32))
    mx.eval(x, blocks)
    assert graph_nodes(mx.compile(lambda v: mlx_ext.q8_matmul(v, blocks))(x)) == 1


@pytest.mark.parametrize("x_shape,w_shape,groups,what", [
    ((1, 100), (4, 136), 1, "w must be"),  # 100 columns are not whole blocks
    ((1, 64), (4, 34), 1, "w must be"),  # 64 columns are 2 blocks, 68 bytes a row
    ((1, 64), (3, 34), 2, "w must be"),  # 3 rows do not split into 2 groups
    ((1, 64), (4, 34), 3, "x must be"),  # 64 columns do not split into 3 groups
])
def test_q8_matmul_refuses_mismatched_shapes_in_one_line(x_shape, w_shape, groups, what):
    with pytest.raises(ValueError, match=what) as err:
        mlx_ext.q8_matmul(mx.zeros(x_shape), mx.zeros(w_shape, mx.uint8), groups=groups)
    assert "\n" not in str(err.value)


PROMPT = [5, 900, 31, 7, 1200, 64, 3]


def test_a_model_on_q8_codes_gives_the_numpy_oracles_logits(tiny_models):
    """Every dense Q8_0 matrix (attention, shared experts, the head) stays as stored and is
    multiplied by q8_matmul in the decode step; prompt and decoded logits equal the
    ``reference`` backend's (numpy, float32 products of the dequantized weights), with
    nothing widened at load in either."""
    path = tiny_models("q2")
    engine = Engine(open_model(path), 128, expand_budget=0, kernels=CpuBackend())
    layer = engine.model.layers[0]
    q8 = [m for m in (layer.attn.q_a, layer.attn.o_a, *layer.moe.shared, engine.model.output)
          if m.ggml_type == GGMLType.Q8_0]
    assert engine.model.kernels.q8_codes and len(q8) >= 4 and all(m.packed is None for m in q8)
    tokens, logits = greedy_run(engine, PROMPT, 4)
    oracle = Engine(open_model(path), 128, expand_budget=0, kernels=backend("reference"))
    want_tokens, want_logits = greedy_run(oracle, PROMPT, 4)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
