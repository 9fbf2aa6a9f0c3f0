"""A layer range: the model run as pipeline stages [0, a), [a, b), [b, n), each with
its own state and the hidden state (hc x D per token, f32) handed from one to the
next, gives the whole model's logits bit for bit, in prefill and decode, on both
decode schedules (one compiled graph; pieces cut around host experts)."""

from __future__ import annotations

import numpy as np
import pytest

from magnetar.kernels.cpu import CpuBackend
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.kv_state import KVState
from magnetar.runtime.model import Model


@pytest.mark.parametrize("native", [False, True], ids=["one-graph", "cut-at-host-experts"])
def test_stages_give_the_whole_models_logits_bit_for_bit(tiny_models, native):
    from magnetar.kernels import native as native_kernels

    if native and not native_kernels.available():
        pytest.skip(f"native kernels unavailable: {native_kernels.unavailable_reason()}")
    mf = open_model(tiny_models("q2"))
    kern, n = CpuBackend(use_native=native), mf.config.n_layer
    whole = Model(mf, kernels=kern)
    stages = [Model(mf, kernels=kern, span=s) for s in ((0, 1), (1, 3), (3, n))]
    assert [(m.first, m.last) for m in stages] == [(True, False), (False, False), (False, True)]
    assert not hasattr(stages[1], "embedding") and not hasattr(stages[1], "output")
    ids = [0] + np.random.default_rng(0).integers(2, 129280, 59).tolist()
    w_state = KVState.empty(mf.config, 256)
    s_states = [KVState.empty(mf.config, 256) for _ in stages]

    def chained(run):
        X = None
        for stage, state in zip(stages, s_states):
            X = run(stage, state, X)
        return X

    for chunk in (ids[:30], ids[30:50]):
        want = whole.prefill(chunk, w_state)
        got = chained(lambda m, st, X: m.prefill(chunk, st, X=X))
        assert np.array_equal(got, want)
    for t in ids[50:]:
        want = whole.decode(t, w_state)
        got = chained(lambda m, st, X: m.decode(t, st, X=X))
        assert np.array_equal(got, want)
    assert all(st.tokens == ids for st in s_states)
