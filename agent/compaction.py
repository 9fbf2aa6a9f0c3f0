"""Conversation compaction: the older turns become one summary written by the model.

``Agent.compact`` (``summarize_older``) keeps the system message as it is (its tokens, with the tool schemas,
are the KV prefix every session reuses), replaces everything before the last
``keep_turns`` user turns with ONE user message (the model's summary plus the
files touched, listed by code so the list is exact) and keeps the recent turns
verbatim. ``needs_compaction`` says when the automatic one is due.

Asking for the summary: the request joins the whole conversation through
``Engine.sync``, which prefills only what follows the model's last message (the
live sequence holds the rest as sampled), so nothing is processed twice; the
model then also sees the recent turns, which only helps it describe the current
state. Only when that would not leave room for the summary is the older part
synced alone (rendered whole, through the prefix cache). The reply opens after
``</think>``: a summary needs no reasoning, and the whole token budget goes to it.
Afterwards the engine is reset (its tokens no longer match the messages; the next
turn renders the compacted conversation whole), or, when compaction fails, rewound
to where it was, so a failed attempt costs no re-prefill.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from magnetar.prompts import load
from magnetar.runtime import THINK_END, ContextFull, MagnetarError, Message, Mode, ToolCall, ToolSpec, atomic_writer

SUMMARY_HEADER = "Summary of the earlier conversation (compacted):"
FILES_HEADER = "Files touched so far:"
_ARCHIVED = re.compile(r"\w+\.before-compaction-(\d+)\.\w+")


class CompactionError(MagnetarError):
    """The conversation cannot be compacted (the conversation is left as it was)."""


@dataclass
class CompactionPolicy:
    keep_turns: int = 2  # the most recent user turns kept verbatim, each with everything after it
    threshold: float = 0.8  # fraction of engine.ctx at which the automatic compaction is due
    max_summary_tokens: int = 2048
    # Low, for a faithful record of paths, errors and numbers; not 0, because greedy
    # decoding of a long text tends to fall into repetition loops.
    temperature: float = 0.3


@dataclass(frozen=True)
class Compaction:
    summary: str
    removed_messages: int
    kept_messages: int
    tokens_before: int  # the live sequence before
    tokens_after_estimate: int  # the compacted conversation rendered (the recent replies re-rendered)
    files: list[str]
    summary_tokens: int
    kept_turns: int

    def describe(self) -> str:
        kept = (f"kept the last {self.kept_turns} turn{'s' if self.kept_turns != 1 else ''} verbatim"
                if self.kept_turns else "kept no turn verbatim")
        text = (f"compacted {self.removed_messages} messages into a {self.summary_tokens:,}-token summary "
                f"(context {self.tokens_before:,} → about {self.tokens_after_estimate:,} tokens); {kept}")
        return text + (f"; files: {', '.join(self.files)}" if self.files else "")


def touched_files(messages: Sequence[Message]) -> list[str]:
    """Paths written or edited (``path``) or committed (``paths``) by calls that did not
    fail, in first-touch order, after those an earlier compaction's summary lists."""
    files: dict[str, None] = {}
    for k, msg in enumerate(messages):
        if msg.role == "user" and msg.content.startswith(SUMMARY_HEADER):
            files.update(dict.fromkeys(_listed(msg.content)))
        # A call's result follows it directly; matched by id within that run only,
        # since ids start again at call_1 in a resumed session.
        results = {r.tool_call_id: r.content
                   for r in itertools.takewhile(lambda m: m.role == "tool", itertools.islice(messages, k + 1, None))}
        for call in msg.tool_calls:
            if not results.get(call.id, "").startswith("error:"):
                files.update(dict.fromkeys(_call_paths(call)))
    return list(files)


def _call_paths(call: ToolCall) -> list[str]:
    key = {"write_file": "path", "edit_file": "path", "git_commit": "paths"}.get(call.name)
    value = call.arguments.get(key) if key else None
    return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str) and v]


def _listed(summary_message: str) -> list[str]:
    _, found, tail = summary_message.rpartition(f"\n\n{FILES_HEADER}\n")
    return [line[2:] for line in tail.splitlines() if line.startswith("- ")] if found else []


def _cut(messages: Sequence[Message], keep_turns: int) -> int:
    """Where the kept part starts: at the ``keep_turns``-th last user message that does not
    follow a tool result (one that does was queued mid-turn; the next reply reads it
    together with those results, so they stay together). 1 when nothing is older."""
    if keep_turns <= 0:
        return len(messages)
    starts = [k for k in range(1, len(messages)) if messages[k].role == "user" and messages[k - 1].role != "tool"]
    return starts[-keep_turns] if len(starts) >= keep_turns else 1


def _has_older(messages: Sequence[Message], keep_turns: int) -> bool:
    # Without a model message there is nothing worth summarizing (at most an earlier summary).
    return any(m.role == "assistant" for m in messages[1:_cut(messages, keep_turns)])


