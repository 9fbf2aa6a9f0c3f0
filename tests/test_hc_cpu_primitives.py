"""The hyper-connection steps and the RMS norm as MLX primitives with C++ CPU kernels
(kernels/mlx_ext.py, built at first use against the MLX wheel with nanobind): each equals
the MLX-ops oracle (``runtime.ops.hc_pre`` / ``hc_post`` / ``rmsnorm``) at ``tiny`` and Flash
widths, is one node of a compiled graph, and a whole ``tiny`` model decodes the same with
them as without."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest

from greedy_run import greedy_run
from kernel_data import rel_err
from magnetar.kernels import mlx_ext
from magnetar.kernels.cpu import CpuBackend
from magnetar.runtime import Engine, ops
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.lab.graph_nodes import graph_nodes
from magnetar.runtime.lab.make_model import PRESETS

RTOL = 1e-5
DTYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}


pytestmark = pytest.mark.usefixtures("on_the_cpu")  # conftest.py


def test_the_extension_builds_and_takes_mlx_arrays_here():
    """CI has g++ and nanobind (a base dependency): a failure to build or to share MLX's
    array type must fail here, not quietly fall back to the MLX ops."""
    assert mlx_ext.available(), mlx_ext.unavailable_reason()
    assert CpuBackend().fused_hc


def random_hc(rng, n_tok, hc, d_model, dtype, broadcast=False):
    X = rng.standard_normal((n_tok, hc, d_model)).astype(np.float32) * rng.uniform(0.5, 3.0, (1, hc, 1))
    X = mx.array(X)
    if broadcast:  # the first layer's streams: hc views of one embedding row
        X = mx.broadcast_to(X[:, :1], X.shape)
    mix = (2 + hc) * hc
    fn = mx.array(rng.standard_normal((mix, hc * d_model)) * (hc * d_model) ** -0.5).astype(dtype)
    scale = mx.array(rng.uniform(2.0, 4.0, 3).astype(np.float32))
    base = mx.array(rng.standard_normal(mix).astype(np.float32))
    mx.eval(X, fn)  # a broadcast stays a strided view: the kernel reads it as one
    return X, fn, scale, base


@pytest.mark.parametrize("preset,n_tok,dtype,iters,broadcast", [
    ("tiny", 1, "f32", None, False),  # the decode step, fn widened at load
    ("tiny", 3, "f16", None, True),  # fn as stored; broadcast (strided) streams
    ("tiny", 2, "bf16", 2, False),  # far from converged, where a pass out of order would show
    ("mini-flash", 2, "f16", None, False),  # Flash widths: hc = 4, D = 4096
], ids=str)
def test_fused_hc_pre_equals_the_mlx_ops_as_one_node(preset, n_tok, dtype, iters, broadcast):
    cfg = PRESETS[preset]()
    if iters is not None:
        cfg = cfg.model_copy(update={"sinkhorn_iters": iters})
    X, fn, scale, base = random_hc(np.random.default_rng([n_tok, cfg.d_model]), n_tok, cfg.hc, cfg.d_model,
                                   DTYPES[dtype], broadcast)
    params = ops.hc_params(cfg)
    fused = mx.compile(lambda *a: mlx_ext.hc_pre(*a, params))
    got = fused(X, fn, scale, base)
    assert graph_nodes(*got) == 1
    want = ops.hc_pre(X, lambda f: f @ fn.astype(mx.float32).T, scale, base, cfg)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == mx.float32
        assert rel_err(g, w) < RTOL


@pytest.mark.parametrize("d_model,broadcast", [(256, True), (4096, False)])
def test_fused_hc_post_equals_the_mlx_ops_as_one_node(d_model, broadcast):
    rng = np.random.default_rng(d_model)
    X, *_ = random_hc(rng, 3, 4, d_model, mx.float32, broadcast)
    y = mx.array(rng.standard_normal((3, d_model)).astype(np.float32))
    post = mx.array(rng.uniform(0, 2, (3, 4)).astype(np.float32))
    comb = mx.swapaxes(mx.array(rng.uniform(0, 1, (3, 4, 4)).astype(np.float32)), 1, 2)  # a strided view
    mx.eval(comb)
    got = mx.compile(mlx_ext.hc_post)(y, X, post, comb)
    assert graph_nodes(got) == 1
    assert rel_err(got, ops.hc_post(y, X, post, comb)) < RTOL


@pytest.mark.parametrize("n_tok,d_model,view", [
    (1, 256, None),  # a decode step's norm at tiny width
    (3, 4096, None),  # Flash width, several prompt rows
    (5, 96, "transposed"),  # rows with a stride along D: gathered before the sum
    (2, 1024, "broadcast weight"),  # a weight that is a strided view
], ids=str)
def test_fused_rms_norm_gives_the_mlx_ops_bits_as_one_node(n_tok, d_model, view):
    rng = np.random.default_rng([n_tok, d_model])
    x = mx.array(rng.standard_normal((n_tok, d_model)).astype(np.float32) * rng.uniform(0.01, 30.0, (n_tok, 1)))
    w = mx.array(rng.standard_normal(d_model).astype(np.float32))
    if view == "transposed":
        x = mx.array(np.ascontiguousarray(np.array(x).T)).T
    if view == "broadcast weight":
        w = mx.broadcast_to(w[:1], (d_model,))
    mx.eval(x, w)
    got = mx.compile(lambda a, b: mlx_ext.rms_norm(a, b, 1e-6))(x, w)
    assert graph_nodes(got) == 1
    assert np.array_equal(np.array(got), np.array(ops.rmsnorm(x, w, 1e-6)))  # the same steps, rounded alike
    assert CpuBackend(fused_hc=True).rmsnorm(x, w, 1e-6).shape == x.shape
    with pytest.raises(ValueError, match=r"w must be float32 \[D\]"):
        mlx_ext.rms_norm(x, w[:-1], 1e-6)


def test_fused_hc_pre_with_the_norm_gives_the_two_nodes_bits_as_one():
    """hc_pre with the sublayer's norm weight: x_in leaves normalized, bit for bit what the
    RMS norm node makes of hc_pre's x_in, with post and comb unchanged, in one node."""
    cfg = PRESETS["mini-flash"]()
    rng = np.random.default_rng(7)
    X, fn, scale, base = random_hc(rng, 2, cfg.hc, cfg.d_model, mx.float16)
    w = mx.array(rng.standard_normal(cfg.d_model).astype(np.float32))
    params = ops.hc_params(cfg)
    got = mx.compile(lambda *a: mlx_ext.hc_pre(*a, params, w))(X, fn, scale, base)
    assert graph_nodes(*got) == 1
    x_in, post, comb = mlx_ext.hc_pre(X, fn, scale, base, params)
    want = [mlx_ext.rms_norm(x_in, w, params.rms_eps), post, comb]
    for g, t in zip(got, want):
        assert np.array_equal(np.array(g), np.array(t))
    with pytest.raises(ValueError, match=r"norm weight must be float32 \[D\]"):
        mlx_ext.hc_pre(X, fn, scale, base, params, w[:-1])


