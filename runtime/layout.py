"""The ds4 tensor layout: every tensor's name, GGUF shape and storage role.

Shapes are in GGUF order (``ne``: innermost first, so a weight is ``[in,
out]``), matching docs/spec/v4-model.md §2.3 with Flash's numbers replaced by the
config's. A *role* says how a tensor may be stored; a *recipe* maps roles to
GGML types. The reader, ``make-model`` and ``convert`` all use this one table,
so a file we write is by construction a file we accept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from magnetar.kernels import BLOCK, GGMLType  # one table of GGML types and block sizes

from .config import ModelConfig

# numpy dtype of the plain (unblocked) types; the rest are raw uint8 blocks.
NUMPY_DTYPE = {GGMLType.F32: np.float32, GGMLType.F16: np.float16, GGMLType.I32: np.int32}

# Roles: "f32" norms/biases/scales/sinks, "i32" the hash table, "f16" the
# tensors ds4 keeps in half (embedding, HC, router, compressor, indexer),
# "q8" attention/shared-expert/output projections, and the three routed
# expert tensors.
EXPERT_ROLES = ("gate_exps", "up_exps", "down_exps")

_T = GGMLType
# The expert triples ds4 accepts per layer: q2 (IQ2_XXS gate/up, Q2_K down)
# and q4 (Q4_K everywhere). Our own high-precision recipes add q8/f16/f32.
EXPERT_TRIPLES = {
    "q2": (_T.IQ2_XXS, _T.IQ2_XXS, _T.Q2_K),
    "q4": (_T.Q4_K, _T.Q4_K, _T.Q4_K),
    "q8": (_T.Q8_0, _T.Q8_0, _T.Q8_0),
    "f16": (_T.F16, _T.F16, _T.F16),
    "f32": (_T.F32, _T.F32, _T.F32),
}
RECIPES = tuple(EXPERT_TRIPLES)

# Non-expert types per recipe family. q2/q4/q8 share ds4's mix exactly.
_BASE_TYPES = {
    "ds4": {"f32": _T.F32, "i32": _T.I32, "f16": _T.F16, "q8": _T.Q8_0},
    "f16": {"f32": _T.F32, "i32": _T.I32, "f16": _T.F16, "q8": _T.F16},
    "f32": {"f32": _T.F32, "i32": _T.I32, "f16": _T.F32, "q8": _T.F32},
}


def base_family(recipe: str) -> str:
    return recipe if recipe in ("f16", "f32") else "ds4"


def type_for(recipe: str, role: str) -> GGMLType:
    if role in EXPERT_ROLES:
        return EXPERT_TRIPLES[recipe][EXPERT_ROLES.index(role)]
    return _BASE_TYPES[base_family(recipe)][role]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # GGUF ne order
    role: str
    layer: int | None = None
    optional: bool = False  # ds4 tolerates it; we never write it

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def tensor_nbytes(shape: tuple[int, ...], ggml_type: GGMLType) -> int:
    elems, nbytes = BLOCK[ggml_type]
    n = 1
    for d in shape:
        n *= d
    return n // elems * nbytes


def expected_tensors(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor of a ds4-layout file for ``cfg``, in the order we write them."""
    D, V, hc = cfg.d_model, cfg.vocab_size, cfg.hc
    out = [
        TensorSpec("token_embd.weight", (D, V), "f16"),
        TensorSpec("output_hc_fn.weight", (hc * D, hc), "f16"),
        TensorSpec("output_hc_base.weight", (hc,), "f32"),
        TensorSpec("output_hc_scale.weight", (1,), "f32"),
        TensorSpec("output_norm.weight", (D,), "f32"),
        TensorSpec("output.weight", (D, V), "q8"),
    ]
    for il in range(cfg.n_layer):
        out += layer_tensors(cfg, il)
    return out


