"""The official precision round trips (docs/spec/v4-model.md §3.1) against an
independent numpy reference that enumerates every FP8/FP4 code."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from magnetar.kernels import precision  # the round trips live with the kernels
from magnetar.runtime.precision import f16_round, fp8_kv_round_trip, indexer_round_trip

# ---- numpy reference -------------------------------------------------------


def e4m3fn_magnitudes() -> np.ndarray:
    """Values of the 127 finite non-negative E4M3FN codes (0x7F is NaN),
    indexed by code: 4 exponent bits (bias 7), 3 mantissa bits."""
    values = []
    for code in range(127):
        exponent, mantissa = code >> 3, code & 7
        if exponent == 0:
            values.append(mantissa / 8 * 2.0**-6)
        else:
            values.append((1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return np.array(values)


def e2m1_magnitudes() -> np.ndarray:
    """Values of the 8 non-negative E2M1 codes: 2 exponent bits (bias 1), 1 mantissa bit."""
    values = []
    for code in range(8):
        exponent, mantissa = code >> 1, code & 1
        values.append(mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1))
    return np.array(values)


E4M3 = e4m3fn_magnitudes()
E2M1 = e2m1_magnitudes()


def round_to_codes(t: np.ndarray, magnitudes: np.ndarray) -> np.ndarray:
    """Nearest representable value (|t| within range), ties to the even code;
    the sign is kept, so a negative value that rounds to zero gives -0."""
    a = np.abs(t.astype(np.float64))
    upper = np.clip(np.searchsorted(magnitudes, a), 1, len(magnitudes) - 1)
    lower = upper - 1
    below, above = a - magnitudes[lower], magnitudes[upper] - a
    tie_pick = np.where(lower % 2 == 0, lower, upper)
    pick = np.where(below < above, lower, np.where(above < below, upper, tie_pick))
    return np.copysign(magnitudes[pick], t).astype(np.float32)


def pow2_at_least(y: np.ndarray) -> np.ndarray:
    """Smallest power of two >= y (y > 0): y = m * 2^e with m in [0.5, 1)."""
    mantissa, exponent = np.frexp(y)
    return np.where(mantissa == 0.5, y, np.ldexp(np.float32(1), exponent)).astype(np.float32)


def ref_blockwise(x: np.ndarray, block: int, limit: float, floor: float, magnitudes) -> np.ndarray:
    blocks = x.reshape(*x.shape[:-1], -1, block)
    amax = np.maximum(np.abs(blocks).max(axis=-1, keepdims=True), np.float32(floor))
    scale = pow2_at_least(amax / np.float32(limit))
    scaled = np.clip(blocks / scale, -limit, limit)
    return (round_to_codes(scaled, magnitudes) * scale).reshape(x.shape)


def ref_fp8_kv(x: np.ndarray, nope: int) -> np.ndarray:
    out = x.copy()
    out[..., :nope] = ref_blockwise(x[..., :nope], 64, 448.0, 1e-4, E4M3)
    return out


def ref_hadamard(x: np.ndarray) -> np.ndarray:
    """In-place butterflies, strides 1, 2, 4, ..., then * float32(1/sqrt(D))."""
    x = x.copy()
    n = x.shape[-1]
    stride = 1
    while stride < n:
        for base in range(0, n, 2 * stride):
            a = x[..., base : base + stride].copy()
            b = x[..., base + stride : base + 2 * stride].copy()
            x[..., base : base + stride] = a + b
            x[..., base + stride : base + 2 * stride] = a - b
        stride *= 2
    return x * np.float32(1 / np.sqrt(n))


def ref_indexer(x: np.ndarray) -> np.ndarray:
    return ref_blockwise(ref_hadamard(x), 32, 6.0, 6 * 2.0**-126, E2M1)


# ---- helpers ----------------------------------------------------------------


def assert_bits_equal(actual, expected) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    mismatch = actual.view(np.uint32) != expected.view(np.uint32)
    assert not mismatch.any(), (
        f"{mismatch.sum()} values differ, e.g. {actual[mismatch][:4]} vs {expected[mismatch][:4]}"
    )


def midpoints(magnitudes: np.ndarray) -> np.ndarray:
    mids = ((magnitudes[:-1] + magnitudes[1:]) / 2).astype(np.float32)
    near = [np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))]
    points = np.concatenate([mids, *near, magnitudes.astype(np.float32)])
    return np.concatenate([points, -points])


def hard_inputs(width: int, rng: np.random.Generator, limit: float, magnitudes: np.ndarray) -> np.ndarray:
    """Rows [n, width]: normal data at many scales (the smallest below the
    amax floor), zeros, code midpoints and their neighbours in blocks whose
    amax/limit is an exact power of two (ties survive scaling), and values at
    and just above the top of the range."""
    rows = [rng.standard_normal(width) * scale for scale in (1e-30, 1e-7, 1e-3, 1, 1e3, 1e30)]
    rows.append(np.zeros(width))
    ties = rng.choice(midpoints(magnitudes), size=width)
    ties[::16] = limit  # pin the block scale to 1 so the ties survive scaling
    rows += [ties, ties * 2.0**-20, ties * 2.0**40]
    top = np.full(width, limit) * rng.choice([-1, 1], size=width)
    rows += [top, np.nextafter(top.astype(np.float32), np.float32(0)) * np.float32(1 + 2**-22)]
    return np.stack(rows).astype(np.float32)


# ---- the rounding primitives ------------------------------------------------


def test_to_fp8_rounds_like_e4m3fn_enumeration():
    """mx.to_fp8 is used for the E4M3 step; prove it on ties, neighbours of
    ties, subnormals and a million random float32 values in [-448, 448]."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 0x43E00000, size=1_000_000, dtype=np.uint32)  # |x| < 448
    random = bits.view(np.float32) * rng.choice(np.float32([-1, 1]), size=bits.size)
    for t in (midpoints(E4M3), random):
        assert_bits_equal(precision._round_e4m3(mx.array(t)), round_to_codes(t, E4M3))


