"""The tools every session gets, and the per-project context around them.

The tool list is the same in every mode, so the system prompt (with its tool
schemas) is one reusable KV prefix; the mode decides what the tools allow.
"""

from __future__ import annotations

from pathlib import Path

from magnetar.tools.base import Tool
from magnetar.tools.edit import EDIT_TOOLS
from magnetar.tools.files import READ_TOOLS
from magnetar.tools.git_tools import GIT_TOOLS, READ_GIT_TOOLS
from magnetar.tools.plan import UpdatePlan
from magnetar.tools.repo_map import RepoMap
from magnetar.tools.shell import SHELL_TOOLS

INSTRUCTION_FILES = ("AGENTS.md", "MAGNETAR.md")


def standard_tools() -> list[Tool]:
    return [cls() for cls in (*READ_TOOLS, RepoMap, *EDIT_TOOLS, *SHELL_TOOLS, *GIT_TOOLS, UpdatePlan)]


def read_only_tools() -> list[Tool]:
    """What a review may use: reading, searching, the repo map and git's read side."""
    return [cls() for cls in (*READ_TOOLS, RepoMap, *READ_GIT_TOOLS)]


def project_root(start: Path) -> Path:
    """The enclosing git work tree, else ``start`` itself."""
    start = start.resolve()
    for folder in (start, *start.parents):
        if (folder / ".git").exists():
            return folder
    return start


def with_project_instructions(root: Path, task: str) -> str:
    """The first user message: AGENTS.md (or MAGNETAR.md) first, then the task.
    In the user turn, not the system prompt, so the system prefix stays the same everywhere."""
    for name in INSTRUCTION_FILES:
        path = root / name
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            return f"Project instructions ({name}):\n\n{text}\n\nTask:\n\n{task}"
    return task
