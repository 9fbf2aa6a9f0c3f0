"""The DeepSeek V4 forward pass in MLX; read beside docs/spec/v4-model.md §3.

    X = hc copies of embed(t)                          §3.2
    for each layer:
        X = hc_post(attention(hc_pre(X)), X)           §3.3-3.7 (attention.py)
        X = hc_post(moe(hc_pre(X)), X)                 §3.8
    logits = output(norm(hc_head(X)))                  §3.9

``prefill`` runs one chunk layer-major (every token through layer 0, then layer
1, ...) on host-known positions; ``decode`` runs one token with the position
inside the graph and is compiled once per state shape, so a decode step is a
single fixed graph with no Python work per layer.
"""

from __future__ import annotations

import copy
import time
from functools import cached_property

import mlx.core as mx
import numpy as np

from magnetar.kernels.backend import Backend, backend

from .attention import Attention, Precision
from .config import ModelConfig
from .gguf_read import ModelFile
from .kv_state import KVState, LayerState
from .ops import hc_post, hc_pre, on_cpu, rms, rmsnorm, softplus, swiglu
from .weights import Weights

ROUTER_FLOOR = 6.103515625e-5  # ds4's lower bound on the top-k weight sum


class MoE:
    """Routed experts (hash-routed on the first layers) plus the shared expert (§3.8)."""

    def __init__(self, w: Weights, cfg: ModelConfig, il: int):
        p = f"blk.{il}."
        self.cfg = cfg
        self.router = w.matrix(p + "ffn_gate_inp.weight")
        self.hash = cfg.is_hash_layer(il)
        if self.hash:
            self.tid2eid = w.int_table(p + "ffn_gate_tid2eid.weight")  # [vocab, top_k]
        else:
            self.bias = w.vector(p + "exp_probs_b.bias")
        self.kernels = w.kernels
        self.observer = None  # called with (xn, ids, weights) in prefill: imatrix collection
        self.gate, self.up = w.experts(p + "ffn_gate_exps.weight"), w.experts(p + "ffn_up_exps.weight")
        self.down = w.experts(p + "ffn_down_exps.weight")
        self.limit = cfg.swiglu_clamp[il]
        self.shared = [w.matrix(p + f"ffn_{k}_shexp.weight") for k in ("gate", "up", "down")]

    def route(self, xn: mx.array, ids: mx.array) -> tuple[mx.array, mx.array]:
        """Expert ids [T, k] and their weights: sqrt(softplus) scores, bias for selection only."""
        k = self.cfg.n_expert_used
        scores = mx.sqrt(softplus(self.router(xn)))
        if self.hash:
            idx = mx.take(self.tid2eid, ids, axis=0)  # by the input token id, never by position
        else:
            idx = mx.argpartition(-(scores + self.bias), k - 1, axis=-1)[:, :k]
        w = mx.take_along_axis(scores, idx, axis=-1)
        if self.cfg.expert_weights_norm:
            w = w / mx.maximum(mx.sum(w, axis=-1, keepdims=True), ROUTER_FLOOR)
        return idx, w * self.cfg.expert_weights_scale

    def shared_expert(self, xn: mx.array) -> mx.array:
        gate, up, down = self.shared
        return down(swiglu(gate(xn), up(xn), self.limit))

    def decode(self, xn: mx.array, ids: mx.array) -> mx.array:
        """One token, inside the compiled step: the kernels expand only its k experts."""
        idx, w = self.route(xn, ids)
        return self.kernels.moe(xn, idx, w, self.gate, self.up, self.down, self.limit) + self.shared_expert(xn)

    def prefill(self, xn: mx.array, ids: mx.array) -> mx.array:
        """A chunk: the kernels group the (token, slot) pairs by expert."""
        idx, w = self.route(xn, ids)
        if self.observer:
            self.observer(xn, idx, w)
        return self.kernels.moe(xn, idx, w, self.gate, self.up, self.down, self.limit) + self.shared_expert(xn)


class HyperConnection:
    def __init__(self, w: Weights, prefix: str):
        self.fn = w.matrix(prefix + "_fn.weight")
        self.scale, self.base = w.vector(prefix + "_scale.weight"), w.vector(prefix + "_base.weight")

    def pre(self, X: mx.array, cfg: ModelConfig) -> tuple[mx.array, mx.array, mx.array]:
        return hc_pre(X, self.fn.dense(), self.scale, self.base, cfg)


