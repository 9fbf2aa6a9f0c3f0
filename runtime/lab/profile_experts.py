"""``magnetar profile-experts``: which routed experts a set of prompts uses, as a hotlist.

Every MoE layer's router is watched while the prompts are prefilled (one at a
time, from an empty state): each (layer, expert) gets its number of picks and the
sum of the route weights it was picked with. ``--hotlist`` reads the result back
to preload the hottest experts into a streaming engine's slots; the text format
is ds4's (docs/spec/streaming-distributed.md §3.5), so files move between the two.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

from .router_watch import RouterWatch


class RouteCounter(RouterWatch):
    """Hooks the routers of an engine's model and counts picks and route weights."""

    def __init__(self, engine):
        super().__init__(engine)
        n_expert = engine.config.n_expert
        self.hits = {layer.moe.il: np.zeros(n_expert, np.int64) for layer in self.model.layers}
        self.weights = {layer.moe.il: np.zeros(n_expert, np.float64) for layer in self.model.layers}

    @property
    def picked(self) -> int:
        """(layer, expert) pairs picked at least once."""
        return sum(int(np.count_nonzero(h)) for h in self.hits.values())

    def _observer(self, moe) -> Callable[[mx.array, mx.array, mx.array], None]:
        hits, weights = self.hits[moe.il], self.weights[moe.il]

        def observe(xn: mx.array, idx: mx.array, w: mx.array) -> None:
            ids = np.asarray(idx).ravel()
            np.add.at(hits, ids, 1)
            np.add.at(weights, ids, np.asarray(w, np.float64).ravel())

        return observe
