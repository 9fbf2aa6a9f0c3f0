"""A prefill chunk's per-head RMS norm and RoPE as one CPU primitive (``mlx_ext.norm_rope``,
``Backend.norm_rope``): it gives the MLX ops' bits (``rowops.rms`` / ``rmsnorm`` / ``rope``) for
every use prefill makes of it, as one node, and leaves an input it may not overwrite alone."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from magnetar.kernels import mlx_ext
from magnetar.kernels.base import Backend
from magnetar.kernels.cpu import CpuBackend
from magnetar.kernels.rowops import rope_angles
from magnetar.runtime import Engine
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.kv_state import KVState
from magnetar.runtime.lab.graph_nodes import graph_nodes

pytestmark = [pytest.mark.usefixtures("on_the_cpu"),
              pytest.mark.skipif(not mlx_ext.available(), reason="no MLX CPU extension")]

EPS = 1e-6


def angles(rng, T, half, pos0=0):
    inv_freq = mx.array((1.0 / 10000.0 ** (np.arange(half) / half)).astype(np.float32))
    return rope_angles(mx.arange(pos0, pos0 + T, dtype=mx.int32) * int(rng.integers(1, 50)), inv_freq)


def bits(a: mx.array) -> np.ndarray:
    return np.array(a).view(np.uint32)


# (rows, heads or None for [T, n], n, half, eps, weight, sign): the queries, the KV row,
# the attention output's rotation undone, a compressor's pooled rows; tiny and Flash widths
CASES = [
    (7, 4, 128, 32, EPS, False, 1.0),
    (256, 64, 512, 32, EPS, False, 1.0),
    (9, None, 128, 32, EPS, True, 1.0),
    (33, None, 512, 32, EPS, True, 1.0),
    (7, 4, 128, 32, None, False, -1.0),
    (130, 64, 512, 32, None, False, -1.0),
    (3, None, 64, 8, EPS, True, 1.0),
]


@pytest.mark.parametrize("T,heads,n,half,eps,weighted,sign", CASES, ids=str)
def test_norm_rope_gives_the_mlx_ops_bits_as_one_node(T, heads, n, half, eps, weighted, sign):
    rng = np.random.default_rng([T, n, half])
    shape = (T, heads, n) if heads else (T, n)
    x = mx.array(rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.1, 30.0))
    w = mx.array(rng.standard_normal(n).astype(np.float32)) if weighted else None
    cos, sin = angles(rng, T, half, pos0=int(rng.integers(0, 5000)))
    mx.eval(x, cos, sin, *([w] if weighted else []))
    want = Backend.norm_rope(None, x, cos, sin, eps, w, sign)
    got = CpuBackend().norm_rope(x, cos, sin, eps, w, sign)
    assert graph_nodes(got) == 1
    assert got.shape == x.shape
    assert np.array_equal(bits(got), bits(want))


def test_strided_rows_are_read_as_their_values():
    """A transposed input (heads and tokens swapped) is read through its strides."""
    rng = np.random.default_rng(1)
    x = mx.array(rng.standard_normal((4, 10, 128)).astype(np.float32)).transpose(1, 0, 2)
    cos, sin = angles(rng, 10, 32)
    want = Backend.norm_rope(None, x, cos, sin, EPS)
    assert np.array_equal(bits(mlx_ext.norm_rope(x, cos, sin, EPS)), bits(want))


def test_an_input_held_elsewhere_is_left_as_it_was():
    """The rows are worked in place only when nothing else holds them."""
    rng = np.random.default_rng(2)
    x = mx.array(rng.standard_normal((16, 8, 128)).astype(np.float32))
    mx.eval(x)
    before = np.array(x)
    cos, sin = angles(rng, 16, 32)
    y = mlx_ext.norm_rope(x, cos, sin, EPS)
    mx.eval(y)
    assert np.array_equal(np.array(x), before)
    assert not np.array_equal(np.array(y), before)
    # a temporary (nothing else holds it) is donated, and still gets the same values
    fresh = mlx_ext.norm_rope(mx.array(before) * 1.0, cos, sin, EPS)
    assert np.array_equal(bits(fresh), bits(y))


@pytest.mark.parametrize("call,message", [
    (lambda x, c, s: mlx_ext.norm_rope(x[0], c, s), r"float32 \[T, heads, n\] or \[T, n\]"),
    (lambda x, c, s: mlx_ext.norm_rope(x, c[:2], s), r"cos and sin must be float32 \[T, half\]"),
    (lambda x, c, s: mlx_ext.norm_rope(x, c, s, None, mx.ones(16)), r"norm weight must be float32 \[n\], with eps"),
    (lambda x, c, s: mlx_ext.norm_rope(x, c, s, sign=2.0), r"sign must be 1 or -1"),
])
def test_bad_shapes_are_refused_in_one_line(call, message):
    rng = np.random.default_rng(3)
    x = mx.array(rng.standard_normal((4, 16)).astype(np.float32))
    cos, sin = angles(rng, 4, 4)
    with pytest.raises(ValueError, match=message):
        call(x, cos, sin)


def test_a_model_prefills_the_same_with_the_fused_rotation(tiny_models):
    """Official precision (FP8 and FP4 round trips downstream): the same prefill logits and
    cached rows, bit for bit, with norm_rope as one node or as MLX ops."""
    kernels = CpuBackend()
    assert kernels.fused_hc
    engine = Engine(open_model(tiny_models("q8")), ctx=512, precision="official", kernels=kernels)
    model, ids = engine.model, [int(t) for t in np.random.default_rng(4).integers(10, 500, 150)]
    runs = []
    for use in (kernels.norm_rope, lambda *a, **k: Backend.norm_rope(kernels, *a, **k)):
        kernels.norm_rope = use
        state = KVState.empty(model.cfg, 512)
        logits = np.array(model.prefill(ids, state, all_logits=True))
        runs.append((logits, [np.array(a) for a in state.arrays()]))
    del kernels.norm_rope
    (fused, fused_state), (ops, ops_state) = runs
    assert np.array_equal(fused.view(np.uint32), ops.view(np.uint32))
    assert all(np.array_equal(a, b) for a, b in zip(fused_state, ops_state))
