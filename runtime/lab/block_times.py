"""``magnetar bench blocks``: one decode token's time split by block, per layer (issue #16).

For each decode token the walk runs the model's own per-layer functions (the
math of ``Layer.decode_to_experts`` / ``decode_from_experts``, runtime/model.py)
one block at a time, evaluating (``mx.eval``) and timing each:

    attn hc_pre   HyperConnection.pre before attention (the attention's input norm included)
    attention     Attention.decode (projections included; KV written)
    attn hc_post  HyperConnection.post after attention
    ffn hc_pre    HyperConnection.pre before the MoE (its input norm included)
    route         MoE.route (expert ids and weights)
    experts       MoE.routed: the routed experts, on the host with native CPU kernels
    shared        MoE.shared_expert, plus the routed experts' sum
    ffn hc_post   HyperConnection.post

then ``head``: Model.head and the output projection to numpy logits. The
embedding lookup (3 nodes) is evaluated untimed. An empty block (one node)
is timed too, outside the sum: the call-and-eval cost every block pays. Blocks are compiled when the
backend is traceable, as the real step's pieces are (runtime/step.py), so
elementwise chains fuse the same way; every block's inputs are evaluated
before its timer starts.

Evaluating every block on its own pays a dispatch and a host round trip per
block that the compiled step (one piece per layer) does not, so the blocks' sum
is not the step's time: each token is also run through the real step
(``Model.decode``) on a second scratch state at the same position, and both
per-token times are reported ("sum of blocks", "compiled step"). The walk's
logits are compared with the step's, so the walk is known to compute the same
token. Both states are scratch ``KVState``s: the engine's live sequence is
untouched. Times are medians over every token of every rep; each rep starts
again from the prompt.
"""

from __future__ import annotations

import copy
import csv
import io
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np

from ..engine import Engine, on_engine_thread
from ..errors import UsageError
from ..fileio import atomic_write_bytes
from ..kv_state import KVState
from .bench import wait_for_quiet

BLOCKS = ("attn hc_pre", "attention", "attn hc_post", "ffn hc_pre", "route", "experts", "shared", "ffn hc_post")
KIND_NAMES = {0: "sliding", 4: "CSA ratio 4", 128: "HCA ratio 128"}
QUIET_BELOW = 0.25  # cores used by other processes (bench --wait-quiet)


@dataclass
class BlockTimes:
    backend: str
    prompt_tokens: int
    tokens: int
    reps: int
    kinds: list[tuple[int, bool]]  # per layer: (compress ratio, hash-routed)
    seconds: dict[tuple[int | str, str], list[float]] = field(default_factory=dict)  # (layer | "head", block)
    walk: list[float] = field(default_factory=list)  # per token: the sum of its blocks
    step: list[float] = field(default_factory=list)  # per token: the compiled step
    logit_gap: float = 0.0  # the largest |walk - step| logit over the largest |step| logit

    def ms(self, layer: int | str, block: str) -> float:
        return 1e3 * statistics.median(self.seconds[layer, block])


class _LayerBlocks:
    """One layer's blocks as functions of arrays (compiled when the backend allows)."""

    def __init__(self, layer, template, wrap: Callable, host_experts: bool):
        def attention(xn, p, *arrays):
            st = copy.copy(template)  # the layer's state over these arrays, as step.py does
            st.replace(list(arrays))
            return (layer.attn.decode(xn, p, st), *st.arrays())

        self.attn_pre, self.attn_post = wrap(layer.attn_hc.pre), wrap(layer.attn_hc.post)
        self.attention, self.ffn_pre, self.route = wrap(attention), wrap(layer.ffn_hc.pre), wrap(layer.moe.route)
        self.experts = layer.moe.routed if host_experts else wrap(layer.moe.routed)
        self.shared, self.ffn_post = wrap(layer.moe.shared_expert), wrap(layer.ffn_hc.post)


