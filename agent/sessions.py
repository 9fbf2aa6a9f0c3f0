"""Sessions are folders: ``<data>/sessions/<id>/`` holds

* ``meta.json``: id, title, repository, model, token count, created/updated
  (written atomically);
* ``transcript.jsonl``: every message as it happened (the model's DSML blocks
  byte for byte), one JSON object per line with a timestamp. Lines are
  appended and fsynced; a line cut short by a crash is skipped on reading;
* ``state.ckpt``: the engine's checkpoint after the last turn
  (runtime/checkpoint.py), so a resume re-processes nothing.

Resuming restores the checkpoint; when it is missing, damaged or made for
another model, the transcript is rendered and prefilled instead (slower,
never lost).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from magnetar.runtime import CheckpointError, MagnetarError, Message, atomic_write_bytes, sweep_stale_temps

TITLE_CHARS = 70
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def json_utf8(value, default=None) -> str:
    """``value`` as one line of JSON that UTF-8 can hold. A name that is not UTF-8 reaches us
    surrogate-escaped, and the model may write a lone surrogate as a JSON escape; UTF-8 cannot
    hold one, so each goes out as a ``\\uXXXX`` escape and a JSON reader gets the same string back."""
    text = json.dumps(value, ensure_ascii=False, default=default)
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class SessionError(MagnetarError):
    """A session cannot be found or opened."""


@dataclass
class SessionMeta:
    id: str
    title: str
    repo: str
    model: str
    tokens: int
    created: float
    updated: float

    @classmethod
    def load(cls, folder: Path) -> "SessionMeta | None":
        """The folder's ``meta.json``, or None when it is not a JSON object. Fields of the
        wrong type (hand-edited, another version) get safe values, so one odd folder can
        neither crash a listing nor hide the others; the folder name is the id."""
        try:
            data = json.loads((folder / "meta.json").read_bytes().decode("utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict):
            return None

        def field(name: str, kind: type, default):
            value = data.get(name)
            return value if isinstance(value, kind) and not isinstance(value, bool) else default

        def moment(name: str, default: float) -> float:
            value = float(field(name, (int, float), default))
            return value if math.isfinite(value) else default

        created = moment("created", 0.0)
        return cls(folder.name, field("title", str, ""), field("repo", str, ""), field("model", str, ""),
                   field("tokens", int, 0), created, moment("updated", created))


class Session:
    def __init__(self, folder: Path, meta: SessionMeta):
        self.folder, self.meta = folder, meta

    @property
    def checkpoint_path(self) -> Path:
        return self.folder / "state.ckpt"

    @property
    def transcript_path(self) -> Path:
        return self.folder / "transcript.jsonl"

    def append(self, message: Message) -> None:
        """Add one message to the transcript (flushed and fsynced before returning)."""
        if not self.meta.title and message.role == "user":
            self.meta.title = " ".join(message.content.split())[:TITLE_CHARS]
        self._append({"ts": time.time(), "message": message.model_dump(exclude_none=True)})

    def _append(self, record: dict) -> None:
        line = json_utf8(record)
        with open(self.transcript_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def messages(self) -> list[Message]:
        """The transcript's messages in order; a torn last line (a crash mid-append) is skipped."""
        if not self.transcript_path.exists():
            return []
        out: list[Message] = []
        for line in self.transcript_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                if "replace" in record:  # a compaction: the conversation continues from these messages
                    out = [Message.model_validate(m) for m in record["replace"]]
                else:
                    out.append(Message.model_validate(record["message"]))
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def append_replacement(self, messages: list[Message]) -> None:
        """Record that the conversation now continues from ``messages`` (after a compaction);
        the lines before stay, so the transcript still holds everything that was said."""
        self._append({"ts": time.time(), "replace": [m.model_dump(exclude_none=True) for m in messages]})

    def save(self, engine) -> None:
        """Checkpoint the engine and update the metadata (both atomic)."""
        engine.checkpoint(self.checkpoint_path, note="session")
        self.meta.tokens = len(engine.tokens)
        self.write_meta()

    def write_meta(self) -> None:
        self.meta.updated = time.time()
        atomic_write_bytes(self.folder / "meta.json", json.dumps(asdict(self.meta), indent=1).encode())

    def resume(self, engine, replay, progress=None, notice=None) -> str:
        """Bring the engine to where the session ended: ``"restored"`` from the checkpoint,
        else ``"replayed"``: ``replay(messages, progress)`` runs the transcript from an empty state.
        ``notice`` hears what the restore warns of (a checkpoint of other expert activations)."""
        if self.checkpoint_path.exists():
            try:
                engine.restore(self.checkpoint_path, notice)
                return "restored"
            except CheckpointError:
                pass  # fall through to the transcript
        engine.reset()
        messages = self.messages()
        if len(messages) > 1:
            replay(messages, progress)
        return "replayed"

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())


class SessionStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        sweep_stale_temps(self.root)  # what writers killed mid-write left in the session folders

    def create(self, repo: Path, model: str) -> Session:
        now = time.time()
        sid = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + "-" + secrets.token_hex(3)
        folder = self.root / sid
        folder.mkdir(parents=True)
        session = Session(folder, SessionMeta(sid, "", str(repo.resolve()), model, 0, now, now))
        session.write_meta()
        return session

    def all(self) -> list[Session]:
        """Every readable session, most recently updated first."""
        out = []
        for folder in self.root.iterdir() if self.root.is_dir() else ():
            if (meta := SessionMeta.load(folder)) is not None:
                out.append(Session(folder, meta))
        return sorted(out, key=lambda s: s.meta.updated, reverse=True)

    def open(self, prefix: str) -> Session:
        """The session whose id starts with ``prefix`` (it must be unambiguous)."""
        found = [s for s in self.all() if s.meta.id.startswith(prefix)]
        if not found:
            raise SessionError(f"no session id starts with {prefix!r}", "list them with `magnetar sessions`")
        if len(found) > 1:
            ids = ", ".join(s.meta.id for s in found[:5])
            raise SessionError(f"{prefix!r} matches {len(found)} sessions ({ids})", "give more of the id")
        return found[0]

    def latest(self, repo: Path) -> Session:
        repo_str = str(repo.resolve())
        for s in self.all():
            if s.meta.repo == repo_str:
                return s
        raise SessionError(f"no session for {repo_str} yet", "start one with `magnetar`")


def age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def render_list(sessions: list[Session], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"{'id':<23} {'age':>5} {'tokens':>8} {'size':>9}  {'repo':<30} title"]
    for s in sessions:
        m = s.meta
        lines.append(f"{m.id:<23} {age(now - m.updated):>5} {m.tokens:>8} {s.nbytes() / 1e6:>7.1f}MB  "
                     f"{Path(m.repo).name[:30]:<30} {m.title or '(untitled)'}")
    return "\n".join(lines)


class LiveSession:
    """The session a running agent writes to: after every turn its new messages are
    appended and the engine is checkpointed; ``switch`` saves it and continues another
    with its KV state restored (nothing re-processed)."""

    def __init__(self, store: SessionStore, agent, model_name: str):
        self.store, self.agent, self.model_name = store, agent, model_name
        self.session: Session | None = None
        self._saved = 0  # messages of agent.messages already in the transcript

    @property
    def id(self) -> str:
        return self.session.meta.id if self.session else ""

    def start(self, root: Path) -> None:
        self.session, self._saved = self.store.create(root, self.model_name), 0
        self.save()

    def open(self, session: Session, progress=None, notice=None) -> str:
        """Continue ``session``: ``"restored"`` from its checkpoint or ``"replayed"`` from its transcript."""
        agent = self.agent
        how = session.resume(agent.engine, agent.replay, progress, notice)
        messages = session.messages()
        agent.replace_messages(messages)
        self.session, self._saved = session, len(messages)
        return how

    def save(self) -> None:
        for message in self.agent.messages[self._saved:]:
            self.session.append(message)
        self._saved = len(self.agent.messages)
        if self.agent.context_used:
            self.session.save(self.agent.engine)
        else:  # e.g. just compacted: an older checkpoint would no longer match the messages
            self.session.checkpoint_path.unlink(missing_ok=True)
            self.session.write_meta()

    def replaced(self) -> None:
        """The agent's messages were rewritten (a compaction): record the new list."""
        self.session.append_replacement(self.agent.messages)
        self._saved = len(self.agent.messages)
        self.save()

    def switch(self, prefix: str, progress=None, notice=None) -> str:
        target = self.store.open(prefix)
        if self.session is not None and target.meta.id == self.session.meta.id:
            return "already open"
        if self.session is not None:
            self.save()
        return self.open(target, progress, notice)


def list_command(args) -> int:
    """``magnetar sessions``."""
    from .models import data_dir

    sessions = SessionStore(data_dir() / "sessions").all()
    print(render_list(sessions) if sessions else f"no sessions yet in {data_dir() / 'sessions'}")
    return 0
