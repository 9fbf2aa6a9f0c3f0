"""The precisions a model loads with (docs/spec/v4-model.md §3.1, §4.3).

"official" simulates the FP8 KV cache and FP4 indexer activations DeepSeek V4
was trained with; "reference" keeps float32 throughout. The round trips live
with the kernels (``kernels/precision.py``), which reproduce them in their
fused decode attention.
"""

from __future__ import annotations

from dataclasses import dataclass

from magnetar.kernels.precision import Rounding, f16_round, fp8_kv_round_trip, indexer_round_trip

from .errors import UsageError

PRECISIONS = ("official", "reference")


@dataclass(frozen=True)
class Precision(Rounding):
    """The rounding steps of a named precision."""

    @classmethod
    def named(cls, name: str, nope: int) -> "Precision":
        """The steps of precision ``name``; the one place a precision name is checked."""
        if name not in PRECISIONS:
            raise UsageError(f"precision must be 'official' or 'reference', not {name!r}")
        return cls(name == "official", nope)


__all__ = ["PRECISIONS", "Precision", "f16_round", "fp8_kv_round_trip", "indexer_round_trip"]
