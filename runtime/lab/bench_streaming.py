"""``magnetar bench streaming``: decode speed with the routed experts streamed from
the file through caches of several sizes, against the engine that holds them all.

Each case runs in a process of its own: it drops the file's pages from the OS
cache (``POSIX_FADV_DONTNEED``, clean pages only: no root needed), loads an
engine, prefills the prompt and times greedy decode tokens. Routing is the model's own, or Zipf(s)-distributed
over each layer's experts, forced through the cache's route hook (docs/spec/
streaming-distributed.md §9: real routing is skewed; random test weights are not).
The resident engine's speed does not depend on which experts run (the same count
of the same size per token), so it is the baseline of both. The disk's own speed
is measured the way the cache reads: expert-sized positional reads from a pool
of threads, at random offsets, cold.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Callable

import numpy as np

from magnetar.runtime.engine import Engine
from magnetar.runtime.errors import UsageError
from magnetar.runtime.expert_cache import READ_THREADS, ExpertFile, ExpertStack, routed_tensors
from magnetar.runtime.fileio import atomic_write_bytes
from magnetar.runtime.gguf_read import open_model

from .bench_resume import drop_page_cache


@dataclass
class Case:
    routing: str  # "model" or "zipf-1.1"
    cache_share: float  # of the routed experts' bytes; 0 = resident (the baseline)
    tok_s: float
    ratio: float  # tok/s against the resident engine (the mean of its runs before and after)
    hit_rate: float  # during the timed decode
    mb_per_token: float  # read from the file per decoded token
    read_gb_s: float  # the cache's reads, wall time while waited on
    disk_gb_s: float  # preadv from a thread pool on the same file, cold
    read_share: float = 0.0  # of the decode's wall time, reads in flight: the most a perfect prefetch could hide


def disk_bandwidth(path, n_reads: int = 96, seed: int = 0) -> float:
    """GB/s of cold expert-sized reads at random (layer, expert, matrix) offsets, READ_THREADS at once."""
    mf = open_model(path)
    stacks = [ExpertStack.of(i) for infos in routed_tensors(mf, range(mf.config.n_layer)).values() for i in infos]
    rng = random.Random(seed)
    picks = [(s, rng.randrange(s.n_experts)) for s in rng.choices(stacks, k=n_reads)]
    buffers = [bytearray(s.expert_bytes) for s, _ in picks]
    drop_page_cache(path)
    reader = ExpertFile(path)
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(READ_THREADS) as pool:
            list(pool.map(lambda i: reader.read_into(memoryview(buffers[i]), picks[i][0].offset
                                                     + picks[i][1] * picks[i][0].expert_bytes), range(n_reads)))
        seconds = time.perf_counter() - t0
    finally:
        reader.close()
    return sum(len(b) for b in buffers) / seconds / 1e9


def zipf_routing(n_experts: int, s: float, seed: int = 0) -> Callable[[int, np.ndarray], np.ndarray]:
    """A route hook: each token's k distinct experts drawn with P(rank r) ~ r^-s, ranks shuffled per layer."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_experts + 1) ** s
    p /= p.sum()
    ranks: dict[int, np.ndarray] = {}

    def hook(layer: int, ids: np.ndarray) -> np.ndarray:
        order = ranks.setdefault(layer, np.random.default_rng(seed + 1 + layer).permutation(n_experts))
        rows = [order[rng.choice(n_experts, size=ids.shape[1], replace=False, p=p)] for _ in range(ids.shape[0])]
        return np.asarray(rows, dtype=ids.dtype)

    return hook


def _decode(engine: Engine, prompt: list[int], tokens: int) -> tuple[float, dict]:
    engine.prefill(prompt)
    stats = engine.stats.streaming
    before = dict(vars(stats)) if stats else {}
    t0 = time.perf_counter()
    for _ in engine.generate(max_tokens=tokens, temperature=0, ignore_eos=True):
        pass
    seconds = time.perf_counter() - t0
    after = dict(vars(stats)) if stats else {}
    return tokens / seconds, {k: after[k] - before.get(k, 0) for k in after}


