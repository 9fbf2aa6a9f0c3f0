"""Prompts prefilled while every MoE layer's router is watched (``MoE.observer``):
the common part of ``imatrix`` and ``profile-experts``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx


class RouterWatch:
    """Hooks an observer on each MoE layer of an engine's model for the ``with`` block;
    a subclass says what ``_observer(moe)`` does with (xn, expert ids, route weights)."""

    def __init__(self, engine):
        self.model = engine.model
        self.tokens = 0
        self.chunks = 0  # prefills observed, one per prompt

    def _observer(self, moe) -> Callable[[mx.array, mx.array, mx.array], None]:
        raise NotImplementedError

    def __enter__(self):
        for layer in self.model.layers:
            layer.moe.observer = self._observer(layer.moe)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.model.layers:
            layer.moe.observer = None

    def run(self, engine, prompts: Sequence[list[int]], progress: Callable[[int, int], None] | None = None) -> None:
        """Prefill each token list from an empty state, watched; the engine is left empty."""
        total = sum(len(ids) for ids in prompts)
        with self:
            for ids in prompts:
                engine.reset()
                engine.prefill(ids)
                self.tokens += len(ids)
                self.chunks += 1
                if progress:
                    progress(self.tokens, total)
        engine.reset()
