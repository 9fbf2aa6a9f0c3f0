"""Peer engines for ``magnetar bench``: the same model shape in other runtimes.

* ``transformers``: ``DeepseekV4ForCausalLM`` (V4) built from our
  ``ModelConfig``: same widths, same layer schedule, same hash layers; random
  float32 weights, eager attention.
* ``mlx-lm``: mlx-lm's ``deepseek_v41`` model. V4.1 is a different
  architecture (compress ratios 1/2 with shared KV/index sources, no hash
  layers, no HC output head), so only the widths match; the layer schedule is
  the released V4.1 one stretched to our layer count (``v41_schedule``).
  ``mlx-lm`` decodes with a synchronous loop (one ``mx.eval`` per token, like
  the other peers); ``mlx-lm-pipelined`` runs mlx-lm's own ``generate_step``
  (``async_eval`` of token t+1 before t is read).
* ``llama.cpp``: llama-cpp-python on the very same GGUF file (its vendored
  llama.cpp has the ``deepseek4`` architecture; docs/spec/llamacpp-peer.md).

Every peer is optional and imported lazily; a missing package raises
``UsageError`` naming the pip command. Weights are random (nothing is
downloaded): the point is speed, not text. All peers time the argmax of the
logits with each token.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from ..config import ModelConfig
from ..engine import Engine
from ..errors import UsageError
from .bench import Peer

LAYER_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention",
              128: "heavily_compressed_attention"}

INSTALL = {
    "transformers": "pip install 'torch==2.13.0' 'transformers>=5.23,<5.24' (or pip install -e '.[dev]')",
    "mlx-lm": "pip install --no-deps 'mlx-lm>=0.32.2' (--no-deps keeps our mlx and transformers versions)",
    "llama.cpp": "pip install 'llama-cpp-python>=0.3.36' (an sdist: builds in ~4 min, needs cmake and g++)",
}


def _require(module: str, peer: str, what: str) -> Any:
    """Import ``module`` or raise a one-line UsageError with the fix for ``peer``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UsageError(f"the {peer} peer needs {what}, which is not importable ({e})",
                         INSTALL[peer]) from None


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _init_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random values that keep a forward pass O(1), by parameter name.

    The same rules as the make-model and converter test models: norm gains
    ~ N(1, 0.1), HC gains |N(1, 0.1)|, HC bases N(0, 0.5), attention sinks
    N(0, 1), embeddings N(0, 1), router biases N(0, 0.1), and projections
    N(0, 1/fan_in) with fan_in the last axis. (Both frameworks zero the HC
    mixers and routers at init, which would make every layer alike.)
    """
    leaf = name.rsplit(".", 1)[-1]

    def normal(std: float, mean: float = 0.0) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
                + np.float32(mean))

    if name.endswith("norm.weight"):
        return normal(0.1, 1.0)
    if leaf in ("scale", "hc_scale"):
        return np.abs(normal(0.1, 1.0))
    if leaf in ("base", "hc_base", "position_bias", "ape"):
        return normal(0.5)
    if leaf == "sinks":
        return normal(1.0)
    if "embed_tokens" in name:
        return normal(1.0)
    if "bias" in leaf:
        return normal(0.1)
    if len(shape) >= 2:
        return normal(shape[-1] ** -0.5)
    raise ValueError(f"no init rule for {name} {shape}")


def _schedule_text(ratios: Sequence[int]) -> str:
    """Compress ratios as runs: [0,0,4,128,4] -> '[0x2,(4,128)x1,4]', [0,0,2,2,1] -> '[0x2,2x2,1]'."""
    r = list(ratios)
    parts, i = [], 0
    while i < len(r):
        n = 1
        while i + n < len(r) and r[i + n] == r[i]:
            n += 1
        if n > 1:
            parts.append(f"{r[i]}x{n}")
            i += n
            continue
        pair = r[i:i + 2]
        m = 0
        while len(pair) == 2 and r[i + 2 * m:i + 2 * m + 2] == pair:
            m += 1
        if m > 1:
            parts.append(f"({pair[0]},{pair[1]})x{m}")
            i += 2 * m
        else:
            parts.append(str(r[i]))
            i += 1
    return "[" + ",".join(parts) + "]"


# ---------------------------------------------------------------- transformers


def hf_config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """DeepseekV4Config arguments that give our config's shape and schedule."""
    L = cfg.n_layer
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, moe_intermediate_size=cfg.expert_ffn,
        num_hidden_layers=L, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head_kv,
        head_dim=cfg.head_dim, partial_rotary_factor=cfg.rope_dim / cfg.head_dim,
        q_lora_rank=cfg.q_lora_rank, o_groups=cfg.o_groups, o_lora_rank=cfg.o_lora_rank,
        n_routed_experts=cfg.n_expert, num_experts_per_tok=cfg.n_expert_used,
        n_shared_experts=cfg.n_expert_shared, routed_scaling_factor=cfg.expert_weights_scale,
        norm_topk_prob=cfg.expert_weights_norm, swiglu_limit=float(cfg.swiglu_clamp[0]),
        layer_types=[LAYER_TYPE[r] for r in cfg.compress_ratios[:L]],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        mlp_layer_types=["hash_moe"] * cfg.hash_layers + ["moe"] * (L - cfg.hash_layers),
        sliding_window=cfg.window, index_n_heads=cfg.indexer_heads,
        index_head_dim=cfg.indexer_dim, index_topk=cfg.indexer_top_k,
        hc_mult=cfg.hc, hc_sinkhorn_iters=cfg.sinkhorn_iters, hc_eps=cfg.hc_eps,
        rms_norm_eps=cfg.rms_eps, compress_rope_theta=cfg.compress_rope_base,
        rope_parameters={"rope_type": "yarn", "rope_theta": cfg.rope_base, "factor": cfg.yarn_factor,
                         "original_max_position_embeddings": cfg.yarn_orig_ctx,
                         "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow},
        max_position_embeddings=cfg.context_length,
    )


