"""``--layers auto``: a layer split balanced by measured time (issue 19; spec §10.2 item 1).

The ranks start on the split by weight bytes (pipeline.balanced_spans over
pipeline.layer_costs). Then each rank times its own layers on a short real workload:
prefill chunks of a few tokens sent round the ring one at a time, so no two ranks
compute at once, each layer's wall time taken on the rank that holds it (prefill
evaluates layer by layer), best of a few passes; and a few decode steps, timed per
rank (a decode step is one compiled graph per span).

The time model: layer l on rank r takes ``w_l * s_r``. ``s_r``, rank r's seconds per
weight byte, comes from its measured layer times over its layers' bytes; ``w_l``, layer
l's work in byte-equivalents, is its measured time over the speed of the rank that ran
it. So the measured shape of the layers is kept (attention and routing do not cost in
proportion to bytes), and bytes only relate the ranks' speeds: on equal machines the
``s_r`` come out about equal, on mixed ones a slower rank gets fewer layers. What
follows the last layer (the head for one token per chunk) moves with the last layer.

It balances prefill-chunk time: that is what pipelining overlaps (rank 0 runs chunk
k+1 while the others run chunk k, so the slowest rank sets the pace). A single
sequence's decode goes round the ranks one after another, so its time is the sum over
ranks whatever the split; the decode times are measured only to be shown.
"""

from __future__ import annotations

from dataclasses import dataclass

from .pipeline import balanced_spans

CHUNK_TOKENS = 128  # calibration prefill chunk (less with a smaller --ctx or prefill chunk)
PASSES = 4  # timed chunks per rank, after one untimed (first-touch pages, compiled kernels)
DECODE_STEPS = 3  # timed decode steps, after one untimed (the compile of the decode step)
MARGIN = 0.05  # re-span only when the model predicts a bottleneck this much shorter: timing noise


def speed_factors(layer_seconds: list[list[float]], spans: list[tuple[int, int]],
                  layer_bytes: list[float]) -> list[float]:
    """Each rank's seconds per weight byte: its layers' measured time over their bytes."""
    return [sum(t) / sum(layer_bytes[a:b]) for t, (a, b) in zip(layer_seconds, spans)]


def layer_work(layer_seconds: list[list[float]], tail_seconds: float, speeds: list[float]) -> list[float]:
    """Each layer's work in byte-equivalents: its time over its rank's speed; the last rank's
    ``tail_seconds`` (the head) is added to the last layer."""
    work = [t / s for times, s in zip(layer_seconds, speeds) for t in times]
    work[-1] += tail_seconds / speeds[-1]
    return work


def time_balanced(layer_seconds: list[list[float]], tail_seconds: float, spans: list[tuple[int, int]],
                  layer_bytes: list[float]) -> tuple[list[tuple[int, int]], list[float]]:
    """The contiguous split that minimizes the slowest rank's predicted chunk time, and those
    times per rank. ``layer_seconds[r]``: rank r's measured seconds per layer of ``spans[r]``."""
    speeds = speed_factors(layer_seconds, spans, layer_bytes)  # time(l on r) = w_l * s_r
    work = layer_work(layer_seconds, tail_seconds, speeds)
    best = balanced_spans(work, len(spans), speeds)
    return best, [s * sum(work[a:b]) for s, (a, b) in zip(speeds, best)]


@dataclass
class Measured:
    """One calibration on one split: per rank, the prefill chunk's seconds for each of its
    layers and then for what follows them, and one decode step's seconds."""

    spans: list[tuple[int, int]]
    prefill: list[list[float]]
    decode: list[float]

    @property
    def per_rank(self) -> list[float]:
        """Each rank's seconds per chunk."""
        return [sum(t) for t in self.prefill]


