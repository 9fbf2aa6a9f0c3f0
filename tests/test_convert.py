"""``convert``: a random transformers DeepseekV4 checkpoint becomes a ds4-layout GGUF
whose tensors are the checkpoint's, bit for bit at f32."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_tiny import TinyHF, build_tiny_hf
from magnetar.runtime.config import ModelConfig
from magnetar.runtime.lab.convert import convert, model_config_from_hf
from magnetar.runtime.errors import ConvertError
from magnetar.runtime.gguf_read import ModelFile, open_model
from magnetar.runtime.layout import expected_tensors, type_for

# GGUF suffix -> transformers *in-memory* state-dict name (the converter reads
# the names save_pretrained writes, so this is an independent check of its table).
HF_LAYER = {
    "hc_attn_fn.weight": "attn_hc.fn", "hc_attn_scale.weight": "attn_hc.scale",
    "hc_attn_base.weight": "attn_hc.base", "attn_norm.weight": "input_layernorm.weight",
    "attn_q_a.weight": "self_attn.q_a_proj.weight", "attn_q_a_norm.weight": "self_attn.q_a_norm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight", "attn_kv.weight": "self_attn.kv_proj.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_norm.weight", "attn_sinks.weight": "self_attn.sinks",
    "attn_output_a.weight": "self_attn.o_a_proj.weight", "attn_output_b.weight": "self_attn.o_b_proj.weight",
    "attn_compressor_ape.weight": "self_attn.compressor.position_bias",
    "attn_compressor_kv.weight": "self_attn.compressor.kv_proj.weight",
    "attn_compressor_gate.weight": "self_attn.compressor.gate_proj.weight",
    "attn_compressor_norm.weight": "self_attn.compressor.kv_norm.weight",
    "indexer.attn_q_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "indexer.proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "indexer_compressor_ape.weight": "self_attn.compressor.indexer.position_bias",
    "indexer_compressor_kv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "indexer_compressor_gate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "indexer_compressor_norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "hc_ffn_fn.weight": "ffn_hc.fn", "hc_ffn_scale.weight": "ffn_hc.scale", "hc_ffn_base.weight": "ffn_hc.base",
    "ffn_norm.weight": "post_attention_layernorm.weight", "ffn_gate_inp.weight": "mlp.gate.weight",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias", "ffn_gate_tid2eid.weight": "mlp.gate.tid2eid",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
}
HF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight", "output_hc_fn.weight": "model.hc_head.hc_fn",
    "output_hc_base.weight": "model.hc_head.hc_base", "output_hc_scale.weight": "model.hc_head.hc_scale",
}


def hf_value(sd: dict[str, torch.Tensor], name: str) -> np.ndarray:
    """The HF values a GGUF tensor must hold, in torch [out, in] order (floats as f32)."""
    if name in HF_GLOBAL:
        t = sd[HF_GLOBAL[name]]
    else:
        _, layer, suffix = name.split(".", 2)
        prefix = f"model.layers.{layer}."
        if suffix in ("ffn_gate_exps.weight", "ffn_up_exps.weight"):
            gate_up = sd[prefix + "mlp.experts.gate_up_proj"]
            f = gate_up.shape[1] // 2
            t = gate_up[:, :f] if suffix.startswith("ffn_gate") else gate_up[:, f:]
        else:
            t = sd[prefix + HF_LAYER[suffix]]
    return (t.float() if t.is_floating_point() else t).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyHF:
    return build_tiny_hf(tmp_path_factory.mktemp("hf") / "tiny-v4")


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {r: convert(tiny.folder, out / f"tiny-{r}.gguf", r) for r in ("f32", "q8")}


def values(model: ModelFile, name: str) -> np.ndarray:
    """A tensor's values in torch order, Q8_0 dequantized."""
    info = model.tensors[name]
    data = np.asarray(info.data)
    if info.ggml_type == gguf.GGMLQuantizationType.Q8_0:
        data = gguf.quants.dequantize(data.reshape(-1, 34), gguf.GGMLQuantizationType.Q8_0)
    return data.reshape(tuple(reversed(info.shape)))


