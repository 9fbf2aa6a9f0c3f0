"""``magnetar profile-experts``: the hotlist holds the router's picks over the prompts
(counted again here through a streaming engine's own hotness, a different path), in
ds4's format, and ``--hotlist`` of it preloads the hottest experts."""

from __future__ import annotations

import numpy as np
import pytest

from magnetar.cli import main
from magnetar.kernels import native
from magnetar.runtime.engine import Engine
from magnetar.runtime.expert_cache import HOTLIST_HEADER, read_hotlist, routed_tensors
from magnetar.runtime.gguf_read import open_model

pytestmark = pytest.mark.skipif(not native.available(), reason="streaming needs the native CPU kernels")

PROMPTS = ["def add(a, b):\n    return a + b", "The quick brown fox jumps over the lazy dog.",
           "SELECT name FROM users WHERE id = 7;"]
MAX_TOKENS = 12


def _slot_bytes(path) -> int:
    return sum(i.nbytes // i.shape[2] for i in routed_tensors(open_model(path), [0])[0])


@pytest.fixture(scope="module")
def profiled(tiny_models, tmp_path_factory):
    path = tiny_models("q2")
    root = tmp_path_factory.mktemp("profile")
    (root / "prompts.txt").write_text("\n---\n".join(PROMPTS))
    assert main(["profile-experts", "-m", str(path), "--prompts", str(root / "prompts.txt"), "-o",
                 str(root / "hot.txt"), "--max-tokens", str(MAX_TOKENS), "--ctx", "256"]) == 0
    return path, root / "hot.txt"


def test_the_hotlist_holds_every_pick_of_the_router(profiled):
    path, hot = profiled
    cfg = open_model(path).config
    lines = hot.read_text().splitlines()
    assert lines[0] == HOTLIST_HEADER and "# columns: layer expert hits weight" in lines
    rows = [tuple(map(float, ln.split())) for ln in lines if not ln.startswith("#")]
    # Recount: a streaming engine holding every expert counts each pick in its hotness
    # (prefill never decays it), from the ids its expert step was given.
    engine = Engine(open_model(path), 256, expert_cache=cfg.n_expert * cfg.n_layer * _slot_bytes(path))
    tok = engine.tokenizer
    prompts = [([tok.bos_id] + tok.encode(t))[:MAX_TOKENS] for t in PROMPTS]
    for ids in prompts:
        engine.reset()
        engine.prefill(ids)
    recount = engine.model.experts.hotness()
    got = {il: np.zeros(cfg.n_expert) for il in range(cfg.n_layer)}
    weight = np.zeros(cfg.n_layer)
    for layer, expert, hits, w in rows:
        got[int(layer)][int(expert)] = hits
        weight[int(layer)] += w
    for il in range(cfg.n_layer):
        assert np.array_equal(got[il], recount[il]), il
    tokens = sum(len(ids) for ids in prompts)
    assert all(h.sum() == tokens * cfg.n_expert_used for h in got.values())
    if cfg.expert_weights_norm:  # each token's weights sum to the scale
        np.testing.assert_allclose(weight, tokens * cfg.expert_weights_scale, rtol=1e-4)
    keys = [(-h, -w, layer, e) for layer, e, h, w in rows]
    assert keys == sorted(keys)  # hits, then weight, descending; then layer, expert


def test_hotlist_preloads_the_hottest_experts_of_each_layer(profiled):
    path, hot = profiled
    cfg = open_model(path).config
    engine = Engine(open_model(path), 256, expert_cache=2 * cfg.n_layer * _slot_bytes(path), hotlist=hot)
    hits = {il: np.zeros(cfg.n_expert) for il in range(cfg.n_layer)}
    for layer, expert, h in read_hotlist(hot):
        hits[layer][expert] = h
    for il, bank in engine.model.experts.banks.items():
        resident = np.flatnonzero(bank.slot_of >= 0)
        assert len(resident) == 2
        cold = np.delete(hits[il], resident)
        assert hits[il][resident].min() >= cold.max() > 0  # the two most picked (any order among ties)
    assert "hotlist" in engine.expert_cache_note and f"{2 * cfg.n_layer} experts preloaded" in engine.expert_cache_note
    assert engine.stats.streaming.experts_read == 2 * cfg.n_layer


def test_bad_prompts_file_is_a_one_line_error(tiny_models, tmp_path, capsys):
    assert main(["profile-experts", "-m", str(tiny_models("q2")), "--prompts", str(tmp_path / "none.txt"),
                 "-o", str(tmp_path / "hot.txt")]) == 2
    assert capsys.readouterr().err.startswith("magnetar: error: cannot read prompts file")
    assert not (tmp_path / "hot.txt").exists()
