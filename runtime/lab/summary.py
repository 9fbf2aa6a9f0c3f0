"""A plain-data summary of a model file (what ``magnetar inspect`` shows)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ModelConfig
from ..expert_cache import BankPlan, auto_budget, routed_tensors
from ..gguf_read import ModelFile

# Groups as in docs/spec/v4-model.md §7.1, matched on tensor name pieces in order.
_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("token embedding", ("token_embd",)),
    ("output head", ("output.weight",)),
    ("routed experts", ("_exps",)),
    ("shared experts", ("_shexp",)),
    ("indexers", ("indexer",)),
    ("compressors", ("attn_compressor",)),
    ("attention projections", ("attn_q_a.", "attn_q_b.", "attn_kv.", "attn_output_")),
    ("routers", ("ffn_gate_inp", "exp_probs_b", "tid2eid")),
    ("HC, norms, sinks", ("hc_", "norm", "sinks")),
)


@dataclass
class GroupUsage:
    name: str
    nbytes: int = 0
    types: dict[str, int] = field(default_factory=dict)  # GGML type name -> bytes


@dataclass
class ModelSummary:
    name: str
    architecture: str
    recipe: str
    file_bytes: int
    tensor_bytes: int
    n_tensors: int
    config: ModelConfig
    schedule: dict[int, list[int]]  # compress ratio -> layers
    groups: list[GroupUsage]
    kv_elems_per_token: float  # amortized compressed rows, all layers
    raw_window_elems: int  # fixed: every layer's raw window
    expert_recipes: list[str]


def summarize(model: ModelFile) -> ModelSummary:
    cfg = model.config
    groups = {name: GroupUsage(name) for name, _ in _GROUPS}
    for info in model.tensors.values():
        group = next(g for g, keys in _GROUPS if any(k in info.name for k in keys))
        usage = groups[group]
        usage.nbytes += info.nbytes
        usage.types[info.ggml_type.name] = usage.types.get(info.ggml_type.name, 0) + info.nbytes
    return ModelSummary(
        name=str(model.meta.get("general.name", model.path.stem)),
        architecture=str(model.meta.get("general.architecture")),
        recipe=model.recipe,
        file_bytes=model.size,
        tensor_bytes=sum(i.nbytes for i in model.tensors.values()),
        n_tensors=len(model.tensors),
        config=cfg,
        schedule={r: [il for il in range(cfg.n_layer) if cfg.ratio(il) == r]
                  for r in sorted(set(cfg.compress_ratios[: cfg.n_layer]))},
        groups=[g for g in groups.values() if g.nbytes],
        kv_elems_per_token=cfg.kv_elems_per_token(),
        raw_window_elems=cfg.n_layer * cfg.window * cfg.head_dim,
        expert_recipes=model.expert_recipes,
    )


@dataclass
class StreamingSplit:
    """What stays in RAM and what streams from the file with an expert cache of ``budget`` bytes."""

    budget: int
    plan: BankPlan  # the cache as ExpertCache would allocate it
    non_expert_bytes: int  # always resident
    routed_bytes: int  # every routed expert, in the file
    note: str = ""  # how ``auto`` chose the budget

    @property
    def resident_bytes(self) -> int:
        return self.non_expert_bytes + self.plan.nbytes


def streaming_split(model: ModelFile, budget: int | str, ctx: int) -> StreamingSplit:
    """``budget``: bytes, or ``"auto"`` (sized as ``Engine.load`` sizes it for ``ctx`` tokens)."""
    layers = routed_tensors(model, range(model.config.n_layer))
    routed = sum(i.nbytes for infos in layers.values() for i in infos)
    non_expert = sum(i.nbytes for i in model.tensors.values()) - routed
    note = ""
    if budget == "auto":
        budget, note = auto_budget(model, ctx, non_expert)
    return StreamingSplit(budget, BankPlan.of(layers, budget), non_expert, routed, note)


def layer_ranges(layers: list[int]) -> str:
    """[0,1] -> "0-1"; [2,4,...,42] -> "2-42 step 2"; otherwise a list."""
    if len(layers) <= 2:
        return ", ".join(map(str, layers)) if len(layers) < 2 or layers[1] != layers[0] + 1 \
            else f"{layers[0]}-{layers[1]}"
    step = layers[1] - layers[0]
    if all(b - a == step for a, b in zip(layers, layers[1:])):
        return f"{layers[0]}-{layers[-1]}" + ("" if step == 1 else f" step {step}")
    return ", ".join(map(str, layers))
