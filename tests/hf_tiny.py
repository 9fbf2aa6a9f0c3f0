"""A tiny random transformers ``DeepseekV4ForCausalLM`` saved as a checkpoint folder.

Covers every layer kind of the Flash layout: two sliding layers, then CSA
(ratio 4), HCA (ratio 128), CSA; three hash-routed MoE layers, then top-k
routed ones. The vocabulary is V4's real 129280 so the packaged tokenizer
fits; widths are small but keep ds4's 64 rope dims inside 128-wide heads, and
every weight row is a multiple of 32 so Q8_0 works. All parameters and
buffers are drawn from one seeded generator with scales that keep a forward
pass O(1) (transformers zeroes many of them at init, which would hide
mapping mistakes).

Used by the converter tests and reusable by forward-pass comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

V4_VOCAB = 129280

TINY_HF: dict[str, Any] = dict(
    vocab_size=V4_VOCAB, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=5,
    num_attention_heads=2, num_key_value_heads=1, head_dim=128, partial_rotary_factor=0.5,
    q_lora_rank=32, o_groups=2, o_lora_rank=32,
    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
    layer_types=["sliding_attention", "sliding_attention", "compressed_sparse_attention",
                 "heavily_compressed_attention", "compressed_sparse_attention"],
    mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 2,
    sliding_window=8, index_n_heads=2, index_head_dim=128, index_topk=4,
    rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    max_position_embeddings=1_048_576,
)


@dataclass
class TinyHF:
    model: Any  # DeepseekV4ForCausalLM, in eval mode, float32
    config: Any  # DeepseekV4Config
    folder: Path  # save_pretrained output (config.json + model.safetensors)


def build_tiny_hf(folder: Path, seed: int = 0, **overrides: Any) -> TinyHF:
    """Build, randomize and ``save_pretrained`` the tiny model into ``folder``."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    config = DeepseekV4Config(**{**TINY_HF, **overrides})
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(config).eval()
    randomize(model, config, seed)
    model.save_pretrained(folder)
    return TinyHF(model, config, Path(folder))


@torch.no_grad()
def randomize(model: torch.nn.Module, config: Any, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std + mean

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("norm.weight"):
            v = normal(p.shape, 0.1, 1.0)
        elif leaf in ("scale", "hc_scale"):  # HC gains
            v = normal(p.shape, 0.1, 1.0).abs()
        elif leaf in ("base", "hc_base", "position_bias"):
            v = normal(p.shape, 0.5)
        elif leaf == "sinks":
            v = normal(p.shape, 1.0)
        elif name.endswith("embed_tokens.weight"):
            v = normal(p.shape, 1.0)
        elif p.dim() >= 2:  # projections (and fused experts): N(0, 1/fan_in)
            v = normal(p.shape, p.shape[-1] ** -0.5)
        else:
            raise AssertionError(f"no init rule for {name}")
        p.copy_(v)
    for name, b in model.named_buffers():
        if name.endswith("tid2eid"):  # distinct experts per token id
            keys = torch.rand(b.shape[0], config.n_routed_experts, generator=g)
            b.copy_(keys.argsort(dim=1)[:, : b.shape[1]])
        elif name.endswith("e_score_correction_bias"):
            b.copy_(normal(b.shape, 0.1))
