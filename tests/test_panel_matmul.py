"""Many-row dense products on the CPU backend (prefill chunks) widen the stored matrix a panel
of rows at a time into one reused buffer (``native.panel_matmul``), never the whole of it
(issue 16): within float32 rounding of the exact product of the dequantized matrix for every
type the native library reads, across panel boundaries, plain and grouped; a whole
model's prefill through it gives the numpy oracle's logits; and every prompt position's
logits come from panels of the head as stored, with no whole f32 copy of it."""

from __future__ import annotations

import tracemalloc

import mlx.core as mx
import numpy as np
import pytest

from greedy_run import greedy_run
from kernel_data import random_weight
from magnetar.kernels import GGMLType, mlx_ext, native, reference
from magnetar.kernels.backend import backend
from magnetar.kernels.cpu import CpuBackend
from magnetar.kernels.host import HOST_BLAS_MIN_ROWS, HostBackend
from magnetar.runtime import Engine
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.weights import Matrix

pytestmark = [pytest.mark.skipif(not native.available(), reason=f"no native kernels: {native.unavailable_reason()}"),
              pytest.mark.usefixtures("on_the_cpu")]

RTOL = 1e-5
TYPES = [GGMLType.F16, GGMLType.Q8_0, GGMLType.Q2_K, GGMLType.Q4_K, GGMLType.IQ2_XXS]


@pytest.fixture
def small_panels(monkeypatch):
    """Panels of 8 rows at 256 columns (5 at 512, 2 at 1024): every test matrix takes several,
    the last one short."""
    monkeypatch.setattr(native, "PANEL_BYTES", 8 * 256 * 4)


def _assert_product(got, x: np.ndarray, raw: np.ndarray, ggml_type, groups: int = 1) -> None:
    """Within RTOL of the float64 product of the dequantized matrix (group g's rows against
    x's g-th slice), each output measured against the sum of its terms' magnitudes: float32
    rounding of a dot product is bounded by that, not by the (possibly cancelled) result."""
    w = reference.dequantize(raw, ggml_type).astype(np.float64)
    xg = x.astype(np.float64).reshape(x.shape[0], groups, -1)
    wg = w.reshape(groups, -1, w.shape[1])
    want = np.concatenate([xg[:, g] @ wg[g].T for g in range(groups)], axis=-1)
    terms = np.concatenate([np.abs(xg[:, g]) @ np.abs(wg[g]).T for g in range(groups)], axis=-1)
    got = np.asarray(got)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.all(np.abs(got - want) <= RTOL * terms)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols,n_tok", [(37, 256, 16), (21, 512, 33), (3, 1024, 17), (8, 256, 40)])
def test_panel_matmul_equals_the_exact_product(small_panels, ggml_type, rows, cols, n_tok):
    rng = np.random.default_rng([int(ggml_type), rows, n_tok])
    raw = random_weight(rng, ggml_type, (rows, cols))
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    _assert_product(native.panel_matmul(x, raw, ggml_type), x, raw, ggml_type)


def test_panel_matmul_writes_into_a_column_slice(small_panels):
    rng = np.random.default_rng(5)
    raw = random_weight(rng, GGMLType.Q8_0, (29, 256))
    x = rng.standard_normal((20, 256)).astype(np.float32)
    out = np.full((20, 40), 7.0, np.float32)
    assert native.panel_matmul(x, raw, GGMLType.Q8_0, out=out[:, 5:34]).base is out
    _assert_product(out[:, 5:34], x, raw, GGMLType.Q8_0)
    assert np.all(out[:, :5] == 7.0) and np.all(out[:, 34:] == 7.0)


@pytest.mark.parametrize("x_shape,out,what", [
    ((16, 128), None, "x has 128 columns, the Q8_0 weight 256"),
    ((16, 256), np.zeros((16, 5), np.float32), "out must be float32 \\(16, 4\\)"),
    ((16, 256), np.zeros((16, 4), np.float64), "out must be float32"),
])
def test_panel_matmul_refuses_mismatched_shapes_in_one_line(x_shape, out, what):
    raw = random_weight(np.random.default_rng(6), GGMLType.Q8_0, (4, 256))
    with pytest.raises(ValueError, match=what) as err:
        native.panel_matmul(np.zeros(x_shape, np.float32), raw, GGMLType.Q8_0, out=out)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("ggml_type", [GGMLType.Q8_0, GGMLType.F16, GGMLType.Q2_K], ids=lambda t: t.name)
