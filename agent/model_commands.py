"""Model-file commands: make-model, convert, tokenize, inspect."""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from magnetar.runtime.errors import UsageError
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.summary import layer_ranges, summarize

RATIO_NAMES = {0: "sliding window only", 4: "CSA: ratio 4 + lightning indexer", 128: "HCA: ratio 128"}


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


def make_model(args: argparse.Namespace) -> int:
    from magnetar.runtime.make_model import make_model as build

    start = time.perf_counter()
    with progress_bar(f"writing {args.preset}/{args.recipe}") as report:
        path = build(args.preset, args.recipe, args.seed, args.output, progress=report)
    size = path.stat().st_size
    print(f"wrote {path} ({_bytes(size)}, {time.perf_counter() - start:.1f} s)")
    return 0


def convert(args: argparse.Namespace) -> int:
    from magnetar.runtime.convert import convert as run_convert
    from magnetar.runtime.imatrix import Imatrix

    imatrix = Imatrix.read(args.imatrix) if args.imatrix else None
    start = time.perf_counter()
    with progress_bar(f"converting to {args.recipe}") as report:
        path = run_convert(args.hf_dir, args.output, args.recipe, progress=report, imatrix=imatrix)
    print(f"wrote {path} ({_bytes(path.stat().st_size)}, {time.perf_counter() - start:.1f} s)")
    return 0


def read_prompt(value: str) -> str:
    if not value.startswith("@"):
        return value
    path = Path(value[1:])
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as err:
        raise UsageError(f"cannot read prompt file {path}: {err.strerror}") from None


def tokenize(args: argparse.Namespace) -> int:
    from magnetar.runtime.chat import Message, render

    tok = open_model(args.model).tokenizer
    text = read_prompt(args.prompt)
    if args.chat:
        messages = [Message(role="system", content=args.system)] if args.system else []
        messages.append(Message(role="user", content=text))
        ids = tok.encode_pieces(render(messages, mode=args.mode).pieces)
    else:
        if args.system is not None:
            raise UsageError("--system only applies with --chat")
        ids = tok.encode(text)
    print(" ".join(map(str, ids)))
    print(f"{len(ids)} tokens")
    return 0


def inspect(args: argparse.Namespace) -> int:
    s = summarize(open_model(args.model))
    cfg = s.config
    console = Console()
    console.print(f"[bold]{s.name}[/bold]  architecture [cyan]{s.architecture}[/cyan]  "
                  f"recipe [cyan]{s.recipe}[/cyan]  {_bytes(s.file_bytes)} on disk, "
                  f"{s.n_tensors} tensors")
    console.print(
        f"{cfg.n_layer} layers, hidden {cfg.d_model}, {cfg.n_head} heads x {cfg.head_dim} "
        f"(RoPE {cfg.rope_dim}), q_lora {cfg.q_lora_rank}, output {cfg.o_groups} groups x "
        f"{cfg.o_lora_rank}, vocab {cfg.vocab_size}")
    console.print(
        f"experts {cfg.n_expert} x {cfg.expert_ffn} (top {cfg.n_expert_used}, "
        f"{cfg.n_expert_shared} shared, scale {cfg.expert_weights_scale:g}), hash-routed layers "
        f"0-{cfg.hash_layers - 1}, window {cfg.window}, indexer {cfg.indexer_heads} x "
        f"{cfg.indexer_dim} top {cfg.indexer_top_k}, HC {cfg.hc} streams")

    sched = Table(title="Layer schedule", title_justify="left")
    sched.add_column("layers")
    sched.add_column("attention")
    for ratio, layers in s.schedule.items():
        sched.add_row(layer_ranges(layers), RATIO_NAMES[ratio])
    console.print(sched)

    quant = Table(title="Weights by group", title_justify="left")
    quant.add_column("group")
    quant.add_column("types")
    quant.add_column("bytes", justify="right")
    quant.add_column("share", justify="right")
    for g in sorted(s.groups, key=lambda g: -g.nbytes):
        types = ", ".join(f"{t} {_bytes(b)}" if len(g.types) > 1 else t for t, b in g.types.items())
        quant.add_row(g.name, types, _bytes(g.nbytes), f"{100 * g.nbytes / s.tensor_bytes:.1f}%")
    quant.add_row("[bold]total[/bold]", "", f"[bold]{_bytes(s.tensor_bytes)}[/bold]", "100%")
    console.print(quant)

    per_token = s.kv_elems_per_token
    console.print(
        f"KV cache: {per_token * 2:,.0f} B/token as f16 ({per_token * 4:,.0f} B/token in ds4's f32 "
        f"layout) + a fixed raw window of {_bytes(s.raw_window_elems * 2)} (f16); "
        f"at {cfg.context_length:,} tokens ~{_bytes(per_token * 2 * cfg.context_length)}")
    return 0


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError
