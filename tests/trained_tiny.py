"""A tiny ``DeepseekV4ForCausalLM`` trained briefly on real text, saved as a checkpoint folder.

A random-weight model predicts almost flat distributions, so any quantization
noise flips its argmax and agreement numbers measured on it say nothing. This
one is trained for a few hundred steps on Python sources and Markdown, so its
next-token distributions are peaked the way a real model's are; quantization
fidelity measured on it means something.

The corpus is a frozen snapshot (``data/trained_tiny_corpus.txt``: agent/,
kernels/, tools/, docs/ and prompts/ of this repository at commit 398715b, 39
files, 327 KB), not the live sources, so editing the code neither retrains the
model nor moves the numbers measured on it. Each file in it starts with a form
feed and its path on one line.

The model is ``hf_tiny``'s (every layer kind: sliding, CSA, HCA; hash and
top-k routed MoE) made 256 wide, so the 256-value K-quant and IQ2_XXS blocks
fit. Its files are split by a hash of their path (so adding a file moves no
other): about one in ``HELD_OUT_EVERY`` is held out and gives the evaluation
prompts, text the model never saw; the rest train.

Vocabulary. V4's 129280 ids make full-vocabulary logits the cost of a
training step, but the corpus uses only a few thousand. Those ids get their
own trained embedding and head rows; every other id shares one embedding row
and one head row. Since those ~125k ids all have the same logit, the
full-vocabulary softmax is the sub-vocabulary softmax with that shared row's
logit raised by log(count): the loss below is exactly the full-vocabulary
cross-entropy, and the saved model puts no stray mass on unused ids.

Training is seeded and single-threaded, and the result is cached on disk
under a key that covers the config, the corpus bytes, the hyperparameters,
this file's source and the torch/transformers versions, so one machine trains
once (older entries are deleted: each holds ~280 MB).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from hf_tiny import TINY_HF, V4_VOCAB, randomize

CORPUS = Path(__file__).resolve().parent / "data" / "trained_tiny_corpus.txt"
HELD_OUT_EVERY = 6  # a file whose path hashes to 0 modulo this is held out
WIDE = dict(hidden_size=256, moe_intermediate_size=256)  # rows of 256: K-quant and IQ2_XXS blocks fit
SEQ = 128  # BOS + 127 text tokens, training windows and evaluation prompts alike
BATCH = 6
STEPS = 240
LR = 3e-3
SEED = 0
N_PROMPTS = 8  # held-out evaluation prompts of up to SEQ tokens each
N_CALIBRATION = 24  # training windows for the imatrix


@dataclass
class TrainedTiny:
    folder: Path  # save_pretrained output (config.json + model.safetensors)
    eval_prompts: list[str]  # held-out text, one prompt of at most SEQ tokens (with BOS) each
    calibration: list[list[int]]  # BOS-led training windows of SEQ tokens, for the imatrix
    stats: dict[str, Any]  # what training measured (see ``_measure``)


def _tokenizer():
    from magnetar.runtime.lab.gguf_write import v4_tokenizer_meta
    from magnetar.runtime.tokenizer import Tokenizer

    meta = v4_tokenizer_meta()  # the table convert writes into the GGUF, so the engine encodes alike
    return Tokenizer(meta.tokens, meta.merges, meta.token_types)


def corpus_files(snapshot: Path = CORPUS) -> list[tuple[str, str]]:
    """(path, text) of every file in the corpus snapshot, in its order (sorted by path)."""
    records = snapshot.read_text(encoding="utf-8").split("\f")[1:]  # the text before the first is empty
    return [tuple(record.split("\n", 1)) for record in records]


def _line_chunks(text: str, tok, limit: int) -> list[str]:
    """Consecutive whole-line pieces of ``text``, each at most ``limit`` tokens."""
    chunks, lines = [], []
    for line in text.splitlines(keepends=True):
        if lines and len(tok.encode("".join(lines + [line]))) > limit:
            chunks.append("".join(lines))
            lines = []
        lines.append(line)
    if lines:
        chunks.append("".join(lines))
    return [c for c in chunks if len(tok.encode(c)) <= limit and c.strip()]


def _eval_prompts(held_out: list[str], tok) -> list[str]:
    """``N_PROMPTS`` line chunks spread evenly over the held-out files (code and prose)."""
    chunks = [c for text in held_out for c in _line_chunks(text, tok, SEQ - 1)]
    step = len(chunks) / N_PROMPTS
    return [chunks[int(i * step)] for i in range(N_PROMPTS)]


class _SubEmbedding(torch.nn.Module):
    """The embedding during training: corpus ids get their own row, all others the last one."""

    def __init__(self, weight: torch.nn.Parameter, remap: torch.Tensor):
        super().__init__()
        self.weight, self.remap = weight, remap

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.remap[ids], self.weight)


def _windows(stream: torch.Tensor, n: int, bos: int, g: torch.Generator) -> torch.Tensor:
    """[n, SEQ] token ids: BOS, then SEQ - 1 tokens from a random offset of the training stream."""
    starts = torch.randint(0, len(stream) - SEQ + 1, (n,), generator=g)
    body = torch.stack([stream[s:s + SEQ - 1] for s in starts.tolist()])
    return torch.cat([torch.full((n, 1), bos), body], dim=1)


def _held_out(path: str) -> bool:
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "little") % HELD_OUT_EVERY == 0


def _key(config: dict, files: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([config, STEPS, BATCH, LR, SEED, SEQ, HELD_OUT_EVERY, N_PROMPTS, N_CALIBRATION,
                         torch.__version__, transformers.__version__], sort_keys=True).encode())
    h.update(Path(__file__).read_bytes())
    for name, text in files:
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()[:16]


def trained_tiny(cache: Path) -> TrainedTiny:
    """The trained model, from ``cache`` when an identical one was trained before, else trained there."""
    tok = _tokenizer()
    files = corpus_files()
    train_texts = [text for path, text in files if not _held_out(path)]
    held_out = [text for path, text in files if _held_out(path)]
    stream = torch.tensor([i for t in train_texts for i in tok.encode(t)])
    prompts = _eval_prompts(held_out, tok)
    calibration = _windows(stream, N_CALIBRATION, tok.bos_id, torch.Generator().manual_seed(SEED + 1)).tolist()

    config = {**TINY_HF, **WIDE}
    folder = Path(cache) / f"trained-tiny-{_key(config, files)}"
    if not (folder / "stats.json").is_file():
        for old in Path(cache).glob("trained-tiny-*"):  # other keys (and .part leftovers) are stale
            shutil.rmtree(old, ignore_errors=True)
        work = folder.with_name(folder.name + ".part")
        eval_ids = [([tok.bos_id] + tok.encode(p))[:SEQ] for p in prompts]
        stats = _train(config, stream, tok.bos_id, eval_ids, work)
        (work / "stats.json").write_text(json.dumps(stats, indent=1))
        work.rename(folder)  # whole or absent: an interrupted run leaves only a .part folder
    stats = json.loads((folder / "stats.json").read_text())
    return TrainedTiny(folder, prompts, calibration, stats)


def _train(config: dict, stream: torch.Tensor, bos: int, eval_ids: list[list[int]], out: Path) -> dict[str, Any]:
    # One thread: with another process busy on one of the 2 cores, 2 threads ran a step 10-40x
    # slower (OpenMP workers waiting on a descheduled peer); 1 thread is steady at ~0.1 s per window.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        torch.manual_seed(SEED)
        hf_config = transformers.DeepseekV4Config(**config)
        model = transformers.DeepseekV4ForCausalLM(hf_config)
        randomize(model, hf_config, SEED)  # O(1) activations everywhere (transformers zeroes many weights)

        used = torch.unique(torch.cat([stream, torch.tensor([bos])]))
        n = len(used)
        remap = torch.full((V4_VOCAB,), n)  # id -> its row, or the shared row n
        remap[used] = torch.arange(n)
        g = torch.Generator().manual_seed(SEED)
        d = hf_config.hidden_size
        # The shared rows start like randomize's: N(0, 1) embedding, N(0, 1/d) head.
        emb = torch.nn.Parameter(torch.cat([model.model.embed_tokens.weight.detach()[used],
                                            torch.randn(1, d, generator=g)]))
        head = torch.nn.Parameter(torch.cat([model.lm_head.weight.detach()[used],
                                             torch.randn(1, d, generator=g) * d ** -0.5]))
        # The shared row stands for V4_VOCAB - n equal logits: exp(z) counted that many times.
        bias = torch.zeros(n + 1)
        bias[n] = math.log(V4_VOCAB - n)
        full_embedding = model.model.embed_tokens
        model.model.embed_tokens = _SubEmbedding(emb, remap)

        params = [p for name, p in model.named_parameters() if name != "lm_head.weight"] + [head]
        opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.01)
        warmup = STEPS // 10  # then a cosine from LR down to LR / 10
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.55 + 0.45 * math.cos(
            math.pi * max(s - warmup, 0) / (STEPS - warmup))))
        model.train()
        losses = []
        for _ in range(STEPS):
            batch = _windows(stream, BATCH, bos, g)
            logits = F.linear(model.model(input_ids=batch).last_hidden_state, head, bias)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, n + 1), remap[batch[:, 1:]].reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())

        with torch.no_grad():  # the full-vocabulary model: every unused id gets the shared rows
            full_embedding.weight.copy_(emb[remap])
            model.lm_head.weight.copy_(head[remap])
        model.model.embed_tokens = full_embedding
        model.eval()
        stats = {"train_seconds": round(time.perf_counter() - start, 1), "sub_vocab": n,
                 "loss_first": losses[0], "loss_last10": sum(losses[-10:]) / 10, **_measure(model, eval_ids)}
        model.save_pretrained(out)
        return stats
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _measure(model, eval_ids: list[list[int]]) -> dict[str, float]:
    """On the held-out prompts: loss, how peaked the predictions are, and how much the routed
    experts matter (the logits with every routed expert's output zeroed). Per-position numbers
    only are kept: a prompt's [tokens, vocab] log-probabilities are 66 MB."""
    nll, hit, top1, changed, kl = [], [], [], [], []
    for ids in eval_ids:
        x = torch.tensor([ids])
        lp = F.log_softmax(model(input_ids=x).logits[0], -1)
        hooks = [layer.mlp.experts.register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
                 for layer in model.model.layers]
        try:
            la = F.log_softmax(model(input_ids=x).logits[0], -1)
        finally:
            for h in hooks:
                h.remove()
        nll.append(-lp[:-1].gather(1, x[0, 1:, None])[:, 0])
        hit.append(lp[:-1].argmax(-1) == x[0, 1:])
        top1.append(lp.max(-1).values.exp())
        changed.append(lp.argmax(-1) != la.argmax(-1))
        kl.append((lp.exp() * (lp - la)).sum(-1))

    def mean(parts: list[torch.Tensor]) -> float:
        return torch.cat(parts).double().mean().item()

    return {"eval_positions": sum(map(len, eval_ids)), "eval_loss": mean(nll), "eval_top1_accuracy": mean(hit),
            "eval_mean_top1_prob": mean(top1), "no_experts_top1_changed": mean(changed), "no_experts_kl": mean(kl)}
