"""How far a quantized model's next-token distributions are from a reference's.

``magnetar quality -m QUANT --ref REF --prompts FILE`` runs the same token ids
through both models and compares, position by position: KL(ref || quant) in
nats, whether the argmax agrees, the overlap of the top-k sets, and each
model's cross-entropy on the actual next token (so the perplexity ratio).
Both models stay loaded and the prompts run one at a time, so besides the
weights the memory is one prompt's ``[tokens, vocab]`` logits per model
(0.5 MB per token at V4's vocabulary); only per-position scalars are kept.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np

from .engine import Engine
from .errors import UsageError
from .fileio import atomic_write_bytes


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@dataclass
class PositionStats:
    kl: np.ndarray  # [T] KL(ref || quant), nats
    top1: np.ndarray  # [T] bool
    overlap: np.ndarray  # [T] |top-k ref ∩ top-k quant| / k
    nll_ref: np.ndarray  # [T-1] -log p(next token), reference
    nll_quant: np.ndarray  # [T-1]


def compare(ref_logits: np.ndarray, quant_logits: np.ndarray, ids: Sequence[int], k: int) -> PositionStats:
    lp, lq = log_softmax64(ref_logits), log_softmax64(quant_logits)
    kl = np.maximum(np.sum(np.exp(lp) * (lp - lq), axis=-1), 0.0)  # ≥ 0; clip float noise at 0
    top1 = lp.argmax(axis=-1) == lq.argmax(axis=-1)
    tp = np.argpartition(-lp, k - 1, axis=-1)[:, :k]
    tq = np.argpartition(-lq, k - 1, axis=-1)[:, :k]
    overlap = np.array([len(np.intersect1d(a, b)) / k for a, b in zip(tp, tq)])
    nxt = np.asarray(ids[1:], dtype=np.int64)
    rows = np.arange(len(nxt))
    return PositionStats(kl, top1, overlap, -lp[rows, nxt], -lq[rows, nxt])


@dataclass
class Summary:
    positions: int
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    topk_overlap: float
    ppl_ref: float
    ppl_quant: float
    ppl_ratio: float


def summarize(stats: list[PositionStats]) -> Summary:
    kl = np.concatenate([s.kl for s in stats])
    nr, nq = np.concatenate([s.nll_ref for s in stats]), np.concatenate([s.nll_quant for s in stats])
    ppl_ref, ppl_q = float(np.exp(nr.mean())), float(np.exp(nq.mean()))
    return Summary(len(kl), float(kl.mean()), float(np.median(kl)), float(np.percentile(kl, 99)), float(kl.max()),
                   float(np.concatenate([s.top1 for s in stats]).mean()),
                   float(np.concatenate([s.overlap for s in stats]).mean()), ppl_ref, ppl_q, ppl_q / ppl_ref)


def _check_same_model(ref: Engine, quant: Engine) -> None:
    a, b = ref.config, quant.config
    if a.vocab_size != b.vocab_size or ref.tokenizer.encode("def main():") != quant.tokenizer.encode("def main():"):
        raise UsageError("the two models have different vocabularies", "compare two encodings of one model")
    if a.model_dump() != b.model_dump():
        raise UsageError("the two models have different architectures", "compare two encodings of one model")


def run(quant_path: str | os.PathLike, ref_path: str | os.PathLike, prompts: Sequence[str], max_tokens: int = 512,
        k: int = 10, ctx: int = 4096, progress: Callable[[int, int], None] | None = None):
    """Per-prompt Summaries and the overall one."""
    if max_tokens < 2 or k < 1:
        raise UsageError("--max-tokens must be at least 2 and --top-k at least 1")
    ctx = max(ctx, max_tokens)
    ref = Engine.load(ref_path, ctx=ctx)
    tok = ref.tokenizer
    token_lists = [([tok.bos_id] + tok.encode(p))[:max_tokens] for p in prompts]
    quant = Engine.load(quant_path, ctx=ctx)
    _check_same_model(ref, quant)
    per_prompt = []
    for i, ids in enumerate(token_lists):
        per_prompt.append(compare(ref.logits(ids), quant.logits(ids), ids, k))
        mx.clear_cache()
        if progress:
            progress(i + 1, len(token_lists))
    return [summarize([s]) for s in per_prompt], summarize(per_prompt)


def render(per_prompt: list[Summary], overall: Summary, k: int) -> str:
    head = (f"{'prompt':<8}{'tokens':>7}{'KL mean':>10}{'KL p99':>10}{'KL max':>9}{'top-1':>8}"
            f"{f'top-{k}':>8}{'ppl ref':>10}{'ppl q':>10}{'ratio':>7}")
    lines = [head]
    for name, s in [(str(i + 1), s) for i, s in enumerate(per_prompt)] + [("all", overall)]:
        lines.append(f"{name:<8}{s.positions:>7}{s.kl_mean:>10.4f}{s.kl_p99:>10.4f}{s.kl_max:>9.3f}"
                     f"{s.top1_agreement:>8.1%}{s.topk_overlap:>8.3f}{s.ppl_ref:>10.1f}{s.ppl_quant:>10.1f}"
                     f"{s.ppl_ratio:>7.3f}")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, per_prompt: list[Summary], overall: Summary, meta: dict) -> None:
    doc = {**meta, "overall": asdict(overall), "prompts": [asdict(s) for s in per_prompt]}
    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())
