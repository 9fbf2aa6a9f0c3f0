"""Checkpoints: a sequence's KV state in a file, to continue it with zero re-processing.

A checkpoint holds what docs/spec/v4-model.md §5.1 lists (the token ids, the
next-token logits, per layer the raw window rows in position order, the closed
compressed and indexer rows and the compressor frontiers) and who may load it:
the model's identity, the precision its rows were made with, the context and
prefill chunk size. The byte layout is in docs/checkpoint.md. Rows are stored
as the exact float32 values the engine holds, so a restored sequence continues
bit for bit; sizes follow the tokens used (about 2·head_dim·4 bytes per token per
compressed layer ÷ ratio), never ``--ctx``.

Files are written atomically (temp + fsync + rename) and end with a SHA-256 of
everything before it; ``read`` checks that before trusting a single field.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from magnetar.kernels.backend import EXPERT_ACTIVATIONS

from .errors import MagnetarError
from .fileio import atomic_writer
from .gguf_read import ModelFile
from .kv_state import GROW_QUANTUM, KVState, LayerState, empty_frontier, lanes

MAGIC = b"MAGNETKV"
VERSION = 1
_HEAD = struct.Struct("<8sII")  # magic, version, metadata byte count
_DIGEST = 32  # trailing SHA-256
_SAMPLED_TENSORS = ("token_embd.weight", "output.weight", "blk.0.attn_q_a.weight")
_SAMPLE_BYTES = 1 << 16  # from each end of each sampled tensor
_PLAN_KEYS = ("ratio", "raw_rows", "comp_rows", "comp_capacity")


class CheckpointError(MagnetarError):
    """A checkpoint file is damaged, from another version, or made for another model."""


def model_identity(mf: ModelFile, precision: str) -> dict:
    """What a checkpoint must match to be loaded: the tensor layout, a fingerprint of
    the weights (two different seeds of one layout must not mix) and the precision."""
    layout = hashlib.sha256()
    for name in sorted(mf.tensors):
        info = mf.tensors[name]
        layout.update(f"{name}:{int(info.ggml_type)}:{list(info.shape)};".encode())
    weights = hashlib.sha256()
    for name in _SAMPLED_TENSORS:
        raw = mf.raw(name) if name in mf.tensors else np.zeros(0, np.uint8)
        weights.update(raw[:_SAMPLE_BYTES].tobytes() + raw[-_SAMPLE_BYTES:].tobytes())
    return {"architecture": mf.meta.get("general.architecture", "deepseek4"), "recipe": mf.recipe,
            "layout_sha256": layout.hexdigest(), "weights_sha256": weights.hexdigest(), "precision": precision}


@dataclass
class Checkpoint:
    """A loaded checkpoint: the state (its arrays on MLX), the logits and the header fields."""

    state: KVState
    logits: np.ndarray | None
    meta: dict
    hotness: dict[int, np.ndarray] | None = None  # route hotness of a streaming engine, per layer
    expert_activations: str = "f32"  # the routed experts' activations its rows were computed with


def _layer_plan(st: LayerState, n_tokens: int, window: int) -> dict:
    n_comp = n_tokens // st.ratio if st.ratio else 0
    return {"ratio": st.ratio, "raw_rows": min(n_tokens, window), "comp_rows": n_comp,
            "comp_capacity": 0 if st.comp is None else int(st.comp.shape[0])}


def _layer_arrays(st: LayerState, plan: dict, n_tokens: int, window: int) -> list[np.ndarray]:
    """The layer's rows in file order: raw (oldest first), then compressed, frontier, indexer."""
    raw = np.asarray(st.raw, np.float32)
    live = plan["raw_rows"]
    parts = [raw[[(p % window) for p in range(n_tokens - live, n_tokens)]]]
    if st.ratio:
        n = plan["comp_rows"]
        parts += [np.asarray(st.comp[:n], np.float32), np.asarray(st.f_kv), np.asarray(st.f_sc)]
    if st.ratio == 4:
        parts += [np.asarray(st.index[:n], np.float32), np.asarray(st.i_kv), np.asarray(st.i_sc)]
    return parts


