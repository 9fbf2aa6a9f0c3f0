"""MLX's CPU compiler output, kept in our cache instead of the temp dir.

On the CPU, ``mx.compile`` turns each run of fused elementwise ops into C++ that
MLX compiles with ``g++`` the first time it is evaluated, and keeps as
``lib<kernel>.so`` under ``<temp>/mlx/<mlx version>/cpu`` (mlx/backend/cpu/
compiled.cpp; <temp> is C++'s ``temp_directory_path()``: ``$TMPDIR``, ``$TMP``,
``$TEMP`` or ``$TEMPDIR``, else ``/tmp``). MLX has no setting for that directory.
The tiny model's decode step needs 52 of them, ~19 s of g++ on a quiet 2-core
machine, paid again whenever the temp dir is cleared.

``persist()`` makes that directory a symlink to ``<our cache>/mlx/<version>/cpu``
(see ``native.cache_dir``). Pointing ``TMPDIR`` at our cache instead would move
every temporary file of the process and of its children (the shell sandbox's
private temp dir included). The library names are MLX's own content keys, so
one directory serves every model; the ``warm`` markers say which model shapes
have run here (``Engine`` compiles their decode step at load, with a notice, when
one is missing).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import mlx.core as mx

from .native import cache_dir


def mlx_temp_dir() -> Path:
    """The temp dir MLX's C++ side uses (libstdc++'s ``temp_directory_path`` order)."""
    for name in ("TMPDIR", "TMP", "TEMP", "TEMPDIR"):
        if os.environ.get(name):
            return Path(os.environ[name])
    return Path("/tmp")


def persistent_dir() -> Path:
    """Where the compiled kernels live for good."""
    return cache_dir() / "mlx" / mx.__version__ / "cpu"


def mlx_output_dir() -> Path:
    """Where MLX writes and looks for them."""
    return mlx_temp_dir() / "mlx" / mx.__version__ / "cpu"


def persist() -> Path | None:
    """Point MLX's output dir at ``persistent_dir()``; call before anything is compiled.

    Libraries MLX already built in a real directory there are moved over first.
    Returns the persistent dir, or None when it cannot be linked (a read-only
    cache, a temp dir owned by someone else): MLX then compiles into its own
    dir as before.
    """
    target, link = persistent_dir(), mlx_output_dir()
    try:
        target.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and os.readlink(link) == str(target):
            return target
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_dir() and not link.is_symlink():
            _adopt(link, target)
        tmp = link.with_name(f".cpu.{os.getpid()}.link")
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)  # atomic: MLX sees the old entry or the new link, never none
        return target
    except OSError:
        return None


def _adopt(directory: Path, target: Path) -> None:
    """Move ``directory`` aside and copy its finished libraries into ``target``."""
    aside = directory.with_name(f".cpu.{os.getpid()}.old")
    os.rename(directory, aside)
    for lib in aside.glob("lib*.so"):
        dest = target / lib.name
        if not dest.exists():
            part = target / f".{lib.name}.{os.getpid()}.tmp"
            shutil.copyfile(lib, part)
            os.replace(part, dest)  # MLX dlopens whatever file has the name: never a partial one
    shutil.rmtree(aside, ignore_errors=True)


def shape_key(config: object, precision: str, kernels: object) -> str:
    """What decides a decode step's kernels: the model config, precision and backend."""
    return f"{config!r} {precision} {getattr(kernels, 'name', '?')} {getattr(kernels, 'host_moe', '?')}"


def _marker(key: str) -> Path:
    return persistent_dir().parent / "warm" / hashlib.sha256(key.encode()).hexdigest()[:24]


def is_warm(key: str) -> bool:
    """Whether the kernels of ``key`` (a model shape and schedule) were compiled here."""
    return _marker(key).exists()


def mark_warm(key: str) -> None:
    """Record that ``key``'s kernels are compiled (best effort)."""
    path = _marker(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError:
        pass


__all__ = ["is_warm", "mark_warm", "mlx_output_dir", "mlx_temp_dir", "persist", "persistent_dir", "shape_key"]
