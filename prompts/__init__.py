"""The prompt texts the agent loads: ``system``, ``review``, ``compaction``.

Plain files beside this module, so they can be read and reviewed as text. The
system prompt holds nothing that changes between turns or repositories: its
tokens (with the tool schemas) are a KV prefix every session reuses.
"""

from importlib import resources

NAMES = ("system", "review", "compaction")


def load(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown prompt {name!r}; the prompts are {', '.join(NAMES)}")
    return resources.files(__name__).joinpath(f"{name}.md").read_text(encoding="utf-8").strip()
