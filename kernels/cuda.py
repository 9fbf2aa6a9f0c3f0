"""The CUDA backend: ``kernels/cuda/*.cu`` run through ``mx.fast.cuda_kernel``.

Layout of the sources (docs/spec/quant-kernels.md §2.4, §2.5, §4.2):

* ``cuda/portable.cuh`` maps what differs between CUDA and HIP (headers,
  warp shuffles, the warp width ``MG_WARP``); ``cuda/blocks.cuh`` holds the
  per-type block decoders (F32, F16, Q8_0, Q2_K, Q4_K, IQ2_XXS);
  ``cuda/common.cuh`` the warp-dot and tile loops all product kernels share.
  ``header()`` pastes them together with the IQ2_XXS tables, emitted here as
  ``__constant__`` arrays from ``reference.IQ2XXS_GRID``/``IQ2XXS_SIGNS``.
* Each ``cuda/<kernel>.cu`` is a kernel *body*: MLX wraps it in the
  ``__global__`` signature it generates (pointer per input and output,
  template values as ``constexpr``), inside ``namespace mlx::core::cu``, and
  compiles it with NVRTC at first use. ``translation_unit()`` builds the same
  text as a standalone file, so nvcc (and hipcc, for the HIP build) can
  compile every kernel without a GPU; tests/test_kernels_cuda.py does.

All activations and sums are f32; weights are decoded in registers or shared
memory from the raw GGUF bytes (no Q8_K activations: ``__dp4a`` on Q8_K
would trade ~1e-3 relative error for speed, a later option). Fixed model
dimensions go in as templates (one NVRTC compile per shape); per-call
values (token counts, the clamp limit) as small input arrays.

Inputs are row-contiguous (``ensure_row_contiguous``) and the kernels read
f32 activations and F32 weights as ``float4``: their rows start 16-byte
aligned, as in any array MLX allocates or a slice of whole rows of one
(cols is a multiple of 32; other widths take an MLX-ops fallback).

Geometry: MLX grids count *threads*; the ``*_geometry`` functions below
return ``(grid, threadgroup)`` and are what the kernels' index arithmetic
assumes (documented at the top of each body).

``HipBackend`` exists for the factory only: no MLX release has a ROCm kernel
entry point (spec §4.3), so it cannot run; its sources are compile-checked.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from .base import Backend, BackendUnavailable
from .formats import GGMLType
# Re-exported under this module's name too: tests and the docs above name them as ``cuda.X``.
from .gpu import (ATTN_CORE_INPUTS, attention_templates, ATTN_CORE_TEMPLATES, ATTN_INDEX_TEMPLATES, ATTN_STATE_INPUTS,
                  ATTN_STATE_OUTPUTS, ATTN_STATE_TEMPLATES, CHUNK, MATVEC_MAX_TOKENS, MOE_DECODE_MAX_TOKENS,
                  MOE_TILE_PAIRS, Geometry, GpuBackend, dequantize_geometry, moe_max_tiles, moe_tiled_geometry,
                  raw_bytes, tiled_geometry)
from .reference import IQ2XXS_GRID, IQ2XXS_SIGNS

SOURCE_DIR = Path(__file__).with_name("cuda")
HEADER_FILES = ("portable.cuh", "blocks.cuh", "common.cuh", "attention.cuh")  # tables go after portable.cuh

WARP = 32  # NVIDIA; the HIP build uses the target's wavefront (MG_WARP)
WARP_THREADS = 256  # threads per block of the warp-per-rows kernels
ROWS_PER_WARP = 2  # NR of the warp-per-rows kernels
DENSE_TILE_TOKENS = 64  # BN of matmul_tiled (16 x 16 threads; the shared sizes are in gpu.py)


@dataclass(frozen=True)
class KernelSpec:
    """One kernel body and the signature MLX will generate for it."""

    name: str
    inputs: tuple[tuple[str, str], ...]  # (parameter name, C element type)
    outputs: tuple[str, ...]  # float32 outputs
    templates: tuple[str, ...]  # constexpr int names, in template= order

    @property
    def body(self) -> str:
        return _read(f"{self.name}.cu")


_W, _F, _I = "uint8_t", "float", "int32_t"
KERNELS = {
    "dequantize": KernelSpec("dequantize", (("w", _W), ("sel", _I), ("params", _I)), ("out",),
                             ("QT", "ROWS", "COLS")),
    "matvec": KernelSpec("matvec", (("w", _W), ("x", _F), ("params", _I)), ("y",),
                         ("QT", "ROWS", "COLS", "NR", "NT", "G")),
    "matmul_tiled": KernelSpec("matmul_tiled", (("w", _W), ("x", _F), ("params", _I)), ("y",),
                               ("QT", "ROWS", "COLS", "BN")),
    "moe_gate_up": KernelSpec(
        "moe_gate_up", (("x", _F), ("ids", _I), ("weights", _F), ("gate", _W), ("up", _W), ("limit", _F)),
        ("mid",), ("QTG", "QTU", "F", "D", "K", "E", "NR")),
    "moe_down": KernelSpec("moe_down", (("mid", _F), ("ids", _I), ("down", _W)), ("y",),
                           ("QT", "D", "F", "K", "E", "NR")),
    "moe_gate_up_tiled": KernelSpec(
        "moe_gate_up_tiled",
        (("x", _F), ("order", _I), ("sorted_ids", _I), ("tile_id", _I), ("weights", _F), ("gate", _W),
         ("up", _W), ("limit", _F), ("params", _I)),
        ("mid",), ("QTG", "QTU", "F", "D", "K", "E", "BN")),
    "moe_down_tiled": KernelSpec(
        "moe_down_tiled",
        (("mid", _F), ("order", _I), ("sorted_ids", _I), ("tile_id", _I), ("down", _W), ("params", _I)),
        ("y",), ("QT", "D", "F", "K", "E", "BN")),
    "hc_pre": KernelSpec("hc_pre", (("x", _F), ("fn", _W), ("scale", _F), ("base", _F), ("eps", _F), ("norm", _F)),
                         ("x_in", "post", "comb"), ("QT", "HC", "D", "ITERS", "NORM")),
    "hc_post": KernelSpec("hc_post", (("y", _F), ("x", _F), ("post", _F), ("comb", _F)), ("x_out",), ("HC", "D")),
    "attn_state": KernelSpec("attn_state", tuple((n, _I if n == "p" else _F) for n in ATTN_STATE_INPUTS),
                             ATTN_STATE_OUTPUTS, ATTN_STATE_TEMPLATES),
    "attn_index": KernelSpec("attn_index", (("p", _I), ("q", _F), ("w", _F), ("rows", _F)), ("score",),
                             ATTN_INDEX_TEMPLATES),
    "attn_core": KernelSpec("attn_core", tuple((n, _I if n == "p" else _F) for n in ATTN_CORE_INPUTS), ("o", "att"),
                            ATTN_CORE_TEMPLATES),
}


@lru_cache(maxsize=None)
def _read(filename: str) -> str:
    return (SOURCE_DIR / filename).read_text()


# ---------------------------------------------------------------------------
# Source assembly


def iq2_tables_source() -> str:
    """The IQ2_XXS grid (256 little-endian u64: byte i = lane i's magnitude)
    and sign bytes as ``__constant__`` arrays, generated from the reference."""
    grid = np.ascontiguousarray(IQ2XXS_GRID, dtype=np.uint8).view("<u8").reshape(256)
    rows = [", ".join(f"0x{int(v):016x}ull" for v in grid[i:i + 4]) for i in range(0, 256, 4)]
    signs = [", ".join(f"0x{int(v):02x}" for v in IQ2XXS_SIGNS[i:i + 16]) for i in range(0, 128, 16)]
    return ("// IQ2_XXS tables, generated by kernels/cuda.py from kernels.reference.\n"
            "__constant__ uint64_t mg_iq2_grid[256] = {\n  " + ",\n  ".join(rows) + "};\n"
            "__constant__ uint8_t mg_iq2_signs[128] = {\n  " + ",\n  ".join(signs) + "};\n")


@lru_cache(maxsize=None)
def header() -> str:
    """The ``header=`` text every kernel gets: portability, tables, decoders, loops."""
    first, *rest = HEADER_FILES
    return "\n".join([_read(first), iq2_tables_source(), *(_read(f) for f in rest)])


def kernel_function_name(spec: KernelSpec, template: dict[str, int]) -> str:
    """The name MLX gives the wrapped function (``custom_kernel_<name>`` plus template values)."""
    return f"custom_kernel_{spec.name}" + "".join(f"_{template[t]}" for t in spec.templates)


def wrapped_kernel(spec: KernelSpec, template: dict[str, int]) -> str:
    """``spec``'s body in the ``__global__`` wrapper MLX generates for it."""
    params = [f"    const {ctype}* {name}" for name, ctype in spec.inputs]
    params += [f"    float* {name}" for name in spec.outputs]
    consts = "".join(f"  constexpr int {t} = {int(template[t])};\n" for t in spec.templates)
    return (f"__global__ void {kernel_function_name(spec, template)}(\n" + ",\n".join(params) + ") {\n"
            + consts + "\n" + spec.body + "\n}\n")


_PRELUDE = {
    # What MLX's generated source starts with (its utils.cuh brings cuda_fp16
    # and the cuda::std headers); the `inf` macro is MLX's too, so a kernel
    # that used `inf` as a name would break here as it would there.
    "cuda": ("#include <cuda_fp16.h>\n#include <cuda/std/limits>\n#include <cooperative_groups.h>\n\n"
             "#define inf cuda::std::numeric_limits<float>::infinity()\n\n"),
    "hip": "#include <hip/hip_runtime.h>\n\n#define inf __builtin_huge_valf()\n\n",
}
_NAMESPACE = {"cuda": "mlx::core::cu", "hip": "mlx::core::rocm"}


def translation_unit(platform: str = "cuda", instances: list[tuple[str, dict[str, int]]] | None = None) -> str:
    """A standalone .cu file imitating MLX's generated source: prelude, our
    header, then each (kernel, template values) wrapped as MLX wraps it.
    ``platform`` is ``cuda`` (nvcc/NVRTC) or ``hip`` (hipcc)."""
    instances = compile_check_instances() if instances is None else instances
    parts = [_PRELUDE[platform], header(), f"\nnamespace {_NAMESPACE[platform]} {{\n\n"]
    if platform == "cuda":
        parts.append("namespace cg = cooperative_groups;\n\n")
    parts += [wrapped_kernel(KERNELS[name], template) + "\n" for name, template in instances]
    parts.append(f"}}  // namespace {_NAMESPACE[platform]}\n")
    return "".join(parts)


def compile_check_instances() -> list[tuple[str, dict[str, int]]]:
    """Every kernel with every weight type it serves, at small model-like sizes."""
    q = GGMLType
    all_types = [q.F32, q.F16, q.Q8_0, q.Q2_K, q.Q4_K, q.IQ2_XXS]
    recipes = [(q.IQ2_XXS, q.IQ2_XXS, q.Q2_K), (q.Q4_K, q.Q4_K, q.Q4_K), (q.Q8_0, q.Q8_0, q.Q8_0),
               (q.F32, q.F32, q.F32), (q.F16, q.F16, q.F16)]
    d, f, k, e = 1024, 512, 6, 16
    out = []
    for t in all_types:
        out.append(("dequantize", dict(QT=t, ROWS=64, COLS=d)))
        out.append(("matvec", dict(QT=t, ROWS=96, COLS=d, NR=ROWS_PER_WARP, NT=MATVEC_MAX_TOKENS, G=1)))
        out.append(("matmul_tiled", dict(QT=t, ROWS=96, COLS=d, BN=DENSE_TILE_TOKENS)))
    # the attention output's grouped low rank at Flash widths (8 groups of 1024 rows), one token
    out.append(("matvec", dict(QT=q.Q8_0, ROWS=8 * 1024, COLS=4096, NR=ROWS_PER_WARP, NT=1, G=8)))
    out.append(("matvec", dict(QT=q.Q8_0, ROWS=3 * 7, COLS=d, NR=1, NT=4, G=3)))  # odd groups: a row per warp
    for g, u, dn in recipes:
        out.append(("moe_gate_up", dict(QTG=g, QTU=u, F=f, D=d, K=k, E=e, NR=ROWS_PER_WARP)))
        out.append(("moe_down", dict(QT=dn, D=d, F=f, K=k, E=e, NR=ROWS_PER_WARP)))
        out.append(("moe_gate_up_tiled", dict(QTG=g, QTU=u, F=f, D=d, K=k, E=e, BN=MOE_TILE_PAIRS)))
        out.append(("moe_down_tiled", dict(QT=dn, D=d, F=f, K=k, E=e, BN=MOE_TILE_PAIRS)))
    for t in (q.F16, q.F32):  # V4 files store hc fn as F16; with and without the sublayer's norm
        out += [("hc_pre", dict(QT=t, HC=4, D=d, ITERS=20, NORM=norm)) for norm in (0, 1)]
    out.append(("hc_post", dict(HC=4, D=d)))
    for ratio, cap, official in ((0, 0, True), (128, 64, True), (4, 64, False), (4, 1024, True)):  # Flash widths
        tpl = attention_templates(64, 512, 128, ratio, 1e-6, official, 448, 32, cap, 64, 128, 512)
        out += list(tpl.items())
    return [(name, {key: int(v) for key, v in tpl.items()}) for name, tpl in out]


# ---------------------------------------------------------------------------
# Launch geometry (pure; grids in threads as MLX takes them); the tiled and
# dequantize grids are in gpu.py.


def warp_rows_geometry(rows: int, grid_rows: int = 1, nr: int = ROWS_PER_WARP, threads: int = WARP_THREADS,
                       warp: int = WARP) -> Geometry:
    """matvec / moe_gate_up / moe_down: each warp owns ``nr`` consecutive
    rows, a block ``threads // warp * nr``; grid y is the pair (gate/up) or
    token (down) index, 1 for matvec."""
    per_block = threads // warp * nr
    return (threads * math.ceil(rows / per_block), grid_rows, 1), (threads, 1, 1)


def moe_tile_map(ids: mx.array, n_experts: int, bn: int = MOE_TILE_PAIRS) -> tuple[mx.array, mx.array, mx.array]:
    """Group the (token, slot) pairs by expert with MLX ops, on the device.

    Returns ``order`` (pair index ``token * K + slot`` of each sorted
    position), ``sorted_ids`` (its expert; invalid ids become ``n_experts``)
    and ``tile_id``: sorted positions are cut into tiles of at most ``bn``
    pairs of one expert, numbered 0, 1, ... in order (non-decreasing).
    """
    flat = ids.reshape(-1).astype(mx.int32)
    flat = mx.where((flat >= 0) & (flat < n_experts), flat, n_experts)
    order = mx.argsort(flat).astype(mx.int32)
    sorted_ids = mx.take(flat, order)
    pos = mx.arange(flat.size, dtype=mx.int32)
    new_group = mx.concatenate([mx.array([True]), sorted_ids[1:] != sorted_ids[:-1]])
    group_start = mx.cummax(mx.where(new_group, pos, 0))
    tile_start = ((pos - group_start) % bn) == 0
    tile_id = mx.cumsum(tile_start.astype(mx.int32)) - 1
    return order, sorted_ids, tile_id


# ---------------------------------------------------------------------------
# Kernel objects (built lazily: creating one raises on an MLX without CUDA)


@lru_cache(maxsize=None)
def _kernel(name: str):
    spec = KERNELS[name]
    # MLX caches compiled PTX on disk by kernel name: a digest of the source
    # in the name keeps a changed kernel from running stale code.
    digest = hashlib.sha256((header() + spec.body).encode()).hexdigest()[:12]
    return mx.fast.cuda_kernel(name=f"magnetar_{name}_{digest}", input_names=[n for n, _ in spec.inputs],
                               output_names=list(spec.outputs), source=spec.body, header=header(),
                               ensure_row_contiguous=True)


def _run(name: str, inputs: list, shapes: list, geometry: Geometry, template: dict[str, int],
         init_value: float | None = None) -> list[mx.array]:
    spec = KERNELS[name]
    grid, group = geometry
    return _kernel(name)(inputs=inputs, output_shapes=shapes, output_dtypes=[mx.float32] * len(shapes),
                         grid=grid, threadgroup=group, template=[(t, int(template[t])) for t in spec.templates],
                         init_value=init_value)


def _ints(*values: int) -> mx.array:
    return mx.array(list(values), dtype=mx.int32)


class CudaBackend(GpuBackend):
    """Quantized dequantize / matmul / moe as CUDA kernels on MLX's CUDA device."""

    name = "cuda"
    dense_tile_tokens = DENSE_TILE_TOKENS

    def __init__(self):
        if not mx.cuda.is_available():
            raise BackendUnavailable("the cuda kernel backend needs MLX's CUDA back-end "
                                     "(mx.cuda.is_available() is False)")

    def _run(self, name, inputs, shapes, geometry, template):
        return _run(name, inputs, shapes, geometry, template)

    def _scalar(self, value, dtype=mx.int32):
        return mx.array([value], dtype=dtype)  # a one-element input: no recompile per value

    def _rows_geometry(self, rows, grid_rows, *qtypes, nr=None):
        nr = nr or ROWS_PER_WARP
        return nr, warp_rows_geometry(rows, grid_rows, nr)

    def _moe_grouped(self, x, ids, route, lim, gate, up, down, dims):
        n_pairs, n_exp, n_tok = ids.size, gate.n_experts, x.shape[0]
        order, sorted_ids, tile_id = moe_tile_map(ids, n_exp)
        params = _ints(n_pairs)
        (mid,) = _run("moe_gate_up_tiled",
                      [x, order, sorted_ids, tile_id, route, raw_bytes(gate), raw_bytes(up), lim, params],
                      [(n_pairs, dims["F"])], moe_tiled_geometry(dims["F"], n_pairs, n_exp),
                      dict(QTG=gate.ggml_type, QTU=up.ggml_type, BN=MOE_TILE_PAIRS, **dims))
        (y,) = _run("moe_down_tiled", [mid, order, sorted_ids, tile_id, raw_bytes(down), params],
                    [(n_tok, dims["D"])], moe_tiled_geometry(dims["D"], n_pairs, n_exp),
                    dict(QT=down.ggml_type, BN=MOE_TILE_PAIRS, **dims), init_value=0.0)
        return y


class HipBackend(Backend):
    """The HIP build of the same sources; not runnable through MLX (see module doc)."""

    name = "hip"

    def __init__(self):
        raise BackendUnavailable("MLX releases have no ROCm kernel entry point (no mx.fast hip/rocm kernel), "
                                 "so the HIP build of kernels/cuda is compile-checked only")
