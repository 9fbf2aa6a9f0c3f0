"""The native C kernels (kernels/native): bit-exact decoding, products against
the numpy reference, the build cache, and one-line errors.

The MoE step itself is checked with every other backend in
test_kernels_backends.py (``cpu`` runs it natively when a compiler is here).
"""

from __future__ import annotations

import numpy as np
import pytest

from magnetar.kernels import GGMLType, native, reference
from kernel_data import random_routing, random_weight

pytestmark = pytest.mark.skipif(not native.available(), reason=f"no native kernels: {native.unavailable_reason()}")

TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.Q8_0, GGMLType.Q2_K, GGMLType.Q4_K, GGMLType.IQ2_XXS]


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_exact(ggml_type):
    raw = random_weight(np.random.default_rng(int(ggml_type)), ggml_type, (3, 7, 512))
    got, expected = native.dequantize(raw, ggml_type), reference.dequantize(raw, ggml_type)
    assert got.shape == (3, 7, 512)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tokens", [1, 5, 40])
def test_matmul_matches_reference(ggml_type, n_tokens):
    rng = np.random.default_rng([int(ggml_type), n_tokens])
    raw = random_weight(rng, ggml_type, (37, 768))  # rows that fill no whole tile
    x = rng.standard_normal((n_tokens, 768)).astype(np.float32)
    assert rel_err(native.matmul(x, raw, ggml_type), reference.matmul(x, raw, ggml_type)) < 1e-5



@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_a_token_gets_the_same_bits_alone_and_in_a_batch(ggml_type):
    """Decode (one token) and prefill (many) must agree bit for bit: the q2 types take a
    registers-only path at one token and a laid-out block at several."""
    rng = np.random.default_rng([int(ggml_type), 9])
    raw = random_weight(rng, ggml_type, (37, 1024))
    x = rng.standard_normal((6, 1024)).astype(np.float32)
    batch = native.matmul(x, raw, ggml_type)
    alone = np.concatenate([native.matmul(x[t:t + 1], raw, ggml_type) for t in range(6)])
    assert np.array_equal(batch.view(np.uint32), alone.view(np.uint32))


def test_moe_gives_a_token_the_same_bits_alone_and_in_a_batch():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 1024)).astype(np.float32)
    stacks = [(random_weight(rng, t, (5, 512, 1024)), t) for t in (GGMLType.IQ2_XXS, GGMLType.IQ2_XXS)]
    stacks.append((random_weight(rng, GGMLType.Q2_K, (5, 1024, 512)), GGMLType.Q2_K))
    ids, w = random_routing(rng, 6, 5, 3)  # 18 pairs over 5 experts: groups of several tokens
    batch = native.moe(x, ids, w, *stacks, 7.0)
    alone = np.concatenate([native.moe(x[t:t + 1], ids[t:t + 1], w[t:t + 1], *stacks, 7.0) for t in range(6)])
    assert np.array_equal(batch.view(np.uint32), alone.view(np.uint32))

def test_moe_reads_memory_maps_without_a_copy(tmp_path):
    """Expert stacks come from the model file's memory map: they must go in as they are."""
    rng = np.random.default_rng(5)
    stacks = []
    for name, qtype, shape in (("g", GGMLType.IQ2_XXS, (8, 256, 512)), ("u", GGMLType.IQ2_XXS, (8, 256, 512)),
                               ("d", GGMLType.Q2_K, (8, 512, 256))):
        raw = random_weight(rng, qtype, shape)
        raw.tofile(tmp_path / name)
        stacks.append((np.memmap(tmp_path / name, np.uint8, "r", shape=raw.shape), qtype))
    x = rng.standard_normal((3, 512)).astype(np.float32)
    ids, w = random_routing(rng, 3, 8, 4, repeats=True)
    assert rel_err(native.moe(x, ids, w, *stacks, 7.0), reference.moe(x, ids, w, *stacks, 7.0)) < 1e-5


def test_bad_arguments_are_one_line_value_errors():
    rng = np.random.default_rng(1)
    g = random_weight(rng, GGMLType.Q4_K, (4, 256, 256))
    d = random_weight(rng, GGMLType.Q4_K, (4, 256, 256))
    x = np.ones((2, 256), np.float32)
    ids, w = random_routing(rng, 2, 4, 2)
    stacks = [(g, GGMLType.Q4_K), (g, GGMLType.Q4_K), (d, GGMLType.Q4_K)]
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\)"):
        native.moe(x, ids + 3, w, *stacks, 7.0)
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\)"):  # caught before int32 would wrap it
        native.moe(x, ids.astype(np.int64) + 2 ** 32, w, *stacks, 7.0)
    with pytest.raises(ValueError, match="x has 255 columns"):
        native.matmul(np.ones((1, 255), np.float32), g[0], GGMLType.Q4_K)
    with pytest.raises(ValueError, match="do not handle"):
        native.dequantize(g, GGMLType.I32)
    with pytest.raises(ValueError, match="must match ids"):
        native.moe(x, ids, w[:1], *stacks, 7.0)


def test_build_is_cached_and_a_missing_compiler_says_so(tmp_path, monkeypatch):
    first = native.build(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left behind
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(native.NativeBuildError, match="cannot run"):
        native.build(tmp_path / "other")
