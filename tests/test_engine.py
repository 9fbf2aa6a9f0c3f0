"""Engine behaviour on generated tiny models: chunked prefill, decode and one
full pass agree; quantized weights read in-graph equal their f32 expansion;
generation is deterministic; the live state and its errors behave.

The tiny preset has window 32, indexer top-k 8 and layers [0, 0, 4, 128, 4],
so a 300-token prompt spans many raw windows, two 128-token HCA windows and
ratio-4 selections that drop most rows.

Paths are compared in reference precision: chunking and the compiled decode step
change accumulation order (ulp-level differences), and the official FP8 rounding
of KV rows turns an ulp at a rounding boundary into a whole FP8 step, which a
random model can amplify; the rounding steps themselves are tested exactly.
"""

from __future__ import annotations

import codecs
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from magnetar.kernels import reference, row_bytes
from magnetar.runtime.engine import ContextFull, Engine
from magnetar.runtime.errors import UsageError
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.lab.gguf_write import v4_tokenizer_meta, write_gguf
from magnetar.runtime.layout import GGMLType, expected_tensors, type_for
from magnetar.runtime.precision import f16_round, fp8_kv_round_trip

N = 300


def _ids(n: int, seed: int = 0) -> list[int]:
    return [0] + np.random.default_rng(seed).integers(2, 129280, n - 1).tolist()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def q8(tiny_models) -> Engine:
    return Engine.load(tiny_models("q8"), ctx=1024, precision="reference")


@pytest.fixture(scope="module")
def full_pass(q8) -> np.ndarray:
    return q8.logits(_ids(N))


@pytest.mark.parametrize("chunk", [64, 100, 299])
def test_chunked_prefill_equals_one_pass(tiny_models, full_pass, chunk):
    engine = Engine.load(tiny_models("q8"), ctx=1024, precision="reference", prefill_chunk=chunk)
    assert _rel(engine.logits(_ids(N)), full_pass) <= 1e-4


def test_decode_token_by_token_equals_one_pass(q8, full_pass):
    engine = q8
    ids = _ids(N)
    full = full_pass
    engine.reset()
    engine.prefill(ids[:40])
    rows = [engine.next_logits()]
    model, state = engine.model, engine._live.state
    for t in ids[40:-1]:  # the engine's own decode step, one token at a time
        rows.append(model.decode(t, state))
    assert _rel(np.stack(rows), full[39:-1]) <= 1e-4
    assert state.tokens == ids[:-1]


def _kernels(name: str):
    from magnetar.kernels import mlx_ext, native
    from magnetar.kernels.cpu import CpuBackend
    from magnetar.kernels.reference import ReferenceBackend

    if name == "reference":
        return ReferenceBackend()
    if name.startswith("cpu-native") and not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    if name == "cpu-native-fused" and not mlx_ext.available():
        pytest.skip(f"MLX CPU extension unavailable: {mlx_ext.unavailable_reason()}")
    return CpuBackend(use_native=name.startswith("cpu-native"), fused_experts=name == "cpu-native-fused")


@pytest.mark.parametrize("kernels", ["cpu-mlx", "cpu-native-fused", "cpu-native", "reference"])
def test_every_decode_schedule_equals_one_pass(tiny_models, full_pass, kernels):
    """One compiled graph (MoE traced inside as MLX ops, or as the native kernel's node),
    compiled segments cut around a host MoE kernel, and uncompiled host kernels all give
    the one-pass logits."""
    kern = _kernels(kernels)
    engine = Engine(open_model(tiny_models("q8")), ctx=1024, precision="reference", kernels=kern)
    assert engine.model.step.host_experts == (kernels in ("cpu-native", "reference"))
    ids = _ids(N)
    engine.prefill(ids[:40])
    model, state = engine.model, engine._live.state
    rows = [model.decode(t, state) for t in ids[40:72]]
    assert _rel(np.stack(rows), full_pass[40:72]) <= 1e-4


def test_logits_leave_the_live_state_alone(q8):
    q8.reset()
    q8.prefill(_ids(50, seed=1))
    before = q8.next_logits()
    q8.logits(_ids(80, seed=2))
    assert q8.tokens == _ids(50, seed=1)
    assert np.array_equal(q8.next_logits(), before)


