"""The CPU backend: the native C expert kernels, else MLX ops and numpy's BLAS.

What is fastest here was measured (``magnetar bench kernels``; numbers in
README). The routed-expert step goes to ``native`` (C on the raw blocks,
compiled at first use) whenever a C compiler is present: 35-47x faster than
expanding the experts to f32, for one token and for many. With the MLX
extension (below) that kernel runs as a node of MLX's graph
(``mlx_ext.routed_experts``), so the decode step is one compiled graph;
without it the graph is cut around the host call (``host_moe``), which
costs an eval hand-off and a Python call per layer. Without a compiler the
fallback keeps one token inside MLX's compiled decode graph and sends many tokens through
numpy's OpenBLAS (the ``mlx[cpu]`` wheel links the reference BLAS, 20-50x
slower on products with many rows), expanding weights to f32 only for the
experts a batch uses, a bounded group at a time.

The hyper-connection steps are MLX primitives with C++ CPU kernels
(``mlx_ext``, also compiled at first use): one graph node each instead of
~106 and 5, inside the compiled graph. Measured against cutting the graph to
run hc_pre in numpy instead: one [1, 4, 256] call with its eval took ~110 µs
as the primitive, ~400 µs as MLX ops and ~380-450 µs cut to numpy (a busy
2-core VM). So is one token's attention after its dense projections
(``attention_decode``: norms, RoPE, the KV ring, compressors, indexer top-k,
attention with sinks): one node per layer instead of ~105 (sliding window),
~175 (ratio 128) or ~255 (ratio 4) on ``small``. Where the extension cannot be
built, the MLX ops stay.

Dense Q8_0 matrices stay as stored (mapped from the file, not widened to f32
at load) and a decode-sized product reads their blocks in one primitive
(``q8_matmul``, AVX2 where the CPU has it): ~5x faster than MLX's f32 product
of the widened matrix and ~6x faster than ``mx.quantized_matmul`` on the
``kernels/affine.py`` layout, which remains the fallback without the extension.
F16 matrices (the compressors, the indexer's, the router) stay as stored too, and
``f16_matmul`` widens their values in registers as it reads them: 2.5-9x faster
than MLX's f32 product of their widening at Flash widths (issue 16).
"""

from __future__ import annotations

import os
from functools import partial

import mlx.core as mx
import numpy as np

from . import jit_cache, mlx_ext, native
from .affine import AffineQ8
from .base import ROUTER_FLOOR, BackendUnavailable, QTensor
from .formats import GGMLType
from .dequant import dequantize
from .host import HOST_BLAS_MIN_ROWS, HostBackend

# An activation mode (backend.EXPERT_ACTIVATIONS) -> (the routed experts' activations, as
# native.moe takes them; the Q8_0 products', as mlx_ext.q8_matmul takes them).
ACTIVATION_MODES = {"f32": ("f32", "f32"), "q8k": ("q8k", "f32"), "q8": ("q8k", "q8_0")}
EXPERT_GROUP_BYTES = 256 << 20  # f32 expert weights expanded at once in the many-token path


def _expand(w: QTensor, experts: mx.array | None = None) -> mx.array:
    data = w.data
    if not isinstance(data, mx.array):  # a stack read in place: copy only the experts asked for
        data = mx.array(data if experts is None else np.asarray(data)[np.asarray(experts)])
    elif experts is not None:
        data = mx.take(data, experts, axis=0)
    return dequantize(data, int(w.ggml_type))


def _silu_clamped(g: np.ndarray, u: np.ndarray, limit: float) -> np.ndarray:
    g = np.minimum(g, limit)
    return g * (0.5 + 0.5 * np.tanh(0.5 * g)) * np.clip(u, -limit, limit)  # tanh form: no exp overflow


