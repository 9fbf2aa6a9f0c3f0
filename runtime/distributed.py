"""Several processes (or machines), one model: rank 0's side of the layer-split pipeline.

``start`` forms the ring (``--ranks N``: N local processes on 127.0.0.1 from a
temporary MLX hostfile; ``--distributed HOSTFILE``: this process is the rank
``MLX_RANK`` of MLX's hostfile, as ``mlx.launch`` starts it) and returns, on rank
0, an Engine whose model is a ``PipelineModel``: its own span runs here, the hidden
state goes round the ring (runtime/pipeline.py) and the logits come back from the
last rank. Other ranks serve their span until rank 0 stops them. The Engine keeps
its whole state layout, so sessions stay single-machine files: ``checkpoint``
first collects every rank's layers, ``restore`` hands them out again.

Failures: a rank that dies makes MLX's ring raise on its neighbours (about 0.25 s,
spec §6.2); with local ranks a watchdog also sees the child exit and, if rank 0
is still blocked after a grace period, ends it with one line. ``mlx.launch``
returns 0 when a rank fails (§6.2), so rank 0 reports it itself.
"""

from __future__ import annotations

import atexit
import functools
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

from magnetar.kernels.backend import BACKENDS, EXPERT_ACTIVATIONS, BackendUnavailable
from magnetar.kernels.backend import select as select_backend

from .engine import DEFAULT_PREFILL_CHUNK, Engine, Stats, _engine_method, _Live, on_engine_thread
from .errors import UsageError
from .expert_cache import expert_budget
from .gguf_read import open_model
from .kv_state import KVState
from .layer_balance import CHUNK_TOKENS, DECODE_STEPS, PASSES, Calibration, Measured
from .limits import DEFAULT_CTX, MAX_CTX, parse_cache_size
from .model import Model
from .pipeline import (CALIBRATION_SID, FNV_BASIS, Link, PipelineError, Worker, fnv1a, layer_costs, parse_layers,
                       say, time_span)

GRACE_S = 5.0  # after a local rank died: how long rank 0 may stay blocked before it is ended
REPLY_TIMEOUT_S = 300.0  # a ring send or receive that takes longer: a peer hangs without dying
LOST_FIX = "the run stops; saved sessions are intact, restart with all ranks"
EXIT_LOST = PipelineError.exit_code