def test_config_mapping(tiny):
    cfg = model_config_from_hf(json.loads((tiny.folder / "config.json").read_text()))
    assert cfg == ModelConfig(
        n_layer=5, d_model=64, vocab_size=129280, context_length=1_048_576, n_head=2, n_head_kv=1,
        head_dim=128, value_dim=128, rope_dim=64, q_lora_rank=32, o_lora_rank=32, o_groups=2,
        n_expert=4, n_expert_used=2, n_expert_shared=1, expert_ffn=32, hash_layers=3, window=8,
        indexer_heads=2, indexer_dim=128, indexer_top_k=4, hc=4, sinkhorn_iters=20,
        compress_ratios=[0, 0, 4, 128, 4], swiglu_clamp=[10.0] * 5, yarn_orig_ctx=65536,
        rope_base=10000.0, yarn_factor=16.0, yarn_beta_fast=32.0, yarn_beta_slow=1.0,
        compress_rope_base=160000.0, expert_weights_scale=1.5, rms_eps=1e-6, hc_eps=1e-6,
        expert_weights_norm=True)


def planned(tiny: TinyHF, recipe: str) -> list[tuple[str, list[int], int]]:
    cfg = model_config_from_hf(json.loads((tiny.folder / "config.json").read_text()))
    return [(s.name, list(s.shape), int(type_for(recipe, s.role)))
            for s in expected_tensors(cfg) if not s.optional]


@pytest.mark.slow  # gguf's reader spends ~12 s parsing the 129280-token vocabulary
def test_gguf_reader_sees_expected_layout(tiny, converted):
    reader = gguf.GGUFReader(converted["q8"])
    got = [(t.name, [int(d) for d in t.shape], int(t.tensor_type)) for t in reader.tensors]
    assert got == planned(tiny, "q8")

    def field(key: str):
        return reader.fields[key].contents()

    assert field("general.name") == "tiny-v4"
    assert field("deepseek4.attention.compress_ratios") == [0, 0, 4, 128, 4]
    assert field("deepseek4.hash_layer_count") == 3
    assert field("deepseek4.rope.dimension_count") == 64
    assert field("deepseek4.rope.scaling.factor") == 16.0
    assert field("deepseek4.expert_weights_scale") == 1.5
    assert len(field("tokenizer.ggml.tokens")) == 129280


@pytest.mark.parametrize("recipe", ["f32", "q8"])
def test_strict_reader_accepts_output(tiny, converted, recipe):
    model = open_model(converted[recipe])  # our ds4-strict reader: names, shapes, types, metadata
    got = [(n, list(t.shape), int(t.ggml_type)) for n, t in model.tensors.items()]
    assert got == planned(tiny, recipe)
    assert model.recipe == recipe
    want = model_config_from_hf(json.loads((tiny.folder / "config.json").read_text())).model_dump()
    have = model.config.model_dump()
    for eps in ("rms_eps", "hc_eps"):  # stored as f32
        assert have.pop(eps) == pytest.approx(want.pop(eps))
    assert have == want


def test_f32_values_equal_hf_state_dict(tiny, converted):
    sd = tiny.model.state_dict()
    model = open_model(converted["f32"])
    for name in model.tensors:  # every tensor, all kinds incl. stacked experts, ape, tid2eid
        got, want = values(model, name), hf_value(sd, name)
        assert got.shape == want.shape, name
        assert got.dtype == (np.int32 if name.endswith("tid2eid.weight") else np.float32), name
        assert np.array_equal(got, want), name
    # spot checks of the layouts named in the spec, not just whole-tensor equality
    down = values(model, "blk.3.ffn_down_exps.weight")
    assert np.array_equal(down[2], sd["model.layers.3.mlp.experts.down_proj"][2].numpy())
    gate = values(model, "blk.4.ffn_gate_exps.weight")
    assert np.array_equal(gate[1], sd["model.layers.4.mlp.experts.gate_up_proj"][1, :32].numpy())
    ape = values(model, "blk.3.attn_compressor_ape.weight")
    assert ape.shape == (128, 128)
    assert np.array_equal(ape, sd["model.layers.3.self_attn.compressor.position_bias"].numpy())
    assert np.array_equal(values(model, "blk.1.ffn_gate_tid2eid.weight")[12345],
                          sd["model.layers.1.mlp.gate.tid2eid"][12345].numpy())
    assert "blk.0.exp_probs_b.bias" not in model.tensors and "blk.3.exp_probs_b.bias" in model.tensors


