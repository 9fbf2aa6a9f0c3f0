"""Side-by-side speed of several engines, interleaved call by call.

This VM's speed drifts 10-30% an hour (docs/spec/peer-overhead.md), so absolute
milliseconds from separate runs do not compare. ``run`` therefore takes every
engine ("peer") in turn inside each repetition, rotating who goes first, and
``summarize`` reports each peer's median [min-max] over repetitions plus its
ratio to the first peer, computed per repetition (same minute, same machine
state) and then taken as the median.

The harness knows nothing about any engine; a peer is anything with
``name``, ``detail``, ``prefill(ids)`` and ``decode(n)`` (``Peer`` below).
``bench_peers`` builds the transformers, mlx-lm and llama.cpp peers; the
magnetar engine brings its own adapter. ``magnetar bench`` runs each of those
peers in a process of its own (``peer_process``): engines in one process
share thread runtimes (OpenMP) and slow each other down.

Modes:
* ``decode``: prefill the prompt (untimed), then time ``n_tokens`` greedy
  tokens one by one. ``ms_per_token`` is the median over those tokens,
  ``tok_s`` is ``n_tokens / seconds`` (the sum of the per-token times).
* ``prefill``: time ``prefill(prompt)`` from an empty state.
  ``tok_s = len(prompt) / seconds``.

Other processes matter more than drift: on a 2-core VM, one busy neighbour
makes 2-thread peers (torch, llama.cpp) 10-25x slower (every parallel region
waits for a descheduled thread), while mlx, mostly one thread, barely
notices. Each sample records ``other_cpu`` (cores used by other processes
while it ran), ``render_table`` warns when it was high, and ``run`` can wait
for a quiet machine before each call (``quiet_below``).
"""

from __future__ import annotations

import csv
import gc
import io
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from ..errors import UsageError
from ..fileio import atomic_writer

MODES = ("decode", "prefill")


@runtime_checkable
class Peer(Protocol):
    """One engine under test.

    ``prefill`` starts from an EMPTY state, processes all ``ids`` and blocks
    until done; afterwards the state is ready to continue. ``decode(n)``
    generates ``n`` greedy tokens continuing that state and returns the wall
    seconds of each token (argmax included). A peer may also define
    ``extra() -> dict[str, float]``: figures about the call that just ended
    (e.g. host overhead ms); they land in ``Sample.extra``.
    """

    name: str
    detail: str

    def prefill(self, ids: list[int]) -> None: ...

    def decode(self, n: int) -> list[float]: ...


@dataclass
class Sample:
    """One timed call of one peer in one repetition (rep < 0: warm-up)."""

    peer: str
    mode: str
    rep: int
    tokens: int  # prompt tokens (prefill) or generated tokens (decode)
    seconds: float  # prefill wall time, or the sum of the per-token times
    tok_s: float
    ms_per_token: float | None = None  # decode: median over the tokens
    detail: str = ""
    extra: dict[str, float] = field(default_factory=dict)
    token_ms: list[float] = field(default_factory=list, repr=False)  # decode: every token
    prompt_tokens: int = 0  # the prompt's length (decode: the context the tokens follow)
    other_cpu: float | None = None  # cores busy with OTHER processes during the timed call
    memory_bound: bool | None = None  # the peers' weights exceeded free memory (bench_memory.py); None: unchecked


Progress = Callable[[str, int, "Sample | None"], None]


def order_for(peers: Sequence[Any], rep: int) -> list[Any]:
    """The order of repetition ``rep``: rotated left by ``rep``; warm-ups (rep < 0) keep the given order."""
    if rep < 0 or not peers:
        return list(peers)
    k = rep % len(peers)
    return list(peers[k:]) + list(peers[:k])


def run(peers: Sequence[Peer], mode: str, prompt_ids: Sequence[int], n_tokens: int, reps: int,
        warmup: int = 1, progress: Progress | None = None, quiet_below: float | None = None,
        quiet_timeout: float = 300.0) -> list[Sample]:
    """Interleaved benchmark; returns the recorded samples (warm-ups excluded).

    ``progress(peer_name, rep, sample)`` is called before each call (sample
    None) and after it (the sample); warm-up rounds have rep -warmup..-1.
    ``quiet_below``: before each call, wait (up to ``quiet_timeout`` seconds)
    until other processes use fewer than that many cores (see ``CpuWatch``).
    """
    _check_args(peers, mode, prompt_ids, n_tokens, reps, warmup)
    ids = list(prompt_ids)
    samples: list[Sample] = []
    for rep in range(-warmup, reps):
        for peer in order_for(peers, rep):
            if progress:
                progress(peer.name, rep, None)
            if quiet_below is not None:
                wait_for_quiet(quiet_below, quiet_timeout)
            sample = _measure(peer, mode, ids, n_tokens, rep)
            if rep >= 0:
                samples.append(sample)
            if progress:
                progress(peer.name, rep, sample)
    return samples


