"""The q2 recipe against its f32 source, on a model whose predictions mean something.

The bar (the kernels issue): a tiny model converted with ``--recipe q2`` keeps
top-1 agreement >= 90% with its f32 conversion on a fixed prompt set.

The subject is ``trained_tiny``: the wide tiny V4 trained for 240 steps on
the repository's sources, measured on 8 prompts from held-out files (872
positions). The real converter, quantizer (with an imatrix collected by the
project's own collector on training text) and engine; ``quality.run`` measures.

Measured (seed 0, this repository at the time of writing; deterministic):
- the model: training loss 11.9 -> 3.26; on the held-out text loss 5.17, mean
  top-1 probability 0.32; zeroing the routed experts changes the argmax at 73%
  of positions (KL 1.38 nats), so the 2-bit experts carry real signal;
- q2: top-1 80.4%, KL 0.087, top-5 overlap 0.814; q2 + imatrix: top-1 80.4%,
  KL 0.083, top-5 0.822; for context q4: 95.6% (KL 0.0047), q8: 99.7%.

So the bar is not met, and the shortfall is the 2-bit format on this small
model, not the kernels: the q2 file run by the engine gives logits identical
(KL exactly 0) to an f32 file holding the values gguf-py decodes from its
blocks, which our numpy and MLX dequantizers reproduce bit for bit; decoding
only the experts (the rest f32) gives the same 80%; IQ2_XXS gate/up alone
leave 85%, Q2_K down alone 87.5% (89% with the imatrix). Positions where
f32's top-1 probability is at least 0.6 agree 99.4%, those under 0.2 (half of
them here) 69%. The quantizer is at the spec's quality: IQ2_XXS weighted
relative error 0.106 on spec §3.4's synthetic matrix (spec: 0.125), 0.108 on
these experts (Q2_K: 0.056). Other runs (on an earlier held-out split, where
seed 0 gave 82.2%) show the same: seed 1 82.4%; 480 steps (mean top-1
probability 0.43) 76%, more sensitive, not less; top-6 of 8 routed experts,
as Flash routes, 86.4%.

The strict xfail keeps the bar where it is: the test goes red (XPASS) once q2
meets it, and any other failure is a real one.
"""

from __future__ import annotations

import pytest

from magnetar.runtime import quality
from magnetar.runtime.convert import convert
from magnetar.runtime.engine import Engine
from magnetar.runtime.imatrix import Collector, Imatrix, write_dat
from trained_tiny import SEQ, trained_tiny

BAR = 0.90


class BelowTheBar(AssertionError):
    """The issue's bar is not met (the only failure the xfail marker expects)."""


@pytest.mark.slow  # 200 s on 2 cores: 165 s training (cached on disk afterwards), 30 s the rest
@pytest.mark.xfail(strict=True, raises=BelowTheBar, reason="q2 + imatrix keeps 80% of top-1 choices here")
def test_q2_with_imatrix_keeps_top1_of_a_trained_model(pytestconfig, tmp_path):
    model = trained_tiny(pytestconfig.cache.mkdir("trained-tiny"))
    s = model.stats
    # The subject must be a real one: it learned (loss far below ln(129280) = 11.8), it is
    # confident, and it needs its routed experts.
    assert s["loss_last10"] < 4.0 and s["eval_mean_top1_prob"] > 0.25, s
    assert s["no_experts_top1_changed"] > 0.3, s

    f32 = convert(model.folder, tmp_path / "f32.gguf", "f32")
    engine = Engine.load(f32, ctx=SEQ)
    collector = Collector(engine)
    collector.run(engine, model.calibration)  # training text only: the prompts stay unseen
    write_dat(tmp_path / "train.dat", collector.entries())
    del engine
    q2 = convert(model.folder, tmp_path / "q2.gguf", "q2")
    q2i = convert(model.folder, tmp_path / "q2i.gguf", "q2", imatrix=Imatrix.read(tmp_path / "train.dat"))

    plain = quality.run(q2, f32, model.eval_prompts, max_tokens=SEQ, k=5).overall
    weighted = quality.run(q2i, f32, model.eval_prompts, max_tokens=SEQ, k=5).overall
    assert plain.positions == weighted.positions > 500
    # The imatrix moves less probability mass (held at every seed and training length tried).
    assert weighted.kl_mean < plain.kl_mean, (weighted, plain)
    if weighted.top1_agreement < BAR:
        raise BelowTheBar(f"q2 + imatrix top-1 agreement {weighted.top1_agreement:.3f} < {BAR} "
                          f"(KL {weighted.kl_mean:.4f}, top-5 {weighted.topk_overlap:.3f}; "
                          f"plain q2 {plain.top1_agreement:.3f})")
