"""The prefix cache: a new request that shares a cached prefix restores it and
prefills only the rest, with the same logits as a full prefill; saves land on
chunk boundaries; damaged entries are dropped; the byte budget holds."""

from __future__ import annotations

import numpy as np
import pytest

from magnetar.runtime.engine import Engine
from magnetar.runtime.kvcache import PrefixCache

CHUNK = 64


def _ids(n: int, seed: int = 0) -> list[int]:
    return [0] + np.random.default_rng(seed).integers(2, 129280, n - 1).tolist()


@pytest.fixture
def engine(tiny_models):
    return Engine.load(tiny_models("q8"), ctx=1024, prefill_chunk=CHUNK)


def _cache(tmp_path, **kw) -> PrefixCache:
    return PrefixCache(tmp_path / "kv", **{"min_tokens": 100, "trim": 8, **kw})


def test_a_shared_prefix_is_restored_and_only_the_rest_prefilled(tiny_models, engine, tmp_path):
    cache = _cache(tmp_path)
    system = _ids(200)  # the shared part: a system prompt and tool schemas
    first = system + _ids(50, seed=1)[1:]
    assert cache.sync(engine, first) == 0
    [entry] = cache.entries(engine)
    assert entry.n_tokens == (len(first) - 8) // CHUNK * CHUNK == 192  # trimmed, chunk-aligned

    fresh = Engine.load(tiny_models("q8"), ctx=1024, prefill_chunk=CHUNK)
    second = system + _ids(70, seed=2)[1:]
    assert cache.sync(fresh, second) == 192
    assert fresh.stats.cache_hits == 1 and fresh.stats.prefill_tokens == len(second) - 192
    uncached = Engine.load(tiny_models("q8"), ctx=1024, prefill_chunk=CHUNK)
    uncached.prefill(second)
    # The restored prefix ends on a chunk boundary: the same chunks ran, bit for bit.
    assert np.array_equal(fresh.next_logits(), uncached.next_logits())
    assert fresh.tokens == second


def test_a_continuation_of_the_live_sequence_prefills_only_the_new_tokens(engine, tmp_path):
    cache = _cache(tmp_path)
    ids = _ids(150)
    cache.sync(engine, ids)
    before = engine.stats.prefill_tokens
    assert cache.sync(engine, ids + [5, 6, 7]) == 150
    assert engine.stats.prefill_tokens - before == 3


def test_an_unrelated_request_evicts_the_live_sequence_to_disk(engine, tmp_path):
    cache = _cache(tmp_path, min_tokens=100)
    a, b = _ids(150, seed=4), _ids(30, seed=5)
    cache.sync(engine, a)  # saved cold at 128 (142 rounded down to the chunk)
    cache.sync(engine, b)  # replaces a: a's whole live sequence is saved first
    assert sorted(e.n_tokens for e in cache.entries(engine)) == [128, 150]
    assert engine.tokens == b


def test_a_damaged_entry_is_dropped_and_the_request_still_runs(tiny_models, engine, tmp_path):
    cache = _cache(tmp_path)
    ids = _ids(200)
    cache.sync(engine, ids)
    [entry] = cache.entries(engine)
    data = bytearray(entry.path.read_bytes())
    data[4000] ^= 0xFF
    entry.path.write_bytes(bytes(data))
    fresh = Engine.load(tiny_models("q8"), ctx=1024, prefill_chunk=CHUNK)
    cache.sync(fresh, ids + [9])
    assert fresh.stats.cache_hits == 0 and fresh.stats.prefill_tokens == len(ids) + 1
    plain = Engine.load(tiny_models("q8"), ctx=1024, prefill_chunk=CHUNK)
    plain.prefill(ids + [9])
    assert np.array_equal(fresh.next_logits(), plain.next_logits())
    assert [e.path for e in cache.entries(fresh)] == [entry.path]  # dropped, then saved again clean


def test_least_recently_used_entries_go_past_the_budget(engine, tmp_path):
    cache = _cache(tmp_path, trim=0)
    sizes = []
    for seed in range(3):
        engine.reset()
        engine.prefill(_ids(128, seed=10 + seed))
        sizes.append(cache.save(engine, "shutdown").size)
    assert len(cache.entries(engine)) == 3
    cache.budget = sizes[0] * 2 + sizes[0] // 2  # room for two
    cache.lookup(engine, _ids(128, seed=10) + [1])  # a lookup alone does not refresh recency ...
    engine.reset()
    cache.sync(engine, _ids(128, seed=10) + [1])  # ... a hit does: seed 10 is now the newest
    cache.prune(engine)
    kept = {e.key for e in cache.entries(engine)}
    assert len(kept) == 2
    from magnetar.runtime.kvcache import prefix_key
    assert prefix_key(_ids(128, seed=10)) in kept and prefix_key(_ids(128, seed=11)) not in kept


def test_entries_of_another_model_never_match(tiny_models, engine, tmp_path):
    cache = _cache(tmp_path)
    ids = _ids(200)
    cache.sync(engine, ids)
    other = Engine.load(tiny_models("f32"), ctx=1024, prefill_chunk=CHUNK)
    assert cache.lookup(other, ids + [1]) is None
    assert cache.entries(other) == []
