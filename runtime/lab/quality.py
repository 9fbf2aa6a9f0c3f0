"""How far a quantized model's next-token distributions are from a reference's.

``magnetar quality -m QUANT --ref REF --prompts FILE`` runs the same token ids
(BOS + the plain-text encoding of each prompt, no chat template) through both
models and compares them position by position:

* KL(ref || quant) in nats, from float64 log-softmax: how much probability mass
  the quantized model moves, over the whole vocabulary;
* top-1 agreement: whether the two argmax tokens are the same (greedy decoding
  would pick the same token);
* top-k overlap: |top-k(ref) ∩ top-k(quant)| / k, what samplers draw from;
* each model's cross-entropy on the actual next token, so the perplexity of
  both and their ratio (positions that have a next token only).

Memory. The reference is usually the bigger file (q8 or f16 against a q2 one:
for V4 Flash that is ~290 GB next to 81 GB), so the two models are never loaded
together: pass 1 loads the reference, runs every prompt and appends its float32
logits, exactly as the engine returned them, to an unlinked temporary file;
the engine is then freed. Pass 2 loads the quantized model and compares each
prompt against the reference rows memory-mapped from that file. The price is
temporary disk, 4 bytes x vocab per position (0.5 MB per token at V4's 129280
vocabulary; 26 GB for 100 prompts of 512 tokens), checked before starting (on a
tmpfs TMPDIR that space is RAM: point TMPDIR at a disk for big runs).
Peak memory is one model plus one prompt's [tokens, vocab] float32 logits;
the float64 work runs on ``CHUNK_ROWS`` rows at a time (a 129280-vocab float64
row is 1 MB), and only per-position scalars are kept across prompts.
"""

from __future__ import annotations

import gc
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np

from ..engine import Engine
from ..errors import MagnetarError, UsageError
from ..fileio import atomic_write_bytes
from ..gguf_read import ModelFile, open_model

CHUNK_ROWS = 32  # rows of float64 [rows, vocab] work arrays: 33 MB each at V4's vocabulary
TOKENIZER_KEYS = ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id")
TABLE_MAX_PROMPTS = 40  # more prompts than this: the table shows the overall row only


class QualityError(MagnetarError):
    """The comparison cannot be made (models differ, broken logits, no room for the spill)."""


# -- the metrics ---------------------------------------------------------------------------


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (max-shifted, so large logits cannot overflow)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@dataclass
class PositionStats:
    """Per-position numbers of one or more prompts."""

    kl: np.ndarray  # [T] KL(ref || quant), nats
    top1: np.ndarray  # [T] bool: argmax agrees
    overlap: np.ndarray  # [T] |top-k ref ∩ top-k quant| / k
    nll_ref: np.ndarray  # [T-1] -log p_ref(actual next token)
    nll_quant: np.ndarray  # [T-1] -log p_quant(actual next token)

    @classmethod
    def concat(cls, parts: Sequence["PositionStats"]) -> "PositionStats":
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))


def top_k_sets(logprobs: np.ndarray, k: int) -> np.ndarray:
    """[rows, k] token ids of each row's k largest entries, in no particular order."""
    if k >= logprobs.shape[-1]:
        return np.broadcast_to(np.arange(logprobs.shape[-1]), logprobs.shape).copy()
    return np.argpartition(-logprobs, k - 1, axis=-1)[:, :k]