class TransformersPeer:
    """transformers' DeepseekV4ForCausalLM at our config's shape, float32, eager."""

    name = "transformers"

    def __init__(self, cfg: ModelConfig, seed: int = 0, threads: int = 2):
        transformers = _require("transformers", "transformers", "transformers with DeepSeek V4")
        torch = _require("torch", "transformers", "torch")
        if not hasattr(transformers, "DeepseekV4ForCausalLM"):
            raise UsageError(f"transformers {transformers.__version__} has no DeepseekV4ForCausalLM",
                             INSTALL["transformers"])
        t0 = time.perf_counter()
        self._torch = torch
        self.threads = threads
        torch.set_num_threads(threads)
        hf_cfg = transformers.DeepseekV4Config(**hf_config_kwargs(cfg), attn_implementation="eager")
        try:  # skip transformers' own init: every parameter is overwritten below
            from transformers.initialization import no_init_weights
        except ImportError:  # pragma: no cover - older layouts
            import contextlib
            no_init_weights = contextlib.nullcontext
        with no_init_weights():
            model = transformers.DeepseekV4ForCausalLM(hf_cfg)
        model = model.to(torch.float32).eval()
        self._randomize(model, seed)
        self.model = model
        self._cache_cls = transformers.DynamicCache
        self._cache = None
        self._next = None
        self.last_tokens: list[int] = []  # the greedy tokens of the last decode
        self.build_seconds = time.perf_counter() - t0
        L = cfg.n_layer
        ratios = cfg.compress_ratios[:L]
        params = sum(p.numel() for p in model.parameters())
        experts = getattr(model.config, "_experts_implementation", None) or "default"
        self.detail = (
            f"transformers {transformers.__version__} DeepseekV4ForCausalLM (V4): {L} layers "
            f"{_schedule_text(ratios)}, {cfg.hash_layers} hash, d {cfg.d_model}, "
            f"{cfg.n_head}x{cfg.head_dim} heads, {cfg.n_expert} experts top-{cfg.n_expert_used} "
            f"+{cfg.n_expert_shared} x{cfg.expert_ffn}, vocab {cfg.vocab_size}, f32 random "
            f"(seed {seed}), {params / 1e6:.1f} M params, eager attn, {experts} experts, "
            f"{threads} threads")

    def _randomize(self, model: Any, seed: int) -> None:
        torch = self._torch
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.from_numpy(_init_value(name, tuple(p.shape), _rng(seed, name))))
            for name, b in model.named_buffers():
                rng = _rng(seed, name)
                if name.endswith("tid2eid"):  # distinct experts per token id
                    keys = rng.random((b.shape[0], model.config.n_routed_experts), dtype=np.float32)
                    b.copy_(torch.from_numpy(np.argsort(keys, axis=1)[:, : b.shape[1]].copy()))
                elif name.endswith("e_score_correction_bias"):
                    b.copy_(torch.from_numpy(_init_value("bias", tuple(b.shape), rng)))

    def prefill(self, ids: list[int]) -> None:
        torch = self._torch
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            self._cache = self._cache_cls(config=self.model.config)
            x = torch.tensor([ids], dtype=torch.long)
            out = self.model(input_ids=x, past_key_values=self._cache, use_cache=True,
                             logits_to_keep=1)
            self._next = out.logits[:, -1].argmax(-1, keepdim=True)

    def decode(self, n: int) -> list[float]:
        torch = self._torch
        torch.set_num_threads(self.threads)
        if self._cache is None:
            raise RuntimeError("decode before prefill")
        times, tokens = [], []
        with torch.inference_mode():
            for _ in range(n):
                t0 = time.perf_counter()
                out = self.model(input_ids=self._next, past_key_values=self._cache, use_cache=True)
                self._next = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(self._next))
                times.append(time.perf_counter() - t0)
        self.last_tokens = tokens
        return times


