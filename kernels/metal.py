"""The Metal backend: ``kernels/metal/*.metal`` run through ``mx.fast.metal_kernel``.

Layout of the sources (docs/spec/quant-kernels.md §2.2, §2.3, §2.5, §4.1):

* ``metal/blocks.metal`` holds the per-type block decoders (F32, F16, Q8_0,
  Q2_K, Q4_K, IQ2_XXS) as ``MgChunk<QT>`` and the staging of the IQ2_XXS
  tables into threadgroup memory; ``metal/common.metal`` the simdgroup dot
  loop, the threadgroup tile loops and the MoE helpers all kernels share.
  ``header()`` pastes them after the IQ2_XXS tables, which are emitted here
  as ``constant`` arrays from ``reference.IQ2XXS_GRID``/``IQ2XXS_SIGNS``.
* Every other ``metal/<kernel>.metal`` is a kernel *body*: MLX generates the
  signature (a pointer per input and output, a ``constant`` reference per
  0-d input, the thread-position attributes the body mentions, template
  values as a real ``template <...>``). ``generated_source()`` imitates that
  text for reviews and checks; the docstring at the top of each body gives
  its inputs, template and launch geometry.

Kernels (threadgroups of simdgroups of 32; grids counted in threads):

* ``dequantize``: one thread per 32-value chunk of the selected rows.
* ``matvec`` (up to ``MATVEC_MAX_TOKENS`` tokens): a simdgroup per ``NR``
  rows, lanes over the row's chunks, ``simd_sum``; with ``G`` row groups
  it is also the grouped product of the attention output (group g's rows
  read x's g-th slice); ``matmul_tiled`` above:
  64 rows x 32 tokens per threadgroup through threadgroup memory.
* MoE decode (up to ``MOE_DECODE_MAX_TOKENS`` tokens): ``moe_gate_up`` per
  (token, slot) pair, gate and up rows together with shared activations and
  the clamp / SiLU / route weight epilogue, writing ``mid [T, K, F]``; then
  ``moe_down``, which loops over the K slots inside and writes each output
  once. Expert ids are read on the device (no host sync).
* MoE prefill: the pairs are grouped by expert with MLX ops on the device
  (``moe_groups``); ``moe_gate_up_tiled`` and ``moe_down_tiled`` run tiles of
  up to ``MOE_TILE_PAIRS`` pairs of one expert, so each weight chunk is
  decoded once per tile; the per-pair down products are summed over slots
  with ``mx.sum``.
* ``hc_pre``: the hyper-connection input step (RMS norm, the mix product with
  the fn matrix as stored, sigmoids, softmax and Sinkhorn, the weighted sum
  of the streams), a threadgroup of 256 threads per token.
* ``hc_post``: the hyper-connection output step, a thread per (value, token).
* ``attn_state``, ``attn_index``, ``attn_core``: one token's decode attention
  after its projections (``GpuBackend.attention_decode`` says how they split).

All activations, decoded weights and sums are f32 (no Q8_K activations; no
half tiles), so products agree with the float64 reference to ~1e-6 and
``dequantize`` bit for bit. Fixed model dimensions and types are template
values (one Metal library per shape); per-call values (token counts, the
clamp limit) are 0-d inputs. Weights are raw GGUF bytes (uint8); blocks
are read with the formats' alignment (2 bytes for Q8_0 / IQ2_XXS), and F32 /
F16 rows as float4 / half4, so buffers (and slices of them) must start
16-byte aligned, as whole rows of any MLX allocation do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from .base import BackendUnavailable
from .formats import GGMLType
# Re-exported under this module's name too: tests and the docs above name them as ``metal.X``.
from .gpu import (ATTN_CORE_INPUTS, ATTN_CORE_TEMPLATES, ATTN_INDEX_TEMPLATES, ATTN_STATE_INPUTS,
                  ATTN_STATE_OUTPUTS, ATTN_STATE_TEMPLATES, CHUNK, MATVEC_MAX_TOKENS, MOE_DECODE_MAX_TOKENS,
                  MOE_TILE_PAIRS, Geometry, GpuBackend, dequantize_geometry, moe_max_tiles, moe_tiled_geometry,
                  raw_bytes, tiled_geometry)
from .reference import IQ2XXS_GRID, IQ2XXS_SIGNS

SOURCE_DIR = Path(__file__).with_name("metal")
HEADER_FILES = ("blocks.metal", "common.metal", "attention.metal")  # pasted after the tables, in this order

SIMD = 32  # lanes per simdgroup on every Apple GPU
SIMDGROUPS = 2  # simdgroups per threadgroup of the simdgroup-per-rows kernels
DENSE_TILE_TOKENS = 32  # BN of matmul_tiled (the thresholds and tile sizes both APIs share are in gpu.py)


def rows_per_simdgroup(*qtypes: int) -> int:
    """NR: rows one simdgroup computes at once. The 2-bit types are cheap to
    decode, so more rows share each activation load (as ds4 does)."""
    cheap = {GGMLType.IQ2_XXS, GGMLType.Q2_K}
    return 4 if all(GGMLType(q) in cheap for q in qtypes) else 2


@dataclass(frozen=True)
class KernelSpec:
    """One kernel body and what MLX is told about it."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]  # float32 outputs
    templates: tuple[str, ...]  # int template parameters, in template= order

    @property
    def body(self) -> str:
        return _read(f"{self.name}.metal")


