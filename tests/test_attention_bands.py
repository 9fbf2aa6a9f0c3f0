"""Prefill attention in query blocks that each take only the raw rows their windows reach
(runtime/attention.py, issue 16): the same output as one block over every key, for a
window layer, a ratio-4 layer whose indexer selects top-k, and a ratio-128 layer, in a first
chunk and in one that continues it (raw rows carried over from the ring)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from magnetar.kernels.backend import backend
from magnetar.runtime import Engine, attention
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.kv_state import KVState

CHUNKS = (50, 90)  # tokens; tiny's window is 32, its indexer keeps 8 of the ratio-4 rows


pytestmark = pytest.mark.usefixtures("on_the_cpu")  # conftest.py


def _prefill_chunks(model, il: int, xs: list[mx.array]) -> list[np.ndarray]:
    state = KVState.empty(model.cfg, 256)
    state.reserve(sum(CHUNKS))
    st, attn, pos0, outs = state.layers[il], model.layers[il].attn, 0, []
    for xn in xs:
        y = attn.prefill(xn, pos0, st)
        mx.eval(y, st.arrays())
        outs.append(np.array(y))
        pos0 += xn.shape[0]
    return outs


@pytest.mark.parametrize("kernels", ["cpu", "reference"])
def test_banded_query_blocks_give_the_whole_blocks_output(tiny_models, monkeypatch, kernels):
    engine = Engine(open_model(tiny_models("q2")), 256, kernels=backend(kernels))
    model = engine.model
    rng = np.random.default_rng(7)
    xs = [mx.array(rng.standard_normal((n, model.cfg.d_model)).astype(np.float32)) for n in CHUNKS]
    for il in (0, 2, 3):  # window only, ratio 4 with the indexer, ratio 128
        whole = _prefill_chunks(model, il, xs)  # one block per chunk: its first raw row is row 0
        monkeypatch.setattr(attention, "ATTENTION_BLOCK", 6400)  # blocks of 10-25 queries
        banded = _prefill_chunks(model, il, xs)
        monkeypatch.undo()
        for got, want in zip(banded, whole):
            assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), il
