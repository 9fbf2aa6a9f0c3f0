"""The q2 recipe against its f32 source, on a model whose predictions mean something.

What matters (the kernels issue's 90% top-1 bar on a tiny model measured the 2-bit
format's limits, not our code):
- where the f32 model is sure of its next token (top-1 probability >= 60%), the q2 +
  imatrix file picks the same token at >= 99% of positions;
- our quantizer moves no more probability mass (KL against f32) than ggml's own C
  quantizer given the same experts and the same imatrix (runs where llama-cpp-python,
  which ships ggml's library, is installed; skipped otherwise). Not met yet, by 0.9%:
  a strict xfail;
- the imatrix helps: q2 with it moves less mass than q2 without.

The subject is ``trained_tiny``: the wide tiny V4 trained for 240 steps on a frozen
corpus snapshot (``tests/data/trained_tiny_corpus.txt``), measured on 8 prompts from
held-out files. The real converter, quantizer (with an imatrix collected by the
project's own collector on training text) and engine.

Measured on the snapshot's model (training loss 11.9 -> 2.59; held-out mean top-1
probability 0.37; zeroing the routed experts changes 70% of the argmax choices), 912
held-out positions: f32 is >= 60% sure at 218 of them, and q2 + imatrix agrees at 217
(99.5%); over all positions q2 keeps 79.9% of the top-1 choices (KL 0.116), q2 +
imatrix 81.8% (KL 0.112). Cost on 2 busy cores (load ~7): training 447 s once (164 s
on a quiet machine), then ~225 s for the three tests with the model cached.

Earlier measurements on models trained from the live sources (before the snapshot):
q2 + imatrix kept 82.4% of all top-1 choices (KL 0.079), ggml's quantizer on the same
experts 83.4% (KL 0.076; on another training ours 0.0705 vs ggml 0.0718), q4 94.9%,
q8 98.6%; the q2 file run by the engine gives logits identical to an f32 file of its
gguf-decoded values, so the kernels add nothing.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from ggml_peer import ggml_quantize, require_ggml
from hf_tiny import TINY_HF
from magnetar.kernels import GGMLType
from magnetar.runtime.engine import Engine
from magnetar.runtime.lab import quality
from magnetar.runtime.lab.convert import convert
from magnetar.runtime.lab.imatrix import Collector, Imatrix, write_dat
from trained_tiny import SEQ, TrainedTiny, trained_tiny

SURE = 0.60  # f32 top-1 probability from which a position counts as one the model is sure of
SURE_BAR = 0.99  # top-1 agreement q2 + imatrix keeps on those positions


@dataclass
class Subject:
    model: TrainedTiny
    f32: Path
    imatrix: Imatrix
    q2: Path  # our quantizer, no imatrix
    q2i: Path  # our quantizer with the imatrix


@pytest.fixture(scope="module")
def subject(pytestconfig, tmp_path_factory) -> Subject:
    """The trained model (~165 s on 2 cores the first time, then cached), its f32 conversion,
    an imatrix collected by the project's own collector on training text only (the prompts
    stay unseen), and its q2 conversions with and without that imatrix."""
    tmp = tmp_path_factory.mktemp("q2-fidelity")
    model = trained_tiny(pytestconfig.cache.mkdir("trained-tiny"))
    s = model.stats
    # The subject must be a real one: it learned (loss far below ln(129280) = 11.8), it is
    # confident, and it needs its routed experts.
    assert s["loss_last10"] < 4.0 and s["eval_mean_top1_prob"] > 0.25, s
    assert s["no_experts_top1_changed"] > 0.3, s

    f32 = convert(model.folder, tmp / "f32.gguf", "f32")
    engine = Engine.load(f32, ctx=SEQ)
    collector = Collector(engine)
    collector.run(engine, model.calibration)
    write_dat(tmp / "train.dat", collector.entries())
    del engine
    imatrix = Imatrix.read(tmp / "train.dat")
    return Subject(model, f32, imatrix, convert(model.folder, tmp / "q2.gguf", "q2"),
                   convert(model.folder, tmp / "q2i.gguf", "q2", imatrix=imatrix))


def _measure(path: Path, subject: Subject) -> quality.Summary:
    return quality.run(path, subject.f32, subject.model.eval_prompts, max_tokens=SEQ, k=5).overall


def _top1(path: Path, subject: Subject) -> tuple[np.ndarray, np.ndarray]:
    """Over every evaluation position: the model's argmax token and its probability."""
    engine = Engine.load(path, ctx=SEQ)
    tok = engine.tokenizer
    picks, probs = [], []
    for prompt in subject.model.eval_prompts:
        lp = quality.log_softmax64(engine.logits(([tok.bos_id] + tok.encode(prompt))[:SEQ]))
        picks.append(lp.argmax(-1))
        probs.append(np.exp(lp.max(-1)))
    return np.concatenate(picks), np.concatenate(probs)


