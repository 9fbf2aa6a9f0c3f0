"""``magnetar`` with no command: the TUI in the current repository, in a new
session or a resumed one (``--resume [ID]``, ``--continue``), saved after every
turn and on exit (also on SIGTERM)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from magnetar.prompts import load
from magnetar.runtime import chat
from magnetar.runtime.engine import Engine
from magnetar.runtime.kvcache import PrefixCache
from magnetar.tools.base import ToolContext

from .loop import Agent, LoopSettings
from .models import ModelNotFound, data_dir, missing_model_help, resolve_model
from .sessions import SessionStore
from .toolset import project_root, standard_tools, undo_journal


def open_tui(args) -> int:
    from .tui import FirstRunApp, MagnetarApp

    try:
        model = resolve_model(args.model)
    except ModelNotFound as err:
        if sys.stdout.isatty():
            FirstRunApp(missing_model_help()).run()
        else:
            print(f"magnetar: error: {err}\n{missing_model_help()}", file=sys.stderr)
        return 2
    root = project_root(Path.cwd())
    print(f"loading {model.name} ...", file=sys.stderr)
    engine = Engine.load(model, ctx=args.ctx)
    ctx = ToolContext(root=root, mode=args.mode, data_dir=data_dir(), undo=undo_journal())
    agent = Agent(engine, standard_tools(), ctx, load("system"), LoopSettings(), PrefixCache(data_dir() / "kvcache"))
    store = SessionStore(data_dir() / "sessions")
    if args.resume is not None or args.continue_:
        session = store.latest(root) if args.continue_ or args.resume == "" else store.open(args.resume)
        how = session.resume(engine, lambda messages: engine.tokenizer.encode_pieces(
            chat.render(messages, agent.specs, agent.settings.mode, add_generation_prompt=False).pieces))
        agent.messages[:] = session.messages() or agent.messages
        print(f"session {session.meta.id}: {how}, {len(engine.tokens)} tokens", file=sys.stderr)
    else:
        session = store.create(root, model.name)
        session.append(agent.messages[0])
    saved = [len(agent.messages) if args.resume is not None or args.continue_ else 1]

    def autosave() -> None:
        for message in agent.messages[saved[0]:]:
            session.append(message)
        saved[0] = len(agent.messages)
        session.save(engine)

    app = MagnetarApp(agent, model.name, store, after_turn=autosave)
    previous = signal.signal(signal.SIGTERM, lambda *_: app.exit())
    try:
        app.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        autosave()
        print(f"session saved: {session.meta.id} (magnetar --resume {session.meta.id})", file=sys.stderr)
    return 0
