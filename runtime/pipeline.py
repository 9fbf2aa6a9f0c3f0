"""Layer-split pipeline over ``mx.distributed``: the wire, the split and the worker ranks.

docs/spec/streaming-distributed.md §5 (ds4's design) and §10.2, on MLX's own ring
(§6) instead of a hand-rolled TCP protocol. Rank r runs layers ``spans[r]``
(contiguous, ``Model(span=...)``); rank 0 also owns the tokenizer, sampler,
transcript and sessions (runtime/distributed.py), the last rank owns the output
head. Work flows 0 -> 1 -> ... -> N-1 -> 0, which is exactly MLX's ring: each rank
only talks to its two neighbours, the only peers ring ``send``/``recv`` reach.

A message is a fixed 1 KiB header (a JSON dict: kind, session, positions, prefix
hashes, the shapes of what follows) and then its arrays, each one ring
``send``; a decode hop is two sends (header, hidden state). Hidden states travel
as float32, so a split model computes bit for bit what one process does.

Every work item carries the 64-bit FNV-1a hash of the token prefix before its
tokens and after them (ds4's rolling hash over each token's 4 little-endian
bytes). A worker whose session does not end where the item starts says so
(``mismatch``) instead of computing; rank 0 then replays the transcript.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .errors import MagnetarError, UsageError
from .gguf_read import ModelFile
from .kv_state import KVState

FNV_BASIS = 1469598103934665603
FNV_PRIME = 1099511628211
_MASK = (1 << 64) - 1
HEADER_BYTES = 1024  # one fixed-size send; a longer header (a session load) sends the rest after it
MAX_SESSIONS = 8  # per worker: the live sequence plus a few scratch ones (Engine.logits)
CALIBRATION_SID = 0  # the worker session ``--layers auto`` times its workload on (rank 0 counts from 1)
_DTYPES = {"float32": mx.float32, "int32": mx.int32}


class PipelineError(MagnetarError):
    """A pipeline rank was lost, refused the work, or the split cannot work."""

    exit_code = 3


def fnv1a(tokens, h: int = FNV_BASIS) -> int:
    """ds4's prefix hash, continued from ``h`` over ``tokens`` (each as 4 little-endian bytes)."""
    for t in tokens:
        t = int(t)
        for shift in (0, 8, 16, 24):
            h = ((h ^ ((t >> shift) & 0xFF)) * FNV_PRIME) & _MASK
    return h


# -- the split --------------------------------------------------------------------------------

def layer_costs(mf: ModelFile, head: bool = True) -> list[float]:
    """Each layer's weight bytes, with ``head`` the head's bytes added to the last layer (the
    last rank runs it). Decode reads every weight once per token, so bytes are what a layer
    costs there. A hash layer's token -> experts table is left out: a token reads one row."""
    n = mf.config.n_layer
    costs = [0.0] * n
    for name, info in mf.tensors.items():
        if name.startswith("blk.") and "tid2eid" not in name:
            costs[int(name.split(".")[1])] += info.nbytes
        elif name.startswith("output") and head:
            costs[-1] += info.nbytes
    return costs


def balanced_spans(costs: list[float], ranks: int, speeds: list[float] | None = None) -> list[tuple[int, int]]:
    """Contiguous spans, one per rank, each non-empty, minimizing the costliest one (DP). With
    ``speeds``, rank r takes ``speeds[r]`` per unit of cost (seconds per byte, say)."""
    n = len(costs)
    speeds = speeds or [1.0] * ranks
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    best = {(0, 0): (0.0, None)}  # (ranks used, layers covered) -> (max cost, previous cut)
    for r in range(1, ranks + 1):
        for end in range(r, n - (ranks - r) + 1):
            options = [(max(best[(r - 1, cut)][0], speeds[r - 1] * (prefix[end] - prefix[cut])), cut)
                       for cut in range(r - 1, end) if (r - 1, cut) in best]
            best[(r, end)] = min(options)
    cuts, end = [], n
    for r in range(ranks, 0, -1):
        cut = best[(r, end)][1]
        cuts.append((cut, end))
        end = cut
    return cuts[::-1]


def parse_layers(spec: str, mf: ModelFile, ranks: int) -> list[tuple[int, int]]:
    """``auto`` (balanced by per-layer weight bytes) or ``A:B,C:D,...``: half-open, contiguous
    ranges from layer 0 to the last layer, one per rank."""
    n = mf.config.n_layer
    if ranks < 2:
        raise UsageError(f"a pipeline needs at least 2 ranks, got {ranks}")
    if ranks > n:
        raise UsageError(f"{ranks} ranks for {n} layers: every rank needs at least one layer")
    if spec == "auto":
        return balanced_spans(layer_costs(mf), ranks)
    try:
        spans = [tuple(int(x) for x in part.split(":")) for part in spec.split(",")]
    except ValueError:
        spans = [()]
    if not all(len(s) == 2 for s in spans):
        raise UsageError(f"--layers {spec!r} is not auto or A:B,C:D,...", "e.g. --layers 0:20,20:43")
    if len(spans) != ranks:
        raise UsageError(f"--layers {spec!r} has {len(spans)} ranges for {ranks} ranks")
    bounds = [0] + [b for _, b in spans]
    if [a for a, _ in spans] != bounds[:-1] or bounds[-1] != n or any(a >= b for a, b in spans):
        raise UsageError(f"--layers {spec!r} must cover layers 0..{n - 1} in contiguous, non-empty "
                            f"half-open ranges A:B (layers A..B-1)", f"e.g. --layers 0:{n // 2},{n // 2}:{n}")
    return [(a, b) for a, b in spans]