class _Walk:
    """The decode token block by block, recording each block's seconds."""

    def __init__(self, model):
        self.model = model
        wrap = mx.compile if model.kernels.traceable else (lambda f: f)
        templates = KVState.empty(model.cfg, 1).layers
        self.blocks = [_LayerBlocks(layer, templates[il], wrap, model.kernels.host_moe)
                       for il, layer in enumerate(model.layers)]
        self.head = wrap(model.head)
        self.empty = wrap(lambda x: -x)  # one node: the cost of a block that does next to nothing
        self.seconds: dict[tuple[int | str, str], list[float]] = defaultdict(list)

    def _timed(self, key, fn, *args, keep: Callable | None = None):
        """``fn(*args)`` evaluated; ``keep(out)`` runs before the eval (it drops the old state's
        buffers, so the attention can write them in place as the real step does)."""
        t0 = time.perf_counter()
        out = fn(*args)
        if keep:
            keep(out)
        mx.eval(*(o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, mx.array)))
        self.seconds[key].append(time.perf_counter() - t0)
        return out

    def token(self, token: int, state: KVState) -> tuple[np.ndarray, float]:
        """Logits after ``token`` and the seconds its blocks took; the state advances."""
        p = state.n_tokens
        state.reserve(p + 1)
        ids, pos = mx.array([token], dtype=mx.int32), mx.array(p, dtype=mx.int32)
        X = self.model.embed(ids)
        mx.eval(X, ids, pos)
        self._timed(("token", "empty block"), self.empty, X)  # before ``start``: not in the sum
        start = {k: len(v) for k, v in self.seconds.items()}
        for il, b in enumerate(self.blocks):
            st = state.layers[il]
            xn, post, comb = self._timed((il, "attn hc_pre"), b.attn_pre, X)
            o, *_ = self._timed((il, "attention"), b.attention, xn, pos, *st.arrays(),
                                keep=lambda out, st=st: st.replace(list(out[1:])))
            X = self._timed((il, "attn hc_post"), b.attn_post, o, X, post, comb)
            xn, post, comb = self._timed((il, "ffn hc_pre"), b.ffn_pre, X)
            idx, w = self._timed((il, "route"), b.route, xn, ids)
            routed = self._timed((il, "experts"), b.experts, xn, idx, w)
            ffn_out = self._timed((il, "shared"), b.shared, xn, routed)
            X = self._timed((il, "ffn hc_post"), b.ffn_post, ffn_out, X, post, comb)
        logits = self._timed(("head", "head"), lambda x: self.model.project(self.head(x)), X)
        state.tokens.append(token)
        spent = sum(sum(v[start.get(k, 0):]) for k, v in self.seconds.items())
        return logits[0], spent


def _prefill(model, ids: list[int], ctx: int, chunk: int) -> KVState:
    state = KVState.empty(model.cfg, ctx)
    for i in range(0, len(ids), chunk):
        model.prefill(ids[i:i + chunk], state)
    return state


def _measure(engine: Engine, prompt: list[int], n_tokens: int, reps: int, quiet: bool,
             progress: Callable[[str], None] | None) -> BlockTimes:
    model = engine.model
    cfg = model.cfg
    result = BlockTimes(model.kernels.name, len(prompt), n_tokens, reps,
                        [(cfg.ratio(il), cfg.is_hash_layer(il)) for il in range(cfg.n_layer)])
    walk = _Walk(model)
    gaps = []
    for rep in range(-1, reps):  # rep -1 compiles the blocks (one token) and is dropped
        if progress:
            progress("warming up (compiling the blocks)" if rep < 0 else f"rep {rep + 1} of {reps}")
        if quiet:
            wait_for_quiet(QUIET_BELOW, 300.0)
        stepped = _prefill(model, prompt, engine.ctx, engine.prefill_chunk)
        walked = _prefill(model, prompt, engine.ctx, engine.prefill_chunk)
        token = int(prompt[-1])
        for i in range(1 if rep < 0 else n_tokens):
            walk_first = i % 2 == 0  # alternate who goes first
            if walk_first:
                walk_logits, walk_s = walk.token(token, walked)
            t0 = time.perf_counter()
            logits = model.decode(token, stepped)
            step_s = time.perf_counter() - t0
            if not walk_first:
                walk_logits, walk_s = walk.token(token, walked)
            gaps.append(float(np.max(np.abs(walk_logits - logits)) / max(float(np.max(np.abs(logits))), 1e-30)))
            if rep >= 0:
                result.walk.append(walk_s)
                result.step.append(step_s)
            token = int(np.argmax(logits))  # greedy: hash routing sees real next tokens
        if rep < 0:
            walk.seconds.clear()
    result.seconds = dict(walk.seconds)
    result.logit_gap = max(gaps)
    return result


