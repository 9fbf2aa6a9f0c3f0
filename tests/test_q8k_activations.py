"""8-bit expert activations (``activations="q8k"``, kernels/native/q8k.c): the Q8_K
rounding bit for bit, the integer products against the numpy reference, and the mode
through the MLX node, streamed rounds and a whole model."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from ggml_peer import ggml_cpu
from greedy_run import greedy_run
from kernel_data import random_moe_case, random_weight, rel_err
from magnetar.kernels import GGMLType, mlx_ext, native, reference
from magnetar.kernels.backend import QTensor
from magnetar.kernels.base import BackendUnavailable
from magnetar.kernels.cpu import CpuBackend
from magnetar.runtime import Engine
from magnetar.runtime.gguf_read import open_model

pytestmark = [pytest.mark.skipif(not native.available(), reason=f"no native kernels: {native.unavailable_reason()}"),
              pytest.mark.usefixtures("on_the_cpu")]
LIMIT = 7.0


def _fields(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """native.quantize_q8k's bytes [T, nb * 292] -> (d, codes, sums of 16)."""
    b = blocks.reshape(len(blocks), -1, native.Q8K_BLOCK_BYTES)
    return (b[..., :4].copy().view("<f4")[..., 0], b[..., 4:260].view(np.int8),
            b[..., 260:].copy().view("<i2"))


def test_quantize_matches_the_reference_bit_for_bit():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 1024)) * rng.uniform(1e-3, 1e3, (4, 1))).astype(np.float32)
    x[0, :256] = 0  # d = 0
    x[1, 256:512] = np.arange(256) % 16 - 7.5  # with 127 the largest, the scale is -1: every value a tie
    x[1, 256] = 127.0
    x[2, 600] = np.nan
    x[3, 900] = -np.inf
    x[3, :256] = rng.uniform(-1, 1, 256)
    x[3, 100] = -50.0  # the largest magnitude negative
    d, codes, sums = _fields(native.quantize_q8k(x))
    want_d, want_codes = reference.quantize_q8k(x)
    assert np.array_equal(d.view(np.uint32), want_d.view(np.uint32))
    assert np.array_equal(codes, want_codes)
    assert np.array_equal(sums, want_codes.reshape(4, 4, 16, 16).sum(axis=3))
    assert d[0, 0] == 0 and np.isnan(d[2, 2]) and np.isnan(d[3, 3])
    assert codes.min() >= -127 and codes[1, 1, 0] == -127 and codes[3, 0, 100] == -127
    assert list(codes[1, 1, 1:9]) == [6, 6, 4, 4, 2, 2, 0, 0]  # -6.5 .. 0.5 negated, ties to even
    # the values dequantized from the codes are within half a step of the inputs
    live = np.isfinite(d) & (d != 0)
    err = np.abs(d[..., None] * codes - x.reshape(4, 4, 256))[live]
    assert np.all(err <= np.abs(d[live])[:, None] * 0.5 * (1 + 1e-6))


@pytest.mark.parametrize("ggml_type", [GGMLType.IQ2_XXS, GGMLType.Q2_K, GGMLType.Q4_K], ids=lambda t: t.name)
def test_the_reference_integer_product_is_the_dequantized_one(ggml_type):
    """reference.matmul_q8k sums integers: it must equal the float64 product of the
    dequantized activation codes with the exactly dequantized weights."""
    rng = np.random.default_rng(int(ggml_type))
    raw = random_weight(rng, ggml_type, (9, 768))
    x = rng.standard_normal((3, 768)).astype(np.float32)
    d, codes = reference.quantize_q8k(x)
    rounded = (d[..., None].astype(np.float64) * codes).reshape(3, 768)
    want = rounded @ reference.dequantize(raw, ggml_type).astype(np.float64).T
    assert rel_err(reference.matmul_q8k(x, raw, ggml_type), want) < 1e-12


def _q8k_case(ggml_type, n_tok: int, rows: int = 40, cols: int = 1024):
    """Rows of ggml_type and activations at scales ~6 decades apart, one token's zero block
    included."""
    rng = np.random.default_rng([int(ggml_type), n_tok])
    raw = random_weight(rng, ggml_type, (rows, cols))
    x = (rng.standard_normal((n_tok, cols)) * rng.uniform(1e-3, 1e3, (n_tok, 1))).astype(np.float32)
    x[0, 256:512] = 0
    return raw, x


