"""The CUDA backend (kernels/cuda.py, kernels/cuda/*): what can be checked without a GPU, and
numerics against the reference where MLX has its CUDA back-end.

Without a GPU: the generated translation unit (MLX's wrapper around every kernel body) compiles
with nvcc for compute_80 and compute_90, with hipcc for gfx90a (wave64) and gfx1030 (wave32),
and with NVRTC (what MLX itself uses) when its library is found; the emitted IQ2_XXS tables are
the reference's; every launch geometry covers each output exactly once; the expert tile map
groups every (token, slot) pair exactly once. The compilers run in parallel, started by one
fixture, and each test waits for its own.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from magnetar.kernels import GGMLType, reference
from magnetar.kernels import cuda as kc
from magnetar.kernels.backend import BackendUnavailable, QTensor, backend
from kernel_data import random_qtensor, random_routing

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.access("/usr/local/bin/nvcc", os.X_OK) else None)
HIPCC = shutil.which("hipcc")
HIP_DEVICE_LIBS = "/usr/lib/x86_64-linux-gnu/amdgcn/bitcode"
CUDA_HOME = Path(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda")
ON_CUDA = mx.cuda.is_available()
COMPILE_TIMEOUT = 600


def _nvrtc_library() -> str | None:
    """libnvrtc: $MAGNETAR_NVRTC, the nvidia-cuda-nvrtc wheel, or the system's."""
    if os.environ.get("MAGNETAR_NVRTC"):
        return os.environ["MAGNETAR_NVRTC"]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for lib in sorted(Path(root).glob("cu*/lib/libnvrtc.so*")) + sorted(Path(root).glob("cuda_nvrtc/lib/libnvrtc.so*")):
            if "alt" not in lib.name and "builtins" not in lib.name:
                return str(lib)
    return ctypes.util.find_library("nvrtc")


NVRTC = _nvrtc_library()

# Compiles the file argv[1] with NVRTC as MLX does (include paths of the toolkit and CCCL).
_NVRTC_SCRIPT = r"""
import ctypes, sys
lib = ctypes.CDLL(sys.argv[2])
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), open(sys.argv[1], "rb").read(), b"kernels.cu", 0, None, None) == 0
opts = [o.encode() for o in sys.argv[3:]]
rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
size = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value + 1)
lib.nvrtcGetProgramLog(prog, log)
sys.stderr.write(log.value.decode(errors="replace"))
sys.exit(rc)
"""


@pytest.fixture(scope="module")
def compile_jobs(tmp_path_factory):
    """Start every available compiler on the generated translation units at once."""
    out = tmp_path_factory.mktemp("cuda_tu")
    cu, hip = out / "kernels.cu", out / "kernels.hip"
    cu.write_text(kc.translation_unit("cuda"))
    hip.write_text(kc.translation_unit("hip"))
    jobs = {}

    def start(key, cmd, env=None):
        jobs[key] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})

    if NVCC:
        for arch in ("compute_80", "compute_90"):
            start(arch, [NVCC, "-ptx", f"-arch={arch}", str(cu), "-o", str(out / f"{arch}.ptx")])
    if HIPCC:
        # -O1: full code generation for both targets in half the time of -O3.
        start("hip", [HIPCC, "-x", "hip", "-std=c++17", "-O1", "-c", "--cuda-device-only",
                      "--offload-arch=gfx90a", "--offload-arch=gfx1030", f"--rocm-device-lib-path={HIP_DEVICE_LIBS}",
                      str(hip), "-o", str(out / "kernels.hip.o")], env={"HIP_PLATFORM": "amd"})
    if NVRTC:
        start("nvrtc", [sys.executable, "-c", _NVRTC_SCRIPT, str(cu), NVRTC, "--gpu-architecture=compute_80",
                        f"--include-path={CUDA_HOME / 'include' / 'cccl'}", f"--include-path={CUDA_HOME / 'include'}"],
              env={"LD_LIBRARY_PATH": str(Path(NVRTC).parent)})
    yield jobs, out
    for job in jobs.values():
        if job.poll() is None:
            job.kill()
            job.wait()


def _finished(compile_jobs, key) -> str:
    jobs, _ = compile_jobs
    output, _ = jobs[key].communicate(timeout=COMPILE_TIMEOUT)
    assert jobs[key].returncode == 0 and "error" not in output.lower(), f"{key} failed:\n{output[-6000:]}"
    return output


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (CUDA toolkit absent)")
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_nvcc_compiles_every_kernel(compile_jobs, arch):
    _finished(compile_jobs, arch)
    ptx = (compile_jobs[1] / f"{arch}.ptx").read_text()
    for name, template in kc.compile_check_instances():
        assert kc.kernel_function_name(kc.KERNELS[name], template) in ptx