# ---------------------------------------------------------------------- mlx-lm


def v41_schedule(n_layer: int) -> dict[str, Any]:
    """The released V4.1 attention schedule, stretched or shrunk to ``n_layer``.

    40 layers (the release): ratios [0,0] + [2]*18 + [1]*20, KV sources
    2,8,14,20, index sources 2,8,14,20,24,28,32,36, candidate blocks chosen at
    layer 20. More layers add ratio-1 layers, with an index source every 4th
    (43 layers: index sources also at 40). Fewer than 21 layers: [0,0], then
    half ratio 2 and half ratio 1, with the first of each being the KV and
    index sources and the first ratio-1 layer choosing candidates (4 layers:
    [0,0,2,1], sources 2 and 3, as in docs/spec/peer-overhead.md).
    """
    if n_layer < 4:
        raise UsageError(f"the mlx-lm V4.1 peer needs at least 4 layers, got {n_layer}")
    if n_layer >= 21:
        ratios = [0, 0] + [2] * 18 + [1] * (n_layer - 20)
        kv = [2, 8, 14, 20]
        index = [2, 8, 14] + list(range(20, n_layer, 4))
        candidate = 20
    else:
        a = (n_layer - 2) // 2
        ratios = [0, 0] + [2] * a + [1] * (n_layer - 2 - a)
        kv = [2, 2 + a]
        index = [2] + list(range(2 + a, n_layer, 4))
        candidate = 2 + a
    return dict(compress_ratios=tuple(ratios), kv_source_layer_ids=tuple(kv),
                index_source_layer_ids=tuple(index), candidate_source_layer_id=candidate)


