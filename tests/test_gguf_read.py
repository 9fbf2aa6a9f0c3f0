"""The GGUF reader: valid files load; every kind of bad file gives its one-line error."""

from __future__ import annotations

import dataclasses
import struct

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from magnetar.runtime.errors import GGUFError, MagnetarError
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.layout import GGMLType

from micro_model import micro_config, write_micro


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return write_micro(tmp_path_factory.mktemp("micro") / "micro.gguf")


def test_micro_model_loads_with_config_from_metadata(micro):
    m = open_model(micro)
    assert m.config.n_layer == 5 and m.config.d_model == 64
    assert m.config.compress_ratios == [0, 0, 4, 128, 4]
    assert m.recipe == "f32"
    assert m.array("blk.0.ffn_gate_tid2eid.weight").shape == (320, 2)
    assert "blk.0.exp_probs_b.bias" not in m.tensors  # hash layers carry no bias


def test_header_walk_equals_gguf_reader(tiny_models):
    """Our mmap header walk agrees with gguf.GGUFReader on every key and tensor."""
    path = tiny_models("q2")
    ours = open_model(path)
    ref = gguf.GGUFReader(path)
    for name, field in ref.fields.items():
        if not name.startswith("GGUF."):
            want = field.contents()
            got = ours.meta[name]
            assert got == pytest.approx(want) if isinstance(want, float) else got == want, name
    assert len(ref.tensors) == len(ours.tensors)
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes
        assert info.shape == tuple(int(d) for d in t.shape)
        assert np.array_equal(ours.raw(t.name), np.asarray(t.data).reshape(-1).view(np.uint8))


def test_raw_is_a_view_of_the_file_not_a_copy(tiny_models):
    m = open_model(tiny_models("q2"))
    raw = m.raw("blk.3.ffn_gate_exps.weight")
    assert raw.dtype == np.uint8 and not raw.flags.owndata
    assert raw.nbytes == 8 * 256 * 256 // 256 * 66  # experts x rows x blocks/row x 66 B


def _expect(path, fragment):
    with pytest.raises(GGUFError) as err:
        open_model(path)
    assert fragment in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_text("hello, this is not a model\n")
    _expect(p, "not a GGUF file")


def test_missing_file(tmp_path):
    _expect(tmp_path / "nope.gguf", "no such model file")


def test_truncated_inside_header(micro, tmp_path):
    p = tmp_path / "t.gguf"
    p.write_bytes(micro.read_bytes()[:2000])
    _expect(p, "truncated")


def test_truncated_tensor_data(micro, tmp_path):
    p = tmp_path / "t.gguf"
    data = micro.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    _expect(p, "truncated GGUF: tensor")