class PipelineModel:
    """In place of ``Model`` for rank 0's Engine: ``prefill``/``decode`` run the local span and
    the rest of the ring. Sessions: each KVState the Engine passes is one session on the
    workers (the live sequence, or ``Engine.logits``' scratch one), dropped when it is."""


    def __init__(self, local: Model, link: Link, ctx: int, prefill_chunk: int, window: int,
                 describe_loss: Callable[[], str | None], build: Callable[[tuple[int, int]], Model]):
        self.local, self.link, self.ctx, self.build = local, link, ctx, build
        self.experts = local.experts  # rank 0's own streaming cache (each rank has its own)
        self.cfg, self.kernels = local.cfg, local.kernels
        self.prefill_chunk, self.window = prefill_chunk, window
        self.describe_loss = describe_loss
        self.last_decode_build_seconds = 0.0
        self.broken = False  # the ring failed: nothing more goes over it
        self.waiting_since: float | None = None  # monotonic time rank 0 began waiting on the ring
        self.decode_timing = [0, 0.0, 0.0]  # decode steps; seconds in rank 0's span; from send to logits
        self._sids: dict[int, int] = {}  # id(state) -> session id, while the state lives
        self._next_sid = 1
        self._drops: list[int] = []
        self._held: dict[int, tuple[int, int]] = {}  # session -> (tokens, prefix hash) the workers hold
        self._hashes: dict[int, tuple[list, int, int]] = {}  # session -> (token list, n, hash) seen last

    # -- sessions and prefix hashes --------------------------------------------------------

    def _sid(self, state: KVState) -> int:
        sid = self._sids.get(id(state))
        if sid is None:
            sid, self._next_sid = self._next_sid, self._next_sid + 1
            self._sids[id(state)] = sid
            weakref.finalize(state, self._forget, id(state), sid)
            state.grown = self.local.span  # the other layers are the workers': they stay empty here
        return sid

    def _forget(self, key: int, sid: int) -> None:
        self._sids.pop(key, None)
        self._held.pop(sid, None)
        self._hashes.pop(sid, None)
        self._drops.append(sid)  # told to the workers with the next message

    def _prefix_hash(self, sid: int, tokens: list, n: int) -> int:
        """FNV-1a of ``tokens[:n]``, continued from the last one when the list only grew."""
        seen, m, h = self._hashes.get(sid, (None, 0, FNV_BASIS))
        if seen is not tokens or m > n:
            m, h = 0, FNV_BASIS
        h = fnv1a(tokens[m:n], h)
        self._hashes[sid] = (tokens, n, h)
        return h

    # -- the Engine's calls ----------------------------------------------------------------

    def prefill(self, ids: list[int], state: KVState, all_logits: bool = False) -> np.ndarray:
        return self.prefill_chunks([ids], state, all_logits)[-1]

    def prefill_chunks(self, chunks: list[list[int]], state: KVState, all_logits: bool,
                       progress: Callable[[int], None] | None = None) -> list[np.ndarray | None]:
        """Each chunk through the pipeline, up to ``window`` in flight: rank 0 runs chunk k+1
        while the others run chunk k. Logits of every chunk with ``all_logits``, else of the
        last one only (the others are acknowledged: None)."""
        sid = self._sid(state)
        self._sync(sid, state)
        sent: deque = deque()  # (index, header, arrays) not yet answered
        outs: list = [None] * len(chunks)
        done = 0
        for i, chunk in enumerate(chunks):
            out = "all" if all_logits else ("last" if i == len(chunks) - 1 else "ack")
            head, arrays = self._work(sid, state, chunk, out, decode=False)
            self._send(head, arrays)
            sent.append((i, head, arrays))
            while len(sent) >= self.window or (sent and i == len(chunks) - 1):
                i_done, answer = self._answer(sid, state, sent)
                outs[i_done] = answer
                done += len(chunks[i_done])
                if progress:
                    progress(done)
        return outs

    def decode(self, token: int, state: KVState) -> np.ndarray:
        sid = self._sid(state)
        self._sync(sid, state)
        t0 = time.perf_counter()
        head, arrays = self._work(sid, state, [token], "last", decode=True)
        self.last_decode_build_seconds = self.local.last_decode_build_seconds
        t1 = time.perf_counter()
        self._send(head, arrays)
        _, logits = self._answer(sid, state, deque([(0, head, arrays)]))
        self.decode_timing[0] += 1
        self.decode_timing[1] += t1 - t0
        self.decode_timing[2] += time.perf_counter() - t1
        return logits

    def _work(self, sid: int, state: KVState, ids: list[int], out: str, decode: bool):
        """Run the local span on ``ids`` (the state advances) and build the work item."""
        pos0 = state.n_tokens
        h0 = self._prefix_hash(sid, state.tokens, pos0)
        X = self.local.decode(ids[0], state) if decode else self.local.prefill(ids, state)
        h1 = self._prefix_hash(sid, state.tokens, pos0 + len(ids))
        head = {"kind": "work", "sid": sid, "pos0": pos0, "h0": h0, "h1": h1, "decode": decode, "out": out}
        self._held[sid] = (pos0 + len(ids), h1)  # what the workers hold once it is answered
        return head, [mx.array(np.asarray(ids, np.int32)), X]

    def _answer(self, sid: int, state: KVState, sent: deque):
        """The reply to the oldest item in flight. A mismatch (a worker does not hold the prefix
        the item continues) replays the transcript up to it and sends it, and the rest, again."""
        i, head, _ = sent[0]
        reply, arrays = self._recv()
        if reply["kind"] == "mismatch":
            for _ in range(len(sent) - 1):  # the later items went round too: collect their replies
                self._recv()
            self._replay(sid, state, head["pos0"])
            for _, h, a in sent:
                self._send(h, a)
            reply, arrays = self._recv()
            if reply["kind"] == "mismatch":
                raise PipelineError(f"rank {reply['rank']} does not hold the sequence even after a replay "
                                    f"(it has {reply['have']} tokens, the work starts at {reply['pos0']})")
        sent.popleft()
        return i, (np.array(arrays[0]) if reply["kind"] == "logits" else None)

    def _sync(self, sid: int, state: KVState) -> None:
        """Before continuing ``state``: if the workers' session is not at its end (a rewind, a
        restore without the layers), replay the transcript first."""
        n = state.n_tokens
        if n and self._held.get(sid) != (n, self._prefix_hash(sid, state.tokens, n)):
            self._replay(sid, state, n)

    def _replay(self, sid: int, state: KVState, upto: int) -> None:
        """Rebuild the workers' session from the transcript ``state.tokens[:upto]``: the local
        span runs again on a scratch state to make the hidden states they need."""
        scratch, h = KVState.empty(self.cfg, self.ctx), FNV_BASIS
        scratch.grown = self.local.span
        for c0 in range(0, upto, self.prefill_chunk):
            ids = state.tokens[c0:min(upto, c0 + self.prefill_chunk)]
            X = self.local.prefill(ids, scratch)
            head = {"kind": "work", "sid": sid, "pos0": c0, "h0": h, "h1": fnv1a(ids, h), "decode": False, "out": "ack"}
            h = head["h1"]
            self._send(head, [mx.array(np.asarray(ids, np.int32)), X])
            reply, _ = self._recv()
            if reply["kind"] != "ack":
                raise PipelineError(f"replaying the transcript failed at token {c0}: {reply}")
        self._held[sid] = (upto, h)

    # -- sessions through rank 0 ---------------------------------------------------------------

    def gather(self, state: KVState) -> None:
        """Copy every worker's layers of ``state`` into it, so it is a whole single-machine state."""
        sid = self._sid(state)
        self._sync(sid, state)
        n = state.n_tokens
        self._send({"kind": "save", "sid": sid, "n": n, "h": self._prefix_hash(sid, state.tokens, n)}, [])
        reply, arrays = self._recv()
        if reply["kind"] != "save":
            raise PipelineError(f"collecting the workers' layers failed: {reply}")
        it = 0
        for il in range(self.local.span.stop, self.cfg.n_layer):
            k = len(state.layers[il].arrays())
            state.layers[il].replace(arrays[it:it + k])
            it += k

    def release(self, state: KVState) -> None:
        """Empty the workers' layers in rank 0's copy of ``state`` again (after a save or a
        restore), so rank 0 holds only its own rows."""
        empty = KVState.empty(self.cfg, 1).layers
        for il in range(self.local.span.stop, self.cfg.n_layer):
            state.layers[il] = empty[il]

    def scatter(self, state: KVState) -> None:
        """Give each worker its layers of a whole (restored) ``state`` as a new session."""
        sid, n = self._sid(state), state.n_tokens
        h = self._prefix_hash(sid, state.tokens, n)
        arrays = [mx.array(np.asarray([0, *state.tokens], np.int32))]  # never empty: a ring send needs bytes
        arrays += [a for st in state.layers[self.local.span.stop:] for a in st.arrays()]
        self._send({"kind": "load", "sid": sid, "h": h, "first": self.local.span.stop}, arrays)
        reply, _ = self._recv()
        if reply["kind"] != "ack":
            raise PipelineError(f"handing the restored layers to the workers failed: {reply}")
        self._held[sid] = (n, h)

    # -- --layers auto: measuring the ranks, re-spanning ------------------------------------------

    def measure(self, spans: list[tuple[int, int]], tokens: int) -> Measured:
        """Every rank's prefill time per layer on chunks of ``tokens`` and its decode step time,
        best of ``PASSES`` chunks and ``DECODE_STEPS`` steps after an untimed one each. One item
        goes round at a time, so each rank is timed while the others wait."""
        state = KVState.empty(self.cfg, self.ctx)
        state.grown = self.local.span
        ids = np.random.default_rng(0).integers(2, self.cfg.vocab_size, (PASSES + 1) * tokens + DECODE_STEPS + 1)
        prefill = decode = None
        for p in range(PASSES + 1):
            times = self._time_hop(state, ids[p * tokens:(p + 1) * tokens].tolist(), False)
            prefill = times if p == 1 else _least(prefill, times) if p else None
        for k in range(DECODE_STEPS + 1):
            times = self._time_hop(state, [int(ids[state.n_tokens])], True)
            decode = times if k == 1 else _least(decode, times) if k else None
        self._drops.append(CALIBRATION_SID)
        return Measured(list(spans), prefill, [t[0] for t in decode])

    def _time_hop(self, state: KVState, ids: list[int], decode: bool) -> list[list[float]]:
        pos0 = state.n_tokens
        mine, X = time_span(self.local, state, ids, None, decode)
        self._send({"kind": "calibrate", "pos0": pos0, "decode": decode, "times": [mine]},
                   [mx.array(np.asarray(ids, np.int32)), X])
        reply, _ = self._recv()
        if reply["kind"] != "calibrated":
            raise PipelineError(f"timing the ranks failed: {reply}")
        return reply["times"]

    def respan(self, spans: list[tuple[int, int]]) -> None:
        """Every rank takes its layers of ``spans``, rank 0 too; the workers' sessions are
        dropped, so this is for before any sequence runs."""
        self._send({"kind": "respan", "spans": [list(s) for s in spans]}, [])
        self.local = self.experts = None  # the old span's weights go before the new span's are mapped
        gc.collect()
        self.local = self.build(tuple(spans[0]))
        self.experts, self.kernels = self.local.experts, self.local.kernels
        self._sids.clear()
        self._held.clear()
        self._hashes.clear()
        reply, _ = self._recv()
        if reply["kind"] != "ack":
            raise PipelineError(f"re-spanning the ranks failed: {reply}")

    def stop(self) -> None:
        if not self.broken:
            self._send({"kind": "stop"}, [])
            self._recv()

    # -- the ring, with its failures as one error --------------------------------------------

    def _send(self, head: dict, arrays) -> None:
        if self._drops:
            head = dict(head, drop=self._drops[:])
            self._drops.clear()
        self._guard(lambda: self.link.send(head, arrays))

    def _recv(self):
        reply, arrays = self._guard(self.link.recv)
        if reply["kind"] == "error":
            raise PipelineError(f"rank {reply['rank']}: {reply['message']}")
        return reply, arrays

    def _guard(self, call):
        self.waiting_since = time.monotonic()
        try:
            return call()
        except RuntimeError as err:  # MLX's ring: a peer closed its connection
            self.broken = True
            raise PipelineError(f"a pipeline rank was lost ({self.describe_loss() or err})", LOST_FIX) from None
        finally:
            self.waiting_since = None