def compare(ref_logits: np.ndarray, quant_logits: np.ndarray, ids: Sequence[int], k: int,
            rows: int = CHUNK_ROWS) -> PositionStats:
    """Metrics for one token list: ``*_logits`` are [len(ids), vocab] (row t predicts ids[t+1]).

    ``ref_logits`` may be a memmap; it is read ``rows`` rows at a time.
    """
    n, vocab = quant_logits.shape
    if ref_logits.shape != (n, vocab) or len(ids) != n:
        raise ValueError(f"shapes differ: ref {ref_logits.shape}, quant {quant_logits.shape}, {len(ids)} ids")
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in 1..{vocab}, got {k}")
    nxt = np.asarray(ids, np.int64)[1:]
    kl, top1, overlap = np.empty(n), np.empty(n, bool), np.empty(n)
    nll_ref, nll_quant = np.empty(n - 1), np.empty(n - 1)
    mark = np.zeros((min(rows, n), vocab), bool)  # reused mask for the top-k intersection
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        lp, lq = log_softmax64(ref_logits[r0:r1]), log_softmax64(quant_logits[r0:r1])
        # Gibbs: KL >= 0; float64 rounding can leave -1e-17 where the rows are (nearly) equal.
        kl[r0:r1] = np.maximum(np.sum(np.exp(lp) * (lp - lq), axis=-1), 0.0)
        top1[r0:r1] = lp.argmax(axis=-1) == lq.argmax(axis=-1)
        # Intersection of two k-sets per row by marking one in a [rows, vocab] mask and counting
        # hits of the other: O(vocab) per row for any k, where a k x k comparison grows as k^2.
        m, at = mark[: r1 - r0], np.arange(r1 - r0)[:, None]
        m[:] = False
        m[at, top_k_sets(lp, k)] = True
        overlap[r0:r1] = m[at, top_k_sets(lq, k)].sum(axis=-1) / k
        t1 = min(r1, n - 1)  # the last position has no next token
        if t1 > r0:
            idx = np.arange(t1 - r0)
            nll_ref[r0:t1] = -lp[idx, nxt[r0:t1]]
            nll_quant[r0:t1] = -lq[idx, nxt[r0:t1]]
    return PositionStats(kl, top1, overlap, nll_ref, nll_quant)


@dataclass
class Summary:
    positions: int  # positions compared (every token of the prompts)
    next_tokens: int  # positions with an actual next token (the perplexity's count)
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float  # fraction, 0..1
    topk_overlap: float  # mean over positions, 0..1
    ppl_ref: float
    ppl_quant: float
    ppl_ratio: float  # ppl_quant / ppl_ref; > 1 means the quantized model predicts the text worse


def summarize(s: PositionStats) -> Summary:
    kl = s.kl
    if len(s.nll_ref):
        ppl_ref, ppl_q = float(np.exp(s.nll_ref.mean())), float(np.exp(s.nll_quant.mean()))
        ratio = float(np.exp(s.nll_quant.mean() - s.nll_ref.mean()))  # no overflow for huge ppls
    else:
        ppl_ref = ppl_q = ratio = math.nan
    return Summary(len(kl), len(s.nll_ref), float(kl.mean()), float(np.median(kl)), float(np.percentile(kl, 99)),
                   float(kl.max()), float(s.top1.mean()), float(s.overlap.mean()), ppl_ref, ppl_q, ratio)


# -- the two models ------------------------------------------------------------------------


def check_compatible(ref: ModelFile, quant: ModelFile) -> None:
    """Refuse two files whose token ids or forward passes do not correspond.

    Compares GGUF metadata only (cheap, before either model's weights are loaded).
    """
    for key in TOKENIZER_KEYS:
        a, b = ref.meta.get(f"tokenizer.ggml.{key}"), quant.meta.get(f"tokenizer.ggml.{key}")
        if a != b:
            where = key
            if isinstance(a, list) and isinstance(b, list):
                i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                where = f"{key} differ at entry {i}" if len(a) == len(b) else f"{key}: {len(a)} vs {len(b)} entries"
            raise QualityError(f"the two models have different tokenizers ({where})",
                               "compare two encodings of the same model")
    a, b = ref.config.model_dump(), quant.config.model_dump()
    diff = [f"{k} {a[k]} vs {b[k]}" for k in a if a[k] != b.get(k)]
    if diff:
        raise QualityError(f"the two models have different architectures (ref vs quant: {', '.join(diff[:3])})",
                           "compare two encodings of the same model")


@dataclass
class PromptResult:
    index: int  # 1-based, in prompts-file order
    truncated: bool  # cut at --max-tokens
    preview: str  # the prompt's start, on one line
    summary: Summary


@dataclass
class Report:
    quant: str
    ref: str
    quant_recipe: str
    ref_recipe: str
    top_k: int
    max_tokens: int
    prompts: list[PromptResult]
    overall: Summary

    def to_json(self) -> dict:
        doc = {k: v for k, v in asdict(self).items() if k not in ("prompts", "overall")}
        doc["overall"] = asdict(self.overall)
        doc["prompts"] = [{"index": p.index, "truncated": p.truncated, "preview": p.preview, **asdict(p.summary)}
                          for p in self.prompts]
        return doc


