"""The V4 attention sublayer (docs/spec/v4-model.md §3.4-3.7), prefill and decode.

One layer holds: the q low-rank path, the single shared 512-wide K=V head, the
raw window ring, and on compressed layers a compressor (ratio 4: two
overlapping lanes and a lightning indexer with its own 128-wide compressor;
ratio 128: plain windows).

Two entry points share every formula:
- ``prefill`` runs a chunk of T tokens whose positions are known on the host,
  so shapes follow the chunk (how many windows close, which ring slots).
- ``decode`` runs one token at a position that lives inside the graph, so the
  step has fixed shapes and compiles once: it writes its ring slot, frontier
  row and (possibly partial) pooled row with dynamic slice updates.

The attention itself (softmax over the keys with per-head sinks, §3.7) and the
dense products run through the kernel backend (``kernels/base.py``), which
decides where they run; this file only says which work is host-paced (prefill).
In ``decode`` everything after the projections is the backend's
``attention_decode`` (the MLX ops of ``kernels/attention_decode.py``, which
also holds the pooling and top-k that prefill shares; one node on the CPU).
"""

from __future__ import annotations

import mlx.core as mx

from magnetar.kernels.attention_decode import (NEG_INF, DecodeShape, DecodeStep, Pooling, index_scores,
                                               top_k_mask)

from .config import ModelConfig
from .kv_state import EMPTY, LayerState, frontier_rows
from .ops import rope_angles, rope_inv_freq
from .precision import Precision
from .weights import Weights

ATTENTION_BLOCK = 1 << 25  # prefill score elements per query block (128 MB of f32)


def _mask(ok: mx.array) -> mx.array:
    return mx.where(ok, 0.0, NEG_INF)


class Compressor:
    """Gated pooling of ``ratio`` tokens into one row (spec §3.5); ratio 4 overlaps two lanes."""

    def __init__(self, w: Weights, prefix: str, ratio: int, dim: int, cfg: ModelConfig):
        self.ratio, self.dim, self.eps = ratio, dim, cfg.rms_eps
        self.kernels = w.kernels
        self.ape = w.vector(prefix + "ape.weight")  # [ratio, lanes*dim]
        self.kv = w.matrix(prefix + "kv.weight")
        self.gate = w.matrix(prefix + "gate.weight")
        self.norm = w.vector(prefix + "norm.weight")

    def project(self, xn: mx.array, positions: mx.array) -> tuple[mx.array, mx.array]:
        return self.kv(xn), self.gate(xn) + mx.take(self.ape, positions % self.ratio, axis=0)

    def prefill(self, kvp: mx.array, scp: mx.array, f_kv: mx.array, f_sc: mx.array, pos0: int
                ) -> tuple[mx.array, mx.array, mx.array]:
        """Pool the windows the chunk closes -> (rows [n, dim] before norm, new frontier)."""
        R, T = self.ratio, kvp.shape[0]
        rem = pos0 % R
        lead = 4 + rem if R == 4 else rem  # frontier rows that precede the chunk
        kv = mx.concatenate([f_kv[:lead], kvp], axis=0)
        sc = mx.concatenate([f_sc[:lead], scp], axis=0)
        n = (rem + T) // R
        rows = self.kernels.pool_windows(kv, sc, n, R, self.dim)
        # New frontier: (ratio 4) the last closed window, then the open window's rows.
        # Ratio 4's sequence starts one window early, so for both ratios that is row n*R on.
        keep, keep_sc = kv[n * R:], sc[n * R:]
        pad = frontier_rows(R) - keep.shape[0]
        f_kv = mx.concatenate([keep, mx.zeros((pad, keep.shape[1]))], axis=0)
        f_sc = mx.concatenate([keep_sc, mx.full((pad, keep.shape[1]), EMPTY)], axis=0)
        return rows, f_kv, f_sc

    def finish(self, pooled: mx.array, starts: mx.array, inv_freq: mx.array) -> mx.array:
        """Norm, then RoPE at each window's first token position."""
        cos, sin = rope_angles(starts, inv_freq)
        return self.kernels.norm_rope(pooled, cos, sin, self.eps, self.norm)


