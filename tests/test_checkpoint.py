"""Checkpoints and snapshots: a restored sequence continues bit for bit, with
zero tokens re-processed; damaged or foreign files are refused in one line;
a writer killed at any moment never leaves a file that reads as valid."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from magnetar.runtime import checkpoint as ckpt
from magnetar.runtime.engine import Engine
from magnetar.runtime.lab.make_model import make_model

CTX = 1024


def _ids(n: int, seed: int = 0) -> list[int]:
    return [0] + np.random.default_rng(seed).integers(2, 129280, n - 1).tolist()


def _greedy(engine: Engine, n: int) -> tuple[list[int], list[np.ndarray]]:
    """``n`` greedy tokens and the logits each was picked from."""
    tokens, rows = [], []
    for _ in range(n):
        rows.append(engine.next_logits())
        tokens.append(next(engine.generate(max_tokens=1, temperature=0.0)).token)
    return tokens, rows


# N spans several 128-token raw windows and is aligned to no window or ratio.
@pytest.mark.parametrize("n_prompt", [1, 93, 261])
def test_restore_in_a_fresh_process_continues_bit_for_bit(tiny_models, tmp_path, n_prompt):
    model = tiny_models("q8")
    engine = Engine.load(model, ctx=CTX)
    engine.prefill(_ids(n_prompt))
    path = tmp_path / "s.ckpt"
    size = engine.checkpoint(path)
    assert size == path.stat().st_size
    expected_tokens, expected_rows = _greedy(engine, 12)

    script = (
        "import json, sys, numpy as np\n"
        "from magnetar.runtime.engine import Engine\n"
        f"e = Engine.load({str(model)!r}, ctx={CTX})\n"
        f"e.restore({str(path)!r})\n"
        "rows, toks = [], []\n"
        "for _ in range(12):\n"
        "    rows.append(e.next_logits())\n"
        "    toks.append(next(e.generate(max_tokens=1, temperature=0.0)).token)\n"
        f"np.save({str(tmp_path / 'rows.npy')!r}, np.stack(rows))\n"
        "print(json.dumps({'tokens': toks, 'prefilled': e.stats.prefill_tokens,\n"
        "                  'restored': e.stats.restored_tokens, 'n': len(e.tokens)}))\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["prefilled"] == 0 and out["restored"] == n_prompt  # nothing re-processed
    assert out["tokens"] == expected_tokens and out["n"] == n_prompt + 12
    rows = np.load(tmp_path / "rows.npy")
    assert np.array_equal(rows.view(np.uint32), np.stack(expected_rows).view(np.uint32))


def test_rewind_continues_bit_for_bit_any_number_of_times(tiny_models):
    engine = Engine.load(tiny_models("q8"), ctx=CTX)
    engine.prefill(_ids(150))
    snap = engine.snapshot()
    first = _greedy(engine, 6)
    engine.prefill(_ids(40, seed=3)[1:])  # the sequence moves on (an abandoned turn) ...
    for _ in range(2):  # ... and comes back, twice
        engine.rewind(snap)
        assert engine.tokens == list(snap.tokens)
        again = _greedy(engine, 6)
        assert again[0] == first[0]
        assert all(np.array_equal(a, b) for a, b in zip(again[1], first[1]))


def test_size_follows_tokens_not_context(tiny_models, tmp_path):
    sizes = {}
    for ctx, n in ((512, 200), (65536, 200), (65536, 400)):
        engine = Engine.load(tiny_models("q8"), ctx=ctx)
        engine.prefill(_ids(n))
        sizes[ctx, n] = engine.checkpoint(tmp_path / f"{ctx}-{n}.ckpt")
    assert abs(sizes[512, 200] - sizes[65536, 200]) < 16  # only the header's digits of ctx differ
    meta = ckpt.read_meta(tmp_path / "65536-400.ckpt")
    assert meta["n_tokens"] == 400 and meta["ctx"] == 65536
    # Past the raw window, 200 more tokens add only compressed rows and their ids.
    cfg = Engine.load(tiny_models("q8"), ctx=512).config
    per_token = sum(4 * (cfg.head_dim + (cfg.indexer_dim if r == 4 else 0)) / r
                    for r in (cfg.ratio(il) for il in range(cfg.n_layer)) if r)
    assert abs((sizes[65536, 400] - sizes[65536, 200]) - 200 * (per_token + 4)) < 4 * 4 * cfg.head_dim * cfg.n_layer


@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory) -> tuple[Path, Engine]:
    engine = Engine.load(tiny_models("q8"), ctx=CTX)
    engine.prefill(_ids(200))
    path = tmp_path_factory.mktemp("ckpt") / "good.ckpt"
    engine.checkpoint(path)
    return path, engine


def _damaged(src: Path, dst: Path, edit) -> Path:
    data = bytearray(src.read_bytes())
    dst.write_bytes(bytes(edit(data)))
    return dst


@pytest.mark.parametrize("name,edit,message", [
    ("truncated", lambda d: d[:len(d) // 2], "damaged|truncated"),
    ("flipped", lambda d: d[:5000] + bytes([d[5000] ^ 1]) + d[5001:], "checksum"),
    ("empty", lambda d: b"", "not a magnetar checkpoint"),
    ("other file", lambda d: b"GGUF" + d[4:], "not a magnetar checkpoint"),
    ("version", lambda d: d[:8] + (ckpt.VERSION + 1).to_bytes(4, "little") + d[12:], "version 2"),
])
def test_damaged_files_are_refused_in_one_line(saved, tmp_path, name, edit, message):
    good, engine = saved
    before = engine.tokens
    bad = _damaged(good, tmp_path / "bad.ckpt", edit)
    with pytest.raises(ckpt.CheckpointError, match=message) as err:
        engine.restore(bad)
    assert "\n" not in str(err.value)
    assert engine.tokens == before  # the live sequence is kept


def test_another_model_or_precision_is_refused(saved, tmp_path):
    good, _ = saved
    other = Engine.load(make_model("tiny", "q8", 1, tmp_path / "seed1.gguf"), ctx=CTX)  # same layout
    with pytest.raises(ckpt.CheckpointError, match="another model .weights differ"):
        other.restore(good)
    with pytest.raises(ckpt.CheckpointError, match="another model .quantization recipe|tensor layout"):
        Engine.load(make_model("tiny", "f32", 0, tmp_path / "f32.gguf"), ctx=CTX).restore(good)
    with pytest.raises(ckpt.CheckpointError, match="precision"):
        Engine(saved[1].file, ctx=CTX, precision="reference").restore(good)
    with pytest.raises(ckpt.CheckpointError, match="holds 200 tokens; the context is 100"):
        Engine(saved[1].file, ctx=100).restore(good)


WRITER = """
import sys
from magnetar.runtime.engine import Engine
model, states, target = sys.argv[1], sys.argv[2:4], sys.argv[4]
engines = []
for s in states:
    e = Engine.load(model, ctx={ctx})
    e.restore(s)
    engines.append(e)