def layer_tensors(cfg: ModelConfig, il: int) -> list[TensorSpec]:
    D, hd, H, hc = cfg.d_model, cfg.head_dim, cfg.n_head, cfg.hc
    F, E, Fs = cfg.expert_ffn, cfg.n_expert, cfg.expert_ffn * cfg.n_expert_shared
    G, O = cfg.o_groups, cfg.o_lora_rank
    p = f"blk.{il}."

    def t(name: str, shape: tuple[int, ...], role: str, optional: bool = False) -> TensorSpec:
        return TensorSpec(p + name, shape, role, il, optional)

    ts = [
        t("hc_attn_fn.weight", (hc * D, cfg.hc_mix), "f16"),
        t("hc_attn_scale.weight", (3,), "f32"),
        t("hc_attn_base.weight", (cfg.hc_mix,), "f32"),
        t("attn_norm.weight", (D,), "f32"),
        t("attn_q_a.weight", (D, cfg.q_lora_rank), "q8"),
        t("attn_q_a_norm.weight", (cfg.q_lora_rank,), "f32"),
        t("attn_q_b.weight", (cfg.q_lora_rank, H * hd), "q8"),
        t("attn_kv.weight", (D, hd), "q8"),
        t("attn_kv_a_norm.weight", (hd,), "f32"),
        t("attn_sinks.weight", (H,), "f32"),
        # Grouped output: group g projects its H/G heads (H*hd/G wide) to O.
        t("attn_output_a.weight", (H * hd // G, G * O), "q8"),
        t("attn_output_b.weight", (G * O, D), "q8"),
    ]
    ratio = cfg.ratio(il)
    if ratio:
        cw = (2 if ratio == 4 else 1) * hd  # ratio 4 pools two overlapping lanes
        ts += [
            t("attn_compressor_ape.weight", (cw, ratio), "f16"),
            t("attn_compressor_kv.weight", (D, cw), "f16"),
            t("attn_compressor_gate.weight", (D, cw), "f16"),
            t("attn_compressor_norm.weight", (hd,), "f32"),
        ]
    if ratio == 4:
        Ih, Id = cfg.indexer_heads, cfg.indexer_dim
        ts += [
            t("indexer.attn_q_b.weight", (cfg.q_lora_rank, Ih * Id), "f16"),
            t("indexer.proj.weight", (D, Ih), "f16"),
            t("indexer_compressor_ape.weight", (2 * Id, 4), "f16"),
            t("indexer_compressor_kv.weight", (D, 2 * Id), "f16"),
            t("indexer_compressor_gate.weight", (D, 2 * Id), "f16"),
            t("indexer_compressor_norm.weight", (Id,), "f32"),
        ]
    ts += [
        t("hc_ffn_fn.weight", (hc * D, cfg.hc_mix), "f16"),
        t("hc_ffn_scale.weight", (3,), "f32"),
        t("hc_ffn_base.weight", (cfg.hc_mix,), "f32"),
        t("ffn_norm.weight", (D,), "f32"),
        t("ffn_gate_inp.weight", (D, E), "f16"),
    ]
    if cfg.is_hash_layer(il):
        # Hash layers route by token id; the selection bias is unused there
        # and llama.cpp refuses it, so we never write it (ds4 tolerates it).
        ts += [
            t("ffn_gate_tid2eid.weight", (cfg.n_expert_used, cfg.vocab_size), "i32"),
            t("exp_probs_b.bias", (E,), "f32", optional=True),
        ]
    else:
        ts.append(t("exp_probs_b.bias", (E,), "f32"))
    ts += [
        t("ffn_gate_exps.weight", (D, F, E), "gate_exps"),
        t("ffn_up_exps.weight", (D, F, E), "up_exps"),
        t("ffn_down_exps.weight", (F, D, E), "down_exps"),
        t("ffn_gate_shexp.weight", (D, Fs), "q8"),
        t("ffn_up_shexp.weight", (D, Fs), "q8"),
        t("ffn_down_shexp.weight", (Fs, D), "q8"),
    ]
    return ts
