"""``magnetar quality``: the metrics, and the command on real tiny model files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from magnetar.agent.cli import main
from magnetar.runtime import quality

PROMPTS = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
           "---\nThe quick brown fox jumps over the lazy dog while the cache warms up.\n")


def test_metrics_against_closed_forms():
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.5, 0.3])
    ref, quant = np.log(p)[None] + 3.0, np.log(q)[None] - 1.0  # logits: any shift
    s = quality.compare(np.repeat(ref, 2, 0), np.repeat(quant, 2, 0), [0, 1], k=2)
    np.testing.assert_allclose(s.kl, np.sum(p * np.log(p / q)), rtol=1e-12)
    assert not s.top1.any()  # argmax 0 vs 1
    np.testing.assert_allclose(s.overlap, 0.5)  # {0, 1} vs {1, 2}
    np.testing.assert_allclose(s.nll_ref, [-np.log(0.3)])  # the next token is 1
    np.testing.assert_allclose(s.nll_quant, [-np.log(0.5)])


def test_summary_of_identical_logits():
    logits = np.random.default_rng(0).standard_normal((5, 50))
    summary = quality.summarize([quality.compare(logits, logits, [1, 2, 3, 4, 5], k=10)])
    assert summary.kl_max < 1e-12 and summary.top1_agreement == 1 and summary.topk_overlap == 1
    assert summary.ppl_ratio == pytest.approx(1.0)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("quality") / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def test_a_model_against_itself_is_exact(tiny_models, prompts):
    per_prompt, overall = quality.run(tiny_models("q8"), tiny_models("q8"), ["def main():\n    pass\n"])
    assert overall.kl_max < 1e-9 and overall.top1_agreement == 1.0 and overall.ppl_ratio == pytest.approx(1.0)


def test_fewer_bits_move_the_distribution_more(tiny_models, prompts):
    """Same seed, same underlying weights: q8 < q4 < q2 in KL from f32, and q2 stays bounded.
    (Measured on these prompts: 0.0025, 0.010 and 0.100 nats.)"""
    from magnetar.runtime.prompt_file import read_prompts

    texts = read_prompts(prompts)
    kl = {r: quality.run(tiny_models(r), tiny_models("f32"), texts)[1].kl_mean for r in ("q8", "q4", "q2")}
    assert 0 < kl["q8"] < kl["q4"] < kl["q2"] < 0.2, kl


def test_command_prints_a_table_and_writes_json(tiny_models, prompts, tmp_path, capsys):
    out = tmp_path / "q.json"
    rc = main(["quality", "-m", str(tiny_models("q4")), "--ref", str(tiny_models("q8")), "--prompts", str(prompts),
               "--json", str(out), "--max-tokens", "20"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "KL mean" in table and "\nall " in table
    doc = json.loads(out.read_text())
    assert len(doc["prompts"]) == 2 and doc["overall"]["positions"] == sum(p["positions"] for p in doc["prompts"])
    assert doc["prompts"][0]["positions"] == 20  # cut at --max-tokens


def test_bad_prompts_file_is_one_line_error(tiny_models, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n---\n")
    rc = main(["quality", "-m", str(tiny_models("q8")), "--ref", str(tiny_models("q8")),
               "--prompts", str(tmp_path / "empty.txt")])
    assert rc != 0 and "no prompts" in capsys.readouterr().err
