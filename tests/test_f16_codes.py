"""Decode-sized products with F16 matrices straight from the values as stored
(``mlx_ext.f16_matmul``, kernels/native/mlx_q8.cpp): one node of MLX's graph, within float32
rounding of the exact product, for any column count, strided inputs and grouped products;
and whole models whose F16 matrices stay as stored give the numpy oracle's logits.

Why (issue 16): the compressors, the indexer's q_b and proj and the router are F16. Widened
to f32 at load, MLX's f32 matvec reads them at ~4 GB/s on a 2-core EPYC VM; widened per token,
2-5x slower still. At Flash widths, one token, a compiled call and its eval (~0.1 ms of it
fixed): W [1024, 4096] 0.64 ms against 4.3 for the f32 matvec of the widened matrix,
[8192, 1024] 0.88 against 8.0, [256, 4096] 0.29 against 1.1, [64, 4096] 0.13 against 0.32."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from greedy_run import greedy_run
from magnetar.kernels import GGMLType, mlx_ext
from magnetar.kernels.backend import backend
from magnetar.kernels.cpu import CpuBackend
from magnetar.runtime import Engine
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.lab.graph_nodes import graph_nodes

RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("on_the_cpu")  # conftest.py


def _f16(rng, rows: int, cols: int) -> np.ndarray:
    """F16 rows over ~9 decades, a zero row, a row at the f16 maximum and a subnormal row."""
    w = rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-12, 6, (rows, 1)))
    w[0] = 0.0
    if rows > 2:
        w[1, ::2], w[1, 1::2] = 65504.0, -65504.0
        w[2] = rng.standard_normal(cols) * 1e-6  # below 2^-14: subnormal halves
    return w.astype(np.float16)


def _grouped(x: np.ndarray, w: np.ndarray, groups: int) -> np.ndarray:
    xg = x.reshape(x.shape[0], groups, -1)
    wg = w.reshape(groups, -1, w.shape[1])
    return np.concatenate([xg[:, g] @ wg[g].T for g in range(groups)], axis=-1)


def _assert_product(got: mx.array, x: np.ndarray, w: np.ndarray, groups: int = 1) -> None:
    """Within RTOL of the float64 product (group g's rows against x's g-th slice), each output
    measured against the sum of its terms' magnitudes: float32 rounding of a dot product is
    bounded by that, not by the (possibly cancelled) result."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    want, terms = _grouped(x64, w64, groups), _grouped(np.abs(x64), np.abs(w64), groups)
    got = np.asarray(got)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.all(np.abs(got - want) <= RTOL * terms)


@pytest.mark.parametrize("rows,cols,n_tok,groups", [
    (8, 8, 1, 1),  # one 8-value step per row
    (5, 37, 3, 1),  # odd columns: 32 in steps, 5 after them
    (3, 5, 2, 1),  # fewer columns than one step
    (33, 1001, 4, 1),  # a full group of tokens (4 share a pass over a row), odd columns
    (64, 256, 15, 1),  # the most rows a decode-sized product gets (16 go to the host BLAS)
    (7, 100, 5, 1),  # a full group of tokens and one more
    (1024, 4096, 1, 1),  # the compressors at Flash widths: split over threads
    (8192, 1024, 2, 1),  # the indexer's q_b at Flash widths
    (64, 96, 2, 8),  # grouped, as the attention output's low rank in an F16 model
])
def test_f16_matmul_equals_the_exact_product(rows, cols, n_tok, groups):
    rng = np.random.default_rng(rows + cols + n_tok)
    w = _f16(rng, rows, cols)
    x = rng.standard_normal((n_tok, groups * cols)).astype(np.float32)
    _assert_product(mlx_ext.f16_matmul(mx.array(x), mx.array(w), groups=groups), x, w, groups)


def test_f16_matmul_takes_the_matrix_as_its_bytes():
    """runtime/weights.py hands an F16 matrix over as uint8 rows of 2 * cols bytes."""
    rng = np.random.default_rng(1)
    w = _f16(rng, 40, 77)
    x = rng.standard_normal((3, 77)).astype(np.float32)
    as_values = np.asarray(mlx_ext.f16_matmul(mx.array(x), mx.array(w)))
    as_bytes = np.asarray(mlx_ext.f16_matmul(mx.array(x), mx.array(w.view(np.uint8))))
    assert np.array_equal(as_values, as_bytes)
    _assert_product(mx.array(as_bytes), x, w)


def test_f16_matmul_reads_strided_inputs():
    """x as a transposed view; W as every other row, and as a column window at an odd offset."""
    rng = np.random.default_rng(3)
    w = _f16(rng, 128, 300)
    x = rng.standard_normal((300, 2)).astype(np.float32)
    _assert_product(mlx_ext.f16_matmul(mx.array(x).T, mx.array(w)[::2]), x.T, w[::2])
    xw = np.ascontiguousarray(x.T[:, :41])
    _assert_product(mlx_ext.f16_matmul(mx.array(xw), mx.array(w)[:, 3:44]), xw, w[:, 3:44])


