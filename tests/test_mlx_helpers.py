"""The MLX extension's helper threads (kernels/native/mlx_common.h): jobs handed out from
several threads at once, some after the helpers have gone to sleep, run every part exactly
once, and ThreadSanitizer finds no race where the compiler has it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from magnetar.kernels import mlx_ext
from magnetar.kernels.mlx_ext import MlxExtBuildError

SOURCE = Path(__file__).parent / "data" / "helpers_stress.cpp"


def _build(tmp_path: Path, sanitize: bool) -> Path | None:
    try:
        cxx, paths = mlx_ext._compiler(), mlx_ext._paths()
    except MlxExtBuildError as exc:
        pytest.skip(f"no C++ build for the MLX extension: {exc}")
    exe = tmp_path / ("stress-tsan" if sanitize else "stress")
    flags = ["-std=c++20", "-O1", "-g", "-fsanitize=thread"] if sanitize else ["-std=c++20", "-O2"]
    run = subprocess.run([cxx, *flags, f"-I{paths['mlx_include']}", f"-I{mlx_ext.NATIVE_DIR}", "-pthread",
                          "-o", str(exe), str(SOURCE)], capture_output=True, text=True, timeout=300)
    if run.returncode:
        assert sanitize, run.stderr  # only the sanitizer may be missing
        return None
    return exe


@pytest.mark.parametrize("sanitize", [False, True], ids=["plain", "tsan"])
def test_every_part_of_every_job_runs_once(tmp_path, sanitize):
    exe = _build(tmp_path, sanitize)
    if exe is None:
        pytest.skip("the compiler has no ThreadSanitizer")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                         env={"TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert run.returncode == 0 and "misses 0" in run.stdout, run.stdout + run.stderr[-3000:]
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-3000:]