class MlxLmPeer:
    """mlx-lm's DeepSeek V4.1 (``deepseek_v41.Model``) at our config's widths, float32.

    ``loop="sync"``: ``y = argmax(model(y, cache)); mx.eval(y)`` per token.
    ``loop="pipelined"``: mlx-lm's ``generate_step`` with the prefilled
    prompt cache; a token's time is the gap between two yields.
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0, n_layer: int | None = None,
                 loop: str = "sync"):
        if loop not in ("sync", "pipelined"):
            raise UsageError(f"unknown mlx-lm loop {loop!r}", "use 'sync' or 'pipelined'")
        mlx_lm = _require("mlx_lm", "mlx-lm", "mlx-lm")
        try:
            v41 = importlib.import_module("mlx_lm.models.deepseek_v41")
        except ImportError:
            raise UsageError(f"mlx-lm {getattr(mlx_lm, '__version__', '?')} has no deepseek_v41 model",
                             INSTALL["mlx-lm"]) from None
        from mlx.utils import tree_flatten, tree_unflatten
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        t0 = time.perf_counter()
        self.name = "mlx-lm" if loop == "sync" else "mlx-lm-pipelined"
        self.loop = loop
        self._mx = mx
        self._make_cache = make_prompt_cache
        self._generate_step = generate_step
        L = n_layer or cfg.n_layer
        sched = v41_schedule(L)
        args = v41.ModelArgs(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=L,
            num_attention_heads=cfg.n_head, head_dim=cfg.head_dim, q_lora_rank=cfg.q_lora_rank,
            qk_rope_head_dim=cfg.rope_dim, o_groups=cfg.o_groups, o_lora_rank=cfg.o_lora_rank,
            moe_intermediate_size=cfg.expert_ffn, n_routed_experts=cfg.n_expert,
            num_experts_per_tok=cfg.n_expert_used, norm_topk_prob=cfg.expert_weights_norm,
            routed_scaling_factor=cfg.expert_weights_scale, swiglu_limit=float(cfg.swiglu_clamp[0]),
            rms_norm_eps=cfg.rms_eps, sliding_window=cfg.window,
            compress_rope_theta=cfg.compress_rope_base, index_n_heads=cfg.indexer_heads,
            index_head_dim=cfg.indexer_dim, index_topk=cfg.indexer_top_k,
            rope_theta=cfg.rope_base,
            rope_scaling={"type": "yarn", "factor": cfg.yarn_factor,
                          "original_max_position_embeddings": cfg.yarn_orig_ctx,
                          "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow},
            max_position_embeddings=cfg.context_length, hc_mult=cfg.hc,
            hc_sinkhorn_iters=cfg.sinkhorn_iters, hc_eps=cfg.hc_eps, **sched)
        model = v41.Model(args)
        params = tree_flatten(model.parameters())
        model.update(tree_unflatten([(k, mx.array(_init_value(k, tuple(v.shape), _rng(seed, k))))
                                     for k, v in params]))
        mx.eval(model.parameters())
        model.eval()
        self.model = model
        self._cache: Any = None
        self._next: Any = None
        self._extra: dict[str, float] = {}
        self.last_tokens: list[int] = []  # the greedy tokens of the last decode
        self.build_seconds = time.perf_counter() - t0
        n_params = sum(v.size for _, v in params)
        version = getattr(mlx_lm, "__version__", "?")
        self.detail = (
            f"mlx-lm {version} deepseek_v41 (V4.1, not V4): {L} layers "
            f"{_schedule_text(sched['compress_ratios'])}, kv src "
            f"{','.join(map(str, sched['kv_source_layer_ids']))}, index src "
            f"{','.join(map(str, sched['index_source_layer_ids']))}, candidates@"
            f"{sched['candidate_source_layer_id']}, no hash layers, d {cfg.d_model}, "
            f"{cfg.n_head}x{cfg.head_dim} heads, {cfg.n_expert} experts top-{cfg.n_expert_used} "
            f"+1 x{cfg.expert_ffn}, vocab {cfg.vocab_size}, f32 random (seed {seed}), "
            f"{n_params / 1e6:.1f} M params, no compile, {loop} loop, mlx {mx.__version__} "
            f"{mx.default_device()}")

    def extra(self) -> dict[str, float]:
        """Sync loop: median ms per token spent building the graph and in ``mx.eval``."""
        return dict(self._extra)

    def prefill(self, ids: list[int]) -> None:
        mx = self._mx
        self._extra = {}
        self._cache = self._make_cache(self.model)
        h = self.model.model(mx.array(ids)[None], self._cache)
        logits = self.model.lm_head(h[:, -1:, :])  # the last position only, like logits_to_keep=1
        self._next = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(self._next, [c.state for c in self._cache])

    def decode(self, n: int) -> list[float]:
        if self._cache is None:
            raise RuntimeError("decode before prefill")
        mx = self._mx
        if self.loop == "pipelined":
            times, tokens = [], []
            t_prev = time.perf_counter()
            for tok, _ in self._generate_step(self._next, self.model, max_tokens=n,
                                              prompt_cache=self._cache):
                now = time.perf_counter()
                times.append(now - t_prev)
                tokens.append(int(tok))
                t_prev = now
            # generate_step has already fed one token more than it yielded, so
            # this state cannot be continued: the next decode needs a prefill.
            self._cache = None
            self.last_tokens = tokens
            return times
        times, tokens, build, evals = [], [], [], []
        y = self._next
        for _ in range(n):
            t0 = time.perf_counter()
            y = mx.argmax(self.model(y[None], cache=self._cache)[:, -1, :], axis=-1)
            t1 = time.perf_counter()
            mx.eval(y)
            t2 = time.perf_counter()
            tokens.append(y.item())
            times.append(t2 - t0)
            build.append(t1 - t0)
            evals.append(t2 - t1)
        self._next = y
        self.last_tokens = tokens
        self._extra = {"build_ms": float(np.median(build)) * 1e3,
                       "eval_ms": float(np.median(evals)) * 1e3}
        return times


# ------------------------------------------------------------------- llama.cpp


class _Captured:
    def __init__(self, fh: Any):
        self._fh = fh

    def text(self) -> str:
        self._fh.seek(0)
        return self._fh.read().decode("utf-8", "replace")


@contextlib.contextmanager
def _stderr_captured() -> Iterator[_Captured]:
    """Send the process's fd 2 (where C libraries log) to a temp file for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as fh:
        os.dup2(fh.fileno(), 2)
        try:
            yield _Captured(fh)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            return any(line.startswith("flags") and " amx_int8" in line for line in fh)
    except OSError:  # not Linux: no AMX repacking in llama.cpp's CPU backend there
        return False


