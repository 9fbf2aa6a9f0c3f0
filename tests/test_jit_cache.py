"""MLX's CPU-compiled kernels land in our cache, not the temp dir, and a model shape is
compiled once, at load, with a notice (issue 16, item 4)."""

from __future__ import annotations

import os
import random

import mlx.core as mx
import pytest

from magnetar.kernels import jit_cache
from magnetar.runtime import Engine


@pytest.fixture
def private_dirs(tmp_path, monkeypatch):
    """A newcomer's machine: empty temp dir and empty magnetar home (MLX reads $TMPDIR per compile)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setenv("MAGNETAR_HOME", str(tmp_path / "home"))
    (tmp_path / "tmp").mkdir()
    return tmp_path


def _compile_a_new_kernel() -> None:
    """Evaluate a CPU-compiled function whose constant no earlier kernel had (a new library)."""
    c = random.random()
    with mx.stream(mx.cpu):
        mx.eval(mx.compile(lambda x: mx.exp(x * c) + c)(mx.ones((8,))))


def test_compiled_kernels_land_in_our_cache_and_survive_a_cleared_temp_dir(private_dirs):
    target = jit_cache.persist()
    assert target == private_dirs / "home" / "cache" / "kernels" / "mlx" / mx.__version__ / "cpu"
    assert jit_cache.mlx_output_dir().is_symlink()
    _compile_a_new_kernel()
    assert len(list(target.glob("lib*.so"))) == 1

    for path in sorted((private_dirs / "tmp").rglob("*"), reverse=True):  # clear the temp dir
        path.unlink() if path.is_symlink() or path.is_file() else path.rmdir()
    assert jit_cache.persist() == target
    assert len(list(target.glob("lib*.so"))) == 1


def test_kernels_mlx_built_in_its_own_dir_are_adopted(private_dirs):
    mlx_dir = jit_cache.mlx_output_dir()
    mlx_dir.mkdir(parents=True)
    (mlx_dir / "libold_kernel.so").write_bytes(b"\x7fELF built earlier")
    (mlx_dir / "old_kernel.cpp").write_text("// its source")
    target = jit_cache.persist()
    assert os.readlink(mlx_dir) == str(target)
    assert (target / "libold_kernel.so").read_bytes() == b"\x7fELF built earlier"


def test_an_unwritable_cache_leaves_mlx_alone(private_dirs):
    (private_dirs / "home").write_text("a file where the cache dir should be")
    assert jit_cache.persist() is None
    assert not jit_cache.mlx_output_dir().exists()


def test_a_model_shape_is_compiled_once_at_load_with_a_notice(tiny_models):
    """Uses the real cache (the kernels compile once per machine either way); only this
    shape's marker is reset, so the first load must warm it and the second must not."""
    path = tiny_models("q2")
    notices: list[str] = []
    engine = Engine.load(path, ctx=256)
    key = jit_cache.shape_key(engine.config, engine.precision, engine.model.kernels)
    jit_cache._marker(key).unlink(missing_ok=True)

    engine = Engine.load(path, ctx=256, notice=notices.append)
    assert len(notices) == 1 and "compiling MLX's CPU kernels" in notices[0]
    assert jit_cache.is_warm(key)
    assert engine.tokens == []  # the warm-up ran on a scratch state
    Engine.load(path, ctx=256, notice=notices.append)
    assert len(notices) == 1
