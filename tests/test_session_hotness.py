"""A streaming engine's checkpoint keeps its route hotness, and a restore warms the expert
cache with it before the first token: the first tokens after a resume hit more often than
after a cold start from the same state without the table, with the same bits. Checkpoints
without the table (resident engines, older files) restore as before."""

from __future__ import annotations

import numpy as np
import pytest

from magnetar.kernels import native
from magnetar.runtime import checkpoint as ckpt
from magnetar.runtime.engine import Engine
from magnetar.runtime.expert_cache import routed_tensors
from magnetar.runtime.gguf_read import open_model
from test_checkpoint_forgery import forge

pytestmark = pytest.mark.skipif(not native.available(), reason="streaming needs the native CPU kernels")

PROMPT = [0] + [(7919 * i) % 120000 + 2 for i in range(1, 48)]
SLOTS = 4  # per layer: half of tiny's 8 experts (it routes to 3)
FIRST = 4  # decoded tokens whose hit rate is compared


def _greedy(engine: Engine, n: int) -> list[int]:
    return [ev.token for ev in engine.generate(max_tokens=n, temperature=0, ignore_eos=True)]


def _streaming(path) -> Engine:
    """A fresh streaming engine (built directly: Engine.load may run a scratch step to compile)."""
    slot = sum(i.nbytes // i.shape[2] for i in routed_tensors(open_model(path), [0])[0])
    return Engine(open_model(path), 256, expert_cache=SLOTS * open_model(path).config.n_layer * slot)


@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory):
    """The same sequence checkpointed by a streaming engine (with hotness) and a resident one (without)."""
    path, root = tiny_models("q2"), tmp_path_factory.mktemp("hotness")
    sessions = []
    for engine, name in ((_streaming(path), "streamed.ckpt"), (Engine(open_model(path), 256), "resident.ckpt")):
        engine.prefill(PROMPT)
        tokens = _greedy(engine, 8)
        engine.checkpoint(root / name)
        sessions.append(tokens)
    assert sessions[0] == sessions[1]
    return path, root / "streamed.ckpt", root / "resident.ckpt"


def _resume(engine: Engine, checkpoint) -> tuple[float, list[int], np.ndarray]:
    """Restore, then decode: the hit rate of the first FIRST tokens, the tokens and the last logits."""
    engine.restore(checkpoint)
    stats = engine.stats.streaming
    uses, hits = stats.uses, stats.hits
    tokens = _greedy(engine, FIRST)
    rate = (stats.hits - hits) / (stats.uses - uses)
    return rate, tokens, engine.next_logits()


def test_resume_warms_the_cache_with_the_sessions_hotness(saved):
    path, streamed, resident = saved
    meta = ckpt.read_meta(streamed)
    assert sorted(map(int, meta["expert_hotness"])) == list(range(open_model(path).config.n_layer))
    assert "expert_hotness" not in ckpt.read_meta(resident)
    warm_engine, cold_engine = _streaming(path), _streaming(path)
    warm = _resume(warm_engine, streamed)
    cold = _resume(cold_engine, resident)
    assert warm[0] > cold[0], (warm[0], cold[0])
    assert warm[1] == cold[1] and np.array_equal(warm[2], cold[2])  # the cache changes no bit
    reference = Engine(open_model(path), 256)  # and neither does streaming at all
    reference.restore(resident)
    assert _greedy(reference, FIRST) == warm[1] and np.array_equal(reference.next_logits(), warm[2])


def test_restore_reads_the_hottest_experts_before_the_first_token(saved):
    path, streamed, _ = saved
    engine = _streaming(path)
    engine.restore(streamed)
    table = ckpt.read(streamed, engine.config, engine.identity, engine.ctx).hotness
    for il, bank in engine.model.experts.banks.items():
        resident = np.flatnonzero(bank.slot_of >= 0)
        assert len(resident) == SLOTS
        assert table[il][resident].min() >= np.delete(table[il], resident).max()
        assert np.array_equal(bank.hot, table[il])


def test_a_streamed_sessions_checkpoint_restores_in_a_resident_engine(saved):
    path, streamed, resident = saved
    a, b = Engine(open_model(path), 256), Engine(open_model(path), 256)
    a.restore(streamed)
    b.restore(resident)
    assert _greedy(a, 3) == _greedy(b, 3) and np.array_equal(a.next_logits(), b.next_logits())


@pytest.fixture(scope="module")
def untouched(saved) -> Engine:
    return _streaming(saved[0])


@pytest.mark.parametrize("table", [[1, 2], {"9": []}, {"x": []}, {"0": [[8, 1.0]]}, {"0": [[1, -1.0]]},
                                   {"0": [[1, float("nan")]]}, {"0": [[1, "2"]]}, {"0": [[True, 1.0]]},
                                   {"0": [[1]]}, {"0": {"1": 2.0}}])
def test_forged_hotness_is_refused_in_one_line(saved, untouched, tmp_path, table):
    _, streamed, _ = saved
    forged = tmp_path / "forged.ckpt"
    forged.write_bytes(streamed.read_bytes())
    forge(forged, change_meta=lambda meta: meta.update(expert_hotness=table))
    engine = untouched
    with pytest.raises(ckpt.CheckpointError, match="damaged checkpoint header \\(expert_hotness"):
        engine.restore(forged)
    assert engine.tokens == [] and engine.stats.streaming.experts_read == 0
