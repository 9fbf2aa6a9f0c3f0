"""Importance matrices: collect them from a model, read and write llama.cpp's ``.dat``.

The importance of an input column of a routed expert is the mean of the
squared activation that column sees over the tokens routed to that expert
(docs/spec/quant-kernels.md §3.1). Gate and up see the FFN-normed layer input;
down sees the route-weighted SwiGLU output ``mid``. The quantizers weight
each element's error by it, so columns that carry large activations are
reproduced more faithfully.

File format (llama.cpp "legacy" ``.dat``, little-endian): ``int32 n_entries``,
then per entry ``int32 name_len, name, int32 ncall, int32 n_values,
float32 values[n_values]``, then optionally ``int32 n_chunks, int32 len,
dataset name``. A reader divides ``values`` by ``ncall``. Routed tensors are
packed like ds4 does: one entry per tensor, ``n_expert * n_cols`` values,
expert ``e`` at ``[e * n_cols, (e + 1) * n_cols)``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import MagnetarError
from ..expert_cache import ROUTED
from ..fileio import atomic_write_bytes
from .router_watch import RouterWatch


class ImatrixError(MagnetarError):
    pass


@dataclass
class ExpertStats:
    """Running sums for one layer: squared inputs per expert and column, and token counts."""

    x2: np.ndarray  # [n_expert, d_model]: gate/up inputs
    mid2: np.ndarray  # [n_expert, expert_ffn]: down inputs
    count: np.ndarray = field(default=None)  # [n_expert] (token, slot) pairs seen

    def __post_init__(self):
        if self.count is None:
            self.count = np.zeros(len(self.x2), np.int64)


class Collector(RouterWatch):
    """Hooks every MoE layer of an engine's model and accumulates the statistics."""

    def __init__(self, engine):
        super().__init__(engine)
        cfg = engine.config
        self.layers = [ExpertStats(np.zeros((cfg.n_expert, cfg.d_model)), np.zeros((cfg.n_expert, cfg.expert_ffn)))
                       for _ in range(cfg.n_layer)]

    def _observer(self, moe) -> Callable[[mx.array, mx.array, mx.array], None]:
        stats = self.layers[moe.il]
        kernels = moe.kernels

        def observe(xn: mx.array, idx: mx.array, w: mx.array) -> None:
            x, ids, weights = np.asarray(xn, np.float64), np.asarray(idx), np.asarray(w, np.float64)
            for e in np.unique(ids):
                t, slot = np.nonzero(ids == e)
                sel = mx.array([int(e)], dtype=mx.int32)
                gate, up = (np.asarray(kernels.dequantize(m, sel)[0], np.float64) for m in (moe.gate, moe.up))
                g = np.minimum(x[t] @ gate.T, moe.limit)
                silu = g * (0.5 + 0.5 * np.tanh(0.5 * g))  # tanh form: no exp overflow
                mid = silu * np.clip(x[t] @ up.T, -moe.limit, moe.limit) * weights[t, slot][:, None]
                stats.x2[e] += np.sum(x[t] ** 2, axis=0)
                stats.mid2[e] += np.sum(mid ** 2, axis=0)
                stats.count[e] += len(t)

        return observe

    def entries(self) -> dict[str, tuple[int, np.ndarray]]:
        """``name -> (ncall, values)`` for the ``.dat`` file: per-expert means times ``ncall``."""
        out = {}
        ncall = max(self.chunks, 1)
        for il, stats in enumerate(self.layers):
            seen = np.maximum(stats.count, 1)[:, None]
            for tensor, sums in zip(ROUTED, (stats.x2, stats.x2, stats.mid2)):
                values = (sums / seen * ncall).astype(np.float32).reshape(-1)
                out[f"blk.{il}.{tensor}.weight"] = (ncall, values)
        return out


# -- the .dat file ------------------------------------------------------------------------


def write_dat(path: str | os.PathLike, entries: dict[str, tuple[int, np.ndarray]], dataset: str = "") -> None:
    parts = [struct.pack("<i", len(entries))]
    for name, (ncall, values) in entries.items():
        raw = name.encode()
        values = np.ascontiguousarray(values, dtype="<f4")
        parts += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size), values.tobytes()]
    if dataset:
        raw = dataset.encode()
        parts += [struct.pack("<ii", max((n for n, _ in entries.values()), default=0), len(raw)), raw]
    atomic_write_bytes(path, b"".join(parts))


class Imatrix:
    """A loaded ``.dat``: per-tensor mean squared activations (values / ncall)."""

    def __init__(self, values: dict[str, np.ndarray], path: str = ""):
        self.values, self.path = values, path

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Imatrix":
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise ImatrixError(f"cannot read imatrix {path}: {err.strerror or err}") from None
        values, at = {}, 0

        def take(fmt: str):
            nonlocal at
            size = struct.calcsize(fmt)
            if at + size > len(data):
                raise ImatrixError(f"imatrix {path} is truncated at byte {at}", "collect it again")
            out = struct.unpack_from(fmt, data, at)
            at += size
            return out

        (n_entries,) = take("<i")
        if not 0 <= n_entries <= 1 << 20:
            raise ImatrixError(f"{path} is not an imatrix .dat file (entry count {n_entries})")
        for _ in range(n_entries):
            (n,) = take("<i")
            name = bytes(take(f"<{n}s")[0]).decode(errors="replace") if 0 <= n < 4096 else None
            if name is None:
                raise ImatrixError(f"{path} is not an imatrix .dat file (name length {n})")
            ncall, n_values = take("<ii")
            v = np.frombuffer(data, "<f4", n_values, at) if at + 4 * n_values <= len(data) else None
            if v is None or n_values < 0:
                raise ImatrixError(f"imatrix {path} is truncated in entry {name!r}", "collect it again")
            at += 4 * n_values
            values[name] = v.astype(np.float32) / max(ncall, 1)
        return cls(values, str(path))

    def for_tensor(self, name: str, n_cols: int, expert: int | None = None,
                   n_experts: int = 0) -> np.ndarray | None:
        """Column importance for a tensor (one expert of a stack), or None when the file has
        none. Tries ``name.expert.E``, ``name.expert_E``, then ``name`` packed per expert."""
        if expert is not None:
            for key in (f"{name}.expert.{expert}", f"{name}.expert_{expert}"):
                if key in self.values:
                    return self._checked(key, self.values[key], n_cols)
        v = self.values.get(name)
        if v is None:
            return None
        if expert is not None and v.size == n_experts * n_cols:
            return v[expert * n_cols:(expert + 1) * n_cols]
        return self._checked(name, v, n_cols)

    def _checked(self, key: str, v: np.ndarray, n_cols: int) -> np.ndarray:
        if v.size != n_cols:
            raise ImatrixError(f"imatrix entry {key} has {v.size} values, the tensor has {n_cols} columns",
                               "the imatrix was collected on another model")
        return v
