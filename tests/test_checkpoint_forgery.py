"""Checkpoints whose checksum is right but whose fields are forged (the trailer is
recomputed after the edit, as anyone can): every one is refused with a one-line
CheckpointError before anything is allocated from its sizes, and the engine's live
sequence stays as it was."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from magnetar.runtime import checkpoint as ckpt
from magnetar.runtime.engine import Engine

HEAD = struct.Struct("<8sII")
N = 150  # closes ratio-4 rows and one 128-token window


def forge(path, change_meta=None, change_body=None) -> None:
    """Rewrite ``path`` with its metadata and/or body changed and a correct SHA-256 trailer."""
    data = path.read_bytes()
    magic, version, n_meta = HEAD.unpack(data[:HEAD.size])
    meta = json.loads(data[HEAD.size:HEAD.size + n_meta])
    body = bytearray(data[HEAD.size + n_meta:-32])
    if change_meta:
        change_meta(meta)
    if change_body:
        change_body(body)
    blob = json.dumps(meta).encode()
    out = HEAD.pack(magic, version, len(blob)) + blob + bytes(body)
    path.write_bytes(out + hashlib.sha256(out).digest())


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(meta):
        target = meta
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return change


COMPRESSED = 2  # the tiny model's layers are ratios [0, 0, 4, 128, 4]
FORGERIES = {
    "n_tokens a string": _set("n_tokens", "150"),
    "n_tokens a float": _set("n_tokens", 150.0),
    "n_tokens a list": _set("n_tokens", [150]),
    "n_tokens true": _set("n_tokens", True),
    "n_tokens null": _set("n_tokens", None),
    "n_tokens negative": _set("n_tokens", -1),
    "n_tokens huge": _set("n_tokens", 10**12),
    "comp_capacity huge": _set("layers", COMPRESSED, "comp_capacity", 10**12),
    "comp_capacity negative": _set("layers", COMPRESSED, "comp_capacity", -64),
    "comp_capacity a string": _set("layers", COMPRESSED, "comp_capacity", "64"),
    "comp_capacity a list": _set("layers", COMPRESSED, "comp_capacity", [64]),
    "comp_capacity on an uncompressed layer": _set("layers", 0, "comp_capacity", 10**9),
    "comp_rows huge": _set("layers", COMPRESSED, "comp_rows", 10**12),
    "raw_rows negative": _set("layers", 0, "raw_rows", -5),
    "raw_rows a string": _set("layers", 0, "raw_rows", "32"),
    "ratio a string": _set("layers", COMPRESSED, "ratio", "4"),
    "a layer not an object": _set("layers", 1, 7),
    "a layer missing keys": _set("layers", 1, {}),
    "layers an object": _set("layers", {"0": 1}),
    "too few layers": lambda meta: meta["layers"].pop(),
    "head_dim another width": lambda meta: meta.update(head_dim=meta["head_dim"] * 2),
    "window a string": lambda meta: meta.update(window=str(meta["window"])),
    "vocab null": _set("vocab", None),
    "has_logits a string": _set("has_logits", "yes"),
    "identity a string": _set("identity", "deepseek4"),
    "identity a list": _set("identity", []),
}


@pytest.fixture(scope="module")
def engine(tiny_models) -> Engine:
    return Engine.load(tiny_models("q8"), ctx=1024)


@pytest.fixture(scope="module")
def saved(engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("forged") / "good.ckpt"
    engine.reset()
    engine.prefill([0] + np.random.default_rng(0).integers(2, 129280, N - 1).tolist())
    engine.checkpoint(path)
    return path.read_bytes()


@pytest.mark.parametrize("name", FORGERIES)
def test_forged_header_fields_are_refused_in_one_line(engine, saved, tmp_path, name):
    path = tmp_path / "forged.ckpt"
    path.write_bytes(saved)
    engine.restore(path)  # the untouched file loads
    live = list(engine.tokens)
    forge(path, change_meta=FORGERIES[name])
    with pytest.raises(ckpt.CheckpointError) as err:
        engine.restore(path)
    assert "\n" not in str(err.value)
    assert engine.tokens == live


@pytest.mark.parametrize("token", [129280, 0xFFFFFFFF])
def test_token_ids_outside_the_vocabulary_are_refused(engine, saved, tmp_path, token):
    path = tmp_path / "forged.ckpt"
    path.write_bytes(saved)
    forge(path, change_body=lambda body: body.__setitem__(slice(8, 12), struct.pack("<I", token)))
    with pytest.raises(ckpt.CheckpointError, match="vocabulary"):
        engine.restore(path)


def test_forge_helper_keeps_a_valid_file_valid(engine, saved, tmp_path):
    """The helper itself: rewriting without a change gives a file that loads."""
    path = tmp_path / "same.ckpt"
    path.write_bytes(saved)
    forge(path, change_meta=lambda meta: None)
    engine.restore(path)
    assert len(engine.tokens) == N
