"""Importance matrices: the .dat format, lookups, and collection from a model."""

from __future__ import annotations

import struct

import mlx.core as mx
import numpy as np
import pytest

from magnetar.kernels import reference
from magnetar.runtime.engine import Engine
from magnetar.runtime.lab.imatrix import Collector, Imatrix, ImatrixError, write_dat


def _parse_dat(data: bytes) -> dict[str, tuple[int, np.ndarray]]:
    """The legacy layout read field by field, independently of Imatrix.read."""
    (n,), at, out = struct.unpack_from("<i", data), 4, {}
    for _ in range(n):
        (length,) = struct.unpack_from("<i", data, at)
        name = data[at + 4:at + 4 + length].decode()
        ncall, count = struct.unpack_from("<ii", data, at + 4 + length)
        at += 12 + length
        out[name] = (ncall, np.frombuffer(data, "<f4", count, at))
        at += 4 * count
    return out


def test_dat_round_trip_and_layout(tmp_path):
    path = tmp_path / "m.dat"
    a, b = np.arange(8, dtype=np.float32), np.linspace(0, 1, 3, dtype=np.float32)
    write_dat(path, {"blk.0.ffn_up_exps.weight": (4, a * 4), "x.weight": (1, b)}, dataset="prompts.txt")
    raw = path.read_bytes()
    parsed = _parse_dat(raw)
    assert list(parsed) == ["blk.0.ffn_up_exps.weight", "x.weight"]
    assert parsed["blk.0.ffn_up_exps.weight"][0] == 4
    assert raw.endswith(b"prompts.txt")
    im = Imatrix.read(path)
    np.testing.assert_array_equal(im.values["blk.0.ffn_up_exps.weight"], a)  # divided by ncall
    np.testing.assert_array_equal(im.values["x.weight"], b)


def test_lookup_by_expert_packed_and_named(tmp_path):
    packed = np.arange(12, dtype=np.float32)  # 3 experts x 4 columns
    im = Imatrix({"t.weight": packed, "u.weight.expert.1": np.ones(4, np.float32)})
    np.testing.assert_array_equal(im.for_tensor("t.weight", 4, expert=2, n_experts=3), [8, 9, 10, 11])
    np.testing.assert_array_equal(im.for_tensor("u.weight", 4, expert=1, n_experts=3), np.ones(4))
    assert im.for_tensor("missing.weight", 4, expert=0, n_experts=3) is None
    with pytest.raises(ImatrixError, match="has 12 values, the tensor has 5 columns"):
        im.for_tensor("t.weight", 5, expert=0, n_experts=3)


def test_bad_files_are_one_line_errors(tmp_path):
    good = tmp_path / "good.dat"
    write_dat(good, {"t.weight": (1, np.ones(64, np.float32))})
    cut = tmp_path / "cut.dat"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ImatrixError, match="truncated"):
        Imatrix.read(cut)
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ImatrixError, match="not an imatrix"):
        Imatrix.read(junk)
    with pytest.raises(ImatrixError, match="cannot read"):
        Imatrix.read(tmp_path / "absent.dat")