def test_e2m1_rounding_matches_enumeration():
    rng = np.random.default_rng(1)
    random = rng.uniform(-6, 6, size=100_000).astype(np.float32)
    for t in (midpoints(E2M1), random, np.float32([0.0, -0.0, 1e-40, -1e-40])):
        assert_bits_equal(precision._round_e2m1(mx.array(t)), round_to_codes(t, E2M1))


@pytest.mark.parametrize(
    ("value", "rounded"),
    [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0), (5.5, 6.0), (-2.5, -2.0)],
)
def test_e2m1_known_ties(value, rounded):
    assert precision._round_e2m1(mx.array([value])).item() == rounded


def test_fp8_known_roundings():
    """One block whose amax is 448 (scale 1) carries hand-checked cases."""
    cases = {
        0.5 + 2**-5: 0.5,  # tie between codes 0x30 (even) and 0x31
        0.5 + 3 * 2**-5: 0.625,  # tie between 0x31 and 0x32 (even)
        2**-10: 0.0,  # half the subnormal step: ties down to code 0
        3 * 2**-10: 2**-8,  # tie between subnormal codes 1 and 2
        -(2**-10 + 2**-20): -(2**-9),
        300.0: 288.0,  # step 32 above 256: nearer to 288 than to 320
        400.0: 384.0,  # tie between 384 (0x7C, even) and 416
        432.0: 448.0,  # tie between 416 and 448 (0x7E, even)
    }
    block = np.zeros(64, dtype=np.float32)
    block[0] = 448
    block[1 : 1 + len(cases)] = list(cases)
    out = np.array(fp8_kv_round_trip(mx.array(block), nope=64))
    assert out[0] == 448
    assert list(out[1 : 1 + len(cases)]) == list(cases.values())


