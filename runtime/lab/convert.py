"""Convert a transformers ``DeepseekV4ForCausalLM`` checkpoint to a ds4-layout GGUF.

Input: a folder with ``config.json``, ``*.safetensors`` (one file, or shards
listed in ``model.safetensors.index.json``; F32/F16/BF16 floats, I64/I32 for
the hash table) and optionally ``tokenizer.json`` (else the packaged V4 one).
Output: the file ``make-model`` writes, holding the checkpoint's weights,
written atomically by ``write_gguf``. Safetensors are parsed here (an 8-byte
header length, a JSON header, raw little-endian data) and read one tensor, or
one expert, at a time, so neither torch nor the whole model is needed.

What transformers 5.23 does (read in ``modeling_deepseek_v4.py``, checked by
saving a random model); the name table relies on it:

(a) KV norm: ``save_pretrained`` undoes HF's ``.norm. -> .kv_norm.`` rename, so the
    head_dim-wide (512) KV RMSNorm ``self_attn.kv_norm`` is saved as
    ``attn.norm.weight`` and the compressors' ``kv_norm`` as ``...compressor.norm``.
    The only top-level ``norm.weight`` is the final norm.
(b) Compressor: ``ape``/``position_bias`` is [ratio, cw] (cw = 2*hd at ratio 4, hd
    at 128; [4, 2*index_head_dim] for the indexer), added to the gate before a
    per-dimension softmax over the window. At ratio 4 the kv/gate outputs
    ``[..., :hd]`` (Ca) pool with the *next* window (ds4's lane A, slots 0..3)
    and ``[..., hd:]`` (Cb) with the current one (lane B, slots 4..7): ds4's
    layout (spec §3.5, §5.1), copied unchanged.
(c) HC: ``fn`` is [(2+hc)*hc, hc*D] over the stream-major flattened [hc, D]
    state; outputs split pre[hc], post[hc], comb[hc*hc] (row-major, comb[a][b] =
    m[2hc + hc*a + b], softmax over b); ``base`` splits alike, ``scale`` = (pre,
    post, comb). Head: ``hc_fn`` [hc, hc*D], ``hc_base`` [hc], ``hc_scale`` [1].
    ds4's order; no permutation.
(d) ``o_a_proj``/``wo_a`` is [G*O, H*hd/G]: group g = rows g*O..g*O+O-1, fed heads
    g*H/G..(g+1)*H/G-1 concatenated -- ds4's ne=[H*hd/G, G*O] as is.
(e) No transposes or permutations: torch [out, in] bytes are GGUF ne=[in, out].
    HF's RoPE (``rotate_half`` on x[0::2], x[1::2], cos/sin ``repeat_interleave``d)
    rotates interleaved pairs (x[2k], x[2k+1]) of each head's trailing rope_dim
    channels, ds4's convention, for q, kv, compressed rows and indexer q/k, so no
    rows of wq_b, wkv or compressor/indexer weights move. Fused ``gate_up_proj``
    [E, 2F, D] is gate = [:, :F], up = [:, F:] (``chunk(2)`` of its output),
    ``down_proj`` [E, D, F]; saved per-expert ``w1``/``w3``/``w2`` stack to the same.
    ``tid2eid`` [vocab, top_k] int64 -> I32. HF hash layers have no selection bias.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
from pydantic import ValidationError

from magnetar.kernels.quantize import quantize

from ..config import RATIOS, ModelConfig
from ..errors import ConvertError, GGUFError
from ..layout import BLOCK, GGMLType, TensorSpec, expected_tensors, type_for
from .gguf_write import TokenizerMeta, v4_tokenizer_meta, write_gguf
from .imatrix import Imatrix

CONVERT_RECIPES = ("f32", "f16", "q8", "q2", "q4")

# GGUF name <- checkpoint names, first present wins: the names save_pretrained
# writes (official DeepSeek suffixes), then transformers' in-memory names.
# Checkpoint names lose a leading "model."; "{e}" is one tensor per expert,
# stacked to [E, out, in]; "[:F]" / "[F:]" is the first / second half (out axis)
# of the fused [E, 2F, in] gate_up tensor.
GLOBAL_NAMES: dict[str, tuple[str, ...]] = {
    "token_embd.weight": ("embed_tokens.weight", "embed.weight"),
    "output_hc_fn.weight": ("hc_head.hc_fn", "hc_head_fn"),
    "output_hc_base.weight": ("hc_head.hc_base", "hc_head_base"),
    "output_hc_scale.weight": ("hc_head.hc_scale", "hc_head_scale"),
    "output_norm.weight": ("norm.weight",),
    "output.weight": ("head.weight", "lm_head.weight"),
}
# Per layer: "blk.{L}." + key <- "layers.{L}." + value.
LAYER_NAMES: dict[str, tuple[str, ...]] = {
    "hc_attn_fn.weight": ("hc_attn_fn", "attn_hc.fn"),
    "hc_attn_scale.weight": ("hc_attn_scale", "attn_hc.scale"),
    "hc_attn_base.weight": ("hc_attn_base", "attn_hc.base"),
    "attn_norm.weight": ("attn_norm.weight", "input_layernorm.weight"),
    "attn_q_a.weight": ("attn.wq_a.weight", "self_attn.q_a_proj.weight"),
    "attn_q_a_norm.weight": ("attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    "attn_q_b.weight": ("attn.wq_b.weight", "self_attn.q_b_proj.weight"),
    "attn_kv.weight": ("attn.wkv.weight", "self_attn.kv_proj.weight"),
    "attn_kv_a_norm.weight": ("attn.norm.weight", "attn.kv_norm.weight", "self_attn.kv_norm.weight"),
    "attn_sinks.weight": ("attn.attn_sink", "self_attn.sinks"),
    "attn_output_a.weight": ("attn.wo_a.weight", "self_attn.o_a_proj.weight"),
    "attn_output_b.weight": ("attn.wo_b.weight", "self_attn.o_b_proj.weight"),
    "attn_compressor_ape.weight": ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    "attn_compressor_kv.weight": ("attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight"),
    "attn_compressor_gate.weight": ("attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight"),
    "attn_compressor_norm.weight": ("attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight"),
    "indexer.attn_q_b.weight": ("attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight"),
    "indexer.proj.weight": ("attn.indexer.weights_proj.weight",
                            "self_attn.compressor.indexer.scorer.weights_proj.weight"),
    "indexer_compressor_ape.weight": ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    "indexer_compressor_kv.weight": ("attn.indexer.compressor.wkv.weight",
                                     "self_attn.compressor.indexer.kv_proj.weight"),
    "indexer_compressor_gate.weight": ("attn.indexer.compressor.wgate.weight",
                                       "self_attn.compressor.indexer.gate_proj.weight"),
    "indexer_compressor_norm.weight": ("attn.indexer.compressor.norm.weight",
                                       "self_attn.compressor.indexer.kv_norm.weight"),
    "hc_ffn_fn.weight": ("hc_ffn_fn", "ffn_hc.fn"),
    "hc_ffn_scale.weight": ("hc_ffn_scale", "ffn_hc.scale"),
    "hc_ffn_base.weight": ("hc_ffn_base", "ffn_hc.base"),
    "ffn_norm.weight": ("ffn_norm.weight", "post_attention_layernorm.weight"),
    "ffn_gate_inp.weight": ("ffn.gate.weight", "mlp.gate.weight"),
    "exp_probs_b.bias": ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    "ffn_gate_tid2eid.weight": ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
    "ffn_gate_exps.weight": ("ffn.experts.{e}.w1.weight", "mlp.experts.gate_up_proj[:F]"),
    "ffn_up_exps.weight": ("ffn.experts.{e}.w3.weight", "mlp.experts.gate_up_proj[F:]"),
    "ffn_down_exps.weight": ("ffn.experts.{e}.w2.weight", "mlp.experts.down_proj"),
    "ffn_gate_shexp.weight": ("ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight"),
    "ffn_up_shexp.weight": ("ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight"),
    "ffn_down_shexp.weight": ("ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight"),
}
IGNORED_PREFIXES = ("mtp.",)  # official checkpoints' MTP block; transformers drops it too

# ModelConfig field <- config.json key, with transformers' default (= Flash's value).
CONFIG_KEYS: tuple[tuple[str, str, Any], ...] = (
    ("n_layer", "num_hidden_layers", 43), ("d_model", "hidden_size", 4096),
    ("vocab_size", "vocab_size", 129280), ("context_length", "max_position_embeddings", 1_048_576),
    ("n_head", "num_attention_heads", 64), ("n_head_kv", "num_key_value_heads", 1),
    ("head_dim", "head_dim", 512), ("q_lora_rank", "q_lora_rank", 1024),
    ("o_lora_rank", "o_lora_rank", 1024), ("o_groups", "o_groups", 8),
    ("n_expert", "n_routed_experts", 256), ("n_expert_used", "num_experts_per_tok", 6),
    ("n_expert_shared", "n_shared_experts", 1), ("expert_ffn", "moe_intermediate_size", 2048),
    ("window", "sliding_window", 128), ("indexer_heads", "index_n_heads", 64),
    ("indexer_dim", "index_head_dim", 128), ("indexer_top_k", "index_topk", 512),
    ("hc", "hc_mult", 4), ("sinkhorn_iters", "hc_sinkhorn_iters", 20),
    ("hc_eps", "hc_eps", 1e-6), ("rms_eps", "rms_norm_eps", 1e-6),
    ("expert_weights_scale", "routed_scaling_factor", 1.5), ("expert_weights_norm", "norm_topk_prob", True),
)
LAYER_TYPE_RATIO = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map a transformers DeepseekV4 ``config.json`` to our ModelConfig (ConvertError if ds4 cannot run it)."""
    if hf.get("model_type", "deepseek_v4") != "deepseek_v4":
        raise ConvertError(f"config.json model_type is {hf['model_type']!r}, not 'deepseek_v4'")
    if hf.get("quantization_config"):
        raise ConvertError("quantized checkpoints (FP8/FP4) are not supported", "dequantize to bf16 first")
    for key, want in (("scoring_func", "sqrtsoftplus"), ("hidden_act", "silu")):
        if hf.get(key, want) != want:
            raise ConvertError(f"config.json {key} is {hf[key]!r}; ds4 runs {want!r} only")
    v: dict[str, Any] = {field: default if hf.get(key) is None else hf[key]
                         for field, key, default in CONFIG_KEYS}
    n, hd = v["n_layer"], v["head_dim"]
    v["value_dim"] = hd
    if v["n_expert_shared"] != 1:
        raise ConvertError(f"n_shared_experts is {v['n_expert_shared']}; transformers builds exactly one")
    prf = hf.get("partial_rotary_factor")
    if prf is None:  # legacy configs give the rope width directly
        prf = hf["qk_rope_head_dim"] / hd if hf.get("qk_rope_head_dim") else 64 / 512
    v["rope_dim"] = int(hd * prf)
    v["compress_ratios"] = _ratios(hf, n)
    v["hash_layers"] = _hash_layers(hf, n)
    v["swiglu_clamp"] = [float(hf.get("swiglu_limit", 10.0))] * n
    v.update(_rope(hf, v["context_length"]))
    try:
        return ModelConfig(**v).check()
    except GGUFError as err:
        raise ConvertError(f"config.json cannot be run: {err.message}") from None
    except ValidationError as err:
        bad = err.errors()[0]
        raise ConvertError(f"config.json: {'.'.join(map(str, bad['loc']))}: {bad['msg']}") from None


