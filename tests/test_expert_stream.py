"""Routed experts streamed from the file through slot banks (runtime/expert_cache.py):
the same bits as the resident engine at any cache size, ds4's eviction order, and
faults that leave no half-read slot valid and the engine usable afterwards."""

from __future__ import annotations

import csv
import errno
import gc
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from magnetar.cli import main
from magnetar.kernels import native
from magnetar.kernels.backend import select
from magnetar.runtime import expert_cache
from magnetar.runtime.engine import Engine
from magnetar.runtime.errors import ExpertReadError, UsageError
from magnetar.runtime.expert_cache import DECAY_TOKENS, ExpertCache, format_hotlist, read_hotlist, routed_tensors
from magnetar.runtime.gguf_read import open_model

pytestmark = pytest.mark.skipif(not native.available(), reason="streaming needs the native CPU kernels")

PROMPT = list(range(1000, 1040))


def _run(engine: Engine, n_decode: int = 6):
    """Logits of every prompt position (pure), then greedy decode tokens and the last logits."""
    every = engine.logits(PROMPT)
    engine.prefill(PROMPT)
    tokens = [ev.token for ev in engine.generate(max_tokens=n_decode, temperature=0, ignore_eos=True)]
    return every, tokens, engine.next_logits()


@pytest.fixture(scope="module")
def resident(tiny_models):
    path = tiny_models("q2")
    return path, _run(Engine.load(path, ctx=256))


def _slot_bytes(path) -> int:
    return sum(i.nbytes // i.shape[2] for i in routed_tensors(open_model(path), [0])[0])


@pytest.mark.parametrize("slots_per_layer", [1, 2, 8])  # tiny: top-3 of 8 experts
def test_streamed_engine_equals_resident_bit_for_bit(resident, slots_per_layer):
    path, (every, tokens, last) = resident
    n_layer = open_model(path).config.n_layer
    engine = Engine.load(path, ctx=256, expert_cache=slots_per_layer * n_layer * _slot_bytes(path))
    cache = engine.model.experts
    assert all(b.n_slots == slots_per_layer for b in cache.banks.values())
    got_every, got_tokens, got_last = _run(engine)
    assert np.array_equal(got_every, every)  # prefill: below 3 slots a selection runs in rounds
    assert got_tokens == tokens and np.array_equal(got_last, last)
    stats = engine.stats.streaming
    assert stats.experts_read > 0 and stats.bytes_read == stats.experts_read * _slot_bytes(path)
    if slots_per_layer == 8:  # everything fits: each expert is read once, no whole layers set aside
        assert stats.experts_read <= 8 * n_layer and cache.staging is None


def test_whole_layers_streamed_in_prefill_give_the_same_bits(resident, monkeypatch):
    path, (every, tokens, last) = resident
    monkeypatch.setattr(expert_cache, "STAGING_SHARE", 1)  # tiny's 5 layers: 2 whole ones are 40% of them
    engine = Engine.load(path, ctx=256, expert_cache=(2 * 8 + 4 * 5) * _slot_bytes(path))
    cache = engine.model.experts
    assert cache.staging is not None and all(b.n_slots == 4 for b in cache.banks.values())
    got_every, got_tokens, got_last = _run(engine)
    assert np.array_equal(got_every, every)
    assert got_tokens == tokens and np.array_equal(got_last, last)
    assert engine.stats.streaming.layers_streamed > 0  # the 40-token prompt picks every expert


def test_scratch_work_is_set_aside(resident):
    path, _ = resident
    engine = Engine.load(path, ctx=256, expert_cache=2 * 5 * _slot_bytes(path))
    cache = engine.model.experts
    engine.prefill(PROMPT[:8])
    hot, stats = cache.hotness(), dict(vars(cache.stats))
    with cache.set_aside():  # as Engine.warm compiles the decode step on a scratch state
        engine.logits(PROMPT[8:16])
    assert all(np.array_equal(cache.hotness()[il], h) for il, h in hot.items())
    assert dict(vars(cache.stats)) == stats


def test_whole_layers_stream_only_when_the_measured_cost_says_so(tiny_models, monkeypatch):
    path = tiny_models("q2")
    slot = _slot_bytes(path)
    monkeypatch.setattr(expert_cache, "STAGING_SHARE", 1)
    cache = ExpertCache(path, routed_tensors(open_model(path), [3, 4]), (2 * 8 + 2 * 4) * slot)
    assert cache.staging is not None and cache.banks[4].n_slots == 4
    cache.bank_read = [10**9, 1.0]  # 1 GB/s expert by expert, and as much whole
    cache.staging.nbytes, cache.staging.seconds, cache.staging.compute_seconds = 10**9, 1.0, 0.0
    cache._maybe_stage_next(3, 8, 0.0)  # all 8 expected misses: the same bytes either way, nothing hidden
    assert not cache.staging.holds(4)
    cache.banks[4].slot_of[:6] = 0  # 6 of 8 resident: 2 expected misses of the 8 picks
    cache._maybe_stage_next(3, 8, 0.0)
    assert not cache.staging.holds(4)
    cache.banks[4].slot_of[:] = -1
    cache.staging.compute_seconds = 8 * slot / 1e9  # compute hides the whole read
    cache._maybe_stage_next(3, 8, 0.0)
    assert cache.staging.holds(4)
    cache.close()
    assert not cache.staging.holds(4)


def test_a_cache_below_one_slot_per_layer_is_raised_to_it(tiny_models, capsys):
    path = tiny_models("q2")
    assert main(["generate", "-m", str(path), "-p", "hi", "--nothink", "--temp", "0", "-n", "2",
                 "--expert-cache", "1K", "--ctx", "256"]) == 0
    err = capsys.readouterr().err
    assert "1 slots per layer" in err and "raised to the minimum" in err


def test_bad_cache_size_and_hotlist_without_cache_are_one_line_errors(tiny_models, capsys):
    path = str(tiny_models("q2"))
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "-m", path, "-p", "hi", "--expert-cache", "12X"])
    assert exit_.value.code == 2 and "is not a size" in capsys.readouterr().err
    assert main(["generate", "-m", path, "-p", "hi", "--hotlist", "hot.txt"]) == 2
    assert capsys.readouterr().err.strip() == \
        "magnetar: error: --hotlist needs --expert-cache (add --expert-cache auto or a size)"


