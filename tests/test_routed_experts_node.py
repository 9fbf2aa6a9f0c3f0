"""The routed-expert step as one node of MLX's graph (``mlx_ext.routed_experts``,
kernels/native/mlx_moe.cpp): it runs the native library's own kernel, so it must give
``native.moe``'s bits for every recipe, and it lets the CPU decode step be one compiled
graph (no cut per layer) with the cut schedule's logits, bit for bit (issue 16)."""

from __future__ import annotations

import gc
import mmap
import threading
import time
import weakref

import mlx.core as mx
import numpy as np
import pytest

from greedy_run import greedy_run
from kernel_data import EXPERT_TRIPLES, random_qtensor, random_routing
from magnetar.kernels import mlx_ext, native
from magnetar.kernels.backend import QTensor
from magnetar.kernels.base import BackendUnavailable
from magnetar.kernels.cpu import CpuBackend
from magnetar.runtime import Engine
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.lab.graph_nodes import graph_nodes

pytestmark = [pytest.mark.skipif(not (native.available() and mlx_ext.available()),
                                 reason="needs the native kernels and the MLX CPU extension"),
              pytest.mark.usefixtures("on_the_cpu")]
LIMIT = 7.0


def _stacks(rng, recipe: str, n_experts: int, d_model: int, ffn: int) -> list[QTensor]:
    gt, ut, dt = EXPERT_TRIPLES[recipe]
    return [random_qtensor(rng, gt, (n_experts, ffn, d_model)), random_qtensor(rng, ut, (n_experts, ffn, d_model)),
            random_qtensor(rng, dt, (n_experts, d_model, ffn))]


def _node(x, ids, w, stacks) -> np.ndarray:
    on_mlx = [QTensor(mx.array(s.data), s.ggml_type) for s in stacks]
    return np.array(mlx_ext.routed_experts(mx.array(x), mx.array(ids), mx.array(w), *on_mlx, LIMIT))


def _host(x, ids, w, stacks) -> np.ndarray:
    return native.moe(x, ids, w, *[(s.data, s.ggml_type) for s in stacks], LIMIT)


@pytest.mark.parametrize("recipe", list(EXPERT_TRIPLES))
@pytest.mark.parametrize("n_tok", [1, 5, 33])
def test_the_node_gives_the_native_kernels_bits(recipe, n_tok):
    rng = np.random.default_rng([n_tok, len(recipe)])
    stacks = _stacks(rng, recipe, 8, 512, 256)
    x = rng.standard_normal((n_tok, 512)).astype(np.float32)
    ids, w = random_routing(rng, n_tok, 8, 3, repeats=True)  # a token may list an expert twice
    assert np.array_equal(_node(x, ids, w, stacks).view(np.uint32), _host(x, ids, w, stacks).view(np.uint32))


def test_the_node_reads_strided_inputs_and_casts_ids():
    rng = np.random.default_rng(7)
    stacks = _stacks(rng, "q2", 6, 256, 256)
    x = rng.standard_normal((256, 4)).astype(np.float32)  # x.T is a transposed view in MLX
    ids, w = random_routing(rng, 4, 6, 2)
    on_mlx = [QTensor(mx.array(s.data), s.ggml_type) for s in stacks]
    got = mlx_ext.routed_experts(mx.array(x).T, mx.array(ids.astype(np.uint32)), mx.array(w.T).T, *on_mlx, LIMIT)
    want = _host(np.ascontiguousarray(x.T), ids, w, stacks)
    assert np.array_equal(np.array(got).view(np.uint32), want.view(np.uint32))


def test_the_node_is_one_node_of_a_compiled_graph():
    rng = np.random.default_rng(3)
    stacks = [QTensor(mx.array(s.data), s.ggml_type) for s in _stacks(rng, "q2", 4, 256, 256)]
    ids, w = (mx.array(a) for a in random_routing(rng, 1, 4, 2))
    x = mx.array(rng.standard_normal((1, 256)).astype(np.float32))
    step = mx.compile(lambda v: mlx_ext.routed_experts(v, ids, w, *stacks, LIMIT))
    assert graph_nodes(step(x)) == 1


def test_mismatched_shapes_are_refused_in_one_line():
    rng = np.random.default_rng(5)
    stacks = [QTensor(mx.array(s.data), s.ggml_type) for s in _stacks(rng, "q2", 4, 256, 256)]
    ids, w = (mx.array(a) for a in random_routing(rng, 2, 4, 2))
    with pytest.raises(ValueError, match="routed_experts: ids int32 and weights float32, both \\[T, K\\]"):
        mlx_ext.routed_experts(mx.zeros((3, 256)), ids, w, *stacks, LIMIT)
    with pytest.raises(ValueError, match="down \\[E, D"):
        mlx_ext.routed_experts(mx.zeros((2, 512)), ids, w, *stacks, LIMIT)


