"""Terminal helpers every room's commands share: a progress bar on stderr and
``@FILE`` prompt arguments. No room's logic lives here."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from magnetar.runtime.errors import UsageError


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    console = Console(stderr=True)
    if not console.is_terminal:  # logs and pipes get the final line only
        yield lambda done, total: None
        return
    with Progress(TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def read_prompt(value: str) -> str:
    if not value.startswith("@"):
        return value
    path = Path(value[1:])
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as err:
        raise UsageError(f"cannot read prompt file {path}: {err.strerror}") from None


def engine_options(args) -> dict:
    """``Engine.load`` keywords from the flags every model-loading command has
    (``--expert-cache``, ``--hotlist``, ``--expert-act``); how the cache was sized goes to stderr."""
    return {"expert_cache": getattr(args, "expert_cache", None), "hotlist": getattr(args, "hotlist", None),
            "expert_activations": getattr(args, "expert_act", None), "notice": notice}


def notice(line: str) -> None:
    """A runtime notice (how the cache was sized, a resumed session's warning) on stderr."""
    print(f"magnetar: {line}", file=sys.stderr)


def load_engine(args, model):
    """The command's engine: ``Engine.load``, or with ``--ranks N`` / ``--distributed HOSTFILE``
    rank 0's end of a layer split (runtime/distributed.py; it stops the other ranks when this
    process exits). On another rank of a split this serves its layers until rank 0 stops it
    and returns None: the command then simply ends."""
    from magnetar.runtime import Engine, start_pipeline

    ranks, hostfile = getattr(args, "ranks", None), getattr(args, "distributed", None)
    layers = getattr(args, "layers", "auto")
    if ranks is None and hostfile is None:
        if layers != "auto":
            raise UsageError("--layers needs --ranks N or --distributed HOSTFILE")
        return Engine.load(model, ctx=args.ctx, **engine_options(args))
    if getattr(args, "hotlist", None):
        raise UsageError("--hotlist is not available with a layer split yet", "drop --hotlist")
    engine = start_pipeline(model, ranks=ranks, hostfile=hostfile, layers=layers, ctx=args.ctx,
                            expert_cache=getattr(args, "expert_cache", None),
                            expert_activations=getattr(args, "expert_act", None))
    if engine is not None:
        print(f"magnetar: {engine.pipeline_note}", file=sys.stderr)
        if engine.expert_cache_note:
            print(f"magnetar: {engine.expert_cache_note}", file=sys.stderr)
    return engine


def streaming_summary(stream) -> str:
    """An engine's ``stats.streaming`` (routed experts read from the file) in a few words:
    how often a needed expert was already in the cache, what was read, and how fast."""
    read = stream.bytes_read
    size = f"{read / 2**30:.2f} GiB" if read >= 2**30 else f"{read / 2**20:.1f} MiB"
    return f"experts {stream.hit_rate:.0%} hit, {size} read at {stream.read_gb_s:.2f} GB/s"
