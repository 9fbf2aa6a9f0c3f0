"""The agent loop, independent of any UI: a turn is a stream of events.

One turn: the user's text joins the conversation; then, step by step, the new
part of the prompt is prefilled, the model's reply is sampled and parsed as it
streams (reasoning, answer text, DSML tool calls), the calls run in order and
their results go back as ``<tool_result>`` parts of the next user turn, until
the model answers without calling a tool (docs/spec/agent.md §5.3).

The transcript truth is the engine's token list; ``Engine.sync`` keeps it in
step with the conversation (sampled tokens are never re-rendered: each step
prefills only what came after the model's last message) and ``Engine.respond``
reads the reply back as events.

Guards: a step cap; identical calls (same name and arguments) warn the model
at ``repeat_warn`` and end the turn at ``repeat_stop``; a malformed DSML
block is answered with the parse error up to ``malformed_retries`` times;
``interrupt()`` stops generation (the partial reply is closed with EOS and
kept) or a running tool (through ``ToolContext.cancel``); text
``queue``d while a turn runs joins the next step's user turn.
"""

from __future__ import annotations

import json
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from magnetar.runtime import (MODES, ContextFull, DsmlError, DsmlInThinking, Message, Mode, ReasoningDelta,
                              ReplyEnd, TextDelta, ToolCall, ToolCallParsed, ToolCallStarted, ToolSpec, UsageError,
                              last_reply)
from magnetar.tools.base import PERMISSIONS, Permissions, Tool, ToolContext, ToolResult, utf8_safe
from magnetar.tools.edit import UndoOutcome

from .compaction import Compaction, CompactionPolicy, summarize_older


@dataclass
class LoopSettings:
    thinking: Mode = "think"
    max_steps: int = 40
    max_tokens_per_step: int = 8192
    temperature: float = 1.0  # DeepSeek's recommended sampling for V4
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repeat_warn: int = 3
    repeat_stop: int = 5
    malformed_retries: int = 3


# -- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prefill:
    done: int
    total: int


@dataclass(frozen=True)
class Reasoning:
    text: str


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class ToolStarted:
    """A call's header was read (its arguments are still streaming)."""

    name: str


@dataclass(frozen=True)
class ToolRunning:
    call_id: str
    name: str
    arguments: dict


@dataclass(frozen=True)
class ToolFinished:
    call_id: str
    name: str
    result: ToolResult


@dataclass(frozen=True)
class PlanUpdated:
    """The plan after an ``update_plan`` call: steps in order, each ``{"step", "status"}``."""

    steps: list


@dataclass(frozen=True)
class Notice:
    level: str  # "info" | "warning" | "error"
    text: str


@dataclass(frozen=True)
class TurnEnd:
    answer: str
    reason: str  # answered | token-limit | step-cap | repeat-guard | malformed | interrupted | context-full
    steps: int


Event = (Prefill | Reasoning | Text | ToolStarted | ToolRunning | ToolFinished | PlanUpdated | Notice
         | TurnEnd)


# -- the loop ---------------------------------------------------------------------------------


def _with_progress(work: Callable[[Callable[[int, int], None]], object]) -> Iterator[Prefill]:
    """Run ``work(progress)`` (a prefill) on a helper thread and yield its progress as it
    happens, so a UI can draw the bar while a long prompt is processed."""
    updates: queue.SimpleQueue = queue.SimpleQueue()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work(lambda done, total: updates.put((done, total)))
        except BaseException as err:  # raised again in the caller's thread
            failure.append(err)
        finally:
            updates.put(None)

    threading.Thread(target=run, name="magnetar-prefill", daemon=True).start()
    while (update := updates.get()) is not None:
        yield Prefill(*update)
    if failure:
        raise failure[0]


@dataclass
class _Step:
    reasoning: str = ""
    text: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    error: str | None = None
    interrupted: bool = False
    cut: bool = False  # hit the per-step token limit


