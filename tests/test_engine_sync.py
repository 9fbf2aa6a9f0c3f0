"""``Engine.sync``, the one way a conversation reaches the live tokens: a conversation
that grows prefills only its new part, the model's sampled replies are never
re-rendered (even where a re-rendering would differ), another conversation restores
the longest prefix the prefix cache holds; ``respond`` reads a reply back as events."""

from __future__ import annotations

import numpy as np
import pytest

from magnetar.runtime import (Engine, Message, PrefixCache, ReasoningDelta, ReplyEnd, TextDelta, ToolCallParsed,
                              ToolSpec, chat)
from scripted_engine import ScriptedEngine
from test_agent_loop import block, call

SYSTEM = Message(role="system", content="You are a test.")


def _reply(engine, messages: list[Message], thinking: bool = True) -> list:
    """Sample the next reply and add it to ``messages`` as the loop records it."""
    events = list(engine.respond(thinking=thinking, max_tokens=64))
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    messages.append(Message(role="assistant", content=text, reasoning=reasoning if thinking else None))
    return events


def test_a_growing_conversation_prefills_only_its_new_part(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, ["Let me see.</think>Hello.", "Again.</think>Bye."])
    messages = [SYSTEM, Message(role="user", content="hi")]
    first = engine.sync(messages, None, "think")
    assert (first.reused, first.source) == (0, "none") and first.prefilled == len(engine.tokens)
    _reply(engine, messages)
    live = list(engine.tokens)
    messages.append(Message(role="user", content="and now?"))
    report = engine.sync(messages, None, "think")
    assert (report.reused, report.source) == (len(live), "live")
    assert v4_tokenizer.decode(engine.prefills[-1]) == "<｜User｜>and now?<｜Assistant｜><think>"
    assert report.prefilled == len(engine.prefills[-1]) and engine.tokens[:len(live)] == live


def test_thinking_without_tools_keeps_the_sampled_reasoning(v4_tokenizer):
    """The template drops the reasoning of a reply once a user turn follows it (no tools),
    so a re-rendering no longer starts like the live tokens; sync still only extends them."""
    engine = ScriptedEngine(v4_tokenizer, ["Let me see.</think>Hello."])
    messages = [SYSTEM, Message(role="user", content="hi")]
    engine.sync(messages, None, "think")
    _reply(engine, messages)
    live = list(engine.tokens)
    messages.append(Message(role="user", content="more"))
    rerendered = v4_tokenizer.encode_pieces(chat.render(messages).pieces)
    assert rerendered[:len(live)] != live  # the reasoning is gone from the re-rendering
    report = engine.sync(messages, None, "think")
    assert report.source == "live" and engine.tokens[:len(live)] == live
    assert v4_tokenizer.decode(engine.prefills[-1]) == "<｜User｜>more<｜Assistant｜><think>"


def test_sampled_tokens_are_never_re_rendered(v4_tokenizer):
    """A reply sampled one character per token (BPE would join them) and a tool call: the
    re-rendering differs from what was sampled, and the live tokens are kept as sampled."""
    spelled = [t for ch in "Hello there" for t in v4_tokenizer.encode(ch)]
    tool = ToolSpec(name="echo", description="Say it.", parameters={"type": "object"})
    engine = ScriptedEngine(v4_tokenizer, [spelled, "</think>" + block(call("echo", text="x"))])
    messages = [SYSTEM, Message(role="user", content="hi")]
    engine.sync(messages, [tool], "nothink")
    _reply(engine, messages, thinking=False)
    assert messages[-1].content == "Hello there"
    live = list(engine.tokens)
    messages.append(Message(role="user", content="go on"))
    rerendered = v4_tokenizer.encode_pieces(chat.render(messages, [tool], "nothink").pieces)
    assert rerendered[:len(live)] != live
    report = engine.sync(messages, [tool], "nothink")
    assert (report.reused, report.source) == (len(live), "live") and engine.tokens[:len(live)] == live
    events = _reply(engine, messages, thinking=False)
    [parsed] = [e for e in events if isinstance(e, ToolCallParsed)]
    messages[-1] = messages[-1].model_copy(update={"tool_calls": [parsed.call.model_copy(update={"id": "c1"})]})
    messages.append(Message(role="tool", content="echo: x", tool_call_id="c1"))
    live = list(engine.tokens)
    report = engine.sync(messages, [tool], "nothink")
    assert report.source == "live" and engine.tokens[:len(live)] == live
    assert v4_tokenizer.decode(engine.prefills[-1]) == \
        "<｜User｜><tool_result>echo: x</tool_result><｜Assistant｜></think>"


def test_the_live_tokens_of_another_conversation_are_not_reused(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, ["</think>Hello."])
    mine = [SYSTEM, Message(role="user", content="hi")]
    engine.sync(mine, None, "nothink")
    _reply(engine, mine, thinking=False)
    # Same shape (one reply), another first question; and this conversation's first part alone.
    other = [SYSTEM, Message(role="user", content="ho"), mine[2], Message(role="user", content="x")]
    assert engine.sync(other, None, "nothink").source == "none"
    assert engine.tokens == v4_tokenizer.encode_pieces(chat.render(other, None, "nothink").pieces)


def test_a_reply_ends_with_eos_even_when_stopped(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, ["Thinking hard.</think>Never finished."])
    engine.sync([SYSTEM, Message(role="user", content="hi")], None, "think")
    events = list(engine.respond(thinking=True, should_stop=lambda: True, max_tokens=64))
    assert events[-1] == ReplyEnd("stopped") and engine.tokens[-1] == v4_tokenizer.eos_id
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    assert reasoning and "Thinking hard.".startswith(reasoning) and reasoning != "Thinking hard."


def test_a_full_context_raises_before_anything_changes(v4_tokenizer):
    from magnetar.runtime import ContextFull

    engine = ScriptedEngine(v4_tokenizer, ["</think>Hello."], ctx=64)
    messages = [SYSTEM, Message(role="user", content="hi")]
    engine.sync(messages, None, "nothink")
    live = list(engine.tokens)
    with pytest.raises(ContextFull):
        engine.sync(messages, None, "nothink", room=64)
    assert engine.tokens == live


def test_a_diverging_conversation_restores_the_longest_cached_prefix(tiny_models, tmp_path):
    system = Message(role="system", content=" ".join(f"rule {k}: be exact." for k in range(60)))
    engine = Engine.load(tiny_models("q8"), ctx=2048, prefill_chunk=64)
    # trim: the cold save leaves out the turn's own text (the question), keeping the shared part
    engine.attach_cache(PrefixCache(tmp_path / "kv", min_tokens=100, trim=80))
    first = [system, Message(role="user", content="Question one " * 20)]
    assert engine.sync(first, None, "nothink").source == "none"
    second = [system, Message(role="user", content="Another question " * 20)]
    report = engine.sync(second, None, "nothink")
    ids = engine.render(second, None, "nothink")
    shared = next(k for k, (a, b) in enumerate(zip(ids, engine.render(first, None, "nothink"))) if a != b)
    assert report.source == "cache" and 0 < report.reused <= shared and report.reused % 64 == 0
    assert report.prefilled == len(ids) - report.reused and engine.tokens == ids
    assert engine.stats.cache_hits == 1
    uncached = Engine.load(tiny_models("q8"), ctx=2048, prefill_chunk=64)
    uncached.prefill(ids)
    # The restored prefix ends on a chunk boundary: the same chunks ran, bit for bit.
    assert np.array_equal(engine.next_logits(), uncached.next_logits())