@pytest.mark.skipif(HIPCC is None, reason="hipcc is not installed (apt-get install hipcc)")
def test_hipcc_compiles_for_gfx90a_and_gfx1030(compile_jobs):
    _finished(compile_jobs, "hip")
    assert (compile_jobs[1] / "kernels.hip.o").stat().st_size > 0


@pytest.mark.skipif(NVRTC is None, reason="libnvrtc not found (pip install nvidia-cuda-nvrtc, or set MAGNETAR_NVRTC)")
def test_nvrtc_compiles_what_mlx_would_jit(compile_jobs):
    _finished(compile_jobs, "nvrtc")


def test_translation_unit_wraps_each_body_as_mlx_does():
    tu = kc.translation_unit("cuda")
    assert "namespace mlx::core::cu {" in tu and tu.count("mg_iq2_grid[256] =") == 1
    for name, template in kc.compile_check_instances():
        assert f"__global__ void {kc.kernel_function_name(kc.KERNELS[name], template)}(" in tu
    assert {name for name, _ in kc.compile_check_instances()} == set(kc.KERNELS)
    on_disk = {p.stem for p in kc.SOURCE_DIR.glob("*.cu")}
    assert on_disk == set(kc.KERNELS), "every .cu body is a registered kernel"
    for spec in kc.KERNELS.values():  # MLX would add shape/stride parameters for these names
        for name, _ in spec.inputs:
            assert not re.search(rf"\b{name}_(shape|strides|ndim)", spec.body), (spec.name, name)
    spec = kc.KERNELS["moe_down"]
    wrapped = kc.wrapped_kernel(spec, dict(QT=10, D=64, F=32, K=6, E=4, NR=2))
    assert wrapped.startswith("__global__ void custom_kernel_moe_down_10_64_32_6_4_2(\n    const float* mid,\n"
                              "    const int32_t* ids,\n    const uint8_t* down,\n    float* y) {\n"
                              "  constexpr int QT = 10;\n")


def test_emitted_iq2_tables_equal_the_reference():
    text = kc.header()
    grid_src = re.search(r"mg_iq2_grid\[256\] = \{(.*?)\};", text, re.S).group(1)
    signs_src = re.search(r"mg_iq2_signs\[128\] = \{(.*?)\};", text, re.S).group(1)
    grid = np.array([int(v, 16) for v in re.findall(r"0x([0-9a-f]+)ull", grid_src)], dtype="<u8")
    signs = np.array([int(v, 16) for v in re.findall(r"0x([0-9a-f]+)", signs_src)], dtype=np.uint8)
    assert np.array_equal(grid.view(np.uint8).reshape(256, 8), reference.IQ2XXS_GRID)
    assert np.array_equal(signs, reference.IQ2XXS_SIGNS)
    assert text.index("mg_iq2_grid[256]") < text.index("struct MgTables")  # tables precede their use


# ---------------------------------------------------------------------------
# Launch geometry: replay each kernel's index arithmetic over its whole grid.


def _blocks(geometry):
    (gx, gy, gz), (tx, ty, tz) = geometry
    assert (ty, tz) == (1, 1)
    return math.ceil(gx / tx), math.ceil(gy / ty), math.ceil(gz / tz), tx


@pytest.mark.parametrize("n_sel,rows,cols", [(1, 1, 32), (3, 7, 96), (5, 13, 512), (2, 129, 4096)])
def test_dequantize_geometry_covers_every_chunk_once(n_sel, rows, cols):
    bx, by, bz, tx = _blocks(kc.dequantize_geometry(n_sel, rows, cols))
    assert (by, bz) == (1, 1)
    chunks = cols // 32
    g = np.arange(bx * tx)
    g = g[g < n_sel * rows * chunks]  # the kernel's bound check
    c, out_row = g % chunks, g // chunks
    sel, row = out_row // rows, out_row % rows
    seen = np.zeros((n_sel, rows, chunks), int)
    np.add.at(seen, (sel, row, c), 1)
    assert (seen == 1).all()