def _ratios(hf: dict[str, Any], n: int) -> list[int]:
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128, **(hf.get("compress_rates") or {})}
    for legacy, key in (("compress_rate_csa", "compressed_sparse_attention"),
                        ("compress_rate_hca", "heavily_compressed_attention")):
        rates[key] = hf.get(legacy) or rates[key]
    for key, rate in rates.items():  # ds4's compressors exist for 4 (two lanes) and 128 only
        if LAYER_TYPE_RATIO.get(key) != rate:
            raise ConvertError(f"compress_rates {key}={rate}; ds4 supports 4 (CSA) and 128 (HCA) only")
    if hf.get("layer_types"):
        types = list(hf["layer_types"])
        if len(types) < n or any(t not in LAYER_TYPE_RATIO for t in types[:n]):
            raise ConvertError(f"config.json layer_types {types} do not give {n} known layer types")
        return [LAYER_TYPE_RATIO[t] for t in types[:n]]
    if hf.get("compress_ratios"):  # legacy per-layer ints
        ratios = [int(r) for r in hf["compress_ratios"][:n]]
        if len(ratios) < n or any(r not in RATIOS for r in ratios):
            raise ConvertError(f"config.json compress_ratios {ratios} must give 0/4/128 for {n} layers")
        return ratios
    # transformers' default: the Pro schedule (two HCA, then HCA/CSA alternating)
    return [128] * min(n, 2) + [4 if i % 2 else 128 for i in range(max(n - 2, 0))]


