"""Rank 0 of a local pipeline, for tests/test_distributed.py (run as its own process: an MLX
ring is formed once per process). Through the Engine's door only: prefill a prompt in
chunks, pure logits of a prefix, then greedy decode steps; every logits row is saved.

    python tests/pipeline_driver.py MODEL OUT.npz [--ranks N --layers L] [--restore CK]
        [--save CK] [--kill-rank R --kill-at prefill|decode [--freeze --reply-timeout S]] [--detour]
        [--respan L] [--note OUT.txt]

Without --ranks it is the single-process reference. ``--respan`` moves the ranks to the
split L before anything runs (as ``--layers auto`` does after timing them); ``--note``
writes the split's note (what ``--layers auto`` chose) to a file. Errors end it like the CLI: one
line ``magnetar: error: ...`` on stderr and the error's exit code.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import numpy as np

from magnetar.runtime import Engine, MagnetarError

PROMPT, PURE, STEPS, CHUNK = 70, 40, 6, 32


def prompt_ids() -> list[int]:
    return [0] + np.random.default_rng(0).integers(2, 129280, PROMPT - 1).tolist()


def exercise(engine, restore: str | None = None, save: str | None = None, kill=lambda at: None,
             detour: bool = False) -> dict:
    """Prefill (or restore), pure logits, greedy steps, optionally save: every logits row.
    ``detour``: before the steps, a split engine's workers lose the live session (as a
    restarted worker would: they say so and rank 0 replays), then two tokens are sampled
    and rewound (rank 0 replays to the snapshot for the workers)."""
    rows = {}
    if restore:
        engine.restore(restore)
    else:
        engine.prefill(prompt_ids(), progress=lambda done, total: done == CHUNK and kill("prefill"))
        rows["pure"] = engine.logits(prompt_ids()[:PURE])
    if detour:
        if hasattr(engine.model, "link"):  # a split engine: tell the workers to drop the live session
            engine.model._drops.append(engine.model._sid(engine._live.state))
        snap = engine.snapshot()
        list(engine.generate(max_tokens=2, temperature=0, ignore_eos=True))
        engine.rewind(snap)
    steps = [engine.next_logits()]
    for i, _ in enumerate(engine.generate(max_tokens=STEPS, temperature=0, ignore_eos=True)):
        if i == 2:
            kill("decode")
        steps.append(engine.next_logits())  # runs the token just handed out: a decode step
    rows["steps"] = np.stack(steps)
    rows["tokens"] = np.asarray(engine.tokens)
    if save:
        engine.checkpoint(save)
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--ranks", type=int)
    p.add_argument("--layers", default="auto")
    p.add_argument("--restore")
    p.add_argument("--save")
    p.add_argument("--kill-rank", type=int)
    p.add_argument("--kill-at", choices=("prefill", "decode"))
    p.add_argument("--detour", action="store_true")
    p.add_argument("--freeze", action="store_true", help="stop the rank (SIGSTOP) instead of killing it")
    p.add_argument("--reply-timeout", type=float, default=300.0)
    p.add_argument("--respan")
    p.add_argument("--note")
    args = p.parse_args()
    engine = None
    try:
        if args.ranks:
            from magnetar.runtime.distributed import start_pipeline as start

            engine = start(args.model, ranks=args.ranks, layers=args.layers, ctx=256, prefill_chunk=CHUNK,
                           reply_timeout=args.reply_timeout)
            if args.respan:
                from magnetar.runtime.engine import on_engine_thread

                on_engine_thread(engine.model.respan, [tuple(map(int, s.split(":"))) for s in args.respan.split(",")])
            if args.note:
                with open(args.note, "w") as fh:
                    fh.write(engine.pipeline_note)
        else:
            engine = Engine.load(args.model, ctx=256, prefill_chunk=CHUNK)

        def kill(at: str) -> None:
            if args.kill_at == at:
                child = dict((r, c) for r, c, _ in engine.local_ranks.children)[args.kill_rank]
                os.kill(child.pid, signal.SIGSTOP if args.freeze else signal.SIGKILL)

        rows = exercise(engine, args.restore, args.save, kill, args.detour)
        np.savez(args.out, **rows)
        return 0
    except MagnetarError as err:
        print(f"magnetar: error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    finally:
        if engine is not None and hasattr(engine, "close"):
            engine.close()


if __name__ == "__main__":
    sys.exit(main())