def write(path: str | os.PathLike, state: KVState, logits: np.ndarray | None, identity: dict,
          prefill_chunk: int, note: str = "", hotness: dict[int, np.ndarray] | None = None,
          expert_activations: str = "f32") -> int:
    """Write ``state`` (and the logits of the token after it) to ``path``; returns the bytes written.
    ``note`` is kept in the header (why it was saved, for listings). ``hotness``: a streaming
    engine's route hotness per layer, kept so a resume can warm its expert cache.
    ``expert_activations``: the mode the rows were computed with, so a resume can say it differs."""
    cfg, n = state.cfg, state.n_tokens
    mx.eval(state.arrays())
    plans = [_layer_plan(st, n, cfg.window) for st in state.layers]
    meta = {"identity": identity, "ctx": state.ctx, "prefill_chunk": prefill_chunk, "n_tokens": n,
            "window": cfg.window, "head_dim": cfg.head_dim, "indexer_dim": cfg.indexer_dim,
            "vocab": cfg.vocab_size, "has_logits": logits is not None, "layers": plans,
            "saved_unix": int(time.time()), "note": note, "expert_activations": expert_activations}
    if hotness is not None:  # optional: readers that predate it ignore it
        meta["expert_hotness"] = {str(il): [[int(e), float(h[e])] for e in np.flatnonzero(h > 0)]
                                  for il, h in hotness.items()}
    blob = json.dumps(meta, separators=(",", ":")).encode()
    digest, size = hashlib.sha256(), 0
    with atomic_writer(path) as fh:
        def put(data: bytes | np.ndarray) -> None:
            nonlocal size
            if isinstance(data, np.ndarray):  # as bytes, so lengths count bytes; no copy
                data = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
            digest.update(data)
            fh.write(data)
            size += len(data)

        put(_HEAD.pack(MAGIC, VERSION, len(blob)) + blob)
        put(np.asarray(state.tokens, "<u4").tobytes())
        if logits is not None:
            put(np.asarray(logits, "<f4"))
        for st, plan in zip(state.layers, plans):
            for part in _layer_arrays(st, plan, n, cfg.window):
                put(np.asarray(part, "<f4"))
        fh.write(digest.digest())
    return size + _DIGEST


def read_meta(path: str | os.PathLike) -> dict:
    """The header of a checkpoint (cheap: no checksum pass, no rows)."""
    with open(path, "rb") as fh:
        _, _, n_meta = _unpack_head(fh.read(_HEAD.size), path)
        return _parse_meta(fh.read(n_meta), path)


def _unpack_head(head: bytes, path) -> tuple[bytes, int, int]:
    if len(head) < _HEAD.size or head[:8] != MAGIC:
        raise CheckpointError(f"{path} is not a magnetar checkpoint")
    magic, version, n_meta = _HEAD.unpack(head)
    if version != VERSION:
        raise CheckpointError(f"{path} is checkpoint version {version}; this magnetar reads version {VERSION}",
                              "re-create it from the session transcript")
    return magic, version, n_meta


def _parse_meta(blob: bytes, path) -> dict:
    try:
        meta = json.loads(blob)
        if not isinstance(meta, dict) or not isinstance(meta.get("layers"), list):
            raise ValueError("no layer table")
        return meta
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: damaged checkpoint header ({err})") from None


