"""A prefill chunk's MLX temporaries are kept for reuse (kernels/base.py ``keep_temporaries``).

MLX's CPU allocator caches freed buffers only up to 32 MiB by default; a chunk's larger
temporaries were then freed to the OS after every layer and the next layer's faulted in
afresh, each page zeroed by the kernel. ``Model.prefill`` raises the cache limit to what
the chunk needs, so the next layer reuses them."""

import mlx.core as mx
import pytest

from magnetar.kernels.cpu import CpuBackend
from magnetar.runtime import Engine
from magnetar.runtime.kv_state import KVState
from magnetar.runtime.model import prefill_temporaries

MLX_CPU_DEFAULT = 32 << 20  # mlx/backend/no_gpu/allocator.cpp


@pytest.fixture
def cache_limit():
    """Restores MLX's cache limit (process-wide) after the test."""
    previous = mx.set_cache_limit(MLX_CPU_DEFAULT)
    yield
    mx.set_cache_limit(previous)
    mx.clear_cache()


def _limit() -> int:
    now = mx.set_cache_limit(1 << 62)  # raising frees nothing
    mx.set_cache_limit(now)
    return now


def test_the_limit_is_raised_never_lowered_and_capped(cache_limit):
    kernels = CpuBackend()
    kernels.keep_temporaries(100 << 20)
    assert _limit() == 100 << 20
    kernels.keep_temporaries(40 << 20)
    assert _limit() == 100 << 20
    kernels.keep_temporaries(1 << 50)
    assert _limit() == mx.get_memory_limit() // 4


def test_asking_for_less_frees_nothing_cached(cache_limit):
    kernels = CpuBackend()
    kernels.keep_temporaries(100 << 20)
    mx.eval(mx.zeros((16 << 20,)) + 1)  # two 64 MiB buffers, freed into the cache
    held = mx.get_cache_memory()
    assert held >= 64 << 20
    kernels.keep_temporaries(1 << 20)
    assert mx.get_cache_memory() == held and _limit() == 100 << 20


def test_a_chunk_keeps_every_temporary_it_frees(tiny_models, cache_limit):
    """With the limit ``Model.prefill`` sets, a 2048-token chunk leaves in MLX's cache what
    it leaves with no limit at all: no temporary went back to the OS. With MLX's default,
    as before, most did."""
    engine = Engine.load(tiny_models("q2"), ctx=4096)
    model, cfg = engine.model, engine.config
    ids = [1000 + i % 5000 for i in range(2048)]

    def cached_after_prefill() -> int:
        mx.clear_cache()
        model.prefill(ids, KVState.empty(cfg, 4096))
        return mx.get_cache_memory()

    cached_after_prefill()  # warm: one-time buffers (compiled kernels, the state) come and stay
    as_shipped = cached_after_prefill()
    assert _limit() == max(MLX_CPU_DEFAULT, prefill_temporaries(cfg, len(ids)))
    mx.set_cache_limit(1 << 40)
    unbounded = cached_after_prefill()
    assert as_shipped == unbounded > MLX_CPU_DEFAULT

    model.kernels.keep_temporaries = lambda nbytes: None  # as before: MLX's default limit
    mx.set_cache_limit(MLX_CPU_DEFAULT)
    assert cached_after_prefill() <= MLX_CPU_DEFAULT < unbounded
