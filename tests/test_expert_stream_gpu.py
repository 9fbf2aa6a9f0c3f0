"""SSD expert streaming on the GPU backends (runtime/expert_cache.py, ``device_banks``):
the real ``MetalBackend`` and ``CudaBackend`` with every kernel launch run by the
emulators in tests/metal_emulator and tests/cuda_emulator (the kernel sources compiled
with g++, one fiber per GPU thread), a whole ``tiny`` model streamed against the same
backend with every expert resident.

The emulator evaluates a launch's inputs on the host, so it cannot sit inside
``mx.compile``: the backends run here with ``traceable`` off and ``host_moe`` on (their
expert step does run on the host here), the schedule a streamed step uses anyway.

Slow: every kernel instance is compiled with g++ once (cached in pytest's cache
directory), and an emulated token takes about 2 s.
"""

from __future__ import annotations

import mmap
from contextlib import contextmanager

import numpy as np
import pytest

from cuda_emulator import emulator as cuda_emulator
from gpu_emulator.harness import NEEDS_EMULATOR, emulator_build_dir
from greedy_run import greedy_run
from magnetar.runtime import expert_cache
from magnetar.runtime.engine import Engine
from magnetar.runtime.expert_cache import routed_tensors
from magnetar.runtime.gguf_read import open_model
from metal_emulator import emulator as metal_emulator

pytestmark = [pytest.mark.slow, *NEEDS_EMULATOR]

PLATFORMS = {"metal": metal_emulator, "cuda": cuda_emulator}


@pytest.fixture(scope="session")
def build_dir(request, tmp_path_factory):
    return emulator_build_dir(request, tmp_path_factory, "gpu_stream_emulator")


@contextmanager
def emulated(platform: str, build_dir):
    module = PLATFORMS[platform]
    with module.emulated_backend(module.Emulator(build_dir)) as kernels:
        kernels.traceable, kernels.host_moe = False, True
        yield kernels


def _slot_bytes(path) -> int:
    return sum(i.nbytes // i.shape[2] for i in routed_tensors(open_model(path), [0])[0])


@pytest.mark.parametrize("platform", PLATFORMS)
def test_streamed_decode_equals_resident_bit_for_bit(tiny_models, build_dir, platform):
    """One-token prompt, then decode: every step is one kernel call over slot rows, so the
    bits are the resident ones, at the fewest slots a GPU layer takes (K = 3 of tiny's 8;
    a budget of one byte is raised to it) and with every expert cached. Afterwards each
    valid device slot holds its expert's raw bytes as in the file, and the whole pages of
    the host slots that landed the reads read as zeros again (given back to the OS): the
    banks take RAM once."""
    path = tiny_models("q2")
    mf = open_model(path)
    with emulated(platform, build_dir) as kernels:
        want_tokens, want_logits = greedy_run(Engine(mf, 64, kernels=kernels), [1000], 4)
        for budget, slots in ((1, 3), (8 * mf.config.n_layer * _slot_bytes(path), 8)):
            engine = Engine(mf, 64, kernels=kernels, expert_cache=budget)
            cache = engine.model.experts
            assert cache.device and all(b.n_slots == slots for b in cache.banks.values())
            tokens, logits = greedy_run(engine, [1000], 4)
            assert tokens == want_tokens
            assert all(np.array_equal(a, b) for a, b in zip(logits, want_logits))
            assert cache.stats.experts_read > 0 and cache.stats.uses > cache.stats.experts_read  # misses and hits
            cache.drain()
            for bank in cache.banks.values():
                for expert in np.flatnonzero(bank.slot_of >= 0):
                    slot = int(bank.slot_of[expert])
                    for device, host, name in zip(bank.on_device, bank.banks, expert_cache.ROUTED):
                        stored = mf.raw(f"blk.{bank.layer}.{name}.weight").reshape(len(bank.hot), -1)[expert]
                        assert np.array_equal(np.asarray(device[slot]).reshape(-1), stored)
                        inner = _whole_pages(host, slot)
                        assert inner.stop > inner.start and not host[slot].reshape(-1)[inner].any()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_streamed_prefill_in_rounds_and_whole_layers_matches_resident(tiny_models, build_dir, platform, monkeypatch):
    """A 12-token prompt picks more experts than 3 slots hold: the chunk runs in rounds whose
    sums add up (the resident GPU prefill also adds pairs in no fixed order), so logits agree
    to f32 rounding and the greedy tokens are the same; likewise when whole layers are read
    for the prefill and the bank then fills from them on the device."""
    path = tiny_models("q2")
    prompt = list(range(2000, 2012))
    monkeypatch.setattr(expert_cache, "STAGING_SHARE", 1)  # tiny's 5 layers: 2 whole ones are 40% of them
    with emulated(platform, build_dir) as kernels:
        want_tokens, want_logits = greedy_run(Engine(open_model(path), 64, kernels=kernels), prompt, 3)
        for budget, staged in ((1, False), ((2 * 8 + 4 * 5) * _slot_bytes(path), True)):
            engine = Engine(open_model(path), 64, kernels=kernels, expert_cache=budget)
            cache = engine.model.experts
            assert (cache.staging is not None) == staged
            tokens, logits = greedy_run(engine, prompt, 3)
            assert tokens == want_tokens
            for got, want in zip(logits, want_logits):
                assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
            assert (cache.stats.layers_streamed > 0) == staged


def _whole_pages(bank: np.ndarray, row: int) -> slice:
    """The bytes of ``bank[row]`` that lie on pages wholly inside it, relative to the row."""
    size = bank[row].nbytes
    start = -(-row * size // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (row + 1) * size // mmap.PAGESIZE * mmap.PAGESIZE
    return slice(start - row * size, max(end, start) - row * size)


def test_a_one_byte_gpu_cache_is_raised_to_a_tokens_experts(tiny_models, build_dir):
    path = tiny_models("q2")
    with emulated("cuda", build_dir) as kernels:
        cache = Engine(open_model(path), 64, kernels=kernels, expert_cache=1).model.experts
    assert cache.raised and "minimum of 3 slots, a token's experts, per layer" in cache.describe()
    assert all(b.n_slots == 3 for b in cache.banks.values())