def run(engine: Engine, prompt: list[int], n_tokens: int, reps: int, quiet: bool = False,
        progress: Callable[[str], None] | None = None) -> BlockTimes:
    """Time ``n_tokens`` decode tokens after ``prompt``, ``reps`` times, on the engine's thread."""
    if engine.model.experts is not None:  # streamed experts need the host's reads per token
        raise UsageError("bench blocks times experts held in memory", "drop --expert-cache and --hotlist")
    if n_tokens < 1 or reps < 1 or not prompt:
        raise UsageError("--tokens, --reps and --prompt-tokens must be positive")
    if len(prompt) + n_tokens > engine.ctx:
        raise UsageError(f"{len(prompt)} prompt tokens and {n_tokens} decode tokens do not fit --ctx {engine.ctx}",
                         "raise --ctx or lower --prompt-tokens/--tokens")
    return on_engine_thread(_measure, engine, prompt, n_tokens, reps, quiet, progress)


def _kind(ratio: int, hashed: bool) -> str:
    return KIND_NAMES.get(ratio, f"ratio {ratio}") + (", hash" if hashed else "")


def render(r: BlockTimes, model_name: str) -> str:
    """One row per layer kind: the mean over its layers of each layer's median ms per block."""
    by_kind: dict[tuple[int, bool], list[int]] = {}
    for il, kind in enumerate(r.kinds):
        by_kind.setdefault(kind, []).append(il)
    head = ["kind", "layers", *BLOCKS, "layer", "all"]
    rows = []
    for kind, layers in by_kind.items():
        per_block = [statistics.mean(r.ms(il, b) for il in layers) for b in BLOCKS]
        layer_ms = sum(per_block)
        rows.append([_kind(*kind), str(len(layers)), *(f"{v:.3f}" for v in per_block),
                     f"{layer_ms:.3f}", f"{layer_ms * len(layers):.2f}"])
    widths = [max(len(c) for c in col) for col in zip(head, *rows)]

    def align(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    walk, step = 1e3 * statistics.median(r.walk), 1e3 * statistics.median(r.step)
    n_blocks = len(BLOCKS) * len(r.kinds) + 1
    return "\n".join([
        f"decode blocks of {model_name}, backend {r.backend}: median ms over {r.tokens} tokens x {r.reps} reps "
        f"after a {r.prompt_tokens}-token prompt; per layer kind the mean of its layers ('layer': one layer's "
        f"blocks, 'all': every layer of the kind)",
        align(head), align(["-" * w for w in widths]), *map(align, rows),
        f"head (Model.head + output projection): {r.ms('head', 'head'):.3f} ms",
        f"per token: sum of blocks {walk:.2f} ms, compiled step {step:.2f} ms ({walk / step:.2f}x; each block "
        f"evaluated on its own pays a dispatch the compiled step does not)",
        f"an empty block (one compiled call of one node, and its eval) takes {r.ms('token', 'empty block'):.3f} ms; "
        f"the sum holds {n_blocks} blocks",
        f"the blocks' logits are the step's within {r.logit_gap:.1e} of the largest",
    ])


def write_csv(r: BlockTimes, path) -> None:
    """Per layer and block the median ms; then the head and the two per-token totals."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["layer", "ratio", "hash", "block", "ms"])
    for il, (ratio, hashed) in enumerate(r.kinds):
        for b in BLOCKS:
            out.writerow([il, ratio, int(hashed), b, f"{r.ms(il, b):.6f}"])
    out.writerow(["head", "", "", "head", f"{r.ms('head', 'head'):.6f}"])
    out.writerow(["token", "", "", "sum of blocks", f"{1e3 * statistics.median(r.walk):.6f}"])
    out.writerow(["token", "", "", "compiled step", f"{1e3 * statistics.median(r.step):.6f}"])
    out.writerow(["token", "", "", "empty block", f"{r.ms('token', 'empty block'):.6f}"])
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
