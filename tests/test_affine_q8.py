"""Q8_0 matrices kept as MLX's 8-bit codes on the CPU (kernels/affine.py): the same weights
bit for bit, products from the codes, and a whole model whose dense Q8_0 products no
longer widen their matrices each token, with the logits of the widening path (issue 16)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from greedy_run import greedy_run
from magnetar.kernels import GGMLType, dequantize
from magnetar.kernels.affine import AffineQ8
from magnetar.kernels.backend import QTensor
from magnetar.kernels.cpu import CpuBackend
from magnetar.kernels.quantize import quantize
from magnetar.runtime import Engine
from magnetar.runtime.gguf_read import open_model


def _q8(rng, rows: int, cols: int) -> np.ndarray:
    """Q8_0 rows whose scales span ~9 decades, an all-zero row (d = 0) and extreme codes."""
    w = rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-12, 8, (rows, 1)))
    w[0] = 0.0
    w[1, ::2], w[1, 1::2] = 1e3, -1e3  # codes at +-127 in every block
    return quantize(w.astype(np.float32), GGMLType.Q8_0)


@pytest.mark.parametrize("rows,cols", [(8, 32), (70, 256), (512, 1024)])
def test_the_codes_dequantize_to_the_q8_0_weights_bit_for_bit(rows, cols):
    blocks = _q8(np.random.default_rng(rows), rows, cols)
    packed = AffineQ8.of(blocks)
    want = np.asarray(dequantize(mx.array(blocks), int(GGMLType.Q8_0)))
    got = np.asarray(packed.dequantize())
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert (packed.rows, packed.cols) == (rows, cols) and packed.nbytes == rows * cols * 5 // 4


@pytest.mark.parametrize("n_tok", [1, 3, 20])  # 20: the host BLAS path of a prefill chunk
def test_products_from_the_codes_match_the_widened_matrix(n_tok):
    rng = np.random.default_rng(n_tok)
    blocks = _q8(rng, 96, 512)
    x = mx.array(rng.standard_normal((n_tok, 512)).astype(np.float32))
    kernels = CpuBackend(use_native=False, q8_codes=False)
    packed = kernels.pack(QTensor(blocks, GGMLType.Q8_0))
    got = np.asarray(kernels.matmul(x, packed))
    want = np.asarray(x) @ np.asarray(dequantize(mx.array(blocks), int(GGMLType.Q8_0))).astype(np.float64).T
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


class _Widening(CpuBackend):
    """The CPU backend as it was: Q8_0 kept as blocks and dequantized at each product."""

    def pack(self, w):
        return None


PROMPT = [5, 900, 31, 7, 1200, 64, 3]


def test_a_model_with_packed_q8_0_gives_the_widening_paths_logits(tiny_models):
    """With nothing widened at load (expand budget 0), every dense Q8_0 matrix is packed and
    multiplied from its codes, in the decode graph and in prefill, with the same results."""
    path = tiny_models("q2")
    engine = Engine(open_model(path), 128, expand_budget=0, kernels=CpuBackend(q8_codes=False))
    layer = engine.model.layers[0]
    q8 = [m for m in (layer.attn.q_a, *layer.moe.shared) if m.ggml_type == GGMLType.Q8_0]
    assert q8 and all(isinstance(m.packed, AffineQ8) and m.data is None for m in q8)
    tokens, logits = greedy_run(engine, PROMPT, 4)
    widening = Engine(open_model(path), 128, expand_budget=0, kernels=_Widening(q8_codes=False))
    want_tokens, want_logits = greedy_run(widening, PROMPT, 4)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