@contextlib.contextmanager
def _llama_model_params(llama_cpp: Any) -> Iterator[None]:
    """Load llama.cpp models without its AMX weight repacking on CPUs that have AMX.

    With llama-cpp-python 0.3.36 (built GGML_NATIVE on a Xeon with amx_int8) the AMX
    repacked weights leave deepseek4 graph nodes with no backend, and context creation
    aborts the whole process (``GGML_ASSERT(*cur_backend_id != -1)``). ``Llama`` has no
    argument for ``use_extra_bufts``, so its default model params are swapped for the call.
    Elsewhere the repacking stays on: it is part of llama.cpp's speed."""
    low = getattr(llama_cpp, "llama_cpp", None)  # the ctypes layer Llama takes its defaults from
    default = getattr(low, "llama_model_default_params", None)
    if default is None or not _cpu_has_amx() or not hasattr(default(), "use_extra_bufts"):
        yield
        return

    def without_repacking():
        params = default()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = without_repacking
    try:
        yield
    finally:
        low.llama_model_default_params = default


def llama_cpp_model(llama_cpp: Any, path: str | os.PathLike, **kwargs) -> Any:
    """``llama_cpp.Llama(model_path=path, **kwargs)``, safe on AMX CPUs (see above)."""
    with _llama_model_params(llama_cpp):
        return llama_cpp.Llama(model_path=str(path), **kwargs)


