"""Greedy sampling on DSML syntax, the request's sampling on payloads (docs/spec/server-api.md
§5, §14; ds4 does the same): ``Engine.generate(greedy=...)`` on the real tiny model, and
``Engine.respond(syntax_greedy=True)`` asking for it exactly on the block's tags and names."""

from __future__ import annotations

from scripted_engine import ScriptedEngine
from server_harness import DSML, THINK_TOOL

from magnetar.runtime import Engine


def test_generate_takes_the_argmax_where_asked_and_samples_elsewhere(tiny_models):
    engine = Engine.load(tiny_models("q8"), ctx=256)
    engine.prefill(engine.tokenizer.encode("Hello there, how are"))
    start = engine.snapshot()
    asked: list[bool] = []

    def every_third() -> bool:
        asked.append(len(asked) % 3 == 0)
        return asked[-1]

    hot = {"max_tokens": 24, "temperature": 5.0, "min_p": 0.0, "seed": 7, "logprobs": 1, "ignore_eos": True}
    events = list(engine.generate(greedy=every_third, **hot))
    assert len(asked) == len(events) == 24
    for greedy, ev in zip(asked, events):
        if greedy:
            assert ev.token == ev.top_logprobs[0][0]  # the argmax at that step
    sampled = [ev for greedy, ev in zip(asked, events) if not greedy]
    assert any(ev.token != ev.top_logprobs[0][0] for ev in sampled)  # the hot settings did apply
    engine.rewind(start)
    asked.clear()
    again = list(engine.generate(greedy=every_third, **hot))
    assert [ev.token for ev in again] == [ev.token for ev in events]  # payloads follow the seed


def _token_starts(tokenizer, ids: list[int]) -> list[int]:
    """The character offset where each token's text begins in the decoded reply."""
    decoder, starts, at = tokenizer.stream_decoder(), [], 0
    for token in ids:
        starts.append(at)
        at += len(decoder.feed(token))
    return starts


def test_respond_asks_for_greedy_tokens_on_syntax_only(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, [THINK_TOOL])
    list(engine.respond(thinking=True, syntax_greedy=True, temperature=2.0, seed=1))
    ids = v4_tokenizer.encode_trusted(THINK_TOOL) + [v4_tokenizer.eos_id]
    starts = _token_starts(v4_tokenizer, ids)
    # Syntax begins after the block opener's control token; the values (and the "</" that may
    # still be value text) are payload.
    syntax_from = THINK_TOOL.index(DSML) + len(DSML)
    values = []
    for body in ('a "q" \\ é\nb.py', "20"):
        at = THINK_TOOL.index(f'">{body}') + 2
        values.append(range(at, at + len(body) + 2))
    expected = [at >= syntax_from and not any(at in v for v in values) for at in starts]
    assert engine.greedy_steps == expected
    assert any(expected) and not all(expected[starts.index(syntax_from):])


def test_respond_without_syntax_greedy_never_asks(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, [THINK_TOOL])
    list(engine.respond(thinking=True))
    assert not any(engine.greedy_steps)
