"""Writers killed mid-write leave ``.NAME.tmp-PID`` files beside their targets; opening
the session store or the prefix cache sweeps the stale ones (their process is gone,
or they are older than a day) and keeps a live writer's and everything else."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from magnetar.agent.sessions import SessionStore
from magnetar.runtime.fileio import STALE_TEMP_SECONDS
from magnetar.runtime.kvcache import PrefixCache


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _plant(folder, dead: int) -> tuple[list, list]:
    """Stale temps (dead writer, or a live PID but a day old) and files that must stay."""
    folder.mkdir(parents=True, exist_ok=True)
    stale = [folder / f".state.ckpt.tmp-{dead}", folder / f".meta.json.tmp-{dead}"]
    old = folder / f".transcript.before-compaction-1.jsonl.tmp-{os.getpid()}"
    keep = [folder / f".state.ckpt.tmp-{os.getpid()}",  # a write in progress
            folder / "state.ckpt", folder / ".hidden", folder / ".x.tmp-abc", folder / f"x.tmp-{dead}"]
    for path in [*stale, old, *keep]:
        path.write_bytes(b"partial")
    an_old_time = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(old, (an_old_time, an_old_time))
    return [*stale, old], keep


def test_opening_the_session_store_sweeps_stale_temps(tmp_path):
    dead = _dead_pid()
    root = tmp_path / "sessions"
    gone_root, keep_root = _plant(root, dead)
    gone, keep = _plant(root / "20260101-000000-abcdef", dead)
    SessionStore(root)
    assert not any(p.exists() for p in gone + gone_root)
    assert all(p.exists() for p in keep + keep_root)


def test_opening_the_prefix_cache_sweeps_stale_temps(tmp_path):
    dead = _dead_pid()
    gone, keep = _plant(tmp_path / "kvcache" / "0123456789abcdef", dead)
    PrefixCache(tmp_path / "kvcache")
    assert not any(p.exists() for p in gone)
    assert all(p.exists() for p in keep)


def test_a_missing_folder_is_fine(tmp_path):
    SessionStore(tmp_path / "nothing-yet")
    PrefixCache(tmp_path / "nothing-either")
    assert not (tmp_path / "nothing-yet").exists()