def test_backends_without_slot_kernels_refuse_streaming(tiny_models):
    with pytest.raises(UsageError, match="--expert-cache needs kernels"):
        Engine(open_model(tiny_models("q2")), 256, kernels=select("reference"), expert_cache=1 << 30)


# -- eviction -------------------------------------------------------------------------------


def _cache(path, slots: int) -> ExpertCache:
    return ExpertCache(path, routed_tensors(open_model(path), [3]), slots * _slot_bytes(path))


def _step(cache: ExpertCache, experts: list[int]) -> None:
    x = np.ones((1, open_model(cache.file.path).config.d_model), np.float32)
    ids = np.array([experts], np.int32)
    cache.moe(3, select("cpu"), x, ids, np.ones(ids.shape, np.float32), 10.0)


def _resident(cache: ExpertCache) -> set[int]:
    return set(np.flatnonzero(cache.banks[3].slot_of >= 0).tolist())


def test_eviction_takes_the_coldest_then_the_least_recently_used(tiny_models):
    cache = _cache(tiny_models("q2"), slots=3)
    _step(cache, [0, 1, 2])  # cold: three reads
    assert (cache.stats.uses, cache.stats.hits, cache.stats.experts_read) == (3, 0, 3)
    _step(cache, [0, 1])  # hot: 0 and 1 picked twice, 2 once
    assert cache.stats.hits == 2
    _step(cache, [4])  # evicts 2, the coldest
    assert _resident(cache) == {0, 1, 4}
    _step(cache, [0])  # 0: 3 picks; 1: 2, used at tick 2; 4: 1
    _step(cache, [1, 5])  # 4 is coldest (1 pick) -> evicted; 1 is a hit
    assert _resident(cache) == {0, 1, 5}
    _step(cache, [6, 6])  # 6: 2 picks now. 5 (1 pick) goes although 0, 1 are older
    assert _resident(cache) == {0, 1, 6}
    cache.banks[3].hot[:] = 0  # equal hotness: the least recently used (0, last used at tick 4) goes
    _step(cache, [7])
    assert _resident(cache) == {1, 6, 7}
    cache.close()


def test_the_selection_being_computed_is_never_evicted(tiny_models):
    cache = _cache(tiny_models("q2"), slots=2)
    for _ in range(5):
        _step(cache, [1])  # 1 very hot
    _step(cache, [0])
    _step(cache, [0, 2])  # 0 (2 picks) is colder than 1 (5) but in the selection: 1 goes
    assert _resident(cache) == {0, 2}
    cache.close()