@pytest.mark.parametrize("groups", [1, 2, 8])
def test_cpu_backend_many_row_products_by_panels(small_panels, monkeypatch, ggml_type, groups):
    """``Matrix`` as the model holds it (raw blocks, or typed f16) through ``CpuBackend``'s
    plain and grouped products at prefill sizes: both go through the panels."""
    rng = np.random.default_rng([int(ggml_type), groups])
    raw = random_weight(rng, ggml_type, (groups * 12, 256))
    data = mx.array(raw.view(np.float16)) if ggml_type == GGMLType.F16 else mx.array(raw)
    kernels = CpuBackend(use_native=True)
    m = Matrix(data, ggml_type, kernels)
    calls = []
    real = native.panel_matmul
    monkeypatch.setattr(native, "panel_matmul", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    x = rng.standard_normal((HOST_BLAS_MIN_ROWS + 3, groups * 256)).astype(np.float32)
    _assert_product(m.grouped(mx.array(x), groups), x, raw, ggml_type, groups)
    assert calls == [(12, raw.shape[1])] * groups
    if groups == 1:
        _assert_product(m(mx.array(x)), x, raw, ggml_type)
        assert len(calls) == 2


PROMPT = [(i * 7919) % 1000 + 5 for i in range(40)]


def test_a_model_prefilled_by_panels_gives_the_numpy_oracles_logits(tiny_models, monkeypatch):
    """A 40-token prompt prefills its dense Q8_0 matrices (attention, shared experts) through
    the panels, nothing widened at load; prompt and decoded logits equal the ``reference``
    backend's (numpy, float32 products of the dequantized weights) within 1e-5 (measured 8e-7).
    In reference precision, as tests/test_engine.py compares paths: the cache's official FP8/FP4
    rounding turns an ulp at a rounding boundary into a whole step (2-4e-5 of the logits here,
    measured, from the fused blocks' own f32 rounding). At tiny widths a matrix is one panel:
    8-row panels (``small_panels``) change products by an ulp, which that rounding amplifies to
    ~1e-4 over 40 tokens, so the products' accuracy across panels is proven above, product by
    product."""
    path = tiny_models("q2")
    calls = []
    real = native.panel_matmul
    monkeypatch.setattr(native, "panel_matmul", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    engine = Engine(open_model(path), 128, expand_budget=0, precision="reference", kernels=CpuBackend())
    tokens, logits = greedy_run(engine, PROMPT, 2)
    assert GGMLType.Q8_0 in calls
    oracle = Engine(open_model(path), 128, expand_budget=0, precision="reference", kernels=backend("reference"))
    want_tokens, want_logits = greedy_run(oracle, PROMPT, 2)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


@pytest.mark.skipif(not mlx_ext.available(), reason="the head stays as stored only with the MLX extension")
@pytest.mark.parametrize("recipe,ggml_type", [("q2", GGMLType.Q8_0), ("f16", GGMLType.F16)])
def test_every_positions_logits_come_from_panels_of_the_stored_head(tiny_models, recipe, ggml_type):
    """``Engine.logits`` (perplexity, ``magnetar quality``) projects every prompt position: the
    head goes by panels of its stored rows, and neither MLX nor numpy ever holds its whole f32
    copy (132 MB at tiny's widths, 2 GB at Flash's, kept for good by the host's path). The
    logits equal that path's within 1e-5 of each row's largest (BLAS order, not bits)."""
    engine = Engine(open_model(tiny_models(recipe)), 128, kernels=CpuBackend())
    model = engine.model
    assert model.output.ggml_type == ggml_type  # kept as stored, not widened at load
    whole = 4 * model.cfg.vocab_size * model.cfg.d_model
    before = mx.get_active_memory()
    tracemalloc.start()  # numpy reports its buffers to it; MLX's are counted above
    try:
        panels = engine.logits(PROMPT)
        numpy_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert mx.get_active_memory() - before < whole // 4 and numpy_peak < whole // 2
    model.project = HostBackend.logits_head(model.kernels, model.output)  # the f32-copy path
    before = mx.get_active_memory()
    copied = engine.logits(PROMPT)
    assert mx.get_active_memory() - before >= whole  # where there is a whole copy, the probe sees it
    assert np.all(np.abs(panels - copied) <= 1e-5 * np.abs(copied).max(axis=1, keepdims=True))
