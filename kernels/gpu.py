"""What the Metal and CUDA backends share: one algorithm, two kernel APIs.

Both run the same kernels (``dequantize``, ``matvec`` / ``matmul_tiled``,
fused MoE decode, grouped MoE prefill) on raw GGUF blocks, picked by the same
token-count thresholds, with the same fallbacks for widths the kernels do not
take. ``GpuBackend`` holds that; a subclass says how its API launches a kernel
(``_run``), passes a per-call value (``_scalar``), lays warps or simdgroups
over rows (``_rows_geometry``) and groups prefill pairs by expert
(``_moe_grouped``). The hooks look up their module's functions at call time,
so the GPU emulators in tests can swap a module's ``_run``.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .base import Backend, QTensor

CHUNK = 32  # values per decoded chunk; the kernels need cols % CHUNK == 0
TILE_THREADS = 256  # the tiled kernels: 256 threads ...
TILE_ROWS = 64  # ... over 64 weight rows
MOE_TILE_PAIRS = 32  # (token, slot) pairs of one expert per tile of the grouped MoE kernels
MATVEC_MAX_TOKENS = 8  # matmul: rows-per-warp/simdgroup kernel up to here, tiles above
MOE_DECODE_MAX_TOKENS = 4  # moe: fused per-pair decode kernels up to here, grouped tiles above
HC_THREADS = 256  # hc_pre: threads per token (the kernel bodies assume it)

Geometry = tuple[tuple[int, int, int], tuple[int, int, int]]  # (grid, threadgroup), both in threads


def dequantize_geometry(n_sel: int, rows: int, cols: int, threads: int = 256) -> Geometry:
    """dequantize: one thread per 32-value chunk of the ``n_sel * rows`` output rows."""
    n = n_sel * rows * (cols // CHUNK)
    return (threads * max(1, math.ceil(n / threads)), 1, 1), (threads, 1, 1)


def tiled_geometry(rows: int, n_tok: int, bn: int) -> Geometry:
    """matmul_tiled: threadgroup (bx, by) = 64 rows from 64 bx x ``bn`` tokens from bn by."""
    return (TILE_THREADS * math.ceil(rows / TILE_ROWS), math.ceil(n_tok / bn), 1), (TILE_THREADS, 1, 1)


def hc_pre_geometry(n_tok: int) -> Geometry:
    """hc_pre: one threadgroup (block) of ``HC_THREADS`` per token, token = grid y."""
    return (HC_THREADS, n_tok, 1), (HC_THREADS, 1, 1)


def hc_post_geometry(n_tok: int, d_model: int) -> Geometry:
    """hc_post: a thread per (value d, token), token = grid y."""
    return (HC_THREADS * math.ceil(d_model / HC_THREADS), n_tok, 1), (HC_THREADS, 1, 1)


def moe_max_tiles(n_pairs: int, n_experts: int, bn: int = MOE_TILE_PAIRS) -> int:
    """Most tiles the expert grouping can make: a group of n pairs makes
    ceil(n / bn) < n / bn + 1 tiles, and at most min(n_pairs, n_experts + 1)
    groups are non-empty (ids outside [0, n_experts) share one)."""
    return math.ceil(n_pairs / bn) + min(n_pairs, n_experts + 1)


def moe_tiled_geometry(rows: int, n_pairs: int, n_experts: int, bn: int = MOE_TILE_PAIRS) -> Geometry:
    """moe_*_tiled: threadgroup (b, by) = tile b (those past the last tile
    exit) x 64 rows from 64 by. A bound on the tile count sizes the grid, so
    launching needs no host sync."""
    tiles = moe_max_tiles(n_pairs, n_experts, bn)
    return (TILE_THREADS * tiles, math.ceil(rows / TILE_ROWS), 1), (TILE_THREADS, 1, 1)


def raw_bytes(w: QTensor) -> mx.array:
    """The tensor's blocks as a uint8 MLX array (F32/F16 rows reinterpreted, not converted)."""
    data = w.data if isinstance(w.data, mx.array) else mx.array(np.ascontiguousarray(w.data))
    return data if data.dtype == mx.uint8 else mx.view(data, mx.uint8)


def pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class GpuBackend(Backend):
    """Quantized dequantize / matmul / moe as GPU kernels; subclasses give the launch hooks."""

    dense_tile_tokens = 32  # BN of matmul_tiled
    streams_experts = device_banks = True  # the MoE kernels take any stack, so a bank of slots too

    # -- hooks ----------------------------------------------------------------

    def _run(self, name: str, inputs: list, shapes: list, geometry: Geometry, template: dict[str, int]
             ) -> list[mx.array]:
        """Launch kernel ``name`` (through the module's ``_run``); float32 outputs of ``shapes``."""
        raise NotImplementedError

    def _scalar(self, value, dtype=mx.int32) -> mx.array:
        """A per-call value (token count, clamp limit) as the API passes it without a recompile."""
        raise NotImplementedError

    def _rows_geometry(self, rows: int, grid_rows: int, *qtypes: int) -> tuple[int, Geometry]:
        """NR (rows per warp/simdgroup) for weights of ``qtypes``, and the launch over ``rows``
        with grid y ``grid_rows``, for matvec / moe_gate_up / moe_down."""
        raise NotImplementedError

    def _moe_grouped(self, x: mx.array, ids: mx.array, route: mx.array, lim: mx.array, gate: QTensor,
                     up: QTensor, down: QTensor, dims: dict[str, int]) -> mx.array:
        """Many tokens: group the pairs by expert on the device and run the tiled kernels."""
        raise NotImplementedError

    # -- dequantize -------------------------------------------------------------

    def dequantize(self, w: QTensor, experts: mx.array | None = None) -> mx.array:
        qtype, rows, cols = w.ggml_type, w.rows, w.cols
        data = raw_bytes(w)
        if cols % CHUNK:  # plain f16/f32 rows of odd width: MLX ops
            from .dequant import dequantize
            return dequantize(data if experts is None else mx.take(data, experts, axis=0), qtype)
        if experts is None:
            stack = data.reshape(-1, rows, data.shape[-1])
            sel = mx.arange(stack.shape[0], dtype=mx.int32)
            out_shape = (*data.shape[:-2], rows, cols)
        else:
            experts = experts if isinstance(experts, mx.array) else mx.array(experts)
            sel = experts.reshape(-1).astype(mx.int32)
            if data.ndim == 2:  # picks rows of a plain matrix, as numpy indexing would
                stack, out_shape = data.reshape(rows, 1, data.shape[-1]), (*experts.shape, cols)
            else:
                stack, out_shape = data.reshape(-1, rows, data.shape[-1]), (*experts.shape, rows, cols)
        n_sel, n_rows = sel.size, stack.shape[1]
        if n_sel == 0:
            return mx.zeros(out_shape, mx.float32)
        (out,) = self._run("dequantize", [stack, sel, self._scalar(n_sel)], [(n_sel, n_rows, cols)],
                           dequantize_geometry(n_sel, n_rows, cols), dict(QT=qtype, ROWS=n_rows, COLS=cols))
        return out.reshape(out_shape)

    # -- dense product ----------------------------------------------------------

    def matmul(self, x: mx.array, w: QTensor) -> mx.array:
        rows, cols = w.rows, w.cols
        if w.n_experts:
            raise ValueError(f"matmul takes one matrix, not a stack of {w.n_experts} experts")
        x = x.astype(mx.float32)
        lead = x.shape[:-1]
        x = x.reshape(-1, cols)
        n_tok = x.shape[0]
        if cols % CHUNK:
            return (x @ self.dequantize(w).T).reshape(*lead, rows)
        if n_tok == 0:
            return mx.zeros((*lead, rows), mx.float32)
        data, qtype, count = raw_bytes(w), w.ggml_type, self._scalar(n_tok)
        if n_tok <= MATVEC_MAX_TOKENS:
            nr, geometry = self._rows_geometry(rows, 1, qtype)
            tpl = dict(QT=qtype, ROWS=rows, COLS=cols, NR=nr, NT=pow2_at_least(n_tok))
            (y,) = self._run("matvec", [data, x, count], [(n_tok, rows)], geometry, tpl)
        else:
            bn = self.dense_tile_tokens
            tpl = dict(QT=qtype, ROWS=rows, COLS=cols, BN=bn)
            (y,) = self._run("matmul_tiled", [data, x, count], [(n_tok, rows)], tiled_geometry(rows, n_tok, bn), tpl)
        return y.reshape(*lead, rows)

    # -- hyper-connections ------------------------------------------------------

    def hc_pre(self, X, fn, scale, base, params):
        """One launch per call (``hc_pre`` kernel); fn is read as stored (F16 in V4 files)."""
        n_tok, hc, d_model = X.shape
        if n_tok == 0 or (hc * d_model) % CHUNK or fn.data.shape[0] != (2 + hc) * hc:
            return super().hc_pre(X, fn, scale, base, params)
        eps = mx.array([params.rms_eps, params.hc_eps], mx.float32)
        inputs = [X.astype(mx.float32), raw_bytes(QTensor(fn.data, fn.ggml_type)), scale, base, eps]
        x_in, post, comb = self._run("hc_pre", inputs, [(n_tok, d_model), (n_tok, hc), (n_tok, hc, hc)],
                                     hc_pre_geometry(n_tok),
                                     dict(QT=fn.ggml_type, HC=hc, D=d_model, ITERS=params.sinkhorn_iters))
        return x_in, post, comb

    def hc_post(self, y, X, post, comb):
        """One launch per call (``hc_post`` kernel) instead of a matmul and an elementwise pass."""
        n_tok, hc, d_model = X.shape
        if n_tok == 0:
            return super().hc_post(y, X, post, comb)
        inputs = [a.astype(mx.float32) for a in (y, X, post, comb)]
        (x_out,) = self._run("hc_post", inputs, [(n_tok, hc, d_model)], hc_post_geometry(n_tok, d_model),
                             dict(HC=hc, D=d_model))
        return x_out

    # -- routed experts ---------------------------------------------------------

    def moe(self, x, ids, weights, gate, up, down, limit):
        n_tok, d_model = x.shape
        k = ids.shape[-1]
        n_exp, ffn = gate.n_experts, gate.rows
        if (up.rows, up.cols, gate.cols, down.rows, down.cols) != (ffn, d_model, d_model, d_model, ffn):
            raise ValueError(f"moe shapes disagree: gate {gate.rows}x{gate.cols}, up {up.rows}x{up.cols}, "
                             f"down {down.rows}x{down.cols}, x [{n_tok}, {d_model}]")
        if d_model % CHUNK or ffn % CHUNK:  # plain f16/f32 experts of odd widths: not worth kernels
            from .cpu import CpuBackend
            return CpuBackend().moe(x, ids, weights, gate, up, down, limit)
        n_pairs = n_tok * k
        if n_pairs == 0:
            return mx.zeros((n_tok, d_model), mx.float32)
        x = x.astype(mx.float32)
        ids = ids.reshape(-1).astype(mx.int32)  # pair token * K + slot, as the kernels index it
        route = weights.reshape(-1).astype(mx.float32)
        lim = self._scalar(limit, mx.float32)
        dims = dict(F=ffn, D=d_model, K=k, E=n_exp)
        if n_tok > MOE_DECODE_MAX_TOKENS:
            return self._moe_grouped(x, ids, route, lim, gate, up, down, dims)
        nr, geometry = self._rows_geometry(ffn, n_pairs, gate.ggml_type, up.ggml_type)
        (mid,) = self._run("moe_gate_up", [x, ids, route, raw_bytes(gate), raw_bytes(up), lim], [(n_pairs, ffn)],
                           geometry, dict(QTG=gate.ggml_type, QTU=up.ggml_type, NR=nr, **dims))
        nr, geometry = self._rows_geometry(d_model, n_tok, down.ggml_type)
        (y,) = self._run("moe_down", [mid, ids, raw_bytes(down)], [(n_tok, d_model)], geometry,
                         dict(QT=down.ggml_type, NR=nr, **dims))
        return y

    def moe_slots(self, x, ids, weights, gate, up, down, limit, slot_of, out):
        """The kernels see slot rows as expert ids (``E`` = the bank's slots); an absent
        expert maps to -1, which they skip. A decode selection that fits the bank is one
        ``moe`` call, so its bits are the resident ones."""
        slots = mx.take(mx.array(np.ascontiguousarray(slot_of, np.int32)), mx.array(np.asarray(ids, np.int32)))
        y = self.moe(x, slots, weights, gate, up, down, limit)
        return y if out is None else out + y