class LlamaCppPeer:
    """llama-cpp-python on the same GGUF (llama.cpp's ``deepseek4``), greedy one token per eval."""

    name = "llama.cpp"

    def __init__(self, path: str | os.PathLike, threads: int = 2, ctx: int = 4096,
                 n_batch: int = 512):
        llama_cpp = _require("llama_cpp", "llama.cpp", "llama-cpp-python")
        version = getattr(llama_cpp, "__version__", "0")
        if _version_tuple(version) < (0, 3, 36):
            raise UsageError(f"llama-cpp-python {version} predates llama.cpp's deepseek4 architecture",
                             INSTALL["llama.cpp"])
        from ..gguf_read import open_model

        path = Path(path)
        mf = open_model(path)  # our own checks first: a clear error for a bad file
        t0 = time.perf_counter()
        self._lc = llama_cpp
        with _stderr_captured() as log:  # llama.cpp logs to fd 2 even with verbose=False
            try:
                self.llm = llama_cpp_model(llama_cpp, path, n_ctx=ctx, n_threads=threads,
                                           n_threads_batch=threads, n_batch=n_batch,
                                           n_ubatch=n_batch, logits_all=False, verbose=False)
            except ValueError as e:
                failure = str(e)
            else:
                failure = None
            logged = log.text()
        if failure is not None:
            errors = [ln for ln in logged.splitlines() if "error" in ln.lower()]
            cause = errors[-1].strip() if errors else failure
            raise UsageError(f"llama.cpp could not load {path.name}: {cause}",
                             "llama-cpp-python >= 0.3.36 runs ds4-layout files from magnetar make-model")
        self.build_seconds = time.perf_counter() - t0
        self.ctx = ctx
        self.n_vocab = self.llm.n_vocab()
        self._next: int | None = None
        self.last_tokens: list[int] = []  # the greedy tokens of the last decode
        self.detail = (
            f"llama.cpp via llama-cpp-python {version} (deepseek4, V4): {path.name} "
            f"({mf.recipe}, {mf.size / 2**20:.0f} MiB), {mf.config.n_layer} layers, "
            f"{threads} threads, n_batch {n_batch}, ctx {ctx}")

    def _argmax(self) -> int:
        ptr = self._lc.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def prefill(self, ids: list[int]) -> None:
        if len(ids) >= self.ctx:
            raise UsageError(f"a {len(ids)}-token prompt does not fit llama.cpp's ctx {self.ctx}",
                             "pass a larger ctx")
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        self.llm.eval(ids)
        self._next = self._argmax()

    def decode(self, n: int) -> list[float]:
        if self._next is None:
            raise RuntimeError("decode before prefill")
        if self.llm.n_tokens + n > self.ctx:
            raise UsageError(f"{self.llm.n_tokens}+{n} tokens exceed llama.cpp's ctx {self.ctx}",
                             "pass a larger ctx")
        times, tokens = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            self.llm.eval([self._next])
            self._next = self._argmax()
            times.append(time.perf_counter() - t0)
            tokens.append(self._next)
        self.last_tokens = tokens
        return times


# --------------------------------------------------------------------- factory

PeerFactory = Callable[..., Peer]


def _magnetar_8bit(mode: str) -> PeerFactory:
    """Our engine in an 8-bit activation mode (``q8k``: the routed experts'; ``q8``: theirs and
    the decode-sized Q8_0 products', llama.cpp's CPU arithmetic), timed beside the default one."""
    def make(path, cfg, threads, seed, ctx) -> Peer:
        peer = EnginePeer(os.fspath(path), ctx, expert_activations=mode)
        peer.name = f"magnetar-{mode}"
        return peer
    return make


PEERS: dict[str, PeerFactory] = {
    "transformers": lambda path, cfg, threads, seed, ctx: TransformersPeer(cfg, seed=seed,
                                                                            threads=threads),
    "mlx-lm": lambda path, cfg, threads, seed, ctx: MlxLmPeer(cfg, seed=seed, loop="sync"),
    "mlx-lm-pipelined": lambda path, cfg, threads, seed, ctx: MlxLmPeer(cfg, seed=seed,
                                                                         loop="pipelined"),
    "llama.cpp": lambda path, cfg, threads, seed, ctx: LlamaCppPeer(path, threads=threads, ctx=ctx),
    "magnetar-q8k": _magnetar_8bit("q8k"),
    "magnetar-q8": _magnetar_8bit("q8"),
}
ALIASES = {"hf": "transformers", "mlx": "mlx-lm", "mlx_lm": "mlx-lm", "llama-cpp": "llama.cpp",
           "llamacpp": "llama.cpp", "llama_cpp": "llama.cpp"}


