"""The bench harness and its peer engines, run for real on tiny models.

Timings are never asserted (design.md: benchmarks are not timed tests); the
tests check the bookkeeping: which calls ran in which order, that samples
and summaries are computed from what was measured, that the CSV parses, and
that each peer restarts from an empty state on every prefill.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import statistics
import sys
import time

import pytest

from magnetar.runtime.lab import bench
from magnetar.runtime.lab.bench import Sample, order_for, render_table, run, summarize, write_csv
from magnetar.runtime.lab.bench_peers import (INSTALL, LlamaCppPeer, MlxLmPeer, TransformersPeer,
                                          hf_config_kwargs, make_peers, parse_names, v41_schedule)
from magnetar.runtime.config import ModelConfig
from magnetar.runtime.errors import UsageError
from magnetar.runtime.lab.make_model import PRESETS

HAVE_HF = all(importlib.util.find_spec(m) is not None for m in ("transformers", "torch"))
HAVE_MLX_LM = importlib.util.find_spec("mlx_lm") is not None
HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="transformers/torch not installed (dev extra)")
needs_mlx_lm = pytest.mark.skipif(not HAVE_MLX_LM, reason="mlx-lm is not installed (optional peer: "
                                  "pip install --no-deps mlx-lm)")
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed "
                                 "(optional peer, an sdist that builds in ~4 min)")



def tiny_cfg(**over) -> ModelConfig:
    """The ``tiny`` preset's layer kinds at a 1024-token vocab: builds in well under a second."""
    base = PRESETS["tiny"]().model_dump()
    base.update(vocab_size=1024, **over)
    return ModelConfig(**base).check()


IDS = [3 + 37 * i % 1000 for i in range(12)]


class Logged:
    """A real peer under another name, logging each call (to check the interleaving)."""

    def __init__(self, peer, name: str, log: list):
        self.peer, self.name, self.log = peer, name, log
        self.detail = f"{name} over {peer.name}"

    def prefill(self, ids):
        self.log.append((self.name, "prefill", len(ids)))
        self.peer.prefill(ids)

    def decode(self, n):
        self.log.append((self.name, "decode", n))
        return self.peer.decode(n)


@pytest.fixture(scope="module")
def hf_peers():
    if not HAVE_HF:
        pytest.skip("transformers/torch not installed (dev extra)")
    return [TransformersPeer(tiny_cfg(), seed=s, threads=1) for s in range(3)]


# ------------------------------------------------------------------ harness


def test_order_rotates_each_rep_and_warmup_keeps_the_given_order():
    assert order_for("abc", -1) == list("abc")
    assert [order_for("abc", r) for r in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]


