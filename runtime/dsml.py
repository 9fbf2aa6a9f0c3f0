"""Incremental parser for DeepSeek V4 output: reasoning, text and DSML tool calls.

Feed decoded text as it is sampled; get events back. The grammar (docs/spec/agent.md
1.4, 1.7)::

    [reasoning "</think>"] text [ws] "<｜DSML｜tool_calls>" ws
        ( '<｜DSML｜invoke name="N">' ws
            ( '<｜DSML｜parameter name="K" string="true|false">' VALUE
              "</｜DSML｜parameter>" ws )*
          "</｜DSML｜invoke>" ws )+
    "</｜DSML｜tool_calls>" [ws]

Decisions (documented because the format leaves them open):

* Strict on structure, lenient only on whitespace between elements. Any other
  text, an unknown tag, a tag in the wrong place, attributes that are not
  exactly ``name="..."`` / ``name="..." string="true|false"``, a duplicate
  parameter, invalid JSON in a ``string="false"`` value, an empty block, an
  unterminated block, or non-whitespace after the block give ONE ``DsmlError``
  event and the parser stops (later input is ignored). Never an exception:
  model output is data, not a bug.
* Values are raw. The only decoding is ``&lt;/｜DSML｜parameter>`` ->
  ``</｜DSML｜parameter>`` (the one escape the renderer writes), applied to
  string and JSON values alike; no other entity is touched.
* Exactly the ``\\n\\n`` right before ``<｜DSML｜tool_calls>`` is block framing
  (the renderer writes content + ``\\n\\n`` + block, and the official parser
  removes only that): it is not emitted as text; any other whitespace is
  content and round trips. A block without the framing is accepted too.
* ``string="false"`` values must be plain JSON: ``NaN``/``Infinity``, numbers
  that overflow a float, integers over ``MAX_INT_DIGITS`` digits and nesting
  deeper than ``MAX_JSON_DEPTH`` are parse errors (they would otherwise escape
  as ``RecursionError``/``ValueError`` or reach a tool as non-JSON floats).
* Markers are control tokens. Fed with ``feed_token`` (the agent loop), a
  ``｜DSML｜`` or ``</think>`` counts only where the model sampled that control
  token; the same characters spelled in ordinary BPE pieces (the model echoing
  a file that holds DSML markup) are text. Such spelling inside a block, or a
  close tag spelled so inside a value, is an error: a replay could not tell
  it from the real one. ``feed(text)`` has no token ids and trusts every marker.
* Calls are reported when the block closes, all at once and in order, each
  with the same ``dsml`` = the exact block text from ``<｜DSML｜tool_calls>``
  to ``</｜DSML｜tool_calls>``. Why: a block is only valid once it is complete
  (we never run half a malformed block), and the exact text exists only then.
  ``chat.render`` replays that text when all calls of a message share it.
  ``ToolCallStarted`` still fires as soon as each invoke header is read. With
  ``stream_arguments`` the arguments come as they are read too (a server streams
  them): ``ParameterStarted``, ``ParameterDelta`` pieces of the decoded value,
  ``ParameterEnded``, and ``ToolCallEnded`` at ``</｜DSML｜invoke>``. They are
  progress only: the call is valid once ``ToolCallParsed`` reports it.
* DSML inside reasoning is never a tool call: it stays reasoning text and a
  ``DsmlInThinking`` warning follows each ``<｜DSML｜tool_calls>`` seen there.
* A DSML tag in plain text other than the block opener (``<｜DSML｜invoke``
  without a block, a stray close tag) is a malformed block, not text.
* A tag ends at its first ``>``, so tool and parameter names cannot contain
  ``>`` or ``"`` (values can contain anything).

Streaming: the events depend only on the concatenated input, never on how it
was split (merge adjacent deltas to compare). Only text that could still be
the start of a marker (``<``, ``</thi``, ``\\n\\n<｜DS``...) is held back, a
few characters at most, so parsing is linear; value bytes are buffered until
their close tag because no event needs them earlier.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any

from .chat import PARAM_CLOSE, PARAM_CLOSE_ESCAPED, ToolCall
from .tokenizer import DSML, THINK_END

BLOCK_OPEN = f"<{DSML}tool_calls>"
BLOCK_CLOSE = f"</{DSML}tool_calls>"
INVOKE_CLOSE = f"</{DSML}invoke>"
_TAG_STARTS = (f"<{DSML}", f"</{DSML}")
MAX_TAG = 512  # a header longer than this without ">" is garbage, not a slow tag
_FEED_SLICE = 4096
MAX_JSON_DEPTH = 128   # deeper JSON would recurse in json.loads; no tool needs it
MAX_INT_DIGITS = 1000  # below Python's int-conversion limit (4300), far above any real argument
# Text held back in case a block follows: a tag start, or one after its "\n\n" framing.
_FRAMED_STARTS = (*(f"\n\n{s}" for s in _TAG_STARTS), *_TAG_STARTS)

_INVOKE_RE = re.compile(f'<{DSML}invoke name="([^"]+)">')
_PARAM_RE = re.compile(f'<{DSML}parameter name="([^"]+)" string="(true|false)">')
_TAG_NAME_RE = re.compile(f"</?{DSML}([A-Za-z_]+)")
_KNOWN_TAGS = ("tool_calls", "invoke", "parameter")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStarted:
    name: str


@dataclass(frozen=True)
class ParameterStarted:
    name: str
    string: bool  # string="true": the value is text; else its text is JSON


@dataclass(frozen=True)
class ParameterDelta:
    text: str  # a piece of the value, escape decoded (never half of one)


@dataclass(frozen=True)
class ParameterEnded:
    pass


@dataclass(frozen=True)
class ToolCallEnded:
    pass


@dataclass(frozen=True)
class ToolCallParsed:
    call: ToolCall


@dataclass(frozen=True)
class BlockDone:
    pass


@dataclass(frozen=True)
class DsmlError:
    message: str
    raw: str


@dataclass(frozen=True)
class DsmlInThinking:
    pass


Event = (TextDelta | ReasoningDelta | ToolCallStarted | ToolCallParsed | BlockDone
         | DsmlError | DsmlInThinking | ParameterStarted | ParameterDelta | ParameterEnded | ToolCallEnded)


class State(Enum):
    REASONING = auto()  # before </think>
    TEXT = auto()       # visible answer text
    OPENING = auto()    # a DSML tag began in text: must be <｜DSML｜tool_calls>
    BLOCK = auto()      # inside tool_calls, between invokes
    INVOKE = auto()     # inside an invoke, between parameters
    VALUE = auto()      # inside a parameter value, up to </｜DSML｜parameter>
    DONE = auto()       # block closed; only whitespace may follow
    FAILED = auto()     # a DsmlError was reported; input is ignored
    FINISHED = auto()   # finish() was called


# Inside the block, between payloads: what comes next is tags, names and framing.
_SYNTAX_STATES = frozenset({State.OPENING, State.BLOCK, State.INVOKE, State.DONE})


def call_opening(name: str | None) -> str:
    """The DSML that opens a tool call as the renderer writes it: the block opener, and
    the invoke header of ``name`` when given (a forced call continues from here)."""
    return f"\n\n{BLOCK_OPEN}\n" + (f'<{DSML}invoke name="{name}">\n' if name else "")


@functools.cache
def _proper_prefixes(markers: tuple[str, ...]) -> frozenset[str]:
    return frozenset(m[:n] for m in markers for n in range(1, len(m)))


def _held_prefix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a marker."""
    prefixes = _proper_prefixes(markers)
    for n in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        if text[-n:] in prefixes:
            return n
    return 0