KERNELS = {k.name: k for k in (
    KernelSpec("dequantize", ("w", "sel", "n_sel"), ("out",), ("QT", "ROWS", "COLS")),
    KernelSpec("matvec", ("w", "x", "n_tok"), ("y",), ("QT", "ROWS", "COLS", "NR", "NT", "G")),
    KernelSpec("matmul_tiled", ("w", "x", "n_tok"), ("y",), ("QT", "ROWS", "COLS", "BN")),
    KernelSpec("moe_gate_up", ("x", "ids", "weights", "gate", "up", "limit"), ("mid",),
               ("QTG", "QTU", "F", "D", "K", "E", "NR")),
    KernelSpec("moe_down", ("mid", "ids", "down"), ("y",), ("QT", "D", "F", "K", "E", "NR")),
    KernelSpec("moe_gate_up_tiled",
               ("x", "order", "tile_end", "group_end", "weights", "gate", "up", "limit"), ("mid",),
               ("QTG", "QTU", "F", "D", "K", "E", "BN")),
    KernelSpec("moe_down_tiled", ("mid", "order", "tile_end", "group_end", "down"), ("y_pair",),
               ("QT", "D", "F", "K", "E", "BN")),
    KernelSpec("hc_pre", ("x", "fn", "scale", "base", "eps", "norm"), ("x_in", "post", "comb"),
               ("QT", "HC", "D", "ITERS", "NORM")),
    KernelSpec("hc_post", ("y", "x", "post", "comb"), ("x_out",), ("HC", "D")),
    KernelSpec("attn_state", ATTN_STATE_INPUTS, ATTN_STATE_OUTPUTS, ATTN_STATE_TEMPLATES),
    KernelSpec("attn_index", ("p", "q", "w", "rows"), ("score",), ATTN_INDEX_TEMPLATES),
    KernelSpec("attn_core", ATTN_CORE_INPUTS, ("o", "att"), ATTN_CORE_TEMPLATES),
)}


@lru_cache(maxsize=None)
def _read(filename: str) -> str:
    return (SOURCE_DIR / filename).read_text(encoding="ascii")  # Metal gets the source as ASCII


# ---------------------------------------------------------------------------
# Source assembly


def iq2_tables_source() -> str:
    """The IQ2_XXS grid (256 patterns x 2 little-endian words: byte i of word
    2g + i/4 is lane i's magnitude) and the 128 sign masks as ``constant``
    arrays, generated from the reference's tables."""
    words = np.ascontiguousarray(IQ2XXS_GRID, dtype=np.uint8).reshape(-1).view("<u4")
    grid = [", ".join(f"0x{int(v):08x}u" for v in words[i:i + 8]) for i in range(0, 512, 8)]
    signs = [", ".join(f"0x{int(v):02x}" for v in IQ2XXS_SIGNS[i:i + 16]) for i in range(0, 128, 16)]
    return ("// IQ2_XXS tables, generated by kernels/metal.py from kernels.reference.\n"
            "constant uint mg_iq2_grid[512] = {\n  " + ",\n  ".join(grid) + "};\n"
            "constant uint8_t mg_iq2_signs[128] = {\n  " + ",\n  ".join(signs) + "};\n")


