"""The Metal kernels' semantics, checked on the CPU: the real ``MetalBackend``
methods with every kernel launch run by tests/metal_emulator (one emulated
thread per Metal thread, the program MLX would compile, real threadgroup
barriers and simdgroup sums; its docstring says what that does and does not
prove), against ``kernels.reference``.

Covered: dequantize bit-exact for every weight type, with the expert list
in the ``constant`` address space (fewer than 8 entries) and in ``device``,
and with g++ fusing multiply-adds (as the Metal compiler may); matmul on
both paths (simdgroup-per-rows matvec up to 8 tokens, 64-row tiles beyond)
for every weight type, odd token counts and rows that fill no whole
threadgroup; the MoE decode kernels (fused gate/up per pair, down summing
the slots) and the grouped prefill kernels (device-side expert grouping,
repeated experts, an expert spanning two tiles, the smallest prefill),
between them on all six weight types; expert ids out of range. Products
agree within 1e-5 relative, as in test_kernels_backends.py. Row widths are
chosen so that the lanes of a simdgroup loop over more chunks than there are
lanes (a reduction that dropped lanes would show). Last, the emulator's own
checks: what it reports for kernels that break the rules.

Slow: every kernel instance is compiled with g++ (about 1 s each), cached in
pytest's cache directory across runs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest

from magnetar.kernels import GGMLType, reference
from magnetar.kernels import metal as km
from magnetar.kernels.backend import QTensor
from gpu_emulator.harness import CXX, EmulatorError, host_has_fma
from metal_emulator.emulator import Emulator, emulated_backend
from kernel_data import WEIGHT_TYPES, random_moe_case, random_qtensor, reference_moe, rel_err

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CXX is None, reason="g++ not found: the Metal emulator compiles the kernels with it"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Metal emulator's fibers need Linux (glibc)"),
]

RTOL = 1e-5
LIMIT = 10.0


@pytest.fixture(scope="session")
def build_dir(request, tmp_path_factory):
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("metal_emulator") if cache is not None else tmp_path_factory.mktemp("metal_emulator")


# ---------------------------------------------------------------------------
# dequantize


@pytest.mark.parametrize("ggml_type", WEIGHT_TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_exact(build_dir, ggml_type):
    emu = Emulator(build_dir)
    rng = np.random.default_rng(int(ggml_type))
    w = random_qtensor(rng, ggml_type, (3, 13, 512))
    expected = reference.dequantize(w.data, ggml_type)
    picked = np.array([2, 0, 2, 1, 1, 0, 2, 2, 1], np.int32)  # 9 entries: a `device` array (3: `constant`)
    with emulated_backend(emu) as be:
        whole = np.asarray(be.dequantize(QTensor(mx.array(w.data), ggml_type)))
        some = np.asarray(be.dequantize(QTensor(mx.array(w.data), ggml_type), mx.array(picked)))
    assert [launch.kernel for launch in emu.launches] == ["dequantize", "dequantize"]
    assert np.array_equal(whole.view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(some.view(np.uint32), expected[picked].view(np.uint32))


@pytest.mark.skipif(not host_has_fma(), reason="no FMA instructions here for g++ to contract into")
@pytest.mark.parametrize("ggml_type", [GGMLType.Q2_K, GGMLType.Q4_K], ids=lambda t: t.name)
def test_dequantize_stays_bit_exact_when_multiply_adds_fuse(build_dir, ggml_type):
    """The Metal compiler may fuse ``d * q - m`` into one FMA; blocks.metal
    argues that gives the same bits (the product is exact). g++
    -ffp-contract=fast fuses it here."""
    emu = Emulator(build_dir, contract=True)
    w = random_qtensor(np.random.default_rng(int(ggml_type) + 1), ggml_type, (2, 9, 1024))
    with emulated_backend(emu) as be:
        got = np.asarray(be.dequantize(QTensor(mx.array(w.data), ggml_type)))
    assert np.array_equal(got.view(np.uint32), reference.dequantize(w.data, ggml_type).view(np.uint32))


# ---------------------------------------------------------------------------
# matmul


@pytest.mark.parametrize("ggml_type,n_tok,kernel", [
    (GGMLType.IQ2_XXS, 1, "matvec"),  # NR = 4 rows per simdgroup
    (GGMLType.IQ2_XXS, 5, "matvec"),  # NT = 8 > n_tok: the bound on the token loop
    (GGMLType.IQ2_XXS, km.MATVEC_MAX_TOKENS + 1, "matmul_tiled"),
    (GGMLType.IQ2_XXS, 70, "matmul_tiled"),  # a third, partial token tile
    (GGMLType.Q2_K, 7, "matvec"),
    (GGMLType.Q2_K, 33, "matmul_tiled"),
    (GGMLType.Q4_K, 3, "matvec"),  # NR = 2
    (GGMLType.Q4_K, 17, "matmul_tiled"),
    (GGMLType.Q8_0, 3, "matvec"),  # 2-byte aligned blocks: f16 scale as ushort, codes as packed_char4
    (GGMLType.Q8_0, 9, "matmul_tiled"),
    (GGMLType.F16, 2, "matvec"),  # half4 weight loads
    (GGMLType.F16, 11, "matmul_tiled"),
    (GGMLType.F32, 1, "matvec"),  # float4 weight loads
    (GGMLType.F32, 9, "matmul_tiled"),
], ids=lambda v: getattr(v, "name", str(v)))
def test_matmul_matches_reference(build_dir, ggml_type, n_tok, kernel):
    rows, cols = 100, 1536  # 100: no whole threadgroup of rows; 48 chunks a row: lanes loop unevenly
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


# Decode: gate/up rows are 48 chunks wide, down rows 40, both more than a simdgroup's 32 lanes.
DECODE = dict(n_experts=8, d_model=1536, ffn=1280)
PREFILL = dict(n_experts=8, d_model=512, ffn=256)


@pytest.mark.parametrize("recipe,n_tok,repeats", [
    ("q2", 1, False),  # 6 ids and route weights: `constant` arrays
    ("q4", 2, True),
    ("q8", 3, False),
], ids=lambda v: str(v))
def test_moe_decode_kernels_match_reference(build_dir, recipe, n_tok, repeats):
    emu = Emulator(build_dir)
    x, ids, w, mats = random_moe_case(np.random.default_rng([n_tok, len(recipe)]), recipe, n_tok, 6, repeats=repeats,
                                **DECODE)
    got = _run_moe(emu, x, ids, w, mats)
    assert [launch.kernel for launch in emu.launches] == ["moe_gate_up", "moe_down"]
    assert rel_err(got, reference_moe(x, ids, w, mats, LIMIT)) < RTOL


@pytest.mark.parametrize("recipe,n_tok", [("q2", 40), ("f16", km.MOE_DECODE_MAX_TOKENS + 1)])
def test_moe_prefill_tiles_match_reference(build_dir, recipe, n_tok):
    emu = Emulator(build_dir)
    k = 6
    x, ids, w, mats = random_moe_case(np.random.default_rng(n_tok), recipe, n_tok, k, repeats=True, **PREFILL)
    if n_tok == 40:
        # The cases the grouping must get right really occur: an expert with more
        # pairs than one tile holds, and a token that picked one expert twice.
        assert np.bincount(ids.ravel()).max() > km.MOE_TILE_PAIRS
        assert any(len(set(row)) < k for row in ids.tolist())
    got = _run_moe(emu, x, ids, w, mats)
    assert [launch.kernel for launch in emu.launches] == ["moe_gate_up_tiled", "moe_down_tiled"]
    assert rel_err(got, reference_moe(x, ids, w, mats, LIMIT)) < RTOL


@pytest.mark.parametrize("recipe,n_tok,shape", [("q2", 3, DECODE), ("f32", 9, PREFILL)], ids=["decode", "prefill"])
def test_moe_ignores_expert_ids_out_of_range(build_dir, recipe, n_tok, shape):
    emu = Emulator(build_dir)
    x, ids, w, mats = random_moe_case(np.random.default_rng([n_tok, 99]), recipe, n_tok, 6, repeats=True, **shape)
    bad = ids.copy()
    bad[0, 0], bad[-1, -1] = -1, shape["n_experts"]
    kept = w.copy()
    kept[0, 0] = kept[-1, -1] = 0.0  # the reference: those slots add nothing
    got = _run_moe(emu, x, bad, w, mats)
    assert rel_err(got, reference_moe(x, ids, kept, mats, LIMIT)) < RTOL


# ---------------------------------------------------------------------------
# The emulator's own checks: what it reports when a kernel breaks the rules


@dataclass(frozen=True)
class _InlineKernel(km.KernelSpec):
    source: str = ""

    @property
    def body(self) -> str:
        return self.source


# Each self-test kernel has a template value: generated_source, like every real kernel, assumes some.
_SELF_TEST = _InlineKernel("emu_self_test", ("x", "params"), ("y",), ("N",), source="""
const uint t = thread_index_in_threadgroup;
const int mode = params[0];
threadgroup float staged[N];
if (mode == 1 && t >= 32) return;  // then a barrier the returned threads never reach
if (mode == 1) threadgroup_barrier(mem_flags::mem_threadgroup);
if (mode == 2 && t == 5) return;  // then a simd_sum without lane 5
if (mode == 3) { y[t] = ((const device float4*)(x + 1))->x; return; }  // misaligned float4
if (mode == 4) { y[t + 1] = x[t]; return; }  // one past the end of y
if (mode == 8) { y[t] = x[t + 200]; return; }  // far past the end of x
if (mode == 9) {  // half the threads at one barrier, half at another
  if (t < 32) threadgroup_barrier(mem_flags::mem_threadgroup);
  else threadgroup_barrier(mem_flags::mem_threadgroup);
  return;
}
if (mode == 10) {  // a simdgroup's lanes in two simd_sums
  if (t % 2) y[t] = simd_sum(x[t]);
  else y[t] = simd_sum(-x[t]);
  return;
}
if (mode == 6) { y[t] = staged[t]; return; }  // threadgroup memory nobody wrote
if (mode == 7) {  // threadgroup memory through a barrier: y reversed
  staged[t] = x[t];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[t] = staged[N - 1 - t];
  return;
}
const float s = simd_sum(x[t]);
if (mode == 5 && t == 7) return;  // a missed write
y[t] = thread_index_in_simdgroup == 0 ? s : x[t];
""")


@pytest.fixture(scope="module")
def self_test(build_dir):
    emu = Emulator(build_dir)
    emu.kernels[_SELF_TEST.name] = _SELF_TEST
    x = np.arange(64, dtype=np.float32)

    def run(mode, params_dtype=np.int32):
        (y,) = emu.launch(_SELF_TEST.name, [x, np.array([mode], params_dtype)], [(64,)], ((64, 1, 1), (64, 1, 1)),
                          dict(N=64))
        return y
    return x, run


def test_emulated_simd_sum_threadgroup_memory_and_missed_writes(self_test):
    x, run = self_test
    expected = x.copy()
    expected[[0, 32]] = x[:32].sum(), x[32:].sum()
    assert np.array_equal(run(0), expected)
    missed = run(5)
    assert np.isnan(missed[7]) and np.array_equal(np.delete(missed, 7), np.delete(expected, 7))
    assert np.isnan(run(6)).all()  # poisoned
    assert np.array_equal(run(7), x[::-1])


@pytest.mark.parametrize("mode,message", [(1, "threadgroup_barrier"), (2, "simd_sum"), (3, "misaligned"),
                                          (4, "outside buffer y"), (8, "memory fault"), (9, "divergent"),
                                          (10, "divergent")])
def test_emulator_reports_broken_kernels(self_test, mode, message):
    _, run = self_test
    with pytest.raises(EmulatorError, match=message):
        run(mode)


def test_emulator_refuses_more_threadgroup_memory_than_apple_gpus_have(build_dir):
    emu = Emulator(build_dir)
    emu.kernels[_SELF_TEST.name] = _SELF_TEST
    x = np.arange(64, dtype=np.float32)
    with pytest.raises(EmulatorError, match="32 KiB"):
        emu.launch(_SELF_TEST.name, [x, np.array([0], np.int32)], [(64,)], ((64, 1, 1), (64, 1, 1)), dict(N=8200))


def test_emulator_refuses_threadgroup_declarations_it_cannot_rewrite(build_dir):
    spec = _InlineKernel("emu_threadgroup_pair", ("x",), ("y",), ("N",), source="""
