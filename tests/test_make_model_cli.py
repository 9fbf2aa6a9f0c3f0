"""make-model presets and the model-file commands, run through the real CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from magnetar.cli import main
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.layout import GGMLType


@pytest.mark.parametrize("recipe", ["f32", "f16", "q8", "q2", "q4"])
def test_tiny_every_recipe_loads_and_validates(tiny_models, recipe):
    m = open_model(tiny_models(recipe))
    assert m.recipe == recipe
    assert m.config.compress_ratios == [0, 0, 4, 128, 4]  # ratio 0, 4 and 128 layers
    assert m.config.hash_layers == 3 and m.config.n_layer == 5  # hash and routed MoE
    assert m.meta["deepseek4.expert_gating_func"] == 4  # what llama.cpp requires
    assert m.meta["tokenizer.ggml.model"] == "gpt2"


def test_one_seed_gives_the_same_weights_across_float_recipes(tiny_models):
    f32, f16, q8 = (open_model(tiny_models(r)) for r in ("f32", "f16", "q8"))
    name = "blk.2.attn_compressor_kv.weight"
    assert np.array_equal(f32.array(name).astype(np.float16), f16.array(name))
    import gguf
    q = gguf.quants.dequantize(q8.raw("blk.2.attn_kv.weight").reshape(128, -1), gguf.GGMLQuantizationType.Q8_0)
    ref = f32.array("blk.2.attn_kv.weight")
    assert np.abs(q - ref).max() < 0.01 * np.abs(ref).max()


def test_q2_experts_are_valid_blocks_with_unit_scaled_values(tiny_models):
    import gguf
    m = open_model(tiny_models("q2"))
    assert m.tensors["blk.3.ffn_gate_exps.weight"].ggml_type == GGMLType.IQ2_XXS
    assert m.tensors["blk.3.ffn_down_exps.weight"].ggml_type == GGMLType.Q2_K
    gate = gguf.quants.dequantize(m.raw("blk.3.ffn_gate_exps.weight").reshape(-1, 66),
                                  gguf.GGMLQuantizationType.IQ2_XXS)
    down = gguf.quants.dequantize(m.raw("blk.3.ffn_down_exps.weight").reshape(-1, 84),
                                  gguf.GGMLQuantizationType.Q2_K)
    for w, fan_in in ((gate, 256), (down, 256)):
        assert np.isfinite(w).all()
        assert np.sqrt(np.mean(w.astype(np.float64) ** 2)) == pytest.approx(fan_in ** -0.5, rel=0.1)
        assert abs(float(w.mean())) < 0.2 * fan_in ** -0.5


def test_small_preset_has_flash_schedule(preset_models):
    cfg = open_model(preset_models("small")).config
    assert cfg.n_layer == 43 and cfg.compress_ratios[:4] == [0, 0, 4, 128]
    assert cfg.compress_ratios[42] == 4 and cfg.compress_ratios[41] == 128


@pytest.mark.slow
def test_mini_flash_has_full_flash_widths(preset_models):
    m = open_model(preset_models("mini-flash"))
    cfg = m.config
    assert (cfg.d_model, cfg.n_head, cfg.head_dim, cfg.n_expert, cfg.expert_ffn) == (4096, 64, 512, 256, 2048)
    # One q2 routed expert layer is 1.812 GB (docs/spec/v4-model.md §7.1).
    layer = sum(m.tensors[f"blk.3.ffn_{p}_exps.weight"].nbytes for p in ("gate", "up", "down"))
    assert layer == 256 * 7_077_888


def test_mini_flash_refuses_float_recipes(tmp_path, capsys):
    assert main(["make-model", "--preset", "mini-flash", "--recipe", "f32", "-o", str(tmp_path / "x")]) == 2
    assert "use --recipe q2 or q4" in capsys.readouterr().err


def test_tokenize_prints_ids_then_count(tiny_models, capsys, v4_tokenizer):
    assert main(["tokenize", "-m", str(tiny_models("q8")), "-p", "Hello world"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [str(i) for i in v4_tokenizer.encode("Hello world")]
    assert out[-1] == "2 tokens"


def test_tokenize_chat_renders_the_template(tiny_models, capsys, v4_tokenizer, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("Hello")
    assert main(["tokenize", "-m", str(tiny_models("q8")), "--chat", "--nothink",
                 "--system", "You are terse.", "-p", f"@{prompt}"]) == 0
    ids = [int(x) for x in capsys.readouterr().out.splitlines()[0].split()]
    expected = ("<｜begin▁of▁sentence｜>You are terse.<｜User｜>Hello<｜Assistant｜></think>")
    assert ids == v4_tokenizer.encode_trusted(expected)


def test_tokenize_missing_prompt_file_is_a_one_line_error(tiny_models, capsys):
    assert main(["tokenize", "-m", str(tiny_models("q8")), "-p", "@/no/such/file"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("magnetar: error: cannot read prompt file") and err.count("\n") == 1


def test_inspect_shows_schedule_quant_mix_and_kv(tiny_models, capsys):
    assert main(["inspect", str(tiny_models("q2"))]) == 0
    out = capsys.readouterr().out
    for fragment in ("deepseek4", "recipe q2", "CSA", "HCA", "IQ2_XXS", "Q2_K", "Q8_0", "B/token"):
        assert fragment in out


def test_bad_model_through_the_installed_command_exits_nonzero_without_traceback(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    proc = subprocess.run([sys.executable, "-m", "magnetar.cli", "inspect", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("magnetar: error:") and proc.stderr.count("\n") == 1
