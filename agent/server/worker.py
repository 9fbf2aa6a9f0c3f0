"""The one inference worker: a thread that owns the engine and serves requests in
arrival order (docs/spec/server-api.md §1 "Concurrency").

A request becomes a ``Job``: its conversation (runtime messages), the mode and the
sampling. The worker brings the engine's live sequence to the conversation with
``Engine.sync`` (the live state first, then the disk prefix cache), samples with
``Engine.respond`` and turns the reply into protocol-neutral ``Out`` events on the
job's asyncio queue. The HTTP side projects them onto each wire format. A job whose
client went away is cancelled: skipped while queued, stopped after the current token
while generating (the reply is closed with EOS, so the live tokens stay a transcript).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from magnetar.runtime import (ContextFull, DsmlError, Message, ReasoningDelta, ReplyEnd, TextDelta, ToolCall,
                              ToolCallParsed, ToolCallStarted, ToolSpec, atomic_write_bytes)

from .arguments import ArgumentsEncoder

log = logging.getLogger("magnetar.server")

Finish = Literal["stop", "stop_sequence", "tool_calls", "length", "context", "cancelled", "error"]
MEMORY_SIZE = 4096  # tool ids remembered for exact replay; a turn older than this re-renders canonically


@dataclass(frozen=True)
class Out:
    """One thing the generation says: ``kind`` is started, reasoning, text, tool_start (the
    call's id and name, at its invoke header), tool_args (a fragment of its arguments JSON),
    tool (the complete call) or end."""

    kind: str
    text: str = ""
    call: dict | None = None  # tool: {"id", "name", "arguments" (JSON string), "input" (object)}
    finish: Finish | None = None
    usage: dict | None = None
    stop_sequence: str | None = None


@dataclass
class Job:
    messages: list[Message]
    tools: list[ToolSpec]
    mode: str
    max_tokens: int
    sampling: dict
    id_prefix: str  # the protocol's tool-call id prefix (call_, toolu_)
    stop: list[str] = field(default_factory=list)
    force_call: bool | str = False  # tool_choice required (True) or forced (a name)
    arrived: float = field(default_factory=time.perf_counter)  # when the request came in
    first: float | None = None  # when its first generated text or call went out
    loop: asyncio.AbstractEventLoop | None = None
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: Out) -> None:
        if self.first is None and item.kind in ("reasoning", "text", "tool_start"):
            self.first = time.perf_counter()
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class ToolMemory:
    """Tool-call id -> the exact DSML block the model sampled and the reasoning before it,
    so a client's echoed assistant turn renders to the tokens the model produced (§4.1)."""

    def __init__(self, size: int = MEMORY_SIZE):
        self.size = size
        self._calls: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()
        self.dirty = False  # remembered something since the last save

    def remember(self, call_id: str, dsml: str, reasoning: str) -> None:
        with self._lock:
            self.dirty = True
            self._calls[call_id] = {"dsml": dsml, "reasoning": reasoning}
            while len(self._calls) > self.size:
                self._calls.popitem(last=False)

    def recall(self, call_id: str | None) -> dict | None:
        with self._lock:
            return self._calls.get(call_id) if call_id else None

    def save(self, path: Path) -> None:
        with self._lock:
            atomic_write_bytes(path, json.dumps(dict(self._calls)).encode())
            self.dirty = False

    def load(self, path: Path) -> None:
        try:
            calls = json.loads(path.read_text())
        except (OSError, ValueError):
            return  # no memory yet, or a damaged file: replays render canonically
        with self._lock:
            self._calls.update(calls)

    def remember_reply(self, visible: list[Message], reasoning: str) -> None:
        """The reasoning behind the last message of ``visible`` (the conversation as the
        client sees it), for a client that echoes that reply without it."""
        self.remember(_VISIBLE + visible_key(visible), "", reasoning)

    def apply(self, messages: list[Message], thinking: bool = True) -> list[Message]:
        """Messages whose remembered tool calls carry their sampled DSML, and whose reasoning
        the client left out is filled in from memory (§4.3: opencode and Codex often drop
        it; we must not 400): by tool-call id, else by the visible transcript up to that
        reply (ds4's "visible" keys). A reply whose reasoning is neither sent nor remembered
        renders without it: the prompt then differs from what the model saw, so the KV
        prefix stops there (logged as a cache miss)."""
        out = []
        for at, m in enumerate(messages):
            known = [self.recall(c.id) for c in m.tool_calls]
            if m.tool_calls and all(known) and len({k["dsml"] for k in known}) == 1:
                calls = [c.model_copy(update={"dsml": known[0]["dsml"]}) for c in m.tool_calls]
                m = m.model_copy(update={"tool_calls": calls, "reasoning": m.reasoning or known[0]["reasoning"]})
            if m.role == "assistant" and m.reasoning is None and thinking:
                seen = self.recall(_VISIBLE + visible_key(messages[:at + 1]))
                if seen is not None:
                    m = m.model_copy(update={"reasoning": seen["reasoning"]})
                else:
                    log.info("KV cache miss: echoed assistant turn %d has no reasoning and none is remembered; "
                             "rendered without it", at)
            out.append(m)
        return out


_VISIBLE = "visible:"  # memory keys of replies found by their visible transcript


def visible_key(messages: list[Message]) -> str:
    """A hash of what a client sees of a conversation: roles, text, tool names and
    arguments (no ids, no reasoning: those are what clients change or drop)."""
    digest = hashlib.sha256()
    for m in messages:
        seen = [m.role, m.content, [[c.name, c.arguments] for c in m.tool_calls]]
        digest.update(json.dumps(seen, ensure_ascii=False, sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


class StopFilter:
    """Client stop strings over the answer text: holds back what could start one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit: str | None = None

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.held += text
        found = [(self.held.find(s), s) for s in self.stops if s in self.held]
        if found:
            at, self.hit = min(found)
            out, self.held = self.held[:at], ""
            return out
        keep = max(len(s) for s in self.stops) - 1
        cut = max(0, len(self.held) - keep)
        out, self.held = self.held[:cut], self.held[cut:]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class Worker:
    """Owns ``engine``; ``submit`` queues a job. ``cache``: an optional PrefixCache."""

    def __init__(self, engine, cache=None, memory_path: Path | None = None):
        self.engine, self.cache, self.memory_path = engine, cache, memory_path
        self.memory = ToolMemory()
        if memory_path is not None:
            self.memory.load(memory_path)
        if cache is not None:
            engine.attach_cache(cache)
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="magnetar-server-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        job.loop = asyncio.get_running_loop()
        self._jobs.put(job)

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the worker thread between jobs (prompt counting)."""
        done: queue.Queue = queue.Queue()
        self._jobs.put((fn, args, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        """Finish the queued jobs, then save the live state and the tool memory."""
        self._jobs.put(None)
        self._thread.join()
        if self.cache is not None:
            self.cache.save(self.engine, "shutdown")
        if self.memory_path is not None:
            self.memory.save(self.memory_path)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            if isinstance(job, tuple):
                fn, args, done = job
                try:
                    done.put((True, fn(*args)))
                except Exception as err:  # handed to the caller
                    done.put((False, err))
                continue
            if job.cancelled.is_set():
                job.emit(Out("end", finish="cancelled"))
                continue
            try:
                self._run(job)
            except Exception as err:  # one request's failure must not stop the server
                log.exception("request failed")
                job.emit(Out("end", finish="error", text=f"{type(err).__name__}: {err}"))

    def _run(self, job: Job) -> None:
        engine = self.engine
        picked = time.perf_counter()
        report = engine.sync(job.messages, job.tools, job.mode, room=1)
        synced = time.perf_counter()
        prompt = len(engine.tokens)
        job.emit(Out("started", usage={"prompt": prompt, "cached": report.reused}))
        budget = max(1, min(job.max_tokens, engine.ctx - prompt - 1))  # clamped, not rejected (§6)
        turn = _Turn(job, self.memory)
        end_reason, finish = "eos", None
        try:
            # DSML syntax greedily, payloads with the request's sampling (§5, as ds4); arguments as written.
            for ev in engine.respond(thinking=job.mode != "nothink", should_stop=turn.counter.should_stop,
                                     max_tokens=budget, syntax_greedy=True, stream_arguments=True,
                                     force_call=job.force_call, **job.sampling):
                if isinstance(ev, ReplyEnd):
                    end_reason = ev.reason
                else:
                    turn.take(ev)
        except ContextFull:
            finish = "context"
        stops = turn.stops
        if (rest := stops.flush()) and stops.hit is None:
            turn.shown.append(rest)
            job.emit(Out("text", rest))
        # A reply cut by the free context, not by the client's max_tokens, says so (§3 finish mapping).
        context_bound = budget < job.max_tokens
        finish = finish or _finish(end_reason, turn.calls, stops, job, context_bound)
        turn.remember(finish)
        usage = {"prompt": prompt, "cached": report.reused, "completion": turn.counter.tokens,
                 "reasoning": turn.counter.reasoning_tokens}
        # Logged before the end goes out: a client that has its answer finds the line written.
        _log_request(job, report, prompt, turn.counter.tokens, finish, picked, synced)
        job.emit(Out("end", finish=finish, usage=usage, stop_sequence=stops.hit))
        if self.memory_path is not None and self.memory.dirty:  # after the answer: a crash keeps what was sampled
            self.memory.save(self.memory_path)


class _Turn:
    """One reply's events -> ``Out`` events: reasoning and text (through the stop filter),
    tool calls announced at their invoke header with their arguments streamed as JSON
    fragments (``tool_start``, ``tool_args``), and ``tool`` once the block is valid."""

    def __init__(self, job: Job, memory: ToolMemory):
        self.job, self.memory = job, memory
        self.counter = _Counter(job)
        self.stops = StopFilter(job.stop)
        self.reasoning: list[str] = []
        self.calls: list[dict] = []
        self.ids: list[str] = []  # one per invoke header seen
        self.arguments = ArgumentsEncoder()
        self.shown: list[str] = []  # the answer text the client gets

    def remember(self, finish: str) -> None:
        """Keep the reasoning for a client that echoes this reply without it."""
        if finish in ("cancelled", "error") or not self.reasoning:
            return
        calls = [ToolCall(name=c["name"], arguments=c["input"]) for c in self.calls]
        reply = Message(role="assistant", content="".join(self.shown), tool_calls=calls)
        self.memory.remember_reply([*self.job.messages, reply], "".join(self.reasoning))

    def take(self, ev) -> None:
        job = self.job
        if isinstance(ev, ReasoningDelta):
            self.reasoning.append(ev.text)
            job.emit(Out("reasoning", ev.text))
        elif isinstance(ev, TextDelta | DsmlError):
            text = ev.text if isinstance(ev, TextDelta) else ev.raw  # bad DSML stays text (§3)
            self.counter.answered = True
            if (shown := self.stops.feed(text)):
                self.shown.append(shown)
                job.emit(Out("text", shown))
            if self.stops.hit is not None:
                self.counter.stop_now = True
        elif isinstance(ev, ToolCallParsed):
            self.calls.append(self._tool(ev.call))
        else:
            if isinstance(ev, ToolCallStarted):
                self.counter.answered = True
                self.ids.append(job.id_prefix + secrets.token_hex(16))
                job.emit(Out("tool_start", call={"id": self.ids[-1], "name": ev.name}))
            if (piece := self.arguments.fragment(ev)):
                job.emit(Out("tool_args", piece))

    def _tool(self, call) -> dict:
        index = len(self.calls)
        call_id = self.ids[index]
        if call.dsml:
            self.memory.remember(call_id, call.dsml, "".join(self.reasoning))
        # The streamed fragments are the arguments (§4.1 invariant: byte-identical).
        out = {"id": call_id, "name": call.name, "arguments": self.arguments.calls[index], "input": call.arguments}
        self.job.emit(Out("tool", call=out))
        return out


def _log_request(job: Job, report, prompt: int, tokens: int, finish: str, picked: float, synced: float) -> None:
    """One line per request: what prefix reuse saved, and where its time to first token
    went (``magnetar bench server`` reads the ``request`` record)."""
    ended = time.perf_counter()
    first = job.first or ended
    request = {"prompt": prompt, "reused": report.reused, "prefilled": report.prefilled, "tokens": tokens,
               "finish": finish, "arrived": job.arrived, "picked": picked, "synced": synced, "first": first,
               "ended": ended}
    log.info("%s: prompt %d tokens, %d reused, %d prefilled; waited %.1f ms, synced in %.1f ms, first token "
             "%.1f ms after arrival; %d tokens in %.2f s", finish, prompt, report.reused, report.prefilled,
             (picked - job.arrived) * 1e3, (synced - picked) * 1e3, (first - job.arrived) * 1e3, tokens,
             ended - first, extra={"request": request})


def _finish(reason: str, calls: list, stops: StopFilter, job: Job, context_bound: bool) -> Finish:
    if job.cancelled.is_set():
        return "cancelled"
    if stops.hit is not None:
        return "stop_sequence"
    if calls:
        return "tool_calls"
    if reason == "limit":
        return "context" if context_bound else "length"
    return "stop"


class _Counter:
    """Counts sampled tokens (``respond`` asks ``should_stop`` once per token) and
    says stop when the client left or a stop string was seen."""

    def __init__(self, job: Job):
        self.job = job
        self.tokens = self.reasoning_tokens = 0
        self.answered = False
        self.stop_now = False

    def should_stop(self) -> bool:
        self.tokens += 1
        if not self.answered and self.job.mode != "nothink":
            self.reasoning_tokens += 1
        return self.stop_now or self.job.cancelled.is_set()


def count_prompt(engine, messages: list[Message], tools: list[ToolSpec], mode: str) -> int:
    """Tokens of the rendered prompt (count_tokens, and the context check before a job)."""
    return len(engine.render(messages, tools, mode))