@needs_hf
def test_decode_run_interleaves_real_peers(hf_peers):
    log: list = []
    peers = [Logged(p, n, log) for p, n in zip(hf_peers, "abc")]
    seen = []
    samples = run(peers, "decode", IDS, n_tokens=2, reps=3, warmup=1,
                  progress=lambda name, rep, s: seen.append((name, rep, s is not None)))
    # 1 warm-up round (not recorded) + 3 reps, each peer: prefill then decode.
    calls = [(n, what) for n, what, _ in log]
    rounds = [calls[i:i + 6] for i in range(0, len(calls), 6)]
    assert len(rounds) == 4
    expected = [["a", "b", "c"], ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for rnd, order in zip(rounds, expected):
        assert rnd == [x for n in order for x in ((n, "prefill"), (n, "decode"))]
    assert all(size == (len(IDS) if what == "prefill" else 2) for _, what, size in log)
    assert len(samples) == 9 and [s.rep for s in samples] == [0] * 3 + [1] * 3 + [2] * 3
    assert [s.peer for s in samples] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert seen[0] == ("a", -1, False) and seen[1] == ("a", -1, True) and len(seen) == 24
    for s in samples:
        assert s.mode == "decode" and s.tokens == 2 and s.prompt_tokens == len(IDS)
        assert len(s.token_ms) == 2 and all(t > 0 for t in s.token_ms)
        assert s.ms_per_token == pytest.approx(statistics.median(s.token_ms))
        assert s.seconds == pytest.approx(sum(s.token_ms) / 1e3)
        assert s.tok_s == pytest.approx(2 / s.seconds)
        assert s.detail.endswith("over transformers")

    summary = summarize(samples)
    assert [e["peer"] for e in summary] == ["a", "b", "c"]  # first-seen order, "a" is the base
    by = {(s.peer, s.rep): s for s in samples}
    for e in summary:
        ms = [by[e["peer"], r].ms_per_token for r in range(3)]
        assert e["reps"] == 3
        assert e["ms_per_token"] == {"median": statistics.median(ms), "min": min(ms), "max": max(ms)}
        ratios = [by[e["peer"], r].ms_per_token / by["a", r].ms_per_token for r in range(3)]
        assert e["ratio_ms_per_token"]["median"] == pytest.approx(statistics.median(ratios))
        assert e["ratio_ms_per_token"]["min"] == pytest.approx(min(ratios))
        tok_ratios = [by[e["peer"], r].tok_s / by["a", r].tok_s for r in range(3)]
        assert e["ratio_tok_s"]["median"] == pytest.approx(statistics.median(tok_ratios))
    assert summary[0]["ratio_ms_per_token"] == {"median": 1.0, "min": 1.0, "max": 1.0}
    table = render_table(summary)
    assert "decode 2 tokens after a 12-token prompt" in table and "[min-max]" in table
    assert all(f"{n}: {n} over transformers" in table for n in "abc")
    plain = render_table(summary, rich=False)
    assert plain.splitlines()[1].split()[:3] == ["peer", "ms/token", "vs"]


@needs_hf
def test_prefill_run_and_csv(hf_peers, tmp_path):
    peers = [Logged(p, n, []) for p, n in zip(hf_peers[:2], "xy")]
    samples = run(peers, "prefill", IDS, n_tokens=0, reps=2, warmup=0)
    assert [(s.peer, s.rep) for s in samples] == [("x", 0), ("y", 0), ("y", 1), ("x", 1)]
    for s in samples:
        assert s.tokens == len(IDS) and s.ms_per_token is None and s.token_ms == []
        assert s.tok_s == pytest.approx(len(IDS) / s.seconds)
    samples[0].extra = {"host_ms": 1.5}
    out = tmp_path / "sub" / "bench.csv"
    write_csv(samples, out)
    rows = list(csv.DictReader(out.open()))
    assert [r["peer"] for r in rows] == ["x", "y", "y", "x"]
    assert float(rows[1]["seconds"]) == samples[1].seconds  # repr round-trips exactly
    assert float(rows[1]["tok_s"]) == samples[1].tok_s
    assert rows[0]["extra.host_ms"] == "1.5" and rows[1]["extra.host_ms"] == ""
    assert rows[0]["ms_per_token"] == "" and rows[0]["mode"] == "prefill" and rows[0]["tokens"] == "12"
    assert not list(out.parent.glob(".*tmp*"))  # atomic write left no temp file
    summary = summarize(samples)
    assert "ms_per_token" not in summary[0] and summary[0]["extra"] == {"host_ms": 1.5}
    assert "host_ms 1.5" in render_table(summary)


@needs_hf
def test_transformers_peer_restarts_from_an_empty_state(hf_peers):
    peer = hf_peers[0]
    peer.prefill(IDS)
    peer.decode(3)
    first = list(peer.last_tokens)
    peer.decode(2)  # continues the state
    peer.prefill(IDS)
    peer.decode(3)
    assert peer.last_tokens == first and len(first) == 3
    kw = hf_config_kwargs(tiny_cfg())
    assert kw["layer_types"] == ["sliding_attention"] * 2 + [
        "compressed_sparse_attention", "heavily_compressed_attention", "compressed_sparse_attention"]
    assert kw["mlp_layer_types"] == ["hash_moe"] * 3 + ["moe"] * 2
    assert "5 layers [0x2,4,128,4], 3 hash" in peer.detail and "eager attn" in peer.detail


def test_summarize_pairs_ratios_by_rep():
    def s(peer, rep, ms):
        return Sample(peer, "decode", rep, 4, 4 * ms / 1e3, 1e3 / ms, ms_per_token=ms)

    samples = [s("base", 0, 10.0), s("p", 0, 30.0), s("p", 1, 10.0), s("base", 1, 20.0),
               s("base", 2, 40.0), s("p", 2, 20.0)]
    base, p = summarize(samples)
    assert base["ms_per_token"] == {"median": 20.0, "min": 10.0, "max": 40.0}
    # per-rep ratios 3.0, 0.5, 0.5 -> median 0.5 (the ratio of medians would be 1.0)
    assert p["ratio_ms_per_token"] == {"median": 0.5, "min": 0.5, "max": 3.0}
    assert p["ratio_tok_s"]["median"] == pytest.approx(2.0)
    assert summarize([]) == []
    with pytest.raises(ValueError):
        summarize([s("a", 0, 1.0), Sample("a", "prefill", 1, 4, 1.0, 4.0)])


def test_run_rejects_bad_arguments():
    class P:
        def __init__(self, name):
            self.name, self.detail = name, ""

    with pytest.raises(UsageError, match="unknown bench mode"):
        run([P("a")], "train", IDS, 2, 1)
    with pytest.raises(UsageError, match="unique"):
        run([P("a"), P("a")], "decode", IDS, 2, 1)
    with pytest.raises(UsageError, match="empty"):
        run([P("a")], "decode", [], 2, 1)
    with pytest.raises(UsageError, match="at least one token"):
        run([P("a")], "decode", IDS, 0, 1)
    with pytest.raises(UsageError, match="no engines"):
        run([], "decode", IDS, 2, 1)


# -------------------------------------------------------------------- peers


def test_peer_names_and_aliases():
    assert parse_names("hf, mlx,llama-cpp,transformers") == ["transformers", "mlx-lm", "llama.cpp"]
    assert parse_names(["mlx-lm-pipelined"]) == ["mlx-lm-pipelined"]
    with pytest.raises(UsageError, match="unknown bench peer 'vllm'"):
        parse_names("transformers,vllm")


@pytest.mark.parametrize("module, build, peer", [
    ("transformers", lambda: TransformersPeer(tiny_cfg()), "transformers"),
    ("torch", lambda: TransformersPeer(tiny_cfg()), "transformers"),
    ("mlx_lm", lambda: MlxLmPeer(tiny_cfg()), "mlx-lm"),
    ("llama_cpp", lambda: LlamaCppPeer("unused.gguf"), "llama.cpp"),
])
def test_missing_package_says_how_to_install(monkeypatch, module, build, peer):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(UsageError) as err:
        build()
    msg = str(err.value)
    assert "\n" not in msg and f"the {peer} peer needs" in msg and "pip install" in msg
    assert err.value.fix == INSTALL[peer]


def test_v41_schedule_matches_the_release_and_the_spec():
    forty = v41_schedule(40)
    assert forty["compress_ratios"] == tuple([0, 0] + [2] * 18 + [1] * 20)
    assert forty["kv_source_layer_ids"] == (2, 8, 14, 20)
    assert forty["index_source_layer_ids"] == (2, 8, 14, 20, 24, 28, 32, 36)
    assert forty["candidate_source_layer_id"] == 20
    assert v41_schedule(43)["index_source_layer_ids"][-1] == 40
    assert v41_schedule(4) == dict(compress_ratios=(0, 0, 2, 1), kv_source_layer_ids=(2, 3),
                                   index_source_layer_ids=(2, 3), candidate_source_layer_id=3)
    with pytest.raises(UsageError):
        v41_schedule(3)


@needs_mlx_lm
@pytest.mark.parametrize("loop", ["sync", "pipelined"])
def test_mlx_lm_peer_decodes_and_restarts(loop):
    peer = MlxLmPeer(tiny_cfg(), seed=0, loop=loop)
    assert peer.name == ("mlx-lm" if loop == "sync" else "mlx-lm-pipelined")
    assert "deepseek_v41 (V4.1, not V4): 5 layers [0x2,2,1x2]" in peer.detail
    samples = run([peer], "decode", IDS, n_tokens=3, reps=2, warmup=0)
    assert [len(s.token_ms) for s in samples] == [3, 3]
    first = list(peer.last_tokens)
    peer.prefill(IDS)
    peer.decode(3)
    assert peer.last_tokens == first and all(0 <= t < 1024 for t in first)
    if loop == "sync":
        assert set(samples[0].extra) == {"build_ms", "eval_ms"}
    else:
        with pytest.raises(RuntimeError, match="before prefill"):
            peer.decode(1)  # generate_step ran one token ahead: no continuation


@needs_llama
def test_llama_cpp_peer_on_the_same_gguf(tiny_models):
    path = tiny_models("f32")
    (peer,) = make_peers("llama.cpp", path, ctx=256)
    assert "tiny-f32.gguf (f32" in peer.detail and "2 threads" in peer.detail
    samples = run([peer], "decode", IDS, n_tokens=3, reps=2, warmup=0)
    assert len(samples) == 2
    first = list(peer.last_tokens)
    peer.prefill(IDS)
    peer.decode(3)
    assert peer.last_tokens == first and all(0 <= t < 129280 for t in first)
    with pytest.raises(UsageError, match="ctx"):
        peer.prefill(list(range(300)))


@needs_hf
def test_make_peers_reads_the_config_from_the_gguf(tiny_models):
    built = []
    (peer,) = make_peers(["hf"], tiny_models("f32"), progress=lambda n, s: built.append(n))
    assert built == ["transformers"] and isinstance(peer, bench.Peer)
    assert "5 layers [0x2,4,128,4]" in peer.detail and "vocab 129280" in peer.detail


def test_llama_cpp_load_failure_is_one_line_with_llama_cpp_s_reason(monkeypatch, tiny_models):
    """llama.cpp logs why a load failed on fd 2 and raises a bare ValueError; we report the log line."""
    import types

    def failing_llama(**kwargs):
        os.write(2, b"llama_model_load: error loading model: unknown model architecture: 'x'\n")
        raise ValueError(f"Failed to load model from file: {kwargs['model_path']}")

    fake = types.SimpleNamespace(__version__="0.3.36", Llama=failing_llama)
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    with pytest.raises(UsageError) as err:
        LlamaCppPeer(tiny_models("f32"))
    assert "could not load tiny-f32.gguf: llama_model_load: error loading model: unknown model " \
           "architecture: 'x'" in str(err.value)
    fake.__version__ = "0.3.20"
    with pytest.raises(UsageError, match="0.3.20 predates llama.cpp's deepseek4"):
        LlamaCppPeer(tiny_models("f32"))


def _stat_line(busy_ticks: int) -> str:
    return f"cpu  {busy_ticks} 0 0 1000 0 0 0 0 0 0\ncpu0 1 0 0 0 0 0 0 0 0 0\n"


def test_cpu_watch_counts_other_processes_only(monkeypatch, tmp_path):
    stat = tmp_path / "stat"
    monkeypatch.setattr(bench.CpuWatch, "STAT", str(stat))
    hz = os.sysconf("SC_CLK_TCK")
    stat.write_text(_stat_line(0))
    watch = bench.CpuWatch()
    watch.start()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.2:  # burn our own CPU: not "others"
        pass
    own = watch._own() - watch._start[2]
    # others used 1 core for the window: system busy = ours + 0.2 s more
    stat.write_text(_stat_line(round((own + 0.2) * hz)))
    busy = watch.stop()
    assert busy == pytest.approx(1.0, abs=0.3)
    stat.unlink()
    watch.start()
    assert watch.stop() is None  # no /proc/stat (macOS): unknown, not zero
    assert bench.wait_for_quiet(0.5, timeout=5, window=0.01) is None


def test_render_warns_when_other_processes_were_busy():
    samples = [Sample("a", "prefill", 0, 8, 1.0, 8.0, other_cpu=0.9),
               Sample("b", "prefill", 0, 8, 2.0, 4.0, other_cpu=0.0)]
    summary = summarize(samples)
    assert summary[0]["other_cpu_max"] == 0.9
    assert "warning: other processes kept 0.9 of" in render_table(summary, rich=False)
    samples[0].other_cpu = 0.1
    assert "warning" not in render_table(summarize(samples))


def test_bench_kernels_times_every_variant_on_the_bytes_it_reads():
    from magnetar.runtime.lab import bench_kernels

    cases = bench_kernels.run("q2", "cpu", n_experts=8, d_model=256, ffn=256, k=3, prefill_tokens=20, reps=2)
    per_expert = 2 * 256 * 256 * 66 // 256 + 256 * 256 * 84 // 256  # IQ2_XXS gate/up + Q2_K down
    decode, prefill = cases
    assert (decode.n_tokens, prefill.n_tokens) == (1, 20)
    assert decode.bytes_read == 3 * per_expert  # one token reads its 3 experts
    assert prefill.bytes_read % per_expert == 0 and 3 * per_expert < prefill.bytes_read <= 8 * per_expert
    for case in cases:
        assert all(len(v) == 2 and min(v) > 0 for v in case.seconds.values())
    table = bench_kernels.render(cases, "q2", "cpu")
    assert "decode T=1" in table and "prefill T=20" in table


def test_bench_kernels_times_a_slow_simple_path_once(monkeypatch):
    from magnetar.runtime.lab import bench_kernels

    monkeypatch.setattr(bench_kernels, "SLOW_SIMPLE_S", 0.0)  # every call counts as slow
    cases = bench_kernels.run("q2", "cpu", n_experts=8, d_model=256, ffn=256, k=3, prefill_tokens=20, reps=3)
    for case in cases:
        assert len(case.seconds["dequant+matmul"]) == 1
        assert len(case.seconds["kernels"]) == len(case.seconds["copy"]) == 3


def test_bench_resume_restores_what_it_prefilled(tiny_models, capsys):
    """The command checks each restore against the prefill's logits itself; here its
    table and sizes: one row per length, bytes growing with the tokens."""
    from magnetar.cli import main

    assert main(["bench", "resume", "-m", str(tiny_models("q8")), "--lengths", "40,300", "--reps", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [int(r[0]) for r in rows] == [40, 300]
    assert float(rows[0][5]) < float(rows[1][5])  # MB
    assert all(r[-1].endswith("x") for r in rows)


def test_bench_resume_bad_lengths_are_one_line(tiny_models, capsys):
    from magnetar.cli import main

    assert main(["bench", "resume", "-m", str(tiny_models("q8")), "--lengths", "8k"]) == 2
    err = capsys.readouterr().err
    assert "--lengths must be comma-separated token counts" in err and "Traceback" not in err


def test_our_peer_times_n_decode_steps_as_the_others_do(tiny_models):
    """Each peer's decode(n) times n forward steps. ``Engine.generate`` hands out its first token
    from the prompt's logits, with no step: timing its n tokens would count n - 1 steps (and
    overstate our tokens/s by n / (n - 1) beside llama.cpp's n evals)."""
    from magnetar.runtime.lab.bench_peers import EnginePeer

    peer = EnginePeer(os.fspath(tiny_models("q2")), 256)
    prompt = [3 + 37 * i % 1000 for i in range(12)]
    peer.prefill(prompt)
    times = peer.decode(4)
    # n steps ran: the engine holds the prompt and n run tokens, and hands out the (n + 1)-th
    # still pending (n - 1 steps would leave prompt + n)
    assert len(times) == 4 and all(t > 0 for t in times)
    assert len(peer.engine.tokens) == len(prompt) + 5
