"""The GPU backends' grouped product (``GpuBackend.grouped_matmul``: the attention output's
low rank, group g's rows of W times x's g-th slice) as one ``matvec`` launch with row groups,
checked on the CPU: the real ``MetalBackend`` / ``CudaBackend`` method with its launch run by
tests/metal_emulator and tests/cuda_emulator (HIP: portable.cuh's wave64 branch), against the
float64 grouped product of the dequantized matrix; its graph-node count against the default's;
and a ``tiny`` model whose decode steps take their grouped products from the emulated kernel.

Each kernel instance is compiled with g++ once (cached in pytest's cache directory).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from gpu_emulator.harness import NEEDS_EMULATOR, emulator_build_dir
from greedy_run import greedy_run
from kernel_data import random_weight, rel_err
from magnetar.kernels import GGMLType, metal, reference
from magnetar.kernels.base import Backend
from magnetar.kernels.cpu import CpuBackend
from magnetar.runtime.engine import Engine
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.lab.graph_nodes import graph_nodes
from magnetar.runtime.weights import Matrix
from test_hc_emulated import MODULES, PLATFORMS

pytestmark = [*NEEDS_EMULATOR, pytest.mark.usefixtures("on_the_cpu")]

RTOL = 1e-5


@pytest.fixture(scope="session")
def build_dir(request, tmp_path_factory):
    return emulator_build_dir(request, tmp_path_factory, "grouped_matvec_emulator")


def grouped_f64(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The oracle: x [T, G, cols] by W [G * R, cols] in float64, group g's rows times x[:, g]."""
    T, G, cols = x.shape
    wg = w.astype(np.float64).reshape(G, -1, cols)
    return np.einsum("tgc,grc->tgr", x.astype(np.float64), wg).reshape(T, -1)


def case(rng, ggml_type: GGMLType, n_tok: int, groups: int, per_group: int, cols: int, kernels: Backend):
    blocks = random_weight(rng, ggml_type, (groups * per_group, cols))
    w = Matrix(mx.array(blocks), ggml_type, kernels)
    x = rng.standard_normal((n_tok, groups, cols)).astype(np.float32)
    return x, w, grouped_f64(x, reference.dequantize(blocks, ggml_type))