def _hash_layers(hf: dict[str, Any], n: int) -> int:
    types = hf.get("mlp_layer_types")
    if not types:
        return min(n, int(hf.get("num_hash_layers", 3)))
    k = next((i for i, t in enumerate(types[:n]) if t != "hash_moe"), min(n, len(types)))
    if len(types) < n or any(t != "moe" for t in types[k:n]):  # ds4 hashes a prefix of layers
        raise ConvertError(f"mlp_layer_types {types} is not hash_moe layers followed by moe layers")
    return k


def _rope(hf: dict[str, Any], ctx: int) -> dict[str, Any]:
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main, comp = rp["main"], rp["compress"]
    else:  # flat (legacy), read as transformers does: the scaling is the compressed layers', thetas are top-level
        main = {"rope_theta": hf.get("rope_theta", 10000.0)}
        comp = {"attention_factor": 1.0, **rp, "rope_theta": hf.get("compress_rope_theta", 160000.0)}
    if main.get("rope_type", main.get("type", "default")) != "default":
        raise ConvertError("rope_parameters.main must be plain RoPE; ds4 scales only compressed layers")
    out = {"rope_base": float(main.get("rope_theta", hf.get("rope_theta", 10000.0))),
           "compress_rope_base": float(comp.get("rope_theta", hf.get("compress_rope_theta", 160000.0))),
           "yarn_factor": 1.0, "yarn_orig_ctx": ctx, "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0}
    kind = comp.get("rope_type", comp.get("type", "default"))
    if kind == "default":  # factor 1 makes ds4's YaRN formula plain RoPE
        return out
    if kind != "yarn":
        raise ConvertError(f"compressed-layer rope type {kind!r}; ds4 supports YaRN or none")
    orig = int(comp.get("original_max_position_embeddings") or ctx)
    factor = float(comp.get("factor") or ctx / orig)
    out.update(yarn_factor=factor, yarn_orig_ctx=orig, yarn_beta_fast=float(comp.get("beta_fast") or 32),
               yarn_beta_slow=float(comp.get("beta_slow") or 1))
    # ds4 never scales cos/sin; transformers does unless attention_factor (or mscale ratio) is 1
    attention = comp.get("attention_factor")
    if attention is None:
        def mscale(m: float) -> float:
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
        a, b = comp.get("mscale"), comp.get("mscale_all_dim")
        attention = mscale(a) / mscale(b) if a and b else mscale(1.0)
    if abs(float(attention) - 1.0) > 1e-6:
        raise ConvertError(f"YaRN attention_factor is {attention:.4g}; ds4 applies no YaRN magnitude scaling",
                           "set rope_parameters.compress.attention_factor to 1.0 if the model was trained so")
    return out


# --- safetensors -------------------------------------------------------------
# Our own reader, not the safetensors package's numpy API: that API cannot give BF16 (numpy
# has no bfloat16; V4 checkpoints are BF16), and reading every tensor of a 296 MB F32 tiny
# checkpoint as f32 took it 0.7-1.3 s and 379 MB above the imports, this reader 0.2-0.7 s
# and 128 MB (one tensor in memory at a time, no mapped file kept resident).

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32}
_INT_DTYPES = ("I64", "I32")