def needs_compaction(agent, policy: CompactionPolicy) -> bool:
    return (agent.context_used >= policy.threshold * agent.context_size
            and _has_older(agent.messages, policy.keep_turns))


def summarize_older(engine, messages: list[Message], specs: list[ToolSpec], settings, policy: CompactionPolicy,
                    focus: str | None, progress: Callable[[int, int], None] | None,
                    cancel: threading.Event) -> tuple[Compaction, list[Message]]:
    """The compacted conversation for ``messages`` (left as they are) and what was done: see
    the module docstring (``Agent.compact`` calls it). ``progress(done, total)`` follows the
    prefill; ``cancel``, once set, stops the summary."""
    if not _has_older(messages, policy.keep_turns):
        raise CompactionError(f"nothing to compact: the conversation has no turn before the last "
                              f"{policy.keep_turns} kept verbatim")
    cut = _cut(messages, policy.keep_turns)
    tokens_before = len(engine.tokens)
    ask = Message(role="user", content=load("compaction") + (f"\n\nFocus on: {focus}" if focus else ""))
    summary = _summarize(engine, _Request(messages, messages[:cut], ask, specs, settings.thinking), policy,
                         settings.seed, progress, cancel)
    files = touched_files(messages[:cut])
    text = f"{SUMMARY_HEADER}\n\n{summary}"
    if files:
        text += f"\n\n{FILES_HEADER}\n" + "\n".join(f"- {path}" for path in files)
    recent = messages[cut:]
    compacted = [messages[0], Message(role="user", content=text), *recent]
    after = len(engine.render(compacted, specs, settings.thinking))
    return (Compaction(summary, cut - 1, len(recent), tokens_before, after, files,
                       len(engine.tokenizer.encode(summary)), policy.keep_turns), compacted)


@dataclass(frozen=True)
class _Request:
    """The summary request: asked after the whole conversation, or after its older part."""

    messages: list[Message]
    older: list[Message]
    ask: Message
    specs: list[ToolSpec]
    thinking: Mode


def _summarize(engine, request: _Request, policy: CompactionPolicy, seed: int | None,
               progress: Callable[[int, int], None] | None, cancel: threading.Event) -> str:
    tok = engine.tokenizer
    ids: list[int] = []
    # On failure the conversation stays as it was, and so does the live state (no re-prefill).
    before = engine.snapshot() if engine.tokens else None
    done = False
    try:
        _sync_request(engine, request, policy, progress)
        stream = engine.generate(max_tokens=policy.max_summary_tokens, temperature=policy.temperature, seed=seed)
        with contextlib.closing(stream):
            for event in stream:
                if event.token == tok.eos_id:
                    break
                ids.append(event.token)
                if cancel.is_set():
                    raise CompactionError("compaction interrupted; the conversation is unchanged")
        # The reply opened after </think>; should the model reason anyway, only its answer counts.
        summary = tok.decode(ids).rpartition(THINK_END)[2].strip()
        if not summary:
            raise CompactionError("the model wrote an empty summary; the conversation is unchanged")
        done = True
        return summary
    finally:
        if done or before is None:
            engine.reset()  # the next turn renders the compacted conversation whole
        else:
            engine.rewind(before)


def _sync_request(engine, request: _Request, policy: CompactionPolicy,
                  progress: Callable[[int, int], None] | None) -> None:
    """Put the request after the whole conversation, the reply opened after ``</think>``;
    when that leaves no room for the summary, after the older part alone."""
    r = request
    try:
        engine.sync([*r.messages, r.ask], r.specs, r.thinking, progress, answer_only=True,
                    room=policy.max_summary_tokens)
    except ContextFull:  # raised before anything ran: the live state is as it was
        engine.sync([*r.older, r.ask], r.specs, r.thinking, progress, answer_only=True)


def keep_pre_compaction(session_folder: Path) -> Path:
    """Copy the session's transcript and checkpoint (the names of agent/sessions.py) to
    ``transcript.before-compaction-{n}.jsonl`` and ``state.before-compaction-{n}.ckpt``
    (n = 1, 2, ...), each written atomically; copying them back restores the session as
    it was. Call it after ``session.save(engine)``. Returns the transcript's copy."""
    folder = Path(session_folder)
    taken = [int(m.group(1)) for p in folder.iterdir() if (m := _ARCHIVED.fullmatch(p.name))]
    n = max(taken, default=0) + 1
    archived = folder / f"transcript.before-compaction-{n}.jsonl"
    _copy(folder / "transcript.jsonl", archived)
    if (folder / "state.ckpt").exists():  # a session never saved has none
        _copy(folder / "state.ckpt", folder / f"state.before-compaction-{n}.ckpt")
    return archived


def _copy(source: Path, target: Path) -> None:
    with open(source, "rb") as src, atomic_writer(target) as dst:
        shutil.copyfileobj(src, dst)
