"""The host's prefill attention (``host.attend``, numpy) updates its score tensor in place for
speed (issue 16); it must give exactly the bits of the plain out-of-place formula, and MLX's
``base.attend`` within float32 rounding, masked keys and sinks included."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from magnetar.kernels import base, host


def _out_of_place(q, keys, bias, sinks):
    T, H, hd = q.shape
    s = (q.reshape(T * H, hd) @ keys.T).reshape(T, H, -1) * np.float32(hd ** -0.5) + bias[:, None, :]
    m = np.maximum(s.max(axis=-1, keepdims=True), sinks[None, :, None])
    e = np.exp(s - m)
    denom = e.sum(axis=-1, keepdims=True) + np.exp(sinks[None, :, None] - m)
    return (e.reshape(T * H, -1) @ keys).reshape(T, H, hd) / denom


@pytest.mark.parametrize("T,H,hd,N", [(1, 1, 32, 1), (17, 4, 128, 200), (40, 8, 64, 97)])
def test_host_attend_is_the_out_of_place_formula_bit_for_bit(T, H, hd, N):
    rng = np.random.default_rng([T, H, N])
    q = rng.standard_normal((T, H, hd)).astype(np.float32) * 3
    keys = rng.standard_normal((N, hd)).astype(np.float32)
    bias = np.where(rng.random((T, N)) < 0.5, -np.inf, 0.0).astype(np.float32)
    bias[0, :] = -np.inf  # a query that sees no key: only its sink
    sinks = rng.standard_normal(H).astype(np.float32)
    got = host.attend(q, keys, bias, sinks)
    assert got.dtype == np.float32 and got.shape == (T, H, hd)
    assert np.array_equal(got.view(np.uint32), _out_of_place(q, keys, bias, sinks).view(np.uint32))
    assert np.all(got[0] == 0.0)
    with mx.stream(mx.cpu):
        want = np.asarray(base.attend(*(mx.array(a) for a in (q, keys, bias, sinks))))
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