def test_hotness_halves_every_decay_period(tiny_models):
    cache = _cache(tiny_models("q2"), slots=2)
    _step(cache, [0, 0, 1])
    assert cache.banks[3].hot[[0, 1]].tolist() == [2, 1]
    for _ in range(DECAY_TOKENS):
        cache.token_done()
    assert cache.banks[3].hot[[0, 1]].tolist() == [1, 0.5]
    cache.close()


# -- faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["short", "eio", "split"])
def test_read_faults_give_one_error_no_valid_half_slot_and_the_engine_recovers(resident, fault):
    path, (every, tokens, last) = resident
    engine = Engine.load(path, ctx=256, expert_cache=2 * 5 * _slot_bytes(path))
    cache = engine.model.experts
    calls, bad = [], []

    def wrapped(fd, buffers, offset):  # the 4th read's piece misbehaves whenever it is read
        calls.append(offset)
        if len(calls) == 4:
            bad[:] = [offset, offset + len(buffers[0])]
        inside = bool(bad) and bad[0] <= offset < bad[1]
        half = memoryview(buffers[0])[: len(buffers[0]) // 2]
        if fault == "eio" and inside:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if fault == "short" and inside:  # half of it, then end of file
            return 0 if offset > bad[0] else os.preadv(fd, [half], offset)
        if fault == "split" and len(calls) in (4, 5):  # half now, the rest when asked
            return os.preadv(fd, [half], offset)
        return os.preadv(fd, buffers, offset)

    cache.file.preadv = wrapped
    if fault == "split":  # partial reads that go on to complete are not faults
        engine.prefill(PROMPT)
        assert engine.tokens == PROMPT
        return
    with pytest.raises(ExpertReadError, match="short read" if fault == "short" else "Input/output error"):
        engine.prefill(PROMPT)
    assert engine.tokens == []  # the live sequence is as it was
    for bank in cache.banks.values():  # every valid slot holds its expert's exact bytes
        for e in np.flatnonzero(bank.slot_of >= 0):
            for data, stack in zip(bank.banks, bank.stacks):
                with open(path, "rb") as f:
                    f.seek(stack.offset + int(e) * stack.expert_bytes)
                    assert data[bank.slot_of[e]].tobytes() == f.read(stack.expert_bytes)
    del cache.file.preadv
    engine.prefill(PROMPT)
    got = [ev.token for ev in engine.generate(max_tokens=len(tokens), temperature=0, ignore_eos=True)]
    assert got == tokens and np.array_equal(engine.next_logits(), last)


def test_reads_ahead_that_failed_in_a_failed_call_do_not_fail_the_next(resident):
    """The hash layers' experts are read ahead together; the first layer's failure ends the
    call while the later layers' reads ahead have failed too. The next call reads them again
    (a read ahead is a guess, not a promise) instead of raising their stale errors."""
    path, (every, tokens, last) = resident
    engine = Engine.load(path, ctx=256, expert_cache=2 * 5 * _slot_bytes(path))
    cache = engine.model.experts
    cache.file.preadv = lambda fd, buffers, offset: 0  # every read ends at "end of file"
    with pytest.raises(ExpertReadError, match="short read"):
        engine.prefill(PROMPT)
    assert sum(len(bank.pending) for bank in cache.banks.values()) > 0  # the stale reads ahead
    del cache.file.preadv
    engine.prefill(PROMPT)
    got = [ev.token for ev in engine.generate(max_tokens=len(tokens), temperature=0, ignore_eos=True)]
    assert got == tokens and np.array_equal(engine.next_logits(), last)


def test_a_truncated_file_is_detected_and_works_again_once_restored(resident, tmp_path, capsys):
    path, (every, tokens, last) = resident
    copy = tmp_path / "m.gguf"
    shutil.copy2(path, copy)
    stat = os.stat(copy)
    engine = Engine.load(copy, ctx=256, expert_cache=1)
    cut = routed_tensors(open_model(copy), [4])[4][0].offset  # the last layer's experts are gone
    os.truncate(copy, cut)
    with pytest.raises(ExpertReadError, match="changed while the model was loaded"):
        engine.prefill(PROMPT)
    assert engine.tokens == []
    with open(path, "rb") as src, open(copy, "r+b") as dst:
        src.seek(cut)
        dst.seek(cut)
        dst.write(src.read())
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # restored as `cp -p` would
    engine.prefill(PROMPT)
    got = [ev.token for ev in engine.generate(max_tokens=len(tokens), temperature=0, ignore_eos=True)]
    assert got == tokens and np.array_equal(engine.next_logits(), last)


def test_a_file_changed_under_the_engine_fails_the_command_in_one_line(tiny_models, tmp_path, capsys):
    copy = tmp_path / "m.gguf"
    shutil.copy2(tiny_models("q2"), copy)
    engine = Engine.load(copy, ctx=256, expert_cache=1)
    with open(copy, "r+b") as f:  # same size, new mtime: rewritten in place
        f.seek(-1, os.SEEK_END)
        f.write(f.read(0) or b"\0")
    os.utime(copy, ns=(1, 1))
    with pytest.raises(ExpertReadError) as err:
        engine.prefill(PROMPT)
    assert "\n" not in str(err.value) and "restart" in str(err.value)


# -- hotlists -------------------------------------------------------------------------------


def test_hotlist_round_trips_and_preloads_the_hottest(tiny_models, tmp_path):
    path = tiny_models("q2")
    hits = {il: np.zeros(8) for il in range(5)}
    weights = {il: np.zeros(8) for il in range(5)}
    hits[3][[5, 2, 7]] = [9, 4, 1]
    weights[3][[5, 2, 7]] = [3.5, 1.25, 0.5]
    text = format_hotlist("tiny", hits, weights)
    assert text.splitlines()[0] == "# ds4 expert hotlist v1"
    hot = tmp_path / "hot.txt"
    hot.write_text(text)
    assert read_hotlist(hot) == [(3, 5, 9.0), (3, 2, 4.0), (3, 7, 1.0)]
    engine = Engine.load(path, ctx=256, expert_cache=2 * 5 * _slot_bytes(path), hotlist=hot)
    bank = engine.model.experts.banks[3]
    assert set(np.flatnonzero(bank.slot_of >= 0).tolist()) == {5, 2}  # two slots: the two hottest
    assert "2 experts preloaded" in engine.expert_cache_note
    bad = tmp_path / "bad.txt"
    bad.write_text("3 five 9\n")
    with pytest.raises(UsageError, match="line 1"):
        read_hotlist(bad)


# -- Flash shapes ---------------------------------------------------------------------------


def _streamed_equals_resident(path, budgets, n_prompt: int, n_decode: int, every_position: bool = True) -> None:
    prompt = PROMPT[:n_prompt]

    def run(engine):
        every = engine.logits(prompt) if every_position else None
        engine.prefill(prompt)
        tokens = [ev.token for ev in engine.generate(max_tokens=n_decode, temperature=0, ignore_eos=True)]
        return every, tokens, engine.next_logits()

    every, tokens, last = run(Engine.load(path, ctx=64))
    gc.collect()
    mx.clear_cache()  # the resident engine's experts (7 GB at Flash widths) leave with it
    for budget in budgets:
        engine = Engine.load(path, ctx=64, expert_cache=budget)
        got_every, got_tokens, got_last = run(engine)
        assert every is None or np.array_equal(got_every, every), budget
        assert got_tokens == tokens and np.array_equal(got_last, last), budget
        engine.model.experts.close()


@pytest.mark.slow
def test_small_streamed_equals_resident(preset_models):
    path = preset_models("small")  # 43 layers, top-6 of 16 experts
    routed = sum(i.nbytes for infos in routed_tensors(open_model(path), range(43)).values() for i in infos)
    _streamed_equals_resident(path, [1, routed // 4], n_prompt=24, n_decode=3)


@pytest.mark.slow
def test_mini_flash_streamed_equals_resident(preset_models):
    path = preset_models("mini-flash")  # Flash widths: 256 experts of 6.75 MiB per layer
    # in a process of its own: the resident engine holds 7 GB of experts (plus the file's pages)
    check = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_expert_stream as t; "
             f"t._streamed_equals_resident({str(path)!r}, [1], n_prompt=4, n_decode=2, every_position=False)")
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-2000:]


def test_bench_streaming_reports_every_cache_size_against_resident(tiny_models, tmp_path, capsys):
    out = tmp_path / "s.csv"
    assert main(["bench", "streaming", "-m", str(tiny_models("q2")), "--tokens", "2", "--prompt-tokens", "8",
                 "--cache-shares", "25,100", "--csv", str(out)]) == 0
    table = capsys.readouterr().out
    assert "resident" in table and "zipf-1.1" in table and "disk:" in table
    rows = out.read_text().splitlines()
    assert rows[0].startswith("routing,cache_share,tok_s,ratio") and len(rows) == 1 + 2 + 2 * 2
    shares = {(r["routing"], float(r["cache_share"])): float(r["read_share"]) for r in csv.DictReader(rows)}
    assert shares[("model", 0.0)] == 0.0 and shares[("zipf-1.1", 0.25)] > 0.0  # a quarter cache misses