class Indexer:
    """The lightning indexer of ratio-4 layers (spec §3.6): picks the compressed rows a token may use."""

    def __init__(self, w: Weights, prefix: str, cfg: ModelConfig):
        self.heads, self.dim, self.top_k = cfg.indexer_heads, cfg.indexer_dim, cfg.indexer_top_k
        self.q_b = w.matrix(prefix + "indexer.attn_q_b.weight")
        self.proj = w.matrix(prefix + "indexer.proj.weight")
        self.compressor = Compressor(w, prefix + "indexer_compressor_", 4, self.dim, cfg)

    def scores(self, qr: mx.array, xn: mx.array, cos: mx.array, sin: mx.array, keys: mx.array,
               prec: Precision, mm=mx.matmul) -> mx.array:
        """[T, n_keys] = sum_h w_h * relu(q_h . k) (same association order as transformers).

        ``mm`` multiplies the [T * heads, dim] queries by the keys (``index_scores``)."""
        return index_scores(self.q_b(qr), self.proj(xn), keys, cos, sin, self.heads, self.dim, prec, mm)


class Attention:
    def __init__(self, w: Weights, cfg: ModelConfig, il: int, prec: Precision):
        p = f"blk.{il}."
        self.cfg, self.prec, self.ratio = cfg, prec, cfg.ratio(il)
        self.kernels = w.kernels  # dense products and the attention itself (device choices)
        self.q_a, self.q_b = w.matrix(p + "attn_q_a.weight"), w.matrix(p + "attn_q_b.weight")
        self.q_a_norm = w.vector(p + "attn_q_a_norm.weight")
        self.kv, self.kv_norm = w.matrix(p + "attn_kv.weight"), w.vector(p + "attn_kv_a_norm.weight")
        self.sinks = w.vector(p + "attn_sinks.weight")
        self.o_a, self.o_b = w.matrix(p + "attn_output_a.weight"), w.matrix(p + "attn_output_b.weight")
        self.inv_freq = rope_inv_freq(cfg, compressed=self.ratio > 0)
        self.compressor = Compressor(w, p + "attn_compressor_", self.ratio, cfg.head_dim, cfg) if self.ratio else None
        self.indexer = Indexer(w, p, cfg) if self.ratio == 4 else None
        ix = self.indexer
        self.shape = DecodeShape(cfg.n_head, cfg.head_dim, cfg.window, self.ratio, cfg.rms_eps, prec,
                                 *((ix.heads, ix.dim, ix.top_k) if ix else ()))

    def _qkv(self, xn: mx.array, cos: mx.array, sin: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        cfg, T = self.cfg, xn.shape[0]
        qr = self.kernels.rmsnorm(self.q_a(xn), self.q_a_norm, cfg.rms_eps)  # also feeds the indexer
        q = self.kernels.norm_rope(self.q_b(qr).reshape(T, cfg.n_head, cfg.head_dim), cos, sin, cfg.rms_eps)
        kv = self.kernels.norm_rope(self.kv(xn), cos, sin, cfg.rms_eps, self.kv_norm)
        return qr, q, self.prec.kv_row(kv)

    def _out(self, o: mx.array) -> mx.array:
        """The grouped low-rank output (group g = heads g*H/G ...) of o with V's rotation undone."""
        return self.o_b(self.o_a.grouped(o, self.cfg.o_groups))  # o [T, H, hd]: groups of whole heads

    # -- prefill: a chunk of T tokens at host-known positions pos0 .. pos0+T-1 ----------------

    def prefill(self, xn: mx.array, pos0: int, st: LayerState) -> mx.array:
        cfg, T, W = self.cfg, xn.shape[0], self.cfg.window
        positions = mx.arange(pos0, pos0 + T, dtype=mx.int32)
        cos, sin = rope_angles(positions, self.inv_freq)
        qr, q, kv = self._qkv(xn, cos, sin)

        # Raw window: the up to W-1 rows before the chunk (logical order), then the chunk.
        n_prev = min(pos0, W - 1)
        key_pos = mx.arange(pos0 - n_prev, pos0 + T, dtype=mx.int32)
        keys = [mx.take(st.raw, key_pos[:n_prev] % W, axis=0), kv]
        raw_ok = (key_pos[None, :] <= positions[:, None]) & (key_pos[None, :] > positions[:, None] - W)
        n_tail = min(T, W)
        st.raw[positions[T - n_tail:] % W] = kv[T - n_tail:]

        n_comp, select = 0, False
        if self.ratio:
            n_comp = (pos0 + T) // self.ratio
            st.comp, st.f_kv, st.f_sc = self._compress(self.compressor, xn, positions, pos0, st.comp,
                                                       st.f_kv, st.f_sc, self.prec.kv_row)
            keys.append(st.comp[:n_comp])
        if self.indexer is not None:
            ix = self.indexer
            st.index, st.i_kv, st.i_sc = self._compress(ix.compressor, xn, positions, pos0, st.index,
                                                        st.i_kv, st.i_sc, self.prec.index_key)
            select = n_comp > ix.top_k  # else top-k keeps every visible row
        keys = mx.concatenate(keys, axis=0)

        # Query blocks bound the [tokens, heads, keys] score tensors at long context, and each
        # block takes only the raw rows its queries' windows reach: a 2048-token chunk has
        # 2175 raw rows, a query sees 128 (3-5x less attention work at small's and Flash's
        # widths). Blocks of at least W queries, more with few heads: ~1024 query-heads a
        # block keep each call's fixed cost (mask, key slice, handing them over) small.
        block = max(1, min(max(W, 1024 // cfg.n_head), ATTENTION_BLOCK // (cfg.n_head * keys.shape[0])))
        n_raw, out = n_prev + T, []
        for t0 in range(0, T, block):
            t1 = min(T, t0 + block)
            rows, raw = slice(t0, t1), slice(max(0, n_prev + t0 - W + 1), n_prev + t1)
            keep = mx.arange(n_comp)[None, :] < ((positions[rows] + 1) // max(self.ratio, 1))[:, None]
            if select:
                score = ix.scores(qr[rows], xn[rows], cos[rows], sin[rows], st.index[:n_comp], self.prec,
                                  self.kernels.dense)
                keep = keep & top_k_mask(mx.where(keep, score, NEG_INF), ix.top_k)
            bias = mx.concatenate([_mask(raw_ok[rows, raw]), _mask(keep)], axis=-1)
            seen = mx.concatenate([keys[raw], keys[n_raw:]], axis=0)
            out.append(self.kernels.attend_chunk(q[rows], seen, bias, self.sinks))
        return self._out(self.kernels.norm_rope(mx.concatenate(out, axis=0), cos, sin, sign=-1.0))

    def _compress(self, comp: Compressor, xn: mx.array, positions: mx.array, pos0: int,
                  rows: mx.array, f_kv: mx.array, f_sc: mx.array, finish_row
                  ) -> tuple[mx.array, mx.array, mx.array]:
        kvp, scp = comp.project(xn, positions)
        pooled, f_kv, f_sc = comp.prefill(kvp, scp, f_kv, f_sc, pos0)
        n = pooled.shape[0]
        if n:
            c0 = pos0 // comp.ratio  # the first window the chunk closes
            starts = mx.arange(c0, c0 + n, dtype=mx.int32) * comp.ratio
            rows[c0:c0 + n] = finish_row(comp.finish(pooled, starts, self.inv_freq))
        return rows, f_kv, f_sc

    # -- decode: one token at graph-resident position p (fixed shapes, compiles) -------------

    def decode(self, xn: mx.array, p: mx.array, st: LayerState) -> mx.array:
        """The projections here; the rest (norms, RoPE, ring, compressors, indexer, attention)
        is the backend's ``attention_decode``, one node on the CPU."""
        ix = self.indexer
        select = ix is not None and st.comp.shape[0] > ix.top_k  # static: the buffer holds more rows than top-k
        # Every projection of xn at once (one node on the CPU), then those of qr.
        of_xn = [self.q_a, self.kv]
        if self.ratio:
            of_xn += [self.compressor.kv, self.compressor.gate]
        if ix is not None:
            of_xn += [ix.compressor.kv, ix.compressor.gate] + ([ix.proj] if select else [])
        q_a, kv, *rest = self.kernels.matmuls(xn, of_xn)
        qr = self.kernels.rmsnorm(q_a, self.q_a_norm, self.cfg.rms_eps)
        q, *index_q = self.kernels.matmuls(qr, [self.q_b] + ([ix.q_b] if select else []))
        comp = index = index_w = None
        if self.ratio:
            comp = self._pooling(self.compressor, *rest[:2], st.comp, st.f_kv, st.f_sc)
        if ix is not None:
            index = self._pooling(ix.compressor, *rest[2:4], st.index, st.i_kv, st.i_sc)
            index_w = rest[4] if select else None
        step = DecodeStep(p, q, kv, self.kv_norm, self.sinks, self.inv_freq, st.raw,
                          comp, index, index_q[0] if select else None, index_w)
        o, states = self.kernels.attention_decode(step, self.shape)
        st.replace(states)
        return self._out(o)

    @staticmethod
    def _pooling(comp: Compressor, kv: mx.array, gate: mx.array, rows: mx.array, f_kv: mx.array, f_sc: mx.array
                 ) -> Pooling:
        return Pooling(kv, gate, comp.ape, comp.norm, rows, f_kv, f_sc)
