"""Where things live. The model the agent runs: ``--model``, then
``$MAGNETAR_MODEL``, then the models folder (``$MAGNETAR_HOME/models``, else
``~/.cache/magnetar/models``), where the download command puts the files under
the names below; sessions and caches: ``data_dir()``."""

from __future__ import annotations

import os
from pathlib import Path

from magnetar.runtime import MagnetarError

# name -> (file name in the models folder, disk size, RAM it wants to run well)
KNOWN = {
    "q2-imatrix": ("deepseek-v4-flash-q2-imatrix.gguf", "87 GB (81 GiB)", "96 GB or more"),
    "q4-imatrix": ("deepseek-v4-flash-q4-imatrix.gguf", "165 GB (153 GiB)", "192 GB or more"),
    "q2": ("deepseek-v4-flash-q2.gguf", "87 GB (81 GiB)", "96 GB or more"),
    "q4": ("deepseek-v4-flash-q4.gguf", "165 GB (153 GiB)", "192 GB or more"),
    # The optional multi-token-prediction head, used next to a model; never run on its own.
    "mtp": ("deepseek-v4-flash-mtp.gguf", "3.5 GB", "3.5 GB more"),
}
PREFERENCE = ("q2-imatrix", "q4-imatrix", "q2", "q4")


class ModelNotFound(MagnetarError):
    """No model file could be found for the agent."""


def models_dir() -> Path:
    if os.environ.get("MAGNETAR_HOME"):
        return Path(os.environ["MAGNETAR_HOME"]).expanduser() / "models"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "magnetar" / "models"


def data_dir() -> Path:
    """Sessions, logs and the prefix cache: ``$MAGNETAR_HOME/data``, else XDG's data home."""
    if os.environ.get("MAGNETAR_HOME"):
        return Path(os.environ["MAGNETAR_HOME"]).expanduser() / "data"
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base).expanduser() / "magnetar"


def resolve_model(explicit: str | None = None) -> Path:
    """The model to run, or ``ModelNotFound`` saying where we looked and how to fix it."""
    for source, value in (("--model", explicit), ("MAGNETAR_MODEL", os.environ.get("MAGNETAR_MODEL"))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise ModelNotFound(f"{source} names {path}, which is not a file",
                                    "check the path, or run `magnetar download q2-imatrix`")
            return path
    folder = models_dir()
    for name in PREFERENCE:
        path = folder / KNOWN[name][0]
        if path.is_file():
            return path
    raise ModelNotFound(f"no model: no --model, no MAGNETAR_MODEL, nothing in {folder}",
                        "run `magnetar download q2-imatrix` (87 GB disk, 96 GB RAM) or pass --model FILE.gguf")


def missing_model_help() -> str:
    """What the first-run screen says: the options with their disk and RAM needs."""
    lines = ["No DeepSeek V4 Flash model was found. Options:"]
    for name in PREFERENCE:
        file, disk, ram = KNOWN[name]
        lines.append(f"  magnetar download {name:<11}  {disk:>7} on disk, {ram} RAM  ->  {models_dir() / file}")
    lines.append("or point at a file you have: magnetar --model PATH.gguf (or set MAGNETAR_MODEL).")
    lines.append("For wiring checks only: magnetar make-model --preset tiny -o tiny.gguf (random weights, noise).")
    return "\n".join(lines)
