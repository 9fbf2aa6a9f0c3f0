"""Sessions in the TUI with the real engine on a tiny model (random weights: the
replies are noise, capped at a few tokens): every turn is saved, /new starts a
second session, /sessions lists both, /switch restores the first one's KV state
without prefilling a token, and its conversation is drawn again."""

from __future__ import annotations

import asyncio

from textual.widgets import Static

from magnetar.agent.compaction import SUMMARY_HEADER, CompactionPolicy
from magnetar.agent.loop import Agent, LoopSettings
from magnetar.agent.sessions import LiveSession, SessionStore
from magnetar.agent.tui import MagnetarApp
from magnetar.runtime.engine import Engine
from magnetar.tools.base import ToolContext
from test_tui import _type, texts, until


def settings() -> LoopSettings:
    return LoopSettings(thinking="nothink", max_tokens_per_step=3, seed=1)  # replies are noise: keep them short


def started(tiny_models, tmp_path):
    """The real engine on the tiny model, an agent without tools, and a fresh live session."""
    engine = Engine.load(tiny_models("q8"), ctx=2048)
    agent = Agent(engine, [], ToolContext(root=tmp_path, permissions="read-only"), "You are a test.", settings())
    live = LiveSession(SessionStore(tmp_path / "sessions"), agent, "tiny-q8")
    live.start(tmp_path)
    return engine, agent, live


def test_new_sessions_then_switch_back_with_zero_prefill(tiny_models, tmp_path):
    engine, agent, live = started(tiny_models, tmp_path)
    first = live.id

    async def go():
        app = MagnetarApp(agent, "tiny-q8", live)
        async with app.run_test() as pilot:
            await _type(pilot, "first question")
            await until(pilot, lambda: not app.busy and len(agent.messages) == 3, timeout=120)
            first_tokens = list(engine.tokens)
            await _type(pilot, "/new")
            await until(pilot, lambda: live.id != first)
            await _type(pilot, "second question")
            await until(pilot, lambda: not app.busy and len(agent.messages) == 3, timeout=120)
            await _type(pilot, "/sessions")
            listing = texts(app)
            assert "first question" in listing and "second question" in listing
            prefilled, restored = engine.stats.prefill_tokens, engine.stats.restored_tokens
            await _type(pilot, f"/switch {first[:17]}")
            await until(pilot, lambda: not app.busy and live.id == first, timeout=60)
            assert engine.tokens == first_tokens
            assert engine.stats.prefill_tokens == prefilled  # nothing re-processed
            assert engine.stats.restored_tokens == restored + len(first_tokens)
            assert [m.content for m in agent.messages if m.role == "user"] == ["first question"]
            shown = "\n".join(str(w.render()) for w in app.query(Static))
            assert "first question" in shown and "second question" not in shown.split(f"session {first}")[-1]
            await _type(pilot, "/switch nope")
            await until(pilot, lambda: "cannot switch" in texts(app))
    asyncio.run(go())
    # both sessions are on disk with their transcripts and checkpoints
    sessions = {s.meta.id: s for s in live.store.all()}
    assert len(sessions) == 2 and all(s.checkpoint_path.exists() for s in sessions.values())
    assert [m.content for m in sessions[first].messages() if m.role == "user"] == ["first question"]


def test_compaction_automatic_then_resumed_from_the_transcript(tiny_models, tmp_path):
    engine, agent, live = started(tiny_models, tmp_path)

    async def go():
        app = MagnetarApp(agent, "tiny-q8", live)
        app.compaction = CompactionPolicy(keep_turns=1, threshold=0.0, max_summary_tokens=6)
        async with app.run_test() as pilot:
            await _type(pilot, "first question")
            await until(pilot, lambda: not app.busy and len(agent.messages) == 3, timeout=120)
            await _type(pilot, "second question")  # now an older turn exists: compaction is due
            await until(pilot, lambda: not app.busy and "compacted 2 messages" in texts(app), timeout=120)
            assert "before-compaction-1" in texts(app)
            await _type(pilot, "/compact")
            await until(pilot, lambda: "not compacted" in texts(app))
    asyncio.run(go())
    roles = [m.role for m in agent.messages]
    assert roles == ["system", "user", "user", "assistant"]
    assert agent.messages[1].content.startswith(SUMMARY_HEADER)
    assert agent.messages[2].content == "second question"
    folder = live.session.folder
    assert (folder / "transcript.before-compaction-1.jsonl").exists()
    assert not live.session.checkpoint_path.exists()  # the engine was reset: no stale checkpoint
    # a new process resumes the compacted conversation by replaying its transcript
    fresh = Agent(Engine.load(tiny_models("q8"), ctx=2048), [], ToolContext(root=tmp_path), "You are a test.",
                  settings())
    again = LiveSession(live.store, fresh, "tiny-q8")
    assert again.open(live.store.open(live.id)) == "replayed"
    assert [m.content for m in fresh.messages] == [m.content for m in agent.messages]
    replayed, prefilled = list(fresh.engine.tokens), fresh.engine.stats.prefill_tokens
    end = list(fresh.turn("third question"))[-1]
    assert end.reason in ("answered", "token-limit")
    # the turn continued the replayed tokens: only the new question (and the opener) was prefilled
    assert fresh.engine.tokens[:len(replayed)] == replayed
    new_prompt = fresh.engine.stats.prefill_tokens - prefilled
    assert 0 < new_prompt < 20 and new_prompt + fresh.engine.stats.generated_tokens >= 1