@lru_cache(maxsize=None)
def header() -> str:
    """The ``header=`` text of every kernel: tables, decoders, shared loops."""
    return "\n".join([iq2_tables_source(), *(_read(f) for f in HEADER_FILES)])


# The thread attributes MLX declares for a body that mentions them (substring
# match, as MLX does), with their Metal types.
THREAD_ATTRIBUTES = {
    "dispatch_quadgroups_per_threadgroup": "uint", "dispatch_simdgroups_per_threadgroup": "uint",
    "dispatch_threads_per_threadgroup": "uint3", "grid_origin": "uint3", "grid_size": "uint3",
    "quadgroup_index_in_threadgroup": "uint", "quadgroups_per_threadgroup": "uint",
    "simdgroup_index_in_threadgroup": "uint", "simdgroups_per_threadgroup": "uint",
    "thread_execution_width": "uint", "thread_index_in_quadgroup": "uint",
    "thread_index_in_simdgroup": "uint", "thread_index_in_threadgroup": "uint",
    "thread_position_in_grid": "uint3", "thread_position_in_threadgroup": "uint3",
    "threadgroup_position_in_grid": "uint3", "threadgroups_per_grid": "uint3", "threads_per_grid": "uint3",
    "threads_per_simdgroup": "uint", "threads_per_threadgroup": "uint3",
}
_MSL_TYPES = {mx.uint8: "uint8_t", mx.int32: "int32_t", mx.float32: "float"}


def generated_source(spec: KernelSpec, template: dict[str, int], inputs: list[tuple[mx.Dtype, int, int]]) -> str:
    """The program MLX builds for ``spec`` (after its own utils.h): our header,
    then the body in the signature MLX generates. ``inputs`` gives each
    input's (dtype, ndim, size): 0-d inputs become ``constant`` references,
    inputs of fewer than 8 elements ``constant`` pointers, others ``device``."""
    params = []
    for name, (dtype, ndim, size) in zip(spec.inputs, inputs):
        space = "constant" if size < 8 else "device"
        params.append(f"  const {space} {_MSL_TYPES[dtype]}{'&' if ndim == 0 else '*'} {name}")
    params += [f"  device float* {name}" for name in spec.outputs]
    params += [f"  {t} {a} [[{a}]]" for a, t in THREAD_ATTRIBUTES.items() if a in spec.body]
    params = [f"{p} [[buffer({i})]]" if "[[" not in p else p for i, p in enumerate(params)]
    name = f"custom_kernel_mg_{spec.name}_" + "_".join(str(int(template[t])) for t in spec.templates)
    args = ", ".join(str(int(template[t])) for t in spec.templates)
    return (header() + "template <" + ", ".join(f"int {t}" for t in spec.templates) + ">\n"
            f"[[kernel]] void {name}(\n" + ",\n".join(params) + ") {\n" + spec.body + "\n}\n"
            f"\ntemplate [[host_name(\"{name}\")]] [[kernel]] decltype({name}<{args}>) {name}<{args}>;\n")


# ---------------------------------------------------------------------------
# Launch geometry (pure; grids in threads as MLX takes them). MLX shrinks a
# threadgroup to the grid where the grid is smaller, so every grid is a whole
# number of threadgroups. The tiled and dequantize grids are in gpu.py.


def decode_geometry(rows: int, grid_rows: int = 1, nr: int = 2, simdgroups: int = SIMDGROUPS,
                    simd: int = SIMD) -> Geometry:
    """matvec / moe_gate_up / moe_down: simdgroup v of threadgroup b owns rows
    (b * simdgroups + v) * nr .. + nr - 1; grid y is the (token, slot) pair
    (gate/up), the token (down) or 1 (matvec)."""
    threads = simdgroups * simd
    return (threads * math.ceil(rows / (simdgroups * nr)), grid_rows, 1), (threads, 1, 1)


