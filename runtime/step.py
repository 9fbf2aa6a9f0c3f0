"""The decode step: one token through the model, scheduled as the kernel backend needs.

The math is the model's (``Layer.decode_to_experts`` and ``decode_from_experts``
around the routed experts, then ``Model.head``); this file only decides how it
becomes MLX graphs, from two flags of the backend (``kernels/base.py``):

- experts that run inside MLX's graph: the whole step is one compiled graph,
  built once per state shape, with no Python work per layer;
- experts that run on the host (``host_moe``, e.g. the native C kernels when the
  MLX extension that makes them a graph node is missing), or
  that stream from the file (the host decides which to read): the step is cut
  at each layer's experts. One compiled piece runs from one layer's
  experts to the next (fold the previous experts back, attention, route), the
  host kernel runs between them on evaluated inputs (each eval is the hand-off
  it needs), and a last piece folds the final experts back and applies the head.
  A backend that is not ``traceable`` gets the same graph or pieces uncompiled.

Both schedules run the same per-layer functions, so they build the same graph.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING

import mlx.core as mx

from .kv_state import KVState, LayerState

if TYPE_CHECKING:
    from .model import Model


class DecodeStep:
    """``step(token [1], p, state) -> y [1, D]`` (before the output projection); the state's
    arrays are replaced by the new ones. A pipeline stage (``model.span``) runs only its
    layers: from ``X`` [1, hc, D] unless it is the first, to ``X`` unless it is the last."""

    def __init__(self, model: "Model"):
        self.model = model
        full = KVState.empty(model.cfg, 1).layers
        self.template = [full[il] for il in model.span]  # which arrays each layer's state holds
        kernels = model.kernels
        self.host_experts = kernels.host_moe or model.experts is not None  # streamed: the host picks the reads
        self.host_seconds = 0.0  # the last call's host time: building and dispatching graphs, not evaluating
        wrap = mx.compile if kernels.traceable else (lambda f: f)
        if self.host_experts:
            self.pieces = [wrap(self._piece(il)) for il in range(len(model.layers))]
            self.finish = wrap(self._finish)
        else:
            self.whole = wrap(self._whole)

    def __call__(self, token: mx.array, p: mx.array, state: KVState, X: mx.array | None = None) -> mx.array:
        start = time.perf_counter()
        states = [state.layers[il] for il in self.model.span]
        if self.host_experts:
            y, waited = self._cut(token, p, states, X)
            self.host_seconds = time.perf_counter() - start - waited
            return y
        y, *arrays = self.whole(token, p, *([] if X is None else [X]), *[a for st in states for a in st.arrays()])
        for st in states:  # drops the old buffers before eval, so updates can be in place
            n = len(st.arrays())
            st.replace(arrays[:n])
            arrays = arrays[n:]
        self.host_seconds = time.perf_counter() - start
        return y

    def _states(self, il: int, arrays) -> LayerState:
        """Layer ``il``'s state over ``arrays`` (graph inputs), leaving the live state alone."""
        st = copy.copy(self.template[il])
        st.replace(list(arrays))
        return st

    # -- one graph ------------------------------------------------------------------------

    def _whole(self, token: mx.array, p: mx.array, *arrays: mx.array) -> tuple[mx.array, ...]:
        model, states, it = self.model, [], 0
        X, arrays = (model.embed(token), arrays) if model.first else (arrays[0], arrays[1:])
        for il, template in enumerate(self.template):
            n = len(template.arrays())
            states.append(self._states(il, arrays[it:it + n]))
            it += n
        for layer, st in zip(model.layers, states):
            X, xn, idx, w, post, comb = layer.decode_to_experts(X, token, p, st)
            X = layer.decode_from_experts(layer.moe.routed(xn, idx, w), X, xn, post, comb)
        return (model.head(X) if model.last else X, *[a for st in states for a in st.arrays()])

    # -- cut at each layer's host experts -----------------------------------------------------

    def _cut(self, token: mx.array, p: mx.array, states: list[LayerState],
             X: mx.array | None) -> tuple[mx.array, float]:
        """The step's output and the seconds spent evaluating pieces and running host experts."""
        carry = (self.model.embed(token) if X is None else X,)  # then (X, routed, xn, post, comb)
        waited = 0.0
        for layer, piece, st in zip(self.model.layers, self.pieces, states):
            X, xn, idx, w, post, comb, *arrays = piece(*carry, token, p, *st.arrays())
            st.replace(arrays)
            t0 = time.perf_counter()
            mx.eval(xn, idx, w, *arrays)
            routed = layer.moe.routed(xn, idx, w)
            waited += time.perf_counter() - t0
            carry = (X, routed, xn, post, comb)
        return self.finish(*carry), waited

    def _piece(self, il: int):
        """Layer ``il`` from the previous layer's experts (folded back first) to its own routing."""
        layers = self.model.layers
        prev, layer = layers[il - 1] if il else None, layers[il]
        n_carry = 1 if prev is None else 5

        def run(*args):
            X, (token, p), arrays = args[0], args[n_carry:n_carry + 2], args[n_carry + 2:]
            if prev is not None:
                X = prev.decode_from_experts(args[1], X, *args[2:5])
            st = self._states(il, arrays)
            X, xn, idx, w, post, comb = layer.decode_to_experts(X, token, p, st)
            return (X, xn, idx, w, post, comb, *st.arrays())

        return run

    def _finish(self, X, routed, xn, post, comb) -> mx.array:
        X = self.model.layers[-1].decode_from_experts(routed, X, xn, post, comb)
        return self.model.head(X) if self.model.last else X
