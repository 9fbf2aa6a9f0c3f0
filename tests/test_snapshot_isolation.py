"""A snapshot owns its state: whatever the live sequence does afterwards (prefill
writes KV rows into its buffers in place), ``rewind`` brings back exactly the state
that was snapshotted, bit for bit, any number of times; and so does a compaction
that is interrupted (it rewinds the live state)."""

from __future__ import annotations

import numpy as np
import pytest

from magnetar.agent.compaction import CompactionError, CompactionPolicy
from magnetar.agent.loop import Agent, LoopSettings
from magnetar.prompts import load
from magnetar.runtime import chat
from magnetar.runtime.engine import Engine
from magnetar.tools.base import ToolContext


def _ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(2, 129280, n).tolist()


def _state(engine: Engine) -> list[np.ndarray]:
    """Copies of every array of the live state, and its next-token logits."""
    live = engine._live
    return [np.array(a) for a in live.state.arrays()] + [np.array(live.next_logits)]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def engine(tiny_models) -> Engine:
    return Engine.load(tiny_models("q8"), ctx=1024)


def _continue(engine: Engine) -> tuple[np.ndarray, list[int]]:
    engine.prefill(_ids(40, seed=2))
    logits = engine.next_logits()
    return logits, [ev.token for ev in engine.generate(max_tokens=12, temperature=0, ignore_eos=True)]


def test_rewind_after_more_prefill_continues_like_a_fresh_run(engine):
    prefix = [0] + _ids(99, seed=1)
    engine.reset()
    engine.prefill(prefix)
    fresh_logits, fresh_tokens = _continue(engine)

    engine.reset()
    engine.prefill(prefix)
    snap = engine.snapshot()
    at_snapshot = _state(engine)
    for _ in range(2):  # the snapshot survives being rewound to and overwritten again
        engine.prefill(_ids(120, seed=3))  # wraps the 32-row window ring, closes compressed rows
        list(engine.generate(max_tokens=3, temperature=0))
        engine.rewind(snap)
        assert engine.tokens == prefix
        assert _same(_state(engine), at_snapshot)
    logits, tokens = _continue(engine)
    assert np.array_equal(logits, fresh_logits) and tokens == fresh_tokens


def test_an_interrupted_compaction_leaves_the_live_state_bit_identical(engine, tmp_path):
    engine.reset()
    # nothink: the last reply renders the same before and after a new user message, so the
    # summary request is prefilled after the live tokens (the path that writes into them)
    agent = Agent(engine, [], ToolContext(root=tmp_path), "You are a test.",
                  LoopSettings(thinking="nothink", seed=0, temperature=0))
    agent.replace_messages([*agent.messages,
                            chat.Message(role="user", content="Say something about " + "numbers " * 40),
                            chat.Message(role="assistant", content="Numbers are fine.")])
    engine.prefill(engine.tokenizer.encode_pieces(chat.render(agent.messages, agent.specs, "nothink").pieces))
    before_tokens, before = list(engine.tokens), _state(engine)
    prefilled = engine.stats.prefill_tokens

    # Interrupted while the request is prefilled: the first summary token stops it.
    with pytest.raises(CompactionError, match="interrupted"):
        agent.compact(CompactionPolicy(keep_turns=0, max_summary_tokens=64),
                progress=lambda done, total: agent.interrupt())
    request = chat.Message(role="user", content=load("compaction"))
    asked = chat.render([*agent.messages, request], agent.specs, "nothink")  # opens after </think> already
    after_live = engine.tokenizer.encode_pieces(asked.pieces[asked.reply_ends[-1]:])
    assert engine.stats.prefill_tokens - prefilled == len(after_live)  # the request ran after the live tokens
    assert engine.tokens == before_tokens
    assert _same(_state(engine), before)
