"""Commands that run the model: ``generate`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
from rich.console import Console

from magnetar.runtime.chat import Message
from magnetar.runtime.engine import Engine
from magnetar.runtime.errors import UsageError
from magnetar.runtime.fileio import atomic_write_bytes

from .model_commands import progress_bar, read_prompt


def generate(args: argparse.Namespace) -> int:
    if args.logprobs_top_k and not args.dump_logprobs:
        raise UsageError("--logprobs-top-k needs --dump-logprobs OUT.json")
    if args.max_tokens < 0:
        raise UsageError(f"-n must be >= 0, got {args.max_tokens}")
    engine = Engine.load(args.model, ctx=args.ctx)
    messages = [Message(role="system", content=args.system)] if args.system else []
    messages.append(Message(role="user", content=read_prompt(args.prompt)))
    mode, notice = engine.think_mode(args.mode)
    if notice:
        print(f"magnetar: {notice}", file=sys.stderr)
    ids = engine.render(messages, mode=mode)
    with progress_bar("prefill") as report:
        engine.prefill(ids, progress=report)

    steps = []
    want = max(args.logprobs_top_k, 1) if args.dump_logprobs else 0
    tok = engine.tokenizer
    start = time.perf_counter()
    for ev in engine.generate(max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k,
                              top_p=args.top_p, min_p=args.min_p, seed=args.seed, logprobs=want):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        if want:
            steps.append({"token": ev.token, "text": tok.decode([ev.token]), "logprob": ev.logprob,
                          "top": [{"token": t, "text": tok.decode([t]), "logprob": lp}
                                  for t, lp in ev.top_logprobs]})
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    st = engine.stats
    Console(stderr=True).print(
        f"[dim]{len(ids)} prompt tokens at {st.prefill_tok_s:.1f} tok/s; "
        f"{st.generated_tokens} generated in {elapsed:.2f} s ({st.generated_tokens / elapsed if elapsed else 0:.2f} tok/s)[/]",
        highlight=False)
    if args.dump_logprobs:
        dump = {"model": str(args.model), "prompt_tokens": ids, "steps": steps}
        atomic_write_bytes(args.dump_logprobs, json.dumps(dump, indent=1).encode())
    return 0


class EnginePeer:
    """Our engine as a bench peer: greedy decode through ``Engine.generate``."""

    name = "magnetar"

    def __init__(self, path: str, ctx: int):
        self.engine = Engine.load(path, ctx=ctx)
        cfg = self.engine.config
        self.detail = (f"MLX {mx.__version__} ({mx.default_device()}), {cfg.n_layer} layers, d {cfg.d_model}, "
                       f"{self.engine.file.recipe} file, precision {self.engine.precision}")
        self._host: list[float] = []

    def prefill(self, ids: list[int]) -> None:
        self.engine.reset()
        self.engine.prefill(ids)

    def decode(self, n: int) -> list[float]:
        times, self._host = [], []
        stream = self.engine.generate(max_tokens=n, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        for _ in stream:
            t1 = time.perf_counter()
            times.append(t1 - t0)
            self._host.append(self.engine.stats.last_step_host_seconds)
            t0 = t1
        return times

    def extra(self) -> dict[str, float]:
        """Median host time per token: building and dispatching the step graph, and sampling."""
        return {"host_ms": 1e3 * sorted(self._host)[len(self._host) // 2]} if self._host else {}


def bench(args: argparse.Namespace) -> int:
    from magnetar.runtime import bench as harness
    from magnetar.runtime.bench_peers import make_peers
    from magnetar.runtime.gguf_read import open_model

    if args.mode == "kernels":
        return bench_kernels(args)
    if args.mode == "resume":
        return bench_resume(args)
    if not args.model:
        raise UsageError(f"bench {args.mode} needs a model", "pass -m MODEL")
    if args.tokens < 1 or args.reps < 1 or args.prompt_tokens < 1:
        raise UsageError("--tokens, --reps and --prompt-tokens must be positive")
    cfg = open_model(args.model).config
    console = Console(stderr=True)
    peers = [EnginePeer(args.model, ctx=args.ctx)]
    peers += make_peers(args.peers, args.model, cfg, ctx=args.ctx,
                        progress=lambda name, s: console.print(f"[dim]built {name} in {s:.1f} s[/]", highlight=False))
    prompt = [0] + [(7919 * i) % (cfg.vocab_size - 2) + 2 for i in range(1, args.prompt_tokens)]
    samples = harness.run(peers, args.mode, prompt, args.tokens, args.reps,
                          quiet_below=0.25 if args.wait_quiet else None)
    print(harness.render_table(harness.summarize(samples)))
    if args.csv:
        harness.write_csv(samples, args.csv)
    return 0


def bench_kernels(args: argparse.Namespace) -> int:
    from magnetar.kernels.backend import BackendUnavailable
    from magnetar.runtime import bench_kernels as kb

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


def bench_resume(args: argparse.Namespace) -> int:
    from magnetar.runtime import bench_resume as br

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
                   progress=lambda what: console.print(f"[dim]{what}[/]", highlight=False))
    print(br.render(cases, str(args.model)))
    return 0


def imatrix(args: argparse.Namespace) -> int:
    from magnetar.runtime.imatrix import Collector, write_dat
    from magnetar.runtime.prompt_file import read_prompts

    if args.max_tokens < 2:
        raise UsageError("--max-tokens must be at least 2")
    texts = read_prompts(args.prompts)
    engine = Engine.load(args.model, ctx=max(args.ctx, args.max_tokens))
    tok = engine.tokenizer
    prompts = [([tok.bos_id] + tok.encode(t))[:args.max_tokens] for t in texts]
    start = time.perf_counter()
    collector = Collector(engine)
    with progress_bar("collecting") as report:
        collector.run(engine, prompts, progress=report)
    write_dat(args.output, collector.entries(), dataset=Path(args.prompts).name)
    print(f"wrote {args.output}: {len(prompts)} prompts, {collector.tokens} tokens, "
          f"{3 * engine.config.n_layer} expert tensors ({time.perf_counter() - start:.1f} s)")
    return 0


def quality(args: argparse.Namespace) -> int:
    from magnetar.runtime import quality as q
    from magnetar.runtime.prompt_file import read_prompts

    prompts = read_prompts(args.prompts)
    with progress_bar("reference, then quantized") as report:
        result = q.run(args.model, args.ref, prompts, max_tokens=args.max_tokens, k=args.top_k, ctx=args.ctx,
                       progress=report)
    print(q.render(result))
    if args.json:
        q.write_json(args.json, result, prompts_file=str(args.prompts))
    return 0