def test_q8_values_close_to_hf(tiny, converted):
    sd = tiny.model.state_dict()
    model = open_model(converted["q8"])
    for name in ("blk.2.attn_q_b.weight", "blk.4.ffn_up_exps.weight", "output.weight"):
        assert model.tensors[name].ggml_type == gguf.GGMLQuantizationType.Q8_0
        want = hf_value(sd, name).reshape(-1, 32)  # Q8_0 blocks
        err = np.abs(values(model, name).reshape(-1, 32) - want).max(axis=-1)
        step = np.abs(want).max(axis=-1) / 127  # half a step, plus the f16 rounding of the scale
        assert (err <= 0.6 * step + 1e-7).all(), name
    name = "blk.2.indexer_compressor_ape.weight"  # an F16 role stays F16 in q8
    assert model.tensors[name].ggml_type == gguf.GGMLQuantizationType.F16
    assert np.array_equal(values(model, name), hf_value(sd, name).astype(np.float16))


def test_in_memory_names_bf16_sharded(tiny, converted, tmp_path):
    """transformers' in-memory names (fused gate_up, self_attn.*, lm_head), stored
    as bf16 across two shards with an index, convert to the same layout."""
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
          for k, v in tiny.model.state_dict().items()}
    names = sorted(sd)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: sd[k] for k in keys}, tmp_path / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(tiny.folder / "config.json", tmp_path / "config.json")
    model = open_model(convert(tmp_path, tmp_path / "bf16.gguf", "f32"))
    assert [(n, list(t.shape), int(t.ggml_type)) for n, t in model.tensors.items()] == planned(tiny, "f32")
    for name in model.tensors:
        assert np.array_equal(values(model, name), hf_value(sd, name)), name


@pytest.mark.parametrize("recipe", ["q2", "q4"])
def test_low_bit_recipes_need_rows_of_256(tiny, tmp_path, recipe):
    with pytest.raises(ConvertError, match="do not fill .* blocks of 256") as err:
        convert(tiny.folder, tmp_path / "x.gguf", recipe)
    assert err.value.exit_code != 0
    assert not (tmp_path / "x.gguf").exists()


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> TinyHF:
    """The tiny model at widths the 256-value K/IQ blocks can hold."""
    return build_tiny_hf(tmp_path_factory.mktemp("hf") / "wide-v4", hidden_size=256, moe_intermediate_size=256)


@pytest.mark.parametrize("recipe", ["q2", "q4"])
def test_low_bit_recipes_quantize_each_expert(wide, tmp_path, recipe):
    """Every routed expert is the quantizer's output for that expert's weights; with an
    imatrix, the importance of that expert's slice (packed as ds4 packs it)."""
    from magnetar.kernels import GGMLType
    from magnetar.kernels.quantize import quantize
    from magnetar.runtime.lab.imatrix import Imatrix, write_dat

    cfg = open_model(convert(wide.folder, tmp_path / "f32.gguf", "f32")).config
    name = "blk.3.ffn_gate_exps.weight"
    imp = np.random.default_rng(0).gamma(1.0, size=cfg.n_expert * cfg.d_model).astype(np.float32)
    write_dat(tmp_path / "m.dat", {name: (1, imp)})
    out = convert(wide.folder, tmp_path / f"{recipe}.gguf", recipe, imatrix=Imatrix.read(tmp_path / "m.dat"))
    mf = open_model(out)
    assert mf.meta["magnetar.imatrix"] == "m.dat"
    gate = GGMLType.IQ2_XXS if recipe == "q2" else GGMLType.Q4_K
    assert mf.tensors[name].ggml_type == gate
    source = np.asarray(open_model(tmp_path / "f32.gguf").array(name), np.float32)  # [E, F, D]
    stored = np.asarray(mf.tensors[name].data).reshape(cfg.n_expert, cfg.expert_ffn, -1)
    for e in range(cfg.n_expert):
        expected = quantize(source[e], gate, imp[e * cfg.d_model:(e + 1) * cfg.d_model])
        assert np.array_equal(stored[e], expected)
    down = mf.tensors["blk.3.ffn_down_exps.weight"]
    assert down.ggml_type == (GGMLType.Q2_K if recipe == "q2" else GGMLType.Q4_K)


