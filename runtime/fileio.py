"""Atomic file writes: temp file in the same folder, fsync, rename, fsync folder.

A reader sees either the old file or the complete new one, never a torn write,
even if the writer is killed with SIGKILL halfway.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path
from typing import BinaryIO, Iterator

_TEMP_NAME = re.compile(r"\..+\.tmp-(\d+)")  # atomic_writer's temp file: ".NAME.tmp-PID"
STALE_TEMP_SECONDS = 24 * 3600  # no write of ours takes this long; the PID may have been reused


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_writer(path) as fh:
        fh.write(data)


def sweep_stale_temps(root: str | os.PathLike, max_age: float = STALE_TEMP_SECONDS) -> int:
    """Delete the temp files that writers killed mid-write left in ``root`` and its
    subfolders one level down (those whose process is gone, or older than ``max_age``
    seconds); returns how many went."""
    folders = [Path(root), *(p for p in Path(root).glob("*/") if p.is_dir())]
    return sum(_sweep(folder, max_age) for folder in folders)


def _sweep(folder: Path, max_age: float) -> int:
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder yet, or unreadable: nothing of ours to sweep
        return 0
    now = time.time()
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        with contextlib.suppress(OSError):
            if not _process_alive(int(match.group(1))) or now - entry.stat().st_mtime > max_age:
                os.unlink(entry.path)
                removed += 1
    return removed


def _process_alive(pid: int) -> bool:
    if pid <= 0:  # 0 would probe our own process group
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True