def _check_args(peers: Sequence[Peer], mode: str, prompt_ids: Sequence[int], n_tokens: int,
                reps: int, warmup: int) -> None:
    if mode not in MODES:
        raise UsageError(f"unknown bench mode {mode!r}", f"choose one of {', '.join(MODES)}")
    if not peers:
        raise UsageError("no engines to benchmark", "name at least one peer")
    names = [p.name for p in peers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"peer names must be unique, got {', '.join(dupes)} twice")
    if not prompt_ids:
        raise UsageError("the benchmark prompt is empty", "use a prompt of at least one token")
    if reps < 1 or warmup < 0:
        raise UsageError(f"reps must be >= 1 and warmup >= 0, got {reps} and {warmup}")
    if mode == "decode" and n_tokens < 1:
        raise UsageError(f"decode needs at least one token, got {n_tokens}")


class CpuWatch:
    """How many cores other processes (and hypervisor steal) kept busy during a call.

    System-wide busy time from /proc/stat minus this process's CPU time, per
    wall second. On a 2-core VM one busy neighbour makes 2-thread peers
    (torch, llama.cpp) wait at every barrier and run up to 10-20x slower,
    while mostly single-threaded ones (mlx) barely notice; this figure tells
    such samples apart. None where /proc/stat is missing (macOS).
    """

    STAT = "/proc/stat"

    def __init__(self, pids: Sequence[int] = ()) -> None:
        """``pids``: child processes whose CPU time counts as ours (a peer in its own process)."""
        self._pids = tuple(pids)
        self._start: tuple[float, float, float] | None = None

    @classmethod
    def _busy(cls) -> float | None:
        try:
            with open(cls.STAT) as fh:
                fields = fh.readline().split()
        except OSError:
            return None
        if not fields or fields[0] != "cpu":
            return None
        v = [int(x) for x in fields[1:9]] + [0] * 8
        user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def _own(self) -> float:
        t = os.times()
        return t.user + t.system + sum(map(_process_cpu, self._pids))

    def start(self) -> None:
        busy = self._busy()
        self._start = None if busy is None else (time.perf_counter(), busy, self._own())

    def stop(self) -> float | None:
        busy = self._busy()
        if self._start is None or busy is None:
            return None
        t0, busy0, own0 = self._start
        wall = time.perf_counter() - t0
        if wall <= 0:
            return None
        return max(0.0, (busy - busy0 - (self._own() - own0)) / wall)


