"""The fused hyper-connection steps (``hc_pre``, ``hc_post``) of the GPU backends,
checked on the CPU: the real ``MetalBackend`` / ``CudaBackend`` methods with each kernel
launch run by tests/metal_emulator and tests/cuda_emulator (HIP: portable.cuh's wave64
branch), against ``runtime.ops`` (MLX ops, the oracle) at ``tiny`` and Flash widths with
the presets' Sinkhorn passes, and a whole ``tiny`` model on the emulated backends
against the CPU backend.

Slow: each kernel instance is compiled with g++ (cached in pytest's cache directory);
an emulated model token takes seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest

from cuda_emulator import emulator as cuda_emulator
from gpu_emulator.harness import NEEDS_EMULATOR, emulator_build_dir
from greedy_run import greedy_run
from kernel_data import rel_err
from magnetar.kernels import GGMLType, rowops
from magnetar.kernels.cpu import CpuBackend
from magnetar.runtime import ops
from magnetar.runtime.engine import Engine
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.lab.make_model import PRESETS
from metal_emulator import emulator as metal_emulator

pytestmark = [pytest.mark.slow, *NEEDS_EMULATOR]

RTOL = 1e-5
PLATFORMS = {"metal": lambda d: metal_emulator.Emulator(d), "cuda": lambda d: cuda_emulator.Emulator(d),
             "hip-wave64": lambda d: cuda_emulator.Emulator(d, platform="hip", warp=64)}
MODULES = {"metal": metal_emulator, "cuda": cuda_emulator, "hip-wave64": cuda_emulator}


@pytest.fixture(scope="session")
def build_dir(request, tmp_path_factory):
    return emulator_build_dir(request, tmp_path_factory, "hc_pre_emulator")


@dataclass(frozen=True)
class Fn:
    """The fn matrix as ``runtime.weights.Matrix`` holds it: as stored."""

    data: mx.array
    ggml_type: int

    def dense(self) -> mx.array:
        return self.data.astype(mx.float32)


def random_hc(rng: np.random.Generator, n_tok: int, hc: int, d_model: int, ggml_type: GGMLType):
    """Streams of unequal scale, an fn matrix like a trained one (rows of RMS ~1/sqrt(cols)),
    and scale/base that put the sigmoids and the softmax off their flat middles."""
    X = rng.standard_normal((n_tok, hc, d_model)).astype(np.float32) * rng.uniform(0.5, 3.0, (1, hc, 1))
    mix = (2 + hc) * hc
    fn = rng.standard_normal((mix, hc * d_model)) * (hc * d_model) ** -0.5
    fn = fn.astype(np.float16 if ggml_type == GGMLType.F16 else np.float32)
    scale = rng.uniform(2.0, 4.0, 3).astype(np.float32)
    base = rng.standard_normal(mix).astype(np.float32)
    return mx.array(X), Fn(mx.array(fn), ggml_type), mx.array(scale), mx.array(base)


def oracle(X, fn, scale, base, cfg):
    return ops.hc_pre(X, lambda f: f @ fn.dense().T, scale, base, cfg)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("preset,n_tok,ggml_type,iters", [
    ("tiny", 3, GGMLType.F16, None),  # hc * D = 1024: two chunks per lane; the preset's 20 passes
    ("tiny", 1, GGMLType.F32, None),
    ("tiny", 2, GGMLType.F16, 2),  # far from converged, where a pass out of order would show
    ("mini-flash", 2, GGMLType.F16, None),  # Flash widths: hc = 4, D = 4096
], ids=str)
def test_fused_hc_pre_equals_the_mlx_ops(build_dir, platform, preset, n_tok, ggml_type, iters):
    cfg = PRESETS[preset]()
    if iters is not None:
        cfg = cfg.model_copy(update={"sinkhorn_iters": iters})
    X, fn, scale, base = random_hc(np.random.default_rng([n_tok, int(ggml_type), cfg.d_model]), n_tok, cfg.hc,
                                   cfg.d_model, ggml_type)
    emu = PLATFORMS[platform](build_dir)
    with MODULES[platform].emulated_backend(emu) as kernels:
        got = kernels.hc_pre(X, fn, scale, base, ops.hc_params(cfg))
    assert [launch.kernel for launch in emu.launches] == ["hc_pre"]
    want = oracle(X, fn, scale, base, cfg)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_err(g, w) < RTOL
    comb = np.asarray(got[2])
    assert np.allclose(comb.sum(axis=-2), 1.0, atol=1e-3)  # Sinkhorn ends on columns: doubly stochastic


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("preset,n_tok", [("tiny", 3), ("mini-flash", 2)], ids=str)
def test_fused_hc_pre_norm_is_one_launch_equal_to_the_two_steps(build_dir, platform, preset, n_tok):
    """``hc_pre_norm``: the sublayer's RMS norm inside the hc_pre launch, against the MLX ops
    of ``hc_pre`` then ``rmsnorm``; post and comb as without the norm."""
    cfg = PRESETS[preset]()
    rng = np.random.default_rng([n_tok, cfg.d_model, 7])
    X, fn, scale, base = random_hc(rng, n_tok, cfg.hc, cfg.d_model, GGMLType.F16)
    norm = mx.array(rng.uniform(0.5, 1.5, cfg.d_model).astype(np.float32))
    emu = PLATFORMS[platform](build_dir)
    with MODULES[platform].emulated_backend(emu) as kernels:
        got = kernels.hc_pre_norm(X, fn, scale, base, ops.hc_params(cfg), norm)
    assert [(launch.kernel, launch.template["NORM"]) for launch in emu.launches] == [("hc_pre", 1)]
    x_in, post, comb = oracle(X, fn, scale, base, cfg)
    want = [rowops.rmsnorm(x_in, norm, cfg.rms_eps), post, comb]
    for g, w in zip(got, want):
        assert g.shape == w.shape and rel_err(g, w) < RTOL


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("n_tok,d_model,broadcast", [
    (1, 256, True),  # the first layer's streams: a broadcast embedding, made contiguous for the kernel
    (3, 300, False),  # a partial last threadgroup
    (2, 4096, False),  # Flash width
], ids=str)
def test_fused_hc_post_equals_the_mlx_ops(build_dir, platform, n_tok, d_model, broadcast):
    rng = np.random.default_rng([n_tok, d_model])
    X = mx.array(rng.standard_normal((n_tok, 4, d_model)).astype(np.float32))
    if broadcast:
        X = mx.broadcast_to(X[:, :1], X.shape)
    y = mx.array(rng.standard_normal((n_tok, d_model)).astype(np.float32))
    post = mx.array(rng.uniform(0, 2, (n_tok, 4)).astype(np.float32))
    comb = mx.array(rng.uniform(0, 1, (n_tok, 4, 4)).astype(np.float32))
    emu = PLATFORMS[platform](build_dir)
    with MODULES[platform].emulated_backend(emu) as kernels:
        got = kernels.hc_post(y, X, post, comb)
    assert [launch.kernel for launch in emu.launches] == ["hc_post"]
    assert rel_err(got, ops.hc_post(y, X, post, comb)) < RTOL


@pytest.mark.parametrize("platform", ["metal", "cuda"])
def test_emulated_model_with_fused_hc_pre_matches_the_cpu_path(tiny_models, build_dir, platform):
    """A ``tiny`` prompt and two decode steps on the emulated backend (every kernel,
    the hc steps included, run by the emulator; traceable off, since the emulator evaluates
    its inputs on the host) against the CPU backend: the same greedy tokens, logits
    within f32 rounding."""
    path = tiny_models("q2")
    prompt = [1000, 2001, 3002]

    def greedy(kernels):
        return greedy_run(Engine(open_model(path), 64, kernels=kernels), prompt, 2)

    want_tokens, want_logits = greedy(CpuBackend())
    emu = PLATFORMS[platform](build_dir)
    with MODULES[platform].emulated_backend(emu) as kernels:
        kernels.traceable, kernels.host_moe = False, True
        tokens, logits = greedy(kernels)
    n_layer = open_model(path).config.n_layer
    for kernel in ("hc_pre", "hc_post"):  # two per layer, for the prefill and each token
        assert sum(launch.kernel == kernel for launch in emu.launches) == 2 * n_layer * 3
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
