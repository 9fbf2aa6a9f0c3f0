"""Sessions on disk: a transcript, metadata and a checkpoint per folder; resume
restores the checkpoint with nothing re-processed, or replays the transcript
when the checkpoint is gone or damaged; listing and opening by id prefix."""

from __future__ import annotations

import json
import time

import pytest

from magnetar.agent.sessions import SessionError, SessionStore, render_list
from magnetar.runtime import chat
from magnetar.runtime.engine import Engine

MESSAGES = [chat.Message(role="system", content="You are a test."),
            chat.Message(role="user", content="Fix   the\nbuild please"),
            chat.Message(role="assistant", content="Done.", reasoning="Looked at it.")]


def _ids(engine, messages):
    return engine.tokenizer.encode_pieces(chat.render(messages, None, "think", add_generation_prompt=False).pieces)


@pytest.fixture
def saved(tiny_models, tmp_path):
    store = SessionStore(tmp_path / "sessions")
    session = store.create(tmp_path, "tiny-q8")
    engine = Engine.load(tiny_models("q8"), ctx=512)
    for m in MESSAGES:
        session.append(m)
    engine.prefill(_ids(engine, MESSAGES))
    session.save(engine)
    return store, session, engine


def test_resume_restores_the_checkpoint_with_nothing_re_processed(tiny_models, saved):
    store, session, engine = saved
    fresh = Engine.load(tiny_models("q8"), ctx=512)
    assert store.open(session.meta.id[:12]).resume(fresh, lambda m, progress: fresh.prefill(_ids(fresh, m), progress)) == "restored"
    assert fresh.tokens == engine.tokens and fresh.stats.prefill_tokens == 0
    assert (fresh.next_logits() == engine.next_logits()).all()


@pytest.mark.parametrize("damage", ["missing", "corrupt", "other model"])
def test_a_lost_checkpoint_replays_the_transcript(tiny_models, saved, tmp_path, damage):
    store, session, engine = saved
    if damage == "missing":
        session.checkpoint_path.unlink()
    elif damage == "corrupt":
        data = bytearray(session.checkpoint_path.read_bytes())
        data[3000] ^= 0x40
        session.checkpoint_path.write_bytes(bytes(data))
    fresh = Engine.load(tiny_models("f32" if damage == "other model" else "q8"), ctx=512)
    assert session.resume(fresh, lambda m, progress: fresh.prefill(_ids(fresh, m), progress)) == "replayed"
    assert fresh.tokens == engine.tokens and fresh.stats.prefill_tokens == len(engine.tokens)


def test_transcript_and_metadata(saved):
    store, session, engine = saved
    assert [m.model_dump() for m in session.messages()] == [m.model_dump() for m in MESSAGES]
    meta = json.loads((session.folder / "meta.json").read_text())
    assert meta["title"] == "Fix the build please" and meta["tokens"] == len(engine.tokens)
    with open(session.transcript_path, "a") as fh:
        fh.write('{"ts": 1, "message": {"role": "user", "cont')  # a crash mid-append
    assert len(session.messages()) == 3


def test_list_open_and_latest(saved, tmp_path):
    store, first, _ = saved
    time.sleep(0.01)
    other_repo = tmp_path / "other"
    other_repo.mkdir()
    second = store.create(other_repo, "tiny-q8")
    assert [s.meta.id for s in store.all()] == [second.meta.id, first.meta.id]
    assert store.latest(tmp_path).meta.id == first.meta.id
    assert store.latest(other_repo).meta.id == second.meta.id
    table = render_list(store.all())
    assert first.meta.id in table and "Fix the build please" in table and "(untitled)" in table
    with pytest.raises(SessionError, match="matches 2 sessions"):
        store.open("2")
    with pytest.raises(SessionError, match="no session id starts with 'zzz'"):
        store.open("zzz")
    with pytest.raises(SessionError, match="no session for"):
        store.latest(tmp_path / "nowhere")


def test_sessions_command_lists_them(saved, tmp_path, monkeypatch, capsys):
    from magnetar.cli import main

    store, session, _ = saved
    monkeypatch.setenv("MAGNETAR_HOME", str(tmp_path / "home"))
    assert main(["sessions"]) == 0
    assert "no sessions yet" in capsys.readouterr().out
    (tmp_path / "home" / "data").mkdir(parents=True)
    store.root.rename(tmp_path / "home" / "data" / "sessions")
    assert main(["sessions"]) == 0
    out = capsys.readouterr().out
    assert session.meta.id in out and "Fix the build please" in out
