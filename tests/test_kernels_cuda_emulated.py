"""The CUDA kernels' semantics, checked on the CPU: the real ``CudaBackend``
methods with every kernel launch run by tests/cuda_emulator (one emulated
thread per CUDA thread, real barriers and warp shuffles; its docstring says
what that does and does not prove), against ``kernels.reference``.

Covered: dequantize bit-exact for every weight type (also with g++ fusing
multiply-adds, as nvcc does); matmul on both paths (warp-per-rows matvec for
few tokens, 64-row tiles beyond) with rows that fill no whole block; the MoE
decode kernels (fused per pair) and the grouped prefill kernels (device-side
tile map, repeated experts, an expert spanning two tiles), expert ids out of
range, and the decode kernels compiled through portable.cuh's HIP branch at
wave64. Products agree within 1e-5 relative, as in test_kernels_backends.py.
Row widths are chosen so that the lanes of a warp loop over more chunks than
there are lanes (a reduction that dropped lanes would show).

Slow: every kernel instance is compiled with g++ (about 1-2 s each), cached
in pytest's cache directory across runs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest

from magnetar.kernels import GGMLType, reference
from magnetar.kernels import cuda as kc
from magnetar.kernels.backend import QTensor
from cuda_emulator.emulator import CXX, Emulator, EmulatorError, host_has_fma, emulated_backend
from kernel_data import WEIGHT_TYPES, random_moe_case, random_qtensor, reference_moe, rel_err

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CXX is None, reason="g++ not found: the CUDA emulator compiles the kernels with it"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CUDA emulator's fibers need Linux (glibc)"),
]

RTOL = 1e-5
LIMIT = 10.0


@pytest.fixture(scope="session")
def build_dir(request, tmp_path_factory):
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("cuda_emulator") if cache is not None else tmp_path_factory.mktemp("cuda_emulator")


# ---------------------------------------------------------------------------
# dequantize


@pytest.mark.parametrize("ggml_type", WEIGHT_TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_exact(build_dir, ggml_type):
    emu = Emulator(build_dir)
    rng = np.random.default_rng(int(ggml_type))
    w = random_qtensor(rng, ggml_type, (3, 13, 512))
    expected = reference.dequantize(w.data, ggml_type)
    picked = np.array([2, 0, 2], np.int32)
    with emulated_backend(emu) as be:
        whole = np.asarray(be.dequantize(QTensor(mx.array(w.data), ggml_type)))
        some = np.asarray(be.dequantize(QTensor(mx.array(w.data), ggml_type), mx.array(picked)))
    assert [launch.kernel for launch in emu.launches] == ["dequantize", "dequantize"]
    assert np.array_equal(whole.view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(some.view(np.uint32), expected[picked].view(np.uint32))


@pytest.mark.skipif(not host_has_fma(), reason="no FMA instructions here for g++ to contract into")
@pytest.mark.parametrize("ggml_type", [GGMLType.Q2_K, GGMLType.Q4_K], ids=lambda t: t.name)
def test_dequantize_stays_bit_exact_when_multiply_adds_fuse(build_dir, ggml_type):
    """nvcc fuses ``(d*sc)*q - dmin*m`` into one FMA by default; blocks.cuh argues
    that gives the same bits (the product is exact). g++ -ffp-contract=fast does
    fuse that line (a vfmsub in the dequantize loop)."""
    emu = Emulator(build_dir, contract=True)
    w = random_qtensor(np.random.default_rng(int(ggml_type) + 1), ggml_type, (2, 9, 1024))
    with emulated_backend(emu) as be:
        got = np.asarray(be.dequantize(QTensor(mx.array(w.data), ggml_type)))
    assert np.array_equal(got.view(np.uint32), reference.dequantize(w.data, ggml_type).view(np.uint32))


# ---------------------------------------------------------------------------
# matmul


@pytest.mark.parametrize("ggml_type,n_tok,kernel", [
    (GGMLType.IQ2_XXS, 1, "matvec"),
    (GGMLType.IQ2_XXS, 5, "matvec"),  # NT = 8 > n_tok: the bound on the token loop
    (GGMLType.IQ2_XXS, kc.MATVEC_MAX_TOKENS + 1, "matmul_tiled"),
    (GGMLType.IQ2_XXS, 70, "matmul_tiled"),  # a second, partial token tile
    (GGMLType.Q8_0, 3, "matvec"),  # 2-byte aligned blocks read as u16
    (GGMLType.F32, 9, "matmul_tiled"),  # float4 weight loads
], ids=lambda v: getattr(v, "name", str(v)))
def test_matmul_matches_reference(build_dir, ggml_type, n_tok, kernel):
    rows, cols = 100, 1536  # 100: no whole block of rows; 48 chunks a row: lanes loop unevenly
    emu = Emulator(build_dir)
    rng = np.random.default_rng([int(ggml_type), n_tok])
    w = random_qtensor(rng, ggml_type, (rows, cols))
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    with emulated_backend(emu) as be:
        got = be.matmul(mx.array(x), QTensor(mx.array(w.data), ggml_type))
    assert [launch.kernel for launch in emu.launches] == [kernel]
    assert got.shape == (n_tok, rows)
    assert rel_err(got, reference.matmul(x, w.data, ggml_type)) < RTOL


# ---------------------------------------------------------------------------
# moe


def _run_moe(emu, x, ids, w, mats):
    with emulated_backend(emu) as be:
        return be.moe(mx.array(x), mx.array(ids), mx.array(w), *[QTensor(mx.array(m.data), m.ggml_type) for m in mats],
                      LIMIT)


# Decode: gate/up rows are 48 chunks wide, down rows 40, both more than a warp's 32 lanes.
DECODE = dict(n_experts=8, d_model=1536, ffn=1280)
PREFILL = dict(n_experts=8, d_model=512, ffn=256)


@pytest.mark.parametrize("recipe,n_tok,repeats", [("q2", 1, False), ("q4", 2, True)])
def test_moe_decode_kernels_match_reference(build_dir, recipe, n_tok, repeats):
    emu = Emulator(build_dir)
    x, ids, w, mats = random_moe_case(np.random.default_rng([n_tok, len(recipe)]), recipe, n_tok, 6, repeats=repeats,
                                **DECODE)
    got = _run_moe(emu, x, ids, w, mats)
    assert [launch.kernel for launch in emu.launches] == ["moe_gate_up", "moe_down"]
    assert rel_err(got, reference_moe(x, ids, w, mats, LIMIT)) < RTOL


def test_moe_prefill_tiles_match_reference(build_dir):
    emu = Emulator(build_dir)
    n_tok, k = 40, 6
    x, ids, w, mats = random_moe_case(np.random.default_rng(40), "q2", n_tok, k, repeats=True, **PREFILL)
    # The cases the grouping must get right really occur: an expert with more
    # pairs than one tile holds, and a token that picked one expert twice.
    assert np.bincount(ids.ravel()).max() > kc.MOE_TILE_PAIRS
    assert any(len(set(row)) < k for row in ids.tolist())
    got = _run_moe(emu, x, ids, w, mats)
    assert [launch.kernel for launch in emu.launches] == ["moe_gate_up_tiled", "moe_down_tiled"]
    assert rel_err(got, reference_moe(x, ids, w, mats, LIMIT)) < RTOL


@pytest.mark.parametrize("n_tok,shape", [(3, DECODE), (9, PREFILL)], ids=["decode", "prefill"])
def test_moe_ignores_expert_ids_out_of_range(build_dir, n_tok, shape):
    emu = Emulator(build_dir)
    x, ids, w, mats = random_moe_case(np.random.default_rng([n_tok, 99]), "q2", n_tok, 6, repeats=True, **shape)
    bad = ids.copy()
    bad[0, 0], bad[-1, -1] = -1, shape["n_experts"]
    kept = w.copy()
    kept[0, 0] = kept[-1, -1] = 0.0  # the reference: those slots add nothing
    got = _run_moe(emu, x, bad, w, mats)
    assert rel_err(got, reference_moe(x, ids, kept, mats, LIMIT)) < RTOL


def test_moe_decode_on_wave64_through_the_hip_branch(build_dir):
    """portable.cuh's HIP code with MG_WARP = 64, launched with warp_rows_geometry(warp=64);
    rows 72 chunks wide, so lanes 32..63 carry real partial sums."""
    emu = Emulator(build_dir, platform="hip", warp=64)
    shape = dict(n_experts=8, d_model=2304, ffn=2304)
    x, ids, w, mats = random_moe_case(np.random.default_rng(64), "q2", 1, 6, repeats=False, **shape)
    got = _run_moe(emu, x, ids, w, mats)
    gate_up, down = emu.launches
    assert gate_up.geometry == kc.warp_rows_geometry(shape["ffn"], 6, warp=64) != kc.warp_rows_geometry(shape["ffn"], 6)
    assert down.geometry == kc.warp_rows_geometry(shape["d_model"], 1, warp=64)
    assert rel_err(got, reference_moe(x, ids, w, mats, LIMIT)) < RTOL


# ---------------------------------------------------------------------------
# The emulator's own checks: what it reports when a kernel breaks the rules


@dataclass(frozen=True)
class _InlineKernel(kc.KernelSpec):
    source: str = ""

    @property
    def body(self) -> str:
        return self.source


_SELF_TEST = _InlineKernel("emu_self_test", (("x", "float"), ("params", "int32_t")), ("y",), (), source="""
const int mode = params[0], t = threadIdx.x;
if (mode == 1 && t >= 32) return;  // then a barrier the returned threads never reach
if (mode == 1) __syncthreads();
if (mode == 2 && t == 5) return;  // then a shuffle without lane 5
if (mode == 3) { y[t] = reinterpret_cast<const float4*>(x + 1)->x; return; }  // misaligned float4
if (mode == 4) { y[t + 1] = x[t]; return; }  // one past the end of y
const float s = mg_warp_sum(x[t]);
if (mode == 5 && t == 7) return;  // a missed write
y[t] = t % MG_WARP == 0 ? s : x[t];
""")


@pytest.fixture(scope="module")
def self_test(build_dir):
    emu = Emulator(build_dir)
    emu.kernels[_SELF_TEST.name] = _SELF_TEST
    x = np.arange(64, dtype=np.float32)

    def run(mode, params_dtype=np.int32):
        (y,) = emu.launch(_SELF_TEST.name, [x, np.array([mode], params_dtype)], [(64,)], ((64, 1, 1), (64, 1, 1)), {})
        return y
    return x, run


def test_emulated_warp_sum_and_missed_writes(self_test):
    x, run = self_test
    expected = x.copy()
    expected[[0, 32]] = x[:32].sum(), x[32:].sum()
    assert np.array_equal(run(0), expected)
    missed = run(5)
    assert np.isnan(missed[7]) and np.array_equal(np.delete(missed, 7), np.delete(expected, 7))


@pytest.mark.parametrize("mode,message", [(1, "__syncthreads"), (2, "shuffle"), (3, "misaligned"),
                                          (4, "outside buffer y")])
def test_emulator_reports_broken_kernels(self_test, mode, message):
    _, run = self_test
    with pytest.raises(EmulatorError, match=message):
        run(mode)


def test_emulator_refuses_an_input_of_another_dtype(self_test):
    _, run = self_test
    with pytest.raises(EmulatorError, match="const int32_t"):
        run(0, params_dtype=np.int64)
