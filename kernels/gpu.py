"""What the Metal and CUDA backends share: one algorithm, two kernel APIs.

Both run the same kernels (``dequantize``, ``matvec`` / ``matmul_tiled``,
fused MoE decode, grouped MoE prefill; ``matvec`` with row groups for the
attention output's grouped low rank) on raw GGUF blocks, picked by the same
token-count thresholds, with the same fallbacks for widths the kernels do not
take. ``GpuBackend`` holds that; a subclass says how its API launches a kernel
(``_run``), passes a per-call value (``_scalar``), lays warps or simdgroups
over rows (``_rows_geometry``) and groups prefill pairs by expert
(``_moe_grouped``). The hooks look up their module's functions at call time,
so the GPU emulators in tests can swap a module's ``_run``. The hyper-connection
steps and the decode attention (``attention_decode``) are fused kernels too.
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

ATTN_THREADS = 256  # attn_state / attn_core: threads per threadgroup (block)
ATTN_INDEX_THREADS = 64  # attn_index: a thread per compressed row
ATTN_STATE_INPUTS = ("p", "kv", "kv_norm", "inv_freq", "raw", "c_kv", "c_gate", "c_ape", "c_norm", "c_fkv", "c_fsc",
                     "c_rows", "i_kv", "i_gate", "i_ape", "i_norm", "i_fkv", "i_fsc", "i_rows", "iq")
ATTN_STATE_OUTPUTS = ("raw_out", "c_row", "c_fkv_out", "c_fsc_out", "i_row", "i_fkv_out", "i_fsc_out", "iq_out")
ATTN_STATE_TEMPLATES = ("HD", "W", "R", "IXH", "IXD", "HALF", "OFFICIAL", "NOPE", "EPS", "WHT", "CAP")
ATTN_INDEX_TEMPLATES = ("IXH", "IXD", "CAP", "DSC", "HSC")
ATTN_CORE_INPUTS = ("p", "q", "sinks", "inv_freq", "raw", "rows", "score")
ATTN_CORE_TEMPLATES = ("HD", "W", "R", "CAP", "TOPK", "SEL", "HALF", "EPS", "ASC", "NK")

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


def f32_bits(x: float) -> int:
    """A float constant as a template value: its float32 bits (what MLX's float32 ops would use)."""
    return int(np.array(x, np.float32).view(np.uint32))


def attention_templates(n_head: int, head_dim: int, window: int, ratio: int, eps: float, official: bool, nope: int,
                        half: int, cap: int, ix_heads: int, ix_dim: int, top_k: int) -> dict[str, dict[str, int]]:
    """The template values of each decode attention kernel one layer launches (attn_index only
    when the indexer selects: ratio 4 with a capacity above top_k)."""
    indexer = ratio == 4
    select = indexer and cap > top_k
    ixh, ixd = (ix_heads, ix_dim) if indexer else (0, 0)
    out = {"attn_state": dict(HD=head_dim, W=window, R=ratio, IXH=ixh if select else 0, IXD=ixd,
                              HALF=half, OFFICIAL=int(official), NOPE=nope, EPS=f32_bits(eps),
                              WHT=f32_bits(ixd ** -0.5) if indexer else 0, CAP=max(cap, 1))}
    if select:
        out["attn_index"] = dict(IXH=ixh, IXD=ixd, CAP=cap, DSC=f32_bits(ixd ** -0.5), HSC=f32_bits(ixh ** -0.5))
    keys = window + (top_k if select else cap if ratio else 0)
    out["attn_core"] = dict(HD=head_dim, W=window, R=ratio, CAP=cap if ratio else 0, TOPK=top_k if select else 0,
                            SEL=int(select), HALF=half, EPS=f32_bits(eps), ASC=f32_bits(head_dim ** -0.5), NK=keys)
    return out


def attention_state_geometry(ratio: int, select: bool) -> Geometry:
    """attn_state: a threadgroup for the ring, one per compressor, one for the indexer's query."""
    groups = 1 + (ratio > 0) + (ratio == 4) + select
    return (ATTN_THREADS * groups, 1, 1), (ATTN_THREADS, 1, 1)


def attention_index_geometry(cap: int) -> Geometry:
    """attn_index: a thread per compressed row."""
    return (ATTN_INDEX_THREADS * math.ceil(cap / ATTN_INDEX_THREADS), 1, 1), (ATTN_INDEX_THREADS, 1, 1)


def attention_core_geometry(n_head: int) -> Geometry:
    """attn_core: a threadgroup per head."""
    return (ATTN_THREADS * n_head, 1, 1), (ATTN_THREADS, 1, 1)


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

    def _rows_geometry(self, rows: int, grid_rows: int, *qtypes: int, nr: int | None = None
                       ) -> tuple[int, Geometry]:
        """NR (rows per warp/simdgroup) for weights of ``qtypes``, or ``nr`` if given, and the
        launch over ``rows`` with grid y ``grid_rows``, for matvec / moe_gate_up / moe_down."""
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
            tpl = dict(QT=qtype, ROWS=rows, COLS=cols, NR=nr, NT=pow2_at_least(n_tok), G=1)
            (y,) = self._run("matvec", [data, x, count], [(n_tok, rows)], geometry, tpl)
        else:
            bn = self.dense_tile_tokens
            tpl = dict(QT=qtype, ROWS=rows, COLS=cols, BN=bn)
            (y,) = self._run("matmul_tiled", [data, x, count], [(n_tok, rows)], tiled_geometry(rows, n_tok, bn), tpl)
        return y.reshape(*lead, rows)

    def grouped_matmul(self, x, w, groups=None):
        """A few rows: one ``matvec`` launch from the blocks as stored, group g's rows reading
        x's g-th slice (template G), instead of the default's dequantized copy of the whole
        matrix and a product per group every token. A warp/simdgroup must not straddle two
        groups, so where NR does not divide a group's rows it takes one row (NR = 1). Many
        rows and widths the kernels do not take: the default."""
        if groups is not None:
            x = x.reshape(x.shape[0], groups, -1)
        n_tok, G, cols = x.shape
        q = QTensor(mx.view(w.data, mx.uint8), w.ggml_type)
        rows = q.rows
        if not (0 < n_tok <= MATVEC_MAX_TOKENS and q.cols == cols and cols % CHUNK == 0 and rows % G == 0):
            return super().grouped_matmul(x, w)
        nr, geometry = self._rows_geometry(rows, 1, q.ggml_type)
        if G > 1 and (rows // G) % nr:
            nr, geometry = self._rows_geometry(rows, 1, q.ggml_type, nr=1)
        tpl = dict(QT=q.ggml_type, ROWS=rows, COLS=cols, NR=nr, NT=pow2_at_least(n_tok), G=G)
        flat = x.astype(mx.float32).reshape(n_tok, G * cols)
        (y,) = self._run("matvec", [raw_bytes(q), flat, self._scalar(n_tok)], [(n_tok, rows)], geometry, tpl)
        return y

    # -- hyper-connections ------------------------------------------------------

    def hc_pre(self, X, fn, scale, base, params):
        """One launch per call (``hc_pre`` kernel); fn is read as stored (F16 in V4 files)."""
        if not self._fuses_hc_pre(X, fn):
            return super().hc_pre(X, fn, scale, base, params)
        return self._hc_pre(X, fn, scale, base, params, None)

    def hc_pre_norm(self, X, fn, scale, base, params, norm):
        """``hc_pre`` with the sublayer's RMS norm in the same launch."""
        if not self._fuses_hc_pre(X, fn):
            return super().hc_pre_norm(X, fn, scale, base, params, norm)
        return self._hc_pre(X, fn, scale, base, params, norm)

    @staticmethod
    def _fuses_hc_pre(X, fn) -> bool:
        n_tok, hc, d_model = X.shape
        return n_tok > 0 and (hc * d_model) % CHUNK == 0 and fn.data.shape[0] == (2 + hc) * hc

    def _hc_pre(self, X, fn, scale, base, params, norm):
        n_tok, hc, d_model = X.shape
        eps = mx.array([params.rms_eps, params.hc_eps], mx.float32)
        inputs = [X.astype(mx.float32), raw_bytes(QTensor(fn.data, fn.ggml_type)), scale, base, eps,
                  scale if norm is None else norm.astype(mx.float32)]  # a stand-in without the norm
        x_in, post, comb = self._run("hc_pre", inputs, [(n_tok, d_model), (n_tok, hc), (n_tok, hc, hc)],
                                     hc_pre_geometry(n_tok), dict(QT=fn.ggml_type, HC=hc, D=d_model,
                                                                  ITERS=params.sinkhorn_iters, NORM=int(norm is not None)))
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

    def rmsnorm(self, x, weight, eps):
        """MLX's own fused RMS norm: one launch instead of three (square, sum, the rest)."""
        return mx.fast.rms_norm(x, weight.astype(x.dtype), eps)

    # -- decode attention -------------------------------------------------------

    def attention_decode(self, step, shape):
        """Two kernel launches a layer, three when the indexer selects, and a slice update per
        compressed buffer (``attention_decode.attention_decode``'s math):

        * ``attn_state``: the state updates, a threadgroup each for the ring slot, each
          compressor's frontier and pooled row, and the indexer's rotated FP4 query. The ring
          and frontiers (at most 256 KB) come back whole; a compressor's row p // ratio comes
          back alone and ``mx.slice_update`` writes it, in place when MLX can donate the buffer
          (megabytes at long context). It is pooled only when its window closes at p, the first
          time any token reads it; before, it comes back as it was (the MLX-ops path pools the
          open window every token: 128 softmax slots per dimension at ratio 128).
        * ``attn_index`` (the indexer selects): the scores of every visible row, a thread each.
        * ``attn_core``: a threadgroup per head: q's norm and RoPE, the top-k choice (each
          threadgroup makes the same one), attention with the sink, V's rotation undone.

        The split follows the data: the heads need every updated row, and top-k needs every score."""
        H, hd, W, R = shape.n_head, shape.head_dim, shape.window, shape.ratio
        comp, index, select = step.comp, step.index, step.index_q is not None
        cap = comp.rows.shape[0] if R else 0
        half = step.inv_freq.shape[0]
        tpl = attention_templates(H, hd, W, R, shape.eps, shape.rounding.official, shape.rounding.nope, half, cap,
                                  shape.indexer_heads, shape.indexer_dim, shape.top_k)
        if select != ("attn_index" in tpl):
            raise ValueError(f"attention_decode: the indexer query is given iff the capacity ({cap}) exceeds "
                             f"top_k ({shape.top_k})")
        p = step.p.reshape(1).astype(mx.int32)
        raw = step.raw
        pools = []  # each compressor's seven inputs and three outputs, or stand-ins (never read)
        for c, ratio, dim in ((comp, R, hd), (index, 4, shape.indexer_dim)):
            if c is None:
                pools.append(([raw] * 7, [(1,)] * 3))
            else:
                width, rows = (2 if ratio == 4 else 1) * dim, 8 if ratio == 4 else ratio
                pools.append(([c.kv, c.gate, c.ape, c.norm, c.f_kv, c.f_sc, c.rows],
                              [(1, dim), (rows, width), (rows, width)]))
        iq = step.index_q if select else raw
        iq_shape = (shape.indexer_heads * shape.indexer_dim,) if select else (1,)
        inputs = [p, step.kv, step.kv_norm, step.inv_freq, raw, *pools[0][0], *pools[1][0], iq]
        outs = self._run("attn_state", [a.astype(mx.float32) if a is not p else a for a in inputs],
                         [(W, hd), *pools[0][1], *pools[1][1], iq_shape], attention_state_geometry(R, select),
                         tpl["attn_state"])
        raw, states, rows, score = outs[0], [outs[0]], outs[0], step.sinks
        if R:
            at = p // R
            rows = mx.slice_update(comp.rows, outs[1], at, axes=(0,))
            states += [rows, outs[2], outs[3]]
        if index is not None:
            index_rows = mx.slice_update(index.rows, outs[4], at, axes=(0,))
            states += [index_rows, outs[5], outs[6]]
            if select:
                (score,) = self._run("attn_index", [p, outs[7], step.index_w.astype(mx.float32), index_rows], [(cap,)],
                                     attention_index_geometry(cap), tpl["attn_index"])
        core = tpl["attn_core"]
        floats = [a.astype(mx.float32) for a in (step.q, step.sinks, step.inv_freq, raw, rows, score)]
        o, _ = self._run("attn_core", [p, *floats], [(1, H, hd), (H, core["NK"])], attention_core_geometry(H), core)
        return o, states

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
