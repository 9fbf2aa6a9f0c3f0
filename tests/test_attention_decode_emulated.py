"""The GPU backends' decode attention (``GpuBackend.attention_decode``: the ``attn_state``,
``attn_index`` and ``attn_core`` kernels of kernels/metal and kernels/cuda) checked on the
CPU: the real ``MetalBackend`` / ``CudaBackend`` method with each launch run by
tests/metal_emulator and tests/cuda_emulator (HIP: portable.cuh's wave64 branch), against
the MLX-ops oracle (``kernels.attention_decode``) for each layer kind at ``tiny`` and Flash
widths, at positions that open, fill and close windows and wrap the ring, with the indexer
selecting 512 of up to 576 rows and with every score tied; and a whole ``tiny`` model on the
emulated backends against the CPU backend.

Each kernel instance is compiled with g++ once (cached in pytest's cache directory); the
Flash-width cases and the model runs are slow.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from gpu_emulator.harness import NEEDS_EMULATOR, emulator_build_dir
from greedy_run import greedy_run
from kernel_data import rel_err
from magnetar.kernels import attention_decode as ad
from magnetar.kernels import metal
from magnetar.kernels.base import Backend, attend
from magnetar.kernels.cpu import CpuBackend
from magnetar.runtime.engine import Engine
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.lab.graph_nodes import graph_nodes
from test_attention_decode_cpu import make_step, open_rows_as_they_were
from test_hc_emulated import MODULES, PLATFORMS

pytestmark = [*NEEDS_EMULATOR, pytest.mark.usefixtures("on_the_cpu")]

RTOL = 1e-5


@pytest.fixture(scope="session")
def build_dir(request, tmp_path_factory):
    return emulator_build_dir(request, tmp_path_factory, "attention_emulator")


def check(emu, module, step: ad.DecodeStep, shape: ad.DecodeShape, official: bool) -> list[str]:
    """One layer's step on the emulated backend against the MLX ops; the kernels launched."""
    want = [*(lambda o, s: [o, *s])(*ad.attention_decode(step, shape, attend))]
    mx.eval(want)
    want = open_rows_as_they_were(step, shape, step.p.item(), want)  # pooled only when the window closes
    before = len(emu.launches)
    with module.emulated_backend(emu) as kernels:
        o, states = kernels.attention_decode(step, shape)
        got = [o, *states]
        mx.eval(got)
    assert len(got) == len(want)
    p = step.p.item()
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == mx.float32, (p, i)
        assert rel_err(g, w) < RTOL, (p, i, rel_err(g, w))
    if official:  # rows rounded through FP8 / FP4 then f16: the same rounding decisions
        for i, (g, w) in enumerate(zip(got[1:], want[1:])):
            assert np.array_equal(np.array(g), np.array(w)), (p, i)
    return [launch.kernel for launch in emu.launches[before:]]


FAST = [  # platform, ratio, positions, capacity, tied
    ("cuda", 4, (3, 131), 64, False),  # the indexer selects top-8 of 32 visible rows
    ("metal", 128, (127, 300), 3, False),
    ("hip-wave64", 0, (31, 77), 0, False),
    ("metal", 4, (63, 131), 64, True),  # every score tied: the lowest 8 of 16 and 33 rows
]


@pytest.mark.parametrize("platform,ratio,positions,cap,tied", FAST, ids=lambda v: str(v).replace(" ", ""))
def test_emulated_attention_decode_equals_the_mlx_ops_at_tiny_widths(build_dir, platform, ratio, positions, cap,
                                                                      tied):
    emu = PLATFORMS[platform](build_dir)
    for p in positions:
        step, shape = make_step("tiny", ratio, p, cap, True, tied=tied)
        select = step.index_q is not None
        launched = check(emu, MODULES[platform], step, shape, True)
        assert launched == ["attn_state", *(["attn_index"] if select else []), "attn_core"]


class CountingLaunches(metal.MetalBackend):
    """The real ``GpuBackend.attention_decode`` with each launch recorded and answered by
    evaluated zeros: on a GPU each launch is one graph node, which this machine cannot build."""

    def __init__(self):
        self.launches, self.fed = [], []

    def _run(self, name, inputs, shapes, geometry, template):
        self.launches.append(name)
        self.fed += inputs
        outs = [mx.zeros(s) for s in shapes]
        mx.eval(outs)
        return outs