def _process_cpu(pid: int) -> float:
    """User + system seconds of a running process (0 where /proc is missing)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def wait_for_quiet(below: float, timeout: float, window: float = 0.5) -> float | None:
    """Sleep until other processes use fewer than ``below`` cores over ``window`` seconds.

    Returns the last reading (None where it cannot be measured); gives up
    after ``timeout`` seconds and returns the busy reading.
    """
    deadline = time.monotonic() + timeout
    watch = CpuWatch()
    while True:
        watch.start()
        time.sleep(window)
        busy = watch.stop()
        if busy is None or busy < below or time.monotonic() >= deadline:
            return busy


def _measure(peer: Peer, mode: str, ids: list[int], n_tokens: int, rep: int) -> Sample:
    gc.collect()  # the previous peer's garbage is not this peer's time
    watch = CpuWatch([peer.pid] if isinstance(getattr(peer, "pid", None), int) else [])
    if mode == "prefill":
        watch.start()
        t0 = time.perf_counter()
        peer.prefill(ids)
        seconds = time.perf_counter() - t0
        sample = Sample(peer.name, mode, rep, len(ids), seconds, len(ids) / seconds,
                        detail=peer.detail, prompt_tokens=len(ids))
    else:
        peer.prefill(ids)
        watch.start()
        times = [float(t) for t in peer.decode(n_tokens)]
        if len(times) != n_tokens or any(t <= 0 for t in times):
            raise RuntimeError(f"peer {peer.name} returned {len(times)} token times for {n_tokens} "
                               f"tokens (all must be positive)")
        seconds = sum(times)
        sample = Sample(peer.name, mode, rep, n_tokens, seconds, n_tokens / seconds,
                        ms_per_token=statistics.median(times) * 1e3, detail=peer.detail,
                        token_ms=[t * 1e3 for t in times], prompt_tokens=len(ids))
    sample.other_cpu = watch.stop()
    extra = getattr(peer, "extra", None)
    if callable(extra):
        sample.extra = {k: float(v) for k, v in (extra() or {}).items()}
    return sample


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """Per peer (first-seen order; the first is the base):

    ``{"peer", "detail", "mode", "reps", "tokens", "prompt_tokens", "tok_s": {median,min,max},
    "seconds": {...}, "ms_per_token": {...} (decode), "ratio_tok_s": {...},
    "ratio_ms_per_token": {...} (decode), "extra": {key: median},
    "other_cpu_max": the most cores other processes used during one call,
    "memory_bound": whether any of its samples was}``.
    A ratio is this peer's value divided by the base peer's value in the same
    repetition, summarized over the repetitions both have; the base gets 1.0.
    ``ms_per_token`` > 1 means slower than the base, ``tok_s`` > 1 faster.
    """
    by_peer: dict[str, list[Sample]] = {}
    for s in samples:
        by_peer.setdefault(s.peer, []).append(s)
    if not by_peer:
        return []
    modes = {s.mode for s in samples}
    if len(modes) != 1:
        raise ValueError(f"summarize one mode at a time, got {sorted(modes)}")
    base = {s.rep: s for s in next(iter(by_peer.values()))}
    out = []
    for name, rows in by_peer.items():
        rows = sorted(rows, key=lambda s: s.rep)
        entry: dict[str, Any] = {
            "peer": name, "detail": rows[0].detail, "mode": rows[0].mode, "reps": len(rows),
            "tokens": rows[0].tokens, "prompt_tokens": rows[0].prompt_tokens,
            "tok_s": _spread([s.tok_s for s in rows]),
            "seconds": _spread([s.seconds for s in rows]),
        }
        metrics = ["tok_s"]
        if rows[0].mode == "decode":
            entry["ms_per_token"] = _spread([s.ms_per_token for s in rows])
            metrics.append("ms_per_token")
        for metric in metrics:
            ratios = [getattr(s, metric) / getattr(base[s.rep], metric)
                      for s in rows if s.rep in base]
            entry[f"ratio_{metric}"] = _spread(ratios) if ratios else None
        others = [s.other_cpu for s in rows if s.other_cpu is not None]
        entry["other_cpu_max"] = max(others) if others else None
        entry["memory_bound"] = any(s.memory_bound for s in rows)
        keys = sorted({k for s in rows for k in s.extra})
        entry["extra"] = {k: statistics.median([s.extra[k] for s in rows if k in s.extra]) for k in keys}
        out.append(entry)
    return out


def _fmt(spread: dict[str, float] | None, digits: int) -> str:
    if spread is None:
        return "-"
    return (f"{spread['median']:.{digits}f} [{spread['min']:.{digits}f}-"
            f"{spread['max']:.{digits}f}]")


def _ratio(spread: dict[str, float] | None) -> str:
    return "-" if spread is None else f"{spread['median']:.2f}x"


def table_rows(summary: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the report table (shared by the rich and plain renderings)."""
    if not summary:
        return [], []
    decode = summary[0]["mode"] == "decode"
    base = summary[0]["peer"]
    if decode:
        header = ["peer", "ms/token", f"vs {base}", "tok/s", f"vs {base}", "extra"]
    else:
        header = ["peer", "seconds", "tok/s", f"vs {base}", "extra"]
    rows = []
    for e in summary:
        extra = ", ".join(f"{k} {v:.0f}" if abs(v) >= 100 else f"{k} {v:.3g}" for k, v in e["extra"].items())
        if decode:
            rows.append([e["peer"], _fmt(e["ms_per_token"], 1), _ratio(e["ratio_ms_per_token"]),
                         _fmt(e["tok_s"], 2), _ratio(e["ratio_tok_s"]), extra])
        else:
            rows.append([e["peer"], _fmt(e["seconds"], 3), _fmt(e["tok_s"], 1),
                         _ratio(e["ratio_tok_s"]), extra])
    if not any(r[header.index("extra")] for r in rows):
        i = header.index("extra")
        header.pop(i)
        for r in rows:
            r.pop(i)
    return header, rows


