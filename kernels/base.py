"""The kernel interface: raw GGUF weight blocks in, float32 activations out.

Every implementation (``reference``, ``cpu``, ``metal``, ``cuda``, ``hip``)
offers the same three operations on a ``QTensor``:

    dequantize(w, experts=None)           -> f32 [..., rows, cols]
    matmul(x [T, cols], w)                -> f32 [T, rows]              x @ W.T
    moe(x [T, D], ids [T, K], weights [T, K], gate, up, down, limit)
                                          -> f32 [T, D]

``moe`` is the routed-expert step of docs/spec/v4-model.md §3.8 for a batch of
tokens, each with its K selected experts: per (token, slot) pair
``mid = silu(min(g, limit)) * clip(u, -limit, limit) * weight`` with
``g = x @ gate[e].T`` and ``u = x @ up[e].T``, then ``sum over slots of
mid @ down[e].T``. The route weight multiplies ``mid`` before the down
projection (as ds4 does), so the down pass only has to add the experts up.
A token may list the same expert twice; each slot counts.

Backends take and return ``mx.array``; ``reference`` converts to numpy and
back, so the model can run on the oracle end to end. Two flags tell the model
how a backend may be scheduled: ``host_moe`` (``moe`` runs on the host, on
evaluated inputs, so the decode graph is cut around it) and ``traceable``
(every operation can sit inside ``mx.compile``).

The backend also owns the device choices for the model's plain f32 work, so
the model code stays device-free: ``dense`` (``a @ b``), ``attend`` /
``attend_chunk`` (softmax attention with sinks, docs/spec/v4-model.md §3.7),
``attention_decode`` (one token's attention after its projections: norms, RoPE,
the KV ring, compressors and indexer, §3.4-3.7),
``hc_pre`` / ``hc_post`` (the hyper-connection steps around each sublayer,
§3.3), ``rmsnorm`` (the RMS norms before each sublayer, on the query's low-rank
row and before the head), ``norm_rope`` / ``pool_windows`` (a prefill chunk's
per-head norm and rotation, its compressors' closed windows, §3.4-3.5), ``route``
(the experts' choice from the router's logits, §3.8), ``swiglu_ffn`` (the shared expert), ``logits_head`` (the output projection) and ``expand_budget`` (how
much of the non-expert weights to widen to f32 at load). Here they are plain
MLX, right on a GPU; ``host.HostBackend`` moves host-paced work to numpy's
BLAS on the CPU, the GPU and CPU backends fuse the hyper-connection steps
into single graph nodes, and ``attention_decode`` into one node (CPU) or two
to three kernel launches (GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from . import attention_decode as attn_decode
from . import hyper, rowops
from .attention_decode import DecodeShape, DecodeStep
from .formats import BLOCK, GGMLType, row_blocks
from .hyper import HcParams


ROUTER_FLOOR = 6.103515625e-5  # ds4's lower bound on the top-k weight sum


@dataclass(frozen=True)
class QTensor:
    """A weight matrix ``[rows, cols]`` or an expert stack ``[n_expert, rows, cols]``
    kept in its GGUF encoding: ``data`` is the raw bytes, ``[..., rows, row_bytes]``
    uint8, an ``mx.array`` or a numpy array (a memmap slice works)."""

    data: Any
    ggml_type: GGMLType

    def __post_init__(self):
        qtype, _ = row_blocks(self.ggml_type, self.data.shape[-1])  # ValueError on a partial block
        object.__setattr__(self, "ggml_type", qtype)

    @property
    def cols(self) -> int:
        return row_blocks(self.ggml_type, self.data.shape[-1])[1] * BLOCK[self.ggml_type][0]

    @property
    def rows(self) -> int:
        return self.data.shape[-2]

    @property
    def n_experts(self) -> int:
        """Experts in a stack; 0 for a plain matrix."""
        return self.data.shape[0] if self.data.ndim == 3 else 0

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class DenseWeight(Protocol):
    """A model matrix ``W [rows, cols]`` as the runtime holds it (``runtime.weights.Matrix``):
    ``data`` as stored (f32/f16 ``[rows, cols]``, or raw blocks ``[rows, row_bytes]`` uint8)."""

    data: mx.array
    ggml_type: int

    def __call__(self, x: mx.array) -> mx.array: ...  # x @ W.T

    def dense(self) -> mx.array: ...  # W widened to f32


def attend(q: mx.array, keys: mx.array, bias: mx.array, sinks: mx.array) -> mx.array:
    """Softmax attention with per-head sinks; K = V = ``keys`` [N, hd]; q [T, H, hd]; bias [T, N]."""
    T, H, hd = q.shape
    s = (q.reshape(T * H, hd) @ keys.T).reshape(T, H, -1) * (hd ** -0.5) + bias[:, None, :]
    sink = sinks[None, :, None]
    m = mx.maximum(mx.max(s, axis=-1, keepdims=True), sink)
    e = mx.exp(s - m)
    denom = mx.sum(e, axis=-1, keepdims=True) + mx.exp(sink - m)  # the sink takes mass, adds no value
    return (e.reshape(T * H, -1) @ keys).reshape(T, H, hd) / denom


class Backend:
    """Base class: the operations every implementation provides (see the module doc)."""

    name = "abstract"
    host_moe = False
    traceable = True
    expand_budget = 0  # bytes of non-expert weights to widen to f32 at load (runtime/weights.py says why)
    device = mx.gpu  # where MLX runs for this backend (``backend.select`` switches to it)

    @contextmanager
    def temporaries_kept(self, nbytes: int):
        """While inside, MLX's allocator keeps up to ``nbytes`` of freed buffers for reuse (its
        cache limit, raised, never lowered, at most a quarter of its memory limit); on leaving,
        the old limit returns and what was kept beyond it goes back to the OS. Its CPU default
        is 32 MiB, so each larger temporary of a prefill chunk was a fresh mapping whose pages
        the kernel zeroed on first touch: 8.6% of a 512-token mini-flash prefill's samples
        (perf). Metal's default already keeps up to its memory limit: nothing changes there."""
        want = min(int(nbytes), mx.get_memory_limit() // 4)
        previous = mx.set_cache_limit(1 << 62)  # MLX has no getter, and a lower limit frees cached buffers
        mx.set_cache_limit(max(previous, want))
        try:
            yield
        finally:
            mx.set_cache_limit(previous)

    # -- the model's plain f32 work: MLX here, inside or outside the compiled decode step --------

    def dense(self, a: mx.array, b: mx.array) -> mx.array:
        """``a @ b`` for a 2-D ``a``. An implementation may run a product with many rows
        elsewhere (evaluating ``a`` and ``b``): only host-paced code (prefill) passes many rows."""
        return a @ b

    def attend(self, q: mx.array, keys: mx.array, bias: mx.array, sinks: mx.array) -> mx.array:
        """Attention with sinks (``attend`` above), traceable: the decode step calls it."""
        return attend(q, keys, bias, sinks)

    def attend_chunk(self, q: mx.array, keys: mx.array, bias: mx.array, sinks: mx.array) -> mx.array:
        """The same for a block of prefill queries; host-paced, so it may evaluate its inputs."""
        return self.attend(q, keys, bias, sinks)

    def attention_decode(self, step: DecodeStep, shape: DecodeShape) -> tuple[mx.array, list[mx.array]]:
        """One token's attention after the dense projections (``attention_decode.attention_decode``):
        -> (output [1, n_head, head_dim], new state arrays). Traceable: the decode step calls it.
        Here MLX ops, ~105-255 graph nodes a layer; the CPU backend fuses it into one, the GPU
        backends into a few (``gpu.GpuBackend.attention_decode``)."""
        return attn_decode.attention_decode(step, shape, self.attend)

    def hc_pre(self, X: mx.array, fn: DenseWeight, scale: mx.array, base: mx.array, params: HcParams
               ) -> tuple[mx.array, mx.array, mx.array]:
        """The hyper-connection input step (``hyper.hc_pre``): X [T, hc, D] -> (x_in [T, D],
        post [T, hc], comb [T, hc, hc]), ``fn`` the [(2 + hc) * hc, hc * D] mix matrix.
        Here MLX ops, ~100 graph nodes a call; backends fuse it into one."""
        return hyper.hc_pre(X, lambda f: self.dense(f, fn.dense().T), scale, base, params)

    def hc_pre_norm(self, X: mx.array, fn: DenseWeight, scale: mx.array, base: mx.array, params: HcParams,
                    norm: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """``hc_pre`` with the sublayer's RMS norm (weight ``norm``) applied to x_in: the input
        the sublayer reads. Here the two steps; backends may make it one."""
        x_in, post, comb = self.hc_pre(X, fn, scale, base, params)
        return self.rmsnorm(x_in, norm, params.rms_eps), post, comb

    def hc_post(self, y: mx.array, X: mx.array, post: mx.array, comb: mx.array) -> mx.array:
        """The hyper-connection output step (``hyper.hc_post``): X' [T, hc, D] from the
        sublayer's output y [T, D] and ``hc_pre``'s post and comb."""
        return hyper.hc_post(y, X, post, comb)

    def rmsnorm(self, x: mx.array, weight: mx.array, eps: float) -> mx.array:
        """``rowops.rmsnorm`` over the last axis: ``weight * x / sqrt(mean(x^2) + eps)``.
        Here MLX ops, three graph nodes a call (square, sum, the fused rest); backends fuse it into one."""
        return rowops.rmsnorm(x, weight, eps)

    def norm_rope(self, x: mx.array, cos: mx.array, sin: mx.array, eps: float | None = None,
                  weight: mx.array | None = None, sign: float = 1.0) -> mx.array:
        """A prefill chunk's rows [T, heads, n] or [T, n]: RMS-normalized first when ``eps`` is
        given (times ``weight`` when given), then the trailing 2 * half values of each row
        rotated by token t's ``cos``, ``sin`` [T, half] (``sign`` -1 undoes the rotation). Here
        MLX ops; backends may make it one pass."""
        if eps is not None:
            x = rowops.rms(x, eps) if weight is None else rowops.rmsnorm(x, weight, eps)
        if x.ndim == 3:
            cos, sin = cos[:, None], sin[:, None]
        return rowops.rope(x, cos, sin if sign == 1.0 else -sin)

    def pool_windows(self, kv: mx.array, sc: mx.array, n: int, ratio: int, dim: int) -> mx.array:
        """A prefill chunk's closed compressor windows: ``n`` rows [n, dim], each window's slots
        pooled by a per-dimension softmax (``attention_decode.pool_windows``). Here MLX ops;
        backends may make it one pass."""
        return attn_decode.pool_windows(kv, sc, n, ratio, dim)

    def route(self, logits: mx.array, k: int, bias: mx.array | None = None, chosen: mx.array | None = None,
              norm: bool = True, scale: float = 1.0) -> tuple[mx.array, mx.array]:
        """The router's choice from its logits [T, n_expert] (§3.8) -> (expert ids int32 [T, k],
        weights f32 [T, k]). Scores are sqrt(softplus(logits)); the ids are the k best of
        scores + ``bias`` (the bias selects, it never weighs), larger first and the lower id
        first among equals, or ``chosen`` [T, k] as given (hash layers pick by token id). The
        order is part of the contract: the experts' outputs are summed in it, so every backend
        gives the same bits. The weights are the chosen scores, divided by their sum (not below
        ``ROUTER_FLOOR``) when ``norm``, times ``scale``. Here MLX ops, seven graph nodes a
        call with a bias; backends may fuse it into one."""
        scores = mx.sqrt(rowops.softplus(logits))
        if chosen is None:  # a stable sort: equal keys keep the lower id first
            chosen = mx.argsort(-(scores + bias), axis=-1)[:, :k]
        w = mx.take_along_axis(scores, chosen, axis=-1)
        if norm:
            w = w / mx.maximum(mx.sum(w, axis=-1, keepdims=True), ROUTER_FLOOR)
        return chosen.astype(mx.int32), w * scale

    def matmuls(self, x: mx.array, ws: list[DenseWeight]) -> list[mx.array]:
        """``[x @ W.T for W in ws]``: several products of one input (a decode step's attention
        projections). Here one product each; backends may make them one node."""
        return [w(x) for w in ws]

    def swiglu_ffn(self, x: mx.array, gate: DenseWeight, up: DenseWeight, down: DenseWeight, limit: float,
                   plus: mx.array | None = None) -> mx.array:
        """The shared expert (§3.8): ``down(swiglu(gate(x), up(x), limit))``, plus ``plus`` when
        given (the routed experts' sum). Here three products, the gating's fused node and the
        sum; backends may make it one."""
        y = down(rowops.swiglu(gate(x), up(x), limit))
        return y if plus is None else plus + y

    def logits_head(self, output: DenseWeight) -> Callable[[mx.array], np.ndarray]:
        """The output projection ``y [T, D] -> logits [T, vocab]`` as float32 numpy (the sampler's input)."""
        return lambda y: np.array(output(y), dtype=np.float32)

    def dequantize(self, w: QTensor, experts: mx.array | None = None) -> mx.array:
        raise NotImplementedError

    def matmul(self, x: mx.array, w: QTensor) -> mx.array:
        """``x @ W.T`` for ``w`` as stored, or as ``pack`` re-laid it."""
        raise NotImplementedError

    def grouped_matmul(self, x: mx.array, w: DenseWeight, groups: int | None = None) -> mx.array:
        """``x [T, G, cols]`` times ``W [G * R, cols]`` by groups: group g's R rows multiply
        ``x[:, g]`` -> ``[T, G * R]`` (the attention output's low-rank step). With ``groups``,
        x is any ``[T, ...]`` whose trailing elements are the G slices side by side."""
        if groups is not None:
            x = x.reshape(x.shape[0], groups, -1)
        G = x.shape[1]
        wg = w.dense().reshape(G, -1, x.shape[2])
        return mx.concatenate([self.dense(x[:, g], wg[g].T) for g in range(G)], axis=-1)

    def widens(self, ggml_type: int) -> bool:
        """Whether widening a dense matrix of this encoding to f32 at load (within ``expand_budget``)
        makes its products faster here."""
        return True

    def expert_stack(self, raw: np.ndarray):
        """What a routed-expert stack's bytes (``[n_expert, rows, row_bytes]`` uint8, a view of
        the model file's mapping) are kept as for ``moe``: an ``mx.array`` copy unless this
        backend's expert kernels read the mapping in place."""
        return mx.array(raw)

    def pack(self, w: QTensor):
        """The form a dense matrix is kept in, if not as stored (None): made once at load,
        passed to ``matmul`` instead of ``w``, and it has a ``dequantize()``."""
        return None

    def moe(self, x: mx.array, ids: mx.array, weights: mx.array, gate: QTensor, up: QTensor,
            down: QTensor, limit: float) -> mx.array:
        raise NotImplementedError

    streams_experts = False  # whether ``moe_slots`` works (SSD expert streaming needs it)
    device_banks = False  # the slot banks are MLX arrays on the device, not host memory

    def moe_slots(self, x, ids: np.ndarray, weights, gate: QTensor, up: QTensor, down: QTensor, limit: float,
                  slot_of: np.ndarray, out):
        """``moe`` over banks of resident experts ``[S, rows, row_bytes]``: expert ``e`` is bank
        row ``slot_of[e]``, ``-1`` leaves its pairs out, and the sums add onto ``out``
        (float32 [T, D]), which is returned. Host backends take numpy arrays throughout and
        add in place; a selection split into rounds of ascending expert ids gives the bits of
        one ``moe`` call over the whole stacks. ``device_banks`` backends take MLX arrays and
        banks and return a new array (``out`` None: the sum alone, the bits of one ``moe``)."""
        raise NotImplementedError


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run in this process (no such device or MLX entry point)."""
