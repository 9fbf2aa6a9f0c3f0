"""The CPU experts' activation mode as an option: ``Engine.load(expert_activations=...)``
and ``--expert-act`` reach the kernels, asking for q8k where it cannot run is a one-line
error, and a session's checkpoint records its mode: a resume in the other mode restores
(the rows differ by rounding only) and warns; files that predate the key read as f32."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_checkpoint_forgery import forge

from magnetar.agent.sessions import SessionStore
from magnetar.cli import main
from magnetar.kernels import native
from magnetar.kernels.backend import EXPERT_ACTIVATIONS
from magnetar.kernels.cpu import ACTIVATION_MODES
from magnetar.runtime import UsageError, chat
from magnetar.runtime import checkpoint as ckpt
from magnetar.runtime.engine import Engine

pytestmark = pytest.mark.skipif(not native.available(), reason="q8k runs the native CPU kernels")

PROMPTS = [[int(v) for v in np.random.default_rng(seed).integers(3, 1000, 24)] for seed in range(4)]
MESSAGES = [chat.Message(role="user", content="Name three prime numbers."),
            chat.Message(role="assistant", content="2, 3 and 5.", reasoning="Small ones.")]


@pytest.fixture(scope="module")
def engines(tiny_models) -> dict[str, Engine]:
    """One tiny q2 engine per mode (q8k changes the IQ2_XXS/Q2_K/Q4_K products only)."""
    return {mode: Engine.load(tiny_models("q2"), ctx=512, expert_activations=mode) for mode in EXPERT_ACTIVATIONS}


def test_the_keyword_reaches_the_kernels_and_rounds_the_logits(engines):
    assert EXPERT_ACTIVATIONS == tuple(ACTIVATION_MODES)
    assert {experts for experts, _ in ACTIVATION_MODES.values()} == set(native.ACTIVATIONS)
    for mode, engine in engines.items():
        assert engine.expert_activations == engine.model.kernels.expert_activations == mode
    f32 = np.concatenate([engines["f32"].logits(ids) for ids in PROMPTS])
    q8k = np.concatenate([engines["q8k"].logits(ids) for ids in PROMPTS])
    rel = np.linalg.norm(q8k - f32, axis=1) / np.linalg.norm(f32, axis=1)
    # Measured on these 96 positions: every one differs (min ~1.4e-2), median ~2e-2. Random
    # tiny weights give near-flat logits, so the top token flips at some positions (~7% on
    # 480 positions): most agree, not all.
    assert rel.min() > 1e-3 and np.median(rel) < 5e-2
    assert (f32.argmax(1) == q8k.argmax(1)).mean() >= 0.8


def test_the_keyword_beats_the_environment_and_none_keeps_it(tiny_models, monkeypatch):
    monkeypatch.setenv("MAGNETAR_EXPERT_ACT", "q8k")
    assert Engine.load(tiny_models("q2"), ctx=64).expert_activations == "q8k"
    assert Engine.load(tiny_models("q2"), ctx=64, expert_activations="f32").expert_activations == "f32"


def test_q8k_where_it_cannot_run_is_a_one_line_error(tiny_models, monkeypatch):
    with pytest.raises(UsageError, match="the reference backend has f32 only") as err:
        Engine.load(tiny_models("q2"), ctx=64, backend="reference", expert_activations="q8k")
    assert "\n" not in str(err.value) and "--expert-act f32" in str(err.value)
    with pytest.raises(UsageError, match="unknown expert activations 'int4' \\(choose f32, q8k or q8\\)"):
        Engine.load(tiny_models("q2"), ctx=64, expert_activations="int4")
    monkeypatch.setenv("MAGNETAR_NATIVE", "0")
    with pytest.raises(UsageError, match="native CPU kernels, which are off"):
        Engine.load(tiny_models("q2"), ctx=64, expert_activations="q8k")
    assert Engine.load(tiny_models("q2"), ctx=64, expert_activations="f32").expert_activations == "f32"


def _generate(capsys, model, *extra) -> tuple[int, str]:
    code = main(["generate", "-m", str(model), "-p", "Name three prime numbers.", "--nothink", "-n", "4",
                 "--temp", "0", *extra])
    return code, capsys.readouterr().err


def test_the_flag_reaches_the_engine(tiny_models, engines, capsys, tmp_path):
    """``generate --expert-act q8k`` dumps the logprobs the q8k engine gives, not the f32 one's."""
    dump = tmp_path / "lp.json"
    assert _generate(capsys, tiny_models("q2"), "--expert-act", "q8k", "--dump-logprobs", str(dump))[0] == 0
    data = json.loads(dump.read_text())
    ids, chosen = data["prompt_tokens"] + [s["token"] for s in data["steps"]], [s["token"] for s in data["steps"]]

    def logprobs(engine):
        logits = engine.logits(ids)[len(data["prompt_tokens"]) - 1:-1].astype(np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        return (shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)))[np.arange(len(chosen)), chosen]

    dumped = [s["logprob"] for s in data["steps"]]
    assert np.allclose(logprobs(engines["q8k"]), dumped, atol=1e-4)
    assert np.abs(logprobs(engines["f32"]) - dumped).max() > 1e-3


