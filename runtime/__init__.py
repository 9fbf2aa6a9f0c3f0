"""magnetar.runtime: the inference core. What the agent (and a server) may use is
exported here, the door: the Engine, the chat types, the events of a reply, the
errors, the prefix cache and the atomic file writes. Everything else is the
runtime's own business (see docs/spec/ and docs/design.md: "the one door").

Names load on first use (PEP 562), so ``from magnetar.runtime import UsageError``
does not import MLX and the model code."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "engine": ("Engine", "Event", "Snapshot", "Stats"),
    "limits": ("DEFAULT_CTX", "MAX_CTX"),
    "conversation": ("SyncReport", "ReplyEnd", "last_reply", "THINK_MAX_MIN_CTX"),
    "chat": ("Message", "ToolCall", "ToolSpec", "Mode", "MODES"),
    "dsml": ("TextDelta", "ReasoningDelta", "ToolCallStarted", "ToolCallParsed", "BlockDone", "DsmlError",
             "DsmlInThinking", "ParameterStarted", "ParameterDelta", "ParameterEnded", "ToolCallEnded"),
    "tokenizer": ("THINK_END",),
    "errors": ("MagnetarError", "UsageError", "ContextFull", "ChatError", "GGUFError", "TokenizerError",
               "ExpertReadError"),
    "checkpoint": ("CheckpointError",),
    "kvcache": ("PrefixCache",),
    "fileio": ("atomic_write_bytes", "atomic_writer", "sweep_stale_temps"),
    "distributed": ("start_pipeline",),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value