def _preview(text: str, width: int = 24) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


class _SpillFile:
    """Reference logits of every prompt, appended to an unlinked temp file, read back as memmaps."""

    def __init__(self, folder: str | None):
        self.fh = tempfile.TemporaryFile(dir=folder, prefix="magnetar-quality-")
        self.where: list[tuple[int, tuple[int, int]]] = []  # (byte offset, shape) per prompt
        self.size = 0

    def append(self, logits: np.ndarray) -> None:
        a = np.ascontiguousarray(logits, np.float32)
        self.fh.write(memoryview(a).cast("B"))
        self.where.append((self.size, a.shape))
        self.size += a.nbytes

    def rows(self, i: int) -> np.ndarray:
        self.fh.flush()
        offset, shape = self.where[i]
        return np.memmap(self.fh, np.float32, mode="r", offset=offset, shape=shape)

    def close(self) -> None:
        self.fh.close()


def _logits(engine: Engine, ids: list[int], role: str, path: str, prompt: int) -> np.ndarray:
    out = engine.logits(ids)
    mx.clear_cache()  # the forward pass's temporaries; otherwise MLX's cache grows with the longest prompt
    # A float64 row sum is finite iff every float32 logit is (it cannot overflow), and it
    # needs no [tokens, vocab] boolean temporary.
    bad = ~np.isfinite(out.sum(axis=1, dtype=np.float64))
    if bad.any():
        raise QualityError(f"the {role} model {path} gave NaN/inf logits in prompt {prompt} at token "
                           f"{int(np.argmax(bad))}", "the file's weights or quantization are broken")
    return out


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError  # pragma: no cover


def run(quant_path: str | os.PathLike, ref_path: str | os.PathLike, prompts: Sequence[str], max_tokens: int = 512,
        k: int = 10, ctx: int | None = None, backend: str = "auto",
        progress: Callable[[int, int], None] | None = None, spill_dir: str | None = None) -> Report:
    """Compare ``quant_path`` against ``ref_path`` on ``prompts``; see the module docstring.

    ``ctx``: the engines' context (default ``max_tokens``); ``progress(done, total)`` counts
    prompts over both passes; ``spill_dir``: where the reference logits go (default: TMPDIR).
    """
    if max_tokens < 2:
        raise UsageError(f"--max-tokens must be at least 2 (BOS and one token), got {max_tokens}")
    ctx = max_tokens if ctx is None else ctx
    if ctx < max_tokens:
        raise UsageError(f"--max-tokens {max_tokens} does not fit in --ctx {ctx}", "raise --ctx or lower --max-tokens")
    if not prompts:
        raise UsageError("no prompts to compare on")
    ref_file, quant_file = open_model(ref_path), open_model(quant_path)
    check_compatible(ref_file, quant_file)
    vocab = ref_file.config.vocab_size
    if not 1 <= k <= vocab:
        raise UsageError(f"--top-k must be between 1 and the vocabulary size {vocab}, got {k}")

    tok = ref_file.tokenizer
    full = [[tok.bos_id] + tok.encode(p) for p in prompts]
    for i, ids in enumerate(full, 1):
        if len(ids) < 2:
            raise UsageError(f"prompt {i} is empty")
    token_lists = [ids[:max_tokens] for ids in full]

    spill_dir = spill_dir or tempfile.gettempdir()
    need, free = sum(map(len, token_lists)) * vocab * 4, shutil.disk_usage(spill_dir).free
    if need > 0.95 * free:
        raise QualityError(f"the reference logits need {_bytes(need)} of temporary space in {spill_dir}, "
                           f"which has {_bytes(free)} free",
                           "lower --max-tokens, pass fewer prompts, or point TMPDIR at a bigger disk")
    done, total = 0, 2 * len(token_lists)
    spill = _SpillFile(spill_dir)
    try:
        # Pass 1: the reference alone.
        engine = Engine.load(ref_path, ctx=ctx, backend=backend)
        for i, ids in enumerate(token_lists, 1):
            spill.append(_logits(engine, ids, "reference", str(ref_path), i))
            done += 1
            if progress:
                progress(done, total)
        del engine  # free the reference's weights before the quantized model loads
        gc.collect()
        mx.clear_cache()

        # Pass 2: the quantized model, each prompt against the reference rows on disk.
        engine = Engine.load(quant_path, ctx=ctx, backend=backend)
        stats = []
        for i, ids in enumerate(token_lists, 1):
            quant_logits = _logits(engine, ids, "quantized", str(quant_path), i)
            ref_logits = spill.rows(i - 1)
            stats.append(compare(ref_logits, quant_logits, ids, k))
            del ref_logits, quant_logits
            done += 1
            if progress:
                progress(done, total)
        del engine
    finally:
        spill.close()

    results = [PromptResult(i, len(f) > max_tokens, _preview(p), summarize(s))
               for i, (p, f, s) in enumerate(zip(prompts, full, stats), 1)]
    return Report(str(quant_path), str(ref_path), quant_file.recipe, ref_file.recipe, k, max_tokens, results,
                  summarize(PositionStats.concat(stats)))


