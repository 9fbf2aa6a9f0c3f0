"""Every kernel backend that can run here against the numpy reference.

Dequantization must be bit-exact; products agree within 1e-5 relative
(float32 sums in another order against float64). Shapes cover the decode
step (1 token, 6 experts), odd token counts, repeated expert ids and every
weight encoding the model files use.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from magnetar.kernels import BLOCK, GGMLType, reference
from magnetar.kernels.backend import BACKENDS, BackendUnavailable, QTensor, backend, default_backend_name
from kernel_data import WEIGHT_TYPES, random_moe_case, random_qtensor, reference_moe, rel_err

RTOL = 1e-5


def runnable_backends() -> list[str]:
    names = []
    for name in BACKENDS:
        try:
            backend(name)
        except BackendUnavailable:  # no such device here
            continue
        names.append(name)
    return names


def make(name: str):
    """A backend by test name: ``cpu-mlx`` is the CPU backend without its native kernels."""
    if name == "cpu-mlx":
        from magnetar.kernels.cpu import CpuBackend
        return CpuBackend(use_native=False)
    return backend(name)


RUNNABLE = [n for n in runnable_backends() if n != "reference"]
MOE_RUNNABLE = RUNNABLE + ["cpu-mlx"]  # the CPU backend's MoE has two paths; its other operations one


def test_cpu_backend_runs_here_and_auto_picks_it():
    assert "cpu" in RUNNABLE
    from magnetar.kernels import native
    assert backend("cpu").native == native.available()  # the C kernels whenever they build
    assert default_backend_name() == "cpu"  # tests run on MLX's CPU device
    assert backend("auto").name == "cpu"


@pytest.mark.parametrize("name", ["metal", "cuda", "hip"])
def test_device_backends_without_their_device_say_why(name):
    with pytest.raises(BackendUnavailable):
        backend(name)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown kernel backend"):
        backend("tpu")


def test_qtensor_reads_its_shape_from_the_row_bytes():
    rng = np.random.default_rng(0)
    w = random_qtensor(rng, GGMLType.IQ2_XXS, (3, 40, 512))
    assert (w.n_experts, w.rows, w.cols) == (3, 40, 512)
    assert w.data.shape[-1] == 2 * BLOCK[GGMLType.IQ2_XXS][1]
    with pytest.raises(ValueError, match="multiple of 66 bytes"):
        QTensor(np.zeros((4, 65), np.uint8), GGMLType.IQ2_XXS)


@pytest.mark.parametrize("name", RUNNABLE)
@pytest.mark.parametrize("ggml_type", WEIGHT_TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_exact(name, ggml_type):
    rng = np.random.default_rng(int(ggml_type))
    w = random_qtensor(rng, ggml_type, (5, 7, 512))
    expected = reference.dequantize(w.data, ggml_type)
    assert np.array_equal(np.asarray(backend(name).dequantize(w)).view(np.uint32), expected.view(np.uint32))
    picked = np.array([4, 0, 4], np.int32)
    got = np.asarray(backend(name).dequantize(w, mx.array(picked)))
    assert np.array_equal(got.view(np.uint32), expected[picked].view(np.uint32))


@pytest.mark.parametrize("name", RUNNABLE)
@pytest.mark.parametrize("ggml_type", WEIGHT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tokens", [1, 3, 17, 40])
def test_matmul_matches_reference(name, ggml_type, n_tokens):
    rng = np.random.default_rng([int(ggml_type), n_tokens])
    w = random_qtensor(rng, ggml_type, (96, 768))
    x = rng.standard_normal((n_tokens, 768)).astype(np.float32)
    expected = reference.matmul(x, w.data, ggml_type)
    got = backend(name).matmul(mx.array(x), QTensor(mx.array(w.data), ggml_type))
    assert got.shape == (n_tokens, 96) and got.dtype == mx.float32
    assert rel_err(got, expected) < RTOL


def _moe_case(rng, recipe, n_tokens, repeats, n_experts=12, k=6, d_model=512, ffn=256):
    return random_moe_case(rng, recipe, n_tokens, k, n_experts, d_model, ffn, repeats)


@pytest.mark.parametrize("name", MOE_RUNNABLE)
@pytest.mark.parametrize("recipe", ["q2", "q4", "q8", "f32"])
@pytest.mark.parametrize("n_tokens,repeats", [(1, False), (1, True), (2, False), (33, False), (33, True)])
def test_moe_matches_reference(name, recipe, n_tokens, repeats):
    rng = np.random.default_rng([n_tokens, repeats, len(recipe)])
    x, ids, w, mats = _moe_case(rng, recipe, n_tokens, repeats)
    expected = reference_moe(x, ids, w, mats, 10.0)
    as_mx = [QTensor(mx.array(m.data), m.ggml_type) for m in mats]
    got = make(name).moe(mx.array(x), mx.array(ids), mx.array(w), *as_mx, 10.0)
    assert got.shape == x.shape
    assert rel_err(got, expected) < RTOL


def test_moe_clamp_is_exercised():
    """The case above is only a test of the clamp if gates and ups really pass 10."""
    rng = np.random.default_rng([1, False, 2])
    x, ids, _, (gate, up, _) = _moe_case(rng, "q2", 1, False)
    g = x @ reference.dequantize(gate.data[ids[0]], gate.ggml_type).transpose(0, 2, 1)
    u = x @ reference.dequantize(up.data[ids[0]], up.ggml_type).transpose(0, 2, 1)
    assert (g > 10).any() and (np.abs(u) > 10).any()


def test_reference_moe_equals_a_direct_per_pair_loop():
    """The oracle itself, against the formula written out for each (token, slot) pair."""
    rng = np.random.default_rng(7)
    x, ids, w, (gate, up, down) = _moe_case(rng, "q4", 3, True, n_experts=4, k=3)
    dense = [reference.dequantize(m.data, m.ggml_type).astype(np.float64) for m in (gate, up, down)]
    expected = np.zeros(x.shape)
    for t in range(3):
        for s in range(3):
            e = ids[t, s]
            g = np.minimum(dense[0][e] @ x[t], 10.0)
            u = np.clip(dense[1][e] @ x[t], -10.0, 10.0)
            expected[t] += dense[2][e] @ (g * u * w[t, s] / (1 + np.exp(-g)))
    got = reference.moe(x, ids, w, *[(m.data, m.ggml_type) for m in (gate, up, down)], 10.0)
    assert rel_err(got, expected) < 1e-6


def test_cpu_moe_one_token_traces_inside_compile():
    """The decode step calls moe inside mx.compile: the one-token path must trace."""
    rng = np.random.default_rng(3)
    x, ids, w, mats = _moe_case(rng, "q2", 1, False)
    as_mx = [QTensor(mx.array(m.data), m.ggml_type) for m in mats]
    cpu = make("cpu-mlx")
    step = mx.compile(lambda a, i, r: cpu.moe(a, i, r, *as_mx, 10.0))
    got = step(mx.array(x), mx.array(ids), mx.array(w))
    expected = reference_moe(x, ids, w, mats, 10.0)
    assert rel_err(got, expected) < RTOL
