"""The layer-split pipeline as real processes on 127.0.0.1 (MLX ring, ``--ranks N``).

Rank 0 runs tests/pipeline_driver.py in its own process (a process joins one MLX
ring, once) and starts the other ranks itself. Proved here: 2 and 3 ranks with
uneven splits give the single-process engine's logits bit for bit (chunked and
windowed prefill, pure logits, decode, after a restore, after the workers lost the
session and after a rewind, both replayed from the transcript); a session saved on 2
ranks is the single-machine file and restores in one process, and one saved in
one process restores on 3 ranks; a rank killed mid-prefill or mid-decode ends
rank 0 within seconds with one error line and a non-zero exit, no file written; a
rank that hangs alive ends rank 0 at its reply timeout.
Every run has a timeout, so a hang fails instead of stalling CI. The fast set: the
CLI's greedy text on 2 ranks, the kill mid-prefill, the split and hash rules
(tests/test_pipeline_stages.py proves the stages bit for bit in one process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from magnetar.runtime import Engine, UsageError
from magnetar.runtime import checkpoint as ckpt
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.layer_balance import Calibration, Measured, time_balanced
from magnetar.runtime.pipeline import PipelineError, balanced_spans, fnv1a, parse_layers

import pipeline_driver as driver

DRIVER = Path(__file__).with_name("pipeline_driver.py")


def _drive(model: Path, out: Path, *flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DRIVER), str(model), str(out), *flags],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def model(tiny_models) -> Path:
    return tiny_models("q2")


@pytest.fixture(scope="module")
def single(model, tmp_path_factory) -> dict:
    """The single-process engine: the rows, and its saved session."""
    ck = tmp_path_factory.mktemp("single") / "one.ck"
    engine = Engine.load(model, ctx=256, prefill_chunk=driver.CHUNK)
    rows = driver.exercise(engine, save=str(ck), detour=True)
    restored = driver.exercise(engine, restore=str(ck))
    return {"rows": rows, "ck": ck, "restored": restored, "engine": engine}


def _same_rows(got: Path, want: dict) -> None:
    rows = np.load(got)
    assert sorted(rows.files) == sorted(want)
    for key in want:
        assert np.array_equal(rows[key], want[key]), key


def _same_session(a: Path, b: Path, model: Path, ctx: int = 256) -> None:
    mf = open_model(model)
    ident = ckpt.model_identity(mf, "official")
    one, two = (ckpt.read(p, mf.config, ident, ctx) for p in (a, b))
    assert one.state.tokens == two.state.tokens and np.array_equal(one.logits, two.logits)
    assert all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(one.state.arrays(), two.state.arrays()))


@pytest.mark.slow  # ~15 s alone, ~30 s on a loaded 2-core machine
def test_two_ranks_equal_one_process_and_save_a_single_machine_session(model, single, tmp_path):
    """Also through both replays: workers that lost the live session, and a rewind."""
    ck = tmp_path / "two.ck"
    run = _drive(model, tmp_path / "two.npz", "--ranks", "2", "--layers", "0:4,4:5", "--save", str(ck), "--detour")
    assert run.returncode == 0, run.stderr
    _same_rows(tmp_path / "two.npz", single["rows"])
    _same_session(ck, single["ck"], model)
    back = driver.exercise(single["engine"], restore=str(ck))
    for key in back:
        assert np.array_equal(back[key], single["restored"][key])


@pytest.mark.slow  # ~13 s alone, ~25 s on a loaded 2-core machine
def test_three_ranks_restore_a_single_process_session_and_continue_identically(model, single, tmp_path):
    run = _drive(model, tmp_path / "three.npz", "--ranks", "3", "--layers", "0:1,1:4,4:5",
                 "--restore", str(single["ck"]))
    assert run.returncode == 0, run.stderr
    _same_rows(tmp_path / "three.npz", single["restored"])


@pytest.mark.parametrize("at", ["prefill", pytest.param("decode", marks=pytest.mark.slow)])
def test_a_killed_rank_ends_rank_0_with_one_error(model, tmp_path, at):
    ck = tmp_path / "never.ck"
    run = _drive(model, tmp_path / "k.npz", "--ranks", "2", "--layers", "0:2,2:5", "--kill-rank", "1",
                 "--kill-at", at, "--save", str(ck), timeout=60)
    assert run.returncode == PipelineError.exit_code
    ours = [ln for ln in run.stderr.splitlines() if ln.startswith("magnetar")]
    assert ours == ["magnetar: error: a pipeline rank was lost (rank 1 ended, killed by signal 9) "
                    "(the run stops; saved sessions are intact, restart with all ranks)"]
    assert "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []  # no session, no half-written temp file


def test_a_rank_that_hangs_without_dying_ends_rank_0_at_the_reply_timeout(model, tmp_path):
    """SIGSTOP mid-prefill: the peer's sockets stay open, so only rank 0's own deadline ends the wait."""
    run = _drive(model, tmp_path / "k.npz", "--ranks", "2", "--layers", "0:2,2:5", "--kill-rank", "1",
                 "--kill-at", "prefill", "--freeze", "--reply-timeout", "2", timeout=60)
    assert run.returncode == PipelineError.exit_code
    ours = [ln for ln in run.stderr.splitlines() if ln.startswith("magnetar")]
    assert ours == ["magnetar: error: a pipeline rank stopped answering (nothing for 2 s) "
                    "(the run stops; saved sessions are intact, restart with all ranks)"]


def test_layers_auto_balances_weight_bytes_and_explicit_splits_are_checked(model):
    mf = open_model(model)
    assert balanced_spans([1, 1, 1, 1, 4], 2) == [(0, 4), (4, 5)]
    assert balanced_spans([2, 2, 1, 1, 1, 1], 3) == [(0, 1), (1, 3), (3, 6)]
    spans = parse_layers("auto", mf, 2)
    assert spans[0][0] == 0 and spans[-1][1] == 5 and spans[0][1] == spans[1][0]
    assert parse_layers("0:1,1:5", mf, 2) == [(0, 1), (1, 5)]
    for bad in ("0:2,3:5", "0:5", "1:3,3:5", "0:3,3:3,3:5", "x"):
        with pytest.raises(UsageError):
            parse_layers(bad, mf, 2)


def test_prefix_hash_is_fnv1a_over_little_endian_token_bytes():
    assert fnv1a([]) == 1469598103934665603
    raw = b"".join(t.to_bytes(4, "little") for t in (1, 300, 129279))
    h = 1469598103934665603
    for byte in raw:
        h = ((h ^ byte) * 1099511628211) % (1 << 64)
    assert fnv1a([1, 300, 129279]) == h == fnv1a([129279], fnv1a([1, 300]))


def test_generate_with_two_local_ranks_writes_the_single_process_text(model):
    def generate(*flags: str) -> subprocess.CompletedProcess:
        cli = "import sys; from magnetar.cli import main; sys.exit(main())"  # its own process: one ring each
        return subprocess.run([sys.executable, "-c", cli, "generate", "-m", str(model), "-p", "hello there",
                               "-n", "8", "--temp", "0", "--ctx", "256", *flags],
                              capture_output=True, text=True, timeout=120)

    one, two = generate(), generate("--ranks", "2", "--layers", "0:2,2:5")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and one.stdout.strip()
    assert "magnetar: layers rank 0: 0:2, rank 1: 2:5" in two.stderr
    # each rank streams its own layers' experts, one slot per layer: the same text
    streamed = generate("--ranks", "2", "--layers", "0:2,2:5", "--expert-cache", "1")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == one.stdout and "rank 0 expert cache" in streamed.stderr


def test_layers_auto_times_the_ranks_and_keeps_the_single_process_logits(model, single, tmp_path):
    """Whatever split the timing picks (on tiny, by bytes 0:4,4:5 leaves rank 1 one layer and
    the head), every rank ends on it and the logits stay bit for bit one process's."""
    note = tmp_path / "note.txt"
    run = _drive(model, tmp_path / "auto.npz", "--ranks", "2", "--layers", "auto", "--note", str(note))
    assert run.returncode == 0, run.stderr
    _same_rows(tmp_path / "auto.npz", single["rows"])
    line = note.read_text()
    assert line.startswith("split 0:") and ":5 by " in line and "ms per 32-token prefill chunk" in line, line


