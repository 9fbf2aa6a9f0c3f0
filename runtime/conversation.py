"""The chat-level door over an engine's token-level methods: ``sync`` keeps the live
sequence in step with a conversation, ``respond`` reads the model's reply back as
chat events.

``sync(messages, tools, mode)`` (ds4's ``ds4_session_sync``, docs/spec/v4-model.md §5.3):

1. The live tokens hold the conversation up to the model's last message *as it was
   sampled*: its tokens are never re-rendered, because a re-rendering need not match
   them (the official template drops the reasoning of earlier replies in thinking modes
   without tools; a reply's text may have been sampled in other pieces than BPE would
   cut it). So only what the rendering puts after that message (tool results, the next
   user turn, the assistant opener) is prefilled. The live tokens must still begin with
   this conversation's system prompt and first user turn (never sampled, so they render
   the same), else they belong to another conversation.
2. Otherwise the whole conversation is rendered: if the live tokens begin it, only the
   rest is prefilled;
3. else the longest prefix the prefix cache holds is restored and the rest prefilled
   (the cache saves the live sequence first, so switching back is cheap);
4. else everything is prefilled from an empty state.

``respond`` samples the reply and parses it as it streams (reasoning, answer text,
DSML tool calls); DSML markers count only as sampled control tokens, never as the
same text sampled in plain pieces. A reply that ends without EOS (stopped, or out
of tokens) is closed with one, so the live tokens stay a well-formed transcript.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from . import chat, dsml
from .errors import ContextFull
from .tokenizer import ASSISTANT, THINK, THINK_END, Special

THINK_MAX_MIN_CTX = 393216  # the official template only asks for Think-Max with this much room

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SyncReport:
    """What ``sync`` did: tokens kept (already live, or restored from the prefix cache),
    tokens prefilled now, and where the kept ones came from."""

    reused: int
    prefilled: int
    source: Literal["live", "cache", "none"]


@dataclass(frozen=True)
class ReplyEnd:
    """The last event of ``respond``: ``eos`` (the model ended its reply), ``stopped``
    (``should_stop`` said so) or ``limit`` (``max_tokens`` were sampled)."""

    reason: Literal["eos", "stopped", "limit"]


def last_reply(messages: Sequence[chat.Message]) -> int | None:
    """Index of the model's last message: the live tokens hold the conversation up to it as sampled."""
    return max((k for k, m in enumerate(messages) if m.role == "assistant"), default=None)


def require_room(ctx: int, have: int, more: int) -> None:
    if have + more > ctx:
        raise ContextFull(f"{have} + {more} tokens exceed the context of {ctx}", "start a new session or raise --ctx")


