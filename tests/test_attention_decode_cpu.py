"""One token's decode attention after its projections as one MLX primitive with a C++ CPU
kernel (kernels/mlx_ext.py, native/mlx_attention.cpp): for each layer kind (sliding window,
ratio 128, ratio 4 with the indexer, selecting top-k or not) its output and new state equal
the MLX-ops oracle (``kernels.attention_decode``) at ``tiny`` and Flash widths, at positions
that open, fill and close windows and wrap the ring; it is one node of a compiled graph; and a
whole ``tiny`` model decodes the same with it as without."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from greedy_run import greedy_run
from kernel_data import rel_err
from magnetar.kernels import attention_decode as ad
from magnetar.kernels import mlx_ext
from magnetar.kernels.base import attend
from magnetar.kernels.cpu import CpuBackend
from magnetar.runtime import Engine
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.kv_state import EMPTY, frontier_rows, lanes
from magnetar.runtime.lab.graph_nodes import graph_nodes
from magnetar.runtime.lab.make_model import PRESETS
from magnetar.runtime.ops import rope_inv_freq
from magnetar.runtime.precision import Precision

RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("on_the_cpu")  # conftest.py


def _normal(rng, *shape, scale=1.0):
    return mx.array((rng.standard_normal(shape) * scale).astype(np.float32))


def _pooling(rng, p: int, ratio: int, dim: int, cap: int) -> ad.Pooling:
    """A compressor mid-sequence: its frontier holds the window's earlier slots (ratio 4: and
    the previous window), the slots still to come hold EMPTY scores."""
    width, rows = lanes(ratio) * dim, frontier_rows(ratio)
    f_sc = rng.standard_normal((rows, width)).astype(np.float32)
    f_sc[(4 if ratio == 4 else 0) + p % ratio:] = EMPTY
    if p < 4 and ratio == 4:
        f_sc[:4] = EMPTY  # no previous window yet
    return ad.Pooling(_normal(rng, 1, width), _normal(rng, 1, width), _normal(rng, ratio, width, scale=0.5),
                      mx.array(rng.uniform(0.5, 1.5, dim).astype(np.float32)), _normal(rng, cap, dim),
                      _normal(rng, rows, width), mx.array(f_sc))


def make_step(preset: str, ratio: int, p: int, cap: int, official: bool, seed: int = 0, tied: bool = False
              ) -> tuple[ad.DecodeStep, ad.DecodeShape]:
    """Random projections and state for a layer of ``preset`` at position p; ``tied``: indexer
    weights of zero, so every score ties at 0 and top-k keeps the lowest rows."""
    cfg = PRESETS[preset]()
    rng = np.random.default_rng([seed, p, ratio, cap])
    H, hd, ih, idim = cfg.n_head, cfg.head_dim, cfg.indexer_heads, cfg.indexer_dim
    shape = ad.DecodeShape(H, hd, cfg.window, ratio, cfg.rms_eps, Precision(official, hd - cfg.rope_dim),
                           *((ih, idim, cfg.indexer_top_k) if ratio == 4 else ()))
    comp = _pooling(rng, p, ratio, hd, cap) if ratio else None
    index = _pooling(rng, p, 4, idim, cap) if ratio == 4 else None
    select = ratio == 4 and cap > cfg.indexer_top_k
    index_q = _normal(rng, 1, ih * idim) if select else None
    index_w = _normal(rng, 1, ih) * (0 if tied else 1) if select else None
    step = ad.DecodeStep(mx.array(p, mx.int32), _normal(rng, 1, H * hd, scale=2.0), _normal(rng, 1, hd, scale=2.0),
                         mx.array(rng.uniform(0.5, 1.5, hd).astype(np.float32)), _normal(rng, H),
                         rope_inv_freq(cfg, compressed=ratio > 0), _normal(rng, cfg.window, hd), comp, index,
                         index_q, index_w)
    return step, shape


def fused(step: ad.DecodeStep, shape: ad.DecodeShape):
    """The primitive inside mx.compile, as the decode step runs it."""
    arrays, tree = _flatten(step)
    run = mx.compile(lambda *a: _pack(*mlx_ext.attention_decode(_unflatten(tree, a), shape)))
    return run(*arrays)


def _flatten(step):
    tree = {k: v for k, v in vars(step).items()}
    arrays = []
    for k, v in tree.items():
        if isinstance(v, ad.Pooling):
            tree[k] = ad.Pooling(*(len(arrays) + i for i in range(7)))
            arrays += list(vars(v).values())
        elif v is not None:
            tree[k] = len(arrays)
            arrays.append(v)
    return arrays, tree


def _unflatten(tree, arrays):
    def take(v):
        if isinstance(v, ad.Pooling):
            return ad.Pooling(*(arrays[i] for i in vars(v).values()))
        return None if v is None else arrays[v]
    return ad.DecodeStep(**{k: take(v) for k, v in tree.items()})


def _pack(o, states):
    return [o, *states]


CASES = [  # preset, ratio, positions, capacity (0: none), indexer scores all tied
    ("tiny", 0, (0, 3, 31, 32, 77), 0, False),
    ("tiny", 128, (0, 127, 128, 131, 300), 3, False),
    ("tiny", 4, (0, 3, 4, 7, 127, 128, 131), 64, False),  # 64 > top-k 8: the indexer selects
    ("tiny", 4, (0, 3, 4, 31), 8, False),  # capacity = top-k: every visible row is kept
    ("tiny", 4, (63, 131), 64, True),  # ties: the lowest 8 of 16 and 33 visible rows
    ("mini-flash", 0, (0, 127, 128, 300), 0, False),
    ("mini-flash", 128, (0, 4, 127, 128, 131, 1000), 8, False),
    ("mini-flash", 4, (0, 3, 4, 127, 128, 131), 64, False),  # capacity 64 <= top-k 512
    ("mini-flash", 4, (2052, 2100, 2303), 576, False),  # 513 .. 576 visible rows, top-k 512 kept
]


def open_rows_as_they_were(step: ad.DecodeStep, shape: ad.DecodeShape, p: int, want: list[mx.array]
                            ) -> list[mx.array]:
    """The kernel pools a window into its row p // R only when the window closes at p, the
    first moment any token can see that row; until then the row keeps what it held. The MLX
    ops write the open window's partial pool there every token. Outputs: o, raw, then rows,
    f_kv, f_sc of the compressor and of the indexer's (ratio 4)."""
    want = list(want)
    for at, pooling, ratio in ((2, step.comp, shape.ratio), (5, step.index, 4)):
        if pooling is None or (p + 1) % ratio == 0 or p // ratio >= pooling.rows.shape[0]:
            continue
        rows = np.array(want[at])
        rows[p // ratio] = np.array(pooling.rows[p // ratio])
        want[at] = mx.array(rows)
    return want


def test_an_open_window_is_not_pooled_until_it_closes():
    """Ratio 128 at p = 300 leaves its window open: row 2 stays as it was (the MLX ops write
    a partial pool there, which no token sees); at p = 383 the window closes and row 2 is the
    pool of all 128 slots, as the MLX ops make it."""
    step, shape = make_step("tiny", 128, 300, 3, official=False)
    before = np.array(step.comp.rows)
    got = fused(step, shape)
    assert np.array_equal(np.array(got[2]), before)
    assert not np.array_equal(np.array(ad.attention_decode(step, shape, attend)[1][1]), before)
    step, shape = make_step("tiny", 128, 383, 3, official=False)
    got, want = fused(step, shape)[2], ad.attention_decode(step, shape, attend)[1][1]
    assert rel_err(got, want) < RTOL and not np.array_equal(np.array(got), np.array(step.comp.rows))


@pytest.mark.parametrize("official", [True, False], ids=["official", "reference"])
@pytest.mark.parametrize("preset,ratio,positions,cap,tied", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_fused_attention_decode_equals_the_mlx_ops_as_one_node(preset, ratio, positions, cap, tied, official):
    for p in positions:
        step, shape = make_step(preset, ratio, p, cap, official, tied=tied)
        want = [*(lambda o, s: [o, *s])(*ad.attention_decode(step, shape, attend))]
        mx.eval(want)
        want = open_rows_as_they_were(step, shape, p, want)
        got = fused(step, shape)
        assert graph_nodes(*got) == 1
        mx.eval(got)
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.shape == w.shape and g.dtype == mx.float32
            assert rel_err(g, w) < RTOL, (p, i, rel_err(g, w))
        if official:  # rows rounded through FP8 / FP4 then f16: the same rounding decisions
            for g, w in zip(got[1:], want[1:]):
                assert np.array_equal(np.array(g), np.array(w)), p


def test_the_kv_norm_has_the_mlx_ops_bits():
    """The decode attention's RMS norms (q, kv, compressors) take their scale from mlx_common.h's
    inverse_rms, rowops' own steps with no fused multiply-adds, so they are MLX's bits, not just
    close: with the rotation off (inv_freq 0) and reference precision the new ring row is the kv
    norm alone, and it equals the MLX ops'. (The sum as the compiler may contract it, an FMA
    chain as GCC builds for -march=skylake, missed 5-14% of these rows.)"""
    for preset, ratio, positions, cap, tied in CASES:
        for p in positions:
            step, shape = make_step(preset, ratio, p, cap, official=False, tied=tied)
            step = ad.DecodeStep(**{**vars(step), "inv_freq": mx.zeros_like(step.inv_freq)})
            want = ad.attention_decode(step, shape, attend)[1][0]
            assert np.array_equal(np.array(fused(step, shape)[1]), np.array(want)), (preset, ratio, p)


def test_a_closing_window_is_pooled_with_the_mlx_ops_bits():
    """A window that closes is pooled by the same function as prefill's ``pool_windows`` node,
    with MLX's exp and the MLX ops' steps, so (rotation off, reference precision: the row is the
    pool's RMS norm alone) the compressed and indexer rows equal the MLX ops' bit for bit, not
    within a tolerance. (libm's exp, which this pooling used before, missed most of these rows.)"""
    closed = 0
    for preset, ratio, positions, cap, tied in CASES:
        for p in positions:
            if not ratio or (p + 1) % ratio or p // ratio >= cap:
                continue
            step, shape = make_step(preset, ratio, p, cap, official=False, tied=tied)
            step = ad.DecodeStep(**{**vars(step), "inv_freq": mx.zeros_like(step.inv_freq)})
            want = ad.attention_decode(step, shape, attend)[1]
            got = fused(step, shape)
            for at in (2, 5) if ratio == 4 else (2,):  # rows of the compressor, the indexer's
                row = p // ratio  # got is [o, *states]: state at - 1 of the oracle's
                assert np.array_equal(np.array(got[at][row]), np.array(want[at - 1][row])), (preset, ratio, p, at)
                closed += 1
    assert closed >= 8


@pytest.mark.parametrize("keep_input", [False, True], ids=["donated", "still-held"])
def test_fused_attention_decode_writes_a_donated_state_in_place(keep_input):
    """The compressed rows (32 MB here) are updated where they lie when nothing else holds
    them, as MLX's slice updates do; a buffer still held elsewhere is copied, and left as it was."""
    step, shape = make_step("tiny", 128, 383, 1 << 16, True)  # closes window 2: rows 0-2 as the MLX ops write them
    mx.eval(*vars(step.comp).values())
    held = np.array(step.comp.rows) if keep_input else None
    want = np.array(ad.attention_decode(step, shape, attend)[1][1][:3])
    mx.synchronize()
    before = mx.get_active_memory()
    o, states = mlx_ext.attention_decode(step, shape)
    if not keep_input:
        del step  # the primitive holds the last reference to the rows
    mx.eval(o, *states)
    grew = mx.get_active_memory() - before
    assert np.array_equal(np.array(states[1][:3]), want)
    if keep_input:
        assert grew >= states[1].nbytes and np.array_equal(np.array(step.comp.rows), held)
    else:
        assert grew < states[1].nbytes // 2


def test_fused_attention_decode_refuses_mismatched_shapes_in_one_line():
    step, shape = make_step("tiny", 128, 5, 3, True)
    bad = ad.DecodeStep(**{**vars(step), "kv": step.kv[:, :64]})
    with pytest.raises(ValueError, match=r"kv must be float32 \[head_dim\]"):
        mlx_ext.attention_decode(bad, shape)


def test_a_model_decodes_the_same_with_the_fused_attention(tiny_models):
    """tiny q2 on the CPU backend, attention decode fused or as MLX ops: the same greedy
    tokens, and logits within f32 rounding for each decode step; a ctx above 4 * top-k + 4
    so the indexer selects."""
    path = tiny_models("q2")
    prompt = [3 + 37 * i % 1000 for i in range(40)]

    def run(fused: bool):
        return greedy_run(Engine(open_model(path), ctx=256, kernels=CpuBackend(fused_attention=fused)), prompt, 8)

    tokens, logits = run(True)
    want_tokens, want_logits = run(False)
    assert tokens == want_tokens
    for got, want in zip(logits[1:], want_logits[1:]):  # the prompt's are prefill's, no decode attention
        assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


def test_positions_outside_the_state_write_nothing_out_of_bounds():
    """The position is a graph value the primitive cannot check when it is built, so the kernel
    does: a window closing past the compressed rows' capacity stores no row (the rows held keep
    their bits), and a negative position gives NaN output and leaves the state as it was. In a
    child process: before the guard, p // 4 = 100 against 64 rows wrote past the buffer."""
    child = textwrap.dedent("""
        import dataclasses
        import numpy as np, mlx.core as mx
        from test_attention_decode_cpu import make_step, fused
        for p in (403, 4 * 64 * 3 + 3, -1):
            step, shape = make_step("tiny", 4, max(p, 0), 64, False)
            step = dataclasses.replace(step, p=mx.array(p, mx.int32))
            before = [np.array(a) for a in (step.raw, step.comp.rows, step.index.rows)]
            got = fused(step, shape)
            mx.eval(got)
            assert all(np.array_equal(np.array(g), b) for g, b in zip((got[2], got[5]), before[1:])), p
            if p < 0:
                assert np.isnan(np.array(got[0])).all() and np.array_equal(np.array(got[1]), before[0])
        print("ok")
        """)
    here = str(Path(__file__).parent)
    run = subprocess.run([sys.executable, "-c", child], cwd=here, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": here})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