def time_span(model, state: KVState, ids: list[int], X: mx.array | None, decode: bool) -> tuple[list[float], object]:
    """Run ``model``'s span on ``ids`` after ``state`` and time it: for a prefill chunk the wall
    seconds of each layer, then of what follows the last one (the head, on the last rank); for
    a decode step the whole span's (one compiled graph, no layer boundaries). Prefill evaluates
    layer by layer anyway, so the marks add no sync. -> (seconds, what the span hands on)."""
    marks = [time.perf_counter()]
    with model.experts.set_aside() if model.experts else nullcontext():  # no routes learnt from it
        if decode:
            out = model.decode(ids[0], state, X=X)
        else:
            out = model.prefill(ids, state, X=X, on_layer=lambda il: marks.append(time.perf_counter()))
    marks.append(time.perf_counter())
    return np.diff(marks).tolist(), out


# -- the wire ---------------------------------------------------------------------------------

class Link:
    """Messages between ring neighbours: a header dict and arrays."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.next, self.prev = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        self.sent_bytes = 0

    def send(self, head: dict, arrays=(), to: int | None = None) -> None:
        arrays = [a if isinstance(a, mx.array) else mx.array(a) for a in arrays]
        head = dict(head, arrays=[[str(a.dtype).split(".")[-1], list(a.shape)] for a in arrays])
        blob = json.dumps(head, separators=(",", ":")).encode()
        frame = np.zeros(HEADER_BYTES, np.uint8)
        frame[:4] = np.frombuffer(len(blob).to_bytes(4, "little"), np.uint8)
        first = blob[:HEADER_BYTES - 4]
        frame[4:4 + len(first)] = np.frombuffer(first, np.uint8)
        parts = [mx.array(frame)]
        if len(blob) > len(first):
            parts.append(mx.array(np.frombuffer(blob[len(first):], np.uint8)))
        dst = self.next if to is None else to
        for part in parts + arrays:  # one at a time: a ring send must be evaluated to go out
            if part.size:  # an empty array (a fresh state's compressed rows) is its shape alone
                mx.eval(mx.distributed.send(part, dst, group=self.group))
                self.sent_bytes += part.nbytes

    def recv(self, src: int | None = None) -> tuple[dict, list[mx.array]]:
        src = self.prev if src is None else src
        frame = np.array(self._recv((HEADER_BYTES,), mx.uint8, src))
        n = int.from_bytes(frame[:4].tobytes(), "little")
        blob = frame[4:4 + min(n, HEADER_BYTES - 4)].tobytes()
        if n > HEADER_BYTES - 4:
            blob += np.array(self._recv((n - (HEADER_BYTES - 4),), mx.uint8, src)).tobytes()
        head = json.loads(blob)
        arrays = [self._recv(tuple(shape), _DTYPES[dtype], src) for dtype, shape in head.pop("arrays")]
        return head, arrays

    def _recv(self, shape, dtype, src) -> mx.array:
        if not np.prod(shape):
            return mx.zeros(shape, dtype)
        out = mx.distributed.recv(shape, dtype, src, group=self.group)
        mx.eval(out)
        return out


# -- a worker rank ----------------------------------------------------------------------------

@dataclass
class _Session:
    state: KVState
    hash: int


class Worker:
    """Rank r > 0: runs its span for every work item from rank r-1 and hands the result on;
    the last rank sends logits (or an ack) back to rank 0. Serves until ``stop``. ``build``
    makes the model of a span (a re-span)."""

    def __init__(self, link: Link, model, ctx: int, build: Callable[[tuple[int, int]], object]):
        self.link, self.model, self.ctx, self.build = link, model, ctx, build
        self.cfg = model.cfg
        self.sessions: OrderedDict[int, _Session] = OrderedDict()
        self.last = link.next == 0

    def serve(self) -> None:
        while True:
            head, arrays = self.link.recv()
            for sid in head.get("drop", ()):
                self.sessions.pop(sid, None)
            kind = head["kind"]
            if kind == "work":
                self._work(head, arrays)
            elif kind == "save":
                self._save(head, arrays)
            elif kind == "load":
                self._load(head, arrays)
            elif kind == "calibrate":
                self._calibrate(head, arrays)
            elif kind == "respan":
                self._respan(head)
            else:  # stop, or a mismatch/error/ack passing through to rank 0
                self.link.send(head, arrays)
                if kind == "stop":
                    return

    def _work(self, head: dict, arrays: list[mx.array]) -> None:
        tokens, X = np.array(arrays[0]).tolist(), arrays[1]
        sid, pos0 = head["sid"], head["pos0"]
        if pos0 == 0:
            self._open(sid, self._empty(), FNV_BASIS)
        s = self.sessions.get(sid)
        if s is None or s.state.n_tokens != pos0 or s.hash != head["h0"] or fnv1a(tokens, head["h0"]) != head["h1"]:
            have = None if s is None else s.state.n_tokens
            self.link.send({"kind": "mismatch", "sid": sid, "rank": self.link.rank, "have": have, "pos0": pos0})
            return
        self.sessions.move_to_end(sid)
        try:
            if head["decode"]:
                out = self.model.decode(tokens[0], s.state, X=X)
            else:
                out = self.model.prefill(tokens, s.state, all_logits=head["out"] == "all", X=X)
        except MagnetarError as err:
            self.sessions.pop(sid, None)  # its state may be half-advanced: rank 0 replays
            self.link.send({"kind": "error", "rank": self.link.rank, "message": str(err)})
            return
        s.hash = head["h1"]
        if not self.last:
            self.link.send(head, [arrays[0], out])
        elif head["out"] == "ack":
            self.link.send({"kind": "ack", "sid": sid})
        else:
            self.link.send({"kind": "logits", "sid": sid}, [np.asarray(out, np.float32)])

    def _calibrate(self, head: dict, arrays: list[mx.array]) -> None:
        """Time this span on rank 0's calibration workload (``--layers auto``) and add the
        seconds to the message; the last rank sends every rank's back to rank 0."""
        ids, X = np.array(arrays[0]).tolist(), arrays[1]
        if head["pos0"] == 0:
            self._open(CALIBRATION_SID, self._empty(), FNV_BASIS)
        s = self.sessions.get(CALIBRATION_SID)
        if s is None or s.state.n_tokens != head["pos0"]:
            self.link.send({"kind": "error", "rank": self.link.rank, "message": "lost the calibration sequence"})
            return
        seconds, out = time_span(self.model, s.state, ids, X, head["decode"])
        times = head["times"] + [seconds]
        if self.last:
            self.link.send({"kind": "calibrated", "times": times})
        else:
            self.link.send(dict(head, times=times), [arrays[0], out])

    def _respan(self, head: dict) -> None:
        """Take the layers ``head["spans"]`` gives this rank: the message goes on first, so the
        ranks rebuild side by side; the last one answers once its model is built. Every session
        is dropped (only the calibration one exists when ``--layers auto`` re-spans)."""
        if not self.last:
            self.link.send(head)
        self.sessions.clear()
        self.model = None  # the old span's weights go before the new span's are mapped
        gc.collect()
        self.model = self.build(tuple(head["spans"][self.link.rank]))
        if self.last:
            self.link.send({"kind": "ack"})

    def _empty(self) -> KVState:
        """A session's state: only this span's layers ever grow (the others stay empty)."""
        state = KVState.empty(self.cfg, self.ctx)
        state.grown = self.model.span
        return state

    def _open(self, sid: int, state: KVState, h: int) -> None:
        self.sessions[sid] = _Session(state, h)
        self.sessions.move_to_end(sid)
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)

    def _save(self, head: dict, arrays: list[mx.array]) -> None:
        """Append this span's layer arrays (their exact shapes) and pass the message on."""
        s = self.sessions.get(head["sid"])
        if s is None or s.state.n_tokens != head["n"] or s.hash != head["h"]:
            self.link.send({"kind": "mismatch", "sid": head["sid"], "rank": self.link.rank,
                            "have": None if s is None else s.state.n_tokens, "pos0": head["n"]})
            return
        mine = [a for il in self.model.span for a in s.state.layers[il].arrays()]
        self.link.send(head, list(arrays) + mine)

    def _load(self, head: dict, arrays: list[mx.array]) -> None:
        """Take this span's layers out of a restored sequence (they follow the tokens, layer by
        layer from the first remote layer) and pass the rest on."""
        state = self._empty()
        state.tokens = np.array(arrays[0]).tolist()[1:]  # after a leading 0: never an empty send
        it = 1
        for il in range(head["first"], self.model.span.stop):
            k = len(state.layers[il].arrays())
            if il in self.model.span:
                state.layers[il].replace(arrays[it:it + k])
            it += k
        self._open(head["sid"], state, head["h"])
        if self.last:
            self.link.send({"kind": "ack", "sid": head["sid"]})
        else:
            self.link.send(dict(head, first=self.model.span.stop), [arrays[0], *arrays[it:]])


def say(rank: int, message: str) -> None:
    """One line on stderr from a worker rank (rank 0 speaks through the CLI's error line)."""
    print(f"magnetar rank {rank}: {message}", file=sys.stderr, flush=True)
