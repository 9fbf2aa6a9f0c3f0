"""The DeepSeek V4 forward pass in MLX; read beside docs/spec/v4-model.md §3.

    X = hc copies of embed(t)                          §3.2
    for each layer:
        X = hc_post(attention(hc_pre(X)), X)           §3.3-3.7 (attention.py)
        X = hc_post(moe(hc_pre(X)), X)                 §3.8
    logits = output(norm(hc_head(X)))                  §3.9

``prefill`` runs one chunk layer-major (every token through layer 0, then layer
1, ...) on host-known positions; ``decode`` runs one token with the position
inside the graph, through the one decode step of ``step.py``, compiled as the
kernel backend needs. Where each piece of work runs (MLX, numpy's BLAS, GPU
kernels) is the backend's choice, not this file's.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from magnetar.kernels.backend import Backend, backend

from .attention import Attention
from .config import ModelConfig
from .errors import UsageError
from .expert_cache import ExpertCache, routed_tensors
from .gguf_read import ModelFile
from .kv_state import KVState, LayerState
from .ops import hc_params, rms
from .precision import Precision
from .step import DecodeStep
from .weights import Weights


def prefill_temporaries(cfg: ModelConfig, tokens: int) -> int:
    """Bytes of MLX temporaries a prefill chunk of ``tokens`` frees layer after layer, over-
    estimated: a few copies of the hc streams and of the heads' rows, the attention's score rows
    and the indexer's scores over the chunk's compressed positions (one per 4 tokens). Measured
    (MLX's cache after a prefill, no limit), KiB per token: 676 and 650 at Flash widths with 512
    and 2048 tokens (this gives 1152 and 1344), 35.7 on tiny with 2048 (this gives 41)."""
    streams, heads = cfg.hc * cfg.d_model, cfg.n_head * cfg.head_dim
    scores = cfg.n_head * (cfg.window + cfg.indexer_top_k) + cfg.indexer_heads * (tokens // 4)
    per_token = 4 * streams + 4 * heads + 2 * scores
    return 4 * tokens * per_token


class MoE:
    """Routed experts (hash-routed on the first layers) plus the shared expert (§3.8)."""

    def __init__(self, w: Weights, cfg: ModelConfig, il: int, stream: ExpertCache | None = None):
        p = f"blk.{il}."
        self.cfg = cfg
        self.il, self.stream = il, stream  # stream: routed experts read from the file through slot banks
        self.router = w.matrix(p + "ffn_gate_inp.weight")
        self.hash = cfg.is_hash_layer(il)
        if self.hash:
            self.tid2eid = w.int_table(p + "ffn_gate_tid2eid.weight")  # [vocab, top_k]
        else:
            self.bias = w.vector(p + "exp_probs_b.bias")
        self.kernels = w.kernels
        self.observer = None  # called with (xn, ids, weights) in prefill: imatrix collection
        if stream is None:
            self.gate, self.up = w.experts(p + "ffn_gate_exps.weight"), w.experts(p + "ffn_up_exps.weight")
            self.down = w.experts(p + "ffn_down_exps.weight")
        self.limit = cfg.swiglu_clamp[il]
        self.shared = [w.matrix(p + f"ffn_{k}_shexp.weight") for k in ("gate", "up", "down")]

    def route(self, xn: mx.array, ids: mx.array) -> tuple[mx.array, mx.array]:
        """Expert ids [T, k] and their weights: sqrt(softplus) scores, bias for selection only
        (the backend's ``route``, one node on the CPU)."""
        cfg = self.cfg
        if self.hash:  # by the input token id, never by position
            bias, chosen = None, mx.take(self.tid2eid, ids, axis=0)
        else:
            bias, chosen = self.bias, None
        return self.kernels.route(self.router(xn), cfg.n_expert_used, bias, chosen, cfg.expert_weights_norm,
                                  cfg.expert_weights_scale)

    def shared_expert(self, xn: mx.array, routed: mx.array) -> mx.array:
        """The shared expert's output plus the routed experts' (one node on the CPU)."""
        return self.kernels.swiglu_ffn(xn, *self.shared, self.limit, plus=routed)

    def routed(self, xn: mx.array, idx: mx.array, w: mx.array) -> mx.array:
        """The selected experts, summed with their weights (the kernels' ``moe``)."""
        if self.stream is not None:  # which experts must be resident is decided on the host
            return self.stream.moe(self.il, self.kernels, xn, np.asarray(idx), w, self.limit)
        return self.kernels.moe(xn, idx, w, self.gate, self.up, self.down, self.limit)

    def prefill(self, xn: mx.array, ids: mx.array) -> mx.array:
        """A chunk: the kernels group the (token, slot) pairs by expert."""
        idx, w = self.route(xn, ids)
        if self.observer:
            self.observer(xn, idx, w)
        return self.shared_expert(xn, self.routed(xn, idx, w))


class HyperConnection:
    """The streams' mixing around one sublayer (§3.3) and the sublayer's input norm."""

    def __init__(self, w: Weights, prefix: str, norm: str):
        self.fn = w.matrix(prefix + "_fn.weight")
        self.scale, self.base = w.vector(prefix + "_scale.weight"), w.vector(prefix + "_base.weight")
        self.norm = w.vector(norm)  # the sublayer's RMS norm weight
        self.kernels, self.params = w.kernels, hc_params(w.cfg)

    def pre(self, X: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """(rmsnorm(x_in), post, comb): ``ops.hc_pre``, then the sublayer's norm, as the kernel
        backend runs them (one node on the CPU)."""
        return self.kernels.hc_pre_norm(X, self.fn, self.scale, self.base, self.params, self.norm)

    def post(self, y: mx.array, X: mx.array, post: mx.array, comb: mx.array) -> mx.array:
        """``ops.hc_post``: fold the sublayer's output back into the streams."""
        return self.kernels.hc_post(y, X, post, comb)


class Layer:
    def __init__(self, w: Weights, cfg: ModelConfig, il: int, prec: Precision, stream: ExpertCache | None = None):
        p = f"blk.{il}."
        self.cfg = cfg
        self.attn_hc = HyperConnection(w, p + "hc_attn", p + "attn_norm.weight")
        self.ffn_hc = HyperConnection(w, p + "hc_ffn", p + "ffn_norm.weight")
        self.attn = Attention(w, cfg, il, prec)
        self.moe = MoE(w, cfg, il, stream)

    def prefill(self, X: mx.array, ids: mx.array, pos0: int, st: LayerState) -> mx.array:
        xn, post, comb = self.attn_hc.pre(X)
        X = self.attn_hc.post(self.attn.prefill(xn, pos0, st), X, post, comb)
        xn, post, comb = self.ffn_hc.pre(X)
        return self.ffn_hc.post(self.moe.prefill(xn, ids), X, post, comb)

    def decode_to_experts(self, X: mx.array, ids: mx.array, p: mx.array, st: LayerState
                          ) -> tuple[mx.array, mx.array, mx.array, mx.array, mx.array, mx.array]:
        """One token up to the routed experts: the attention sublayer, then the MoE input and
        its routing -> (X, xn, expert ids, expert weights, post, comb)."""
        xn, post, comb = self.attn_hc.pre(X)
        X = self.attn_hc.post(self.attn.decode(xn, p, st), X, post, comb)
        xn, post, comb = self.ffn_hc.pre(X)
        idx, w = self.moe.route(xn, ids)
        return X, xn, idx, w, post, comb

    def decode_from_experts(self, routed: mx.array, X: mx.array, xn: mx.array, post: mx.array,
                            comb: mx.array) -> mx.array:
        """Add the shared expert to the routed experts' sum and fold it back into the streams."""
        return self.ffn_hc.post(self.moe.shared_expert(xn, routed), X, post, comb)


class Model:
    def __init__(self, mf: ModelFile, precision: str = "official", expand_budget: int | None = None,
                 kernels: Backend | None = None, span: tuple[int, int] | None = None,
                 expert_cache: int | None = None):
        """``expand_budget``: bytes of non-expert weights to widen to f32 at load (None: as much
        as the kernel backend finds worth it, see ``Weights``). ``span`` (a, b): only layers
        a..b-1, a pipeline stage (runtime/pipeline.py); the embedding is loaded only by the
        first stage and the head only by the last, so each stage maps only its slice."""
        cfg = self.cfg = mf.config
        prec = Precision.named(precision, cfg.head_dim - cfg.rope_dim)
        self.kernels = kernels or backend("auto")
        w = Weights(mf, self.kernels, self.kernels.expand_budget if expand_budget is None else expand_budget)
        self.precision = precision
        self.span = range(*(span or (0, cfg.n_layer)))
        self.first, self.last = self.span.start == 0, self.span.stop == cfg.n_layer
        if self.first:
            self.embedding = w.matrix("token_embd.weight").data  # [vocab, D] as stored (f16 or f32)
        self.experts = self._expert_cache(mf, expert_cache) if expert_cache is not None else None
        self.layers = [Layer(w, cfg, il, prec, self.experts) for il in self.span]
        if self.last:
            # Widened once (256 KB at Flash): the backend keeps F16 as stored for its own products,
            # but here MLX's f32 product would widen it again on every decode token.
            self.head_fn = w.matrix("output_hc_fn.weight").dense()
            mx.eval(self.head_fn)
            self.head_base, self.head_scale = w.vector("output_hc_base.weight"), w.vector("output_hc_scale.weight")
            self.norm = w.vector("output_norm.weight")
            self.output = w.matrix("output.weight")
            self.project = self.kernels.logits_head(self.output)  # y [T, D] -> float32 numpy logits [T, vocab]
        self.step = DecodeStep(self)
        self.last_decode_build_seconds = 0.0

    def _expert_cache(self, mf: ModelFile, budget: int) -> ExpertCache:
        """Routed experts stay in the file and stream through ``budget`` bytes of slot banks."""
        if not self.kernels.streams_experts:
            raise UsageError(f"--expert-cache needs kernels that read experts from slot banks; the "
                             f"{self.kernels.name} backend has none here", "use --backend cpu with a C compiler")
        device = self.kernels.device_banks  # a decode step's experts all resident: one kernel call
        return ExpertCache(mf.path, routed_tensors(mf, self.span), budget, device=device,
                           min_slots=self.cfg.n_expert_used if device else 1)

    def _prefetch_hash_layers(self, tokens: list[int]) -> None:
        """Hash layers route by token id: their experts can be read before the layer runs."""
        for layer in self.layers:
            if layer.moe.hash:
                self.experts.prefetch(layer.moe.il, np.asarray(layer.moe.tid2eid)[tokens])

    def embed(self, ids: mx.array) -> mx.array:
        e = mx.take(self.embedding, ids, axis=0).astype(mx.float32)
        return mx.broadcast_to(e[:, None, :], (e.shape[0], self.cfg.hc, e.shape[1]))

    def head(self, X: mx.array) -> mx.array:
        """Collapse the streams with sigmoid weights (no Sinkhorn, no post) and norm (§3.9);
        ``project`` then applies the output matrix."""
        cfg, T = self.cfg, X.shape[0]
        m = rms(X.reshape(T, -1), cfg.rms_eps) @ self.head_fn.T
        pre = mx.sigmoid(m * self.head_scale[0] + self.head_base) + cfg.hc_eps
        y = mx.sum(pre[:, :, None] * X, axis=1)
        return self.kernels.rmsnorm(y, self.norm, cfg.rms_eps)

    def prefill(self, ids: list[int], state: KVState, all_logits: bool = False,
                on_layer=None, X: mx.array | None = None) -> "np.ndarray | mx.array":
        """Run one chunk after ``state`` (layer-major); logits of the last token, or of every token.
        A stage that is not the first takes the previous stage's hidden state ``X`` [T, hc, D];
        one that is not the last returns its own (evaluated) instead of logits."""
        pos0 = state.n_tokens
        state.reserve(pos0 + len(ids))
        with self.kernels.temporaries_kept(prefill_temporaries(self.cfg, len(ids))):  # layer 2 on reuses layer 1's
            tokens = mx.array(ids, dtype=mx.int32)
            if self.experts:
                self._prefetch_hash_layers(ids)
            X = self.embed(tokens) if X is None else X
            for il, layer in zip(self.span, self.layers):
                X = layer.prefill(X, tokens, pos0, state.layers[il])
                mx.eval(X, state.layers[il].arrays())
                if on_layer:
                    on_layer(il)
        state.tokens.extend(ids)
        if not self.last:
            return X
        return self.project(self.head(X if all_logits else X[-1:]))

    def decode(self, token: int, state: KVState, X: mx.array | None = None) -> "np.ndarray | mx.array":
        """One token after ``state``: logits [vocab] (a stage that is not the last: its hidden state
        [1, hc, D], from the previous stage's ``X`` if not the first); the state advances in place."""
        p = state.n_tokens
        state.reserve(p + 1)
        if self.experts:
            self._prefetch_hash_layers([token])
        y = self.step(mx.array([token], dtype=mx.int32), mx.array(p, dtype=mx.int32), state, X)
        self.last_decode_build_seconds = self.step.host_seconds  # host time to build and dispatch
        state.tokens.append(token)
        mx.eval(y, state.arrays())  # the new state too, so the next step's graph does not chain onto this one
        if self.experts:
            self.experts.token_done()
        return self.project(y)[0] if self.last else y
