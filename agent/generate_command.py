"""``magnetar generate``: chat-render a prompt and stream the model's answer."""

from __future__ import annotations

import argparse
import json
import sys
import time

from rich.console import Console

from magnetar.console import load_engine, progress_bar, read_prompt, streaming_summary
from magnetar.runtime import Message, UsageError, atomic_write_bytes


def generate(args: argparse.Namespace) -> int:
    if args.logprobs_top_k and not args.dump_logprobs:
        raise UsageError("--logprobs-top-k needs --dump-logprobs OUT.json")
    if args.max_tokens < 0:
        raise UsageError(f"-n must be >= 0, got {args.max_tokens}")
    engine = load_engine(args, args.model)
    if engine is None:  # a rank > 0 of --distributed: it served its layers until rank 0 stopped it
        return 0
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
        f"{st.generated_tokens} generated in {elapsed:.2f} s ({st.generated_tokens / elapsed if elapsed else 0:.2f} tok/s)"
        f"{'; ' + streaming_summary(st.streaming) if st.streaming else ''}[/]", highlight=False, soft_wrap=True)
    if args.dump_logprobs:
        dump = {"model": str(args.model), "prompt_tokens": ids, "steps": steps}
        atomic_write_bytes(args.dump_logprobs, json.dumps(dump, indent=1).encode())
    return 0