@pytest.mark.parametrize("ratio,cap,most", [(0, 0, 3), (128, 3, 6), (4, 64, 8)])
def test_gpu_attention_decode_is_a_few_graph_nodes(ratio, cap, most):
    """The kernels plus what feeds them and puts their rows in (the position's reshape, the
    row index, a slice update per compressed buffer), against 150-500 for the MLX ops."""
    step, shape = make_step("tiny", ratio, 131, cap, True)
    mx.eval(*(v for c in (step, step.comp, step.index) if c is not None for v in vars(c).values()
              if isinstance(v, mx.array)))
    kernels = CountingLaunches()
    o, states = kernels.attention_decode(step, shape)
    nodes = graph_nodes(o, *states, *kernels.fed) + len(kernels.launches)
    assert nodes <= most, kernels.launches
    o, states = Backend.attention_decode(kernels, step, shape)
    assert graph_nodes(o, *states) > 100

SLOW = [  # preset, ratio, positions, capacity, tied, platforms
    ("tiny", 0, (0, 3, 31, 32), 0, False, ["metal"]),
    ("tiny", 128, (0, 127, 128, 131), 3, False, ["hip-wave64"]),
    ("tiny", 4, (0, 3, 4, 7, 127, 128), 64, False, ["cuda", "metal"]),
    ("tiny", 4, (0, 3, 4, 31), 8, False, ["hip-wave64"]),  # capacity = top-k: every visible row is kept
    ("mini-flash", 0, (0, 127, 300), 0, False, ["cuda"]),
    ("mini-flash", 128, (0, 127, 128, 1000), 8, False, ["metal"]),
    ("mini-flash", 4, (3, 127, 131), 64, False, ["hip-wave64"]),  # capacity 64 <= top-k 512
    ("mini-flash", 4, (2052, 2303), 576, False, list(PLATFORMS)),  # 513 and 576 visible rows, top-k 512 kept
    ("mini-flash", 4, (2303,), 576, True, ["cuda"]),  # 576 tied scores: the lowest 512
]
CASES = [pytest.param(platform, *case[:5], True, id=f"{platform}-{case[0]}-{case[1]}-{case[3]}{'-tied' * case[4]}")
         for case in SLOW for platform in case[5]]
# Reference precision (no rounding): the same code with OFFICIAL 0, once at each width.
CASES += [pytest.param("cuda", "tiny", 4, (0, 4, 127), 64, False, False, id="cuda-tiny-4-64-reference"),
          pytest.param("cuda", "mini-flash", 4, (2303,), 576, False, False, id="cuda-mini-flash-4-576-reference")]


@pytest.mark.slow
@pytest.mark.parametrize("platform,preset,ratio,positions,cap,tied,official", CASES)
def test_emulated_attention_decode_equals_the_mlx_ops(build_dir, platform, preset, ratio, positions, cap, tied,
                                                       official):
    emu = PLATFORMS[platform](build_dir)
    for p in positions:
        step, shape = make_step(preset, ratio, p, cap, official, tied=tied)
        check(emu, MODULES[platform], step, shape, official)


class CpuWithGpuAttention(CpuBackend):
    """The CPU backend with the emulated GPU backend's ``attention_decode``: the model's
    decode attention runs the GPU kernels and everything else what the CPU path runs, so a
    difference in the logits is the attention's (a whole emulated tiny model takes ~3 min)."""

    traceable = False  # the emulator evaluates its inputs on the host

    def __init__(self, gpu):
        super().__init__()
        self.gpu = gpu

    def attention_decode(self, step, shape):
        return self.gpu.attention_decode(step, shape)


@pytest.mark.parametrize("platform", ["metal", "cuda"])
def test_a_model_decodes_the_same_with_the_emulated_attention(tiny_models, build_dir, platform):
    """tiny q2 (every layer kind) over a 40-token prompt at ctx 256, so the ratio-4 layers'
    indexer picks 8 of 10 and more rows: the same greedy tokens with the emulated kernels as
    with the CPU path, and logits within f32 rounding at every decode step."""
    path = tiny_models("q2")
    prompt = [3 + 37 * i % 1000 for i in range(40)]

    want_tokens, want_logits = greedy_run(Engine(open_model(path), 256, kernels=CpuBackend()), prompt, 4)
    emu = PLATFORMS[platform](build_dir)
    with MODULES[platform].emulated_backend(emu) as gpu:
        tokens, logits = greedy_run(Engine(open_model(path), 256, kernels=CpuWithGpuAttention(gpu)), prompt, 4)
    ratios = open_model(path).config.compress_ratios
    launched = [launch.kernel for launch in emu.launches]
    steps = launched.count("attn_core") // len(ratios)
    assert steps >= 3 and launched.count("attn_state") == steps * len(ratios)
    assert launched.count("attn_index") == steps * ratios.count(4)
    assert tokens == want_tokens
    for got, want in zip(logits[1:], want_logits[1:]):  # the prompt's are prefill's, no decode attention
        assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
