"""``magnetar`` with no command: the TUI in the current repository, in a new
session or a resumed one (``--resume [ID]``, ``--continue``), saved after every
turn and on exit (also on SIGTERM)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from magnetar.console import engine_options, notice, progress_bar
from magnetar.prompts import load
from magnetar.runtime import Engine, PrefixCache
from magnetar.tools.base import ToolContext
from magnetar.tools.edit import UndoJournal

from .loop import Agent, LoopSettings
from .models import ModelNotFound, data_dir, missing_model_help, resolve_model
from .sandbox_command import tool_options
from .sessions import LiveSession, SessionStore
from .toolset import project_root, standard_tools


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
    engine = Engine.load(model, ctx=args.ctx, **engine_options(args))
    engine.attach_cache(PrefixCache(data_dir() / "kvcache"))
    ctx = ToolContext(root=root, permissions=args.mode, data_dir=data_dir(), undo=UndoJournal(), **tool_options(args))
    agent = Agent(engine, standard_tools(), ctx, load("system"), LoopSettings())
    live = LiveSession(SessionStore(data_dir() / "sessions"), agent, model.name)
    if args.resume is not None or args.continue_:
        store = live.store
        session = store.latest(root) if args.continue_ or args.resume == "" else store.open(args.resume)
        with progress_bar("replaying the transcript") as report:  # shown only when there is no good checkpoint
            how = live.open(session, report, notice)
        print(f"session {session.meta.id}: {how}, {len(engine.tokens)} tokens", file=sys.stderr)
    else:
        live.start(root)

    app = MagnetarApp(agent, model.name, live)
    previous = signal.signal(signal.SIGTERM, lambda *_: app.exit())
    try:
        app.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        agent.interrupt()  # a turn still running stops at its next token, then the save sees a whole state
        live.save()
        print(f"session saved: {live.id} (magnetar --resume {live.id})", file=sys.stderr)
    return 0
