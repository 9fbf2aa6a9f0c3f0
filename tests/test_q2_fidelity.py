"""The q2 recipe against its f32 source, on a model whose predictions mean something.

The bar (the kernels issue): a tiny model converted with ``--recipe q2`` keeps
top-1 agreement >= 90% with its f32 conversion on a fixed prompt set.

The subject is ``trained_tiny``: the wide tiny V4 trained for 240 steps on
the repository's sources, measured on 8 prompts from held-out files. The real
converter, quantizer (with an imatrix collected by the project's own collector
on training text) and engine; ``quality.run`` measures. The corpus is the
repository's own code, so every source change retrains a slightly different
model and the numbers move by a point or two.

Measured at the commit that added the ggml comparison (956 positions):
- the model: training loss 11.8 -> 3.42; on the held-out text mean top-1
  probability 0.32; zeroing the routed experts changes the argmax at 70% of
  positions (KL 1.32 nats), so the 2-bit experts carry real signal;
- q2: top-1 81.3% (KL 0.081); q2 + imatrix: 82.4% (KL 0.079, top-5 0.83);
  the same experts and imatrix through ggml's own quantizer: 83.4% (KL
  0.076); for context q4: 94.9% (KL 0.0040), q8: 98.6%.

So the bar is not met, and neither the kernels nor our quantizer is the
cause. The q2 file run by the engine gives logits identical (KL exactly 0)
to an f32 file holding the values gguf-py decodes from its blocks. ggml's
quantizer, the reference C one, lands within a point of ours (on an earlier
training: ours 82.6% / KL 0.0705, ggml 83.1% / KL 0.0718), while ours has the
lower imatrix-weighted error on these very experts (IQ2_XXS 0.329 vs 0.340,
Q2_K 0.224 vs 0.226). Earlier measurements of the same kind: IQ2_XXS gate/up
alone leave ~85%, Q2_K down alone ~88%; positions where f32 is at least 60%
sure agree 99.4%, those under 20% sure (half of them) 69%; 480 training
steps gave 76%; top-6 of 8 routed experts, as Flash routes, 86.4%.

The strict xfail keeps the bar where it is: the test goes red (XPASS) once q2
meets it, and any other failure is a real one.
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
from magnetar.runtime.lab import quality
from magnetar.runtime.lab.convert import convert
from magnetar.runtime.engine import Engine
from magnetar.runtime.lab.imatrix import Collector, Imatrix, write_dat
from trained_tiny import SEQ, TrainedTiny, trained_tiny

BAR = 0.90


class BelowTheBar(AssertionError):
    """The issue's bar is not met (the only failure the xfail marker expects)."""


@dataclass
class Subject:
    model: TrainedTiny
    f32: Path
    imatrix: Imatrix
    q2: Path  # our quantizer, no imatrix
    q2i: Path  # our quantizer with the imatrix


@pytest.fixture(scope="module")
def subject(pytestconfig, tmp_path_factory) -> Subject:
    """The trained model (210 s on 2 cores the first time, then cached), its f32 conversion,
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


@pytest.mark.slow  # 240 s on 2 cores: 210 s training (cached on disk afterwards), 30 s the rest
@pytest.mark.xfail(strict=True, raises=BelowTheBar, reason="q2 + imatrix keeps ~82% of top-1 choices here; ggml's quantizer ~83%")
def test_q2_with_imatrix_keeps_top1_of_a_trained_model(subject):
    plain, weighted = _measure(subject.q2, subject), _measure(subject.q2i, subject)
    assert plain.positions == weighted.positions > 500
    # The imatrix moves less probability mass (held at every seed and training length tried).
    assert weighted.kl_mean < plain.kl_mean, (weighted, plain)
    if weighted.top1_agreement < BAR:
        raise BelowTheBar(f"q2 + imatrix top-1 agreement {weighted.top1_agreement:.3f} < {BAR} "
                          f"(KL {weighted.kl_mean:.4f}, top-5 {weighted.topk_overlap:.3f}; "
                          f"plain q2 {plain.top1_agreement:.3f})")


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


@pytest.mark.slow  # 30 s beyond the shared subject
def test_ggml_quantizer_is_below_the_bar_too(subject, tmp_path):
    """The shortfall is the 2-bit format's, not our quantizer's: ggml's own quantizer, given
    the same experts and imatrix, is below the bar as well, and moves about as much
    probability mass (KL ratio ours / ggml measured 0.98 and 1.03 on two trainings)."""
    require_ggml()
    ours = _measure(subject.q2i, subject)
    theirs = _measure(_requantized_by_ggml(subject, tmp_path / "ggml-q2i.gguf"), subject)
    print(f"q2 + imatrix, ours: top-1 {ours.top1_agreement:.4f} KL {ours.kl_mean:.4f}; "
          f"ggml: top-1 {theirs.top1_agreement:.4f} KL {theirs.kl_mean:.4f}")
    assert theirs.top1_agreement < BAR
    assert abs(ours.kl_mean / theirs.kl_mean - 1) < 0.10, (ours, theirs)