def test_block_scale_is_exact_at_powers_of_two():
    """amax = 448 * 2^k must give scale 2^k; with 2^(k+1) (what an inexact
    log2 can give) the smallest subnormal step would be lost."""
    for k in range(-20, 21):
        block = np.full(64, 448 * 2.0**k, dtype=np.float32)
        block[1] = 2.0 ** (k - 9)  # code 1 at scale 2^k, a tie to 0 at 2^(k+1)
        out = np.array(fp8_kv_round_trip(mx.array(block), nope=64))
        assert out[1] == block[1], k


# ---- the public round trips ---------------------------------------------------


@pytest.mark.parametrize(("width", "nope"), [(576, 448), (128, 64), (64, 64)])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)], ids=str)
def test_fp8_kv_matches_reference(width, nope, lead):
    rng = np.random.default_rng(width + len(lead))
    rows = hard_inputs(width, rng, 448.0, E4M3)
    x = np.broadcast_to(rows, (*lead, *rows.shape)).copy()
    assert_bits_equal(fp8_kv_round_trip(mx.array(x), nope), ref_fp8_kv(x, nope))


@pytest.mark.parametrize("width", [32, 128, 256])
@pytest.mark.parametrize("lead", [(), (4,), (2, 3)], ids=str)
def test_indexer_matches_reference(width, lead):
    rng = np.random.default_rng(width + len(lead))
    rows = hard_inputs(width, rng, 6.0, E2M1)
    x = np.broadcast_to(rows, (*lead, *rows.shape)).copy()
    assert_bits_equal(indexer_round_trip(mx.array(x)), ref_indexer(x))


def test_reference_hadamard_is_the_sylvester_matrix():
    n = 128
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    popcount = np.vectorize(lambda v: bin(v).count("1"))(i & j)
    hadamard = np.where(popcount % 2 == 0, 1.0, -1.0) / np.sqrt(n)
    x = np.random.default_rng(2).standard_normal((5, n)).astype(np.float32)
    np.testing.assert_allclose(ref_hadamard(x), x.astype(np.float64) @ hadamard.T, rtol=0, atol=1e-5)


def test_round_trips_inside_compile():
    rng = np.random.default_rng(3)
    kv = rng.standard_normal((2, 5, 576)).astype(np.float32) * 7
    idx = rng.standard_normal((2, 5, 128)).astype(np.float32) * 7
    step = mx.compile(lambda a, b: (fp8_kv_round_trip(a, 448), indexer_round_trip(b), f16_round(a)))
    out_kv, out_idx, out_f16 = step(mx.array(kv), mx.array(idx))
    assert_bits_equal(out_kv, ref_fp8_kv(kv, 448))
    assert_bits_equal(out_idx, ref_indexer(idx))
    assert_bits_equal(out_f16, kv.astype(np.float16).astype(np.float32))


def test_f16_round_matches_numpy():
    """Ties, subnormals, underflow to zero and overflow to inf."""
    rng = np.random.default_rng(4)
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    special = np.float32([1 + 2**-11, 1 + 3 * 2**-11, 2**-25, 2**-24 * 1.5, 65520, 65519, -0.0, 1e-45])
    for values in (x, special):
        with np.errstate(over="ignore"):
            expected = values.astype(np.float16).astype(np.float32)
        assert_bits_equal(f16_round(mx.array(values)), expected)


def test_nope_must_fill_whole_blocks():
    with pytest.raises(ValueError):
        fp8_kv_round_trip(mx.zeros((1, 128)), nope=96)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    log_scale=st.integers(-40, 40),
    nope=st.sampled_from([64, 128, 448]),
)
def test_fp8_kv_any_scale(seed, log_scale, nope):
    x = np.random.default_rng(seed).standard_normal((3, nope + 64)).astype(np.float32) * np.float32(2.0**log_scale)
    assert_bits_equal(fp8_kv_round_trip(mx.array(x), nope), ref_fp8_kv(x, nope))
