"""One token's attention after the dense projections, in MLX ops (docs/spec/v4-model.md
§3.4-3.7, §5.1): the math every backend's fused ``attention_decode`` must reproduce, and
the default ``Backend.attention_decode``.

The model (``runtime/attention.py``) runs the projections (q, kv, the compressors' kv and
gate, the indexer's q and weights) and hands their raw outputs here with the layer's
constant vectors, the position ``p`` (an int32 scalar inside the compiled graph) and the
layer's state arrays. This normalizes and rotates q and the kv row, writes the raw ring
slot ``p % window``; on compressed layers updates the compressor frontier, pools the
token's (possibly partial) window into row ``p // ratio``; on ratio-4 layers does the
same for the indexer and, when the buffer holds more rows than top-k keeps, picks the
rows by indexer score; then attends with per-head sinks and undoes the rotation.
Pooling and top-k selection are shared with prefill.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from .precision import Rounding
from .rowops import rms, rmsnorm, rope, rope_angles

NEG_INF = float("-inf")


def top_k_mask(score: mx.array, k: int) -> mx.array:
    """The k best of each row of ``score`` [T, n] as a mask; ties go to the lowest index (as ds4's CPU path).

    Exact ties are common here: a row's score is 0 whenever every head's ReLU is 0.
    """
    kth = -mx.partition(-score, k - 1, axis=-1)[:, k - 1:k]
    above = score > kth
    tie = score == kth
    need = k - mx.sum(above, axis=-1, keepdims=True)
    return above | (tie & (mx.cumsum(tie.astype(mx.int32), axis=-1) <= need))


def pool(kv: mx.array, sc: mx.array) -> mx.array:
    """Per-dimension softmax over the window slots (axis -2)."""
    return mx.sum(kv * mx.softmax(sc, axis=-2), axis=-2)


def pool_windows(kv: mx.array, sc: mx.array, n: int, ratio: int, dim: int) -> mx.array:
    """Pool ``n`` consecutive windows of a slot sequence that starts one window early for ratio 4."""
    R, d = ratio, dim
    if R != 4:
        return pool(kv[: n * R].reshape(n, R, d), sc[: n * R].reshape(n, R, d))
    # Window c: lane A of window c-1 (first half of the width) + lane B of window c.
    prev = slice(0, 4 * n)
    cur = slice(4, 4 * n + 4)
    kv8 = mx.concatenate([kv[prev, :d].reshape(n, 4, d), kv[cur, d:].reshape(n, 4, d)], axis=1)
    sc8 = mx.concatenate([sc[prev, :d].reshape(n, 4, d), sc[cur, d:].reshape(n, 4, d)], axis=1)
    return pool(kv8, sc8)


@dataclass(frozen=True)
class DecodeShape:
    """The static side of one layer's decode attention."""

    n_head: int
    head_dim: int
    window: int
    ratio: int  # 0: sliding window only
    eps: float  # RMS-norm epsilon
    rounding: Rounding
    indexer_heads: int = 0  # ratio 4 only
    indexer_dim: int = 0
    top_k: int = 0


@dataclass(frozen=True)
class Pooling:
    """One compressor's step: the token's projections, the compressor's constants, its state."""

    kv: mx.array  # [1, lanes * dim], the kv projection
    gate: mx.array  # [1, lanes * dim], the gate projection (before ``ape``)
    ape: mx.array  # [ratio, lanes * dim]
    norm: mx.array  # [dim]
    rows: mx.array  # [cap, dim] pooled rows; slot p // ratio is written
    f_kv: mx.array  # frontier [rows, lanes * dim]
    f_sc: mx.array


@dataclass(frozen=True)
class DecodeStep:
    """One layer's inputs for a token at position ``p`` (a graph-resident int32 scalar)."""

    p: mx.array
    q: mx.array  # [1, n_head * head_dim], the q_b projection
    kv: mx.array  # [1, head_dim], the kv projection
    kv_norm: mx.array  # [head_dim]
    sinks: mx.array  # [n_head]
    inv_freq: mx.array  # [rope_dim / 2]
    raw: mx.array  # [window, head_dim] ring
    comp: Pooling | None = None  # ratio > 0
    index: Pooling | None = None  # ratio 4
    index_q: mx.array | None = None  # [1, indexer_heads * indexer_dim]: given when cap > top_k
    index_w: mx.array | None = None  # [1, indexer_heads], the indexer's weight projection

    def states(self) -> list[mx.array]:
        """The state arrays in ``LayerState.ARRAYS`` order, as ``attention_decode`` returns them."""
        pools = [c for c in (self.comp, self.index) if c is not None]
        return [self.raw, *(a for c in pools for a in (c.rows, c.f_kv, c.f_sc))]


def _at(i: mx.array) -> mx.array:
    """A dynamic start index for slice/slice_update on axis 0."""
    return mx.reshape(i, (1,)).astype(mx.int32)


def _mask(ok: mx.array) -> mx.array:
    return mx.where(ok, 0.0, NEG_INF)


def pool_one(c: Pooling, p: mx.array, ratio: int, dim: int, inv_freq: mx.array, eps: float,
             finish_row: Callable[[mx.array], mx.array]) -> list[mx.array]:
    """Write token p into the frontier, pool its window (partial unless it closes at p), norm
    and rotate it at the window's first position, round it, write it at row p // ratio
    (a row no token can see until its window closes) -> [rows, f_kv, f_sc]."""
    R = ratio
    scp = c.gate + mx.take(c.ape, mx.reshape(p, (1,)) % R, axis=0)
    slot = _at(p % R + (4 if R == 4 else 0))
    f_kv = mx.slice_update(c.f_kv, c.kv, slot, axes=(0,))
    f_sc = mx.slice_update(c.f_sc, scp, slot, axes=(0,))
    if R != 4:
        pooled = pool(f_kv, f_sc)[None]
    else:
        pooled = pool_windows(f_kv, f_sc, 1, R, dim)
        closes = (p + 1) % R == 0  # the closed window becomes lane A of the next one
        f_kv = mx.where(closes, mx.concatenate([f_kv[4:], f_kv[4:]], axis=0), f_kv)
        f_sc = mx.where(closes, mx.concatenate([f_sc[4:], f_sc[4:]], axis=0), f_sc)
    cos, sin = rope_angles(mx.reshape((p // R) * R, (1,)), inv_freq)
    row = finish_row(rope(rmsnorm(pooled, c.norm, eps), cos, sin))
    return [mx.slice_update(c.rows, row, _at(p // R), axes=(0,)), f_kv, f_sc]


def index_scores(q: mx.array, w: mx.array, keys: mx.array, cos: mx.array, sin: mx.array, heads: int,
                 dim: int, rounding: Rounding, mm=mx.matmul) -> mx.array:
    """[T, n_keys] = sum_h w_h * relu(q_h . k) (same association order as transformers), from
    the indexer's raw projections q [T, heads * dim] and w [T, heads].

    ``mm`` multiplies the [T * heads, dim] queries by the keys: prefill passes the
    backend's dense product; the decode step keeps the default, inside its graph."""
    T = q.shape[0]
    q = rounding.index_query(rope(q.reshape(T, heads, dim), cos[:, None], sin[:, None]))
    dots = mx.maximum(mm(q.reshape(T * heads, -1), keys.T), 0.0) * (dim ** -0.5)
    weights = w * (heads ** -0.5)
    return mx.sum(dots.reshape(T, heads, -1) * weights[:, :, None], axis=1)


def attention_decode(s: DecodeStep, shape: DecodeShape, attend: Callable[..., mx.array]
                     ) -> tuple[mx.array, list[mx.array]]:
    """-> (the attention output [1, n_head, head_dim] with V's rotation undone, the new state
    arrays in ``DecodeStep.states`` order). ``attend`` is softmax attention with sinks
    (``base.attend``)."""
    H, hd, W, R, eps, r = shape.n_head, shape.head_dim, shape.window, shape.ratio, shape.eps, shape.rounding
    p = s.p
    cos, sin = rope_angles(mx.reshape(p, (1,)), s.inv_freq)
    q = rope(rms(s.q.reshape(1, H, hd), eps), cos[:, None], sin[:, None])
    kv = r.kv_row(rope(rmsnorm(s.kv, s.kv_norm, eps), cos, sin))
    raw = mx.slice_update(s.raw, kv, _at(p % W), axes=(0,))
    states, keys = [raw], [raw]
    bias = [_mask((mx.arange(W) <= p)[None])]  # slot s holds a live row once position s is reached

    if R:
        comp = pool_one(s.comp, p, R, hd, s.inv_freq, eps, r.kv_row)
        states += comp
        cap = comp[0].shape[0]
        visible = mx.arange(cap) < (p + 1) // R
        rows = comp[0]
        if s.index is not None:
            index = pool_one(s.index, p, 4, shape.indexer_dim, s.inv_freq, eps, r.index_key)
            states += index
            if s.index_q is not None:  # the buffer can hold more rows than top-k keeps
                k = shape.top_k
                score = index_scores(s.index_q, s.index_w, index[0], cos, sin, shape.indexer_heads,
                                     shape.indexer_dim, r)
                chosen = top_k_mask(mx.where(visible, score, NEG_INF), k)[0]
                # Gather the k chosen rows: they are exactly the k smallest keys below.
                order = mx.arange(cap)
                top = mx.argpartition(mx.where(chosen, order, order + cap), k - 1)[:k]
                rows, visible = mx.take(rows, top, axis=0), mx.take(visible & chosen, top)
        keys.append(rows)
        bias.append(_mask(visible[None]))

    o = attend(q, mx.concatenate(keys, axis=0), mx.concatenate(bias, axis=-1), s.sinks)
    return rope(o, cos[:, None], -sin[:, None]), states
