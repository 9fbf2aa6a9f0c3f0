"""The native expert library's OpenMP threads wait passively unless the user says otherwise,
and the setting does not leak to child processes (issue 16: spinning idle threads took the
core MLX needs). libgomp reports what it read with OMP_DISPLAY_ENV=VERBOSE; its spin count
tells the policies apart (passive 0, default 300000, active 3e10)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from magnetar.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")

LOAD = ("import os; from magnetar.kernels import native; assert native.available(); "
        "print('after:', os.environ.get('OMP_WAIT_POLICY'))")


def _load_in_child(**env: str) -> tuple[int, str | None]:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    run = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, timeout=300,
                         env={**base, "OMP_DISPLAY_ENV": "VERBOSE", **env})
    assert run.returncode == 0, run.stderr[-2000:]
    spin = re.search(r"GOMP_SPINCOUNT = '(\d+)'", run.stderr)
    if spin is None:
        pytest.skip("the native library was built without OpenMP here")
    after = run.stdout.split("after:")[-1].strip()
    return int(spin.group(1)), None if after == "None" else after


def test_idle_threads_wait_passively_and_children_keep_their_defaults():
    spin, after = _load_in_child()
    assert spin == 0
    assert after is None  # put back once libgomp has read it


def test_the_users_own_policy_wins():
    assert _load_in_child(OMP_WAIT_POLICY="ACTIVE") == (30_000_000_000, "ACTIVE")
    spin, _ = _load_in_child(GOMP_SPINCOUNT="1000")
    assert spin == 1000
