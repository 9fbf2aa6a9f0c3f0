"""Our GGUF writer packs the tokenizer arrays in one pass: the bytes must be GGUFWriter's."""

from __future__ import annotations

import gguf

from magnetar.runtime.lab.gguf_write import _Writer, pack_array, v4_tokenizer_meta


def _metadata_file(cls, path, tok) -> bytes:
    w = cls(path, "deepseek4")
    w.add_array("tokenizer.ggml.tokens", tok.tokens)
    w.add_array("tokenizer.ggml.token_type", tok.token_types)
    w.add_array("tokenizer.ggml.merges", tok.merges)
    w.add_array("other.floats", [1.0, 2.5])  # not str/int lists: GGUFWriter's own packing
    w.add_array("other.bools", [True, False])
    w.add_string("other.name", "ünïcode")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path.read_bytes()


def test_real_tokenizer_arrays_pack_to_gguf_writers_bytes(tmp_path):
    tok = v4_tokenizer_meta()
    ours = _metadata_file(_Writer, tmp_path / "ours.gguf", tok)
    theirs = _metadata_file(gguf.GGUFWriter, tmp_path / "theirs.gguf", tok)
    assert ours == theirs


def test_mixed_or_other_lists_are_left_to_gguf_writer():
    assert pack_array([1, "a"]) is None
    assert pack_array([True, False]) is None  # bool is not int here: GGUF has a BOOL type
    assert pack_array([]) is None
    assert pack_array([1.5]) is None
