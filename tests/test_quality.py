"""``magnetar quality``: the metrics on hand-built logits, prompt files, and the
command on real tiny model files (same seed, so q8 and f32 encode the same weights)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest

from magnetar.cli import main
from magnetar.runtime.lab import quality
from magnetar.runtime.errors import UsageError
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.lab.prompt_file import read_prompts

FIB = "def fibonacci(n):\n    if n < 2:\n        return n\n\n    return fibonacci(n - 1) + fibonacci(n - 2)"
FOX = "The quick brown fox jumps over the lazy dog while the cache warms up."
PROMPTS_FILE = f"{FIB}\n---\n{FOX}\n"


# -- metrics -------------------------------------------------------------------------------


def _direct(ref: np.ndarray, quant: np.ndarray, ids: list[int], k: int) -> dict[str, np.ndarray]:
    """The metrics the slow, obvious way: softmax, sum, full sort, Python sets."""
    p = np.exp(ref - ref.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(quant - quant.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    top = lambda row: set(np.argsort(-row, kind="stable")[:k].tolist())  # noqa: E731
    return {"kl": (p * np.log(p / q)).sum(1), "top1": p.argmax(1) == q.argmax(1),
            "overlap": np.array([len(top(a) & top(b)) / k for a, b in zip(p, q)]),
            "nll_ref": -np.log(p[np.arange(len(ids) - 1), ids[1:]]),
            "nll_quant": -np.log(q[np.arange(len(ids) - 1), ids[1:]])}


def test_metrics_match_a_direct_computation():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((11, 40)) * 3  # continuous values: no ties in the top-k sets
    quant = ref + rng.standard_normal((11, 40))
    ids = rng.integers(0, 40, 11).tolist()
    want = _direct(ref, quant, ids, k=5)
    for rows in (3, 11, 64):  # chunked like V4-sized rows would be, and in one go
        got = quality.compare(ref.astype(np.float32), quant.astype(np.float32), ids, k=5, rows=rows)
        for name, value in want.items():
            np.testing.assert_allclose(getattr(got, name), value, rtol=1e-5, atol=1e-9, err_msg=name)
    assert 0 < got.top1.mean() < 1 and 0 < got.overlap.mean() < 1  # the case tests both outcomes


def test_kl_in_closed_form():
    # Two tokens with logits (0, a) and (0, b): Bernoulli(sigmoid a) vs Bernoulli(sigmoid b).
    a, b = 1.5, -0.5
    p, q = 1 / (1 + np.exp(-a)), 1 / (1 + np.exp(-b))
    s = quality.compare(np.array([[0.0, a]]), np.array([[0.0, b]]), [0], k=1)
    assert s.kl[0] == pytest.approx(p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q)), rel=1e-12)
    assert not s.top1[0] and s.overlap[0] == 0 and len(s.nll_ref) == 0
    # Against a uniform distribution over V tokens: KL(p || u) = log V - H(p).
    logits = np.array([[2.0, 1.0, 0.0, -1.0, -3.0]])
    pr = np.exp(logits[0]) / np.exp(logits[0]).sum()
    s = quality.compare(logits, np.zeros_like(logits), [0], k=2)
    assert s.kl[0] == pytest.approx(np.log(5) + np.sum(pr * np.log(pr)), rel=1e-12)
    # A constant shift of every logit is the same distribution: KL 0, full agreement.
    s = quality.compare(logits, logits + 7.0, [0], k=3)
    assert s.kl[0] < 1e-15 and s.top1[0] and s.overlap[0] == 1


def test_top_k_overlap_and_next_token_losses_by_hand():
    p, q = np.array([0.5, 0.3, 0.15, 0.05]), np.array([0.1, 0.5, 0.3, 0.1])
    s = quality.compare(np.log([p, p]), np.log([q, q]), [3, 2], k=2)
    np.testing.assert_allclose(s.overlap, 0.5)  # {0, 1} vs {1, 2}
    assert not s.top1.any()
    np.testing.assert_allclose(s.nll_ref, [-np.log(0.15)])  # row 0 predicts ids[1] = 2
    np.testing.assert_allclose(s.nll_quant, [-np.log(0.3)])
    assert quality.compare(np.log([p]), np.log([q]), [0], k=4).overlap[0] == 1  # k = vocab


def test_summary_numbers():
    kl = np.array([0.0, 0.1, 0.2, 0.3, 1.4])
    s = quality.PositionStats(kl, np.array([1, 1, 1, 0, 1], bool), np.full(5, 0.8),
                              np.log([2.0, 2.0, 2.0, 2.0]), np.log([3.0, 3.0, 3.0, 3.0]))
    out = quality.summarize(s)
    assert (out.positions, out.next_tokens) == (5, 4)
    assert out.kl_mean == pytest.approx(0.4) and out.kl_median == pytest.approx(0.2) and out.kl_max == 1.4
    assert out.kl_p99 == pytest.approx(0.3 + 0.96 * 1.1)  # linear interpolation between the top two
    assert out.top1_agreement == 0.8 and out.topk_overlap == pytest.approx(0.8)
    assert (out.ppl_ref, out.ppl_quant, out.ppl_ratio) == pytest.approx((2.0, 3.0, 1.5))


def test_identical_logits_summarize_to_exact_agreement():
    logits = np.random.default_rng(0).standard_normal((70, 500)).astype(np.float32)
    s = quality.summarize(quality.compare(logits, logits.copy(), list(range(70)), k=10))
    assert s.kl_max == 0 and s.top1_agreement == 1 and s.topk_overlap == 1 and s.ppl_ratio == 1


# -- prompt files --------------------------------------------------------------------------


def test_plain_text_prompts_keep_code_intact(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text(f"\n{FIB}\n\n---\n  ---  \n---\n\n  indented\n\nsecond para\n---")
    assert read_prompts(path) == [FIB, "  indented\n\nsecond para"]  # edges trimmed, inside kept
    path.write_bytes(b"\xef\xbb\xbfone\r\n---\r\ntwo\r\n")  # BOM and CRLF from a Windows editor
    assert read_prompts(path) == ["one", "two"]


def test_jsonl_prompts(tmp_path):
    path = tmp_path / "p.JSONL"
    path.write_text('{"text": "a", "id": 7}\n\n{"text": "b\\nc"}\n{"text": "  "}\n')
    assert read_prompts(path) == ["a", "b\nc"]


@pytest.mark.parametrize("name,body,match", [
    ("p.jsonl", '{"text": "a"}\n{"text": "b"\n', r"p\.jsonl:2: invalid JSON"),
    ("p.jsonl", '{"text": "a"}\n\n[1, 2]\n', r"p\.jsonl:3: expected a JSON object"),
    ("p.jsonl", '{"prompt": "a"}\n', r"p\.jsonl:1: expected a JSON object with a \"text\""),
    ("p.jsonl", '{"text": 5}\n', r"p\.jsonl:1: \"text\" must be a string"),
    ("p.txt", b"ok\n---\nbad \xff byte\n", r"p\.txt:3: not UTF-8"),
    ("p.txt", "\n---\n   \n---\n", r"p\.txt holds no prompts"),
    ("p.txt", "", r"p\.txt holds no prompts"),
])
def test_bad_prompt_files_name_the_file_and_line(tmp_path, name, body, match):
    path = tmp_path / name
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    with pytest.raises(UsageError, match=match) as err:
        read_prompts(path)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="cannot read prompts file .*missing"):
        read_prompts(tmp_path / "missing.txt")


# -- real models ---------------------------------------------------------------------------


def test_a_model_against_itself_is_exact(tiny_models):
    report = quality.run(tiny_models("q8"), tiny_models("q8"), [FIB, FOX], max_tokens=24)
    o = report.overall
    assert o.kl_max < 1e-12 and o.top1_agreement == 1 and o.topk_overlap == 1
    assert o.ppl_ratio == pytest.approx(1, abs=1e-12) and o.positions == 24 + 17
    assert [p.truncated for p in report.prompts] == [True, False]


def test_command_on_q8_against_f32(tiny_models, tmp_path, capsys):
    """End to end, and the numbers: same seed, so q8 only rounds the f32 weights and the
    distributions move a little. (Measured on these prompts: KL mean 0.0033, top-1 93%,
    top-5 0.91, ppl ratio 1.013.)"""
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out" / "q.json"
    prompts.write_text(PROMPTS_FILE)
    rc = main(["quality", "-m", str(tiny_models("q8")), "--ref", str(tiny_models("f32")), "--prompts", str(prompts),
               "--json", str(out), "--max-tokens", "24", "--top-k", "5"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    table = captured.out
    assert "tiny-q8.gguf (q8) against" in table and "KL mean" in table and "top-5" in table
    assert "\n  all " in table and "1 of 2 prompts were cut at --max-tokens 24" in table

    doc = json.loads(out.read_text())
    assert doc["top_k"] == 5 and doc["prompts_file"] == str(prompts)
    assert (doc["quant_recipe"], doc["ref_recipe"]) == ("q8", "f32")
    assert [p["positions"] for p in doc["prompts"]] == [24, 17]  # the first is cut at --max-tokens
    assert [p["truncated"] for p in doc["prompts"]] == [True, False]
    assert doc["prompts"][0]["preview"].startswith("def fibonacci")
    o = doc["overall"]
    assert o["positions"] == 41 and o["next_tokens"] == 39
    assert 1e-5 < o["kl_mean"] < 0.02 and o["kl_median"] <= o["kl_p99"] <= o["kl_max"] < 0.3, o
    assert o["top1_agreement"] > 0.75 and o["topk_overlap"] > 0.75 and abs(o["ppl_ratio"] - 1) < 0.05, o


def test_command_errors_are_one_line(tiny_models, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text(FOX)
    q8 = str(tiny_models("q8"))
    for extra, expect in [(["--top-k", "0"], "--top-k"), (["--max-tokens", "1"], "--max-tokens"),
                          (["--max-tokens", "64", "--ctx", "32"], "--ctx"),
                          (["--ref", str(tmp_path / "none.gguf")], "no such model file")]:
        args = ["quality", "-m", q8, "--ref", q8, "--prompts", str(prompts), *extra]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("magnetar: error:") and err.count("\n") == 1 and expect in err, err
    assert main(["quality", "-m", q8, "--ref", q8, "--prompts", str(tmp_path / "nope.txt")]) == 2
    assert "cannot read prompts file" in capsys.readouterr().err


def test_models_with_another_architecture_are_refused(tiny_models, tmp_path, capsys, monkeypatch):
    from magnetar.runtime.lab import make_model as mm

    monkeypatch.setitem(mm.PRESETS, "tiny-3", lambda: mm.PRESETS["tiny"]().model_copy(
        update={"n_layer": 3, "compress_ratios": [0, 0, 4], "swiglu_clamp": [10.0] * 3}))
    other = mm.make_model("tiny-3", "f32", 0, tmp_path / "tiny3.gguf")
    prompts = tmp_path / "p.txt"
    prompts.write_text(FOX)
    assert main(["quality", "-m", str(other), "--ref", str(tiny_models("f32")), "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert "different architectures" in err and "n_layer 5 vs 3" in err and err.count("\n") == 1


def test_models_with_another_tokenizer_are_refused(tiny_models):
    ref = open_model(tiny_models("f32"))
    meta = copy.copy(ref.meta)
    tokens = list(meta["tokenizer.ggml.tokens"])
    tokens[1000] += "x"
    meta["tokenizer.ggml.tokens"] = tokens
    other = SimpleNamespace(meta=meta, config=ref.config)
    with pytest.raises(quality.QualityError, match="different tokenizers \\(tokens differ at entry 1000\\)"):
        quality.check_compatible(ref, other)
    meta["tokenizer.ggml.tokens"] = tokens[:-1]
    with pytest.raises(quality.QualityError, match="tokens: 129280 vs 129279 entries"):
        quality.check_compatible(ref, other)
    quality.check_compatible(ref, open_model(tiny_models("q8")))  # another encoding of the same model is fine


class _FakeEngine:
    """Stands in for Engine: logits from a fixed generator, and a log of loads and frees."""

    events: list[tuple[str, str]] = []

    def __init__(self, path, nan_at: int | None = None):
        self.name, self.nan_at = "ref" if "f32" in str(path) else "quant", nan_at
        self.events.append(("load", self.name))

    def logits(self, ids):
        out = np.random.default_rng(len(ids)).standard_normal((len(ids), 129280)).astype(np.float32)
        if self.name == "quant":
            out += np.float32(0.01) * np.random.default_rng(7).standard_normal(out.shape, np.float32)
            if self.nan_at is not None:
                out[self.nan_at, 5] = np.nan
        return out

    def __del__(self):
        self.events.append(("free", self.name))


def test_reference_is_freed_before_the_quantized_model_loads(tiny_models, monkeypatch):
    _FakeEngine.events = []
    monkeypatch.setattr(quality.Engine, "load", lambda path, **kw: _FakeEngine(path))
    seen = []
    report = quality.run(tiny_models("q8"), tiny_models("f32"), [FIB, FOX], max_tokens=24,
                         progress=lambda done, total: seen.append((done, total)))
    assert _FakeEngine.events == [("load", "ref"), ("free", "ref"), ("load", "quant"), ("free", "quant")]
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert 0 < report.overall.kl_mean < 1e-3 and report.overall.positions == 41

    monkeypatch.setattr(quality.Engine, "load", lambda path, **kw: _FakeEngine(path, nan_at=3))
    with pytest.raises(quality.QualityError, match=r"the quantized model .*tiny-q8.gguf gave NaN/inf logits "
                                                   r"in prompt 1 at token 3"):
        quality.run(tiny_models("q8"), tiny_models("f32"), [FIB, FOX], max_tokens=24)


def test_not_enough_room_for_the_reference_logits_is_refused(tiny_models, monkeypatch):
    monkeypatch.setattr(quality.shutil, "disk_usage", lambda p: SimpleNamespace(free=10 << 20))
    monkeypatch.setattr(quality.Engine, "load", lambda *a, **kw: pytest.fail("loaded a model"))
    with pytest.raises(quality.QualityError, match=r"need 21\.2 MB of temporary space in .*10\.5 MB free"):
        quality.run(tiny_models("q8"), tiny_models("f32"), [FIB, FOX], max_tokens=24)