# -- output --------------------------------------------------------------------------------


def render(report: Report, width: int = 120) -> str:
    """A text table: one row per prompt (up to ``TABLE_MAX_PROMPTS``), then the overall row."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    o = report.overall
    title = (f"{report.quant} ({report.quant_recipe}) against {report.ref} ({report.ref_recipe}): "
             f"{len(report.prompts)} prompts, {o.positions} positions; KL(ref || quant) in nats")
    # Text: paths are not markup. SIMPLE_HEAD: no vertical rules, so 11 columns fit in 120.
    table = Table(title=Text(title), title_justify="left", box=box.SIMPLE_HEAD)
    for i, name in enumerate(("prompt", "tokens", "KL mean", "KL med", "KL p99", "KL max", "top-1",
                              f"top-{report.top_k}", "ppl ref", "ppl q", "q/ref")):
        if i == 0:  # the preview only identifies the prompt: one line, cut with an ellipsis
            table.add_column(name, no_wrap=True, overflow="ellipsis", max_width=18)
        else:
            table.add_column(name, justify="right", no_wrap=True, min_width=len(name))

    def row(label: str, tokens: str, s: Summary, end_section: bool = False) -> None:
        table.add_row(Text(label), tokens, f"{s.kl_mean:.5f}", f"{s.kl_median:.5f}", f"{s.kl_p99:.5f}",
                      f"{s.kl_max:.5f}", f"{100 * s.top1_agreement:.1f}%", f"{s.topk_overlap:.3f}",
                      _ppl(s.ppl_ref), _ppl(s.ppl_quant), f"{s.ppl_ratio:.4f}", end_section=end_section)

    shown = report.prompts if len(report.prompts) <= TABLE_MAX_PROMPTS else []
    for j, p in enumerate(shown):
        row(f"{p.index} {p.preview}", f"{p.summary.positions}{'+' if p.truncated else ''}", p.summary,
            end_section=j == len(shown) - 1)
    row("all", str(o.positions), o)
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False, color_system=None).print(table)
    lines = [ln.rstrip() for ln in buf.getvalue().splitlines()]
    lines.append(f"top-1: argmax agrees; top-{report.top_k}: mean shared fraction of the two top-{report.top_k} "
                 "sets; q/ref: ppl(quant) / ppl(ref) on the prompts' next tokens")
    if not shown:
        lines.append(f"({len(report.prompts)} prompts: per-prompt rows are in --json)")
    cut = sum(p.truncated for p in report.prompts)
    if cut:
        lines.append(f"+ {cut} of {len(report.prompts)} prompts were cut at --max-tokens {report.max_tokens}")
    return "\n".join(lines)


def _ppl(x: float) -> str:
    # Real models sit at single or double digits; random test models near the vocabulary size.
    return f"{x:.3f}" if x < 100 else f"{x:,.0f}"


def write_json(path: str | os.PathLike, report: Report, **meta) -> None:
    """The report (plus ``meta`` keys, e.g. the prompts file) as JSON, written atomically."""
    doc = {**meta, **report.to_json()}
    atomic_write_bytes(path, (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode())