@pytest.mark.parametrize("warp", [32, 64])
@pytest.mark.parametrize("nr", [1, 2, 4])
@pytest.mark.parametrize("rows,grid_rows", [(1, 1), (15, 6), (16, 1), (17, 3), (100, 24), (2048, 2)])
def test_warp_rows_geometry_covers_every_row_and_pair_once(warp, nr, rows, grid_rows):
    geometry = kc.warp_rows_geometry(rows, grid_rows, nr=nr, warp=warp)
    bx, by, bz, tx = _blocks(geometry)
    assert by == grid_rows and bz == 1 and tx % warp == 0
    seen = np.zeros((grid_rows, rows), int)
    for b in range(bx):
        for v in range(tx // warp):  # row0 = (blockIdx.x * warps_per_block + warp_id) * NR
            row0 = (b * (tx // warp) + v) * nr
            for r in range(nr):
                if row0 + r < rows:  # written only below ROWS; other lanes compute a clamped row
                    seen[:, row0 + r] += 1
    assert (seen == 1).all()


@pytest.mark.parametrize("rows,n_tok,bn", [(1, 9, 64), (63, 17, 64), (65, 64, 64), (96, 65, 64), (130, 40, 32)])
def test_tiled_geometry_covers_every_output_once(rows, n_tok, bn):
    bx, by, bz, tx = _blocks(kc.tiled_geometry(rows, n_tok, bn))
    assert tx == 256 and bz == 1
    seen = np.zeros((rows, n_tok), int)
    ty, txx = np.divmod(np.arange(256), 16)
    for b in range(bx):
        for c in range(by):
            for i in range(4):
                for j in range(bn // 16):
                    row, tok = 64 * b + ty + 16 * i, bn * c + txx + 16 * j
                    ok = (row < rows) & (tok < n_tok)
                    np.add.at(seen, (row[ok], tok[ok]), 1)
    assert (seen == 1).all()


def _replay_tiles(ids: np.ndarray, n_experts: int, bn: int):
    """The grouped kernels' view: for each launched tile b, its pairs and expert."""
    order, sorted_ids, tile_id = (np.asarray(a) for a in kc.moe_tile_map(mx.array(ids), n_experts, bn))
    n_pairs = ids.size
    assert (np.diff(tile_id) >= 0).all() and tile_id[0] == 0
    tiles = []
    for b in range(kc.moe_max_tiles(n_pairs, n_experts, bn)):
        p0 = int(np.searchsorted(tile_id, b, side="left"))  # mg_tile_first
        if p0 >= n_pairs or tile_id[p0] != b:
            continue
        span = [p for p in range(p0, min(p0 + bn, n_pairs)) if tile_id[p] == b]
        tiles.append((int(sorted_ids[p0]), [int(order[p]) for p in span], {int(sorted_ids[p]) for p in span}))
    return tiles, int(tile_id[-1]) + 1


@pytest.mark.parametrize("n_tok,k,n_experts,bn,invalid", [(5, 6, 12, 32, False), (33, 6, 12, 32, False),
                                                           (40, 2, 3, 16, False), (17, 4, 256, 32, True),
                                                           (300, 6, 8, 32, True)])
def test_moe_tile_map_puts_every_pair_in_one_single_expert_tile(n_tok, k, n_experts, bn, invalid):
    rng = np.random.default_rng([n_tok, k, n_experts])
    ids = rng.integers(0, n_experts, size=(n_tok, k)).astype(np.int32)  # repeats included
    if invalid:
        ids[0, 0], ids[-1, -1], ids[n_tok // 2, 0] = -1, n_experts, n_experts + 7
    tiles, n_tiles = _replay_tiles(ids, n_experts, bn)
    assert len(tiles) == n_tiles <= kc.moe_max_tiles(ids.size, n_experts, bn)
    pairs = [p for _, members, _ in tiles for p in members]
    assert sorted(pairs) == list(range(ids.size))  # each (token, slot) exactly once
    flat = ids.reshape(-1)
    for expert, members, experts_seen in tiles:
        assert len(members) <= bn and experts_seen == {expert}
        for p in members:
            assert flat[p] == expert or (expert == n_experts and not 0 <= flat[p] < n_experts)
    # Tiles are as few as the grouping allows: ceil(n / bn) per expert.
    _, counts = np.unique(np.where((flat >= 0) & (flat < n_experts), flat, n_experts), return_counts=True)
    assert n_tiles == sum(math.ceil(c / bn) for c in counts)
    assert kc.moe_tiled_geometry(100, ids.size, n_experts, bn)[0] == (256 * kc.moe_max_tiles(ids.size, n_experts, bn),
                                                                       2, 1)


# ---------------------------------------------------------------------------
# The backends' availability here


@pytest.mark.skipif(ON_CUDA, reason="MLX has its CUDA back-end here")
def test_cuda_backend_is_unavailable_without_mlx_cuda():
    with pytest.raises(BackendUnavailable) as err:
        kc.CudaBackend()
    assert "\n" not in str(err.value) and "CUDA" in str(err.value)
    with pytest.raises(BackendUnavailable):
        backend("cuda")


def test_hip_backend_says_mlx_has_no_rocm_entry_point():
    with pytest.raises(BackendUnavailable, match="no ROCm kernel entry point") as err:
        backend("hip")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------
# Numerics on a CUDA device (tests/test_kernels_backends.py covers the common shapes)

needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="needs MLX with its CUDA back-end and a GPU")
ALL_TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.Q8_0, GGMLType.Q2_K, GGMLType.Q4_K, GGMLType.IQ2_XXS]


def _rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


@needs_cuda
@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_cuda_dequantize_is_bit_exact_on_odd_shapes(ggml_type):
    rng = np.random.default_rng(int(ggml_type))
    w = random_qtensor(rng, ggml_type, (3, 13, 1024))
    got = np.asarray(kc.CudaBackend().dequantize(QTensor(mx.array(w.data), ggml_type)))
    assert np.array_equal(got.view(np.uint32), reference.dequantize(w.data, ggml_type).view(np.uint32))
    plain = random_qtensor(rng, ggml_type, (9, 256))
    picked = np.array([[8, 0], [3, 3]], np.int32)  # rows of a plain matrix, as numpy indexing picks them
    got = np.asarray(kc.CudaBackend().dequantize(QTensor(mx.array(plain.data), ggml_type), mx.array(picked)))
    assert np.array_equal(got, reference.dequantize(plain.data, ggml_type)[picked])


@needs_cuda
@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols,n_tok", [(100, 4096, 1), (100, 4096, 8), (33, 512, 9), (130, 1024, 65)])
def test_cuda_matmul_on_odd_rows_and_both_paths(ggml_type, rows, cols, n_tok):
    rng = np.random.default_rng([int(ggml_type), rows, n_tok])
    w = random_qtensor(rng, ggml_type, (rows, cols))
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    got = kc.CudaBackend().matmul(mx.array(x), QTensor(mx.array(w.data), ggml_type))
    assert _rel_err(got, reference.matmul(x, w.data, ggml_type)) < 1e-5


def _moe_inputs(rng, recipe, n_tok, k, n_experts=9, d_model=512, ffn=256):
    types = {"q2": (GGMLType.IQ2_XXS, GGMLType.IQ2_XXS, GGMLType.Q2_K),
             "q4": (GGMLType.Q4_K, GGMLType.Q4_K, GGMLType.Q4_K)}[recipe]
    mats = [random_qtensor(rng, types[0], (n_experts, ffn, d_model)),
            random_qtensor(rng, types[1], (n_experts, ffn, d_model)),
            random_qtensor(rng, types[2], (n_experts, d_model, ffn))]
    x = (rng.standard_normal((n_tok, d_model)) * 6).astype(np.float32)
    ids, w = random_routing(rng, n_tok, n_experts, k, repeats=True)
    return x, ids, w, mats


@needs_cuda
@pytest.mark.parametrize("recipe", ["q2", "q4"])
@pytest.mark.parametrize("n_tok,k", [(4, 6), (5, 6), (3, 2), (70, 8)])
def test_cuda_moe_both_sides_of_the_decode_limit(recipe, n_tok, k):
    rng = np.random.default_rng([n_tok, k, len(recipe)])
    x, ids, w, mats = _moe_inputs(rng, recipe, n_tok, k)
    expected = reference.moe(x, ids, w, *[(m.data, m.ggml_type) for m in mats], 10.0)
    got = kc.CudaBackend().moe(mx.array(x), mx.array(ids), mx.array(w),
                               *[QTensor(mx.array(m.data), m.ggml_type) for m in mats], 10.0)
    assert _rel_err(got, expected) < 1e-5


@needs_cuda
@pytest.mark.parametrize("n_tok", [2, 9])
def test_cuda_moe_ignores_expert_ids_out_of_range(n_tok):
    rng = np.random.default_rng(n_tok)
    x, ids, w, mats = _moe_inputs(rng, "q2", n_tok, 3)
    bad = ids.copy()
    bad[0, 0], bad[-1, -1] = -1, 9
    kept = w.copy()
    kept[0, 0] = kept[-1, -1] = 0.0
    expected = reference.moe(x, ids, kept, *[(m.data, m.ggml_type) for m in mats], 10.0)
    got = kc.CudaBackend().moe(mx.array(x), mx.array(bad), mx.array(w),
                               *[QTensor(mx.array(m.data), m.ggml_type) for m in mats], 10.0)
    assert _rel_err(got, expected) < 1e-5


@needs_cuda
def test_cuda_moe_decode_traces_inside_compile():
    rng = np.random.default_rng(11)
    x, ids, w, mats = _moe_inputs(rng, "q2", 1, 6)
    as_mx = [QTensor(mx.array(m.data), m.ggml_type) for m in mats]
    be = kc.CudaBackend()
    step = mx.compile(lambda a, i, r: be.moe(a, i, r, *as_mx, 10.0))
    got = step(mx.array(x), mx.array(ids), mx.array(w))
    assert _rel_err(got, reference.moe(x, ids, w, *[(m.data, m.ggml_type) for m in mats], 10.0)) < 1e-5
