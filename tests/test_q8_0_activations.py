"""Q8_0 activations for the decode-sized Q8_0 products (``--expert-act q8``; llama.cpp's CPU
arithmetic for them): ``mlx_ext.q8_matmul(activations="q8_0")`` rounds x per 32 values exactly
as ``reference.quantize_q8_0`` does and sums each block's code pairs in integers, so its
products are the numpy reference's (``reference.matmul_q8_0``) up to float32 summation; the
several-products and shared-expert nodes take the same mode; an engine in mode ``q8`` decodes
with them (and its prefill-sized products keep f32), and where they cannot run it says so."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from greedy_run import greedy_run
from magnetar.kernels import GGMLType, dequantize, mlx_ext, reference
from magnetar.kernels.base import QTensor
from magnetar.kernels.quantize import quantize
from magnetar.runtime import Engine, UsageError
from test_q8_codes import _q8

pytestmark = [pytest.mark.usefixtures("on_the_cpu"),  # conftest.py
              pytest.mark.skipif(not mlx_ext.available(), reason="the MLX extension does not build here")]


def _want(x: np.ndarray, blocks: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's product (group g's rows against x's g-th slice) and, per output, the sum
    of its terms' magnitudes (what float32 summation error is bounded by)."""
    xs, ws = np.split(x, groups, axis=1), np.split(blocks, groups, axis=0)
    want = np.concatenate([reference.matmul_q8_0(xg, wg) for xg, wg in zip(xs, ws)], axis=1)
    d, q = reference.quantize_q8_0(x)
    x_abs = np.abs(q.astype(np.float64) * d[..., None]).reshape(x.shape)
    w_abs = np.abs(np.asarray(dequantize(mx.array(blocks), int(GGMLType.Q8_0))).astype(np.float64))
    terms = np.concatenate([xg @ wg.T for xg, wg in zip(np.split(x_abs, groups, axis=1),
                                                       np.split(w_abs, groups, axis=0))], axis=1)
    return want, terms


@pytest.mark.parametrize("rows,cols,n_tok,groups", [
    (8, 32, 1, 1),  # one block per row
    (96, 96, 3, 1),  # an odd number of blocks; a partial group of tokens (4 share a pass over a row)
    (64, 256, 15, 1),  # the most rows a decode-sized product gets
    (1024, 4096, 1, 1),  # Flash's q_a: split over threads
    (64, 512, 2, 8),  # grouped, as the attention output's low rank
])
def test_q8_0_activations_give_the_references_integer_sums(rows, cols, n_tok, groups):
    rng = np.random.default_rng(rows + cols)
    blocks = _q8(rng, rows, cols)  # scales over ~9 decades, a zero row, codes at +-127, subnormal scales
    x = (rng.standard_normal((n_tok, groups * cols)) * np.exp(rng.uniform(-8, 8, (n_tok, 1)))).astype(np.float32)
    if groups * cols > 32:
        x[0, :32] = 0.0  # a block of zeros: d = 0
    got = np.asarray(mlx_ext.q8_matmul(mx.array(x), mx.array(blocks), groups=groups, activations="q8_0"))
    want, terms = _want(x, blocks, groups)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.all(np.abs(got - want) <= 1e-5 * terms)
    f32 = np.asarray(mlx_ext.q8_matmul(mx.array(x), mx.array(blocks), groups=groups))
    live = terms > 0
    assert np.median(np.abs(f32 - got)[live] / terms[live]) > 1e-5  # the activations did round