def test_ranks_that_re_span_keep_the_single_process_logits(model, single, tmp_path):
    """What --layers auto does when the measured split differs: every rank rebuilds its model
    for its new layers (rank 1 gains three here)."""
    run = _drive(model, tmp_path / "re.npz", "--ranks", "2", "--layers", "0:4,4:5", "--respan", "0:1,1:5")
    assert run.returncode == 0, run.stderr
    _same_rows(tmp_path / "re.npz", single["rows"])


def test_the_time_model_balances_measured_layer_times_over_rank_speeds():
    """time(layer l on rank r) = w_l * s_r: s_r = a rank's measured layer seconds over its layers'
    bytes, w_l = a layer's seconds over its rank's s_r, the head's seconds moving with the last
    layer. Each expected split is worked out by hand below."""
    # Equal machines, equal layers, a head worth 1.5 layers on the last rank: w = 1,1,1,1,1,2.5;
    # 0:3,3:6 costs 3 / 4.5, 0:4,4:6 costs 4 / 3.5 (best), 0:5,5:6 costs 5 / 2.5.
    assert time_balanced([[1, 1, 1], [1, 1, 1]], 1.5, [(0, 3), (3, 6)], [1] * 6) == ([(0, 4), (4, 6)], [4, 3.5])
    # Rank 1 takes 3 s per byte, rank 0 1 s: 0:2,2:4 costs 2 / 6, 0:3,3:4 costs 3 / 3 (best).
    assert time_balanced([[1, 1], [3, 3]], 0, [(0, 2), (2, 4)], [1] * 4) == ([(0, 3), (3, 4)], [3, 3])
    # Three ranks; s = 1, 1, 3 (rank 2: 6 s over 2 bytes); w = 2,1,1,1,2,1, 1 + 0.5/3 (the head).
    # 0:3,3:6,6:7 costs 4 / 4 / 3.5; every other split has a rank at 5 or more.
    spans, predicted = time_balanced([[2, 1], [1, 1, 2], [3, 3]], 0.5, [(0, 2), (2, 5), (5, 7)], [2, 1, 1, 1, 2, 1, 1])
    assert spans == [(0, 3), (3, 6), (6, 7)] and np.allclose(predicted, [4, 4, 3.5])
    assert balanced_spans([1, 1, 1, 1], 2, speeds=[1, 3]) == [(0, 3), (3, 4)]