def _scatter_add(out: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
    """``out[rows] += values`` where a row may repeat (a token listing an expert twice gets both)."""
    if len(np.unique(rows)) == len(rows):
        out[rows] += values  # the usual case, and ~15x faster than np.add.at
    else:
        np.add.at(out, rows, values)


def _primitive(wanted: bool | None) -> bool:
    """Whether to use an ``mlx_ext`` primitive (None: when it can be, see ``CpuBackend``)."""
    if wanted is None:
        return os.environ.get("MAGNETAR_MLX_EXT", "1") != "0" and mlx_ext.available()
    if wanted and not mlx_ext.available():
        raise BackendUnavailable(f"MLX CPU extension unavailable: {mlx_ext.unavailable_reason()}")
    return wanted


class CpuBackend(HostBackend):
    name = "cpu"

    def __init__(self, use_native: bool | None = None, fused_hc: bool | None = None, q8_codes: bool | None = None,
                 f16_codes: bool | None = None, fused_attention: bool | None = None, fused_experts: bool | None = None,
                 expert_activations: str | None = None):
        """``use_native``: None picks the native kernels when they build here and
        ``$MAGNETAR_NATIVE`` is not ``0`` (the escape hatch if a build misbehaves).
        The MLX primitives (``mlx_ext``), each None: on when the extension builds and loads here
        and ``$MAGNETAR_MLX_EXT`` is not ``0``. ``fused_hc``: ``hc_pre`` (with the norm after it),
        ``hc_post``, ``rmsnorm``, ``route`` and ``norm_rope`` as one node each. ``f16_codes``: decode-sized F16 products by ``mlx_ext.f16_matmul`` on the
        values as stored. ``q8_codes``: decode-sized Q8_0 products by ``mlx_ext.q8_matmul`` on the
        blocks as stored. ``fused_attention``: ``attention_decode`` as one node. ``fused_experts``
        (with the native kernels): ``moe`` as one node that runs them, so the decode step is one
        compiled graph instead of a graph cut at every layer's experts. ``expert_activations``
        (None: ``$MAGNETAR_EXPERT_ACT``, else ``f32``): ``q8k`` quantizes the routed experts'
        activations to 8 bits for their IQ2_XXS/Q2_K/Q4_K products, as ds4's and llama.cpp's CPU
        paths do (``native.moe``): faster, ~1e-2 relative per expert output. ``q8`` does that and
        gives the decode-sized Q8_0 products (attention, shared expert, head) Q8_0 activations
        (``mlx_ext.q8_matmul``), llama.cpp's arithmetic for them: faster, ~0.5% per product."""
        # The compiled decode step's kernels go where jit_cache's machine-wide link points;
        # one left dangling (that cache deleted since) fails every MLX CPU compile, so the
        # backend sets it right first (a readlink when it already is).
        jit_cache.persist()
        if use_native is None:
            use_native = os.environ.get("MAGNETAR_NATIVE", "1") != "0" and native.available()
        elif use_native and not native.available():
            raise BackendUnavailable(f"native CPU kernels unavailable: {native.unavailable_reason()}")
        self.native = use_native
        self.fused_hc, self.q8_codes, self.fused_attention = map(_primitive, (fused_hc, q8_codes, fused_attention))
        self.f16_codes = _primitive(f16_codes)
        if fused_experts and not self.native:
            raise BackendUnavailable("fused experts run the native CPU kernels, which are off")
        self.fused_experts = self.native and _primitive(fused_experts)
        self.host_moe = self.native and not self.fused_experts
        self.expert_activations = expert_activations or os.environ.get("MAGNETAR_EXPERT_ACT") or "f32"
        if self.expert_activations not in ACTIVATION_MODES:
            source = "" if expert_activations else " (MAGNETAR_EXPERT_ACT)"
            raise BackendUnavailable(f"expert activations must be one of {', '.join(ACTIVATION_MODES)}, "
                                     f"got {self.expert_activations!r}{source}")
        self._moe_activations, self._q8_activations = ACTIVATION_MODES[self.expert_activations]
        if self.expert_activations != "f32" and not self.native:
            raise BackendUnavailable(f"{self.expert_activations} expert activations run the native CPU kernels, "
                                     "which are off")
        if self._q8_activations != "f32" and not self.q8_codes:
            raise BackendUnavailable(f"{self.expert_activations} activations run the MLX extension's Q8_0 "
                                     "products, which are off")

    @property
    def streams_experts(self) -> bool:
        return self.native

    def dequantize(self, w: QTensor, experts: mx.array | None = None) -> mx.array:
        return _expand(w, experts)

    def expert_stack(self, raw: np.ndarray):
        # The native kernels read the file's pages where they lie: a copy would hold the
        # experts (most of the model) twice, once in the page cache and once anonymous.
        return raw if self.native else mx.array(raw)

    def _fused_hc_reads(self, fn) -> bool:
        """Whether the fused hc_pre takes this mix matrix (F16 as stored, or widened)."""
        return self.fused_hc and fn.data.dtype in (mx.float32, mx.float16, mx.bfloat16)

    def hc_pre(self, X, fn, scale, base, params):
        if self._fused_hc_reads(fn):
            return mlx_ext.hc_pre(X.astype(mx.float32), fn.data, scale, base, params)
        return super().hc_pre(X, fn, scale, base, params)

    def hc_pre_norm(self, X, fn, scale, base, params, norm):
        if self._fused_hc_reads(fn):
            return mlx_ext.hc_pre(X.astype(mx.float32), fn.data, scale, base, params, norm.astype(mx.float32))
        return super().hc_pre_norm(X, fn, scale, base, params, norm)

    def rmsnorm(self, x, weight, eps):
        if self.fused_hc and x.ndim == 2:
            return mlx_ext.rms_norm(x.astype(mx.float32), weight.astype(mx.float32), eps)
        return super().rmsnorm(x, weight, eps)

    def norm_rope(self, x, cos, sin, eps=None, weight=None, sign=1.0):
        if self.fused_hc:
            return mlx_ext.norm_rope(x.astype(mx.float32), cos, sin, eps,
                                     None if weight is None else weight.astype(mx.float32), sign)
        return super().norm_rope(x, cos, sin, eps, weight, sign)

    def route(self, logits, k, bias=None, chosen=None, norm=True, scale=1.0):
        if self.fused_hc and logits.ndim == 2:
            return mlx_ext.route(logits.astype(mx.float32), k, None if bias is None else bias.astype(mx.float32),
                                 None if chosen is None else chosen.astype(mx.int32), norm, scale, ROUTER_FLOOR)
        return super().route(logits, k, bias, chosen, norm, scale)

    def attention_decode(self, step, shape):
        if self.fused_attention:
            return mlx_ext.attention_decode(step, shape)
        return super().attention_decode(step, shape)

    def pool_windows(self, kv, sc, n, ratio, dim):
        if self.fused_attention:
            return mlx_ext.pool_windows(kv, sc, n, ratio, dim)
        return super().pool_windows(kv, sc, n, ratio, dim)

    def hc_post(self, y, X, post, comb):
        if self.fused_hc:
            return mlx_ext.hc_post(*(a.astype(mx.float32) for a in (y, X, post, comb)))
        return super().hc_post(y, X, post, comb)

    def matmul(self, x: mx.array, w: QTensor | AffineQ8) -> mx.array:
        """``x @ W.T``; with many rows it evaluates its inputs (host-paced code only)."""
        wide = w.dequantize if isinstance(w, AffineQ8) else lambda: _expand(w)
        if x.shape[0] >= HOST_BLAS_MIN_ROWS:
            if self.native and isinstance(w, QTensor) and w.ggml_type in native.SUPPORTED:  # panels, never whole
                return mx.array(native.panel_matmul(np.asarray(x), np.asarray(w.data), w.ggml_type))
            return mx.array(np.asarray(x) @ np.asarray(wide()).T)
        if isinstance(w, AffineQ8):  # from the codes: no f32 copy of the matrix per token
            return w.matmul(x)
        if self.q8_codes and w.ggml_type == GGMLType.Q8_0:  # one node reading the blocks as stored
            return mlx_ext.q8_matmul(x, w.data, activations=self._q8_activations)
        if self.f16_codes and w.ggml_type == GGMLType.F16:  # the same for F16 (no f32 copy to read)
            return mlx_ext.f16_matmul(x, w.data)
        return x @ wide().T

    def matmuls(self, x, ws):
        """One node (``mlx_ext.codes_matmuls``) when the codes products read every matrix as
        stored and the rows are few; otherwise one product each."""
        stored = [self._stored(w) for w in ws]
        if len(ws) > 1 and x.ndim == 2 and x.shape[0] < HOST_BLAS_MIN_ROWS and all(w is not None for w in stored):
            return mlx_ext.codes_matmuls(x, stored, self._q8_activations)
        return super().matmuls(x, ws)

    def swiglu_ffn(self, x, gate, up, down, limit, plus=None):
        """One node (``mlx_ext.swiglu_ffn``) when every matrix is read as stored by the codes
        products and the rows are few; otherwise three products, the gating and the sum."""
        stored = [self._stored(m) for m in (gate, up, down)]
        if x.ndim == 2 and x.shape[0] < HOST_BLAS_MIN_ROWS and all(m is not None for m in stored):
            return mlx_ext.swiglu_ffn(x, *stored, limit, plus, self._q8_activations)
        return super().swiglu_ffn(x, gate, up, down, limit, plus)

    def _stored(self, m) -> QTensor | None:
        """A model matrix as the codes products read it (Q8_0 blocks or F16 values as stored), or None."""
        if m.ggml_type == GGMLType.Q8_0 and self.q8_codes and m.data is not None:
            return QTensor(m.data, GGMLType.Q8_0)
        if m.ggml_type == GGMLType.F16 and self.f16_codes:
            return QTensor(m.data, GGMLType.F16)
        return None

    def pack(self, w: QTensor) -> AffineQ8 | None:
        """Without ``q8_codes``, Q8_0 as MLX's 8-bit quantization (kernels/affine.py): exact, and
        multiplied as codes. With it the blocks stay as stored (mapped from the file)."""
        if self.q8_codes or w.ggml_type != GGMLType.Q8_0 or w.n_experts:
            return None
        return AffineQ8.of(np.asarray(w.data))

    def grouped_matmul(self, x, w, groups=None):
        G = groups or x.shape[1]  # the codes products take x [T, ...] as it is: no reshape node
        if self.q8_codes and w.ggml_type == GGMLType.Q8_0 and x.shape[0] < HOST_BLAS_MIN_ROWS:
            return mlx_ext.q8_matmul(x, mx.view(w.data, mx.uint8), groups=G, activations=self._q8_activations)
        if self.f16_codes and w.ggml_type == GGMLType.F16 and x.shape[0] < HOST_BLAS_MIN_ROWS:
            return mlx_ext.f16_matmul(x, w.data, groups=G)
        if (self.native and x.shape[0] >= HOST_BLAS_MIN_ROWS and w.data is not None
                and w.ggml_type != GGMLType.F32 and w.ggml_type in native.SUPPORTED):  # as ``matmul``: panels
            xs, raw = np.asarray(x).reshape(x.shape[0], G, -1), np.asarray(mx.view(w.data, mx.uint8))
            rows = raw.shape[0] // G
            y = np.empty((x.shape[0], raw.shape[0]), np.float32)
            for g in range(G):
                group = slice(g * rows, (g + 1) * rows)
                native.panel_matmul(xs[:, g], raw[group], w.ggml_type, out=y[:, group])
            return mx.array(y)
        return super().grouped_matmul(x, w, groups)

    def widens(self, ggml_type: int) -> bool:
        """``q8_codes`` reads a Q8_0 matrix ~5x faster than MLX multiplies its f32 widening (bench
        kernels), ``f16_codes`` an F16 one 2.5-9x (tests/test_f16_codes.py's module doc)."""
        return not ((self.q8_codes and ggml_type == GGMLType.Q8_0) or (self.f16_codes and ggml_type == GGMLType.F16))

    def logits_head(self, output):
        """A Q8_0 head with ``q8_codes``, an F16 one with ``f16_codes``: a few rows from the
        weights as stored (a fourth or half of the f32 copy's bytes per token), many rows (every
        prompt position's logits) by ``native.panel_matmul`` on them, so there is never a whole f32
        copy (2 GB at Flash widths, held for good). Without the native kernels many rows go
        through the host's f32 copy, made at first use."""
        wide = super().logits_head(output)
        codes = {GGMLType.Q8_0: self.q8_codes and partial(mlx_ext.q8_matmul, activations=self._q8_activations),
                 GGMLType.F16: self.f16_codes and mlx_ext.f16_matmul}.get(output.ggml_type)
        if not codes:
            return wide
        stored = mx.view(output.data, mx.uint8)
        many = wide
        if self.native:
            raw = np.asarray(stored)  # shares the stored buffer
            many = lambda y: native.panel_matmul(np.asarray(y), raw, output.ggml_type)
        return lambda y: (np.array(codes(y, stored)) if y.shape[0] < HOST_BLAS_MIN_ROWS else many(y))

    def moe(self, x, ids, weights, gate, up, down, limit):
        if self.fused_experts:
            return mlx_ext.routed_experts(x, ids, weights, gate, up, down, limit, self._moe_activations)
        if self.native:
            stacks = [(np.asarray(m.data), m.ggml_type) for m in (gate, up, down)]
            return mx.array(native.moe(np.asarray(x), np.asarray(ids), np.asarray(weights), *stacks, limit,
                                       activations=self._moe_activations))
        if x.shape[0] == 1:
            return self._moe_token(x, ids, weights, gate, up, down, limit)
        return mx.array(self._moe_batch(np.asarray(x), np.asarray(ids), np.asarray(weights),
                                        gate, up, down, limit))

    def moe_slots(self, x, ids, weights, gate, up, down, limit, slot_of, out):
        stacks = [(m.data, m.ggml_type) for m in (gate, up, down)]
        return native.moe(x, ids, weights, *stacks, limit, slot_of=slot_of, out=out,
                          activations=self._moe_activations)

    @staticmethod
    def _moe_token(x, ids, weights, gate, up, down, limit):
        """One token, traceable: expand only its K experts."""
        sel, col = ids[0], x.T  # [K], [D, 1]
        g = mx.minimum(_expand(gate, sel) @ col, limit)
        mid = g * mx.sigmoid(g) * mx.clip(_expand(up, sel) @ col, -limit, limit)  # [K, F, 1]
        mid = mid * weights[0][:, None, None]
        return mx.sum(_expand(down, sel) @ mid, axis=0).T  # [1, D]

    @staticmethod
    def _moe_batch(x, ids, weights, gate, up, down, limit) -> np.ndarray:
        """Many tokens: group the (token, slot) pairs by expert; expand each used expert once."""
        tok, slot = np.nonzero(ids >= 0)
        expert = ids[tok, slot]
        order = np.argsort(expert, kind="stable")
        tok, slot, expert = tok[order], slot[order], expert[order]
        used, starts = np.unique(expert, return_index=True)
        bounds = np.append(starts, len(expert))
        per_expert = 4 * (gate.rows * gate.cols + up.rows * up.cols + down.rows * down.cols)
        group = max(1, EXPERT_GROUP_BYTES // per_expert)
        out = np.zeros(x.shape, np.float32)
        for g0 in range(0, len(used), group):
            sel = mx.array(used[g0:g0 + group].astype(np.int32))
            wg, wu, wd = (np.asarray(_expand(m, sel)) for m in (gate, up, down))
            for j in range(len(sel)):
                lo, hi = bounds[g0 + j], bounds[g0 + j + 1]
                t = tok[lo:hi]
                mid = _silu_clamped(x[t] @ wg[j].T, x[t] @ wu[j].T, limit) * weights[t, slot[lo:hi]][:, None]
                _scatter_add(out, t, mid @ wd[j].T)
        return out