def measure(model: str, routing: str, share: float, zipf: float, prompt_tokens: int, tokens: int) -> dict:
    """One case in this process, page cache dropped first: decode tok/s and the cache's counters
    over the timed tokens (share 0: the resident engine)."""
    mf = open_model(model)
    cfg = mf.config
    prompt = [0] + [(7919 * i) % (cfg.vocab_size - 2) + 2 for i in range(1, prompt_tokens)]
    routed = sum(i.nbytes for infos in routed_tensors(mf, range(cfg.n_layer)).values() for i in infos)
    drop_page_cache(model)
    engine = Engine.load(model, ctx=prompt_tokens + tokens + 8,
                         expert_cache=max(int(share * routed), 1) if share else None)
    if routing != "model":
        engine.model.experts.route_hook = zipf_routing(cfg.n_expert, zipf)
    tok_s, delta = _decode(engine, prompt, tokens)
    return {"tok_s": tok_s, **delta}


def run(model, shares=(0.1, 0.25, 0.5, 1.0), zipf: float = 1.1, prompt_tokens: int = 32, tokens: int = 8,
        progress: Callable[[str], None] = lambda what: None) -> list[Case]:
    """Every case in a process of its own: memory and the OS cache start clean, and an engine's
    buffers (a resident Flash-width model holds every expert) do not stay behind for the next."""
    progress("measuring the disk: cold expert-sized preadv from a thread pool")
    disk = disk_bandwidth(model)

    def case(routing: str, share: float) -> dict:
        progress(f"{routing} routing, " + (f"cache {share:.0%} of the routed experts" if share else "resident"))
        args = json.dumps([os.fspath(model), routing, share, zipf, prompt_tokens, tokens])
        run = subprocess.run([sys.executable, "-m", "magnetar.runtime.lab.bench_streaming", args],
                             capture_output=True, text=True)
        if run.returncode:
            tail = (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1]
            raise UsageError(f"bench streaming: the {routing} case at {share:.0%} failed: {tail}")
        return json.loads(run.stdout.strip().splitlines()[-1])

    first = case("model", 0.0)["tok_s"]
    runs = [(routing, share, case(routing, share)) for routing in ("model", f"zipf-{zipf:g}") for share in shares]
    last = case("model", 0.0)["tok_s"]  # the baseline again at the end: the machine may have changed
    base = (first + last) / 2
    cases = [Case("model", 0.0, first, first / base, 1.0, 0.0, 0.0, disk),
             Case("model", 0.0, last, last / base, 1.0, 0.0, 0.0, disk)]
    for routing, share, got in runs:
        uses, secs = got["uses"], got["read_seconds"]
        cases.append(Case(routing, share, got["tok_s"], got["tok_s"] / base, got["hits"] / uses if uses else 0.0,
                          got["bytes_read"] / tokens / 1e6, got["bytes_read"] / secs / 1e9 if secs else 0.0, disk,
                          secs * got["tok_s"] / tokens))
    return cases


def render(cases: list[Case], model: str) -> str:
    lines = [f"bench streaming  {model}  (decode, page cache dropped before each case)",
             f"{'routing':<10} {'cache':>6} {'tok/s':>8} {'vs resident':>11} {'hit rate':>8} "
             f"{'MB/token':>9} {'read GB/s':>9} {'of disk':>7} {'reading':>7}"]
    for c in cases:
        share = "all" if c.cache_share == 0 else f"{c.cache_share:.0%}"
        of_disk = f"{c.read_gb_s / c.disk_gb_s:.0%}" if c.read_gb_s and c.disk_gb_s else "-"
        lines.append(f"{c.routing if c.cache_share else 'resident':<10} {share:>6} {c.tok_s:>8.3f} {c.ratio:>10.2f}x "
                     f"{c.hit_rate:>8.1%} {c.mb_per_token:>9.1f} {c.read_gb_s:>9.2f} {of_disk:>7} "
                     f"{c.read_share:>7.0%}")
    lines.append(f"disk: {cases[0].disk_gb_s:.2f} GB/s (cold expert-sized preadv, {READ_THREADS} threads); "
                 "reading: share of the decode's time with reads in flight, the most that reading the next "
                 "layer's experts ahead could save")
    return "\n".join(lines)


def write_csv(cases: list[Case], path) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[f.name for f in fields(Case)])
    writer.writeheader()
    writer.writerows(asdict(c) for c in cases)
    atomic_write_bytes(path, out.getvalue().encode())


if __name__ == "__main__":  # one case, for run(): JSON arguments in, one JSON line out
    print(json.dumps(measure(*json.loads(sys.argv[1]))))
