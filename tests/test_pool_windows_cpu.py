"""A prefill chunk's compressor pooling as one CPU primitive (``mlx_ext.pool_windows``,
``Backend.pool_windows``): every closed window's per-dimension softmax over its slots, with
the MLX ops' bits (``attention_decode.pool_windows``, whose exp is MLX's own polynomial, not
libm's) at tiny and Flash widths, both window kinds, as one node."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from magnetar.kernels import mlx_ext
from magnetar.kernels.attention_decode import pool_windows
from magnetar.kernels.cpu import CpuBackend
from magnetar.runtime import Engine
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.kv_state import EMPTY, KVState
from magnetar.runtime.lab.graph_nodes import graph_nodes

pytestmark = [pytest.mark.usefixtures("on_the_cpu"),
              pytest.mark.skipif(not mlx_ext.available(), reason="no MLX CPU extension")]


def slots(rng, T: int, dim: int, ratio: int, spread: float = 30.0) -> tuple[mx.array, mx.array]:
    """A chunk's kv and scores as Compressor.prefill hands them over: for ratio 4 the four frontier
    slots before the chunk lead (EMPTY scores at a sequence's start), and some EMPTY scores inside."""
    lead = 4 if ratio == 4 else 0
    width = (2 if ratio == 4 else 1) * dim
    kv = rng.standard_normal((lead + T, width)).astype(np.float32) * 3
    sc = (rng.standard_normal((lead + T, width)) * spread).astype(np.float32)
    sc[:lead] = EMPTY
    sc[rng.random(sc.shape) < 0.02] = EMPTY
    return mx.array(kv), mx.array(sc)


def bits(a: mx.array) -> np.ndarray:
    return np.array(a).view(np.uint32)


# (tokens, dim, ratio): small's and Flash's compressors and indexer, a dim with a tail past 8 lanes
CASES = [(512, 128, 4), (300, 128, 128), (256, 512, 4), (300, 512, 128), (37, 36, 4), (260, 36, 128)]


@pytest.mark.parametrize("T,dim,ratio", CASES, ids=str)
def test_pool_windows_gives_the_mlx_ops_bits_as_one_node(T, dim, ratio):
    rng = np.random.default_rng([T, dim, ratio])
    kv, sc = slots(rng, T, dim, ratio)
    n = T // ratio
    want = pool_windows(kv, sc, n, ratio, dim)
    got = CpuBackend().pool_windows(kv, sc, n, ratio, dim)
    assert graph_nodes(got) == 1
    assert got.shape == (n, dim)
    assert np.array_equal(bits(got), bits(want))


def test_scores_at_the_ends_of_exp_round_as_mlx_does():
    """Scores far apart (exp's 0 below -88), an infinite score (the window's max: inf - inf is
    NaN there, as in the MLX ops) and a NaN pass through the same steps."""
    rng = np.random.default_rng(7)
    kv, sc = slots(rng, 64, 64, 4, spread=150.0)
    sc = np.array(sc)
    sc[10, 3], sc[20, 70], sc[30, 5] = np.inf, -np.inf, np.nan
    sc = mx.array(sc)
    want, got = pool_windows(kv, sc, 16, 4, 64), mlx_ext.pool_windows(kv, sc, 16, 4, 64)
    assert np.isnan(np.array(want)).any()
    assert np.array_equal(np.array(got), np.array(want), equal_nan=True)
    finite = np.isfinite(np.array(want))
    assert np.array_equal(bits(got)[finite], bits(want)[finite])


def test_strided_slots_are_read_as_their_values():
    rng = np.random.default_rng(8)
    kv, sc = slots(rng, 64, 32, 32)  # ratio 32: plain windows
    kv_t, sc_t = mx.array(np.array(kv).T.copy()).T, mx.array(np.array(sc).T.copy()).T
    want = pool_windows(kv, sc, 2, 32, 32)
    assert np.array_equal(bits(mlx_ext.pool_windows(kv_t, sc_t, 2, 32, 32)), bits(want))


def test_no_closed_window_is_an_empty_pool():
    rng = np.random.default_rng(9)
    kv, sc = slots(rng, 3, 16, 4)
    assert CpuBackend().pool_windows(kv, sc, 0, 4, 16).shape == (0, 16)


@pytest.mark.parametrize("call,message", [
    (lambda kv, sc: mlx_ext.pool_windows(kv, sc, 5, 4, 16), r"fewer slots than n windows need"),
    (lambda kv, sc: mlx_ext.pool_windows(kv, sc, 2, 4, 8), r"float32 \[slots, lanes \* dim\], one shape"),
    (lambda kv, sc: mlx_ext.pool_windows(kv, sc[:-1], 2, 4, 16), r"one shape"),
    (lambda kv, sc: mlx_ext.pool_windows(kv, sc, 2, 0, 16), r"ratio and dim must be positive"),
])
def test_bad_shapes_are_refused_in_one_line(call, message):
    kv, sc = slots(np.random.default_rng(10), 16, 16, 4)
    with pytest.raises(ValueError, match=message):
        call(kv, sc)


def test_a_model_prefills_the_same_with_the_fused_pooling(tiny_models):
    """Official precision: the same prefill logits and cached rows, bit for bit, over two chunks
    (the second starts mid-window), with the pooling as one node or as MLX ops."""
    kernels = CpuBackend()
    assert kernels.fused_attention
    engine = Engine(open_model(tiny_models("q8")), ctx=512, precision="official", kernels=kernels)
    model, ids = engine.model, [int(t) for t in np.random.default_rng(11).integers(10, 500, 150)]
    runs = []
    for fused in (True, False):
        kernels.fused_attention = fused
        state = KVState.empty(model.cfg, 512)
        model.prefill(ids[:61], state)
        logits = np.array(model.prefill(ids[61:], state, all_logits=True))
        runs.append((logits, [np.array(a) for a in state.arrays()]))
    (fused, fused_state), (ops, ops_state) = runs
    assert np.array_equal(fused.view(np.uint32), ops.view(np.uint32))
    assert all(np.array_equal(a, b) for a, b in zip(fused_state, ops_state))