@pytest.mark.slow  # ~200 s on 2 cores: ~165 s training (cached on disk afterwards), the rest converting
def test_q2_keeps_the_top1_choices_the_model_is_sure_of(subject):
    ref, ref_prob = _top1(subject.f32, subject)
    ours, _ = _top1(subject.q2i, subject)
    sure = ref_prob >= SURE
    agreement = float((ours[sure] == ref[sure]).mean())
    print(f"q2 + imatrix: top-1 agreement {agreement:.4f} on {sure.sum()} of {len(sure)} positions "
          f"where f32 is >= {SURE:.0%} sure; {float((ours == ref).mean()):.4f} on all")
    assert sure.sum() > 100, "too few confident positions to measure"
    assert agreement >= SURE_BAR


@pytest.mark.slow  # ~10 s beyond the shared subject
def test_the_imatrix_moves_less_probability_mass(subject):
    plain, weighted = _measure(subject.q2, subject), _measure(subject.q2i, subject)
    print(f"q2: top-1 {plain.top1_agreement:.4f} KL {plain.kl_mean:.5f}; "
          f"q2 + imatrix: top-1 {weighted.top1_agreement:.4f} KL {weighted.kl_mean:.5f}")
    assert plain.positions == weighted.positions > 500
    # Held at every seed, corpus and training length tried.
    assert weighted.kl_mean < plain.kl_mean, (weighted, plain)


def _requantized_by_ggml(subject: Subject, out: Path) -> Path:
    """A copy of the q2 + imatrix file whose routed experts ggml's quantizer encoded instead,
    from the same f32 values with the same imatrix slices; every other byte is ours."""
    shutil.copyfile(subject.q2i, out)
    source = {t.name: t for t in gguf.GGUFReader(subject.f32).tensors}
    target = gguf.GGUFReader(out, "r+")
    n_swapped = 0
    for t in target.tensors:
        qtype = GGMLType(int(t.tensor_type))
        if qtype not in (GGMLType.IQ2_XXS, GGMLType.Q2_K):
            continue
        values = np.asarray(source[t.name].data, np.float32)  # [experts, rows, cols]
        blocks = t.data.reshape(values.shape[0], -1)
        for e in range(values.shape[0]):
            imp = subject.imatrix.for_tensor(t.name, values.shape[-1], e, values.shape[0])
            if imp is None or not imp.any():  # never routed: ggml's IQ2_XXS needs importance; ours
                # falls back to this column energy too (quantize._column_weights)
                imp = np.einsum("rc,rc->c", values[e], values[e])
            blocks[e] = ggml_quantize(values[e], qtype, imp).reshape(-1)
        n_swapped += 1
    target.data.flush()
    del target
    assert n_swapped == 3 * TINY_HF["num_hidden_layers"]  # gate, up and down of every (MoE) layer
    return out


class MoreMassThanGgml(AssertionError):
    """Our q2 + imatrix moves more probability mass than ggml's quantizer (the only failure the
    xfail marker expects)."""


@pytest.mark.slow  # ~60 s beyond the shared subject on 2 idle cores
@pytest.mark.xfail(strict=True, raises=MoreMassThanGgml,
                   reason="measured KL 0.11196 ours vs 0.11096 ggml (+0.9%) on the snapshot's model")
def test_our_q2_moves_no_more_mass_than_ggml_quantizer(subject, tmp_path):
    """Same experts, same imatrix, every other byte of the file equal: the KL against f32 of
    our quantizer's experts is at most that of ggml's (the C quantizer llama.cpp runs).

    Not met yet, by 0.9%: ours KL 0.11196, top-5 overlap 0.792, perplexity ratio 1.019;
    ggml's KL 0.11096, 0.803, 1.000 (on earlier models the ratio was 0.98 and 1.03), although
    ours has the lower imatrix-weighted error per matrix (test_quantize_vs_ggml.py). The strict
    xfail goes red (XPASS) once ours moves no more mass; any other failure is a real one."""
    require_ggml()
    ours = _measure(subject.q2i, subject)
    theirs = _measure(_requantized_by_ggml(subject, tmp_path / "ggml-q2i.gguf"), subject)
    print(f"q2 + imatrix, ours: top-1 {ours.top1_agreement:.4f} KL {ours.kl_mean:.5f}; "
          f"ggml: top-1 {theirs.top1_agreement:.4f} KL {theirs.kl_mean:.5f}")
    assert ours.positions == theirs.positions > 500
    if ours.kl_mean > theirs.kl_mean:
        raise MoreMassThanGgml(f"q2 + imatrix KL {ours.kl_mean:.5f} > ggml's {theirs.kl_mean:.5f}")