@pytest.mark.parametrize("precision", ["official", "reference"])
def test_cached_rows_carry_the_precision_steps(tiny_models, precision):
    """Official: raw and compressed KV rows are FP8 on the nope dims and f16 as stored (spec §3.1)."""
    engine = Engine.load(tiny_models("f32"), ctx=512, precision=precision)
    engine.prefill(_ids(200))
    cfg, state = engine.config, engine._live.state
    nope = cfg.head_dim - cfg.rope_dim
    for il, st in enumerate(state.layers):
        rows = [np.array(st.raw)] + ([np.array(st.comp[: state.n_comp(il)])] if st.ratio else [])
        for r in rows:
            fixed = np.array_equal(np.array(fp8_kv_round_trip(mx.array(r), nope)), r)
            fixed &= np.array_equal(np.array(f16_round(mx.array(r))), r)
            assert fixed == (precision == "official"), f"layer {il}"


def _expanded_twin(src: Path, out: Path) -> Path:
    """The same model with every tensor dequantized to f32 by the numpy reference kernels."""
    mf = open_model(src)
    plan = [(s, type_for("f32", s.role)) for s in expected_tensors(mf.config) if not s.optional]

    def produce(spec, ggml_type):
        info = mf.tensors[spec.name]
        if info.ggml_type == GGMLType.I32:
            return np.asarray(info.data)
        rows = np.asarray(info.data).reshape(-1).view(np.uint8)
        rows = rows.reshape(-1, row_bytes(info.ggml_type, info.shape[0]))
        return reference.dequantize(rows, int(info.ggml_type)).reshape(-1)

    write_gguf(out, mf.config, v4_tokenizer_meta(), plan, produce, name="expanded twin")
    return out


@pytest.mark.parametrize("recipe", ["q8", "q2", "q4"])
def test_quantized_weights_equal_their_f32_expansion(tiny_models, tmp_path, recipe):
    src = tiny_models(recipe)
    twin = _expanded_twin(src, tmp_path / f"{recipe}-as-f32.gguf")
    assert open_model(twin).recipe == "f32"
    ids = _ids(150, seed=3)
    # expand_budget=0: every quantized matrix is expanded inside the graph, per use
    ours = Engine.load(src, ctx=512, precision="reference", expand_budget=0).logits(ids)
    assert _rel(ours, Engine.load(twin, ctx=512, precision="reference").logits(ids)) <= 1e-4


def _run(engine: Engine, **kw) -> list[int]:
    engine.reset()
    engine.prefill(_ids(20, seed=4))
    return [ev.token for ev in engine.generate(max_tokens=12, **kw)]


def test_generate_is_deterministic(q8):
    assert _run(q8, temperature=0) == _run(q8, temperature=0)
    seeded = _run(q8, temperature=1.0, seed=11, min_p=0.0)
    assert seeded == _run(q8, temperature=1.0, seed=11, min_p=0.0)
    assert seeded != _run(q8, temperature=1.0, seed=12, min_p=0.0)


def test_generate_greedy_follows_the_logits(q8):
    q8.reset()
    q8.prefill(_ids(20, seed=5))
    events = list(q8.generate(max_tokens=5, temperature=0))
    ids = _ids(20, seed=5) + [ev.token for ev in events]
    assert q8.tokens == ids
    full = q8.logits(ids)
    assert [int(r.argmax()) for r in full[19:-1]] == [ev.token for ev in events]
    text = "".join(ev.text for ev in events)
    assert text == q8.tokenizer.decode([ev.token for ev in events])


def test_streamed_text_is_the_decoded_tokens_wherever_generation_stops(q8):
    """A stop can fall inside a UTF-8 character (byte-level BPE): the last event then
    carries the unfinished bytes as U+FFFD rather than dropping them."""
    q8.reset()
    q8.prefill(_ids(20, seed=7))  # its greedy tokens 7 and 8 split a character
    start = q8.snapshot()
    tokens = [ev.token for ev in q8.generate(max_tokens=16, temperature=0)]
    cut_mid_character = []
    for n in range(1, len(tokens) + 1):
        q8.rewind(start)
        events = list(q8.generate(max_tokens=n, temperature=0))
        assert [ev.token for ev in events] == tokens[:n]
        assert "".join(ev.text for ev in events) == q8.tokenizer.decode(tokens[:n])
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        utf8.decode(q8.tokenizer.decode_bytes(tokens[:n]))
        cut_mid_character.append(utf8.getstate()[0] != b"")
    assert any(cut_mid_character)  # the case this test is about did occur