threadgroup float a[N], b[N];  // per thread, were it left as it is
y[0] = x[0];
""")
    emu = Emulator(build_dir)
    emu.kernels[spec.name] = spec
    with pytest.raises(EmulatorError, match="cannot rewrite"):
        emu.launch(spec.name, [np.ones(8, np.float32)], [(1,)], ((1, 1, 1), (1, 1, 1)), dict(N=4))


def test_emulator_keeps_constant_and_device_apart(build_dir):
    """MLX passes an input of fewer than 8 elements in the ``constant`` address
    space; a ``device`` parameter cannot take it, here as in MSL."""
    spec = _InlineKernel("emu_address_spaces", ("w",), ("y",), ("I",), source="y[I] = mg_f16_at(w);")
    emu = Emulator(build_dir)
    emu.kernels[spec.name] = spec
    one = np.float16(1.5).reshape(1).view(np.uint8)
    (y,) = emu.launch(spec.name, [np.tile(one, 4)], [(1,)], ((1, 1, 1), (1, 1, 1)), dict(I=0))  # 8 bytes: device
    assert y[0] == 1.5
    with pytest.raises(EmulatorError, match="volatile"):  # 2 bytes: constant
        emu.launch(spec.name, [one], [(1,)], ((1, 1, 1), (1, 1, 1)), dict(I=0))


_POSITIONS = _InlineKernel("emu_positions", ("x",), ("y",), ("K",), source="""
const uint3 g = thread_position_in_grid;
device float* out = y + (g.y * threads_per_grid.x + g.x) * K;
out[0] = threadgroup_position_in_grid.x;
out[1] = threads_per_threadgroup.x * threads_per_threadgroup.y;
out[2] = simdgroup_index_in_threadgroup;
out[3] = thread_index_in_simdgroup;
out[4] = simdgroups_per_threadgroup;
out[5] = simd_sum(x[0]);  // the lanes of this simdgroup
""")


@pytest.mark.parametrize("grid,group", [((100, 3, 1), (64, 2, 1)), ((20, 1, 1), (64, 1, 1))])
def test_emulated_positions_on_a_non_uniform_grid(build_dir, grid, group):
    """dispatchThreads: the threadgroups at the grid's edges hold only the
    threads inside it, and MLX clips the threadgroup to the grid."""
    emu = Emulator(build_dir)
    emu.kernels[_POSITIONS.name] = _POSITIONS
    (y,) = emu.launch(_POSITIONS.name, [np.ones(8, np.float32)], [(grid[1], grid[0], 6)], (grid, group), dict(K=6))
    tx, ty = min(group[0], grid[0]), min(group[1], grid[1])
    for gy in range(grid[1]):
        for gx in range(grid[0]):
            size = min(tx, grid[0] - gx // tx * tx) * min(ty, grid[1] - gy // ty * ty)
            lin = gx % tx + (gy % ty) * min(tx, grid[0] - gx // tx * tx)
            lanes = min(32, size - lin // 32 * 32)
            assert y[gy, gx].tolist() == [gx // tx, size, lin // 32, lin % 32, -(-size // 32), lanes]
