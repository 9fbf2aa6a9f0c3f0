"""A complete, valid V4 GGUF of a few hundred KB for reader tests and fuzzing.

Same layout as the real model (every layer kind), tiny widths and a 320-token
toy vocabulary, so a file is written and parsed in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from magnetar.runtime.config import ModelConfig
from magnetar.runtime.lab.gguf_write import TokenizerMeta, write_gguf
from magnetar.runtime.layout import GGMLType, TensorSpec, expected_tensors, tensor_nbytes, type_for
from magnetar.runtime.lab.make_model import random_tensor
from magnetar.runtime.tokenizer import CONTROL_STRINGS, byte_to_unicode

MICRO = dict(
    n_layer=5, d_model=64, vocab_size=320, n_head=2, head_dim=128, value_dim=128, rope_dim=64,
    q_lora_rank=32, o_lora_rank=32, o_groups=2, n_expert=4, n_expert_used=2, expert_ffn=32,
    hash_layers=3, window=8, indexer_heads=2, indexer_dim=128, indexer_top_k=4,
    compress_ratios=[0, 0, 4, 128, 4], swiglu_clamp=[10.0] * 5,
)


def micro_config(**over) -> ModelConfig:
    # model_construct skips check(), so tests can write inconsistent metadata.
    return ModelConfig.model_construct(**{**ModelConfig(**MICRO).model_dump(), **over})


def micro_tokenizer() -> TokenizerMeta:
    tokens = list(byte_to_unicode().values()) + ["Ġt"] + list(CONTROL_STRINGS)
    types = [1] * 257 + [3] * len(CONTROL_STRINGS)
    return TokenizerMeta(tokens=tokens, merges=["Ġ t"], token_types=types)


Plan = list[tuple[TensorSpec, GGMLType]]


def write_micro(path: Path, recipe: str = "f32", cfg: ModelConfig | None = None,
                edit_plan: Callable[[Plan], Plan] | None = None,
                meta_cfg: ModelConfig | None = None) -> Path:
    """Tensors follow ``cfg``; metadata follows ``meta_cfg`` (default: cfg)."""
    cfg = cfg or micro_config()
    plan = [(s, type_for(recipe, s.role)) for s in expected_tensors(cfg) if not s.optional]
    if edit_plan:
        plan = edit_plan(plan)

    def produce(spec: TensorSpec, ggml_type: GGMLType) -> np.ndarray:
        if ggml_type in (GGMLType.F32, GGMLType.F16, GGMLType.I32):
            return random_tensor(cfg, spec, ggml_type, 0)
        return np.zeros(tensor_nbytes(spec.shape, ggml_type), np.uint8)

    write_gguf(path, meta_cfg or cfg, micro_tokenizer(), plan, produce, name="micro")
    return path
