"""A prefill chunk's MLX temporaries are kept for reuse while it runs (kernels/base.py
``temporaries_kept``).

MLX's CPU allocator caches freed buffers only up to 32 MiB by default; a chunk's larger
temporaries were then freed to the OS after every layer and the next layer's faulted in
afresh, each page zeroed by the kernel. ``Model.prefill`` raises the cache limit to what
the chunk needs while its layers run, then puts the old limit back."""

import contextlib

import mlx.core as mx
import pytest

from magnetar.kernels.cpu import CpuBackend
from magnetar.runtime import Engine
from magnetar.runtime.kv_state import KVState
from magnetar.runtime.model import prefill_temporaries

MLX_CPU_DEFAULT = 32 << 20  # mlx/backend/no_gpu/allocator.cpp


@pytest.fixture
def cache_limit():
    """Starts from MLX's CPU default; restores the process-wide limit after the test."""
    previous = mx.set_cache_limit(MLX_CPU_DEFAULT)
    yield
    mx.set_cache_limit(previous)
    mx.clear_cache()


def _limit() -> int:
    now = mx.set_cache_limit(1 << 62)  # raising frees nothing
    mx.set_cache_limit(now)
    return now


def test_the_limit_is_raised_inside_never_lowered_capped_and_restored(cache_limit):
    kernels = CpuBackend()
    with kernels.temporaries_kept(100 << 20):
        assert _limit() == 100 << 20
        mx.eval(mx.zeros((16 << 20,)) + 1)  # two 64 MiB temporaries: the first is kept
        held = mx.get_cache_memory()
        assert held >= 64 << 20
        with kernels.temporaries_kept(1 << 20):  # asking for less lowers nothing, frees nothing
            assert _limit() == 100 << 20 and mx.get_cache_memory() == held
        with kernels.temporaries_kept(1 << 50):
            assert _limit() == mx.get_memory_limit() // 4
        assert _limit() == 100 << 20
    assert _limit() == MLX_CPU_DEFAULT and mx.get_cache_memory() <= MLX_CPU_DEFAULT


def test_a_chunk_keeps_every_temporary_it_frees_until_it_ends(tiny_models, cache_limit):
    """With the limit ``Model.prefill`` sets, a 2048-token chunk's last layer finds in MLX's
    cache what it finds with no limit at all (65 MB): no temporary went back to the OS. With
    MLX's default, as before, most did. After the chunk the default is back."""
    engine = Engine.load(tiny_models("q2"), ctx=4096)
    model, cfg = engine.model, engine.config
    ids = [1000 + i % 5000 for i in range(2048)]
    last = model.span[-1]

    def cached_at_the_last_layer() -> tuple[int, int]:
        seen = {}

        def look(il):
            if il == last:
                seen["cache"], seen["limit"] = mx.get_cache_memory(), _limit()

        mx.clear_cache()
        model.prefill(ids, KVState.empty(cfg, 4096), on_layer=look)
        return seen["cache"], seen["limit"]

    cached_at_the_last_layer()  # warm: one-time buffers (compiled kernels, the state) come and stay
    as_shipped, limit = cached_at_the_last_layer()
    assert limit == prefill_temporaries(cfg, len(ids)) > MLX_CPU_DEFAULT
    assert _limit() == MLX_CPU_DEFAULT and mx.get_cache_memory() <= MLX_CPU_DEFAULT

    mx.set_cache_limit(1 << 40)
    unbounded, _ = cached_at_the_last_layer()
    assert unbounded > MLX_CPU_DEFAULT
    assert abs(as_shipped - unbounded) <= 4 << 20  # a small buffer or two come back a moment sooner or later

    mx.set_cache_limit(MLX_CPU_DEFAULT)
    model.kernels.temporaries_kept = lambda nbytes: contextlib.nullcontext()  # as before: the default
    assert cached_at_the_last_layer()[0] <= MLX_CPU_DEFAULT < unbounded