def test_unsupported_version(micro, tmp_path):
    p = tmp_path / "v2.gguf"
    data = bytearray(micro.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    p.write_bytes(bytes(data))
    _expect(p, "unsupported GGUF version 2")


def test_wrong_architecture(micro, tmp_path):
    p = tmp_path / "arch.gguf"
    # general.architecture is the first key, so its value is the first match.
    p.write_bytes(micro.read_bytes().replace(b"deepseek4", b"deepseek3", 1))
    _expect(p, "wrong architecture 'deepseek3'")


def test_missing_metadata_key(micro, tmp_path):
    p = tmp_path / "key.gguf"
    p.write_bytes(micro.read_bytes().replace(b"attention.sliding_window", b"attention.sliding_windoX"))
    _expect(p, "missing metadata key deepseek4.attention.sliding_window")


@pytest.mark.parametrize("override, fragment", [
    ({"n_head_kv": 2}, "one shared KV head"),
    ({"value_dim": 64}, "key_length 128 != value_length 64"),
    ({"compress_ratios": [0, 0, 4, 128]}, "compress_ratios has 4 entries for 5 layers"),
    ({"compress_ratios": [0, 0, 4, 64, 4]}, "may only hold 0, 4 and 128"),
    ({"o_groups": 3}, "do not split into 3 output groups"),
    ({"n_expert_used": 9}, "expert_used_count 9 > expert_count 4"),
    ({"hash_layers": 6}, "hash_layer_count 6 > block_count 5"),
])
def test_inconsistent_metadata(tmp_path, override, fragment):
    p = write_micro(tmp_path / "m.gguf", meta_cfg=micro_config(**override))
    _expect(p, fragment)


def test_missing_tensor(tmp_path):
    p = write_micro(tmp_path / "m.gguf",
                    edit_plan=lambda plan: [x for x in plan if x[0].name != "blk.2.indexer.proj.weight"])
    _expect(p, "missing tensor blk.2.indexer.proj.weight")


def test_unexpected_tensor(tmp_path):
    def add(plan):
        spec = dataclasses.replace(plan[0][0], name="blk.0.mystery.weight")
        return plan + [(spec, GGMLType.F32)]
    _expect(write_micro(tmp_path / "m.gguf", edit_plan=add), "unexpected tensor blk.0.mystery.weight")


def test_bias_on_a_hash_layer_is_tolerated_like_ds4(tmp_path):
    def add(plan):
        bias = dataclasses.replace(next(s for s, _ in plan if s.name == "blk.3.exp_probs_b.bias"),
                                   name="blk.0.exp_probs_b.bias", layer=0)
        return plan + [(bias, GGMLType.F32)]
    assert open_model(write_micro(tmp_path / "m.gguf", edit_plan=add)).config.hash_layers == 3


def test_wrong_shape(tmp_path):
    def reshape(plan):
        return [(dataclasses.replace(s, shape=(64, 96)) if s.name == "blk.1.attn_kv.weight" else s, t)
                for s, t in plan]
    _expect(write_micro(tmp_path / "m.gguf", edit_plan=reshape),
            "tensor blk.1.attn_kv.weight has shape [64, 96], expected [64, 128]")


def test_wrong_type(tmp_path):
    def retype(plan):
        return [(s, GGMLType.F16 if s.name == "blk.1.attn_kv.weight" else t) for s, t in plan]
    _expect(write_micro(tmp_path / "m.gguf", recipe="q8", edit_plan=retype),
            "tensor blk.1.attn_kv.weight is F16, expected Q8_0")


def test_q2_and_q4_expert_layouts_are_accepted_and_mixed(tmp_path):
    cfg = micro_config(d_model=256, expert_ffn=256)

    def mix(plan):  # layer 4 gets q4 experts, like ds4's mixed file
        return [(s, GGMLType.Q4_K if s.layer == 4 and "_exps" in s.name else t) for s, t in plan]
    m = open_model(write_micro(tmp_path / "m.gguf", recipe="q2", cfg=cfg, edit_plan=mix))
    assert m.expert_recipes == ["q2", "q2", "q2", "q2", "q4"] and m.recipe == "mixed"


def test_half_q2_half_q4_expert_triple_is_refused(tmp_path):
    cfg = micro_config(d_model=256, expert_ffn=256)

    def bad(plan):
        return [(s, GGMLType.Q4_K if s.name == "blk.3.ffn_down_exps.weight" else t) for s, t in plan]
    _expect(write_micro(tmp_path / "m.gguf", recipe="q2", cfg=cfg, edit_plan=bad),
            "layer 3 routed experts are IQ2_XXS/IQ2_XXS/Q4_K")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_or_truncated_headers_only_raise_magnetar_errors(micro, tmp_path, data):
    blob = bytearray(micro.read_bytes())
    header_end = 6000  # covers the counts, every key and the tensor infos
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="cut")]
    for _ in range(data.draw(st.integers(0, 8), label="flips")):
        if not blob:
            break
        i = data.draw(st.integers(0, min(header_end, len(blob)) - 1), label="pos")
        blob[i] = data.draw(st.integers(0, 255), label="byte")
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(bytes(blob))
    try:
        open_model(p)
    except MagnetarError as err:
        assert str(err) and "\n" not in str(err)