def _title(summary: Sequence[dict[str, Any]]) -> str:
    e = summary[0]
    what = (f"{e['tokens']} tokens after a {e['prompt_tokens']}-token prompt"
            if e["mode"] == "decode" else f"a {e['tokens']}-token prompt")
    return f"{e['mode']} {what}: median [min-max] of {e['reps']} interleaved reps"


def render_table(summary: Sequence[dict[str, Any]], rich: bool = True, width: int = 120) -> str:
    """The summary as a text table, then one ``peer: detail`` line per peer.

    ``rich=False`` gives plain aligned columns (no box drawing).
    """
    header, rows = table_rows(summary)
    if not rows:
        return "(no samples)"
    if rich:
        try:
            from rich.console import Console
            from rich.table import Table
            from rich.text import Text
        except ImportError:  # pragma: no cover - rich is a dependency
            rich = False
    if rich:
        table = Table(title=Text(_title(summary)))  # Text: "[min-max]" is not markup
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 or h == "extra" else "right",
                             overflow="fold")
        for r in rows:
            table.add_row(*(Text(c) for c in r))
        buf = io.StringIO()
        Console(file=buf, width=width, force_terminal=False, color_system=None).print(table)
        lines = [buf.getvalue().rstrip("\n")]
    else:
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
        lines = [_title(summary), "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"{e['peer']}: {e['detail']}" for e in summary if e["detail"]]
    worst = max((e["other_cpu_max"] for e in summary if e.get("other_cpu_max") is not None),
                default=None)
    if worst is not None and worst >= BUSY_WARNING:
        lines.append(f"warning: other processes kept {worst:.1f} of {os.cpu_count()} cores busy "
                     "during some calls; multi-threaded peers suffer most (other_cpu in the CSV)")
    if any(e.get("memory_bound") for e in summary):
        lines.append("warning: MEMORY-BOUND: the peers' weights together exceeded the memory available "
                     "before the run; these timings may measure paging, not the engines (memory_bound in the CSV)")
    return "\n".join(lines)


CSV_FIELDS = ["peer", "mode", "rep", "prompt_tokens", "tokens", "seconds", "tok_s", "ms_per_token",
              "other_cpu", "memory_bound", "detail"]
BUSY_WARNING = 0.25  # cores used by other processes that make render_table warn


def write_csv(samples: Sequence[Sample], path: str | os.PathLike) -> None:
    """One row per sample (extra figures as ``extra.<key>`` columns), written atomically."""
    extra_keys = sorted({k for s in samples for k in s.extra})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS + [f"extra.{k}" for k in extra_keys])
    for s in samples:
        writer.writerow([s.peer, s.mode, s.rep, s.prompt_tokens, s.tokens, repr(s.seconds), repr(s.tok_s),
                         "" if s.ms_per_token is None else repr(s.ms_per_token),
                         "" if s.other_cpu is None else f"{s.other_cpu:.3f}",
                         "" if s.memory_bound is None else int(s.memory_bound), s.detail]
                        + [repr(s.extra[k]) if k in s.extra else "" for k in extra_keys])
    with atomic_writer(path) as fh:
        fh.write(buf.getvalue().encode("utf-8"))


def figure_class() -> type:
    """matplotlib's Figure (no pyplot, so no display backend), or a one-line UsageError."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not importable",
                         "pip install matplotlib (or pip install -e '.[dev]')") from None
    return Figure


def write_plot(summary: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """A bar chart of each peer's median tok/s (whiskers: min-max over reps, label: ratio to
    the first peer) as a PNG, written atomically. Needs matplotlib (imported here only)."""
    Figure = figure_class()
    if not summary:
        raise UsageError("nothing to plot: the benchmark recorded no samples")
    names = [e["peer"] for e in summary]
    med = [e["tok_s"]["median"] for e in summary]
    low = [m - e["tok_s"]["min"] for m, e in zip(med, summary)]
    high = [e["tok_s"]["max"] - m for m, e in zip(med, summary)]
    fig = Figure(figsize=(max(4.0, 1.4 * len(names) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(names, med, yerr=[low, high], capsize=4, color="#4c72b0")
    ax.bar_label(bars, labels=[_ratio(e["ratio_tok_s"]) for e in summary], padding=3)
    ax.set_ylabel("tokens/s (median, min-max)")
    ax.set_title(_title(summary).replace(": ", ":\n", 1), fontsize=9)
    ax.margins(y=0.15)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    with atomic_writer(path) as fh:
        fh.write(buf.getvalue())