class Layer:
    def __init__(self, w: Weights, cfg: ModelConfig, il: int, prec: Precision):
        p = f"blk.{il}."
        self.cfg = cfg
        self.attn_hc, self.ffn_hc = HyperConnection(w, p + "hc_attn"), HyperConnection(w, p + "hc_ffn")
        self.attn_norm, self.ffn_norm = w.vector(p + "attn_norm.weight"), w.vector(p + "ffn_norm.weight")
        self.attn = Attention(w, cfg, il, prec)
        self.moe = MoE(w, cfg, il)

    def prefill(self, X: mx.array, ids: mx.array, pos0: int, st: LayerState) -> mx.array:
        eps = self.cfg.rms_eps
        x_in, post, comb = self.attn_hc.pre(X, self.cfg)
        X = hc_post(self.attn.prefill(rmsnorm(x_in, self.attn_norm, eps), pos0, st), X, post, comb)
        x_in, post, comb = self.ffn_hc.pre(X, self.cfg)
        return hc_post(self.moe.prefill(rmsnorm(x_in, self.ffn_norm, eps), ids), X, post, comb)

    def decode(self, X: mx.array, ids: mx.array, p: mx.array, st: LayerState) -> mx.array:
        X = self.decode_attention(X, p, st)
        xn, post, comb = self.ffn_input(X)
        return hc_post(self.moe.decode(xn, ids), X, post, comb)

    def decode_attention(self, X: mx.array, p: mx.array, st: LayerState) -> mx.array:
        x_in, post, comb = self.attn_hc.pre(X, self.cfg)
        return hc_post(self.attn.decode(rmsnorm(x_in, self.attn_norm, self.cfg.rms_eps), p, st), X, post, comb)

    def ffn_input(self, X: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """The normed MoE input and the hyper-connection weights that fold its output back."""
        x_in, post, comb = self.ffn_hc.pre(X, self.cfg)
        return rmsnorm(x_in, self.ffn_norm, self.cfg.rms_eps), post, comb


class Model:
    def __init__(self, mf: ModelFile, precision: str = "official", expand_budget: int = 0,
                 kernels: Backend | None = None):
        if precision not in ("official", "reference"):
            raise ValueError(f"precision must be 'official' or 'reference', not {precision!r}")
        self.kernels = kernels or backend("auto")
        w = Weights(mf, self.kernels, expand_budget)
        cfg = self.cfg = mf.config
        self.precision = precision
        prec = Precision(precision == "official", cfg.head_dim - cfg.rope_dim)
        self.embedding = w.matrix("token_embd.weight").data  # [vocab, D] as stored (f16 or f32)
        self.layers = [Layer(w, cfg, il, prec) for il in range(cfg.n_layer)]
        self.head_fn = w.matrix("output_hc_fn.weight")
        self.head_base, self.head_scale = w.vector("output_hc_base.weight"), w.vector("output_hc_scale.weight")
        self.norm = w.vector("output_norm.weight")
        self.output = w.matrix("output.weight")
        self.last_decode_build_seconds = 0.0
        self._template = KVState.empty(cfg, 1).layers  # which arrays each layer's state holds
        self._decode = mx.compile(self._decode_graph)
        self._segments = None  # the cut decode's compiled pieces, built at first use (host_moe kernels)

    def embed(self, ids: mx.array) -> mx.array:
        e = mx.take(self.embedding, ids, axis=0).astype(mx.float32)
        return mx.broadcast_to(e[:, None, :], (e.shape[0], self.cfg.hc, e.shape[1]))

    def head(self, X: mx.array) -> mx.array:
        """Collapse the streams with sigmoid weights (no Sinkhorn, no post) and norm (§3.9);
        ``project`` then applies the output matrix."""
        cfg, T = self.cfg, X.shape[0]
        m = rms(X.reshape(T, -1), cfg.rms_eps) @ self.head_fn.dense().T
        pre = mx.sigmoid(m * self.head_scale[0] + self.head_base) + cfg.hc_eps
        y = mx.sum(pre[:, :, None] * X, axis=1)
        return rmsnorm(y, self.norm, cfg.rms_eps)

    def project(self, y: mx.array) -> np.ndarray:
        """Logits [T, vocab] as float32 numpy.

        On the CPU, MLX's bundled reference BLAS runs this [D -> 129280] product 3-20x
        slower than numpy's OpenBLAS, and it is the largest matrix of a small model, so
        the CPU path keeps one f32 copy of the output matrix for numpy (shared with MLX
        when the matrix is f32 already). Other devices keep it quantized and multiply in MLX.
        """
        if not on_cpu():
            return np.array(self.output(y), dtype=np.float32)
        return np.array(y, dtype=np.float32) @ self._output_f32.T

    @cached_property
    def _output_f32(self) -> np.ndarray:
        return np.asarray(self.output.dense())  # a view when the matrix is already f32

    def prefill(self, ids: list[int], state: KVState, all_logits: bool = False,
                on_layer=None) -> np.ndarray:
        """Run one chunk after ``state`` (layer-major); logits of the last token, or of every token."""
        pos0 = state.n_tokens
        state.reserve(pos0 + len(ids))
        tokens = mx.array(ids, dtype=mx.int32)
        X = self.embed(tokens)
        for il, layer in enumerate(self.layers):
            X = layer.prefill(X, tokens, pos0, state.layers[il])
            mx.eval(X, state.layers[il].arrays())
            if on_layer:
                on_layer(il)
        state.tokens.extend(ids)
        return self.project(self.head(X if all_logits else X[-1:]))

    def decode(self, token: int, state: KVState) -> np.ndarray:
        """One token after ``state``: logits [vocab]; the state advances in place."""
        p = state.n_tokens
        state.reserve(p + 1)
        t0 = time.perf_counter()
        tok, pos = mx.array([token], dtype=mx.int32), mx.array(p, dtype=mx.int32)
        if self.kernels.host_moe:
            y = self._decode_cut(tok, pos, state)
        else:
            out = self._decode(tok, pos, *state.arrays())
            state.replace(list(out[1:]))  # drops the old buffers before eval, so updates can be in place
            y = out[0]
        self.last_decode_build_seconds = time.perf_counter() - t0  # host time to build and dispatch
        state.tokens.append(token)
        mx.eval(y, state.arrays())  # the new state too, so the next step's graph does not chain onto this one
        return self.project(y)[0]

    def _decode_graph(self, token: mx.array, p: mx.array, *arrays: mx.array) -> tuple[mx.array, ...]:
        layers = [copy.copy(st) for st in self._template]
        it = 0
        for st in layers:
            n = len(st.arrays())
            st.replace(list(arrays[it:it + n]))
            it += n
        X = self.embed(token)
        for layer, st in zip(self.layers, layers):
            X = layer.decode(X, token, p, st)
        return (self.head(X), *[a for st in layers for a in st.arrays()])

    def _decode_cut(self, token: mx.array, p: mx.array, state: KVState) -> mx.array:
        """Decode for kernels whose ``moe`` runs on the host: per layer, one compiled
        segment from the previous MoE's fold-back to this MoE's routing, then the
        host kernel on evaluated inputs (each eval is the hand-off it needs)."""
        if self._segments is None:
            wrap = mx.compile if self.kernels.traceable else (lambda f: f)
            self._segments = [wrap(self._segment(il)) for il in range(len(self.layers))]
            self._finish = wrap(self._finish_graph)
        carry = (self.embed(token),)  # then (X, routed, xn, post, comb) from layer 1 on
        for il, (layer, segment) in enumerate(zip(self.layers, self._segments)):
            st = state.layers[il]
            X, xn, idx, w, post, comb, *arrays = segment(*carry, token, p, *st.arrays())
            st.replace(arrays)
            mx.eval(xn, idx, w, *arrays)
            moe = layer.moe
            carry = (X, moe.kernels.moe(xn, idx, w, moe.gate, moe.up, moe.down, moe.limit), xn, post, comb)
        return self._finish(*carry)

    def _segment(self, il: int):
        prev, layer, template = self.layers[il - 1] if il else None, self.layers[il], self._template[il]
        n_carry = 1 if prev is None else 5

        def run(*args):
            X, (token, p), arrays = args[0], args[n_carry:n_carry + 2], args[n_carry + 2:]
            if prev is not None:  # fold the previous layer's MoE output back into the streams
                routed, xn, post, comb = args[1:5]
                X = hc_post(routed + prev.moe.shared_expert(xn), X, post, comb)
            st = copy.copy(template)
            st.replace(list(arrays))
            X = layer.decode_attention(X, p, st)
            xn, post, comb = layer.ffn_input(X)
            idx, w = layer.moe.route(xn, token)
            return (X, xn, idx, w, post, comb, *st.arrays())

        return run

    def _finish_graph(self, X, routed, xn, post, comb) -> mx.array:
        X = hc_post(routed + self.layers[-1].moe.shared_expert(xn), X, post, comb)
        return self.head(X)
