"""The router's choice (``Backend.route``, docs/spec/v4-model.md §3.8) as one MLX primitive
with a C++ CPU kernel: the same experts and weights as the MLX-ops oracle at tiny and Flash
widths, with a bias (the choice made here) and with the hash layers' given ids, one node of
a compiled graph, and a clear error for bad input. That a whole model decodes the same with
it is tests/test_hc_cpu_primitives.py's model test (``fused_hc`` switches it)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from magnetar.kernels import mlx_ext
from magnetar.kernels.base import ROUTER_FLOOR, Backend
from magnetar.kernels.cpu import CpuBackend
from magnetar.runtime.lab.graph_nodes import graph_nodes

pytestmark = pytest.mark.usefixtures("on_the_cpu")  # conftest.py

ORACLE = Backend()  # the MLX ops


def logits_for(rng, T, E):
    logits = rng.standard_normal((T, E)).astype(np.float32) * 3
    logits[0, :3] = [25.0, -30.0, 19.5]  # both sides of softplus's cut at 20, and far below
    return mx.array(logits)


@pytest.mark.parametrize("T,E,k,norm", [(1, 16, 6, True), (7, 256, 6, True), (3, 8, 3, False)], ids=str)
def test_fused_route_chooses_and_weighs_as_the_mlx_ops(T, E, k, norm):
    rng = np.random.default_rng([T, E, k])
    logits = logits_for(rng, T, E)
    bias = mx.array(rng.standard_normal(E).astype(np.float32) * 0.5)  # large enough to change the choice
    fused = mx.compile(lambda a, b: mlx_ext.route(a, k, b, None, norm, 2.5, ROUTER_FLOOR))
    ids, w = fused(logits, bias)
    assert graph_nodes(ids, w) == 1 and ids.dtype == mx.int32 and ids.shape == w.shape == (T, k)
    want_ids, want_w = ORACLE.route(logits, k, bias, None, norm, 2.5)
    assert np.array_equal(np.array(ids), np.array(want_ids))  # the same experts in the same order
    assert np.allclose(np.array(w), np.array(want_w), rtol=1e-6, atol=0)
    scores = np.sqrt(np.logaddexp(0.0, np.array(logits, np.float64)))
    keys = scores + np.array(bias)
    for row, chosen in zip(keys, np.array(ids)):  # larger first: the order is part of the contract
        assert list(chosen) == list(np.argsort(-row, kind="stable")[:k])


def test_fused_route_takes_the_hash_layers_ids_as_given():
    rng = np.random.default_rng(4)
    logits = logits_for(rng, 5, 16)
    chosen = mx.array(rng.integers(0, 16, (5, 6)).astype(np.int32))  # repeats allowed: each slot counts
    ids, w = CpuBackend(fused_hc=True).route(logits, 6, None, chosen, True, 1.0)
    want_ids, want_w = ORACLE.route(logits, 6, None, chosen, True, 1.0)
    assert np.array_equal(np.array(ids), np.array(chosen))
    assert np.allclose(np.array(w), np.array(want_w), rtol=1e-6, atol=0)
    assert np.allclose(np.array(w).sum(axis=1), 1.0, rtol=1e-6)


def test_ties_go_to_the_lower_expert_id():
    logits = mx.array([[0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]])  # three tied best, five tied next
    for route in (lambda *a: mlx_ext.route(*a, ROUTER_FLOOR), ORACLE.route):
        ids, _ = route(logits, 4, mx.zeros((8,)), None, True, 1.0)
        assert np.array(ids).tolist() == [[1, 3, 5, 0]]


def test_a_tiny_weight_sum_is_held_at_the_floor():
    logits = mx.full((1, 4), -40.0)  # softplus ~ 4e-18: scores ~ 2e-9, their sum far below the floor
    _, w = mlx_ext.route(logits, 2, mx.zeros((4,)), None, True, 1.0, ROUTER_FLOOR)
    _, want = ORACLE.route(logits, 2, mx.zeros((4,)), None, True, 1.0)
    assert np.allclose(np.array(w), np.array(want), rtol=1e-6) and float(mx.max(w)) < 1e-4


@pytest.mark.parametrize("bad,message", [
    (dict(k=0), r"k must be in \[1, n_expert\]"),
    (dict(bias=None), "give a bias or the chosen ids"),
    (dict(bias=mx.zeros((7,))), r"bias must be float32 \[n_expert\]"),
    (dict(chosen=mx.zeros((2, 3), mx.int32)), "give a bias or the chosen ids"),
], ids=str)
def test_bad_input_is_one_line(bad, message):
    args = dict(logits=mx.zeros((2, 8)), k=3, bias=mx.zeros((8,)), chosen=None, norm=True, scale=1.0,
                floor=ROUTER_FLOOR) | bad
    with pytest.raises(ValueError, match=message):
        mlx_ext.route(**args)