@pytest.mark.parametrize("ggml_type", [GGMLType.IQ2_XXS, GGMLType.Q2_K, GGMLType.Q4_K], ids=lambda t: t.name)
def test_the_products_alone_match_the_reference_and_any_token_count(ggml_type):
    """q8k_matmul: within f32 summation of the reference's integer sums, and a token's bits the
    same alone (decode), in a tile of 3, or among 21 (IQ2_XXS rows made ready first)."""
    raw, x = _q8k_case(ggml_type, 21)
    got = native.q8k_matmul(x, raw, ggml_type)
    want = reference.matmul_q8k(x, raw, ggml_type)
    assert np.all(np.abs(got - want) <= 1e-5 * np.abs(want).max(axis=1, keepdims=True))
    for part in (slice(0, 1), slice(5, 8), slice(20, 21)):
        alone = native.q8k_matmul(x[part], raw, ggml_type)
        assert np.array_equal(alone.view(np.uint32), got[part].view(np.uint32))


@pytest.mark.parametrize("ggml_type", [GGMLType.IQ2_XXS, GGMLType.Q2_K, GGMLType.Q4_K], ids=lambda t: t.name)
def test_llama_cpp_dots_to_our_bits(ggml_type):
    """An independent implementation: ggml's ggml_vec_dot_*_q8_K (llama.cpp's CPU library, a
    dev-only peer) on our Q8_K bytes gives our products bit for bit, for a token alone and
    for tokens that share a tile or a made-ready row."""
    lib = ggml_cpu()
    name = {GGMLType.IQ2_XXS: "iq2_xxs", GGMLType.Q2_K: "q2_K", GGMLType.Q4_K: "q4_K"}[ggml_type]
    dot = getattr(lib, f"ggml_vec_dot_{name}_q8_K")
    dot.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dot.restype = None
    raw, x = _q8k_case(ggml_type, 20)
    blocks = native.quantize_q8k(x)
    theirs = np.zeros((len(x), len(raw)), np.float32)
    for t, r in np.ndindex(theirs.shape):
        dot(x.shape[1], theirs[t, r:].ctypes.data, 0, raw[r].ctypes.data, 0, blocks[t].ctypes.data, 0, 1)
    for part in (slice(0, 1), slice(0, 3), slice(0, 20)):
        assert np.array_equal(native.q8k_matmul(x[part], raw, ggml_type).view(np.uint32), theirs[part].view(np.uint32))


# Builds whose dot products must give the loaded library's bits: (flags after BASE_FLAGS, the
# cpuinfo flags the loaded build must have for the two to differ).
OTHER_BUILDS = {
    "portable C (no AVX2, as arm64)": (("-march=x86-64",), ("avx2",)),
    "AVX2 without VNNI": (("-march=native", "-mno-avx512vnni", "-mno-avxvnni"), ("avx512_vnni", "avx_vnni")),
}