@dataclass
class Calibration:
    """What ``--layers auto`` measured and chose (``PipelineEngine.calibration``)."""

    chunk_tokens: int
    by_bytes: Measured  # the split it started from
    speeds: list[float]  # each rank's seconds per weight byte there
    proposed: list[tuple[int, int]]  # the time-balanced split
    predicted: list[float]  # the time model's seconds per chunk for each rank of ``proposed``
    tried: Measured | None = None  # ``proposed``, measured after the ranks re-spanned to it

    @classmethod
    def of(cls, measured: Measured, layer_bytes: list[float], chunk_tokens: int) -> "Calibration":
        layers = [t[:-1] for t in measured.prefill]
        speeds = speed_factors(layers, measured.spans, layer_bytes)
        proposed, predicted = time_balanced(layers, measured.prefill[-1][-1], measured.spans, layer_bytes)
        return cls(chunk_tokens, measured, speeds, proposed, predicted)

    @property
    def worth_trying(self) -> bool:
        """A different split whose slowest rank is predicted ``MARGIN`` faster."""
        return self.proposed != self.by_bytes.spans and max(self.predicted) < (1 - MARGIN) * max(self.by_bytes.per_rank)

    @property
    def chosen(self) -> Measured:
        """The tried split if it measured faster (its slowest rank), else the byte split."""
        if self.tried and max(self.tried.per_rank) < max(self.by_bytes.per_rank):
            return self.tried
        return self.by_bytes

    @property
    def spans(self) -> list[tuple[int, int]]:
        return self.chosen.spans

    def line(self) -> str:
        """One line: the split, why, and the measured per-rank chunk times on it (and on the other)."""
        before, chunk = _ms(self.by_bytes.per_rank), f"ms per {self.chunk_tokens}-token prefill chunk"
        if self.chosen is not self.by_bytes:
            return (f"split {layout(self.spans)} by measured time (rank times {_ms(self.chosen.per_rank)} {chunk}; "
                    f"by bytes it was {layout(self.by_bytes.spans)}: {before} ms)")
        if self.proposed == self.by_bytes.spans:
            return f"split {layout(self.spans)} by measured time, the same as by bytes (rank times {before} {chunk})"
        if self.tried:
            return (f"split {layout(self.spans)} by bytes (rank times {before} {chunk}; by measured time "
                    f"{layout(self.proposed)} measured slower: {_ms(self.tried.per_rank)} ms)")
        return (f"split {layout(self.spans)} by bytes (rank times {before} {chunk}; by measured time "
                f"{layout(self.proposed)} would gain under {MARGIN:.0%})")

    def table(self) -> list[str]:
        """Per rank: the byte split's measured chunk time, the rank's speed, the split the time
        model proposed with its predicted and measured chunk time, and the decode step time."""
        tried = self.tried.per_rank if self.tried else [None] * len(self.speeds)
        lines = [f"--layers auto: timed on {self.chunk_tokens}-token prefill chunks (best of {PASSES}) and decode "
                 f"steps (best of {DECODE_STEPS}), one rank at a time",
                 f"{'rank':>4} {'by bytes':>9} {'chunk':>8} {'ms/MiB':>7} {'by time':>8} {'predicted':>9} "
                 f"{'measured':>8} {'decode':>8}"]
        for r, (a, b) in enumerate(self.by_bytes.spans):
            c, d = self.proposed[r]
            measured = "-" if tried[r] is None else f"{tried[r] * 1e3:.1f}ms"
            lines.append(f"{r:>4} {f'{a}:{b}':>9} {self.by_bytes.per_rank[r] * 1e3:>6.1f}ms "
                         f"{self.speeds[r] * 2**20 * 1e3:>7.2f} {f'{c}:{d}':>8} {self.predicted[r] * 1e3:>7.1f}ms "
                         f"{measured:>8} {self.chosen.decode[r] * 1e3:>6.1f}ms")
        lines.append(f"{self.line()}; decode goes through the ranks one after another: "
                     f"{sum(self.chosen.decode) * 1e3:.1f} ms per token")
        return lines


def _ms(seconds: list[float]) -> str:
    return "/".join(f"{x * 1e3:.1f}" for x in seconds)


def layout(spans) -> str:
    return ",".join(f"{a}:{b}" for a, b in spans)
