"""``magnetar generate`` through the real CLI on a tiny model."""

from __future__ import annotations

import json

import numpy as np

from magnetar.cli import main
from magnetar.runtime.engine import Engine


def _generate(capsys, model, *extra) -> tuple[int, str, str]:
    code = main(["generate", "-m", str(model), "-p", "Name three prime numbers.", "--nothink", "-n", "6", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_greedy_generation_is_deterministic_and_dumps_logprobs(tiny_models, v4_tokenizer, capsys, tmp_path):
    model = tiny_models("q2")
    dump = tmp_path / "lp.json"
    code, first, err = _generate(capsys, model, "--temp", "0", "--dump-logprobs", str(dump), "--logprobs-top-k", "4")
    assert code == 0 and "tok/s" in err
    assert _generate(capsys, model, "--temp", "0")[1] == first
    steps = json.loads(dump.read_text())["steps"]
    assert len(steps) == 6
    for step in steps:  # greedy: the chosen token is the most likely one; its text is its own bytes
        assert len(step["top"]) == 4 and step["top"][0]["token"] == step["token"]
        assert step["logprob"] == step["top"][0]["logprob"] <= 0
        assert step["text"] == v4_tokenizer.decode([step["token"]])
    # The printed answer is the steps' tokens decoded together (a character may span two
    # tokens, or be cut by -n: then it prints as U+FFFD, as the dump's last step does).
    assert first.rstrip("\n") == v4_tokenizer.decode([s["token"] for s in steps])


def test_logprobs_match_the_engine(tiny_models, capsys, tmp_path):
    model = tiny_models("q2")
    dump = tmp_path / "lp.json"
    _generate(capsys, model, "--temp", "0", "--dump-logprobs", str(dump))
    data = json.loads(dump.read_text())
    ids = data["prompt_tokens"] + [s["token"] for s in data["steps"]]
    logits = Engine.load(model).logits(ids)[len(data["prompt_tokens"]) - 1:-1]
    shifted = logits - logits.max(-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    chosen = logprobs[np.arange(len(data["steps"])), [s["token"] for s in data["steps"]]]
    assert np.allclose(chosen, [s["logprob"] for s in data["steps"]], atol=1e-3)


def test_seeded_sampling_repeats(tiny_models, capsys):
    model = tiny_models("q2")
    a = _generate(capsys, model, "--seed", "5", "--min-p", "0")[1]
    assert _generate(capsys, model, "--seed", "5", "--min-p", "0")[1] == a


def test_bad_arguments_are_one_line_errors(tiny_models, capsys, tmp_path):
    code, _, err = _generate(capsys, tiny_models("q2"), "--logprobs-top-k", "3")
    assert code == 2 and err.count("\n") == 1 and "--dump-logprobs" in err
    code, _, err = _generate(capsys, tmp_path / "missing.gguf")
    assert code == 2 and err.startswith("magnetar: error: no such model file")
    code, _, err = _generate(capsys, tiny_models("q2"), "--top-p", "1.5")
    lines = [ln for ln in err.splitlines() if not ln.startswith("magnetar: compiling MLX")]  # first run here
    assert code == 2 and len(lines) == 1


def test_bench_writes_one_row_per_rep(tiny_models, capsys, tmp_path):
    csv_path = tmp_path / "bench.csv"
    code = main(["bench", "decode", "-m", str(tiny_models("q8")), "--tokens", "3", "--reps", "2",
                 "--prompt-tokens", "20", "--csv", str(csv_path)])
    assert code == 0 and "ms/token" in capsys.readouterr().out
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith("peer,mode,rep") and len(rows) == 3
    assert all(r.startswith("magnetar,decode,") and float(r.split(",")[-1]) > 0 for r in rows[1:])  # host ms
