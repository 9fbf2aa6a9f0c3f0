"""Dequantization of raw GGUF rows: numpy reference vs gguf-py vs MLX, bit for bit."""

from __future__ import annotations

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf.quants import IQ2_XXS as GGUF_IQ2_XXS
from hypothesis import given, settings
from hypothesis import strategies as st

from magnetar.kernels import BLOCK, DEQUANT_TYPES, GGMLType, dequantize, reference, row_bytes
from magnetar.runtime.layout import GGMLType as LayoutType

ALL_TYPES = list(DEQUANT_TYPES)
# Byte offsets of each block's f16 scale fields (d, and dmin for K-quants).
SCALE_FIELDS = {
    GGMLType.Q8_0: (0,),
    GGMLType.Q2_K: (80, 82),
    GGMLType.Q4_K: (0, 2),
    GGMLType.IQ2_XXS: (0,),
}
SHAPES = [(), (4,), (3, 5)]


def random_f16(rng: np.random.Generator, shape) -> np.ndarray:
    """Finite f16 scales with magnitudes in [1e-3, 1] and random signs."""
    magnitude = rng.uniform(1e-3, 1.0, size=shape)
    return (magnitude * rng.choice([-1.0, 1.0], size=shape)).astype(np.float16)


def random_rows(rng: np.random.Generator, ggml_type: GGMLType, lead: tuple, n_blocks: int) -> np.ndarray:
    """Random but valid rows: random bytes, finite floats, sane f16 scales."""
    _, block_bytes = BLOCK[ggml_type]
    if ggml_type in (GGMLType.F32, GGMLType.F16):
        # Any finite value, subnormals included: random bits with the
        # all-ones exponent (inf/NaN) knocked down by one.
        uint, exp_mask = (np.uint32, 0x7F800000) if ggml_type == GGMLType.F32 else (np.uint16, 0x7C00)
        bits = rng.integers(0, np.iinfo(uint).max, size=(*lead, n_blocks), dtype=uint, endpoint=True)
        bits = np.where((bits & exp_mask) == exp_mask, bits ^ uint(exp_mask & -exp_mask), bits).astype(uint)
        return bits.view(np.uint8).reshape(*lead, n_blocks * block_bytes)
    blocks = rng.integers(0, 256, size=(*lead, n_blocks, block_bytes), dtype=np.uint8)
    for offset in SCALE_FIELDS[ggml_type]:
        blocks[..., offset : offset + 2] = random_f16(rng, (*lead, n_blocks, 1)).view(np.uint8)
    return blocks.reshape(*lead, n_blocks * block_bytes)


def gguf_dequantize(raw: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    flat = raw.reshape(-1, raw.shape[-1])
    values = gguf.quants.dequantize(flat, gguf.GGMLQuantizationType(int(ggml_type)))
    return values.reshape(*raw.shape[:-1], -1)


def assert_bits_equal(actual, expected) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    mismatch = actual.view(np.uint32) != expected.view(np.uint32)
    assert not mismatch.any(), f"{mismatch.sum()} values differ, first at {np.argwhere(mismatch)[0]}"


def test_block_table_matches_gguf_and_layout():
    for ggml_type, sizes in BLOCK.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(ggml_type))] == sizes
        assert int(LayoutType[ggml_type.name]) == int(ggml_type)
    assert row_bytes(GGMLType.IQ2_XXS, 4096) == 16 * 66
    assert row_bytes(LayoutType.Q8_0, 64) == 68
    with pytest.raises(ValueError):
        row_bytes(GGMLType.Q2_K, 100)


def test_iq2xxs_tables_match_gguf():
    GGUF_IQ2_XXS.init_grid()
    assert np.array_equal(reference.IQ2XXS_GRID, GGUF_IQ2_XXS.grid.reshape(256, 8))
    assert reference.IQ2XXS_SIGNS.tobytes() == GGUF_IQ2_XXS.ksigns
    assert set(np.unique(reference.IQ2XXS_GRID)) == {8, 25, 43}


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("lead", SHAPES, ids=str)
def test_reference_matches_gguf(ggml_type, lead):
    rng = np.random.default_rng([int(ggml_type), len(lead)])
    raw = random_rows(rng, ggml_type, lead, n_blocks=3)
    expected = gguf_dequantize(raw, ggml_type)
    assert_bits_equal(reference.dequantize(raw, ggml_type), expected)


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("lead", SHAPES, ids=str)
def test_mlx_matches_reference(ggml_type, lead):
    rng = np.random.default_rng([int(ggml_type), len(lead), 1])
    raw = random_rows(rng, ggml_type, lead, n_blocks=2)
    expected = reference.dequantize(raw, ggml_type)
    assert_bits_equal(dequantize(mx.array(raw), ggml_type), expected)
    # runtime.layout's enum works the same as ours
    assert_bits_equal(dequantize(mx.array(raw), LayoutType(int(ggml_type))), expected)


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_mlx_compiled_on_gathered_experts(ggml_type):
    """The decode-step use: gather a few experts' rows (ids may repeat) from a
    stacked [experts, rows, row_bytes] tensor, dequantize inside mx.compile."""
    rng = np.random.default_rng(int(ggml_type))
    experts = random_rows(rng, ggml_type, (5, 4), n_blocks=2)
    ids = np.array([3, 0, 3, 4])
    expected = reference.dequantize(experts[ids], ggml_type)

    step = mx.compile(lambda raw, idx: dequantize(mx.take(raw, idx, axis=0), ggml_type))
    assert_bits_equal(step(mx.array(experts), mx.array(ids)), expected)


def test_bad_row_length_is_rejected():
    with pytest.raises(ValueError):
        dequantize(mx.zeros((2, 85), dtype=mx.uint8), GGMLType.Q2_K)
    with pytest.raises(ValueError):
        reference.dequantize(np.zeros((2, 85), dtype=np.uint8), GGMLType.Q2_K)
    with pytest.raises(ValueError, match="integers"):
        dequantize(mx.zeros((2, 8), dtype=mx.uint8), GGMLType.I32)


finite_f16 = st.floats(width=16, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(
    ggml_type=st.sampled_from([GGMLType.Q8_0, GGMLType.Q2_K, GGMLType.Q4_K, GGMLType.IQ2_XXS]),
    seed=st.integers(0, 2**32 - 1),
    scales=st.tuples(finite_f16, finite_f16),
)
def test_any_finite_scales_agree_everywhere(ggml_type, seed, scales):
    """Any finite f16 scale (subnormal, huge, signed zero) keeps all three
    implementations bit-identical: the products stay exact in float32."""
    _, block_bytes = BLOCK[ggml_type]
    block = np.random.default_rng(seed).integers(0, 256, size=(1, block_bytes), dtype=np.uint8)
    for offset, scale in zip(SCALE_FIELDS[ggml_type], scales):
        block[0, offset : offset + 2] = np.array([scale], dtype=np.float16).view(np.uint8)
    expected = gguf_dequantize(block, ggml_type)
    assert_bits_equal(reference.dequantize(block, ggml_type), expected)
    assert_bits_equal(dequantize(mx.array(block), ggml_type), expected)