class Agent:
    """One conversation with the model and its tools. Front ends (the TUI, sessions, ``run``,
    ``review``) read its state through the properties and change it through the commands;
    ``turn`` runs the loop and yields its events."""

    def __init__(self, engine, tools: Sequence[Tool], ctx: ToolContext, system_prompt: str,
                 settings: LoopSettings | None = None):
        self.engine, self.ctx, self.settings = engine, ctx, settings or LoopSettings()
        self.tools = {t.name: t for t in tools}
        self.specs = [ToolSpec(**t.spec()) for t in tools]
        self._messages: list[Message] = [Message(role="system", content=system_prompt)]
        self._queue: list[str] = []
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        ctx.cancel = self._cancel
        self._call_count = 0

    # -- state, for front ends (read it; change it with the commands below) -----------------

    @property
    def messages(self) -> list[Message]:
        """The conversation, system prompt first (a copy)."""
        return list(self._messages)

    @property
    def permissions(self) -> Permissions:
        """What tools may do without asking: ask, auto-edit, yolo or read-only."""
        return self.ctx.permissions

    @property
    def thinking(self) -> Mode:
        return self.settings.thinking

    @property
    def root(self) -> Path:
        return self.ctx.root

    @property
    def plan(self) -> list[dict]:
        """The model's latest ``update_plan`` steps (a copy)."""
        return list(self.ctx.plan)

    @property
    def context_used(self) -> int:
        return len(self.engine.tokens)

    @property
    def context_size(self) -> int:
        return self.engine.ctx

    @property
    def stats(self):
        """The engine's ``Stats`` (prefill and generation speed, tokens, cache hits)."""
        return self.engine.stats

    # -- commands (not while a turn runs, except queue and interrupt) ---------------------------

    def set_permissions(self, permissions: Permissions) -> None:
        if permissions not in PERMISSIONS:
            raise UsageError(f"permissions must be one of {', '.join(PERMISSIONS)}, not {permissions!r}")
        self.ctx.permissions = permissions

    def set_thinking(self, thinking: Mode) -> None:
        if thinking not in MODES:
            raise UsageError(f"thinking must be one of {', '.join(MODES)}, not {thinking!r}")
        self.settings.thinking = thinking

    def set_confirm(self, confirm: Callable[[str, str], bool] | None) -> None:
        """Who answers when a tool asks permission (None: nobody, so the answer is no)."""
        self.ctx.confirm = confirm

    def new_conversation(self) -> None:
        """Forget everything but the system prompt (the engine syncs to it at the next turn)."""
        del self._messages[1:]
        self.clear_plan()

    def clear_plan(self) -> None:
        self.ctx.plan = []

    def replace_messages(self, messages: Sequence[Message]) -> None:
        """Continue from ``messages`` (a resumed session, a compaction); none keeps the system prompt."""
        self._messages[:] = list(messages) or self._messages[:1]

    def replay(self, messages: Sequence[Message], progress: Callable[[int, int], None] | None = None) -> None:
        """Bring the engine to ``messages`` up to the model's last reply, that reply closed
        (a session replayed from its transcript; the next turn syncs what follows)."""
        last = last_reply(messages)
        if last is not None:
            self.engine.sync(messages[:last + 1], self.specs, self.settings.thinking, progress)

    def undo_last_turn(self) -> UndoOutcome | None:
        """Restore the files the last turn changed; None when there is no undo journal."""
        return self.ctx.undo.undo_last_turn() if self.ctx.undo is not None else None

    def compact(self, policy: CompactionPolicy, focus: str | None = None,
                progress: Callable[[int, int], None] | None = None) -> Compaction:
        """Summarize the older turns (agent/compaction.py); ``interrupt`` stops it."""
        self._cancel.clear()
        result, messages = summarize_older(self.engine, self._messages, self.specs, self.settings, policy, focus,
                                           progress, self._cancel)
        self._messages[:] = messages
        return result

    # -- called from other threads (the UI) ----------------------------------------------------

    def queue(self, text: str) -> None:
        """A message typed while a turn runs: it joins the next step's user turn."""
        with self._lock:
            self._queue.append(text)

    def interrupt(self) -> None:
        """Stop the running generation or tool; the turn then ends as ``interrupted``."""
        self._cancel.set()

    def take_queue(self) -> list[str]:
        with self._lock:
            queued, self._queue = self._queue, []
        return queued

    # -- a turn ---------------------------------------------------------------------------------

    def turn(self, user_text: str) -> Iterator[Event]:
        """Run one user turn to its end; yields events, the last one a ``TurnEnd``."""
        self._cancel.clear()
        if self.ctx.undo is not None:
            self.ctx.undo.begin_turn()  # /undo restores what this turn changes
        self._messages.append(Message(role="user", content=user_text))
        seen: Counter[str] = Counter()
        malformed = 0
        s = self.settings
        for step in range(1, s.max_steps + 1):
            try:
                yield from self._sync_prompt()
                result = _Step()
                yield from self._sample(result)
            except ContextFull as err:
                yield Notice("error", str(err))
                yield TurnEnd("", "context-full", step)
                return
            self._record(result)
            if result.interrupted:
                yield TurnEnd(result.text, "interrupted", step)
                return
            if result.error is not None:
                malformed += 1
                if malformed > s.malformed_retries:
                    yield Notice("error", f"the model kept writing malformed tool calls: {result.error}")
                    yield TurnEnd(result.text, "malformed", step)
                    return
                yield Notice("warning", f"malformed tool call ({result.error}); asking the model to retry")
                self._add_user(f"Your tool call could not be parsed: {result.error}. Nothing was run. "
                               "Write the call again in the exact DSML format, or answer without tools.")
                continue
            if not result.calls:
                queued = self.take_queue()
                if queued:  # typed while the model answered: they are the next thing to answer
                    self._add_user("\n\n".join(queued))
                    continue
                yield TurnEnd(result.text, "token-limit" if result.cut else "answered", step)
                return
            stop = yield from self._run_calls(result.calls, seen)
            if stop:
                yield TurnEnd(result.text, stop, step)
                return
            queued = self.take_queue()
            if queued:
                self._add_user("\n\n".join(queued))
        yield Notice("warning", f"stopped after {s.max_steps} steps (the step cap)")
        yield TurnEnd("", "step-cap", s.max_steps)

    def _add_user(self, text: str) -> None:
        self._messages.append(Message(role="user", content=text))

    # -- prompt ---------------------------------------------------------------------------------

    def _sync_prompt(self) -> Iterator[Event]:
        """Make the engine's tokens the whole conversation plus the assistant opener."""
        yield from _with_progress(lambda progress: self.engine.sync(self._messages, self.specs, self.settings.thinking,
                                                                    progress))

    # -- sampling -------------------------------------------------------------------------------

    def _sample(self, out: _Step) -> Iterator[Event]:
        s = self.settings
        for ev in self.engine.respond(thinking=s.thinking != "nothink", should_stop=self._cancel.is_set,
                                      max_tokens=s.max_tokens_per_step, temperature=s.temperature, top_p=s.top_p,
                                      min_p=s.min_p, seed=s.seed):
            if isinstance(ev, ReasoningDelta):
                out.reasoning += ev.text
                yield Reasoning(ev.text)
            elif isinstance(ev, TextDelta):
                out.text += ev.text
                yield Text(ev.text)
            elif isinstance(ev, ToolCallStarted):
                yield ToolStarted(ev.name)
            elif isinstance(ev, ToolCallParsed):
                self._call_count += 1
                out.calls.append(ev.call.model_copy(update={"id": f"call_{self._call_count}"}))
            elif isinstance(ev, DsmlError):
                out.error = ev.message
            elif isinstance(ev, DsmlInThinking):
                yield Notice("warning", "the model wrote a tool call inside its reasoning; it was not run")
            elif isinstance(ev, ReplyEnd) and ev.reason != "eos":
                out.interrupted, out.cut = ev.reason == "stopped", ev.reason == "limit"
                if out.cut:
                    yield Notice("warning", f"the reply hit the {s.max_tokens_per_step}-token step limit")

    def _record(self, step: _Step) -> None:
        """The model's message as sampled (its DSML block kept byte for byte for replay)."""
        reasoning = step.reasoning if self.settings.thinking != "nothink" else None
        self._messages.append(Message(role="assistant", content=step.text, reasoning=reasoning,
                                          tool_calls=[] if step.error else step.calls))

    # -- tools ----------------------------------------------------------------------------------

    def _run_calls(self, calls: list[ToolCall], seen: Counter) -> Iterator[Event]:
        """Run the calls in order, each result a ``tool`` message; returns a stop reason or None."""
        s, stop = self.settings, None
        for call in calls:
            key = json.dumps([call.name, call.arguments], sort_keys=True, ensure_ascii=False)
            seen[key] += 1
            if stop or self._cancel.is_set():
                result = ToolResult("error: not run: the turn was stopped before this call", ok=False,
                                    summary="not run")
                stop = stop or "interrupted"
            elif seen[key] >= s.repeat_stop:
                result = ToolResult(f"error: not run: this identical call was made {seen[key]} times", ok=False,
                                    summary="repeat guard")
                stop = "repeat-guard"
                yield Notice("error", f"stopped: {call.name} was called {seen[key]} times with the same arguments")
            else:
                yield ToolRunning(call.id, call.name, call.arguments)
                result = self._run_one(call)
                if seen[key] >= s.repeat_warn:
                    result.text += (f"\n\nnote: this identical call has now been made {seen[key]} times and "
                                    "gives the same result; try something different.")
                    yield Notice("warning", f"{call.name} called {seen[key]} times with the same arguments")
            yield ToolFinished(call.id, call.name, result)
            if call.name == "update_plan" and result.ok:
                yield PlanUpdated(self.plan)
            self._messages.append(Message(role="tool", content=result.text, tool_call_id=call.id))
        return stop

    def _run_one(self, call: ToolCall) -> ToolResult:
        tool = self.tools.get(call.name)
        if tool is None:
            names = ", ".join(sorted(self.tools))
            return ToolResult(f"error: there is no tool named {call.name!r}; the tools are: {names}", ok=False,
                              summary="unknown tool")
        try:
            return tool.call(call.arguments, self.ctx)
        except Exception as err:  # a tool bug must not kill the session; the model and the user see it
            return ToolResult(utf8_safe(f"error: {call.name} failed: {type(err).__name__}: {err}"), ok=False,
                              summary="tool failed")
