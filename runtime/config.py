"""The typed model config, and its mapping to ``deepseek4.*`` GGUF metadata.

One table (``FIELDS``) names every key ds4 validates plus the few llama.cpp
requires, with the Python field it fills and the GGUF value type we write.
Dimensions are read from metadata, never hard-coded, so small test models of
the Flash layout load through the same code; ``check()`` then enforces the
structural rules every size must obey (docs/spec/v4-model.md §1-§2).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from .errors import GGUFError

ARCH = "deepseek4"
RATIOS = (0, 4, 128)
GATING_SQRT_SOFTPLUS = 4  # llama.cpp's expert_gating_func id for sqrt(softplus)

# (python field, GGUF key without the "deepseek4." prefix, GGUF writer type)
FIELDS: tuple[tuple[str, str, str], ...] = (
    ("n_layer", "block_count", "u32"),
    ("d_model", "embedding_length", "u32"),
    ("vocab_size", "vocab_size", "u32"),
    ("context_length", "context_length", "u32"),
    ("n_head", "attention.head_count", "u32"),
    ("n_head_kv", "attention.head_count_kv", "u32"),
    ("head_dim", "attention.key_length", "u32"),
    ("value_dim", "attention.value_length", "u32"),
    ("rope_dim", "rope.dimension_count", "u32"),
    ("q_lora_rank", "attention.q_lora_rank", "u32"),
    ("o_lora_rank", "attention.output_lora_rank", "u32"),
    ("o_groups", "attention.output_group_count", "u32"),
    ("n_expert", "expert_count", "u32"),
    ("n_expert_used", "expert_used_count", "u32"),
    ("n_expert_shared", "expert_shared_count", "u32"),
    ("expert_ffn", "expert_feed_forward_length", "u32"),
    ("hash_layers", "hash_layer_count", "u32"),
    ("window", "attention.sliding_window", "u32"),
    ("indexer_heads", "attention.indexer.head_count", "u32"),
    ("indexer_dim", "attention.indexer.key_length", "u32"),
    ("indexer_top_k", "attention.indexer.top_k", "u32"),
    ("hc", "hyper_connection.count", "u32"),
    ("sinkhorn_iters", "hyper_connection.sinkhorn_iterations", "u32"),
    ("compress_ratios", "attention.compress_ratios", "i32[]"),
    ("swiglu_clamp", "swiglu_clamp_exp", "f32[]"),
    ("yarn_orig_ctx", "rope.scaling.original_context_length", "u32"),
    ("rope_base", "rope.freq_base", "f32"),
    ("yarn_factor", "rope.scaling.factor", "f32"),
    ("yarn_beta_fast", "rope.scaling.yarn_beta_fast", "f32"),
    ("yarn_beta_slow", "rope.scaling.yarn_beta_slow", "f32"),
    ("compress_rope_base", "attention.compress_rope_freq_base", "f32"),
    ("expert_weights_scale", "expert_weights_scale", "f32"),
    ("rms_eps", "attention.layer_norm_rms_epsilon", "f32"),
    ("hc_eps", "hyper_connection.epsilon", "f32"),
    ("expert_weights_norm", "expert_weights_norm", "bool"),
)
# ds4 reads context_length only for its summary; a file may omit it.
OPTIONAL_FIELDS = ("context_length",)
# Keys we accept when present but never need (llama.cpp/ds4 extras).
OPTIONAL_ZERO = ("expert_group_count", "expert_group_used_count")


class ModelConfig(BaseModel):
    """DeepSeek V4 hyperparameters, named for what they are in the forward pass."""

    n_layer: int
    d_model: int
    vocab_size: int
    context_length: int = 1_048_576
    n_head: int
    n_head_kv: int = 1
    head_dim: int
    value_dim: int
    rope_dim: int
    q_lora_rank: int
    o_lora_rank: int
    o_groups: int
    n_expert: int
    n_expert_used: int
    n_expert_shared: int = 1
    expert_ffn: int
    hash_layers: int
    window: int
    indexer_heads: int
    indexer_dim: int
    indexer_top_k: int
    hc: int = 4
    sinkhorn_iters: int = 20
    compress_ratios: list[int]
    swiglu_clamp: list[float]
    yarn_orig_ctx: int = 65536
    rope_base: float = 10000.0
    yarn_factor: float = 16.0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    compress_rope_base: float = 160000.0
    expert_weights_scale: float = 1.5
    rms_eps: float = 1e-6
    hc_eps: float = 1e-6
    expert_weights_norm: bool = True

    def ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    def kv_elems_per_token(self) -> float:
        """Compressed-cache elements one more token adds, amortized (spec §7.3):
        ratio-4 layers add a 512-wide KV row and a 128-wide indexer row every 4
        tokens, ratio-128 layers one KV row every 128."""
        total = 0.0
        for il in range(self.n_layer):
            r = self.ratio(il)
            if r == 4:
                total += (self.head_dim + self.indexer_dim) / 4
            elif r == 128:
                total += self.head_dim / 128
        return total

    def kv_bytes(self, ctx: int) -> int:
        """Float32 KV state for ``ctx`` tokens: compressed rows plus every layer's raw window."""
        return int(4 * (self.kv_elems_per_token() * ctx + self.n_layer * self.window * self.head_dim))

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.hash_layers

    @property
    def hc_mix(self) -> int:
        """Width of the HC mixing vector: pre (hc) + post (hc) + comb (hc*hc)."""
        return (2 + self.hc) * self.hc

    def check(self) -> "ModelConfig":
        """Structural rules the V4 graph relies on; raises GGUFError."""
        def bad(msg: str) -> GGUFError:
            return GGUFError(f"inconsistent metadata: {msg}")

        positive = [n for n, _, t in FIELDS if t == "u32" and n not in ("hash_layers",)]
        for name in positive:
            if getattr(self, name) <= 0:
                raise bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_head_kv != 1:
            raise bad(f"attention.head_count_kv is {self.n_head_kv}; V4 has one shared KV head")
        if self.head_dim != self.value_dim:
            raise bad(f"key_length {self.head_dim} != value_length {self.value_dim} (K and V are one row)")
        if self.rope_dim % 2 or self.rope_dim > min(self.head_dim, self.indexer_dim):
            raise bad(f"rope.dimension_count {self.rope_dim} must be even and fit the heads")
        if self.n_head % self.o_groups:
            raise bad(f"{self.n_head} heads do not split into {self.o_groups} output groups")
        if self.n_expert_used > self.n_expert:
            raise bad(f"expert_used_count {self.n_expert_used} > expert_count {self.n_expert}")
        if self.hash_layers > self.n_layer:
            raise bad(f"hash_layer_count {self.hash_layers} > block_count {self.n_layer}")
        if len(self.compress_ratios) < self.n_layer:
            raise bad(f"compress_ratios has {len(self.compress_ratios)} entries for {self.n_layer} layers")
        if any(r not in RATIOS for r in self.compress_ratios[: self.n_layer]):
            raise bad(f"compress_ratios {self.compress_ratios[: self.n_layer]} may only hold 0, 4 and 128")
        if len(self.swiglu_clamp) < self.n_layer:
            raise bad(f"swiglu_clamp_exp has {len(self.swiglu_clamp)} entries for {self.n_layer} layers")
        if not (0 < self.rms_eps < 1 and 0 < self.hc_eps < 1):
            raise bad("epsilons must lie in (0, 1)")
        return self

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "ModelConfig":
        arch = meta.get("general.architecture")
        if arch != ARCH:
            raise GGUFError(f"wrong architecture {arch!r}; this runtime runs {ARCH!r} (DeepSeek V4) only")
        values: dict[str, Any] = {}
        for name, key, kind in FIELDS:
            full = f"{ARCH}.{key}"
            if full not in meta:
                if name in OPTIONAL_FIELDS:
                    continue
                raise GGUFError(f"missing metadata key {full}", "is this a ds4-layout DeepSeek V4 GGUF?")
            values[name] = _coerce(full, meta[full], kind)
        for key in OPTIONAL_ZERO:
            v = meta.get(f"{ARCH}.{key}")
            if v not in (None, 0):
                raise GGUFError(f"inconsistent metadata: {ARCH}.{key} is {v}; V4 has no expert groups")
        gating = meta.get(f"{ARCH}.expert_gating_func")
        if gating not in (None, GATING_SQRT_SOFTPLUS):
            raise GGUFError(f"inconsistent metadata: expert_gating_func {gating} is not sqrt(softplus) (4)")
        return cls(**values).check()

    def to_metadata(self) -> list[tuple[str, Any, str]]:
        """(key, value, writer type) for every field, in table order."""
        return [(f"{ARCH}.{key}", getattr(self, name), kind) for name, key, kind in FIELDS]


def _coerce(key: str, value: Any, kind: str) -> Any:
    """Accept the value types ds4 accepts (floats as f32/f64/u32/i32, ints as u32/u64/i32)."""
    try:
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind.endswith("[]"):
            if not isinstance(value, list):
                raise TypeError
            return [float(v) if kind == "f32[]" else _as_int(v) for v in value]
        if kind == "f32":
            if isinstance(value, (bool, str, list)):
                raise TypeError
            return float(value)
        return _as_int(value)
    except (TypeError, ValueError):
        raise GGUFError(f"metadata key {key} has the wrong type ({type(value).__name__}: {value!r:.40})") from None


def _as_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError
    return v
