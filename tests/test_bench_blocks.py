"""``magnetar bench blocks``: one decode token's time per block and layer (issue #16), on a
scratch state that leaves the engine's live sequence alone."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from magnetar.cli import main
from magnetar.kernels.cpu import CpuBackend
from magnetar.runtime import Engine
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.lab import block_times

IDS = [3 + 37 * i % 1000 for i in range(12)]
TINY_KINDS = ("sliding, hash", "CSA ratio 4, hash", "HCA ratio 128", "CSA ratio 4")  # tiny's ratios 0 0 4 128 4


def test_bench_blocks_prints_every_block_of_every_layer_kind_and_writes_the_csv(tiny_models, tmp_path, capsys):
    out = tmp_path / "blocks.csv"
    assert main(["bench", "blocks", "-m", str(tiny_models("q2")), "--tokens", "2", "--reps", "1",
                 "--prompt-tokens", "8", "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("kind"))
    assert all(block in header for block in block_times.BLOCKS)
    rows = {}  # kind -> [layers, ms per block..., one layer, all layers of the kind]
    for line in text.splitlines():
        kind = line.split("  ")[0]  # names hold single spaces, columns are two apart
        if kind in TINY_KINDS:
            rows[kind] = line[len(kind):].split()
    assert set(rows) == set(TINY_KINDS)
    assert all(len(cells) == len(block_times.BLOCKS) + 3 for cells in rows.values())
    assert all(float(v) > 0 for cells in rows.values() for v in cells[1:])
    assert "sum of blocks" in text and "compiled step" in text and "head" in text

    table = list(csv.DictReader(out.open()))
    per_layer = [r for r in table if r["layer"].isdigit()]
    assert [(int(r["layer"]), r["block"]) for r in per_layer] == [
        (il, b) for il in range(5) for b in block_times.BLOCKS]
    assert [int(r["ratio"]) for r in per_layer[::len(block_times.BLOCKS)]] == [0, 0, 4, 128, 4]
    assert all(float(r["ms"]) > 0 for r in table)
    assert {(r["layer"], r["block"]) for r in table if not r["layer"].isdigit()} == {
        ("head", "head"), ("token", "sum of blocks"), ("token", "compiled step"), ("token", "empty block")}


@pytest.mark.parametrize("native", [True, False], ids=["host-experts", "one-graph"])
def test_the_walk_computes_the_steps_logits_and_leaves_the_live_state_alone(tiny_models, native):
    engine = Engine(open_model(tiny_models("q2")), ctx=256, kernels=CpuBackend(use_native=native))
    engine.prefill(IDS)
    before = engine.next_logits()
    result = block_times.run(engine, IDS[:6], n_tokens=3, reps=1)
    assert result.logit_gap < 1e-4  # the same math as Model.decode, block by block
    assert len(result.walk) == len(result.step) == 3
    assert all(len(v) == 3 for v in result.seconds.values())
    assert engine.tokens == IDS and np.array_equal(engine.next_logits(), before)


def test_bench_blocks_refuses_bad_input_in_one_line(tiny_models, capsys):
    path = str(tiny_models("q2"))
    for argv, cause in ((["bench", "blocks"], "needs a model"),
                        (["bench", "blocks", "-m", path, "--expert-cache", "1G"], "experts held in memory"),
                        (["bench", "blocks", "-m", path, "--tokens", "0"], "must be positive"),
                        (["bench", "blocks", "-m", path, "--ctx", "16", "--prompt-tokens", "16"],
                         "do not fit --ctx 16")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert cause in err and "Traceback" not in err