def moe_groups(ids: mx.array, n_experts: int, bn: int = MOE_TILE_PAIRS) -> tuple[mx.array, mx.array, mx.array]:
    """Group the (token, slot) pairs by expert with MLX ops (on the device).

    Returns ``order`` (the pair index ``token * K + slot`` at each position
    of the expert-sorted list), and per group g (expert g; group
    ``n_experts`` collects ids outside [0, n_experts)) the inclusive running
    totals ``group_end[g]`` (pairs in groups 0..g) and ``tile_end[g]`` (tiles
    in groups 0..g, a group of n pairs making ceil(n / bn) tiles).
    """
    flat = ids.reshape(-1).astype(mx.int32)
    flat = mx.where((flat >= 0) & (flat < n_experts), flat, n_experts)
    order = mx.argsort(flat).astype(mx.int32)
    counts = mx.zeros((n_experts + 1,), mx.int32).at[flat].add(1)
    group_end = mx.cumsum(counts).astype(mx.int32)
    tile_end = mx.cumsum((counts + (bn - 1)) // bn).astype(mx.int32)
    return order, tile_end, group_end


# ---------------------------------------------------------------------------
# Kernel objects (built lazily; creating one works without Metal, running not)


@lru_cache(maxsize=None)
def _kernel(name: str):
    spec = KERNELS[name]
    return mx.fast.metal_kernel(name=f"mg_{name}", input_names=list(spec.inputs), output_names=list(spec.outputs),
                                source=spec.body, header=header(), ensure_row_contiguous=True)


def _run(name: str, inputs: list, shapes: list, geometry: Geometry, template: dict[str, int]) -> list[mx.array]:
    spec = KERNELS[name]
    grid, group = geometry
    return _kernel(name)(inputs=inputs, output_shapes=shapes, output_dtypes=[mx.float32] * len(shapes),
                         grid=grid, threadgroup=group, template=[(t, int(template[t])) for t in spec.templates])


class MetalBackend(GpuBackend):
    """Quantized dequantize / matmul / moe as Metal kernels on MLX's GPU."""

    name = "metal"
    dense_tile_tokens = DENSE_TILE_TOKENS

    def __init__(self):
        if not mx.metal.is_available():
            raise BackendUnavailable("the metal kernel backend needs an Apple GPU with MLX's Metal back-end "
                                     "(mx.metal.is_available() is False)")

    def _run(self, name, inputs, shapes, geometry, template):
        return _run(name, inputs, shapes, geometry, template)

    def _scalar(self, value, dtype=mx.int32):
        return mx.array(value, dtype=dtype)  # 0-d: a `constant` reference in the kernel, no recompile

    def _rows_geometry(self, rows, grid_rows, *qtypes, nr=None):
        nr = nr or rows_per_simdgroup(*qtypes)
        return nr, decode_geometry(rows, grid_rows, nr)

    def _moe_grouped(self, x, ids, route, lim, gate, up, down, dims):
        n_pairs, n_exp, d_model = ids.size, gate.n_experts, dims["D"]
        order, tile_end, group_end = moe_groups(ids, n_exp)
        (mid,) = _run("moe_gate_up_tiled", [x, order, tile_end, group_end, route, raw_bytes(gate), raw_bytes(up), lim],
                      [(n_pairs, dims["F"])], moe_tiled_geometry(dims["F"], n_pairs, n_exp),
                      dict(QTG=gate.ggml_type, QTU=up.ggml_type, BN=MOE_TILE_PAIRS, **dims))
        (y_pair,) = _run("moe_down_tiled", [mid, order, tile_end, group_end, raw_bytes(down)], [(n_pairs, d_model)],
                         moe_tiled_geometry(d_model, n_pairs, n_exp), dict(QT=down.ggml_type, BN=MOE_TILE_PAIRS, **dims))
        return mx.sum(y_pair.reshape(x.shape[0], dims["K"], d_model), axis=1)