class _BadJson(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _BadJson(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadJson(f"{text[:20]} is not a finite number")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _BadJson(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _load_json(raw: str) -> Any:
    """Strict, bounded ``json.loads``; every failure is a ``ValueError`` with a message."""
    if raw.count("[") + raw.count("{") > MAX_JSON_DEPTH:
        depth = peak = 0
        for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub("", raw)):
            depth += 1 if bracket in "[{" else -1
            peak = max(peak, depth)
        if peak > MAX_JSON_DEPTH:
            raise _BadJson(f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float,
                          parse_int=_bounded_int)
    except json.JSONDecodeError as err:
        raise _BadJson(err.msg) from None
    except RecursionError:  # the depth check above should make this unreachable
        raise _BadJson(f"nested deeper than {MAX_JSON_DEPTH} levels") from None


def _control_at(marker: str) -> int:
    """Where a marker's control-token part (``｜DSML｜`` or ``</think>``) starts in it."""
    return marker.index(DSML) if DSML in marker else 0


class DsmlParser:
    """Stream parser; see the module docstring for the grammar and decisions."""

    def __init__(self, thinking: bool, stream_arguments: bool = False):
        self._state = State.REASONING if thinking else State.TEXT
        self._stream_arguments = stream_arguments
        self._value_held = ""  # VALUE, streaming: a tail that may be half an escape
        self._pending = ""          # input not consumed yet
        self._block: list[str] = []  # block text consumed so far (for dsml / raw)
        self._calls: list[tuple[str, dict[str, Any]]] = []  # complete invokes
        self._name = ""             # the invoke being read
        self._args: dict[str, Any] = {}
        self._param: tuple[str, bool] = ("", True)  # (name, is string)
        self._value_parts: list[str] = []  # VALUE: value text moved out of _pending
        self._after: list[str] = []  # DONE: blank text after the block
        # Token mode (feed_token): absolute input offsets where a control token's
        # marker text starts; _consumed is the offset of _pending[0].
        self._token_mode = False
        self._controls: set[int] = set()
        self._fed = 0
        self._consumed = 0

    @property
    def state(self) -> State:
        """Where the parser is."""
        return self._state

    @property
    def in_syntax(self) -> bool:
        """Whether the next token continues DSML syntax (the block opener once begun,
        tags, tool and parameter names, framing, a begun parameter close tag) rather
        than a payload (reasoning, text, a parameter value): ``Engine.respond`` samples
        syntax greedily, as ds4 does, so a hot temperature cannot garble a call."""
        if self._state is State.VALUE:  # the close tag has begun ("</" at least)
            return _held_prefix(self._pending, (PARAM_CLOSE,)) >= 2
        return self._state in _SYNTAX_STATES

    def feed(self, text: str) -> list[Event]:
        if self._state is State.FINISHED:
            raise RuntimeError("DsmlParser.feed() after finish()")
        if self._state is State.FAILED:
            return []
        self._fed += len(text)
        # In slices, so what is pending (and copied per step) stays small however
        # long the text: linear time. Events do not depend on the split.
        events: list[Event] = []
        for start in range(0, len(text), _FEED_SLICE):
            if self._state is State.FAILED:
                break
            self._pending += text[start:start + _FEED_SLICE]
            events += self._run(final=False)
        return events

    def feed_token(self, text: str, control: bool) -> list[Event]:
        """One sampled token's text; ``control`` says it was an added/control token.
        From the first call on, markers count only where they were control tokens."""
        self._token_mode = True
        if control:
            for marker in (DSML, THINK_END):
                if text.endswith(marker):  # a control token's text may follow a U+FFFD
                    self._controls.add(self._fed + len(text) - len(marker))
        return self.feed(text)

    def _is_control(self, i: int) -> bool:
        """Whether the marker text at ``_pending[i]`` was sampled as a control token."""
        return not self._token_mode or self._consumed + i in self._controls

    def _first_marker(self, markers: tuple[str, ...]) -> tuple[int, str] | None:
        """The first marker in ``_pending`` whose control part really was one."""
        hits = []
        for m in markers:
            i = self._pending.find(m)
            while i >= 0 and not self._is_control(i + _control_at(m)):
                i = self._pending.find(m, i + 1)
            if i >= 0:
                hits.append((i, m))
        return min(hits) if hits else None

    def finish(self) -> list[Event]:
        """End of stream: flush held-back text; an open block is an error."""
        if self._state is State.FINISHED:
            return []
        events = [] if self._state is State.FAILED else self._run(final=True)
        if self._state in (State.OPENING, State.BLOCK, State.INVOKE, State.VALUE):
            events.append(DsmlError("unterminated tool_calls block",
                                    "".join(self._block) + self._pending))
        self._state = State.FINISHED
        self._pending = ""
        return events

    # -- driver --------------------------------------------------------------

    def _run(self, final: bool) -> list[Event]:
        events: list[Event] = []
        handlers = {State.REASONING: self._reasoning, State.TEXT: self._text,
                    State.VALUE: self._value, State.DONE: self._done}
        # Each step consumes input or changes state, or returns False for
        # "need more input"; decisions never look past what they need, which
        # is what makes the events independent of how input was split.
        while self._state not in (State.FAILED, State.FINISHED):
            step = handlers.get(self._state, self._structural)
            if not step(events, final):
                break
        return events

    def _fail(self, events: list[Event], message: str, upto: int) -> bool:
        """Report an error whose raw text is the block so far + pending[:upto]."""
        events.append(DsmlError(message, "".join(self._block) + self._pending[:upto]))
        self._state = State.FAILED
        self._pending = ""
        return False

    def _take(self, n: int) -> str:
        head, self._pending = self._pending[:n], self._pending[n:]
        self._consumed += len(head)
        return head

    # -- outside the block ---------------------------------------------------

    def _reasoning(self, events: list[Event], final: bool) -> bool:
        hit = self._first_marker((THINK_END, BLOCK_OPEN))
        if hit is None:
            keep = 0 if final else _held_prefix(self._pending, (THINK_END, BLOCK_OPEN))
            text = self._take(len(self._pending) - keep)
            if text:
                events.append(ReasoningDelta(text))
            return False
        i, marker = hit
        if marker == THINK_END:
            if i:
                events.append(ReasoningDelta(self._take(i)))
            self._take(len(marker))
            self._state = State.TEXT
        else:
            # Thinking text is never executable; keep it as reasoning, warn.
            events.append(ReasoningDelta(self._take(i + len(marker))))
            events.append(DsmlInThinking())
        return True

    def _text(self, events: list[Event], final: bool) -> bool:
        hit = self._first_marker(_TAG_STARTS)
        if hit is None:
            keep = 0 if final else _held_prefix(self._pending, _FRAMED_STARTS)
            if len(self._pending) > keep:
                events.append(TextDelta(self._take(len(self._pending) - keep)))
            return False
        i = hit[0]
        text = self._take(i)
        text = text[:-2] if text.endswith("\n\n") else text  # the block's framing
        if text:
            events.append(TextDelta(text))
        self._block = []
        self._state = State.OPENING
        return True

    def _done(self, events: list[Event], final: bool) -> bool:
        # Blank input is kept aside so the error's raw text (everything after
        # the block through the first non-blank character) is split-independent.
        stripped = self._pending.lstrip()
        if stripped:
            n = len(self._pending) - len(stripped) + 1
            self._block = self._after
            return self._fail(events, "text after tool_calls", n)
        self._after.append(self._take(len(self._pending)))
        return False

    # -- structure inside the block ---------------------------------------------

    def _structural(self, events: list[Event], final: bool) -> bool:
        if self._state is not State.OPENING:
            blank = len(self._pending) - len(self._pending.lstrip())
            self._block.append(self._take(blank))
        p = self._pending
        if not p:
            return False
        # The tag must start with "<｜DSML｜" or "</｜DSML｜": fail at the first
        # character that rules both out, wait while it is still a prefix.
        for start in _TAG_STARTS:
            if p.startswith(start) or start.startswith(p):
                break
        else:
            bad = max(self._common(p, s) for s in _TAG_STARTS) + 1
            what = "unexpected text" if p[0] != "<" else "unknown tag"
            return self._fail(events, f"{what} in tool_calls block", bad)
        if not p.startswith(start):
            return False
        if not self._is_control(len(start) - len(DSML)):
            return self._fail(events, "DSML markup spelled as plain text inside a tool_calls block",
                              len(start))
        end = p.find(">", 0, MAX_TAG)
        if end < 0:
            if len(p) >= MAX_TAG:
                return self._fail(events, "DSML tag too long or missing '>'", MAX_TAG)
            return False
        tag = p[:end + 1]
        return self._tag(events, tag)

    @staticmethod
    def _common(a: str, b: str) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    def _tag(self, events: list[Event], tag: str) -> bool:
        """Apply one complete tag to the current state."""
        n = len(tag)
        kind = _TAG_NAME_RE.match(tag)
        if kind is None or kind.group(1) not in _KNOWN_TAGS:
            return self._fail(events, f"unknown tag {tag!r}", n)
        state = self._state
        invoke = _INVOKE_RE.fullmatch(tag)
        param = _PARAM_RE.fullmatch(tag)
        if state is State.OPENING:
            if tag != BLOCK_OPEN:
                return self._fail(events, f"{tag!r} outside a tool_calls block", n)
            self._state = State.BLOCK
        elif state is State.BLOCK and invoke:
            self._name, self._args = invoke.group(1), {}
            events.append(ToolCallStarted(self._name))
            self._state = State.INVOKE
        elif state is State.BLOCK and tag == BLOCK_CLOSE:
            if not self._calls:
                return self._fail(events, "empty tool_calls block", n)
            self._block.append(self._take(n))
            dsml = "".join(self._block)
            events += [ToolCallParsed(ToolCall(name=name, arguments=args, dsml=dsml))
                       for name, args in self._calls]
            events.append(BlockDone())
            self._state = State.DONE
            return True
        elif state is State.INVOKE and param:
            name = param.group(1)
            if name in self._args:
                return self._fail(events, f"duplicate parameter {name!r}", n)
            self._param = (name, param.group(2) == "true")
            if self._stream_arguments:
                events.append(ParameterStarted(*self._param))
            self._state = State.VALUE
            self._block.append(self._take(n))
            return True
        elif state is State.INVOKE and tag == INVOKE_CLOSE:
            self._calls.append((self._name, self._args))
            if self._stream_arguments:
                events.append(ToolCallEnded())
            self._state = State.BLOCK
        elif kind.group(1) in ("invoke", "parameter") and not tag.startswith("</") \
                and not (invoke or param):
            return self._fail(events, f"malformed attributes in {tag!r}", n)
        else:
            where = "invoke" if state is State.INVOKE else "tool_calls"
            return self._fail(events, f"unexpected {tag!r} inside {where}", n)
        self._block.append(self._take(n))
        return True

    def _value(self, events: list[Event], final: bool) -> bool:
        # Value text moves out of _pending as it comes, except a tail that could
        # be the start of the close tag, so a long file body stays linear.
        i = self._pending.find(PARAM_CLOSE)
        if i < 0:
            safe = max(0, len(self._pending) - len(PARAM_CLOSE) + 1)
            if safe:
                chunk = self._take(safe)
                self._value_parts.append(chunk)
                self._block.append(chunk)
                self._value_progress(events, chunk, last=False)
            return False
        name, is_str = self._param
        n = i + len(PARAM_CLOSE)
        if not self._is_control(i + _control_at(PARAM_CLOSE)):
            return self._fail(events, f"parameter {name!r} holds {PARAM_CLOSE!r} spelled as "
                              f"plain text; write it as {PARAM_CLOSE_ESCAPED!r}", n)
        raw = "".join(self._value_parts) + self._pending[:i]
        self._value_parts = []
        raw = raw.replace(PARAM_CLOSE_ESCAPED, PARAM_CLOSE)
        if is_str:
            self._args[name] = raw
        else:
            try:
                self._args[name] = _load_json(raw)
            except ValueError as err:
                return self._fail(events, f"parameter {name!r} is not valid JSON: {err}", n)
        self._value_progress(events, self._pending[:i], last=True)
        self._block.append(self._take(n))
        self._state = State.INVOKE
        return True

    def _value_progress(self, events: list[Event], text: str, last: bool) -> None:
        """Streaming: the decoded value so far, holding back what may be half an escape."""
        if not self._stream_arguments:
            return
        held = self._value_held + text
        keep = 0 if last else _held_prefix(held, (PARAM_CLOSE_ESCAPED,))
        piece, self._value_held = held[:len(held) - keep], held[len(held) - keep:]
        if piece := piece.replace(PARAM_CLOSE_ESCAPED, PARAM_CLOSE):
            events.append(ParameterDelta(piece))
        if last:
            events.append(ParameterEnded())