def _unit_rows(cols: int) -> np.ndarray:
    """Q8_0 rows e_i (code 1, scale 1 in block i // 32): row i's product is x's i-th value as
    Q8_0 activations, d * q, a single exact float32 product."""
    blocks = np.zeros((cols, cols // 32, 34), np.uint8)
    for i in range(cols):
        blocks[i, i // 32, :2] = np.frombuffer(np.float16(1).tobytes(), np.uint8)
        blocks[i, i // 32, 2 + i % 32] = 1
    return blocks.reshape(cols, -1)


def test_the_rounding_is_the_references_bit_for_bit():
    """Ties go to even, the largest value becomes +-127 and a block of zeros stays zero, as in
    ``reference.quantize_q8_0``; a token holding inf or NaN comes out NaN in every output, as its
    f32 product does (a zero weight times inf)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    x[0, 32:64] = np.arange(32) - 15.5  # halves: 127 / 16.5 * (k + 0.5) lands near ties
    x[0, 64:96] = 0.0
    x[0, 96:128] = np.arange(32) - 15.5  # max |x| 127 makes the step 1: exact ties, to even
    x[0, 96] = 127
    x[1, 5], x[1, 40] = np.inf, np.nan
    unit = _unit_rows(256)
    got = np.asarray(mlx_ext.q8_matmul(mx.array(x), mx.array(unit), activations="q8_0"))
    d, q = reference.quantize_q8_0(x)
    assert np.array_equal(got[0], (q[0].astype(np.float32) * d[0, :, None]).reshape(-1))
    assert not got[0, 64:96].any() and np.abs(q).max() == 127 and np.isnan(d[1, :2]).all()
    assert list(got[0, 111:115]) == [0, 0, 2, 2]  # -0.5, 0.5, 1.5, 2.5
    assert np.isnan(got[1]).all() and np.isnan(reference.matmul_q8_0(x, unit)[1]).all()
    assert np.isnan(np.asarray(mlx_ext.q8_matmul(mx.array(x), mx.array(unit)))[1]).all()


def test_the_several_products_and_the_shared_expert_take_the_mode():
    rng = np.random.default_rng(6)
    q8s = [mx.array(_q8(rng, rows, 256)) for rows in (96, 32)]
    f16 = mx.array(rng.standard_normal((40, 256)).astype(np.float16))
    x = mx.array(rng.standard_normal((2, 256)).astype(np.float32))
    ws = [QTensor(q8s[0], GGMLType.Q8_0), QTensor(f16, GGMLType.F16), QTensor(q8s[1], GGMLType.Q8_0)]
    got = mlx_ext.codes_matmuls(x, ws, "q8_0")
    want = [mlx_ext.q8_matmul(x, q8s[0], activations="q8_0"), mlx_ext.f16_matmul(x, f16),  # F16 keeps f32
            mlx_ext.q8_matmul(x, q8s[1], activations="q8_0")]
    for g, w in zip(got, want):
        assert np.array_equal(np.array(g), np.array(w))

    D, F, limit = 256, 512, 10.0
    gate, up, down = (quantize(rng.standard_normal(shape).astype(np.float32) / 8, GGMLType.Q8_0)
                      for shape in ((F, D), (F, D), (D, F)))
    stored = [QTensor(mx.array(m), GGMLType.Q8_0) for m in (gate, up, down)]
    xs = rng.standard_normal((3, D)).astype(np.float32)
    got = np.asarray(mlx_ext.swiglu_ffn(mx.array(xs), *stored, limit, activations="q8_0"))
    g = np.minimum(reference.matmul_q8_0(xs, gate), limit)
    mid = g / (1 + np.exp(-g)) * np.clip(reference.matmul_q8_0(xs, up), -limit, limit)
    want = reference.matmul_q8_0(mid.astype(np.float32), down)
    f32 = np.asarray(mlx_ext.swiglu_ffn(mx.array(xs), *stored, limit))
    scale = np.linalg.norm(want, axis=1)
    # the mids are rounded from the kernel's own gate and up (float32, not float64), so a code
    # may land one step apart: a few 1e-4 of the output, against the f32 mode's ~5e-3
    assert np.all(np.linalg.norm(got - want, axis=1) <= 1e-3 * scale)
    assert np.all(np.linalg.norm(f32 - got, axis=1) > 1e-3 * scale)
    with pytest.raises(ValueError, match="activations must be 'f32' or 'q8_0', got 'q4'"):
        mlx_ext.codes_matmuls(x, ws, "q4")


PROMPTS = [[int(v) for v in np.random.default_rng(seed).integers(3, 100000, 7)] for seed in range(8)]


@pytest.fixture(scope="module")
def engines(tiny_models) -> dict[str, Engine]:
    return {mode: Engine.load(tiny_models("q2"), ctx=256, expert_activations=mode) for mode in ("q8k", "q8")}


def test_an_engine_in_mode_q8_decodes_with_q8_0_activations(engines):
    """Mode q8 is q8k plus the Q8_0 products' rounding: a 7-token prompt's products are
    decode-sized, and its logits move by that rounding (as q8k's move from f32's); so does a
    compiled decode step's after the same token. A prefill-sized chunk (16 rows or more) keeps
    f32 products: its logits are q8k's bit for bit."""
    assert engines["q8"].model.kernels._q8_activations == "q8_0"
    prompt_rel, step_rel = [], []
    for prompt in PROMPTS:
        q8k_tokens, q8k_logits = greedy_run(engines["q8k"], prompt, 1)
        q8_tokens, q8_logits = greedy_run(engines["q8"], prompt, 1)
        rel = [np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(q8_logits, q8k_logits)]
        prompt_rel.append(rel[0])
        if q8_tokens == q8k_tokens:
            step_rel.append(rel[1])
    # Measured on 30 such prompts: median 3.4e-2 (2.7e-2..0.15); q8k against f32: median 2.1e-2
    # (1.6e-2..0.19). A random tiny model amplifies any rounding: its top-1 margins are tiny.
    assert 5e-3 < np.median(prompt_rel) < 8e-2
    assert step_rel and min(step_rel) > 1e-3
    prompt = [int(v) for v in np.random.default_rng(1).integers(3, 1000, 24)]
    assert np.array_equal(engines["q8"].logits(prompt), engines["q8k"].logits(prompt))


def test_q8_where_its_products_cannot_run_is_a_one_line_error(tiny_models, monkeypatch):
    monkeypatch.setenv("MAGNETAR_MLX_EXT", "0")
    with pytest.raises(UsageError, match="MLX extension's Q8_0 products, which are off") as err:
        Engine.load(tiny_models("q2"), ctx=64, expert_activations="q8")
    assert "\n" not in str(err.value) and "--expert-act f32" in str(err.value)
