"""Random-weight DeepSeek V4 models in ds4's exact layout (``magnetar make-model``).

Real weights are 81 GB and not on our machines, so tests and benchmarks run
on generated files with the real V4 tokenizer:

* ``tiny``: 5 layers covering every layer kind (ratio 0, 4, 128; hash and
  routed MoE), small widths; builds in seconds.
* ``small``: Flash's 43-layer schedule at small width, for per-token overhead.
* ``mini-flash``: full Flash widths, 4 layers, q2/q4 only (experts are the
  bulk: 1.8 GB per layer at q2).

Each tensor draws from its own generator seeded by (seed, tensor name), so
every recipe of one seed encodes the same underlying weights (q2/q4 experts
through ``kernels.quantize``) and the files can be compared against each
other. Scales keep activations O(1): weights ~ N(0, 1/in), norm gains ~ 1, so
every RMS-normed sublayer sees unit-scale inputs and the residual grows only
like sqrt(depth).

The exception is ``mini-flash``: its 25.8 G routed-expert values would take
hours to quantize in numpy (and 100 GB as f32), so its experts are random
*valid* blocks (every bit pattern of IQ2_XXS/Q2_K/Q4_K decodes to finite
values) with scale fields set so the decoded weights have the float recipes'
RMS. Its speed is what it is for; its quality means nothing.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from magnetar.kernels.quantize import quantize

from ..config import ModelConfig
from ..errors import UsageError
from ..layout import BLOCK, EXPERT_ROLES, RECIPES, GGMLType, TensorSpec, expected_tensors, type_for
from .gguf_write import v4_tokenizer_meta, write_gguf

V4_VOCAB = 129280
FLASH_SCHEDULE = [0, 0] + [4 if il % 2 == 0 else 128 for il in range(2, 43)]


def _preset(**over) -> ModelConfig:
    base = dict(vocab_size=V4_VOCAB, context_length=1_048_576, n_head_kv=1, rope_dim=64,
                n_expert_shared=1, hash_layers=3, hc=4, sinkhorn_iters=20)
    base.update(over)
    base.setdefault("value_dim", base["head_dim"])
    base.setdefault("swiglu_clamp", [10.0] * base["n_layer"])
    return ModelConfig(**base).check()


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": lambda: _preset(
        n_layer=5, d_model=256, n_head=4, head_dim=128, q_lora_rank=64, o_lora_rank=64,
        o_groups=2, n_expert=8, n_expert_used=3, expert_ffn=256, window=32,
        indexer_heads=4, indexer_dim=128, indexer_top_k=8, compress_ratios=[0, 0, 4, 128, 4]),
    "small": lambda: _preset(
        n_layer=43, d_model=256, n_head=4, head_dim=128, q_lora_rank=128, o_lora_rank=64,
        o_groups=2, n_expert=16, n_expert_used=6, expert_ffn=256, window=128,
        indexer_heads=4, indexer_dim=128, indexer_top_k=512, compress_ratios=FLASH_SCHEDULE),
    "mini-flash": lambda: _preset(
        n_layer=4, d_model=4096, n_head=64, head_dim=512, q_lora_rank=1024, o_lora_rank=1024,
        o_groups=8, n_expert=256, n_expert_used=6, expert_ffn=2048, window=128,
        indexer_heads=64, indexer_dim=128, indexer_top_k=512, compress_ratios=[0, 0, 4, 128]),
}

# Byte offsets of the f16 scale fields in each block: (d, dmin or None).
_SCALE_FIELDS = {
    GGMLType.Q8_0: (0, None),
    GGMLType.Q2_K: (80, 82),
    GGMLType.Q4_K: (0, 2),
    GGMLType.IQ2_XXS: (0, None),
}
# dmin / d that makes the expected decoded value zero for uniform random
# codes: Q2_K mean(sc*q) = 7.5*1.5 vs mean(mn) = 7.5; Q4_K 31.5*7.5 vs 31.5.
_ZERO_MEAN_DMIN = {GGMLType.Q2_K: 1.5, GGMLType.Q4_K: 7.5}


def make_model(preset: str, recipe: str, seed: int, out: str | Path,
               progress: Callable[[int, int], None] | None = None) -> Path:
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}", f"choose one of {', '.join(PRESETS)}")
    if recipe not in RECIPES:
        raise UsageError(f"unknown recipe {recipe!r}", f"choose one of {', '.join(RECIPES)}")
    if preset == "mini-flash" and recipe not in ("q2", "q4"):
        raise UsageError(f"mini-flash with recipe {recipe} would not fit on disk or in RAM",
                         "use --recipe q2 or q4")
    cfg = PRESETS[preset]()
    plan = [(s, type_for(recipe, s.role)) for s in expected_tensors(cfg) if not s.optional]
    for spec, t in plan:
        if spec.shape[0] % BLOCK[t][0]:
            raise UsageError(f"preset {preset} cannot use recipe {recipe}: {spec.name} rows of "
                             f"{spec.shape[0]} do not fill {t.name} blocks of {BLOCK[t][0]}")

    def produce(spec: TensorSpec, ggml_type: GGMLType) -> np.ndarray:
        return random_tensor(cfg, spec, ggml_type, seed, quantize_experts=preset != "mini-flash")

    out = Path(out)
    write_gguf(out, cfg, v4_tokenizer_meta(), plan, produce,
               name=f"magnetar-{preset}-{recipe}-seed{seed}",
               extra={"magnetar.preset": preset, "magnetar.recipe": recipe,
                      "magnetar.seed": seed},
               progress=progress)
    return out


def random_tensor(cfg: ModelConfig, spec: TensorSpec, ggml_type: GGMLType, seed: int,
                  quantize_experts: bool = True) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    name = spec.name
    if ggml_type == GGMLType.I32:  # tid2eid: n_used distinct experts per token id
        keys = rng.random((cfg.vocab_size, cfg.n_expert), dtype=np.float32)
        return np.argsort(keys, axis=1)[:, : cfg.n_expert_used].astype(np.int32)
    fan_in = spec.shape[0]
    low_bit = spec.role in EXPERT_ROLES and ggml_type in (GGMLType.Q2_K, GGMLType.Q4_K, GGMLType.IQ2_XXS)
    if low_bit and not quantize_experts:
        return random_blocks(ggml_type, spec.shape, fan_in ** -0.5, rng)
    values = _float_values(name, spec, rng)
    if low_bit:  # one expert at a time, as convert does (IQ2's fallback importance is per matrix)
        return np.stack([quantize(expert, ggml_type) for expert in values])
    if ggml_type == GGMLType.F32:
        return values
    if ggml_type == GGMLType.F16:
        return values.astype(np.float16)
    if ggml_type == GGMLType.Q8_0:
        rows = values.reshape(-1, fan_in)
        return gguf.quants.quantize(rows, gguf.GGMLQuantizationType.Q8_0)
    raise ValueError(f"no generator for {name} as {ggml_type.name}")


def _float_values(name: str, spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    torch_shape = tuple(reversed(spec.shape))
    n = spec.n_elements

    def normal(std: float, mean: float = 0.0) -> np.ndarray:
        v = rng.standard_normal(n, dtype=np.float32) * np.float32(std) + np.float32(mean)
        return v.reshape(torch_shape)

    if name.endswith("norm.weight"):
        return normal(0.1, 1.0)
    if name.endswith("_scale.weight"):  # HC pre/post/comb gains and the head's scale
        return np.abs(normal(0.1, 1.0))
    if name.endswith("_base.weight"):
        return normal(0.5)
    if name.endswith("attn_sinks.weight"):
        return normal(1.0)
    if name.endswith("exp_probs_b.bias"):
        return normal(0.1)
    if name.endswith("ape.weight"):
        return normal(0.5)
    if name == "token_embd.weight":
        return normal(1.0)
    return normal(spec.shape[0] ** -0.5)


def random_blocks(ggml_type: GGMLType, shape: tuple[int, ...], rms: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Random valid quantized blocks whose decoded values have the given RMS."""
    elems, nbytes = BLOCK[ggml_type]
    n_blocks = int(np.prod(shape)) // elems
    blocks = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    d_off, dmin_off = _SCALE_FIELDS[ggml_type]
    # Calibrate d on a sample of the random codes (d=1), then set every block.
    sample = blocks[: min(n_blocks, 256)].copy()
    _set_scales(sample, d_off, dmin_off, 1.0, ggml_type)
    decoded = gguf.quants.dequantize(sample, gguf.GGMLQuantizationType(int(ggml_type)))
    d = rms / float(np.sqrt(np.mean(decoded.astype(np.float64) ** 2)))
    _set_scales(blocks, d_off, dmin_off, d, ggml_type)
    return blocks


def _set_scales(blocks: np.ndarray, d_off: int, dmin_off: int | None, d: float,
                ggml_type: GGMLType) -> None:
    blocks[:, d_off:d_off + 2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
    if dmin_off is not None:
        dmin = np.float16(d * _ZERO_MEAN_DMIN[ggml_type])
        blocks[:, dmin_off:dmin_off + 2] = np.frombuffer(dmin.tobytes(), np.uint8)
