"""The lab's commands: make-model, convert, tokenize, inspect, imatrix, profile-experts, quality, bench."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from magnetar.console import engine_options, progress_bar, read_prompt

from ..engine import Engine
from ..errors import UsageError
from ..gguf_read import open_model
from ..limits import DEFAULT_CTX
from .summary import layer_ranges, streaming_split, summarize

RATIO_NAMES = {0: "sliding window only", 4: "CSA: ratio 4 + lightning indexer", 128: "HCA: ratio 128"}


def make_model(args: argparse.Namespace) -> int:
    from .make_model import make_model as build

    start = time.perf_counter()
    with progress_bar(f"writing {args.preset}/{args.recipe}") as report:
        path = build(args.preset, args.recipe, args.seed, args.output, progress=report)
    size = path.stat().st_size
    print(f"wrote {path} ({_bytes(size)}, {time.perf_counter() - start:.1f} s)")
    return 0


def convert(args: argparse.Namespace) -> int:
    from .convert import convert as run_convert
    from .imatrix import Imatrix

    imatrix = Imatrix.read(args.imatrix) if args.imatrix else None
    start = time.perf_counter()
    with progress_bar(f"converting to {args.recipe}") as report:
        path = run_convert(args.hf_dir, args.output, args.recipe, progress=report, imatrix=imatrix)
    print(f"wrote {path} ({_bytes(path.stat().st_size)}, {time.perf_counter() - start:.1f} s)")
    return 0


def tokenize(args: argparse.Namespace) -> int:
    from ..chat import Message, render

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
    model = open_model(args.model)
    s = summarize(model)
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
    if args.expert_cache is not None:
        _print_streaming(console, streaming_split(model, args.expert_cache, DEFAULT_CTX))
    return 0


def _print_streaming(console: Console, split) -> None:
    """``inspect --expert-cache``: what a cache of that size keeps in RAM and what it streams."""
    plan = split.plan
    slots, n_experts = next(iter(plan.slots.values())), next(iter(plan.stacks.values()))[0].n_experts
    if split.note:
        console.print(split.note, highlight=False)
    raised = " (raised to the minimum of one per layer)" if plan.raised else ""
    staged = f" + 2 whole layers for long prefills {_bytes(plan.staging_bytes)}" if plan.staged else ""
    console.print(f"expert cache {_bytes(split.budget)}: {slots} of {n_experts} experts per layer{raised}\n"
                  f"  resident {_bytes(split.resident_bytes)}: non-expert weights {_bytes(split.non_expert_bytes)} "
                  f"+ slot banks {_bytes(plan.bank_bytes)}{staged}\n"
                  f"  streamed from the file: routed experts {_bytes(split.routed_bytes)}, "
                  f"{100 * slots / n_experts:.1f}% of them in the cache at a time", highlight=False, soft_wrap=True)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def bench(args: argparse.Namespace) -> int:
    from . import bench as harness
    from . import bench_memory
    from .bench_peers import EnginePeer, parse_names
    from .peer_process import isolated_peers

    if args.mode == "kernels":
        return bench_kernels(args)
    if args.mode == "resume":
        return bench_resume(args)
    if args.mode == "distributed":
        return bench_distributed(args)
    if args.mode == "streaming":
        return bench_streaming(args)
    if args.mode == "blocks":
        return bench_blocks(args)
    if not args.model:
        raise UsageError(f"bench {args.mode} needs a model", "pass -m MODEL")
    if args.tokens < 1 or args.reps < 1 or args.prompt_tokens < 1:
        raise UsageError("--tokens, --reps and --prompt-tokens must be positive")
    mf = open_model(args.model)
    cfg = mf.config
    console = Console(stderr=True)
    if args.plot:
        harness.figure_class()  # a missing matplotlib fails before the benchmark, not after
    # Interleaved peers all stay resident: over free memory the timings measure paging (bench_memory.py).
    memory = bench_memory.plan(["magnetar", *parse_names(args.peers)], mf, available=args.memory_budget,
                               ctx=args.ctx, expert_cache=getattr(args, "expert_cache", None))
    warning = bench_memory.check(memory, strict=args.strict_memory)
    if warning:
        print(f"magnetar: {warning}", file=sys.stderr)
    peers = [EnginePeer(args.model, ctx=args.ctx, nodes=args.nodes, **engine_options(args))]
    peers += isolated_peers(args.peers, args.model, ctx=args.ctx,
                            progress=lambda name, s: console.print(f"[dim]built {name} in {s:.1f} s[/]",
                                                                   highlight=False))
    prompt = _bench_prompt(cfg.vocab_size, args.prompt_tokens)
    samples = harness.run(peers, args.mode, prompt, args.tokens, args.reps,
                          quiet_below=0.25 if args.wait_quiet else None)
    for s in samples:
        s.memory_bound = memory.over
    summary = harness.summarize(samples)
    print(harness.render_table(summary))
    peaks = {peers[0].name: bench_memory.peak_rss(), **{p.name: p.peak_rss for p in peers[1:]}}
    print(bench_memory.rss_line(peaks, memory))
    if args.csv:
        harness.write_csv(samples, args.csv)
    if args.plot:
        harness.write_plot(summary, args.plot)
    return 0


def _bench_prompt(vocab_size: int, n: int) -> list[int]:
    """BOS, then ids spread over the vocabulary (the same prompt in every bench mode)."""
    return [0] + [(7919 * i) % (vocab_size - 2) + 2 for i in range(1, n)]


def bench_kernels(args: argparse.Namespace) -> int:
    from magnetar.kernels.backend import BackendUnavailable
    from . import bench_kernels as kb

    if args.reps < 1 or args.experts < 6:
        raise UsageError("--reps must be positive and --experts at least 6")
    console = Console(stderr=True)
    try:
        cases = kb.run(args.recipe, args.backend, n_experts=args.experts, reps=args.reps,
                       prefill_tokens=args.prompt_tokens,
                       progress=lambda name: console.print(f"[dim]timing the {name} shape[/]", highlight=False))
    except (BackendUnavailable, ValueError) as err:
        raise UsageError(str(err)) from None
    print(kb.render(cases, args.recipe, args.backend))
    return 0


def bench_blocks(args: argparse.Namespace) -> int:
    from . import block_times as bt

    if not args.model:
        raise UsageError("bench blocks needs a model", "pass -m MODEL")
    if args.expert_cache is not None or args.hotlist:
        raise UsageError("bench blocks times experts held in memory", "drop --expert-cache and --hotlist")
    if args.tokens < 1 or args.reps < 1 or args.prompt_tokens < 1:
        raise UsageError("--tokens, --reps and --prompt-tokens must be positive")
    console = Console(stderr=True)
    engine = Engine.load(args.model, ctx=args.ctx, backend=args.backend, **engine_options(args))
    prompt = _bench_prompt(engine.config.vocab_size, args.prompt_tokens)
    result = bt.run(engine, prompt, args.tokens, args.reps, quiet=args.wait_quiet,
                    progress=lambda what: console.print(f"[dim]{what}[/]", highlight=False))
    print(bt.render(result, Path(args.model).name))
    if args.csv:
        bt.write_csv(result, args.csv)
    return 0


def bench_resume(args: argparse.Namespace) -> int:
    from . import bench_resume as br

    if not args.model:
        raise UsageError("bench resume needs a model", "pass -m MODEL")
    try:
        lengths = [int(v) for v in args.lengths.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--lengths must be comma-separated token counts, got {args.lengths!r}") from None
    if not lengths or min(lengths) < 1 or args.reps < 1:
        raise UsageError("--lengths needs positive token counts and --reps must be positive")
    console = Console(stderr=True)
    cases = br.run(args.model, lengths, args.reps,
                   progress=lambda what: console.print(f"[dim]{what}[/]", highlight=False), load=engine_options(args))
    print(br.render(cases, str(args.model)))
    return 0


def bench_distributed(args: argparse.Namespace) -> int:
    from . import bench_distributed as bd

    if not args.model:
        raise UsageError("bench distributed needs a model", "pass -m MODEL")
    try:
        lengths = [int(v) for v in args.lengths.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--lengths must be comma-separated token counts, got {args.lengths!r}") from None
    if not lengths or min(lengths) < 1 or args.reps < 1 or args.tokens < 1:
        raise UsageError("--lengths needs positive token counts; --reps and --tokens must be positive")
    console = Console(stderr=True)
    cases, note, calibration = bd.run(args.model, lengths, args.ranks, args.layers, args.tokens, args.reps,
                                      progress=lambda what: console.print(f"[dim]{what}[/]", highlight=False))
    print(bd.render(cases, args.ranks, note, args.model, calibration))
    return 0


def imatrix(args: argparse.Namespace) -> int:
    from .imatrix import Collector, write_dat
    from .prompt_file import read_prompts

    engine, prompts = _engine_and_prompts(args, read_prompts(args.prompts))
    start = time.perf_counter()
    collector = Collector(engine)
    with progress_bar("collecting") as report:
        collector.run(engine, prompts, progress=report)
    write_dat(args.output, collector.entries(), dataset=Path(args.prompts).name)
    print(f"wrote {args.output}: {len(prompts)} prompts, {collector.tokens} tokens, "
          f"{3 * engine.config.n_layer} expert tensors ({time.perf_counter() - start:.1f} s)")
    return 0


def profile_experts(args: argparse.Namespace) -> int:
    from ..expert_cache import format_hotlist
    from ..fileio import atomic_write_bytes
    from .profile_experts import RouteCounter
    from .prompt_file import read_prompts

    engine, prompts = _engine_and_prompts(args, read_prompts(args.prompts))
    start = time.perf_counter()
    counter = RouteCounter(engine)
    with progress_bar("profiling") as report:
        counter.run(engine, prompts, progress=report)
    text = format_hotlist(Path(args.model).name, counter.hits, counter.weights)
    atomic_write_bytes(args.output, text.encode())
    print(f"wrote {args.output}: {len(prompts)} prompts, {counter.tokens} tokens, {counter.picked} of "
          f"{engine.config.n_expert * len(counter.hits)} routed experts picked ({time.perf_counter() - start:.1f} s)")
    return 0


def _engine_and_prompts(args: argparse.Namespace, texts: list[str]) -> tuple[Engine, list[list[int]]]:
    """The engine for a prompt-file command, and each prompt as BOS + its tokens, cut at --max-tokens."""
    if args.max_tokens < 2:
        raise UsageError("--max-tokens must be at least 2")
    engine = Engine.load(args.model, ctx=max(args.ctx, args.max_tokens), **engine_options(args))
    tok = engine.tokenizer
    return engine, [([tok.bos_id] + tok.encode(t))[:args.max_tokens] for t in texts]


def quality(args: argparse.Namespace) -> int:
    from . import quality as q
    from .prompt_file import read_prompts

    prompts = read_prompts(args.prompts)
    with progress_bar("reference, then quantized") as report:
        result = q.run(args.model, args.ref, prompts, max_tokens=args.max_tokens, k=args.top_k, ctx=args.ctx,
                       progress=report)
    print(q.render(result))
    if args.json:
        q.write_json(args.json, result, prompts_file=str(args.prompts))
    return 0


def bench_streaming(args: argparse.Namespace) -> int:
    from . import bench_streaming as bs

    if not args.model:
        raise UsageError("bench streaming needs a model", "pass -m MODEL")
    try:
        shares = [float(v) / 100 for v in args.cache_shares.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--cache-shares must be comma-separated percentages, got {args.cache_shares!r}") from None
    if not shares or not all(0 < v <= 1 for v in shares) or args.tokens < 1:
        raise UsageError("--cache-shares must be percentages in (0, 100] and --tokens positive")
    console = Console(stderr=True)
    cases = bs.run(args.model, shares, zipf=args.zipf, prompt_tokens=args.prompt_tokens, tokens=args.tokens,
                   progress=lambda what: console.print(f"[dim]{what}[/]", highlight=False))
    print(bs.render(cases, str(args.model)))
    if args.csv:
        bs.write_csv(cases, args.csv)
    return 0