@dataclass(frozen=True)
class Source:
    name: str  # as stored in the file
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data

    def read(self, index: int | None = None) -> np.ndarray:
        """The tensor (or its slice ``index`` on axis 0) as f32, or int64 for integer tensors."""
        dt = np.dtype(_ST_DTYPES[self.dtype])
        shape, offset = self.shape, self.offset
        if index is not None:
            shape = shape[1:]
            offset += index * int(np.prod(shape)) * dt.itemsize
        count = int(np.prod(shape))
        a = np.fromfile(self.path, dtype=dt, count=count, offset=offset)
        if a.size != count:
            raise ConvertError(f"{self.path.name} is truncated inside tensor {self.name}")
        if self.dtype == "BF16":  # bf16 is the top half of an f32
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return a.reshape(shape).astype(np.int64 if self.dtype in _INT_DTYPES else np.float32, copy=False)


def scan_safetensors(folder: Path) -> dict[str, Source]:
    """Every tensor of the checkpoint by file name, from the headers only."""
    index = folder / "model.safetensors.index.json"
    try:
        weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    except (OSError, ValueError, KeyError) as err:
        raise ConvertError(f"cannot read {index.name}: {err}") from None
    files = sorted({folder / f for f in weight_map.values()} if weight_map else folder.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"no *.safetensors files in {folder}", "save the model with safe_serialization")
    out: dict[str, Source] = {}
    for path in files:
        try:
            with open(path, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
            for name, info in header.items():
                if name != "__metadata__":
                    out[name] = Source(name, path, info["dtype"], tuple(info["shape"]),
                                       8 + size + info["data_offsets"][0])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConvertError(f"cannot read safetensors file {path.name}: {err}") from None
    lost = sorted(set(weight_map or ()) - set(out))
    if lost:
        raise ConvertError(f"tensor {lost[0]} is listed in the index but in no shard")
    return out


# --- name resolution -----------------------------------------------------------

@dataclass(frozen=True)
class Item:  # one GGUF tensor and where its data comes from
    spec: TensorSpec
    ggml_type: GGMLType
    kind: str  # "one", "stack" (one source per expert) or "half" (of a fused gate_up)
    sources: tuple[Source, ...]
    half: int = 0


def _norm(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def resolve(cfg: ModelConfig, recipe: str, tensors: dict[str, Source], tied: bool = False) -> list[Item]:
    """Match every GGUF tensor to checkpoint tensors, checking presence, shape and dtype.
    ``tied``: the config ties the output head to the embedding."""
    by_norm = {_norm(k): s for k, s in tensors.items()}
    prefixed = any(k.startswith("model.") for k in tensors)
    used: set[str] = set()
    items = []
    for spec in expected_tensors(cfg):
        cands = _candidates(spec, tied)
        item = _resolve_one(spec, type_for(recipe, spec.role), cands, cfg, by_norm, prefixed)
        if item is None:
            if spec.optional:
                continue
            raise ConvertError(f"missing tensor {_shown(cands[0], prefixed)} (for {spec.name})",
                               "also looked for " + ", ".join(_shown(c, prefixed) for c in cands[1:]))
        used.update(s.name for s in item.sources)
        if not spec.optional:  # a hash layer's selection bias is read past, never written
            items.append(item)
    unused = sorted(n for n in set(tensors) - used if not _norm(n).startswith(IGNORED_PREFIXES))
    if unused:
        raise ConvertError(f"unused tensor {unused[0]}" + (f" (+{len(unused) - 1} more)" if len(unused) > 1 else ""),
                           "the checkpoint does not match its config.json or is not DeepSeek V4")
    return items


def _candidates(spec: TensorSpec, tied: bool) -> tuple[str, ...]:
    if spec.layer is None:
        tie = GLOBAL_NAMES["token_embd.weight"] if tied and spec.name == "output.weight" else ()
        return GLOBAL_NAMES[spec.name] + tie
    suffix = spec.name[len(f"blk.{spec.layer}."):]
    return tuple(f"layers.{spec.layer}.{c}" for c in LAYER_NAMES[suffix])


def _shown(cand: str, prefixed: bool) -> str:
    """A candidate name the way this checkpoint would spell it (the head has no "model.")."""
    return ("model." if prefixed and not cand.endswith("head.weight") else "") + cand


def _resolve_one(spec: TensorSpec, t: GGMLType, cands: tuple[str, ...], cfg: ModelConfig,
                 by_norm: dict[str, Source], prefixed: bool) -> Item | None:
    want = tuple(reversed(spec.shape))  # torch order
    for cand in cands:
        if "{e}" in cand:
            if cand.replace("{e}", "0") not in by_norm:
                continue
            srcs = []
            for e in range(cfg.n_expert):
                src = by_norm.get(cand.replace("{e}", str(e)))
                if src is None:
                    raise ConvertError(f"missing tensor {_shown(cand.replace('{e}', str(e)), prefixed)} "
                                       f"(expert {e} of {cfg.n_expert}, for {spec.name})")
                srcs.append(_check(src, want[1:], spec, t))
            return Item(spec, t, "stack", tuple(srcs))
        if cand.endswith(("[:F]", "[F:]")):
            src = by_norm.get(cand[:-4])
            if src is None:
                continue
            fused = (want[0], 2 * want[1], want[2])
            return Item(spec, t, "half", (_check(src, fused, spec, t),), half=int(cand.endswith("[F:]")))
        if cand in by_norm:
            return Item(spec, t, "one", (_check(by_norm[cand], want, spec, t),))
    return None


def _check(src: Source, shape: tuple[int, ...], spec: TensorSpec, t: GGMLType) -> Source:
    if src.dtype not in _ST_DTYPES:
        raise ConvertError(f"tensor {src.name} has dtype {src.dtype}; F32/F16/BF16 (I64/I32 for tid2eid) only",
                           "dequantize the checkpoint to bf16 first")
    if src.shape != shape:
        raise ConvertError(f"tensor {src.name} has shape {list(src.shape)}, expected {list(shape)} "
                           f"(for {spec.name})", "the checkpoint does not match its config.json")
    if (src.dtype in _INT_DTYPES) != (t == GGMLType.I32):
        raise ConvertError(f"tensor {src.name} has dtype {src.dtype}, unusable for {spec.name}")
    if spec.shape[0] % BLOCK[t][0]:
        raise ConvertError(f"{spec.name} rows of {spec.shape[0]} do not fill {t.name} blocks of "
                           f"{BLOCK[t][0]}", "use --recipe f16 or f32")
    return src


# --- data ----------------------------------------------------------------------

def _encode(a: np.ndarray, t: GGMLType, name: str, n_expert: int,
            importance: np.ndarray | None = None) -> np.ndarray:
    if t == GGMLType.I32:  # tid2eid: expert ids must index the expert tensors
        if a.size and (a.min() < 0 or a.max() >= n_expert):
            raise ConvertError(f"{name} holds expert ids outside 0..{n_expert - 1}")
        return a.astype(np.int32)
    if t == GGMLType.F32:
        return a
    if t == GGMLType.F16:
        with np.errstate(over="ignore"):
            h = a.astype(np.float16)
        if not np.isfinite(h).all() and np.isfinite(a).all():
            raise ConvertError(f"{name} has values beyond the f16 range", "use --recipe f32")
        return h
    if t == GGMLType.Q8_0:
        return gguf.quants.quantize(a.reshape(-1, a.shape[-1]), gguf.GGMLQuantizationType.Q8_0)
    if t in (GGMLType.Q2_K, GGMLType.Q4_K, GGMLType.IQ2_XXS):
        rows = np.asarray(a, np.float32).reshape(-1, a.shape[-1])
        return quantize(rows, t, importance)
    raise ConvertError(f"{name}: no encoder for {t.name}")


def _produce(item: Item, n_expert: int, imatrix: Imatrix | None = None) -> np.ndarray:
    t = item.ggml_type
    if item.kind == "one":
        return _encode(item.sources[0].read(), t, item.sources[0].name, n_expert)
    out = np.empty(0)
    for e in range(n_expert):  # one expert read at a time, encoded into the preallocated output
        src = item.sources[e if item.kind == "stack" else 0]
        a = src.read() if item.kind == "stack" else np.split(src.read(e), 2)[item.half]
        importance = imatrix.for_tensor(item.spec.name, a.shape[-1], e, n_expert) if imatrix else None
        if importance is not None and not importance.any():
            importance = None  # an expert no calibration token reached: weigh by its own weights
        enc = _encode(np.ascontiguousarray(a), t, src.name, n_expert, importance)
        out = out if e else np.empty((n_expert, *enc.shape), enc.dtype)
        out[e] = enc
    return out


def _tokenizer(folder: Path, vocab: int) -> TokenizerMeta:
    path = folder / "tokenizer.json"
    try:
        tok = v4_tokenizer_meta(path if path.is_file() else None)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConvertError(f"cannot read {path}: {err}", "remove it to use the packaged V4 tokenizer") from None
    n = len(tok.tokens)
    if path.is_file() and n < vocab:  # embedding padded past the tokenizer: fill with unused tokens
        tok.tokens += [f"<｜unused▁{i}｜>" for i in range(n, vocab)]
        tok.token_types += [5] * (vocab - n)
    elif n != vocab:
        which = "its tokenizer.json" if path.is_file() else "the packaged V4 tokenizer"
        raise ConvertError(f"config vocab_size {vocab} does not match the {n} tokens of {which}",
                           "add the model's tokenizer.json to the folder")
    return tok


def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike, recipe: str = "q8",
            progress: Callable[[int, int], None] | None = None, imatrix: Imatrix | None = None) -> Path:
    """Write ``out_path`` (a ds4-layout GGUF) from the transformers checkpoint folder ``hf_dir``.
    ``imatrix`` weights the routed experts' quantization error (q2/q4 recipes)."""
    if recipe not in CONVERT_RECIPES:
        raise ConvertError(f"unknown recipe {recipe!r}", f"choose one of {', '.join(CONVERT_RECIPES)}")
    folder = Path(hf_dir)
    try:
        hf = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise ConvertError(f"{folder} has no config.json", "point at a transformers checkpoint folder") from None
    except (OSError, ValueError) as err:
        raise ConvertError(f"cannot read {folder / 'config.json'}: {err}") from None
    cfg = model_config_from_hf(hf)
    tok = _tokenizer(folder, cfg.vocab_size)
    items = resolve(cfg, recipe, scan_safetensors(folder), tied=bool(hf.get("tie_word_embeddings")))
    by_name = {it.spec.name: it for it in items}

    def produce(spec: TensorSpec, ggml_type: GGMLType) -> np.ndarray:
        return _produce(by_name[spec.name], cfg.n_expert, imatrix)

    out = Path(out_path)
    extra = {"magnetar.recipe": recipe, "magnetar.source": "transformers"}
    if imatrix is not None:
        extra["magnetar.imatrix"] = Path(imatrix.path).name
    write_gguf(out, cfg, tok, [(it.spec, it.ggml_type) for it in items], produce,
               name=folder.resolve().name, extra=extra, progress=progress)
    return out
