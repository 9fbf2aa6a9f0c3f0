"""``magnetar run`` saves its session as the TUI does (transcript, checkpoint, metadata,
for this project), says its id on stderr and in the ``--json`` TurnEnd event, and
``magnetar --resume ID`` (SessionStore.open + LiveSession.open) continues it with the
KV state restored, nothing re-processed."""

from __future__ import annotations

import json
import subprocess

from magnetar.cli import main
from magnetar.agent.loop import Agent, LoopSettings
from magnetar.agent.sessions import LiveSession, SessionStore
from magnetar.runtime.engine import Engine
from magnetar.tools.base import ToolContext


def test_a_headless_run_is_a_session_that_resumes(tiny_models, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("MAGNETAR_HOME", str(home))
    repo = tmp_path / "proj"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    main(["run", "-m", str(tiny_models("q8")), "--cwd", str(repo), "--json", "--ctx", "4096",
          "--max-tokens", "8", "--seed", "3", "--nothink", "-p", "List the files."])
    out = capsys.readouterr()
    end = json.loads(out.out.splitlines()[-1])
    sid = end["session"]
    assert end["type"] == "TurnEnd" and sid
    assert f"magnetar --resume {sid}" in out.err

    store = SessionStore(home / "data" / "sessions")
    session = store.open(sid)
    assert store.latest(repo).meta.id == sid  # --continue in this project finds it
    assert {"meta.json", "transcript.jsonl", "state.ckpt"} <= {p.name for p in session.folder.iterdir()}
    roles = [m.role for m in session.messages()]
    assert roles[:2] == ["system", "user"] and "assistant" in roles
    assert "List the files." in session.messages()[1].content

    engine = Engine.load(tiny_models("q8"), ctx=4096)
    agent = Agent(engine, [], ToolContext(root=repo, permissions="read-only"), "unused",
                  LoopSettings(thinking="nothink"))
    assert LiveSession(store, agent, "tiny-q8").open(session) == "restored"
    assert engine.stats.prefill_tokens == 0 and len(engine.tokens) == session.meta.tokens > 0
    assert agent.messages == session.messages()