def test_a_calibration_keeps_the_measured_split_only_when_it_measured_faster():
    ms = 1e-3
    by_bytes = Measured([(0, 3), (3, 6)], [[10 * ms] * 3 + [0], [10 * ms] * 3 + [15 * ms]], [5 * ms, 6 * ms])
    cal = Calibration.of(by_bytes, [1] * 6, 32)
    assert cal.proposed == [(0, 4), (4, 6)] and np.allclose(cal.predicted, [0.040, 0.035]) and cal.worth_trying
    assert cal.chosen is by_bytes  # nothing tried yet
    cal.tried = Measured([(0, 4), (4, 6)], [[10 * ms] * 4 + [0], [10 * ms] * 2 + [15 * ms]], [6 * ms, 5 * ms])
    assert cal.spans == [(0, 4), (4, 6)]
    assert cal.line() == ("split 0:4,4:6 by measured time (rank times 40.0/35.0 ms per 32-token prefill chunk; "
                          "by bytes it was 0:3,3:6: 30.0/45.0 ms)")
    cal.tried = Measured([(0, 4), (4, 6)], [[12 * ms] * 4 + [0], [10 * ms] * 2 + [15 * ms]], [6 * ms, 5 * ms])
    assert cal.spans == [(0, 3), (3, 6)]  # 48 ms is no better than 45: the byte split stays
    assert cal.line().startswith("split 0:3,3:6 by bytes (rank times 30.0/45.0 ms per 32-token prefill chunk; "
                                 "by measured time 0:4,4:6 measured slower: 48.0/35.0 ms)")
    even = Measured([(0, 3), (3, 6)], [[10 * ms] * 3 + [0], [10 * ms] * 3 + [1 * ms]], [5 * ms, 5 * ms])
    assert not Calibration.of(even, [1] * 6, 32).worth_trying  # 0:3,3:6 is already the best split


@pytest.mark.slow  # two runs of the agent's ~2.6k-token prompt; the first compiles MLX's CPU kernels
def test_run_on_two_local_ranks_answers_and_saves_what_one_process_does(model, tmp_path):
    """magnetar run --ranks 2: the same events, transcript and session file as one process, and
    the session resumes in one process from its checkpoint (no replay)."""
    from magnetar.agent.sessions import SessionStore

    repo = tmp_path / "proj"
    repo.mkdir()
    (repo / "app.py").write_text("def add(a, b):\n    return a + b\n")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)

    def run(name: str, *flags: str) -> tuple[list[dict], Path]:
        env = {k: v for k, v in os.environ.items() if k != "MAGNETAR_HOME"}
        env.update(XDG_DATA_HOME=str(tmp_path / name), XDG_CACHE_HOME=str(tmp_path / "cache"))
        cli = "import sys; from magnetar.cli import main; sys.exit(main())"  # its own process: one ring each
        done = subprocess.run([sys.executable, "-c", cli, "run", "-m", str(model), "--cwd", str(repo), "--json",
                               "--ctx", "4096", "--max-tokens", "12", "--max-steps", "2", "--temp", "0",
                               "-p", "List the files.", *flags], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stderr
        events = [json.loads(line) for line in done.stdout.splitlines()]
        return events, tmp_path / name / "magnetar" / "sessions" / events[-1]["session"]

    one, one_dir = run("one")
    two, two_dir = run("two", "--ranks", "2")
    said = [[e for e in events[:-1] if e["type"] != "Prefill"] for events in (one, two)]  # what the model wrote
    assert said[0] == said[1] and said[0]
    assert {**two[-1], "session": None} == {**one[-1], "session": None}  # TurnEnd: the answer, why it ended
    messages = [SessionStore(d.parent).open(d.name).messages() for d in (one_dir, two_dir)]
    assert messages[0] == messages[1] and messages[0][-1].role == "assistant"
    _same_session(one_dir / "state.ckpt", two_dir / "state.ckpt", model, ctx=4096)
    engine = Engine.load(model, ctx=4096)
    resumed = SessionStore(two_dir.parent).open(two_dir.name).resume(engine, replay=lambda *a: pytest.fail("replayed"))
    assert resumed == "restored" and len(engine.tokens) > 2000