def _least(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    """Element by element, the shorter of two timings (other load only ever adds time)."""
    return [[min(x, y) for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def auto_split(pm: PipelineModel, mf, spans: list[tuple[int, int]], prefill_chunk: int) -> Calibration | None:
    """``--layers auto``: time the ranks on the byte-balanced ``spans``; if the time model
    (runtime/layer_balance.py) proposes a split worth it, re-span to it and measure again,
    and go back to the byte split if its slowest rank was not faster after all. None when
    the context is too small to hold the workload (the byte split stays)."""
    tokens = min(CHUNK_TOKENS, prefill_chunk, (pm.ctx - DECODE_STEPS - 1) // (PASSES + 1))
    if tokens < 1:
        return None
    cal = Calibration.of(pm.measure(spans, tokens), layer_costs(mf, head=False), tokens)
    if cal.worth_trying:
        pm.respan(cal.proposed)
        cal.tried = pm.measure(cal.proposed, tokens)
        if cal.chosen is cal.by_bytes:
            pm.respan(spans)
    return cal


class PipelineEngine(Engine):
    """The Engine on rank 0 of a pipeline: the same door; ``close`` stops the other ranks."""

    @_engine_method
    def __init__(self, model_file, model: PipelineModel, ctx: int, precision: str, prefill_chunk: int,
                 ranks: Sequence[tuple[int, int]], note: str = ""):
        self.file, self.config = model_file, model_file.config
        self.ctx, self.precision, self.prefill_chunk = ctx, precision, prefill_chunk
        self.model, self.spans, self.expert_cache_note = model, list(ranks), ""
        self.pipeline_note = note
        self.stats = Stats()
        self._live = _Live(KVState.empty(self.config, ctx))
        self._closers: list[Callable[[], None]] = []
        self.local_ranks: _LocalRanks | None = None  # with --ranks: the child processes
        self.calibration: Calibration | None = None  # what --layers auto measured

    def _run_chunks(self, ids, state, all_logits, progress):
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        chunks = [list(ids[c0:c0 + self.prefill_chunk]) for c0 in range(0, len(ids), self.prefill_chunk)]
        report = (lambda done: progress(done, len(ids))) if progress else None
        return self.model.prefill_chunks(chunks, state, all_logits, report)

    @_engine_method
    def checkpoint(self, path, note: str = "") -> int:
        self._flush_pending()
        self.model.gather(self._live.state)
        try:
            return super().checkpoint(path, note)
        finally:
            self.model.release(self._live.state)

    @_engine_method
    def restore(self, path, notice=None) -> None:
        super().restore(path, notice)
        self.model.scatter(self._live.state)
        self.model.release(self._live.state)

    def close(self) -> None:
        """Stop the other ranks (once); the engine cannot run after this."""
        closers, self._closers = self._closers, []
        for close in closers:
            close()


# -- forming the ring -------------------------------------------------------------------------

def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class _LocalRanks:
    """Ranks 1..N-1 as child processes of this one, watched: a child that exits while the
    pipeline runs is reported, and if rank 0 is still blocked after ``GRACE_S``, ended."""

    def __init__(self, n: int, worker_argv: list[str]):
        self.dir = Path(tempfile.mkdtemp(prefix="magnetar-ranks-"))
        hosts = self.dir / "hosts.json"
        hosts.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(n)]))
        self.env = {"MLX_HOSTFILE": str(hosts), "MLX_RANK": "0"}
        self.children: list[tuple[int, subprocess.Popen, Path]] = []
        for r in range(1, n):
            log = self.dir / f"rank{r}.log"
            with open(log, "wb") as fh:
                child = subprocess.Popen([sys.executable, "-m", "magnetar.runtime.distributed", *worker_argv],
                                         env={**os.environ, **self.env, "MLX_RANK": str(r)},
                                         stdout=subprocess.DEVNULL, stderr=fh, stdin=subprocess.DEVNULL)
            self.children.append((r, child, log))
        self.stopping = False
        self.lost: str | None = None
        atexit.register(self.end)
        threading.Thread(target=self._watch, name="magnetar-ranks", daemon=True).start()

    def _watch(self) -> None:
        while not self.stopping:
            for r, child, log in self.children:
                code = child.poll()
                if code is not None and not self.stopping:
                    self.lost = self._describe(r, code, log)
                    time.sleep(GRACE_S)
                    if not self.stopping:  # rank 0 did not get MLX's error: blocked somewhere else
                        _fatal(f"a pipeline rank was lost ({self.lost})", self)
                    return
            time.sleep(0.1)

    @staticmethod
    def _describe(r: int, code: int, log: Path) -> str:
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        try:
            text = log.read_text(errors="replace")
        except OSError:  # already cleaned up: rank 0 is leaving
            text = ""
        lines = [ln for ln in text.splitlines() if ln.startswith("magnetar rank")]
        return f"rank {r} ended, {how}" + (f": {lines[-1]}" if lines else "")

    def describe_loss(self) -> str | None:
        """Why the ring broke, if a child is why: waits briefly for the exit to be seen."""
        for _ in range(20):
            if self.lost or any(c.poll() is not None for _, c, _ in self.children):
                break
            time.sleep(0.05)
        for r, child, log in self.children:
            if self.lost is None and child.poll() is not None:
                self.lost = self._describe(r, child.returncode, log)
        return self.lost

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for _, child, _ in self.children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass

    def end(self) -> None:
        """Children still running are killed (rank 0 is leaving); the hostfile and logs go."""
        self.stopping = True
        for _, child, _ in self.children:
            if child.poll() is None:
                child.kill()
                child.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _init_group():
    try:
        return mx.distributed.init(strict=True, backend="ring")
    except RuntimeError as err:
        raise PipelineError(f"the MLX ring did not form: {err}",
                            "check the hostfile and that every rank was started within ~15 s") from None


def start_pipeline(model_path, *, ranks: int | None = None, hostfile: str | None = None, layers: str = "auto",
          ctx: int = DEFAULT_CTX, precision: str = "official", backend: str = "auto",
          prefill_chunk: int = DEFAULT_PREFILL_CHUNK, window: int | None = None,
          reply_timeout: float = REPLY_TIMEOUT_S, expert_cache: int | str | None = None,
          expert_activations: str | None = None) -> PipelineEngine | None:
    """Form the pipeline: ``ranks`` local processes, or this process as rank ``$MLX_RANK`` of
    ``hostfile``. Rank 0 gets its Engine (``close()`` it when done); other ranks serve their
    span here until rank 0 stops them, then get None. ``expert_cache``: every rank streams
    its own layers' routed experts through a cache of that size (``auto``: what its RAM allows).
    ``expert_activations``: every rank's, as ``Engine.load`` takes it."""
    if (ranks is None) == (hostfile is None):
        raise UsageError("give either --ranks N or --distributed HOSTFILE")
    if not 0 < ctx <= MAX_CTX:
        raise UsageError(f"--ctx must be between 1 and {MAX_CTX}, got {ctx}")
    if backend not in ("auto", *BACKENDS):
        raise UsageError(f"unknown backend {backend!r}", f"choose auto, {', '.join(BACKENDS)}")
    if expert_activations not in (None, *EXPERT_ACTIVATIONS):
        raise UsageError(f"unknown expert activations {expert_activations!r}",
                         f"choose {', '.join(EXPERT_ACTIVATIONS[:-1])} or {EXPERT_ACTIVATIONS[-1]}")
    mf = open_model(model_path)
    local = None
    if hostfile is not None:
        if "MLX_RANK" not in os.environ:
            raise UsageError("--distributed needs MLX_RANK (this machine's rank in the hostfile)",
                             "start every rank with mlx.launch, or set MLX_RANK=0,1,... yourself")
        try:
            n = len(json.loads(Path(hostfile).read_text()))
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot read the hostfile {hostfile}: {err}") from None
        os.environ["MLX_HOSTFILE"] = str(Path(hostfile).resolve())
        spans = parse_layers(layers, mf, n)
    else:
        spans = parse_layers(layers, mf, ranks)
        layout = ",".join(f"{a}:{b}" for a, b in spans)
        local = _LocalRanks(ranks, ["--model", os.fspath(model_path), "--layers", layout, "--ctx", str(ctx),
                                    "--precision", precision, "--backend", backend]
                            + ([] if expert_cache is None else ["--expert-cache", str(expert_cache)])
                            + ([] if expert_activations is None else ["--expert-act", expert_activations]))
        os.environ.update(local.env)
    group = _init_group()
    if group.size() != len(spans):
        raise PipelineError(f"the ring has {group.size()} ranks but --layers gives {len(spans)}")
    link = Link(group)
    try:
        kernels = select_backend(backend, expert_activations)
    except BackendUnavailable as e:
        raise UsageError(str(e), "use --backend auto or cpu") from None
    if link.rank:
        serve_rank(mf, link, spans, ctx, precision, kernels, expert_cache)
        return None

    build = functools.partial(span_model, mf, ctx=ctx, precision=precision, kernels=kernels,
                              expert_cache=expert_cache)
    pm = on_engine_thread(lambda: PipelineModel(build(spans[0]), link, ctx, prefill_chunk,
                                                window or min(len(spans) + 2, 8),
                                                local.describe_loss if local else lambda: None, build))
    threading.Thread(target=_deadline, args=(pm, local, reply_timeout), name="magnetar-deadline",
                     daemon=True).start()
    note = "layers " + ", ".join(f"rank {r}: {a}:{b}" for r, (a, b) in enumerate(spans))
    calibration = None
    if layers == "auto":
        calibration = on_engine_thread(auto_split, pm, mf, spans, prefill_chunk)
        if calibration is None:
            note += " (auto: by each layer's weight bytes; the context is too small to time the ranks)"
        else:
            spans, note = calibration.spans, calibration.line()

    def make_engine():
        engine = PipelineEngine(mf, pm, ctx, precision, prefill_chunk, spans, note)
        engine.calibration = calibration
        if pm.experts:
            engine.stats.streaming = pm.experts.stats
            cache_note = expert_budget(mf, ctx, expert_cache, spans[0])[1]
            engine.expert_cache_note = "; ".join(filter(None, (cache_note, f"rank 0 {pm.experts.describe()}")))
        return engine

    engine = on_engine_thread(make_engine)

    def close():
        try:  # not while rank 0 waits on the ring (Ctrl+C, a hang): the workers just get killed
            if engine.model.waiting_since is None and not engine.model.broken:
                on_engine_thread(engine.model.stop)
        except PipelineError:
            pass
        finally:
            if local:
                local.stopping = True
                local.wait(10.0)
                local.end()

    engine._closers.append(close)
    atexit.register(engine.close)  # after _LocalRanks.end's registration, so it runs first
    engine.local_ranks = local
    return engine


def _fatal(cause: str, local: _LocalRanks | None) -> None:
    """End rank 0 from a watchdog thread with one line. Stderr is closed first: killing the
    children wakes the blocked engine thread, whose own error must not make a second line."""
    print(f"magnetar: error: {cause} ({LOST_FIX})", file=sys.stderr, flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    if local:
        local.end()
    os._exit(EXIT_LOST)


def _deadline(model: PipelineModel, local: _LocalRanks | None, timeout: float) -> None:
    """MLX's ring has no receive timeout: a peer that hangs without dying (stopped, deadlocked,
    a cable pulled without a reset) would block rank 0 for ever. Past ``timeout`` it ends rank 0."""
    while True:
        since = model.waiting_since
        if since is not None and time.monotonic() - since > timeout:
            _fatal(f"a pipeline rank stopped answering (nothing for {timeout:.0f} s)", local)
        time.sleep(min(0.5, timeout / 4))


def span_model(mf, span: tuple[int, int], *, ctx: int, precision: str, kernels,
               expert_cache: int | str | None = None) -> Model:
    """One rank's model: layers ``span`` only, their routed experts streamed with ``expert_cache``."""
    budget, _ = expert_budget(mf, ctx, expert_cache, span)
    return Model(mf, precision, None, kernels, span=span, expert_cache=budget)


def serve_rank(mf, link: Link, spans, ctx: int, precision: str, kernels,
               expert_cache: int | str | None = None) -> None:
    build = functools.partial(span_model, mf, ctx=ctx, precision=precision, kernels=kernels,
                              expert_cache=expert_cache)
    Worker(link, build(spans[link.rank]), ctx, build).serve()


def _worker_main(argv: list[str]) -> int:
    """A local rank started by ``_LocalRanks`` (env: MLX_HOSTFILE, MLX_RANK)."""
    import argparse

    p = argparse.ArgumentParser(prog="magnetar-rank")
    for flag in ("--model", "--layers", "--precision", "--backend"):
        p.add_argument(flag, required=True)
    p.add_argument("--ctx", type=int, required=True)
    p.add_argument("--expert-cache", type=parse_cache_size, default=None)
    p.add_argument("--expert-act", default=None)
    args = p.parse_args(argv)
    rank = int(os.environ.get("MLX_RANK", "-1"))
    try:
        mf = open_model(args.model)
        spans = parse_layers(args.layers, mf, len(args.layers.split(",")))
        group = _init_group()
        serve_rank(mf, Link(group), spans, args.ctx, args.precision, select_backend(args.backend, args.expert_act),
                   args.expert_cache)
    except RuntimeError as err:
        say(rank, f"error: a pipeline peer was lost ({err})")
        return EXIT_LOST
    except Exception as err:  # one line for rank 0's report, never a traceback
        say(rank, f"error: {err}")
        return EXIT_LOST
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
