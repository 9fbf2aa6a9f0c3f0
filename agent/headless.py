"""``magnetar run -p TEXT``: one task to completion without a UI.

Prints the final answer (or, with ``--json``, one JSON object per loop event),
saves the run as a session like the TUI does (``magnetar --resume ID`` continues
it; the id goes to stderr and into the ``--json`` TurnEnd event), and exits 0
when the model answered, 1 when the turn ended otherwise (step cap, repeat
guard, malformed calls, full context, interrupt). Nothing asks: in
``ask`` mode every write, command and commit is refused, so headless runs
use ``read-only`` (the default here), ``auto-edit`` or ``yolo``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from magnetar.console import load_engine
from magnetar.prompts import load
from magnetar.runtime import PrefixCache
from magnetar.tools.base import ToolContext

from .loop import Agent, LoopSettings, Text, TurnEnd
from .models import data_dir, resolve_model
from .sandbox_command import tool_options
from .sessions import LiveSession, SessionStore, json_utf8
from .toolset import project_root, standard_tools, with_project_instructions


def event_json(event, **extra) -> str:
    body = {**dataclasses.asdict(event), **extra}
    return json_utf8({"type": type(event).__name__, **body}, default=str)


def run(args) -> int:
    model = resolve_model(args.model)
    engine = load_engine(args, model)
    if engine is None:  # a rank > 0 of --distributed: it served its layers until rank 0 stopped it
        return 0
    root = project_root(Path(args.cwd or "."))
    ctx = ToolContext(root=root, permissions=args.mode, confirm=None, data_dir=data_dir(), **tool_options(args))
    settings = LoopSettings(thinking=args.think_mode, max_steps=args.max_steps, max_tokens_per_step=args.max_tokens,
                            seed=args.seed, temperature=args.temp)
    cache = PrefixCache(data_dir() / "kvcache")
    engine.attach_cache(cache)
    agent = Agent(engine, standard_tools(), ctx, load("system"), settings)
    live = LiveSession(SessionStore(data_dir() / "sessions"), agent, model.name)
    live.start(root)
    end = None
    for event in agent.turn(with_project_instructions(root, args.prompt)):
        extra = {}
        if isinstance(event, TurnEnd):
            end = event
            live.save()  # before the event goes out: whoever reads it can resume at once
            extra["session"] = live.id
        if args.json:
            print(event_json(event, **extra), flush=True)
        elif isinstance(event, Text) and args.stream:
            print(event.text, end="", flush=True)
    if not args.json:
        if not args.stream:
            print(end.answer)
        else:
            print()
        if end.reason != "answered":
            print(f"magnetar: the task ended without an answer ({end.reason})", file=sys.stderr)
    print(f"magnetar: session saved: {live.id} (magnetar --resume {live.id})", file=sys.stderr)
    cache.save(engine, "shutdown")
    return 0 if end.reason == "answered" else 1
