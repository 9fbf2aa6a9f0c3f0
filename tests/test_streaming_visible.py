"""Expert streaming is visible: ``generate`` ends with the cache's hit rate, bytes read and
read speed (the TUI's status bar: tests/test_tui.py), and ``inspect --expert-cache SIZE``
shows what stays resident and what streams for that cache size."""

from __future__ import annotations

import re

import pytest

from magnetar.cli import main
from magnetar.kernels import native
from magnetar.runtime.expert_cache import ExpertCache, routed_tensors
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.lab.commands import _bytes

needs_native = pytest.mark.skipif(not native.available(), reason="streaming needs the native CPU kernels")


@needs_native
def test_generate_reports_the_expert_cache_in_its_final_line(tiny_models, capsys):
    path = str(tiny_models("q2"))
    assert main(["generate", "-m", path, "-p", "hi", "--nothink", "--temp", "0", "-n", "3", "--ctx", "256",
                 "--expert-cache", "600K"]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    found = re.search(r"tok/s\); experts (\d+)% hit, ([\d.]+) MiB read at ([\d.]+) GB/s$", last)
    assert found, last
    assert float(found[2]) > 0 and float(found[3]) > 0  # a 600K cache cannot hold tiny's experts: it read
    assert main(["generate", "-m", path, "-p", "hi", "--nothink", "--temp", "0", "-n", "3", "--ctx", "256"]) == 0
    assert "experts" not in capsys.readouterr().err.strip().splitlines()[-1]  # resident: nothing to show


@pytest.mark.parametrize("size, budget", [("1K", 1 << 10), ("1M", 1 << 20), ("16M", 16 << 20)])
def test_inspect_shows_resident_and_streamed_bytes_as_the_cache_allocates_them(tiny_models, capsys, size, budget):
    path = tiny_models("q2")
    mf = open_model(path)
    assert main(["inspect", str(path), "--expert-cache", size]) == 0
    out = capsys.readouterr().out
    cache = ExpertCache(path, routed_tensors(mf, range(mf.config.n_layer)), budget)  # what streaming allocates
    try:
        routed = sum(i.nbytes for name, i in mf.tensors.items() if "_exps." in name)
        non_expert = sum(i.nbytes for i in mf.tensors.values()) - routed
        slots = {b.n_slots for b in cache.banks.values()}
        assert len(slots) == 1
        assert f"expert cache {_bytes(budget)}: {slots.pop()} of {mf.config.n_expert} experts per layer" in out
        assert f"resident {_bytes(non_expert + cache.nbytes)}: non-expert weights {_bytes(non_expert)}" in out
        assert f"streamed from the file: routed experts {_bytes(routed)}" in out
        assert ("raised to the minimum" in out) == cache.raised
        assert ("whole layers for long prefills" in out) == (cache.staging is not None)
    finally:
        cache.close()