class Conversing:
    """Mixed into ``Engine`` (and a test stand-in): needs ``tokens``, ``tokenizer``,
    ``ctx``, ``reset``, ``prefill`` and ``generate``; a prefix cache is optional."""

    cache = None  # a kvcache.PrefixCache, given with attach_cache

    def attach_cache(self, cache) -> None:
        """Let ``sync`` restore prefixes from ``cache`` (and save to it)."""
        self.cache = cache

    def think_mode(self, mode: chat.Mode) -> tuple[chat.Mode, str]:
        """The mode this engine renders for ``mode``, and a one-line notice when it differs:
        below THINK_MAX_MIN_CTX, Think-Max falls back to normal thinking (as ds4 does)."""
        if mode == "think-max" and self.ctx < THINK_MAX_MIN_CTX:
            return "think", (f"think-max needs --ctx of at least {THINK_MAX_MIN_CTX} (this engine has "
                             f"{self.ctx}); thinking normally")
        return mode, ""

    def render(self, messages: Sequence[chat.Message], tools: Sequence[chat.ToolSpec] | None = None,
               mode: chat.Mode = "think") -> list[int]:
        """Token ids of a conversation in the V4 chat format, ending with the assistant prompt
        (in the mode ``think_mode`` picks: say its notice where the user will see it)."""
        return self.tokenizer.encode_pieces(chat.render(messages, tools, self.think_mode(mode)[0]).pieces)

    def sync(self, messages: Sequence[chat.Message], tools: Sequence[chat.ToolSpec] | None = None,
             mode: chat.Mode = "think", progress: Progress | None = None, *, answer_only: bool = False,
             room: int = 0) -> SyncReport:
        """Make the live sequence ``messages`` plus the assistant opener (see the module
        docstring). ``answer_only`` opens the reply after ``</think>``. Raises ``ContextFull``,
        with the live sequence untouched, unless ``room`` tokens stay free for the reply."""
        rendered = chat.render(messages, tools, self.think_mode(mode)[0])
        pieces = list(rendered.pieces)
        if answer_only and pieces[-1] == Special(THINK):
            pieces[-1] = Special(THINK_END)
        live = self.tokens
        tail = self._after_live(messages, rendered, pieces, live)
        if tail is not None:
            require_room(self.ctx, len(live), len(tail) + room)
            self.prefill(tail, progress)
            return SyncReport(len(live), len(tail), "live")
        ids = self.tokenizer.encode_pieces(pieces)
        if live and ids[:len(live)] == live:
            require_room(self.ctx, len(live), len(ids) - len(live) + room)
            self.prefill(ids[len(live):], progress)
            return SyncReport(len(live), len(ids) - len(live), "live")
        require_room(self.ctx, 0, len(ids) + room)
        if self.cache is not None:
            reused = self.cache.sync(self, ids, progress)
            return SyncReport(reused, len(ids) - reused, "cache" if reused else "none")
        self.reset()
        self.prefill(ids, progress)
        return SyncReport(0, len(ids), "none")

    def _after_live(self, messages: Sequence[chat.Message], rendered: chat.Rendered, pieces: list,
                    live: list[int]) -> list[int] | None:
        """The ids that follow the model's last message in ``pieces``, when the live tokens
        hold this conversation up to that message; else None."""
        if not live or last_reply(messages) is None:
            return None
        # Each reply ends with one EOS (sampled, or added when it was cut short), and only a
        # reply does (content spelling EOS is plain text): as many replies live as here.
        eos = self.tokenizer.eos_id
        if live[-1] != eos or live.count(eos) != len(rendered.reply_ends):
            return None
        # Template, system prompt, tools and first user text: never sampled, so they render
        # as they were prefilled. The first opener may not (its <think> becomes </think>
        # once a later user turn drops the reasoning), so the check stops before it.
        opener = next((k for k, p in enumerate(pieces) if p == Special(ASSISTANT)), None)
        if opener is None:  # a reply right after the system prompt: nothing unsampled to check
            return None
        start = self.tokenizer.encode_pieces(pieces[:opener])
        if live[:len(start)] != start:
            return None
        return self.tokenizer.encode_pieces(pieces[rendered.reply_ends[-1]:])

    def respond(self, *, thinking: bool, should_stop: Callable[[], bool] | None = None,
                syntax_greedy: bool = False, stream_arguments: bool = False, force_call: bool | str = False,
                max_tokens: int = 256, **sampling) -> Iterator[dsml.Event | ReplyEnd]:
        """Sample a reply (``sampling``: ``generate``'s arguments) and yield what it says as
        ``runtime.dsml`` events, then a ``ReplyEnd``. ``should_stop`` is asked after each
        token's events; True ends the reply there. ``syntax_greedy``: DSML syntax tokens
        (tags, names, framing) are taken greedily and payloads (reasoning, text, parameter
        values) with ``sampling``, as ds4 does. ``stream_arguments``: the parser's argument
        progress events too (``DsmlParser``). ``force_call``: the answer is a tool call,
        True to any tool, a name to that one: its opening DSML is written into the reply
        right after the reasoning (a server's tool_choice required / forced)."""
        parser = dsml.DsmlParser(thinking=thinking, stream_arguments=stream_arguments)
        if syntax_greedy:
            sampling["greedy"] = lambda: parser.in_syntax
        forced = dsml.call_opening(force_call if isinstance(force_call, str) else None) if force_call else ""
        if forced and not thinking:
            yield from self._force(parser, forced)
            forced = ""
        think_end = self.tokenizer.token_id(THINK_END)
        reason, left = "limit", max_tokens
        while left > 0:
            phase = yield from self._sample(parser, should_stop, left, think_end if forced else None, sampling)
            reason, left = phase[0], left - phase[1]
            if reason != "think_end":
                break
            yield from self._force(parser, forced)  # the reasoning closed: now the call
            forced, reason = "", "limit"
        yield from parser.finish()
        if reason != "eos":  # close the reply so the transcript stays well formed
            self.prefill([self.tokenizer.eos_id])
        yield ReplyEnd(reason)

    def _sample(self, parser: dsml.DsmlParser, should_stop: Callable[[], bool] | None, max_tokens: int,
                pause_at: int | None, sampling: dict):
        """Sample into ``parser`` until EOS, ``should_stop``, ``max_tokens`` or the token
        ``pause_at``; yields the events, returns (reason, tokens sampled)."""
        eos, control_ids = self.tokenizer.eos_id, self.tokenizer.added
        reason, n = "limit", 0
        stream = self.generate(max_tokens=max_tokens, **sampling)
        try:
            for event in stream:
                n += 1
                if event.token == eos:
                    return "eos", n
                # Markers count only as the control tokens sampled, not as the same text in plain pieces.
                yield from parser.feed_token(event.text, event.token in control_ids)
                if should_stop is not None and should_stop():
                    return "stopped", n
                if event.token == pause_at:
                    return "think_end", n
        finally:
            stream.close()
        return reason, n

    def _force(self, parser: dsml.DsmlParser, text: str) -> Iterator[dsml.Event]:
        """Write ``text`` into the reply as if sampled: prefilled, and fed to the parser."""
        ids = self.tokenizer.encode_trusted(text)
        self.prefill(ids)
        decoder = self.tokenizer.stream_decoder()
        for token in ids:
            yield from parser.feed_token(decoder.feed(token), token in self.tokenizer.added)
