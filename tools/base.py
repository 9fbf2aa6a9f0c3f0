"""What every tool is: a name, a description, a pydantic argument model (whose
JSON schema goes into the DSML tools block) and ``run(args, ctx)``.

``tools`` never imports ``runtime``: the agent turns ``Tool.spec()`` into a
``runtime.chat.ToolSpec`` itself. A tool never raises for a bad call: it
returns ``ToolResult(ok=False, text=...)`` with a message the model can act on
(``ToolRefused`` is the short way to say that from inside ``run``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ValidationError

Mode = Literal["ask", "auto-edit", "yolo", "read-only"]
MODES: tuple[str, ...] = ("ask", "auto-edit", "yolo", "read-only")
Access = Literal["read", "edit", "shell", "commit"]


class ToolRefused(Exception):
    """Raised inside ``run``: the call cannot be done; the message goes to the model."""


@dataclass
class ToolResult:
    text: str  # what the model reads
    ok: bool = True
    summary: str = ""  # one line for a tool card
    diff: str | None = None  # unified diff of an edit, for the UI


@dataclass
class ToolContext:
    """Per-session state the tools share."""

    root: Path  # the project; every path must resolve inside it
    mode: Mode = "ask"
    # Asked before a write/shell/commit the mode does not allow outright:
    # ``confirm(title, detail) -> bool``. None (headless) means "no".
    confirm: Callable[[str, str], bool] | None = None
    data_dir: Path | None = None  # logs (full shell output) and caches live here
    # Files the model has read: resolved path -> (mtime_ns, size, sha256 hex), so an
    # edit of a file changed on disk since is refused.
    read_stamps: dict[Path, tuple[int, int, str]] = field(default_factory=dict)
    undo: Any = None  # the per-turn undo journal (tools/files.py)
    extra: dict[str, Any] = field(default_factory=dict)
    # Shell commands run in an OS sandbox (tools/sandbox.py); the network is off inside it
    # unless allowed, and only --dangerously-no-sandbox turns the sandbox off.
    allow_network: bool = False
    sandbox: bool = True

    def allowed(self, access: Access, title: str, detail: str = "") -> bool:
        """Whether ``access`` may go ahead now, asking the user where the mode says so."""
        if access == "read":
            return True
        if self.mode == "read-only":
            return False
        if self.mode == "yolo" or (self.mode == "auto-edit" and access == "edit"):
            return True
        return bool(self.confirm and self.confirm(title, detail))


class Tool:
    name: ClassVar[str]
    description: ClassVar[str]
    Args: ClassVar[type[BaseModel]]
    access: ClassVar[Access] = "read"

    def run(self, args: BaseModel, ctx: ToolContext) -> ToolResult:
        raise NotImplementedError

    @classmethod
    def spec(cls) -> dict[str, Any]:
        """``{"name", "description", "parameters"}``: the function schema the model sees."""
        schema = cls.Args.model_json_schema()
        return {"name": cls.name, "description": cls.description,
                "parameters": _plain(schema, schema.pop("$defs", {}))}

    def call(self, arguments: dict[str, Any], ctx: ToolContext) -> ToolResult:
        """Validate ``arguments`` and run; every failure becomes a result the model can read."""
        try:
            args = self.Args.model_validate(arguments)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in err.errors())
            return ToolResult(f"error: invalid arguments for {self.name}: {problems}", ok=False,
                              summary="invalid arguments")
        try:
            return self.run(args, ctx)
        except ToolRefused as refusal:
            return ToolResult(f"error: {refusal}", ok=False, summary=str(refusal).split("\n")[0][:120])


def _plain(node: Any, defs: dict[str, Any]) -> Any:
    """The schema as a model reads it best: ``$ref``s inlined, pydantic's titles dropped."""
    if isinstance(node, list):
        return [_plain(v, defs) for v in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _plain(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
    return {k: _plain(v, defs) for k, v in node.items() if k != "title" or not isinstance(v, str)}


def resolve_in_root(ctx: ToolContext, path: str) -> Path:
    """``path`` (relative to the root, or absolute) resolved with symlinks followed;
    refused unless it lies inside the project root."""
    root = ctx.root.resolve()
    candidate = Path(path).expanduser()
    full = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if full != root and root not in full.parents:
        raise ToolRefused(f"{path} is outside the project ({root}); only files inside it can be used")
    return full
