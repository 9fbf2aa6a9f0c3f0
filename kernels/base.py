"""The kernel interface: raw GGUF weight blocks in, float32 activations out.

Every implementation (``reference``, ``cpu``, ``metal``, ``cuda``, ``hip``)
offers the same three operations on a ``QTensor``:

    dequantize(w, experts=None)           -> f32 [..., rows, cols]
    matmul(x [T, cols], w)                -> f32 [T, rows]              x @ W.T
    moe(x [T, D], ids [T, K], weights [T, K], gate, up, down, limit)
                                          -> f32 [T, D]

``moe`` is the routed-expert step of docs/spec/v4-model.md §3.8 for a batch of
tokens, each with its K selected experts: per (token, slot) pair
``mid = silu(min(g, limit)) * clip(u, -limit, limit) * weight`` with
``g = x @ gate[e].T`` and ``u = x @ up[e].T``, then ``sum over slots of
mid @ down[e].T``. The route weight multiplies ``mid`` before the down
projection (as ds4 does), so the down pass only has to add the experts up.
A token may list the same expert twice; each slot counts.

Backends take and return ``mx.array``; ``reference`` converts to numpy and
back, so the model can run on the oracle end to end. Two flags tell the model
how a backend may be scheduled: ``host_moe`` (``moe`` runs on the host, on
evaluated inputs, so the decode graph is cut around it) and ``traceable``
(every operation can sit inside ``mx.compile``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .formats import BLOCK, GGMLType, row_blocks


@dataclass(frozen=True)
class QTensor:
    """A weight matrix ``[rows, cols]`` or an expert stack ``[n_expert, rows, cols]``
    kept in its GGUF encoding: ``data`` is the raw bytes, ``[..., rows, row_bytes]``
    uint8, an ``mx.array`` or a numpy array (a memmap slice works)."""

    data: Any
    ggml_type: GGMLType

    def __post_init__(self):
        qtype, _ = row_blocks(self.ggml_type, self.data.shape[-1])  # ValueError on a partial block
        object.__setattr__(self, "ggml_type", qtype)

    @property
    def cols(self) -> int:
        return row_blocks(self.ggml_type, self.data.shape[-1])[1] * BLOCK[self.ggml_type][0]

    @property
    def rows(self) -> int:
        return self.data.shape[-2]

    @property
    def n_experts(self) -> int:
        """Experts in a stack; 0 for a plain matrix."""
        return self.data.shape[0] if self.data.ndim == 3 else 0

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class Backend:
    """Base class: the operations every implementation provides (see the module doc)."""

    name = "abstract"
    host_moe = False
    traceable = True

    def dequantize(self, w: QTensor, experts: mx.array | None = None) -> mx.array:
        raise NotImplementedError

    def matmul(self, x: mx.array, w: QTensor) -> mx.array:
        raise NotImplementedError

    def moe(self, x: mx.array, ids: mx.array, weights: mx.array, gate: QTensor, up: QTensor,
            down: QTensor, limit: float) -> mx.array:
        raise NotImplementedError


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run in this process (no such device or MLX entry point)."""
