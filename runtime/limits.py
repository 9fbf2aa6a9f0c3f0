"""Context sizes and the expert-cache size every front end shares, in a module that
imports nothing heavy, so the CLI can state and check them without loading MLX and
the model code."""

from .errors import UsageError

# The context of every command that loads a model to use it (TUI, generate, run, review):
# room for a long coding session. It costs nothing until used: the KV state grows with the
# tokens it holds, not with the context (runtime/kv_state.py).
DEFAULT_CTX = 65536
MAX_CTX = 1_048_576  # V4's trained context (1M tokens)

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_cache_size(text: str) -> int | str:
    """``--expert-cache`` value: ``auto`` or bytes with an optional K/M/G/T suffix (``512M``, ``24G``)."""
    value = text.strip().upper().removesuffix("B")
    if value == "AUTO":
        return "auto"
    number, unit = (value[:-1], value[-1]) if value[-1:] in _SUFFIX and value[-1:] else (value, "")
    try:
        size = float(number) * _SUFFIX[unit]
    except ValueError:
        raise UsageError(f"--expert-cache {text!r} is not a size", "use auto, or bytes like 512M or 24G") from None
    if size <= 0 or size != size or size == float("inf"):
        raise UsageError(f"--expert-cache must be positive, got {text!r}")
    return int(size)
