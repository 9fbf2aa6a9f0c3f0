"""The Engine: the one door between the agent (or a server) and the model.

It owns a live sequence: the exact token ids processed so far (the transcript
truth), their KV state, and the logits of the next token. ``prefill`` extends
it in chunks; ``generate`` samples from it one token at a time. ``logits`` is a
pure function of its ids and never touches the live sequence. ``checkpoint`` /
``restore`` put the live sequence in a file and back (no token is re-processed);
``snapshot`` / ``rewind`` do the same in memory, to undo a turn. At the chat level
(runtime/conversation.py) ``sync`` brings the live sequence to a conversation,
reusing what it can, and ``respond`` samples a reply as chat events.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from magnetar.kernels import jit_cache
from magnetar.kernels.backend import BACKENDS, EXPERT_ACTIVATIONS, Backend, BackendUnavailable
from magnetar.kernels.backend import select as select_backend

from . import checkpoint as ckpt
from .conversation import THINK_MAX_MIN_CTX, Conversing, require_room  # the constant stays importable from here
from .errors import ContextFull, ExpertReadError, UsageError
from .expert_cache import StreamStats, expert_budget, read_hotlist
from .gguf_read import ModelFile, open_model
from .kv_state import KVState
from .limits import DEFAULT_CTX, MAX_CTX, parse_cache_size
from .model import Model
from .sampler import Sampler, SamplerSettings, log_softmax, top_logprobs
from .tokenizer import Tokenizer

DEFAULT_PREFILL_CHUNK = 2048


@dataclass
class Stats:
    """What the engine did so far; ``last_step_*`` describe the latest decode step."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    last_step_host_seconds: float = 0.0  # building/dispatching the graph and sampling
    last_step_seconds: float = 0.0
    restored_tokens: int = 0  # tokens that came back from checkpoints, never re-processed
    cache_hits: int = 0  # prefix-cache entries restored
    streaming: StreamStats | None = None  # routed experts read from the file (--expert-cache), live

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def generate_tok_s(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0


@dataclass(frozen=True)
class Event:
    """One generated token: its id and the text it completes (may be "" mid-character).

    With ``generate(logprobs=K)``: the token's log-probability under the model (before
    temperature and filters) and the K most likely tokens with theirs.
    """

    token: int
    text: str
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass
class _Live:
    state: KVState
    next_logits: np.ndarray | None = None
    pending: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Snapshot:
    """The live sequence at one moment, for ``Engine.rewind``. Its arrays are handles of
    its own on the live buffers (see ``_own_arrays``): no copy until the sequence moves on."""

    tokens: tuple[int, ...]
    arrays: tuple[mx.array, ...]
    next_logits: np.ndarray | None


def _own_arrays(arrays) -> tuple[mx.array, ...]:
    """New handles on ``arrays``' buffers, copy-on-write. A prefill writes KV rows into the
    live arrays in place (``a[idx] = rows`` rebinds the Python object that every holder of
    it sees), so a snapshot holding the same objects would change with the live state.
    ``stop_gradient`` makes a separate array sharing the buffer; MLX writes into a buffer in
    place only when nothing else holds it, so the next write into the live state copies."""
    owned = tuple(mx.stop_gradient(a) for a in arrays)
    mx.eval(owned)
    return owned


class _EngineThread:
    """The one thread every engine's MLX work runs on, whichever thread calls.

    MLX streams belong to the thread that made them: an array built on one thread's
    stream cannot be evaluated on another ("There is no Stream(cpu, 0) in current
    thread"), and the agent drives the engine from UI worker threads. The thread is a
    daemon that never ends: MLX aborts the process when a thread whose stream ran
    compiled functions exits."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="magnetar-engine", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        mx.set_default_stream(mx.new_stream(mx.default_device()))
        while True:
            fn, args, kwargs, future = self._jobs.get()
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as err:  # handed to the caller, who raises it
                future.set_exception(err)

    def run(self, fn: Callable, *args, **kwargs):
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        future: Future = Future()
        self._jobs.put((fn, args, kwargs, future))
        return future.result()


_engine_thread: _EngineThread | None = None
_engine_thread_lock = threading.Lock()


def on_engine_thread(fn: Callable, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` on the engine thread and return what it returns."""
    global _engine_thread
    with _engine_thread_lock:
        if _engine_thread is None:
            _engine_thread = _EngineThread()
    return _engine_thread.run(fn, *args, **kwargs)


def _engine_method(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return on_engine_thread(method, self, *args, **kwargs)
    return call


class Engine(Conversing):
    @_engine_method
    def __init__(self, model_file: ModelFile, ctx: int = DEFAULT_CTX, precision: str = "official",
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, expand_budget: int | None = None,
                 kernels: Backend | None = None, expert_cache: int | str | None = None,
                 hotlist: str | os.PathLike | None = None):
        if not 0 < ctx <= MAX_CTX:
            raise UsageError(f"--ctx must be between 1 and {MAX_CTX}, got {ctx}")
        if prefill_chunk < 1:
            raise UsageError(f"prefill chunk must be positive, got {prefill_chunk}")
        self.file = model_file
        self.config = model_file.config
        self.ctx, self.precision, self.prefill_chunk = ctx, precision, prefill_chunk
        if isinstance(expert_cache, str) and expert_cache != "auto":
            expert_cache = parse_cache_size(expert_cache)
        expert_cache, self.expert_cache_note = expert_budget(model_file, ctx, expert_cache)  # the note: for the CLI
        self.model = Model(model_file, precision, expand_budget, kernels, expert_cache=expert_cache)
        self.stats = Stats(streaming=self.model.experts.stats if self.model.experts else None)
        if self.model.experts:
            self.expert_cache_note = "; ".join(filter(None, (self.expert_cache_note, self.model.experts.describe())))
        self._live = _Live(KVState.empty(self.config, ctx))
        if hotlist:
            self.preload(hotlist)

    def preload(self, hotlist: str | os.PathLike) -> None:
        """Read the hottest experts a ds4-format hotlist names into the cache's free slots."""
        if not self.model.experts:
            raise UsageError("--hotlist needs --expert-cache", "add --expert-cache auto or a size")
        read = self.model.experts.warm(read_hotlist(hotlist))
        self.expert_cache_note += f"; hotlist {os.fspath(hotlist)}: {read} experts preloaded"

    @classmethod
    def load(cls, path: str | os.PathLike, ctx: int = DEFAULT_CTX, precision: str = "official",
             backend: str = "auto", prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
             expand_budget: int | None = None, expert_cache: int | str | None = None,
             hotlist: str | os.PathLike | None = None, expert_activations: str | None = None,
             notice: Callable[[str], None] | None = None) -> "Engine":
        """``backend``: the kernels (and with them the MLX device): ``auto`` follows MLX's
        default device; ``cpu``, ``metal``, ``cuda``, ``hip``, or ``reference`` (the numpy
        oracle, on the CPU). ``expand_budget``: bytes of non-expert weights to widen to f32
        at load (default: 1 GiB on the CPU, none elsewhere); routed experts always stay as
        stored. ``expert_cache``: bytes (or ``"auto"``, or a size like ``"24G"``) of slot banks
        to stream the routed experts through from the file (runtime/expert_cache.py) instead of
        holding them all; None holds them all. ``hotlist``: a ds4-format hotlist to preload
        (``magnetar profile-experts``). ``expert_activations``: the CPU experts' ``f32`` or ``q8k``
        (8-bit, as ds4's and llama.cpp's CPU paths; faster, ~1e-2 relative per expert output),
        or ``q8``: ``q8k`` and 8-bit activations into the decode-sized Q8_0 products too, as
        llama.cpp's (``CpuBackend``); None: ``$MAGNETAR_EXPERT_ACT``, else f32. The 8-bit modes
        need the cpu backend's native kernels.
        ``notice`` is told how the cache was sized."""
        if backend not in ("auto", *BACKENDS):
            raise UsageError(f"unknown backend {backend!r}", f"choose auto, {', '.join(BACKENDS)}")
        if expert_activations not in (None, *EXPERT_ACTIVATIONS):
            raise UsageError(f"unknown expert activations {expert_activations!r}",
                             f"choose {', '.join(EXPERT_ACTIVATIONS[:-1])} or {EXPERT_ACTIVATIONS[-1]}")
        try:  # also switches MLX to the backend's device
            kernels = select_backend(backend, expert_activations)
        except BackendUnavailable as e:
            fix = ("use --backend auto or cpu" if expert_activations in (None, "f32")
                   else "use --expert-act f32, or the cpu backend with its native kernels (a C compiler, "
                        "MAGNETAR_NATIVE not 0; for q8 also MAGNETAR_MLX_EXT not 0)")
            raise UsageError(str(e), fix) from None
        if hotlist and expert_cache is None:
            raise UsageError("--hotlist needs --expert-cache", "add --expert-cache auto or a size")
        engine = cls(open_model(path), ctx, precision, prefill_chunk, expand_budget, kernels, expert_cache)
        engine.warm(notice)
        if hotlist:  # after warm: its scratch token must not push preloaded experts out
            engine.preload(hotlist)
        if notice and engine.expert_cache_note:
            notice(engine.expert_cache_note)
        return engine

    # -- text (render, sync, respond: runtime/conversation.py) ------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        return self.file.tokenizer

    # -- the live sequence -----------------------------------------------------------------

    @property
    def tokens(self) -> list[int]:
        """Every token of the live sequence, including one handed out but not yet run."""
        return self._live.state.tokens + self._live.pending

    @_engine_method
    def reset(self) -> None:
        self._live = _Live(KVState.empty(self.config, self.ctx))

    @_engine_method
    def warm(self, notice: Callable[[str], None] | None = None) -> None:
        """On the CPU, compile the decode step now if this model shape never ran here.

        MLX's CPU compiler runs g++ on every fused kernel of the compiled step at its
        first evaluation (52 kernels, ~19 s for ``tiny``); the libraries are kept in our
        cache (kernels/jit_cache.py), so this happens once per machine and shape, and
        ``notice`` is told before it starts. One step on a scratch state; the live
        sequence is untouched."""
        if self.model.kernels.device != mx.cpu or jit_cache.persist() is None:
            return
        key = jit_cache.shape_key(self.config, self.precision, self.model.kernels)
        if jit_cache.is_warm(key):
            return
        if notice:
            notice(f"compiling MLX's CPU kernels for this model shape, once (kept in {jit_cache.persistent_dir()})")
        if self.model.experts:
            with self.model.experts.set_aside():  # a scratch token is no route the cache should learn
                self.model.decode(0, KVState.empty(self.config, self.ctx))
        else:
            self.model.decode(0, KVState.empty(self.config, self.ctx))
        jit_cache.mark_warm(key)

    # -- checkpoints -------------------------------------------------------------------------

    @property
    def expert_activations(self) -> str:
        """The activation mode (``f32``, ``q8k`` or ``q8``): a checkpoint records it."""
        return getattr(self.model.kernels, "expert_activations", "f32")

    @property
    def identity(self) -> dict:
        """What a checkpoint must match to be restored here (model, weights, precision)."""
        if not hasattr(self, "_identity"):
            self._identity = ckpt.model_identity(self.file, self.precision)
        return self._identity

    @_engine_method
    def checkpoint(self, path: str | os.PathLike, note: str = "") -> int:
        """Write the live sequence to ``path`` atomically; returns its size in bytes. A streaming
        engine also saves its route hotness, which ``restore`` warms the expert cache with."""
        self._flush_pending()
        hotness = self.model.experts.hotness() if self.model.experts else None
        return ckpt.write(path, self._live.state, self._live.next_logits, self.identity, self.prefill_chunk, note,
                          hotness, self.expert_activations)

    @_engine_method
    def restore(self, path: str | os.PathLike, notice: Callable[[str], None] | None = None) -> None:
        """Make the checkpoint at ``path`` the live sequence, with zero re-processing.
        Raises ``CheckpointError`` (and keeps the current sequence) if it cannot. A checkpoint
        made with other expert activations is restored (its rows differ from ours by rounding
        only) and ``notice`` is told."""
        loaded = ckpt.read(path, self.config, self.identity, self.ctx)
        if notice and loaded.expert_activations != self.expert_activations:
            notice(f"warning: {os.fspath(path)} was computed with {loaded.expert_activations} expert activations "
                   f"and this engine runs {self.expert_activations}; resumed anyway (the two differ by rounding, "
                   "so the next tokens may differ from a run in one mode)")
        if loaded.hotness and self.model.experts:  # the session's hottest experts, before its first token
            self.model.experts.warm(loaded.hotness)
        self._live = _Live(loaded.state, loaded.logits)
        self.stats.restored_tokens += loaded.state.n_tokens

    @_engine_method
    def snapshot(self) -> Snapshot:
        self._flush_pending()
        live = self._live
        logits = None if live.next_logits is None else live.next_logits.copy()
        return Snapshot(tuple(live.state.tokens), _own_arrays(live.state.arrays()), logits)

    @_engine_method
    def rewind(self, snap: Snapshot) -> None:
        """Go back to ``snap`` (any number of times): the next token continues from there."""
        state = KVState.empty(self.config, self.ctx)
        state.replace(list(_own_arrays(snap.arrays)))  # the snapshot stays as it is for the next rewind
        state.tokens = list(snap.tokens)
        self._live = _Live(state, None if snap.next_logits is None else snap.next_logits.copy())

    def _check_room(self, have: int, more: int) -> None:
        require_room(self.ctx, have, more)

    def _run_chunks(self, ids: Sequence[int], state: KVState, all_logits: bool,
                    progress: Callable[[int, int], None] | None) -> list[np.ndarray]:
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        outs, done = [], 0
        for c0 in range(0, len(ids), self.prefill_chunk):
            chunk = list(ids[c0:c0 + self.prefill_chunk])
            outs.append(self.model.prefill(chunk, state, all_logits))
            done += len(chunk)
            if progress:
                progress(done, len(ids))
        return outs

    @_engine_method
    def prefill(self, ids: Sequence[int], progress: Callable[[int, int], None] | None = None) -> None:
        """Extend the live sequence with ``ids`` (chunked, layer-major within a chunk)."""
        if not ids:
            return
        live = self._live
        self._flush_pending()
        self._check_room(live.state.n_tokens, len(ids))
        t0 = time.perf_counter()
        live.next_logits = self._guarded(lambda: self._run_chunks(ids, live.state, False, progress)[-1][-1])
        self.stats.prefill_tokens += len(ids)
        self.stats.prefill_seconds += time.perf_counter() - t0

    @_engine_method
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), vocab) float32 logits of ``ids`` from an empty state; the live state is untouched."""
        if not ids:
            return np.zeros((0, self.config.vocab_size), np.float32)
        self._check_room(0, len(ids))
        state = KVState.empty(self.config, self.ctx)
        outs = self._run_chunks(ids, state, True, None)
        return np.concatenate(outs, axis=0)

    @_engine_method
    def next_logits(self) -> np.ndarray:
        """Logits for the token after the live sequence."""
        self._flush_pending()
        if self._live.next_logits is None:
            raise UsageError("the sequence is empty: prefill a prompt first")
        return self._live.next_logits.copy()

    def _guarded(self, run: Callable[[], np.ndarray]) -> np.ndarray:
        """``run()`` on the live state; if reading streamed experts fails, the live sequence goes
        back to where it was (a pass stopped between layers leaves KV no token list describes)
        and the error is raised. The file may be restored and the engine used again."""
        if self.model.experts is None:
            return run()
        live = self._live
        before = Snapshot(tuple(live.state.tokens), _own_arrays(live.state.arrays()), live.next_logits)
        try:
            return run()
        except ExpertReadError:
            self.rewind(before)
            raise

    def _flush_pending(self) -> None:
        """Run sampled-but-unprocessed tokens so the state covers every token handed out."""
        live = self._live
        while live.pending:
            t0 = time.perf_counter()
            live.next_logits = self._guarded(lambda: self.model.decode(live.pending.pop(0), live.state))
            self.stats.last_step_host_seconds = self.model.last_decode_build_seconds
            self.stats.last_step_seconds = time.perf_counter() - t0

    def generate(self, max_tokens: int = 256, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.05, seed: int | None = None,
                 stop: Sequence[int | str] = (), logprobs: int = 0,
                 ignore_eos: bool = False, greedy: Callable[[], bool] | None = None) -> Iterator[Event]:
        """Sample up to ``max_tokens`` tokens continuing the live sequence (see ``_generate``);
        each step runs on the engine thread, in lockstep with the caller. ``greedy``, asked
        before each token, True takes that token greedily (DSML syntax, see ``respond``)."""
        steps = self._generate(max_tokens, temperature, top_k, top_p, min_p, seed, stop, logprobs, ignore_eos,
                               greedy)
        try:
            while (event := on_engine_thread(next, steps, None)) is not None:
                yield event
        finally:
            on_engine_thread(steps.close)

    def _generate(self, max_tokens: int, temperature: float, top_k: int, top_p: float, min_p: float,
                  seed: int | None, stop: Sequence[int | str], logprobs: int, ignore_eos: bool,
                  greedy: Callable[[], bool] | None = None) -> Iterator[Event]:
        """Sample up to ``max_tokens`` tokens continuing the live sequence.

        Stops after EOS (unless ``ignore_eos``, for benchmarks), a stop token id, or
        when the text ends with a stop string (the stopping token is yielded and kept in
        the sequence). Each yielded token is part of the live sequence at once; its
        forward pass runs when the caller asks for the next event, or at the next
        engine call if the caller stops iterating.
        """
        sampler = Sampler(SamplerSettings(temperature=temperature, top_k=top_k, top_p=top_p,
                                          min_p=min_p, seed=seed))
        self._flush_pending()
        live = self._live
        if live.next_logits is None:
            raise UsageError("nothing to continue: prefill a prompt first")
        stop_ids = {s for s in stop if isinstance(s, int)} | (set() if ignore_eos else {self.tokenizer.eos_id})
        stop_texts = [s for s in stop if isinstance(s, str) and s]
        decoder, text = self.tokenizer.stream_decoder(), ""
        for step in range(max_tokens):
            if live.state.n_tokens >= self.ctx:
                raise ContextFull(f"the context of {self.ctx} tokens is full", "start a new session or raise --ctx")
            t0 = time.perf_counter()
            token = sampler.sample(live.next_logits, greedy=greedy is not None and greedy())
            live.pending.append(token)
            piece = decoder.feed(token)
            text += piece
            last = step == max_tokens - 1 or token in stop_ids or any(text.endswith(s) for s in stop_texts)
            if last:  # a stop can fall inside a UTF-8 character: hand its bytes out as U+FFFD
                piece += decoder.flush()
            sampled = time.perf_counter()
            if logprobs:
                yield Event(token, piece, float(log_softmax(live.next_logits)[token]),
                            tuple(top_logprobs(live.next_logits, logprobs)))
            else:
                yield Event(token, piece)
            self._flush_pending()
            self.stats.last_step_host_seconds += sampled - t0
            self.stats.last_step_seconds += sampled - t0
            self.stats.generated_tokens += 1
            self.stats.generate_seconds += self.stats.last_step_seconds
            if last:
                break