CASES = [  # weight type, rows (tokens), groups, rows per group, cols, NR expected on (metal, cuda)
    (GGMLType.Q8_0, 1, 8, 1024 // 16, 512, (2, 2)),  # V4's 8 groups at a sixteenth of Flash's widths
    (GGMLType.Q8_0, 3, 2, 64, 256, (2, 2)),  # tiny's attention output, three rows
    (GGMLType.Q8_0, 4, 8, 5, 1056, (1, 1)),  # odd groups: a row per simdgroup; 33 chunks, lanes loop unevenly
    (GGMLType.Q8_0, 2, 1, 37, 96, (2, 2)),  # one group: the plain product, a partial last simdgroup
    (GGMLType.IQ2_XXS, 2, 2, 6, 512, (1, 2)),  # Metal's NR = 4 does not divide 6: one row each
    (GGMLType.Q4_K, 1, 8, 4, 256, (2, 2)),
]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("ggml_type,n_tok,groups,per_group,cols,nr", CASES,
                         ids=lambda v: getattr(v, "name", str(v)).replace(" ", ""))
def test_grouped_matvec_is_one_launch_equal_to_the_float64_product(build_dir, platform, ggml_type, n_tok, groups,
                                                                   per_group, cols, nr):
    emu = PLATFORMS[platform](build_dir)
    with MODULES[platform].emulated_backend(emu) as kernels:
        x, w, want = case(np.random.default_rng([int(ggml_type), n_tok, groups, cols]), ggml_type, n_tok, groups,
                          per_group, cols, kernels)
        got = kernels.grouped_matmul(mx.array(x), w)
    assert [(launch.kernel, launch.template["G"]) for launch in emu.launches] == [("matvec", groups)]
    assert emu.launches[0].template["NR"] == nr[platform != "metal"]
    assert got.shape == want.shape
    assert rel_err(got, want) < RTOL


@pytest.mark.parametrize("platform", ["metal", "cuda"])
def test_many_rows_keep_the_default_path(build_dir, platform):
    """Past ``MATVEC_MAX_TOKENS`` rows (prefill) the product is the default's: no matvec."""
    emu = PLATFORMS[platform](build_dir)
    with MODULES[platform].emulated_backend(emu) as kernels:
        x, w, want = case(np.random.default_rng(9), GGMLType.Q8_0, metal.MATVEC_MAX_TOKENS + 1, 2, 8, 64, kernels)
        got = kernels.grouped_matmul(mx.array(x), w)
    assert not any(launch.kernel == "matvec" for launch in emu.launches)
    assert rel_err(got, want) < RTOL


class CountingLaunches(metal.MetalBackend):
    """The real ``GpuBackend.grouped_matmul`` with each launch recorded and answered by
    evaluated zeros: on a GPU each launch is one graph node, which this machine cannot build."""

    def __init__(self):
        self.launches, self.fed = [], []

    def _run(self, name, inputs, shapes, geometry, template):
        self.launches.append(name)
        self.fed += inputs
        outs = [mx.zeros(s) for s in shapes]
        mx.eval(outs)
        return outs


def test_grouped_matvec_is_a_few_graph_nodes():
    """At Flash widths (8 groups of 1024 rows, 4096 columns, Q8_0), one token: the launch and
    what feeds it (x flattened: 2 nodes in all here) against the default's dequantized copy,
    per-group slices, products and concatenation (60)."""
    rng = np.random.default_rng(0)
    kernels = CountingLaunches()
    w = Matrix(mx.array(random_weight(rng, GGMLType.Q8_0, (8 * 1024, 4096))), GGMLType.Q8_0, kernels)
    x = mx.array(rng.standard_normal((1, 8, 4096)).astype(np.float32))
    mx.eval(w.data, x)
    y = kernels.grouped_matmul(x, w)
    assert kernels.launches == ["matvec"]
    assert graph_nodes(y, *kernels.fed) + len(kernels.launches) <= 3
    assert graph_nodes(Backend.grouped_matmul(kernels, x, w)) > 50


class CpuWithGpuGrouped(CpuBackend):
    """The CPU backend with the emulated GPU backend's ``grouped_matmul``: the attention
    output's grouped products of the decode steps run the GPU kernel and everything else what
    the CPU path runs, so a difference in the logits is the grouped product's."""

    traceable = False  # the emulator evaluates its inputs on the host ...

    def __init__(self, gpu):
        super().__init__()
        self.gpu = gpu
        self.host_moe = True  # ... so the step is cut into uncompiled pieces, not one compiled graph

    def grouped_matmul(self, x, w, groups=None):  # prefill's many rows: the CPU path, so the prompt's state is the same
        if x.shape[0] <= metal.MATVEC_MAX_TOKENS:
            return self.gpu.grouped_matmul(x, w, groups)
        return super().grouped_matmul(x, w, groups)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_a_model_decodes_the_same_with_the_emulated_grouped_matvec(tiny_models, build_dir, platform):
    """tiny q2 (o_a: Q8_0, 2 groups of 64 rows) over a 12-token prompt: the same greedy
    tokens as the CPU path and logits within f32 rounding at every decode step (measured
    ~5e-7 relative; the default's dequantized product in prefill alone moved them 2e-4). In
    reference precision, as tests/test_engine.py compares paths: with the official FP8
    rounding of cached rows an ulp at a rounding boundary becomes a whole FP8 step (metal's
    last step: 2e-4 with the same experts chosen at every layer, measured)."""
    path = tiny_models("q2")
    prompt = [3 + 37 * i % 1000 for i in range(12)]
    engine = lambda kernels: Engine(open_model(path), 64, precision="reference", kernels=kernels)  # noqa: E731
    want_tokens, want_logits = greedy_run(engine(CpuBackend()), prompt, 4)
    emu = PLATFORMS[platform](build_dir)
    with MODULES[platform].emulated_backend(emu) as gpu:
        tokens, logits = greedy_run(engine(CpuWithGpuGrouped(gpu)), prompt, 4)
    cfg = open_model(path).config
    grouped = [launch for launch in emu.launches if launch.kernel == "matvec" and launch.template["G"] > 1]
    assert len(grouped) >= 3 * cfg.n_layer and {launch.template["G"] for launch in grouped} == {cfg.o_groups}
    assert tokens == want_tokens
    assert np.array_equal(logits[0], want_logits[0])  # the prompt's: prefill's many rows took the CPU path
    for got, want in zip(logits[1:], want_logits[1:]):
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
