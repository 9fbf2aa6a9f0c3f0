"""How many MLX graph nodes one decode token evaluates (``magnetar bench ... --nodes``).

On a GPU every node is a kernel launch, and on the CPU each costs ~3 µs of
dispatch (docs/spec/peer-overhead.md), so the node count is the number that
carries over between backends. Counted on the compiled graph MLX will run,
after its fusion: the graph of each compiled call's outputs, as
``mx.export_to_dot`` draws it (one rectangle per primitive). A step cut
around host experts (runtime/step.py) is counted piece by piece, each
piece's inputs evaluated first so no node is counted twice; the host expert
step itself is no MLX node. The embedding lookup (3 nodes) is left out.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx

from ..kv_state import KVState


@dataclass(frozen=True)
class NodeCount:
    per_token: int
    n_layer: int
    calls: int  # compiled calls per token (1 for one graph; layers + 1 when cut)

    @property
    def per_layer(self) -> float:
        return self.per_token / self.n_layer

    def extra(self) -> dict[str, float]:
        return {"nodes": float(self.per_token), "nodes/layer": self.per_layer}


def graph_nodes(*outputs: Any) -> int:
    """Primitives between ``outputs`` and already evaluated arrays."""
    buf = io.StringIO()
    mx.export_to_dot(buf, *outputs)
    return buf.getvalue().count("shape=rectangle")


def decode_nodes(model: Any, ctx: int) -> NodeCount:
    """Count one decode step of ``model`` (runtime.model.Model) on a scratch state.

    Call on the thread that runs the model's MLX work (the engine thread)."""
    step = model.step
    counts: list[int] = []

    def counting(fn: Callable) -> Callable:
        def call(*args):
            mx.eval(*args)
            out = fn(*args)
            counts.append(graph_nodes(*(out if isinstance(out, (tuple, list)) else (out,))))
            return out
        return call

    names = ("pieces", "finish") if step.host_experts else ("whole",)
    saved = {name: getattr(step, name) for name in names}
    try:
        if step.host_experts:
            step.pieces = [counting(piece) for piece in step.pieces]
            step.finish = counting(step.finish)
        else:
            step.whole = counting(step.whole)
        model.decode(0, KVState.empty(model.cfg, ctx))
    finally:
        for name, value in saved.items():
            setattr(step, name, value)
    return NodeCount(sum(counts), len(model.layers), len(counts))