def test_a_chunk_split_over_threads_gives_each_token_its_own_bits():
    """A prefill chunk's tokens are split over threads (mlx_common.h split_rows); each token
    gets the bits it gets alone, whatever range it falls in."""
    rng = np.random.default_rng(11)
    T, hc, D = 67, 4, 1024
    X, fn, scale, base = random_hc(rng, T, hc, D, mx.float16)
    params = ops.hc_params(PRESETS["tiny"]())
    norm = mx.array(rng.standard_normal(D).astype(np.float32))
    y = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    post = mx.array(rng.uniform(0, 2, (T, hc)).astype(np.float32))
    comb = mx.array(rng.uniform(0, 1, (T, hc, hc)).astype(np.float32))
    x = mx.array(rng.standard_normal((300, 4096)).astype(np.float32))
    w = mx.array(rng.standard_normal(4096).astype(np.float32))
    mx.eval(norm, y, post, comb, x, w)
    chunk = [*mlx_ext.hc_pre(X, fn, scale, base, params, norm), mlx_ext.hc_post(y, X, post, comb)]
    alone = [mx.concatenate(parts) for parts in zip(*(
        [*mlx_ext.hc_pre(X[t:t + 1], fn, scale, base, params, norm), mlx_ext.hc_post(y[t:t + 1], X[t:t + 1],
                                                                                     post[t:t + 1], comb[t:t + 1])]
        for t in range(T)))]
    chunk.append(mlx_ext.rms_norm(x, w, 1e-6))
    alone.append(mx.concatenate([mlx_ext.rms_norm(x[t:t + 1], w, 1e-6) for t in range(x.shape[0])]))
    for got, want in zip(chunk, alone):
        assert np.array_equal(np.array(got).view(np.uint32), np.array(want).view(np.uint32))


def test_fused_hc_pre_refuses_mismatched_shapes_in_one_line():
    X, fn, scale, base = random_hc(np.random.default_rng(0), 1, 4, 64, mx.float32)
    params = ops.hc_params(PRESETS["tiny"]())
    with pytest.raises(ValueError, match=r"fn must be .*\[\(2 \+ hc\) \* hc, hc \* D\]"):
        mlx_ext.hc_pre(X, fn[:, :128], scale, base, params)
    with pytest.raises(ValueError, match="X must be float32"):
        mlx_ext.hc_pre(X.astype(mx.float16), fn, scale, base, params)


def test_a_model_decodes_the_same_with_the_fused_steps(tiny_models):
    """tiny q2 on the CPU backend (native experts, the step cut at them) with the
    hyper-connection steps fused or as MLX ops: the same greedy tokens, and logits within
    f32 rounding, as five layers amplify it, for every prompt position and each decode step."""
    path = tiny_models("q2")
    prompt = [3 + 37 * i % 1000 for i in range(9)]

    def run(fused: bool):
        engine = Engine(open_model(path), ctx=64, kernels=CpuBackend(fused_hc=fused))
        pure = engine.logits(prompt)  # prefill of every position
        tokens, logits = greedy_run(engine, prompt, 4)
        return pure, tokens, logits[1:]

    pure, tokens, steps = run(True)
    want_pure, want_tokens, want_steps = run(False)
    assert tokens == want_tokens
    # The ops agree within 1e-5 (tests above); through 5 layers the differences grow: with the
    # same experts picked, route weights differed by 6e-5 at the last layer and the last prompt
    # positions' logits by 4e-4 of the largest (native q2 experts, measured), so 1e-3 here.
    assert np.max(np.abs(pure - want_pure)) <= 1e-3 * np.max(np.abs(want_pure))
    for got, want in zip(steps, want_steps):
        assert np.max(np.abs(got - want)) <= 1e-3 * np.max(np.abs(want))


@pytest.mark.parametrize("missing", ["compiler", "nanobind"])
def test_a_build_that_cannot_run_fails_in_one_line(tmp_path, monkeypatch, missing):
    if missing == "compiler":
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    else:
        monkeypatch.setitem(sys.modules, "nanobind", None)  # import fails as if not installed
    with pytest.raises(mlx_ext.MlxExtBuildError) as err:
        mlx_ext.build(tmp_path / "cache")
    assert ("no-such-c++" if missing == "compiler" else "pip install nanobind") in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "cache").exists()
