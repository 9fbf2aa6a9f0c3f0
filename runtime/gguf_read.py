"""Open and validate a ds4-layout DeepSeek V4 GGUF, strictly, like ds4 does.

The file is memory-mapped; quantized tensors stay raw block bytes (``raw()``,
zero-copy views of the map), never dequantized wholesale. Validation checks
the container (magic, version, truncation), every metadata key ds4 reads,
and every tensor's name, type and shape against ``layout.expected_tensors``
built from the file's own dimensions — so small test models of the same
layout load through the same path. Every failure is a one-line ``GGUFError``.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelConfig
from .errors import GGUFError
from .layout import (BLOCK, EXPERT_ROLES, EXPERT_TRIPLES, NUMPY_DTYPE, GGMLType,
                     base_family, expected_tensors, tensor_nbytes, type_for)
from .tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSION = 3


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]  # GGUF ne order
    nbytes: int
    offset: int  # absolute byte offset in the file
    data: np.ndarray  # memmap view: typed for F32/F16/I32, uint8 blocks otherwise


class ModelFile:
    """A validated V4 GGUF. ``config``, ``recipe``, ``tensors``, ``meta``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"no such model file: {self.path}", "pass an existing .gguf path")
        header = _Header(self.path)
        self.meta = header.meta
        self.config = ModelConfig.from_metadata(self.meta)
        self.tensors = _tensor_table(header)
        self.expert_recipes = _validate_tensors(self.config, self.tensors)
        self._check_tokenizer()

    @property
    def recipe(self) -> str:
        """q2, q4, q8, f16 or f32; "mixed" when layers differ (ds4's q2+q4 file)."""
        kinds = set(self.expert_recipes)
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (a memmap view, no copy)."""
        return self._info(name).data.reshape(-1).view(np.uint8)

    def array(self, name: str) -> np.ndarray:
        """An F32/F16/I32 tensor as a typed memmap view, torch shape order."""
        info = self._info(name)
        if info.ggml_type not in (GGMLType.F32, GGMLType.F16, GGMLType.I32):
            raise GGUFError(f"tensor {name} is {info.ggml_type.name}; use raw() for quantized data")
        return info.data.reshape(tuple(reversed(info.shape)))

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"model has no tensor {name}") from None

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_metadata(self.meta)

    def _check_tokenizer(self) -> None:
        tokens = self.meta.get("tokenizer.ggml.tokens")
        merges = self.meta.get("tokenizer.ggml.merges")
        if not isinstance(tokens, list) or not isinstance(merges, list):
            raise GGUFError("missing tokenizer.ggml.tokens / tokenizer.ggml.merges",
                            "rebuild the file with its tokenizer")
        if len(tokens) > self.config.vocab_size:
            raise GGUFError(f"inconsistent metadata: {len(tokens)} tokens but vocab_size "
                            f"{self.config.vocab_size}")


def open_model(path: str | os.PathLike) -> ModelFile:
    return ModelFile(path)


class _Header:
    """GGUF v3 header parsed straight from the mmap.

    Why not ``gguf.GGUFReader``: it builds numpy views per array element and
    takes ~14 s on the 258k tokenizer strings of every V4 file; this walk
    takes well under a second. Tests cross-check it against GGUFReader.
    """

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f",
                7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    _STRING, _ARRAY = 8, 9

    def __init__(self, path: Path):
        self.name = path.name
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 8:
                raise GGUFError(f"not a GGUF file: {path.name} is only {size} bytes")
            self.buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        self.pos = 0
        try:
            self._parse()
        except struct.error:
            raise GGUFError(f"truncated GGUF: {path.name} ends inside the header") from None

    def _parse(self) -> None:
        magic = self.buf[:4]
        if magic != GGUF_MAGIC:
            raise GGUFError(f"not a GGUF file: {self.name} (magic {magic!r}, expected b'GGUF')")
        self.pos = 4
        version = self._unpack("<I")
        if version != SUPPORTED_VERSION:
            raise GGUFError(f"unsupported GGUF version {version} in {self.name}; "
                            "this runtime reads v3")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        # Every record takes at least 8 bytes, so larger counts are corruption.
        if n_tensors > self.size // 8 or n_kv > self.size // 8:
            raise GGUFError(f"truncated or corrupt GGUF: {self.name} declares {n_tensors} tensors "
                            f"and {n_kv} keys, which cannot fit in {self.size} bytes")
        self.meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            if key in self.meta:
                raise GGUFError(f"corrupt GGUF header in {self.name}: duplicate key {key}")
            self.meta[key] = self._value(self._unpack("<I"))
        self.infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I")
            if not 1 <= n_dims <= 4:
                raise GGUFError(f"corrupt GGUF header in {self.name}: tensor {name!r} has {n_dims} dims")
            dims = tuple(self._unpack("<Q") for _ in range(n_dims))
            self.infos.append((name, dims, self._unpack("<I"), self._unpack("<Q")))
        align = self.meta.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFError(f"corrupt GGUF header in {self.name}: alignment {align!r}")
        self.data_start = -(-self.pos // align) * align

    def _unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        if n > self.size - self.pos:
            raise struct.error("string past end")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"corrupt GGUF header in {self.name}: a string is not UTF-8") from None

    def _value(self, vtype: int) -> Any:
        if vtype in self._SCALARS:
            return self._unpack(self._SCALARS[vtype])
        if vtype == self._STRING:
            return self._string()
        if vtype == self._ARRAY:
            sub, count = self._unpack("<I"), self._unpack("<Q")
            if count > self.size - self.pos:
                raise struct.error("array past end")
            if sub == self._STRING:
                return [self._string() for _ in range(count)]
            if sub in self._SCALARS:
                fmt = self._SCALARS[sub]
                width = struct.calcsize(fmt)
                if count * width > self.size - self.pos:
                    raise struct.error("array past end")
                items = np.frombuffer(self.buf, np.dtype(fmt), count, self.pos).tolist()
                self.pos += count * width
                return items
        raise GGUFError(f"corrupt GGUF header in {self.name}: unknown value type {vtype}")


def _tensor_table(header: _Header) -> dict[str, TensorInfo]:
    out: dict[str, TensorInfo] = {}
    for name, dims, raw_type, rel in header.infos:
        try:
            ggml_type = GGMLType(raw_type)
        except ValueError:
            raise GGUFError(f"tensor {name} has GGML type {raw_type}, which no V4 file uses") from None
        if name in out:
            raise GGUFError(f"corrupt GGUF header: duplicate tensor {name}")
        if dims[0] % BLOCK[ggml_type][0]:
            raise GGUFError(f"tensor {name}: row length {dims[0]} is not a multiple "
                            f"of the {ggml_type.name} block")
        nbytes = tensor_nbytes(dims, ggml_type)
        start = header.data_start + rel
        if start + nbytes > header.size:
            raise GGUFError(f"truncated GGUF: tensor {name} ends at byte {start + nbytes} "
                            f"but the file has {header.size}")
        data = np.frombuffer(header.buf, np.uint8, nbytes, start)
        if ggml_type in NUMPY_DTYPE:
            data = data.view(NUMPY_DTYPE[ggml_type])
        out[name] = TensorInfo(name, ggml_type, dims, nbytes, start, data)
    return out


def _validate_tensors(cfg: ModelConfig, tensors: dict[str, TensorInfo]) -> list[str]:
    """Check names, shapes and types; return the expert recipe of each layer."""
    specs = expected_tensors(cfg)
    known = {s.name for s in specs}
    for name in tensors:
        if name not in known:
            raise GGUFError(f"unexpected tensor {name}", "not a ds4-layout V4 file?")
    for spec in specs:
        info = tensors.get(spec.name)
        if info is None:
            if spec.optional:
                continue
            raise GGUFError(f"missing tensor {spec.name}")
        if info.shape != spec.shape:
            raise GGUFError(f"tensor {spec.name} has shape {list(info.shape)}, "
                            f"expected {list(spec.shape)}")
    probe = tensors["blk.0.attn_q_a.weight"]
    family = _FAMILY_OF_PROJECTION_TYPE.get(probe.ggml_type)
    if family is None:
        raise GGUFError(f"tensor {probe.name} is {probe.ggml_type.name}, expected Q8_0, F16 or F32")
    expert_recipes = []
    for il in range(cfg.n_layer):
        triple = tuple(tensors[f"blk.{il}.ffn_{r}.weight"].ggml_type for r in EXPERT_ROLES)
        recipe = next((r for r, tr in EXPERT_TRIPLES.items()
                       if tr == triple and base_family(r) == family), None)
        if recipe is None:
            names = "/".join(t.name for t in triple)
            raise GGUFError(f"layer {il} routed experts are {names}; with {family} base "
                            f"tensors expected {_triples_for(family)}")
        expert_recipes.append(recipe)
    for spec in specs:
        info = tensors.get(spec.name)
        if info is None or spec.role in EXPERT_ROLES:
            continue
        want = type_for(expert_recipes[0], spec.role)
        if info.ggml_type != want:
            raise GGUFError(f"tensor {spec.name} is {info.ggml_type.name}, expected {want.name}")
    return expert_recipes


# The attention projections' type tells the recipe family (ds4's mix, or
# one of our all-f16 / all-f32 reference recipes).
_FAMILY_OF_PROJECTION_TYPE = {GGMLType.Q8_0: "ds4", GGMLType.F16: "f16", GGMLType.F32: "f32"}


def _triples_for(family: str) -> str:
    return ", ".join("/".join(t.name for t in tr) for r, tr in EXPERT_TRIPLES.items()
                     if base_family(r) == family)


__all__ = ["ModelFile", "TensorInfo", "open_model"]