def parse_names(names: str | Sequence[str]) -> list[str]:
    """'transformers,mlx-lm' or a list -> canonical peer names, checked, in order."""
    if isinstance(names, str):
        names = names.split(",")
    out = []
    for raw in names:
        name = ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if not name:
            continue
        if name not in PEERS:
            raise UsageError(f"unknown bench peer {raw.strip()!r}", f"choose from {', '.join(PEERS)}")
        if name not in out:
            out.append(name)
    return out


def make_peers(names: str | Sequence[str], model_path: str | os.PathLike,
               cfg: ModelConfig | None = None, *, threads: int = 2, seed: int = 0,
               ctx: int = 4096, progress: Callable[[str, float], None] | None = None) -> list[Peer]:
    """Build the named peers for ``model_path`` (config read from it unless given).

    ``progress(name, build_seconds)`` is called after each peer is built.
    """
    wanted = parse_names(names)
    if cfg is None:
        from ..gguf_read import open_model

        cfg = open_model(model_path).config
    peers = []
    for name in wanted:
        t0 = time.perf_counter()
        peer = PEERS[name](model_path, cfg, threads, seed, ctx)
        if progress:
            progress(name, time.perf_counter() - t0)
        peers.append(peer)
    return peers


class EnginePeer:
    """Our engine as a bench peer: greedy decode through ``Engine.generate``."""

    name = "magnetar"

    def __init__(self, path: str, ctx: int, nodes: bool = False, **load):
        """``nodes``: count the decode step's graph nodes once (graph_nodes.py), reported
        with every sample as ``nodes`` and ``nodes/layer``. ``load``: more ``Engine.load``
        keywords (``--expert-cache``, ``--hotlist``, ``--expert-act``)."""
        self.engine = Engine.load(path, ctx=ctx, **load)
        cfg = self.engine.config
        self.detail = (f"MLX {mx.__version__} ({mx.default_device()}), {cfg.n_layer} layers, d {cfg.d_model}, "
                       f"{self.engine.file.recipe} file, precision {self.engine.precision}")
        if self.engine.model.experts:
            self.detail += f", {self.engine.expert_cache_note}"
        if self.engine.expert_activations != "f32":
            self.detail += f", {self.engine.expert_activations} expert activations"
        self._host: list[float] = []
        self._nodes: dict[str, float] = {}
        if nodes:
            from ..engine import on_engine_thread
            from .graph_nodes import decode_nodes

            count = on_engine_thread(decode_nodes, self.engine.model, ctx)
            self._nodes = count.extra()
            self.detail += f", decode graph {count.per_token} nodes in {count.calls} compiled calls"

    def prefill(self, ids: list[int]) -> None:
        self.engine.reset()
        self.engine.prefill(ids)

    def decode(self, n: int) -> list[float]:
        """The times of n decode steps, as the other peers time theirs (a forward pass of the
        last token, then its argmax). ``generate`` samples its first token from the prompt's
        logits, with no step, so that token is handed out untimed and n more follow."""
        times, self._host = [], []
        stream = iter(self.engine.generate(max_tokens=n + 1, temperature=0, ignore_eos=True))
        next(stream, None)
        t0 = time.perf_counter()
        for _ in stream:
            t1 = time.perf_counter()
            times.append(t1 - t0)
            self._host.append(self.engine.stats.last_step_host_seconds)
            t0 = t1
        return times

    def extra(self) -> dict[str, float]:
        """Median host time per token (building and dispatching the step graph, and sampling;
        not evaluating it), and the graph's node counts when asked for."""
        host = {"host_ms": 1e3 * sorted(self._host)[len(self._host) // 2]} if self._host else {}
        return {**host, **self._nodes}