def test_a_bad_flag_value_is_one_line_and_a_non_zero_exit(tiny_models, capsys):
    code, err = _generate(capsys, tiny_models("q2"), "--expert-act", "int4")
    assert code == 2 and err == "magnetar: error: unknown expert activations 'int4' (choose f32, q8k or q8)\n"


def _saved_session(tmp_path, engine):
    store = SessionStore(tmp_path / "sessions")
    session = store.create(tmp_path, "tiny-q2")
    for m in MESSAGES:
        session.append(m)
    engine.reset()
    engine.prefill(engine.tokenizer.encode_pieces(
        chat.render(MESSAGES, None, "think", add_generation_prompt=False).pieces))
    session.save(engine)
    return session


def _no_replay(messages, progress):
    raise AssertionError("the checkpoint should have been restored, not the transcript replayed")


def test_a_session_resumed_in_the_other_mode_restores_and_warns(engines, tmp_path):
    session = _saved_session(tmp_path, engines["q8k"])
    assert ckpt.read_meta(session.checkpoint_path)["expert_activations"] == "q8k"
    saved = list(engines["q8k"].tokens)
    f32, notices = engines["f32"], []
    f32.reset()
    assert session.resume(f32, _no_replay, notice=notices.append) == "restored"
    assert f32.tokens == saved and f32.stats.prefill_tokens == 0
    assert len(notices) == 1 and notices[0].startswith("warning: ")
    assert "computed with q8k expert activations and this engine runs f32" in notices[0]
    assert len([ev.token for ev in f32.generate(max_tokens=3, temperature=0, ignore_eos=True)]) == 3  # it goes on
    quiet = []
    assert session.resume(engines["q8k"], _no_replay, notice=quiet.append) == "restored" and quiet == []


def test_a_checkpoint_without_the_key_reads_as_f32(engines, tmp_path):
    """Files written before the key: they restore, as f32 rows (the only mode then)."""
    session = _saved_session(tmp_path, engines["f32"])
    forge(session.checkpoint_path, change_meta=lambda meta: meta.pop("expert_activations"))
    assert "expert_activations" not in ckpt.read_meta(session.checkpoint_path)
    for mode, warned in (("f32", 0), ("q8k", 1)):
        notices = []
        assert session.resume(engines[mode], _no_replay, notice=notices.append) == "restored"
        assert len(notices) == warned and all("computed with f32" in line for line in notices)


@pytest.mark.parametrize("value", ["int4", ["q8k"], None])
def test_a_forged_mode_is_a_damaged_header(engines, tmp_path, value):
    session = _saved_session(tmp_path, engines["f32"])
    forge(session.checkpoint_path, change_meta=lambda meta: meta.update(expert_activations=value))
    with pytest.raises(ckpt.CheckpointError, match="damaged checkpoint header \\(expert_activations"):
        engines["f32"].restore(session.checkpoint_path)