@pytest.fixture(scope="module", params=list(OTHER_BUILDS))
def other_library(request, tmp_path_factory):
    """The native sources built for a lesser x86-64 than this one: q8k.c's portable C, or its
    AVX2 vectors where this CPU has VNNI."""
    flags, needs = OTHER_BUILDS[request.param]
    cpu_flags = native.cpu_id().replace("\n", " ").split()
    if platform.machine() != "x86_64" or not any(flag in cpu_flags for flag in needs):
        pytest.skip(f"the loaded library is no better than the {request.param} build on this CPU")
    path = tmp_path_factory.mktemp("other") / "experts.so"
    build = subprocess.run([native._compiler(), *native.BASE_FLAGS, *flags, "-o", str(path),
                            *map(str, native.SOURCES), "-lm"], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    return native._bind(path)


@pytest.mark.parametrize("ggml_type", [GGMLType.IQ2_XXS, GGMLType.Q2_K, GGMLType.Q4_K], ids=lambda t: t.name)
def test_lesser_cpus_get_the_same_bits(ggml_type, other_library, monkeypatch):
    """Machines without AVX2 (an arm64 CPU) dot in plain C, lane by lane as the vector code
    sums, and AVX2 without VNNI widens in two steps where VNNI fuses them: the same bits,
    alone, in tiles and through a whole q8k expert step."""
    raw, x = _q8k_case(ggml_type, 21)
    vector = native.q8k_matmul(x, raw, ggml_type), native.q8k_matmul(x[:1], raw, ggml_type)
    recipe = "q2" if ggml_type != GGMLType.Q4_K else "q4"
    case = random_moe_case(np.random.default_rng(9), recipe, 5, 6, 8, 512, 256, repeats=True)
    step = native.moe(*case[:3], *_stacks(case), LIMIT, activations="q8k")
    monkeypatch.setitem(native._state, "lib", other_library)
    assert np.array_equal(native.q8k_matmul(x, raw, ggml_type).view(np.uint32), vector[0].view(np.uint32))
    assert np.array_equal(native.q8k_matmul(x[:1], raw, ggml_type).view(np.uint32), vector[1].view(np.uint32))
    assert np.array_equal(native.moe(*case[:3], *_stacks(case), LIMIT, activations="q8k").view(np.uint32),
                          step.view(np.uint32))


def _stacks(case):
    return [(np.asarray(m.data), m.ggml_type) for m in case[3]]


def _boundary_slack(x, ids, w, stacks) -> np.ndarray:
    """[T, D]: what taking the neighbouring code for every mid value close to a rounding
    boundary (within 1e-3 of a step) could change in each output."""
    (gate, gt), (up, ut), (down, dt) = stacks
    slack = np.zeros(x.shape)
    for t, k in np.ndindex(ids.shape):
        e = ids[t, k]
        g = np.minimum(reference.matmul_q8k(x[t:t + 1], gate[e], gt), LIMIT)
        u = np.clip(reference.matmul_q8k(x[t:t + 1], up[e], ut), -LIMIT, LIMIT)
        mid = (g / (1 + np.exp(-g)) * u * w[t, k]).astype(np.float32)
        d, _ = reference.quantize_q8k(mid)
        steps = np.abs(mid.reshape(d.shape[1], 256) / d[0, :, None])
        near = np.abs(steps % 1 - 0.5) < 1e-3
        step = np.repeat(np.abs(d[0]), 256) * near.reshape(-1)
        slack[t] += np.abs(reference.dequantize(down[e], dt)) @ step
    return slack


@pytest.mark.parametrize("recipe", ["q2", "q4"])
@pytest.mark.parametrize("n_tok", [1, 5, 33, 90])
def test_moe_matches_the_reference_in_integers(recipe, n_tok):
    rng = np.random.default_rng([n_tok, len(recipe), 8])
    case = random_moe_case(rng, recipe, n_tok, 6, 16, 512, 512, repeats=True)
    x, ids, w, stacks = *case[:3], _stacks(case)
    got = native.moe(x, ids, w, *stacks, LIMIT, activations="q8k")
    want = reference.moe(x, ids, w, *stacks, LIMIT, activations="q8k")
    # f32 sums against float64 ones, and where a mid value lies within an ulp of a rounding
    # boundary the two may pick neighbouring codes: one step of its block in that product
    assert np.all(np.abs(got - want) <= 1e-6 * np.abs(want).max() + _boundary_slack(x, ids, w, stacks))
    f32 = reference.moe(x, ids, w, *stacks, LIMIT)
    assert 1e-4 < rel_err(got, f32) < 3e-2  # the mode is on, and costs ~1e-2 relative


def test_types_without_an_integer_product_keep_f32_activations():
    rng = np.random.default_rng(11)
    case = random_moe_case(rng, "q8", 3, 6, 8, 512, 256, repeats=False)
    x, ids, w, stacks = *case[:3], _stacks(case)
    q8k = native.moe(x, ids, w, *stacks, LIMIT, activations="q8k")
    assert np.array_equal(q8k.view(np.uint32), native.moe(x, ids, w, *stacks, LIMIT).view(np.uint32))


@pytest.mark.parametrize("recipe,n_tok,n_exp", [("q2", 7, 16), ("q2", 45, 8), ("q4", 45, 8)])
def test_a_token_gets_the_same_bits_alone_in_a_batch_and_in_streamed_rounds(recipe, n_tok, n_exp):
    """7 tokens over 16 experts: a few tokens per row, whose tiles look IQ2_XXS patterns up
    themselves; 45 over 8: ~34 per expert, so IQ2_XXS rows are made ready first, and tiles of
    8 end in partial ones."""
    rng = np.random.default_rng(12)
    case = random_moe_case(rng, recipe, n_tok, 6, n_exp, 512, 256, repeats=True)
    x, ids, w, stacks = *case[:3], _stacks(case)
    batch = native.moe(x, ids, w, *stacks, LIMIT, activations="q8k")
    alone = np.concatenate([native.moe(x[t:t + 1], ids[t:t + 1], w[t:t + 1], *stacks, LIMIT, activations="q8k")
                            for t in range(n_tok)])
    assert np.array_equal(batch.view(np.uint32), alone.view(np.uint32))
    out = np.zeros_like(x)
    half = n_exp // 2 + 1
    for resident in (np.arange(n_exp) < half, np.arange(n_exp) >= half):  # two rounds, ascending expert ids
        slot_of = np.where(resident, np.arange(n_exp), -1)
        native.moe(x, ids, w, *stacks, LIMIT, slot_of=slot_of, out=out, activations="q8k")
    assert np.array_equal(out.view(np.uint32), batch.view(np.uint32))


@pytest.mark.skipif(not mlx_ext.available(), reason="needs the MLX CPU extension")
def test_the_graph_node_gives_the_native_bits():
    rng = np.random.default_rng(13)
    case = random_moe_case(rng, "q2", 3, 6, 8, 512, 256, repeats=False)
    x, ids, w, qts = case
    node = mlx_ext.routed_experts(mx.array(x), mx.array(ids), mx.array(w),
                                  *[QTensor(mx.array(q.data), q.ggml_type) for q in qts], LIMIT, "q8k")
    host = native.moe(x, ids, w, *_stacks(case), LIMIT, activations="q8k")
    assert np.array_equal(np.array(node).view(np.uint32), host.view(np.uint32))


def test_a_bad_mode_is_a_one_line_error(monkeypatch):
    with pytest.raises(ValueError, match="q8k"):
        native.moe(np.zeros((1, 256), np.float32), np.zeros((1, 1), np.int32), np.ones((1, 1), np.float32),
                   *[(np.zeros((1, 256, 66), np.uint8), GGMLType.IQ2_XXS)] * 2,
                   (np.zeros((1, 256, 84), np.uint8), GGMLType.Q2_K), LIMIT, activations="int4")
    monkeypatch.setenv("MAGNETAR_EXPERT_ACT", "int4")
    with pytest.raises(BackendUnavailable, match="MAGNETAR_EXPERT_ACT"):
        CpuBackend()
    with pytest.raises(BackendUnavailable, match="native"):
        CpuBackend(use_native=False, expert_activations="q8k")


def test_a_model_runs_with_8_bit_expert_activations(tiny_models, monkeypatch):
    """The environment switch reaches the backend; one graph or cut at the experts give the
    same bits; and the logits stay near the f32 activations' ones."""
    prompt = [3 + 37 * i % 1000 for i in range(40)]
    monkeypatch.setenv("MAGNETAR_EXPERT_ACT", "q8k")
    runs = {}
    for fused in (False, True):
        kernels = CpuBackend(use_native=True, fused_experts=fused and mlx_ext.available())
        assert kernels.expert_activations == "q8k"
        runs[fused] = greedy_run(Engine(open_model(tiny_models("q2")), ctx=256, kernels=kernels), prompt, 3)
    assert runs[True][0] == runs[False][0]
    for got, want in zip(runs[True][1], runs[False][1]):
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    f32 = greedy_run(Engine(open_model(tiny_models("q2")), ctx=256,
                            kernels=CpuBackend(use_native=True, expert_activations="f32")), prompt, 0)[1][0]
    q8k = runs[True][1][0]
    assert 0 < rel_err(q8k, f32) < 5e-2
    assert np.argmax(q8k) == np.argmax(f32)


@pytest.mark.parametrize("mode", ["q8k", "q8"])
def test_the_bench_times_8_bit_activations_beside_the_default_in_a_process_of_its_own(tiny_models, mode):
    from magnetar.runtime.lab.peer_process import isolated_peers

    (child,) = isolated_peers(f"magnetar-{mode}", tiny_models("q2"), ctx=256)
    try:
        assert child.pid != os.getpid() and f", {mode} expert activations" in child.detail
        assert "MAGNETAR_EXPERT_ACT" not in os.environ  # set in the peer's process only
        child.prefill([3 + 37 * i % 1000 for i in range(20)])
        times = child.decode(3)
        assert len(times) == 3 and all(t > 0 for t in times)
    finally:
        child.close()


def test_llama_cpp_quantizes_activations_to_our_bytes():
    """An independent implementation: ggml's own quantize_row_q8_K (llama.cpp's CPU library,
    a dev-only peer) gives our Q8_K bytes, ties and a negative largest value included."""
    lib = ggml_cpu()
    lib.quantize_row_q8_K.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.quantize_row_q8_K.restype = None
    rng = np.random.default_rng(21)
    x = (rng.standard_normal((4, 1024)) * rng.uniform(0.01, 100, (4, 1))).astype(np.float32)
    x[1, 256:512] = np.arange(256) % 16 - 7.5
    x[1, 256] = 127.0  # every other value a tie
    x[2, :256] = rng.uniform(-1, 1, 256)
    x[2, 7] = -9.0
    x[3, 512:768] = 0
    ours = native.quantize_q8k(x)
    theirs = np.zeros_like(ours)  # ggml leaves an all-zero block's sums unwritten (they meet d = 0)
    for t in range(len(x)):
        lib.quantize_row_q8_K(x[t].ctypes.data, theirs[t].ctypes.data, x.shape[1])
    assert np.array_equal(ours, theirs)
