"""The rooms and their one-way arrows (docs/design.md), read from the installed package.

Every module of ``magnetar`` is parsed (not imported) and each ``import`` in it,
at module level or inside a function, is an arrow. The rules:

* ``agent`` sees the model only through what ``magnetar.runtime`` exports: it may
  import that package itself, ``tools``, ``prompts`` and the CLI's terminal helpers,
  never a runtime submodule, ``kernels`` or MLX;
* ``tools`` imports neither ``runtime`` nor ``agent`` nor ``kernels``;
* the inference core (``runtime`` without ``runtime.lab``) imports neither ``agent``
  nor ``tools`` nor the lab; ``runtime.lab`` imports no ``agent`` or ``tools``;
* ``kernels`` imports nothing of ``runtime``, ``agent`` or ``tools``;
* nothing but the CLI entry imports ``agent``; ``prompts`` imports no room;
* no cycle between modules (imports for annotations only, under
  ``if TYPE_CHECKING:``, are not arrows).
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from functools import cache
from pathlib import Path

import magnetar

ROOMS = ("magnetar.agent", "magnetar.tools", "magnetar.runtime.lab", "magnetar.runtime", "magnetar.kernels",
         "magnetar.prompts", "magnetar.cli", "magnetar.console")


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name, with its source file. Each room
    is its own folder (the package-dir mapping), so each package's folder is walked, found
    through the import system and never imported."""
    found: dict[str, Path] = {}
    packages = ["magnetar", *(r for r in ROOMS if r.count(".") == 1 and r not in ("magnetar.cli", "magnetar.console"))]
    while packages:
        package = packages.pop()
        spec = importlib.util.find_spec(package)
        found[package] = Path(spec.origin)
        for info in pkgutil.iter_modules(spec.submodule_search_locations, package + "."):
            if info.ispkg:
                packages.append(info.name)
            else:
                found[info.name] = Path(info.module_finder.path) / f"{info.name.rsplit('.', 1)[1]}.py"
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules ``name`` imports: ``from X import y`` counts as ``X.y`` when that is a module."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                base = parts[:len(parts) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known)
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node, except under ``if TYPE_CHECKING:`` (names for annotations import nothing at run time)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


@cache
def graph() -> dict[str, set[str]]:
    """Module -> the modules it imports, for the whole installed package."""
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def room(module: str) -> str | None:
    return next((r for r in ROOMS if module == r or module.startswith(r + ".")), None)


def _forbidden(source: str, target: str) -> str | None:
    """Why the arrow ``source -> target`` breaks the design, or None."""
    src, dst = room(source), room(target)
    top = target.split(".")[0]
    if src == "magnetar.agent":
        if dst in ("magnetar.runtime", "magnetar.runtime.lab") and target != "magnetar.runtime":
            return "the agent sees the model only through magnetar.runtime's exports"
        if dst == "magnetar.kernels" or top == "mlx":
            return "the agent never touches kernels or MLX"
    if src == "magnetar.tools" and dst in ("magnetar.runtime", "magnetar.runtime.lab", "magnetar.agent",
                                           "magnetar.kernels"):
        return "tools import no other room"
    if src == "magnetar.runtime" and dst in ("magnetar.agent", "magnetar.tools", "magnetar.runtime.lab",
                                             "magnetar.cli", "magnetar.console"):
        return "the inference core imports no front end and no lab"
    if src == "magnetar.runtime.lab" and dst in ("magnetar.agent", "magnetar.tools"):
        return "the lab imports no front end"
    if src == "magnetar.kernels" and dst in ("magnetar.runtime", "magnetar.runtime.lab", "magnetar.agent",
                                             "magnetar.tools"):
        return "kernels import no room above them"
    if dst == "magnetar.agent" and src not in ("magnetar.agent", "magnetar.cli"):
        return "nothing but the CLI entry imports the agent"
    if src == "magnetar.prompts" and dst is not None and dst != "magnetar.prompts":
        return "prompts are data"
    return None


def test_every_arrow_follows_the_design():
    broken = sorted(f"{source} -> {target}: {why}" for source, targets in graph().items() for target in targets
                    if (why := _forbidden(source, target)))
    assert not broken, "\n".join(broken)


def test_no_import_cycles():
    edges = {m: {t for t in ts if t in graph() and t != m} for m, ts in graph().items()}
    # a package's __init__ importing its own submodules is how a package exports: not a cycle
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    cycles = _cycles(edges)
    assert not cycles, "\n".join(" -> ".join(c + [c[0]]) for c in cycles)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_rules_catch_a_broken_arrow():
    """The checker itself: arrows that break the design are named."""
    assert _forbidden("magnetar.agent.loop", "magnetar.runtime.chat")
    assert _forbidden("magnetar.agent.loop", "mlx.core")
    assert _forbidden("magnetar.tools.shell", "magnetar.runtime")
    assert _forbidden("magnetar.runtime.engine", "magnetar.runtime.lab.bench")
    assert _forbidden("magnetar.kernels.cpu", "magnetar.runtime.config")
    assert _forbidden("magnetar.runtime.lab.bench", "magnetar.agent.loop")
    assert not _forbidden("magnetar.agent.loop", "magnetar.runtime")
    assert not _forbidden("magnetar.runtime.lab.convert", "magnetar.runtime.config")
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert graph()["magnetar.runtime.lab.commands"] >= {"magnetar.runtime.engine"}