def test_fused_experts_need_the_native_kernels():
    with pytest.raises(BackendUnavailable, match="native"):
        CpuBackend(use_native=False, fused_experts=True)


def test_a_model_decodes_as_one_graph_with_the_cut_schedules_bits(tiny_models):
    prompt = [3 + 37 * i % 1000 for i in range(40)]
    runs = {}
    for fused in (False, True):
        engine = Engine(open_model(tiny_models("q2")), ctx=256, kernels=CpuBackend(use_native=True, fused_experts=fused))
        assert engine.model.step.host_experts == (not fused)
        runs[fused] = greedy_run(engine, prompt, 5)
    assert runs[True][0] == runs[False][0]
    for got, want in zip(runs[True][1], runs[False][1]):
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def _mapped_stacks(tmp_path, stacks):
    """The stacks written to a file and read back as read-only views of its mapping, as
    ``Weights.experts`` hands them to the CPU backend."""
    path = tmp_path / "stacks.bin"
    path.write_bytes(b"".join(s.data.tobytes() for s in stacks))
    fh = open(path, "rb")
    mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    fh.close()
    views, at = [], 0
    for s in stacks:
        views.append(QTensor(np.frombuffer(mapping, np.uint8, s.data.size, at).reshape(s.data.shape), s.ggml_type))
        at += s.data.size
    return mapping, views


def _settle(done, seconds: float = 5.0) -> None:
    """Wait for ``done()``: a worker's last hold on the stacks is let go by the interpreter
    between bytecodes (a pending call), shortly after the work is."""
    deadline = time.monotonic() + seconds
    while not done():
        gc.collect()
        assert time.monotonic() < deadline, "the stacks were never let go"
        time.sleep(0.001)


def _closes_refused(mapping) -> bool:
    try:
        mapping.close()
        return False
    except BufferError:
        return True


def test_the_node_reads_stacks_in_place_and_holds_them_while_it_lives(tmp_path):
    rng = np.random.default_rng(11)
    stacks = _stacks(rng, "q2", 6, 256, 256)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    ids, w = random_routing(rng, 3, 6, 2)
    mapping, views = _mapped_stacks(tmp_path, stacks)
    out = mlx_ext.routed_experts(mx.array(x), mx.array(ids), mx.array(w), *views, LIMIT)
    del views
    gc.collect()
    with pytest.raises(BufferError):  # the unevaluated node still reads the mapping
        mapping.close()
    assert np.array_equal(np.array(out).view(np.uint32), _host(x, ids, w, stacks).view(np.uint32))
    del out
    _settle(lambda: not _closes_refused(mapping))  # nothing reads it any more: it closes


def test_a_worker_thread_never_lets_go_of_the_stacks_python_objects():
    """The node's task runs on an MLX worker and may outlive the node, holding the last
    reference to the stacks; dropping it there would wait for the GIL, which the main thread
    can hold while it waits for that worker. The release is handed to the interpreter."""
    rng = np.random.default_rng(13)
    stacks = _stacks(rng, "q2", 6, 256, 256)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    ids, w = random_routing(rng, 3, 6, 2)
    main, freed_on = threading.get_ident(), []
    for _ in range(20):
        owners = [s.data.copy() for s in stacks]
        _ = [weakref.finalize(owner, lambda: freed_on.append(threading.get_ident())) for owner in owners]
        out = mlx_ext.routed_experts(mx.array(x), mx.array(ids), mx.array(w),
                                     *[QTensor(o, s.ggml_type) for o, s in zip(owners, stacks)], LIMIT)
        del owners
        mx.eval(out)
        del out
    _settle(lambda: len(freed_on) == 60)
    assert set(freed_on) == {main}


def test_the_cpu_backend_keeps_a_models_experts_in_the_files_mapping(tiny_models):
    model_file = open_model(tiny_models("q2"))
    engine = Engine(model_file, ctx=256, kernels=CpuBackend(use_native=True))
    for il, layer in enumerate(engine.model.layers):
        for kind in ("gate", "up", "down"):
            stored = model_file.tensors[f"blk.{il}.ffn_{kind}_exps.weight"].data
            assert np.shares_memory(getattr(layer.moe, kind).data, stored)  # no copy made at load
