"""Session folders written by someone else, or damaged: one bad ``meta.json`` never
hides the other sessions (``magnetar sessions``, ``SessionStore.all/open/latest``,
which ``--resume ID`` and ``--continue`` use), fields of the wrong type fall back to
safe values, and messages holding lone surrogates (a non-UTF-8 file name decoded
with surrogateescape) are stored and read back exactly."""

from __future__ import annotations

import json
import os

import pytest

from magnetar.cli import main
from magnetar.agent.sessions import SessionStore
from magnetar.runtime import chat

DAMAGED = {
    "updated-string": {"updated": "yesterday"},
    "updated-null": {"updated": None},
    "updated-infinite": {"updated": float("inf"), "created": float("nan")},
    "repo-null": {"repo": None},
    "tokens-null": {"tokens": None},
    "tokens-list": {"tokens": [1, 2]},
    "title-number": {"title": 42},
    "id-other": {"id": None},
}
UNREADABLE = {
    "not-an-object": b"[1, 2, 3]",
    "invalid-utf8": b'{"id": "\xff\xfe", "title": "x"}',
    "not-json": b"{\"id\": ",
    "empty": b"",
}


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A good session of the project (the oldest), and many bad ones beside it."""
    monkeypatch.setenv("MAGNETAR_HOME", str(tmp_path / "home"))
    store = SessionStore(tmp_path / "home" / "data" / "sessions")
    project = tmp_path / "proj"
    project.mkdir()
    good = store.create(project, "tiny")
    good.append(chat.Message(role="user", content="the good one"))
    good.write_meta()
    meta = json.loads((good.folder / "meta.json").read_text())
    for name, change in DAMAGED.items():
        folder = store.root / name
        folder.mkdir()
        (folder / "meta.json").write_text(json.dumps({**meta, "id": name, "title": name,
                                                     "updated": meta["updated"] + 10, **change}))
    for name, data in UNREADABLE.items():
        (store.root / name).mkdir()
        (store.root / name / "meta.json").write_bytes(data)
    (store.root / "missing-keys").mkdir()
    (store.root / "missing-keys" / "meta.json").write_text('{"title": "half"}')
    (store.root / "no-meta").mkdir()
    (store.root / "stray-file").write_text("not a session")
    return store, good, project


def test_bad_meta_never_hides_the_good_sessions(store):
    store, good, project = store
    ids = [s.meta.id for s in store.all()]
    assert good.meta.id in ids
    assert set(DAMAGED) <= set(ids)  # readable folders with odd fields are listed, fields made safe
    assert not set(UNREADABLE) & set(ids)
    for s in store.all():
        m = s.meta
        assert s.folder.name == m.id
        assert isinstance(m.title, str) and isinstance(m.repo, str) and isinstance(m.model, str)
        assert type(m.tokens) is int and isinstance(m.updated, float) and isinstance(m.created, float)


def test_open_and_latest_still_find_sessions(store):
    store, good, project = store
    assert store.open(good.meta.id).meta.id == good.meta.id  # --resume ID
    assert store.open("updated-null").meta.id == "updated-null"
    assert store.open("tokens-null").meta.tokens == 0
    # --continue: the latest of this project; repo-null belongs to none
    assert store.latest(project).meta.repo == str(project.resolve())
    assert store.latest(project).meta.id != "repo-null"


def test_magnetar_sessions_lists_them_all(store, capsys):
    store, good, project = store
    assert main(["sessions"]) == 0
    out = capsys.readouterr()
    assert good.meta.id in out.out and "updated-string" in out.out and "Traceback" not in out.err
    assert "the good one" in out.out


def test_lone_surrogates_are_stored_and_read_back(tmp_path):
    store = SessionStore(tmp_path / "sessions")
    project = tmp_path / "proj"
    project.mkdir()
    session = store.create(project, "tiny")
    name = os.fsdecode(b"caf\xe9-\xff.txt")  # not UTF-8: 'caf\udce9-\udcff.txt'
    messages = [chat.Message(role="user", content=f"open {name}"),
                chat.Message(role="assistant", content=f"I read {name}.", reasoning=name),
                chat.Message(role="tool", content=f"{name}\n\u4e16\u754c ok", tool_call_id="call_1")]
    for m in messages:
        session.append(m)
    session.append_replacement(messages[1:])
    session.write_meta()
    assert store.open(session.meta.id).messages() == messages[1:]
    assert store.open(session.meta.id).meta.title == f"open {name}"
    assert "\u4e16\u754c" in session.transcript_path.read_text(encoding="utf-8")  # still readable text
