"""Chat rendering for DeepSeek V4, byte-exact to the official ``encoding_dsv4.py``.

``render(messages, tools, mode)`` returns the prompt as *pieces*: ``Special``
for every control token that the template itself writes, plain ``str`` for
everything that came from a user, a file, a tool, a schema or the model.
``Tokenizer.encode_pieces`` turns specials into their single ids and BPEs the
rest plainly, so content that spells ``<｜User｜>`` or ``｜DSML｜`` can never
forge a control token (the security property of docs/spec/agent.md 1.1).

Layout (docs/spec/agent.md 1.2-1.6, docs/spec/v4-model.md 6.3)::

    BOS [Think-Max prefix] {system}[\\n\\n{tools block}]
    <｜User｜>{user text}<｜Assistant｜><think>
    {reasoning}</think>{answer}[\\n\\n{DSML block}]<｜end▁of▁sentence｜>
    <｜User｜><tool_result>{r1}</tool_result>\\n\\n<tool_result>{r2}</tool_result><｜Assistant｜><think>

Rules that follow the official encoder:

* System text has no role marker; several system messages are concatenated
  as they are. Tools are appended to the first system message after
  ``\\n\\n``; with no system message an empty one is made up front, so the
  prompt reads ``BOS + "" + "\\n\\n" + tools block``.
* A run of consecutive ``user``/``tool`` messages is ONE user turn, parts
  joined by ``\\n\\n``; tool results are sorted into the order of the calls
  of the assistant message before them (by ``tool_call_id``; a result without
  an id sorts like the first call, as upstream does).
* The ``<｜Assistant｜>`` + ``<think>``/``</think>`` opener is written after a
  user turn that is followed by an assistant message, or that is last and
  ``add_generation_prompt`` is set; never after a system message (so
  ``[system]`` renders as ``BOS + system`` and ``[system, assistant]`` has no
  opener).
* Tool schemas are dumped as given: the keys of the function dict, in their
  order, extra keys such as ``strict`` included, nothing added.
* Thinking modes without tools drop the reasoning of assistant turns before
  the last user turn: those turns open with ``</think>`` and carry no
  reasoning. With tools, every turn keeps ``<think>reasoning</think>``.

Our choices where the official encoder is silent or we deviate on purpose:

* A literal ``</tool_result>`` inside tool output is written
  ``&lt;/tool_result>`` (ds4-server does the same) so a result cannot close its
  own block. A literal ``</｜DSML｜parameter>`` inside a parameter value (string
  or JSON) is written ``&lt;/｜DSML｜parameter>``; ``runtime.dsml`` undoes
  exactly that one escape and nothing else.
* Exact replay: the DSML parser gives every call of a block the same ``dsml``
  (the whole block). If every call of a message carries the same ``dsml``, that
  text is written instead of a re-rendering. Its tags were sampled with the
  ``｜DSML｜`` control token (``runtime.dsml`` accepts no other), so in the tags
  that string becomes a ``Special``; its values are content, plain text however
  they are spelled (a value ends at its first close tag, as the parser read it).
* A last assistant message with ``add_generation_prompt=False`` is a prefill
  to continue: it is written without EOS (upstream's ``wo_eos``). In thinking
  modes its reasoning part is still closed by ``</think>``, as upstream does.
  With ``add_generation_prompt=True`` a last assistant message is a complete
  turn (with EOS) and nothing is added after it.
* Refused with ``ChatError`` (upstream would silently glue or merge): an
  assistant message first or right after another assistant message, a tool
  message not preceded by an assistant message with tool calls, a
  ``tool_call_id`` that names no call, tool calls on a non-assistant message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from .errors import ChatError
from .tokenizer import (ASSISTANT, BOS, CONTROL_STRINGS, DSML, EOS, THINK, THINK_END,
                        USER, Piece, Special)

Mode = Literal["nothink", "think", "think-max"]
MODES: tuple[str, ...] = ("nothink", "think", "think-max")

THINK_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the "
    "problem to resolve the root cause, rigorously stress-testing your logic against "
    "all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every "
    "intermediate step, considered alternative, and rejected hypothesis to ensure "
    "absolutely no assumption is left unchecked.\n\n"
)

# Template text of the tools block; {schemas} is filled with content pieces.
TOOLS_HEAD = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK}), you MUST output your complete reasoning inside {THINK}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

"""
TOOLS_TAIL = """

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

TOOL_RESULT_CLOSE = "</tool_result>"
TOOL_RESULT_CLOSE_ESCAPED = "&lt;/tool_result>"
PARAM_CLOSE = f"</{DSML}parameter>"
PARAM_CLOSE_ESCAPED = f"&lt;/{DSML}parameter>"

_PARAM_OPEN_RE = re.compile(f'<{DSML}parameter name="[^"]*" string="(?:true|false)">')
_CONTROL_RE = re.compile("|".join(re.escape(s) for s in sorted(CONTROL_STRINGS, key=len,
                                                               reverse=True)))


class ToolSpec(BaseModel):
    """An OpenAI-style function (the unwrapped ``function`` object), kept as given."""

    model_config = ConfigDict(extra="allow")

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)
    _given: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_given(cls, data: Any, handler: Any) -> "ToolSpec":
        spec = handler(data)
        if isinstance(data, dict):
            spec._given = dict(data)
        return spec

    def schema_line(self) -> str:
        # The official encoder json.dumps the function dict as given (default separators).
        return json.dumps(self._given or self.model_dump(), ensure_ascii=False)


class ToolCall(BaseModel):
    """One call. ``dsml`` is the exact sampled block text, for byte-exact replay."""

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    id: str | None = None
    dsml: str | None = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    reasoning: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None


@dataclass(frozen=True)
class Rendered:
    pieces: list[Piece]
    # Where each assistant message's rendering ends (an index into ``pieces``), in order:
    # what follows the model's last message can be taken without re-rendering it.
    reply_ends: tuple[int, ...] = ()

    @property
    def text(self) -> str:
        return "".join(p.text if isinstance(p, Special) else p for p in self.pieces)


def split_controls(text: str) -> list[Piece]:
    """Trusted text -> pieces, control strings as ``Special``. Never call on content."""
    out: list[Piece] = []
    pos = 0
    for m in _CONTROL_RE.finditer(text):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        out.append(Special(m.group()))
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


class _Out:
    """Piece builder: ``t`` for our template text, ``c`` for untrusted content."""

    def __init__(self) -> None:
        self.pieces: list[Piece] = []

    def t(self, text: str) -> None:
        self.pieces += split_controls(text)

    def c(self, text: str) -> None:
        if text:
            self.pieces.append(text)

    def special(self, text: str) -> None:
        self.pieces.append(Special(text))


# Internal turns after grouping: a system part, a merged user turn, an assistant.
@dataclass
class _System:
    content: str
    tools: bool = False


@dataclass
class _User:
    parts: list[tuple[bool, str]]  # (is_tool_result, text)


@dataclass
class _Assistant:
    msg: Message


_Turn = _System | _User | _Assistant


def _group(messages: Sequence[Message]) -> list[_Turn]:
    """Validate the message sequence and merge user/tool runs into user turns."""
    turns: list[_Turn] = []
    i = 0
    while i < len(messages):
        msg = messages[i]
        if msg.tool_calls and msg.role != "assistant":
            raise ChatError(f"message {i} ({msg.role}) carries tool calls; "
                            "only assistant messages may")
        if msg.role == "system":
            turns.append(_System(msg.content))
            i += 1
        elif msg.role == "assistant":
            if i == 0 or messages[i - 1].role == "assistant":
                raise ChatError(f"assistant message {i} must follow a user, tool or "
                                "system message")
            turns.append(_Assistant(msg))
            i += 1
        else:
            j = i
            while j < len(messages) and messages[j].role in ("user", "tool"):
                j += 1
            prev = turns[-1] if turns else None
            calls = prev.msg.tool_calls if isinstance(prev, _Assistant) else []
            turns.append(_user_turn(messages, i, j, calls))
            i = j
    return turns


def _user_turn(messages: Sequence[Message], start: int, end: int,
               calls: list[ToolCall]) -> _User:
    run = messages[start:end]
    tools = [m for m in run if m.role == "tool"]
    if tools and not calls:
        raise ChatError(f"tool message at {start} has no preceding assistant "
                        "message with tool calls")
    position = {c.id: k for k, c in enumerate(calls) if c.id is not None}
    for m in tools:
        if m.tool_call_id is not None and m.tool_call_id not in position:
            raise ChatError(f"tool result for unknown call id {m.tool_call_id!r}")
    # Stable sort of the results into call order; user texts keep their slots.
    ordered = iter(sorted(tools, key=lambda m: position.get(m.tool_call_id, 0)))
    parts: list[tuple[bool, str]] = []
    for m in run:
        if m.role == "tool":
            parts.append((True, next(ordered).content))
        else:
            parts.append((False, m.content))
    return _User(parts)


def render(messages: Sequence[Message], tools: Sequence[ToolSpec] | None = None,
           mode: Mode = "think", add_generation_prompt: bool = True) -> Rendered:
    """Render a conversation as V4 prompt pieces (see the module docstring)."""
    if mode not in MODES:
        raise ChatError(f"unknown chat mode {mode!r}", f"use one of {', '.join(MODES)}")
    tools = list(tools or [])
    turns = _group(messages)
    if tools:
        first = next((t for t in turns if isinstance(t, _System)), None)
        if first is None:
            first = _System("")
            turns.insert(0, first)
        first.tools = True

    thinking = mode != "nothink"
    # Upstream's drop_thinking: on unless any tools are defined.
    drop = thinking and not tools
    last_user = max((k for k, t in enumerate(turns) if isinstance(t, _User)), default=-1)

    out = _Out()
    reply_ends: list[int] = []
    out.special(BOS)
    if mode == "think-max":
        out.t(THINK_MAX_PREFIX)
    for k, turn in enumerate(turns):
        last = k == len(turns) - 1
        if isinstance(turn, _Assistant):
            keep_reasoning = thinking and (not drop or k > last_user)
            _assistant(out, turn.msg, keep_reasoning,
                       eos=not (last and not add_generation_prompt))
            reply_ends.append(len(out.pieces))
            continue
        if isinstance(turn, _System):
            out.c(turn.content)
            if turn.tools:
                out.t("\n\n")
                _tools_block(out, tools)
        else:
            _user(out, turn)
        # Only a user turn hands over to the assistant (the official encoder's rule).
        opens = isinstance(turn, _User) and (
            (last and add_generation_prompt) or (not last and isinstance(turns[k + 1], _Assistant)))
        if opens:
            out.special(ASSISTANT)
            out.special(THINK if thinking and (not drop or k >= last_user) else THINK_END)
    return Rendered(out.pieces, tuple(reply_ends))


def _tools_block(out: _Out, tools: Sequence[ToolSpec]) -> None:
    out.t(TOOLS_HEAD)
    for k, spec in enumerate(tools):
        if k:
            out.t("\n")
        out.c(spec.schema_line())  # schemas come from config/users: content
    out.t(TOOLS_TAIL)


def _user(out: _Out, turn: _User) -> None:
    out.special(USER)
    for k, (is_tool, text) in enumerate(turn.parts):
        if k:
            out.t("\n\n")
        if is_tool:
            out.t("<tool_result>")
            out.c(text.replace(TOOL_RESULT_CLOSE, TOOL_RESULT_CLOSE_ESCAPED))
            out.t(TOOL_RESULT_CLOSE)
        else:
            out.c(text)


def _assistant(out: _Out, msg: Message, keep_reasoning: bool, eos: bool) -> None:
    if keep_reasoning:
        out.c(msg.reasoning or "")
        out.special(THINK_END)
    out.c(msg.content)
    if msg.tool_calls:
        out.t("\n\n")
        _tool_calls(out, msg.tool_calls)
    if eos:
        out.special(EOS)


def _replay_block(out: _Out, dsml: str) -> None:
    """A sampled block: ``｜DSML｜`` in its tags was the control token, values are content."""
    pos = 0
    while (head := _PARAM_OPEN_RE.search(dsml, pos)) is not None:
        end = dsml.find(PARAM_CLOSE, head.end())
        if end < 0:
            break
        _markup(out, dsml[pos:head.end()])
        out.c(dsml[head.end():end])
        pos = end
    _markup(out, dsml[pos:])


def _markup(out: _Out, text: str) -> None:
    # Only the DSML marker is a control token in sampled tags; a name spelling
    # <｜User｜> or EOS stays plain text.
    for k, part in enumerate(text.split(DSML)):
        if k:
            out.special(DSML)
        out.c(part)


def _tool_calls(out: _Out, calls: list[ToolCall]) -> None:
    replay = {c.dsml for c in calls}
    if None not in replay:
        if len(replay) != 1:
            raise ChatError("the tool calls of one assistant message carry different "
                            "dsml blocks")
        _replay_block(out, replay.pop())  # type: ignore[arg-type]
        return
    out.t(f"<{DSML}tool_calls>\n")
    for k, call in enumerate(calls):
        if k:
            out.t("\n")
        out.t(f'<{DSML}invoke name="')
        out.c(call.name)
        out.t('">\n')
        for n, (key, value) in enumerate(call.arguments.items()):
            if n:
                out.t("\n")
            is_str = isinstance(value, str)
            text = value if is_str else json.dumps(value, ensure_ascii=False)
            out.t(f'<{DSML}parameter name="')
            out.c(key)
            out.t(f'" string="{"true" if is_str else "false"}">')
            out.c(text.replace(PARAM_CLOSE, PARAM_CLOSE_ESCAPED))
            out.t(PARAM_CLOSE)
        out.t(f"\n</{DSML}invoke>")
    out.t(f"\n</{DSML}tool_calls>")