print("ready", flush=True)
i = 0
while True:
    engines[i % 2].checkpoint(target)
    i += 1
"""


@pytest.mark.slow
def test_a_writer_killed_at_any_moment_leaves_the_last_good_checkpoint(tiny_models, tmp_path):
    """SIGKILL a process that keeps rewriting one checkpoint, at random moments,
    many times: what is on disk always loads, as one of the two states it writes."""
    model = tiny_models("q8")
    states, token_lists = [], []
    for k, n in enumerate((130, 260)):
        engine = Engine.load(model, ctx=CTX)
        engine.prefill(_ids(n, seed=k))
        states.append(tmp_path / f"state{k}.ckpt")
        engine.checkpoint(states[-1])
        token_lists.append(engine.tokens)
    target = tmp_path / "live" / "session.ckpt"
    reader = Engine.load(model, ctx=CTX)
    rng = random.Random(0)
    # a hang guard, not a speed bar: each round starts a Python process that loads two engines
    deadline, kills = time.monotonic() + 600, 0
    while kills < 50 and time.monotonic() < deadline:
        proc = subprocess.Popen([sys.executable, "-c", WRITER.format(ctx=CTX), str(model), *map(str, states),
                                 str(target)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.15))  # a few writes each: the kill lands anywhere in one
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if target.exists():
            reader.restore(target)
            assert reader.tokens in token_lists
    assert kills >= 50
    leftovers = [p.name for p in target.parent.iterdir() if p.name != target.name]
    assert all(name.startswith(".session.ckpt.tmp-") for name in leftovers)  # temp files, never the target
    assert leftovers  # some kills really landed inside a write
