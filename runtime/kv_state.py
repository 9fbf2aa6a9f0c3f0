"""The per-layer attention state that lets a sequence continue (spec §5.1).

Per layer: the raw window ring (the last ``window`` KV rows, slot ``p % window``);
for compressed layers the compressed rows and the compressor frontier; for
ratio-4 layers also the indexer rows and the indexer frontier.

Buffers are fixed-shape so a decode step can be compiled once: the compressed
row buffers are allocated lazily and grow geometrically (a short session never
pays for a long ``--ctx``), and a decode step always writes its partial pooled
row at slot ``p // ratio`` — a slot no token can see until its window closes
and the real row overwrites it. Frontier score slots start at ``EMPTY``, a
finite "minus infinity" (ds4's sentinel), so pooling an unfinished window never
makes NaNs that a masked attention could pick up as ``0 * NaN``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from .config import ModelConfig

EMPTY = -1e30
GROW_QUANTUM = 64  # compressed-row capacity grows in multiples of this


def frontier_rows(ratio: int) -> int:
    """Frontier height: ratio 4 keeps the previous window too (lane A overlap)."""
    return 2 * ratio if ratio == 4 else ratio


def lanes(ratio: int) -> int:
    return 2 if ratio == 4 else 1


def empty_frontier(ratio: int, width: int) -> tuple[mx.array, mx.array]:
    rows = frontier_rows(ratio)
    return mx.zeros((rows, width), mx.float32), mx.full((rows, width), EMPTY, mx.float32)


@dataclass
class LayerState:
    ratio: int
    raw: mx.array  # [window, head_dim], slot p % window
    comp: mx.array | None = None  # [cap, head_dim]; rows >= n_comp are scratch
    f_kv: mx.array | None = None  # frontier [rows, lanes*head_dim]
    f_sc: mx.array | None = None
    index: mx.array | None = None  # [cap, indexer_dim] (ratio 4 only)
    i_kv: mx.array | None = None  # indexer frontier [8, 2*indexer_dim]
    i_sc: mx.array | None = None

    ARRAYS = ("raw", "comp", "f_kv", "f_sc", "index", "i_kv", "i_sc")

    def arrays(self) -> list[mx.array]:
        return [a for a in (getattr(self, n) for n in self.ARRAYS) if a is not None]

    def replace(self, arrays: list[mx.array]) -> None:
        it = iter(arrays)
        for n in self.ARRAYS:
            if getattr(self, n) is not None:
                setattr(self, n, next(it))


@dataclass
class KVState:
    """Everything needed to continue after ``len(tokens)`` tokens with zero re-processing."""

    cfg: ModelConfig
    ctx: int
    layers: list[LayerState] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    grown: range | None = None  # the layers ``reserve`` grows (a pipeline stage's own); None: all

    @classmethod
    def empty(cls, cfg: ModelConfig, ctx: int) -> "KVState":
        hd, idim = cfg.head_dim, cfg.indexer_dim
        layers = []
        for il in range(cfg.n_layer):
            r = cfg.ratio(il)
            st = LayerState(r, mx.zeros((cfg.window, hd), mx.float32))
            if r:
                st.comp = mx.zeros((0, hd), mx.float32)
                st.f_kv, st.f_sc = empty_frontier(r, lanes(r) * hd)
            if r == 4:
                st.index = mx.zeros((0, idim), mx.float32)
                st.i_kv, st.i_sc = empty_frontier(r, 2 * idim)
            layers.append(st)
        return cls(cfg, ctx, layers)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def n_comp(self, il: int) -> int:
        """Closed compressed rows of layer ``il`` (0 for uncompressed layers)."""
        r = self.layers[il].ratio
        return self.n_tokens // r if r else 0

    def reserve(self, n_tokens: int) -> None:
        """Make compressed buffers hold every slot a step up to ``n_tokens`` tokens may write."""
        for st in self.layers if self.grown is None else [self.layers[il] for il in self.grown]:
            if not st.ratio:
                continue
            need = (n_tokens - 1) // st.ratio + 1  # slot p // ratio for p < n_tokens
            cap = st.comp.shape[0]
            if need <= cap:
                continue
            limit = self.ctx // st.ratio + 1
            grown = max(need, min(2 * cap, limit))
            grown = min(-(-grown // GROW_QUANTUM) * GROW_QUANTUM, max(limit, need))
            st.comp = _grow(st.comp, grown)
            if st.index is not None:
                st.index = _grow(st.index, grown)

    def arrays(self) -> list[mx.array]:
        return [a for st in self.layers for a in st.arrays()]

    def replace(self, arrays: list[mx.array]) -> None:
        i = 0
        for st in self.layers:
            k = len(st.arrays())
            st.replace(arrays[i:i + k])
            i += k

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())


def _grow(buf: mx.array, rows: int) -> mx.array:
    pad = mx.zeros((rows - buf.shape[0], buf.shape[1]), buf.dtype)
    return mx.concatenate([buf, pad], axis=0)