def test_f16_matmul_is_one_node_of_a_compiled_graph():
    rng = np.random.default_rng(4)
    w = mx.array(_f16(rng, 64, 256))
    x = mx.array(rng.standard_normal((1, 256)).astype(np.float32))
    mx.eval(x, w)
    assert graph_nodes(mx.compile(lambda v: mlx_ext.f16_matmul(v, w))(x)) == 1


@pytest.mark.parametrize("x_shape,w_shape,w_dtype,groups,what", [
    ((1, 64), (4, 64), mx.float32, 1, "w must be"),  # f32 is not F16
    ((1, 64), (4, 127), mx.uint8, 1, "w must be"),  # bytes of 63.5 values
    ((1, 64), (4, 65), mx.float16, 1, "w must be"),  # columns disagree with x
    ((1, 64), (3, 32), mx.float16, 2, "w must be"),  # 3 rows do not split into 2 groups
    ((1, 64), (4, 21), mx.float16, 3, "x must be"),  # 64 columns do not split into 3 groups
    ((64,), (4, 64), mx.float16, 1, "x must be"),  # one token is still a row
])
def test_f16_matmul_refuses_mismatched_shapes_in_one_line(x_shape, w_shape, w_dtype, groups, what):
    with pytest.raises(ValueError, match=what) as err:
        mlx_ext.f16_matmul(mx.zeros(x_shape), mx.zeros(w_shape, w_dtype), groups=groups)
    assert "\n" not in str(err.value)


PROMPT = [5, 900, 31, 7, 1200, 64, 3, 77, 410, 8, 19, 2048, 6, 600, 42, 11, 93, 1500, 2, 350,
          12, 88, 731, 4, 66, 1999, 15, 240, 9, 505, 37, 1024, 81, 14, 700, 23, 3000, 58, 1, 260]  # 40:
# the ratio-4 layers hold 10 compressed rows, more than tiny's top-k of 8, so the indexer selects
# (from q_b's and proj's products). In "reference" precision: the official one rounds KV rows
# through FP8 / FP4, where a last-bit difference of any product can flip a rounding (1e-4 apart
# at this length with every matrix widened to f32 at load, as before f16_matmul).
PRECISION = "reference"


def _engine(path, kernels) -> Engine:
    return Engine(open_model(path), 128, precision=PRECISION, kernels=kernels)


def _decodes_like_the_oracle(path, engine: Engine) -> None:
    tokens, logits = greedy_run(engine, PROMPT, 4)
    oracle = Engine(open_model(path), 128, precision=PRECISION, expand_budget=0, kernels=backend("reference"))
    want_tokens, want_logits = greedy_run(oracle, PROMPT, 4)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


def test_a_q2_model_keeps_its_f16_matrices_as_stored_and_gives_the_oracles_logits(tiny_models):
    """The compressors', the indexer's and the router's F16 matrices stay F16 even with the CPU's
    whole expand budget to spend, and the decode step multiplies them with f16_matmul."""
    path = tiny_models("q2")
    engine = _engine(path, CpuBackend())
    attn = engine.model.layers[2].attn  # ratio 4: a compressor and an indexer
    f16 = [attn.compressor.kv, attn.compressor.gate, attn.indexer.q_b, attn.indexer.proj,
           attn.indexer.compressor.kv, engine.model.layers[0].moe.router]
    assert engine.model.kernels.f16_codes
    assert all(m.ggml_type == GGMLType.F16 and m.data.dtype == mx.float16 for m in f16)
    _decodes_like_the_oracle(path, engine)


def test_the_heads_f16_mix_matrix_is_widened_once_at_load(tiny_models):
    """The output head's hyper-connection mix matrix (``output_hc_fn``, F16) goes to MLX's f32
    product, not to ``f16_matmul``: ``Model`` widens it once at load to exactly the stored values,
    the product the decode step made when it widened it per token (one node per token fewer,
    tests/test_bench_nodes.py's budgets)."""
    path = tiny_models("q2")
    stored = open_model(path).array("output_hc_fn.weight")
    head_fn = _engine(path, CpuBackend()).model.head_fn
    assert stored.dtype == np.float16 and head_fn.dtype == mx.float32
    assert np.array_equal(np.asarray(head_fn), stored.astype(np.float32))


def test_an_f16_model_decodes_every_dense_product_from_the_values_as_stored(tiny_models):
    """In the f16 recipe every dense matrix is F16: the projections, the grouped attention
    output (``grouped_matmul``) and the output head (``logits_head``) too."""
    path = tiny_models("f16")
    engine = _engine(path, CpuBackend())
    layer = engine.model.layers[0]
    dense = [layer.attn.q_a, layer.attn.o_a, *layer.moe.shared, engine.model.output]
    assert all(m.ggml_type == GGMLType.F16 for m in dense)
    _decodes_like_the_oracle(path, engine)