def test_generate_stops_on_a_stop_token_and_keeps_it(q8):
    first = _run(q8, temperature=0)
    q8.reset()
    q8.prefill(_ids(20, seed=4))
    out = [ev.token for ev in q8.generate(max_tokens=12, temperature=0, stop=[first[2]])]
    assert out == first[: first.index(first[2]) + 1]
    assert q8.tokens[-len(out):] == out


def test_closing_the_stream_early_keeps_the_handed_out_token(q8):
    q8.reset()
    q8.prefill(_ids(20, seed=6))
    stream = q8.generate(max_tokens=10, temperature=0)
    first = next(stream).token
    stream.close()
    assert q8.tokens[-1] == first
    q8.prefill([5])  # runs the pending token first, then the new one
    assert q8.tokens[-2:] == [first, 5]


def test_any_thread_can_drive_the_engine(q8, tiny_models):
    """The TUI calls the engine from worker threads, a new one per turn; MLX streams
    belong to threads, so the engine runs its MLX work on a thread of its own."""
    expected = _run(q8, temperature=0)
    q8.reset()
    got: list[int] = []
    prefill = threading.Thread(target=q8.prefill, args=(_ids(20, seed=4),))
    prefill.start()
    prefill.join()
    sample = threading.Thread(target=lambda: got.extend(ev.token for ev in q8.generate(max_tokens=12,
                                                                                       temperature=0)))
    sample.start()
    sample.join()
    assert got == expected
    # ... and the process still exits cleanly (a thread that ran compiled MLX code must never end)
    script = ("import threading; from magnetar.runtime.engine import Engine\n"
              f"e = Engine.load({str(tiny_models('q8'))!r}, ctx=256)\n"
              "t = threading.Thread(target=lambda: (e.prefill([0, 5, 6]), list(e.generate(max_tokens=3))))\n"
              "t.start(); t.join(); print('done')")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert (run.returncode, run.stdout) == (0, "done\n"), run.stderr


def test_errors_are_one_line_usage_errors(tiny_models):
    engine = Engine.load(tiny_models("q8"), ctx=64)
    with pytest.raises(ContextFull):
        engine.prefill(_ids(65))
    with pytest.raises(UsageError, match="outside the vocabulary"):
        engine.logits([0, 10**7])
    with pytest.raises(UsageError, match="prefill a prompt first"):
        next(engine.generate(max_tokens=1))
    with pytest.raises(UsageError, match="--ctx"):
        Engine.load(tiny_models("q8"), ctx=0)
    # think-max below its context falls back to think (issue 14; see test_think_max_fallback)
    assert engine.render([], mode="think-max") == engine.render([], mode="think")


def test_query_blocks_do_not_change_prefill(q8, full_pass, monkeypatch):
    """Long-context prefill splits queries into blocks; forcing tiny blocks gives the same logits."""
    from magnetar.runtime import attention

    monkeypatch.setattr(attention, "ATTENTION_BLOCK", 1)  # one query per block
    assert _rel(q8.logits(_ids(N)), full_pass) <= 1e-5


def test_state_grows_with_tokens_not_with_ctx(tiny_models):
    engine = Engine.load(tiny_models("q8"), ctx=1_048_576, precision="reference")
    engine.prefill(_ids(100))
    small = engine._live.state.nbytes()
    assert small < 2 << 20  # a few hundred KB for 100 tokens, not the 1M-token capacity
    engine.prefill(_ids(400, seed=9)[1:])
    rows = [st.comp.shape[0] for st in engine._live.state.layers if st.ratio == 4]
    assert all(n // 4 < r <= 2 * (n // 4) + 64 for r in rows for n in [engine._live.state.n_tokens])


def test_model_experts_on_the_cpu_kernels_match_the_reference_kernels(tiny_models):
    """A tiny q2 layer's routed experts, on real routing, through both kernel backends."""
    from magnetar.kernels.backend import backend

    moe = Engine.load(tiny_models("q2"), ctx=256).model.layers[3].moe
    xn = mx.random.normal((40, moe.cfg.d_model), key=mx.random.key(0))
    idx, w = moe.route(xn, mx.arange(40))
    mats = (moe.gate, moe.up, moe.down)
    got = {name: np.array(backend(name).moe(xn, idx, w, *mats, moe.limit)) for name in ("cpu", "reference")}
    assert _rel(got["cpu"], got["reference"]) <= 1e-5
    one = np.array(backend("cpu").moe(xn[:1], idx[:1], w[:1], *mats, moe.limit))  # the decode path
    assert _rel(one, got["reference"][:1]) <= 1e-5
    assert len(np.unique(np.array(idx))) > 3  # several experts really ran
