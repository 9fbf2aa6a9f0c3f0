"""Expert streaming is visible: ``generate`` ends with the cache's hit rate, bytes read and
read speed (the TUI's status bar: tests/test_tui.py), and ``inspect --expert-cache SIZE``
shows what stays resident and what streams for that cache size."""

from __future__ import annotations

import re

import pytest

from magnetar.cli import main
from magnetar.kernels import native
from magnetar.runtime.engine import Engine
from magnetar.runtime.gguf_read import open_model

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