def test_collector_statistics_match_a_direct_computation(tiny_models):
    engine = Engine.load(tiny_models("q8"), ctx=256)
    cfg = engine.config
    seen = {}
    moe = engine.model.layers[3].moe

    collector = Collector(engine)
    ids = [0] + list(range(1000, 1100))
    with collector:
        inner = moe.observer
        moe.observer = lambda xn, idx, w: (seen.update(xn=np.array(xn), idx=np.array(idx), w=np.array(w)),
                                           inner(xn, idx, w))
        engine.prefill(ids)
    stats = collector.layers[3]
    x, idx, w = seen["xn"].astype(np.float64), seen["idx"], seen["w"].astype(np.float64)
    assert stats.count.sum() == len(ids) * cfg.n_expert_used
    # Every token reaches K experts, so the per-expert sums add up to K * sum(x^2).
    np.testing.assert_allclose(stats.x2.sum(axis=0), cfg.n_expert_used * (x ** 2).sum(axis=0), rtol=1e-10)
    e = int(np.bincount(idx.ravel()).argmax())  # the busiest expert: its down-input statistic by hand
    t, slot = np.nonzero(idx == e)
    gate = reference.dequantize(np.asarray(moe.gate.data[e]), moe.gate.ggml_type).astype(np.float64)
    up = reference.dequantize(np.asarray(moe.up.data[e]), moe.up.ggml_type).astype(np.float64)
    g = np.minimum(x[t] @ gate.T, moe.limit)
    mid = g / (1 + np.exp(-g)) * np.clip(x[t] @ up.T, -moe.limit, moe.limit) * w[t, slot][:, None]
    np.testing.assert_allclose(stats.mid2[e], (mid ** 2).sum(axis=0), rtol=1e-9)
    # Hooks are removed afterwards: plain prefill no longer feeds the collector.
    assert all(layer.moe.observer is None for layer in engine.model.layers)


def test_collected_file_has_every_expert_tensor(tiny_models, tmp_path):
    engine = Engine.load(tiny_models("q8"), ctx=256)
    cfg = engine.config
    collector = Collector(engine)
    collector.run(engine, [[0] + list(range(500, 560)), [0] + list(range(9000, 9040))])
    path = tmp_path / "tiny.dat"
    write_dat(path, collector.entries(), dataset="two prompts")
    im = Imatrix.read(path)
    assert len(im.values) == 3 * cfg.n_layer
    for il in range(cfg.n_layer):
        for tensor, cols in (("ffn_gate_exps", cfg.d_model), ("ffn_down_exps", cfg.expert_ffn)):
            v = im.for_tensor(f"blk.{il}.{tensor}.weight", cols, expert=0, n_experts=cfg.n_expert)
            assert v.shape == (cols,) and (v >= 0).all()
        np.testing.assert_array_equal(im.values[f"blk.{il}.ffn_gate_exps.weight"],
                                      im.values[f"blk.{il}.ffn_up_exps.weight"])
    # Per-expert means: an expert's gate importance averages ~1 per column (RMS-normed input, unit gain).
    means = im.values["blk.3.ffn_gate_exps.weight"].reshape(cfg.n_expert, cfg.d_model).mean(axis=1)
    assert np.all((means == 0) | ((means > 0.3) & (means < 3)))
    assert engine.tokens == []  # collection leaves the engine empty
    mx.clear_cache()


def test_imatrix_command_end_to_end(tiny_models, tmp_path):
    from magnetar.cli import main

    prompts = tmp_path / "calib.txt"
    prompts.write_text("def add(a, b):\n    return a + b\n---\nThe cache holds the keys.\n---\n\n")
    out = tmp_path / "tiny.dat"
    assert main(["imatrix", "-m", str(tiny_models("q8")), "--prompts", str(prompts), "-o", str(out)]) == 0
    im = Imatrix.read(out)
    assert len(im.values) == 15 and out.read_bytes().endswith(b"calib.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    assert main(["imatrix", "-m", str(tiny_models("q8")), "--prompts", str(bad), "-o", str(out)]) != 0


def test_prompt_files(tmp_path):
    from magnetar.runtime.errors import UsageError
    from magnetar.runtime.lab.prompt_file import read_prompts

    text = tmp_path / "p.txt"
    text.write_text("one\nline two\n---\n\n---\nthree\n")
    assert read_prompts(text) == ["one\nline two", "three"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"text": "a"}\n\n{"text": "b\\nc"}\n')
    assert read_prompts(jl) == ["a", "b\nc"]
    jl.write_text('{"text": "a"}\n[1]\n')
    with pytest.raises(UsageError, match=r"p.jsonl:2"):
        read_prompts(jl)
    (tmp_path / "empty.txt").write_text("---\n")
    with pytest.raises(UsageError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
