"""A stand-in for ``runtime.Engine`` in agent-loop tests: it keeps a token list
like the real engine, and each ``generate`` emits the next scripted reply
(template text, so ``</think>`` and DSML markers become their control tokens;
or a list of token ids, for replies that spell markers in plain pieces),
token by token, then EOS. Everything else the loop touches is real: the V4
tokenizer, chat rendering, the DSML parser and the engine's chat-level door
(``sync``, ``respond``: runtime/conversation.py, mixed in as in ``Engine``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from magnetar.runtime.conversation import Conversing
from magnetar.runtime.engine import ContextFull, Event
from magnetar.runtime.fileio import atomic_write_bytes


@dataclass
class ScriptedStats:
    prefill_tokens: int = 0
    cache_hits: int = 0
    restored_tokens: int = 0
    streaming: object = None  # a runtime StreamStats, for a test that shows expert streaming


@dataclass
class ScriptedEngine(Conversing):
    tokenizer: object
    replies: list[str | list[int]]
    ctx: int = 1 << 20
    prefill_chunk: int = 2048
    tokens: list[int] = field(default_factory=list)
    prefills: list[list[int]] = field(default_factory=list)  # every prefill call's ids
    stats: ScriptedStats = field(default_factory=ScriptedStats)
    on_token: object = None  # called after each generated token (tests interrupt from here)
    greedy_steps: list[bool] = field(default_factory=list)  # per generated token: was it asked for greedily

    def reset(self) -> None:
        self.tokens = []

    def checkpoint(self, path, note: str = "") -> int:
        """A session save: the token ids, written as the real engine writes (atomically)."""
        data = json.dumps(self.tokens).encode()
        atomic_write_bytes(path, data)
        return len(data)

    def restore(self, path) -> None:
        self.tokens = json.loads(Path(path).read_text())

    def snapshot(self) -> tuple[int, ...]:
        return tuple(self.tokens)

    def rewind(self, snap: tuple[int, ...]) -> None:
        self.tokens = list(snap)

    def prefill(self, ids, progress=None) -> None:
        if len(self.tokens) + len(ids) > self.ctx:
            raise ContextFull(f"{len(self.tokens)} + {len(ids)} tokens exceed the context of {self.ctx}")
        self.tokens = self.tokens + list(ids)
        self.prefills.append(list(ids))
        self.stats.prefill_tokens += len(ids)
        if progress and ids:
            progress(len(ids), len(ids))

    def generate(self, max_tokens=256, greedy=None, **_sampling):
        if not self.replies:
            raise AssertionError("the loop asked for more replies than the script has")
        reply = self.replies.pop(0)
        ids = (reply if isinstance(reply, list) else self.tokenizer.encode_trusted(reply)) + [self.tokenizer.eos_id]
        decoder, sent = self.tokenizer.stream_decoder(), ids[:max_tokens]
        for i, token in enumerate(sent):
            self.greedy_steps.append(greedy is not None and greedy())  # asked before the token, as the engine does
            self.tokens.append(token)
            if self.on_token:
                self.on_token(token)
            # as the real engine: the last event carries a character cut by max_tokens
            yield Event(token, decoder.feed(token) + (decoder.flush() if i == len(sent) - 1 else ""))
            if token == self.tokenizer.eos_id:
                return


class NoPrefixCache:
    """``runtime.kvcache.PrefixCache``'s interface without checkpoints, which the
    scripted engine cannot write: every sync prefills the whole prompt."""

    def __init__(self, folder):
        pass

    def sync(self, engine, ids, progress=None):
        engine.reset()
        engine.prefill(ids, progress)
        return 0

    def save(self, engine, reason):
        return None