@pytest.fixture(scope="module")
def saved_tensors(tiny) -> dict[str, torch.Tensor]:
    return load_file(tiny.folder / "model.safetensors")


def broken_copy(tiny: TinyHF, tensors: dict[str, torch.Tensor], folder: Path) -> Path:
    shutil.copy(tiny.folder / "config.json", folder / "config.json")
    save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.3.attn.wq_a.weight"), "missing tensor model.layers.3.attn.wq_a.weight"),
    (lambda t: t.pop("model.layers.4.ffn.experts.3.w2.weight"),
     "missing tensor model.layers.4.ffn.experts.3.w2.weight"),
    (lambda t: t.pop("head.weight"), "missing tensor head.weight"),
    (lambda t: t.update({"model.layers.2.attn.compressor.ape": t["model.layers.2.attn.compressor.ape"].T.contiguous()}),
     r"tensor model.layers.2.attn.compressor.ape has shape \[256, 4\], expected \[4, 256\]"),
    (lambda t: t.update({"model.layers.0.attn.bogus": torch.zeros(3)}), "unused tensor model.layers.0.attn.bogus"),
    (lambda t: t.update({"model.layers.1.ffn.gate.tid2eid": t["model.layers.1.ffn.gate.tid2eid"] + 4}),
     "model.layers.1.ffn.gate.tid2eid holds expert ids outside 0..3"),
])
def test_broken_checkpoints_name_the_tensor(tiny, saved_tensors, tmp_path, edit, message):
    tensors = dict(saved_tensors)
    edit(tensors)
    with pytest.raises(ConvertError, match=message):
        convert(broken_copy(tiny, tensors, tmp_path), tmp_path / "x.gguf", "f32")
    assert not (tmp_path / "x.gguf").exists()


def test_vocab_must_match_packaged_tokenizer(tiny, tmp_path):
    cfg = json.loads((tiny.folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 1000}))
    with pytest.raises(ConvertError, match="vocab_size 1000 does not match the 129280 tokens"):
        convert(tmp_path, tmp_path / "x.gguf", "f32")


@pytest.mark.parametrize("change, message", [
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"compress_rates": {"compressed_sparse_attention": 8}}, "compress_rates"),
    ({"mlp_layer_types": ["moe", "hash_moe", "moe", "moe", "moe"]}, "mlp_layer_types"),
    ({"num_key_value_heads": 2}, "one shared KV head"),
])
def test_unsupported_configs(tiny, change, message):
    cfg = json.loads((tiny.folder / "config.json").read_text())
    with pytest.raises(ConvertError, match=message):
        model_config_from_hf({**cfg, **change})


def test_yarn_magnitude_scaling_refused(tiny):
    cfg = json.loads((tiny.folder / "config.json").read_text())
    rp = json.loads(json.dumps(cfg["rope_parameters"]))
    del rp["compress"]["attention_factor"]  # transformers would then scale cos/sin by ~1.28
    with pytest.raises(ConvertError, match="attention_factor"):
        model_config_from_hf({**cfg, "rope_parameters": rp})


def test_convert_command_writes_a_loadable_model(tiny, tmp_path, capsys):
    from magnetar.cli import main

    out = tmp_path / "cli.gguf"
    assert main(["convert", str(tiny.folder), "-o", str(out), "--recipe", "f16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert open_model(out).recipe == "f16"
    assert main(["convert", str(tiny.folder), "-o", str(out), "--recipe", "q2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("magnetar: error: blk.0.ffn_gate_exps.weight rows of 64 do not fill IQ2_XXS blocks of 256")
    assert err.count("\n") == 1
    assert main(["convert", str(tiny.folder), "-o", str(out), "--recipe", "q2", "--imatrix", str(tmp_path / "no.dat")]) == 2
    assert capsys.readouterr().err.startswith("magnetar: error: cannot read imatrix")