def read(path: str | os.PathLike, cfg, identity: dict, ctx: int) -> Checkpoint:
    """Load and verify ``path`` for a model of ``identity`` running with context ``ctx``."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:  # mapped, so a long session's rows are never held twice
            data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(fh.fileno()).st_size else b""
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    _, _, n_meta = _unpack_head(data[:_HEAD.size], path)
    if len(data) < _HEAD.size + n_meta + _DIGEST:
        raise CheckpointError(f"{path} is truncated")
    if _sha256(data, len(data) - _DIGEST) != data[-_DIGEST:]:
        raise CheckpointError(f"{path} is damaged (checksum mismatch): truncated or altered")
    meta = _parse_meta(data[_HEAD.size:_HEAD.size + n_meta], path)
    _check_compatible(meta, cfg, identity, ctx, path)
    hotness = _hotness(meta.get("expert_hotness"), cfg, path)
    activations = meta.get("expert_activations", "f32")  # files that predate the key: f32, the only mode then
    if activations not in EXPERT_ACTIVATIONS:
        raise CheckpointError(f"{path}: damaged checkpoint header (expert_activations is not one of "
                              f"{', '.join(EXPERT_ACTIVATIONS)})")
    body = _Reader(data, _HEAD.size + n_meta, len(data) - _DIGEST, path)
    n = meta["n_tokens"]
    ids = body.take("<u4", (n,))
    if n and int(ids.max()) >= cfg.vocab_size:
        raise CheckpointError(f"{path} holds token id {int(ids.max())}, outside the vocabulary (0..{cfg.vocab_size - 1})")
    tokens = ids.astype(np.int64).tolist()
    logits = body.take("<f4", (cfg.vocab_size,)).copy() if meta["has_logits"] else None
    state = KVState.empty(cfg, ctx)
    state.tokens = tokens
    for st, plan in zip(state.layers, meta["layers"]):
        _restore_layer(st, plan, body, n, cfg)
    if body.at != body.end:
        raise CheckpointError(f"{path} has {body.end - body.at} unexpected trailing bytes")
    mx.eval(state.arrays())
    return Checkpoint(state, logits, meta, hotness, activations)


def _sha256(data, end: int) -> bytes:
    digest, view = hashlib.sha256(), memoryview(data)
    for at in range(0, end, 64 << 20):
        digest.update(view[at:min(at + (64 << 20), end)])
    view.release()
    return digest.digest()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_compatible(meta: dict, cfg, identity: dict, ctx: int, path) -> None:
    """Every header field the reader uses has the right type and fits this model and context
    (a file with a recomputed checksum can hold anything): checked before any allocation."""
    saved = meta.get("identity")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: damaged checkpoint header (no model identity)")
    for key, what in (("architecture", "architecture"), ("layout_sha256", "tensor layout"),
                      ("weights_sha256", "weights"), ("recipe", "quantization recipe")):
        if saved.get(key) != identity[key]:
            raise CheckpointError(f"{path} was made for another model ({what} differs)",
                                  "resume it with the model it was made with")
    if saved.get("precision") != identity["precision"]:
        raise CheckpointError(f"{path} holds {saved.get('precision')}-precision rows; this engine runs "
                              f"{identity['precision']}", f"load the model with precision={saved.get('precision')}")
    shape = tuple(meta.get(k) for k in ("window", "head_dim", "indexer_dim", "vocab")) + (len(meta["layers"]),)
    if not all(map(_is_int, shape)) or shape != (cfg.window, cfg.head_dim, cfg.indexer_dim, cfg.vocab_size, cfg.n_layer):
        raise CheckpointError(f"{path}: state shapes {shape} do not fit this model")
    n = meta.get("n_tokens")
    if not _is_int(n) or n < 0:
        raise CheckpointError(f"{path}: damaged checkpoint header (token count {n!r})")
    if n > ctx:
        raise CheckpointError(f"{path} holds {n} tokens; the context is {ctx}", f"load with ctx of at least {n}")
    if not isinstance(meta.get("has_logits"), bool):
        raise CheckpointError(f"{path}: damaged checkpoint header (has_logits {meta.get('has_logits')!r})")
    plans = meta["layers"]
    if not all(isinstance(p, dict) and all(_is_int(p.get(k)) for k in _PLAN_KEYS) for p in plans):
        raise CheckpointError(f"{path}: damaged checkpoint header (a layer entry is not {'/'.join(_PLAN_KEYS)} integers)")
    if [p["ratio"] for p in plans] != [cfg.ratio(il) for il in range(cfg.n_layer)]:
        raise CheckpointError(f"{path}: the layers' compression ratios differ from this model's")
    for il, plan in enumerate(plans):
        r = plan["ratio"]
        if plan["raw_rows"] != min(n, cfg.window) or plan["comp_rows"] != (n // r if r else 0):
            raise CheckpointError(f"{path}: row counts disagree with its token count")
        # The most rows this engine could have allocated for n tokens (KVState.reserve grows
        # geometrically up to ctx // ratio + 1; a writer with a longer context up to 2x need).
        most = max(ctx // r + 1, 2 * (n // r + 1) + GROW_QUANTUM) if r else 0
        if not plan["comp_rows"] <= plan["comp_capacity"] <= most:
            raise CheckpointError(f"{path}: layer {il} claims a capacity of {plan['comp_capacity']} rows "
                                  f"(this model and context allow {plan['comp_rows']}..{most})")


def _hotness(table, cfg, path) -> dict[int, np.ndarray] | None:
    """``expert_hotness`` ({"layer": [[expert, hotness], ...]}) as per-layer arrays, every
    layer and expert in range and every value finite and positive; None when absent."""
    if table is None:
        return None
    bad = CheckpointError(f"{path}: damaged checkpoint header (expert_hotness is not "
                          f"{{layer: [[expert, hotness], ...]}} within {cfg.n_layer} layers of {cfg.n_expert} experts)")
    if not isinstance(table, dict):
        raise bad
    out = {}
    for key, pairs in table.items():
        if not (key.isascii() and key.isdigit() and int(key) < cfg.n_layer and isinstance(pairs, list)):
            raise bad
        hot = out[int(key)] = np.zeros(cfg.n_expert, np.float64)
        for pair in pairs:
            if not (isinstance(pair, list) and len(pair) == 2 and _is_int(pair[0]) and 0 <= pair[0] < cfg.n_expert
                    and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool)
                    and 0 < pair[1] < float("inf")):
                raise bad
            hot[pair[0]] = pair[1]
    return out


class _Reader:
    """Consecutive typed slices of the body; running past the end is a damaged file."""

    def __init__(self, data: bytes, start: int, end: int, path):
        self.data, self.at, self.end, self.path = data, start, end, path

    def take(self, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self.at + n > self.end:
            raise CheckpointError(f"{self.path} is damaged: its rows run past the end of the file")
        out = np.frombuffer(self.data, dtype, count=n // np.dtype(dtype).itemsize, offset=self.at).reshape(shape)
        self.at += n
        return out


def _restore_layer(st: LayerState, plan: dict, body: _Reader, n_tokens: int, cfg) -> None:
    window, hd = cfg.window, cfg.head_dim
    live = plan["raw_rows"]  # the plan was checked against the tokens (_check_compatible)
    raw = np.zeros((window, hd), np.float32)
    raw[[(p % window) for p in range(n_tokens - live, n_tokens)]] = body.take("<f4", (live, hd))
    st.raw = mx.array(raw)
    if not st.ratio:
        return
    # The same capacity as when saved: buffer shapes pick the compiled graph and the
    # BLAS blocking, and a bit-exact continuation needs both to be the same.
    n, cap = plan["comp_rows"], plan["comp_capacity"]
    st.comp = _rows(body.take("<f4", (n, hd)), cap)
    frontier = empty_frontier(st.ratio, lanes(st.ratio) * hd)[0].shape
    st.f_kv, st.f_sc = (mx.array(body.take("<f4", frontier)) for _ in range(2))
    if st.ratio == 4:
        st.index = _rows(body.take("<f4", (n, cfg.indexer_dim)), cap)
        shape = empty_frontier(4, 2 * cfg.indexer_dim)[0].shape
        st.i_kv, st.i_sc = (mx.array(body.take("<f4", shape)) for _ in range(2))


def _rows(rows: np.ndarray, capacity: int) -> mx.array:
    out = np.zeros((capacity, rows.shape[1]), np.float32)
    out[:len(rows)] = rows
    return mx.array(out)
